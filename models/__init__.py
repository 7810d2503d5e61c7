"""Pure PyTorch models: the configurable Transformer backbone, its heads, and Hugging Face weight interop."""

from models.config import PRESETS, TransformerConfig
from models.heads import ClassificationHead, LMHead, ModelWithHeads, Pooler, TokenScorer, make_head
from models.hf import from_hf, to_hf
from models.transformer import Transformer

__all__ = [
    "PRESETS", "TransformerConfig", "Transformer", "LMHead", "Pooler", "ClassificationHead", "TokenScorer",
    "ModelWithHeads", "make_head", "from_hf", "to_hf",
]
