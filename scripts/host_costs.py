"""The host's cost of each piece of the fused LoRA layer, one at a time: what the CPU spends to enqueue it.

cpu_overhead.py measured the fused PEFT layer at 2.1x the host time of PEFT's own (1300 vs 613 us per forward +
backward on the H100 machine, M = 8192, 2048 x 2048), and the 1b training step is bound by the host. This times
each step of the layer's path separately, with the GPU's work queued but not waited for (the median of 7 batches of
30 calls after warm-up, the launch queue never fills), so the numbers add up to where the time goes.

    python scripts/host_costs.py [--m 8192 --k 2048 --n 2048 --r 16]
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton
import triton.language as tl
from cpu_overhead import add_layer_shape_args, layer_tensors, per_call_us  # this folder: the same enqueue-only timing


@triton.jit
def _noop_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a GPU")
        return 0
    from triton.tools.tensor_descriptor import TensorDescriptor

    from peftkern.kernels.triton import _launch
    from peftkern.kernels.triton import lora as tk
    from peftkern.ops import _common
    from peftkern.ops import lora as ops

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_layer_shape_args(parser)
    args = parser.parse_args()
    M, K, N, R = args.m, args.k, args.n, args.r
    dev, dt = "cuda", torch.bfloat16
    x, W, A, B, dy = layer_tensors(args)
    A32, B32 = A.float(), B.float()
    dyb = dy @ B
    xa = tk.mm_float32(x, A.t())
    seed = torch.zeros((), dtype=torch.int64)
    needs = (True, True, True, False, False)
    small = torch.zeros(1024, device=dev)
    Ar, Br = A.clone().requires_grad_(), B.clone().requires_grad_()
    xr = x.clone().requires_grad_()

    def full_op():
        y = ops.lora_linear(xr, W, Ar, Br, 2.0)
        torch.autograd.grad(y, [xr, Ar, Br], dy)

    xa16 = xa.to(dt)
    main = torch.cuda.current_stream()

    def overlap(side):
        with tk._Overlap(x.device) as ov:
            if side:
                with ov.side():
                    pass

    class Identity(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.view_as(t)

        @staticmethod
        def backward(ctx, g):
            return g

    gx = torch.ones_like(xr)

    def identity_op():
        torch.autograd.grad(Identity.apply(xr), [xr], gx)

    def checkpointed_op():
        y = torch.utils.checkpoint.checkpoint(ops.lora_linear, xr, W, Ar, Br, 2.0, use_reentrant=False)
        torch.autograd.grad(y, [xr, Ar, Br], dy)

    def jit_dispatch(fn):
        """fn with every Triton launch through kernel[grid](...) (kernels/triton/_launch.py's fast path off)."""
        def run():
            _launch.FAST_LAUNCH[0] = False
            try:
                return fn()
            finally:
                _launch.FAST_LAUNCH[0] = True
        return run

    pieces = {
        "F.linear(x, W)": lambda: torch.nn.functional.linear(x, W),
        "torch.mm(x, A^T) bf16": lambda: torch.mm(x, A.t()),
        "mm_float32(x, A^T)": lambda: tk.mm_float32(x, A.t()),
        "(x @ A^T).float()": lambda: (x @ A.t()).float(),
        "torch.mm(dyb^T, x)": lambda: torch.mm(dyb.t(), x),
        "torch.mm(dy^T, xa.bf16)": lambda: torch.mm(dy.t(), xa.to(dt)),
        "dy @ B": lambda: dy @ B,
        "mul_ on (r, K)": lambda: A.clone().mul_(2.0),
        "A.to(bf16) (same dtype)": lambda: A.to(dt),
        "A32.to(bf16)": lambda: A32.to(dt),
        "torch.empty((M, N))": lambda: torch.empty((M, N), device=dev, dtype=dt),
        "empty_buffers: (M, N), (M, r), zeroed flags": lambda: _launch.empty_buffers(
            x, ((M, N), dt, False), ((M, R), dt, False), ((64,), torch.int32, True)),
        "TensorDescriptor.from_tensor": lambda: TensorDescriptor.from_tensor(x, [128, 64]),
        "a 2-arg Triton launch": lambda: _noop_kernel[(1,)](small, 1024, BLOCK=1024),
        "persistent_forward_ok": lambda: tk.persistent_forward_ok(x, W, A),
        "persistent_forward": lambda: tk.persistent_forward(x, W, A, B, 2.0),
        "lora_forward (default mode)": lambda: tk.lora_forward(x, W, A, B, 2.0, None, 0.0, 0, False),
        "fused_matmul (dx)": lambda: tk.fused_matmul(dy, W.t(), A.t(), dyb, 2.0),
        "lora_backward (dx, dA, dB)": lambda: tk.lora_backward(dy, x, W, A, B, xa, 2.0, 0.0, 0, False, needs),
        "lora_backward, fp32 adapters": lambda: tk.lora_backward(dy, x, W, A32, B32, xa, 2.0, 0.0, 0, False, needs),
        "_lora_fwd": lambda: ops._lora_fwd(x, W, A, B, None, seed, 2.0, 0.0, False, "triton"),
        "_lora_bwd": lambda: ops._lora_bwd(dy, x, W, A, B, xa, seed, 2.0, 0.0, False, "triton", *needs),
        "check_lora_inputs": lambda: ops.check_lora_inputs(x, W, A, B, None, False),
        "prepare_linear": lambda: _common.prepare_linear("lora", x, W, None, K),
        "check_scalar": lambda: _common.check_scalar("scaling", 2.0),
        "draw_seed": _common.draw_seed,
        "op_range (off)": lambda: _common.op_range("x").__enter__(),
        "torch.compiler.is_compiling": torch.compiler.is_compiling,
        "lora_linear fwd + autograd.grad": full_op,
        # the backward's pieces beside the dx kernel, and what they could be instead
        "scaled_mm(dy^T, xa, 2) bf16 (addmm)": lambda: tk.scaled_mm(dy.t(), xa16, 2.0, dt),
        "scaled_mm(dy^T, xa, 2) fp32 out": lambda: tk.scaled_mm(dy.t(), xa16, 2.0, torch.float32),
        "scaled_mm(dy^T, xa, 1) bf16 (mm)": lambda: tk.scaled_mm(dy.t(), xa16, 1.0, dt),
        "mm_float32(dy^T, xa)": lambda: tk.mm_float32(dy.t(), xa16),
        "_Overlap enter + exit": lambda: overlap(False),
        "_Overlap with side() entered": lambda: overlap(True),
        "torch.zeros(64, int32)": lambda: torch.zeros(64, device=dev, dtype=torch.int32),
        "t.record_stream(main)": lambda: xa16.record_stream(main),
        "an identity autograd.Function fwd + grad": identity_op,
        "lora_fwd by the dispatcher (custom op)": lambda: torch.ops.peftkern.lora_fwd(
            x, W, A, B, None, None, 2.0, 0.0, False, "triton"),
        "lora_bwd by the dispatcher (custom op)": lambda: torch.ops.peftkern.lora_bwd(
            dy, x, W, A, B, xa16, None, 2.0, 0.0, False, "triton", *needs),
        "_lora_bwd_eager": lambda: ops._lora_bwd_eager(
            dy, x, W, A, B, xa16, None, 2.0, 0.0, False, "triton", *needs),
        "lora_linear fwd + grad, checkpointed": checkpointed_op,
    }
    # each with Triton's own dispatch and with _launch's fast path, alternated: the host drifts between pieces
    pairs = {
        "persistent_forward": lambda: tk.persistent_forward(x, W, A, B, 2.0),
        "fused_matmul (dx)": lambda: tk.fused_matmul(dy, W.t(), A.t(), dyb, 2.0),
        "lora_linear fwd + autograd.grad": full_op,
    }
    print(f"host us per call (enqueue only), M={M} K={K} N={N} r={R}, {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}, triton {triton.__version__}")
    for name, fn in pieces.items():
        print(f"  {name:38s} {per_call_us(fn, host_only=True):8.1f}")
    print("Triton's dispatch (kernel[grid]) against kernels/triton/_launch.py's fast path, alternated 3 times:")
    for name, fn in pairs.items():
        jit, fast = [], []
        for _ in range(3):
            jit.append(per_call_us(jit_dispatch(fn), host_only=True))
            fast.append(per_call_us(fn, host_only=True))
        print(f"  {name:38s} JIT {sorted(jit)[1]:8.1f}   fast {sorted(fast)[1]:8.1f}")
    print("the fast path by Triton's launcher, by its C launcher with memoised tensor maps (direct), and by "
          "csrc/launch.cpp (native, where the extension is built), alternated 3 times:")
    direct_pairs = {**pairs, "lora_backward (dx, dA, dB)": pieces["lora_backward (dx, dA, dB)"],
                    "_lora_fwd": pieces["_lora_fwd"]}
    modes = {"Triton's": (False, False), "direct": (True, False), "native": (True, True)}
    for name, fn in direct_pairs.items():
        times = {mode: [] for mode in modes}
        for _ in range(3):
            for mode, (direct, native) in modes.items():
                _launch.DIRECT_LAUNCH[0], _launch.NATIVE_LAUNCH[0] = direct, native
                times[mode].append(per_call_us(fn, host_only=True))
        _launch.DIRECT_LAUNCH[0] = _launch.NATIVE_LAUNCH[0] = True
        print(f"  {name:38s} " + "   ".join(f"{mode} {sorted(t)[1]:8.1f}" for mode, t in times.items()))
    print(f"launches by path: {_launch.stats}")
    print(f"addmm with out_dtype (float32 adapter gradients in one call): {tk._addmm_out_dtype[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
