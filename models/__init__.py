"""Pure PyTorch models: the configurable Transformer backbone, its heads, and Hugging Face weight interop."""

from models.config import PRESETS, ConfigError, TransformerConfig
from models.heads import (
    ClassificationHead,
    Head,
    LastTokenClassifier,
    LMHead,
    MeanPoolingClassifier,
    ModelWithHeads,
    Pooler,
    SequenceHead,
    TokenScorer,
    build_head,
    head_spec,
)
from models.hf import from_hf, to_hf
from models.transformer import Transformer

__all__ = [
    "PRESETS", "ConfigError", "TransformerConfig", "Transformer", "Head", "LMHead", "Pooler", "ClassificationHead",
    "SequenceHead", "LastTokenClassifier", "MeanPoolingClassifier", "TokenScorer",
    "ModelWithHeads", "head_spec", "build_head", "from_hf", "to_hf",
]
