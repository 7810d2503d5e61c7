import pytest

from models import PRESETS, Transformer, TransformerConfig


def test_defaults_are_bert_base():
    config = TransformerConfig()
    assert config == TransformerConfig.preset("bert-base")
    assert config.intermediate_size == 3072 and config.embedding_size == 768 and config.head_size == 64


@pytest.mark.parametrize("name", sorted(n for n in PRESETS if n.endswith(("tiny", "tiny-generator"))))
def test_tiny_presets_build_and_run(name):
    import torch

    model = Transformer(TransformerConfig.preset(name))
    assert model(torch.randint(0, 1000, (2, 8))).shape == (2, 8, model.config.hidden_size)


def test_round_trip_through_dict():
    config = TransformerConfig.preset("albert-base", num_layers=4)
    assert TransformerConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(hidden_size=100, num_heads=3), "divisible by num_heads"),
        (dict(norm_position="middle"), "norm_position='middle' is not one of"),
        (dict(position_embedding="alibi"), "position_embedding='alibi'"),
        (dict(sharing="some"), "sharing='some'"),
        (dict(num_shared_groups=2), "needs cross-layer sharing"),
        (dict(sharing="all", num_layers=6, num_shared_groups=4), "divisible by num_shared_groups"),
        (dict(position_embedding="rotary", hidden_size=66, num_heads=2), "even head size"),
        (dict(dropout=1.0), "dropout must be in"),
        (dict(num_layers=0), "num_layers must be a positive integer"),
        (dict(type_vocab_size=-1), "type_vocab_size"),
    ],
)
def test_invalid_configs_are_rejected_with_a_clear_message(fields, message):
    with pytest.raises(ValueError, match=message):
        TransformerConfig(**fields)


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="unknown preset 'bert-huge'"):
        TransformerConfig.preset("bert-huge")
    with pytest.raises(ValueError, match="unknown TransformerConfig fields: \\['hidden'\\]"):
        TransformerConfig.from_dict({"hidden": 3})
