"""pretrain: self-supervised pretraining of Transformer language models on your own corpus."""

__version__ = "0.1.0"
