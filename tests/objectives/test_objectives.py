"""Each objective's contract: corruption, head placement, loss, labels."""

import math

import pytest
import torch
import torch.nn.functional as F

from models import Transformer
from objectives import (
    IGNORE_INDEX,
    CausalLM,
    MaskedLM,
    NextSentencePrediction,
    ReplacedTokenDetection,
    SentenceOrderPrediction,
    check_combination,
    swap_segments,
)
from objectives.base import mean_cosine_similarity
from tests.helpers import CLS, MASK, PAD, SEP, SPECIAL_IDS, VOCAB_SIZE, pair_batch, stream_batch, tiny_config


def bound(objective, **config_overrides):
    backbone = Transformer(tiny_config(**config_overrides))
    objective.bind(backbone)
    return backbone, objective


# --- MLM -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings, rows", [
    ({}, 4 * 5),  # the static count: ceil(0.3 x 16) places per row
    ({"num_masked": 3}, 4 * 3),
    ({"whole_word": True}, None),  # a varying count: exactly the selected positions
])
def test_mlm_output_layer_sees_only_selected_positions_and_loss_matches_dense(settings, rows):
    backbone, mlm = bound(MaskedLM(MASK, SPECIAL_IDS, mask_prob=0.3, **settings))
    batch = stream_batch(4, 16)
    batch["word_starts"] = torch.rand(4, 16, generator=torch.Generator().manual_seed(1)) < 0.5
    batch = mlm.corrupt(batch, generator=torch.Generator().manual_seed(0))
    hidden = backbone(batch["input_ids"], attention_mask=batch["attention_mask"])
    seen = []
    mlm.head.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    output = mlm(hidden, batch)
    selected = (batch["mlm_labels"] != IGNORE_INDEX).sum().item()
    assert seen == [(rows or selected, VOCAB_SIZE)]
    dense_logits = mlm.head(hidden)  # (B, T, V) everywhere: the reference
    dense = F.cross_entropy(dense_logits.flatten(0, 1), batch["mlm_labels"].flatten(), ignore_index=IGNORE_INDEX)
    assert torch.allclose(output.loss, dense, atol=1e-6)
    assert output.counted.sum().item() == selected


@pytest.mark.parametrize("make", [
    lambda: MaskedLM(MASK, SPECIAL_IDS), lambda: MaskedLM(MASK, SPECIAL_IDS, num_masked=2),
    lambda: ReplacedTokenDetection(MASK, SPECIAL_IDS),
])
def test_a_batch_with_nothing_selected_gives_zero_loss_not_nan(make):
    backbone, objective = bound(make())
    batch = {"input_ids": torch.tensor([[CLS, SEP, PAD, PAD]]), "attention_mask": torch.tensor([[1, 1, 0, 0]])}
    batch = objective.corrupt(batch)
    output = objective(backbone(batch["input_ids"], attention_mask=batch["attention_mask"]), batch)
    if objective.name == "mlm":
        assert output.loss.item() == 0.0
    assert torch.isfinite(output.loss) and all(torch.isfinite(v) for v in output.extra.values())
    output.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in backbone.parameters() if p.grad is not None)


def test_mlm_whole_word_needs_word_starts():
    _, mlm = bound(MaskedLM(MASK, SPECIAL_IDS, whole_word=True))
    with pytest.raises(ValueError, match="word_starts"):
        mlm.corrupt(stream_batch())


# --- NSP and SOP -----------------------------------------------------------------------------------------------

def test_sop_swaps_half_of_10k_pairs():
    _, sop = bound(SentenceOrderPrediction())
    batch = pair_batch(10_000, 16, generator=torch.Generator().manual_seed(0))
    corrupted = sop.corrupt(batch, generator=torch.Generator().manual_seed(1))
    labels = corrupted["sentence_order_label"]
    assert abs(labels.float().mean().item() - 0.5) < 0.02
    unchanged = labels == 0
    assert torch.equal(corrupted["input_ids"][unchanged], batch["input_ids"][unchanged])
    assert not torch.equal(corrupted["input_ids"][~unchanged], batch["input_ids"][~unchanged])


def test_swapped_pair_is_exactly_b_then_a_with_segment_ids():
    a, b = [10, 11, 12], [20, 21]
    ids = torch.tensor([[CLS, *a, SEP, *b, SEP, PAD, PAD]])
    types = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 0, 0]])
    new_ids, new_types = swap_segments(ids, types, (ids != PAD).long(), torch.tensor([True]))
    assert new_ids.tolist() == [[CLS, *b, SEP, *a, SEP, PAD, PAD]]
    assert new_types.tolist() == [[0, 0, 0, 0, 1, 1, 1, 1, 0, 0]]
    kept_ids, kept_types = swap_segments(ids, types, (ids != PAD).long(), torch.tensor([False]))
    assert torch.equal(kept_ids, ids) and torch.equal(kept_types, types)


def test_swapping_twice_restores_random_pairs():
    batch = pair_batch(200, 20, generator=torch.Generator().manual_seed(2))
    swap = torch.ones(200, dtype=torch.bool)
    once = swap_segments(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], swap)
    twice = swap_segments(*once, batch["attention_mask"], swap)
    assert torch.equal(twice[0], batch["input_ids"]) and torch.equal(twice[1], batch["token_type_ids"])


@pytest.mark.parametrize("objective_class, label_key", [(NextSentencePrediction, "next_sentence_label"),
                                                       (SentenceOrderPrediction, "sentence_order_label")])
def test_pair_heads_classify_cls(objective_class, label_key):
    backbone, objective = bound(objective_class())
    batch = objective.corrupt(pair_batch(8, 16))
    hidden = backbone(batch["input_ids"], attention_mask=batch["attention_mask"],
                      token_type_ids=batch["token_type_ids"])
    output = objective(hidden, batch)
    logits = objective.head(hidden)
    assert logits.shape == (8, 2)
    assert torch.allclose(output.loss, F.cross_entropy(logits, batch[label_key]))
    assert output.loss.item() == pytest.approx(math.log(2), abs=0.2)  # binary: ln 2 at initialisation


# --- RTD -------------------------------------------------------------------------------------------------------

def rtd_step(**kwargs):
    backbone, rtd = bound(ReplacedTokenDetection(MASK, SPECIAL_IDS, mask_prob=0.3, **kwargs))
    original = stream_batch(8, 16, generator=torch.Generator().manual_seed(0))
    batch = rtd.corrupt(original, generator=torch.Generator().manual_seed(1))
    hidden = backbone(batch["input_ids"], attention_mask=batch["attention_mask"])
    return backbone, rtd, original, batch, rtd(hidden, batch)


def test_rtd_labels_are_exactly_the_replaced_positions():
    _, _, original, batch, _ = rtd_step()
    replaced = batch["input_ids"] != original["input_ids"]
    assert torch.equal(batch["rtd_labels"].bool(), replaced)
    assert replaced.any() and not replaced.all()
    assert not (replaced & (original["attention_mask"] == 0)).any()


def test_rtd_shares_embeddings_and_sizes_the_generator():
    backbone, rtd, *_ = rtd_step(generator_size=0.5)
    for name in ("word", "position", "token_type", "norm"):  # Google's whole embeddings scope, LayerNorm included
        assert getattr(rtd.generator.embeddings, name).weight is getattr(backbone.embeddings, name).weight
    assert rtd.generator_mlm.head.weight is backbone.embeddings.word.weight
    assert rtd.generator.config.hidden_size == 32 and rtd.generator.config.num_heads == 1
    assert rtd.generator.config.intermediate_size == 64 and rtd.generator.config.num_layers == 2


def test_no_discriminator_gradient_reaches_the_generator():
    backbone, rtd, _, batch, output = rtd_step()
    output.extra["discriminator_loss"].backward()
    generator_only = [p for n, p in rtd.generator.named_parameters() if not n.startswith("embeddings.")
                      or n.startswith("embeddings.projection")]
    assert generator_only and all(p.grad is None for p in generator_only)
    assert all(p.grad is None for p in rtd.generator_mlm.head.transform.parameters())
    assert backbone.attention_layers[0].qkv.weight.grad is not None  # the discriminator did learn


def test_rtd_loss_is_generator_plus_lambda_discriminator():
    _, rtd, _, batch, output = rtd_step(discriminator_weight=50.0)
    extra = output.extra
    assert torch.allclose(output.loss, extra["generator_loss"] + 50.0 * extra["discriminator_loss"])
    assert extra["generator_loss"].item() == pytest.approx(math.log(VOCAB_SIZE), rel=0.1)
    assert extra["discriminator_loss"].item() == pytest.approx(math.log(2), abs=0.2)


def test_rtd_discriminator_loss_covers_every_real_token():
    backbone, rtd, _, batch, output = rtd_step()
    hidden = backbone(batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = rtd.head(hidden)
    real = batch["attention_mask"].bool()
    reference = F.binary_cross_entropy_with_logits(logits[real], batch["rtd_labels"][real])
    assert torch.allclose(output.extra["discriminator_loss"], reference, atol=1e-6)


def test_rtd_discriminator_learns_to_beat_its_base_rate():
    """Every row repeats one token: a replaced token differs from the rest of its row, so a discriminator that sees
    the corrupted input learns to find it. Saying "original" everywhere scores the entropy of the replaced fraction;
    the learned one must score far below it (it would not if it saw the wrong input or the wrong labels), and find
    most replaced tokens (the aggregate accuracy alone would hide a constant answer).
    With both head layers drawn from N(0, 0.02) (Hugging Face's ElectraForPreTraining) the two small layers form a
    plateau (the gradient of each scaled by the other) on which this discriminator says "original" everywhere for
    all 300 steps, its token states collapsed (mean cosine 0.99); Google's Glorot-uniform output layer (ours) leaves
    the plateau after about 150."""
    torch.manual_seed(0)
    backbone, rtd = bound(ReplacedTokenDetection(MASK, SPECIAL_IDS))
    optimizer = torch.optim.AdamW(torch.nn.ModuleList([backbone, rtd]).parameters(), lr=1e-3)  # shared ones once
    data = torch.Generator().manual_seed(0)
    losses, base_rates, found = [], [], []
    for step in range(300):
        input_ids = torch.randint(len(SPECIAL_IDS), VOCAB_SIZE, (16, 1), generator=data).expand(16, 16)
        batch = rtd.corrupt({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)},
                            generator=torch.Generator().manual_seed(step))
        output = rtd(backbone(batch["input_ids"], attention_mask=batch["attention_mask"]), batch)
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        p = output.extra["replaced_fraction"].item()
        losses.append(output.extra["discriminator_loss"].item())
        base_rates.append(-(p * math.log(p) + (1 - p) * math.log(1 - p)) if 0 < p < 1 else 0.0)
        found.append(output.extra["replaced_accuracy"].item())
    late = slice(-30, None)
    assert sum(base_rates[late]) / 30 > 0.2  # the generator still replaces enough tokens for the test to mean much
    assert sum(losses[late]) < 0.5 * sum(base_rates[late])
    assert sum(found[late]) / 30 > 0.5


def test_rtd_logs_each_sides_accuracy_and_the_similarity_of_token_states():
    _, _, _, batch, output = rtd_step()
    real = batch["attention_mask"].bool()
    replaced, original = batch["rtd_labels"].bool() & real, ~batch["rtd_labels"].bool() & real
    correct = output.correct.view(replaced.shape).bool()
    assert output.extra["replaced_accuracy"].item() == pytest.approx(correct[replaced].float().mean().item())
    assert output.extra["original_accuracy"].item() == pytest.approx(correct[original].float().mean().item())
    states = torch.randn(2, 5, 8)
    weights = torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    units = F.normalize(states[weights.bool()], dim=-1)
    pairs = units @ units.T
    expected = (pairs.sum() - pairs.diagonal().sum()) / (len(units) * (len(units) - 1))
    assert mean_cosine_similarity(states, weights).item() == pytest.approx(expected.item(), abs=1e-6)
    assert mean_cosine_similarity(torch.ones(2, 5, 8), weights).item() == pytest.approx(1.0)


# --- CLM -------------------------------------------------------------------------------------------------------

def test_clm_future_tokens_never_change_earlier_loss_terms():
    backbone, clm = bound(CausalLM(), causal=True, norm_position="pre")
    ids = torch.randint(5, VOCAB_SIZE, (2, 16))
    changed = ids.clone()
    changed[:, 10:] = torch.randint(5, VOCAB_SIZE, (2, 6))

    def per_position(tokens):
        logits = clm.head(backbone(tokens))[:, :-1]
        return F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")  # (B, T-1)

    a, b = per_position(ids), per_position(changed)
    assert torch.equal(a[:, :9], b[:, :9])  # terms predicting tokens 1..9 only see tokens 0..8
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_clm_initial_loss_is_near_ln_vocab():
    backbone, clm = bound(CausalLM(), causal=True, norm_position="pre")
    batch = stream_batch(8, 16)
    output = clm(backbone(batch["input_ids"], attention_mask=batch["attention_mask"]), batch)
    assert abs(output.loss.item() / math.log(VOCAB_SIZE) - 1) < 0.1


def test_clm_ignores_padding_and_document_boundaries():
    backbone, clm = bound(CausalLM(), causal=True, norm_position="pre")
    ids = torch.randint(5, VOCAB_SIZE, (1, 10))
    batch = {"input_ids": ids, "attention_mask": torch.tensor([[1] * 8 + [0] * 2]),
             "document_ids": torch.tensor([[0] * 5 + [1] * 3 + [2] * 2])}
    hidden = backbone(ids, attention_mask=batch["attention_mask"], document_ids=batch["document_ids"])
    output = clm(hidden, batch)
    # targets: positions 1..4 (doc 0) and 6..7 (doc 1); 5 starts a new document, 8 and 9 are padding
    assert output.counted.tolist() == [1, 1, 1, 1, 0, 1, 1, 0, 0]
    logits = clm.head(hidden)[0, :-1]
    keep = output.counted.bool()
    assert torch.allclose(output.loss, F.cross_entropy(logits[keep], ids[0, 1:][keep]))


# --- Combinations ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("objectives, causal, message", [
    ([CausalLM(), MaskedLM(MASK, SPECIAL_IDS)], True, "clm needs causal attention and mlm needs bidirectional"),
    ([MaskedLM(MASK, SPECIAL_IDS), ReplacedTokenDetection(MASK, SPECIAL_IDS)], False,
     "mlm and rtd both rewrite the input tokens"),
    ([NextSentencePrediction(), SentenceOrderPrediction()], False, "nsp and sop are both sentence-pair"),
    ([CausalLM()], False, "clm needs a causal backbone"),
    ([MaskedLM(MASK, SPECIAL_IDS)], True, "mlm needs a bidirectional backbone"),
    ([MaskedLM(MASK, SPECIAL_IDS), MaskedLM(MASK, SPECIAL_IDS)], False, "mlm is given twice"),
    ([], False, "no objective given"),
])
def test_incompatible_combinations_fail_with_both_names(objectives, causal, message):
    with pytest.raises(ValueError, match=message):
        check_combination(objectives, tiny_config(causal=causal))


def test_valid_combinations_pass():
    check_combination([MaskedLM(MASK, SPECIAL_IDS), NextSentencePrediction()], tiny_config())
    check_combination([MaskedLM(MASK, SPECIAL_IDS), SentenceOrderPrediction()], tiny_config())
    check_combination([ReplacedTokenDetection(MASK, SPECIAL_IDS)], tiny_config())
    check_combination([CausalLM()], tiny_config(causal=True))


@pytest.mark.parametrize("objectives, data, problems", [
    ([MaskedLM(MASK, SPECIAL_IDS), NextSentencePrediction()], {"layout": "stream", "pair_task": "nsp"},
     ["nsp needs data.layout 'pairs' but the data module has 'stream'"]),
    ([SentenceOrderPrediction()], {"layout": "pairs", "pair_task": "nsp"},
     ["sop needs data.pair_task 'sop' but the data module has 'nsp'"]),
    ([MaskedLM(MASK, SPECIAL_IDS, whole_word=True)], {"layout": "stream", "word_starts": False},
     ["mlm needs data.word_starts True but the data module has False"]),
    ([MaskedLM(MASK, SPECIAL_IDS), NextSentencePrediction()], {"layout": "pairs", "pair_task": "nsp"}, []),
    ([CausalLM()], {"layout": "stream"}, []),
])
def test_objectives_name_the_data_settings_they_need(objectives, data, problems):
    from objectives.base import data_mismatches

    found = data_mismatches(objectives, data)
    assert [line.split(":")[0] for line in found] == problems


def test_mlm_training_matches_hugging_face_step_for_step():
    """Same weights, same masks, same optimiser: our MLM loss curve equals BertForMaskedLM's."""
    transformers = pytest.importorskip("transformers", reason="transformers is in the dev extras")
    from models import from_hf
    from models.hf import hf_config_for

    hf = transformers.BertForMaskedLM(hf_config_for(tiny_config(), "bert"))
    ours = from_hf(hf)
    mlm = MaskedLM(MASK, SPECIAL_IDS)
    mlm.bind(ours.backbone)
    mlm.head = ours.heads["mlm"]  # the converted head, so both sides start from the same weights
    batch = stream_batch(4, 16, generator=torch.Generator().manual_seed(0))
    curves = []
    for side in ("hf", "ours"):
        model = hf if side == "hf" else ours
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        generator, curve = torch.Generator().manual_seed(1), []
        for _ in range(10):
            corrupted = mlm.corrupt(batch, generator=generator)
            if side == "hf":
                loss = hf(corrupted["input_ids"], attention_mask=batch["attention_mask"],
                          labels=corrupted["mlm_labels"]).loss
            else:
                hidden = ours.backbone(corrupted["input_ids"], attention_mask=batch["attention_mask"])
                loss = mlm(hidden, corrupted).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            curve.append(loss.item())
        curves.append(curve)
    assert curves[0] == pytest.approx(curves[1], rel=1e-4)
    assert curves[1][-1] < curves[1][0]


def test_rtd_low_temperature_samples_the_generators_argmax():
    backbone, rtd = bound(ReplacedTokenDetection(MASK, SPECIAL_IDS, mask_prob=0.5, temperature=1e-4))
    batch = stream_batch(4, 16, generator=torch.Generator().manual_seed(0))
    corrupted = rtd.corrupt(batch, generator=torch.Generator().manual_seed(1))
    # replay the same masking to see the generator's logits at the selected positions
    from objectives import mask_tokens

    masked, labels = mask_tokens(batch["input_ids"], mask_token_id=MASK, vocab_size=VOCAB_SIZE,
                                 special_ids=SPECIAL_IDS, mask_prob=0.5, generator=torch.Generator().manual_seed(1),
                                 replace_probs=(0.85, 0.0, 0.15), attention_mask=batch["attention_mask"])
    hidden = rtd.generator(masked, attention_mask=batch["attention_mask"])
    selected = labels != IGNORE_INDEX
    argmax = rtd.generator_mlm.head(hidden[selected]).argmax(-1)
    assert torch.equal(corrupted["input_ids"][selected], argmax)
    # argmax samples: the generator is right exactly where nothing was replaced (a row with padding has fewer
    # selected tokens than the static count: the accuracy is over the selected ones only)
    replaced = corrupted["rtd_labels"].sum() / selected.sum()
    assert selected.sum(1).min() < selected.sum(1).max()
    assert corrupted["rtd_generator_correct"].item() == pytest.approx(1 - replaced.item())


def test_masking_ids_come_from_the_tokenizer_unless_given():
    from objectives import TokenIds

    backbone = Transformer(tiny_config())
    mlm = MaskedLM()
    mlm.bind(backbone, TokenIds(mask=MASK, special=SPECIAL_IDS))
    assert mlm.mask_token_id == MASK and mlm.special_ids == SPECIAL_IDS
    own = MaskedLM(mask_token_id=7, special_ids=[0, 7])
    own.bind(backbone, TokenIds(mask=MASK, special=SPECIAL_IDS))
    assert own.mask_token_id == 7 and own.special_ids == [0, 7]
    with pytest.raises(ValueError, match="ReplacedTokenDetection needs mask_token_id and special_ids"):
        ReplacedTokenDetection().bind(backbone)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_label_cross_entropy_equals_cross_entropy_and_accuracy(dtype):
    from objectives.base import accuracy_of, label_cross_entropy

    def token_cross_entropy(logits, labels):  # the plain reference: mean over the labels that count
        return F.cross_entropy(logits.float(), labels, ignore_index=-100)

    logits = torch.randn(60, 41).to(dtype).requires_grad_()
    labels = torch.randint(0, 41, (60,))
    labels[::5] = -100
    loss, correct = label_cross_entropy(logits, labels)
    (2.5 * loss).backward()
    ours = logits.grad.clone()
    logits.grad = None
    expected = token_cross_entropy(logits, labels)
    (2.5 * expected).backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.float(), logits.grad.float(), rtol=1e-4, atol=1e-6)
    assert torch.equal(correct, accuracy_of(logits, labels) * (labels != -100))
    nothing, _ = label_cross_entropy(logits, torch.full((60,), -100))
    assert nothing.item() == 0.0
    fresh, reference = (logits.detach().float().clone().requires_grad_() for _ in range(2))
    overwritten, _ = label_cross_entropy(fresh * 1.0, labels, overwrite_logits=True)  # a non-leaf, as in the heads
    overwritten.backward()
    expected = token_cross_entropy(reference, labels)
    expected.backward()
    torch.testing.assert_close(overwritten, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fresh.grad, reference.grad, rtol=1e-4, atol=1e-7)
