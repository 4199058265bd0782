"""Scale-out and faults: DDP on 2 CPU processes, rank sharding, kill and exact resume."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from avr.data.prompts import PromptStream

FAST_RL = [
    "--model.init_args.model",
    "null",
    "--model.init_args.group_size",
    "2",
    "--model.init_args.sampling.steps",
    "3",
    "--model.init_args.sampling.max_text_tokens",
    "6",
    "--data.init_args.batch_size",
    "1",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.callbacks",
    "[]",
]


def _fit(root, *extra, wait=True, env=None):
    logger = f'--trainer.logger={{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {{"save_dir": "{root}"}}}}'
    checkpoint = (
        '--trainer.callbacks=[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", '
        f'"init_args": {{"dirpath": "{root}/ckpt", "every_n_train_steps": 1, "save_last": true, "save_top_k": -1}}}}]'
    )
    command = [
        sys.executable,
        "-m",
        "avr.fit",
        "experiments/rl.yaml",
        *FAST_RL,
        logger,
        checkpoint,
        f"--trainer.default_root_dir={root}",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _rewards(root):
    values = {}
    for metrics in sorted(Path(root).rglob("metrics.csv")):
        for row in csv.DictReader(metrics.open()):
            if row.get("train/reward"):
                values[int(row["step"])] = (
                    float(row["train/reward"]),
                    float(row["train/text/tokens"]),
                )
    return values


def test_ranks_draw_different_prompts():
    mix = {"simple": 0.5, "complex": 0.5}
    first = [PromptStream(2, mix, seed=0, rank=r, world_size=2) for r in (0, 1)]
    batches = [next(iter(s)) for s in first]
    assert batches[0] != batches[1]
    assert batches[0] == PromptStream(2, mix, seed=0).batch(0) and batches[1] == PromptStream(
        2, mix, seed=0
    ).batch(1)


#: Written as `sitecustomize.py` on the runs' PYTHONPATH (rank 1 inherits it from rank 0): at
#: interpreter exit, each process lists its live OS threads by name.
THREADS_AT_EXIT = """
import atexit, os
def _threads():
    tasks = f"/proc/{{os.getpid()}}/task"
    names = [open(f"{{tasks}}/{{t}}/comm").read().strip() for t in os.listdir(tasks)]
    with open(os.path.join({folder!r}, f"threads-{{os.getpid()}}.txt"), "w") as out:
        out.write("\\n".join(sorted(names)))
atexit.register(_threads)
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists threads through /proc")
def test_ddp_with_two_cpu_processes(tmp_path):
    """Both ranks finish, and neither reaches interpreter exit with the gloo process group's
    threads alive: left running into finalization they aborted one run in three (SIGABRT,
    "terminate called without an active exception") after all the work was done."""
    site, exits = tmp_path / "site", tmp_path / "exits"
    site.mkdir()
    exits.mkdir()
    (site / "sitecustomize.py").write_text(THREADS_AT_EXIT.format(folder=str(exits)))
    _fit(
        tmp_path,
        "--trainer.max_steps",
        "2",
        "--trainer.strategy",
        "ddp_find_unused_parameters_true",
        "--trainer.devices",
        "2",
        "--trainer.accelerator",
        "cpu",
        env={"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])},
    )
    threads = {p.name: p.read_text().split() for p in exits.glob("threads-*.txt")}
    assert len(threads) >= 2, threads  # rank 0 and rank 1 (and any helper process)
    for name, alive in threads.items():
        assert not [t for t in alive if "gloo" in t or "tcpstore" in t], (name, alive)
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 2
    assert checkpoint["PromptDataModule"]["batches_seen"] == 2


@pytest.mark.slow
def test_killed_run_resumes_with_the_same_metrics(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _fit(straight, "--trainer.max_steps", "4")
    run = _fit(killed, "--trainer.max_steps", "4", wait=False)
    deadline = time.time() + 300
    while not list(killed.glob("ckpt/*step=2*.ckpt")):
        assert run.poll() is None, run.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.2)
    run.send_signal(signal.SIGKILL)
    run.wait()
    (step2,) = list((killed / "ckpt").glob("*step=2*.ckpt"))
    _fit(killed, "--trainer.max_steps", "4", f"--ckpt_path={step2}")
    expected, resumed = _rewards(straight), _rewards(killed)
    assert sorted(expected) == [0, 1, 2, 3]
    for step in (2, 3):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-6), step


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory):
    """The rewards of an uninterrupted 6-step run."""
    root = tmp_path_factory.mktemp("straight")
    _fit(root, "--trainer.max_steps", "6")
    return _rewards(root)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_preempted_run_saves_a_checkpoint_exits_non_zero_and_resumes_exactly(
    tmp_path, signum, six_steps
):
    """A scheduler's SIGTERM (or a Ctrl-C) ends the step under way, saves `preempted.ckpt`, exits
    128 + the signal number; resuming from that checkpoint gives the uninterrupted run's metrics."""
    stopped = tmp_path / "stopped"
    run = _fit(stopped, "--trainer.max_steps", "6", wait=False)
    deadline = time.time() + 300
    while not list(stopped.glob("ckpt/*step=1*.ckpt")):
        assert run.poll() is None, run.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.05)
    run.send_signal(signum)
    assert run.wait(timeout=300) == 128 + signum
    error = run.stderr.read().decode()
    preempted = stopped / "ckpt" / "preempted.ckpt"
    assert f"resumable checkpoint {preempted}" in error, error[-2000:]
    step = torch.load(preempted, map_location="cpu", weights_only=True)["global_step"]
    assert 1 <= step < 6
    if signum != signal.SIGTERM:
        return  # the same checkpoint path as SIGTERM's: its resume is checked once, below
    _fit(stopped, "--trainer.max_steps", "6", f"--ckpt_path={preempted}")
    expected, resumed = six_steps, _rewards(stopped)
    assert sorted(expected) == [0, 1, 2, 3, 4, 5]
    for later in range(step, 6):
        assert resumed[later] == pytest.approx(expected[later], rel=1e-6), later
