"""Zero- and few-shot classification with a causal language model, as GPT-2 and GPT-3 are evaluated: no training;
each label is a continuation (a label word) whose log-probability the model gives after a prompt, and the prediction
is the label it finds most likely. Few-shot prompts put k labelled training examples, balanced over the labels and
drawn with a seed, before the scored one."""

from __future__ import annotations

import random
import string
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from pretrain.downstream.generate import LanguageModel, left_pad, positions_of
from pretrain.downstream.inputs import right_pad
from pretrain.downstream.pretrained import Pretrained
from pretrain.downstream.tasks import Examples, Task, compute_metrics
from pretrain.errors import UserError


@dataclass
class Prompting:
    template: str  # e.g. "Review: {text}\nSentiment:"; pair tasks also place {pair}
    label_words: list[str]  # one continuation per label, in the order of the task's label set, e.g. [" no", " yes"]
    shots: int = 0  # labelled training examples before the scored one
    seed: int = 0
    separator: str = "\n\n"  # between the examples of a few-shot prompt
    normalize: bool = False  # score a label by its mean log-probability per token instead of the sum
    calibrate: bool = False  # subtract each label's score after a content-free input (Zhao et al. 2021)
    batch_size: int = 16


def unescape(text: str) -> str:
    r"""`\n` and `\t` as typed in a shell's quotes become a newline and a tab."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def check_template(template: str, pair: bool) -> None:
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    needed = {"text", "pair"} if pair else {"text"}
    if fields != needed:
        raise UserError(f"the template must place {' and '.join('{' + f + '}' for f in sorted(needed))}"
                        + (" and nothing else in braces" if fields - needed else "") + f"; got {template!r}")


def render(template: str, text: str, pair: str | None) -> str:
    return template.format(text=text, pair=pair) if pair is not None else template.format(text=text)


def draw_shots(pools: list[list[int]], shots: int, rng: random.Random, excluded) -> list[int]:
    """`shots` distinct example indices, as balanced over the labels as `shots` allows (the remainder to labels drawn
    at random), none for which `excluded(index)` holds, in random order. pools[label]: the indices of that label."""
    counts = [shots // len(pools)] * len(pools)
    for label in rng.sample(range(len(pools)), shots % len(pools)):
        counts[label] += 1
    chosen = []
    for pool, count in zip(pools, counts, strict=True):
        picked, seen = [], set()
        while len(picked) < count and len(seen) < len(pool):
            index = pool[rng.randrange(len(pool))]
            if index not in seen:
                seen.add(index)
                if not excluded(index):
                    picked.append(index)
        if len(picked) < count:
            raise UserError(f"{shots} shots need {count} training examples of each label; a label has only "
                            f"{len(picked)}: lower --shots")
        chosen += picked
    rng.shuffle(chosen)
    return chosen


def prompts_for(examples: Examples, settings: Prompting, train: Examples | None = None,
                train_labels: Sequence[int] = ()) -> list[str]:
    """Each example's prompt: with shots, `settings.shots` rendered training examples followed by their label words,
    then the example itself. The draw for example i depends only on (seed, i), and never holds a training example
    with the same text (and pair) as the scored one."""
    pairs = examples.pairs or [None] * len(examples.texts)
    if settings.shots == 0:
        return [render(settings.template, text, pair) for text, pair in zip(examples.texts, pairs, strict=True)]
    if train is None:
        raise UserError("few-shot prompts need labelled training examples: give the training file")
    train_pairs = train.pairs or [None] * len(train.texts)
    pools = [[i for i, label in enumerate(train_labels) if label == wanted]
             for wanted in range(len(settings.label_words))]
    out = []
    for index, (text, pair) in enumerate(zip(examples.texts, pairs, strict=True)):
        rng = random.Random(settings.seed * 1_000_003 + index)
        shots = draw_shots(pools, settings.shots, rng,
                           excluded=lambda i, text=text, pair=pair: train.texts[i] == text and train_pairs[i] == pair)
        parts = [render(settings.template, train.texts[i], train_pairs[i]) + settings.label_words[train_labels[i]]
                 for i in shots]
        out.append(settings.separator.join([*parts, render(settings.template, text, pair)]))
    return out


@torch.no_grad()
def label_log_probs(model: LanguageModel, prompts: list[list[int]], labels: list[list[int]], pad_id: int = 0,
                    normalize: bool = False) -> Tensor:
    """log P(label | prompt) for every prompt and label, summed over the label's tokens (or their mean, with
    `normalize`). One forward pass over the left-padded prompts fills a KV cache; the labels' tokens are then read
    for all prompts and labels at once from copies of that cache. -> (prompts, labels)"""
    device = model.device
    input_ids, attention_mask = (t.to(device) for t in left_pad(prompts, pad_id))
    cache = model.new_cache()
    first = model.logits(input_ids, attention_mask, positions_of(attention_mask), cache).log_softmax(-1)  # (B, V)
    label_ids = right_pad(labels, pad_id).to(device)  # (L, K)
    label_mask = right_pad([[1] * len(label) for label in labels], 0).to(device)
    scores = first[:, label_ids[:, 0]]  # (B, L): each label's first token
    count, width = len(prompts), label_ids.shape[1]
    if width > 1:  # the later tokens of longer labels: row b * L + l continues prompt b with label l
        cache.reorder(torch.arange(count, device=device).repeat_interleave(len(labels)))
        mask = torch.cat([attention_mask.repeat_interleave(len(labels), 0), label_mask[:, :-1].repeat(count, 1)], 1)
        hidden = model.backbone(label_ids[:, :-1].repeat(count, 1), attention_mask=mask,
                                position_ids=positions_of(mask)[:, -(width - 1):], cache=cache)
        log_probs = model.head(hidden).float().log_softmax(-1)  # (B * L, K - 1, V)
        later = log_probs.gather(-1, label_ids[:, 1:].repeat(count, 1)[..., None]).squeeze(-1)
        scores = scores + (later * label_mask[:, 1:].repeat(count, 1)).sum(1).view(count, len(labels))
    return scores / label_mask.sum(1) if normalize else scores


def label_scores(pretrained: Pretrained, prompts: list[str], settings: Prompting) -> tuple[Tensor, int]:
    """Each label word's score after each prompt (prompts, labels), and how many prompts were cut (from the left) to
    leave room for the longest label within the model's positions. Prompts start with the tokenizer's document
    boundary, as the model's pretraining documents did."""
    model = pretrained.language_model()
    labels = [pretrained.tokenizer.encode(word, add_special_tokens=False).ids for word in settings.label_words]
    if not all(labels):
        raise UserError(f"a label word tokenizes to nothing: {settings.label_words}")
    special = pretrained.special
    start = [special.sep if special.sep is not None else special.eos] if (special.sep, special.eos) != (None, None) \
        else []
    room = pretrained.config.max_position_embeddings - max(len(label) for label in labels)
    if room < 2:
        raise UserError(f"the label words take {max(len(label) for label in labels)} tokens of the model's "
                        f"{pretrained.config.max_position_embeddings} positions, leaving no room for a prompt")
    ids = [start + e.ids for e in pretrained.tokenizer.encode_batch(prompts, add_special_tokens=False)]
    cut = sum(len(row) > room for row in ids)
    ids = [row[-room:] for row in ids]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: less padding
    scores = torch.empty(len(ids), len(labels))
    bar = tqdm(total=len(order), unit="prompt", desc="scoring", disable=not sys.stderr.isatty(), leave=False)
    for begin in range(0, len(order), settings.batch_size):
        chunk = order[begin:begin + settings.batch_size]
        scores[chunk] = label_log_probs(model, [ids[i] for i in chunk], labels, pretrained.pad_id,
                                        settings.normalize).cpu()
        bar.update(len(chunk))
    bar.close()
    return scores, cut


def evaluate(pretrained: Pretrained, task: Task, dev: Examples, targets: Tensor, settings: Prompting,
             train: Examples | None = None, train_targets: Sequence[int] = ()) -> dict:
    """Scores the dev examples: the task's metrics, the confusion matrix (rows: true label, columns: predicted),
    the majority-class accuracy, and how many prompts were cut."""
    if not pretrained.config.causal:
        raise UserError("zero- and few-shot scoring needs a causal language model (GPT); this model is an encoder: "
                        "fine-tune it instead (pretrain finetune)")
    if task.regression:
        raise UserError(f"zero- and few-shot scoring needs a classification task; {task.name} is a regression")
    check_template(settings.template, task.pair is not None)
    prompts = prompts_for(dev, settings, train, train_targets)
    scores, cut = label_scores(pretrained, prompts, settings)
    if settings.calibrate:  # the same prompt (and shots) around "N/A": what the model prefers with no content
        free = Examples(["N/A"] * len(dev.texts), ["N/A"] * len(dev.texts) if dev.pairs is not None else None)
        scores = scores - label_scores(pretrained, prompts_for(free, settings, train, train_targets), settings)[0]
    predictions = scores.argmax(-1)
    size = len(settings.label_words)
    confusion = torch.zeros(size, size, dtype=torch.long)
    confusion.index_put_((targets, predictions), torch.ones_like(targets), accumulate=True)
    return {"task": task.name, "examples": len(targets), "shots": settings.shots, "seed": settings.seed,
            "template": settings.template, "label_words": settings.label_words, "calibrated": settings.calibrate,
            "metrics": compute_metrics(task.metrics, predictions, targets, size),
            "majority_accuracy": 100 * float(targets.bincount(minlength=size).max()) / len(targets),
            "confusion": confusion.tolist(), "cut_prompts": cut, "example_prompt": prompts[0]}


def report(results: dict, labels: Sequence[str]) -> str:
    """Metrics against the majority class, and the confusion matrix, as lines of text."""
    metrics = ", ".join(f"{name} {value:.2f}" for name, value in results["metrics"].items())
    calibrated = ", calibrated" if results.get("calibrated") else ""
    lines = [f"{results['task']}, {results['shots']}-shot{calibrated}, {results['examples']:,} examples: {metrics} "
             f"(majority class: accuracy {results['majority_accuracy']:.2f})"]
    if results["cut_prompts"]:
        lines.append(f"note: {results['cut_prompts']:,} prompts were cut from the left to fit the model's positions")
    names = [f"{label} {word.strip() or repr(word)}" for label, word in zip(labels, results["label_words"],
                                                                            strict=True)]
    width = max(len(name) for name in names) + 2
    lines.append("confusion (rows: true label, columns: predicted):")
    lines.append(" " * width + "".join(f"{name:>{width}}" for name in names))
    for name, row in zip(names, results["confusion"], strict=True):
        lines.append(f"{name:<{width}}" + "".join(f"{count:>{width},}" for count in row))
    return "\n".join(lines)
