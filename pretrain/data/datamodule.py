"""`PretrainingDataModule`: corpus files -> tokenizer -> cached (or streamed) examples -> collated batches."""

from __future__ import annotations

import copy
import functools
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor

from objectives.base import Batch, Layout
from pretrain.data.cache import cached_arrays, file_lock, fingerprint
from pretrain.data.corpus import DocumentsBy, load_corpus, resolve_files
from pretrain.data.packing import pack_stream, tokenize, tokenized_batches
from pretrain.data.pairs import VERSION as PAIRS_VERSION
from pretrain.data.pairs import pair_dataset, pair_parts
from pretrain.data.streaming import PairLayout, StreamingExamples, StreamLayout
from pretrain.data.tokenizer import (
    TokenizerKind,
    add_tokens_from,
    corpus_files,
    describe_files,
    load_tokenizer,
    provenance_mismatch,
    read_provenance,
    size_note,
    special_ids,
    train_tokenizer_on_files,
)
from pretrain.errors import UserError


def in_validation(indices: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Whether each document index belongs to the validation split: a fixed hash of (index, seed), so the cached
    and the streaming paths, which see documents in the same order, split them identically."""
    hashed = (indices.astype(np.uint64) * np.uint64(2654435761) + np.uint64(seed * 97 + 13)) % np.uint64(2**32)
    return hashed.astype(np.float64) / 2**32 < fraction


def ignore_interrupts(worker_id: int) -> None:
    """A loader worker leaves Ctrl-C (which the terminal sends to every process of the run) and SLURM's warning
    signal to the main process, which stops the run after the step in progress and needs its workers until then."""
    for name in ("SIGINT", "SIGUSR1"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


class ArrayExamples(torch.utils.data.Dataset):
    """Examples as rows of the cached (memory-mapped) arrays."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays

    def __len__(self) -> int:
        return len(self.arrays["input_ids"])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {name: np.asarray(values[index]) for name, values in self.arrays.items()}


class ResumableSampler(torch.utils.data.DistributedSampler):
    """This rank's share of a (shuffled) epoch, the permutation drawn from (seed, epoch) alone, that can start the
    epoch `skip` examples in: a resumed run sees exactly the examples an uninterrupted run would have. A
    `DistributedSampler`, so Lightning keeps it as it is under DDP/FSDP."""

    def __init__(self, dataset: torch.utils.data.Dataset, shuffle: bool, seed: int):
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        super().__init__(dataset, num_replicas=torch.distributed.get_world_size() if distributed else 1,
                         rank=torch.distributed.get_rank() if distributed else 0, shuffle=shuffle, seed=seed)
        self.resume: tuple[int, int] | None = None  # (epoch, examples of this rank's share to skip)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        if self.resume is not None and self.resume[0] == self.epoch:
            indices = indices[self.resume[1]:]
        self.resume = None
        return iter(indices)


class TrainLoader(torch.utils.data.DataLoader):
    """The training loader, resumable the way Lightning recognises (`state_dict` / `load_state_dict`, kept in the
    checkpoint's loop state): its state is the data position, the epoch and the batches consumed in it (counted by
    the DataModule after transfer, since Lightning and the workers fetch ahead); loading it makes the next pass
    continue that epoch where it stopped."""

    def __init__(self, *args, datamodule: PretrainingDataModule, **kwargs):
        super().__init__(*args, **kwargs)
        self.datamodule = datamodule

    def state_dict(self) -> dict[str, int | list[int]]:
        """The position; streaming on several ranks, every rank's readers' positions too (their shares differ in
        length, so each is somewhere else in its passes; only rank 0's state is written: it carries them all).
        Called on every rank as a checkpoint is made."""
        state = copy.deepcopy(self.datamodule.position)
        if "readers" in state and torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            everyone: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(everyone, state["readers"])
            state["ranks"] = everyone
        return state

    def load_state_dict(self, state: dict[str, int | list[int]]) -> None:
        if self.datamodule.start_anew:  # the checkpoint's position is in other data (another phase)
            if self.datamodule.trainer is None or self.datamodule.trainer.is_global_zero:
                print(f"note: the data settings changed ({', '.join(self.datamodule.start_anew)}): the training data "
                      "starts from its beginning; the weights, optimizer, schedule and step count go on from the "
                      "checkpoint", flush=True)
            return
        self.datamodule.start_at(self, state)


def collate(examples: list[dict[str, np.ndarray]], separate_documents: bool = True) -> Batch:
    """Stack examples into a batch: input_ids and, where present, document_ids (unless not `separate_documents`),
    word_starts, token_type_ids, next_sentence_label. attention_mask (from each example's length) comes with
    sentence pairs, and with packed blocks only where one is short (the corpus's last): without it (and without
    document_ids) attention runs on SDPA's fastest (flash) kernels."""
    stacked = {name: torch.from_numpy(np.stack([e[name] for e in examples])) for name in examples[0]}
    lengths, input_ids = stacked.pop("lengths"), stacked.pop("input_ids")
    if not separate_documents:
        stacked.pop("document_ids", None)
    batch = {"input_ids": input_ids.long()}
    if "token_type_ids" in stacked or bool((lengths < input_ids.shape[1]).any()):
        batch["attention_mask"] = (torch.arange(input_ids.shape[1])[None] < lengths[:, None]).long()
    if "labels" in stacked:
        batch["next_sentence_label"] = stacked.pop("labels").long()
    batch.update({name: values.long() for name, values in stacked.items()})
    return batch


class PretrainingDataModule(pl.LightningDataModule):
    """Batches for pretraining, from corpus files and a tokenizer.

    Args:
        files: text / JSONL / CSV / Parquet files, globs, directories, or `save_to_disk` datasets (one, or a list).
        tokenizer: a tokenizer.json, vocab.txt, vocab.json (+ merges.txt), a directory holding one, or a checkpoint
            of `pretrain fit` (its tokenizer); with `model.init_from`, the source's by default.
        layout: "stream" (packed blocks, document ids kept) or "pairs" ([CLS] A [SEP] B [SEP] for NSP/SOP).
        max_length: tokens per example.
        pair_task: with "pairs": "nsp" draws half of the B segments from another document; "sop" keeps A and B
            consecutive (the SOP objective swaps them).
        cls_first: with "stream": every block starts with [CLS] (BERT, RoBERTa, ELECTRA); False for GPT.
        word_starts: also give word-start flags (for whole-word masking).
        separate_documents: with "stream": packed documents attend only within themselves (a block-diagonal mask;
            CLM does not predict across a boundary). False: the separator is the only boundary, as in GPT-2 and
            RoBERTa, and attention runs on flash kernels (faster on GPUs).
        validation_files / validation_fraction: the validation split: separate files, or a fraction of documents.
        streaming: read, tokenize and lay out on the fly (corpora larger than memory or disk): each document is
            tokenized by one reader (ranks x workers: give num_workers > 0 to tokenize in parallel).
        shuffle_buffer: with streaming: documents and then training examples pass through seeded shuffle buffers of
            this many items (0: in corpus order); every epoch is reshuffled. (The cached path shuffles whole epochs.)
        num_proc: processes that build the examples cache (datasets.map).
        train_tokenizer: when `tokenizer` does not exist yet, train one of this kind (wordpiece, bpe, unigram) with
            `tokenizer_vocab_size` tokens on `files` and save it there, with a record of what it was trained on
            (`tokenizer.trained_on.json`). A tokenizer found there with a record is used only for the corpus and
            settings it was trained with. Without `train_tokenizer`, `tokenizer` is the one to use: it is used as
            it is, and what it was trained on (where recorded) is said.
        reuse_tokenizer: use the tokenizer found at `tokenizer` even though it was trained on another corpus or
            with other settings (continuing on new text with an existing vocabulary, on purpose).
        add_tokens: a text file of domain tokens, one a line, added to the tokenizer after its own (tokens it
            already has are said and skipped); with `model.init_from`, the model's embeddings (and an untied output
            matrix) grow by as many rows, each the mean of the existing ones. Saved with the run, carried by export.
    """

    def __init__(
        self,
        files: list[str] | str,
        tokenizer: str | None = None,
        layout: Layout = "stream",
        max_length: int = 128,
        batch_size: int = 32,
        pair_task: Literal["nsp", "sop"] = "nsp",
        cls_first: bool = True,
        word_starts: bool = False,
        separate_documents: bool = True,
        short_seq_prob: float = 0.1,
        validation_files: list[str] | str | None = None,
        validation_fraction: float = 0.01,
        text_field: str = "text",
        documents_by: DocumentsBy = "paragraph",
        clean: bool = False,
        streaming: bool = False,
        num_workers: int = 0,
        num_proc: int | None = None,
        shuffle_buffer: int = 10_000,
        cache_dir: str = ".cache/pretrain",
        seed: int = 0,
        train_tokenizer: TokenizerKind | None = None,
        tokenizer_vocab_size: int = 8000,
        reuse_tokenizer: bool = False,
        add_tokens: str | None = None,
    ):
        super().__init__()
        if tokenizer is None:
            raise UserError("data.tokenizer is missing: give a tokenizer (with data.train_tokenizer to train it "
                            "there), or model.init_from to continue a model with its own")
        if word_starts and layout != "stream":
            raise UserError("word_starts (whole-word masking) comes with the 'stream' layout only; "
                            "set word_starts: false or layout: stream")
        if shuffle_buffer < 0:
            raise UserError(f"shuffle_buffer must be at least 0 (0: no shuffling), got {shuffle_buffer}")
        if not 0.0 <= validation_fraction < 1.0:
            raise UserError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
        self.save_hyperparameters()
        self.tokenizer_origin = self._tokenizer_ready()
        if self.tokenizer_origin:
            print(f"tokenizer: {tokenizer} ({self.tokenizer_origin})", flush=True)
        self.tokenizer = load_tokenizer(tokenizer)
        if add_tokens:  # (the model, given the same file, adds the same tokens to its copy)
            added, known = add_tokens_from(self.tokenizer, add_tokens)
            print(f"added {len(added):,} tokens from {add_tokens} (ids {self.vocab_size - len(added):,}-"
                  f"{self.vocab_size - 1:,})" + (f"; already in the vocabulary, skipped: {', '.join(known[:10])}"
                                                 + (", ..." if len(known) > 10 else "") if known else ""), flush=True)
        self.special = special_ids(self.tokenizer)
        if self.special.sep is None and self.special.eos is None:
            raise UserError(f"the tokenizer {tokenizer} has no separator token ([SEP], </s> or <|endoftext|>)")
        self.datasets: dict[str, torch.utils.data.Dataset] = {}
        self.position = {"epoch": 0, "batches": 0}  # training batches this rank consumed in this epoch
        self._resume_from: dict[str, int] | None = None
        self.start_anew: list[str] = []  # changed data settings on a resume: the saved position is not used

    def _tokenizer_ready(self) -> str | None:
        """Train the tokenizer if it is to be trained and is not there yet; check that one found there was trained on
        this corpus. Returns which it is, in words (None: there is none; loading it says so)."""
        hp = self.hparams
        path = Path(hp.tokenizer)
        if hp.train_tokenizer and not path.exists():
            # once: processes started together (torchrun, SLURM, runs sharing a tokenizer) wait for the first
            with file_lock(path.with_name(f".{path.name}.lock")):
                if not path.exists():
                    print(f"training a {hp.train_tokenizer} tokenizer ({hp.tokenizer_vocab_size:,} tokens) on "
                          f"{describe_files(corpus_files(resolve_files(hp.files)))} -> {path}", flush=True)
                    trained, _ = train_tokenizer_on_files(hp.files, hp.train_tokenizer, hp.tokenizer_vocab_size, path,
                                                          hp.text_field, hp.documents_by, hp.clean,
                                                          cache_dir=Path(hp.cache_dir) / "datasets")
                    return f"trained now: {trained.get_vocab_size():,} tokens" + size_note(
                        trained, hp.tokenizer_vocab_size)
        record = read_provenance(path) if path.is_file() else None
        if record is None:
            return "given: trained elsewhere, no record of its corpus" if path.exists() else None
        wanted = {"text_field": hp.text_field, "clean": hp.clean}
        if hp.train_tokenizer:
            wanted |= {"kind": hp.train_tokenizer, "vocab_size": hp.tokenizer_vocab_size}
        mismatch = provenance_mismatch(record, resolve_files(hp.files), wanted)
        if not mismatch:
            return f"reused: trained on this corpus ({describe_files(record['files'])}), {record['tokens']:,} tokens"
        if not hp.train_tokenizer:  # named as the tokenizer to use, not as this run's to train
            return f"given: trained for something else: {mismatch}"
        if not hp.reuse_tokenizer:
            raise UserError(
                f"the tokenizer {path} was trained for something else: {mismatch}. Give a new path to train one "
                f"for this run (--data.tokenizer runs/tokenizers/NAME/tokenizer.json), or use this one on purpose "
                f"with --data.reuse_tokenizer true")
        return f"reused on purpose (reuse_tokenizer), trained for something else: {mismatch}"

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if self.datasets:
            return
        if hp.validation_files:
            self.datasets["train"] = self._examples(hp.files, "all", training=True)
            self.datasets["val"] = self._examples(hp.validation_files, "all", training=False)
        else:
            self.datasets["train"] = self._examples(hp.files, "train", training=True)
            if hp.validation_fraction > 0:
                self.datasets["val"] = self._examples(hp.files, "val", training=False)

    def _examples(self, files: list[str], split: str, training: bool) -> torch.utils.data.Dataset:
        hp = self.hparams
        settings = {k: hp[k] for k in ("layout", "max_length", "pair_task", "cls_first", "word_starts",
                                       "short_seq_prob", "validation_fraction", "text_field", "documents_by",
                                       "clean", "seed")} | {"split": split}
        if hp.layout == "pairs":
            settings["pairs_version"] = PAIRS_VERSION
        if hp.streaming:
            if hp.layout == "stream":
                layout = StreamLayout(self.tokenizer, hp.max_length, self._separator(), self._cls(), hp.word_starts)
            else:
                layout = PairLayout(self.tokenizer, hp.max_length, *self._pair_ids(), hp.pair_task,
                                    hp.short_seq_prob, hp.seed)
            return StreamingExamples(self._documents(files, split, streaming=True), layout, hp.shuffle_buffer,
                                     hp.seed, same_every_pass=not training)
        key = fingerprint(resolve_files(files), self.tokenizer, settings)
        return ArrayExamples(cached_arrays(Path(hp.cache_dir), key, lambda: self._build(files, split, key)))

    def _documents(self, files: list[str], split: str, streaming: bool = False):
        hp = self.hparams
        corpus = load_corpus(files, hp.text_field, hp.documents_by, hp.clean, Path(hp.cache_dir) / "datasets",
                             streaming=streaming, drop_empty=False)  # the packer skips empty documents
        if split == "all" or hp.validation_fraction == 0:
            return corpus
        if not streaming:
            self._check_split(files, len(corpus))
        keep_validation = split == "val"
        return corpus.filter(
            lambda _, indices: list(in_validation(np.array(indices), hp.validation_fraction, hp.seed)
                                    == keep_validation), with_indices=True, batched=True)

    def _check_split(self, files: list[str] | str, documents: int) -> None:
        """Before anything is split: a corpus that yields too few documents for a validation split by document
        (one giant document, a file without blank lines) gets one line saying how many were found and what to do."""
        hp = self.hparams
        validation = int(in_validation(np.arange(documents), hp.validation_fraction, hp.seed).sum())
        if 0 < validation < documents:
            return
        unit = {"paragraph": "blocks between blank lines", "line": "lines"}[hp.documents_by]
        named = files if isinstance(files, str) else ", ".join(map(str, files))
        raise UserError(
            f"the corpus {named} gives {documents:,} document(s) ({unit} of text files, rows of the others), and the "
            f"validation split (validation_fraction {hp.validation_fraction}, by whole document) would take "
            f"{validation} of them, leaving {documents - validation} to train on. Read one document per line "
            "(--data.documents_by line), give one file per document, give --data.validation_files, or set "
            "--data.validation_fraction 0")

    def _build(self, files: list[str], split: str, key: str) -> Iterator[dict[str, np.ndarray]]:
        hp = self.hparams
        documents = self._documents(files, split)
        if hp.layout == "stream":
            tokenized = tokenize(documents, self.tokenizer, key, hp.word_starts, hp.num_proc)
            yield from pack_stream(tokenized_batches(tokenized), hp.max_length, self._separator(), self._cls())
            return
        cls_id, sep_id, pad_id = self._pair_ids()
        pairs = pair_dataset(documents, self.tokenizer, key, hp.max_length, cls_id, sep_id, hp.pair_task,
                             hp.short_seq_prob, hp.seed, hp.num_proc)
        yield from pair_parts(pairs, hp.max_length, pad_id, hp.pair_task)

    def _pair_ids(self) -> tuple[int, int, int]:
        if self.special.cls is None or self.special.pad is None:
            raise UserError("the pairs layout needs [CLS] and [PAD] tokens (or <s> and <pad>) in the tokenizer")
        return self.special.cls, self._separator(), self.special.pad

    def _separator(self) -> int:
        return self.special.sep if self.special.sep is not None else self.special.eos

    def _cls(self) -> int | None:
        if not self.hparams.cls_first:
            return None
        if self.special.cls is None:
            raise UserError("cls_first needs a [CLS] (or <s>) token; set cls_first: false for GPT-style tokenizers")
        return self.special.cls

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        dataset, hp = self.datasets["train"], self.hparams
        if isinstance(dataset, StreamingExamples):
            dataset.endless = self.trainer is not None and self.trainer.world_size > 1
            loader = self._loader(dataset, sampler=None, train=True)
        else:
            # Every training step the same shape (one compiled graph, no recompilation at an epoch's end): an epoch's
            # last partial batch is dropped, unless the split is smaller than one batch.
            sampler = ResumableSampler(dataset, shuffle=True, seed=hp.seed)
            loader = self._loader(dataset, sampler, drop_last=len(sampler) >= hp.batch_size, train=True)
        if self._resume_from is not None and not self.start_anew:  # (an earlier version kept the position here)
            self.start_at(loader, self._resume_from)
            self._resume_from = None
        return loader

    def start_at(self, loader: torch.utils.data.DataLoader, position: dict[str, int]) -> None:
        """Make the loader's next pass continue epoch `position["epoch"]` after its first `position["batches"]`
        batches, and count on from there."""
        self.position = {key: value for key, value in position.items() if key != "ranks"}  # (this rank's below)
        if isinstance(loader.dataset, StreamingExamples):
            roles, batches = max(1, self.hparams.num_workers), position["batches"]
            # checkpoints of earlier versions counted batches (each worker made every roles-th batch), then each
            # role's batches since the pass began; now each role's (pass, examples made in it)
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
            ranks = position.get("ranks")
            if ranks is not None and len(ranks) != world:
                raise UserError(f"the checkpoint's streaming position is for {len(ranks)} ranks, this run has {world}: "
                                f"resume on {len(ranks)} (devices x nodes): each rank reads its own share")
            made = (ranks[rank] if ranks else position.get("readers")) \
                or [max(0, (batches - role + roles - 1) // roles) for role in range(roles)]
            earlier = not made or not isinstance(made[0], (list, tuple)) or (world > 1 and ranks is None)
            if earlier and roles * world > 1 and rank == 0:
                print("note: the checkpoint's streaming position was written by an earlier version, which shared the "
                      "documents among the readers otherwise: the run resumes about where it was, not at exactly "
                      "the examples it would have seen next", flush=True)
            made = [list(m) if isinstance(m, (list, tuple)) else [position["epoch"], m * self.hparams.batch_size]
                    for m in made]
            if len(made) != roles:
                raise UserError(f"the checkpoint's streaming position is for {len(made)} dataloader worker(s), this "
                                f"run has num_workers {self.hparams.num_workers}: resume with --data.num_workers "
                                f"{len(made) if len(made) > 1 else 0} (each worker reads its own share)")
            self.position["readers"] = made
            loader.dataset.epoch = position["epoch"]
            loader.dataset.resume = (batches, [tuple(m) for m in made])
        else:
            loader.sampler.resume = (position["epoch"], position["batches"] * self.hparams.batch_size)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        if "val" not in self.datasets:
            return []
        dataset = self.datasets["val"]
        sampler = None if isinstance(dataset, StreamingExamples) else ResumableSampler(dataset, False,
                                                                                       self.hparams.seed)
        return self._loader(dataset, sampler)

    def _loader(self, dataset: torch.utils.data.Dataset, sampler: ResumableSampler | None, drop_last: bool = False,
                train: bool = False) -> torch.utils.data.DataLoader:
        """Every loader has its own generator (the workers' base seed): loading never draws from the global RNG,
        which dropout uses and checkpoints restore. Batches are pinned where a GPU will take them (asynchronous
        copies). The training loader is a `TrainLoader`, whose position Lightning saves and restores."""
        workers = self.hparams.num_workers
        extra = {"datamodule": self} if train else {}
        return (TrainLoader if train else torch.utils.data.DataLoader)(
            dataset, **extra, batch_size=self.hparams.batch_size, sampler=sampler, num_workers=workers,
            collate_fn=functools.partial(collate, separate_documents=self.hparams.separate_documents),
            generator=torch.Generator().manual_seed(self.hparams.seed), drop_last=drop_last,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,  # a streaming worker's copy counts its epochs, drops its resume skip
            worker_init_fn=ignore_interrupts if workers > 0 else None,
        )

    def on_before_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        """Count the training batches consumed (here, not in the loader: Lightning and the workers fetch ahead), and
        for streaming data, which reader made each (the field is removed from every batch)."""
        reader, passes = batch.pop("reader", None), batch.pop("pass", None)
        trainer = self.trainer
        if trainer is not None and trainer.training:
            self.consumed(trainer.current_epoch, None if reader is None else int(reader[0]), passes)
        return batch

    def consumed(self, epoch: int, reader: int | None, passes: Tensor | None = None) -> None:
        """One more training batch of `epoch` consumed (made by streaming reader role `reader`, its examples from
        the reader's passes `passes`: the last pass's examples are counted, a batch may begin in the pass before)."""
        if self.position["epoch"] != epoch:
            self.position = {"epoch": epoch, "batches": 0}
        self.position["batches"] += 1
        if reader is not None:
            counts = self.position.setdefault("readers", [[epoch, 0] for _ in range(max(1, self.hparams.num_workers))])
            last = int(passes[-1])
            made = int((passes == last).sum())
            counts[reader] = [last, made + (counts[reader][1] if counts[reader][0] == last else 0)]

    def load_state_dict(self, state: dict) -> None:
        """Checkpoints of earlier versions kept the data position here (now the training loader's state)."""
        if "epoch" in state:
            self.position = dict(state)
            self._resume_from = dict(state)
