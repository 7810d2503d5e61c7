"""Does pretraining pay, and which objective pays most? Every arm the same backbone size, corpus, tokenizer and
compute budget (wall-clock on one machine); then the same fine-tuning on a low-resource task (IMDB with 1,000
labelled reviews) and a high-resource one (SST-2 with 5,000 sentences), three seeds each, against two from-scratch
baselines.

    python benchmarks/objectives_compared.py                      # the full comparison (hours on 2 cores)
    python benchmarks/objectives_compared.py --tasks imdb_1k      # IMDB only
    python benchmarks/objectives_compared.py --budget-minutes 3   # shorter pretraining per arm
    python benchmarks/objectives_compared.py --smoke --out runs/smoke   # minutes: tiny sizes, a few hundred rows

Arms: bert (MLM + NSP, pairs), roberta (MLM, stream, whole-word masking), electra (RTD, generator 1/4 wide),
albert (MLM + SOP, factorized E = 128, all layers shared), gpt (CLM; fine-tuned GPT-1 style), and scratch_encoder /
scratch_decoder (the roberta and gpt architectures fine-tuned from random weights). The budget is wall-clock, turned
into a number of steps per arm: a short calibration run measures the arm's seconds per step, and the arm then
trains budget / that many steps, so its schedule (warm-up over `--warmup-ratio` of the steps, then linear decay to
0, as the papers' schedules) ends where its budget does. Every arm clips gradients at 1.0. Every arm's speed
is calibrated first (keep the machine quiet for those few minutes: the step budgets come from them; later load only
makes the runs take longer), then every arm is pretrained, then fine-tuned: each arm's fine-tuning learning rate
is first chosen on its own training set (80 % fitted, 20 % scored; its family's rate or a tenth of it), then every
seed runs at that rate; the dev set (IMDB: 2,000 test reviews) is scored after the last epoch only (the model
reported is the last epoch's), and the training set too (does the model fit its own 1,000 reviews?). Everything
is cached in OUT: a run that is stopped and started again reuses every finished calibration, arm and fine-tuning
(seed by seed: every arm is fine-tuned with the first seed before any with the next). Needs
../shared/data (IMDB, GLUE). Writes OUT/objectives_compared.json (and, for the full run,
benchmarks/results/objectives_compared.json), a PNG chart, and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import random
import shutil
import statistics
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's pretrain, whatever another install on the path says
DATA = ROOT / ".." / "shared" / "data"
ARMS = ("bert", "roberta", "electra", "albert", "gpt")
SCRATCH = {"scratch_encoder": "roberta", "scratch_decoder": "gpt"}  # baseline -> the arm whose architecture it takes
TASK_NAMES = {"imdb_1k": "IMDB-1k", "sst2_5k": "SST-2-5k"}
SCRATCH_EPOCHS = 1  # the baselines fine-tune this many times the arms' epochs


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def prepare_tasks(out: Path, train_rows: int, test_rows: int, sst2_rows: int) -> dict[str, tuple[Path, Path, int]]:
    """The fixed draws (seed 0): IMDB `train_rows` balanced from train.jsonl and `test_rows` from test.jsonl; SST-2
    `sst2_rows` from its training set and its full dev set. -> task: (train file, dev file, max length)"""
    rng = random.Random(0)
    imdb = [json.loads(line) for line in (DATA / "imdb" / "train.jsonl").open()]
    by_label = {label: [r for r in imdb if r["label"] == label] for label in (0, 1)}
    train = [r for label in (0, 1) for r in rng.sample(by_label[label], train_rows // 2)]
    test = rng.sample([json.loads(line) for line in (DATA / "imdb" / "test.jsonl").open()], test_rows)
    clean = (lambda text: text.replace("<br />", " "))
    tasks = {"imdb_1k": (write_jsonl(out / "imdb_train.jsonl", [{"text": clean(r["text"]), "label": r["label"]}
                                                                for r in rng.sample(train, len(train))]),
                         write_jsonl(out / "imdb_test.jsonl", [{"text": clean(r["text"]), "label": r["label"]}
                                                               for r in test]), 256)}
    sst2 = [row for row in csv.DictReader((DATA / "glue" / "SST-2" / "train.tsv").open(), delimiter="\t")]
    dev = [row for row in csv.DictReader((DATA / "glue" / "SST-2" / "dev.tsv").open(), delimiter="\t")]
    tasks["sst2_5k"] = (write_jsonl(out / "sst2_train.jsonl", [{"text": r["sentence"], "label": int(r["label"])}
                                                               for r in rng.sample(sst2, sst2_rows)]),
                        write_jsonl(out / "sst2_dev.jsonl", [{"text": r["sentence"], "label": int(r["label"])}
                                                             for r in dev[:test_rows]]), 64)
    return tasks


def recipe(arm: str, sizes: dict, tokenizer: Path, corpus: Path, steps: int, run: Path, learning_rate: float = 5e-4,
           warmup_ratio: float = 0.1, precision: str | None = None, guard_minutes: float | None = None) -> dict:
    """The arm's `pretrain fit` recipe: one backbone size for all (ALBERT factorizes and shares it), `steps` steps
    with warm-up over `warmup_ratio` of them and linear decay to 0 at the last, clipping at 1.0; `guard_minutes`
    stops a run that takes far longer than its budget (a machine that became busy)."""
    causal = arm == "gpt"
    backbone = dict(sizes, type_vocab_size=0 if causal else 2, causal=causal, norm_position="pre" if causal else "post")
    if arm == "albert":
        backbone |= dict(embedding_size=128 if sizes["hidden_size"] > 128 else 32, sharing="all")
    objectives = {"bert": ["MaskedLM", "NextSentencePrediction"], "roberta": ["MaskedLM"],
                  "electra": ["ReplacedTokenDetection"], "albert": ["MaskedLM", "SentenceOrderPrediction"],
                  "gpt": ["CausalLM"]}[arm]
    entries = [{"class_path": f"objectives.{name}"} for name in objectives]
    if arm == "roberta":
        entries[0]["init_args"] = {"whole_word": True}
    trainer = {"max_steps": steps, "gradient_clip_val": 1.0, "log_every_n_steps": 10, "val_check_interval": 100_000,
               "limit_val_batches": 0, "enable_progress_bar": False, "default_root_dir": str(run)}
    if guard_minutes:
        seconds = int(guard_minutes * 60)
        trainer["max_time"] = f"00:{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    return {
        "model": {"backbone": backbone, "objectives": entries, "learning_rate": learning_rate,
                  "warmup_ratio": warmup_ratio, "total_steps": steps},
        "data": {"files": [str(corpus)], "clean": True, "tokenizer": str(tokenizer),
                 "layout": "pairs" if arm in ("bert", "albert") else "stream",
                 "pair_task": "sop" if arm == "albert" else "nsp", "word_starts": arm == "roberta",
                 "cls_first": not causal, "max_length": 128, "batch_size": 32, "validation_fraction": 0.005},
        "trainer": trainer | ({"precision": precision} if precision else {}),
    }


def logged(run: Path) -> list[dict]:
    """The rows of the run's CSV log (the latest version)."""
    versions = sorted((run / "logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    return list(csv.DictReader((versions[-1] / "metrics.csv").open()))


def seconds_per_step(arm: str, sizes: dict, tokenizer: Path, corpus: Path, out: Path, **settings) -> float:
    """The arm's seconds per training step on this machine: the median of the tokens/s logged over 40 steps
    (windows of 10 after the first step), read back from a finished calibration. Also builds the arm's examples
    cache, which the real run then reads."""
    run = out / "calibrate" / arm
    path = run / "seconds_per_step.json"
    if path.is_file():
        return json.loads(path.read_text())["seconds_per_step"]
    settings = recipe(arm, sizes, tokenizer, corpus, 41, run, **settings)
    settings["trainer"]["log_every_n_steps"] = 1
    settings["throughput"] = {"window": 10}
    recipe_path = out / "recipes" / f"{arm}-calibrate.yaml"
    recipe_path.parent.mkdir(parents=True, exist_ok=True)
    recipe_path.write_text(yaml.safe_dump(settings))
    from pretrain.cli import main

    if main(["fit", "-c", str(recipe_path)]) != 0:
        raise SystemExit(f"calibrating {arm} failed (recipe: {recipe_path})")
    rates = [float(r["train/tokens_per_sec"]) for r in logged(run) if r.get("train/tokens_per_sec")]
    value = 32 * 128 / statistics.median(rates)
    write_summary(path, {"seconds_per_step": value, "tokens_per_sec": rates})
    return value


def training_flops(recipe_path: Path, tokens: int) -> float:
    """`tokens` x the training FLOPs per token of the recipe's model (6 N + attention; ELECTRA's generator
    included), to 3 significant digits."""
    import objectives
    from models import TransformerConfig
    from pretrain.training.module import PretrainingModule
    from pretrain.training.speed import model_flops_per_token

    settings = yaml.safe_load(recipe_path.read_text())
    model = settings["model"]
    parts = [getattr(objectives, entry["class_path"].split(".")[-1])(**entry.get("init_args", {}))
             for entry in model["objectives"]]
    module = PretrainingModule(TransformerConfig(**model["backbone"]), parts, tokenizer=settings["data"]["tokenizer"])
    return float(f"{tokens * model_flops_per_token(module, 128):.3g}")


def write_summary(path: Path, summary: dict) -> None:
    """The arm's summary, the mark of a finished arm: written whole or not at all (a kill never leaves half)."""
    from pretrain.training.checkpoints import write_atomically

    write_atomically(path, lambda file: file.write((json.dumps(summary, indent=2) + "\n").encode()))


def last_values(rows: list[dict], key: str, share: float = 0.1) -> float | None:
    """The mean of `key` over the last `share` of the logged steps (a per-step value is noisy)."""
    values = [float(r[key]) for r in rows if r.get(key)]
    return statistics.mean(values[-max(1, int(share * len(values))):]) if values else None


def pretrain_arm(arm: str, sizes: dict, tokenizer: Path, corpus: Path, budget_minutes: float, out: Path,
                 **settings) -> dict:
    """Pretrain once (cached: a finished arm is read back): steps (the budget over the calibrated seconds per step),
    tokens, seconds, FLOPs and, over the last 10 % of the steps, each logged loss and accuracy (ELECTRA's
    discriminator on replaced and on original tokens, and its base rate)."""
    from pretrain.cli import main
    from pretrain.training.checkpoints import read_checkpoint

    run = out / "pretrain" / arm
    summary_path = run / "summary.json"
    recipe_path = out / "recipes" / f"{arm}.yaml"
    if summary_path.is_file():
        return json.loads(summary_path.read_text())
    per_step = seconds_per_step(arm, sizes, tokenizer, corpus, out, **settings)
    steps = max(20, int(budget_minutes * 60 / per_step))
    if run.exists():  # an arm stopped part-way (no summary): it starts again, its schedule set for the whole budget
        shutil.rmtree(run)
    recipe_path.parent.mkdir(parents=True, exist_ok=True)
    recipe_path.write_text(yaml.safe_dump(recipe(arm, sizes, tokenizer, corpus, steps, run, **settings,
                                                 guard_minutes=10 * budget_minutes + 5)))
    if main(["fit", "-c", str(recipe_path)]) != 0:
        raise SystemExit(f"pretraining {arm} failed (recipe: {recipe_path})")
    rows = logged(run)
    timing = [float(r["train/tokens_per_sec"]) for r in rows if r.get("train/tokens_per_sec")]
    done = read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"]  # the log has every 10th step only
    tokens = done * 32 * 128
    keys = sorted({k for r in rows for k in r if k.startswith("train/") and k.endswith(("loss", "accuracy",
                                                                                       "fraction", "similarity"))})
    final = {key.removeprefix("train/"): last_values(rows, key) for key in keys}
    summary = {"steps": done, "planned_steps": steps, "seconds_per_step_calibrated": round(per_step, 3),
               # the budget's seconds: the steps at the calibrated (quiet-machine) speed; and the run's own clock
               "tokens": tokens, "seconds": round(done * per_step, 1),
               "measured_seconds": round(tokens / statistics.median(timing), 1) if timing else None,
               "final_loss": final.get("loss"), "final": final, "flops": training_flops(recipe_path, tokens)}
    if "rtd_replaced_fraction" in final:  # saying "original" everywhere scores the replaced fraction's entropy
        p = final["rtd_replaced_fraction"]
        summary["rtd_base_rate"] = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    write_summary(summary_path, summary)
    return summary


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "seeds": values}


# fine-tuning per family, the same for an arm and its baseline: an encoder is read at the mean of its token states
# (a post-LN encoder's [CLS] states start nearly identical for every input: from scratch at 1e-4 it stays at chance),
# a decoder at its last token (GPT-1); each family at the learning rate where its baseline fits its training set
FINE_TUNING = {"encoder": {"pooling": "mean", "learning_rate": 1e-3},
               "decoder": {"pooling": "cls", "learning_rate": 3e-4}}  # "cls": a causal model's last-token head


def fine_tune(arm: str, checkpoint: Path, task: str, files: tuple[Path, Path, int], seed: int, out: Path,
              epochs: int, from_scratch: bool, learning_rate: float | None = None, name: str | None = None,
              score_train: bool = True) -> dict:
    """One seed (cached by `name`, the task's by default, and rate): dev accuracy after the last epoch, and the training
    set's accuracy with the same model (`learning_rate`: another than the family's)."""
    from pretrain.downstream.finetune import Settings, finetune
    from pretrain.downstream.tasks import Task

    family = family_settings(arm) | ({"learning_rate": learning_rate} if learning_rate else {})
    results_path = (out / "finetune" / arm / (name or task) / f"lr-{family['learning_rate']:g}" / f"seed-{seed}"
                    / "results.json")
    if results_path.is_file():
        results = json.loads(results_path.read_text())
    else:
        train, dev, length = files
        settings = Settings(epochs=epochs, batch_size=32, max_length=length, from_scratch=from_scratch,
                            last_epoch_only=True, score_train=score_train, **family)
        results = finetune(checkpoint, Task(task, text="text", label="label", labels=("0", "1")), train, dev,
                           results_path.parent, [seed], settings)
    run = results["runs"][0]
    # the last epoch's accuracy, not the best epoch's: choosing an epoch on the scored set would flatter every arm
    return {"dev": run["history"][-1]["accuracy"], "train": run.get("train", {}).get("accuracy"),
            "epochs": results["settings"]["epochs"], "learning_rate": results["settings"]["learning_rate"]}


def family_settings(arm: str) -> dict:
    return FINE_TUNING["decoder" if arm in ("gpt", "scratch_decoder") else "encoder"]


def choose_learning_rate(arm: str, checkpoint: Path, task: str, files: tuple[Path, Path, int], out: Path,
                         epochs: int, from_scratch: bool, held_out: float = 0.2) -> dict:
    """The arm's fine-tuning learning rate, chosen on its own training set: fine-tuned (seed 0) on the first 80 %
    of it at the family's rate and at a tenth of it, scored on the last 20 %; the better one (a tie: the family's).
    The reported dev set is never looked at. -> {"chosen": rate, "held_out": {rate: accuracy}}"""
    train, _, length = files
    rows = train.read_text().splitlines(keepends=True)  # already shuffled (prepare_tasks)
    cut = int(len(rows) * (1 - held_out))
    selection = out / "selection"
    selection.mkdir(exist_ok=True)
    fit, scored = selection / f"{task}_fit.jsonl", selection / f"{task}_held_out.jsonl"
    for path, part in ((fit, rows[:cut]), (scored, rows[cut:])):
        if not path.is_file() or path.read_text() != "".join(part):
            path.write_text("".join(part))
    family = family_settings(arm)["learning_rate"]
    scores = {rate: fine_tune(arm, checkpoint, task, (fit, scored, length), 0, out, epochs, from_scratch, rate,
                              name=f"{task}-select", score_train=False)["dev"]
              for rate in (family, family / 10)}
    best = max(scores.values())
    chosen = family if scores[family] == best else family / 10
    print(f"{arm} {task}: held-out accuracy {', '.join(f'{s:.2f} at {r:g}' for r, s in scores.items())}; "
          f"fine-tuned at {chosen:g}", flush=True)
    return {"chosen": chosen, "held_out": {f"{rate:g}": score for rate, score in scores.items()}}


def over_seeds(runs: list[dict]) -> dict:
    """The seeds' dev accuracies as median [min, max], the training set's beside them."""
    return spread([r["dev"] for r in runs]) | {"epochs": runs[0]["epochs"], "learning_rate": runs[0]["learning_rate"],
                                               "train": spread([r["train"] for r in runs])}


def table(results: dict) -> str:
    """Per arm: pretraining (steps, tokens, TFLOP, seconds, final loss) and each task's dev accuracy (median [min,
    max] over seeds) with the training set's median beside it; then ELECTRA's discriminator against its base rate."""
    tasks = [task for task in TASK_NAMES if task in next(iter(results["arms"].values()))]
    lines = [f"{'arm':<16}{'steps':>6}{'tokens':>10}{'TFLOP':>6}{'seconds':>8}{'loss':>7}" + "".join(
        f"   {TASK_NAMES[task] + ' dev med [min, max]':<27}{'train':>6}{'lr':>7}" for task in tasks)]
    for arm, entry in results["arms"].items():
        p = entry.get("pretrain", {})
        cells = "".join(f"   {entry[t]['median']:6.2f} [{entry[t]['min']:.2f}, {entry[t]['max']:.2f}]".ljust(30)
                        + f"{entry[t]['train']['median']:6.2f}{entry[t]['learning_rate']:7.0e}" for t in tasks)
        flops = f"{p['flops'] / 1e12:.0f}" if "flops" in p else "-"
        lines.append(f"{arm:<16}{p.get('steps', '-'):>6}{p.get('tokens', '-'):>10}{flops:>6}"
                     f"{p.get('seconds') or '-':>8}{p.get('final_loss') or float('nan'):7.2f}{cells}")
    electra = results["arms"].get("electra", {}).get("pretrain", {})
    if "rtd_base_rate" in electra:
        final = electra["final"]
        lines.append(f"electra's discriminator over its last 10 % of steps: loss {final['rtd_discriminator_loss']:.3f} "
                     f"against a base rate of {electra['rtd_base_rate']:.3f} (replaced fraction "
                     f"{final['rtd_replaced_fraction']:.3f}); accuracy on replaced tokens "
                     f"{final['rtd_replaced_accuracy']:.3f}, on original ones {final['rtd_original_accuracy']:.3f}; "
                     f"token-state similarity {final['rtd_token_similarity']:.3f}")
    return "\n".join(lines)


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(results["arms"])
    tasks = [task for task in TASK_NAMES if task in results["arms"][arms[0]]]
    figure, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), sharey=False, squeeze=False)
    for axis, task in zip(axes[0], tasks, strict=True):
        medians = [results["arms"][a][task]["median"] for a in arms]
        low = [m - results["arms"][a][task]["min"] for a, m in zip(arms, medians, strict=True)]
        high = [results["arms"][a][task]["max"] - m for a, m in zip(arms, medians, strict=True)]
        axis.bar(arms, medians, yerr=[low, high], capsize=4, color=["C0"] * (len(arms) - 2) + ["C7", "C7"])
        axis.set_title(f"{task}: accuracy (median, min-max of {len(results['arms'][arms[0]][task]['seeds'])} seeds)")
        axis.set_ylim(min(50, min(medians) - 5), 100)
        axis.tick_params(axis="x", rotation=30)
    figure.suptitle(f"{results['budget_minutes']} min of pretraining per arm, {results['machine']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-minutes", type=float, default=8.0, help="pretraining wall-clock per arm")
    parser.add_argument("--out", type=Path, default=Path("runs/objectives_compared"))
    parser.add_argument("--learning-rate", type=float, default=5e-4, help="pretraining's peak, every arm but electra")
    parser.add_argument("--electra-learning-rate", type=float, default=5e-5,
                        help="electra's pretraining peak (measured over 480 steps at this size: 5e-5 ends its "
                             "discriminator 23 %% below its base rate, 1e-4 7 %%, 5e-4 at it: the collapse)")
    parser.add_argument("--warmup-ratio", type=float, default=0.1, help="pretraining's warm-up share, every arm")
    parser.add_argument("--precision", help="pretraining's, e.g. bf16-mixed on a GPU (default: the trainer's, 32)")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and data: checks the script in minutes")
    parser.add_argument("--tasks", nargs="+", choices=tuple(TASK_NAMES), default=tuple(TASK_NAMES),
                        help="fine-tune on these tasks only")
    parser.add_argument("--arms", nargs="+", choices=(*ARMS, *SCRATCH), default=(*ARMS, *SCRATCH),
                        help="only these arms, in this order (to split a run; the JSON and table are written when "
                             "every arm is done)")
    args = parser.parse_args()
    from pretrain.data.tokenizer import train_tokenizer_on_files

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    smoke = args.smoke
    sizes = (dict(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128) if smoke else
             dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024))
    budget = 0.2 if smoke and args.budget_minutes == 8.0 else args.budget_minutes  # 8: the default
    corpus = DATA / "imdb" / "unsup.jsonl"
    if smoke:  # a few hundred reviews stand for the corpus
        corpus = write_jsonl(out / "unsup_sample.jsonl", [json.loads(line) for _, line in
                                                          zip(range(400), corpus.open(), strict=False)])
    tokenizer = out / "tokenizer" / "tokenizer.json"
    if not tokenizer.is_file():  # one byte-level BPE tokenizer for every arm (GPT needs no [CLS]; BPE has both)
        train_tokenizer_on_files([corpus], "bpe", 2000 if smoke else 16000, tokenizer, clean=True)
    from pretrain.data.tokenizer import load_tokenizer

    sizes |= dict(vocab_size=load_tokenizer(tokenizer).get_vocab_size(), max_position_embeddings=256)
    tasks = prepare_tasks(out, 200 if smoke else 1000, 100 if smoke else 2000, 300 if smoke else 5000)
    tasks = {task: files for task, files in tasks.items() if task in args.tasks}
    seeds = [int(seed) for seed in args.seeds.split(",")]
    epochs = {"imdb_1k": 1 if smoke else 3, "sst2_5k": 1 if smoke else 3}
    scratch_epochs = {task: n * SCRATCH_EPOCHS for task, n in epochs.items()}
    results = {"budget_minutes": budget, "machine": f"{platform.machine()}, {platform.processor() or 'CPU'}, "
                                                     f"torch threads {__import__('torch').get_num_threads()}",
               "arms": {}}
    print(f"every arm: {sizes}; {budget} min of pretraining; seeds {seeds}", flush=True)
    # a baseline takes its architecture and tokenizer from its arm's checkpoint: that arm is pretrained too
    needed = {SCRATCH.get(arm, arm) for arm in args.arms}
    rates = {arm: args.electra_learning_rate if arm == "electra" else args.learning_rate for arm in ARMS}
    for arm in ARMS:  # every arm's speed first, on a machine kept quiet; the runs' step counts are fixed by them
        if arm in needed:
            seconds_per_step(arm, sizes, tokenizer, corpus, out, learning_rate=rates[arm],
                             warmup_ratio=args.warmup_ratio, precision=args.precision)
    pretrained = {arm: pretrain_arm(arm, sizes, tokenizer, corpus, budget, out, learning_rate=rates[arm],
                                    warmup_ratio=args.warmup_ratio, precision=args.precision)
                  for arm in ARMS if arm in needed}
    runs = {(arm, task): [] for arm in args.arms for task in tasks}
    chosen = {}  # every arm's fine-tuning rate per task, chosen on its own training set before any seed is scored
    for arm in args.arms:
        checkpoint = out / "pretrain" / SCRATCH.get(arm, arm) / "checkpoints" / "last.ckpt"
        for task, files in tasks.items():
            chosen[arm, task] = choose_learning_rate(arm, checkpoint, task, files, out,
                                                     (scratch_epochs if arm in SCRATCH else epochs)[task],
                                                     arm in SCRATCH)
    for seed in seeds:  # seed by seed: a run stopped part-way has every arm for the first seeds (each one cached)
        for arm in args.arms:
            checkpoint = out / "pretrain" / SCRATCH.get(arm, arm) / "checkpoints" / "last.ckpt"
            for task, files in tasks.items():
                runs[arm, task].append(fine_tune(arm, checkpoint, task, files, seed, out,
                                                 (scratch_epochs if arm in SCRATCH else epochs)[task], arm in SCRATCH,
                                                 chosen[arm, task]["chosen"]))
    for arm in args.arms:
        results["arms"][arm] = ({} if arm in SCRATCH else {"pretrain": pretrained[arm]}) | {
            task: over_seeds(runs[arm, task]) | {"held_out": chosen[arm, task]["held_out"]} for task in tasks}
    if set(args.arms) != {*ARMS, *SCRATCH}:
        print(f"done: {', '.join(args.arms)}; run every arm (cached ones are read back) for the JSON and the table")
        return
    results["arms"] = {arm: results["arms"][arm] for arm in (*ARMS, *SCRATCH)}
    (out / "objectives_compared.json").write_text(json.dumps(results, indent=2) + "\n")
    if not smoke:
        target = Path(__file__).resolve().parent / "results" / "objectives_compared.json"
        target.parent.mkdir(exist_ok=True)
        target.write_text(json.dumps(results, indent=2) + "\n")
        chart(results, target.with_suffix(".png"))
    chart(results, out / "objectives_compared.png")
    print(table(results))
    print(f"written: {out / 'objectives_compared.json'}, {out / 'objectives_compared.png'}")


if __name__ == "__main__":
    main()
