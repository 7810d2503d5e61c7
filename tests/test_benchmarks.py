"""The benchmark scripts still run (one step per side here; the measurements themselves are in the README), and the
throughput benchmark's two sides compute the same loss: it times the same computation."""

import importlib.util
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
