"""Fine-tuning: the GLUE metrics against hand computations, each task type on a few dozen rows, and bad input."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import pretrain
from pretrain.data.tokenizer import train_tokenizer
from pretrain.downstream.finetune import Settings, finetune
from pretrain.downstream.pretrained import Pretrained, model_with_heads
from pretrain.downstream.tasks import GLUE, Task, compute_metrics, glue_task, read_examples
from pretrain.errors import UserError
from tests.helpers import run_cli, tiny_config

GOOD, BAD = ["good", "great", "fine", "lovely"], ["bad", "awful", "poor", "dull"]


def ranks(values: np.ndarray) -> np.ndarray:
    order = values.argsort()
    out = np.empty(len(values))
    out[order] = np.arange(len(values))
    return out


def test_metrics_agree_with_hand_computations():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 2, 200)
    predictions = np.where(rng.random(200) < 0.8, targets, 1 - targets)
    tp = int(((predictions == 1) & (targets == 1)).sum())
    tn = int(((predictions == 0) & (targets == 0)).sum())
    fp = int(((predictions == 1) & (targets == 0)).sum())
    fn = int(((predictions == 0) & (targets == 1)).sum())
    got = compute_metrics(("accuracy", "f1", "matthews"), torch.tensor(predictions), torch.tensor(targets), 2)
    assert got["accuracy"] == pytest.approx(100 * (tp + tn) / 200)
    assert got["f1"] == pytest.approx(100 * 2 * tp / (2 * tp + fp + fn))
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert got["matthews"] == pytest.approx(100 * mcc, abs=1e-4)

    scores = rng.random(100) * 5
    guesses = scores + rng.normal(0, 1, 100)
    got = compute_metrics(("pearson", "spearman"), torch.tensor(guesses), torch.tensor(scores), 1)
    assert got["pearson"] == pytest.approx(100 * np.corrcoef(guesses, scores)[0, 1], abs=1e-3)
    assert got["spearman"] == pytest.approx(100 * np.corrcoef(ranks(guesses), ranks(scores))[0, 1], abs=1e-3)


def test_glue_files_are_read_as_distributed(tmp_path):
    (tmp_path / "cola.tsv").write_text("gj04\t1\t\tThe sailors rode the breeze.\nclc95\t0\t*\tThey drank the pub.\n")
    examples = read_examples(GLUE["cola"], tmp_path / "cola.tsv")
    assert examples.texts[1] == "They drank the pub." and examples.labels == ["1", "0"] and examples.pairs is None
    (tmp_path / "mrpc.tsv").write_text("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
                                       '1\t1\t2\tHe said " yes " .\tHe agreed .\n')
    examples = read_examples(GLUE["mrpc"], tmp_path / "mrpc.tsv")
    assert examples.texts == ['He said " yes " .'] and examples.pairs == ["He agreed ."] and examples.labels == ["1"]
    assert glue_task("SST-2") is GLUE["sst2"] and glue_task("sts-b") is GLUE["stsb"]
    with pytest.raises(UserError, match="unknown task 'sst3'"):
        glue_task("sst3")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random encoder with a WordPiece tokenizer, saved as an export directory."""
    words = GOOD + BAD + ["the", "film", "was", "plot", "and", "a", "very"]
    texts = [" ".join(np.random.default_rng(i).choice(words, 6)) for i in range(300)]
    tokenizer = train_tokenizer(texts, "wordpiece", 100)
    directory = tmp_path_factory.mktemp("model")
    config = tiny_config(vocab_size=tokenizer.get_vocab_size(), dropout=0.1)
    Pretrained(model_with_heads(config, ["mlm"]), tokenizer).save(directory)
    return directory


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def sentiment_rows(count: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        label = i % 2
        word = rng.choice(GOOD if label else BAD)
        rows.append({"text": f"the film was {word}", "other": f"a {rng.choice(GOOD + BAD)} plot", "label": label,
                     "score": float(label * 4 + rng.random())})
    return rows


@pytest.mark.parametrize("kind", ["single", "pair", "regression"])
def test_each_task_type_trains_and_the_best_model_predicts(kind, model_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(48, 0))
    dev = write_jsonl(tmp_path / "dev.jsonl", sentiment_rows(24, 1))
    task = Task("mine", text="text", pair="other" if kind == "pair" else None,
                label="score" if kind == "regression" else "label", regression=kind == "regression",
                metrics=("pearson", "spearman") if kind == "regression" else ("accuracy", "f1"))
    settings = Settings(epochs=15, learning_rate=2e-3, batch_size=8, warmup_ratio=0.0)
    results = finetune(model_dir, task, train, dev, tmp_path / "out", [1, 2], settings)
    assert [run["seed"] for run in results["runs"]] == [1, 2]
    assert json.loads((tmp_path / "out" / "results.json").read_text())["summary"] == results["summary"]
    best = results["runs"][0]
    assert best["score"] == max(sum(h.values()) / len(h) for h in best["history"])  # the best epoch was kept
    main_metric = "pearson" if kind == "regression" else "accuracy"
    assert results["summary"][main_metric]["median"] > 90  # the word decides the label: easy to learn
    fine_tuned = pretrain.load(tmp_path / "out" / "seed-1" / "model")
    pairs = ["a dull plot", "a fine plot"] if kind == "pair" else None
    predicted = fine_tuned.predict(["the film was great", "the film was awful"], pairs)
    if kind == "regression":
        assert predicted[0] > predicted[1]
    else:
        assert predicted == ["1", "0"]


def test_fine_tuning_trains_with_dropout_on(model_dir, tmp_path, monkeypatch):
    from pretrain.downstream.finetune import FineTuningModule

    original, seen = FineTuningModule.training_step, []

    def recording(self, batch, batch_idx):
        dropouts = [m for m in self.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
        with torch.no_grad():  # dropout draws differ: two passes over one batch disagree
            differ = not torch.equal(self(batch), self(batch))
        seen.append((len(dropouts) > 0 and all(m.training for m in dropouts), differ))
        return original(self, batch, batch_idx)

    monkeypatch.setattr(FineTuningModule, "training_step", recording)
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(16, 0))
    task = Task("mine", text="text", label="label")
    finetune(model_dir, task, train, train, tmp_path / "out", [1], Settings(epochs=2, batch_size=8))
    assert seen and all(on and differ for on, differ in seen)


def test_last_epoch_only_evaluates_once_and_keeps_the_last_epoch(model_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(16, 0))
    task = Task("mine", text="text", label="label")
    results = finetune(model_dir, task, train, train, tmp_path / "out", [1],
                       Settings(epochs=3, batch_size=8, last_epoch_only=True))
    run = results["runs"][0]
    assert len(run["history"]) == 1 and run["best_epoch"] == 3


def test_score_train_scores_the_kept_model_on_every_training_example(model_dir, tmp_path):
    rows = sentiment_rows(16, 0)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    task = Task("mine", text="text", label="label")
    results = finetune(model_dir, task, train, train, tmp_path / "out", [1],
                       Settings(epochs=2, batch_size=8, last_epoch_only=True, score_train=True))
    run = results["runs"][0]
    assert run["train"]["accuracy"] == pytest.approx(run["accuracy"])  # dev is the training file here: same score
    model = pretrain.load(tmp_path / "out" / "seed-1" / "model")
    predicted = model.predict([row["text"] for row in rows])
    expected = 100 * sum(p == str(row["label"]) for p, row in zip(predicted, rows, strict=True)) / len(rows)
    assert run["train"]["accuracy"] == pytest.approx(expected)


def test_mean_pooling_reads_every_real_token_and_no_padding():
    from models import MeanPoolingClassifier, Transformer

    head = MeanPoolingClassifier(Transformer(tiny_config()), num_labels=3)
    states = torch.randn(2, 5, 64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    pooled = head.pool(states, mask)
    assert torch.allclose(pooled[0], states[0, :3].mean(0)) and torch.allclose(pooled[1], states[1].mean(0))
    padded = states.clone()
    padded[0, 3:] = 100.0  # what the padding positions hold changes nothing
    assert torch.equal(head.pool(padded, mask), pooled)


def test_mean_pooling_fine_tunes_saves_and_predicts(model_dir, tmp_path):
    rows = sentiment_rows(32, 0)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    task = Task("mine", text="text", label="label")
    results = finetune(model_dir, task, train, train, tmp_path / "out", [1],
                       Settings(epochs=8, batch_size=8, learning_rate=1e-3, pooling="mean", score_train=True))
    # fits its data (chance is 50 %); not pinned to 100 %: the tokenizer's ids, and so the run, vary by machine
    assert results["settings"]["pooling"] == "mean" and results["runs"][0]["train"]["accuracy"] >= 90.0
    model = pretrain.load(tmp_path / "out" / "seed-1" / "model")
    assert type(model.model.heads["task"]).__name__ == "MeanPoolingClassifier"  # rebuilt as it was trained
    predicted = model.predict([row["text"] for row in rows])  # the saved model scores as the trained one did
    right = sum(p == str(r["label"]) for p, r in zip(predicted, rows, strict=True))
    assert 100 * right / len(rows) == results["runs"][0]["train"]["accuracy"]


def test_mean_pooling_is_refused_for_a_causal_model(causal_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(8, 0))
    with pytest.raises(UserError, match="--pooling mean is for encoders"):
        finetune(causal_dir, Task("mine", text="text", label="label"), train, train, tmp_path / "out", [1],
                 Settings(epochs=1, pooling="mean"))


def test_empty_labels_are_refused_with_their_line(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("text,label\na fine film,1\na dull film,\n")
    with pytest.raises(UserError, match=r"train.csv, line 3: the label \(label\) is empty"):
        read_examples(Task("mine", text="text", label="label"), path)
    jsonl = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "score": None}])
    with pytest.raises(UserError, match=r"train.jsonl, line 1: the label \(score\) is empty"):
        read_examples(Task("mine", text="text", label="score", regression=True), jsonl)


def test_bad_input_is_one_clear_error(model_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(8, 0))
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"text": "a", "label": 7}])
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((model_dir / name).read_bytes())
    own = ["--train", str(train), "--dev"]
    cases = [
        (["--model", str(model_dir), "--task", "sst3", "--data-dir", str(tmp_path)], "unknown task 'sst3'"),
        (["--model", str(model_dir), *own, str(train), "--text-column", "review"], "has no column 'review'"),
        (["--model", str(model_dir), *own, str(odd)], "labels ['7'] are outside the task's label set ['0', '1']"),
        (["--model", str(no_tokenizer), *own, str(train)], "has no tokenizer.json"),
    ]
    for number, (arguments, message) in enumerate(cases):
        process = run_cli("finetune", *arguments, "--out", str(tmp_path / f"out{number}"), "--epochs", "1")
        assert process.returncode == 2 and message in process.stderr and "Traceback" not in process.stderr, message
        assert not (tmp_path / f"out{number}").exists()  # a refused run leaves nothing behind
    process = run_cli("glue", "--model", str(model_dir), "--data-dir", str(tmp_path), "--out", str(tmp_path / "g"))
    assert process.returncode == 2 and "no GLUE task" in process.stderr


def test_fine_tuning_says_each_epoch(model_dir, tmp_path, capsys):
    """One plain line per epoch (the output is not a terminal here: no bar), with its loss, dev metrics when dev was
    scored, and the time left."""
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(16, 0))
    finetune(model_dir, Task("mine", text="text", label="label"), train, train, tmp_path / "out", [1],
             Settings(epochs=3, batch_size=8, last_epoch_only=True))
    lines = [line for line in capsys.readouterr().out.splitlines() if ", epoch " in line]
    assert [line.split(":")[0] for line in lines] == [f"mine seed 1, epoch {e}/3" for e in (1, 2, 3)]
    assert all(re.search(r": train loss \d+\.\d{4}", line) for line in lines)
    assert "dev accuracy" in lines[2] and not any("dev" in line for line in lines[:2])  # scored after the last only
    assert "left)" in lines[0] and "left" not in lines[2] and "\x1b[" not in "".join(lines)


def test_a_max_length_beyond_the_positions_is_said_and_recorded_as_used(model_dir, tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(8, 0))
    results = finetune(model_dir, Task("mine", text="text", label="label"), train, train, tmp_path / "out", [1],
                       Settings(epochs=1, batch_size=8, max_length=4096))
    positions = pretrain.load(model_dir).config.max_position_embeddings
    assert f"--max-length 4096 is cut to the model's {positions} positions" in capsys.readouterr().out
    assert results["settings"]["max_length"] == positions
    assert json.loads((tmp_path / "out" / "results.json").read_text())["settings"]["max_length"] == positions


def test_predict_gives_label_names_and_probabilities(model_dir, tmp_path):
    rows = sentiment_rows(16, 0)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    task = Task("mine", text="text", label="label", labels=("0", "1"), label_names=("negative", "positive"))
    finetune(model_dir, task, train, train, tmp_path / "out", [1], Settings(epochs=2, batch_size=8))
    model = pretrain.load(tmp_path / "out" / "seed-1" / "model")
    texts = [row["text"] for row in rows]
    labels, named = model.predict(texts), model.predict(texts, names=True)
    assert set(labels) <= {"0", "1"} and named == [{"0": "negative", "1": "positive"}[label] for label in labels]
    probabilities = model.predict(texts, probabilities=True)
    assert all(list(p) == ["0", "1"] and abs(sum(p.values()) - 1) < 1e-5 for p in probabilities)
    assert [max(p, key=p.get) for p in probabilities] == labels
    assert list(model.predict(texts[:1], names=True, probabilities=True)[0]) == ["negative", "positive"]
