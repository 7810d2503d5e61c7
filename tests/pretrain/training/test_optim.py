import math

import numpy as np
import pytest
import torch

from models import Transformer
from pretrain.training.optim import Lamb, build_optimizer, parameter_groups, schedule_factor


def reference_lamb(x, grads, lr, beta1, beta2, eps, weight_decay):
    """Algorithm 2 of You et al. (2019), written out in NumPy for one parameter tensor."""
    m, v = np.zeros_like(x), np.zeros_like(x)
    for t, g in enumerate(grads, start=1):
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat, v_hat = m / (1 - beta1 ** t), v / (1 - beta2 ** t)
        r = m_hat / (np.sqrt(v_hat) + eps)
        u = r + weight_decay * x
        w_norm, u_norm = np.linalg.norm(x), np.linalg.norm(u)
        trust = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
        x = x - lr * trust * u
    return x


def test_lamb_follows_the_paper_update_rule():
    torch.manual_seed(0)
    start = torch.randn(5, 7, dtype=torch.float64)
    grads = [torch.randn(5, 7, dtype=torch.float64) for _ in range(6)]
    parameter = torch.nn.Parameter(start.clone())
    optimizer = Lamb([parameter], lr=0.01, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1)
    for g in grads:
        parameter.grad = g.clone()
        optimizer.step()
    expected = reference_lamb(start.numpy(), [g.numpy() for g in grads], 0.01, 0.9, 0.99, 1e-6, 0.1)
    np.testing.assert_allclose(parameter.detach().numpy(), expected, rtol=1e-10, atol=1e-12)


def test_lamb_trust_ratio_is_one_for_zero_weights():
    parameter = torch.nn.Parameter(torch.zeros(4))
    optimizer = Lamb([parameter], lr=0.1)
    parameter.grad = torch.ones(4)
    optimizer.step()
    # first step: m_hat = g, v_hat = g^2, r = 1 / (1 + eps); trust ratio 1 since ||x|| = 0
    assert torch.allclose(parameter.detach(), torch.full((4,), -0.1), atol=1e-6)


def test_no_weight_decay_on_biases_and_layer_norms():
    from tests.helpers import tiny_config

    model = Transformer(tiny_config())
    decay, no_decay = parameter_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert id(model.attention_layers[0].qkv.bias) in no_decay_ids
    assert id(model.attention_layers[0].norm.weight) in no_decay_ids
    assert id(model.embeddings.norm.weight) in no_decay_ids
    decay_ids = {id(p) for p in decay["params"]}
    assert id(model.attention_layers[0].qkv.weight) in decay_ids and id(model.embeddings.word.weight) in decay_ids
    assert len(decay_ids) + len(no_decay_ids) == len(list(model.parameters()))


@pytest.mark.parametrize("name, expected_class", [("adamw", torch.optim.AdamW), ("radam", torch.optim.RAdam),
                                                  ("lamb", Lamb)])
def test_build_optimizer(name, expected_class):
    from tests.helpers import tiny_config

    optimizer = build_optimizer(name, Transformer(tiny_config()), 1e-3, 0.01, (0.9, 0.999), 1e-6)
    assert isinstance(optimizer, expected_class) and len(optimizer.param_groups) == 2


def test_schedules():
    linear = schedule_factor("linear", warmup_steps=10, total_steps=110)
    assert [linear(s) for s in (0, 5, 10, 60, 110, 200)] == [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    cosine = schedule_factor("cosine", warmup_steps=10, total_steps=110)
    assert cosine(10) == 1.0 and cosine(60) == pytest.approx(0.5) and cosine(110) == pytest.approx(0.0)
    inverse = schedule_factor("inverse_sqrt", warmup_steps=100, total_steps=0)
    assert inverse(50) == 0.5 and inverse(100) == 1.0 and inverse(400) == pytest.approx(0.5)
    # the original Transformer's rate d^-0.5 * min(s^-0.5, s * w^-1.5) is proportional to this factor
    vaswani = [min(s ** -0.5, s * 100 ** -1.5) for s in (10, 100, 1000)]
    ours = [inverse(s) for s in (10, 100, 1000)]
    assert all(math.isclose(a / b, vaswani[1] / ours[1]) for a, b in zip(vaswani, ours, strict=True))
    constant = schedule_factor("constant", warmup_steps=0, total_steps=0)
    assert constant(0) == 1.0 and constant(10**6) == 1.0


def test_bad_schedule_settings():
    with pytest.raises(ValueError, match="must exceed warmup_steps"):
        schedule_factor("linear", warmup_steps=100, total_steps=50)
    with pytest.raises(ValueError, match="unknown schedule"):
        schedule_factor("step", 0, 10)


FAMILIES = {  # a tiny config of each family: its variant fields, and the objectives that go with it
    "bert": (dict(), "mlm nsp"), "albert": (dict(embedding_size=32, sharing="all"), "mlm sop"),
    "electra": (dict(embedding_size=32), "rtd"), "gpt2": (dict(causal=True, norm_position="pre"), "clm"),
    "llama": (dict(causal=True, norm="rmsnorm", ffn="glu", position_embedding="rotary", bias=False,
                   tie_word_embeddings=False, num_kv_heads=1), "clm"),
    "modernbert": (dict(norm_position="pre", position_embedding="rotary", bias=False, local_attention_window=8,
                        global_attention_every=2, ffn="glu"), "mlm"),
}


def pretraining_module(family: str):
    from objectives import CausalLM, MaskedLM, NextSentencePrediction, ReplacedTokenDetection, SentenceOrderPrediction
    from pretrain.training.module import PretrainingModule
    from tests.helpers import MASK, SPECIAL_IDS, tiny_config

    fields, names = FAMILIES[family]
    made = {"mlm": lambda: MaskedLM(MASK, SPECIAL_IDS), "nsp": NextSentencePrediction,
            "sop": SentenceOrderPrediction, "rtd": lambda: ReplacedTokenDetection(MASK, SPECIAL_IDS),
            "clm": CausalLM}
    return PretrainingModule(tiny_config(**fields), [made[name]() for name in names.split()])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_groups_by_name_are_the_groups_by_shape_on_one_process(family):
    """On one process (whole tensors) every matrix and embedding is decayed and every bias and norm weight is not:
    the same split the number of dimensions gives, for every family with its heads (ELECTRA's generator too)."""
    from pretrain.training.optim import named_parameter_groups

    module = pretraining_module(family)
    decay, no_decay = named_parameter_groups(module)
    assert [p for _, p in decay] == [p for p in dict.fromkeys(module.parameters()) if p.ndim >= 2]
    assert [p for _, p in no_decay] == [p for p in dict.fromkeys(module.parameters()) if p.ndim < 2]
    assert {name for name, _ in decay + no_decay} == set(dict(module.named_parameters()))


class Wrapped(torch.nn.Module):
    """What FSDP (use_orig_params) leaves of a block: the block under `_fsdp_wrapped_module`, each parameter a 1-D
    view of this rank's shard (here: the second half of the flattened tensor, as rank 1 of 2 holds it)."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self._fsdp_wrapped_module = block
        for owner in block.modules():
            for name, parameter in list(owner.named_parameters(recurse=False)):
                flat = parameter.detach().flatten()
                setattr(owner, name, torch.nn.Parameter(flat[len(flat) // 2:].clone()))


def test_groups_and_their_counts_are_the_same_on_flattened_shards():
    """Under FSDP the optimizer is built after the parameters were flattened into 1-D shards: by shape every one of
    them would be "not decayed" (weight decay silently off); by name the groups, their names and the counts said
    are those of one process."""
    from pretrain.training.optim import describe_groups, named_parameter_groups

    module = pretraining_module("bert")
    sizes = {name: p.numel() for name, p in module.named_parameters()}
    whole = [[name for name, _ in group] for group in named_parameter_groups(module)]
    said = describe_groups(module, 0.01, sizes)
    for index, block in enumerate(module.backbone.attention_layers):
        module.backbone.attention_layers[index] = Wrapped(block)
    for index, block in enumerate(module.backbone.ffn_layers):
        module.backbone.ffn_layers[index] = Wrapped(block)
    assert all(p.ndim == 1 for block in module.backbone.attention_layers for p in block.parameters())
    sharded = [[name for name, _ in group] for group in named_parameter_groups(module)]
    assert sharded == whole and describe_groups(module, 0.01, sizes) == said
    assert said.startswith("weight decay 0.01 on ") and "biases and norms" in said


def test_lamb_is_refused_under_sharded_fsdp():
    from types import SimpleNamespace

    from pytorch_lightning.strategies import FSDPStrategy

    from pretrain.errors import UserError
    from pretrain.training.module import PretrainingModule

    module = pretraining_module("bert")
    module = PretrainingModule(module.backbone.config, list(module.objectives), optimizer="lamb")
    strategy = FSDPStrategy()
    strategy.cluster_environment = SimpleNamespace(world_size=lambda: 2)
    module._trainer = SimpleNamespace(strategy=strategy)
    with pytest.raises(UserError, match="model.optimizer lamb .* under FSDP each rank holds a shard"):
        module.configure_optimizers()
