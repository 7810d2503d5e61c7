"""Exact resume: a run stopped and resumed with `--ckpt_path last` ends bitwise where an uninterrupted run ends."""

import csv
import warnings
from pathlib import Path

import pytest
import torch

from pretrain.cli import main
from pretrain.sample import BUNDLED_CORPUS

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


def fit(recipe: str, run_dir: Path, shared: Path, max_steps: int, *extra: str) -> None:
    """8 steps in all (the schedule is set for 8 whatever max_steps says), epochs of 3 batches, validation every 2
    steps, dropout on."""
    code = main(["fit", "-c", str(CONFIGS / "tiny" / recipe), "--data.files", f"[{BUNDLED_CORPUS}]",
                 "--data.tokenizer", str(shared / f"{recipe}.json"), "--data.tokenizer_vocab_size", "400",
                 "--data.cache_dir", str(shared / "cache"), "--trainer.default_root_dir", str(run_dir),
                 "--trainer.accelerator", "cpu", "--trainer.max_steps", str(max_steps), "--model.total_steps", "8",
                 "--model.warmup_steps", "2", "--trainer.limit_train_batches", "3", "--trainer.val_check_interval",
                 "2", "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1",
                 "--trainer.enable_progress_bar", "false", "--model.backbone.dropout", "0.1", *extra])
    assert code == 0


def logged(run_dir: Path, column: str) -> dict[int, str]:
    """step -> value of one column over every version (fit and resumes) of a run's CSV logs."""
    values = {}
    for path in sorted((run_dir / "logs").glob("version_*/metrics.csv")):
        with path.open() as file:
            for row in csv.DictReader(file):
                if row.get(column):
                    values[int(row["step"])] = row[column]
    return values


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.parametrize("recipe, stop, extra", [
    ("bert.yaml", 4, []), ("electra.yaml", 3, []),
    ("roberta.yaml", 3, ["--trainer.accumulate_grad_batches", "2"]),  # each micro-batch has its own masks
    # streaming pairs, shuffled, two workers: each worker's share resumes where it stopped, epoch 1 reshuffled
    ("bert.yaml", 4, ["--data.streaming", "true", "--data.num_workers", "2", "--data.shuffle_buffer", "64"]),
])
def test_stopped_and_resumed_run_equals_an_uninterrupted_one(recipe, stop, extra, tmp_path):
    # stop=4: mid-epoch (epoch 1, one batch in); stop=3: at the end of epoch 0 (with accumulation 2 and epochs of 3
    # batches, 2 steps per epoch: mid-epoch)
    fit(recipe, tmp_path / "straight", tmp_path, 8, *extra)
    fit(recipe, tmp_path / "resumed", tmp_path, stop, *extra)  # stops; its last.ckpt is written at the end
    saved = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    position = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert set(position) == ({"epoch", "batches", "readers"} if "--data.streaming" in extra else {"epoch", "batches"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(recipe, tmp_path / "resumed", tmp_path, 8, "--ckpt_path", "last", *extra)
    assert not [w for w in caught if "not resumable" in str(w.message)]  # the loader is: Lightning knows it

    straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    different = [name for name in straight if not torch.equal(straight[name], resumed[name])]
    assert different == []
    for column in ("train/loss", "val/loss"):
        losses = logged(tmp_path / "straight", column)
        assert len(losses) >= 3 and losses == logged(tmp_path / "resumed", column), column
    assert len(list((tmp_path / "resumed" / "logs").glob("version_*"))) == 2  # the resume logged beside the first


def test_a_resume_keeps_the_decay_length_the_run_began_with_and_says_so(tmp_path, capsys):
    """No model.total_steps (as in every recipe): the decay length is the trainer's estimate at the start (8), and a
    resume with max_steps 12 keeps it, saying which setting would have changed it; --model.total_steps changes it."""
    def run(max_steps: int, *extra: str) -> dict:
        code = main(["fit", "-c", str(CONFIGS / "tiny" / "gpt2.yaml"), "--data.files", f"[{BUNDLED_CORPUS}]",
                     "--data.tokenizer", str(tmp_path / "gpt2.json"), "--data.tokenizer_vocab_size", "400",
                     "--data.cache_dir", str(tmp_path / "cache"), "--trainer.default_root_dir", str(tmp_path / "run"),
                     "--trainer.accelerator", "cpu", "--trainer.max_steps", str(max_steps), "--model.warmup_steps",
                     "2", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
                     "--trainer.log_every_n_steps", "1", *extra])
        assert code == 0
        saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        return saved

    saved = run(8)
    assert saved["pretrain"]["schedule"]["total_steps"] == 8
    capsys.readouterr()
    saved = run(12, "--ckpt_path", "last")
    out = capsys.readouterr().out
    assert ("note: the learning-rate schedule keeps the decay over 8 steps this run began with; its settings now "
            "(trainer.max_steps 8 -> 12) would give 12: give --model.total_steps 12 to decay over those instead") in out
    assert saved["global_step"] == 12 and saved["pretrain"]["schedule"]["total_steps"] == 8
    rates = {step: float(value) for step, value in logged(tmp_path / "run", "train/lr").items()}
    assert rates[6] > 0 and rates[9] == rates[10] == 0.0  # decayed to 0 at step 8, and kept there
    saved = run(16, "--ckpt_path", "last", "--model.total_steps", "20")
    out = capsys.readouterr().out
    assert "resuming with model.total_steps 20 (the checkpoint had None)" in out and "keeps the decay" not in out
    assert saved["pretrain"]["schedule"]["total_steps"] == 20 and saved["lr_schedulers"][0]["_last_lr"][0] > 0


def test_activation_checkpointing_turned_on_at_a_resume_changes_nothing_but_memory(tmp_path):
    """Stopped at step 4 and resumed with --model.backbone.activation_checkpointing blocks: accepted (it is how the
    backbone computes, not what), and the run ends bitwise where the uninterrupted plain run ends."""
    fit("bert.yaml", tmp_path / "straight", tmp_path, 8)
    fit("bert.yaml", tmp_path / "resumed", tmp_path, 4)
    fit("bert.yaml", tmp_path / "resumed", tmp_path, 8, "--ckpt_path", "last",
        "--model.backbone.activation_checkpointing", "blocks")
    straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert [name for name in straight if not torch.equal(straight[name], resumed[name])] == []


def test_block_masks_turned_on_at_a_resume_go_on_with_the_same_training(tmp_path):
    """The tiny ModernBERT (packed documents, local layers; attention dropout off: another kernel draws other
    masks) stopped at step 4 and resumed with --model.backbone.attention_masks blocks: accepted, and the run ends
    where the dense run ends, to rounding."""
    off = ("--model.backbone.attention_dropout", "0.0")
    fit("modernbert.yaml", tmp_path / "straight", tmp_path, 8, *off)
    fit("modernbert.yaml", tmp_path / "resumed", tmp_path, 4, *off)
    fit("modernbert.yaml", tmp_path / "resumed", tmp_path, 8, *off, "--ckpt_path", "last",
        "--model.backbone.attention_masks", "blocks")
    straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert not all(torch.equal(straight[name], resumed[name]) for name in straight)  # other kernels ran
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=1e-4, atol=1e-5, msg=name)


def test_two_phases_go_on_from_the_first_phase_with_new_data(tmp_path, capsys):
    """BERT's two phases, tiny: phase 1 at length 32 (steps 1-40 of a decay over 50), then the phase-2 overlay at 64
    from phase 1's last checkpoint in its own directory: the data starts from its beginning (said), and the step
    count, optimizer state and schedule go on (AdamW's step count is 50 at the end, the global step 50, the decay the
    one phase 1 began); phase 2's first loss is phase 1's level, not a fresh model's."""
    two_phase = CONFIGS / "tiny" / "two-phase"
    common = ["--data.files", f"[{BUNDLED_CORPUS}]", "--data.tokenizer", str(tmp_path / "tokenizer.json"),
              "--data.tokenizer_vocab_size", "400", "--model.backbone.vocab_size", "400", "--data.cache_dir",
              str(tmp_path / "cache"), "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
              "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "0"]
    phase1 = ["fit", "-c", str(two_phase / "bert.yaml"), *common, "--trainer.default_root_dir", str(tmp_path / "one")]
    assert main(phase1) == 0
    capsys.readouterr()
    phase2 = ["fit", "-c", str(two_phase / "bert.yaml"), "-c", str(two_phase / "bert-phase2.yaml"), *common,
              "--trainer.default_root_dir", str(tmp_path / "two"), "--ckpt_path",
              str(tmp_path / "one" / "checkpoints" / "last.ckpt")]
    assert main(phase2) == 0
    out = capsys.readouterr().out
    assert "note: the data settings changed (data.batch_size, data.max_length): the training data starts from its " \
           "beginning" in out
    saved = torch.load(tmp_path / "two" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 50 and saved["pretrain"]["schedule"]["total_steps"] == 50
    assert all(int(state["step"]) == 50 for state in saved["optimizer_states"][0]["state"].values())
    first, second = logged(tmp_path / "one", "train/loss"), logged(tmp_path / "two", "train/loss")
    assert min(second) == 40 == max(first) + 1  # (0-based) phase 2's first step is the 41st
    mean = (lambda losses, steps: sum(float(losses[step]) for step in steps) / len(steps))
    start, end, then = mean(first, range(5)), mean(first, range(35, 40)), mean(second, range(40, 45))
    assert abs(then - end) < 0.5 * (start - end), (start, end, then)  # no jump back towards a fresh model
