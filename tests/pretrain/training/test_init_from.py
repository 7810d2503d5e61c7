"""Continued pretraining (`model.init_from`): the architecture, backbone and objective heads come from the source,
and the first loss is the loss the source's own Hugging Face class computes on the same batch and corruption."""

import shutil

import pytest
import torch

import pretrain
from objectives import CausalLM, MaskedLM, SentenceOrderPrediction
from pretrain.cli import main
from pretrain.data.tokenizer import load_tokenizer
from pretrain.errors import UserError
from pretrain.sample import BUNDLED_CORPUS
from pretrain.training.module import PretrainingModule
from tests.helpers import ROOT
from tests.pretrain.test_cli import check_exports
from tests.test_training_parity import parity_module

CONFIGS = ROOT / "configs"

pytest.importorskip("transformers", reason="the sources are Hugging Face models (dev extras)")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("init_from")


def save_source(model, tokenizer, directory):
    """`model` saved as a Hugging Face directory (`save_pretrained`) with the tokenizer file beside it."""
    model.save_pretrained(directory)
    shutil.copy(tokenizer, directory / "tokenizer.json")
    return directory


def hugging_face_source(name: str, workdir, settings):
    """A random Hugging Face model of the family (`save_pretrained`, its tokenizer beside it), its batches, and the
    Hugging Face model itself."""
    parity = parity_module()
    batches, tokenizer = parity.make_batches(parity.FAMILIES[name], settings, workdir)
    module = parity.build_module(name, tokenizer, settings)
    [model] = parity.hugging_face_models(module, parity.FAMILIES[name].hf_family)
    directory = save_source(model, tokenizer, workdir / f"hf-{name}")
    return directory, batches, model


@pytest.mark.parametrize("name", ["bert", "albert", "roberta", "gpt2"])
def test_the_first_loss_is_the_sources_own(name, workdir):
    parity = parity_module()
    settings = parity.Settings(steps=2)
    directory, batches, model = hugging_face_source(name, workdir, settings)
    family = parity.FAMILIES[name]
    module = PretrainingModule(objectives=family.objectives(), init_from=str(directory), tokenizer=str(directory))
    module.train()
    assert module.init_report[0].startswith(f"init_from {directory}: the backbone (")
    assert "optimizer: new" in module.init_report[-1]
    generator = module.corruption_generator(torch.device("cpu"), 0, 0, 0)
    ours, _ = module(batches[0], generator)
    generator = module.corruption_generator(torch.device("cpu"), 0, 0, 0)
    theirs, _ = parity.reference_loss([model.train()], list(module.objectives), batches[0], generator, None)
    ours, theirs = float(ours.detach()), float(theirs.detach())
    assert abs(ours - theirs) <= 1e-5 * abs(theirs), (ours, theirs)


def test_heads_the_source_lacks_start_fresh_and_unused_ones_are_named(workdir):
    parity = parity_module()
    directory, _, _ = hugging_face_source("bert", workdir, parity.Settings(steps=2))  # BertForPreTraining: mlm, nsp
    module = PretrainingModule(objectives=[MaskedLM(), SentenceOrderPrediction()], init_from=str(directory),
                               tokenizer=str(directory))
    report = "\n".join(module.init_report)
    assert "heads mlm loaded" in report and "new (fresh weights): heads sop" in report
    assert "not used: the source's heads nsp" in report


def test_a_contradicting_architecture_or_a_bad_path_is_refused(workdir):
    parity = parity_module()
    directory, _, _ = hugging_face_source("gpt2", workdir, parity.Settings(steps=2))
    source = PretrainingModule(objectives=[CausalLM()], init_from=str(directory), tokenizer=str(directory))
    wrong = source.backbone.config.__class__(**{**source.hparams["backbone"], "num_layers": 5})
    with pytest.raises(UserError, match=r"contradicts model.init_from .*num_layers 5 \(the source's: 2\)"):
        PretrainingModule(wrong, [CausalLM()], init_from=str(directory), tokenizer=str(directory))
    with pytest.raises(UserError, match="model.init_from .*nothing does not exist"):
        PretrainingModule(objectives=[CausalLM()], init_from=str(workdir / "nothing"))


@pytest.mark.parametrize("name, recipe, head", [("gpt2", "continue-clm.yaml", "clm"),
                                                ("bert", "continue-mlm.yaml", "mlm"),
                                                ("electra", "continue-electra.yaml", "rtd")])
def test_the_continue_recipes_run_from_a_hugging_face_model_and_resume(name, recipe, head, workdir, tmp_path, capsys):
    parity = parity_module()
    if name == "electra":  # the discriminator, its generator beside it
        (directory, generator), _, _ = electra_release(workdir)
    else:
        directory, _, _ = hugging_face_source(name, workdir, parity.Settings(steps=2))
    common = ["fit", "-c", str(CONFIGS / recipe), "--model.init_from", str(directory),
              "--data.files", f"[{BUNDLED_CORPUS}]", "--data.max_length", "32", "--data.cache_dir",
              str(tmp_path / "cache"), "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.accelerator",
              "cpu", "--model.total_steps", "6", "--trainer.limit_val_batches", "0",
              "--trainer.enable_progress_bar", "false"]
    assert main([*common, "--trainer.max_steps", "3"]) == 0
    out = capsys.readouterr().out
    assert f"init_from {directory}: the backbone (" in out and f"heads {head}" in out
    assert f"tokenizer: {directory} (given" in out  # the source's tokenizer, not one trained here
    if name == "electra":
        assert f"init_generator_from {generator}: the generator (" in out
    assert main([*common, "--trainer.max_steps", "6", "--ckpt_path", "last"]) == 0
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 6 and saved["hyper_parameters"]["init_from"] == str(directory)
    # a checkpoint of this project as the source: a new run from its weights, its tokenizer read from it
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    again = [*common, "--trainer.max_steps", "1"]
    again[again.index(str(directory))] = str(checkpoint)
    again[again.index(str(tmp_path / "run"))] = str(tmp_path / "again")
    assert main(again) == 0
    out = capsys.readouterr().out
    assert f"init_from {checkpoint}: the backbone (" in out and f"tokenizer: {checkpoint} (given" in out
    # exported, the continued model is its family's Hugging Face class again: every key in place, our logits
    (tmp_path / "exports").mkdir()
    check_exports(tmp_path / "run" / "checkpoints" / "last.ckpt", tmp_path / "exports")
    import transformers

    architecture = transformers.AutoConfig.from_pretrained(tmp_path / "exports" / "hf").architectures[0]
    _, info = getattr(transformers, architecture).from_pretrained(tmp_path / "exports" / "hf",
                                                                  output_loading_info=True)
    # (the source's NSP head is not trained here: BERT comes back as BertForMaskedLM)
    assert architecture == {"gpt2": "GPT2LMHeadModel", "bert": "BertForMaskedLM",
                            "electra": "ElectraForPreTraining"}[name]
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_a_continue_recipe_without_a_source_says_what_to_give(capsys):
    assert main(["fit", "-c", str(CONFIGS / "continue-mlm.yaml")]) == 2
    assert "model.init_from to continue a model that exists" in capsys.readouterr().err


def test_a_llama_source_starts_at_its_own_loss(workdir):
    """Llama (rotary positions, RMSNorm, SwiGLU, grouped KV heads, an untied LM head): the first causal-LM loss is
    LlamaForCausalLM's on the same batch."""
    import transformers

    parity = parity_module()
    batches, tokenizer = parity.make_batches(parity.FAMILIES["gpt2"], parity.Settings(steps=1), workdir)
    vocab = load_tokenizer(tokenizer).get_vocab_size()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    directory = save_source(model, tokenizer, workdir / "hf-llama")
    module = PretrainingModule(objectives=[CausalLM()], init_from=str(directory), tokenizer=str(directory))
    assert "heads clm loaded" in module.init_report[0]
    batch = batches[0]
    ours, _ = module(batch, module.corruption_generator(torch.device("cpu"), 0, 0, 0))
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100) if "attention_mask" in batch \
        else batch["input_ids"]
    theirs = model(batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=labels).loss
    ours, theirs = float(ours.detach()), float(theirs.detach())
    assert abs(ours - theirs) <= 1e-5 * abs(theirs), (ours, theirs)


def test_a_modernbert_source_starts_at_its_own_loss(workdir):
    """ModernBERT (local and global attention layers, two rotary bases, GeGLU, no biases): the first masked-LM loss is
    ModernBertForMaskedLM's on the same batch and masks."""
    import transformers

    from objectives.base import corrupt_batch
    from tests.models.test_hf_parity import modernbert_config

    parity = parity_module()
    batches, tokenizer = parity.make_batches(parity.FAMILIES["roberta"], parity.Settings(steps=1), workdir)
    config = modernbert_config()
    config.vocab_size = load_tokenizer(tokenizer).get_vocab_size()
    torch.manual_seed(0)
    model = transformers.ModernBertForMaskedLM(config)
    directory = save_source(model, tokenizer, workdir / "hf-modernbert")
    module = PretrainingModule(objectives=[MaskedLM()], init_from=str(directory), tokenizer=str(directory))
    assert "heads mlm loaded" in module.init_report[0]
    batch = {key: value for key, value in batches[0].items() if key != "token_type_ids"}
    seed = (torch.device("cpu"), 0, 0, 0)
    ours, _ = module(batch, module.corruption_generator(*seed))
    masked = corrupt_batch(list(module.objectives), batch, module.corruption_generator(*seed))
    theirs = model(masked["input_ids"], attention_mask=batch.get("attention_mask"), labels=masked["mlm_labels"]).loss
    ours, theirs = float(ours.detach()), float(theirs.detach())
    assert abs(ours - theirs) <= 1e-5 * abs(theirs), (ours, theirs)


def test_domain_tokens_are_added_with_mean_rows_and_carried_by_the_checkpoint(workdir, tmp_path, capsys):
    parity = parity_module()
    directory, _, _ = hugging_face_source("bert", workdir, parity.Settings(steps=2))
    source = PretrainingModule(objectives=[MaskedLM()], init_from=str(directory), tokenizer=str(directory))
    size = source.backbone.config.vocab_size
    existing = load_tokenizer(directory).id_to_token(100)
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"zyxwvut\n{existing}\n\nqqqqrrr\nzyxwvut\n")
    common = ["fit", "-c", str(CONFIGS / "continue-mlm.yaml"), "--model.init_from", str(directory),
              "--data.files", f"[{BUNDLED_CORPUS}]", "--data.max_length", "32", "--data.cache_dir",
              str(tmp_path / "cache"), "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.accelerator",
              "cpu", "--trainer.max_steps", "1", "--model.learning_rate", "0", "--trainer.limit_val_batches", "0",
              "--trainer.enable_progress_bar", "false", "--data.add_tokens", str(tokens)]
    assert main(common) == 0
    out = capsys.readouterr().out
    assert f"added 2 tokens from {tokens} (ids {size:,}-{size + 1:,}); already in the vocabulary, skipped: " \
           f"{existing}" in out
    continued = pretrain.load(tmp_path / "run" / "checkpoints" / "last.ckpt")  # what export writes, too
    assert continued.config.vocab_size == size + 2
    assert continued.tokenizer.encode("zyxwvut", add_special_tokens=False).ids == [size]
    rows = continued.model.backbone.embeddings.word.weight
    # learning rate 0: the new rows are still the mean of the source's rows, which are unchanged
    torch.testing.assert_close(rows[:size], source.backbone.embeddings.word.weight)
    torch.testing.assert_close(rows[size:], rows[:size].mean(0).expand(2, -1))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    assert main([*common[:-1], str(empty), "--trainer.default_root_dir", str(tmp_path / "other")]) == 2
    assert f"data.add_tokens {empty} holds no token" in capsys.readouterr().err


def electra_release(workdir):
    """A random ELECTRA discriminator and generator saved as Google's and Hugging Face's releases lay them out
    (NAME-discriminator and NAME-generator side by side), their batches and the two Hugging Face models."""
    parity = parity_module()
    settings = parity.Settings(steps=2)
    batches, tokenizer = parity.make_batches(parity.FAMILIES["electra"], settings, workdir)
    module = parity.build_module("electra", tokenizer, settings)
    discriminator, generator = parity.hugging_face_models(module)
    directories = workdir / "electra-tiny-discriminator", workdir / "electra-tiny-generator"
    for model, directory in zip((discriminator, generator), directories, strict=True):
        save_source(model, tokenizer, directory)
    return directories, batches, [discriminator, generator]


def test_an_electra_release_starts_at_its_own_loss_generator_included(workdir):
    """Discriminator and generator from their own directories (the generator found beside the discriminator): the
    first loss is ElectraForMaskedLM's + 50 x ElectraForPreTraining's on the same masks and replacements."""
    from objectives import ReplacedTokenDetection
    from objectives.base import corrupt_batch

    parity = parity_module()
    (discriminator, generator), batches, models = electra_release(workdir)
    module = PretrainingModule(objectives=[ReplacedTokenDetection()], init_from=str(discriminator),
                               tokenizer=str(discriminator))
    report = "\n".join(module.init_report)
    assert "heads rtd loaded" in report and f"init_generator_from {generator}: the generator (" in report
    assert "its head mlm loaded" in report and "not used" not in report  # its embeddings are the discriminator's
    electra = module.objectives[0]
    assert electra.generator.config.hidden_size == module.backbone.config.hidden_size // 4
    assert electra.generator.embeddings.word is module.backbone.embeddings.word
    seed = (torch.device("cpu"), 0, 0, 0)
    ours, _ = module(batches[0], module.corruption_generator(*seed))
    replaced = corrupt_batch(list(module.objectives), batches[0], module.corruption_generator(*seed))["input_ids"]
    theirs, _ = parity.reference_loss([m.train() for m in models], list(module.objectives), batches[0],
                                      module.corruption_generator(*seed), replaced)
    ours, theirs = float(ours.detach()), float(theirs.detach())
    assert abs(ours - theirs) <= 1e-5 * abs(theirs), (ours, theirs)


def test_an_electra_generator_that_does_not_fit_is_refused_or_said(workdir, tmp_path):
    from objectives import ReplacedTokenDetection

    (discriminator, generator), _, _ = electra_release(workdir)
    with pytest.raises(UserError, match=r"generator_size 0.5 contradicts model.init_generator_from .*\(a generator "
                                        r"0.25 of the discriminator's width\): leave generator_size out"):
        PretrainingModule(objectives=[ReplacedTokenDetection(generator_size=0.5)], init_from=str(discriminator),
                          init_generator_from=str(generator), tokenizer=str(discriminator))
    # the generator found beside the discriminator, not asked for, that does not fit the recipe: fresh, and said
    module = PretrainingModule(objectives=[ReplacedTokenDetection(generator_size=0.5)], init_from=str(discriminator),
                               tokenizer=str(discriminator))
    report = "\n".join(module.init_report)
    assert f"not used: {generator}, found beside it (ReplacedTokenDetection's generator_size 0.5" in report
    assert "new (fresh weights): ELECTRA's generator" in report
    assert module.objectives[0].generator.config.hidden_size == module.backbone.config.hidden_size // 2
    with pytest.raises(UserError, match="model.init_generator_from is ELECTRA's generator: this recipe has no "
                                        "ReplacedTokenDetection"):
        PretrainingModule(objectives=[MaskedLM()], init_from=str(discriminator), init_generator_from=str(generator),
                          tokenizer=str(discriminator))
    import transformers

    config = transformers.AutoConfig.from_pretrained(generator)
    config.num_hidden_layers = 1
    save_source(transformers.ElectraForMaskedLM(config), generator / "tokenizer.json", tmp_path / "shallow")
    with pytest.raises(UserError, match=r"is not a generator of the discriminator: num_layers 1 \(a generator of "
                                        r"this discriminator: 2\)"):
        PretrainingModule(objectives=[ReplacedTokenDetection()], init_from=str(discriminator),
                          init_generator_from=str(tmp_path / "shallow"), tokenizer=str(discriminator))
    # the discriminator as its own generator (a generator as wide as it, as in the electra-small release): fine,
    # and the discriminator head it has is said not to be used
    module = PretrainingModule(objectives=[ReplacedTokenDetection()], init_from=str(discriminator),
                               init_generator_from=str(discriminator), tokenizer=str(discriminator))
    assert module.objectives[0].generator.config.hidden_size == module.backbone.config.hidden_size
    assert "not used: the generator source's heads rtd" in "\n".join(module.init_report)
    # a generator whose own embeddings differ from the discriminator's: the discriminator's are used, and it is said
    model = transformers.ElectraForMaskedLM.from_pretrained(generator)
    with torch.no_grad():
        model.electra.embeddings.LayerNorm.weight.add_(1.0)
    save_source(model, generator / "tokenizer.json", tmp_path / "other")
    module = PretrainingModule(objectives=[ReplacedTokenDetection()], init_from=str(discriminator),
                               init_generator_from=str(tmp_path / "other"), tokenizer=str(discriminator))
    assert "not used: the generator source's own embeddings.norm.weight" in "\n".join(module.init_report)
    # a discriminator alone: the generator starts fresh, and that is said
    alone = tmp_path / "alone"
    shutil.copytree(discriminator, alone)
    module = PretrainingModule(objectives=[ReplacedTokenDetection()], init_from=str(alone), tokenizer=str(alone))
    assert "new (fresh weights): ELECTRA's generator" in "\n".join(module.init_report)
