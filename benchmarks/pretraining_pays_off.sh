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
python benchmarks/payoff_table.py "$RUN"
