"""Pretraining objectives, one module each: they corrupt the batch, own their heads and compute their losses.

They build on `models` and never read files. See `objectives.base` for the contract.
"""

from objectives.base import Batch, Objective, ObjectiveOutput, TokenIds, check_combination
from objectives.clm import CausalLM
from objectives.masking import IGNORE_INDEX, gather_selected, mask_tokens
from objectives.mlm import MaskedLM
from objectives.nsp import NextSentencePrediction
from objectives.rtd import ReplacedTokenDetection
from objectives.sop import SentenceOrderPrediction, swap_segments

__all__ = [
    "Batch", "Objective", "ObjectiveOutput", "TokenIds", "check_combination", "IGNORE_INDEX", "mask_tokens",
    "gather_selected",
    "MaskedLM", "NextSentencePrediction", "SentenceOrderPrediction", "swap_segments",
    "ReplacedTokenDetection", "CausalLM",
]
