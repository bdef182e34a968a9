#!/usr/bin/env bash
# Record the official TokenFlow's outputs on OUR tiny model, for tests/data/official/.
#   TOKENFLOW_OFFICIAL_DIR=<extracted omerbt/TokenFlow @ 5dd6a69> bash scripts/record_official.sh [SCRATCH]
# Needs the reference venv of ../shared/harness (setup_refenv.sh) and this package's venv (.venv).
# Runs the official code unmodified through the harness; commits nothing of it.
set -euo pipefail
: "${TOKENFLOW_OFFICIAL_DIR:?set TOKENFLOW_OFFICIAL_DIR to the extracted official repository}"
HERE=$(cd "$(dirname "$0")/.." && pwd)
HARNESS=${HARNESS:-$HERE/../shared/harness}
REFPY=${REFPY:-$HOME/.cache/tokenflow-ref/venv/bin/python}
SCRATCH=${1:-$HOME/.cache/tokenflow-ref/work}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$SCRATCH"
"$HERE/.venv/bin/python" -c "from tokenflow.tiny import save_tiny_model; save_tiny_model('$SCRATCH/tiny_sd')"
"$REFPY" "$HARNESS/run_official.py" --model "$SCRATCH/tiny_sd" --input "$TOKENFLOW_OFFICIAL_DIR/data/wolf.mp4" \
    --out "$SCRATCH/ref_run" --H 64 --W 128 --n_frames 12 --inv_steps 40 --save_steps 20 --inv_batch_size 8 \
    --batch_size 4 --n_timesteps 20 --threads 2
"$HERE/.venv/bin/python" "$HERE/scripts/pack_reference.py" "$SCRATCH/ref_run" "$HERE/tests/data/official"
