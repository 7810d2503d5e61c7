"""PretrainingModule: one backbone forward per step, logging, and every recipe overfitting a tiny batch."""

import pytest
import pytorch_lightning as pl
import torch

from objectives import CausalLM, MaskedLM, NextSentencePrediction, ReplacedTokenDetection, SentenceOrderPrediction
from pretrain.training.module import PretrainingModule
from tests.helpers import MASK, SPECIAL_IDS, pair_batch, stream_batch, tiny_config


def mlm():
    return MaskedLM(MASK, SPECIAL_IDS)


# recipe -> (objectives, data layout, backbone overrides, learning rate for the overfitting test). ELECTRA's
# discriminator wants a lower rate than MLM; ALBERT's factorized embedding needs E at least the number of distinct
# tokens to memorise random ones quickly (E=32 < 64 tokens reaches only ~75 % in 200 steps).
RECIPES = {
    "mlm": (lambda: [mlm()], "stream", {}, 2e-3),
    "nsp": (lambda: [NextSentencePrediction()], "pairs", {}, 2e-3),
    "sop": (lambda: [SentenceOrderPrediction()], "pairs", {}, 2e-3),
    "rtd": (lambda: [ReplacedTokenDetection(MASK, SPECIAL_IDS)], "stream", {}, 1e-3),
    "clm": (lambda: [CausalLM()], "stream", dict(causal=True, norm_position="pre"), 2e-3),
    "bert": (lambda: [mlm(), NextSentencePrediction()], "pairs", {}, 2e-3),
    "albert": (lambda: [mlm(), SentenceOrderPrediction()], "pairs",
               dict(hidden_size=128, intermediate_size=256, num_heads=4, embedding_size=64, sharing="all",
                    activation="gelu_tanh"), 2e-3),
    "electra": (lambda: [ReplacedTokenDetection(MASK, SPECIAL_IDS)], "stream", dict(embedding_size=32), 1e-3),
    "gpt": (lambda: [CausalLM()], "stream", dict(causal=True, norm_position="pre", activation="gelu_tanh"), 2e-3),
}


class FixedBatches(torch.utils.data.Dataset):
    """The same batch, `steps` times (already collated: the loader's batch_size is None)."""

    def __init__(self, batch, steps):
        self.batch, self.steps = batch, steps

    def __len__(self):
        return self.steps

    def __getitem__(self, index):
        return self.batch


def make_batch(layout, rows=8):
    generator = torch.Generator().manual_seed(0)
    return pair_batch(rows, 16, generator) if layout == "pairs" else stream_batch(rows, 16, generator)


def trainer(steps, **kwargs):
    return pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, **kwargs)


def test_bert_runs_one_backbone_forward_per_step():
    pl.seed_everything(0)
    objectives, layout, overrides, _ = RECIPES["bert"]
    module = PretrainingModule(tiny_config(**overrides), objectives(), learning_rate=1e-3, warmup_steps=1)
    calls = []
    module.backbone.register_forward_hook(lambda *args: calls.append(1))
    trainer(5).fit(module, torch.utils.data.DataLoader(FixedBatches(make_batch(layout), 5), batch_size=None))
    assert len(calls) == 5
    logged = module.trainer.callback_metrics
    for key in ("train/loss", "train/mlm_loss", "train/mlm_accuracy", "train/mlm_perplexity", "train/nsp_loss",
                "train/nsp_accuracy", "train/lr"):
        assert key in logged, key
    assert torch.isclose(logged["train/mlm_perplexity"], logged["train/mlm_loss"].exp())
    assert torch.isclose(logged["train/loss"], logged["train/mlm_loss"] + logged["train/nsp_loss"])


def test_validation_logs_epoch_metrics():
    pl.seed_everything(0)
    module = PretrainingModule(tiny_config(), [mlm()], learning_rate=1e-3, warmup_steps=1)
    loader = torch.utils.data.DataLoader(FixedBatches(make_batch("stream"), 3), batch_size=None)
    run = trainer(3, limit_val_batches=2, val_check_interval=3)
    run.fit(module, loader, loader)
    assert {"val/loss", "val/mlm_accuracy", "val/mlm_perplexity"} <= set(run.callback_metrics)


def test_incompatible_objectives_fail_when_the_module_is_built():
    with pytest.raises(ValueError, match="clm needs causal attention and mlm needs bidirectional"):
        PretrainingModule(tiny_config(causal=True), [CausalLM(), mlm()])


# ALBERT's MLM labels depend on whether SOP swapped the row (the swap comes first, so each label is the token at its
# position): both orders of each row are memorised, which takes about twice the steps (a label by position alone, as
# when the masks came before the swap, is learnt without reading the input).
OVERFIT_STEPS = {"albert": 400}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_overfits_a_tiny_batch(recipe):
    """The loss (a 10-step moving average: masks and samples are drawn anew every step) falls by at least 80 %
    within 200 steps (ALBERT: 400) on one fixed batch of two rows."""
    pl.seed_everything(0)
    objectives, layout, overrides, learning_rate = RECIPES[recipe]
    module = PretrainingModule(tiny_config(**overrides), objectives(), learning_rate=learning_rate, warmup_steps=10,
                               schedule="constant", weight_decay=0.0, betas=(0.9, 0.98))
    optimizer = module.configure_optimizers()["optimizer"]
    batch = make_batch(layout, rows=2)
    losses = []
    for step in range(OVERFIT_STEPS.get(recipe, 200)):
        for group in optimizer.param_groups:  # the warm-up, by hand (no trainer here)
            group["lr"] = learning_rate * min(1.0, (step + 1) / 10)
        loss, _ = module(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    best = min(sum(losses[i:i + 10]) / 10 for i in range(len(losses) - 9))
    assert best <= 0.2 * losses[0], f"{recipe}: {losses[0]:.3f} -> {best:.3f}"


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_concatenated_positions_train_through_every_objective(recipe):
    """position_combine='concat': each objective's loss is finite, and a step moves the token embeddings and the
    position embeddings (both halves of the concatenation learn)."""
    pl.seed_everything(0)
    objectives, layout, overrides, learning_rate = RECIPES[recipe]
    module = PretrainingModule(tiny_config(**overrides, position_combine="concat", position_size=16), objectives())
    embeddings = module.backbone.embeddings
    assert embeddings.word.weight.shape[1] == module.backbone.config.embedding_size - 16
    loss, _ = module(make_batch(layout))
    loss.backward()
    assert torch.isfinite(loss)
    assert embeddings.word.weight.grad.abs().sum() > 0 and embeddings.position.weight.grad.abs().sum() > 0


# --- torch.compile ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("recipe", ["bert", "albert", "electra", "gpt"])
def test_what_compile_compiles_has_no_graph_break(recipe):
    """The backbone with every objective's head and loss is one graph (static shapes, no host sync), and so is
    ELECTRA's generator: what `compile=True` compiles never falls back to Python mid-step."""
    from objectives.base import backbone_inputs, corrupt_batch

    torch._dynamo.reset()
    objectives, layout, overrides, _ = RECIPES[recipe]
    module = PretrainingModule(tiny_config(**overrides), objectives())
    batch = corrupt_batch(module.objectives, make_batch(layout), torch.Generator().manual_seed(0))

    def losses(batch):
        hidden_states = module.backbone(batch["input_ids"], **backbone_inputs(batch))
        return [objective(hidden_states, batch).loss for objective in module.objectives]

    explained = torch._dynamo.explain(losses)(batch)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    if recipe == "electra":
        generator = module.objectives[0].generator
        explained = torch._dynamo.explain(generator)(batch["input_ids"], attention_mask=batch["attention_mask"])
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()


@pytest.mark.parametrize("recipe", ["bert", "gpt"])
def test_compiled_training_matches_eager(recipe):
    """Three AdamW steps with compile=True (inductor, on CPU here) give eager's losses and weights, under the same
    state-dict keys (checkpoints do not care whether a run was compiled)."""
    torch._dynamo.reset()
    objectives, layout, overrides, _ = RECIPES[recipe]
    batch = make_batch(layout)
    runs = []
    for compile in (False, True):
        torch.manual_seed(0)
        torch._dynamo.utils.counters.clear()
        module = PretrainingModule(tiny_config(**overrides, dropout=0.0, attention_dropout=0.0), objectives(),
                                   learning_rate=1e-3, compile=compile)
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
        losses = []
        for step in range(3):
            loss, _ = module(batch, torch.Generator().manual_seed(step))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        runs.append((losses, module.state_dict()))
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert graphs == (1 + len(module.objectives) if compile else 0)  # backbone, each objective: compiled
    (eager_losses, eager_state), (compiled_losses, compiled_state) = runs
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5)
    assert eager_state.keys() == compiled_state.keys()
    # Adam divides by the gradient's own scale: where a gradient is ~0, float rounding differences between the fused
    # kernels become weight differences of ~1e-5 after 3 steps (seen: 1.05e-5); one step of lr 1e-3 in the wrong
    # direction would be 100 times larger
    assert all(torch.allclose(eager_state[k], compiled_state[k], atol=1e-4) for k in eager_state)
    assert eager_losses[-1] < eager_losses[0]  # the steps did train
    torch._dynamo.reset()


@pytest.mark.parametrize("make", [lambda: MaskedLM(), lambda: ReplacedTokenDetection()], ids=["mlm", "rtd"])
def test_a_model_vocabulary_larger_than_the_tokenizers_is_said_and_replacements_stay_in_the_tokenizers(make,
                                                                                                    tmp_path):
    from pretrain.data.tokenizer import load_tokenizer, train_tokenizer

    texts = [f"the {w} walks to the {v}." for w in ("king", "queen", "fool") for v in ("hall", "gate", "sea")]
    train_tokenizer(texts * 20, "wordpiece", 100).save(str(tmp_path / "tokenizer.json"))
    with pytest.warns(UserWarning, match=r"model's vocab_size \(500\) is larger than the tokenizer's vocabulary"):
        module = PretrainingModule(tiny_config(vocab_size=500), [make()], tokenizer=str(tmp_path / "tokenizer.json"))
    masking = module.objectives[0]
    masking = masking.generator_mlm if isinstance(masking, ReplacedTokenDetection) else masking
    size = masking.vocab_size
    assert size == load_tokenizer(tmp_path / "tokenizer.json").get_vocab_size() <= 100
    batch = {"input_ids": torch.randint(5, size, (64, 32))}
    corrupted = masking.corrupt(batch, torch.Generator().manual_seed(0))["input_ids"]
    changed = corrupted != batch["input_ids"]
    assert changed.any() and int(corrupted.max()) < size  # never an id the tokenizer does not make


def test_a_checkpoint_whose_shared_weights_differ_is_refused():
    """ELECTRA's generator shares the discriminator's embedding LayerNorm; a checkpoint written when it had its own
    holds two different tensors there: resuming would silently keep one of them, so it is refused, naming both."""
    from pretrain.errors import UserError

    module = PretrainingModule(tiny_config(embedding_size=32), [ReplacedTokenDetection(MASK, SPECIAL_IDS)])
    state = {key: value.clone() for key, value in module.state_dict().items()}
    module.on_load_checkpoint({"state_dict": state})  # shared weights equal in the checkpoint: accepted
    state["objectives.0.generator.embeddings.norm.weight"] += 1.0
    with pytest.raises(UserError, match="backbone.embeddings.norm.weight and objectives.0.generator.embeddings.norm"):
        module.on_load_checkpoint({"state_dict": state})


def test_warmup_ratio_scales_the_warm_up_with_the_budget():
    module = PretrainingModule(tiny_config(), [mlm()], warmup_steps=10_000, warmup_ratio=0.25, total_steps=40)
    assert module.schedule_steps() == (10, 40)  # warmup_steps is not used
    rates = []

    class Rates(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            rates.append(pl_module.optimizers().param_groups[0]["lr"])

    module = PretrainingModule(tiny_config(), [mlm()], learning_rate=1e-3, warmup_ratio=0.25)
    trainer(8, callbacks=[Rates()]).fit(module, torch.utils.data.DataLoader(FixedBatches(make_batch("stream"), 8),
                                                                          batch_size=None))
    assert module.schedule_steps() == (2, 8)  # no total_steps: a quarter of the trainer's 8 steps
    assert rates == pytest.approx([0.0, 5e-4, 1e-3, 1e-3 * 5 / 6, 1e-3 * 4 / 6, 1e-3 * 3 / 6, 1e-3 * 2 / 6, 1e-3 / 6])
    with pytest.raises(Exception, match="warmup_ratio must be in"):
        PretrainingModule(tiny_config(), [mlm()], warmup_ratio=1.5)
