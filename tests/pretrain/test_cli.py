"""The `pretrain` command: fit with the recipes under configs/, export, generate, evaluate-lm, plot."""

import csv
import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar

import pretrain
from models import TransformerConfig
from pretrain.cli import main, parser
from pretrain.sample import BUNDLED_CORPUS
from pretrain.training.checkpoints import Checkpoints
from pretrain.training.cli import lightning_cli
from tests.helpers import run_cli

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# (the continued-pretraining recipes need a source model: tests/pretrain/training/test_init_from.py runs them; a
# second phase is laid over its first: tests/pretrain/training/test_resume.py runs them)
RECIPES = sorted(p for p in CONFIGS.rglob("*.yaml") if not p.name.startswith("continue-")
                 and not p.stem.endswith("-phase2"))
PRESET_OF = {"bert-base": "bert-base", "albert-base": "albert-base", "electra-small": "electra-small",
             "gpt2-small": "gpt2-small"}


def overrides(tmp_path: Path, recipe: Path) -> list[str]:
    """Run a recipe here: the bundled corpus, a small tokenizer trained into tmp_path, logs into tmp_path."""
    return ["--data.files", f"[{BUNDLED_CORPUS}]", "--data.tokenizer", str(tmp_path / f"{recipe.stem}.json"),
            "--data.tokenizer_vocab_size", "400", "--data.cache_dir", str(tmp_path / "cache"),
            "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.accelerator", "cpu"]


def test_there_are_recipes_for_every_family():
    names = {str(p.relative_to(CONFIGS)) for p in RECIPES}
    assert {"bert-base.yaml", "roberta-base.yaml", "albert-base.yaml", "electra-small.yaml", "gpt2-small.yaml",
            "tiny/bert.yaml", "tiny/roberta.yaml", "tiny/albert.yaml", "tiny/electra.yaml", "tiny/gpt2.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_recipe_parses_and_builds_its_model(recipe, tmp_path):
    cli = lightning_cli(["-c", str(recipe), *overrides(tmp_path, recipe), "--trainer.precision", "32-true"],
                        run=False)
    config = cli.model.backbone.config
    assert cli.model.backbone.num_parameters() > 0 and cli.datamodule.vocab_size <= config.vocab_size
    if recipe.stem in PRESET_OF and recipe.parent == CONFIGS:
        assert config == TransformerConfig.preset(PRESET_OF[recipe.stem])
    named = [entry["class_path"].rpartition(".") for entry in yaml.safe_load(recipe.read_text())["model"]["objectives"]]
    assert [type(o) for o in cli.model.objectives] == [getattr(importlib.import_module(module), name)
                                                       for module, _, name in named]
    assert not any(isinstance(c, ModelCheckpoint) for c in cli.trainer.callbacks)  # ours alone writes checkpoints
    checkpointing = [c for c in cli.trainer.callbacks if isinstance(c, Checkpoints)]
    assert len(checkpointing) == 1 and Path(checkpointing[0].dirpath) == tmp_path / "runs" / "checkpoints"
    full = recipe.parent == CONFIGS and recipe.stem != "quickstart"
    assert cli.model.hparams.compile == full
    clip = (yaml.safe_load(recipe.read_text()).get("trainer") or {}).get("gradient_clip_val")
    assert cli.trainer.gradient_clip_val == clip and (clip == 1.0 or not full)  # every full recipe clips at 1.0
    bar = cli.trainer.progress_bar_callback  # refreshed (a host sync) only at the logging steps
    assert isinstance(bar, TQDMProgressBar) and bar.refresh_rate == cli.trainer.log_every_n_steps


@pytest.mark.parametrize("recipe", sorted((CONFIGS / "tiny").glob("*.yaml")), ids=lambda p: p.stem)
def test_tiny_recipe_fits_and_writes_a_checkpoint(recipe, tmp_path):
    code = main(["fit", "-c", str(recipe), *overrides(tmp_path, recipe), "--trainer.max_steps", "3",
                 "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1", "--model.warmup_steps", "1",
                 "--trainer.enable_progress_bar", "false"])
    assert code == 0
    checkpoints = sorted((tmp_path / "runs").rglob("*.ckpt"))
    assert [c.name for c in checkpoints] == ["last.ckpt", "step-00000003.ckpt"]
    assert (tmp_path / "runs" / "logs" / "version_0" / "config.yaml").is_file()
    state = torch.load(checkpoints[0], map_location="cpu", weights_only=True)
    assert state["global_step"] == 3 and "class_path: objectives." in state["config"]  # the resolved recipe
    check_exports(checkpoints[0], tmp_path)


@pytest.mark.parametrize("streaming", [False, True], ids=["cached", "streaming"])
@pytest.mark.parametrize("recipe", ["bert-base", "albert-base"])
def test_pair_recipes_fit_on_a_directory_of_many_files(recipe, streaming, tmp_path):
    """The BERT and ALBERT recipes (tiny sizes) on a corpus directory of 12 files, cached or streamed by two
    workers."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    paragraphs = BUNDLED_CORPUS.read_text().split("\n\n")[:1200]
    for part in range(12):
        (corpus / f"part-{part:02d}.txt").write_text("\n\n".join(paragraphs[part::12]))
    backbone = "{vocab_size: 400, hidden_size: 32, num_layers: 2, num_heads: 2, intermediate_size: 64" + (
        ", embedding_size: 16, sharing: all}" if recipe == "albert-base" else "}")
    arguments = [*overrides(tmp_path, CONFIGS / f"{recipe}.yaml"), "--data.files", f"[{corpus}]",
                 "--model.backbone", backbone, "--model.compile", "false", "--trainer.precision", "32-true",
                 "--data.max_length", "32", "--data.batch_size", "8", "--data.streaming", str(streaming).lower(),
                 "--data.num_workers", "2" if streaming else "0", "--trainer.max_steps", "4",
                 "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "2", "--model.warmup_steps", "1",
                 "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1"]
    assert main(["fit", "-c", str(CONFIGS / f"{recipe}.yaml"), *arguments]) == 0
    rows = list(csv.DictReader((tmp_path / "runs" / "logs" / "version_0" / "metrics.csv").open()))
    assert max(int(row["step"]) for row in rows) == 3 and any(row.get("val/loss") for row in rows)
    objective = "nsp" if recipe == "bert-base" else "sop"
    losses = [float(row[f"train/{objective}_loss"]) for row in rows if row.get(f"train/{objective}_loss")]
    assert len(losses) == 4 and all(loss > 0 for loss in losses)


HF_OUTPUTS = {"mlm": "prediction_logits", "nsp": "seq_relationship_logits", "sop": "sop_logits", "rtd": "logits",
              "clm": "logits"}


def check_exports(checkpoint: Path, tmp_path: Path) -> None:
    """export -> pretrain.load gives identical outputs; --format hf -> transformers gives the same (fp32, 1e-5)."""
    import transformers

    from models.hf import HF_CLASSES, hf_config_for, infer_family

    ours = pretrain.load(checkpoint)
    has_hf_class = any(set(heads) == set(ours.model.heads) for _, heads in HF_CLASSES.values())
    try:  # a variant without a Hugging Face equivalent (e.g. today's ModernBERT-style fields) is refused
        hf_config_for(ours.config, infer_family(ours.config, tuple(ours.model.heads)))
    except ValueError:
        has_hf_class = False
    assert main(["export", str(checkpoint), str(tmp_path / "native")]) == 0
    code = main(["export", str(checkpoint), str(tmp_path / "hf"), "--format", "hf"])
    assert code == (0 if has_hf_class else 2) and (tmp_path / "hf").exists() == has_hf_class
    ids = torch.tensor(ours.tokenize(["To be, or not to be: that is the question."]))
    expected = ours.model(ids)
    exported = pretrain.load(tmp_path / "native").model(ids)
    assert expected.keys() == exported.keys() and all(torch.equal(expected[k], exported[k]) for k in expected)
    if not has_hf_class:  # an objective of ours alone (e.g. span masking): refused in one line, nothing written
        return
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")(
        "To be, or not to be: that is the question.", add_special_tokens=not ours.config.causal)["input_ids"] \
        == ids[0].tolist()
    base = transformers.AutoModel.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(base(ids).last_hidden_state, expected["hidden_states"], rtol=1e-5, atol=1e-5)
    architecture = transformers.AutoConfig.from_pretrained(tmp_path / "hf").architectures[0]
    with_heads = getattr(transformers, architecture).from_pretrained(tmp_path / "hf").eval()
    outputs = with_heads(ids)
    for head in ours.model.heads:
        name = "logits" if architecture.endswith("MaskedLM") else HF_OUTPUTS[head]
        torch.testing.assert_close(outputs[name], expected[head], rtol=1e-5, atol=1e-5)
    reloaded = pretrain.load(tmp_path / "hf")
    outputs = reloaded.model(ids)
    if reloaded.config.attention_masks == ours.config.attention_masks:
        assert all(torch.equal(expected[k], outputs[k]) for k in expected)
    else:  # how masks are made is not a Hugging Face field: the dense masks, the same outputs to rounding
        assert reloaded.config.attention_masks == "dense"
        assert all(torch.allclose(expected[k], outputs[k], rtol=1e-5, atol=1e-5) for k in expected)


@pytest.mark.parametrize("arguments, message", [
    (["fit", "-c", "configs/does-not-exist.yaml"], "does-not-exist.yaml"),
    (["fit", "-c", "configs/tiny/bert.yaml", "--model.learnin_rate", "1"], "learnin_rate"),
    (["fit", "-c", "configs/tiny/bert.yaml", "--model.warmup_steps", "100", "--trainer.max_steps", "5"],
     "model.warmup_steps 100 is not below the run's 5 steps"),  # said before the tokenizer or cache is made
])
def test_bad_input_is_one_clear_error(arguments, message, tmp_path):
    process = subprocess.run([sys.executable, "-m", "pretrain.cli", *arguments,
                              "--data.cache_dir", str(tmp_path), "--trainer.default_root_dir", str(tmp_path)],
                             capture_output=True, text=True, cwd=CONFIGS.parent)
    assert process.returncode == 2
    assert message in process.stderr and "Traceback" not in process.stderr


@pytest.mark.parametrize("arguments, message", [
    (["-c", "configs/tiny/bert.yaml", "--data.layout", "stream"],
     "nsp needs data.layout 'pairs' but the data module has 'stream': set --data.layout pairs"),
    (["-c", "configs/tiny/albert.yaml", "--data.pair_task", "nsp"], "sop needs data.pair_task 'sop'"),
    (["-c", "configs/tiny/roberta.yaml", "--model.objectives.whole_word", "true"], "mlm needs data.word_starts True"),
    (["-c", "configs/tiny/gpt2.yaml", "--data.max_length", "128"], "data.max_length 128 is longer than the model's 64"),
])
def test_a_model_that_cannot_train_on_its_data_is_refused_before_the_first_step(arguments, message, tmp_path,
                                                                                 capsys):
    recipe = CONFIGS.parent / arguments[1]
    assert main(["fit", arguments[0], str(recipe), *arguments[2:], *overrides(tmp_path, recipe)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs" / "checkpoints").exists()
    assert not list((tmp_path / "cache").glob("*/arrays.json"))  # refused before the examples were built


def test_a_config_the_objectives_refuse_is_one_line_and_a_bug_keeps_its_traceback(tmp_path, capsys, monkeypatch):
    """Only bad input (UserError, a model's or objective's ConfigError) and OSErrors become one line: any other
    exception, a ValueError from a bug included, reaches the user with its traceback."""
    import pretrain.training.module as module

    recipe = CONFIGS / "tiny" / "electra.yaml"
    arguments = ["fit", "-c", str(recipe), *overrides(tmp_path, recipe)]
    assert main([*arguments, "--model.objectives.generator_size", "1.2"]) == 2  # 77 wide, 2 heads
    assert "error: generator_size=1.2 gives hidden size 77 and 2 heads" in capsys.readouterr().err

    def bug(*args, **kwargs):
        raise ValueError("an internal inconsistency")

    monkeypatch.setattr(module, "check_combination", bug)
    with pytest.raises(ValueError, match="an internal inconsistency"):
        main(arguments)


def test_a_misspelt_key_in_a_recipe_is_one_clear_error(tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text((CONFIGS / "tiny" / "bert.yaml").read_text().replace("learning_rate", "learnin_rate"))
    process = subprocess.run([sys.executable, "-m", "pretrain.cli", "fit", "-c", str(recipe)], capture_output=True,
                             text=True, cwd=tmp_path)
    assert process.returncode == 2 and "learnin_rate" in process.stderr and "Traceback" not in process.stderr


def test_the_one_private_lightning_hook_we_override_is_still_the_one_that_reads_checkpoint_settings():
    """pretrain.training.cli turns LightningCLI._parse_ckpt_path off (it replaces the model's settings with the
    checkpoint's, dropping overrides). Where a Lightning release reads a checkpoint's hyper-parameters in the CLI, it
    must be through that method, called from __init__; otherwise a resume would silently drop overrides again.
    (The behaviour itself: test_faults' resume with a changed learning rate.)"""
    import inspect

    from pytorch_lightning.cli import LightningCLI

    if "hyper_parameters" in inspect.getsource(LightningCLI):  # Lightning 2.6 and later
        assert "self._parse_ckpt_path()" in inspect.getsource(LightningCLI.__init__)
        assert "hyper_parameters" in inspect.getsource(LightningCLI._parse_ckpt_path)


def test_bad_checkpoints_are_one_clear_error_and_nothing_is_overwritten(tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    truncated = checkpoints / "last.ckpt"
    truncated.write_bytes(b"PK\x03\x04" + b"\x00" * 100)  # the start of a zip archive, cut off
    common = ["fit", "-c", "configs/tiny/bert.yaml", "--trainer.default_root_dir", str(tmp_path / "run")]
    for extra, message in [(["--ckpt_path", str(tmp_path / "nope.ckpt")], "nope.ckpt does not exist"),
                           (["--ckpt_path", str(truncated)], "not a readable checkpoint"),
                           (["--ckpt_path", "last"], "not a readable checkpoint"),
                           ([], "already holds checkpoints of an earlier run")]:
        process = run_cli(*common, *extra)
        assert process.returncode == 2 and message in process.stderr and "Traceback" not in process.stderr, extra
    assert truncated.read_bytes() == b"PK\x03\x04" + b"\x00" * 100
    assert not (tmp_path / "run" / "logs").exists()


def test_bundled_corpus_ships_with_the_package():
    assert BUNDLED_CORPUS.is_file() and BUNDLED_CORPUS.stat().st_size > 1_000_000


def test_quickstart_recipe_learns_and_reports(tmp_path, capsys):
    recipe = CONFIGS / "quickstart.yaml"
    code = main(["fit", "-c", str(recipe), *overrides(tmp_path, recipe), "--trainer.max_steps", "40",
                 "--model.warmup_steps", "5", "--trainer.val_check_interval", "40", "--trainer.limit_val_batches", "2",
                 "--data.max_length", "64", "--trainer.enable_progress_bar", "false"])
    assert code == 0
    summary = capsys.readouterr().out
    assert "trained 40 steps" in summary and "train loss" in summary and "clm_perplexity" in summary
    assert re.search(r"model: [\d,]+ parameters .*MFLOP per training token at length 64", summary)
    nexts = summary.split("next (FILE, GLUE_DIR: yours):\n")[1].splitlines()
    checkpoint = str(tmp_path / "runs" / "checkpoints" / "last.ckpt")
    assert len(nexts) == 6 and all(line.startswith("  pretrain ") and checkpoint in line for line in nexts[1:])
    for line in nexts:  # each suggested command parses as written
        parser().parse_args(shlex.split(line)[1:])
    losses = [float(row["train/loss"]) for row in csv.DictReader((tmp_path / "runs" / "logs" / "version_0" /
                                                                 "metrics.csv").open()) if row["train/loss"]]
    assert losses[-1] < losses[0] - 1.0  # from about ln(400) = 6.0
    process = run_cli("generate", str(tmp_path / "runs" / "checkpoints" / "last.ckpt"), "--prompt", "ROMEO:",
                      "--max-new-tokens", "8")
    assert process.returncode == 0 and process.stdout.startswith("ROMEO:")


def test_generate_and_evaluate_commands(tmp_path, capsys):
    from pretrain.data.tokenizer import train_tokenizer
    from pretrain.downstream.pretrained import Pretrained, model_with_heads
    from tests.helpers import tiny_config

    texts = [f"the {w} walks to the {v}." for w in ("king", "queen", "fool", "page") for v in ("hall", "gate")]
    tokenizer = train_tokenizer(texts * 30, "bpe", 300)
    config = tiny_config(vocab_size=tokenizer.get_vocab_size(), causal=True, norm_position="pre")
    model = Pretrained(model_with_heads(config, ["clm"]), tokenizer)
    model.save(tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(texts))
    process = run_cli("evaluate-lm", str(tmp_path / "model"), "--data", str(text), "--window", "16")
    expected, tokens = model.perplexity(" ".join(texts), window=16)
    assert process.returncode == 0 and f"perplexity {expected:.3f} over {tokens:,} tokens" in process.stdout
    process = run_cli("generate", str(tmp_path / "model"), "--prompt", "the king", "--prompt", "the", "--strategy",
                      "beam", "--num-beams", "2", "--max-new-tokens", "4")
    assert process.returncode == 0 and process.stdout.count("--- ") == 2
    for arguments, message in [(["--strategy", "sample", "--temperature", "0"], "--temperature must be a positive"),
                               (["--temperature", "nan"], "--temperature must be a positive number, got nan"),
                               (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
                               (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
                               (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
                               (["--top-p", "-1"], "--top-p must be in (0, 1]"),
                               (["--top-k", "-3"], "--top-k must be at least 1, got -3"),
                               (["--num-beams", "0"], "--num-beams must be at least 1, got 0"),
                               (["--prompt", "the " * 40], "a prompt fills all 32 positions")]:
        # in this process (main() as the command runs it): the error handling is the command's, and it is fast
        code = main(["generate", str(tmp_path / "model"), "--prompt", "the", *arguments])
        assert code == 2 and message in capsys.readouterr().err, message
    # 32 positions, a prompt of 2 tokens and 64 new tokens asked: 30 are made, and the user is told
    assert main(["generate", str(tmp_path / "model"), "--prompt", "the king", "--max-new-tokens", "64"]) == 0
    output = capsys.readouterr()
    assert "generating 30 new tokens, not 64" in output.err
    assert len(model.tokenizer.encode(output.out.strip(), add_special_tokens=False).ids) >= 30
    for window in ("1000", "1"):
        assert main(["evaluate-lm", str(tmp_path / "model"), "--data", str(text), "--window", window]) == 2
        assert f"--window {window} does not fit the model's 32 positions" in capsys.readouterr().err


def test_a_hugging_face_gpt2_export_carries_the_tokenizers_own_ids(tmp_path):
    import transformers

    from pretrain.data.tokenizer import special_ids, train_tokenizer
    from pretrain.downstream.pretrained import Pretrained, model_with_heads
    from tests.helpers import tiny_config

    tokenizer = train_tokenizer(["the king walks to the hall."] * 50, "bpe", 300)
    config = tiny_config(vocab_size=tokenizer.get_vocab_size(), causal=True, norm_position="pre", type_vocab_size=0)
    Pretrained(model_with_heads(config, ["clm"]), tokenizer).save_hf(tmp_path / "hf")
    eos, pad = special_ids(tokenizer).eos, special_ids(tokenizer).pad
    hf = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    generation = transformers.GenerationConfig.from_pretrained(tmp_path / "hf")
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (eos, eos, pad) and eos < 300
    assert (generation.bos_token_id, generation.eos_token_id) == (eos, eos)


def test_plot_draws_one_panel_per_objective(tmp_path):
    for version, steps in ((0, range(0, 5)), (1, range(5, 10))):  # a fit and its resume
        log = tmp_path / "logs" / f"version_{version}" / "metrics.csv"
        log.parent.mkdir(parents=True)
        rows = ["epoch,step,train/loss,train/mlm_loss,train/nsp_loss,val/mlm_loss"]
        rows += [f"0,{s},{9 - s / 2},{8 - s / 2},0.7," for s in steps] + [f"0,{steps[-1]},,,,{7.5 - version}"]
        log.write_text("\n".join(rows) + "\n")
    process = run_cli("plot", str(tmp_path))  # by default beside the run
    assert process.returncode == 0 and "loss curves of mlm, nsp" in process.stdout
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from pretrain.training.plot import read_metrics

    assert sorted(read_metrics(tmp_path)["train/mlm_loss"]) == list(range(10))
    process = run_cli("plot", str(tmp_path / "logs" / "nothing"))
    assert process.returncode == 2 and "no metrics.csv" in process.stderr
    (tmp_path / "logs" / "version_0" / "metrics.csv").write_bytes(b"epoch,step,train/loss\n0,1,\xff\xfe\n")
    process = run_cli("plot", str(tmp_path), "-o", str(tmp_path / "curves.png"))
    assert process.returncode == 2 and "is not a metrics.csv of pretrain fit" in process.stderr
    assert "Traceback" not in process.stderr


def test_training_logs_tokens_per_second(tmp_path):
    recipe = CONFIGS / "tiny" / "gpt2.yaml"
    assert main(["fit", "-c", str(recipe), *overrides(tmp_path, recipe), "--trainer.max_steps", "7",
                 "--throughput.window", "2", "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "0",
                 "--model.warmup_steps", "1", "--trainer.enable_progress_bar", "false"]) == 0
    rows = list(csv.DictReader((tmp_path / "runs" / "logs" / "version_0" / "metrics.csv").open()))
    rates = [float(row["train/tokens_per_sec"]) for row in rows if row.get("train/tokens_per_sec")]
    assert len(rates) == 3 and all(rate > 0 for rate in rates)  # every 2 steps after the first


def test_the_progress_bar_counts_the_runs_steps(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # a terminal: the bar (elsewhere plain lines)
    recipe = CONFIGS / "tiny" / "gpt2.yaml"
    code = main(["fit", "-c", str(recipe), *overrides(tmp_path, recipe), "--trainer.max_steps", "6",
                 "--trainer.log_every_n_steps", "2", "--trainer.val_check_interval", "6",
                 "--trainer.limit_val_batches", "1", "--model.warmup_steps", "1"])
    assert code == 0
    captured = capsys.readouterr()
    bar = (captured.out + captured.err).replace("\r", "\n")
    assert re.search(r"step: 100%.*\| 6/6 \[", bar) and re.search(r"step: +33%.*\| 2/6 .*train/loss=", bar)
    assert "Epoch" not in bar and "v_num" not in bar


def test_help_shows_defaults_and_a_small_corpus_says_its_tokenizer_is_smaller(tmp_path):
    assert "(default: 64)" in run_cli("generate", "--help").stdout
    assert "(default: 0.5)" in run_cli("finetune", "--help").stdout
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("a few words only, a few words.\n")
    process = run_cli("tokenizer", "train", "--corpus", str(corpus), "--kind", "wordpiece", "--vocab-size", "500",
                      "--out", str(tmp_path / "tok"))
    assert process.returncode == 0 and "(not the 500 asked for" in process.stdout


def test_a_roberta_style_model_exports_as_roberta(tmp_path):
    import transformers

    recipe = CONFIGS / "tiny" / "roberta.yaml"
    assert main(["fit", "-c", str(recipe), *overrides(tmp_path, recipe), "--trainer.max_steps", "2",
                 "--model.warmup_steps", "1", "--trainer.limit_val_batches", "0",
                 "--trainer.enable_progress_bar", "false"]) == 0
    checkpoint = tmp_path / "runs" / "checkpoints" / "last.ckpt"
    assert main(["export", str(checkpoint), str(tmp_path / "hf"), "--format", "hf", "--hf-family", "roberta"]) == 0
    hf_model = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf_model).__name__ == "RobertaForMaskedLM"
    ours = pretrain.load(checkpoint)
    ids = torch.tensor(ours.tokenize(["To be, or not to be: that is the question."]))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, ours.model(ids)["mlm"], atol=1e-4, rtol=1e-4)
    bert = CONFIGS / "tiny" / "bert.yaml"  # a WordPiece tokenizer: its pad id is 0, not RoBERTa's 1
    assert main(["fit", "-c", str(bert), *overrides(tmp_path / "b", bert), "--trainer.max_steps", "1",
                 "--model.warmup_steps", "0", "--trainer.limit_val_batches", "0",
                 "--trainer.enable_progress_bar", "false"]) == 0
    process = run_cli("export", str(tmp_path / "b" / "runs" / "checkpoints" / "last.ckpt"), str(tmp_path / "x"),
                      "--format", "hf", "--hf-family", "roberta")
    assert process.returncode == 2 and "this tokenizer's pad id is 0" in process.stderr


def test_a_recipe_that_cannot_run_is_refused_before_anything_is_built(tmp_path, capsys):
    """Every problem the recipe alone shows, at once, before a tokenizer is trained, a cache built or a directory
    made (the tokenizer, cache and run directory below are never created)."""
    code = main(["fit", "-c", str(CONFIGS / "tiny" / "bert.yaml"), *overrides(tmp_path, CONFIGS / "tiny" / "bert.yaml"),
                 "--trainer.max_steps", "50", "--model.warmup_steps", "100", "--data.tokenizer_vocab_size", "5000",
                 "--data.max_length", "512", "--data.layout", "stream"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.startswith("error: the recipe cannot run:")
    assert "model.warmup_steps 100 is not below the run's 50 steps (trainer.max_steps)" in err
    assert "--model.warmup_steps 5 or --model.warmup_ratio 0.1" in err
    assert "would have up to 5,000 tokens but the model's vocab_size is 2,000" in err
    assert "data.max_length 512 is longer than the model's" in err
    assert "nsp needs data.layout 'pairs' but the data module has 'stream'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing trained, cached or made


def test_abbreviated_and_misspelt_options_are_refused_with_the_nearest_one(tmp_path, capsys):
    for option in ("--trainer.max_step", "--trainer.max_stepz"):  # an abbreviation once ran as max_steps
        code = main(["fit", "-c", str(CONFIGS / "tiny" / "bert.yaml"), option, "5"])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"unrecognized arguments: {option} 5; did you mean --trainer.max_steps? (pretrain fit --help" in err
    for option in ("--max-len", "--max-lenght"):  # our own commands: the subcommand's usage, not the top level's
        with pytest.raises(SystemExit) as stopped:
            main(["finetune", "--model", "m", "--out", str(tmp_path / "o"), option, "64"])
        err = capsys.readouterr().err
        assert stopped.value.code == 2 and err.startswith("usage: pretrain finetune")
        assert f"unrecognized arguments: {option} 64; did you mean --max-length?" in err
    assert not (tmp_path / "o").exists()


def test_progress_is_plain_lines_where_the_output_is_not_a_terminal(tmp_path, capsys):
    """One line per logging step (step of max_steps, time left, losses); no sanity-check or validation bars, no
    carriage returns or escape codes in a log file."""
    recipe = CONFIGS / "tiny" / "bert.yaml"
    assert main(["fit", "-c", str(recipe), *overrides(tmp_path, recipe), "--trainer.max_steps", "10",
                 "--model.warmup_steps", "2", "--trainer.log_every_n_steps", "5", "--trainer.val_check_interval", "5",
                 "--trainer.limit_val_batches", "1"]) == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line.startswith("step ")]
    assert [line.split(" (")[0] for line in lines] == ["step 5/10", "step 10/10"]
    assert "left): train/loss" in lines[0] and "val/loss" in lines[1]
    output = captured.out + captured.err
    assert "\r" not in output and "\x1b[" not in output and "Sanity Checking" not in output
    assert "Validation" not in output
