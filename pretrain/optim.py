"""Optimisers and learning-rate schedules for pretraining: AdamW, RAdam, LAMB; linear, cosine, inverse square root."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Literal

import torch
from torch import nn

OptimizerName = Literal["adamw", "radam", "lamb"]
ScheduleName = Literal["linear", "cosine", "inverse_sqrt", "constant"]


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning", Algorithm 2) for large batches.

    Per parameter tensor: Adam's bias-corrected update r = m_hat / (sqrt(v_hat) + eps), plus decoupled weight decay
    u = r + weight_decay * x, scaled by the trust ratio ||x|| / ||u|| (1 where either norm is 0): x -= lr * ratio * u.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0):
        if lr <= 0 or eps <= 0 or not all(0 <= b < 1 for b in betas) or weight_decay < 0:
            raise ValueError(f"invalid LAMB settings: lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                m_hat = m / (1 - beta1 ** state["step"])
                v_hat = v / (1 - beta2 ** state["step"])
                update = m_hat / (v_hat.sqrt() + group["eps"]) + group["weight_decay"] * p
                weight_norm, update_norm = p.norm(), update.norm()
                trust = torch.where((weight_norm > 0) & (update_norm > 0), weight_norm / update_norm, 1.0)
                p.sub_(update * (group["lr"] * trust))  # no .item(): the step never waits for the device
        return loss


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and embeddings; none on biases and LayerNorm weights (the 1-D parameters)."""
    parameters = [p for p in module.parameters() if p.requires_grad]  # shared and tied parameters appear once
    return [{"params": [p for p in parameters if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in parameters if p.ndim < 2], "weight_decay": 0.0}]


def build_optimizer(name: OptimizerName, module: nn.Module, learning_rate: float, weight_decay: float,
                    betas: tuple[float, float], eps: float) -> torch.optim.Optimizer:
    groups = parameter_groups(module, weight_decay)
    if name == "adamw":
        fused = all(p.is_cuda for p in module.parameters()) or None  # the fused kernel where it exists
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=fused)
    if name == "radam":
        return torch.optim.RAdam(groups, lr=learning_rate, betas=betas, eps=eps, decoupled_weight_decay=True)
    if name == "lamb":
        return Lamb(groups, lr=learning_rate, betas=betas, eps=eps)
    raise ValueError(f"unknown optimizer {name!r}; choose adamw, radam or lamb")


def schedule_factor(name: ScheduleName, warmup_steps: int, total_steps: int | None) -> Callable[[int], float]:
    """The learning-rate multiplier at each step: linear warm-up from 0 over `warmup_steps`, then
    linear decay to 0 at `total_steps`, cosine decay to 0, inverse square root (Vaswani et al.), or constant."""
    if name not in ("linear", "cosine", "inverse_sqrt", "constant"):
        raise ValueError(f"unknown schedule {name!r}; choose linear, cosine, inverse_sqrt or constant")
    if name in ("linear", "cosine") and (total_steps is None or total_steps <= warmup_steps):
        raise ValueError(f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps}) for a {name} decay")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        if name == "constant":
            return 1.0
        if name == "inverse_sqrt":
            return math.sqrt(max(warmup_steps, 1) / max(step, 1))
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return 1.0 - progress if name == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
