"""`python -m avr.fit CONFIG.yaml [--section.key value …]`: train from a YAML through LightningCLI.

The config names classes by `class_path` / `init_args` (`model`, `data`, and inside them modes and
rewards); every `--a.b value` overrides the YAML; `${…}` interpolation is resolved after the
command line is read (jsonargparse's `omegaconf+` mode), so the shipped configs' loggers write under
`${trainer.default_root_dir}` and `--trainer.default_root_dir X` moves every output; `--print_config`
prints the resolved config. Plugins from the `avr.modes` / `avr.rewards` entry points are loaded
first, so their classes are known by short name too.

An error raised while building the model or data (an unknown mode, a missing model folder) is
printed first, in one line, instead of under jsonargparse's dump of the whole config; so is a bad
config file, `--ckpt_path` or `default_root_dir`, a checkpoint that does not fit the run, and a
record the run cannot train on; each exits with status 2. Checkpoints
are written beside their destination and renamed into place (`avr.lit.checkpointing`). When the
run ends it prints where its logs, config and checkpoints went. SIGTERM or SIGINT saves a resumable
`preempted.ckpt` after the step under way and exits with 128 + the signal's number
(`avr.lit.callbacks.Preemption`).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import logging
import os
import signal
import sys
import traceback
import typing
import warnings
from pathlib import Path
from typing import NoReturn

import jsonargparse
import lightning as L
import yaml
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import OmegaConf
from rich.console import Console

from avr.backbone.packing import TrajectoryTooLong
from avr.data.datamodule import ResumeError
from avr.lit.callbacks import Preemption
from avr.lit.checkpointing import AtomicCheckpointIO
from avr.machine import cpu_bf16
from avr.registry import load_plugins
from avr.sequence import TrajectoryError

#: How `main` and `parse_config` build their LightningCLI: any module and data module by
#: `class_path`, `${…}` resolved after the command line is read.
CLI_SETTINGS = {
    "model_class": L.LightningModule,
    "datamodule_class": L.LightningDataModule,
    "subclass_mode_model": True,
    "subclass_mode_data": True,
    "parser_kwargs": {"parser_mode": "omegaconf+"},
}


class _NoAdvertisement(logging.Filter):
    """Drops Lightning's tip advertising its hosted logger at every start (nothing to act on)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def main(argv: list[str] | None = None) -> LightningCLI:
    """Parse `argv` (default: the command line) and fit."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoAdvertisement())
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["fit"] and len(args) > 1 and not args[1].startswith("-"):
        args = args[1:]  # `avr fit CONFIG.yaml …`
    if (
        args
        and not args[0].startswith("-")
        and args[0] not in ("fit", "validate", "test", "predict")
    ):
        args = ["fit", "--config", args[0], *args[1:]]
    load_plugins()
    check_init_args(args)
    check_ckpt_path(_override(args, "--ckpt_path"))
    if argv is None:
        # From the command line, LightningCLI reads the (rewritten) sys.argv itself: passing
        # `args` as well draws its warning, and DDP relaunches workers from sys.argv.
        sys.argv[1:], args = args, None
    _parsing_settings()
    preemption = Preemption()
    try:
        with warnings.catch_warnings():
            # Called from Python (a notebook, a test) with `argv`: sys.argv is the host's own (a
            # kernel's flags), which LightningCLI warns about though it reads `args` alone.
            warnings.filterwarnings("ignore", "LightningCLI's args parameter is intended")
            cli = AvrCLI(
                **CLI_SETTINGS,
                save_config_kwargs={"overwrite": True},
                trainer_defaults={"callbacks": [preemption]},
                args=args,
            )
    except SIGTERMException:
        # Every rank stopped at the same step and saved together: the group ends cleanly here too.
        end_process_group()
        raise SystemExit(128 + (preemption.received or signal.SIGTERM)) from None
    except (ResumeError, TrajectoryTooLong, TrajectoryError) as err:
        # A checkpoint or data record that does not fit the run: one line, not Lightning's stack
        # (nor a DataLoader worker's, which re-raises with the worker's traceback as message).
        line = str(err).strip().splitlines()[-1]
        prefix = f"{type(err).__module__}.{type(err).__qualname__}: "
        fail(f"error: {line.removeprefix(prefix)}")
    end_process_group()
    return cli


class UsageError(SystemExit):
    """A config, command line or input that `avr fit` cannot run: exit status 2, and its one-line
    message (already printed to stderr by `fail`) as the exception's text."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def fail(message: str) -> NoReturn:
    """Print `message` (one line, `error: …`) to stderr and exit with status 2."""
    print(message, file=sys.stderr)
    raise UsageError(message) from None


def end_process_group() -> None:
    """Destroy the default process group of a finished distributed run, on every rank.

    Lightning registers this teardown at exit for NCCL alone; a gloo group (DDP on CPUs) left alive
    keeps its C++ worker, transport and store threads running into interpreter finalization, where
    they abort the process ("terminate called without an active exception", SIGABRT) after all its
    work is done. Called only after a run that ended normally: every rank reaches it, so the
    collective teardown cannot wait on a rank that died in the middle of a collective."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def parse_config(config: str | Path, overrides: list[str] | None = None) -> dict:
    """The config `avr.fit CONFIG OVERRIDES…` would run, parsed by the same LightningCLI parser
    (defaults of every class filled in, interpolations resolved, types checked) but with nothing
    instantiated: no model is built, no weight read. A plain nested dict."""
    load_plugins()
    _parsing_settings()
    cli = _ParseOnly(
        **CLI_SETTINGS,
        run=False,
        args=["--config", str(config), *(overrides or [])],
    )
    return cli.config.as_dict()


def _parsing_settings() -> None:
    """The jsonargparse settings of `main` and `parse_config`: relative `${a.b}` paths in the YAML
    name top-level keys (not `fit.a.b` under the subcommand); dataclass fields' docstrings
    (`ModelSettings`, `LoraSettings`, `SamplingConfig`) show in `--help`."""
    jsonargparse.set_parsing_settings(
        omegaconf_absolute_to_relative_paths=True, docstring_parse_attribute_docstrings=True
    )


class AvrCLI(LightningCLI):
    """LightningCLI that names the cause of a failed instantiation, picks the precision the CPU
    trains fastest in where the config leaves it open, and says where a run's outputs went."""

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config["trainer"]
        if trainer.get("precision") is None:
            chosen = cpu_precision(trainer.get("accelerator"))
            if chosen is not None:
                trainer["precision"] = chosen
                Console(stderr=True).print(
                    f"precision: {chosen} (this CPU has {', '.join(sorted(cpu_bf16()))}; "
                    "--trainer.precision 32-true trains in float32)",
                    highlight=False,
                )

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as err:
            cause = _root_cause(err)
            if cause is None:
                raise
            fail(f"error: {type(cause).__name__}: {cause}")
        check_root_dir(self.trainer.default_root_dir)
        strategy = self.trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default writer
            strategy.checkpoint_io = AtomicCheckpointIO()

    def after_fit(self) -> None:
        trainer = self.trainer
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks, rank 0 prints
        if not trainer.is_global_zero:
            return
        lines = [f"logs:        {logger.log_dir}" for logger in trainer.loggers if logger.log_dir]
        if log_dir and (Path(log_dir) / "config.yaml").is_file():
            lines.append(f"config:      {Path(log_dir) / 'config.yaml'}")
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None and checkpoint.dirpath:
            lines.append(f"checkpoints: {checkpoint.dirpath}")
        if any(type(logger).__name__ == "TensorBoardLogger" for logger in trainer.loggers):
            lines.append(f"view:        tensorboard --logdir {trainer.loggers[0].save_dir}")
        Console(stderr=True).print("\n".join(["run finished; outputs:", *lines]), highlight=False)


def cpu_precision(accelerator: str | None) -> str | None:
    """`bf16-mixed` for a run on a CPU with fast bf16 matmuls (`avr.machine.BF16_FLAGS`), whose
    SFT steps and RL updates it speeds 1.5x or more (docs/performance.md); None (Lightning's
    float32) on other CPUs and on GPUs, where a config names its precision itself."""
    import torch

    on_cpu = accelerator == "cpu" or (
        accelerator in (None, "auto") and not torch.cuda.is_available()
    )
    return "bf16-mixed" if on_cpu and cpu_bf16() else None


class _ParseOnly(LightningCLI):
    """Parses and stops: `parse_config`."""

    def instantiate_classes(self) -> None:
        pass


_PARSER_FILES = ("jsonargparse", f"lightning{Path('/pytorch/cli.py')}")


def _root_cause(err: BaseException) -> BaseException | None:
    """The innermost exception of `err`'s chain, when it was raised outside the argument parser
    (by a class being built: a model, a mode, a reward); None when the parser itself failed."""
    chain = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    frames = traceback.extract_tb(chain[-1].__traceback__)
    if not frames or any(part in frames[-1].filename for part in _PARSER_FILES):
        return None
    return chain[-1]


#: The classes avr ships for each section (a full `class_path` to any other class works too).
KNOWN = {
    "model": ("avr.lit.sft.SFTModule", "avr.lit.rl.RLModule"),
    "data": ("avr.data.datamodule.TrajectoryDataModule", "avr.data.prompts.PromptDataModule"),
}


def read_yaml(path: str) -> dict:
    """The YAML config at `path` as a plain dict; a missing file, a folder, invalid YAML or a
    document that is not a mapping stops in one line naming the file (and line), exit 2."""
    problem = None
    if Path(path).is_dir():
        problem = "a folder; expected a YAML config file"
    elif not Path(path).is_file():
        problem = "no such file"
    else:
        try:
            config = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = f"not valid YAML ({getattr(err, 'problem', None) or err}{where})"
        else:
            if config is None:
                return {}
            if not isinstance(config, dict):
                problem = (
                    f"expected a mapping of sections (trainer, model, data), got a "
                    f"{type(config).__name__}"
                )
    if problem is None:
        return config
    fail(f"error: {path}: {problem}")


def check_init_args(args: list[str]) -> None:
    """Fail early, listing the valid keys, when the YAML or a `--model.init_args.x` / `--data.init_args.x`
    override names an argument the chosen class does not take (jsonargparse names only the bad one)."""
    config: dict = {}
    if "--config" in args:
        config = read_yaml(args[args.index("--config") + 1])
    for section in ("model", "data"):
        spec = config.get(section) or {}
        class_path = _override(args, f"--{section}.class_path") or (
            spec.get("class_path") if isinstance(spec, dict) else None
        )
        if not class_path:
            continue
        try:
            cls = _import(class_path)
        except (ImportError, AttributeError, ValueError) as err:
            known = ", ".join(KNOWN[section])
            fail(f"error: {section}: cannot import {class_path!r} ({err}); avr provides: {known}")
        valid = [
            p
            for p in inspect.signature(cls.__init__).parameters
            if p not in ("self", "args", "kwargs")
        ]
        given = list((spec.get("init_args") or {}) if isinstance(spec, dict) else {})
        prefix = f"--{section}.init_args."
        given += [
            a[len(prefix) :].split("=")[0].split(".")[0] for a in args if a.startswith(prefix)
        ]
        _refuse_unknown(given, valid, f"{section}: {class_path} takes no argument")
        _check_settings_keys(section, cls, spec, args)
    _check_reward_classes(args, config)


def _check_settings_keys(section: str, cls: type, spec, args: list[str]) -> None:
    """The keys under an argument whose type is a settings dataclass (`RLModule`'s `objective`,
    `replay`, …), from the YAML or a `--model.init_args.objective.x` override, are its fields."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation this module cannot resolve: jsonargparse will say
        return
    init_args = (spec.get("init_args") or {}) if isinstance(spec, dict) else {}
    prefix = f"--{section}.init_args."
    for name, hint in hints.items():
        settings = [t for t in typing.get_args(hint) or (hint,) if dataclasses.is_dataclass(t)]
        if not settings:
            continue
        fields = [f.name for f in dataclasses.fields(settings[0])]
        nested = init_args.get(name)
        given = list(nested) if isinstance(nested, dict) else []
        given += [
            a[len(prefix) :].split("=")[0].split(".")[1]
            for a in args
            if a.startswith(f"{prefix}{name}.")
        ]
        _refuse_unknown(
            given, fields, f"{section}.init_args.{name}: {settings[0].__name__} has no key"
        )


def _refuse_unknown(given: list[str], valid: list[str], what: str) -> None:
    """Fail at the first of `given` not in `valid`: `error: {what} 'key' (did you mean …?);
    valid: …`."""
    for key in given:
        if key not in valid:
            hint = difflib.get_close_matches(key, valid, n=1)
            maybe = f" (did you mean {hint[0]!r}?)" if hint else ""
            fail(f"error: {what} {key!r}{maybe}; valid: {', '.join(valid)}")


def _check_reward_classes(args: list[str], config: dict) -> None:
    """Every reward `class_path` (in the YAML's `model.init_args.rewards` or an override) imports;
    one that does not stops with the registered rewards listed."""
    from avr.registry import REWARDS

    spec = config.get("model") or {}
    rewards = ((spec.get("init_args") or {}) if isinstance(spec, dict) else {}).get("rewards")
    paths = {
        name: (term.get("reward") or {}).get("class_path")
        for name, term in (rewards or {}).items()
        if isinstance(term, dict) and isinstance(term.get("reward"), dict)
    }
    prefix, suffix = "--model.init_args.rewards.", ".reward.class_path"
    for key in (a.split("=")[0] for a in args):
        if key.startswith(prefix) and key.endswith(suffix):
            paths[key[len(prefix) : -len(suffix)]] = _override(args, key)
    for name, path in paths.items():
        if not path or "." not in path:
            continue
        try:
            _import(path)
        except (ImportError, AttributeError, ValueError) as err:
            known = ", ".join(
                f"{e.name} ({e.cls.__module__}.{e.cls.__qualname__})" for e in REWARDS.entries()
            )
            fail(
                f"error: model.init_args.rewards.{name}.reward: cannot import {path!r} ({err}); "
                f"registered rewards: {known}"
            )


def check_root_dir(root: str) -> None:
    """Stop in one line unless `trainer.default_root_dir` is, or can become, a writable folder."""
    if "://" in str(root):
        return  # a remote filesystem: Lightning's loggers check it themselves
    path = Path(root)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    problem = None
    if path.exists() and not path.is_dir():
        problem = "a file; the run writes its logs and checkpoints into a folder"
    elif existing is not None and not existing.is_dir():
        problem = f"{existing} is a file, so no folder can be made there"
    elif existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable"
    if problem:
        fail(f"error: trainer.default_root_dir {root}: {problem}")


#: `--ckpt_path` values Lightning resolves itself rather than reading a file.
CKPT_KEYWORDS = ("last", "best", "hpc", "registry")


def check_ckpt_path(path: str | None) -> None:
    """Stop in one line when `--ckpt_path` names no checkpoint file."""
    if path is None or path in CKPT_KEYWORDS or path == "null" or "://" in path:
        return
    problem = (
        "a folder; give the checkpoint file in it (for example last.ckpt)"
        if Path(path).is_dir()
        else None
        if Path(path).is_file()
        else "no such file"
    )
    if problem:
        fail(f"error: --ckpt_path {path}: {problem}")


def _override(args: list[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _import(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


if __name__ == "__main__":
    main()
