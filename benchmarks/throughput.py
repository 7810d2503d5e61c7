"""Training throughput of our pretraining step vs the Hugging Face transformers equivalent, side by side in one run.

    python benchmarks/throughput.py                 # CPU mode: tiny widths, real vocabularies, fp32
    python benchmarks/throughput.py --mode gpu      # full sizes, bf16 autocast, fused AdamW, torch.compile

Rows: bert-base (MLM + NSP, T = 128), electra-small (RTD, T = 128), albert-base (MLM + SOP, T = 512), gpt2-small
(CLM, T = 1024); CPU mode keeps each family's vocabulary and objectives but uses 2 layers of width 128 and shorter
sequences. One step = forward, loss, backward, gradient-norm clipping at 1.0, AdamW step (fused where torch has it:
CPU and CUDA), zero_grad. Ours: `PretrainingModule` as `pretrain fit`
runs it (its corruption included in the step; the MLM output layer only at the masked positions; with --compile,
its `compile=True`: backbone, heads and losses compiled, corruption eager; and the non-finite guard, decided on the
device). Hugging Face:
BertForPreTraining, AlbertForPreTraining, GPT2LMHeadModel, and for ELECTRA a straightforward generator
(ElectraForMaskedLM, sharing the discriminator's embeddings) + discriminator (ElectraForPreTraining) loop; masks are
prepared outside its timed step (as a data collator would). Both sides: SDPA attention (Hugging Face's default),
the same config, batch and precision; on GPU torch.compile for both.

MFU = tokens/s x FLOPs per token / peak FLOP/s, with the model's FLOPs per token = 6 N + 12 L H T (PaLM appendix
B, nanoGPT), the same for both sides: N = the parameters used in matrix products once per token (all but the
embedding tables, generator + discriminator for ELECTRA) plus the tied V x E output layer times the fraction of
positions whose logits the loss needs (1 for CLM, 0.15 for MLM), L layers, H hidden size, T sequence length. The
peak is 989 TFLOP/s (bf16 dense) on an H100 or H200; on CPU it is measured as the best fp32 rate of a 2048^3 matrix
product in this process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from models import ModelWithHeads, TransformerConfig, to_hf
from models.hf import hf_config_for
from objectives import CausalLM, MaskedLM, NextSentencePrediction, ReplacedTokenDetection, SentenceOrderPrediction
from objectives.masking import mask_tokens
from objectives.rtd import generator_config
from pretrain.training.module import PretrainingModule
from pretrain.training.optim import build_optimizer, skip_if_not_finite
from pretrain.training.speed import gpu_peak, model_flops_per_token

PAD, UNK, CLS, SEP, MASK = 0, 100, 101, 102, 103
SPECIAL = [PAD, UNK, CLS, SEP, MASK]


@dataclass
class Row:
    name: str
    preset: str
    objectives: tuple[str, ...]
    seq_len: int
    gpu_batch: int
    cpu_seq_len: int
    cpu_batch: int


ROWS = [Row("bert-base", "bert-base", ("mlm", "nsp"), 128, 64, 128, 8),
        Row("electra-small", "electra-small", ("rtd",), 128, 128, 128, 8),
        Row("albert-base", "albert-base", ("mlm", "sop"), 512, 32, 256, 4),
        Row("gpt2-small", "gpt2-small", ("clm",), 1024, 16, 256, 4)]


def config_for(row: Row, mode: str) -> TransformerConfig:
    tiny = {} if mode == "gpu" else dict(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=512,
                                         embedding_size=128 if row.preset.startswith("bert") or
                                         row.preset.startswith("gpt2") else 64)
    return TransformerConfig.preset(row.preset, dropout=0.0, attention_dropout=0.0, **tiny)


def make_batch(row: Row, config: TransformerConfig, batch: int, length: int, device: torch.device) -> dict:
    ids = torch.randint(1000, config.vocab_size, (batch, length), device=device)
    out = {"input_ids": ids}  # packed full blocks: no padding, no mask (as `pretrain fit` batches them)
    if not config.causal:
        ids[:, 0] = CLS
    if "nsp" in row.objectives or "sop" in row.objectives:
        ids[:, length // 2] = SEP
        ids[:, -1] = SEP
        types = torch.zeros_like(ids)
        types[:, length // 2 + 1:] = 1
        out["token_type_ids"] = types
        out["attention_mask"] = torch.ones_like(ids)  # sentence pairs carry one
        out["next_sentence_label"] = torch.randint(0, 2, (batch,), device=device)
    return out


def ours_step(row: Row, config: TransformerConfig, batch: dict, length: int, device: torch.device, compile: bool):
    objectives = {
        "mlm": lambda: MaskedLM(MASK, SPECIAL), "nsp": NextSentencePrediction,
        "sop": SentenceOrderPrediction, "clm": CausalLM,
        "rtd": lambda: ReplacedTokenDetection(MASK, SPECIAL, generator_size=0.25 if "small" in row.preset else 1 / 3),
    }
    module = PretrainingModule(config, [objectives[name]() for name in row.objectives], compile=compile)
    module.to(device).train()
    optimizer = build_optimizer("adamw", module, 1e-4, 0.01, (0.9, 0.999), 1e-6)
    generator = torch.Generator(device=device)

    parameters = [p for p in module.parameters() if p.requires_grad]

    def step():
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            loss, _ = module(batch, generator)
        loss.backward()
        # what pretrain fit does before each step (PretrainingModule.configure_gradient_clipping, with the full
        # recipes' gradient_clip_val 1.0): the norm, clipped, and the non-finite guard decided on the device
        norm = torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        skip_if_not_finite(optimizer, parameters, ~norm.isfinite())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, model_flops_per_token(module, length)


def hf_step(row: Row, config: TransformerConfig, batch: dict, device: torch.device, compile: bool):
    fused = device.type in ("cpu", "cuda")  # as build_optimizer
    generator = torch.Generator(device=device).manual_seed(0)
    if row.preset.startswith("gpt2"):
        model = transformers.GPT2LMHeadModel(hf_config_for(config, "gpt2"))
        models, inputs = [model], {"input_ids": batch["input_ids"], "labels": batch["input_ids"]}
    elif row.preset.startswith("electra"):
        discriminator = transformers.ElectraForPreTraining(hf_config_for(config, "electra"))
        small = generator_config(config, 0.25 if "small" in row.preset else 1 / 3)
        generator_model = transformers.ElectraForMaskedLM(hf_config_for(small, "electra"))
        generator_model.electra.embeddings = discriminator.electra.embeddings  # shared, as in the paper
        generator_model.generator_lm_head.weight = discriminator.electra.embeddings.word_embeddings.weight
        models = [discriminator, generator_model]
    else:
        family = "albert" if row.preset.startswith("albert") else "bert"
        model = getattr(transformers, "AlbertForPreTraining" if family == "albert" else "BertForPreTraining")(
            hf_config_for(config, family))
        models = [model]
    for model in models:
        model.to(device).train()
    parameters = {id(p): p for model in models for p in model.parameters()}
    optimizer = torch.optim.AdamW(list(parameters.values()), lr=1e-4, weight_decay=0.01, fused=fused)
    masked_ids, labels = None, None
    if not row.preset.startswith("gpt2"):
        masked_ids, labels = mask_tokens(batch["input_ids"], mask_token_id=MASK, vocab_size=config.vocab_size,
                                         special_ids=SPECIAL, generator=generator)
    runs = [torch.compile(m) if compile else m for m in models]

    def step():
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            if row.preset.startswith("gpt2"):
                loss = runs[0](**inputs).loss
            elif row.preset.startswith("electra"):
                discriminator, generator_model = runs
                generated = generator_model(masked_ids, attention_mask=batch.get("attention_mask"), labels=labels)
                with torch.no_grad():
                    selected = labels != -100
                    probabilities = generated.logits[selected].float().softmax(-1)
                    corrupted = batch["input_ids"].clone()
                    corrupted[selected] = torch.multinomial(probabilities, 1, generator=generator).squeeze(1)
                replaced = (corrupted != batch["input_ids"]).long()
                judged = discriminator(corrupted, attention_mask=batch.get("attention_mask"), labels=replaced)
                loss = generated.loss + 50.0 * judged.loss
            else:
                order = "sentence_order_label" if row.preset.startswith("albert") else "next_sentence_label"
                loss = runs[0](masked_ids, attention_mask=batch.get("attention_mask"),
                               token_type_ids=batch["token_type_ids"], labels=labels,
                               **{order: batch["next_sentence_label"]}).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(parameters.values()), 1.0)  # as the Hugging Face Trainer does
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in parameters.values())  # (its parameter count, printed)


def same_loss(row: Row, seed: int = 1) -> tuple[float, float]:
    """(our loss, Hugging Face's) on the same weights (ours converted with `models.to_hf`), the same batch and the same
    masks (drawn by `mask_tokens` from the same seeded generator), fp32 on the CPU: the two sides time the same
    computation. ALBERT's segments are not swapped here (SOP's swap is our corruption; Hugging Face takes the label);
    for ELECTRA the generator's MLM loss is compared (the two loops draw the replacements differently)."""
    torch.manual_seed(0)
    config = config_for(row, "cpu")
    batch = make_batch(row, config, row.cpu_batch, row.cpu_seq_len, torch.device("cpu"))
    objectives = {"mlm": lambda: MaskedLM(MASK, SPECIAL), "nsp": NextSentencePrediction, "clm": CausalLM,
                  "sop": lambda: SentenceOrderPrediction(swap_prob=0.0),
                  "rtd": lambda: ReplacedTokenDetection(MASK, SPECIAL, generator_size=0.25)}
    module = PretrainingModule(config, [objectives[name]() for name in row.objectives]).eval()
    with torch.no_grad():
        loss, outputs = module(batch, torch.Generator().manual_seed(seed))
        if row.preset.startswith("gpt2"):
            theirs = to_hf(ModelWithHeads(module.backbone, module.heads())).eval()
            return float(loss), float(theirs(batch["input_ids"], labels=batch["input_ids"]).loss)
        masking = module.objectives[0].generator_mlm if row.preset.startswith("electra") else module.objectives[0]
        generator = torch.Generator().manual_seed(seed)
        if "sop" in row.objectives:  # SOP's swap draws first (objectives.base.corrupt_batch), here to swap none
            torch.rand(len(batch["input_ids"]), generator=generator)
        masked, labels = mask_tokens(batch["input_ids"], mask_token_id=MASK, vocab_size=config.vocab_size,
                                     special_ids=SPECIAL, generator=generator,
                                     replace_probs=masking.replace_probs, attention_mask=batch.get("attention_mask"))
        if row.preset.startswith("electra"):
            rtd = module.objectives[0]
            generator = to_hf(ModelWithHeads(rtd.generator, {"mlm": rtd.generator_mlm.head}), family="electra").eval()
            return float(outputs["rtd"].extra["generator_loss"]), float(generator(masked, labels=labels).loss)
        theirs = to_hf(ModelWithHeads(module.backbone, module.heads())).eval()
        order = "sentence_order_label" if row.preset.startswith("albert") else "next_sentence_label"
        pair_labels = torch.zeros_like(batch["next_sentence_label"]) if order.startswith("sentence") \
            else batch["next_sentence_label"]
        hf_loss = theirs(masked, attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"],
                         labels=labels, **{order: pair_labels}).loss
        return float(loss), float(hf_loss)


def timed(step, device: torch.device, warmup: int, steps: int) -> tuple[float, float | None]:
    """(median seconds per step over `steps` after `warmup`, peak GPU memory in GiB)."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return statistics.median(times), memory


def peak_flops(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
        value = gpu_peak(name)  # the table pretrain fit's MFU uses
        if value is not None:
            return value, f"{name}: {value / 1e12:.0f} TFLOP/s bf16 dense"
        return float("nan"), f"{name}: peak unknown"
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    best = min(_time(lambda: a @ b) for _ in range(5))
    rate = 2 * 2048**3 / best
    return rate, f"CPU, {torch.get_num_threads()} threads: measured fp32 matmul peak {rate / 1e9:.0f} GFLOP/s"


def _time(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--rows", default=",".join(r.name for r in ROWS))
    parser.add_argument("--steps", type=int, default=None, help="timed steps per side (default: cpu 6, gpu 20)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: cpu 2, gpu 10)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile both sides (default: on for gpu, off for cpu)")
    parser.add_argument("--json", type=Path, default=None, help="also write the table's rows to this JSON file")
    args = parser.parse_args()
    table: list[dict] = []
    device = torch.device("cuda" if args.mode == "gpu" else "cpu")
    compile = args.mode == "gpu" if args.compile is None else args.compile
    steps = args.steps or (20 if args.mode == "gpu" else 6)
    warmup = args.warmup or (10 if args.mode == "gpu" else 2)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    peak, peak_text = peak_flops(device)
    print(f"mode {args.mode}; {peak_text}; torch {torch.__version__}, transformers {transformers.__version__}; "
          f"compile {compile}; {'bf16 autocast' if device.type == 'cuda' else 'fp32'}; median of {steps} steps "
          f"after {warmup}")
    print("MFU = tokens/s * (6 N + 12 L H T) / peak (N: matmul parameters, output layer where the loss needs it)")
    header = f"{'model':<14}{'side':<14}{'batch x T':>11}{'GFLOP/tok':>10}{'tokens/s':>11}{'peak GiB':>9}{'MFU':>7}"
    print(header + f"{'ours / HF':>10}")
    for row in ROWS:
        if row.name not in args.rows.split(","):
            continue
        torch.manual_seed(0)
        config = config_for(row, args.mode)
        batch_size, length = (row.gpu_batch, row.seq_len) if args.mode == "gpu" else (row.cpu_batch, row.cpu_seq_len)
        batch = make_batch(row, config, batch_size, length, device)
        results, flops = {}, 0.0
        for side in ("ours", "hf"):  # ours first: its module gives the model's FLOPs per token for both
            if side == "ours":
                step, flops = ours_step(row, config, batch, length, device, compile)
            else:
                step, _ = hf_step(row, config, batch, device, compile)
            seconds, memory = timed(step, device, warmup, steps)
            tokens = batch_size * length / seconds
            results[side] = (seconds, memory, tokens, tokens * flops / peak, flops)
            del step
            if device.type == "cuda":
                torch.cuda.empty_cache()
        for side, (_, memory, tokens, mfu, flops) in results.items():
            ratio = f"{results['ours'][2] / results['hf'][2]:>9.2f}x" if side == "ours" else ""
            print(f"{row.name:<14}{'ours' if side == 'ours' else 'hugging face':<14}{f'{batch_size} x {length}':>11}"
                  f"{flops / 1e9:>10.3f}{tokens:>11,.0f}{f'{memory:.2f}' if memory is not None else '-':>9}"
                  f"{100 * mfu:>6.1f}%{ratio}", flush=True)
            table.append({"model": row.name, "side": side, "batch": batch_size, "seq_len": length,
                          "gflop_per_token": flops / 1e9, "tokens_per_sec": tokens, "peak_gib": memory, "mfu": mfu,
                          "ours_over_hf": results["ours"][2] / results["hf"][2]})
        if args.json is not None:  # after each row: a run cut short keeps what it measured
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"mode": args.mode, "peak": peak_text, "compile": compile,
                                             "rows": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
