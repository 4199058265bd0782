"""`avr bench train`: the dense-mask, per-trajectory and bf16-autocast SFT paths timed side by
side."""

import re

import pytest

import avr.bench
from avr.bench import main as bench


@pytest.mark.parametrize("flags", [{"avx512_bf16"}, set()], ids=["bf16", "float32-only"])
def test_the_train_bench_times_each_path_against_the_machine_peak(flags, capsys, monkeypatch):
    monkeypatch.setattr(avr.bench, "cpu_bf16", lambda: flags)
    assert bench(["train", "--batch", "3", "--repeats", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    headline = out.strip().splitlines()[-1]
    out = " ".join(out.split())  # rich wraps long lines at the console's width
    assert out.startswith("machine: ") and "3 trajectories" in out
    for path in ("float32, dense mask", "float32, per trajectory"):
        assert re.search(path + r": \d+ ms/step, [\d.]+ images/s, \d+ tokens/s", out)
    assert re.search(r"\(\d+% of the \d+ GFLOP/s peak\)", out)
    ratios = (
        r"train: SFT steps/s against the float32 dense-mask path: float32, per trajectory [\d.]+x"
    )
    if flags:
        assert "bf16 autocast, per trajectory: " in out and "bfloat16" in out
        assert re.fullmatch(ratios + r", bf16 autocast, per trajectory [\d.]+x", headline)
    else:
        assert "bf16 autocast" not in out
        assert re.fullmatch(ratios, headline)
