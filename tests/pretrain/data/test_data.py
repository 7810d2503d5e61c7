"""Tokenizers, corpus reading, packing, pairs, the cache, streaming and the data module."""

import copy
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning_fabric.utilities.types import _Stateful

from pretrain.data.cache import fingerprint
from pretrain.data.corpus import load_corpus
from pretrain.data.datamodule import PretrainingDataModule, collate, in_validation
from pretrain.data.packing import pack_stream
from pretrain.data.pairs import build_pairs, split_sentences
from pretrain.data.tokenizer import check_vocabulary, load_tokenizer, special_ids, train_tokenizer
from pretrain.errors import UserError
from pretrain.sample import BUNDLED_CORPUS as SHAKESPEARE

SHARED = Path(__file__).resolve().parents[4] / "shared" / "data"


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    train_tokenizer(SHAKESPEARE.read_text().split("\n\n"), "wordpiece", 1000).save(str(path))
    return path


def packed(*args, **kwargs) -> dict[str, np.ndarray]:
    """pack_stream's parts joined into whole arrays."""
    parts = list(pack_stream(*args, **kwargs))
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def write_documents(path: Path, documents: list[str]) -> Path:
    path.write_text("\n\n".join(documents) + "\n")
    return path


# --- tokenizers -----------------------------------------------------------------------------------------------

@pytest.mark.skipif(not (SHARED / "wikitext-2").is_dir(), reason="needs ../shared/data (present on CI)")
def test_wordpiece_on_wikitext_has_few_unknowns():
    train = (SHARED / "wikitext-2" / "wiki.train.tokens").read_text().split("\n")
    tokenizer = train_tokenizer(train, "wordpiece", 30000)
    valid = [line for line in (SHARED / "wikitext-2" / "wiki.valid.tokens").read_text().split("\n") if line.strip()]
    ids = [i for encoding in tokenizer.encode_batch(valid, add_special_tokens=False) for i in encoding.ids]
    unknown = ids.count(special_ids(tokenizer).unk) / len(ids)
    assert tokenizer.get_vocab_size() == 30000 and unknown < 0.005


@pytest.mark.parametrize("kind, cls, sep", [("wordpiece", "[CLS]", "[SEP]"), ("bpe", "<s>", "</s>"),
                                            ("unigram", "[CLS]", "[SEP]")])
def test_each_kind_trains_saves_and_loads(tmp_path, kind, cls, sep):
    tokenizer = train_tokenizer(SHAKESPEARE.read_text().split("\n\n"), kind, 800)
    assert 700 <= tokenizer.get_vocab_size() <= 800
    ids = special_ids(tokenizer)
    assert ids.all() == [0, 1, 2, 3, 4]  # the five special tokens come first
    encoding = tokenizer.encode("Before we proceed any further", "hear me speak")
    assert encoding.tokens[0] == cls and encoding.tokens[-1] == sep and 1 in encoding.type_ids
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path)
    assert loaded.encode("Speak, speak.").ids == tokenizer.encode("Speak, speak.").ids
    text = "First Citizen: before we proceed"
    assert load_tokenizer(tmp_path).decode(loaded.encode(text).ids).lower().replace(" ", "") == \
        text.lower().replace(" ", "")


def test_loads_bert_vocab_txt_and_gpt2_vocab_and_merges(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world",
                                                   "##s"]) + "\n")
    bert = load_tokenizer(tmp_path / "vocab.txt")
    assert bert.encode("Hello worlds").tokens == ["[CLS]", "hello", "world", "##s", "[SEP]"]
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "vocab.json").write_text(json.dumps({"h": 0, "i": 1, "hi": 2, "Ġ": 3, "Ġhi": 4, "<|endoftext|>": 5}))
    (gpt / "merges.txt").write_text("#version: 0.2\nh i\nĠ hi\n")
    tokenizer = load_tokenizer(gpt)
    assert tokenizer.encode("hi hi").ids == [2, 4]
    assert special_ids(tokenizer).eos == 5


def test_vocabulary_mismatch_is_a_clear_error(tokenizer_path):
    tokenizer = load_tokenizer(tokenizer_path)
    check_vocabulary(tokenizer, 1000)
    with pytest.raises(UserError, match="the tokenizer has 1000 tokens but the model's vocab_size is 500"):
        check_vocabulary(tokenizer, 500)


# --- corpus reading -------------------------------------------------------------------------------------------

def test_reads_text_jsonl_csv_parquet_and_saved_datasets(tmp_path):
    import datasets

    write_documents(tmp_path / "a.txt", ["one two.\nstill one.", "three"])
    (tmp_path / "b.jsonl").write_text('{"body": "four <br />five", "id": 1}\n{"body": "six", "id": 2}\n')
    (tmp_path / "c.csv").write_text("id,body\n1,seven\n2,eight\n")
    datasets.Dataset.from_dict({"body": ["nine"]}).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_dict({"body": ["ten"]}).save_to_disk(str(tmp_path / "saved"))
    assert load_corpus([tmp_path / "a.txt"])["text"] == ["one two.\nstill one.", "three"]
    assert load_corpus([tmp_path / "a.txt"], documents_by="line")["text"] == ["one two.", "still one.", "three"]
    assert load_corpus([tmp_path / "b.jsonl"], text_field="body", clean=True)["text"] == ["four \nfive", "six"]
    other = [tmp_path / "c.csv", tmp_path / "d.parquet", tmp_path / "saved"]
    assert load_corpus(other, text_field="body")["text"] == ["seven", "eight", "nine", "ten"]
    assert len(load_corpus([str(tmp_path / "*.txt")])) == 2  # globs


@pytest.mark.parametrize("make, message", [
    (lambda d: [d / "missing.txt"], "corpus path not found"),
    (lambda d: [str(d / "*.nothing")], "matches no file"),
    (lambda d: [write_documents(d / "empty.txt", ["", "  "])], "the corpus is empty"),
    (lambda d: [d / "rows.jsonl"], "has no field 'text'"),
])
def test_bad_corpus_input_is_one_clear_error(tmp_path, make, message):
    (tmp_path / "rows.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(UserError, match=message):
        load_corpus(make(tmp_path))


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"good text\n\nbad \xff\xfe bytes\n")
    with pytest.warns(UserWarning, match="2 invalid UTF-8 byte sequences"):
        corpus = load_corpus([tmp_path / "bad.txt"])
    assert corpus["text"][1] == "bad \ufffd\ufffd bytes"


def test_whitespace_only_lines_separate_documents(tmp_path):
    """WikiText's blank lines hold a single space; \r\n line ends; a separator may fall across a read chunk."""
    from pretrain.data.corpus import text_documents

    (tmp_path / "wiki.txt").write_bytes(b" \n = Title = \n \n First paragraph .\r\nstill first .\n\t \n\n Second .\n")
    assert load_corpus([tmp_path / "wiki.txt"])["text"] == ["= Title =", "First paragraph .\nstill first .",
                                                             "Second ."]
    for chunk_size in (1, 2, 3, 7):
        assert [d["text"] for d in text_documents(str(tmp_path / "wiki.txt"), "paragraph", chunk_size)] == \
            ["= Title =", "First paragraph .\nstill first .", "Second ."]


def test_paragraphs_read_in_chunks_are_the_paragraphs_of_the_whole_text(tmp_path):
    """Random texts of words, spaces, tabs and newlines (blank lines of whitespace, runs of them, long paragraphs),
    read at every small chunk size: the documents are those of splitting the whole text at once."""
    import random
    import re

    from pretrain.data.corpus import text_documents

    rng = random.Random(0)
    for case in range(40):
        text = "".join(rng.choice(["word", "x", " ", "\t", "\n", "\n", " \n", "\n \n"]) for _ in range(120))
        path = tmp_path / f"{case}.txt"
        path.write_text(text)
        expected = [part.strip() for part in re.split(r"\n[^\S\n]*\n", text) if part.strip()]
        for chunk_size in (1, 2, 3, 5, 8, 13, 1000):
            assert [d["text"] for d in text_documents(str(path), "paragraph", chunk_size)] == expected, (text,
                                                                                                         chunk_size)


@pytest.mark.skipif(not (SHARED / "wikitext-2").is_dir(), reason="needs ../shared/data (present on CI)")
def test_wikitext_reads_as_its_paragraphs(tmp_path):
    corpus = load_corpus([SHARED / "wikitext-2" / "wiki.valid.tokens"], cache_dir=tmp_path)
    assert len(corpus) == 1160 and corpus["text"][0] == "= Homarus gammarus ="


def test_too_few_documents_for_a_validation_split_is_one_line_that_says_why(tmp_path, tokenizer_path):
    one = tmp_path / "one.txt"
    one.write_text("\n".join(f"line {i} of a file without blank lines." for i in range(300)) + "\n")
    data = module(one, tokenizer_path, tmp_path, validation_fraction=0.1)
    with pytest.raises(UserError, match=r"one.txt gives 1 document\(s\) \(blocks between blank lines.*would take "
                                        r"[01] of them.*--data.documents_by line"):
        data.setup()
    by_line = module(one, tokenizer_path, tmp_path, validation_fraction=0.1, documents_by="line")
    by_line.setup()
    assert len(by_line.datasets["train"]) > 0 and len(by_line.datasets["val"]) > 0


def binary_files(directory: Path) -> list[Path]:
    import random

    directory.mkdir(parents=True, exist_ok=True)
    noise = directory / "noise.txt"
    noise.write_bytes(random.Random(0).randbytes(200_000))
    png = directory / "image.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 10)
    program = directory / "program"
    program.write_bytes(Path(sys.executable).resolve().read_bytes()[:100_000])
    return [noise, png, program]


def test_binary_files_are_refused_by_name_and_skipped_in_directories(tmp_path):
    for path in binary_files(tmp_path / "bin"):
        with pytest.raises(UserError, match=f"{path} is not a text file"):
            load_corpus([path])
    with pytest.raises(UserError, match="holds no text file"):
        load_corpus([tmp_path / "bin"])
    write_documents(tmp_path / "bin" / "text.txt", ["real text", "more text"])
    (tmp_path / "bin" / "latin1.txt").write_bytes("Le caf\xe9 de la gare ferme \xe0 huit heures.".encode("latin-1"))
    with pytest.warns(UserWarning, match="skipped 3 files that are not text"):
        corpus = load_corpus([tmp_path / "bin"])
    assert corpus["text"][-2:] == ["real text", "more text"] and len(corpus) == 3  # Latin-1 is text (replaced)
    with pytest.warns(UserWarning, match="skipped 3 files"):
        assert len(load_corpus([str(tmp_path / "bin" / "*")])) == 3


def test_a_tokenizer_with_its_own_padding_and_truncation_is_used_plain(tmp_path, tokenizer_path):
    """Hugging Face tokenizer.json files often pad to a fixed length: pads must never be packed as text."""
    padded = load_tokenizer(tokenizer_path)
    padded.enable_padding(length=128, pad_id=0, pad_token="[PAD]")
    padded.enable_truncation(8)
    padded.save(str(tmp_path / "padded.json"))
    loaded = load_tokenizer(tmp_path / "padded.json")
    assert loaded.padding is None and loaded.truncation is None
    text = "a sentence with more than eight tokens in it, surely more than eight."
    assert len(loaded.encode(text).ids) == len(load_tokenizer(tokenizer_path).encode(text).ids) > 8
    corpus = write_documents(tmp_path / "corpus.txt", [f"document number {i}. it has words." for i in range(50)])
    plain_data, padded_data = (module(corpus, path, tmp_path / name) for path, name in
                               ((tokenizer_path, "a"), (tmp_path / "padded.json", "b")))
    plain_data.setup()
    padded_data.setup()
    assert np.array_equal(plain_data.datasets["train"].arrays["input_ids"],
                          padded_data.datasets["train"].arrays["input_ids"])


def test_files_may_be_one_path_or_glob(tmp_path, tokenizer_path):
    write_documents(tmp_path / "a.txt", [f"first file document {i}." for i in range(20)])
    write_documents(tmp_path / "b.txt", [f"second file document {i}." for i in range(20)])
    one = PretrainingDataModule(str(tmp_path / "*.txt"), str(tokenizer_path), max_length=32, validation_fraction=0,
                                cache_dir=str(tmp_path / "cache"))
    listed = PretrainingDataModule([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], str(tokenizer_path),
                                   max_length=32, validation_fraction=0, cache_dir=str(tmp_path / "cache2"))
    one.setup()
    listed.setup()
    assert np.array_equal(one.datasets["train"].arrays["input_ids"], listed.datasets["train"].arrays["input_ids"])


def test_cli_errors_have_no_traceback(tmp_path):
    process = subprocess.run([sys.executable, "-m", "pretrain.cli", "tokenizer", "train", "--corpus",
                              str(tmp_path / "*.txt"), "--kind", "bpe", "--vocab-size", "500", "--out",
                              str(tmp_path / "out")], capture_output=True, text=True)
    assert process.returncode == 2 and "matches no file" in process.stderr and "Traceback" not in process.stderr


# --- the stream layout ----------------------------------------------------------------------------------------

def batches_of(documents: list[list[int]], size: int):
    for start in range(0, len(documents), size):
        chunk = documents[start:start + size]
        yield {"input_ids": np.array([t for d in chunk for t in d], np.int32),
               "lengths": np.array([len(d) for d in chunk])}


@pytest.mark.parametrize("cls_id", [None, 1])
def test_packing_is_exact(cls_id):
    rng = np.random.default_rng(0)
    documents = [list(rng.integers(10, 100, rng.integers(1, 40))) for _ in range(300)]
    blocks = packed(batches_of(documents, 7), 32, sep_id=2, cls_id=cls_id)
    lengths = blocks["lengths"]
    assert (lengths[:-1] == 32).all() and 0 < lengths[-1] <= 32
    content = [row[(cls_id is not None):length] for row, length in zip(blocks["input_ids"], lengths, strict=True)]
    if cls_id is not None:
        assert (blocks["input_ids"][:, 0] == cls_id).all()
    assert np.concatenate(content).tolist() == [t for d in documents for t in [*d, 2]]  # the tokenized corpus
    documents_of = np.concatenate([row[(cls_id is not None):length]
                                   for row, length in zip(blocks["document_ids"], lengths, strict=True)])
    assert documents_of.tolist() == [i for i, d in enumerate(documents) for _ in range(len(d) + 1)]


def test_first_tokens_of_a_block_keep_their_document():
    blocks = packed(batches_of([[10, 11, 12], [20, 21], [30, 31, 32, 33, 34], [40]], 2), 5, 2, 1)
    assert blocks["input_ids"].tolist() == [[1, 10, 11, 12, 2], [1, 20, 21, 2, 30], [1, 31, 32, 33, 34],
                                            [1, 2, 40, 2, 2]]
    assert blocks["document_ids"].tolist() == [[0, 0, 0, 0, 0], [1, 1, 1, 1, 2], [2, 2, 2, 2, 2], [2, 2, 3, 3, 0]]
    assert blocks["lengths"].tolist() == [5, 5, 5, 4]


# --- the pairs layout -----------------------------------------------------------------------------------------

def test_pairs_follow_the_rules():
    rng = np.random.default_rng(0)
    # token t of document d is d * 1000 + sentence * 10 + position, so every token names its document
    documents = [[[d * 1000 + s * 10 + p for p in range(rng.integers(2, 9))] for s in range(rng.integers(1, 15))]
                 for d in range(1, 5000)]
    pairs = build_pairs(documents, 24, cls_id=1, sep_id=2, pad_id=0, task="nsp", seed=0)
    labels, used = pairs["labels"], set()
    assert len(labels) >= 10_000 and abs(labels.mean() - 0.5) < 0.02
    assert (pairs["lengths"] <= 24).all() and pairs["input_ids"].shape[1] == 24
    for ids, types, length, label in zip(pairs["input_ids"], pairs["token_type_ids"], pairs["lengths"], labels,
                                         strict=True):
        ids, types = ids[:length], types[:length]
        assert ids[0] == 1 and ids[-1] == 2 and (ids[length:] == 0).all()
        a, b = ids[1:-1][types[1:-1] == 0][:-1], ids[types == 1][:-1]
        assert len(a) and len(b)
        a_documents, b_documents = set(a // 1000), set(b // 1000)
        assert len(a_documents) == 1 and len(b_documents) == 1
        assert (a_documents == b_documents) == (label == 0)
        used.update((a // 10).tolist() + ((b // 10).tolist() if label == 0 else []))
    sentences = sum(len(document) for document in documents)
    assert len(used) / sentences > 0.97  # a B replaced by another document's goes back to its own (BERT's rule)


def test_sop_pairs_are_consecutive():
    documents = [[[d * 1000 + s * 10 + p for p in range(5)] for s in range(6)] for d in range(1, 50)]
    pairs = build_pairs(documents, 40, cls_id=1, sep_id=2, pad_id=0, task="sop", short_seq_prob=0.0, seed=0)
    assert (pairs["labels"] == 0).all()
    for ids, types, length in zip(pairs["input_ids"], pairs["token_type_ids"], pairs["lengths"], strict=True):
        a, b = ids[1:length][types[1:length] == 0][:-1], ids[:length][types[:length] == 1][:-1]
        assert a[-1] < b[0] and set(a // 1000) == set(b // 1000)  # A comes right before B in one document


# --- cache, streaming, data module ----------------------------------------------------------------------------

def module(corpus, tokenizer_path, tmp_path, **kwargs):
    options = dict(max_length=32, batch_size=4, cache_dir=str(tmp_path / "cache"), validation_fraction=0.1)
    return PretrainingDataModule([str(corpus)], str(tokenizer_path), **{**options, **kwargs})


def test_second_run_tokenizes_nothing_and_inputs_change_the_fingerprint(tmp_path, tokenizer_path, monkeypatch):
    corpus = write_documents(tmp_path / "corpus.txt", [f"document number {i}. it has words." for i in range(50)])
    first = module(corpus, tokenizer_path, tmp_path)
    first.setup()
    import pretrain.data.datamodule as datamodule

    def fail(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(datamodule, "tokenize", fail)
    second = module(corpus, tokenizer_path, tmp_path)
    second.setup()
    assert np.array_equal(first.datasets["train"].arrays["input_ids"], second.datasets["train"].arrays["input_ids"])
    tokenizer = load_tokenizer(tokenizer_path)
    key = fingerprint([corpus], tokenizer, {"max_length": 32})
    other = tmp_path / "other.json"
    train_tokenizer(["completely different text here"] * 10, "wordpiece", 200).save(str(other))
    assert fingerprint([corpus], load_tokenizer(other), {"max_length": 32}) != key
    assert fingerprint([corpus], tokenizer, {"max_length": 64}) != key
    corpus.write_text(corpus.read_text() + "\n\none more document.\n")
    assert fingerprint([corpus], tokenizer, {"max_length": 32}) != key


def test_interrupted_cache_is_not_trusted(tmp_path, tokenizer_path):
    from pretrain.data.cache import cached_arrays

    def broken():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached_arrays(tmp_path, "key", broken)
    calls = []
    arrays = cached_arrays(tmp_path, "key", lambda: calls.append(1) or [{"x": np.arange(3)}, {"x": np.arange(2)}])
    assert calls == [1] and arrays["x"].tolist() == [0, 1, 2, 0, 1]
    assert cached_arrays(tmp_path, "key", lambda: calls.append(1) or [])["x"].tolist() == [0, 1, 2, 0, 1]
    assert calls == [1]  # the complete cache was reused
    (tmp_path / "half").mkdir()  # a directory without its COMPLETE marker is rebuilt
    (tmp_path / "half" / "x.bin").write_bytes(b"garbage")
    assert cached_arrays(tmp_path, "half", lambda: [{"x": np.arange(2)}])["x"].tolist() == [0, 1]


def test_the_cache_is_on_the_disk_before_it_is_marked_complete(tmp_path, monkeypatch):
    """Every data file and arrays.json is fsynced before COMPLETE exists (a crash after the mark never leaves a
    trusted cache of missing bytes); COMPLETE itself and the directory's rename are synced too."""
    import os

    from pretrain.data import cache

    synced = []
    real = os.fsync

    def recording(descriptor):
        name = Path(os.readlink(f"/proc/self/fd/{descriptor}"))
        complete = [p for p in tmp_path.glob(".key.partial-*/COMPLETE")] + list(tmp_path.glob("key/COMPLETE"))
        synced.append((name.name, bool(complete)))
        real(descriptor)

    monkeypatch.setattr(cache.os, "fsync", recording)
    cache.cached_arrays(tmp_path, "key", lambda: [{"x": np.arange(3), "y": np.ones((3, 2))}])
    assert {"x.bin", "y.bin", "arrays.json"} == {name for name, complete in synced if not complete}
    assert "COMPLETE" in [name for name, _ in synced]
    assert synced[-1] == (tmp_path.name, True)  # the cache directory, after the rename


def test_a_lock_held_too_long_is_one_line_naming_it(tmp_path):
    from filelock import FileLock

    from pretrain.data.cache import file_lock
    from pretrain.errors import UserError

    path = tmp_path / ".key.lock"
    with FileLock(path):  # another holder (flock: another open file, as another process would be)
        with pytest.raises(UserError, match=f"waited 0 min for the lock {path}: another process holds it"):
            with file_lock(path, timeout=0.2):
                raise AssertionError("the lock was taken while another held it")
    taken = False
    with file_lock(path, timeout=0.2):  # released: taken at once
        taken = True
    assert taken


@pytest.mark.parametrize("layout", ["stream", "pairs"])
def test_one_unshuffled_streaming_reader_gives_the_cached_examples(layout, tmp_path, tokenizer_path):
    corpus = write_documents(tmp_path / "corpus.txt", [f"story {i}: " + "the cat sat on the mat. " * (i % 7 + 1)
                                                       for i in range(120)])
    options = dict(word_starts=True) if layout == "stream" else dict(layout="pairs")
    cached = module(corpus, tokenizer_path, tmp_path, **options)
    streamed = module(corpus, tokenizer_path, tmp_path, streaming=True, shuffle_buffer=0, **options)
    cached.setup()
    streamed.setup()
    examples = list(streamed.datasets["train"])
    assert len(examples) == len(cached.datasets["train"]) > 10
    names = ("input_ids", "document_ids", "word_starts", "lengths") if layout == "stream" else (
        "input_ids", "token_type_ids", "lengths", "labels")
    for streamed_example, index in zip(examples, range(len(examples)), strict=True):
        for name in names:
            assert np.array_equal(streamed_example[name], cached.datasets["train"][index][name]), name


def loader_batches(loader) -> list[list[list[int]]]:
    return [batch["input_ids"].tolist() for batch in loader]


@pytest.mark.parametrize("streaming, workers, legacy", [(False, 0, False), (True, 0, False), (True, 2, False),
                                                       (False, 0, True), (True, 2, True)])
def test_a_resumed_loader_continues_the_epoch_where_it_stopped(streaming, workers, legacy, tmp_path, tokenizer_path):
    """The training loader's state (Lightning's state_dict protocol: no "not resumable" warning) is the position;
    loading it (or, from a checkpoint of an earlier version, the DataModule's) continues the epoch."""
    corpus = write_documents(tmp_path / "corpus.txt", [f"story {i}: " + "the cat sat on the mat. " * (i % 7 + 1)
                                                       for i in range(120)])
    straight = module(corpus, tokenizer_path, tmp_path, streaming=streaming, num_workers=workers, shuffle_buffer=8)
    straight.setup()
    loader = straight.train_dataloader()
    loader.dataset.read_batch = 10  # documents read at a time, each batch to one worker: both have some
    straight.start_at(loader, {"epoch": 3, "batches": 0})  # epoch 3 from its start
    if not streaming:
        loader.sampler.set_epoch(3)
    every = []
    for batch in loader:  # the data module counts what a training loop consumed
        straight.consumed(3, int(batch["reader"][0]) if streaming else None, batch.get("pass"))
        every.append(batch["input_ids"].tolist())
        if len(every) == 5:
            position = copy.deepcopy(straight.position)  # what a checkpoint after 5 batches of epoch 3 holds
    resumed = module(corpus, tokenizer_path, tmp_path, streaming=streaming, num_workers=workers, shuffle_buffer=8)
    resumed.setup()
    resumed.datasets["train"].read_batch = 10
    if legacy:  # a checkpoint of an earlier version: the data module's state, no readers' counts
        position.pop("readers", None)
        resumed.load_state_dict(position)
        loader = resumed.train_dataloader()
    else:
        loader = resumed.train_dataloader()  # Lightning makes the loader, then loads the checkpoint's state into it
        assert isinstance(loader, _Stateful) and loader.state_dict() == {"epoch": 0, "batches": 0}
        loader.load_state_dict(position)
        assert loader.state_dict() == position
    if streaming:  # the workers took turns (the legacy position is derived from that): (pass, examples made in it)
        size = resumed.hparams.batch_size
        assert resumed.position["readers"] == ([[3, 3 * size], [3, 2 * size]] if workers == 2 else [[3, 5 * size]])
    if not streaming:
        loader.sampler.set_epoch(3)
    assert len(every) > 8 and loader_batches(loader) == every[5:]
    if not streaming:  # the next epoch is whole, and shuffled differently
        loader.sampler.set_epoch(4)
    following = loader_batches(loader)
    assert following != every and len(following) == len(every)
    if streaming:  # the same tokens, in other blocks
        assert Counter(t for b in following for r in b for t in r) == Counter(t for b in every for r in b for t in r)


def test_datamodule_batches_for_each_layout(tmp_path, tokenizer_path):
    corpus = write_documents(tmp_path / "corpus.txt", [f"Sentence one of {i}. Sentence two here. And a third one."
                                                       for i in range(80)])
    stream = module(corpus, tokenizer_path, tmp_path)
    stream.setup()
    batch = next(iter(stream.train_dataloader()))
    assert set(batch) == {"input_ids", "document_ids"} and batch["input_ids"].shape == (4, 32)  # full blocks
    pairs = module(corpus, tokenizer_path, tmp_path, layout="pairs")
    pairs.setup()
    batch = next(iter(pairs.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "next_sentence_label"}
    assert len(pairs.val_dataloader()) > 0


def test_cached_pairs_are_built_by_shards_in_several_processes(tmp_path, tokenizer_path):
    """2,500 documents in shards of 1,000 over two processes: well-formed pairs, half of them NSP negatives, the same
    on a second build (the draws are keyed by shard, not by process or timing)."""
    texts = [f"Story {i} begins here. It goes on a while. Then it ends." for i in range(2500)]
    corpus = write_documents(tmp_path / "corpus.txt", texts)

    def pairs(cache):
        data = module(corpus, tokenizer_path, tmp_path, layout="pairs", num_proc=2, validation_fraction=0.0,
                      cache_dir=str(tmp_path / cache))
        data.setup()
        return data.datasets["train"].arrays, data.special

    arrays, special = pairs("first")
    lengths, ids = arrays["lengths"], arrays["input_ids"]
    assert len(lengths) > 2500 and abs(arrays["labels"].mean() - 0.5) < 0.05
    assert (ids[:, 0] == special.cls).all() and ((ids == special.sep).sum(1) == 2).all()
    assert (ids[np.arange(len(ids)), lengths - 1] == special.sep).all()
    again, _ = pairs("second")
    assert all(np.array_equal(arrays[name], again[name]) for name in arrays)


def test_training_batches_all_have_one_shape_and_validation_keeps_every_example(tmp_path, tokenizer_path):
    """An epoch's last partial training batch is dropped (a compiled step sees one shape); validation is whole."""
    corpus = write_documents(tmp_path / "corpus.txt", [f"Sentence one of {i}. Sentence two here. And a third one."
                                                       for i in range(80)])
    data = module(corpus, tokenizer_path, tmp_path, layout="pairs", validation_fraction=0.2, batch_size=5)
    data.setup()
    train, val = len(data.datasets["train"]), len(data.datasets["val"])
    assert train % 5 and val % 5, (train, val)  # both splits end in a partial batch
    shapes = {tuple(batch["input_ids"].shape) for batch in data.train_dataloader()}
    assert shapes == {(5, 32)} and len(data.train_dataloader()) == train // 5
    assert sum(len(batch["input_ids"]) for batch in data.val_dataloader()) == val
    tiny = module(write_documents(tmp_path / "tiny.txt", ["One two.", "Three four."]), tokenizer_path, tmp_path,
                  validation_fraction=0.0)
    tiny.setup()
    assert 0 < len(tiny.datasets["train"]) < 4 and len(list(tiny.train_dataloader())) == 1  # smaller than a batch


def test_attention_mask_only_where_padding_and_documents_only_when_separated():
    full = {"input_ids": np.arange(8, dtype=np.int32), "document_ids": np.array([0] * 5 + [1] * 3, dtype=np.int32),
            "lengths": np.int32(8)}
    short = full | {"input_ids": np.array([5, 6, 7, 0, 0, 0, 0, 0], dtype=np.int32), "lengths": np.int32(3)}
    assert set(collate([full, full])) == {"input_ids", "document_ids"}  # SDPA's flash path: no mask to build
    assert collate([full, short])["attention_mask"].tolist() == [[1] * 8, [1] * 3 + [0] * 5]
    assert set(collate([full, full], separate_documents=False)) == {"input_ids"}
    pair = full | {"token_type_ids": np.zeros(8, dtype=np.int8), "labels": np.int64(1)}
    assert "attention_mask" in collate([pair, pair])  # sentence pairs always carry it (SOP swaps with it)


def test_separate_documents_false_feeds_blocks_without_document_ids(tmp_path, tokenizer_path):
    corpus = write_documents(tmp_path / "corpus.txt", [f"Document {i} says a few words." for i in range(60)])
    data = module(corpus, tokenizer_path, tmp_path, separate_documents=False, cls_first=False)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    assert set(batch) == {"input_ids"} and batch["input_ids"].shape == (4, 32)


def test_validation_split_is_a_stable_fraction(tmp_path, tokenizer_path):
    chosen = in_validation(np.arange(100_000), 0.05, seed=3)
    assert abs(chosen.mean() - 0.05) < 0.005
    assert np.array_equal(chosen, in_validation(np.arange(100_000), 0.05, seed=3))
    corpus = write_documents(tmp_path / "corpus.txt", [f"doc {i} words words words." for i in range(200)])
    separate = write_documents(tmp_path / "valid.txt", ["held out text."] * 3)
    data = module(corpus, tokenizer_path, tmp_path, validation_files=[str(separate)])
    data.setup()
    assert len(data.datasets["val"]) == 1


def test_collate_masks_the_padding_of_a_short_last_block():
    examples = [{"input_ids": np.array([5, 6, 7, 2]), "lengths": np.int32(4)},
                {"input_ids": np.array([8, 2, 2, 2]), "lengths": np.int32(2)}]
    batch = collate(examples)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["input_ids"].dtype == torch.long


def test_settings_that_cannot_work_together_are_refused(tokenizer_path):
    with pytest.raises(UserError, match="shuffle_buffer must be at least 0"):
        PretrainingDataModule(["x"], str(tokenizer_path), streaming=True, shuffle_buffer=-1)
    with pytest.raises(UserError, match="word_starts"):
        PretrainingDataModule(["x"], str(tokenizer_path), layout="pairs", word_starts=True)
    with pytest.raises(UserError, match="tokenizer not found"):
        PretrainingDataModule(["x"], "missing/tokenizer.json")


def test_empty_documents_are_skipped_by_the_packer(tmp_path, tokenizer_path):
    blocks = packed(batches_of([[10, 11], [], [20], []], 4), 4, 2, None)
    assert blocks["input_ids"].tolist() == [[10, 11, 2, 20], [2, 2, 2, 2]]
    assert blocks["document_ids"].tolist() == [[0, 0, 0, 1], [1, 0, 0, 0]] and blocks["lengths"].tolist() == [4, 1]
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n{"text": "   "}\n')
    with pytest.raises(UserError, match="the corpus is empty"):
        module(empty, tokenizer_path, tmp_path, validation_fraction=0.0).setup()


class CountingTokenizer:
    """A tokenizer that records every text it encodes."""

    def __init__(self, tokenizer):
        self.tokenizer, self.texts = tokenizer, []

    def encode_batch(self, texts, **kwargs):
        self.texts += texts
        return self.tokenizer.encode_batch(texts, **kwargs)


def tokens_of(examples, drop: set[int]) -> Counter:
    """The tokens of examples (up to their length), special ones dropped: what a pass trains on."""
    return Counter(t for e in examples for t in e["input_ids"][:e["lengths"]].tolist() if t not in drop)


@pytest.mark.parametrize("layout", ["stream", "pairs"])
def test_streaming_readers_tokenize_each_document_once_and_yield_it_once(layout, tmp_path, tokenizer_path):
    """Ranks x workers = 4 readers, the documents read in batches of 7: each document (each sentence, for pairs)
    is encoded by one reader only; together the readers' examples hold every token of the corpus once (stream; pairs
    hold every document's tokens, plus the other documents' sentences NSP draws)."""
    texts = [f"tale {i}: " + "a horse, a horse. My kingdom for it. " * (i % 5 + 1) for i in range(61)]
    corpus = write_documents(tmp_path / "corpus.txt", texts)
    data = module(corpus, tokenizer_path, tmp_path, streaming=True, validation_fraction=0.0, layout=layout,
                  pair_task="sop", max_length=512)  # long enough that no pair is truncated
    data.setup()
    dataset = data.datasets["train"]
    dataset.read_batch, counting = 7, CountingTokenizer(data.tokenizer)
    dataset.layout.tokenizer = counting
    special = set(data.special.all())
    shares = [list(dataset.examples(reader, 4, epoch=0)) for reader in range(4)]
    units = [text.strip() for text in texts] if layout == "stream" else [
        s for text in texts for s in split_sentences(text)]
    assert sorted(counting.texts) == sorted(units) and all(shares)
    whole = Counter(t for unit in units for t in data.tokenizer.encode(unit, add_special_tokens=False).ids
                    if t not in special)
    assert tokens_of([e for share in shares for e in share], special) == whole  # SOP: no token lost or repeated
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    assert tokens_of(list(loader), special) == whole  # two real workers


def test_endless_streaming_runs_the_epochs_back_to_back_and_resumes_across_them(tmp_path, tokenizer_path):
    """Several ranks stream endlessly (their shares differ in length; none may end an epoch alone): one iteration
    holds epoch 0 then epoch 1 ..., each example tagged with its pass, and a resume starts at the saved pass (the
    passes before it are not read again: a resume's cost does not grow with the run)."""
    corpus = write_documents(tmp_path / "corpus.txt", [f"line {i} of verse, and more." for i in range(60)])
    data = module(corpus, tokenizer_path, tmp_path, streaming=True, validation_fraction=0.0, shuffle_buffer=16)
    data.setup()
    dataset = data.datasets["train"]
    epochs = [[e["input_ids"].tolist() for e in dataset] for _ in range(3)]  # three plain passes: epochs 0, 1, 2
    dataset.epoch, dataset.endless = 0, True
    endless = iter(dataset)
    together = [next(endless)["input_ids"].tolist() for _ in range(sum(map(len, epochs)))]
    assert together == epochs[0] + epochs[1] + epochs[2]
    dataset.epoch, dataset.endless = 0, True
    tags = [int(e["pass"]) for _, e in zip(range(len(together)), iter(dataset), strict=False)]
    assert tags == [0] * len(epochs[0]) + [1] * len(epochs[1]) + [2] * len(epochs[2])
    read = []
    examples = dataset.examples
    dataset.examples = lambda reader, readers, epoch: read.append(epoch) or examples(reader, readers, epoch)
    dataset.epoch, dataset.resume = 0, (0, [(1, 2)])  # a position 2 examples into pass 1
    resumed = iter(dataset)
    assert next(resumed)["input_ids"].tolist() == epochs[1][2] and read == [1]


def test_streaming_reshuffles_every_epoch_under_its_seed(tmp_path, tokenizer_path):
    corpus = write_documents(tmp_path / "corpus.txt", [f"line {i} of verse." for i in range(300)])

    def passes(seed, buffer):
        data = module(corpus, tokenizer_path, tmp_path, streaming=True, validation_fraction=0.0, seed=seed,
                      shuffle_buffer=buffer)
        data.setup()
        dataset = data.datasets["train"]
        dataset.read_batch = 20
        return [[tuple(e["input_ids"].tolist()) for e in dataset] for _ in range(2)]  # epochs 0 and 1

    first, second = passes(0, 50)
    assert first != second and sorted(first) != sorted(second)  # documents packed in another order: other blocks
    assert passes(0, 50) == [first, second] and passes(1, 50)[0] != first
    assert Counter(t for row in first for t in row) == Counter(t for row in second for t in row)
    plain = passes(0, 0)
    assert plain[0] == plain[1]  # no buffer: corpus order, every pass


def test_an_empty_corpus_given_as_one_path_is_named_as_given(tmp_path):
    """(Once its path came out joined character by character: "/, t, m, p, ...".)"""
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    for given in (str(empty), empty, [str(empty)]):
        with pytest.raises(UserError) as refused:
            load_corpus(given)
        assert str(refused.value) == f"the corpus is empty: {empty} holds no text"
