#!/usr/bin/env bash
# Quickstart on a CPU in a few minutes, on the real tiny stories260K model and 1k Alpaca examples:
#   eval loss before → LoRA SFT (configs/quickstart.yaml) → eval loss after → merged + PEFT adapter export →
#   reload both in transformers and generate. Fails if the training loss did not go down.
# Model and data (jaxtune/assets.py): $JAXTUNE_MODEL + $JAXTUNE_DATA, else $JAXTUNE_ASSETS or ../shared/assets
# beside the checkout, else a small model and Alpaca sample from the Hugging Face Hub.
# Run dir: $RUN_DIR (runs/quickstart).
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" "[dev]"
export TOKENIZERS_PARALLELISM=false JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
eval "$(python -m jaxtune.cli.assets)"  # sets MODEL, TRAIN, HELD_OUT (another Alpaca set the run never sees), ORIGIN
echo "[quickstart] model $MODEL, data $TRAIN ($ORIGIN)"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
RUN="${RUN_DIR:-runs/quickstart}"
SET=(--set "model.path=$MODEL" --set "data.train=$TRAIN" --set "output.run_dir=$RUN")
EVAL=(--data "$HELD_OUT" --template alpaca --seq-len 256 --max-examples 200)

if [ -d "$RUN" ]; then
  echo "[quickstart] removing the previous run in $RUN"
  rm -rf "$RUN"
fi

echo "[quickstart] 1/6 loss of the base model on held-out instructions"
jaxtune eval loss --model "$MODEL" "${EVAL[@]}" --out "$RUN.before.json"

echo "[quickstart] 2/6 LoRA SFT"
jaxtune train configs/quickstart.yaml "${SET[@]}"

echo "[quickstart] 3/6 loss of the tuned model (its export) on the same held-out instructions"
jaxtune eval loss configs/quickstart.yaml "${SET[@]}" "${EVAL[@]}" --out "$RUN.after.json"

echo "[quickstart] 4/6 did the training loss go down?"
python - "$RUN" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(f"{sys.argv[1]}/metrics.jsonl")]
losses = [r["loss"] for r in rows if r["split"] == "train"]
first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
before, after = (json.load(open(f"{sys.argv[1]}.{s}.json"))["loss"] for s in ("before", "after"))
print(f"train loss: first 20 steps {first:.3f} -> last 20 steps {last:.3f}")
print(f"held-out loss: base {before:.3f} -> tuned {after:.3f}")
sys.exit(0 if last < first and after < before else "the loss did not go down")
EOF

echo "[quickstart] 5/6 reload the export in transformers (merged, and base + PEFT adapter) and generate"
python - "$RUN" "$MODEL" <<'EOF'
import sys
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import jax.numpy as jnp
import numpy as np

from jaxtune import load_pretrained

run, base_dir = sys.argv[1:]
tok = AutoTokenizer.from_pretrained(f"{run}/export/merged")
prompt = tok.apply_chat_template([{"role": "user", "content": "Give three tips for staying healthy."}],
                                 tokenize=False, add_generation_prompt=True)
ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
merged = AutoModelForCausalLM.from_pretrained(f"{run}/export/merged", dtype=torch.float32)
adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                    f"{run}/export/adapter")
with torch.no_grad():
    ref = merged(ids).logits.numpy()
ours = np.asarray(load_pretrained(f"{run}/export/merged")(jnp.asarray(ids.numpy())))
print(f"logit parity, jaxtune vs transformers on the exported model: max |diff| = {np.abs(ours - ref).max():.2e}")
outs = {}
for name, model in (("merged", merged), ("base+adapter", adapted)):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=60, do_sample=False)
    outs[name] = out[0, ids.shape[1]:].tolist()
    print(f"--- {name}:\n{prompt}{tok.decode(outs[name], skip_special_tokens=True)}\n")
print("merged and base+adapter agree" if outs["merged"] == outs["base+adapter"] else
      "note: merged and base+adapter greedy outputs differ (float rounding of the merge)")
EOF
echo "[quickstart] 6/6 base-vs-tuned report (IFEval-style checks on a few prompts, forgetting, loss curves)"
jaxtune eval report --model "$RUN/export/merged" --base "$MODEL" --run "$RUN" --limit 16 --max-new-tokens 48 \
  --out "$RUN/report"
echo "[quickstart] done: run dir $RUN (metrics.jsonl, tensorboard/, checkpoints/, export/, report/report.html)"
