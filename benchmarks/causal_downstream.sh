#!/usr/bin/env bash
# A causal model downstream: a small GPT pretrained (CLM) on the 50,000 unlabelled IMDB reviews for at most 15
# minutes on CPU (benchmarks/imdb-gpt.yaml), then on SST-2: fine-tuned GPT-1 style (last-token head, auxiliary LM
# loss 0.5) against the same architecture and tokenizer fine-tuned from random weights (median of seeds 1, 2, 3,
# the settings of pretraining_pays_off.sh), and scored zero-shot and 4-shot (seeds 1, 2, 3) with two prompts, plain
# and calibrated (--calibrate), against the majority class. Needs ../shared/data. From the repository root:
#   bash benchmarks/causal_downstream.sh
set -euo pipefail
RUN=${RUN:-runs/imdb-gpt}
GLUE=${GLUE:-../shared/data/glue}
MODEL="$RUN/checkpoints/last.ckpt"
FINETUNE=(--task sst2 --data-dir "$GLUE" --seeds 1,2,3 --epochs 1 --learning-rate 3e-4 --batch-size 32 --max-length 64)

[ -f "$MODEL" ] || pretrain fit -c benchmarks/imdb-gpt.yaml --trainer.default_root_dir "$RUN"
[ -f "$RUN/sst2-pretrained/results.json" ] || pretrain finetune --model "$MODEL" "${FINETUNE[@]}" --out "$RUN/sst2-pretrained"
[ -f "$RUN/sst2-scratch/results.json" ] || pretrain finetune --model "$MODEL" "${FINETUNE[@]}" --from-scratch --out "$RUN/sst2-scratch"
PROMPTS=("Review: {text}\nSentiment:| negative, positive" "{text} It was| terrible, great")
for index in 0 1; do
  template=${PROMPTS[$index]%%|*}
  labels=${PROMPTS[$index]#*|}
  for calibrate in "" --calibrate; do
    for shots in 0 4; do
      for seed in 1 2 3; do
        [ "$shots" = 0 ] && [ "$seed" != 1 ] && continue  # zero-shot draws nothing: one seed
        out="$RUN/sst2-prompt$index${calibrate:+-calibrated}-$shots-shot-seed$seed.json"
        [ -f "$out" ] || pretrain zero-shot --model "$MODEL" --task sst2 --data-dir "$GLUE" --template "$template" \
          --labels "$labels" --shots "$shots" --seed "$seed" $calibrate --out "$out" > /dev/null
      done
    done
  done
done
python benchmarks/payoff_table.py "$RUN" --prefix "fine-tuned GPT-1 style, " --zero-shot
