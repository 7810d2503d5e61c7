"""Forward + backward time of our backbone vs Hugging Face transformers, same weights, same process.

    python benchmarks/backbone_cpu.py                      # bert-base, batch 8 x 128, as in the foundation issue
    python benchmarks/backbone_cpu.py --preset gpt2-small --seq-len 256 --batch-size 4

Both sides run in fp32 with their default (SDPA) attention; the order of the two is alternated every round so that
neither benefits from a warmer cache. Prints a table with the median time per step and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

from models import Transformer, TransformerConfig, from_hf
from models.hf import hf_config_for, infer_family

BASE_CLASSES = {"bert": "BertModel", "albert": "AlbertModel", "electra": "ElectraModel", "gpt2": "GPT2Model"}


def step_time(forward, input_ids, attention_mask) -> float:
    start = time.perf_counter()
    hidden = forward(input_ids, attention_mask)
    hidden.float().pow(2).mean().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bert-base")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = TransformerConfig.preset(args.preset, dropout=0.0, attention_dropout=0.0)
    family = "electra" if args.preset.startswith("electra") else infer_family(config)
    hf_class = getattr(transformers, BASE_CLASSES[family])
    hf_model = hf_class(hf_config_for(config, family)).train()  # default attention implementation (SDPA)
    ours: Transformer = from_hf(hf_model).train()
    input_ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len))
    attention_mask = torch.ones_like(input_ids)

    sides = {
        "ours": lambda ids, mask: ours(ids, attention_mask=mask),
        "hugging face": lambda ids, mask: hf_model(ids, attention_mask=mask).last_hidden_state,
    }
    times: dict[str, list[float]] = {name: [] for name in sides}
    for round_index in range(args.warmup + args.rounds):
        order = list(sides) if round_index % 2 == 0 else list(reversed(sides))
        for name in order:
            ours.zero_grad(set_to_none=True)
            hf_model.zero_grad(set_to_none=True)
            elapsed = step_time(sides[name], input_ids, attention_mask)
            if round_index >= args.warmup:
                times[name].append(elapsed)

    tokens = args.batch_size * args.seq_len
    print(f"{args.preset}, batch {args.batch_size} x {args.seq_len}, fp32, forward + backward, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"{'side':<14}{'median s/step':>15}{'tokens/s':>12}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<14}{median:>15.3f}{tokens / median:>12,.0f}")
    ratio = statistics.median(times["hugging face"]) / statistics.median(times["ours"])
    print(f"speed-up of ours over Hugging Face: {ratio:.2f}x")


if __name__ == "__main__":
    main()
