"""Reading corpora through `datasets`: text files (a document per blank-line-separated block or per line), globs and
directories, JSONL / CSV / Parquet with a named text field, and datasets saved with `save_to_disk`."""

from __future__ import annotations

import functools
import glob
import html
import re
import warnings
from collections.abc import Iterator, Sequence
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
# Documents in text files: separated by a line that is empty or holds only whitespace (WikiText's blank lines hold
# one space).
_BLANK_LINE = re.compile(r"\n[^\S\n]*\n")
SNIFF_BYTES = 1 << 16
MAX_INVALID_SHARE = 0.2  # of the characters in a file's first 64 KiB: more than this invalid UTF-8 is not text


def resolve_files(patterns: Sequence[str | Path] | str | Path) -> list[Path]:
    """Files named by paths, globs and directories (a directory means every file below it), sorted, unique. A file
    named on its own that is not text (binary content: NUL bytes, or mostly invalid UTF-8) is refused; such files
    found by a glob or in a directory are skipped, with a warning that counts them."""
    if isinstance(patterns, (str, Path)):
        patterns = [patterns]
    if not patterns:
        raise UserError("no corpus given: pass at least one file, glob or directory")
    files: list[Path] = []
    skipped: list[Path] = []
    for pattern in map(str, patterns):
        if glob.has_magic(pattern):
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            if not matches:
                raise UserError(f"the glob {pattern!r} matches no file; check the pattern and quote it in the shell")
        elif Path(pattern).is_dir() and not (Path(pattern) / "dataset_info.json").is_file():
            matches = sorted(p for p in Path(pattern).rglob("*") if p.is_file() and not p.name.startswith("."))
            if not matches:
                raise UserError(f"the directory {pattern} holds no file")
        elif Path(pattern).exists():
            if not looks_like_text(Path(pattern)):
                raise UserError(f"{pattern} is not a text file (binary content); give text, JSONL, CSV or Parquet "
                                "files")
            files.append(Path(pattern))
            continue
        else:
            raise UserError(f"corpus path not found: {pattern}")
        text = [path for path in matches if looks_like_text(path)]
        if not text:
            raise UserError(f"{pattern} holds no text file (the {len(matches)} files there are binary)")
        skipped += [path for path in matches if path not in text]
        files += text
    if skipped:
        warnings.warn(f"skipped {len(skipped)} files that are not text (binary content), e.g. {skipped[0]}",
                      stacklevel=2)
    return list(dict.fromkeys(files))


def looks_like_text(path: Path) -> bool:
    """Whether a corpus file can be read as text: its first 64 KiB hold no NUL byte and at most 20 % invalid UTF-8
    (a Latin-1 file with accents passes; an image, an executable or random bytes do not). Parquet files and
    `save_to_disk` directories are binary by design and pass."""
    if path.is_dir() or FORMATS.get(path.suffix.lower()) == "parquet":
        return True
    stat = path.stat()
    return _head_is_text(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=1 << 16)
def _head_is_text(path: str, size: int, mtime_ns: int) -> bool:
    """`looks_like_text` for one version of a file (size and mtime key the cache): each file is read once per run,
    however many times the corpus is resolved (fingerprint, tokenizer, each split)."""
    with open(path, "rb") as file:
        head = file.read(SNIFF_BYTES)
    if b"\0" in head:
        return False
    decoded = head.decode("utf-8", errors="replace")
    # the last character may be a sequence cut at the 64 KiB boundary: not counted
    return decoded[:-1].count(REPLACEMENT) <= MAX_INVALID_SHARE * max(1, len(decoded))


def text_documents(path: str, documents_by: DocumentsBy, chunk_size: int = 1 << 22, **_) -> Iterator[dict[str, str]]:
    """The documents of a text file, read a chunk at a time (bounded memory), stripped, empty ones skipped: each
    line (`documents_by="line"`), or each block between lines that are empty or hold only whitespace
    ("paragraph"). Invalid UTF-8 becomes replacement characters. (Extra keyword arguments, such as the file's size
    and modification time, only key the `datasets` cache.)"""
    with open(path, encoding="utf-8", errors="replace") as file:  # universal newlines: \r\n is \n
        if documents_by == "line":
            for line in file:
                if line.strip():
                    yield {"text": line.strip()}
            return
        pieces: list[str] = []  # the document being read, not yet ended by a blank line (joined once, at its end)
        while chunk := file.read(chunk_size):
            # only the new text is searched, with the open line before it where that line is whitespace so far (a
            # blank line may span the chunks): linear in the file's size however long a document runs
            parts = _BLANK_LINE.split(_open_blank_line(pieces) + chunk)
            if len(parts) == 1:
                pieces.append(parts[0])
                continue
            pieces.append(parts[0])
            parts[0] = "".join(pieces)
            pieces = [parts.pop()]  # may continue in the next chunk
            for part in parts:
                if part.strip():
                    yield {"text": part.strip()}
        last = "".join(pieces)
        pieces.clear()  # (a document as long as the file is held once, not twice, while it is stripped)
        if last := last.strip():
            yield {"text": last}


def _open_blank_line(pieces: list[str]) -> str:
    """Take from the end of `pieces` the line in progress, from its newline on, where all of it is whitespace (a
    blank line may be ending in the next chunk); "" (and `pieces` unchanged) where that line holds text."""
    taken: list[str] = []
    while pieces:
        last = pieces.pop()
        cut = last.rfind("\n")
        if last[cut + 1:].strip():  # (cut = -1: the whole piece) the open line holds text
            pieces.append(last)
            break
        if cut >= 0:
            if cut:
                pieces.append(last[:cut])
            return last[cut:] + "".join(reversed(taken))
        taken.append(last)  # whitespace without a newline: the open line began in an earlier piece
    pieces.extend(reversed(taken))
    return ""


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

    Text files give a document per block between blank (or whitespace-only) lines (`documents_by="paragraph"`) or
    per line (see `text_documents`); JSONL, CSV (TSV) and Parquet files give a document per row from `text_field`; a
    directory written by `save_to_disk` gives its rows. Invalid UTF-8 is decoded with replacement characters and
    counted in a warning; files that are not text are refused or skipped (see `resolve_files`).
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
        named = [patterns] if isinstance(patterns, (str, Path)) else patterns
        raise UserError(f"the corpus is empty: {', '.join(map(str, named))} holds no text")
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
            stat = path.stat()
            arguments = {"path": str(path.resolve()), "documents_by": documents_by, "size": stat.st_size,
                         "mtime": stat.st_mtime_ns}
            features = datasets.Features({"text": datasets.Value("string")})
            if next(text_documents(**arguments), None) is None:  # datasets refuses to generate an empty split
                empty = datasets.Dataset.from_dict({"text": []}, features=features)
                return empty.to_iterable_dataset() if streaming else empty
            if streaming:
                return datasets.IterableDataset.from_generator(text_documents, features, gen_kwargs=arguments)
            return datasets.Dataset.from_generator(text_documents, features, cache_dir=cache, gen_kwargs=arguments)
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
