"""Training parity with Hugging Face over whole runs: for BERT (MLM + NSP), ALBERT (MLM + SOP, swaps on), ELECTRA
(generator + discriminator), RoBERTa (MLM) and GPT-2 (CLM), our training path and Hugging Face's model classes start
from the same weights (ours exported with `models.to_hf`), see the same batches with the same corruption (ours: the
masks, swaps and sampled replacements drawn from the same seeded generators), and train with AdamW (the same
decay groups: none on biases and norms), the same warm-up/linear-decay schedule and gradient clipping at 1.0, in
fp32 with dropout off. Their per-step losses must agree to 1e-5 (relative) over the first 20 steps and to 1e-3
over 200 (float32 sums in another order drift slowly); the final weights are compared the same way.

    python benchmarks/training_parity.py                    # 200 steps per family (about 5 minutes on 2 cores)
    python benchmarks/training_parity.py --steps 20 --families bert gpt2

Our side is `PretrainingModule` trained by a Lightning `Trainer` (its corruption, optimizer, schedule, clipping and
non-finite guard, as `pretrain fit` runs it); Hugging Face's side is a plain PyTorch loop over `BertForPreTraining`,
`AlbertForPreTraining`, `ElectraForMaskedLM` + `ElectraForPreTraining` (embeddings shared as Google's ELECTRA shares
them), `RobertaForMaskedLM` and `GPT2LMHeadModel`, with `torch.optim.AdamW` over the Hugging Face Trainer's decay
groups (`get_decay_parameter_names`), `get_linear_schedule_with_warmup` and `clip_grad_norm_`. The batches come from
the bundled sample corpus (a 2,000-token WordPiece tokenizer trained on it) with documents not separated (Hugging
Face's classes have no block-diagonal attention). Writes benchmarks/results/training_parity.json (full runs).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
import transformers
from torch import Tensor, nn

from models import ModelWithHeads, TransformerConfig, to_hf
from models.hf import ROBERTA_OFFSET
from objectives import CausalLM, MaskedLM, NextSentencePrediction, ReplacedTokenDetection, SentenceOrderPrediction
from objectives.base import Batch, Objective, corrupt_batch
from objectives.masking import IGNORE_INDEX, gather_at
from pretrain.data.datamodule import PretrainingDataModule
from pretrain.training.module import PretrainingModule

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "pretrain" / "sample" / "tiny_shakespeare.txt"
TINY = dict(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, max_position_embeddings=64,
            dropout=0.0, attention_dropout=0.0)


@dataclass(frozen=True)
class Family:
    objectives: Callable[[], list[Objective]]
    layout: str  # "pairs" (pair_task below) or "stream"
    backbone: dict  # fields of TransformerConfig besides TINY and the vocabulary
    pair_task: str = "nsp"
    hf_family: str | None = None  # the Hugging Face family to export to, where the config alone does not say


FAMILIES = {
    "bert": Family(lambda: [MaskedLM(), NextSentencePrediction()], "pairs", {}),
    "albert": Family(lambda: [MaskedLM(), SentenceOrderPrediction()], "pairs",
                     dict(embedding_size=32, sharing="all", activation="gelu_tanh"), pair_task="sop"),
    "electra": Family(lambda: [ReplacedTokenDetection(generator_size=0.25)], "stream", dict(embedding_size=32)),
    "roberta": Family(lambda: [MaskedLM()], "stream", dict(type_vocab_size=1, layer_norm_eps=1e-5),
                      hf_family="roberta"),
    "gpt2": Family(lambda: [CausalLM()], "stream",
                   dict(causal=True, norm_position="pre", type_vocab_size=0, activation="gelu_tanh",
                        layer_norm_eps=1e-5, scaled_residual_init=True)),
}


@dataclass(frozen=True)
class Settings:
    steps: int = 200
    learning_rate: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    clip: float = 1.0
    batch_size: int = 8
    max_length: int = 64
    seed: int = 0


def make_batches(family: Family, settings: Settings, workdir: Path) -> tuple[list[Batch], str]:
    """`settings.steps` training batches of the family's layout (epochs repeat if the corpus runs out), and the
    tokenizer's path."""
    tokenizer = workdir / "tokenizer" / "tokenizer.json"
    data = PretrainingDataModule(
        [str(CORPUS)], str(tokenizer), layout=family.layout, max_length=settings.max_length,
        batch_size=settings.batch_size, pair_task=family.pair_task, cls_first=family.backbone.get("causal") is not True,
        separate_documents=False, validation_fraction=0.0, cache_dir=str(workdir / "cache"),
        train_tokenizer="wordpiece", tokenizer_vocab_size=2000, seed=settings.seed)
    data.setup("fit")
    batches: list[Batch] = []
    while len(batches) < settings.steps:
        batches += [batch for batch, _ in zip(data.train_dataloader(), range(settings.steps - len(batches)),
                                              strict=False)]
    return batches, str(tokenizer)


class ListOfBatches(torch.utils.data.Dataset):
    def __init__(self, batches: list[Batch]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> Batch:
        return self.batches[index]


class Recorder(pl.Callback):
    """Our per-step losses, and the input the backbone saw at each step (ELECTRA's sampled replacements)."""

    def __init__(self):
        self.losses: list[float] = []
        self.inputs: list[Tensor] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        pl_module.backbone.register_forward_pre_hook(lambda _, args: self.inputs.append(args[0].clone()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def build_module(name: str, tokenizer: str, settings: Settings) -> PretrainingModule:
    family = FAMILIES[name]
    from pretrain.data.tokenizer import load_tokenizer

    config = TransformerConfig(**TINY, **family.backbone, vocab_size=load_tokenizer(tokenizer).get_vocab_size())
    torch.manual_seed(settings.seed)
    return PretrainingModule(config, family.objectives(), learning_rate=settings.learning_rate,
                             weight_decay=settings.weight_decay, eps=1e-6, warmup_steps=settings.warmup_steps,
                             total_steps=settings.steps, tokenizer=tokenizer, seed=settings.seed)


def ours(module: PretrainingModule, batches: list[Batch], settings: Settings) -> Recorder:
    """Our per-step losses and backbone inputs, trained as `pretrain fit` trains (Lightning, the module's optimizer
    and schedule)."""
    recorder = Recorder()
    trainer = pl.Trainer(max_steps=settings.steps, gradient_clip_val=settings.clip, accelerator="cpu", devices=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         callbacks=[recorder])
    trainer.fit(module, torch.utils.data.DataLoader(ListOfBatches(batches), batch_size=None))
    return recorder


def hugging_face_models(module: PretrainingModule, family: str | None = None) -> list[nn.Module]:
    """The Hugging Face models holding `module`'s weights (ELECTRA: discriminator, then generator with the
    discriminator's embeddings, as Google's ELECTRA shares them)."""
    objective = module.objectives[0]
    if isinstance(objective, ReplacedTokenDetection):
        discriminator = to_hf(ModelWithHeads(module.backbone, {"rtd": objective.head}))
        generator = to_hf(ModelWithHeads(objective.generator, {"mlm": objective.generator_mlm.head}),
                          family="electra")
        generator.electra.embeddings = discriminator.electra.embeddings
        generator.generator_lm_head.weight = discriminator.electra.embeddings.word_embeddings.weight
        models = [discriminator, generator]
    else:
        models = [to_hf(ModelWithHeads(module.backbone, module.heads()), family=family)]
    for model in models:
        model.train()  # dropout is 0 in the config: train mode changes nothing else
        for embedding in model.modules():
            if isinstance(embedding, nn.Embedding):
                # Hugging Face keeps the [PAD] row out of the lookup's gradient; ours and Google's TensorFlow
                # embeddings have no such row, and ELECTRA's generator can sample [PAD] as a replacement
                embedding.padding_idx = None
    return models


def decay_groups(models: list[nn.Module], weight_decay: float) -> list[dict]:
    """The Hugging Face Trainer's groups: decay except on biases and norms (by name), each tensor once."""
    decay, no_decay, seen = [], [], set()
    for model in models:
        names = set(transformers.Trainer.get_decay_parameter_names(None, model))
        for name, parameter in model.named_parameters():
            if id(parameter) not in seen:
                seen.add(id(parameter))
                (decay if name in names else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def reference_loss(models: list[nn.Module], objectives: list[Objective], batch: Batch, generator: torch.Generator,
                   our_input: Tensor) -> tuple[Tensor, int]:
    """The step's loss computed by Hugging Face's classes on our corruption of `batch`, and for ELECTRA the number of
    replacements Hugging Face's generator drew otherwise than ours (`our_input`: what our discriminator saw)."""
    objective = objectives[0]
    inputs = {"attention_mask": batch["attention_mask"]} if "attention_mask" in batch else {}
    if isinstance(objective, ReplacedTokenDetection):
        discriminator, generator_model = models
        original = batch["input_ids"]
        masked = objective.generator_mlm.corrupt(batch, generator)
        produced = generator_model(masked["input_ids"], labels=masked["mlm_labels"], **inputs)
        # the replacements drawn as ours draws them: the same places, the same generator, its softmax
        positions = masked["mlm_labels"].ne(IGNORE_INDEX).float().topk(
            objective.generator_mlm.selected_per_row(original.shape[1]), dim=1, sorted=False).indices
        logits, labels = gather_at(produced.logits, masked["mlm_labels"], positions)
        with torch.no_grad():
            probabilities = torch.softmax(logits.float() / objective.temperature, dim=-1)
            sampled = torch.multinomial(probabilities, 1, generator=generator).view(positions.shape)
        used = labels.view(positions.shape) != IGNORE_INDEX
        corrupted = original.scatter(1, positions, torch.where(used, sampled, original.gather(1, positions)))
        # A draw that lands within float rounding of a boundary between two tokens can pick the other token (the
        # two generators' probabilities agree to about 1e-7): the discriminator then gets our draw, and it is counted.
        flips = int((corrupted != our_input).sum())
        judged = discriminator(our_input, labels=(our_input != original).long(), **inputs)
        return produced.loss + objective.discriminator_weight * judged.loss, flips
    corrupted = corrupt_batch(objectives, batch, generator)
    (model,) = models
    if isinstance(objective, CausalLM):
        labels = corrupted["input_ids"]
        if "attention_mask" in batch:
            labels = labels.masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
        return model(corrupted["input_ids"], labels=labels, **inputs).loss, 0
    if len(objectives) == 1:  # RoBERTa: positions from 2 (its padding_idx + 1), given rather than derived from ids
        positions = torch.arange(corrupted["input_ids"].shape[1]).expand_as(corrupted["input_ids"]) + ROBERTA_OFFSET
        return model(corrupted["input_ids"], labels=corrupted["mlm_labels"], position_ids=positions,
                     **inputs).loss, 0
    pair_label = {"nsp": "next_sentence_label", "sop": "sentence_order_label"}[objectives[1].name]
    return model(corrupted["input_ids"], token_type_ids=corrupted["token_type_ids"], labels=corrupted["mlm_labels"],
                 **{pair_label: corrupted[pair_label]}, **inputs).loss, 0


def reference(models: list[nn.Module], module: PretrainingModule, batches: list[Batch], settings: Settings,
              our_inputs: list[Tensor]) -> tuple[list[float], int]:
    """Hugging Face's per-step losses (a plain loop, AdamW, linear warm-up/decay, clipping) and the number of
    sampled replacements drawn otherwise than ours (ELECTRA)."""
    groups = decay_groups(models, settings.weight_decay)
    parameters = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, lr=settings.learning_rate, betas=(0.9, 0.999), eps=1e-6)
    schedule = transformers.get_linear_schedule_with_warmup(optimizer, settings.warmup_steps, settings.steps)
    losses, flips = [], 0
    for step, batch in enumerate(batches[:settings.steps]):
        generator = module.corruption_generator(torch.device("cpu"), 0, step, 0)  # the seeds ours draws from
        loss, flipped = reference_loss(models, list(module.objectives), batch, generator, our_inputs[step])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, settings.clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        flips += flipped
    return losses, flips


def weight_difference(trained: PretrainingModule, models: list[nn.Module], family: str | None = None
                      ) -> tuple[float, str]:
    """The largest relative difference between our trained weights (exported) and Hugging Face's, per tensor:
    |ours - theirs| / |theirs| (Frobenius norms). Attention key biases are left out: their gradient is zero in
    exact arithmetic (a key bias adds the same score to every key of a query, which softmax ignores), so Adam turns
    float rounding into updates of full size on either side, different on each and without effect on any output.
    Returns the largest difference and the Hugging Face name of its tensor."""
    worst, where = 0.0, ""
    for exported, model in zip(hugging_face_models(trained, family), models, strict=True):
        theirs = model.state_dict()
        for key, tensor in exported.state_dict().items():
            if not tensor.is_floating_point() or key not in theirs or key.endswith("key.bias"):
                continue
            reference = theirs[key]
            if key.endswith("attn.c_attn.bias"):  # GPT-2's fused query, key, value biases: the key third left out
                third = len(tensor) // 3
                tensor, reference = torch.cat([tensor[:third], tensor[2 * third:]]), \
                    torch.cat([reference[:third], reference[2 * third:]])
            difference = float((tensor - reference).norm() / reference.norm().clamp(min=1e-12))
            if difference > worst:
                worst, where = difference, key
    return worst, where


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def compare(name: str, settings: Settings, workdir: Path) -> dict:
    """Train both sides for `settings.steps` steps; both curves, the per-step relative differences, the weights'."""
    batches, tokenizer = make_batches(FAMILIES[name], settings, workdir)
    module = build_module(name, tokenizer, settings)
    hf_family = FAMILIES[name].hf_family
    models = hugging_face_models(copy.deepcopy(module), hf_family)  # the same initial weights, before either trains
    recorded = ours(module, batches, settings)
    their_losses, flips = reference(models, module, batches, settings, recorded.inputs)
    differences = [relative(a, b) for a, b in zip(recorded.losses, their_losses, strict=True)]
    weights, tensor = weight_difference(module, models, hf_family)
    return {"ours": recorded.losses, "hugging_face": their_losses, "relative_difference": differences,
            "max_difference_first_20": max(differences[:20]), "max_difference": max(differences),
            "final_weights_difference": weights, "final_weights_worst_tensor": tensor, "sampling_flips": flips}


def table(name: str, result: dict) -> str:
    steps = len(result["ours"])
    shown = sorted({s for s in (1, 2, 3, 5, 10, 20, 50, 100, 150, 200, steps) if s <= steps})
    lines = [f"{name}: {steps} steps", f"{'step':>6} {'ours':>12} {'hugging face':>14} {'relative diff':>14}"]
    for step in shown:
        lines.append(f"{step:>6} {result['ours'][step - 1]:12.6f} {result['hugging_face'][step - 1]:14.6f} "
                     f"{result['relative_difference'][step - 1]:14.2e}")
    lines.append(f"max relative difference: steps 1-20 {result['max_difference_first_20']:.2e}, all steps "
                 f"{result['max_difference']:.2e}; final weights {result['final_weights_difference']:.2e} "
                 f"({result['final_weights_worst_tensor']})"
                 + (f"; replacements drawn otherwise: {result['sampling_flips']}" if name == "electra" else ""))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--json", type=Path, help="where to write every curve (default: benchmarks/results/"
                                                  "training_parity.json for a full run of every family)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    settings = Settings(steps=args.steps, warmup_steps=max(1, args.steps // 10))
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.families:
            results[name] = compare(name, settings, Path(workdir))
            print(table(name, results[name]) + "\n", flush=True)
    verdicts = {name: (r["max_difference_first_20"] <= 1e-5 and r["max_difference"] <= 1e-3) for name, r in
                results.items()}
    print("within tolerance (1e-5 over steps 1-20, 1e-3 over all): "
          + ", ".join(f"{name} {'yes' if ok else 'NO'}" for name, ok in verdicts.items()))
    path = args.json or (ROOT / "benchmarks" / "results" / "training_parity.json"
                         if args.steps >= 200 and set(args.families) == set(FAMILIES) else None)
    if path is not None:
        path.write_text(json.dumps({"settings": asdict(settings), "results": results}, indent=1) + "\n")
        print(f"written: {path}")
    if not all(verdicts.values()) or any(math.isnan(r["max_difference"]) for r in results.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
