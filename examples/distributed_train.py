"""Train a fused PEFT LoRA model under DDP or FSDP2 (fully_shard), or in one process, and log the loss curve.

    # one process (the reference curve; global batch = --batch)
    python examples/distributed_train.py --steps 20 --out run1.json
    # two GPUs (or two CPU processes with gloo), the same global batch split across ranks
    torchrun --nproc_per_node 2 examples/distributed_train.py --mode ddp  --steps 20 --out ddp.json
    torchrun --nproc_per_node 2 examples/distributed_train.py --mode fsdp2 --steps 20 --out fsdp.json --save adapter/

The model is a Llama-style config (--size tiny for CPU tests, --size 1b for hidden 2048 x 8 layers), LoRA r=16
on every projection through PEFT, fused by peftkern. Every rank sees the same data order; each takes its slice
of the global batch, so the gradient averaged by DDP / reduced by FSDP2 equals the single-process one up to
the order of the floating-point sums. Rank 0 writes the losses and tokens/s per GPU, and with --save DIR saves the
adapter with save_pretrained (it reloads into plain PEFT). The distributed engine is PyTorch's own.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

import torch
import torch.distributed as dist

import peftkern

SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=128, max_position_embeddings=128),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
               num_key_value_heads=16, vocab_size=32000, max_position_embeddings=4096),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(size: str, device: torch.device, dtype: torch.dtype):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SIZES[size])).to(device=device, dtype=dtype)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0))
    with torch.no_grad():  # B starts at zero: give the adapters something to say from step 0
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    report = peftkern.fuse(model)
    return model, report


def environment(device: torch.device) -> dict:
    """The GPU and the library versions, saved with the losses."""
    import peft
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
           "peftkern": getattr(peftkern, "__version__", "?")}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def _at_least(low: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["single", "ddp", "fsdp2"], default="single")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--steps", type=_at_least(1), default=20)
    parser.add_argument("--batch", type=_at_least(1), default=8, help="global batch (sequences)")
    parser.add_argument("--seq", type=_at_least(2), default=32, help="tokens a sequence (2 or more: one label)")
    parser.add_argument("--out", default=None, help="JSON with the losses (rank 0)")
    parser.add_argument("--save", default=None, help="save_pretrained directory for the adapter (rank 0)")
    args = parser.parse_args(argv)

    distributed = args.mode != "single"
    if not distributed and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit(f"launched as {os.environ['WORLD_SIZE']} processes (torchrun) with --mode single: each would "
                         "train alone on the whole batch; pass --mode ddp or --mode fsdp2")
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must divide among {world} ranks")

    model, report = build(args.size, device, dtype)
    train_model = model
    if args.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    elif args.mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    gen = torch.Generator().manual_seed(1)
    vocab = SIZES[args.size]["vocab_size"]
    per_rank = args.batch // world
    # a small fixed set of batches, cycled: the loss falls as the adapters learn it, so the curves say something
    data = torch.randint(0, vocab, (2, args.batch, args.seq), generator=gen)
    losses, times = [], []
    for step in range(args.steps):
        ids = data[step % len(data)]
        mine = ids[rank * per_rank:(rank + 1) * per_rank].to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = train_model(input_ids=mine, labels=mine).loss
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        global_loss = loss.detach().float()
        if distributed:  # the loss of the global batch: the mean of the ranks' (equal-sized) slices
            dist.all_reduce(global_loss)
            global_loss /= world
        losses.append(global_loss.item())

    steady = times[len(times) // 2:]
    result = {"mode": args.mode, "world": world, "size": args.size, "losses": losses,
              "tokens_per_s_per_gpu": per_rank * args.seq / (sum(steady) / len(steady)), "device": str(device),
              "environment": environment(device),
              # the run trained the fused op only if every layer fused and no call fell back to PEFT's forward
              "fused_layers": len(report.fused), "skipped_layers": len(report.skipped),
              "fallback_calls": sum(report.fallbacks.values())}
    if args.save:
        if args.mode == "fsdp2":  # gather the sharded adapter weights before saving
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if rank == 0:
                model.save_pretrained(args.save, state_dict=full)
        elif rank == 0:
            model.save_pretrained(args.save)
    if rank == 0:
        print(json.dumps({k: v for k, v in result.items() if k not in ("losses", "environment")}))
        print("losses:", " ".join(f"{v:.5f}" for v in losses))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    if distributed:
        # Both ranks leave together: once, on the CPU (gloo), rank 1 tore its group down while rank 0 was still
        # saving and aborted ("terminate called without an active exception").
        # It recurred once more under load (CI, 2026-11-23; 3 of 3 passed alone). The DDP wrapper's reducer holds
        # the group; it is now released before the group is destroyed, not at interpreter exit. A guess, not
        # confirmed.
        train_model = loss = None
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
