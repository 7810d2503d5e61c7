"""Tokenize and pack a corpus: our pipeline vs a Hugging Face run_mlm-style `group_texts` pipeline.

    python benchmarks/data_pipeline.py                      # IMDB train + test + unsup (137 MB), as in issue 4
    python benchmarks/data_pipeline.py --files a.jsonl b.jsonl --max-length 512 --num-proc 2

Both sides read the same JSONL files with `datasets`, tokenize with the same tokenizer (a 30k WordPiece trained
beforehand on IMDB train, not timed) in `--num-proc` processes and cut blocks of `--max-length` tokens. Each side
runs in its own process with an empty cache; the table gives wall time and the peak memory (proportional set size)
of the whole process tree (the main process plus its workers, sampled every 50 ms from /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "imdb"
DEFAULT_FILES = [str(SHARED / name) for name in ("train.jsonl", "test.jsonl", "unsup.jsonl")]

OURS = """
import sys, json
from pretrain.data.datamodule import PretrainingDataModule
files, tokenizer, max_length, num_proc, cache = json.loads(sys.argv[1])
data = PretrainingDataModule(files, tokenizer, layout="stream", max_length=max_length, validation_fraction=0.0,
                             num_proc=num_proc, cache_dir=cache)
data.setup()
blocks = data.datasets["train"].arrays["input_ids"]
print(json.dumps({"blocks": int(blocks.shape[0]), "tokens": int(data.datasets["train"].arrays["lengths"].sum())}))
"""

# The Hugging Face examples' run_mlm.py (non line_by_line): tokenize everything, then group_texts per map batch of
# 1000 rows, dropping each batch's remainder.
HUGGING_FACE = """
import sys, json
import datasets
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast
files, tokenizer_path, max_length, num_proc, cache = json.loads(sys.argv[1])
tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(tokenizer_path))
raw = datasets.concatenate_datasets([  # one file at a time: unsup.jsonl has no label column
    datasets.load_dataset("json", data_files=f, split="train", cache_dir=cache).select_columns(["text"])
    for f in files])
def tokenize_function(examples):
    return tokenizer(examples["text"], return_special_tokens_mask=True)
tokenized = raw.map(tokenize_function, batched=True, num_proc=num_proc, remove_columns=raw.column_names)
def group_texts(examples):
    concatenated = {k: [t for row in examples[k] for t in row] for k in examples.keys()}
    total_length = len(concatenated[list(examples.keys())[0]])
    total_length = (total_length // max_length) * max_length
    return {k: [t[i: i + max_length] for i in range(0, total_length, max_length)] for k, t in concatenated.items()}
grouped = tokenized.map(group_texts, batched=True, num_proc=num_proc)
print(json.dumps({"blocks": len(grouped), "tokens": len(grouped) * max_length}))
"""


def tree_memory(root: int) -> int:
    """Proportional set size (bytes) of `root` and all its descendants, from /proc: pages shared by forked workers
    are split between them rather than counted in each."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(entry))
            except (OSError, IndexError):
                continue
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def measure(code: str, arguments: list) -> dict:
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", code, json.dumps(arguments)], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    peak = 0

    def sample():
        nonlocal peak
        while process.poll() is None:
            peak = max(peak, tree_memory(process.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    output, _ = process.communicate()
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"benchmark side failed with exit code {process.returncode}")
    return {"seconds": time.perf_counter() - start, "peak_bytes": peak, **json.loads(output.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", nargs="+", default=DEFAULT_FILES)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=30000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as work:
        from pretrain.data.corpus import load_corpus
        from pretrain.data.tokenizer import train_tokenizer

        tokenizer_path = str(Path(work) / "tokenizer.json")
        train_tokenizer(load_corpus(args.files[:1], cache_dir=Path(work) / "untimed")["text"], "wordpiece",
                        args.vocab_size).save(tokenizer_path)
        results = {}
        for name, code in (("ours", OURS), ("hugging face group_texts", HUGGING_FACE)):
            cache = str(Path(work) / name.replace(" ", "_"))
            results[name] = measure(code, [args.files, tokenizer_path, args.max_length, args.num_proc, cache])

    size = sum(Path(f).stat().st_size for f in args.files) / 2**20
    print(f"tokenize + pack {len(args.files)} files ({size:.0f} MB), max_length {args.max_length}, "
          f"{args.num_proc} processes, {os.cpu_count()} cores")
    print(f"{'pipeline':<26}{'seconds':>9}{'peak memory':>14}{'blocks':>10}{'tokens kept':>14}")
    for name, r in results.items():
        print(f"{name:<26}{r['seconds']:>9.1f}{r['peak_bytes'] / 2**30:>12.2f} GB{r['blocks']:>10,}{r['tokens']:>14,}")
    ours, theirs = results["ours"], results["hugging face group_texts"]
    print(f"speed-up of ours: {theirs['seconds'] / ours['seconds']:.2f}x; "
          f"memory ratio (ours / theirs): {ours['peak_bytes'] / theirs['peak_bytes']:.2f}")


if __name__ == "__main__":
    main()
