"""Does continuing a model's pretraining on the task's domain pay (domain-adaptive pretraining, Gururangan et al.
2020)? No released model is on this machine (the model hubs are out of reach), so the "released" model is made
here the way releases are made: a RoBERTa-style encoder (the objectives comparison's size: hidden 256, 4 layers)
pretrained with whole-word MLM on general text (WikiText-2) with its own tokenizer, then exported as a Hugging Face
directory. That directory is continued with `pretrain fit -c configs/continue-mlm.yaml --model.init_from DIR` on
IMDB's 50,000 unlabelled reviews for a fixed number of steps, and both models are fine-tuned on IMDB with 1,000
labels exactly as `benchmarks/objectives_compared.py` fine-tunes its arms (mean pooling, 3 epochs, the last
epoch's model scored on 5,000 test reviews), three seeds each.

    python benchmarks/continued_pretraining.py                  # about 1 h 40 min on 2 cores
    python benchmarks/continued_pretraining.py --control        # also: the same steps continued on WikiText-2
    python benchmarks/continued_pretraining.py --smoke --out runs/smoke-dapt   # a minute: tiny sizes and data

`--control` separates the domain from the extra steps: the source continued for the same steps on its own corpus.
Everything is cached in OUT (a finished run or fine-tuning is read back). Needs ../shared/data (WikiText-2, IMDB).
Writes OUT/continued_pretraining.json (and, for the full run, benchmarks/results/continued_pretraining.json) and
prints the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from objectives_compared import (  # noqa: E402  (the comparison's recipe, tasks and fine-tuning, unchanged)
    DATA,
    fine_tune,
    logged,
    over_seeds,
    prepare_tasks,
    recipe,
    write_jsonl,
    write_summary,
)

ROOT = Path(__file__).resolve().parents[1]


def run_fit(args: list[str], what: str) -> None:
    from pretrain.cli import main

    if main(["fit", *args]) != 0:
        raise SystemExit(f"{what} failed: pretrain fit {' '.join(args)}")


def summary_of(run: Path, steps: int) -> dict:
    """Steps, tokens, minutes (from the logged tokens/s) and the MLM loss over the last 10 % of the logged steps."""
    from objectives_compared import last_values

    rows = logged(run)
    rates = [float(r["train/tokens_per_sec"]) for r in rows if r.get("train/tokens_per_sec")]
    tokens = steps * 32 * 128
    return {"steps": steps, "tokens": tokens, "minutes": round(tokens / (sum(rates) / len(rates)) / 60, 1) if rates
            else None, "final_mlm_loss": last_values(rows, "train/mlm_loss")}


def pretrain_source(out: Path, sizes: dict, vocabulary: int, corpus: Path, steps: int) -> tuple[Path, dict]:
    """The stand-in for a released model: pretrained on general text, exported as a Hugging Face directory."""
    from pretrain.cli import main
    from pretrain.data.tokenizer import load_tokenizer, train_tokenizer_on_files

    run, exported = out / "source", out / "source-hf"
    if (out / "source.json").is_file() and exported.is_dir():
        return exported, json.loads((out / "source.json").read_text())
    tokenizer = out / "tokenizer" / "tokenizer.json"
    if not tokenizer.is_file():
        train_tokenizer_on_files([corpus], "bpe", vocabulary, tokenizer, clean=True)
    sizes = sizes | dict(vocab_size=load_tokenizer(tokenizer).get_vocab_size(), max_position_embeddings=256)
    settings = recipe("roberta", sizes, tokenizer, corpus, steps, run, learning_rate=5e-4, warmup_ratio=0.1)
    path = out / "recipes" / "source.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(settings))
    run_fit(["-c", str(path)], "pretraining the source")
    if main(["export", str(run / "checkpoints" / "last.ckpt"), str(exported), "--format", "hf"]) != 0:
        raise SystemExit("exporting the source failed")
    summary = summary_of(run, steps) | {"corpus": corpus.name}
    write_summary(out / "source.json", summary)
    return exported, summary


def continue_source(out: Path, name: str, source: Path, corpus: Path, steps: int) -> tuple[Path, dict]:
    """The user's command: configs/continue-mlm.yaml from the exported source, `steps` steps on `corpus`."""
    run = out / name
    if (out / f"{name}.json").is_file():
        return run / "checkpoints" / "last.ckpt", json.loads((out / f"{name}.json").read_text())
    run_fit(["-c", str(ROOT / "configs" / "continue-mlm.yaml"), "--model.init_from", str(source),
             "--data.files", f"[{corpus}]", "--data.clean", "true", "--data.max_length", "128",
             "--data.cache_dir", str(out / "cache"), "--trainer.max_steps", str(steps),
             "--trainer.log_every_n_steps", "10", "--trainer.limit_val_batches", "0",
             "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(run)], f"continuing ({name})")
    summary = summary_of(run, steps) | {"corpus": corpus.name}
    write_summary(out / f"{name}.json", summary)
    return run / "checkpoints" / "last.ckpt", summary


def table(results: dict) -> str:
    lines = [f"{'model':<42}{'pretraining':<64}{'IMDB-1k dev med [min, max]':<28}{'train':>6}"]
    for name, entry in results["models"].items():
        steps = " + ".join(f"{p['steps']} steps on {p['corpus']}" for p in entry["pretraining"])
        e = entry["imdb_1k"]
        lines.append(f"{name:<42}{steps:<64}{e['median']:6.2f} [{e['min']:.2f}, {e['max']:.2f}]".ljust(134)
                     + f"{e['train']['median']:6.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/continued_pretraining"))
    parser.add_argument("--source-steps", type=int, default=500, help="the source's pretraining on WikiText-2")
    parser.add_argument("--continue-steps", type=int, default=500, help="continued pretraining on IMDB's reviews")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--control", action="store_true", help="also continue as long on WikiText-2 (the source's)")
    parser.add_argument("--finetune-learning-rate", type=float, nargs="+", default=[1e-3],
                        help="fine-tuning's peak, each in turn (1e-3: the objectives comparison's, where a model "
                             "from scratch fits its 1,000 reviews)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and data: checks the script in a minute")
    args = parser.parse_args()
    out, smoke = args.out, args.smoke
    out.mkdir(parents=True, exist_ok=True)
    general, domain = DATA / "wikitext-2" / "wiki.train.tokens", DATA / "imdb" / "unsup.jsonl"
    if smoke:  # slivers stand for the corpora
        general = out / "general.txt"
        general.write_text("".join(line for _, line in zip(range(2000), (DATA / "wikitext-2" / "wiki.train.tokens")
                                                                  .open(), strict=False)))
        domain = write_jsonl(out / "unsup_sample.jsonl", [json.loads(line) for _, line in
                                                          zip(range(300), domain.open(), strict=False)])
    sizes = (dict(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128) if smoke else
             dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024))
    steps = (20, 20) if smoke else (args.source_steps, args.continue_steps)
    source, source_summary = pretrain_source(out, sizes, 2000 if smoke else 16000, general, steps[0])
    models = {"source (general)": (source, [source_summary])}
    continued, summary = continue_source(out, "continued", source, domain, steps[1])
    models["continued on IMDB"] = (continued, [source_summary, summary])
    if args.control:
        control, summary = continue_source(out, "control", source, general, steps[1])
        models["continued on WikiText"] = (control, [source_summary, summary])
    train, dev, length = prepare_tasks(out, 200 if smoke else 1000, 100 if smoke else 5000, 300 if smoke else 5000)[
        "imdb_1k"]
    seeds = [int(seed) for seed in args.seeds.split(",")]
    results = {"machine": f"{platform.machine()}, torch threads {__import__('torch').get_num_threads()}",
               "models": {}}
    for rate in args.finetune_learning_rate:
        for name, (path, pretraining) in models.items():
            arm = "source" if name.startswith("source") else name.split()[-1].lower()
            arm = f"dapt-{arm}" + ("" if rate == 1e-3 else f"-lr{rate:g}")
            runs = [fine_tune(arm, path, "imdb_1k", (train, dev, length), seed, out, 1 if smoke else 3, False, rate)
                    for seed in seeds]
            label = name if len(args.finetune_learning_rate) == 1 else f"{name}, fine-tuned at {rate:g}"
            results["models"][label] = {"pretraining": pretraining, "imdb_1k": over_seeds(runs),
                                        "finetune_learning_rate": rate}
    (out / "continued_pretraining.json").write_text(json.dumps(results, indent=2) + "\n")
    if not smoke:
        target = Path(__file__).resolve().parent / "results" / "continued_pretraining.json"
        target.parent.mkdir(exist_ok=True)
        target.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"written: {out / 'continued_pretraining.json'}")


if __name__ == "__main__":
    main()
