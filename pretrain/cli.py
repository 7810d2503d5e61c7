"""The `pretrain` command."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from pretrain import __version__
from pretrain.downstream.tasks import GLUE
from pretrain.errors import UserError, unknown_options
from pretrain.training.cli import LIGHTNING_COMMANDS, lightning_cli, quiet_lightning


class ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, where it has one worth showing (not None, not a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="pretrain", description=__doc__)
    root.add_argument("--version", action="version", version=f"pretrain {__version__}")
    root.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    commands = root.add_subparsers(dest="command", required=True)
    tokenizer = commands.add_parser("tokenizer", help="train a tokenizer").add_subparsers(dest="action", required=True)
    train = tokenizer.add_parser("train", help="train WordPiece, byte-level BPE or Unigram on a corpus")
    train.add_argument("--corpus", nargs="+", required=True, help="files, globs or directories (text, JSONL, ...)")
    train.add_argument("--kind", choices=["wordpiece", "bpe", "unigram"], required=True,
                       help="WordPiece (BERT), byte-level BPE (GPT-2, RoBERTa) or Unigram (ALBERT)")
    train.add_argument("--vocab-size", type=int, required=True,
                       help="tokens wanted (a small corpus may yield fewer: the command says so)")
    train.add_argument("--out", type=Path, required=True, help="directory for tokenizer.json (must not hold one)")
    train.add_argument("--text-field", default="text", help="the text column of JSONL, CSV or Parquet files")
    train.add_argument("--documents-by", choices=["paragraph", "line"], default="paragraph",
                       help="a document ends at a blank line, or at every line")
    train.add_argument("--clean", action="store_true", help="turn HTML <br /> tags into newlines, unescape entities")
    train.add_argument("--cased", action="store_true", help="keep case (WordPiece and Unigram lowercase by default)")
    export = commands.add_parser("export", help="write a checkpoint's model and tokenizer as a portable directory")
    export.add_argument("checkpoint", type=Path, help="a checkpoint of pretrain fit, a file or a sharded one's "
                        "directory (e.g. RUN/checkpoints/last.ckpt)")
    export.add_argument("out", type=Path, help="a new directory")
    export.add_argument("--format", choices=["native", "hf"], default="native",
                        help="native: model.safetensors + config.json + tokenizer.json, read by pretrain.load; "
                             "hf: a Hugging Face transformers directory (BERT, RoBERTa, ALBERT, ELECTRA, GPT-2, "
                             "ModernBERT or Llama, by the model)")
    export.add_argument("--hf-family", choices=["bert", "roberta"], default=None,
                        help="hf: write an encoder as this family (default: as its config and heads imply; RoBERTa "
                             "needs the tokenizer's pad id to be 1)")
    gen = commands.add_parser("generate", help="continue prompts with a causal model (greedy, sampling or beam)")
    gen.add_argument("model", type=Path, help="a .ckpt, an exported directory or a Hugging Face GPT-2 directory")
    gen.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    gen.add_argument("--strategy", choices=["greedy", "sample", "beam"], default="greedy",
                     help="how the next token is chosen")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to add to each prompt")
    gen.add_argument("--temperature", type=float, default=1.0, help="sample: < 1 sharper, > 1 flatter")
    gen.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens only")
    gen.add_argument("--top-p", type=float, default=None, help="sample from the smallest set with this probability")
    gen.add_argument("--num-beams", type=int, default=4, help="beam: hypotheses kept at each step")
    gen.add_argument("--length-penalty", type=float, default=1.0, help="beam: score = log-prob / length ** this")
    gen.add_argument("--seed", type=int, default=0, help="sample: the random draws")
    evaluate = commands.add_parser("evaluate-lm", help="token-level perplexity of a causal model on a text file")
    evaluate.add_argument("model", type=Path, help="a .ckpt, an exported directory or a Hugging Face GPT-2 directory")
    evaluate.add_argument("--data", type=Path, required=True, help="a UTF-8 text file, scored as one sequence")
    evaluate.add_argument("--window", type=int, default=None, help="context per scored token (default: the model's)")
    evaluate.add_argument("--stride", type=int, default=None, help="tokens scored per window (default: window / 2)")
    plot = commands.add_parser("plot", help="draw a run's loss curves (one panel per objective) as a PNG")
    plot.add_argument("run_dir", type=Path, help="the run directory of pretrain fit (trainer.default_root_dir)")
    plot.add_argument("-o", "--out", type=Path, default=None, help="the PNG to write (default: RUN_DIR/curves.png)")
    tune = commands.add_parser("finetune", help="fine-tune a pretrained model on a GLUE task or your own data "
                                                 "(encoders on [CLS]; causal models as GPT-1)")
    tune.add_argument("--model", type=Path, required=True, help="a .ckpt, an exported or a Hugging Face directory")
    add_task_options(tune)
    tune.add_argument("--regression", action="store_true", help="the labels are numbers to predict (MSE loss)")
    tune.add_argument("--symmetric", action="store_true",
                      help="the pair's order carries no meaning: causal models read both orders (GPT-1's similarity)")
    add_finetune_options(tune)
    shot = commands.add_parser("zero-shot", help="score a causal LM's label words after a prompt, zero- or few-shot "
                                                 "(GPT-2, GPT-3): no training")
    shot.add_argument("--model", type=Path, required=True, help="a causal .ckpt, exported or Hugging Face directory")
    add_task_options(shot)
    shot.add_argument("--template", required=True,
                      help=r"the prompt, with {text} (and {pair}); \n is a newline, e.g. 'Review: {text}\nSentiment:'")
    shot.add_argument("--labels", required=True,
                      help="comma-separated label words, in the order of the task's labels (SST-2: 0, 1), spaces "
                           "kept, e.g. ' negative, positive'")
    shot.add_argument("--shots", type=int, default=0, help="labelled training examples put before each scored one")
    shot.add_argument("--seed", type=int, default=0, help="the draw of the shots (balanced over the labels)")
    shot.add_argument("--separator", default="\\n\\n", help="between the examples of a few-shot prompt")
    shot.add_argument("--normalize", action="store_true",
                      help="score a label word by its mean log-probability per token (default: the sum)")
    shot.add_argument("--calibrate", action="store_true",
                      help="subtract each label's score after the same prompt around 'N/A' (Zhao et al. 2021): "
                           "removes the model's bias towards a label word")
    shot.add_argument("--limit", type=int, default=None, help="score only the first N dev examples")
    shot.add_argument("--batch-size", type=int, default=16, help="prompts scored at once")
    shot.add_argument("--out", type=Path, default=None, help="also write the results as JSON to this file")
    glue = commands.add_parser("glue", help="fine-tune on every GLUE task found in a directory; scores and average")
    glue.add_argument("--model", type=Path, required=True, help="a .ckpt, an exported or a Hugging Face directory")
    glue.add_argument("--data-dir", type=Path, required=True, help="the GLUE directory (holding SST-2/, CoLA/, ...)")
    glue.add_argument("--tasks", default=None, help="a comma-separated subset, e.g. sst2,cola (default: all found)")
    add_finetune_options(glue)
    for command in [*commands.choices.values(), *tokenizer.choices.values()]:
        command.formatter_class = ShowDefaults
    for name in LIGHTNING_COMMANDS:  # listed here for --help; main() hands them to LightningCLI
        commands.add_parser(name, help=f"{name} a YAML recipe: pretrain {name} -c configs/tiny/bert.yaml "
                                       f"(all options: pretrain {name} --help)")
    return root


def add_task_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--task", help=f"a GLUE task ({', '.join(GLUE)}) read from --data-dir, or a name for "
                                        "your own --train/--dev data")
    command.add_argument("--data-dir", type=Path, help="the GLUE directory (holding SST-2/, CoLA/, ...)")
    command.add_argument("--train", type=Path, help="your own training file: CSV, TSV or JSONL with a header")
    command.add_argument("--dev", type=Path, help="your own dev file, same columns")
    command.add_argument("--text-column", default="text", help="the text of your own files (a header name)")
    command.add_argument("--pair-column", default=None, help="the second text of sentence-pair tasks")
    command.add_argument("--label-column", default="label", help="the label of your own files")


def task_and_files(args: argparse.Namespace, need_train: bool = True):
    """The task and its (train, dev) files from --task/--data-dir or --train/--dev; train may be None when not
    needed."""
    from pretrain.downstream.tasks import Task, glue_task

    if args.train or args.dev:
        if not args.dev or (need_train and not args.train):
            raise UserError("give both --train and --dev for your own task" if need_train else
                            "give --dev (the examples to score) for your own task")
        regression = getattr(args, "regression", False)
        task = Task(args.task or args.dev.stem, text=args.text_column, pair=args.pair_column,
                    label=args.label_column, regression=regression, symmetric=getattr(args, "symmetric", False),
                    metrics=("pearson", "spearman") if regression else ("accuracy",))
        return task, args.train, args.dev
    if args.task and args.data_dir:
        task = glue_task(args.task)
        return task, *(args.data_dir / task.directory / name for name in (task.train_file, task.dev_file))
    raise UserError("give --task NAME --data-dir GLUE_DIR for a GLUE task, or --train and --dev files")


def add_finetune_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--out", type=Path, required=True, help="a new directory for models, logs and results")
    command.add_argument("--seeds", default="1", help="comma-separated seeds, e.g. 1,2,3: median and spread")
    command.add_argument("--epochs", type=int, default=3, help="passes over the training set")
    command.add_argument("--learning-rate", type=float, default=1e-4, help="AdamW's peak learning rate")
    command.add_argument("--batch-size", type=int, default=32, help="examples per step")
    command.add_argument("--max-length", type=int, default=128, help="tokens per example (longer ones are cut)")
    command.add_argument("--weight-decay", type=float, default=0.01, help="AdamW's decoupled weight decay")
    command.add_argument("--warmup-ratio", type=float, default=0.1,
                         help="share of the steps with a linear warm-up (then linear decay to 0)")
    command.add_argument("--from-scratch", action="store_true",
                         help="random weights of the same architecture and tokenizer (the baseline)")
    command.add_argument("--lm-weight", type=float, default=0.5,
                         help="causal models: weight of the auxiliary language-model loss (GPT-1: 0.5; 0: off)")
    command.add_argument("--last-epoch-only", action="store_true",
                         help="evaluate on dev after the last epoch only and keep that model (not the best epoch's)")
    command.add_argument("--pooling", choices=("cls", "mean"), default="cls",
                         help="an encoder's read-out: [CLS] through BERT's pooler (default), or the mean of the "
                              "real tokens' states (fits where [CLS] has learnt nothing yet: random weights, a short "
                              "pretraining)")
    command.add_argument("--score-train", action="store_true",
                         help="also score the training set with the kept model (a model near chance on its own "
                              "training data underfits: more epochs or a higher learning rate)")


def finetune_settings(args: argparse.Namespace):
    from pretrain.downstream.export import check_new_directory
    from pretrain.downstream.finetune import Settings

    try:
        seeds = [int(seed) for seed in args.seeds.split(",")]
    except ValueError:
        raise UserError(f"--seeds takes comma-separated integers, e.g. 1,2,3; got {args.seeds!r}") from None
    if args.epochs < 1 or args.batch_size < 1 or args.learning_rate <= 0:
        raise UserError("--epochs and --batch-size must be at least 1 and --learning-rate positive")
    if args.max_length < 4 or not args.lm_weight >= 0:
        raise UserError("--max-length must be at least 4 and --lm-weight at least 0")
    check_new_directory(args.out)  # (made once the data are read: a refused run leaves nothing behind)
    return seeds, Settings(args.epochs, args.learning_rate, args.batch_size, args.max_length, args.weight_decay,
                           args.warmup_ratio, args.from_scratch, args.lm_weight, args.last_epoch_only,
                           args.score_train, args.pooling)


def finetune_command(args: argparse.Namespace) -> None:
    from pretrain.downstream.finetune import finetune, table

    task, train, dev = task_and_files(args)
    seeds, settings = finetune_settings(args)
    results = finetune(args.model, task, train, dev, args.out, seeds, settings)
    print(table([(task.name, results["summary"])], {task.name: task.metrics}))
    print(f"results: {args.out / 'results.json'}; best model of each seed: {args.out}/seed-N/model")


def zero_shot_command(args: argparse.Namespace) -> None:
    import json

    import pretrain
    from pretrain.downstream.tasks import label_ids, read_examples
    from pretrain.downstream.zeroshot import Prompting, evaluate, report, unescape

    task, train_path, dev_path = task_and_files(args, need_train=False)
    if args.shots < 0 or args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise UserError("--shots must be at least 0, --batch-size and --limit at least 1")
    if args.shots and train_path is None:
        raise UserError("few-shot prompts draw from labelled training examples: give --train")
    if args.out is not None and args.out.exists():
        raise UserError(f"--out {args.out} already exists: choose a new file (nothing is overwritten)")
    settings = Prompting(unescape(args.template), [unescape(w) for w in args.labels.split(",")], args.shots,
                         args.seed, unescape(args.separator), args.normalize, args.calibrate, args.batch_size)
    dev = read_examples(task, dev_path)
    train = read_examples(task, train_path) if args.shots else None
    labels = task.labels or tuple(sorted(set(dev.labels) | set(train.labels if train else [])))
    if len(settings.label_words) != len(labels):
        raise UserError(f"--labels gives {len(settings.label_words)} words for the task's {len(labels)} labels "
                        f"{list(labels)}: give one per label, in that order, comma-separated")
    if args.limit is not None:
        dev.texts, dev.labels = dev.texts[:args.limit], dev.labels[:args.limit]
        dev.pairs = dev.pairs[:args.limit] if dev.pairs is not None else None
    model = pretrain.load(args.model)
    results = evaluate(model, task, dev, label_ids(task, dev.labels, labels, dev_path), settings, train,
                       label_ids(task, train.labels, labels, train_path).tolist() if train else ())
    results["model"] = str(args.model)
    print(report(results, labels))
    if args.out is not None:
        from pretrain.training.checkpoints import write_atomically

        write_atomically(args.out, lambda file: file.write((json.dumps(results, indent=2) + "\n").encode()))
        print(f"results: {args.out}")


def glue_command(args: argparse.Namespace) -> None:
    import json

    from pretrain.downstream.finetune import finetune, table
    from pretrain.downstream.tasks import glue_task

    wanted = [glue_task(name) for name in args.tasks.split(",")] if args.tasks else list(GLUE.values())
    found = [t for t in wanted if (args.data_dir / t.directory / t.train_file).is_file()
             and (args.data_dir / t.directory / t.dev_file).is_file()]
    if not found:
        raise UserError(f"no GLUE task with both train and dev files under {args.data_dir} (expected e.g. "
                        f"{args.data_dir / 'SST-2' / 'train.tsv'})")
    seeds, settings = finetune_settings(args)
    summaries = []
    for task in found:
        directory = args.data_dir / task.directory
        results = finetune(args.model, task, directory / task.train_file, directory / task.dev_file,
                           args.out / task.name, seeds, settings)
        summaries.append((task.name, results["summary"]))
    average = sum(summary["score"]["median"] for _, summary in summaries) / len(summaries)
    report = table(summaries, {t.name: t.metrics for t in found}) + f"\naverage score over {len(found)} tasks: " \
        f"{average:.2f}"
    skipped = [t.name for t in wanted if t not in found]
    if skipped:
        report += f" (not found: {', '.join(skipped)})"
    (args.out / "glue.json").write_text(json.dumps({"tasks": dict(summaries), "average": average,
                                                    "skipped": skipped}, indent=2) + "\n")
    print(report)


def train_tokenizer_command(args: argparse.Namespace) -> None:
    from pretrain.data.tokenizer import size_note, special_ids, train_tokenizer_on_files

    target = args.out / "tokenizer.json"
    tokenizer, documents = train_tokenizer_on_files(args.corpus, args.kind, args.vocab_size, target, args.text_field,
                                                    args.documents_by, args.clean, lowercase=not args.cased)
    print(f"saved {target}: {args.kind}, {tokenizer.get_vocab_size():,} tokens{size_note(tokenizer, args.vocab_size)}, "
          f"trained on {documents:,} documents; special ids {special_ids(tokenizer)}")


def generate_command(args: argparse.Namespace) -> None:
    import pretrain
    from pretrain.downstream.generate import Settings

    try:
        Settings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                 top_p=args.top_p, num_beams=args.num_beams, length_penalty=args.length_penalty)
    except UserError as error:  # the option names as the command spells them
        raise UserError(re.sub(r"\b(max_new_tokens|temperature|top_k|top_p|num_beams|length_penalty)\b",
                               lambda m: "--" + m.group(1).replace("_", "-"), str(error))) from None
    model = pretrain.load(args.model)
    room = model.room(args.prompt)
    if room < 1:
        raise UserError(f"a prompt fills all {model.config.max_position_embeddings} positions of the model: shorten it")
    if args.max_new_tokens > room:
        print(f"note: generating {room} new tokens, not {args.max_new_tokens}: prompt and continuation must fit the "
              f"model's {model.config.max_position_embeddings} positions", file=sys.stderr)
    texts = model.generate(args.prompt, args.strategy, seed=args.seed, max_new_tokens=min(args.max_new_tokens, room),
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           num_beams=args.num_beams, length_penalty=args.length_penalty, with_reasons=True)
    for prompt, (text, reason) in zip(args.prompt, texts, strict=True):
        print(f"{prompt}{'' if prompt.endswith(' ') else ' '}{text}" if len(args.prompt) == 1 else
              f"--- {prompt}\n{text}", flush=True)
        print(f"({reason})", file=sys.stderr, flush=True)  # (stdout: the text alone)


def evaluate_command(args: argparse.Namespace) -> None:
    import pretrain

    if not args.data.is_file():
        raise UserError(f"--data {args.data} does not exist")
    model = pretrain.load(args.model)
    positions = model.config.max_position_embeddings
    if args.window is not None and not 2 <= args.window <= positions:
        raise UserError(f"--window {args.window} does not fit the model's {positions} positions: give 2 to {positions} "
                        "(or leave it out)")
    window = args.window or positions
    print(f"scoring {args.data} with {args.model}: windows of {window} tokens, "
          f"{args.stride or max(1, window // 2)} scored in each", flush=True)
    value, tokens = model.perplexity(args.data.read_text(encoding="utf-8", errors="replace"), args.window,
                                     args.stride)
    print(f"perplexity {value:.3f} over {tokens:,} tokens of {args.data}")


def parse(root: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """The command line, with no abbreviated option taken for another (--max-len is not --max-length), and an
    unknown option reported by its own subcommand (its usage, not the top level's) with the nearest known option."""
    parsers = [root]
    for word in argv:  # the (sub)subcommand the words name
        actions = [a for a in parsers[-1]._actions if isinstance(a, argparse._SubParsersAction)]
        if actions and word in actions[0].choices:
            parsers.append(actions[0].choices[word])
    for each in parsers:
        each.allow_abbrev = False
    args, unknown = root.parse_known_args(argv)
    if unknown:
        known = [o for action in parsers[-1]._actions for o in action.option_strings if o.startswith("--")]
        parsers[-1].error(unknown_options(f"unrecognized arguments: {' '.join(unknown)}", known, parsers[-1].prog))
    return args


def interrupted(cli, argv: list[str]) -> int:
    """0 for a run that ended as planned; for one a signal ended (`Checkpoints.interrupted`), what was saved and how
    to go on, and 128 + the signal's number (the shell's convention: 130 for Ctrl-C, 143 for SIGTERM)."""
    import shlex
    import signal

    from pretrain.training.checkpoints import Checkpoints

    trainer = getattr(cli, "trainer", None)
    found = [c for c in getattr(trainer, "callbacks", []) if isinstance(c, Checkpoints)]
    if not found or found[0].interrupted is None:
        return 0
    name, step = found[0].interrupted
    if trainer.is_global_zero:
        kept = [a for i, a in enumerate(argv)
                if not (a.startswith("--ckpt_path") or i and argv[i - 1] == "--ckpt_path")]
        print(f"interrupted ({name}) at step {step}: saved {found[0].last}; resume with: pretrain "
              f"{shlex.join([*kept, '--ckpt_path', 'last'])}", file=sys.stderr, flush=True)
    return 128 + getattr(signal, name, signal.SIGTERM)


def said_in_one_line(error: Exception) -> bool:
    """Bad input (`UserError`, or a `ConfigError` of a model, objective or optimizer) and what the machine refused
    (an `OSError`: a file unreadable, a disk full) are said in one line; anything else is a bug of ours and keeps
    its traceback."""
    if isinstance(error, (UserError, OSError)):
        return True
    from models.config import ConfigError  # (here: `pretrain --help` imports no torch)

    return isinstance(error, ConfigError)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rest = [a for a in argv if a != "--debug"]
    if rest and rest[0] in LIGHTNING_COMMANDS:
        debug = len(rest) < len(argv)
        try:
            cli = lightning_cli(rest)
        except Exception as error:
            if debug or not said_in_one_line(error):
                raise
            print(f"error: {error}", file=sys.stderr)
            return 2
        return interrupted(cli, rest)

    args = parse(parser(), argv)
    try:
        with quiet_lightning():  # (Lightning's own deprecation warnings are not the user's business)
            run_command(args)
    except Exception as error:
        if args.debug or not said_in_one_line(error):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def run_command(args: argparse.Namespace) -> None:
    if args.command == "tokenizer":
        train_tokenizer_command(args)
    elif args.command == "finetune":
        finetune_command(args)
    elif args.command == "glue":
        glue_command(args)
    elif args.command == "zero-shot":
        zero_shot_command(args)
    elif args.command == "generate":
        generate_command(args)
    elif args.command == "evaluate-lm":
        evaluate_command(args)
    elif args.command == "plot":
        from pretrain.training.plot import plot

        out = args.out or args.run_dir / "curves.png"  # beside the run, not wherever the command is typed
        print(f"wrote {out}: loss curves of {', '.join(plot(args.run_dir, out))}")
    elif args.command == "export":
        from pretrain.downstream.export import export

        written = export(args.checkpoint, args.out, args.format, args.hf_family)
        print(f"exported {args.checkpoint} to {written} ({args.format})")


if __name__ == "__main__":
    sys.exit(main())
