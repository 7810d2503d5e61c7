"""Tokenized documents -> the "pairs" layout: BERT-style [CLS] A [SEP] B [SEP] from the sentences of one document,
with NSP negatives from another document (or consecutive segments, for SOP to swap)."""

from __future__ import annotations

import random
import re

import datasets
import numpy as np
from tokenizers import Tokenizer

from objectives.nsp import IS_NEXT, NOT_NEXT
from pretrain.errors import UserError

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def split_sentences(text: str) -> list[str]:
    return [s for s in (part.strip() for part in _SENTENCE_END.split(text)) if s]


def sentence_tokens(
    corpus: datasets.Dataset, tokenizer: Tokenizer, num_proc: int | None = None
) -> list[list[list[int]]]:
    """Every document as a list of tokenized sentences."""
    def encode(batch):
        sentences = [split_sentences(text) for text in batch["text"]]
        flat = tokenizer.encode_batch([s for doc in sentences for s in doc], add_special_tokens=False)
        out, index = [], 0
        for doc in sentences:
            out.append([flat[index + j].ids for j in range(len(doc))])
            index += len(doc)
        return {"sentences": out}

    tokenized = corpus.map(encode, batched=True, batch_size=1000, num_proc=num_proc,
                           remove_columns=corpus.column_names, keep_in_memory=True, desc="Splitting sentences")
    return [doc for doc in tokenized["sentences"] if doc]


def build_pairs(documents: list[list[list[int]]], max_length: int, cls_id: int, sep_id: int, pad_id: int,
                task: str = "nsp", short_seq_prob: float = 0.1, seed: int = 0) -> dict[str, np.ndarray]:
    """BERT's create_pretraining_data: sentences of one document accumulate up to a target length (shorter with
    `short_seq_prob`), A is a random prefix of them, B the rest. For NSP, half of the B are replaced by sentences
    of another document (label NOT_NEXT). A chunk of a single sentence is cut inside the sentence, so the 50/50 draw
    is never forced (BERT forces a random B there, which skews the labels). For SOP, A and B are always consecutive
    (the objective swaps them). Returns input_ids, token_type_ids (n, max_length), lengths and labels (n,)."""
    if task == "nsp" and len(documents) < 2:
        raise UserError("next sentence prediction needs at least two documents in the corpus")
    rng = random.Random(seed)
    max_tokens = max_length - 3
    rows: list[tuple[list[int], list[int], int]] = []
    for index, document in enumerate(documents):
        target = rng.randint(2, max_tokens) if rng.random() < short_seq_prob else max_tokens
        chunk, length = [], 0
        for i, sentence in enumerate(document):
            chunk.append(sentence)
            length += len(sentence)
            if i == len(document) - 1 or length >= target:
                rows.extend(_pair_from_chunk(chunk, documents, index, target, task, rng))
                target = rng.randint(2, max_tokens) if rng.random() < short_seq_prob else max_tokens
                chunk, length = [], 0
    n = len(rows)
    if n == 0:
        raise UserError("the corpus gave no sentence pairs: its documents are empty or one token long")
    input_ids = np.full((n, max_length), pad_id, dtype=np.int32)
    token_type_ids = np.zeros((n, max_length), dtype=np.int8)
    lengths, labels = np.zeros(n, dtype=np.int32), np.zeros(n, dtype=np.int8)
    for row, (a, b, label) in enumerate(rows):
        _truncate_pair(a, b, max_tokens, rng)
        ids = [cls_id, *a, sep_id, *b, sep_id]
        input_ids[row, :len(ids)] = ids
        token_type_ids[row, len(a) + 2:len(ids)] = 1
        lengths[row], labels[row] = len(ids), label
    return {"input_ids": input_ids, "token_type_ids": token_type_ids, "lengths": lengths, "labels": labels}


def _pair_from_chunk(chunk, documents, index, target, task, rng) -> list[tuple[list[int], list[int], int]]:
    if len(chunk) == 1:
        tokens = chunk[0]
        if len(tokens) < 2:
            return []
        cut = rng.randint(1, len(tokens) - 1)
        chunk = [tokens[:cut], tokens[cut:]]
    a_end = rng.randint(1, len(chunk) - 1)
    a = [t for sentence in chunk[:a_end] for t in sentence]
    if task == "nsp" and rng.random() < 0.5:
        other = index
        while other == index:
            other = rng.randrange(len(documents))
        sentences = documents[other]
        b = []
        for sentence in sentences[rng.randrange(len(sentences)):]:
            b.extend(sentence)
            if len(b) >= max(1, target - len(a)):
                break
        return [(a, b, NOT_NEXT)]
    return [(a, [t for sentence in chunk[a_end:] for t in sentence], IS_NEXT)]


def _truncate_pair(a: list[int], b: list[int], max_tokens: int, rng: random.Random) -> None:
    """BERT's truncate_seq_pair: trim the longer side, from the front or the back at random."""
    while len(a) + len(b) > max_tokens:
        longer = a if len(a) > len(b) else b
        del longer[0 if rng.random() < 0.5 else -1]
