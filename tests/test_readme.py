"""The README's Python examples run as written (the shell commands are run by CI itself)."""

import re


def test_readme_python_examples_run(pytestconfig, tmp_path, monkeypatch):
    text = (pytestconfig.rootpath / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "the README shows no Python example"
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, "README.md", "exec"), namespace)
    assert (tmp_path / "runs" / "model" / "model.safetensors").is_file()
