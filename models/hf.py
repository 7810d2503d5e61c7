"""Weight interop with Hugging Face transformers for the four families: BERT, ALBERT, ELECTRA and GPT-2.

`from_hf(hf_model)` returns our `Transformer` (base models) or a `ModelWithHeads` (pretraining models);
`to_hf(model)` is the inverse. Both go through one table per family that lists, for each of our parameters,
the Hugging Face parameters it is made of and how ("copy", "cat" for fused QKV, "t" for GPT-2's Conv1D).
`transformers` is imported only when one of these functions is called.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from models.config import ConfigError, TransformerConfig
from models.heads import ClassificationHead, LMHead, ModelWithHeads, TokenScorer
from models.transformer import Transformer

# Hugging Face class -> (family, our head names). The families' base-model prefixes are in PREFIX.
HF_CLASSES: dict[str, tuple[str, tuple[str, ...]]] = {
    "BertModel": ("bert", ()),
    "BertForPreTraining": ("bert", ("mlm", "nsp")),
    "BertForMaskedLM": ("bert", ("mlm",)),
    "AlbertModel": ("albert", ()),
    "AlbertForPreTraining": ("albert", ("mlm", "sop")),
    "AlbertForMaskedLM": ("albert", ("mlm",)),
    "ElectraModel": ("electra", ()),
    "ElectraForPreTraining": ("electra", ("rtd",)),
    "ElectraForMaskedLM": ("electra", ("mlm",)),
    "GPT2Model": ("gpt2", ()),
    "GPT2LMHeadModel": ("gpt2", ("clm",)),
    "RobertaModel": ("roberta", ()),
    "RobertaForMaskedLM": ("roberta", ("mlm",)),
    "LlamaModel": ("llama", ()),
    "LlamaForCausalLM": ("llama", ("clm",)),
    "ModernBertModel": ("modernbert", ()),
    "ModernBertForMaskedLM": ("modernbert", ("mlm",)),
}
PREFIX = {"bert": "bert", "albert": "albert", "electra": "electra", "gpt2": "transformer", "roberta": "roberta",
          "llama": "model", "modernbert": "model"}
# RoBERTa numbers positions from padding_idx + 1 (its pad id is 1): its position table's first two rows are never
# used for real tokens, and our position 0 is its row 2.
ROBERTA_PAD_ID = 1
ROBERTA_OFFSET = ROBERTA_PAD_ID + 1

# Hugging Face keys that hold no weights of their own: buffers, and output matrices tied to the input embeddings.
IGNORED_SUFFIXES = (
    "embeddings.position_ids", "embeddings.token_type_ids", "attn.bias", "attn.masked_bias",
    "predictions.decoder.weight", "predictions.decoder.bias", "generator_lm_head.weight", "lm_head.weight",
    "lm_head.decoder.weight", "lm_head.decoder.bias", "decoder.weight",
)

HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
                  "silu": "silu"}
TO_HF_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}
# Fields of today's families that the older families lack: their defaults are required there.
NEWER_FIELDS = dict(position_combine="sum", ffn="mlp", norm="layernorm", bias=True, tie_word_embeddings=True)

# Config fields that must have these values for a family to hold the model (the rest map one to one).
REQUIREMENTS: dict[str, dict[str, Any]] = {
    "bert": dict(norm_position="post", position_embedding="learned", causal=False, sharing="none"),
    "electra": dict(norm_position="post", position_embedding="learned", causal=False, sharing="none"),
    "roberta": dict(norm_position="post", position_embedding="learned", causal=False, sharing="none"),
    "llama": dict(norm_position="pre", position_embedding="rotary", causal=True, sharing="none", type_vocab_size=0,
                  position_combine="sum", ffn="glu", norm="rmsnorm", bias=False, activation="silu",
                  local_attention_window=None),
    "modernbert": dict(norm_position="pre", embedding_norm=True, position_embedding="rotary", causal=False,
                       sharing="none", type_vocab_size=0, position_combine="sum", ffn="glu", norm="layernorm",
                       tie_word_embeddings=True),
    "albert": dict(norm_position="post", position_embedding="learned", causal=False),
    "gpt2": dict(norm_position="pre", position_embedding="learned", causal=True, sharing="none", type_vocab_size=0),
}

Entry = tuple[str, tuple[str, ...], str]  # (our key, Hugging Face keys, how: "copy" | "cat" | "t")


def _linear(ours: str, theirs: str, how: str = "copy") -> list[Entry]:
    """Weight and bias of a Linear or LayerNorm (GPT-2's Conv1D weights are transposed: how="t")."""
    return [(f"{ours}.weight", (f"{theirs}.weight",), how), (f"{ours}.bias", (f"{theirs}.bias",), "copy")]


def _qkv(ours: str, theirs: str) -> list[Entry]:
    """Our fused QKV projection from separate query, key and value Linears."""
    return [
        (f"{ours}.qkv.{p}", tuple(f"{theirs}.{name}.{p}" for name in ("query", "key", "value")), "cat")
        for p in ("weight", "bias")
    ]


def _weight(ours: str, theirs: str) -> list[Entry]:
    return [(f"{ours}.weight", (f"{theirs}.weight",), "copy")]


def _llama_entries(config: TransformerConfig) -> list[Entry]:
    """Llama's backbone: RMSNorms and Linears without biases; q, k, v and the gate and up projections fused here."""
    entries = [*_weight("embeddings.word", "embed_tokens"), *_weight("final_norm", "norm")]
    for i in range(config.num_layers):
        layer = f"layers.{i}"
        entries += [*_weight(f"attention_layers.{i}.norm", f"{layer}.input_layernorm"),
                    (f"attention_layers.{i}.qkv.weight",
                     tuple(f"{layer}.self_attn.{n}_proj.weight" for n in "qkv"), "cat"),
                    *_weight(f"attention_layers.{i}.out", f"{layer}.self_attn.o_proj"),
                    *_weight(f"ffn_layers.{i}.norm", f"{layer}.post_attention_layernorm"),
                    (f"ffn_layers.{i}.up.weight", (f"{layer}.mlp.gate_proj.weight", f"{layer}.mlp.up_proj.weight"),
                     "cat"),
                    *_weight(f"ffn_layers.{i}.down", f"{layer}.mlp.down_proj")]
    return entries


def _modernbert_entries(config: TransformerConfig) -> list[Entry]:
    """ModernBERT's backbone: LayerNorms (biases only with `bias`), a fused Wqkv like ours, GeGLU's Wi = [act input,
    gate]; its first layer has no attention norm (the embedding norm precedes it)."""
    linear = _linear if config.bias else _weight
    entries = [*_weight("embeddings.word", "embeddings.tok_embeddings"), *linear("embeddings.norm", "embeddings.norm"),
               *linear("final_norm", "final_norm")]
    for i in range(config.num_layers):
        layer = f"layers.{i}"
        entries += [*linear(f"attention_layers.{i}.qkv", f"{layer}.attn.Wqkv"),
                    *linear(f"attention_layers.{i}.out", f"{layer}.attn.Wo"),
                    *linear(f"ffn_layers.{i}.norm", f"{layer}.mlp_norm"),
                    *linear(f"ffn_layers.{i}.up", f"{layer}.mlp.Wi"),
                    *linear(f"ffn_layers.{i}.down", f"{layer}.mlp.Wo")]
        if i > 0:
            entries += linear(f"attention_layers.{i}.norm", f"{layer}.attn_norm")
    return entries


def _backbone_entries(family: str, config: TransformerConfig) -> list[Entry]:
    """Entries for the backbone, with Hugging Face keys relative to the base model."""
    if family == "llama":
        return _llama_entries(config)
    if family == "modernbert":
        return _modernbert_entries(config)
    if family == "gpt2":
        entries = [("embeddings.word.weight", ("wte.weight",), "copy"),
                   ("embeddings.position.weight", ("wpe.weight",), "copy"), *_linear("final_norm", "ln_f")]
        for i in range(config.num_layers):
            entries += [*_linear(f"attention_layers.{i}.norm", f"h.{i}.ln_1"),
                        *_linear(f"attention_layers.{i}.qkv", f"h.{i}.attn.c_attn", "t"),
                        *_linear(f"attention_layers.{i}.out", f"h.{i}.attn.c_proj", "t"),
                        *_linear(f"ffn_layers.{i}.norm", f"h.{i}.ln_2"),
                        *_linear(f"ffn_layers.{i}.up", f"h.{i}.mlp.c_fc", "t"),
                        *_linear(f"ffn_layers.{i}.down", f"h.{i}.mlp.c_proj", "t")]
        return entries
    entries = [("embeddings.word.weight", ("embeddings.word_embeddings.weight",), "copy"),
               ("embeddings.position.weight", ("embeddings.position_embeddings.weight",),
                "offset" if family == "roberta" else "copy"),
               ("embeddings.token_type.weight", ("embeddings.token_type_embeddings.weight",), "copy"),
               *_linear("embeddings.norm", "embeddings.LayerNorm")]
    if family == "albert":
        entries += _linear("embeddings.projection", "encoder.embedding_hidden_mapping_in")
        num_groups = config.num_shared_groups if config.sharing == "all" else config.num_layers
        for g in range(num_groups):
            layer = f"encoder.albert_layer_groups.{g}.albert_layers.0"
            entries += [*_qkv(f"attention_layers.{g}", f"{layer}.attention"),
                        *_linear(f"attention_layers.{g}.out", f"{layer}.attention.dense"),
                        *_linear(f"attention_layers.{g}.norm", f"{layer}.attention.LayerNorm"),
                        *_linear(f"ffn_layers.{g}.up", f"{layer}.ffn"),
                        *_linear(f"ffn_layers.{g}.down", f"{layer}.ffn_output"),
                        *_linear(f"ffn_layers.{g}.norm", f"{layer}.full_layer_layer_norm")]
        return entries
    if config.embedding_size != config.hidden_size:  # ELECTRA's projection exists only then
        entries += _linear("embeddings.projection", "embeddings_project")
    for i in range(config.num_layers):
        layer = f"encoder.layer.{i}"
        entries += [*_qkv(f"attention_layers.{i}", f"{layer}.attention.self"),
                    *_linear(f"attention_layers.{i}.out", f"{layer}.attention.output.dense"),
                    *_linear(f"attention_layers.{i}.norm", f"{layer}.attention.output.LayerNorm"),
                    *_linear(f"ffn_layers.{i}.up", f"{layer}.intermediate.dense"),
                    *_linear(f"ffn_layers.{i}.down", f"{layer}.output.dense"),
                    *_linear(f"ffn_layers.{i}.norm", f"{layer}.output.LayerNorm")]
    return entries


# Each head's entries, by (family, head); our keys relative to the head, Hugging Face keys relative to the
# pretraining model, except pooler keys, which sit in the base model (its prefix removed).
HEAD_ENTRIES: dict[tuple[str, str], list[Entry]] = {
    ("bert", "mlm"): [*_linear("transform.0", "cls.predictions.transform.dense"),
                      *_linear("transform.2", "cls.predictions.transform.LayerNorm"),
                      ("bias", ("cls.predictions.bias",), "copy")],
    ("bert", "nsp"): [*_linear("pooler.dense", "pooler.dense"), *_linear("classifier", "cls.seq_relationship")],
    ("albert", "mlm"): [*_linear("transform.0", "predictions.dense"), *_linear("transform.2", "predictions.LayerNorm"),
                        ("bias", ("predictions.bias",), "copy")],
    ("albert", "sop"): [*_linear("pooler.dense", "pooler"), *_linear("classifier", "sop_classifier.classifier")],
    ("electra", "rtd"): [*_linear("dense", "discriminator_predictions.dense"),
                         *_linear("out", "discriminator_predictions.dense_prediction")],
    ("electra", "mlm"): [*_linear("transform.0", "generator_predictions.dense"),
                         *_linear("transform.2", "generator_predictions.LayerNorm"),
                         ("bias", ("generator_lm_head.bias",), "copy")],
    ("gpt2", "clm"): [],  # GPT-2's output layer is the (tied) input embedding matrix, nothing else
    ("llama", "clm"): [],  # tied; an untied output matrix is added in `_entries`
    ("modernbert", "mlm"): [*_weight("transform.0", "head.dense"), *_weight("transform.2", "head.norm"),
                            ("bias", ("decoder.bias",), "copy")],  # head biases only with `bias`: see _entries
    ("roberta", "mlm"): [*_linear("transform.0", "lm_head.dense"), *_linear("transform.2", "lm_head.layer_norm"),
                         ("bias", ("lm_head.bias",), "copy")],
}


def _make_head(family: str, name: str, backbone: Transformer) -> nn.Module:
    """Our head for one of the Hugging Face heads `HF_CLASSES` names (the roles of these classes' heads)."""
    if name == "mlm":  # ELECTRA's generator head hard-codes exact GELU whatever hidden_act says
        return LMHead(backbone, activation="gelu" if family == "electra" else None)
    if name == "clm":
        return LMHead(backbone, transform=False, bias=False)
    if name == "rtd":
        return TokenScorer(backbone)
    return ClassificationHead(backbone, num_labels=2)  # nsp, sop


def _llama_config(c: Any) -> TransformerConfig:
    rope = getattr(c, "rope_parameters", None) or {"rope_theta": getattr(c, "rope_theta", 10000.0)}
    for field, value in (("attention_bias", False), ("mlp_bias", False)):
        if getattr(c, field, value) != value:
            raise ConfigError(f"Llama config field {field}={getattr(c, field)} has no equivalent here")
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"Llama rope_type={rope['rope_type']!r} has no equivalent here (only 'default')")
    if getattr(c, "head_dim", None) not in (None, c.hidden_size // c.num_attention_heads):
        raise ConfigError(f"Llama head_dim={c.head_dim} has no equivalent here (hidden_size / num_attention_heads)")
    return TransformerConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads, intermediate_size=c.intermediate_size,
        max_position_embeddings=c.max_position_embeddings, type_vocab_size=0, position_embedding="rotary",
        rotary_base=rope["rope_theta"], norm_position="pre", causal=True, activation=_activation(c.hidden_act),
        ffn="glu", norm="rmsnorm", bias=False, layer_norm_eps=c.rms_norm_eps, dropout=0.0,
        attention_dropout=c.attention_dropout, initializer_range=c.initializer_range,
        tie_word_embeddings=c.tie_word_embeddings,
    )


def _modernbert_config(c: Any) -> TransformerConfig:
    if c.attention_bias != c.mlp_bias or c.mlp_bias != c.norm_bias or c.classifier_bias != c.norm_bias:
        raise ConfigError("ModernBERT with attention_bias, mlp_bias, norm_bias and classifier_bias not all equal has "
                         "no equivalent here (one field: bias)")
    if not c.decoder_bias or c.classifier_activation != c.hidden_activation:
        raise ConfigError("ModernBERT without decoder_bias, or with classifier_activation != hidden_activation, has "
                         "no equivalent here")
    rope = c.rope_parameters
    return TransformerConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
        max_position_embeddings=c.max_position_embeddings, type_vocab_size=0, position_embedding="rotary",
        rotary_base=rope["full_attention"]["rope_theta"], local_rotary_base=rope["sliding_attention"]["rope_theta"],
        norm_position="pre", embedding_norm=True, activation=_activation(c.hidden_activation), ffn="glu",
        bias=c.mlp_bias, layer_norm_eps=c.norm_eps, dropout=c.mlp_dropout, attention_dropout=c.attention_dropout,
        initializer_range=c.initializer_range, local_attention_window=c.local_attention,
        global_attention_every=c.global_attn_every_n_layers,
    )


def config_from_hf(hf_config: Any) -> tuple[str, TransformerConfig]:
    """The family and our `TransformerConfig` for a Hugging Face config of one of the four families."""
    family = hf_config.model_type
    if family not in PREFIX:
        raise ConfigError(f"model_type {family!r} is not supported; supported: {sorted(PREFIX)}")
    if family == "llama":
        return family, _llama_config(hf_config)
    if family == "modernbert":
        return family, _modernbert_config(hf_config)
    if family == "gpt2":
        c = hf_config
        for field, value in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                             ("add_cross_attention", False)):
            if getattr(c, field, value) != value:
                raise ConfigError(f"GPT-2 config field {field}={getattr(c, field)} has no equivalent here")
        return family, TransformerConfig(
            vocab_size=c.vocab_size, hidden_size=c.n_embd, num_layers=c.n_layer, num_heads=c.n_head,
            intermediate_size=c.n_inner or 4 * c.n_embd, max_position_embeddings=c.n_positions,
            type_vocab_size=0, norm_position="pre", causal=True, activation=_activation(c.activation_function),
            layer_norm_eps=c.layer_norm_epsilon, dropout=c.resid_pdrop, attention_dropout=c.attn_pdrop,
            initializer_range=c.initializer_range, scaled_residual_init=True,
        )
    c = hf_config
    if getattr(c, "position_embedding_type", "absolute") != "absolute":
        raise ConfigError(f"position_embedding_type={c.position_embedding_type!r} has no equivalent here")
    if family == "albert" and c.inner_group_num != 1:
        raise ConfigError(f"ALBERT inner_group_num={c.inner_group_num} has no equivalent here (only 1)")
    if family == "albert" and c.embedding_size == c.hidden_size:
        raise ConfigError("ALBERT with embedding_size == hidden_size keeps a projection we do not have; "
                         "field embedding_size has no equivalent")
    if family == "roberta" and c.pad_token_id != ROBERTA_PAD_ID:
        raise ConfigError(f"RoBERTa with pad_token_id={c.pad_token_id} numbers its positions from another row; only "
                         f"{ROBERTA_PAD_ID} (every published RoBERTa) has an equivalent here")
    extra = {} if family in ("bert", "roberta") else dict(embedding_size=c.embedding_size)
    extra["max_position_embeddings"] = c.max_position_embeddings - (ROBERTA_OFFSET if family == "roberta" else 0)
    if family == "albert":
        extra.update(sharing="all", num_shared_groups=c.num_hidden_groups)
    return family, TransformerConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
        type_vocab_size=c.type_vocab_size,
        activation=_activation(c.hidden_act), layer_norm_eps=c.layer_norm_eps, dropout=c.hidden_dropout_prob,
        attention_dropout=c.attention_probs_dropout_prob, initializer_range=c.initializer_range, **extra,
    )


def _activation(name: Any) -> str:
    if name not in HF_ACTIVATIONS:
        raise ConfigError(f"activation {name!r} has no equivalent here; supported: {sorted(HF_ACTIVATIONS)}")
    return HF_ACTIVATIONS[name]


def _normalise_keys(state_dict: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Strip the base-model prefix; rename the old TF-style LayerNorm `gamma`/`beta` of published checkpoints."""
    normalised = {}
    for key, value in state_dict.items():
        key = key.removeprefix(f"{prefix}.")
        if key.endswith(".gamma") or key.endswith(".beta"):
            key = key.rsplit(".", 1)[0] + (".weight" if key.endswith(".gamma") else ".bias")
        normalised[key] = value
    return normalised


def from_hf_state_dict(
    state_dict: dict[str, Tensor], hf_config: Any, heads: tuple[str, ...] = ()
) -> Transformer | ModelWithHeads:
    """Our model from a Hugging Face state dict and config: a `Transformer`, or a `ModelWithHeads` with `heads`."""
    family, config = config_from_hf(hf_config)
    theirs = _normalise_keys(state_dict, PREFIX[family])
    backbone = Transformer(config)
    model = ModelWithHeads(backbone, {h: _make_head(family, h, backbone) for h in heads}) if heads \
        else backbone
    entries = _entries(family, config, heads)
    missing = sorted({k for _, keys, _ in entries for k in keys} - set(theirs))
    if missing:
        raise ConfigError(f"the {family} state dict lacks {len(missing)} weights, e.g. {missing[:3]}")
    ours = {key: _combine([theirs[k] for k in keys], how) for key, keys, how in entries}
    used = {k for _, keys, _ in entries for k in keys}
    unused = [k for k in theirs if k not in used and not k.endswith(IGNORED_SUFFIXES) and not k.startswith("pooler")]
    if unused:
        raise ConfigError(f"{len(unused)} weights of the {family} state dict have no place here, e.g. {unused[:3]}")
    model.load_state_dict(ours, strict=False)
    _check_complete(model, set(ours))
    return model


def from_hf(hf_model: nn.Module) -> Transformer | ModelWithHeads:
    """Convert a Hugging Face model of the four families (see `HF_CLASSES`) with its weights."""
    name = type(hf_model).__name__
    if name not in HF_CLASSES:
        raise ConfigError(f"{name} is not supported; supported classes: {sorted(HF_CLASSES)}")
    return from_hf_state_dict(hf_model.state_dict(), hf_model.config, heads=HF_CLASSES[name][1])


def to_hf(model: Transformer | ModelWithHeads, family: str | None = None) -> nn.Module:
    """A Hugging Face model holding `model`'s weights; the family is inferred from the heads and config if not given.

    Raises ValueError naming the config field when the variant has no equivalent in that family.
    """
    import transformers

    backbone = model.backbone if isinstance(model, ModelWithHeads) else model
    heads = tuple(model.heads) if isinstance(model, ModelWithHeads) else ()
    config = backbone.config
    family = family or infer_family(config, heads)
    class_name = next((n for n, (f, h) in HF_CLASSES.items() if f == family and set(h) == set(heads)), None)
    if class_name is None:
        raise ConfigError(f"no Hugging Face {family} class has exactly the heads {list(heads)}")
    hf_config = hf_config_for(config, family)
    hf_class = getattr(transformers, class_name)
    base_models = ("BertModel", "AlbertModel", "RobertaModel")  # without the pooler, which is a head here
    hf_model = hf_class(hf_config, add_pooling_layer=False) if class_name in base_models else hf_class(hf_config)
    ours = model.state_dict()
    theirs: dict[str, Tensor] = {}
    for key, keys, how in _entries(family, config, heads):
        sizes = [config.num_heads * config.head_size] + [config.num_kv_heads * config.head_size] * 2 \
            if ".qkv." in key else None  # query, key and value rows (fewer key/value heads with GQA)
        for hf_key, tensor in zip(keys, _split(ours[key], how, len(keys), sizes), strict=True):
            theirs[hf_key] = tensor
    prefix = PREFIX[family] if heads else ""
    hf_keys = set(hf_model.state_dict())
    renamed = {}
    for key, tensor in theirs.items():
        full = f"{prefix}.{key}" if prefix and f"{prefix}.{key}" in hf_keys else key
        renamed[full] = tensor
    missing, unexpected = hf_model.load_state_dict(renamed, strict=False)
    leftover = [k for k in missing if not k.endswith(IGNORED_SUFFIXES)]
    if leftover or unexpected:
        raise RuntimeError(f"weight mapping is incomplete: missing {leftover[:3]}, unexpected {unexpected[:3]}")
    hf_model.tie_weights()
    return hf_model.train(model.training)


def infer_family(config: TransformerConfig, heads: tuple[str, ...] = ()) -> str:
    """The Hugging Face family a model belongs to, from its heads first, then its config."""
    causal = "llama" if config.position_embedding == "rotary" else "gpt2"
    for head, family in (("rtd", "electra"), ("sop", "albert"), ("nsp", "bert"), ("clm", causal)):
        if head in heads:
            return family
    if config.causal:
        return causal
    if config.sharing != "none":
        return "albert"
    if config.position_embedding == "rotary":
        return "modernbert"
    return "electra" if config.embedding_size != config.hidden_size else "bert"


def hf_config_for(config: TransformerConfig, family: str) -> Any:
    """The Hugging Face config of `family` equivalent to `config`, or ValueError naming the field that has none."""
    import transformers

    if config.embedding_norm != (config.norm_position == "post") and family != "modernbert":
        implied = config.norm_position == "post"
        raise ConfigError(f"embedding_norm={config.embedding_norm} has no equivalent in Hugging Face {family} (needs "
                         f"{implied} with {config.norm_position}-LN)")
    for field, value in ({} if family in ("llama", "modernbert") else NEWER_FIELDS).items():
        if getattr(config, field) != value:
            raise ConfigError(f"{field}={getattr(config, field)!r} has no equivalent in Hugging Face {family} "
                             f"(needs {value!r})")
    if family == "modernbert" and (config.local_attention_window is None or config.local_rotary_base is None):
        field = "local_attention_window" if config.local_attention_window is None else "local_rotary_base"
        raise ConfigError(f"{field}=None has no equivalent in Hugging Face modernbert (its layers are local or global, "
                         "each kind with its own rotary base)")
    if config.num_kv_heads != config.num_heads and family != "llama":
        raise ConfigError(f"num_kv_heads={config.num_kv_heads} has no equivalent in Hugging Face {family} (needs "
                         f"num_heads = {config.num_heads})")
    for field, value in REQUIREMENTS[family].items():
        if getattr(config, field) != value:
            raise ConfigError(
                f"{field}={getattr(config, field)!r} has no equivalent in Hugging Face {family} (needs {value!r})"
            )
    if family in ("bert", "gpt2", "roberta", "llama") and config.embedding_size != config.hidden_size:
        raise ConfigError(f"embedding_size={config.embedding_size} has no equivalent in Hugging Face {family} "
                         f"(needs embedding_size == hidden_size = {config.hidden_size})")
    if family == "modernbert":
        activation = TO_HF_ACTIVATION[config.activation]
        return transformers.ModernBertConfig(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
            max_position_embeddings=config.max_position_embeddings, norm_eps=config.layer_norm_eps,
            local_attention=config.local_attention_window, global_attn_every_n_layers=config.global_attention_every,
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": config.rotary_base},
                             "sliding_attention": {"rope_type": "default", "rope_theta": config.local_rotary_base}},
            hidden_activation=activation, classifier_activation=activation, attention_bias=config.bias,
            mlp_bias=config.bias, norm_bias=config.bias, classifier_bias=config.bias, decoder_bias=True,
            attention_dropout=config.attention_dropout, mlp_dropout=config.dropout, embedding_dropout=config.dropout,
            initializer_range=config.initializer_range, pad_token_id=None, bos_token_id=None, eos_token_id=None,
            cls_token_id=None, sep_token_id=None)
    if family == "llama":
        return transformers.LlamaConfig(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_kv_heads, max_position_embeddings=config.max_position_embeddings,
            rms_norm_eps=config.layer_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": config.rotary_base},
            hidden_act=TO_HF_ACTIVATION[config.activation], attention_dropout=config.attention_dropout,
            initializer_range=config.initializer_range, tie_word_embeddings=config.tie_word_embeddings)
    if family == "albert" and (config.embedding_size == config.hidden_size or config.sharing not in ("all", "none")):
        field = "sharing" if config.sharing not in ("all", "none") else "embedding_size"
        raise ConfigError(f"{field}={getattr(config, field)!r} has no equivalent in Hugging Face albert "
                         "(needs sharing 'all' or 'none' and embedding_size < hidden_size)")
    if family != "gpt2" and config.type_vocab_size < 1:
        raise ConfigError(f"type_vocab_size=0 has no equivalent in Hugging Face {family} (needs at least 1)")
    activation = TO_HF_ACTIVATION[config.activation]
    if family == "gpt2":
        return transformers.GPT2Config(
            vocab_size=config.vocab_size, n_embd=config.hidden_size, n_layer=config.num_layers,
            n_head=config.num_heads, n_inner=config.intermediate_size, n_positions=config.max_position_embeddings,
            activation_function=activation, layer_norm_epsilon=config.layer_norm_eps, resid_pdrop=config.dropout,
            embd_pdrop=config.dropout, attn_pdrop=config.attention_dropout, initializer_range=config.initializer_range,
            # GPT-2's <|endoftext|> is id 50256; a smaller vocabulary has no such id (the tokenizer saved beside an
            # export says which token ends a document)
            bos_token_id=50256 if config.vocab_size > 50256 else None,
            eos_token_id=50256 if config.vocab_size > 50256 else None,
        )
    kwargs = dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings, type_vocab_size=config.type_vocab_size,
        hidden_act=activation, layer_norm_eps=config.layer_norm_eps, hidden_dropout_prob=config.dropout,
        attention_probs_dropout_prob=config.attention_dropout, initializer_range=config.initializer_range,
    )
    if family == "bert":
        return transformers.BertConfig(**kwargs)
    if family == "roberta":
        kwargs["max_position_embeddings"] = config.max_position_embeddings + ROBERTA_OFFSET
        return transformers.RobertaConfig(**kwargs, pad_token_id=ROBERTA_PAD_ID, bos_token_id=0, eos_token_id=2)
    if family == "electra":
        return transformers.ElectraConfig(embedding_size=config.embedding_size, **kwargs)
    groups = config.num_shared_groups if config.sharing == "all" else config.num_layers
    return transformers.AlbertConfig(embedding_size=config.embedding_size, num_hidden_groups=groups,
                                     inner_group_num=1, classifier_dropout_prob=config.dropout, **kwargs)


def _entries(family: str, config: TransformerConfig, heads: tuple[str, ...]) -> list[Entry]:
    """All entries of a model: backbone keys prefixed `backbone.` when there are heads, then each head's."""
    backbone = _backbone_entries(family, config)
    if not heads:
        return backbone
    entries = [(f"backbone.{ours}", keys, how) for ours, keys, how in backbone]
    for head in heads:
        if (family, head) not in HEAD_ENTRIES:
            raise ConfigError(f"head {head!r} has no equivalent in Hugging Face {family}")
        entries += [(f"heads.{head}.{ours}", keys, how) for ours, keys, how in HEAD_ENTRIES[(family, head)]]
        if family == "modernbert" and head == "mlm" and config.bias:  # classifier_bias and norm_bias
            entries += [(f"heads.{head}.transform.{i}.bias", (f"head.{name}.bias",), "copy")
                        for i, name in ((0, "dense"), (2, "norm"))]
        if head == "clm" and not config.tie_word_embeddings:
            entries.append((f"heads.{head}.weight", ("lm_head.weight",), "copy"))
    return entries


def _combine(tensors: list[Tensor], how: str) -> Tensor:
    if how == "cat":
        return torch.cat(tensors, dim=0)
    if how == "offset":  # RoBERTa's position rows from padding_idx + 1 on
        return tensors[0][ROBERTA_OFFSET:]
    return tensors[0].t() if how == "t" else tensors[0]


def _split(tensor: Tensor, how: str, parts: int, sizes: list[int] | None = None) -> list[Tensor]:
    if how == "cat":
        return [t.clone() for t in (tensor.split(sizes) if sizes else tensor.chunk(parts, dim=0))]
    if how == "offset":  # the rows RoBERTa never uses for real tokens: zeros (its padding row is zeros too)
        return [torch.cat([tensor.new_zeros(ROBERTA_OFFSET, tensor.shape[1]), tensor])]
    return [tensor.t().contiguous() if how == "t" else tensor.clone()]


def _check_complete(model: nn.Module, loaded: set[str]) -> None:
    """Every parameter of ours was loaded (tied LM output weights come with the embeddings)."""
    names = {name for name, _ in model.named_parameters()}  # shared/tied parameters appear once
    not_loaded = sorted(names - loaded)
    if not_loaded:
        raise RuntimeError(f"weight mapping is incomplete: {not_loaded[:3]} were not loaded")
