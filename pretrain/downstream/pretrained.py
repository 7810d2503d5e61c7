"""A trained model with its tokenizer, from a Lightning checkpoint, an export directory or a Hugging Face directory:
`pretrain.load(path)`; `Pretrained.save` writes the portable directory (see `pretrain.downstream.export`) that `load`
reads back.

Nothing here unpickles code: weights come from safetensors files, and checkpoints are read with weights_only=True.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_model
from tokenizers import Tokenizer
from torch import Tensor

from models import LMHead, ModelWithHeads, Transformer, TransformerConfig, build_head, head_spec
from pretrain import __version__
from pretrain.data.tokenizer import load_tokenizer, plain, special_ids
from pretrain.downstream.generate import LanguageModel, Strategy, generate, perplexity
from pretrain.downstream.inputs import Row, gpt_inputs, right_pad, task_batch, task_output
from pretrain.errors import UserError
from pretrain.training.checkpoints import is_sharded_checkpoint, read_checkpoint, read_sharded_weights

CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "tokenizer.json"


@dataclass
class Encoded:
    hidden_states: Tensor  # (B, T, H), zeros at padding
    attention_mask: Tensor  # (B, T), 1 for real tokens
    pooled: Tensor  # (B, H): the mean of each text's hidden states over its real tokens


class Pretrained:
    """`model` (backbone and the pretraining heads, by objective name), `tokenizer` and `config`, in eval mode;
    a fine-tuned model also has `task` (name, labels, regression, pair) and its "task" head, used by `predict`."""

    def __init__(self, model: ModelWithHeads, tokenizer: Tokenizer, task: dict | None = None):
        self.model, self.tokenizer, self.task = model.eval(), plain(tokenizer), task
        self.special = special_ids(tokenizer)

    @property
    def config(self) -> TransformerConfig:
        return self.model.config

    @property
    def pad_id(self) -> int:
        return self.special.pad if self.special.pad is not None else 0

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids as in pretraining: encoders get the tokenizer's [CLS] ... [SEP] template, causal models plain
        tokens; cut to the model's context."""
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=not self.config.causal)
        return [e.ids[: self.config.max_position_embeddings] for e in encodings]

    def tokenize_pairs(self, texts: list[str], pairs: list[str] | None, max_length: int) -> list[Row]:
        """(ids, segment ids) of [CLS] A [SEP] or [CLS] A [SEP] B [SEP] (the tokenizer's templates), cut to
        `max_length` (the longer text first)."""
        tokenizer = Tokenizer.from_str(self.tokenizer.to_str())  # truncation is set on a copy
        tokenizer.enable_truncation(min(max_length, self.config.max_position_embeddings))
        inputs = list(zip(texts, pairs, strict=True)) if pairs is not None else texts
        return [(e.ids, e.type_ids) for e in tokenizer.encode_batch(inputs)]

    def gpt_tokens(self) -> tuple[dict[str, int], list[str]]:
        """The start, delimiter and extract tokens of GPT-1's input transformation, and the tokens added for it.
        The tokenizer's own document boundary (its separator or end-of-text token) where it has one: a causal model
        pretrained here saw it between documents. Where it has none, new special tokens are added to the tokenizer
        and the model's embeddings grow by as many rows (random, learned in fine-tuning), as in GPT-1."""
        special, added = self.special, []
        found = {"start": special.sep if special.sep is not None else special.eos,
                 "delim": special.sep if special.sep is not None else special.eos,
                 "extract": special.eos if special.eos is not None else special.sep}
        tokens = {}
        for role, token_id in found.items():
            if token_id is None:
                name = f"<|{role}|>"
                self.tokenizer.add_special_tokens([name])
                token_id = self.tokenizer.token_to_id(name)
                added.append(name)
            tokens[role] = token_id
        if self.tokenizer.get_vocab_size() > self.config.vocab_size:
            self.model.resize_vocabulary(self.tokenizer.get_vocab_size())
        return tokens, added

    def task_inputs(self, texts: list[str], pairs: list[str] | None, max_length: int,
                    gpt_tokens: dict[str, int] | None = None, symmetric: bool = False) -> list[list[Row]]:
        """Each example as model inputs: an encoder's [CLS] A [SEP] (B [SEP]); a causal model's GPT-1 transformation
        with `gpt_tokens` (`gpt_tokens()`), both orders of a pair when `symmetric`."""
        max_length = min(max_length, self.config.max_position_embeddings)
        if not self.config.causal:
            return [[row] for row in self.tokenize_pairs(texts, pairs, max_length)]
        if gpt_tokens is None:
            raise ValueError("a causal model's task inputs need the GPT-1 tokens (Pretrained.gpt_tokens)")
        first = [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]
        second = ([e.ids for e in self.tokenizer.encode_batch(pairs, add_special_tokens=False)] if pairs is not None
                  else [None] * len(first))
        return [gpt_inputs(a, b, gpt_tokens, max_length, symmetric) for a, b in zip(first, second, strict=True)]

    @torch.no_grad()
    def predict(self, texts: list[str] | str, pairs: list[str] | None = None, batch_size: int = 64,
                names: bool = False, probabilities: bool = False) -> list:
        """A fine-tuned model's label for each text (or text pair): a label of the task as its files write it (or a
        number, for regression); with `names`, the label's name where the task has one (SST-2's "1" is
        "positive"); with `probabilities`, each label's probability instead: {label: p} per text."""
        if self.task is None or "task" not in self.model.heads:
            raise UserError("this model was not fine-tuned on a task (pretrain finetune): nothing to predict")
        texts = [texts] if isinstance(texts, str) else list(texts)
        if self.task["pair"] != (pairs is not None):
            raise UserError(f"the task {self.task['name']} takes " + ("text pairs: give pairs" if self.task["pair"]
                                                                      else "single texts: give no pairs"))
        examples = self.task_inputs(texts, pairs, self.task["max_length"], self.task.get("gpt_tokens"),
                                    self.task.get("symmetric", False))
        device = next(self.model.parameters()).device
        labels = self.task.get("label_names") if names and self.task.get("label_names") else self.task["labels"]
        out: list = []
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in task_batch(examples[start:start + batch_size], self.pad_id).items()}
            output, _ = task_output(self.model.backbone, self.model.heads["task"], batch, self.task["regression"])
            if self.task["regression"]:
                out += output.tolist()
            elif probabilities:
                out += [dict(zip(labels, row, strict=True)) for row in output.float().softmax(-1).tolist()]
            else:
                out += [labels[i] for i in output.argmax(-1).tolist()]
        return out

    @torch.no_grad()
    def encode(self, texts: list[str] | str, batch_size: int = 32) -> Encoded:
        """Token-level hidden states and a pooled vector per text."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = self.tokenize(texts)
        input_ids, attention_mask = right_pad(ids, self.pad_id), right_pad([[1] * len(row) for row in ids], 0)
        device = next(self.model.parameters()).device
        hidden = torch.cat([
            self.model.backbone(input_ids[i:i + batch_size].to(device),
                                attention_mask=attention_mask[i:i + batch_size].to(device)).float().cpu()
            for i in range(0, len(ids), batch_size)
        ])
        mask = attention_mask[..., None].to(hidden.dtype)
        hidden = hidden * mask
        return Encoded(hidden, attention_mask, hidden.sum(1) / mask.sum(1).clamp(min=1))

    def language_model(self) -> LanguageModel:
        head = next((h for h in self.model.heads.values() if isinstance(h, LMHead)), None)
        if not self.config.causal or head is None:
            raise UserError(f"this model has no causal LM head (its heads: {sorted(self.model.heads)}): generation "
                            "needs a model pretrained with CausalLM, e.g. configs/gpt2-small.yaml")
        return LanguageModel(self.model.backbone, head)

    def room(self, prompts: list[str]) -> int:
        """How many tokens the longest of these prompts leaves for generation within the model's positions."""
        return self.config.max_position_embeddings - max(len(row) for row in self.tokenize(prompts))

    @torch.no_grad()
    def generate(self, prompts: list[str] | str, strategy: Strategy = "greedy", seed: int | None = None,
                 with_reasons: bool = False, **settings) -> list[str] | list[tuple[str, str]]:
        """Each prompt's continuation as text (`pretrain.generate.Settings`: max_new_tokens, temperature, top_k,
        top_p, num_beams, length_penalty, ...); stops at the tokenizer's end-of-text token, or where the model's
        positions end (with a warning, if that is before max_new_tokens). With `with_reasons`, (text, why it
        stopped) for each."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        room = self.room(prompts)
        if room < 1:
            raise UserError(f"a prompt fills all {self.config.max_position_embeddings} positions of the model: "
                            "shorten it")
        wanted = settings.get("max_new_tokens", 32)
        if isinstance(wanted, int) and wanted > room:
            warnings.warn(f"generating {room} new tokens, not {wanted}: the prompt and the continuation must fit the "
                          f"model's {self.config.max_position_embeddings} positions", stacklevel=2)
            settings["max_new_tokens"] = room
        ids = [row or [self.special.eos if self.special.eos is not None else 0] for row in self.tokenize(prompts)]
        settings.setdefault("eos_id", self.special.eos)
        new = generate(self.language_model(), ids, strategy, pad_id=self.pad_id, seed=seed, **settings)
        texts = [self.tokenizer.decode(tokens) for tokens in new]
        if not with_reasons:
            return texts
        eos = settings["eos_id"]
        reasons = [f"ended at the end-of-text token {self.tokenizer.id_to_token(eos)!r} after {len(tokens)} tokens"
                   if tokens and eos is not None and tokens[-1] == eos else f"stopped at {len(tokens)} new tokens "
                   f"(max_new_tokens {settings.get('max_new_tokens', 32)})" for tokens in new]
        return list(zip(texts, reasons, strict=True))

    @torch.no_grad()
    def perplexity(self, text: str, window: int | None = None, stride: int | None = None) -> tuple[float, int]:
        """(token-level perplexity, number of tokens) of `text` as one sequence, scored with a sliding window of up
        to the model's context (`pretrain.generate.perplexity`)."""
        tokens = self.tokenizer.encode(text, add_special_tokens=False).ids
        return perplexity(self.language_model(), tokens, window, stride), len(tokens)

    def save(self, directory: str | Path) -> None:
        """The portable directory: model.safetensors, config.json, tokenizer.json (written into `directory`)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_model(self.model, str(directory / WEIGHTS_FILE))
        config = {"format": "pretrain", "version": __version__, "backbone": dataclasses.asdict(self.config),
                  "heads": {name: head_spec(head) for name, head in self.model.heads.items()}, "task": self.task}
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        self.tokenizer.save(str(directory / TOKENIZER_FILE))
        with_umask([directory / name for name in (WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE)])

    def save_hf(self, directory: str | Path, family: str | None = None) -> None:
        """A Hugging Face transformers directory (BertForPreTraining, AlbertForPreTraining, ElectraForPreTraining,
        GPT2LMHeadModel, ... by the heads, or of `family`) with a fast tokenizer."""
        import transformers

        from models import to_hf
        from models.hf import ROBERTA_PAD_ID

        if family == "roberta" and self.special.pad != ROBERTA_PAD_ID:
            raise UserError(f"RoBERTa numbers positions from its pad id {ROBERTA_PAD_ID}; this tokenizer's pad id is "
                            f"{self.special.pad}: export it as bert (leave out --hf-family)")
        model = to_hf(self.model, family)
        ids = {"pad_token_id": self.special.pad}  # the tokenizer's own ids, not the family's defaults (GPT-2: 50256)
        if self.config.causal:  # GPT-2 begins and ends texts with its one end-of-text token
            ids |= {"bos_token_id": self.special.eos, "eos_token_id": self.special.eos}
        for config in (model.config, getattr(model, "generation_config", None)):
            if config is not None:
                for key, value in ids.items():
                    setattr(config, key, value)
        model.save_pretrained(directory)
        names = {role: self.tokenizer.id_to_token(i) for role, i in dataclasses.asdict(self.special).items()
                 if i is not None}
        roles = {"pad": "pad_token", "unk": "unk_token", "cls": "cls_token", "sep": "sep_token",
                 "mask": "mask_token", "eos": "eos_token"}
        tokenizer = transformers.PreTrainedTokenizerFast(
            tokenizer_object=self.tokenizer, model_max_length=self.config.max_position_embeddings,
            **{roles[role]: token for role, token in names.items() if role in roles})
        tokenizer.save_pretrained(directory)
        with_umask([path for path in Path(directory).iterdir() if path.is_file()])


def with_umask(files: list[Path]) -> None:
    """Give files the mode the user's umask gives new files (0644 under the usual 022): safetensors writes its files
    0600, readable by their owner only."""
    mask = os.umask(0)
    os.umask(mask)
    for path in files:
        path.chmod(0o666 & ~mask)


# The heads of models saved before heads described themselves (their names were the objectives'): how to rebuild them.
LEGACY_HEADS = {
    "mlm": {"class_path": "models.heads.LMHead", "init_args": {}},
    "clm": {"class_path": "models.heads.LMHead", "init_args": {"transform": False, "bias": False}},
    "rtd": {"class_path": "models.heads.TokenScorer", "init_args": {}},
    "nsp": {"class_path": "models.heads.ClassificationHead", "init_args": {"num_labels": 2}},
    "sop": {"class_path": "models.heads.ClassificationHead", "init_args": {"num_labels": 2}},
}


def model_with_heads(config: TransformerConfig, heads: dict[str, dict] | list[str], task: dict | None = None
                     ) -> ModelWithHeads:
    """The backbone of `config` with the heads their specs describe (`models.head_spec`), fresh weights; a list of
    names is a model saved before heads described themselves."""
    if isinstance(heads, list):
        labels = (1 if task["regression"] else len(task["labels"])) if task else 2
        legacy = LEGACY_HEADS | {"task": {"class_path": "models.heads.ClassificationHead",
                                          "init_args": {"num_labels": labels}}}
        unknown = [name for name in heads if name not in legacy]
        if unknown:
            raise UserError(f"the saved model names heads {unknown} without saying how to build them: export it again "
                            "with this version of pretrain")
        heads = {name: legacy[name] for name in heads}
    backbone = Transformer(config)
    try:
        return ModelWithHeads(backbone, {name: build_head(spec, backbone) for name, spec in heads.items()})
    except (ValueError, TypeError, ImportError) as error:
        raise UserError(f"the saved model's heads cannot be rebuilt: {error}") from error


def from_checkpoint(path: Path) -> Pretrained:
    checkpoint = read_checkpoint(path)
    saved = checkpoint.get("pretrain")
    if saved is None:
        raise UserError(f"{path} is not a checkpoint of `pretrain fit` (it has no 'pretrain' section)")
    if saved["tokenizer"] is None:
        raise UserError(f"{path} holds no tokenizer (the model was trained without one); export needs it")
    model = model_with_heads(TransformerConfig(**saved["backbone"]), saved.get("head_specs") or list(saved["heads"]))
    names = {}  # our key -> the checkpoint's
    for key in model.state_dict():
        if key.startswith("backbone."):
            names[key] = key
        else:  # heads.<name>.<rest> <- <the objective's head prefix>.<rest>
            _, name, rest = key.split(".", 2)
            names[key] = f"{saved['heads'][name]}.{rest}"
    if "state_dict" in checkpoint:
        state = checkpoint["state_dict"]
    else:  # a sharded checkpoint directory: its shards fill tensors of the model's shapes
        state = {names[key]: torch.empty_like(value) for key, value in model.state_dict().items()}
        read_sharded_weights(path, state)
    model.load_state_dict({key: state[name] for key, name in names.items()})
    return Pretrained(model, Tokenizer.from_str(saved["tokenizer"]))


def from_export(directory: Path, config: dict) -> Pretrained:
    """`config`: the directory's config.json, as read by `load`."""
    if not (directory / TOKENIZER_FILE).is_file():
        raise UserError(f"{directory} has no {TOKENIZER_FILE}: copy the tokenizer the model was trained with there")
    if not (directory / WEIGHTS_FILE).is_file():
        raise UserError(f"{directory} has no {WEIGHTS_FILE}: export the checkpoint again (pretrain export)")
    model = model_with_heads(TransformerConfig(**config["backbone"]), config["heads"], config.get("task"))
    try:
        load_model(model, str(directory / WEIGHTS_FILE))  # strict: every weight present and of the right shape
    except RuntimeError as error:
        raise UserError(f"{directory / WEIGHTS_FILE} does not match its {CONFIG_FILE}: {error}") from error
    return Pretrained(model, load_tokenizer(directory / TOKENIZER_FILE), config.get("task"))


def from_hf_directory(directory: Path) -> Pretrained:
    try:
        import transformers
    except ImportError as error:
        raise UserError("reading a Hugging Face directory needs transformers: pip install transformers") from error
    from models.hf import HF_CLASSES, from_hf_state_dict

    hf_config = transformers.AutoConfig.from_pretrained(directory)
    architecture = (hf_config.architectures or [""])[0]
    if architecture not in HF_CLASSES:
        raise UserError(f"{directory} holds a {architecture or hf_config.model_type} model; supported: "
                        f"{', '.join(sorted(HF_CLASSES))}")
    if (directory / WEIGHTS_FILE).is_file():
        state = load_file(str(directory / WEIGHTS_FILE))
    elif (directory / "pytorch_model.bin").is_file():
        state = torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise UserError(f"{directory} has neither {WEIGHTS_FILE} nor pytorch_model.bin")
    model = from_hf_state_dict(state, hf_config, heads=HF_CLASSES[architecture][1])
    if not isinstance(model, ModelWithHeads):
        model = ModelWithHeads(model, {})
    return Pretrained(model, load_tokenizer(directory))


def load(path: str | Path) -> Pretrained:
    """A model and its tokenizer from a checkpoint of `pretrain fit` (a `.ckpt` file, or the directory of a sharded
    one), a directory written by `pretrain export`, or a Hugging Face directory of a BERT, ALBERT, ELECTRA or GPT-2
    model."""
    path = Path(path)
    if path.is_file() or is_sharded_checkpoint(path) or (path.is_symlink() and not path.exists()):
        return from_checkpoint(path)
    if not path.is_dir():
        raise UserError(f"{path} does not exist (give a .ckpt file or an exported model directory)")
    if not (path / CONFIG_FILE).is_file():
        raise UserError(f"{path} has no {CONFIG_FILE}: give a directory written by `pretrain export` or a Hugging "
                        "Face model directory")
    config = json.loads((path / CONFIG_FILE).read_text())
    return from_export(path, config) if config.get("format") == "pretrain" else from_hf_directory(path)
