#!/usr/bin/env bash
# Record the official FlowEdit's edits on OUR tiny SD3 and FLUX models, for tests/data/flowedit/.
#   FLOWEDIT_DIR=<extracted fallenshock/FlowEdit @ 457f402> bash scripts/record_flowedit.sh [SCRATCH]
# SD3 runs in this package's venv (.venv). FLUX runs in a venv with the diffusers FlowEdit was written
# for (REFPY, made here if missing: diffusers 0.30.1, transformers 4.44.2), on the same tiny model
# saved by .venv. Runs the official code unmodified; commits nothing of it.
set -euo pipefail
: "${FLOWEDIT_DIR:?set FLOWEDIT_DIR to the extracted FlowEdit repository}"
HERE=$(cd "$(dirname "$0")/.." && pwd)
SCRATCH=${1:-$HOME/.cache/tokenflow-ref/flowedit}
REFENV=${REFENV:-$HOME/.cache/flowedit-ref}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$SCRATCH/models"
if [ ! -x "$REFENV/bin/python" ]; then
  python3 -m venv "$REFENV"
  "$REFENV/bin/pip" install -q torch==2.13.0
  "$REFENV/bin/pip" install -q diffusers==0.30.1 transformers==4.44.2 safetensors sentencepiece protobuf pillow
fi
"$HERE/.venv/bin/python" - "$SCRATCH/models" <<'PY'
import json, os, sys
from tokenflow.tiny_flow import save_tiny_flow_model
for kind in ("sd3", "flux"):
    out = save_tiny_flow_model(os.path.join(sys.argv[1], kind), kind)
    index = os.path.join(out, "model_index.json")
    data = json.load(open(index))
    for key, value in data.items():  # transformers 5's tokenizers are 4.x's fast ones (tokenizer.json)
        if key.startswith("tokenizer") and isinstance(value, list) and not value[1].endswith("Fast"):
            data[key] = [value[0], value[1] + "Fast"]
    json.dump(data, open(index, "w"), indent=2)
    for sub in os.listdir(out):  # tokenizers < 0.20 reads BPE merges as "a b" strings, not pairs
        path = os.path.join(out, sub, "tokenizer.json")
        if os.path.isfile(path):
            tok = json.load(open(path))
            merges = tok.get("model", {}).get("merges")
            if merges and isinstance(merges[0], list):
                tok["model"]["merges"] = [" ".join(m) for m in merges]
                json.dump(tok, open(path, "w"))
        weights = os.path.join(out, sub, "model.safetensors")
        config = os.path.join(out, sub, "config.json")
        if sub.startswith("text_encoder") and os.path.isfile(weights) and \
                json.load(open(config)).get("model_type") == "clip_text_model":
            from safetensors.torch import load_file, save_file  # 4.x names CLIP's weights text_model.*
            state = load_file(weights)
            save_file({k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v
                       for k, v in state.items()}, weights, metadata={"format": "pt"})
PY
"$HERE/.venv/bin/python" "$HERE/scripts/record_flowedit.py" --only sd3,sd3_avg2
"$REFENV/bin/python" "$HERE/scripts/record_flowedit.py" --only flux,flux_nmin --models "$SCRATCH/models"
