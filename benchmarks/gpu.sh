#!/usr/bin/env bash
# The GPU checks, in one go on a bare H100/H200 machine (at most 9 min 40 s), from the repository root:
#   bash benchmarks/gpu.sh OUT_DIR
# 1. the CUDA tests (pytest -m gpu: bf16 vs fp32, compiled vs eager, fused AdamW, generation / perplexity / encoding /
#    fine-tuning / zero-shot on a CUDA model, exact resume on CUDA);
# 2. benchmarks/throughput.py --mode gpu, all four rows, ours vs Hugging Face side by side (OUT_DIR/throughput.json);
# 3. the FSDP tests (pytest -m gpu -k fsdp: `--trainer.strategy fsdp` and `fsdp_sharded` train, resume exactly from
#    their full / sharded checkpoints, load and export; FSDP follows the single-device run);
# 4. `pretrain fit` of configs/bert-base.yaml (150 steps) and configs/gpt2-small.yaml (60) on WikiText-2, the product's
#    own path (data loader, logging), and its logged train/tokens_per_sec and train/mfu (OUT_DIR/fit.json);
# 5. benchmarks/long_context.py at T = 8,192: the tiny ModernBERT with dense masks vs block masks (peak GPU memory,
#    seconds per step; OUT_DIR/long_context.log).
# Each part has its own time limit; a part that fails or runs out of time does not stop the others.
#
# The machine lacks some packages and ../shared: prepare once, here (both folders are git-ignored):
#   .whl/   wheels for Python 3.12 of datasets, dill, multiprocess, jsonargparse, docstring-parser, typeshed-client
#           (pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .whl NAME==VERSION)
#   .data/  wikitext-2/wiki.train.tokens and tokenizers/{bert-base,gpt2-small}/tokenizer.json trained on it:
#           pretrain tokenizer train --corpus .data/wikitext-2/wiki.train.tokens --kind wordpiece --vocab-size 30522
#             --out .data/tokenizers/bert-base   (and --kind bpe --vocab-size 50257 --out .data/tokenizers/gpt2-small)
# and name .whl and .data in the device tool's `carry`.
set -uo pipefail
OUT=${1:-runs/gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
part() { echo "== $1 ($(date +%T))"; }

part "CUDA tests"
timeout 110 python3 -m pytest -q -m gpu -k "not fsdp" tests/test_gpu.py -p no:cacheprovider 2>&1 \
  | tee "$OUT/pytest.log"

part "throughput: ours vs Hugging Face"
timeout 160 python3 benchmarks/throughput.py --mode gpu --steps 10 --warmup 5 --json "$OUT/throughput.json" 2>&1 \
  | tee "$OUT/throughput.log"

part "FSDP tests"
timeout 110 python3 -m pytest -q -m gpu -k fsdp tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/fsdp.log"

for recipe in bert-base gpt2-small; do
  steps=$([ "$recipe" = bert-base ] && echo 150 || echo 60)  # gpt2-small: 8 micro-batches of 16 x 1024 a step
  part "pretrain fit $recipe, $steps steps on WikiText-2"
  timeout 75 python3 -m pretrain.cli fit -c "configs/$recipe.yaml" \
    --data.files "[.data/wikitext-2/wiki.train.tokens]" --data.tokenizer ".data/tokenizers/$recipe/tokenizer.json" \
    --data.cache_dir /tmp/cache --trainer.default_root_dir "$OUT/$recipe" --trainer.max_steps "$steps" \
    --model.warmup_steps 15 --trainer.log_every_n_steps 10 --trainer.val_check_interval 1000 \
    --trainer.limit_val_batches 0 \
    --trainer.enable_progress_bar false 2>&1 | tail -n 30 | tee "$OUT/$recipe.log"
done

python3 - "$OUT" <<'PY'
import csv, glob, json, statistics, sys
out, fit = sys.argv[1], {}
for recipe in ("bert-base", "gpt2-small"):
    rows = [row for path in glob.glob(f"{out}/{recipe}/logs/version_*/metrics.csv") for row in csv.DictReader(open(path))]
    rates = [float(r["train/tokens_per_sec"]) for r in rows if r.get("train/tokens_per_sec")][1:]  # after compiling
    mfus = [float(r["train/mfu"]) for r in rows if r.get("train/mfu")][1:]
    fit[recipe] = {"tokens_per_sec": statistics.median(rates) if rates else None,
                   "mfu": statistics.median(mfus) if mfus else None, "windows": len(rates)}
    print(f"pretrain fit {recipe}: {fit[recipe]}")
json.dump(fit, open(f"{out}/fit.json", "w"), indent=2)
PY

part "long context: dense vs block masks at T = 8,192 (tiny ModernBERT)"
timeout 50 python3 benchmarks/long_context.py --lengths 8192 --modes dense blocks --steps 6 \
  --corpus .data/wikitext-2/wiki.train.tokens --out /tmp/long_context 2>&1 | tee "$OUT/long_context.log"
