"""Optimisers and learning-rate schedules for pretraining: AdamW, RAdam, LAMB; linear, cosine, inverse square root."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Literal

import torch
from torch import Tensor, nn

from models.config import ConfigError

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
            raise ConfigError(f"invalid LAMB settings: lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        """One update of every parameter with a gradient. Where the attribute `found_inf` is set (a one-element
        tensor, non-zero when the gradients are not finite; see `skip_if_not_finite`), the update, the moments and
        the step count stay as they are, decided on the device."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    step_dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
                    state["step"] = torch.zeros((), dtype=step_dtype, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                grad, b1, b2 = p.grad, beta1, beta2
                if found_inf is not None:  # a skipped step: beta 1 and a zero gradient leave the moments as they are
                    skip = found_inf.to(p.device).reshape(()) > 0
                    grad = torch.where(skip, 0.0, grad)
                    b1, b2 = torch.where(skip, 1.0, beta1), torch.where(skip, 1.0, beta2)
                    state["step"] += (~skip).to(state["step"].dtype)
                else:
                    state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(grad * (1 - b1))
                v.mul_(b2).add_(grad * grad * (1 - b2))
                step = state["step"].clamp(min=1)
                m_hat = m / (1 - beta1 ** step)
                v_hat = v / (1 - beta2 ** step)
                update = m_hat / (v_hat.sqrt() + group["eps"]) + group["weight_decay"] * p
                weight_norm, update_norm = p.norm(), update.norm()
                trust = torch.where((weight_norm > 0) & (update_norm > 0), weight_norm / update_norm, 1.0)
                update = update * (group["lr"] * trust)
                if found_inf is not None:
                    update = torch.where(skip, 0.0, update)
                p.sub_(update)  # no .item(): the step never waits for the device
        return loss


NORMS = (nn.LayerNorm, nn.RMSNorm)
WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")  # FSDP, checkpointing, compile


def plain_name(name: str) -> str:
    """A parameter's name without the wrappers FSDP, activation checkpointing and compile put in its path."""
    for wrapper in WRAPPERS:
        name = name.replace(wrapper, "")
    return name


def named_parameter_groups(module: nn.Module) -> tuple[list[tuple[str, Tensor]], list[tuple[str, Tensor]]]:
    """(decayed, not decayed) trainable parameters by name: decay on weight matrices and embeddings, none on biases
    and norm weights. Decided by name and by the module that owns each parameter, never by shape: under FSDP the
    optimizer is built after the parameters were flattened into 1-D shards (their names and owners stay, with
    `use_orig_params`, Lightning's default). Shared and tied parameters appear once."""
    decay, no_decay, seen = [], [], set()
    for owner_name, owner in module.named_modules():
        for name, parameter in owner.named_parameters(recurse=False):
            if not parameter.requires_grad or id(parameter) in seen:
                continue
            seen.add(id(parameter))
            full = plain_name(f"{owner_name}.{name}" if owner_name else name)
            (no_decay if name == "bias" or isinstance(owner, NORMS) else decay).append((full, parameter))
    return decay, no_decay


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """The optimizer's two groups: `weight_decay` on weight matrices and embeddings, none on biases and norms."""
    decay, no_decay = named_parameter_groups(module)
    return [{"params": [p for _, p in decay], "weight_decay": weight_decay},
            {"params": [p for _, p in no_decay], "weight_decay": 0.0}]


def describe_groups(module: nn.Module, weight_decay: float, sizes: dict[str, int]) -> str:
    """One line, as nanoGPT prints it: how many tensors and parameters each group holds. `sizes` (name -> number of
    elements, taken before any sharding) counts whole parameters, not this rank's shards."""
    decay, no_decay = named_parameter_groups(module)
    counts = [(len(group), sum(sizes.get(name, p.numel()) for name, p in group)) for group in (decay, no_decay)]
    return (f"weight decay {weight_decay:g} on {counts[0][0]} tensors ({counts[0][1]:,} parameters), none on "
            f"{counts[1][0]} tensors ({counts[1][1]:,} parameters: biases and norms)")


def build_optimizer(name: OptimizerName, module: nn.Module, learning_rate: float, weight_decay: float,
                    betas: tuple[float, float], eps: float) -> torch.optim.Optimizer:
    """AdamW is the fused kernel (CPU and CUDA): one pass per step, and it skips a step on the device (`found_inf`)."""
    groups = parameter_groups(module, weight_decay)
    if name == "adamw":
        fused = all(p.device.type in ("cpu", "cuda") for p in module.parameters()) or None
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=fused)
    if name == "radam":
        return torch.optim.RAdam(groups, lr=learning_rate, betas=betas, eps=eps, decoupled_weight_decay=True)
    if name == "lamb":
        return Lamb(groups, lr=learning_rate, betas=betas, eps=eps)
    raise ConfigError(f"unknown optimizer {name!r}; choose adamw, radam or lamb")


def skip_if_not_finite(optimizer: torch.optim.Optimizer, parameters: list[Tensor], not_finite: Tensor) -> None:
    """Make the coming `optimizer.step()` leave weights and optimizer state unchanged where `not_finite` (a bool
    scalar on the device) is true. Fused AdamW and LAMB decide on the device (`found_inf`, as torch's GradScaler
    uses it): no host sync. Other optimizers read the flag on the host (one sync per step) and, where it is set,
    see no gradient at all."""
    fused = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and optimizer.defaults.get("fused")
    if fused or isinstance(optimizer, Lamb):
        optimizer.found_inf = not_finite.float().reshape(())
    elif bool(not_finite):
        for p in parameters:
            p.grad = None


def schedule_factor(name: ScheduleName, warmup_steps: int, total_steps: int | None) -> Callable[[int], float]:
    """The learning-rate multiplier at each step: linear warm-up from 0 over `warmup_steps`, then
    linear decay to 0 at `total_steps`, cosine decay to 0, inverse square root (Vaswani et al.), or constant."""
    if name not in ("linear", "cosine", "inverse_sqrt", "constant"):
        raise ConfigError(f"unknown schedule {name!r}; choose linear, cosine, inverse_sqrt or constant")
    if name in ("linear", "cosine") and (total_steps is None or total_steps <= warmup_steps):
        raise ConfigError(f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps}) for a {name} decay")

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
