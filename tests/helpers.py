"""Tiny vocabularies, configs and batches shared by the tests; running the `pretrain` command."""

import subprocess
import sys
from pathlib import Path

import torch

from models import TransformerConfig

PAD, CLS, SEP, MASK, UNK = 0, 1, 2, 3, 4
SPECIAL_IDS = [PAD, CLS, SEP, MASK, UNK]
VOCAB_SIZE = 64


def tiny_config(**overrides) -> TransformerConfig:
    fields = dict(vocab_size=VOCAB_SIZE, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128,
                  max_position_embeddings=32, dropout=0.0, attention_dropout=0.0)
    return TransformerConfig(**{**fields, **overrides})


def stream_batch(batch_size: int = 4, length: int = 16, generator: torch.Generator | None = None) -> dict:
    """Random ordinary tokens; the last row ends in padding."""
    input_ids = torch.randint(5, VOCAB_SIZE, (batch_size, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    input_ids[-1, length - 4:] = PAD
    attention_mask[-1, length - 4:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def pair_batch(batch_size: int = 4, length: int = 16, generator: torch.Generator | None = None) -> dict:
    """[CLS] A [SEP] B [SEP] [PAD]... rows with segment ids, random lengths, random next_sentence_label."""
    input_ids = torch.full((batch_size, length), PAD)
    token_type_ids = torch.zeros_like(input_ids)
    for row in range(batch_size):
        a_len = int(torch.randint(1, (length - 3) // 2 + 1, (1,), generator=generator))
        b_len = int(torch.randint(1, length - 3 - a_len + 1, (1,), generator=generator))
        a = torch.randint(5, VOCAB_SIZE, (a_len,), generator=generator)
        b = torch.randint(5, VOCAB_SIZE, (b_len,), generator=generator)
        row_ids = torch.cat([torch.tensor([CLS]), a, torch.tensor([SEP]), b, torch.tensor([SEP])])
        input_ids[row, :len(row_ids)] = row_ids
        token_type_ids[row, a_len + 2:len(row_ids)] = 1
    return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": (input_ids != PAD).long(),
            "next_sentence_label": torch.randint(0, 2, (batch_size,), generator=generator)}


ROOT = Path(__file__).resolve().parents[1]


def run_cli(*arguments: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`pretrain ARGUMENTS` in a fresh process (as a user runs it: exit status, stdout, stderr)."""
    return subprocess.run([sys.executable, "-m", "pretrain.cli", *arguments], capture_output=True, text=True, cwd=cwd)
