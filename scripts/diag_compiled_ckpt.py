"""What torch.compile's partitioner saves for backward in a checkpointed model, fused against PEFT's.

bench e2e --compiled-only --checkpointing-only (twenty-fourth session, H200) gave the fused LoRA model a peak of 5073 MB
against 2917 MB for PEFT's and 3138 MB for the frozen model: under compile, something of each fused layer is kept
that checkpointing should drop. On the CPU (torch 2.13) the partitioner recomputes every fused layer. This prints,
for each model, the graphs dynamo made and their breaks, the forward graphs' saved tensors (count, MB, the largest),
the backward graphs' recomputed ops, and the peak memory of a step.

    python scripts/diag_compiled_ckpt.py [--shape tiny|1b] [--impls peft fused] [--skip-side-effects]
                                         [--no-checkpointing] [--dtype bf16|fp32] [--layers N] [--recompute-xa]

The backward graphs' matmuls are counted apart: those that make a gradient and those that recompute a forward product.
"""

from __future__ import annotations

import argparse
import collections
import sys

import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.partitioners import min_cut_rematerialization_partition

from peftkern import workloads
from peftkern.ops import _compile_passes


def run(impl: str, shape: str, device: str, dtype, checkpointing: bool = True, layers: int = 0) -> None:
    records = []

    def fw(gm, _inputs):
        out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        saved = []
        for v in out:
            val = getattr(v, "meta", {}).get("val")
            if isinstance(val, torch.Tensor) and v.op != "placeholder":
                try:
                    mb = int(val.numel()) * val.element_size() / 2**20
                except (TypeError, ValueError):  # a symbolic size without a hint
                    mb = 0.0
                saved.append((mb, v.name, str(v.target), tuple(val.shape)))
        records.append(("fw", saved))
        return gm.forward

    def bw(gm, _inputs):
        # a matmul whose left operand comes from the incoming gradients is a gradient's; any other one recomputes a
        # forward product (the frozen model's recomputed projections against its dx)
        from_grads = set()
        for n in gm.graph.nodes:
            if (n.op == "placeholder" and "tangent" in n.name) or any(a in from_grads for a in n.all_input_nodes):
                from_grads.add(n)
        ops = collections.Counter()
        for n in gm.graph.nodes:
            if n.op == "call_function":
                name = str(n.target)
                if name == "aten.mm.default":
                    name += " (gradient)" if n.args[0] in from_grads else " (recomputed)"
                ops[name] += 1
        records.append(("bw", {k: c for k, c in ops.items() if "peftkern" in k or "mm" in k or "flash" in k
                               or "attention" in k}))
        return gm.forward

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    if layers:
        workloads.SHAPES[shape] = dict(workloads.SHAPES[shape], num_hidden_layers=layers)
    model = workloads.build("lora", impl, shape, device, dtype, 16, False, max_positions=2048)
    step_rows = (4, 2048) if shape != "tiny" else (2, 64)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "disable_input_require_grads"):
            model.disable_input_require_grads()
    model.train()
    def partition(gm, joint_inputs, **kwargs):  # Inductor's joint pass of peftkern (_compile_passes), as it runs it
        if _compile_passes.SAVE_XA[0]:
            _compile_passes.keep_xa(gm.graph)
        return min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)

    backend = aot_autograd(fw_compiler=fw, bw_compiler=bw, partition_fn=partition)
    compiled = torch.compile(model, backend=backend)
    ids = torch.randint(0, model.config.vocab_size, step_rows, device=device)
    compiled(input_ids=ids, labels=ids).loss.backward()  # compiles
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    for p in model.parameters():
        p.grad = None
    compiled(input_ids=ids, labels=ids).loss.backward()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else float("nan")
    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    print(f"== {impl} {shape}: {sum(k == 'fw' for k, _ in records)} forward graphs, graph breaks {len(breaks)}; "
          f"step peak above the model {peak:.0f} MB")
    for reason, count in list(breaks.items())[:5]:
        print(f"   break x{count}: {str(reason)[:200]}")
    for kind, rec in records:
        if kind == "fw":
            total = sum(s[0] for s in rec)
            kinds = collections.Counter(s[2] for s in rec)
            print(f"   forward graph saves {len(rec)} tensors, {total:.1f} MB; by op: {dict(kinds.most_common(8))}")
            for s in sorted(rec, reverse=True)[:6]:
                print(f"      {s[0]:8.1f} MB  {s[1]}  {s[2]}  {s[3]}")
        else:
            print(f"   backward graph ops: {rec}")
    sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="tiny")
    parser.add_argument("--impls", nargs="+", default=["peft", "fused"], help="of workloads.IMPLS (frozen too)")
    parser.add_argument("--layers", type=int, default=0, help="decoder layers, if not the shape's own")
    parser.add_argument("--no-checkpointing", action="store_true", help="the same without checkpointing")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], help="default: bf16 on a GPU, fp32 on the CPU")
    parser.add_argument("--recompute-xa", action="store_true",
                        help="without peftkern's joint pass that keeps LoRA's xa (PEFTKERN_LORA_SAVE_XA=0)")
    parser.add_argument("--skip-side-effects", action="store_true",
                        help="torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if (args.dtype or ("bf16" if device == "cuda" else "fp32")) == "bf16" else torch.float32
    if args.recompute_xa:
        _compile_passes.SAVE_XA[0] = False
    if args.skip_side_effects:
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    print(f"torch {torch.__version__}, {device}")
    for impl in args.impls:
        run(impl, args.shape, device, dtype, not args.no_checkpointing, args.layers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
