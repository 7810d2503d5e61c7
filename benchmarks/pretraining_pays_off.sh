#!/usr/bin/env bash
# Does pretraining pay off? A small encoder pretrained (MLM) on the 50,000 unlabelled IMDB reviews for at most 15
# minutes on CPU, then fine-tuned on SST-2, against the same architecture and tokenizer fine-tuned from random
# weights; SST-2 dev accuracy, median of 3 seeds each. Needs ../shared/data. From the repository root:
#   bash benchmarks/pretraining_pays_off.sh
set -euo pipefail
RUN=${RUN:-runs/imdb-mlm}
GLUE=${GLUE:-../shared/data/glue}
FINETUNE=(--task sst2 --data-dir "$GLUE" --seeds 1,2,3 --epochs 1 --learning-rate 3e-4 --batch-size 32 --max-length 64)

[ -f "$RUN/checkpoints/last.ckpt" ] || pretrain fit -c benchmarks/imdb-mlm.yaml --trainer.default_root_dir "$RUN"
pretrain finetune --model "$RUN/checkpoints/last.ckpt" "${FINETUNE[@]}" --out "$RUN/sst2-pretrained"
pretrain finetune --model "$RUN/checkpoints/last.ckpt" "${FINETUNE[@]}" --from-scratch --out "$RUN/sst2-scratch"
python - "$RUN" <<'PY'
import json, sys
run = sys.argv[1]
print(f"{'SST-2 dev accuracy':<22} {'median':>7} {'min':>7} {'max':>7}  seeds 1, 2, 3")
for name in ("pretrained", "scratch"):
    results = json.load(open(f"{run}/sst2-{name}/results.json"))
    summary, runs = results["summary"]["accuracy"], results["runs"]
    print(f"{'from ' + name:<22} {summary['median']:7.2f} {summary['min']:7.2f} {summary['max']:7.2f}  "
          + ", ".join(f"{r['accuracy']:.2f}" for r in runs))
PY
