"""Long sequences within memory: the tiny ModernBERT (configs/tiny/modernbert-long.yaml: 3 layers, 64 wide, a
16-token window in two of them) trained by `pretrain fit` on WikiText-2 at T = 1,024, 4,096 and 8,192 (batch 2),
three ways: dense masks (one boolean T x T mask per batch for the global layers and one for the local ones),
block masks (`attention_masks: blocks`: nothing T x T), and block masks with activation checkpointing. Each run is
a fresh process: its peak resident memory is its own; the step time is the median of the logged tokens/s over its
steps after the first two.

    python benchmarks/long_context.py                        # the table in the README (about 10 minutes)
    python benchmarks/long_context.py --lengths 1024 --steps 4

Keep the machine quiet while it runs (the step times).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
CORPUS = ROOT / ".." / "shared" / "data" / "wikitext-2" / "wiki.train.tokens"
MODES = {"dense": ("dense", "none"), "blocks": ("blocks", "none"), "blocks+ckpt": ("blocks", "blocks")}


def run(mode: str, length: int, steps: int, out: Path, corpus: Path) -> dict:
    """One `pretrain fit` in this process: -> peak resident MiB (on a GPU: peak allocated GPU memory) and seconds
    per step."""
    import torch
    from objectives_compared import logged  # a run's CSV log (its latest version)

    from pretrain.cli import main

    masks, checkpointing = MODES[mode]
    root = out / f"{mode}-{length}"
    shutil.rmtree(root, ignore_errors=True)  # a fresh run (the tokenizer and examples caches are kept)
    code = main(["fit", "-c", str(ROOT / "configs" / "tiny" / "modernbert-long.yaml"),
                 "--data.files", json.dumps([str(corpus)]), "--data.tokenizer", str(out / "tokenizer.json"),
                 "--data.max_length", str(length), "--data.cache_dir", str(out / "cache"),
                 "--model.backbone.attention_masks", masks,
                 "--model.backbone.activation_checkpointing", checkpointing,
                 "--trainer.max_steps", str(steps), "--trainer.log_every_n_steps", "1",
                 "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
                 "--trainer.default_root_dir", str(root), "--checkpoint.every_n_train_steps", "1000",
                 "--throughput.window", "1", "--model.warmup_steps", "1"])
    if code != 0:
        raise SystemExit(f"{mode} at {length} failed")
    rows = logged(root)
    rates = [float(r["train/tokens_per_sec"]) for r in rows if r.get("train/tokens_per_sec")][2:]
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_mib": peak / 2**20, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "seconds_per_step": 2 * length / statistics.median(rates), "steps": len(rates)}


def step_memory(mode: str, length: int, out: Path) -> dict:
    """The training step's own memory, in this process: the recipe's module built (its tokenizer from the fit
    runs), then one forward, backward and AdamW step on a batch of 2 x `length` tokens in documents of 1,500; ->
    the peak resident MiB above the built model's (the process itself, PyTorch and the weights, left out)."""
    import torch
    import yaml

    import objectives
    from models import TransformerConfig
    from pretrain.training.module import PretrainingModule

    masks, checkpointing = MODES[mode]
    model = yaml.safe_load((ROOT / "configs" / "tiny" / "modernbert-long.yaml").read_text())["model"]
    config = TransformerConfig(**(model["backbone"] | {"attention_masks": masks,
                                                       "activation_checkpointing": checkpointing}))
    parts = [getattr(objectives, entry["class_path"].split(".")[-1])(**entry.get("init_args", {}))
             for entry in model["objectives"]]
    module = PretrainingModule(config, parts, tokenizer=str(out / "tokenizer.json")).train()
    optimizer = torch.optim.AdamW(module.parameters())
    generator = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(5, config.vocab_size, (2, length), generator=generator),
             "document_ids": torch.arange(2 * length).view(2, length) // 1500}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loss, _ = module(batch, generator)
    loss.backward()
    optimizer.step()
    return {"step_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)  # (the child process: mode, length)
    parser.add_argument("--measure-step", nargs=2, help=argparse.SUPPRESS)  # (the same, the bare step)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="long_context_"))
    if args.measure:
        print("RESULT " + json.dumps(run(args.measure[0], int(args.measure[1]), args.steps, out,
                                                  args.corpus)))
        return
    if args.measure_step:
        print("RESULT " + json.dumps(step_memory(args.measure_step[0], int(args.measure_step[1]), out)))
        return
    print(f"{'T':>6}{'mode':>13}{'peak MiB':>10}{'vs dense':>10}{'step MiB':>10}{'vs dense':>10}{'s/step':>8}\n"
          "(peak: the fit's whole process, resident; on a GPU, the GPU's allocated memory. step: one bare training "
          "step's own, above the built model, CPU only)")
    results = {}
    for length in args.lengths:
        for mode in args.modes:
            result = {}
            for option in ("--measure", "--measure-step"):
                if option == "--measure-step" and result.get("device", "cpu") != "cpu":
                    continue  # (resident memory says nothing of a GPU's)
                child = subprocess.run([sys.executable, __file__, option, mode, str(length), "--steps",
                                        str(args.steps), "--out", str(out), "--corpus", str(args.corpus)],
                                       capture_output=True, text=True)
                lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
                if child.returncode != 0 or not lines:
                    print(f"{length:>6}{mode:>13}  {option} failed: {child.stderr.strip().splitlines()[-1:]}")
                    break
                result |= json.loads(lines[-1].removeprefix("RESULT "))
            if "seconds_per_step" not in result:
                continue
            results[length, mode] = result
            dense = results.get((length, "dense"), {})
            cells = ""
            for key in ("peak_mib", "step_mib"):
                ratio = f"{result[key] / dense[key]:.2f}x" if key in result and key in dense else "-"
                cells += (f"{result[key]:>10.0f}" if key in result else f"{'-':>10}") + f"{ratio:>10}"
            print(f"{length:>6}{mode:>13}{cells}{result['seconds_per_step']:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
