"""The data pipeline at corpus scale: a corpus of N copies of the IMDB reviews (train, test and unlabelled: 100k
reviews, about 130 MB of text a copy, written on the fly to a temporary directory as one JSONL file per copy) made
into examples, per layout and mode, against the Hugging Face pipeline a user would write:

    stream  hf          run_mlm's tokenize_function + group_texts with datasets.map (num_proc=2)
            cached      PretrainingDataModule(layout="stream", num_proc=2).setup(): read, tokenize, pack, write
                        the memory-mapped cache
            streaming   PretrainingDataModule(streaming=True, num_workers=2): one epoch of the training loader
    pairs   hf          the straightforward datasets.map port of BERT's create_pretraining_data (num_proc=2)
            cached      PretrainingDataModule(layout="pairs", num_proc=2).setup()
            streaming   PretrainingDataModule(layout="pairs", streaming=True, num_workers=2): one epoch

Every case runs in its own process, from a cold cache; its peak memory is that of its process tree (the case and
its workers), sampled every 0.1 s from /proc: "memory" is the proportional share of anonymous and shared memory
(what the machine must hold), "incl. mapped files" adds the pages of memory-mapped files (Arrow, the cache) that
are resident, which the kernel may drop at any time.

    python benchmarks/data_pipeline.py --scale 1 2 8      # one table; results/data_pipeline.json
    python benchmarks/data_pipeline.py --scale 0.02 --vocab-size 2000   # a smoke run (2 % of one copy)

Needs ../shared/data/imdb. The tokenizer (WordPiece, 30,522 tokens, trained once on imdb/train.jsonl) is cached in
--out; max_length 128, batch size 32.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
IMDB = ROOT / ".." / "shared" / "data" / "imdb"
CASES = ("stream/hf", "stream/cached", "stream/streaming", "pairs/hf", "pairs/cached", "pairs/streaming")
MAX_LENGTH, BATCH, PROCESSES = 128, 32, 2


def make_corpus(directory: Path, scale: float) -> list[Path]:
    """ceil(scale) JSONL files of the IMDB reviews (a fraction of one for scale < 1), a line at a time."""
    sources = [IMDB / name for name in ("train.jsonl", "test.jsonl", "unsup.jsonl")]
    total = sum(1 for source in sources for _ in source.open())
    files = []
    copies, fraction = (1, scale) if scale < 1 else (int(scale), 1.0)
    for copy in range(copies):
        path = directory / f"imdb-{copy:02d}.jsonl"
        with path.open("w") as out:
            written = 0
            for source in sources:
                for line in source.open():
                    if written >= fraction * total:
                        break
                    out.write(json.dumps({"text": json.loads(line)["text"]}) + "\n")
                    written += 1
        files.append(path)
    return files


def tokenizer_file(out: Path, vocab_size: int) -> Path:
    path = out / f"wordpiece-{vocab_size}" / "tokenizer.json"
    if not path.is_file():
        from pretrain.data.tokenizer import train_tokenizer_on_files

        train_tokenizer_on_files([IMDB / "train.jsonl"], "wordpiece", vocab_size, path, clean=True)
    return path


# --- the cases (each in its own process) ----------------------------------------------------------------------

def ours(layout: str, streaming: bool, files: list[Path], tokenizer: Path, work: Path) -> dict:
    from pretrain.data.datamodule import PretrainingDataModule

    data = PretrainingDataModule([str(f) for f in files], str(tokenizer), layout=layout, max_length=MAX_LENGTH,
                                 batch_size=BATCH, validation_fraction=0.0, streaming=streaming,
                                 num_workers=PROCESSES if streaming else 0, num_proc=None if streaming else PROCESSES,
                                 cache_dir=str(work / "cache"))
    data.setup()
    if not streaming:
        arrays = data.datasets["train"].arrays
        return {"examples": len(arrays["input_ids"]), "tokens": int(arrays["lengths"].sum())}
    examples = tokens = 0
    for batch in data.train_dataloader():
        examples += len(batch["input_ids"])
        tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    return {"examples": examples, "tokens": tokens}


def hf_stream(files: list[Path], tokenizer: Path, work: Path) -> dict:
    """run_mlm.py (transformers' example): tokenize_function, then group_texts into blocks of max_length."""
    import datasets
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer), cls_token="[CLS]", sep_token="[SEP]",
                                 pad_token="[PAD]", mask_token="[MASK]", unk_token="[UNK]")
    raw = datasets.load_dataset("json", data_files=[str(f) for f in files], split="train",
                                cache_dir=str(work / "hf"))

    def tokenize_function(examples):
        return hf(examples["text"], return_special_tokens_mask=True)

    tokenized = raw.map(tokenize_function, batched=True, num_proc=PROCESSES, remove_columns=["text"])

    def group_texts(examples):
        concatenated = {k: [t for row in examples[k] for t in row] for k in examples}
        total = len(concatenated["input_ids"]) // MAX_LENGTH * MAX_LENGTH
        return {k: [t[i:i + MAX_LENGTH] for i in range(0, total, MAX_LENGTH)] for k, t in concatenated.items()}

    grouped = tokenized.map(group_texts, batched=True, num_proc=PROCESSES)
    return {"examples": len(grouped), "tokens": len(grouped) * MAX_LENGTH}


def hf_pairs(files: list[Path], tokenizer: Path, work: Path) -> dict:
    """BERT's create_pretraining_data.py (create_instances_from_document, NSP, dupe_factor 1, no masking: the masks
    are drawn on the fly), ported to one datasets.map over batches of 1000 documents, the way a user writes it."""
    import datasets
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer), unk_token="[UNK]")
    cls_id, sep_id = hf.convert_tokens_to_ids("[CLS]"), hf.convert_tokens_to_ids("[SEP]")
    sentence_end = re.compile(r"(?<=[.!?])\s+|\n+")
    raw = datasets.load_dataset("json", data_files=[str(f) for f in files], split="train",
                                cache_dir=str(work / "hf"))

    def create_instances(examples, indices):
        rng = random.Random(indices[0])
        documents = []
        for text in examples["text"]:
            sentences = [s.strip() for s in sentence_end.split(text) if s.strip()]
            if sentences:
                documents.append(hf(sentences, add_special_tokens=False)["input_ids"])
        out = {"input_ids": [], "token_type_ids": [], "next_sentence_label": []}
        max_num_tokens = MAX_LENGTH - 3
        for index, document in enumerate(documents):
            target = rng.randint(2, max_num_tokens) if rng.random() < 0.1 else max_num_tokens
            chunk, length, i = [], 0, 0
            while i < len(document):
                chunk.append(document[i])
                length += len(document[i])
                if i == len(document) - 1 or length >= target:
                    a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
                    tokens_a = [t for s in chunk[:a_end] for t in s]
                    tokens_b, is_random = [], False
                    if len(chunk) == 1 or rng.random() < 0.5:
                        is_random = True
                        other = rng.randint(0, len(documents) - 1)
                        for _ in range(10):
                            if other != index:
                                break
                            other = rng.randint(0, len(documents) - 1)
                        random_document = documents[other]
                        for sentence in random_document[rng.randint(0, len(random_document) - 1):]:
                            tokens_b.extend(sentence)
                            if len(tokens_b) >= target - len(tokens_a):
                                break
                        i -= len(chunk) - a_end  # put the unused segments back
                    else:
                        tokens_b = [t for s in chunk[a_end:] for t in s]
                    while len(tokens_a) + len(tokens_b) > max_num_tokens:
                        longer = tokens_a if len(tokens_a) > len(tokens_b) else tokens_b
                        del longer[0 if rng.random() < 0.5 else -1]
                    if tokens_a and tokens_b:
                        out["input_ids"].append([cls_id, *tokens_a, sep_id, *tokens_b, sep_id])
                        out["token_type_ids"].append([0] * (len(tokens_a) + 2) + [1] * (len(tokens_b) + 1))
                        out["next_sentence_label"].append(int(is_random))
                    chunk, length = [], 0
                i += 1
        return out

    pairs = raw.map(create_instances, batched=True, batch_size=1000, with_indices=True, num_proc=PROCESSES,
                    remove_columns=["text"])
    return {"examples": len(pairs), "tokens": sum(len(ids) for ids in pairs.data.column("input_ids").to_pylist())}


def run_case(case: str, files: list[Path], tokenizer: Path, work: Path) -> dict:
    layout, mode = case.split("/")
    start = time.perf_counter()
    if mode == "hf":
        counts = (hf_stream if layout == "stream" else hf_pairs)(files, tokenizer, work)
    else:
        counts = ours(layout, mode == "streaming", files, tokenizer, work)
    return counts | {"seconds": time.perf_counter() - start}


# --- the parent: one process per case, its tree's memory sampled ----------------------------------------------

def tree(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo += [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                pass
    return found


def memory(pid: int) -> tuple[int, int]:
    """(anonymous + shared, all) proportional set size of the process tree, bytes."""
    core = total = 0
    for process in tree(pid):
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{process}/smaps_rollup").read_text()
                          .splitlines()[1:])
        except (OSError, ValueError):
            continue
        size = {name: int(value.split()[0]) * 1024 for name, value in fields.items()}
        core += size.get("Pss_Anon", 0) + size.get("Pss_Shmem", 0)
        total += size.get("Pss", 0)
    return core, total


def measure(case: str, files: list[Path], tokenizer: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="pipeline-work-") as work:
        command = [sys.executable, __file__, "--case", case, "--tokenizer", str(tokenizer), "--work", work,
                   "--files", *map(str, files)]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                   env=os.environ | {"TOKENIZERS_PARALLELISM": "true"})
        peak = [0, 0]

        def sample():
            while process.poll() is None:
                peak[:] = [max(p, m) for p, m in zip(peak, memory(process.pid), strict=True)]
                time.sleep(0.1)

        sampler = threading.Thread(target=sample)
        sampler.start()
        output, _ = process.communicate()
        sampler.join()
        if process.returncode != 0:
            raise SystemExit(f"{case} failed (exit {process.returncode}); run it alone: {' '.join(command)}")
        result = json.loads(output.strip().splitlines()[-1])
    return result | {"peak_memory_gb": peak[0] / 1e9, "peak_with_mapped_files_gb": peak[1] / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, nargs="+", default=[1.0], help="copies of the IMDB reviews")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "data_pipeline")
    parser.add_argument("--vocab-size", type=int, default=30522, help="of the WordPiece tokenizer")
    parser.add_argument("--results", type=Path, help="also write the JSON here (default: results/data_pipeline.json"
                                                      " for scales >= 1)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--files", nargs="+", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # a child: one case, its result as the last line
        print(json.dumps(run_case(args.case, args.files, args.tokenizer, args.work)), flush=True)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer_file(args.out, args.vocab_size)
    import torch

    rows = []
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"max_length {MAX_LENGTH}, {PROCESSES} processes / workers", flush=True)
    print(f"{'scale':>6} {'text MB':>8}  {'case':<17}{'seconds':>9}{'M tokens':>10}{'tokens/s':>11}{'vs hf':>7}"
          f"{'memory GB':>11}{'+mapped GB':>12}", flush=True)
    for scale in args.scale:
        with tempfile.TemporaryDirectory(prefix="pipeline-corpus-") as directory:
            files = make_corpus(Path(directory), scale)
            megabytes = sum(f.stat().st_size for f in files) / 1e6
            baseline = {}
            for case in args.cases:
                result = measure(case, files, tokenizer)
                layout, mode = case.split("/")
                if mode == "hf":
                    baseline[layout] = result["seconds"]
                result |= {"scale": scale, "text_mb": round(megabytes, 1), "case": case,
                           "tokens_per_second": result["tokens"] / result["seconds"]}
                rows.append(result)
                ratio = baseline.get(layout)
                speed = "" if mode == "hf" or ratio is None else f"{ratio / result['seconds']:.2f}x"
                print(f"{scale:>6g} {megabytes:>8.0f}  {case:<17}{result['seconds']:>9.1f}"
                      f"{result['tokens'] / 1e6:>10.2f}{result['tokens_per_second']:>11,.0f}{speed:>7}"
                      f"{result['peak_memory_gb']:>11.2f}{result['peak_with_mapped_files_gb']:>12.2f}", flush=True)
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "max_length": MAX_LENGTH, "processes": PROCESSES, "rows": rows}
    (args.out / "data_pipeline.json").write_text(json.dumps(report, indent=2) + "\n")
    target = args.results or (ROOT / "benchmarks" / "results" / "data_pipeline.json"
                              if min(args.scale) >= 1 else None)
    if target:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written: {args.out / 'data_pipeline.json'}" + (f", {target}" if target else ""))


if __name__ == "__main__":
    main()
