import re
import subprocess
import sys
from pathlib import Path

import pytest

from avr.protocol import Mode
from avr.registry import MODES, REWARDS, RegistryError, list_modes, list_rewards, register_mode


def test_builtins_register_through_their_entry_points():
    assert {"direct", "reflect", "plan", "adaptive"} <= set(list_modes())
    assert "compositional" in list_rewards()
    assert MODES.get("reflect").__module__ == "avr.modes.reflect"
    assert {e.provider for e in MODES.entries() if e.name == "plan"} == {"avr"}


def test_unknown_name_lists_the_registered_ones():
    known = ", ".join(MODES.names())  # the registry's, so a user's installed plugin is listed too
    assert {"adaptive", "direct", "plan", "reflect"} <= set(MODES.names())
    with pytest.raises(
        RegistryError, match=re.escape(f"unknown mode 'reflection'; registered modes: {known}")
    ):
        MODES.get("reflection")
    with pytest.raises(RegistryError, match="unknown reward 'clip'"):
        REWARDS.get("clip")


def test_a_duplicate_name_is_an_error():
    class Other(Mode):
        def draft(self, actor, episode):
            actor.draft(episode, "final")

    with pytest.raises(
        RegistryError,
        match=r"mode 'direct' is already registered by avr\.modes\.direct\.DirectMode",
    ):
        register_mode("direct")(Other)


_PLUGIN = """
from avr.protocol import Mode
from avr.registry import register_mode
from avr.sequence import ImageRole


class Undecorated(Mode):
    def draft(self, actor, episode):
        actor.draft(episode, ImageRole.FINAL)


def not_a_class():
    pass


@register_mode("decorated-{tag}")
class Decorated(Undecorated):
    pass
"""


@pytest.fixture
def plugin_points(monkeypatch, tmp_path):
    """Entry points of a fake distribution, served to `load_plugins` beside the real ones; the
    registry is restored afterwards."""
    import importlib.metadata

    import avr.registry as registry

    saved = {r: dict(r._entries) for r in (MODES, REWARDS)}
    loaded = set(registry._loaded)
    real = registry.entry_points
    extra: list[importlib.metadata.EntryPoint] = []
    monkeypatch.setattr(
        registry,
        "entry_points",
        lambda group: [*real(group=group), *[e for e in extra if e.group == group]],
    )
    monkeypatch.syspath_prepend(str(tmp_path))

    def add(name: str, value: str, group: str = "avr.modes", module: str | None = None) -> None:
        if module is not None:
            (tmp_path / f"{module}.py").write_text(_PLUGIN.format(tag=module))
        extra.append(importlib.metadata.EntryPoint(name, value, group))

    yield add
    for r, entries in saved.items():
        r._entries.clear()
        r._entries.update(entries)
    registry._loaded.clear()
    registry._loaded.update(loaded)


def test_an_entry_point_naming_an_undecorated_class_registers_it_under_its_name(plugin_points):
    plugin_points("shout", "plug_a:Undecorated", module="plug_a")
    assert MODES.get("shout").__module__ == "plug_a"
    assert "shout" in MODES.names()


def test_an_entry_point_naming_a_decorated_class_or_its_module_keeps_the_decorator_name(
    plugin_points,
):
    plugin_points("anything", "plug_b:Decorated", module="plug_b")
    plugin_points("plug-c", "plug_c", module="plug_c")
    names = MODES.names()
    assert {"decorated-plug_b", "decorated-plug_c"} <= set(names) and "anything" not in names


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("plug_d:not_a_class", r"names function plug_d:not_a_class; expected a mode class"),
        ("json", r"names module json, which registers no mode"),
        ("plug_d:Undecorated", r"names plug_d\.Undecorated, which is not a torchmetrics"),
        ("no_such_module_here", r"does not load: ModuleNotFoundError"),
    ],
)
def test_an_entry_point_naming_anything_else_is_an_error_naming_it(plugin_points, value, message):
    group = "avr.rewards" if value == "plug_d:Undecorated" else "avr.modes"
    plugin_points("broken", value, group=group, module="plug_d")
    with pytest.raises(RegistryError, match=rf"entry point 'broken' = '{value}' in group {group}"):
        MODES.names()
    with pytest.raises(RegistryError, match=message):
        MODES.names()


def _readme_plugin(root: Path) -> dict[str, str]:
    """The README's complete plugin package: its fenced blocks whose first line names a file under
    `avr-echo/`."""
    text = (root / "README.md").read_text()
    files = dict(re.findall(r"```(?:toml|py)\n# avr-echo/([\w.]+)\n(.*?)```", text, flags=re.S))
    assert set(files) == {"pyproject.toml", "echo_mode.py"}, sorted(files)
    return files


@pytest.mark.slow
def test_the_readme_plugin_registers_a_mode_used_by_name(pytestconfig, tmp_path):
    source, site = tmp_path / "avr-echo", tmp_path / "site"
    source.mkdir()
    for name, text in _readme_plugin(pytestconfig.rootpath).items():
        (source / name).write_text(text)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(site),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    env = {"PYTHONPATH": str(site), "PATH": ""}
    listing = subprocess.run(
        [sys.executable, "-m", "avr.registry"], env=env, capture_output=True, text=True, check=True
    )
    assert "echo_mode.EchoMode" in listing.stdout and "avr-echo" in listing.stdout
    out = tmp_path / "data"
    built = subprocess.run(
        [sys.executable, "-m", "avr.data", "build", "--n", "4", "--mode", "echo", "-o", str(out)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    record = (out / "shard-00000.jsonl").read_text().splitlines()[0]
    assert (
        '"role": "draft"' in record and '"role": "final"' in record and '"mode": "echo"' in record
    )
    prompts = tmp_path / "prompts.jsonl"
    subprocess.run(
        [sys.executable, "-m", "avr.world", "prompts", "--n", "2", "-o", str(prompts)],
        env=env, check=True, capture_output=True,
    )  # fmt: skip
    evaluated = subprocess.run(
        [sys.executable, "-m", "avr.evaluate", "--model", str(pytestconfig.rootpath / "checkpoints"
         / "shapeworld-tiny-sft"), "--prompts", str(prompts), "--modes", "direct,echo",
         "--steps", "2", "-o", str(tmp_path / "eval")],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    assert '"echo"' in (tmp_path / "eval" / "metrics.json").read_text()
    # The suite's registry checks hold with the plugin installed (they read the registry).
    suite = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/test_registry.py::test_unknown_name_lists_the_registered_ones",
         "tests/data/test_pipeline.py::test_mix_and_mode_errors"],
        env=env, cwd=pytestconfig.rootpath, capture_output=True, text=True,
    )  # fmt: skip
    assert suite.returncode == 0, suite.stdout[-2000:]


def test_the_registry_listing_names_every_plugin_and_backbone_whole(capsys, monkeypatch):
    from avr.registry import main

    monkeypatch.setenv("COLUMNS", "70")  # a narrow terminal folds class paths, never cuts them
    assert main() == 0
    cells = [line.split("│") for line in capsys.readouterr().out.splitlines() if "│" in line]
    rows, row = [], None
    for cell in cells:  # a folded row continues on lines whose name cell is empty
        if cell[2].strip():
            row = [c.strip() for c in cell]
            rows.append(row)
        else:
            row[3] += cell[3].strip()
    listed = {(r[1], r[2]): r[3] for r in rows}
    assert listed[("backbone", "unified")] == "avr.backbone.model.UnifiedModel"
    assert listed[("backbone", "janus")] == "avr.backbone.janus.JanusBackbone"
    assert listed[("reward", "stepwise")] == "avr.rewards.stepwise.StepwiseReasoningReward"
    assert listed[("mode", "adaptive")] == "avr.modes.adaptive.AdaptiveMode"
