"""The CUDA paths: bf16 training steps against fp32, compiled against eager, fused AdamW, generation, perplexity,
encoding and fine-tuning on a CUDA model, exact resume on CUDA, FSDP with full and sharded checkpoints. Run on a GPU
machine with `pytest -m gpu` (see benchmarks/gpu.sh); without CUDA they are skipped: there is nothing to run them on."""

import pytest
import torch

from pretrain.downstream.pretrained import Pretrained, model_with_heads
from pretrain.training.module import PretrainingModule
from tests.helpers import tiny_config
from tests.pretrain.training.test_module import RECIPES, make_batch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu.sh)")]


def module_for(recipe: str, **kwargs) -> PretrainingModule:
    objectives, layout, overrides, _ = RECIPES[recipe]
    torch.manual_seed(0)
    return PretrainingModule(tiny_config(**overrides), objectives(), learning_rate=1e-3, **kwargs)


def cuda_batch(layout: str) -> dict:
    return {name: value.cuda() for name, value in make_batch(layout).items()}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_a_bf16_step_is_finite_and_close_to_fp32(recipe):
    """bf16 autocast: the loss within 2 % of fp32's on the same weights and masks (bf16 keeps 8 bits of mantissa)."""
    module = module_for(recipe).cuda()
    batch = cuda_batch(RECIPES[recipe][1])
    full, _ = module(batch, torch.Generator().manual_seed(0))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        half, _ = module(batch, torch.Generator().manual_seed(0))
    half.backward()
    assert torch.isfinite(half) and all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)
    assert float(half) == pytest.approx(float(full), rel=2e-2)


@pytest.mark.parametrize("recipe", ["bert", "gpt"])
def test_compiled_equals_eager_on_cuda(recipe):
    batch = cuda_batch(RECIPES[recipe][1])
    losses = []
    for compile in (False, True):
        torch._dynamo.reset()
        module = module_for(recipe, compile=compile).cuda()
        losses.append(float(module(batch, torch.Generator().manual_seed(0))[0]))
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)


def test_fused_adamw_is_the_one_used_on_cuda():
    from pretrain.training.optim import build_optimizer

    optimizer = build_optimizer("adamw", module_for("bert").cuda(), 1e-3, 0.01, (0.9, 0.999), 1e-6)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults.get("fused") is True


def causal_model() -> Pretrained:
    from pretrain.data.tokenizer import train_tokenizer

    texts = [f"the {w} of the {v} is here." for w in ("king", "queen", "fool") for v in ("realm", "play")] * 20
    tokenizer = train_tokenizer(texts, "bpe", 300)
    torch.manual_seed(0)
    config = tiny_config(vocab_size=tokenizer.get_vocab_size(), causal=True, norm_position="pre", type_vocab_size=0)
    spec = {"clm": {"class_path": "models.heads.LMHead", "init_args": {"transform": False, "bias": False}}}
    return Pretrained(model_with_heads(config, spec), tokenizer)


def test_generation_perplexity_and_encoding_run_on_a_cuda_model_as_on_the_cpu():
    cpu = causal_model()
    gpu = causal_model()
    gpu.model.cuda()
    prompts = ["the king", "the queen of the"]
    for strategy in ("greedy", "beam"):
        assert gpu.generate(prompts, strategy, max_new_tokens=6) == cpu.generate(prompts, strategy, max_new_tokens=6)
    assert gpu.generate(prompts, "sample", seed=1, max_new_tokens=6)
    text = "the king of the realm is here. the fool of the play is here."
    assert gpu.perplexity(text)[0] == pytest.approx(cpu.perplexity(text)[0], rel=1e-3)
    torch.testing.assert_close(gpu.encode(prompts).pooled, cpu.encode(prompts).pooled, atol=1e-4, rtol=1e-4)


def test_fine_tuning_and_zero_shot_run_on_cuda(tmp_path):
    from pretrain.downstream.finetune import Settings, finetune
    from pretrain.downstream.tasks import Examples, Task
    from pretrain.downstream.zeroshot import Prompting, evaluate
    from tests.pretrain.downstream.test_finetune import sentiment_rows, write_jsonl

    causal_model().save(tmp_path / "model")
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(32, 0))
    results = finetune(tmp_path / "model", Task("mine", text="text", label="label"), train, train, tmp_path / "out",
                       [1], Settings(epochs=1, batch_size=8))  # Lightning's accelerator "auto": the GPU
    assert results["runs"][0]["accuracy"] >= 0
    model = causal_model()
    model.model.cuda()
    rows = sentiment_rows(8, 1)
    scored = evaluate(model, Task("mine", text="text", label="label"), Examples([r["text"] for r in rows], None, []),
                      torch.tensor([r["label"] for r in rows]), Prompting("{text} =", [" bad", " good"]))
    assert sum(map(sum, scored["confusion"])) == 8


def test_exact_resume_on_cuda(tmp_path):
    """Stopped and resumed on the GPU, a run ends where an uninterrupted one ends: the same losses at every logged
    step (CUDA kernels are not all deterministic: weights within 1e-5 rather than bitwise)."""
    from tests.pretrain.training.test_resume import fit, logged, weights

    gpu = ("--trainer.accelerator", "gpu", "--trainer.devices", "1")
    fit("gpt2.yaml", tmp_path / "straight", tmp_path, 8, *gpu)
    fit("gpt2.yaml", tmp_path / "resumed", tmp_path, 4, *gpu)
    fit("gpt2.yaml", tmp_path / "resumed", tmp_path, 8, "--ckpt_path", "last", *gpu)
    straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert all(torch.allclose(straight[k], resumed[k], atol=1e-5) for k in straight)
    losses = logged(tmp_path / "straight", "train/loss")
    resumed_losses = logged(tmp_path / "resumed", "train/loss")
    assert losses.keys() == resumed_losses.keys()
    assert all(float(losses[k]) == pytest.approx(float(resumed_losses[k]), rel=1e-4) for k in losses)


@pytest.mark.parametrize("strategy", ["fsdp", "fsdp_sharded"])
def test_fsdp_trains_resumes_exactly_and_its_checkpoints_load_and_export(strategy, tmp_path):
    """`--trainer.strategy fsdp` (one full checkpoint file) and `fsdp_sharded` (a directory of shards): stopped at
    step 4 and resumed with --ckpt_path last, a run logs the losses of an uninterrupted one; the last checkpoint
    loads (`pretrain.load`) and exports (`pretrain export`) to the same weights."""
    import pretrain
    from pretrain.downstream.export import export
    from pretrain.training.checkpoints import is_sharded_checkpoint
    from tests.pretrain.training.test_resume import fit, logged

    on_fsdp = ("--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.strategy", strategy)
    fit("gpt2.yaml", tmp_path / "straight", tmp_path, 8, *on_fsdp)
    fit("gpt2.yaml", tmp_path / "resumed", tmp_path, 4, *on_fsdp)
    last = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    assert is_sharded_checkpoint(last) == (strategy == "fsdp_sharded")
    fit("gpt2.yaml", tmp_path / "resumed", tmp_path, 8, "--ckpt_path", "last", *on_fsdp)
    losses, resumed = logged(tmp_path / "straight", "train/loss"), logged(tmp_path / "resumed", "train/loss")
    assert losses.keys() == resumed.keys() and len(losses) == 8
    assert all(float(losses[k]) == pytest.approx(float(resumed[k]), rel=1e-4) for k in losses)
    straight = pretrain.load(tmp_path / "straight" / "checkpoints" / "last.ckpt").model.state_dict()
    loaded = pretrain.load(last).model.state_dict()
    assert all(torch.allclose(straight[k], loaded[k], atol=1e-5) for k in straight)
    exported = pretrain.load(export(last, tmp_path / "export")).model.state_dict()
    assert all(torch.equal(loaded[k], exported[k]) for k in loaded)


LONG = ("--model.backbone.attention_dropout", "0.0")  # (another attention kernel draws other dropout masks)


@pytest.mark.parametrize(("recipe", "single_extra", "fsdp_extra"), [
    ("gpt2.yaml", (), ()),
    # the long-context settings under FSDP: activation checkpointing inside each wrapped block, block masks
    ("modernbert.yaml", LONG, (*LONG, "--model.backbone.activation_checkpointing", "blocks",
                               "--model.backbone.attention_masks", "blocks")),
], ids=["gpt2", "modernbert-long-settings"])
def test_fsdp_on_one_gpu_follows_the_single_device_run(recipe, single_extra, fsdp_extra, tmp_path):
    """The same recipe without FSDP and with it (one unit per block) logs the same losses: sharding changes where the
    weights live, not the arithmetic (to float tolerance); so do checkpointing and block masks under it."""
    from tests.pretrain.training.test_resume import fit, logged

    gpu = ("--trainer.accelerator", "gpu", "--trainer.devices", "1")
    fit(recipe, tmp_path / "single", tmp_path, 8, *gpu, *single_extra)
    fit(recipe, tmp_path / "fsdp", tmp_path, 8, *gpu, "--trainer.strategy", "fsdp_sharded", *fsdp_extra)
    single, sharded = logged(tmp_path / "single", "train/loss"), logged(tmp_path / "fsdp", "train/loss")
    assert single.keys() == sharded.keys()
    assert all(float(single[k]) == pytest.approx(float(sharded[k]), rel=1e-3) for k in single)
