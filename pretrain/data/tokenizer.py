"""Tokenizers with the `tokenizers` library: train WordPiece (BERT), byte-level BPE (GPT-2/RoBERTa) or Unigram
(ALBERT, SentencePiece-style) with the family's special tokens and post-processor; load a `tokenizer.json`, a BERT
`vocab.txt`, or GPT-2's `vocab.json` + `merges.txt`."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from pretrain.errors import UserError

TokenizerKind = Literal["wordpiece", "bpe", "unigram"]

# Each kind's special tokens, in id order (0, 1, ...), and the role each plays.
SPECIAL_TOKENS: dict[str, dict[str, str]] = {
    "wordpiece": {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"},
    "bpe": {"cls": "<s>", "pad": "<pad>", "sep": "</s>", "unk": "<unk>", "mask": "<mask>"},
    "unigram": {"pad": "<pad>", "unk": "<unk>", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"},
}
# Token strings by role, to find the roles in a tokenizer trained elsewhere (first match wins).
ROLE_CANDIDATES = {
    "pad": ("[PAD]", "<pad>"), "unk": ("[UNK]", "<unk>"), "cls": ("[CLS]", "<s>"), "sep": ("[SEP]", "</s>"),
    "mask": ("[MASK]", "<mask>"), "eos": ("</s>", "<|endoftext|>", "[SEP]"),
}


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the special tokens a layout and the objectives need; None where the tokenizer has no such token."""

    pad: int | None
    unk: int | None
    cls: int | None
    sep: int | None
    mask: int | None
    eos: int | None

    def all(self) -> list[int]:
        return sorted({i for i in (self.pad, self.unk, self.cls, self.sep, self.mask, self.eos) if i is not None})


def special_ids(tokenizer: Tokenizer) -> SpecialIds:
    found = {}
    for role, candidates in ROLE_CANDIDATES.items():
        found[role] = next((tokenizer.token_to_id(t) for t in candidates if tokenizer.token_to_id(t) is not None), None)
    return SpecialIds(**found)


def _post_processor(kind: str, tokenizer: Tokenizer) -> processors.PostProcessor:
    cls, sep = SPECIAL_TOKENS[kind]["cls"], SPECIAL_TOKENS[kind]["sep"]
    ids = [(cls, tokenizer.token_to_id(cls)), (sep, tokenizer.token_to_id(sep))]
    if kind == "bpe":  # RoBERTa's pair template: <s> A </s></s> B </s>
        return processors.TemplateProcessing(single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} {sep} $B:1 {sep}:1",
                                             special_tokens=ids)
    return processors.TemplateProcessing(single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
                                         special_tokens=ids)


def new_tokenizer(kind: TokenizerKind, lowercase: bool = True) -> tuple[Tokenizer, trainers.Trainer]:
    """An untrained tokenizer of `kind` with its normaliser, pre-tokenizer and decoder, and its trainer's class."""
    if kind == "wordpiece":
        tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        return tokenizer, trainers.WordPieceTrainer
    if kind == "bpe":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        return tokenizer, trainers.BpeTrainer
    if kind == "unigram":
        tokenizer = Tokenizer(models.Unigram())
        steps = [normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else [])
        tokenizer.normalizer = normalizers.Sequence(steps)
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        return tokenizer, trainers.UnigramTrainer
    raise UserError(f"unknown tokenizer kind {kind!r}; choose wordpiece, bpe or unigram")


def train_tokenizer(texts: Iterable[str], kind: TokenizerKind, vocab_size: int, lowercase: bool = True,
                    min_frequency: int = 2) -> Tokenizer:
    """Train a tokenizer of `kind` on an iterator of texts; special tokens get ids 0..4 (see SPECIAL_TOKENS)."""
    if vocab_size < 100:
        raise UserError(f"--vocab-size {vocab_size} is too small; use at least 100 (BERT uses 30522)")
    tokenizer, trainer_class = new_tokenizer(kind, lowercase)
    specials = list(SPECIAL_TOKENS[kind].values())
    if kind == "wordpiece":
        trainer = trainer_class(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials)
    elif kind == "bpe":
        trainer = trainer_class(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        trainer = trainer_class(vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>")
    tokenizer.train_from_iterator(_non_empty(texts), trainer=trainer)
    if tokenizer.get_vocab_size() <= len(specials):
        raise UserError("the corpus yielded no vocabulary: is it empty?")
    tokenizer.post_processor = _post_processor(kind, tokenizer)
    return tokenizer


def train_tokenizer_on_files(
    files: Sequence[str | Path], kind: TokenizerKind, vocab_size: int, target: str | Path, text_field: str = "text",
    documents_by: str = "paragraph", clean: bool = False, lowercase: bool = True, cache_dir: str | Path | None = None,
) -> tuple[Tokenizer, int]:
    """Train on corpus files (see `pretrain.corpus.load_corpus`) and save to `target`, a tokenizer.json path that
    must not exist yet, with the record of what it was trained on beside it (`provenance_path`). Returns the
    tokenizer and the number of documents it was trained on."""
    from pretrain.data.corpus import load_corpus, resolve_files

    target = Path(target)
    if target.exists():
        raise UserError(f"{target} already exists; choose another path (nothing was overwritten)")
    corpus = load_corpus(files, text_field, documents_by, clean, cache_dir)
    tokenizer = train_tokenizer(corpus["text"], kind, vocab_size, lowercase=lowercase)
    target.parent.mkdir(parents=True, exist_ok=True)
    record = {"kind": kind, "vocab_size": vocab_size, "tokens": tokenizer.get_vocab_size(), "documents": len(corpus),
              "text_field": text_field, "documents_by": documents_by, "clean": clean, "lowercase": lowercase,
              "files": corpus_files(resolve_files(files))}
    partial, partial_record = (target.with_name(f".{target.name}.{part}-{os.getpid()}")
                               for part in ("partial", "record"))
    partial_record.write_text(json.dumps(record, indent=1) + "\n")
    tokenizer.save(str(partial))
    # complete or absent: another process never reads half a file; the record first, so a tokenizer has one
    os.replace(partial_record, provenance_path(target))
    os.replace(partial, target)
    return tokenizer, len(corpus)


# What a tokenizer was trained on: each file's size and a hash of its first 64 KiB (cheap for any corpus, and the
# same for a copy of the file elsewhere), and the settings that change which tokens it learns.
HASHED_BYTES = 1 << 16
SETTINGS_THAT_MATTER = ("kind", "vocab_size", "text_field", "clean", "lowercase")


def provenance_path(tokenizer: str | Path) -> Path:
    """The record beside a trained tokenizer: DIR/tokenizer.json -> DIR/tokenizer.trained_on.json."""
    tokenizer = Path(tokenizer)
    return tokenizer.with_name(f"{tokenizer.stem}.trained_on.json")


def corpus_files(files: Sequence[Path]) -> list[dict]:
    """Each corpus file (a `save_to_disk` directory: its data files) as {"path", "bytes", "head_sha256"}."""
    listed = []
    for path in files:
        parts = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for part in parts:
            with open(part, "rb") as handle:
                head = hashlib.sha256(handle.read(HASHED_BYTES)).hexdigest()
            listed.append({"path": str(part.resolve()), "bytes": part.stat().st_size, "head_sha256": head})
    return listed


def read_provenance(tokenizer: str | Path) -> dict | None:
    """The record of what the tokenizer at this path was trained on; None where there is none (a tokenizer
    trained elsewhere, or by an earlier version)."""
    path = provenance_path(tokenizer)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON ({error}); remove it to use the tokenizer without its "
                        "record") from None


def describe_files(files: list[dict]) -> str:
    size = sum(f["bytes"] for f in files)
    names = ", ".join(Path(f["path"]).name for f in files[:3]) + (", ..." if len(files) > 3 else "")
    return f"{len(files)} file{'s' if len(files) != 1 else ''}, {size / 1e6:,.1f} MB: {names}"


def provenance_mismatch(record: dict, files: Sequence[Path], wanted: dict) -> str | None:
    """How this run's corpus (`files`) and tokenizer settings (`wanted`: any of SETTINGS_THAT_MATTER) differ from
    what the tokenizer was trained on; None where they do not."""
    different = [f"{key} {record.get(key)!r} (this run's: {wanted[key]!r})" for key in SETTINGS_THAT_MATTER
                 if key in wanted and record.get(key) != wanted[key]]
    mine = corpus_files(files)
    if sorted((f["bytes"], f["head_sha256"]) for f in mine) != sorted((f["bytes"], f["head_sha256"])
                                                                     for f in record.get("files", [])):
        different.insert(0, f"corpus {describe_files(record.get('files', []))} (this run's: {describe_files(mine)})")
    return "; ".join(different) or None


def size_note(tokenizer: Tokenizer, wanted: int) -> str:
    """A word for the user when the trainer found fewer tokens than asked for (a small corpus); "" otherwise."""
    got = tokenizer.get_vocab_size()
    if got >= wanted:
        return ""
    return (f" (not the {wanted:,} asked for: the corpus yields no more; the model's vocab_size may stay larger, "
            "its extra rows are never used)")


def _non_empty(texts: Iterable[str]) -> Iterator[str]:
    count = 0
    for text in texts:
        if text.strip():
            count += 1
            yield text
    if count == 0:
        raise UserError("the corpus is empty: no text to train the tokenizer on")


def plain(tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer without padding or truncation of its own (a Hugging Face tokenizer.json often carries them, e.g.
    fixed padding to 128): this project pads and cuts where it needs to, and padding tokens must never be packed
    as text or attended to. In place; returns it."""
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A `tokenizer.json`, a BERT `vocab.txt`, GPT-2's `vocab.json` (with `merges.txt` beside it), or a directory
    holding one of these; without padding or truncation of its own (`plain`)."""
    return plain(_read_tokenizer(Path(path)))


def _read_tokenizer(path: Path) -> Tokenizer:
    from pretrain.training.checkpoints import contents_file, is_sharded_checkpoint

    if path.suffix == ".ckpt" and (path.is_file() or is_sharded_checkpoint(path)):  # a checkpoint's own tokenizer
        import torch  # (its tensors memory-mapped, not read)

        saved = torch.load(contents_file(path), map_location="cpu", weights_only=True, mmap=True).get("pretrain")
        if not saved or not saved.get("tokenizer"):
            raise UserError(f"{path} holds no tokenizer: give data.tokenizer")
        return Tokenizer.from_str(saved["tokenizer"])
    if path.is_dir():
        for name in ("tokenizer.json", "vocab.txt", "vocab.json"):
            if (path / name).is_file():
                return _read_tokenizer(path / name)
        raise UserError(f"no tokenizer found in {path}: expected tokenizer.json, vocab.txt or vocab.json + merges.txt")
    if not path.is_file():
        raise UserError(f"tokenizer not found: {path}")
    if path.suffix == ".json" and path.name != "vocab.json":
        try:
            return Tokenizer.from_file(str(path))
        except Exception as error:  # the library's message names the broken field
            raise UserError(f"{path} is not a valid tokenizer.json: {error}") from error
    if path.name.endswith(".txt"):  # BERT's vocab.txt: one WordPiece token per line
        tokenizer = Tokenizer(models.WordPiece.from_file(str(path), unk_token="[UNK]"))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        tokenizer.post_processor = _post_processor("wordpiece", tokenizer)
        return tokenizer
    merges = path.with_name("merges.txt")
    if not merges.is_file():
        raise UserError(f"{path} needs merges.txt beside it (GPT-2's byte-level BPE)")
    tokenizer = Tokenizer(models.BPE.from_file(str(path), str(merges)))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def check_vocabulary(tokenizer: Tokenizer, vocab_size: int) -> None:
    """The model's embedding table must cover every id the tokenizer can produce."""
    if tokenizer.get_vocab_size() > vocab_size:
        raise UserError(
            f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model's vocab_size is {vocab_size}; "
            f"set the model's vocab_size to at least {tokenizer.get_vocab_size()} or use the matching tokenizer"
        )


def add_tokens_from(tokenizer: Tokenizer, path: str | Path) -> tuple[list[str], list[str]]:
    """Domain tokens from a text file (one a line) appended to `tokenizer` in place, after its own ids; tokens it
    has already are skipped. Returns (added, already there)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data.add_tokens {path} does not exist: give a text file with one token a line")
    wanted = list(dict.fromkeys(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()))
    if not wanted:
        raise UserError(f"data.add_tokens {path} holds no token: give one token a line")
    known = [token for token in wanted if tokenizer.token_to_id(token) is not None]
    added = [token for token in wanted if token not in known]
    tokenizer.add_tokens(added)
    return added, known
