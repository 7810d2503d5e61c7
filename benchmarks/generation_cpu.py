"""Generation speed with and without the KV cache (greedy, batch 1), in one process.

    python benchmarks/generation_cpu.py                       # gpt2-small size, 256 new tokens, as in issue 7
    python benchmarks/generation_cpu.py --preset gpt2-tiny --new-tokens 64
"""

from __future__ import annotations

import argparse
import time

import torch

from models import LMHead, Transformer, TransformerConfig
from pretrain.downstream.generate import LanguageModel, generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2-small")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = TransformerConfig.preset(args.preset, dropout=0.0, attention_dropout=0.0)
    backbone = Transformer(config).eval()
    model = LanguageModel(backbone, LMHead(backbone, transform=False, bias=False))
    prompt = torch.randint(0, config.vocab_size, (args.prompt_tokens,)).tolist()
    generate(model, [prompt], max_new_tokens=4)  # warm-up
    results = {}
    for use_cache in (True, False):
        start = time.perf_counter()
        tokens = generate(model, [prompt], max_new_tokens=args.new_tokens, use_cache=use_cache)[0]
        results[use_cache] = (time.perf_counter() - start, tokens)
    assert results[True][1] == results[False][1], "the cache changed the generated tokens"
    print(f"{args.preset} ({backbone.num_parameters() / 1e6:.0f}M parameters), greedy, batch 1, "
          f"{args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, fp32, {torch.get_num_threads()} threads")
    print(f"{'KV cache':<10}{'seconds':>9}{'tokens/s':>10}")
    for use_cache, (seconds, _) in results.items():
        print(f"{'on' if use_cache else 'off':<10}{seconds:>9.2f}{args.new_tokens / seconds:>10.1f}")
    print(f"speed-up from the cache: {results[False][0] / results[True][0]:.1f}x (same tokens)")


if __name__ == "__main__":
    main()
