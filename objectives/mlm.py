"""Masked language modelling (BERT): predict the selected tokens from their corrupted context."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from models import LMHead, Transformer
from models.config import ConfigError
from objectives.base import (
    Batch,
    Objective,
    ObjectiveOutput,
    TokenIds,
    label_cross_entropy,
    replacement_vocab_size,
    resolve_masking_ids,
)
from objectives.masking import (
    IGNORE_INDEX,
    gather_at,
    gather_selected,
    mask_tokens,
    max_selected,
    selected_positions,
)


class MaskedLM(Objective):
    """BERT's MLM: `mask_prob` of the tokens selected, 80/10/10 [MASK]/random/kept (`replace_probs`), the tied LM
    head applied at the selected positions only. Each row has round(`mask_prob` x its maskable tokens) selected (BERT's
    own rule), or `num_masked` tokens: either way the output layer's input has a static shape and the step never
    waits for the device (best on GPUs and with torch.compile). `whole_word` selects whole words instead, each with
    probability `mask_prob` (needs `word_starts` in the batch; a varying count: one host sync per step).
    """

    name = "mlm"
    corrupts_tokens = True
    language_model = True

    def __init__(
        self,
        mask_token_id: int | None = None,
        special_ids: Sequence[int] | None = None,
        mask_prob: float = 0.15,
        replace_probs: tuple[float, float, float] = (0.8, 0.1, 0.1),
        whole_word: bool = False,
        num_masked: int | None = None,
        weight: float = 1.0,
    ):
        super().__init__(weight)
        self.mask_token_id = mask_token_id  # None: the tokenizer's, given at bind
        self.special_ids = list(special_ids) if special_ids is not None else None
        self.mask_prob = mask_prob
        self.replace_probs = tuple(replace_probs)
        self.whole_word = whole_word
        self.num_masked = num_masked

    def bind(self, backbone: Transformer, tokens: TokenIds | None = None) -> None:
        self.mask_token_id, self.special_ids = resolve_masking_ids(
            "MaskedLM", self.mask_token_id, self.special_ids, tokens)
        self.vocab_size = replacement_vocab_size(tokens, backbone)
        super().bind(backbone, tokens)

    def make_head(self, backbone: Transformer) -> LMHead:
        return LMHead(backbone)

    def output_layer_share(self) -> float:
        return self.mask_prob  # the output layer runs at the selected positions only

    def data_requirements(self) -> dict[str, object]:
        return {"word_starts": True} if self.whole_word else {}

    def corrupt(self, batch: Batch, generator: torch.Generator | None = None) -> Batch:
        if self.whole_word and "word_starts" not in batch:
            raise ConfigError("whole-word masking needs word_starts in the batch; enable them in the data module")
        corrupted, labels = mask_tokens(
            batch["input_ids"], mask_token_id=self.mask_token_id, vocab_size=self.vocab_size,
            special_ids=self.special_ids, mask_prob=self.mask_prob, generator=generator,
            replace_probs=self.replace_probs, word_starts=batch.get("word_starts") if self.whole_word else None,
            num_masked=self.num_masked, attention_mask=batch.get("attention_mask"),
        )
        return {**batch, "input_ids": corrupted, "mlm_labels": labels}

    def selected_per_row(self, length: int) -> int | None:
        """The static number of predictions per row of `length` tokens (None with whole-word masking)."""
        return None if self.whole_word else max_selected(length, self.mask_prob, self.num_masked)

    def predict(self, hidden_states: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Logits (N, V) and labels (N,) at the selected positions: the output layer sees those alone. With the
        static count, N = B x k (k = `selected_per_row(T)`, labels -100 on the unused places), and the (B, k)
        positions they come from are returned too; None with whole-word masking (boolean gather)."""
        per_row = self.selected_per_row(labels.shape[1])
        if per_row is None:
            hidden, labels = gather_selected(hidden_states, labels)
            return self.head(hidden), labels, None
        positions = selected_positions(labels, per_row)
        hidden, labels = gather_at(hidden_states, labels, positions)
        return self.head(hidden), labels, positions

    def forward(self, hidden_states: torch.Tensor, batch: Batch) -> ObjectiveOutput:
        logits, labels, _ = self.predict(hidden_states, batch["mlm_labels"])
        loss, correct = label_cross_entropy(logits, labels, overwrite_logits=True)  # nothing else reads them
        return ObjectiveOutput(loss, correct, counted=(labels != IGNORE_INDEX).float())
