#!/usr/bin/env bash
# The README's worked sweep, as queued DVC experiments: LoRA rank 4 / 8 / 16, and full fine-tuning
# against LoRA. Each experiment reruns train and what follows it only (data stages and the base
# are shared). Prints the comparison table (Markdown) at the end.
#
#   scripts/sweep.sh            # one experiment at a time
#   JOBS=2 scripts/sweep.sh     # two at once (each uses `threads` torch threads)
#   SWEEP=try2 scripts/sweep.sh # another name prefix, when a sweep with these names exists
set -euo pipefail
cd "$(dirname "$0")/.."
make --quiet install
export PATH="$PWD/.venv/bin:$PATH"
SWEEP=${SWEEP:-sweep}

dvc repro  # the baseline row: the committed params, up to date
for rank in 4 8 16; do
  dvc exp run --queue --name "$SWEEP-lora-r$rank" --set-param train.method=lora --set-param "train.lora.r=$rank"
done
dvc exp run --queue --name "$SWEEP-full" --set-param train.method=full
dvc exp run --run-all --jobs "${JOBS:-1}"  # runs the queue, follows the logs, returns when all are done

# the columns that tell the story; `dvc exp show` without --keep/--drop shows everything
dvc exp show --no-pager --md --precision 4 --drop '.*' \
  --keep 'Experiment|train\.method|train\.lora\.r$|task\.accuracy$|task\.macro_f1$|^perplexity$|general\.worst_drop|train_loss|eval_loss|tokens_per_second|trainable_params|gguf_q8_0\.size_bytes'
