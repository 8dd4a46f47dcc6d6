#!/usr/bin/env bash
# The 2-GPU check of examples/distributed_train.py (issue: production training): one process with the global
# batch (the reference loss curve), one with half of it (the per-GPU throughput reference), DDP and FSDP2 on
# 2 GPUs with torchrun; then the adapters saved from rank 0 reload into plain PEFT and match the single run's.
# Usage (on a 2-GPU machine): bash scripts/ddp_check.sh [STEPS] ; results under $OUT (or ./out).
set -uo pipefail
OUT=${OUT:-$PWD/out}
STEPS=${1:-20}
SIZE=${SIZE:-1b}
# before anything is installed: without 2 GPUs the runs below would train the 1b model on the CPU, silently
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "${gpus:-0}" -lt 2 ]; then
  echo "ddp_check.sh: needs 2 CUDA GPUs, torch sees ${gpus:-0}; on the CPU, torchrun --nproc_per_node 2" \
    "examples/distributed_train.py --size tiny --mode ddp (or fsdp2) runs two gloo processes" >&2
  exit 2
fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
[ -n "${NO_INSTALL:-}" ] || PEFTKERN_BUILD_CUDA=0 python3 -m pip install --no-build-isolation --no-deps -e . > /dev/null 2>&1
args=(examples/distributed_train.py --size "$SIZE" --steps "$STEPS" --seq 1024)
python3 "${args[@]}" --batch 8 --out "$OUT/single.json" --save /tmp/ddp_check/single
python3 "${args[@]}" --batch 4 --out "$OUT/single_b4.json"
for mode in ddp fsdp2; do
  python3 -m torch.distributed.run --standalone --nproc_per_node 2 "${args[@]}" --batch 8 --mode "$mode" \
    --out "$OUT/$mode.json" --save "/tmp/ddp_check/$mode" 2>&1 | grep -v Warning | tail -n 3
done
python3 - "$OUT" "$SIZE" <<'PY'
import json, sys
import torch
from safetensors.torch import load_file
out = sys.argv[1]
runs = {m: json.load(open(f"{out}/{m}.json")) for m in ("single", "single_b4", "ddp", "fsdp2")}
ref = runs["single"]["losses"]
for m in ("ddp", "fsdp2"):
    rel = max(abs(a - b) / abs(a) for a, b in zip(ref, runs[m]["losses"]))
    w1 = load_file(f"/tmp/ddp_check/single/adapter_model.safetensors")
    w2 = load_file(f"/tmp/ddp_check/{m}/adapter_model.safetensors")
    wrel = max(((w2[k].float() - w1[k].float()).norm() / w1[k].float().norm()).item() for k in w1)
    print(f"{m}: max relative loss difference to the single-process curve {rel:.2e}; adapter weights {wrel:.2e}; "
          f"tokens/s per GPU {runs[m]['tokens_per_s_per_gpu']:.0f} vs one GPU at the same per-GPU batch "
          f"{runs['single_b4']['tokens_per_s_per_gpu']:.0f} "
          f"({runs[m]['tokens_per_s_per_gpu'] / runs['single_b4']['tokens_per_s_per_gpu']:.3f}x)")
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM
sys.path.insert(0, "examples")
from distributed_train import SIZES
for m in ("ddp", "fsdp2"):
    base = LlamaForCausalLM(LlamaConfig(**SIZES[sys.argv[2]]))
    model = PeftModel.from_pretrained(base, f"/tmp/ddp_check/{m}")
    n = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    print(f"{m}: the adapter saved from rank 0 reloads into plain PEFT ({n} LoRA parameters)")
json.dump(runs, open(f"{out}/distributed-summary.json", "w"), indent=1)
PY
