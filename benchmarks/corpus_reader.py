"""The corpus reader on files without a blank line (one document of the whole file: logs, code, a dump with single
newlines): time and peak memory of `pretrain.data.corpus.text_documents` against the reader it replaced, which
split the growing unfinished document again on every 4 MiB chunk (quadratic in the file's size). Each reading runs
in a fresh process (its peak resident memory is its own).

    python benchmarks/corpus_reader.py                  # 25, 50, 100 and 200 MB
    python benchmarks/corpus_reader.py --sizes 10 20
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BLANK_LINE = re.compile(r"\n[^\S\n]*\n")


def resplitting_reader(path: str, chunk_size: int = 1 << 22):
    """The reader before: every chunk re-splits everything not yet ended by a blank line."""
    with open(path, encoding="utf-8", errors="replace") as file:
        carry = ""
        while chunk := file.read(chunk_size):
            parts = BLANK_LINE.split(carry + chunk)
            carry = parts.pop()
            for part in parts:
                if part.strip():
                    yield {"text": part.strip()}
        if carry.strip():
            yield {"text": carry.strip()}


def measure(reader: str, path: str) -> dict:
    from pretrain.data.corpus import text_documents

    start = time.perf_counter()
    documents = sum(1 for _ in (text_documents(path, "paragraph") if reader == "now" else resplitting_reader(path)))
    return {"seconds": time.perf_counter() - start, "documents": documents,
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[25, 50, 100, 200], help="file sizes in MB")
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)  # (the child process: reader, path)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    line = "the quick brown fox jumps over the lazy dog and keeps running through the corpus reader\n"
    print(f"{'MB':>5}{'before s':>10}{'now s':>8}{'before MiB':>12}{'now MiB':>9}")
    with tempfile.TemporaryDirectory() as directory:
        for size in args.sizes:
            path = Path(directory) / f"{size}.txt"
            with path.open("w") as file:
                for _ in range(size * 1_000_000 // len(line)):
                    file.write(line)
            rows = {}
            for reader in ("before", "now"):
                output = subprocess.run([sys.executable, __file__, "--measure", reader, str(path)], check=True,
                                        capture_output=True, text=True).stdout
                rows[reader] = json.loads(output.strip().splitlines()[-1])
                assert rows[reader]["documents"] == 1
            print(f"{size:>5}{rows['before']['seconds']:>10.2f}{rows['now']['seconds']:>8.2f}"
                  f"{rows['before']['peak_mib']:>12.0f}{rows['now']['peak_mib']:>9.0f}", flush=True)
            path.unlink()


if __name__ == "__main__":
    main()
