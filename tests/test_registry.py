import re
import subprocess
import sys
import textwrap

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


PLUGIN = {
    "setup.cfg": """
        [metadata]
        name = avr-echo-plugin
        version = 0.0.1
        [options]
        py_modules = echo_mode
        [options.entry_points]
        avr.modes =
            echo = echo_mode:EchoMode
    """,
    "pyproject.toml": """
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
    """,
    "echo_mode.py": '''
        """A user's mode: draw twice, keep the second."""
        from avr.protocol import Mode
        from avr.registry import register_mode
        from avr.sequence import ImageRole


        @register_mode("echo")
        class EchoMode(Mode):
            def draft(self, actor, episode):
                actor.draft(episode, ImageRole.DRAFT)
                actor.draft(episode, ImageRole.FINAL)
    ''',
}


@pytest.mark.slow
def test_a_users_package_registers_a_mode_used_by_name(tmp_path):
    source, site = tmp_path / "src", tmp_path / "site"
    source.mkdir()
    for name, text in PLUGIN.items():
        (source / name).write_text(textwrap.dedent(text))
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
    assert "echo_mode.EchoMode" in listing.stdout and "avr-echo-plugin" in listing.stdout
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
