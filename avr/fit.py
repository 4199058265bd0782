"""`python -m avr.fit CONFIG.yaml [--section.key value …]`: train from a YAML through LightningCLI.

The config names classes by `class_path` / `init_args` (`model`, `data`, and inside them modes and
rewards); every `--a.b value` overrides the YAML; `${…}` interpolation works (omegaconf parser
mode); `--print_config` prints the resolved config. Plugins from the `avr.modes` / `avr.rewards`
entry points are loaded first, so their classes are known by short name too.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import sys

import lightning as L
from lightning.pytorch.cli import LightningCLI
from omegaconf import OmegaConf

from avr.registry import load_plugins


def main(argv: list[str] | None = None) -> LightningCLI:
    """Parse `argv` (default: the command line) and fit."""
    args = list(sys.argv[1:] if argv is None else argv)
    if (
        args
        and not args[0].startswith("-")
        and args[0] not in ("fit", "validate", "test", "predict")
    ):
        args = ["fit", "--config", args[0], *args[1:]]
    load_plugins()
    check_init_args(args)
    if argv is None:
        # From the command line, LightningCLI reads the (rewritten) sys.argv itself: passing
        # `args` as well draws its warning, and DDP relaunches workers from sys.argv.
        sys.argv[1:], args = args, None
    return LightningCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=args,
    )


#: The classes avr ships for each section (a full `class_path` to any other class works too).
KNOWN = {
    "model": ("avr.lit.sft.SFTModule", "avr.lit.rl.RLModule"),
    "data": ("avr.data.datamodule.TrajectoryDataModule", "avr.data.prompts.PromptDataModule"),
}


def check_init_args(args: list[str]) -> None:
    """Fail early, listing the valid keys, when the YAML or a `--model.init_args.x` / `--data.init_args.x`
    override names an argument the chosen class does not take (jsonargparse names only the bad one)."""
    config: dict = {}
    if "--config" in args:
        path = args[args.index("--config") + 1]
        config = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
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
            raise SystemExit(
                f"error: {section}: cannot import {class_path!r} ({err}); avr provides: {known}"
            ) from None
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
        for key in given:
            if key not in valid:
                hint = difflib.get_close_matches(key, valid, n=1)
                maybe = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise SystemExit(
                    f"error: {section}: {class_path} takes no argument {key!r}{maybe}; valid: {', '.join(valid)}"
                )


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
