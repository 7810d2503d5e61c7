"""`pretrain.load`, `Pretrained.encode` / `.generate`, and `pretrain export`'s refusals."""


import pytest
import torch

import pretrain
from pretrain.data.tokenizer import train_tokenizer
from pretrain.downstream.export import export
from pretrain.downstream.pretrained import Pretrained, model_with_heads
from pretrain.errors import UserError
from tests.helpers import run_cli, tiny_config

TEXTS = [f"the {w} of the {v} is {u}." for w in ("king", "queen", "fool") for v in ("realm", "play") for u in "abc"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS * 20, "wordpiece", 100)


def pretrained(tokenizer, causal: bool = False) -> Pretrained:
    config = tiny_config(vocab_size=tokenizer.get_vocab_size(), causal=causal,
                         norm_position="pre" if causal else "post")
    return Pretrained(model_with_heads(config, ["clm"] if causal else ["mlm", "nsp"]), tokenizer)


def test_encode_gives_hidden_states_and_a_mean_pooled_vector_ignoring_padding(tokenizer):
    model = pretrained(tokenizer)
    encoded = model.encode(["the king of the realm is a.", "the fool"])
    short = model.encode("the fool")
    length = int(encoded.attention_mask[1].sum())
    assert encoded.hidden_states.shape[:2] == encoded.attention_mask.shape and length == short.hidden_states.shape[1]
    torch.testing.assert_close(encoded.hidden_states[1, :length], short.hidden_states[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(encoded.pooled[1], short.hidden_states[0].mean(0), rtol=1e-5, atol=1e-5)
    ids = model.tokenize(["the fool"])[0]
    assert ids[0] == tokenizer.token_to_id("[CLS]") and ids[-1] == tokenizer.token_to_id("[SEP]")


def test_generate_continues_prompts_and_needs_a_causal_head(tokenizer):
    model = pretrained(tokenizer, causal=True)
    first = model.generate(["the king", "the queen of the"], max_new_tokens=5)
    assert len(first) == 2 and first == model.generate(["the king", "the queen of the"], max_new_tokens=5)
    sampled = model.generate("the king", strategy="sample", seed=3, max_new_tokens=5, top_k=10)
    assert sampled == model.generate("the king", strategy="sample", seed=3, max_new_tokens=5, top_k=10)
    with pytest.raises(UserError, match="no causal LM head"):
        pretrained(tokenizer).generate("the king")


def test_generate_says_why_each_continuation_stopped(tokenizer):
    from pretrain.downstream.generate import generate

    model = pretrained(tokenizer, causal=True)
    [(_, reason)] = model.generate("the king", max_new_tokens=4, eos_id=None, with_reasons=True)
    assert reason == "stopped at 4 new tokens (max_new_tokens 4)"
    [first, *_] = generate(model.language_model(), model.tokenize(["the king"]), "greedy", pad_id=model.pad_id,
                           max_new_tokens=4, eos_id=None)[0]
    [(_, reason)] = model.generate("the king", max_new_tokens=4, eos_id=first, with_reasons=True)
    assert reason == f"ended at the end-of-text token {model.tokenizer.id_to_token(first)!r} after 1 tokens"


def test_export_directory_round_trip_and_its_refusals(tokenizer, tmp_path):
    model = pretrained(tokenizer)
    model.save(tmp_path)
    loaded = pretrain.load(tmp_path)
    ids = torch.tensor(model.tokenize(TEXTS[:3]))
    assert torch.equal(model.model(ids)["mlm"], loaded.model(ids)["mlm"])
    assert loaded.model.heads["mlm"].weight is loaded.model.backbone.embeddings.word.weight  # still tied
    with pytest.raises(UserError, match="already exists and is not empty"):
        export(tmp_path, tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="has no tokenizer.json"):
        pretrain.load(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        pretrain.load(tmp_path / "nothing")


def test_export_command_errors_are_one_line_and_overwrite_nothing(tokenizer, tmp_path):
    pretrained(tokenizer).save(tmp_path / "model")
    (tmp_path / "model" / "tokenizer.json").unlink()
    truncated = tmp_path / "cut.ckpt"
    truncated.write_bytes(b"PK\x03\x04" + b"\x00" * 64)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    for arguments, message in [([str(tmp_path / "model"), str(tmp_path / "out")], "has no tokenizer.json"),
                               ([str(truncated), str(tmp_path / "out")], "not a readable checkpoint"),
                               ([str(tmp_path / "model"), str(tmp_path / "taken")], "not empty")]:
        process = run_cli("export", *arguments)
        assert process.returncode == 2 and message in process.stderr and "Traceback" not in process.stderr
    assert not (tmp_path / "out").exists() and (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_a_tokenizer_with_fixed_padding_encodes_and_predicts_real_tokens_only(tokenizer, tmp_path):
    from tokenizers import Tokenizer

    padded = Tokenizer.from_str(tokenizer.to_str())
    padded.enable_padding(length=24, pad_id=0, pad_token="[PAD]")
    plain, with_padding = pretrained(tokenizer), pretrained(padded)
    with_padding.model.load_state_dict(plain.model.state_dict())
    texts = ["the fool", "the king of the realm is a."]
    assert with_padding.tokenize(texts) == plain.tokenize(texts) and len(plain.tokenize(texts)[0]) < 24
    assert torch.equal(with_padding.encode(texts).hidden_states, plain.encode(texts).hidden_states)
    lengths = [len(ids) for ids, _ in with_padding.tokenize_pairs(texts, None, 16)]
    assert lengths == [len(ids) for ids in plain.tokenize(texts)] and max(lengths) < 16


def test_a_checkpoint_saved_before_heads_described_themselves_still_loads(tmp_path):
    """Checkpoints of earlier versions name their heads only ("mlm", "nsp"): they load through the legacy table."""
    from pretrain.cli import main
    from pretrain.sample import BUNDLED_CORPUS

    run = tmp_path / "run"
    from tests.helpers import ROOT

    arguments = ["fit", "-c", str(ROOT / "configs" / "tiny" / "bert.yaml"), "--data.files", str(BUNDLED_CORPUS),
                 "--data.tokenizer", str(tmp_path / "tokenizer.json"), "--data.tokenizer_vocab_size", "400",
                 "--data.cache_dir", str(tmp_path / "cache"), "--trainer.default_root_dir", str(run),
                 "--trainer.max_steps", "1", "--model.warmup_steps", "0", "--model.schedule", "constant",
                 "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false"]
    assert main(arguments) == 0
    path = run / "checkpoints" / "last.ckpt"
    new = pretrain.load(path)
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["pretrain"]["head_specs"]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    old = pretrain.load(tmp_path / "old.ckpt")
    ids = torch.tensor(new.tokenize(["To be, or not to be"]))
    assert all(torch.equal(new.model(ids)[k], old.model(ids)[k]) for k in ("mlm", "nsp"))


@pytest.mark.parametrize("format", ["native", "hf"])
def test_exported_files_get_the_users_umask_not_the_temporary_directorys(format, tokenizer, tmp_path):
    import os
    import stat

    if format == "hf":
        pytest.importorskip("transformers")
    config = tiny_config(vocab_size=tokenizer.get_vocab_size(), causal=True, norm_position="pre", type_vocab_size=0)
    Pretrained(model_with_heads(config, ["clm"]), tokenizer).save(tmp_path / "model")
    previous = os.umask(0o027)
    try:
        export(tmp_path / "model", tmp_path / "out", format)
    finally:
        os.umask(previous)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in (tmp_path / "out").iterdir()}
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750
    assert "model.safetensors" in modes and set(modes.values()) == {0o640}, modes
