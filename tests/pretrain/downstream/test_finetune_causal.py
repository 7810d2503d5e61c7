"""Causal models downstream, GPT-1 style: the input transformation, the last-token read under right padding, the
auxiliary LM loss, symmetric pairs, tokens added where the tokenizer has none, and a tiny model that learns."""

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

import pretrain
from models import LastTokenClassifier, LMHead, Transformer
from models.heads import last_token
from pretrain.downstream.finetune import FineTuningModule, Settings, finetune
from pretrain.downstream.inputs import gpt_inputs, next_token_loss, task_batch, task_output, truncate_pair
from pretrain.downstream.pretrained import Pretrained, model_with_heads
from pretrain.downstream.tasks import Task
from tests.helpers import run_cli
from tests.pretrain.downstream.conftest import CLM_HEAD, causal_config
from tests.pretrain.downstream.test_finetune import BAD, GOOD, sentiment_rows, write_jsonl

TOKENS = {"start": 1, "delim": 2, "extract": 3}


def test_single_and_pair_transformations_with_segments():
    assert gpt_inputs([10, 11], None, TOKENS, 16) == [([1, 10, 11, 3], [0, 0, 0, 0])]
    (ids, types), = gpt_inputs([10, 11], [20], TOKENS, 16)
    assert ids == [1, 10, 11, 2, 20, 3] and types == [0, 0, 0, 0, 1, 1]
    forward, backward = gpt_inputs([10, 11], [20], TOKENS, 16, symmetric=True)
    assert forward == (ids, types) and backward == ([1, 20, 2, 10, 11, 3], [0, 0, 0, 1, 1, 1])
    # cut to max_length, the longer text first; the extract token is always last
    assert gpt_inputs(list(range(10, 30)), None, TOKENS, 6) == [([1, 10, 11, 12, 13, 3], [0] * 6)]
    (ids, _), = gpt_inputs(list(range(10, 30)), [40, 41], TOKENS, 8)
    assert ids == [1, 10, 11, 12, 2, 40, 41, 3]
    assert truncate_pair([1] * 9, [2] * 7, 10) == ([1] * 5, [2] * 5)
    assert truncate_pair([1] * 3, [2] * 20, 10) == ([1] * 3, [2] * 7)


def test_the_head_reads_each_rows_last_real_token_under_right_padding():
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    assert torch.equal(last_token(hidden, mask), torch.stack([hidden[0, 4], hidden[1, 1]]))
    # A real causal model: a short row padded in a batch gets exactly the logits it gets alone
    backbone = Transformer(causal_config(50)).eval()
    head = LastTokenClassifier(backbone, num_labels=3).eval()
    rows = [gpt_inputs([5, 6, 7, 8, 9, 10], None, TOKENS, 16), gpt_inputs([11, 12], None, TOKENS, 16)]
    batched, _ = task_output(backbone, head, task_batch(rows, pad_id=0), regression=False)
    for index, row in enumerate(rows):
        alone, _ = task_output(backbone, head, task_batch([row], pad_id=0), regression=False)
        torch.testing.assert_close(batched[index], alone[0], atol=1e-5, rtol=1e-5)
    # and what it reads is the extract token's hidden state, not position 0 or a padding position
    batch = task_batch(rows, pad_id=0)
    states = backbone(batch["input_ids"], attention_mask=batch["attention_mask"])
    torch.testing.assert_close(batched[1], head.classifier(states[1, 3]))


def test_lm_weight_zero_is_the_plain_classification_loss_and_one_half_adds_half_the_lm_loss():
    torch.manual_seed(0)
    backbone = Transformer(causal_config(50))
    lm_head, head = LMHead(backbone, transform=False, bias=False), LastTokenClassifier(backbone, num_labels=2)
    rows = [gpt_inputs([5, 6, 7], [8, 9], TOKENS, 16), gpt_inputs([11], [12, 13, 14, 15], TOKENS, 16)]
    batch = task_batch(rows, pad_id=0) | {"targets": torch.tensor([0, 1])}
    task = Task("mine", text="text", pair="other", label="label")
    losses = {}
    for weight in (0.0, 0.5):
        module = FineTuningModule(backbone, head, task, 2, Settings(lm_weight=weight), lm_head).eval()
        module.log = lambda *args, **kwargs: None
        losses[weight] = module.training_step(batch, 0)
    plain = torch.nn.functional.cross_entropy(module(batch), batch["targets"])
    torch.testing.assert_close(losses[0.0], plain)
    # the LM loss by hand: every real token after the first, from the full logits
    states = backbone(batch["input_ids"], attention_mask=batch["attention_mask"])
    logits, total, count = lm_head(states), 0.0, 0
    for row, length in enumerate(batch["attention_mask"].sum(1).tolist()):
        total += torch.nn.functional.cross_entropy(logits[row, :length - 1], batch["input_ids"][row, 1:length],
                                                   reduction="sum")
        count += length - 1
    torch.testing.assert_close(next_token_loss(lm_head, states, batch["input_ids"], batch["attention_mask"]),
                               total / count)
    torch.testing.assert_close(losses[0.5], plain + 0.5 * total / count)


def test_symmetric_pairs_add_both_orders_so_the_order_does_not_matter():
    torch.manual_seed(0)
    backbone = Transformer(causal_config(50)).eval()
    head = LastTokenClassifier(backbone, num_labels=1).eval()
    one = task_batch([gpt_inputs([5, 6, 7], [8, 9], TOKENS, 16, symmetric=True)], pad_id=0)
    other = task_batch([gpt_inputs([8, 9], [5, 6, 7], TOKENS, 16, symmetric=True)], pad_id=0)
    first, _ = task_output(backbone, head, one, regression=True)
    second, _ = task_output(backbone, head, other, regression=True)
    torch.testing.assert_close(first, second)
    states = [backbone(one[f"{p}input_ids"])[0, -1] for p in ("", "swapped_")]
    torch.testing.assert_close(first[0], head.classifier(states[0] + states[1])[0])


@pytest.mark.parametrize("kind", ["single", "symmetric pair", "regression"])
def test_a_tiny_causal_model_learns_a_task_and_its_best_model_predicts(kind, causal_dir, tmp_path):
    pair = kind == "symmetric pair"
    rows = {split: sentiment_rows(count, seed) for split, count, seed in (("train", 48, 0), ("dev", 24, 1))}
    if pair:  # an order-free label: does either text praise?
        for row in (row for split in rows.values() for row in split):
            row["label"] = int(any(word in row["text"] + " " + row["other"] for word in GOOD))
    train, dev = (write_jsonl(tmp_path / f"{split}.jsonl", rows[split]) for split in ("train", "dev"))
    task = Task("mine", text="text", pair="other" if pair else None, symmetric=pair,
                label="score" if kind == "regression" else "label", regression=kind == "regression",
                metrics=("pearson", "spearman") if kind == "regression" else ("accuracy",))
    settings = Settings(epochs=15, learning_rate=2e-3, batch_size=8, warmup_ratio=0.0)
    results = finetune(causal_dir, task, train, dev, tmp_path / "out", [1], settings)
    main_metric = "pearson" if kind == "regression" else "accuracy"
    assert results["summary"][main_metric]["median"] > 90
    fine_tuned = pretrain.load(tmp_path / "out" / "seed-1" / "model")
    assert fine_tuned.task["gpt_tokens"] and fine_tuned.task["symmetric"] == pair
    if pair:
        texts, others = ["the film was awful", "the film was awful", "a dull plot"], ["a dull plot", "a fine plot",
                                                                                     "the film was awful"]
        assert fine_tuned.predict(texts, others) == ["0", "1", "0"]
        assert fine_tuned.predict(others, texts) == ["0", "1", "0"]
        return
    predicted = fine_tuned.predict(["the film was great", "the film was awful"])
    if kind == "regression":
        assert predicted[0] > predicted[1]
    else:
        assert predicted == ["1", "0"]
    assert fine_tuned.generate("the film", max_new_tokens=3)  # the LM head is kept: it still generates


def test_from_scratch_and_lm_weight_reach_the_run(causal_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(16, 0))
    process = run_cli("finetune", "--model", str(causal_dir), "--train", str(train), "--dev", str(train),
                      "--out", str(tmp_path / "out"), "--epochs", "1", "--from-scratch", "--lm-weight", "0.25")
    assert process.returncode == 0, process.stderr
    assert "GPT-1 inputs: start '</s>', delimiter '</s>', extract '</s>'" in process.stdout
    assert json.loads((tmp_path / "out" / "results.json").read_text())["settings"]["lm_weight"] == 0.25
    logged = (tmp_path / "out" / "seed-1" / "metrics.csv").read_text().splitlines()[0]
    assert "train/lm_loss" in logged and "train/task_loss" in logged
    process = run_cli("finetune", "--model", str(causal_dir), "--train", str(train), "--dev", str(train),
                      "--out", str(tmp_path / "bad"), "--lm-weight", "-1")
    assert process.returncode == 2 and "--lm-weight at least 0" in process.stderr


def test_a_tokenizer_without_special_tokens_gets_them_added_with_new_embedding_rows(tmp_path):
    words = ["the", "film", "was", *GOOD, *BAD]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="the"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    torch.manual_seed(0)
    model = model_with_heads(causal_config(len(words)), CLM_HEAD)
    old_rows = model.backbone.embeddings.word.weight.detach().clone()
    pretrained = Pretrained(model, tokenizer)
    tokens, added = pretrained.gpt_tokens()
    assert added == ["<|start|>", "<|delim|>", "<|extract|>"]
    assert sorted(tokens.values()) == [len(words), len(words) + 1, len(words) + 2]
    assert pretrained.config.vocab_size == len(words) + 3
    weight = model.backbone.embeddings.word.weight
    assert torch.equal(weight[:len(words)], old_rows) and model.heads["clm"].weight is weight  # still tied
    Pretrained(model, tokenizer).save(tmp_path / "model")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sentiment_rows(16, 0)))
    results = finetune(tmp_path / "model", Task("mine", text="text", label="label"), tmp_path / "train.jsonl",
                       tmp_path / "train.jsonl", tmp_path / "out", [1], Settings(epochs=1, batch_size=8))
    assert results["runs"][0]["accuracy"] >= 0
    saved = pretrain.load(tmp_path / "out" / "seed-1" / "model")
    assert saved.tokenizer.token_to_id("<|extract|>") == tokens["extract"]
    assert saved.predict(["the film was great"])[0] in ("0", "1")



def test_glue_takes_a_causal_model(causal_dir, tmp_path):
    (tmp_path / "SST-2").mkdir()
    for split, seed in (("train", 0), ("dev", 1)):
        lines = ["sentence\tlabel"] + [f"{r['text']}\t{r['label']}" for r in sentiment_rows(16, seed)]
        (tmp_path / "SST-2" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    process = run_cli("glue", "--model", str(causal_dir), "--data-dir", str(tmp_path), "--out", str(tmp_path / "out"),
                      "--epochs", "1")
    assert process.returncode == 0, process.stderr
    assert "GPT-1 inputs" in process.stdout and "average score over 1 tasks" in process.stdout
    assert json.loads((tmp_path / "out" / "glue.json").read_text())["tasks"]["sst2"]["accuracy"]["median"] >= 0
