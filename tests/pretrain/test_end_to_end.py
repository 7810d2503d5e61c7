"""The data module feeds the training module: corpus -> tokenizer -> batches -> objectives, through Lightning."""

import pytest
import pytorch_lightning as pl

from models import TransformerConfig
from objectives import CausalLM, MaskedLM, NextSentencePrediction, ReplacedTokenDetection, SentenceOrderPrediction
from pretrain.data.datamodule import PretrainingDataModule
from pretrain.data.tokenizer import check_vocabulary, special_ids, train_tokenizer
from pretrain.sample import BUNDLED_CORPUS
from pretrain.training.module import PretrainingModule


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizers")
    text = BUNDLED_CORPUS.read_text().split("\n\n")[:2000]
    paths = {}
    for kind in ("wordpiece", "bpe"):
        paths[kind] = directory / f"{kind}.json"
        train_tokenizer(text, kind, 500).save(str(paths[kind]))
    return paths


RECIPES = {
    "bert": ("wordpiece", dict(layout="pairs", pair_task="nsp"), lambda s: [MaskedLM(s.mask, s.all()),
                                                                            NextSentencePrediction()], {}),
    "albert": ("wordpiece", dict(layout="pairs", pair_task="sop"), lambda s: [MaskedLM(s.mask, s.all()),
                                                                              SentenceOrderPrediction()],
               dict(embedding_size=32, sharing="all")),
    "roberta-wwm": ("bpe", dict(word_starts=True), lambda s: [MaskedLM(s.mask, s.all(), whole_word=True)], {}),
    "electra": ("wordpiece", {}, lambda s: [ReplacedTokenDetection(s.mask, s.all())], dict(embedding_size=32)),
    "gpt": ("bpe", dict(cls_first=False), lambda s: [CausalLM()], dict(causal=True, norm_position="pre")),
}


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_trains_on_the_bundled_corpus(recipe, precision, tokenizers, tmp_path):
    kind, data_options, objectives, model_options = RECIPES[recipe]
    data = PretrainingDataModule([str(BUNDLED_CORPUS)], str(tokenizers[kind]), max_length=32, batch_size=4,
                                 cache_dir=str(tmp_path / "cache"), **data_options)
    config = TransformerConfig.preset("bert-tiny", vocab_size=data.vocab_size, max_position_embeddings=32,
                                      **model_options)
    check_vocabulary(data.tokenizer, config.vocab_size)
    module = PretrainingModule(config, objectives(special_ids(data.tokenizer)), learning_rate=1e-3, warmup_steps=1)
    trainer = pl.Trainer(max_steps=3, limit_val_batches=2, val_check_interval=3, accelerator="cpu", logger=False,
                         precision=precision, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    metrics = trainer.callback_metrics
    assert metrics["train/loss"].isfinite() and metrics["val/loss"].isfinite()
