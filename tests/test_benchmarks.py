"""The benchmark scripts still run (one step per side here; the measurements themselves are in the README)."""

import re
import subprocess
import sys

from tests.helpers import ROOT


def test_throughput_benchmark_prints_every_row_with_a_ratio():
    result = subprocess.run([sys.executable, "benchmarks/throughput.py", "--steps", "1", "--warmup", "1"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if re.match(r"(bert|electra|albert|gpt2)", line)]
    assert [row.split()[0] for row in rows] == [name for name in ("bert-base", "electra-small", "albert-base",
                                                                  "gpt2-small") for _ in range(2)]
    for ours in rows[::2]:  # tokens/s and MFU for each side, the ratio on our row
        assert re.search(r"ours .* [\d,]+ +- +[\d.]+% +[\d.]+x$", ours), ours
