"""SpanBERT's span masking and span-boundary objective: the selection's rules, the loss, and the whole path (a recipe
that trains, resumes exactly and loads with pretrain.load) without any other file of the packages knowing it."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import pretrain
from objectives.masking import IGNORE_INDEX, max_selected
from objectives.span import SpanMasking, span_mask
from pretrain.cli import main
from pretrain.sample import BUNDLED_CORPUS
from tests.helpers import MASK, SPECIAL_IDS, VOCAB_SIZE, tiny_config

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "tiny" / "spanbert.yaml"


def words_batch(rows: int = 64, length: int = 64, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB_SIZE, (rows, length), generator=generator)
    ids[:, 0], ids[:, -1] = 1, 2  # [CLS] ... [SEP]
    word_starts = (torch.rand(rows, length, generator=generator) < 0.6).long()
    return {"input_ids": ids, "word_starts": word_starts}


def spans_of(row: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each run of True."""
    runs, start = [], None
    for t, value in enumerate([*row.tolist(), False]):
        if value and start is None:
            start = t
        elif not value and start is not None:
            runs.append((start, t))
            start = None
    return runs


def test_spans_are_whole_words_within_the_budget_with_geometric_lengths():
    batch = words_batch(rows=256, length=256)  # long rows: a budget of 38 tokens leaves room for long spans
    selected, _ = span_mask(batch["input_ids"], batch["word_starts"], special_ids=SPECIAL_IDS,
                            generator=torch.Generator().manual_seed(1))
    length = batch["input_ids"].shape[1]
    assert int(selected.sum(1).max()) <= max_selected(length, 0.15)  # the static gather holds every selection
    assert 0.12 < float(selected.float().mean()) * length / (length - 2) < 0.155  # ~15 % (merged overlaps)
    assert not selected[:, 0].any() and not selected[:, -1].any()  # special tokens never
    starts = batch["word_starts"].bool()
    runs = [(row, a, b) for row in range(256) for a, b in spans_of(selected[row])]
    for row, a, b in runs:  # whole words: a run begins at a word start and ends where the next word (or [SEP]) begins
        assert starts[row, a] and (starts[row, b] or b == length - 1), (row, a, b)
    # lengths in words: Geometric(0.2) clipped at 10 has mean 3.57; merged neighbours make runs a little longer
    word_lengths = [int(starts[row, a:b].sum()) for row, a, b in runs]
    assert max(word_lengths) >= 10 and 2.5 < sum(word_lengths) / len(word_lengths) < 5.5


def test_each_span_is_masked_replaced_or_kept_as_a_whole():
    objective = SpanMasking(MASK, SPECIAL_IDS, boundary_objective=False)
    objective.bind(_backbone())
    batch = words_batch(rows=256)
    corrupted = objective.corrupt(batch, torch.Generator().manual_seed(2))
    # the same generator state gives the same selection: each token's span (adjacent spans touch, so runs of
    # selected tokens are not enough to tell them apart)
    selected, span_start = span_mask(batch["input_ids"], batch["word_starts"], special_ids=SPECIAL_IDS,
                                     generator=torch.Generator().manual_seed(2))
    assert torch.equal(selected, corrupted["span_labels"] != IGNORE_INDEX)
    kinds = {"mask": 0, "random": 0, "keep": 0}
    for row in range(256):
        for start in span_start[row][selected[row]].unique().tolist():
            span = selected[row] & (span_start[row] == start)
            new, old = corrupted["input_ids"][row][span], batch["input_ids"][row][span]
            if (new == MASK).all():
                kinds["mask"] += 1
            elif torch.equal(new, old):
                kinds["keep"] += 1
            else:
                assert not (new == MASK).any()  # never a mix of [MASK] and other tokens inside one span
                kinds["random"] += 1
    total = sum(kinds.values())
    assert total > 500 and 0.74 < kinds["mask"] / total < 0.86 and 0.05 < kinds["keep"] / total < 0.16


def _backbone():
    from models import Transformer

    return Transformer(tiny_config(max_position_embeddings=64))


def test_the_boundary_objective_predicts_from_the_tokens_around_the_span():
    torch.manual_seed(0)
    backbone = _backbone()
    objective = SpanMasking(MASK, SPECIAL_IDS)
    objective.bind(backbone)
    batch = objective.corrupt(words_batch(rows=8), torch.Generator().manual_seed(3))
    selected = batch["span_labels"] != IGNORE_INDEX
    row, t = (selected & ~torch.roll(selected, 1, 1)).nonzero()[0].tolist()  # a span's first token
    assert batch["span_left"][row, t] == t - 1 and batch["span_position"][row, t] == 1
    end = t
    while selected[row, end]:
        end += 1
    assert batch["span_right"][row, t] == end and batch["span_right"][row, end - 1] == end
    hidden = backbone(batch["input_ids"])
    output = objective(hidden, batch)
    # the boundary loss by hand: each selected token from hidden[left], hidden[right] and its position in the span
    rows, columns = selected.nonzero(as_tuple=True)
    logits = objective.boundary_head(hidden, hidden[rows, batch["span_left"][rows, columns]],
                                     hidden[rows, batch["span_right"][rows, columns]],
                                     batch["span_position"][rows, columns])
    expected = F.cross_entropy(logits, batch["span_labels"][rows, columns])
    torch.testing.assert_close(output.extra["boundary_loss"], expected, rtol=1e-5, atol=1e-5)
    assert abs(float(output.extra["mlm_loss"]) - math.log(VOCAB_SIZE)) < 1.0  # ~ln V at initialisation
    output.loss.backward()
    assert objective.boundary_head.mlp[0].weight.grad.abs().sum() > 0


def test_a_span_recipe_trains_resumes_exactly_and_loads(tmp_path):
    def fit(run: Path, steps: int, *extra: str) -> None:
        assert main(["fit", "-c", str(RECIPE), "--data.files", str(BUNDLED_CORPUS), "--data.tokenizer",
                     str(tmp_path / "tokenizer.json"), "--data.tokenizer_vocab_size", "400",
                     "--model.backbone.vocab_size", "400", "--data.cache_dir", str(tmp_path / "cache"),
                     "--trainer.default_root_dir", str(run), "--trainer.max_steps", str(steps),
                     "--model.total_steps", "6", "--model.warmup_steps", "1", "--trainer.limit_val_batches", "0",
                     "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1", *extra]) == 0

    fit(tmp_path / "straight", 6)
    fit(tmp_path / "resumed", 3)
    fit(tmp_path / "resumed", 6, "--ckpt_path", "last")
    straight, resumed = (torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
                         for name in ("straight", "resumed"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    model = pretrain.load(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    assert sorted(model.model.heads) == ["span", "span_boundary"]
    ids = torch.tensor(model.tokenize(["To be, or not to be"]))
    outputs = model.model(ids)
    assert outputs["span"].shape == outputs["span_boundary"].shape == (1, ids.shape[1], 400)


@pytest.mark.parametrize("settings", [dict(geometric_p=0.0), dict(max_span_words=0), dict(replace_probs=(1, 1, 0))])
def test_bad_settings_are_refused(settings):
    with pytest.raises(ValueError):
        SpanMasking(MASK, SPECIAL_IDS, **settings)
