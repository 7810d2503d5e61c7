"""The quickstart (the README's main job) and the CLI's error handling."""

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_model

from models import LMHead, ModelWithHeads, Transformer
from pretrain.cli import main
from pretrain.data import BUNDLED_CORPUS
from pretrain.quickstart import quickstart_config, run


def test_bundled_corpus_ships_with_the_package():
    assert BUNDLED_CORPUS.is_file() and BUNDLED_CORPUS.stat().st_size > 1_000_000


def test_short_run_learns_and_saves_a_loadable_model(tmp_path):
    out = tmp_path / "run"
    results = run(BUNDLED_CORPUS, out, steps=40, batch_size=8, seq_len=64, log_every=20)
    assert results["valid_loss"] < math.log(256) - 1.5  # bytes of English are far from uniform after 40 steps
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["vocab_size"] == 256 and saved["heads"] == ["clm"]
    assert (out / "logs" / "metrics.csv").is_file()
    backbone = Transformer(quickstart_config(64))
    model = ModelWithHeads(backbone, {"clm": LMHead(backbone.config, backbone.embeddings.word, False, False)})
    load_model(model, str(out / "model.safetensors"))
    tokens = torch.tensor([list(b"To be, or not to be")])
    with torch.no_grad():
        logits = model.eval()(tokens)["clm"][0, :-1]
    loss = torch.nn.functional.cross_entropy(logits, tokens[0, 1:])
    assert loss.item() < math.log(256) - 1.0


def test_existing_output_is_refused_and_kept(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.safetensors").write_text("precious")
    assert main(["quickstart", "--out", str(out), "--steps", "1"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "model.safetensors").read_text() == "precious"


@pytest.mark.parametrize("corpus, message", [("missing.txt", "corpus file not found"), ("small.txt", "needs at least")])
def test_bad_corpus_is_one_clear_error_without_traceback(tmp_path, corpus, message):
    (tmp_path / "small.txt").write_text("too short")
    process = subprocess.run(
        [sys.executable, "-m", "pretrain.cli", "quickstart", "--corpus", str(tmp_path / corpus),
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True,
    )
    assert process.returncode == 2
    assert message in process.stderr and "Traceback" not in process.stderr
    assert not (tmp_path / "out").exists()
