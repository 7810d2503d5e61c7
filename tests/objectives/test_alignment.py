"""After the whole corruption chain, whatever order the objectives are listed in, every per-token label labels the
token at its position, the 80/10/10 split holds where labels are, and pair labels say what was done."""

import itertools

import pytest
import torch

from models import Transformer
from objectives import (
    IGNORE_INDEX,
    CausalLM,
    MaskedLM,
    NextSentencePrediction,
    ReplacedTokenDetection,
    SentenceOrderPrediction,
    check_combination,
)
from objectives.base import corrupt_batch
from objectives.clm import next_token_labels
from objectives.span import SpanMasking
from pretrain.training.module import PretrainingModule
from tests.helpers import MASK, SPECIAL_IDS, VOCAB_SIZE, pair_batch, stream_batch, tiny_config

TOKEN_LEVEL = {
    "mlm": lambda: MaskedLM(MASK, SPECIAL_IDS),
    "whole_word_mlm": lambda: MaskedLM(MASK, SPECIAL_IDS, whole_word=True),
    "span": lambda: SpanMasking(MASK, SPECIAL_IDS),
    "rtd": lambda: ReplacedTokenDetection(MASK, SPECIAL_IDS),
}
PAIR_LEVEL = {"nsp": NextSentencePrediction, "sop": SentenceOrderPrediction}


def combinations() -> list[tuple[str, ...]]:
    """Every combination the objectives accept together (at most one token-level corruption, at most one pair task;
    span masking needs the stream layout, the pair tasks the pairs layout), in every order; CLM alone."""
    found = [("clm",)]
    for token, pair in itertools.product([None, *TOKEN_LEVEL], [None, *PAIR_LEVEL]):
        names = tuple(n for n in (token, pair) if n)
        if names and not (token == "span" and pair):
            found += list(itertools.permutations(names))
    return found


def word_starts_of(ids: torch.Tensor) -> torch.Tensor:
    """Word starts as a function of the token alone (even ids and special tokens begin a word): after any
    rearrangement, the flags must still be this function of the tokens they sit on."""
    return (ids % 2 == 0) | (ids < len(SPECIAL_IDS))


def expected_order(batch: dict, swapped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean tokens and token types the backbone should see, built row by row from the segments: B before A
    where `swapped`, as they were elsewhere."""
    ids, types = batch["input_ids"].clone(), batch["token_type_ids"].clone()
    for row in torch.nonzero(swapped).flatten().tolist():
        length = int(batch["attention_mask"][row].sum())
        first = int(((batch["token_type_ids"][row] == 0) & (batch["attention_mask"][row] == 1)).sum())
        cls, a, sep = ids[row, :1], ids[row, 1:first - 1], ids[row, first - 1:first]
        b, last = ids[row, first:length - 1], ids[row, length - 1:length]
        ids[row, :length] = torch.cat([cls, b, sep, a, last])
        types[row, :length] = torch.cat([torch.zeros(len(b) + 2, dtype=types.dtype),
                                         torch.ones(len(a) + 1, dtype=types.dtype)])
    return ids, types


def bound_objectives(names: tuple[str, ...]) -> list:
    causal = names == ("clm",)
    backbone = Transformer(tiny_config(causal=causal, norm_position="pre" if causal else "post"))
    objectives = [CausalLM() if n == "clm" else TOKEN_LEVEL[n]() if n in TOKEN_LEVEL else PAIR_LEVEL[n]()
                  for n in names]
    check_combination(objectives, backbone.config)
    for objective in objectives:
        objective.bind(backbone)
    return objectives


def check_split(corrupted: torch.Tensor, reference: torch.Tensor, labelled: torch.Tensor,
                probabilities: tuple[float, float, float]) -> None:
    """At the labelled positions: [MASK], another token and the token itself in the proportions asked for (a random
    replacement may draw the token itself: 1 in V of the random share)."""
    count = int(labelled.sum())
    masked = (corrupted[labelled] == MASK).float().sum() / count
    kept = (corrupted[labelled] == reference[labelled]).float().sum() / count
    mask_share, random_share, keep_share = probabilities
    assert count > 1000
    assert abs(masked - mask_share) < 0.04, f"[MASK] at {masked:.3f} of the labelled positions, not {mask_share}"
    assert abs(kept - keep_share - random_share / VOCAB_SIZE) < 0.04, f"kept at {kept:.3f}, not {keep_share}"
    assert abs(1 - masked - kept - random_share) < 0.04


@pytest.mark.parametrize("names", combinations(), ids="+".join)
def test_every_label_labels_the_token_at_its_position(names):
    objectives = bound_objectives(names)
    data = torch.Generator().manual_seed(0)
    if any(n in PAIR_LEVEL for n in names):
        batch = pair_batch(1024, 32, generator=data)
    else:
        batch = stream_batch(1024, 32, generator=data)
    batch["word_starts"] = word_starts_of(batch["input_ids"])
    out = corrupt_batch(objectives, batch, torch.Generator().manual_seed(1))

    swapped = out.get("sentence_order_label", torch.zeros(len(batch["input_ids"]), dtype=torch.long)).bool()
    if "token_type_ids" in batch:
        reference, types = expected_order(batch, swapped)
        assert torch.equal(out["token_type_ids"], types)
    else:
        reference = batch["input_ids"]
    if "sop" in names:  # the pair label says what was done
        assert 0.4 < swapped.float().mean() < 0.6
    if "nsp" in names:
        assert torch.equal(out["next_sentence_label"], batch["next_sentence_label"])  # made by the data, kept
    assert torch.equal(out["word_starts"], word_starts_of(reference))  # word starts moved with their tokens
    assert torch.equal(out["attention_mask"], batch["attention_mask"])

    key = next((k for k in ("mlm_labels", "span_labels") if k in out), None)
    if key is not None:
        labels = out[key]
        labelled = labels != IGNORE_INDEX
        assert torch.equal(labels[labelled], reference[labelled])  # each label is the token at its position
        assert torch.equal(out["input_ids"][~labelled], reference[~labelled])  # and nothing else was touched
        check_split(out["input_ids"], reference, labelled, (0.8, 0.1, 0.1))
        if "whole_word_mlm" in names:  # whole words: a labelled token's continuation is labelled too
            continues = ~out["word_starts"][:, 1:] & (reference[:, :-1] >= len(SPECIAL_IDS))
            assert torch.equal(labelled[:, 1:] & continues, labelled[:, :-1] & continues)
    elif "rtd" in names:
        replaced = out["input_ids"] != reference
        assert torch.equal(out["rtd_labels"].bool(), replaced)
        assert 0.05 < replaced[batch["attention_mask"] == 1].float().mean() < 0.16
    elif "clm" in names:
        labels = next_token_labels(out)
        assert torch.equal(labels[labels != IGNORE_INDEX], reference[:, 1:][labels != IGNORE_INDEX])
    else:
        assert torch.equal(out["input_ids"], reference)


def test_the_training_module_swaps_before_it_masks_in_albert_order():
    """The recipe order of every ALBERT config (MLM listed before SOP) through `PretrainingModule.forward`: the
    labels it trains on are the tokens at their positions."""
    module = PretrainingModule(tiny_config(), [MaskedLM(MASK, SPECIAL_IDS), SentenceOrderPrediction()])
    seen = {}
    module.backbone.register_forward_pre_hook(lambda _, args, kwargs: seen.update(kwargs, input_ids=args[0]),
                                              with_kwargs=True)
    batch = pair_batch(1024, 32, generator=torch.Generator().manual_seed(0))
    original = module.objectives[0].forward
    module.objectives[0].forward = lambda hidden, corrupted: seen.update(corrupted=corrupted) or original(
        hidden, corrupted)
    module(batch, torch.Generator().manual_seed(1))
    corrupted = seen["corrupted"]
    reference, types = expected_order(batch, corrupted["sentence_order_label"].bool())
    labelled = corrupted["mlm_labels"] != IGNORE_INDEX
    assert torch.equal(seen["input_ids"], corrupted["input_ids"]) and torch.equal(seen["token_type_ids"], types)
    assert torch.equal(corrupted["mlm_labels"][labelled], reference[labelled])
    check_split(corrupted["input_ids"], reference, labelled, (0.8, 0.1, 0.1))


def test_a_swap_after_token_labels_is_refused():
    mlm, sop = bound_objectives(("mlm", "sop"))
    masked = mlm.corrupt(pair_batch(4, 16), torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="mlm_labels"):
        sop.corrupt(masked)
