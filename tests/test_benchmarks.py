"""The benchmark scripts still run (one step per side here; the measurements themselves are in the README), and the
throughput benchmark's two sides compute the same loss: it times the same computation."""

import importlib.util
import json
import re
import subprocess
import sys

import pytest

from tests.helpers import ROOT

transformers = pytest.importorskip("transformers", reason="the benchmarks compare with Hugging Face transformers")


def throughput_module():
    spec = importlib.util.spec_from_file_location("throughput", ROOT / "benchmarks" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["bert-base", "electra-small", "albert-base", "gpt2-small"])
def test_both_sides_of_the_throughput_benchmark_compute_the_same_loss(name):
    throughput = throughput_module()
    ours, theirs = throughput.same_loss(next(row for row in throughput.ROWS if row.name == name))
    assert ours > 1.0 and abs(ours - theirs) < 1e-4 * ours, (ours, theirs)


def test_throughput_benchmark_prints_every_row_with_a_ratio():
    result = subprocess.run([sys.executable, "benchmarks/throughput.py", "--steps", "1", "--warmup", "1"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if re.match(r"(bert|electra|albert|gpt2)", line)]
    assert [row.split()[0] for row in rows] == [name for name in ("bert-base", "electra-small", "albert-base",
                                                                  "gpt2-small") for _ in range(2)]
    for ours in rows[::2]:  # tokens/s and MFU for each side, the ratio on our row
        assert re.search(r"ours .* [\d,]+ +- +[\d.]+% +[\d.]+x$", ours), ours


@pytest.mark.skipif(not (ROOT.parent / "shared" / "data" / "imdb").is_dir(),
                    reason="needs ../shared/data (present on CI)")
def test_the_objectives_comparison_runs_end_to_end_on_a_tiny_budget(tmp_path):
    """Every arm pretrains (a few seconds each), every arm and baseline fine-tunes on both tasks, and the JSON has
    the shape the README and the issue describe."""
    process = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "objectives_compared.py"), "--smoke",
                              "--budget-minutes", "0.05", "--seeds", "1", "--out", str(tmp_path)],
                             capture_output=True, text=True, cwd=tmp_path)
    assert process.returncode == 0, process.stderr[-2000:]
    results = json.loads((tmp_path / "objectives_compared.json").read_text())
    assert set(results) == {"budget_minutes", "machine", "arms"}
    assert list(results["arms"]) == ["bert", "roberta", "electra", "albert", "gpt", "scratch_encoder",
                                     "scratch_decoder"]
    for arm, entry in results["arms"].items():
        assert set(entry) == ({"imdb_1k", "sst2_5k"} | (set() if arm.startswith("scratch") else {"pretrain"}))
        for task in ("imdb_1k", "sst2_5k"):
            assert set(entry[task]) == {"median", "min", "max", "seeds", "epochs", "train", "learning_rate", "held_out"}
            assert 0 <= entry[task]["train"]["median"] <= 100  # the training set scored beside dev
            # the rate fine-tuned at is the one that scored best on the held-out part of the training set
            held_out = entry[task]["held_out"]
            assert len(held_out) == 2 and held_out[f"{entry[task]['learning_rate']:g}"] == max(held_out.values())
        if "pretrain" in entry:  # a step budget from the calibrated speed, every step of it run
            assert entry["pretrain"]["steps"] == entry["pretrain"]["planned_steps"] >= 20
            assert entry["pretrain"]["tokens"] > 0 and entry["pretrain"]["seconds_per_step_calibrated"] > 0
    electra = results["arms"]["electra"]["pretrain"]
    assert {"rtd_replaced_accuracy", "rtd_original_accuracy", "rtd_token_similarity"} <= set(electra["final"])
    assert 0 < electra["rtd_base_rate"] < 0.7
    assert "electra's discriminator over its last 10 % of steps" in process.stdout
    assert (tmp_path / "objectives_compared.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.skipif(not (ROOT.parent / "shared" / "data" / "imdb").is_dir(),
                    reason="needs ../shared/data (present on CI)")
def test_the_data_pipeline_benchmark_measures_each_case(tmp_path):
    """A sliver of one copy of IMDB through three of the six cases: tokens, time and the process tree's memory."""
    cases = ["stream/hf", "stream/cached", "pairs/streaming"]
    process = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "data_pipeline.py"), "--scale", "0.003",
                              "--vocab-size", "500", "--cases", *cases, "--out", str(tmp_path)],
                             capture_output=True, text=True, cwd=tmp_path)
    assert process.returncode == 0, process.stderr[-2000:]
    rows = json.loads((tmp_path / "data_pipeline.json").read_text())["rows"]
    assert [row["case"] for row in rows] == cases
    for row in rows:
        assert row["tokens"] > 10_000 and row["seconds"] > 0 and 0.05 < row["peak_memory_gb"] < 4
        assert row["peak_with_mapped_files_gb"] >= row["peak_memory_gb"]
    assert re.search(r"stream/cached +[\d.]+ +[\d.]+ +[\d,]+ +[\d.]+x", process.stdout), process.stdout
