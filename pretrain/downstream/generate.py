"""Text generation from causal models: greedy (argmax), multinomial sampling with temperature / top-k / top-p, and
beam search with a length penalty; batched prompts of different lengths (left-padded); a KV cache."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from models import LMHead, Transformer
from models.transformer import KVCache
from pretrain.errors import UserError

Strategy = Literal["greedy", "sample", "beam"]


class LanguageModel:
    """A causal backbone and its LM head, as decoding uses them."""

    def __init__(self, backbone: Transformer, head: LMHead):
        if not backbone.config.causal:
            raise ValueError("generation needs a causal model (causal=True)")
        self.backbone, self.head = backbone, head

    def new_cache(self) -> KVCache:
        return self.backbone.new_cache()

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def logits(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
               cache: KVCache | None) -> Tensor:
        """Next-token logits at the last position. input_ids (B, T) -> (B, V)"""
        hidden = self.backbone(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache)
        return self.head(hidden[:, -1]).float()


@dataclass
class Settings:
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    num_beams: int = 4
    length_penalty: float = 1.0
    early_stopping: bool = True
    eos_id: int | None = None
    use_cache: bool = True

    def __post_init__(self):
        """Each option in its range, or one clear error naming it (a bad value must not reach a kernel)."""
        problems = []
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature <= 0:
            problems.append(f"temperature must be a positive number, got {self.temperature} (greedy decoding is "
                            "strategy greedy)")
        if self.top_k is not None and self.top_k < 1:
            problems.append(f"top_k must be at least 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.num_beams < 1:
            problems.append(f"num_beams must be at least 1, got {self.num_beams}")
        if not math.isfinite(self.length_penalty):
            problems.append(f"length_penalty must be a finite number, got {self.length_penalty}")
        if problems:
            raise UserError("; ".join(problems))


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Prompts of different lengths, padded on the left: input_ids and attention_mask (B, T_max)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return input_ids, attention_mask


def positions_of(attention_mask: Tensor) -> Tensor:
    """Positions counted over real tokens only, so a left-padded prompt sees the positions it would see alone."""
    return (attention_mask.cumsum(1) - 1).clamp(min=0)


def filter_logits(logits: Tensor, top_k: int | None, top_p: float | None) -> Tensor:
    """Keep the `top_k` largest logits and the smallest set whose probability reaches `top_p`; -inf elsewhere."""
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # the mass before a token already reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -math.inf)
    return logits


@torch.no_grad()
def generate(model: LanguageModel, prompts: list[list[int]], strategy: Strategy = "greedy", pad_id: int = 0,
             seed: int | None = None, **settings) -> list[list[int]]:
    """The new tokens for each prompt (stopping after `eos_id`, which is kept, or at `max_new_tokens`)."""
    options = Settings(**settings)
    if strategy == "beam":
        return [beam_search(model, prompt, options) for prompt in prompts]
    if strategy not in ("greedy", "sample"):
        raise ValueError(f"unknown strategy {strategy!r}; choose greedy, sample or beam")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None  # draws on the CPU: the same
    # tokens for a seed on any device
    input_ids, attention_mask = (t.to(model.device) for t in left_pad(prompts, pad_id))
    cache = model.new_cache() if options.use_cache else None
    new = input_ids  # what the next forward pass reads: everything without a cache, the last token with one
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=model.device)
    outputs: list[list[int]] = [[] for _ in prompts]
    for _ in range(options.max_new_tokens):
        positions = positions_of(attention_mask)[:, -new.shape[1]:]
        logits = model.logits(new, attention_mask, positions, cache)  # (B, V)
        if strategy == "greedy":
            token = logits.argmax(-1)
        else:
            probabilities = filter_logits(logits / options.temperature, options.top_k, options.top_p).softmax(-1)
            token = torch.multinomial(probabilities.cpu(), 1, generator=generator).squeeze(1).to(model.device)
        for row in (~finished).nonzero().flatten().tolist():
            outputs[row].append(int(token[row]))
        if options.eos_id is not None:
            finished |= token == options.eos_id
        if finished.all():
            break
        input_ids = torch.cat([input_ids, token[:, None]], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(token)[:, None]], dim=1)
        new = token[:, None] if cache is not None else input_ids
    return outputs


def beam_search(model: LanguageModel, prompt: list[int], options: Settings) -> list[int]:
    """The hypothesis with the best score: sum of log-probabilities / (generated length ** length_penalty).
    With `early_stopping`, stop once `num_beams` hypotheses have ended with EOS."""
    beams, device = options.num_beams, model.device
    input_ids = torch.tensor([prompt], device=device)
    cache = model.new_cache() if options.use_cache else None
    scores = torch.zeros(1, device=device)  # (live beams,) summed log-probabilities
    generated = torch.zeros(1, 0, dtype=torch.long, device=device)
    done: list[tuple[float, list[int]]] = []
    new = input_ids
    for _ in range(options.max_new_tokens):
        attention_mask = torch.ones(len(scores), input_ids.shape[1] + generated.shape[1], dtype=torch.long,
                                    device=device)
        positions = positions_of(attention_mask)[:, -new.shape[1]:]
        log_probs = model.logits(new, attention_mask, positions, cache).log_softmax(-1)  # (live, V)
        candidates = (scores[:, None] + log_probs).flatten()
        top = candidates.topk(min(2 * beams, len(candidates)))
        vocab = log_probs.shape[-1]
        keep_rows, keep_tokens, keep_scores = [], [], []
        for score, index in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            row, token = divmod(index, vocab)
            sequence = generated[row].tolist() + [token]
            if options.eos_id is not None and token == options.eos_id:
                done.append((score / len(sequence) ** options.length_penalty, sequence))
            else:
                keep_rows.append(row)
                keep_tokens.append(token)
                keep_scores.append(score)
            if len(keep_rows) == beams:
                break
        if (options.early_stopping and len(done) >= beams) or not keep_rows:
            break
        rows = torch.tensor(keep_rows, device=device)
        generated = torch.cat([generated[rows], torch.tensor(keep_tokens, device=device)[:, None]], dim=1)
        scores = torch.tensor(keep_scores, device=device)
        if cache is not None:
            cache.reorder(rows)  # at the first step every row is 0: the prompt's cache is copied to each beam
            new = generated[:, -1:]
        else:
            new = torch.cat([input_ids.expand(len(rows), -1), generated], dim=1)
    length = max(generated.shape[1], 1)
    done += [(score / length ** options.length_penalty, generated[row].tolist()) for row, score in
             enumerate(scores.tolist())]
    return max(done, key=lambda item: item[0])[1]


@torch.no_grad()
def perplexity(model: LanguageModel, tokens: list[int], window: int | None = None, stride: int | None = None) -> float:
    """exp of the mean next-token loss over tokens[1:]. A text longer than `window` (default: the model's context)
    is scored `stride` targets at a time (default window // 2), each with the up to `window` tokens before it: every
    token is scored once, with at least window - stride tokens of context."""
    positions = model.backbone.config.max_position_embeddings
    window = window or positions
    if not 2 <= window <= positions:
        raise UserError(f"the window must be between 2 and the model's {positions} positions, got {window}")
    if stride is not None and stride < 1:
        raise UserError(f"the stride must be at least 1, got {stride}")
    stride = min(stride or max(1, window // 2), window - 1)
    if len(tokens) < 2:
        raise UserError("perplexity needs a text of at least two tokens")
    ids = torch.tensor(tokens, device=model.device)
    total, scored = 0.0, 1
    bar = tqdm(total=len(tokens) - 1, unit="token", desc="scoring", disable=not sys.stderr.isatty(), leave=False)
    while scored < len(tokens):
        end = min(scored + stride, len(tokens))
        begin = max(0, end - window)
        logits = model.head(model.backbone(ids[begin:end][None]))[0].float()  # position i predicts token begin+i+1
        total += torch.nn.functional.cross_entropy(logits[scored - 1 - begin:end - 1 - begin], ids[scored:end],
                                                   reduction="sum").item()
        bar.update(end - scored)
        scored = end
    bar.close()
    return math.exp(total / (len(tokens) - 1))
