"""Data parallelism: a 2-process DDP run (CPU, gloo) through `pretrain fit`, and two node ranks under torchrun, equal
one process with the same global batch."""

import subprocess
import sys
from pathlib import Path

import torch

from pretrain.data.datamodule import PretrainingDataModule
from pretrain.data.tokenizer import load_tokenizer, train_tokenizer_on_files

ROOT = Path(__file__).resolve().parents[3]
WORDS = "the king and the queen walk to the hall while a fool sings of the sea and the moon".split()


def single_document_corpus(path: Path, tokenizer_path: Path, max_length: int) -> None:
    """One long document whose tokens (and separator) fill whole blocks: every row of every batch has max_length
    real tokens, so each process's mean loss is over the same number of tokens and the mean of the two processes'
    losses is the loss of the global batch."""
    words = [WORDS[(i * 7) % len(WORDS)] for i in range(6000)]
    path.write_text(" ".join(words) + "\n")
    train_tokenizer_on_files([str(path)], "bpe", 300, tokenizer_path)
    tokenizer = load_tokenizer(tokenizer_path)
    while (len(tokenizer.encode(" ".join(words), add_special_tokens=False).ids) + 1) % max_length:
        words.append("a")
    path.write_text(" ".join(words) + "\n")


def fit(tmp_path: Path, name: str, batch_size: int, *extra: str) -> dict[str, torch.Tensor]:
    process = subprocess.run([sys.executable, "-m", *fit_arguments(tmp_path, name, batch_size, *extra)],
                             capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    return last_weights(tmp_path / name)


def last_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def fit_arguments(tmp_path: Path, name: str, batch_size: int, *extra: str) -> list[str]:
    run_dir = tmp_path / name
    return ["pretrain.cli", "fit", "-c", "configs/tiny/gpt2.yaml",
         "--data.files", f"[{tmp_path / 'corpus.txt'}]", "--data.tokenizer", str(tmp_path / "tokenizer.json"),
         "--data.reuse_tokenizer", "true",  # trained before the corpus was cut to whole blocks, on purpose
         "--data.cache_dir", str(tmp_path / "cache"), "--data.max_length", "32", "--data.validation_fraction", "0",
         "--data.batch_size", str(batch_size), "--model.backbone.vocab_size", "300", "--model.backbone.dropout", "0",
         "--model.backbone.attention_dropout", "0", "--model.warmup_steps", "1", "--trainer.max_steps", "4",
         "--trainer.limit_val_batches", "0", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
         "--trainer.default_root_dir", str(run_dir), *extra]


def test_two_processes_and_two_nodes_match_one_process_with_the_same_global_batch(tmp_path):
    single_document_corpus(tmp_path / "corpus.txt", tmp_path / "tokenizer.json", 32)
    data = PretrainingDataModule([str(tmp_path / "corpus.txt")], str(tmp_path / "tokenizer.json"), max_length=32,
                                 cls_first=False, validation_fraction=0.0, cache_dir=str(tmp_path / "cache"))
    data.setup()
    lengths = data.datasets["train"].arrays["lengths"]
    assert len(lengths) >= 64 and (lengths == 32).all()  # 4 steps x 16 rows, all full

    one = fit(tmp_path, "one", 16)
    two = fit(tmp_path, "ddp", 8, "--trainer.strategy", "ddp", "--trainer.devices", "2")
    assert one.keys() == two.keys()
    # Same data, same initial weights; only the order of floating-point sums differs (gradients are averaged across
    # processes instead of over one batch). Stated tolerance: 2e-5 absolute on every weight after 4 AdamW steps at
    # lr 1e-3, where a different sample order or a wrong gradient scale moves weights by ~1e-3.
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    assert worst < 2e-5, worst
    initial = fit(tmp_path, "zero", 16, "--trainer.max_steps", "1", "--model.learning_rate", "0",
                  "--model.schedule", "constant")
    assert max((one[k] - initial[k]).abs().max().item() for k in one) > 1e-4  # the runs did move the weights
    # Two node ranks on localhost, as torchrun starts them on two machines (`--nnodes 2 --nproc-per-node 1`, gloo,
    # `--trainer.num_nodes 2 --trainer.devices 1`; both share this disk's tokenizer and cache, built once under the
    # lock): the weights of the 2 processes on one node
    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
                               "-m", *fit_arguments(tmp_path, "nodes", 8, "--trainer.strategy", "ddp",
                                                    "--trainer.num_nodes", "2", "--trainer.devices", "1")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for node in (0, 1)]
    for node in nodes:
        _, err = node.communicate(timeout=600)
        assert node.returncode == 0, err[-3000:]
    nodes = last_weights(tmp_path / "nodes")
    assert nodes.keys() == two.keys() and max((nodes[k] - two[k]).abs().max().item() for k in two) < 1e-6


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def first_run(tmp_path: Path, name: str, *extra: str) -> list[str]:
    """A run that finds neither its tokenizer nor its cache: both are built on the way."""
    return [sys.executable, "-m", "pretrain.cli", "fit", "-c", "configs/tiny/gpt2.yaml",
            "--data.tokenizer", str(tmp_path / "tokenizer" / "tokenizer.json"), "--data.tokenizer_vocab_size", "300",
            "--model.backbone.vocab_size", "300", "--data.cache_dir", str(tmp_path / "cache"),
            "--trainer.max_steps", "2", "--model.warmup_steps", "1", "--trainer.limit_val_batches", "1",
            "--trainer.val_check_interval", "2",
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(tmp_path / name), *extra]


def test_a_two_process_first_run_builds_the_cache_once(tmp_path):
    process = subprocess.run(first_run(tmp_path, "ddp", "--trainer.strategy", "ddp", "--trainer.devices", "2"),
                             capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    assert process.stdout.count("training a bpe tokenizer") == 1
    assert process.stdout.count("building the examples cache") == 2  # train and validation, by one rank only
    assert len(list((tmp_path / "cache").glob("*/COMPLETE"))) == 2 and not list((tmp_path / "cache").glob(".*partial*"))


def test_runs_started_together_train_the_tokenizer_and_build_the_cache_once(tmp_path):
    """As under torchrun or SLURM, where every process starts at once: the first builds, the others wait for it."""
    processes = [subprocess.Popen(first_run(tmp_path, f"run-{i}"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, cwd=ROOT) for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    stdout = "".join(out for out, _ in outputs)
    assert stdout.count("training a bpe tokenizer") == 1 and stdout.count("building the examples cache") == 2
    first, second = (torch.load(tmp_path / f"run-{i}" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
                     for i in range(2))
    assert all(torch.equal(first[k], second[k]) for k in first)  # the same tokenizer and data


def children(pid: int) -> list[int]:
    """The processes `pid` started (Linux: /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def test_a_rank_that_dies_stops_the_job_within_seconds_and_the_run_resumes(tmp_path):
    """kill -9 of rank 1 of a 2-process run (gloo) while it trains: rank 0 finds its peer gone at the next
    collective and the job ends non-zero within seconds (not at a 30-minute timeout), its last checkpoint whole;
    `--ckpt_path last` then resumes from it and finishes."""
    import os
    import signal
    import time

    command = first_run(tmp_path, "run", "--trainer.strategy", "ddp", "--trainer.devices", "2",
                        "--trainer.max_steps", "400", "--trainer.val_check_interval", "400",
                        "--checkpoint.every_n_train_steps", "5")
    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert last.exists(), "no checkpoint was written"
    ranks = children(job.pid)
    assert ranks, "rank 1 runs as a child of rank 0's process"
    os.kill(ranks[-1], signal.SIGKILL)
    killed = time.monotonic()
    job.communicate(timeout=120)
    elapsed = time.monotonic() - killed
    print(f"the job stopped {elapsed:.1f} s after rank 1 was killed")
    assert job.returncode != 0 and elapsed < 60
    step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert 5 <= step < 400 and step % 5 == 0
    resumed = [*command, "--ckpt_path", "last"]
    resumed[resumed.index("400")] = str(step + 5)  # (--trainer.max_steps) a few steps more
    process = subprocess.run(resumed, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == step + 5


def test_two_ranks_streaming_endlessly_resume_exactly_across_passes(tmp_path):
    """2 ranks x 2 workers stream a corpus whose share per reader is a few batches, so the endless iteration runs
    pass after pass: stopped at step 5 (each reader several passes in) and resumed, the run ends bitwise where the
    uninterrupted one ends; the position holds each reader's (pass, examples made in it), not a count since step 0."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"verse {i}: " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(i % 9 + 5))
                                  for i in range(80)) + "\n")
    streaming = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--data.files", f"[{corpus}]",
                 "--data.streaming", "true", "--data.num_workers", "2", "--data.shuffle_buffer", "16",
                 "--data.validation_fraction", "0", "--trainer.limit_val_batches", "0", "--data.max_length", "32",
                 "--data.batch_size", "4", "--model.backbone.dropout", "0", "--model.backbone.attention_dropout", "0",
                 "--model.total_steps", "12"]

    def run(name: str, steps: int, *extra: str) -> None:
        command = first_run(tmp_path, name, *streaming, *extra)
        command[command.index("--trainer.max_steps") + 1] = str(steps)
        process = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert process.returncode == 0, process.stderr[-3000:]

    run("straight", 12)
    run("resumed", 5)
    saved = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    readers = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["readers"]
    assert len(readers) == 2 and max(p for p, _ in readers) >= 1  # the readers are past their first pass
    run("resumed", 12, "--ckpt_path", "last")
    straight, resumed = last_weights(tmp_path / "straight"), last_weights(tmp_path / "resumed")
    assert [name for name in straight if not torch.equal(straight[name], resumed[name])] == []
