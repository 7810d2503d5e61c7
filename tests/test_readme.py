"""Every `pretrain` command in the README parses as written (the quickstart and the tiny recipes also run in
test_cli): a misspelt option or a value of the wrong type in the documentation fails here."""

import shlex
from pathlib import Path

import pytest

from pretrain.cli import parser
from pretrain.training.cli import LIGHTNING_COMMANDS, lightning_cli

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[str]:
    """The `pretrain ...` command lines of the README's bash blocks (also those after `&&`, and lines continued with
    a backslash), comments removed."""
    commands, in_bash, continued = [], False, ""
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            in_bash = line.strip() == "```bash"
            continue
        if in_bash and line.rstrip().endswith("\\"):
            continued += line.rstrip()[:-1]
            continue
        line, continued = continued + line, ""
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
        model = lightning_cli(words, parse_only=True)[words[0]].model
        assert model.backbone.vocab_size > 0 if model.init_from is None else model.backbone is None  # (continued)
    else:
        parser().parse_args(words)  # argparse exits (code 2) on an unknown option or a bad value


# Placeholders the README marks as such, and what the walkthrough below puts in their place.
PLACEHOLDERS = {"CKPT_OR_DIR": "runs/quickstart/checkpoints/last.ckpt", "corpus/*.txt": "pretrain/sample/*.txt"}
CHEAP = ("generate", "evaluate-lm", "plot", "export", "tokenizer")


def test_the_cheap_readme_commands_run_in_a_fresh_copy_and_leave_lint_green(tmp_path, monkeypatch, capsys):
    """A new user's first hour, from a copy of what git tracks: the quickstart (shortened to a few steps), then every
    cheap README command as written (placeholders filled in); afterwards `ruff check .` still passes there (what the
    commands wrote must not look like code of the project)."""
    import subprocess
    import sys

    from pretrain.cli import main

    root = README.parent
    tracked = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout
    for name in tracked.split():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes((root / name).read_bytes())
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "-c", "configs/quickstart.yaml", "--trainer.max_steps", "4", "--model.warmup_steps", "1",
                 "--trainer.log_every_n_steps", "2",
                 "--trainer.val_check_interval",
                 "4", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false"]) == 0
    ran = []
    for command in readme_commands():
        for placeholder, value in PLACEHOLDERS.items():
            command = command.replace(placeholder, value)
        words = shlex.split(command)[1:]
        if words[0] in CHEAP:
            assert main(words) == 0, (command, capsys.readouterr().err)
            ran.append(words[0])
    assert {"generate", "evaluate-lm", "plot", "export", "tokenizer"} <= set(ran)
    lint = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=tmp_path, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout
