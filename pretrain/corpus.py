"""Reading corpora through `datasets`: text files (a document per blank-line-separated block or per line), globs and
directories, JSONL / CSV / Parquet with a named text field, and datasets saved with `save_to_disk`."""

from __future__ import annotations

import glob
import html
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import datasets
import pyarrow.compute

from pretrain.errors import UserError

DocumentsBy = Literal["paragraph", "line"]
FORMATS = {".txt": "text", ".tokens": "text", ".raw": "text", ".text": "text", ".jsonl": "json", ".json": "json",
           ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
REPLACEMENT = "\ufffd"
_TAGS = re.compile(r"<br\s*/?>|</?p>", re.IGNORECASE)


def resolve_files(patterns: Sequence[str | Path]) -> list[Path]:
    """Files named by paths, globs and directories (a directory means every file below it), sorted, unique."""
    if isinstance(patterns, (str, Path)):
        patterns = [patterns]
    if not patterns:
        raise UserError("no corpus given: pass at least one file, glob or directory")
    files: list[Path] = []
    for pattern in map(str, patterns):
        if glob.has_magic(pattern):
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            if not matches:
                raise UserError(f"the glob {pattern!r} matches no file; check the pattern and quote it in the shell")
            files += matches
        elif Path(pattern).is_dir() and not (Path(pattern) / "dataset_info.json").is_file():
            matches = sorted(p for p in Path(pattern).rglob("*") if p.is_file() and not p.name.startswith("."))
            if not matches:
                raise UserError(f"the directory {pattern} holds no file")
            files += matches
        elif Path(pattern).exists():
            files.append(Path(pattern))
        else:
            raise UserError(f"corpus path not found: {pattern}")
    return list(dict.fromkeys(files))


def clean_text(text: str) -> str:
    """Optional cleaning: HTML line-break tags (as in IMDB reviews) become newlines, entities are unescaped."""
    return html.unescape(_TAGS.sub("\n", text))


def load_corpus(
    patterns: Sequence[str | Path],
    text_field: str = "text",
    documents_by: DocumentsBy = "paragraph",
    clean: bool = False,
    cache_dir: str | Path | None = None,
    streaming: bool = False,
    drop_empty: bool = True,
) -> datasets.Dataset | datasets.IterableDataset:
    """One `datasets.Dataset` with a single "text" column, a document per row; with `streaming`, an
    `IterableDataset` that reads the files lazily, in the same order, with the same documents. Empty documents are
    dropped (and an empty corpus refused) unless `drop_empty=False`: the packer skips them for free, a filter pass
    over a large corpus is not free.

    Text files give a document per blank-line-separated block (`documents_by="paragraph"`) or per line; JSONL, CSV
    (TSV) and Parquet files give a document per row from `text_field`; a directory written by `save_to_disk` gives its
    rows. Invalid UTF-8 is decoded with replacement characters and counted in a warning.
    """
    files = resolve_files(patterns)
    parts = [_load_one(path, text_field, documents_by, cache_dir, streaming) for path in files]
    if len({str(part.features["text"]) if part.features else None for part in parts}) > 1:
        # formats disagree on string vs large_string; one type lets them concatenate
        parts = [part.cast_column("text", datasets.Value("large_string")) for part in parts]
    corpus = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if clean:
        corpus = corpus.map(lambda batch: {"text": [clean_text(t) for t in batch["text"]]}, batched=True)
    if drop_empty:
        corpus = corpus.filter(lambda batch: [bool(t and t.strip()) for t in batch["text"]], batched=True)
    if streaming:
        return corpus
    if drop_empty and len(corpus) == 0:
        raise UserError(f"the corpus is empty: {', '.join(map(str, patterns))} holds no text")
    if any(FORMATS.get(path.suffix.lower(), "text") == "text" for path in files):
        column = corpus.data.column("text")  # counted in Arrow, without making Python strings
        replaced = pyarrow.compute.sum(pyarrow.compute.count_substring(column, REPLACEMENT)).as_py() or 0
        if replaced:
            warnings.warn(f"{replaced} invalid UTF-8 byte sequences in the corpus were replaced by {REPLACEMENT!r}",
                          stacklevel=2)
    return corpus


def _load_one(path: Path, text_field: str, documents_by: DocumentsBy, cache_dir, streaming: bool):
    if path.is_dir():  # written by Dataset.save_to_disk
        try:
            dataset = datasets.load_from_disk(str(path))
        except Exception as error:
            raise UserError(f"{path} is not a dataset saved with save_to_disk: {error}") from error
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset["train"]
        dataset = _text_column(dataset, text_field, path)
        return dataset.to_iterable_dataset() if streaming else dataset
    kind = FORMATS.get(path.suffix.lower(), "text")
    cache = str(cache_dir) if cache_dir else None
    try:
        if kind == "text":
            dataset = datasets.load_dataset("text", data_files=str(path), split="train", cache_dir=cache,
                                            sample_by=documents_by, encoding_errors="replace", streaming=streaming)
            return dataset.map(lambda batch: {"text": [t.strip() for t in batch["text"]]}, batched=True)
        options = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
        dataset = datasets.load_dataset(kind, data_files=str(path), split="train", cache_dir=cache,
                                        streaming=streaming, **options)
    except UserError:
        raise
    except Exception as error:
        raise UserError(f"could not read {path} as {kind}: {error}") from error
    return _text_column(dataset, text_field, path)


def _text_column(dataset, text_field: str, path: Path):
    if dataset.column_names is not None and text_field not in dataset.column_names:
        raise UserError(f"{path} has no field {text_field!r} (it has {dataset.column_names}); "
                        "name the text field with --data.text_field")
    dataset = dataset.select_columns([text_field])
    return dataset.rename_column(text_field, "text") if text_field != "text" else dataset
