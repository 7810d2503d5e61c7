"""A run that goes wrong never loses work: non-finite steps are skipped and stop the run with the last good
checkpoint intact; a failed (disk-full) save leaves the previous checkpoint loadable; the last k checkpoints are
kept and last.ckpt is always the newest; a damaged checkpoint is refused; resume never unpickles code."""

import errno
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

import pretrain
from objectives import CausalLM, MaskedLM
from pretrain.cli import main
from pretrain.errors import UserError
from pretrain.sample import BUNDLED_CORPUS
from pretrain.training.checkpoints import CheckpointWriteError, read_checkpoint, write_atomically
from pretrain.training.optim import Lamb, build_optimizer, skip_if_not_finite
from tests.helpers import run_cli

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


def fit_arguments(tmp_path: Path, run_dir: Path, recipe: str = "gpt2.yaml", *extra: str) -> list[str]:
    return ["fit", "-c", str(CONFIGS / "tiny" / recipe), "--data.files", f"[{BUNDLED_CORPUS}]",
            "--data.tokenizer", str(tmp_path / f"{recipe}.json"), "--data.tokenizer_vocab_size", "400",
            "--model.backbone.vocab_size", "400", "--data.cache_dir", str(tmp_path / "cache"),
            "--trainer.default_root_dir", str(run_dir), "--trainer.accelerator", "cpu", "--model.warmup_steps", "1",
            "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar",
            "false", *extra]


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def all_finite(path: Path) -> bool:
    return all(t.isfinite().all() for t in state_dict(path).values() if t.is_floating_point())


# --- non-finite steps -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["adamw", "lamb", "radam"])
def test_a_non_finite_gradient_leaves_weights_and_optimizer_state_unchanged(name):
    model = torch.nn.Linear(4, 3)
    optimizer = build_optimizer(name, model, 0.1, 0.01, (0.9, 0.999), 1e-6)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()  # one good step: the moments exist
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: v.clone() for k, v in optimizer.state_dict()["state"][0].items()}
    model(torch.randn(2, 4)).sum().mul(float("nan")).backward()
    parameters = list(model.parameters())
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    skip_if_not_finite(optimizer, parameters, ~norm.isfinite())
    optimizer.step()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(state[k], v) for k, v in optimizer.state_dict()["state"][0].items())
    device_side = name == "adamw" and optimizer.defaults["fused"] or isinstance(optimizer, Lamb)
    assert device_side == (name != "radam")  # only RAdam reads the flag on the host
    model.zero_grad()
    model(torch.randn(2, 4)).sum().backward()  # and the next good step moves the weights again
    skip_if_not_finite(optimizer, list(model.parameters()), torch.tensor(False))
    optimizer.step()
    assert not torch.equal(weights["weight"], model.weight)


def test_a_nan_run_stops_non_zero_with_the_last_good_checkpoint_unchanged(tmp_path, monkeypatch, capsys):
    """The loss turns NaN from the 5th step on: steps 5, 6, 7 are skipped (weights unchanged, nothing saved), the
    run stops at max_skipped_steps=3 with exit status 2, and last.ckpt holds the weights of a clean 4-step run."""
    clean = tmp_path / "clean"
    arguments = ["--checkpoint.every_n_train_steps", "2", "--model.max_skipped_steps", "3", "--model.schedule",
                 "constant"]
    assert main(fit_arguments(tmp_path, clean, "gpt2.yaml", "--trainer.max_steps", "4", *arguments)) == 0
    original, calls = CausalLM.forward, []

    def poisoned(self, hidden_states, batch):
        output = original(self, hidden_states, batch)
        calls.append(1)
        if len(calls) > 4:
            output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(CausalLM, "forward", poisoned)
    poisoned_run = tmp_path / "nan"
    code = main(fit_arguments(tmp_path, poisoned_run, "gpt2.yaml", "--trainer.max_steps", "20", *arguments))
    error = capsys.readouterr().err
    assert code == 2 and "stopped at step 7: the last 3 steps had a non-finite loss" in error
    assert "Traceback" not in error
    checkpoints = poisoned_run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step-00000002.ckpt", "step-00000004.ckpt"]
    assert (checkpoints / "last.ckpt").read_bytes() == (checkpoints / "step-00000004.ckpt").read_bytes()
    saved, good = state_dict(checkpoints / "last.ckpt"), state_dict(clean / "checkpoints" / "last.ckpt")
    assert saved.keys() == good.keys() and all(torch.equal(saved[k], good[k]) for k in saved)
    assert pretrain.load(checkpoints / "last.ckpt").config.vocab_size == 400  # loadable


def test_a_diverging_learning_rate_stops_the_run_and_writes_only_finite_checkpoints(tmp_path, capsys):
    """The reproduction of the issue: lr 1e6 sends the loss to 5e12 then NaN; the run used to exit 0 with
    non-finite tensors in last.ckpt."""
    run = tmp_path / "run"
    code = main(fit_arguments(tmp_path, run, "gpt2.yaml", "--model.learning_rate", "1e6", "--model.warmup_steps",
                              "2", "--trainer.max_steps", "20", "--checkpoint.every_n_train_steps", "1",
                              "--model.max_skipped_steps", "5"))
    assert code == 2 and "non-finite loss or gradient" in capsys.readouterr().err
    checkpoints = sorted((run / "checkpoints").glob("*.ckpt"))
    assert checkpoints and all(all_finite(path) for path in checkpoints)


def test_non_finite_weights_are_never_saved(tmp_path):
    from pretrain.training.checkpoints import Checkpoints, UnsafeWeightsError

    class Trainer:  # what Checkpoints.save reads
        global_step, sanity_checking, fast_dev_run, is_global_zero, strategy = 3, False, False, True, None

        def save_checkpoint(self, *args, **kwargs):
            raise AssertionError("must not be called")

    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    callback = Checkpoints(str(tmp_path))
    with pytest.raises(UnsafeWeightsError, match="the weights are not finite at step 3"):
        callback.save(Trainer(), model)
    assert not any(tmp_path.iterdir())


# --- failed saves ---------------------------------------------------------------------------------------------

def test_a_failed_write_leaves_the_previous_file_and_no_partial_file(tmp_path):
    target = tmp_path / "last.ckpt"
    write_atomically(target, lambda file: file.write(b"good"))

    def full_disk(file):
        file.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CheckpointWriteError, match=f"could not write {target}: No space left on device .*intact"):
        write_atomically(target, full_disk)
    assert target.read_bytes() == b"good" and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs: room for one tiny checkpoint (2.5 MB) but not for a second beside it."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    if not shutil.which("mount") or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                                                   capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_stops_the_run_and_leaves_the_previous_checkpoint_loadable(tmp_path, small_disk, capsys):
    run = tmp_path / "run"
    code = main(fit_arguments(tmp_path, run, "gpt2.yaml", "--trainer.max_steps", "20",
                              "--checkpoint.every_n_train_steps", "2", "--checkpoint.dirpath", str(small_disk)))
    error = capsys.readouterr().err
    failed = re.search(rf"could not write {small_disk}/step-(\d+).ckpt: No space left on device", error)
    assert code == 2 and failed and f"disk {small_disk}" in error and "Traceback" not in error
    step = int(failed.group(1))
    kept = sorted(p.name for p in small_disk.iterdir())  # no partial file left behind
    assert kept[0] == "last.ckpt" and kept[-1] == f"step-{step - 2:08d}.ckpt" and len(kept) <= 3
    assert read_checkpoint(small_disk / "last.ckpt")["global_step"] == step - 2
    assert pretrain.load(small_disk / "last.ckpt").config.vocab_size == 400


# --- kept checkpoints, last.ckpt the newest -------------------------------------------------------------------

def test_the_last_k_checkpoints_are_kept_and_last_is_the_newest_also_in_a_moved_run(tmp_path):
    run = tmp_path / "run"
    assert main(fit_arguments(tmp_path, run, "gpt2.yaml", "--trainer.max_steps", "8",
                              "--checkpoint.every_n_train_steps", "2", "--checkpoint.keep", "3")) == 0
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step-00000004.ckpt", "step-00000006.ckpt",
                                                             "step-00000008.ckpt"]
    assert (checkpoints / "last.ckpt").read_bytes() == (checkpoints / "step-00000008.ckpt").read_bytes()
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)  # the checkpoint remembers the old directory; the resumed run writes in the new one
    assert main(fit_arguments(tmp_path, moved, "gpt2.yaml", "--trainer.max_steps", "10",
                              "--checkpoint.every_n_train_steps", "2", "--checkpoint.keep", "3", "--ckpt_path",
                              "last")) == 0
    names = sorted(p.name for p in (moved / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step-00000006.ckpt", "step-00000008.ckpt", "step-00000010.ckpt"]
    assert read_checkpoint(moved / "checkpoints" / "last.ckpt")["global_step"] == 10
    assert read_checkpoint(checkpoints / "last.ckpt")["global_step"] == 8  # the original run is untouched


# --- damaged and unsafe checkpoints ---------------------------------------------------------------------------

def flip_bytes_inside_a_tensor(path: Path, count: int = 400) -> None:
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)  # the largest tensor
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data = bytearray(path.read_bytes())
    for i in range(start + 100, start + 100 + count):
        data[i] ^= 0x55
    path.write_bytes(bytes(data))


def test_a_checkpoint_with_damaged_bytes_is_refused_everywhere(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(fit_arguments(tmp_path, run, "gpt2.yaml", "--trainer.max_steps", "2")) == 0
    last = run / "checkpoints" / "last.ckpt"
    flip_bytes_inside_a_tensor(last)
    with pytest.raises(UserError, match="fails its checksum"):
        pretrain.load(last)
    process = run_cli("export", str(last), str(tmp_path / "export"))  # as a user runs it: one line, no traceback
    assert process.returncode == 2 and "fails its checksum" in process.stderr and "Traceback" not in process.stderr
    assert not (tmp_path / "export").exists()
    capsys.readouterr()
    assert main(fit_arguments(tmp_path, run, "gpt2.yaml", "--trainer.max_steps", "4", "--ckpt_path", "last")) == 2
    assert "fails its checksum" in capsys.readouterr().err


def two_steps_then_resume(tmp_path: Path, capsys) -> tuple[Path, list[str]]:
    """A run of 2 steps, and the arguments that resume it to 4."""
    run = tmp_path / "run"
    assert main(fit_arguments(tmp_path, run, "gpt2.yaml", "--trainer.max_steps", "2")) == 0
    capsys.readouterr()
    return run, fit_arguments(tmp_path, run, "gpt2.yaml", "--trainer.max_steps", "4", "--ckpt_path", "last")


def test_resume_never_unpickles_code(tmp_path, capsys):
    run, resume = two_steps_then_resume(tmp_path, capsys)
    assert main([*resume, "--weights_only", "false"]) == 2
    assert "--weights_only false would let a checkpoint run code" in capsys.readouterr().err
    planted = run / "checkpoints" / "last.ckpt"  # a pickle that would run code if unpickled without weights_only
    torch.save({"state_dict": {}, "payload": Path("x")}, planted)
    process = run_cli(*resume)  # as a user runs it: one line, no traceback
    assert process.returncode == 2 and "could not be read as a checkpoint" in process.stderr
    assert "Traceback" not in process.stderr


# --- resuming with changed settings ---------------------------------------------------------------------------

def test_resume_refuses_a_changed_architecture_and_applies_a_changed_learning_rate(tmp_path, capsys):
    run, resume = two_steps_then_resume(tmp_path, capsys)
    assert main([*resume, "--model.backbone.hidden_size", "32"]) == 2
    error = capsys.readouterr().err
    assert "model.backbone.hidden_size: 64 in the checkpoint, 32 now" in error and "keeps its architecture" in error
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 2  # nothing was written
    assert main([*resume, "--model.learning_rate", "0.5", "--data.batch_size", "8", "--model.schedule",
                 "constant"]) == 0
    output = capsys.readouterr()
    assert "resuming with model.learning_rate 0.5 (the checkpoint had 0.001)" in output.err + output.out
    assert "data.batch_size: 16 in the checkpoint, 8 now" in output.out
    optimizer = read_checkpoint(run / "checkpoints" / "last.ckpt")["optimizer_states"][0]
    assert [group["lr"] for group in optimizer["param_groups"]] == [0.5, 0.5]


# --- corruption seeds with gradient accumulation --------------------------------------------------------------

def test_each_micro_batch_of_an_accumulated_step_draws_its_own_masks(tmp_path, monkeypatch):
    original, selected = MaskedLM.corrupt, []

    def recording(self, batch, generator=None):
        corrupted = original(self, batch, generator)
        selected.append(corrupted["mlm_labels"] != -100)
        return corrupted

    monkeypatch.setattr(MaskedLM, "corrupt", recording)
    # one long document: every row of every batch is a full block, so equal seeds would select equal positions
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(BUNDLED_CORPUS.read_text().split()[:6000]) + "\n")
    arguments = fit_arguments(tmp_path, tmp_path / "run", "roberta.yaml", "--trainer.max_steps", "2",
                              "--trainer.accumulate_grad_batches", "2", "--data.validation_fraction", "0")
    arguments[arguments.index("--data.files") + 1] = f"[{corpus}]"
    assert main(arguments) == 0
    assert len(selected) == 4 and all(s.shape == selected[0].shape for s in selected)
    assert not torch.equal(selected[0], selected[1]) and not torch.equal(selected[2], selected[3])


def test_temporary_files_of_a_killed_save_are_removed_and_checkpoints_kept(tmp_path):
    from pretrain.training.checkpoints import Checkpoints

    (tmp_path / ".step-00000004.ckpt.partial-123").write_bytes(b"half")
    (tmp_path / "last.ckpt").write_bytes(b"whole")

    class Trainer:
        is_global_zero = True

    Checkpoints(str(tmp_path)).setup(Trainer(), None, "fit")
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"] and (tmp_path / "last.ckpt").read_bytes() == b"whole"
