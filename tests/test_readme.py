"""The README's examples run as written: its ```python blocks, and its ```bash blocks marked
`<!-- readme-test: run -->` (the set-up commands are run by CI itself, .ci/run). The plugin
package's files (```toml / ```py blocks under `avr-echo/`) are built by tests/test_registry.py."""

import re
import subprocess

import pytest


def test_readme_python_examples_run(pytestconfig, tmp_path, monkeypatch):
    text = (pytestconfig.rootpath / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "the README shows no Python example"
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, "README.md", "exec"), namespace)
    assert (tmp_path / "runs" / "model" / "model.safetensors").is_file()


MARK = re.compile(r"<!-- readme-test: (run|skip: [^>]+) -->\n```bash\n(.*?)```", flags=re.S)


def _bash_blocks(text: str) -> list[tuple[str, str]]:
    """(mark, commands) of every bash block; each must say whether the tests run it."""
    blocks = MARK.findall(text)
    assert len(blocks) == text.count("```bash\n"), (
        "every ```bash block of README.md needs a `<!-- readme-test: run -->` or "
        "`<!-- readme-test: skip: why -->` line just before it"
    )
    return blocks


@pytest.mark.slow
def test_readme_command_blocks_run_on_a_fresh_checkout(pytestconfig, tmp_path):
    """Every README bash block marked `run` (those that take under a minute) runs as written, from
    a folder that holds only what a fresh clone has (the shipped checkpoints and configs)."""
    root = pytestconfig.rootpath
    for shipped in ("checkpoints", "experiments"):
        (tmp_path / shipped).symlink_to(root / shipped)
    ran = 0
    for mark, commands in _bash_blocks((root / "README.md").read_text()):
        if mark != "run":
            continue
        for command in commands.replace("\\\n", " ").splitlines():
            command = command.split("  #")[0].strip()
            if not command:
                continue
            done = subprocess.run(
                ["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True
            )
            assert done.returncode == 0, f"README command failed: {command}\n{done.stderr[-2000:]}"
            ran += 1
    assert ran >= 5
