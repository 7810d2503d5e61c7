"""A tokenizer is tied to the corpus it was trained on: a run says which tokenizer it uses and why, and one trained
on another corpus (or as another kind or size) is refused unless the run asks for it on purpose."""

import json
import shutil

import pytest

from pretrain.data.datamodule import PretrainingDataModule
from pretrain.data.tokenizer import provenance_path, train_tokenizer
from pretrain.errors import UserError


def corpus(path, words, documents=60):
    path.write_text("\n\n".join(" ".join(words[(i + j) % len(words)] for j in range(12)) for i in range(documents)))
    return path


def data(files, tokenizer, **options):
    return PretrainingDataModule([str(f) for f in files], str(tokenizer), max_length=32, validation_fraction=0,
                                 train_tokenizer="wordpiece", tokenizer_vocab_size=200, **options)


@pytest.fixture
def trained(tmp_path, capsys):
    first = corpus(tmp_path / "first.txt", ["the", "cat", "sat", "on", "a", "mat", "and", "purred"])
    tokenizer = tmp_path / "tok" / "tokenizer.json"
    module = data([first], tokenizer)
    assert module.tokenizer_origin.startswith("trained now") and f"tokenizer: {tokenizer} (trained now" in \
        capsys.readouterr().out
    return first, tokenizer


def test_a_trained_tokenizer_records_its_corpus_and_settings(trained):
    first, tokenizer = trained
    record = json.loads(provenance_path(tokenizer).read_text())
    assert provenance_path(tokenizer).name == "tokenizer.trained_on.json"
    assert record["kind"] == "wordpiece" and record["vocab_size"] == 200 and record["tokens"] > 5
    assert [(f["path"], f["bytes"]) for f in record["files"]] == [(str(first.resolve()), first.stat().st_size)]
    assert len(record["files"][0]["head_sha256"]) == 64


def test_the_same_corpus_reuses_it_even_copied_elsewhere(trained, tmp_path, capsys):
    first, tokenizer = trained
    copy = tmp_path / "elsewhere" / "same.txt"
    copy.parent.mkdir()
    shutil.copy(first, copy)
    module = data([copy], tokenizer)
    assert module.tokenizer_origin.startswith("reused: trained on this corpus")
    assert "reused: trained on this corpus (1 file" in capsys.readouterr().out


def test_another_corpus_is_refused_and_accepted_on_purpose(trained, tmp_path):
    _, tokenizer = trained
    other = corpus(tmp_path / "reviews.txt", ["a", "dull", "film", "with", "a", "great", "cast"])
    before = tokenizer.read_bytes()
    with pytest.raises(UserError) as refused:
        data([other], tokenizer)
    message = str(refused.value)
    assert "was trained for something else: corpus 1 file" in message and "first.txt" in message
    assert "(this run's: 1 file" in message and "reviews.txt" in message
    assert "--data.tokenizer runs/tokenizers/NAME/tokenizer.json" in message
    assert "--data.reuse_tokenizer true" in message
    assert tokenizer.read_bytes() == before  # nothing retrained or overwritten
    module = data([other], tokenizer, reuse_tokenizer=True)
    assert module.tokenizer_origin.startswith("reused on purpose (reuse_tokenizer)")
    # named without train_tokenizer, it is the tokenizer to use (a general one, on purpose): used, and said
    module = PretrainingDataModule([str(other)], str(tokenizer), max_length=32, validation_fraction=0)
    assert module.tokenizer_origin.startswith("given: trained for something else: corpus 1 file")


def test_another_kind_or_size_is_refused(trained):
    first, tokenizer = trained
    with pytest.raises(UserError, match=r"vocab_size 200 \(this run's: 300\)"):
        PretrainingDataModule([str(first)], str(tokenizer), max_length=32, validation_fraction=0,
                              train_tokenizer="wordpiece", tokenizer_vocab_size=300)
    with pytest.raises(UserError, match=r"kind 'wordpiece' \(this run's: 'bpe'\)"):
        PretrainingDataModule([str(first)], str(tokenizer), max_length=32, validation_fraction=0,
                              train_tokenizer="bpe", tokenizer_vocab_size=200)
    with pytest.raises(UserError, match=r"clean False \(this run's: True\)"):
        data([first], tokenizer, clean=True)


def test_a_tokenizer_trained_elsewhere_is_used_as_given(tmp_path, capsys):
    first = corpus(tmp_path / "first.txt", ["the", "cat", "sat", "on", "a", "mat"])
    tokenizer = tmp_path / "tokenizer.json"
    train_tokenizer([first.read_text()], "wordpiece", 100).save(str(tokenizer))
    module = data([first], tokenizer)
    assert module.tokenizer_origin == "given: trained elsewhere, no record of its corpus"
    assert "no record of its corpus" in capsys.readouterr().out
