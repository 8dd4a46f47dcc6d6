"""Where does torch.compile(mode="reduce-overhead") of a fused PEFT model stop? (GPU only.)

Builds a small Llama with PEFT LoRA on every projection (or IA3 as the benchmarks lay it out), fuses it, compiles
it with CUDA graphs and runs a few training steps (peftkern.workloads' step) with cudagraph trees' allocation
history on, so that a pool-check failure names the stack that allocated the offending storage. Prints the
traceback and what it found; exit status 1 on failure.

    python scripts/diag_cudagraphs.py [--rows 640] [--r 4] [--hidden 64] [--method lora|ia3|none] [--steps 4]
"""

from __future__ import annotations

import argparse
import sys
import traceback

import torch

from peftkern import workloads


def build(method: str, r: int, hidden: int):
    import transformers
    from peft import get_peft_model

    import peftkern

    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   max_position_embeddings=256)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
    if method == "none":
        return workloads.freeze_body(model)
    model = get_peft_model(model, workloads.peft_config(method, r), autocast_adapter_dtype=False)
    print(peftkern.fuse(model))
    return model


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=640)
    ap.add_argument("--r", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--method", default="lora", choices=["lora", "ia3", "none"])
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    torch._inductor.config.triton.cudagraph_trees_history_recording = True
    seq = 64 if args.rows % 64 == 0 else 12
    step = workloads.training_step(build(args.method, args.r, args.hidden), args.rows // seq, seq, "cuda",
                                   compile_="reduce-overhead", lr=1e-3)
    try:
        for i in range(args.steps):
            print(f"step {i}: loss {step().item():.4f}")
    except Exception:  # noqa: BLE001 - a diagnostic: print everything
        traceback.print_exc()
        return 1
    from torch._dynamo.utils import counters
    print("cudagraph_skips:", counters["inductor"]["cudagraph_skips"])
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
