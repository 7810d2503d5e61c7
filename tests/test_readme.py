"""Every `pretrain` command in the README parses as written (the quickstart and the tiny recipes also run in
test_cli): a misspelt option or a value of the wrong type in the documentation fails here."""

import shlex
from pathlib import Path

import pytest

from pretrain.cli import parser
from pretrain.training.cli import LIGHTNING_COMMANDS, lightning_cli

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[str]:
    """The `pretrain ...` command lines of the README's bash blocks (also those after `&&`), comments removed."""
    commands, in_bash = [], False
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            in_bash = line.strip() == "```bash"
            continue
        if in_bash:
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words and words[0] == "pretrain":
                    commands.append(shlex.join(words))
    return commands


def test_the_readme_has_commands_for_every_subcommand():
    used = {shlex.split(command)[1] for command in readme_commands()}
    assert {"fit", "generate", "export", "plot", "evaluate-lm", "finetune", "glue", "tokenizer", "zero-shot"} <= used


@pytest.mark.parametrize("command", readme_commands())
def test_every_readme_command_parses(command, tmp_path, monkeypatch):
    monkeypatch.chdir(README.parent)  # the README's paths are relative to the repository root
    words = shlex.split(command)[1:]
    if "--print_config" in words:  # prints the resolved recipe and exits 0
        with pytest.raises(SystemExit) as exited:
            lightning_cli(words, parse_only=True)
        assert exited.value.code in (0, None)
    elif words[0] in LIGHTNING_COMMANDS:
        config = lightning_cli(words, parse_only=True)
        assert config[words[0]].model.backbone.vocab_size > 0
    else:
        parser().parse_args(words)  # argparse exits (code 2) on an unknown option or a bad value
