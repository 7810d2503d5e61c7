"""A tiny causal model with a BPE tokenizer, shared by the fine-tuning and zero-shot tests."""

from pathlib import Path

import numpy as np
import pytest
import torch

from models import TransformerConfig
from pretrain.data.tokenizer import train_tokenizer
from pretrain.downstream.pretrained import Pretrained, model_with_heads

GOOD, BAD = ["good", "great", "fine", "lovely"], ["bad", "awful", "poor", "dull"]
CLM_HEAD = {"clm": {"class_path": "models.heads.LMHead", "init_args": {"transform": False, "bias": False}}}


def causal_config(vocab_size: int, **overrides) -> TransformerConfig:
    return TransformerConfig.preset("gpt2-tiny", vocab_size=vocab_size, max_position_embeddings=64,
                                    **{"dropout": 0.0, "attention_dropout": 0.0, **overrides})


@pytest.fixture(scope="module")
def causal_dir(tmp_path_factory) -> Path:
    """A tiny random GPT (CLM head) with a byte-level BPE tokenizer, saved as an export directory."""
    words = GOOD + BAD + ["the", "film", "was", "plot", "and", "a", "very", "positive", "negative"]
    texts = [" ".join(np.random.default_rng(i).choice(words, 6)) for i in range(300)]
    tokenizer = train_tokenizer(texts, "bpe", 300)
    directory = tmp_path_factory.mktemp("gpt")
    torch.manual_seed(0)
    model = model_with_heads(causal_config(tokenizer.get_vocab_size(), dropout=0.1), CLM_HEAD)
    Pretrained(model, tokenizer).save(directory)
    return directory
