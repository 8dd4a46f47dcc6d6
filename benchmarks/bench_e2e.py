"""A whole training step of a Llama-style model: frozen model vs PEFT LoRA vs PEFT LoRA fused by peftkern.

The model is built from a config (hidden 2048, intermediate 5632, 8 layers, 16 heads, vocab 32000), bf16,
batch 4 x 2048 tokens, AdamW, LoRA r=16 on q,k,v,o,gate,up,down. The floor is the same model with no adapters
and a frozen body, its embedding trainable so that backward runs through every layer. Steps are timed eagerly
(CUDA events around several steps after warm-up): Python overhead counts here, as it does in training.

    python -m peftkern bench e2e [--quick] [--compile] [--checkpointing] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Row, bench_device, print_table, progress, save_results  # noqa: E402

import peftkern  # noqa: E402

LLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=16, vocab_size=32000, max_position_embeddings=4096)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=128, max_position_embeddings=128)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_base(cfg: dict, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="sdpa")).to(device=device, dtype=dtype)


def variants(cfg, device, dtype, r):
    """name -> a model ready to train (built lazily, one at a time, to keep memory to one model)."""
    from peft import LoraConfig, get_peft_model

    def frozen():
        model = build_base(cfg, device, dtype)
        for p in model.parameters():
            p.requires_grad_(False)
        model.get_input_embeddings().weight.requires_grad_(True)
        return model

    def peft_model(fp32_adapters: bool, fused: bool):
        def make():
            lcfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, lora_dropout=0.0)
            model = get_peft_model(build_base(cfg, device, dtype), lcfg, autocast_adapter_dtype=fp32_adapters)
            if fused:
                report = peftkern.fuse(model)
                progress("  " + str(report).splitlines()[0])
                if report.skipped:  # the row would time PEFT's path under the fused name
                    raise RuntimeError(f"fuse left layers on PEFT's path:\n{report}")
            return model
        return make

    return {
        "frozen model (floor)": frozen,
        "PEFT LoRA (bf16 adapters)": peft_model(False, False),
        "PEFT LoRA (fp32 adapters, default)": peft_model(True, False),
        "peftkern.fuse(PEFT, bf16 adapters)": peft_model(False, True),
        "peftkern.fuse(PEFT, fp32 adapters)": peft_model(True, True),
    }


def time_training(model, batch: int, seq: int, steps: int, warmup: int, device, compile_: bool,
                  checkpointing: bool) -> tuple[float, float, float]:
    """(median ms per step, spread ms, peak MB) of forward + backward + AdamW step."""
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    fwd = torch.compile(model) if compile_ else model
    vocab = model.config.vocab_size
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), device=device, generator=gen)

    def step():
        opt.zero_grad(set_to_none=True)
        fwd(input_ids=ids, labels=ids).loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(3):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / steps)
        else:
            import time

            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            times.append((time.perf_counter() - t0) * 1e3 / steps)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    return statistics.median(times), max(times) - min(times), peak


def main(argv=None) -> list[Row]:
    parser = argparse.ArgumentParser(prog="peftkern bench e2e", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer timed steps")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd frozen and fused models")
    parser.add_argument("--checkpointing", action="store_true", help="also time with gradient checkpointing")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--out", help="directory for the JSON (default benchmarks/results/)")
    args = parser.parse_args(argv)
    device, dtype = bench_device("a tiny Llama config on the CPU (2 x 64 tokens) so you can see it work")
    cfg = LLAMA if device == "cuda" else TINY
    if device == "cpu":
        args.batch, args.seq = 2, 64
    steps, warmup = (3, 2) if args.quick else (5, 3)
    settings = [("eager", False, False)]
    if args.checkpointing:
        settings.append(("eager+ckpt", False, True))
    if args.compile:
        settings.append(("compiled", True, False))
        if args.checkpointing:
            settings.append(("compiled+ckpt", True, True))
    tokens = args.batch * args.seq
    rows = []
    for tag, compile_, ckpt in settings:
        floor = None
        for name, make in variants(cfg, device, dtype, args.rank).items():
            if compile_ and name not in ("frozen model (floor)", "peftkern.fuse(PEFT, fp32 adapters)",
                                         "PEFT LoRA (bf16 adapters)"):
                continue
            progress(f"e2e {tag}: {name}")
            model = make()
            try:
                ms, spread, peak = time_training(model, args.batch, args.seq, steps, warmup, device, compile_, ckpt)
            except Exception as exc:
                progress(f"  failed: {type(exc).__name__}: {exc}")
                continue
            finally:
                del model
                if device == "cuda":
                    torch.cuda.empty_cache()
            if floor is None:
                floor = (ms, peak)
            extra = {"tokens_per_s": tokens / ms * 1e3, "throughput_vs_floor": floor[0] / ms,
                     "peak_vs_floor": (peak / floor[1]) if peak and floor[1] else None}
            case = f"llama-{cfg['hidden_size']}x{cfg['num_hidden_layers']} {args.batch}x{args.seq} r={args.rank}"
            rows.append(Row("e2e", case, name, tag, ms, spread, ms / floor[0], peak, extra))
    print_table(rows, "Training step (ratio: step time over the frozen model's; lower is better)")
    for r in rows:
        print(f"  {r.pass_:13s} {r.impl:38s} {r.extra['tokens_per_s']:12,.0f} tokens/s  "
              f"{r.extra['throughput_vs_floor']:.3f}x the frozen model's tokens/s"
              + (f"  peak {r.extra['peak_vs_floor']:.3f}x" if r.extra.get("peak_vs_floor") else ""))
    path = save_results("e2e", rows, {"model": cfg, "batch": args.batch, "seq": args.seq, "rank": args.rank,
                                      "timing": "eager steps between CUDA events"}, args.out)
    progress(f"saved {path}")
    return rows


if __name__ == "__main__":
    main()
