"""Where does torch.compile(mode="reduce-overhead") of a fused PEFT model stop? (GPU only.)

Builds a small Llama with PEFT LoRA on every projection, fuses it, compiles it with CUDA graphs and runs a few
training steps with cudagraph trees' allocation history on, so that a pool-check failure names the stack that
allocated the offending storage. Prints the traceback and what it found; exit status 1 on failure.

    python scripts/diag_cudagraphs.py [--rows 640] [--r 4] [--method lora|ia3|none] [--steps 4]
"""

from __future__ import annotations

import argparse
import sys
import traceback

import torch


def build(method: str, r: int, hidden: int):
    import transformers
    from peft import IA3Config, LoraConfig, get_peft_model

    import peftkern

    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   max_position_embeddings=256)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets),
                               autocast_adapter_dtype=False)
    elif method == "ia3":
        model = get_peft_model(model, IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                feedforward_modules=["down_proj"]), autocast_adapter_dtype=False)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        model.lm_head.weight.requires_grad_(True)
        return model
    print(peftkern.fuse(model))
    return model


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=640)
    ap.add_argument("--r", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--method", default="lora")
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    torch._inductor.config.triton.cudagraph_trees_history_recording = True
    model = build(args.method, args.r, args.hidden)
    model.train()
    seq = 64 if args.rows % 64 == 0 else 12
    ids = torch.randint(0, 128, (args.rows // seq, seq), device="cuda")
    fn = torch.compile(model, mode="reduce-overhead")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    try:
        for step in range(args.steps):
            torch.compiler.cudagraph_mark_step_begin()
            opt.zero_grad(set_to_none=True)
            loss = fn(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            print(f"step {step}: loss {loss.item():.4f}")
    except Exception:  # noqa: BLE001 - a diagnostic: print everything
        traceback.print_exc()
        return 1
    from torch._dynamo.utils import counters
    print("cudagraph_skips:", counters["inductor"]["cudagraph_skips"])
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
