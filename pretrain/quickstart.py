"""The quickstart: a tiny causal LM pretrained on a small corpus bundled with the package, in about a minute on CPU.

It runs the real stack (`PretrainingModule` with the `CausalLM` objective, trained by a Lightning `Trainer`) with
bytes as tokens (vocabulary 256), so no tokenizer has to be trained. It writes `model.safetensors`, `config.json`
and the training log (CSV) to a new directory and prints the loss, validation perplexity and a short sample.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from safetensors.torch import save_model

from models import ModelWithHeads, TransformerConfig
from objectives import CausalLM
from pretrain.errors import UserError
from pretrain.generate import LanguageModel, generate
from pretrain.module import PretrainingModule


def read_corpus(path: Path, min_bytes: int) -> torch.Tensor:
    """The corpus as a 1-D tensor of byte ids."""
    if not path.is_file():
        raise UserError(f"corpus file not found: {path}. Pass an existing text file with --corpus.")
    data = path.read_bytes()
    if len(data) < min_bytes:
        raise UserError(f"corpus {path} has {len(data)} bytes; the quickstart needs at least {min_bytes}. "
                        "Pass a larger text file with --corpus.")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def quickstart_config(seq_len: int) -> TransformerConfig:
    return TransformerConfig.preset(
        "gpt2-tiny", vocab_size=256, hidden_size=128, num_heads=4, intermediate_size=512, num_layers=4,
        max_position_embeddings=seq_len, dropout=0.0, attention_dropout=0.0,
    )


class RandomWindows(torch.utils.data.IterableDataset):
    """Endless windows of `length` consecutive bytes at random offsets (seeded)."""

    def __init__(self, data: torch.Tensor, length: int, seed: int):
        self.data, self.length, self.seed = data, length, seed

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            start = int(torch.randint(0, len(self.data) - self.length, (1,), generator=generator))
            yield {"input_ids": self.data[start:start + self.length]}


class PrintLoss(pl.Callback):
    def __init__(self, every: int):
        self.every = every

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == 1 or step % self.every == 0:
            metrics = trainer.callback_metrics
            print(f"step {step:5d}  loss {metrics['train/loss']:.3f}  lr {metrics['train/lr']:.2e}", flush=True)


def run(corpus: Path, out_dir: Path, steps: int = 600, batch_size: int = 16, seq_len: int = 128,
        learning_rate: float = 2e-3, seed: int = 0, log_every: int = 50) -> dict[str, float]:
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"output directory {out_dir} already exists and is not empty; "
                        "choose another --out (nothing was overwritten).")
    data = read_corpus(corpus, min_bytes=20 * seq_len)
    split = int(0.9 * len(data))
    train, valid = data[:split], data[split:]
    pl.seed_everything(seed, verbose=False)
    module = PretrainingModule(quickstart_config(seq_len), [CausalLM()], learning_rate=learning_rate,
                               schedule="cosine", warmup_steps=max(1, steps // 10), total_steps=steps)
    print(f"quickstart: {module.backbone.num_parameters():,} parameters, {len(train):,} training bytes from {corpus}")
    trainer = pl.Trainer(
        max_steps=steps, accelerator="auto", devices=1, logger=CSVLogger(out_dir, name="logs", version=""),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        log_every_n_steps=log_every, callbacks=[PrintLoss(log_every)],
        val_check_interval=steps, check_val_every_n_epoch=None, limit_val_batches=10,  # validate once, at the end
    )
    trainer.fit(module, torch.utils.data.DataLoader(RandomWindows(train, seq_len, seed), batch_size=batch_size),
                torch.utils.data.DataLoader(RandomWindows(valid, seq_len, seed + 1), batch_size=batch_size))
    valid_loss = trainer.callback_metrics["val/loss"].item()
    model = ModelWithHeads(module.backbone, {"clm": module.objectives[0].head}).eval()
    results = {"valid_loss": valid_loss, "valid_perplexity": math.exp(valid_loss)}
    print(f"validation loss {valid_loss:.3f} (perplexity {math.exp(valid_loss):.2f}; uniform over bytes would be "
          f"{math.log(256):.3f})")
    prompt = list(b"ROMEO:")
    generated = generate(LanguageModel(module.backbone, module.objectives[0].head), [prompt], "sample", seed=seed,
                         max_new_tokens=seq_len - len(prompt))[0]  # within the model's context
    print("sample:", bytes(prompt + generated).decode("utf-8", "replace"))
    save_model(model, str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text(json.dumps(
        {"model": model.config.to_dict(), "heads": ["clm"], "tokenizer": "bytes", "results": results}, indent=2))
    print(f"saved {out_dir / 'model.safetensors'} and {out_dir / 'config.json'}; training log in {out_dir / 'logs'}")
    return results

