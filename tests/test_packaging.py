import argparse
import functools
import shutil
import subprocess
import sys
import sysconfig
import venv
from importlib.metadata import entry_points
from pathlib import Path

import pytest


def test_builtin_reward_is_registered_through_its_entry_point():
    (ep,) = [e for e in entry_points(group="avr.rewards") if e.name == "compositional"]
    reward_cls = ep.load()
    assert reward_cls.__module__ == "avr.rewards.compositional"


@pytest.mark.slow
def test_the_wheel_installs_and_trains_without_the_source_tree(pytestconfig, tmp_path):
    """`pip install .` (not editable): build the wheel, install it into a fresh environment that
    sees this one's dependencies but not the source tree or its editable install, and run a
    training step from it, from a folder outside the repository."""
    root = pytestconfig.rootpath
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the checkout
    source.mkdir()
    for name in ("setup.py", "setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    for folder in ("avr", "modes", "rewards"):
        shutil.copytree(
            root / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    wheels = tmp_path / "wheels"
    run = functools.partial(subprocess.run, capture_output=True, text=True, check=True)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(wheels), str(source)])  # fmt: skip
    (wheel,) = wheels.glob("avr-*.whl")
    env = tmp_path / "env"
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    purelib = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    # This environment's packages, read through a .pth: its own .pth files (the editable avr's
    # finder among them) are not processed, and the wheel's avr comes first on the path.
    deps = sysconfig.get_paths()["purelib"]
    (Path(purelib.stdout.strip()) / "deps.pth").write_text(deps + "\n")
    run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)])
    work = tmp_path / "work"
    work.mkdir()
    where = run([str(python), "-c", "import avr, avr.lit.rl, avr.modes.direct; print(avr.__file__)"],
                cwd=work)  # fmt: skip
    assert where.stdout.strip().startswith(str(env)), where.stdout
    run([str(python), "-m", "avr.data", "build", "--n", "8", "-o", "data"], cwd=work)
    # the console script, as `pip install` made it: `avr fit` is `python -m avr.fit`
    fitted = run(
        [str(env / "bin" / "avr"), "fit", str(root / "experiments" / "sft.yaml"),
         "--trainer.max_steps", "1", "--trainer.default_root_dir", "run",
         "--data.init_args.path", "data", "--data.init_args.num_workers", "0",
         "--data.init_args.batch_size", "2"],
        cwd=work,
    )  # fmt: skip
    assert "run finished" in fitted.stderr
    assert list((work / "run").rglob("last.ckpt"))


def test_the_avr_command_dispatches_to_each_tool(tmp_path, capsys):
    from avr.cli import COMMANDS, main

    assert main(["world", "prompts", "--n", "3", "-o", str(tmp_path / "p.jsonl")]) == 0
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 3
    capsys.readouterr()
    assert main(["--help"]) == 0
    listing = capsys.readouterr().out
    assert all(f"  {name} " in listing for name in COMMANDS)
    assert main(["evalute"]) == 2
    assert "unknown command 'evalute'; commands: fit, generate, evaluate" in capsys.readouterr().err
    scripts = {e.name: e.value for e in entry_points(group="console_scripts") if e.name == "avr"}
    assert scripts == {"avr": "avr.cli:main"}


def _tool_parsers() -> dict:
    """Every tool's argparse parser (each subcommand's apart), caught as its `main` parses."""
    import importlib

    from avr.cli import COMMANDS

    class Caught(Exception):
        pass

    def catch(parser, *args, **kwargs):
        raise Caught(parser)

    found = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", catch)
        for name, (module, _) in COMMANDS.items():
            if name in ("fit", "registry"):  # LightningCLI's parser; registry takes no arguments
                continue
            with pytest.raises(Caught) as caught:
                importlib.import_module(module).main([])
            found[name] = caught.value.args[0]
    parsers = {}
    for name, parser in found.items():
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        for sub, subparser in subs[0].choices.items() if subs else [("", parser)]:
            parsers[f"{name} {sub}".strip()] = subparser
    return parsers


def test_every_tool_is_named_avr_tool_and_helps_every_flag_with_its_default():
    parsers = _tool_parsers()
    assert {"generate", "evaluate", "export", "data build", "world render", "bench packing"} <= set(
        parsers
    )
    for name, parser in parsers.items():
        assert parser.prog == f"avr {name}", name
        bare = [a.dest for a in parser._actions if not a.help and a.dest != "help"]
        assert not bare, f"avr {name}: no help for {bare}"
        text = parser.format_help()
        with_default = [a for a in parser._actions if a.option_strings and a.default not in (None, False)]  # fmt: skip
        for action in with_default:
            if action.default is not argparse.SUPPRESS:
                shown = f"(default:{action.default})".replace(" ", "")
                assert shown in "".join(text.split()), (name, action.dest)  # wrapped anywhere
