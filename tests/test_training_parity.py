"""Whole training runs equal Hugging Face's, step for step: the 20-step version of benchmarks/training_parity.py
(the 200-step table is in the README). Same initial weights, batches, corruption, optimizer, schedule and clipping:
a bug that moves labels, skips weight decay or mis-schedules the learning rate shows up here at once."""

import importlib.util
import sys

import pytest

from tests.helpers import ROOT

pytest.importorskip("transformers", reason="the reference is Hugging Face transformers (dev extras)")


def parity_module():
    spec = importlib.util.spec_from_file_location("training_parity", ROOT / "benchmarks" / "training_parity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("parity")  # one tokenizer and one cache per layout for every family


@pytest.mark.parametrize("family", ["bert", "albert", "electra", "roberta", "gpt2"])
def test_twenty_training_steps_equal_hugging_faces(family, workdir):
    parity = parity_module()
    result = parity.compare(family, parity.Settings(steps=20, warmup_steps=2), workdir)
    assert result["max_difference_first_20"] <= 1e-5, parity.table(family, result)
    assert result["final_weights_difference"] <= 1e-4, parity.table(family, result)
    assert result["ours"][-1] < result["ours"][0] - 0.1  # it trains: the comparison is not of two frozen models
