"""The backbone's variants: parameter counts, sharing, masks, positions, initialisation."""

import dataclasses
import math

import pytest
import torch
from torch import Tensor

from models import LMHead, ModelWithHeads, Pooler, Transformer, TransformerConfig
from models.transformer import apply_rotary, rotary_angles, sinusoidal_table
from tests.helpers import stream_batch, tiny_config


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# Hugging Face's counts for the same configs (BertModel/AlbertModel include their pooler) and the papers' figures.
HF_COUNTS = {"bert-base": 109_482_240, "albert-base": 11_683_584, "albert-large": 17_683_968,
             "albert-xlarge": 58_724_864, "albert-xxlarge": 222_595_584, "electra-small": 13_483_008,
             "gpt2-small": 124_439_808}
PAPER_COUNTS = {"bert-base": 108e6, "albert-base": 12e6, "albert-large": 18e6, "albert-xlarge": 60e6,
                "albert-xxlarge": 235e6, "electra-small": 14e6, "gpt2-small": 124e6}


@pytest.mark.parametrize("name", sorted(HF_COUNTS))
def test_preset_parameter_counts(name):
    config = TransformerConfig.preset(name)
    with torch.device("meta"):  # counts only: no memory, no initialisation time
        total = Transformer(config).num_parameters()
        if name.startswith(("bert", "albert")):  # Hugging Face counts the [CLS] pooler in the base model
            total += count(Pooler(config))
    assert total == HF_COUNTS[name]
    assert abs(total / PAPER_COUNTS[name] - 1) < 0.06


def test_preset_counts_equal_hugging_face_models_built_from_same_configs():
    transformers = pytest.importorskip("transformers", reason="transformers is in the dev extras")
    from models.hf import hf_config_for

    classes = {"bert": transformers.BertModel, "albert": transformers.AlbertModel,
               "electra": transformers.ElectraModel, "gpt2": transformers.GPT2Model,
               "roberta": transformers.RobertaModel, "llama": transformers.LlamaForCausalLM,
               "modernbert": transformers.ModernBertModel}
    for name in ("bert-large", "electra-base", "electra-base-generator", "electra-small-generator", "gpt2-medium",
                 "roberta-base", "llama-style", "modernbert-base"):
        family = name.split("-")[0]
        config = TransformerConfig.preset(name)
        with torch.device("meta"):
            ours = Transformer(config).num_parameters() + (count(Pooler(config)) if family == "bert" else 0)
            if family == "llama":  # with its own (untied) output layer
                ours += count(LMHead(Transformer(config), transform=False, bias=False))
            if family == "roberta":  # its 2 position rows before padding_idx + 1, never used for real tokens
                ours += 2 * config.hidden_size
            hf_config = hf_config_for(config, family)
            theirs = classes[family](hf_config).num_parameters() if family != "roberta" else \
                classes[family](hf_config, add_pooling_layer=False).num_parameters()
        assert ours == theirs, name
    assert TransformerConfig.preset("llama-style").num_kv_heads == 4  # TinyLlama-1.1B's sizes: 1,100,048,384
    with torch.device("meta"):
        llama = TransformerConfig.preset("llama-style")
        assert Transformer(llama).num_parameters() + 32000 * 2048 == 1_100_048_384


def sizes(config: TransformerConfig) -> dict[str, int]:
    """Parameter counts computed from the sizes alone."""
    V, E, H, F, P, S = (config.vocab_size, config.embedding_size, config.hidden_size, config.intermediate_size,
                        config.max_position_embeddings, config.type_vocab_size)
    embeddings = (V + P + S) * E + 2 * E + (E * H + H if E != H else 0)
    attention = 3 * H * H + 3 * H + H * H + H + 2 * H
    ffn = H * F + F + F * H + H + 2 * H
    return dict(embeddings=embeddings, attention=attention, ffn=ffn)


@pytest.mark.parametrize("sharing", ["none", "all", "attention", "ffn"])
@pytest.mark.parametrize("num_layers", [2, 4, 6])
def test_sharing_counts(sharing, num_layers):
    config = TransformerConfig.preset("albert-tiny", sharing=sharing, num_layers=num_layers)
    s = sizes(config)
    attention_copies = 1 if sharing in ("all", "attention") else num_layers
    ffn_copies = 1 if sharing in ("all", "ffn") else num_layers
    expected = s["embeddings"] + attention_copies * s["attention"] + ffn_copies * s["ffn"]
    assert Transformer(config).num_parameters() == expected


def test_all_sharing_count_does_not_change_with_depth():
    counts = {Transformer(TransformerConfig.preset("albert-tiny", num_layers=n)).num_parameters() for n in (1, 3, 12)}
    assert len(counts) == 1


def test_shared_groups_follow_albert_order():
    config = TransformerConfig.preset("albert-tiny", num_layers=6, num_shared_groups=3)
    model = Transformer(config)
    assert len(model.attention_layers) == 3 and len(model.ffn_layers) == 3
    assert [a for a, _ in model.layer_order] == [0, 0, 1, 1, 2, 2]
    s = sizes(config)
    assert model.num_parameters() == s["embeddings"] + 3 * (s["attention"] + s["ffn"])


def test_shared_layers_run_each_time():
    """A model with all layers shared over 4 positions equals the same layer applied 4 times."""
    config = TransformerConfig.preset("albert-tiny", num_layers=4, dropout=0.0)
    model = Transformer(config).eval()
    one = Transformer(TransformerConfig.preset("albert-tiny", num_layers=1, dropout=0.0)).eval()
    one.load_state_dict(model.state_dict())
    ids = torch.randint(0, 1000, (2, 10))
    with torch.no_grad():
        x = one.embeddings(ids, None, torch.arange(10).expand(2, 10))
        for _ in range(4):
            x = one.ffn_layers[0](one.attention_layers[0](x, mask=None, is_causal=False, rotary=None))  # no cache
        assert torch.allclose(model(ids), x, atol=1e-6)


@pytest.mark.parametrize("position_embedding", ["learned", "sinusoidal", "rotary"])
def test_causal_outputs_ignore_future_tokens(position_embedding):
    config = TransformerConfig.preset("gpt2-tiny", position_embedding=position_embedding)
    model = Transformer(config).eval()
    ids = torch.randint(0, 1000, (2, 16))
    changed = ids.clone()
    changed[:, 9:] = torch.randint(0, 1000, (2, 7))
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert torch.equal(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


@pytest.mark.parametrize("preset", ["bert-tiny", "albert-tiny", "electra-tiny", "gpt2-tiny"])
def test_padding_never_changes_real_tokens(preset):
    model = Transformer(TransformerConfig.preset(preset)).eval()
    ids = torch.randint(1, 1000, (2, 10))
    padded = torch.cat([ids, torch.zeros(2, 6, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(2, 10), torch.zeros(2, 6)], dim=1).long()
    with torch.no_grad():
        short = model(ids)
        long = model(padded, attention_mask=mask)
    assert (long[:, :10] - short).abs().max() < 1e-6
    assert torch.isfinite(long).all()


def test_document_mask_keeps_packed_documents_apart():
    """Two packed documents give the hidden states each gives alone (positions restart per document)."""
    model = Transformer(TransformerConfig.preset("bert-tiny")).eval()
    first, second = torch.randint(1, 1000, (1, 7)), torch.randint(1, 1000, (1, 5))
    packed = torch.cat([first, second], dim=1)
    document_ids = torch.tensor([[0] * 7 + [1] * 5])
    position_ids = torch.tensor([list(range(7)) + list(range(5))])
    with torch.no_grad():
        together = model(packed, document_ids=document_ids, position_ids=position_ids)
        alone = torch.cat([model(first), model(second)], dim=1)
    assert (together - alone).abs().max() < 1e-5


def test_causal_document_mask_with_padding():
    model = Transformer(TransformerConfig.preset("gpt2-tiny")).eval()
    first, second = torch.randint(1, 1000, (1, 6)), torch.randint(1, 1000, (1, 4))
    packed = torch.cat([first, second, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    document_ids = torch.tensor([[0] * 6 + [1] * 4 + [2] * 3])
    position_ids = torch.tensor([list(range(6)) + list(range(4)) + [0, 1, 2]])
    mask = torch.tensor([[1] * 10 + [0] * 3])
    with torch.no_grad():
        together = model(packed, attention_mask=mask, document_ids=document_ids, position_ids=position_ids)
        alone = torch.cat([model(first), model(second)], dim=1)
    assert (together[:, :10] - alone).abs().max() < 1e-5
    assert torch.isfinite(together).all()


def test_sinusoidal_table_equals_formula():
    size = 16
    table = sinusoidal_table(50, size)
    for pos in (0, 1, 7, 49):
        for i in range(size // 2):
            angle = pos / 10000 ** (2 * i / size)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_sinusoidal_positions_are_used_and_not_saved():
    config = TransformerConfig.preset("bert-tiny", position_embedding="sinusoidal")
    model = Transformer(config).eval()
    assert not any("position" in key or "sinusoidal" in key for key in model.state_dict())
    ids = torch.randint(0, 1000, (1, 8))
    with torch.no_grad():
        word = model.embeddings.word(ids) + model.embeddings.token_type(torch.zeros_like(ids))
        expected = model.embeddings.norm(word + sinusoidal_table(128, 64)[:8])
        assert torch.allclose(model.embeddings(ids, None, torch.arange(8)[None]), expected, atol=1e-6)


def test_rotary_scores_depend_only_on_relative_position():
    q, k = torch.randn(2, 3, 10, 16), torch.randn(2, 3, 10, 16)
    positions = torch.arange(10).expand(2, 10)
    scores = []
    for shift in (0, 5, 123):
        cos, sin = rotary_angles(positions + shift, 16)
        scores.append(apply_rotary(q, cos, sin) @ apply_rotary(k, cos, sin).transpose(-1, -2))
    assert torch.allclose(scores[0], scores[1], atol=1e-4) and torch.allclose(scores[0], scores[2], atol=1e-4)
    assert not torch.allclose(scores[0], q @ k.transpose(-1, -2), atol=1e-2)  # the rotation does something


def test_rotary_model_is_invariant_to_position_shift():
    model = Transformer(TransformerConfig.preset("gpt2-tiny", position_embedding="rotary")).eval()
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        a = model(ids)
        b = model(ids, position_ids=torch.arange(12).expand(2, 12) + 40)
    assert (a - b).abs().max() < 1e-4
    assert not any("position" in key for key in model.state_dict())


def test_initialisation_std():
    config = TransformerConfig.preset("gpt2-small", vocab_size=2000, num_layers=4, max_position_embeddings=64)
    model = Transformer(config)
    std = config.initializer_range
    assert model.attention_layers[0].qkv.weight.std().item() == pytest.approx(std, rel=0.05)
    assert model.embeddings.word.weight.std().item() == pytest.approx(std, rel=0.05)
    scaled = std / math.sqrt(2 * config.num_layers)
    assert model.attention_layers[0].out.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert model.ffn_layers[3].down.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert model.attention_layers[0].qkv.bias.abs().max() == 0
    assert torch.equal(model.final_norm.weight, torch.ones(768))
    bert = Transformer(TransformerConfig.preset("bert-tiny", hidden_size=256, intermediate_size=1024))
    assert bert.attention_layers[0].out.weight.std().item() == pytest.approx(std, rel=0.05)


def test_norm_position_builds_the_right_norms():
    post = Transformer(TransformerConfig.preset("bert-tiny"))
    pre = Transformer(TransformerConfig.preset("gpt2-tiny"))
    assert isinstance(post.embeddings.norm, torch.nn.LayerNorm) and isinstance(post.final_norm, torch.nn.Identity)
    assert isinstance(pre.embeddings.norm, torch.nn.Identity) and isinstance(pre.final_norm, torch.nn.LayerNorm)


@pytest.mark.parametrize("norm_position", ["post", "pre"])
def test_pre_and_post_norm_compute_their_formulas(norm_position):
    """One layer by hand: post-LN x = LN(x + f(x)); pre-LN x = x + f(LN(x))."""
    config = TransformerConfig.preset("bert-tiny", norm_position=norm_position, dropout=0.0, attention_dropout=0.0)
    layer = Transformer(config).ffn_layers[0].eval()
    torch.nn.init.normal_(layer.norm.weight)
    x = torch.randn(2, 5, 64)

    def f(h):
        return layer.down(layer.activation(layer.up(h)))

    expected = layer.norm(x + f(x)) if norm_position == "post" else x + f(layer.norm(x))
    assert torch.allclose(layer(x), expected, atol=1e-6)


@pytest.mark.parametrize("activation, reference", [
    ("gelu", lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))),
    ("gelu_tanh", lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))),
    ("relu", lambda x: x.clamp(min=0)),
])
def test_activations(activation, reference):
    layer = Transformer(TransformerConfig.preset("bert-tiny", activation=activation)).ffn_layers[0]
    x = torch.linspace(-4, 4, 101)
    assert torch.allclose(layer.activation(x), reference(x), atol=1e-6)


def test_attention_is_scaled_dot_product():
    """Our attention layer equals softmax(q k^T / sqrt(D)) v written out by hand."""
    config = TransformerConfig.preset("bert-tiny", dropout=0.0, attention_dropout=0.0)
    attention = Transformer(config).attention_layers[0].eval()
    x = torch.randn(2, 6, 64)
    q, k, v = attention.qkv(x).view(2, 6, 3, 2, 32).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(32), dim=-1)
    expected = attention.out((weights @ v).transpose(1, 2).reshape(2, 6, 64))
    assert torch.allclose(attention.branch(x, mask=None, is_causal=False, rotary=None), expected, atol=1e-5)


def test_lm_head_is_tied_and_factorized():
    config = TransformerConfig.preset("albert-tiny")
    backbone = Transformer(config)
    model = ModelWithHeads(backbone, {"mlm": LMHead(backbone)})
    assert model.heads["mlm"].weight is backbone.embeddings.word.weight
    assert model.heads["mlm"].transform[0].weight.shape == (32, 64)  # H -> E
    out = model(torch.randint(0, 1000, (2, 5)))
    assert out["mlm"].shape == (2, 5, 1000)
    out["mlm"].sum().backward()
    assert backbone.embeddings.word.weight.grad is not None
    # A factorized model with GPT-2's plain head projects H -> E before the tied E -> V matrix.
    plain = LMHead(backbone, transform=False, bias=False)
    assert plain(torch.randn(3, 64)).shape == (3, 1000)


def test_sequence_longer_than_positions_is_a_clear_error():
    model = Transformer(TransformerConfig.preset("bert-tiny"))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 129, dtype=torch.long))


def test_bf16_autocast_stays_close_to_fp32():
    model = Transformer(TransformerConfig.preset("bert-tiny")).eval()
    ids = torch.randint(0, 1000, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(ids, attention_mask=mask)
    assert not torch.equal(half.float(), full)  # the matmuls really ran in bf16 (the final LayerNorm is fp32)
    assert ((half.float() - full).abs().max() / full.abs().max()).item() < 0.05


def test_dropout_acts_in_training_only():
    model = Transformer(TransformerConfig.preset("bert-tiny", dropout=0.0, attention_dropout=0.5))
    ids = torch.randint(0, 1000, (2, 16))
    assert not torch.allclose(model(ids), model(ids))  # attention dropout is wired
    model.eval()
    assert torch.equal(model(ids), model(ids))


def test_importing_models_does_not_import_transformers_or_lightning():
    import subprocess
    import sys

    code = "import sys, models; print('transformers' in sys.modules, 'pytorch_lightning' in sys.modules)"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.split() == ["False", "False"]


def test_rotary_angles_follow_the_formula_with_the_configured_base():
    positions = torch.tensor([[0, 3, 17]])
    for base in (10000.0, 500.0):
        cos, sin = rotary_angles(positions, 8, base)  # (1, 1, 3, 8)
        for t, pos in enumerate([0, 3, 17]):
            for i in range(4):
                angle = pos * base ** (-2 * i / 8)
                for column in (i, i + 4):  # rotate-half layout: each angle serves a pair (i, i + D/2)
                    assert cos[0, 0, t, column].item() == pytest.approx(math.cos(angle), abs=1e-5)
                    assert sin[0, 0, t, column].item() == pytest.approx(math.sin(angle), abs=1e-5)
    ids = torch.randint(0, 1000, (1, 12))
    torch.manual_seed(0)
    a = Transformer(TransformerConfig.preset("gpt2-tiny", position_embedding="rotary")).eval()
    torch.manual_seed(0)
    b = Transformer(TransformerConfig.preset("gpt2-tiny", position_embedding="rotary", rotary_base=50.0)).eval()
    with torch.no_grad():
        assert not torch.allclose(a(ids), b(ids))  # the model reads rotary_base


@pytest.mark.parametrize("preset", ["bert-tiny", "albert-tiny", "gpt2-tiny"])
def test_backbone_traces_without_graph_breaks(preset):
    """torch.compile sees the whole forward as one graph (padding mask and causal mask included)."""
    import torch._dynamo

    model = Transformer(TransformerConfig.preset(preset))
    ids = torch.randint(0, 1000, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(ids, attention_mask=mask)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_heads_are_rebuilt_from_their_spec_and_nothing_else_is_built():
    from models import ClassificationHead, TokenScorer, build_head, head_spec

    backbone = Transformer(TransformerConfig.preset("bert-tiny"))
    for head in (LMHead(backbone, transform=False, bias=False), ClassificationHead(backbone, num_labels=3),
                 TokenScorer(backbone)):
        spec = head_spec(head)
        rebuilt = build_head(spec, backbone)
        assert type(rebuilt) is type(head) and head_spec(rebuilt) == spec
        shapes = {k: v.shape for k, v in head.state_dict().items()}
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
    assert build_head(head_spec(LMHead(backbone)), backbone).weight is backbone.embeddings.word.weight  # tied again
    for spec in ({"class_path": "os.system", "init_args": {}}, {"class_path": "models.transformer.Transformer"},
                 {"class_path": "models.heads.Pooler"}):
        with pytest.raises(ValueError, match="not"):
            build_head(spec, backbone)


@pytest.mark.parametrize("position_embedding", ["learned", "sinusoidal"])
def test_concatenated_positions_sit_beside_the_tokens_and_both_halves_learn(position_embedding):
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=50, hidden_size=64, num_layers=2, num_heads=2, max_position_embeddings=32,
                               position_embedding=position_embedding, position_combine="concat", position_size=16,
                               norm_position="pre", dropout=0.0, attention_dropout=0.0)
    model = Transformer(config)
    embeddings = model.embeddings
    assert embeddings.word.weight.shape == (50, 48) and config.token_embedding_size == 48
    ids = torch.randint(0, 50, (2, 10))
    positions = torch.arange(10).expand(2, 10)
    out = embeddings(ids, None, positions)  # pre-LN, E == H: no norm, no projection: exactly the concatenation
    table = embeddings.position.weight if position_embedding == "learned" else embeddings.sinusoidal
    assert out.shape == (2, 10, 64)
    assert torch.equal(out[..., :48], embeddings.token_type(torch.zeros_like(ids)) + embeddings.word(ids))
    assert torch.equal(out[..., 48:], table[positions])
    head = LMHead(model, transform=False, bias=False)
    loss = head(model(ids)).logsumexp(-1).mean()
    loss.backward()
    assert embeddings.word.weight.grad.abs().sum() > 0
    if position_embedding == "learned":
        assert embeddings.position.weight.grad[:10].abs().sum() > 0 and embeddings.position.weight.grad[10:].eq(0).all()
    # the positions reach the output: the same tokens in another order give other states
    shuffled = model(ids.flip(1)).flip(1)
    assert not torch.allclose(model(ids), shuffled, atol=1e-4)


def test_concatenation_is_refused_where_it_cannot_apply():
    with pytest.raises(ValueError, match="needs position_size between 1 and embedding_size - 1"):
        TransformerConfig(position_combine="concat")
    with pytest.raises(ValueError, match="learned or sinusoidal"):
        TransformerConfig(position_combine="concat", position_size=64, position_embedding="rotary")
    with pytest.raises(ValueError, match="position_size=64 is for position_combine='concat'"):
        TransformerConfig(position_size=64)
    with pytest.raises(ValueError, match="sinusoidal positions need an even width, got 63"):
        TransformerConfig(position_combine="concat", position_size=63, position_embedding="sinusoidal")
    from models import to_hf

    config = TransformerConfig.preset("bert-tiny", position_combine="concat", position_size=16)
    backbone = Transformer(config)
    model = ModelWithHeads(backbone, {"mlm": LMHead(backbone)})
    with pytest.raises(ValueError, match="position_combine='concat' has no equivalent in Hugging Face bert"):
        to_hf(model)


def small(**overrides) -> TransformerConfig:
    return TransformerConfig(**{**dict(vocab_size=50, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96,
                                       max_position_embeddings=32, norm_position="pre", dropout=0.0,
                                       attention_dropout=0.0), **overrides})


@pytest.mark.parametrize("causal", [False, True])
def test_grouped_query_attention_equals_full_attention_with_each_kv_head_repeated(causal):
    """num_kv_heads=2 of 4: the same as a full multi-head model whose key and value heads are the grouped model's,
    each repeated for the two query heads of its group; with num_kv_heads = num_heads it is plain attention."""
    torch.manual_seed(0)
    grouped = Transformer(small(num_kv_heads=2, causal=causal)).eval()
    full = Transformer(small(causal=causal)).eval()
    state = grouped.state_dict()
    D, groups = 16, 2
    for key in [k for k in state if k.endswith("qkv.weight") or k.endswith("qkv.bias")]:
        q, k, v = state[key].split([64, 32, 32])
        repeat = (lambda t: t.view(2, D, *t.shape[1:]).repeat_interleave(groups, 0).reshape(64, *t.shape[1:]))
        state[key] = torch.cat([q, repeat(k), repeat(v)])
    full.load_state_dict(state)
    ids, mask = torch.randint(0, 50, (2, 12)), torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    torch.testing.assert_close(grouped(ids, attention_mask=mask), full(ids, attention_mask=mask), atol=1e-5, rtol=1e-5)
    assert grouped.attention_layers[0].qkv.weight.shape == (128, 64)  # 4 query + 2 key + 2 value heads of 16
    if causal:  # and through the KV cache, which keeps the 2 key/value heads only
        cache = grouped.new_cache()
        steps = torch.cat([grouped(ids[:, i:i + 1], cache=cache) for i in range(12)], dim=1)
        torch.testing.assert_close(steps, grouped(ids), atol=1e-5, rtol=1e-5)
        assert cache.slots[0][0].shape == (2, 2, 12, 16)
    with pytest.raises(ValueError, match="num_kv_heads \\(3\\) must divide num_heads \\(4\\)"):
        small(num_kv_heads=3)


def test_rmsnorm_gated_ffn_and_no_biases_compute_their_formulas():
    torch.manual_seed(0)
    config = small(norm="rmsnorm", ffn="glu", activation="silu", bias=False)
    model = Transformer(config)
    assert not [name for name, _ in model.named_parameters() if name.endswith("bias")]
    x = torch.randn(2, 5, 64)
    norm = model.ffn_layers[0].norm
    torch.testing.assert_close(norm(x), x * (x.pow(2).mean(-1, keepdim=True) + config.layer_norm_eps).rsqrt()
                               * norm.weight)
    ffn = model.ffn_layers[0]
    gate, value = ffn.up.weight.split(96)
    swiglu = (torch.nn.functional.silu(x @ gate.T) * (x @ value.T)) @ ffn.down.weight.T
    torch.testing.assert_close(ffn.branch(x), swiglu)
    assert ffn.up.weight.shape == (192, 64)
    layernorm = Transformer(small(bias=False)).ffn_layers[0].norm
    assert isinstance(layernorm, torch.nn.LayerNorm) and layernorm.bias is None


@pytest.mark.parametrize("field, value", [("norm", "rmsnorm"), ("ffn", "glu"), ("bias", False), ("num_kv_heads", 2),
                                          ("embedding_norm", False), ("tie_word_embeddings", False)])
def test_todays_fields_train_and_are_refused_for_the_older_hugging_face_families(field, value):
    from models import to_hf

    torch.manual_seed(0)
    config = small(**{field: value, "norm_position": "post"})
    backbone = Transformer(config)
    head = LMHead(backbone)
    ids = torch.randint(0, 50, (2, 10))
    loss = torch.nn.functional.cross_entropy(head(backbone(ids)).flatten(0, 1), ids.flatten())
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in backbone.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match=f"{field}={value!r} has no equivalent in Hugging Face bert"):
        to_hf(ModelWithHeads(backbone, {"mlm": head}))


@pytest.mark.parametrize("causal", [False, True])
def test_local_global_attention_equals_running_each_layer_with_its_dense_mask(causal):
    """ModernBERT's schedule: global_attention_every=3 makes layers 0 and 3 global and 1, 2 local (a window of 4:
    2 tokens on either side, or causal the 3 before); the model equals each layer run by hand with that mask."""
    torch.manual_seed(0)
    config = small(num_layers=4, local_attention_window=4, global_attention_every=3, causal=causal)
    model = Transformer(config).eval()
    ids, mask = torch.randint(0, 50, (2, 12)), torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    i, j = torch.arange(12)[:, None], torch.arange(12)[None, :]
    allowed = mask.bool()[:, None, None, :] & ((j <= i) if causal else torch.ones(12, 12, dtype=torch.bool))
    band = ((i - j >= 0) & (i - j < 4)) if causal else (i - j).abs() <= 2
    x = model.embeddings(ids, None, torch.arange(12).expand(2, 12))
    for layer in range(4):
        dense = allowed & band if layer in (1, 2) else allowed
        dense = dense | torch.eye(12, dtype=torch.bool)  # a padded query keeps itself (no NaN)
        x = model.ffn_layers[layer](model.attention_layers[layer](x, mask=dense, is_causal=False, rotary=None))
    torch.testing.assert_close(model(ids, attention_mask=mask), model.final_norm(x), atol=1e-5, rtol=1e-5)
    # a window wider than the sequence is global attention
    wide = Transformer(small(num_layers=4, local_attention_window=64, global_attention_every=3, causal=causal)).eval()
    full = Transformer(small(num_layers=4, causal=causal)).eval()
    full.load_state_dict(wide.state_dict())
    torch.testing.assert_close(wide(ids, attention_mask=mask), full(ids, attention_mask=mask))
    with pytest.raises(ValueError, match="global_attention_every needs a local_attention_window"):
        small(global_attention_every=3)


def test_local_attention_through_the_kv_cache_equals_a_full_forward():
    torch.manual_seed(0)
    model = Transformer(small(num_layers=3, local_attention_window=3, global_attention_every=2, causal=True)).eval()
    ids = torch.randint(0, 50, (2, 10))
    cache = model.new_cache()
    steps = torch.cat([model(ids[:, :4], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(4, 10)],
                      dim=1)
    torch.testing.assert_close(steps, model(ids), atol=1e-5, rtol=1e-5)


def test_the_embedding_norm_follows_the_norm_position_unless_set():
    assert isinstance(Transformer(small(norm_position="post")).embeddings.norm, torch.nn.LayerNorm)
    assert isinstance(Transformer(small()).embeddings.norm, torch.nn.Identity)  # pre-LN: none (GPT-2)
    modern = Transformer(small(embedding_norm=True))
    assert isinstance(modern.embeddings.norm, torch.nn.LayerNorm)  # pre-LN with one (ModernBERT)
    assert isinstance(modern.final_norm, torch.nn.LayerNorm)


CHECKPOINTED = {  # every variant the checkpointed layer passes through: shared layers, local/global and rotary, causal
    "bert": dict(), "albert": dict(embedding_size=32, sharing="all"),
    "modernbert": dict(norm_position="pre", position_embedding="rotary", local_attention_window=4,
                       global_attention_every=2, local_rotary_base=500.0, ffn="glu", bias=False),
    "gpt2": dict(causal=True, norm_position="pre", type_vocab_size=0),
}


def saved_bytes(model: Transformer, batch: dict) -> tuple[Tensor, list[Tensor], int]:
    """The sum of the hidden states (the loss), the gradients, and the bytes autograd kept for backward (outside
    the checkpointed layers, which keep their own input only)."""
    kept = []

    def pack(tensor):
        kept.append(tensor.numel() * tensor.element_size())
        return tensor

    torch.manual_seed(1)  # dropout on: the checkpointed layers must draw the same masks again in backward
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(batch["input_ids"], attention_mask=batch["attention_mask"]).pow(2).mean()
    model.zero_grad()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()], sum(kept)


@pytest.mark.parametrize("variant", list(CHECKPOINTED))
@pytest.mark.parametrize("every", [1, 2])
def test_activation_checkpointing_gives_the_same_gradients_keeping_less(variant, every):
    config = tiny_config(**CHECKPOINTED[variant], num_layers=4, dropout=0.1, attention_dropout=0.1)
    torch.manual_seed(0)
    plain = Transformer(config).train()
    checkpointed = Transformer(dataclasses.replace(config, activation_checkpointing="blocks",
                                                   checkpoint_every=every)).train()
    checkpointed.load_state_dict(plain.state_dict())
    batch = stream_batch(length=16)
    loss, gradients, kept = saved_bytes(plain, batch)
    loss_checkpointed, gradients_checkpointed, kept_checkpointed = saved_bytes(checkpointed, batch)
    assert torch.equal(loss, loss_checkpointed)
    for ours, reference in zip(gradients_checkpointed, gradients, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-7)
    assert kept_checkpointed < (0.35 if every == 1 else 0.7) * kept, (kept_checkpointed, kept)
    with torch.no_grad():  # evaluation and generation: nothing to recompute, the same outputs
        checkpointed.eval(), plain.eval()
        torch.testing.assert_close(checkpointed(batch["input_ids"]), plain(batch["input_ids"]), rtol=0, atol=0)
