"""pretrain: self-supervised pretraining of Transformer language models on your own corpus."""

__version__ = "0.1.0"


def load(path):
    """A trained model and its tokenizer (`pretrain.downstream.pretrained.Pretrained`: `.encode(texts)`,
    `.generate(prompts)`) from a `.ckpt` of `pretrain fit`, a directory of `pretrain export`, or a Hugging Face BERT /
    ALBERT / ELECTRA / GPT-2 directory. (Imported on use: `import pretrain` stays light for the command line.)"""
    from pretrain.downstream.pretrained import load as load_pretrained

    return load_pretrained(path)
