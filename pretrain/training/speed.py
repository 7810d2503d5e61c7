"""Training speed as it runs: tokens per second and model-FLOPs utilisation (MFU), logged with the losses."""

from __future__ import annotations

import time

import torch
from pytorch_lightning.callbacks import Callback

from models import LMHead

# dense bf16 / fp16 peak FLOP/s per GPU (the H200 is missing from Lightning's table; same compute as the H100 SXM)
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def gpu_peak(device_name: str) -> float | None:
    return next((peak for key, peak in GPU_PEAK_BF16.items() if key in device_name), None)


def model_flops_per_token(module, seq_len: int) -> float:
    """Training FLOPs per token of a `PretrainingModule`: 6 N + 12 L H T (PaLM appendix B; nanoGPT), where N counts
    the parameters used in matrix products once per token: all trainable parameters except the embedding tables
    (lookups), plus the tied output layer (V x E) times the share of positions at which the objectives run it
    (`Objective.output_layer_share`: 1 for CLM, the masking probability for MLM and ELECTRA's generator)."""
    config = module.backbone.config
    parameters = sum(p.numel() for p in module.parameters() if p.requires_grad)
    tables = sum(p.numel() for name, p in module.backbone.embeddings.named_parameters()
                 if name in ("word.weight", "position.weight", "token_type.weight"))
    share = sum(objective.output_layer_share() for objective in module.objectives)
    untied = sum(m.weight.numel() for m in module.modules() if isinstance(m, LMHead) and not m.tied)  # counted below
    matmul = parameters - tables - untied + share * config.vocab_size * config.token_embedding_size
    return 6 * matmul + 12 * config.num_layers * config.hidden_size * seq_len


class Throughput(Callback):
    """Logs train/tokens_per_sec (padded tokens: no host sync) every `window` steps, and train/mfu on GPUs whose
    bf16 peak is known (H100, H200, A100, ...), with `model_flops_per_token` (ELECTRA's generator included)."""

    def __init__(self, window: int = 20):
        self.window = window
        self._start: float | None = None
        self._tokens = self._steps = 0
        self._peak_seconds_per_token: float | None = None
        self.last: dict[str, float] = {}  # the metrics of the last window (the progress bar shows tokens/s)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._start is None:  # the window starts after the first step (warm-up, compilation)
            self._start = time.perf_counter()
            peak = gpu_peak(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
            # seconds one token takes at the GPU's peak (training batches have one length): MFU = tokens/s x this
            self._peak_seconds_per_token = None if peak is None else \
                model_flops_per_token(pl_module, batch["input_ids"].shape[1]) / peak
            return
        self._tokens += batch["input_ids"].numel()
        self._steps += 1
        if self._steps < self.window:
            return
        rate = self._tokens * trainer.world_size / (time.perf_counter() - self._start)
        metrics = {"train/tokens_per_sec": rate}
        if self._peak_seconds_per_token is not None:
            metrics["train/mfu"] = rate * self._peak_seconds_per_token / trainer.world_size
        self.last = metrics
        for logger in trainer.loggers:  # straight to the loggers: a plain number, once per window
            logger.log_metrics(metrics, step=trainer.global_step - 1)
        self._start, self._tokens, self._steps = time.perf_counter(), 0, 0
