"""The quickstart: a tiny causal LM pretrained on a small corpus bundled with the package, in about a minute on CPU.

Bytes are the tokens (vocabulary 256), so no tokenizer has to be trained. It writes `model.safetensors` and
`config.json` to a new directory and prints the loss curve, validation perplexity and a short sample.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_model

from models import LMHead, ModelWithHeads, Transformer, TransformerConfig
from pretrain.errors import UserError

BUNDLED_CORPUS = Path(__file__).parent / "data" / "tiny_shakespeare.txt"


def read_corpus(path: Path, min_bytes: int) -> torch.Tensor:
    """The corpus as a 1-D tensor of byte ids."""
    if not path.is_file():
        raise UserError(f"corpus file not found: {path}. Pass an existing text file with --corpus.")
    data = path.read_bytes()
    if len(data) < min_bytes:
        raise UserError(f"corpus {path} has {len(data)} bytes; the quickstart needs at least {min_bytes}. "
                        "Pass a larger text file with --corpus.")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def build_model(seq_len: int) -> ModelWithHeads:
    config = TransformerConfig.preset(
        "gpt2-tiny", vocab_size=256, hidden_size=128, num_heads=4, intermediate_size=512, num_layers=4,
        max_position_embeddings=seq_len, dropout=0.0, attention_dropout=0.0,
    )
    backbone = Transformer(config)
    return ModelWithHeads(backbone, {"clm": LMHead(config, backbone.embeddings.word, transform=False, bias=False)})


def next_token_loss(model: ModelWithHeads, tokens: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting tokens[:, t + 1] from tokens[:, :t + 1]. tokens: (B, T)"""
    logits = model.heads["clm"](model.backbone(tokens[:, :-1]))  # (B, T-1, V)
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def run(corpus: Path, out_dir: Path, steps: int = 600, batch_size: int = 16, seq_len: int = 128,
        learning_rate: float = 2e-3, seed: int = 0, log_every: int = 50) -> dict[str, float]:
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"output directory {out_dir} already exists and is not empty; "
                        "choose another --out (nothing was overwritten).")
    data = read_corpus(corpus, min_bytes=20 * (seq_len + 1))
    split = int(0.9 * len(data))
    train, valid = data[:split], data[split:]
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = build_model(seq_len + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine decay to 10 %
        optimizer, lambda s: min((s + 1) / warmup, 0.1 + 0.45 * (1 + math.cos(math.pi * s / steps))))

    def windows(source: torch.Tensor) -> torch.Tensor:
        starts = torch.randint(0, len(source) - seq_len - 1, (batch_size,), generator=generator)
        return torch.stack([source[s:s + seq_len + 1] for s in starts.tolist()])  # (B, T+1)

    print(f"quickstart: {model.backbone.num_parameters():,} parameters, {len(train):,} training bytes from {corpus}")
    start = time.perf_counter()
    for step in range(1, steps + 1):
        loss = next_token_loss(model, windows(train))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step == 1 or step % log_every == 0:
            print(f"step {step:5d}  loss {loss.item():.3f}  lr {schedule.get_last_lr()[0]:.2e}")
    elapsed = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        valid_loss = sum(next_token_loss(model, windows(valid)).item() for _ in range(10)) / 10
    results = {"valid_loss": valid_loss, "valid_perplexity": math.exp(valid_loss),
               "tokens_per_second": steps * batch_size * seq_len / elapsed}
    print(f"validation loss {valid_loss:.3f} (perplexity {math.exp(valid_loss):.2f}; uniform over bytes would be "
          f"{math.log(256):.3f}); {results['tokens_per_second']:,.0f} training tokens/s")
    print("sample:", sample(model, b"ROMEO:", 200, generator).decode("utf-8", errors="replace"))
    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text(json.dumps(
        {"model": model.config.to_dict(), "heads": ["clm"], "tokenizer": "bytes", "results": results}, indent=2))
    print(f"saved {out_dir / 'model.safetensors'} and {out_dir / 'config.json'}")
    return results


@torch.no_grad()
def sample(model: ModelWithHeads, prompt: bytes, length: int, generator: torch.Generator) -> bytes:
    """Multinomial sampling, one byte at a time, within the model's context."""
    tokens = torch.tensor([list(prompt)])
    context = model.config.max_position_embeddings
    for _ in range(length):
        logits = model.heads["clm"](model.backbone(tokens[:, -context:]))[0, -1]
        tokens = torch.cat([tokens, torch.multinomial(logits.softmax(-1), 1, generator=generator)[None]], dim=1)
    return bytes(tokens[0].tolist())
