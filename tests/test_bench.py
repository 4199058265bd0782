"""`avr bench train`: the float32 and bf16-autocast SFT paths timed side by side."""

import re

import pytest

import avr.bench
from avr.bench import main as bench


@pytest.mark.parametrize("flags", [{"avx512_bf16"}, set()], ids=["bf16", "float32-only"])
def test_the_train_bench_times_each_path_against_the_machine_peak(flags, capsys, monkeypatch):
    monkeypatch.setattr(avr.bench, "cpu_flags", lambda: flags)
    assert bench(["train", "--batch", "3", "--repeats", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    headline = out.strip().splitlines()[-1]
    out = " ".join(out.split())  # rich wraps long lines at the console's width
    assert out.startswith("machine: ") and "3 trajectories" in out
    assert re.search(r"float32: \d+ ms/step, [\d.]+ images/s, \d+ tokens/s", out)
    assert re.search(r"\(\d+% of the \d+ GFLOP/s peak\)", out)
    if flags:
        assert "bf16 autocast: " in out and "bfloat16" in out
        assert re.fullmatch(r"train: bf16 autocast vs float32, [\d.]+x SFT steps/s", headline)
    else:
        assert "bf16 autocast" not in out
        assert headline == "train: no bf16 on this CPU; the float32 path alone was timed"
