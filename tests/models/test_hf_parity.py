"""Our backbone and heads against Hugging Face transformers on the same (random) weights, in fp32."""

import pytest
import torch

from models import ModelWithHeads, Transformer, TransformerConfig, from_hf, to_hf
from models.hf import from_hf_state_dict

transformers = pytest.importorskip("transformers", reason="transformers is in the dev extras")

SMALL = dict(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             max_position_embeddings=64)


def bert_config():
    return transformers.BertConfig(**SMALL)


def albert_config():
    return transformers.AlbertConfig(**dict(SMALL, num_hidden_layers=4), embedding_size=32, num_hidden_groups=2)


def electra_config():
    return transformers.ElectraConfig(**SMALL, embedding_size=32)


def roberta_config():  # positions numbered from pad_token_id + 1: its table has 2 more rows than positions used
    return transformers.RobertaConfig(**dict(SMALL, max_position_embeddings=66), type_vocab_size=1, pad_token_id=1)


def llama_config(tied: bool = False):  # grouped-query attention: 2 key/value heads for 4 query heads
    return transformers.LlamaConfig(vocab_size=99, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    rope_parameters={"rope_type": "default", "rope_theta": 500.0},
                                    tie_word_embeddings=tied)


def modernbert_config():  # 2 local layers (a window of 8 tokens) between global ones, rotary bases 10,000 and 500
    rope = {"full_attention": {"rope_type": "default", "rope_theta": 500.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    no_ids = dict.fromkeys(("pad_token_id", "bos_token_id", "eos_token_id", "cls_token_id", "sep_token_id"))
    return transformers.ModernBertConfig(vocab_size=99, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                         num_attention_heads=4, max_position_embeddings=64, local_attention=8,
                                         global_attn_every_n_layers=3, rope_parameters=rope, **no_ids)


def gpt2_config():
    return transformers.GPT2Config(vocab_size=99, n_embd=64, n_layer=2, n_head=4, n_positions=64)


CASES = {
    "BertModel": bert_config, "BertForPreTraining": bert_config, "BertForMaskedLM": bert_config,
    "AlbertModel": albert_config, "AlbertForPreTraining": albert_config,
    "ElectraModel": electra_config, "ElectraForPreTraining": electra_config, "ElectraForMaskedLM": electra_config,
    "GPT2Model": gpt2_config, "GPT2LMHeadModel": gpt2_config,
    "RobertaModel": roberta_config, "RobertaForMaskedLM": roberta_config,
    "LlamaModel": llama_config, "LlamaForCausalLM": llama_config,
    "ModernBertModel": modernbert_config, "ModernBertForMaskedLM": modernbert_config,
}
# Our head name -> the Hugging Face output that holds the same logits.
HF_OUTPUT = {"mlm": ("prediction_logits", "logits"), "nsp": ("seq_relationship_logits",),
             "sop": ("sop_logits",), "rtd": ("logits",), "clm": ("logits",)}


def make_hf(class_name: str):
    config = CASES[class_name]()
    config._attn_implementation = "eager"  # the plainest reference path
    model = getattr(transformers, class_name)(config).eval()
    with torch.no_grad():  # move every weight (LayerNorms and biases too) off its default so mix-ups show
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


def batch(class_name: str):
    """Three rows, two of them right-padded; segment ids where the family has two segments. RoBERTa's rows hold no
    real token with its pad id (1), and its padding is that id: it numbers positions by counting the others."""
    input_ids = torch.randint(0, 99, (3, 12))
    attention_mask = torch.ones(3, 12, dtype=torch.long)
    attention_mask[1, 8:] = 0
    attention_mask[2, 5:] = 0
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, 6:] = 1
    inputs = dict(attention_mask=attention_mask)
    if class_name.startswith("Roberta"):
        input_ids = input_ids.masked_fill(input_ids == 1, 5).masked_fill(attention_mask == 0, 1)
    elif not class_name.startswith(("GPT2", "Llama", "ModernBert")):
        inputs["token_type_ids"] = token_type_ids
    return input_ids, inputs


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def compare(ours_model, hf_model, class_name):
    input_ids, inputs = batch(class_name)
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        theirs = hf_model(input_ids, **inputs, output_hidden_states=True)
        if isinstance(ours_model, ModelWithHeads):
            ours = ours_model(input_ids, **inputs)
            hidden = ours["hidden_states"]
        else:
            hidden = ours_model(input_ids, **inputs)
    their_hidden = theirs.hidden_states[-1] if theirs.hidden_states is not None else theirs.last_hidden_state
    assert relative_error(hidden[real], their_hidden[real]) < 1e-5
    if isinstance(ours_model, ModelWithHeads):
        for head in ours_model.heads:
            name = next(n for n in HF_OUTPUT[head] if getattr(theirs, n, None) is not None)
            logits, their_logits = ours[head], getattr(theirs, name)
            if head in ("mlm", "rtd", "clm"):  # token-level logits: compare the real tokens only
                logits, their_logits = logits[real], their_logits[real]
            assert relative_error(logits, their_logits) < 1e-5, head


@pytest.mark.parametrize("class_name", sorted(CASES))
def test_from_hf_matches_hugging_face(class_name):
    hf_model = make_hf(class_name)
    ours = from_hf(hf_model).eval()
    expected_type = Transformer if class_name.endswith("Model") and "LMHead" not in class_name \
        else ModelWithHeads
    assert isinstance(ours, expected_type)
    compare(ours, hf_model, class_name)


@pytest.mark.parametrize("class_name", sorted(CASES))
def test_to_hf_round_trip_matches_hugging_face(class_name):
    hf_model = make_hf(class_name)
    back = to_hf(from_hf(hf_model).eval(), family="roberta" if class_name.startswith("Roberta") else None)
    assert type(back).__name__ == class_name
    back.config._attn_implementation = "eager"
    input_ids, inputs = batch(class_name)
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        a = hf_model(input_ids, **inputs, output_hidden_states=True)
        b = back(input_ids, **inputs, output_hidden_states=True)
    assert relative_error(b.hidden_states[-1][real], a.hidden_states[-1][real]) < 1e-5
    for name in ("prediction_logits", "logits", "seq_relationship_logits", "sop_logits"):
        if getattr(a, name, None) is not None:
            ours, theirs = getattr(b, name), getattr(a, name)
            if ours.shape[:2] == real.shape:  # token-level: the real tokens (RoBERTa's padding rows are not kept)
                ours, theirs = ours[real], theirs[real]
            assert relative_error(ours, theirs) < 1e-5, name


def test_published_checkpoint_layout_loads():
    """Published checkpoints carry buffers, a base-model prefix (or none) and TF-style LayerNorm gamma/beta."""
    hf_model = make_hf("BertForPreTraining")
    state = {}
    for key, value in hf_model.state_dict().items():
        key = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        state[key] = value
    state["bert.embeddings.position_ids"] = torch.arange(64)[None]
    ours = from_hf_state_dict(state, hf_model.config, heads=("mlm", "nsp")).eval()
    compare(ours, hf_model, "BertForPreTraining")

    gpt2 = make_hf("GPT2Model")
    state = dict(gpt2.state_dict())
    state.update({f"h.{i}.attn.bias": torch.ones(1, 1, 64, 64).tril() for i in range(2)})  # old causal buffers
    compare(from_hf_state_dict(state, gpt2.config).eval(), gpt2, "GPT2Model")


def test_from_hf_rejects_missing_and_unknown_weights():
    hf_model = make_hf("BertModel")
    state = dict(hf_model.state_dict())
    del state["encoder.layer.1.output.dense.weight"]
    with pytest.raises(ValueError, match="lacks 1 weights"):
        from_hf_state_dict(state, hf_model.config)
    state = dict(hf_model.state_dict(), **{"encoder.layer.1.adapter.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match="no place here"):
        from_hf_state_dict(state, hf_model.config)


@pytest.mark.parametrize(
    "overrides, family, field",
    [
        (dict(position_embedding="rotary"), "bert", "position_embedding"),
        (dict(norm_position="pre"), "bert", "norm_position"),
        (dict(embedding_size=32), "bert", "embedding_size"),
        (dict(sharing="attention"), "albert", "sharing"),
        (dict(sharing="all"), "electra", "sharing"),
        (dict(position_embedding="sinusoidal", norm_position="pre", causal=True, type_vocab_size=0), "gpt2",
         "position_embedding"),
    ],
)
def test_to_hf_names_the_field_without_equivalent(overrides, family, field):
    config = TransformerConfig.preset("bert-tiny", **overrides)
    with pytest.raises(ValueError, match=field):
        to_hf(Transformer(config), family=family)


def test_unsupported_class_is_named():
    model = transformers.BertForSequenceClassification(bert_config())
    with pytest.raises(ValueError, match="BertForSequenceClassification is not supported"):
        from_hf(model)


def test_pretrain_load_reads_a_hugging_face_roberta_directory(tmp_path):
    """A RobertaForMaskedLM directory (weights, config, a byte-level BPE tokenizer with RoBERTa's ids: <s> 0,
    <pad> 1, </s> 2) loads with `pretrain.load`, and gives Hugging Face's logits on the tokenizer's own input."""
    import pretrain
    from pretrain.data.tokenizer import train_tokenizer

    tokenizer = train_tokenizer([f"the {w} sat on the mat." for w in ("cat", "dog", "fox")] * 30, "bpe", 128)
    assert [tokenizer.token_to_id(t) for t in ("<s>", "<pad>", "</s>")] == [0, 1, 2]
    sizes = dict(SMALL, vocab_size=tokenizer.get_vocab_size(), max_position_embeddings=66)
    config = transformers.RobertaConfig(**sizes, type_vocab_size=1, pad_token_id=1)
    hf_model = transformers.RobertaForMaskedLM(config).eval()
    hf_model.save_pretrained(tmp_path)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    loaded = pretrain.load(tmp_path)
    ids = torch.tensor(loaded.tokenize(["the fox sat on the mat."]))
    assert ids[0, 0] == 0 and ids[0, -1] == 2
    with torch.no_grad():
        assert relative_error(loaded.model(ids)["mlm"], hf_model(ids).logits) < 1e-5


def test_a_llama_with_tied_embeddings_round_trips():
    hf_model = transformers.LlamaForCausalLM(llama_config(tied=True)).eval()
    ours = from_hf(hf_model).eval()
    assert ours.heads["clm"].weight is ours.backbone.embeddings.word.weight
    compare(ours, hf_model, "LlamaForCausalLM")
    back = to_hf(ours)
    assert back.config.tie_word_embeddings and back.lm_head.weight is back.model.embed_tokens.weight
    input_ids, inputs = batch("LlamaForCausalLM")
    with torch.no_grad():
        assert relative_error(back(input_ids, **inputs).logits, hf_model(input_ids, **inputs).logits) < 1e-5
