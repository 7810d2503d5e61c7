"""Zero- and few-shot scoring: the cached label scores equal a full forward, a model that prefers one label word
predicts it, few-shot prompts are balanced, seeded and never hold the scored example, and the command's errors."""

import json
import random

import pytest
import torch

import pretrain
from models import LMHead, Transformer
from pretrain.downstream.generate import LanguageModel
from pretrain.downstream.pretrained import Pretrained, model_with_heads
from pretrain.downstream.tasks import Examples, Task
from pretrain.downstream.zeroshot import Prompting, draw_shots, evaluate, label_log_probs, prompts_for
from pretrain.errors import UserError
from tests.helpers import run_cli
from tests.pretrain.downstream.conftest import causal_config
from tests.pretrain.downstream.test_finetune import sentiment_rows, write_jsonl

TEMPLATE = "Review: {text}\nSentiment:"


def test_cached_label_scores_equal_a_full_forward_of_prompt_and_label():
    torch.manual_seed(0)
    backbone = Transformer(causal_config(40, initializer_range=0.2)).eval()
    model = LanguageModel(backbone, LMHead(backbone, transform=False, bias=False))
    prompts, labels = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]], [[20], [21, 22, 23], [24, 25]]
    scores = label_log_probs(model, prompts, labels, pad_id=0)
    for p, prompt in enumerate(prompts):
        for k, label in enumerate(labels):
            tokens = torch.tensor([prompt + label])
            log_probs = model.head(backbone(tokens))[0].log_softmax(-1)
            expected = sum(log_probs[len(prompt) - 1 + j, token] for j, token in enumerate(label))
            torch.testing.assert_close(scores[p, k], expected, atol=1e-4, rtol=1e-4)
    normalized = label_log_probs(model, prompts, labels, pad_id=0, normalize=True)
    torch.testing.assert_close(normalized, scores / torch.tensor([1.0, 3.0, 2.0]))


@pytest.mark.parametrize("preferred", [0, 1])
def test_a_model_that_prefers_one_label_word_predicts_it(preferred, causal_dir):
    model = pretrain.load(causal_dir)
    words = [" negative", " positive"]
    head = model.model.heads["clm"]
    with torch.no_grad():  # every token of the preferred word becomes far more likely than anything else
        bias = torch.zeros(model.config.vocab_size)
        bias[model.tokenizer.encode(words[preferred], add_special_tokens=False).ids] = 50.0
        head.bias = torch.nn.Parameter(bias)
    rows = sentiment_rows(10, 0)
    dev = Examples([r["text"] for r in rows], None, [str(r["label"]) for r in rows])
    targets = torch.tensor([r["label"] for r in rows])
    task = Task("sst2", text="text", label="label", metrics=("accuracy", "f1"))
    results = evaluate(model, task, dev, targets, Prompting(TEMPLATE, words))
    assert results["confusion"] == ([[5, 0], [5, 0]] if preferred == 0 else [[0, 5], [0, 5]])
    assert results["metrics"]["accuracy"] == 50.0 and results["majority_accuracy"] == 50.0
    assert results["example_prompt"] == "Review: " + rows[0]["text"] + "\nSentiment:"


def test_few_shot_prompts_are_balanced_seeded_and_never_hold_the_scored_example():
    train = Examples([f"text {i}" for i in range(20)], None, [])
    train_labels = [i % 2 for i in range(20)]
    dev = Examples(["text 3", "text 4", "new"], None, [])
    settings = Prompting("{text} =", [" no", " yes"], shots=4, seed=7)
    prompts = prompts_for(dev, settings, train, train_labels)
    assert prompts == prompts_for(dev, settings, train, train_labels)  # deterministic under the seed
    assert prompts != prompts_for(dev, Prompting("{text} =", [" no", " yes"], shots=4, seed=8), train, train_labels)
    for prompt, scored in zip(prompts, dev.texts, strict=True):
        parts = prompt.split("\n\n")
        assert len(parts) == 5 and parts[-1] == f"{scored} ="
        shots = [part.rsplit(" = ", 1) for part in parts[:-1]]
        assert sorted(word for _, word in shots) == ["no", "no", "yes", "yes"]  # balanced
        assert all(int(text.split()[1]) % 2 == (word == "yes") for text, word in shots)  # with their own labels
        assert scored not in [text for text, _ in shots]
    # an odd number of shots: the remainder goes to a label drawn at random, never the scored example
    for seed in range(8):
        picked = draw_shots([[0, 2, 4], [1, 3]], 3, random.Random(seed), excluded=lambda i: i == 4)
        assert len(set(picked)) == 3 and 4 not in picked and {i % 2 for i in picked} == {0, 1}
    with pytest.raises(UserError, match="lower --shots"):
        draw_shots([[0, 2, 4], [1, 3]], 6, random.Random(0), excluded=lambda i: i == 4)


def test_the_command_scores_few_shot_and_writes_its_results(causal_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(20, 0))
    dev = write_jsonl(tmp_path / "dev.jsonl", sentiment_rows(12, 1))
    process = run_cli("zero-shot", "--model", str(causal_dir), "--train", str(train), "--dev", str(dev),
                      "--template", r"Review: {text}\nSentiment:", "--labels", " negative, positive", "--shots", "2",
                      "--out", str(tmp_path / "results.json"))
    assert process.returncode == 0, process.stderr
    assert "dev, 2-shot, 12 examples: accuracy" in process.stdout and "confusion" in process.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["label_words"] == [" negative", " positive"] and sum(map(sum, results["confusion"])) == 12
    assert results["example_prompt"].count("\nSentiment:") == 3  # two shots and the scored review


def test_bad_input_is_one_clear_error(causal_dir, tmp_path):
    dev = write_jsonl(tmp_path / "dev.jsonl", sentiment_rows(4, 1))
    base = ["--dev", str(dev), "--template", "{text}:", "--labels", " no, yes"]
    encoder = tmp_path / "encoder"
    Pretrained(model_with_heads(causal_config(300, causal=False, norm_position="post"), ["mlm"]),
               pretrain.load(causal_dir).tokenizer).save(encoder)
    cases = [
        (["--model", str(encoder), *base], "needs a causal language model"),
        (["--model", str(causal_dir), *base[:-1], " no, maybe, yes"], "gives 3 words for the task's 2 labels"),
        (["--model", str(causal_dir), *base[:3], "{review}:", *base[4:]], "the template must place {text}"),
        (["--model", str(causal_dir), *base, "--shots", "2"], "give --train"),
        (["--model", str(causal_dir), *base, "--out", str(dev)], "already exists: choose a new file"),
    ]
    kept = dev.read_text()
    for arguments, message in cases:
        process = run_cli("zero-shot", *arguments)
        assert process.returncode == 2 and message in process.stderr and "Traceback" not in process.stderr, \
            (message, process.stderr)
    assert dev.read_text() == kept  # the file named by --out was not touched
    with pytest.raises(UserError, match="stsb is a regression"):
        evaluate(pretrain.load(causal_dir), Task("stsb", text="a", label="b", regression=True),
                 Examples(["x"], None, ["1.0"]), torch.tensor([1.0]), Prompting("{text}", [" a"]))


def test_a_hugging_face_gpt2_directory_scores_as_the_model_it_was_exported_from(causal_dir, tmp_path):
    pytest.importorskip("transformers")
    pretrain.load(causal_dir).save_hf(tmp_path / "hf")
    rows = sentiment_rows(12, 3)
    dev = Examples([r["text"] for r in rows], None, [str(r["label"]) for r in rows])
    targets = torch.tensor([r["label"] for r in rows])
    task, settings = Task("mine", text="text", label="label"), Prompting(TEMPLATE, [" negative", " positive"])
    native = evaluate(pretrain.load(causal_dir), task, dev, targets, settings)
    hf = pretrain.load(tmp_path / "hf")
    assert evaluate(hf, task, dev, targets, settings)["confusion"] == native["confusion"]
    prompts, labels = [[5, 6, 7], [8, 9]], [[10], [11, 12]]
    torch.testing.assert_close(label_log_probs(hf.language_model(), prompts, labels),
                               label_log_probs(pretrain.load(causal_dir).language_model(), prompts, labels))


def test_calibration_removes_a_models_preference_for_a_label_word(causal_dir):
    """Calibrated (each label's score minus its score after the same prompt around "N/A"), the predictions do not
    change when a bias towards one label word is added to the LM head: that bias is what calibration removes."""
    words = [" positive", " plot"]  # single tokens in this tokenizer
    plain, biased = pretrain.load(causal_dir), pretrain.load(causal_dir)
    ids = [plain.tokenizer.encode(w, add_special_tokens=False).ids for w in words]
    assert all(len(i) == 1 for i in ids)  # one token each: the bias then cancels exactly
    with torch.no_grad():
        bias = torch.zeros(biased.config.vocab_size)
        bias[ids[0][0]] = 8.0
        biased.model.heads["clm"].bias = torch.nn.Parameter(bias)
    rows = sentiment_rows(16, 2)
    dev = Examples([r["text"] for r in rows], None, [str(r["label"]) for r in rows])
    targets, task = torch.tensor([r["label"] for r in rows]), Task("mine", text="text", label="label")
    uncalibrated = evaluate(biased, task, dev, targets, Prompting(TEMPLATE, words))["confusion"]
    assert [row[1] for row in uncalibrated] == [0, 0]  # the bias decides every prediction
    calibrated = [evaluate(model, task, dev, targets, Prompting(TEMPLATE, words, calibrate=True))["confusion"]
                  for model in (plain, biased)]
    assert calibrated[0] == calibrated[1]
