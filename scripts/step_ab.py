"""Host-side switches of the fused LoRA layer, A/B'd on whole training steps in one process.

The fused 1b step is bound by its host on some machines and not on others, and the host's pace drifts between runs
(NOTES-lora.md, twelfth and thirteenth sessions), so two runs of bench e2e cannot tell a few percent of host time
apart. This builds the frozen model and the fused model once, then alternates the settings round by round: for each,
a few warm-up steps and then bench e2e's three repeats of timed steps, the GPU's time per step (CUDA events) and
the host's (until the last step is queued), medians. The ratio is against the frozen model timed in the same round.

    python scripts/step_ab.py [--rounds 3] [--steps 5] [--checkpointing] [--compile]
                              [--settings default direct-off cublas-side skinny-side ...]
                              [--optimizers adamw adamw-fused]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from bench_e2e import _repeats, settle_compile  # noqa: E402  (the benchmark's own timing of a step)

from peftkern import workloads  # noqa: E402
from peftkern.kernels.triton import _launch  # noqa: E402
from peftkern.kernels.triton import lora as kl  # noqa: E402
from peftkern.ops import _common, _compile_passes  # noqa: E402
from peftkern.ops import lora as lora_ops  # noqa: E402

# name -> ((module, attribute, value), ...): the switches each setting sets; the rest keep the import's values
SETTINGS = {
    "default": (),
    "direct-off": ((_launch, "DIRECT_LAUNCH", [False]),),
    "native-off": ((_launch, "NATIVE_LAUNCH", [False]),),  # csrc/launch.cpp's launcher off: the direct call
    "params-saved": ((_common, "PARAMS_ON_CTX", [False]),),  # the Parameters through save_for_backward, as before
    "cublas-side": ((kl, "SKINNY_GRADS", False),),  # the default before the fifteenth session
    "skinny-main": ((kl, "SKINNY_GRADS", True), (kl, "SKINNY_SIDE", False)),
    "skinny-side": ((kl, "SKINNY_GRADS", True), (kl, "SKINNY_SIDE", True)),
    "tail-da-off": ((kl, "_TAIL_DA_SETTING", "0"),),  # dA by skinny_grads before the dx kernel (before 2026-12-06)
    "tail-da-on": ((kl, "_TAIL_DA_SETTING", "1"),),  # dA behind it on the side stream, every shape
    "tail-da-cublas": ((kl, "TAIL_DA_BY", "cublas"),),  # dA behind it by cuBLAS (32613e4), not column_grad
    "tail-da-on-cublas": ((kl, "_TAIL_DA_SETTING", "1"), (kl, "TAIL_DA_BY", "cublas")),
    # xa by lora_fwd inside the layer's op under compile, as before the split (a trace-time switch: dynamo guards on
    # it, so the fused step compiles once more for it in its first warm-up)
    "split-off": ((lora_ops, "COMPILED_SPLIT", [False]),),
    # xa recomputed under compiled checkpointing, not kept by peftkern's joint pass (ops/_compile_passes.py; a
    # trace-time switch, as split-off)
    "keep-xa-off": ((_compile_passes, "SAVE_XA", [False]),),
    # the forward's lora_xa and lora_fwd_xa left apart after the partition, not joined again into lora_fwd
    "rejoin-off": ((_compile_passes, "REJOIN_XA", [False]),),
    # each layer's xa made apart, not one product for the layers that share x (q, k and v; a trace-time switch)
    "group-xa-off": ((_compile_passes, "GROUP_XA", [False]),),
    # x and xa saved before the product under eager checkpointing (ops/lora.EAGER_SPLIT; with --checkpointing)
    "eager-split": ((lora_ops, "EAGER_SPLIT", [True]),),  # the default since 2026-12-07
    "eager-split-off": ((lora_ops, "EAGER_SPLIT", [False]),),
    # the forward by cuBLAS (xa B^T added by its epilogue), not the persistent kernel; the backward's dx likewise
    "persistent-off": ((kl, "PERSISTENT_FORWARD", False),),
    "persistent-dx-off": ((kl, "PERSISTENT_DX", False),),
    # dyb and dB from two products, not lora_dyb_db_kernel's one read of dy and its finishing launch
    "dyb-db-off": ((kl, "DYB_DB", False),),
    # the persistent kernel's tile walk in groups of 4 row tiles, not 8 (PEFTKERN_LORA_GROUP_M)
    "group-m-4": ((kl, "PERSISTENT_GROUP_M", 4),),
    # no xa made inside the persistent kernel (workers, helpers): a product of its own before it. At run time only:
    # group_xa decided at trace time, so gate and up keep their own products here (PEFTKERN_LORA_XA_WORKERS=0 and
    # PEFTKERN_LORA_XA_HELPERS=0 in a fresh process group them)
    "xa-inside-off": ((kl, "XA_WORKERS", False), (kl, "XA_HELPERS", False)),
    "skinny-main+direct-off": ((kl, "SKINNY_GRADS", True), (kl, "SKINNY_SIDE", False),
                               (_launch, "DIRECT_LAUNCH", [False])),
}


def timed(step, steps: int) -> tuple[float, float]:
    """(GPU ms a step by CUDA events, host ms a step until the last one is queued): the medians of bench e2e's three
    repeats of `steps` steps, after 2 warm-up steps. Inductor's compile workers are stopped after the warm-up, as bench
    e2e stops them: a warm-up that compiled (round 0, a trace-time switch) left them busy on the host while the steps
    were timed (a review of the benchmarks, 2026-12-07)."""
    for _ in range(2):
        step()
    settle_compile()
    torch.cuda.synchronize()
    host: list = []
    gpu = _repeats(step, steps, "cuda", host)
    return statistics.median(gpu), statistics.median(host)


def apply(setting: str, saved: dict) -> None:
    for (module, name), value in saved.items():
        setattr(module, name, value)
    for module, name, value in SETTINGS[setting]:
        setattr(module, name, value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="1b")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--settings", nargs="*", default=["default", "direct-off", "cublas-side"],
                        choices=list(SETTINGS))
    parser.add_argument("--optimizers", nargs="+", default=["adamw"], choices=workloads.OPTIMIZERS,
                        help="each setting runs with each optimizer, against the frozen step with the same one")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a GPU")
        return 0
    saved = {(m, n): getattr(m, n) for s in SETTINGS.values() for m, n, _ in s}
    steps = {}
    for impl in ("frozen", "fused"):
        torch.manual_seed(0)
        model = workloads.build("lora", impl, args.shape, "cuda", torch.bfloat16, 16, False, max_positions=2048)
        for opt in args.optimizers:  # one model, one optimizer (and its state) per closure
            steps[impl, opt] = workloads.training_step(model, 4, 2048, "cuda", args.compile, args.checkpointing,
                                                       optimizer=opt)
    what = f"lora {args.shape}" + (" +ckpt" if args.checkpointing else "") + (" compiled" if args.compile else "")
    print(f"{what}: {torch.cuda.get_device_name()}, torch {torch.__version__}; {args.steps} steps a sample", flush=True)
    results = {(s, o): [] for s in ["frozen", *args.settings] for o in args.optimizers}
    for rnd in range(args.rounds):
        for opt in args.optimizers:
            apply("default", saved)
            gpu, host = timed(steps["frozen", opt], args.steps)
            results["frozen", opt].append((gpu, host))
            print(f"round {rnd}: {'frozen, ' + opt:36s} {gpu:6.2f} ms (host {host:6.2f})", flush=True)
            for setting in args.settings:
                apply(setting, saved)
                gpu, host = timed(steps["fused", opt], args.steps)
                results[setting, opt].append((gpu, host))
                print(f"round {rnd}: {setting + ', ' + opt:36s} {gpu:6.2f} ms (host {host:6.2f}), "
                      f"{results['frozen', opt][-1][0] / gpu:.3f}x the frozen step", flush=True)
    apply("default", saved)
    print(f"medians over {args.rounds} rounds:")
    for opt in args.optimizers:
        frozen = statistics.median(g for g, _ in results["frozen", opt])
        host = statistics.median(h for _, h in results["frozen", opt])
        print(f"  {'frozen, ' + opt:36s} {frozen:6.2f} ms (host {host:6.2f})")
        for setting in args.settings:
            g = statistics.median(x for x, _ in results[setting, opt])
            h = statistics.median(x for _, x in results[setting, opt])
            print(f"  {setting + ', ' + opt:36s} {g:6.2f} ms (host {h:6.2f}), {frozen / g:.3f}x")
    print(f"launches by path: {_launch.stats}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
