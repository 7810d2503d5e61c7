"""Ctrl-C and preemption save the work: a signal at any step ends the run after that step with a checkpoint of it,
says how to resume, exits 128 + the signal's number, and the resumed run ends bitwise where an uninterrupted one
ends."""

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain.cli import main
from pretrain.sample import BUNDLED_CORPUS

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
ROOT = CONFIGS.parent


def arguments(run_dir: Path, shared: Path, max_steps: int, *extra: str) -> list[str]:
    """A tiny BERT whose schedule is set for 100,000 steps whatever max_steps says (so a short run and the same
    steps within a long one are the same training), a checkpoint every 5 steps, validation every 10."""
    return ["fit", "-c", str(CONFIGS / "tiny" / "bert.yaml"), "--data.files", f"[{BUNDLED_CORPUS}]",
            "--data.tokenizer", str(shared / "tokenizer.json"), "--data.tokenizer_vocab_size", "400",
            "--data.cache_dir", str(shared / "cache"), "--trainer.default_root_dir", str(run_dir),
            "--trainer.accelerator", "cpu", "--trainer.max_steps", str(max_steps), "--model.total_steps", "100000",
            "--model.warmup_steps", "10", "--trainer.val_check_interval", "10", "--trainer.limit_val_batches", "1",
            "--trainer.log_every_n_steps", "10", "--trainer.enable_progress_bar", "false",
            "--checkpoint.every_n_train_steps", "5", *extra]


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """One tokenizer and examples cache for every test here."""
    return tmp_path_factory.mktemp("shared")


def start(run: Path, shared: Path, env: dict, *extra: str) -> subprocess.Popen:
    """`pretrain fit` in its own process group (as a command typed in a terminal), returned once training is under
    way (step 5 is saved)."""
    process = subprocess.Popen([sys.executable, "-m", "pretrain.cli", *arguments(run, shared, 100_000, *extra)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                               start_new_session=True)
    deadline = time.monotonic() + 240
    while not (run / "checkpoints" / "last.ckpt").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    return process


def saved(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("name, extra", [
    ("SIGINT", ["--data.num_workers", "2"]),  # Ctrl-C: the terminal signals every process, loader workers too
    ("SIGTERM", []),  # a preemption, or kill
])
def test_a_signal_at_a_random_step_saves_that_step_and_the_resume_is_exact(name, extra, shared, tmp_path):
    run = tmp_path / "interrupted"
    process = start(run, shared, {**os.environ, "SLURM_JOB_ID": ""}, *extra)
    time.sleep(random.uniform(0.0, 1.0))  # a random step after it
    if name == "SIGINT":
        os.killpg(process.pid, signal.SIGINT)
    else:
        process.send_signal(getattr(signal, name))
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + getattr(signal, name), err[-3000:]
    stopped = saved(run)["global_step"]
    said = re.search(rf"interrupted \({name}\) at step (\d+): saved (\S+); resume with: pretrain fit (.*)", err)
    assert said and int(said[1]) == stopped > 5 and Path(said[2]) == run / "checkpoints" / "last.ckpt", err[-3000:]
    assert said[3].endswith("--ckpt_path last") and "Traceback" not in err

    # the same steps in one go, and the interrupted run resumed to the same end: bitwise equal
    end = stopped + 3
    assert main(arguments(tmp_path / "straight", shared, end, *extra)) == 0
    assert main(arguments(run, shared, end, *extra, "--ckpt_path", "last")) == 0
    straight, resumed = saved(tmp_path / "straight"), saved(run)
    assert straight["global_step"] == resumed["global_step"] == end
    weights = straight["state_dict"]
    assert [k for k in weights if not torch.equal(weights[k], resumed["state_dict"][k])] == []


@pytest.mark.slow
def test_under_slurm_the_warning_signal_requeues_the_job(shared, tmp_path):
    """SIGUSR1 (`#SBATCH --signal=USR1@120`) saves and puts the job back in the queue with `scontrol requeue`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'scontrol.args'}\n")
    scontrol.chmod(0o755)
    run = tmp_path / "run"
    env = {**os.environ, "SLURM_JOB_ID": "4242", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    for key in ("SLURM_ARRAY_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID"):
        env.pop(key, None)
    process = start(run, shared, env)
    process.send_signal(signal.SIGUSR1)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGUSR1 and "requeued SLURM job 4242" in err, err[-3000:]
    assert re.search(r"interrupted \(SIGUSR1\) at step \d+: saved", err)
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]
