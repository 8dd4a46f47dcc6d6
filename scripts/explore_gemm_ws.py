"""Exploration on an H100: can a Triton GEMM for y = x W^T match cuBLAS on Hopper, so LoRA can ride in its epilogue?

The question. The LoRA forward is y = x W^T + s (x A^T) B^T. Its low-rank term is a small fraction of the GEMM's
flops (r/K for xa B^T), but done apart from the GEMM it costs passes over y; fused into the GEMM's epilogue it costs
one small MMA (K = r) per output tile. That only pays if the fused GEMM itself is about as fast as cuBLAS. Our
non-persistent kernels in peftkern/kernels/triton/lora.py (pointer loads, or TMA with host descriptors) are not, for
the K-major weight of nn.Linear (W: N x K row-major), so the forward keeps cuBLAS (NOTES-lora.md has those
measurements). This script times the Hopper techniques that kernel lacks:
  * persistent: one program per SM (grid = the SM count) loops over output tiles in grouped, L2-friendly order,
    so one tile's epilogue can overlap the next tile's loads; with flatten=True the tile and K loops become one
    software pipeline;
  * TMA descriptors built on the device (tl.make_tensor_descriptor; their scratch comes from triton.set_allocator);
  * automatic warp specialization, tl.range(..., warp_specialize=True), on the tile loop or on the K loop: a
    producer warp group issues the TMA loads while the consumer warps run the wgmma. Triton 3.6 has a Hopper pass
    for it; per Triton's own tests it applies only with num_warps=4 (with 8 it is dropped silently) and Triton's
    tutorial turns flatten off with it on Hopper. Whether it applied is read from each compiled kernel's TTGIR;
  * epilogue subtiling: the tile is stored as two halves, which frees shared memory for one more stage.

What it times, bf16, random normal inputs, at (M, N, K) = (8192, 4096, 4096), (8192, 11008, 4096), (2048, 4096, 4096):
  1. cuBLAS, torch.nn.functional.linear(x, W): the bar;
  2. the persistent TMA GEMM: flattened, not flattened, warp-specialized on the tile loop, and on the K loop;
  3. the persistent GEMM with the LoRA term fused: acc += (xa * s) B^T after the K loop (xa = x A^T, M x 16,
     float32, given; B: N x 16), one small tl.dot, with the xa and B tiles brought by pointer loads or by TMA, on
     each base kernel's two best configs; next to the two cuBLAS ways of adding the term that the op runs today
     (addmm after the GEMM, or the term first with the GEMM accumulated onto it);
  4. non-persistent TMA GEMMs: host descriptors (as lora.py), device descriptors, warp-specialized K loop.

Timing: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"), twice per variant; ms = the mean of
the two medians. cuBLAS is timed again between the two and the ratio is taken against that (variant, cuBLAS,
variant: a drift of the GPU's clocks over the minutes of a run cancels to first order); cuBLAS is also timed at the
start and at the end (the cublas_end row shows the drift), and nvidia-smi's SM clock, temperature and power are
noted. TFLOP/s = 2MNK / t (the LoRA term's flops not counted). Correctness: the output is NaN-poisoned before the
first run and checked against float32 torch (x W^T, plus the LoRA term) by relative Frobenius error < 1e-2; a
variant that fails is WRONG and gets no time. Every warp-specialized config is first compiled and run once on a
small problem in a child process, so a compiler pass that aborts cannot end the run; a config that fails there, or
fails to compile or launch here, prints one line and the run goes on. A kernel that hangs ends the run with the
summary printed. The last ~30 lines are the summary; $OUT/explore_gemm_ws.json (if OUT is set) has every row: both
medians, the cuBLAS time between them, registers, spills, warps, whether warp specialization applied, and the
errors.

    python scripts/explore_gemm_ws.py          # needs an sm90 GPU; about 2 minutes with cold compiles
Knobs (environment): EXPLORE_BUDGET_S (default 100: seconds after which the remaining Triton rows are skipped),
EXPLORE_STALL_S (default 60: one row taking longer is taken as hung), EXPLORE_PROBE_TIMEOUT_S (default 120),
EXPLORE_WS_FLATTEN=1 (also try warp specialization with flatten=True, which Triton's tutorial turns off on Hopper).
"""

from __future__ import annotations

import dataclasses
import faulthandler
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import triton
import triton.language as tl

# the grouped tile order of the persistent kernels, shared with the op (kernels/triton/lora.py)
from peftkern.kernels.triton.lora import _tile_coords, _tile_counts  # noqa: E402

SHAPES = [(8192, 4096, 4096), (8192, 11008, 4096), (2048, 4096, 4096)]  # (M, N, K)
RANK = 16
SCALING = 2.0
TOL = 1e-2
GROUP_M = 8

# --------------------------------------------------------------------------------------------- kernels


@triton.jit
def _add_lora(acc, xa_ptr, b_ptr, off_m, off_n, M, N, R, stride_xam, stride_bn, scaling,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, dtype: tl.constexpr):
    """acc += (s xa[rows]) B[cols]^T: one MMA with K = r on operands that sit in L2."""
    rows = off_m + tl.arange(0, BLOCK_M)
    cols = off_n + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_R)
    xa = tl.load(xa_ptr + rows[:, None] * stride_xam + rk[None, :],
                 mask=(rows[:, None] < M) & (rk[None, :] < R), other=0.0)
    b = tl.load(b_ptr + cols[:, None] * stride_bn + rk[None, :],
                mask=(cols[:, None] < N) & (rk[None, :] < R), other=0.0)
    return tl.dot((xa * scaling).to(dtype), b.to(dtype).T, acc)


@triton.jit
def _store_tile(y_desc, acc, off_m, off_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUBTILE: tl.constexpr):
    if SUBTILE:
        # (BM, BN) -> (BM, 2, BN/2) -> (BM, BN/2, 2), then split the last axis: the left and right halves.
        halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
        left, right = tl.split(halves)
        y_desc.store([off_m, off_n], left.to(y_desc.dtype))
        y_desc.store([off_m, off_n + BLOCK_N // 2], right.to(y_desc.dtype))
    else:
        y_desc.store([off_m, off_n], acc.to(y_desc.dtype))


@triton.jit
def gemm_persistent_kernel(
    x_ptr, w_ptr, y_ptr, xa_ptr, b_ptr,
    M, N, K, R,
    stride_xm, stride_wn, stride_ym, stride_xam, stride_bn,
    scaling,
    NUM_SMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, BLOCK_R: tl.constexpr, STORE_N: tl.constexpr,
    SUBTILE: tl.constexpr, FLATTEN: tl.constexpr, WS_TILE: tl.constexpr, WS_K: tl.constexpr,
    HAS_LORA: tl.constexpr, LORA_TMA: tl.constexpr,
):
    """y = x w^T (+ s xa b^T), one program per SM looping over output tiles; every big tile moves by TMA through
    descriptors made here on the device (their 128-byte tensormaps live in triton.set_allocator's scratch).
    LORA_TMA: the LoRA operands' tiles come by TMA too, rather than by pointer loads."""
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_wn, 1], block_shape=[BLOCK_N, BLOCK_K])
    y_desc = tl.make_tensor_descriptor(y_ptr, shape=[M, N], strides=[stride_ym, 1], block_shape=[BLOCK_M, STORE_N])
    if HAS_LORA and LORA_TMA:
        xa_desc = tl.make_tensor_descriptor(xa_ptr, shape=[M, R], strides=[stride_xam, 1],
                                            block_shape=[BLOCK_M, BLOCK_R])
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, R], strides=[stride_bn, 1], block_shape=[BLOCK_N, BLOCK_R])
    start = tl.program_id(0)
    num_m, num_n, num_tiles, k_tiles = _tile_counts(M, N, K, BLOCK_M, BLOCK_N, BLOCK_K)
    # The epilogue finds its tile from a counter of its own rather than reusing the loop's: once the loops are
    # flattened and pipelined, the loads of the next tile run ahead of this tile's epilogue, and one value used
    # by both ends is what Triton's pipeliner has had trouble with.
    out_tile = start - NUM_SMS
    for tile in tl.range(start, num_tiles, NUM_SMS, flatten=FLATTEN, warp_specialize=WS_TILE):
        pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in tl.range(k_tiles, warp_specialize=WS_K):
            off_k = kk * BLOCK_K
            # W is K-major (nn.Linear's layout): its (BLOCK_N, BLOCK_K) tile enters the MMA transposed.
            acc = tl.dot(x_desc.load([off_m, off_k]), w_desc.load([off_n, off_k]).T, acc)
        out_tile += NUM_SMS
        out_m, out_n = _tile_coords(out_tile, num_m, num_n, GROUP_M)
        if HAS_LORA:
            if LORA_TMA:
                xa = xa_desc.load([out_m * BLOCK_M, 0])
                b = b_desc.load([out_n * BLOCK_N, 0])
                acc = tl.dot((xa * scaling).to(x_ptr.dtype.element_ty), b.T, acc)
            else:
                acc = _add_lora(acc, xa_ptr, b_ptr, out_m * BLOCK_M, out_n * BLOCK_N, M, N, R, stride_xam, stride_bn,
                                scaling, BLOCK_M, BLOCK_N, BLOCK_R, x_ptr.dtype.element_ty)
        _store_tile(y_desc, acc, out_m * BLOCK_M, out_n * BLOCK_N, BLOCK_M, BLOCK_N, SUBTILE)


@triton.jit
def gemm_tile_kernel(
    x, w, y,
    M, N, K,
    stride_xm, stride_wn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    STORE_N: tl.constexpr, SUBTILE: tl.constexpr, HOST_DESC: tl.constexpr, WS_K: tl.constexpr,
):
    """Non-persistent y = x w^T, one output tile per program. HOST_DESC: x, w, y are TensorDescriptors made on the
    host (as lora.py's TMA kernel does); otherwise they are tensors and the descriptors are made here."""
    if HOST_DESC:
        x_desc = x
        w_desc = w
        y_desc = y
    else:
        x_desc = tl.make_tensor_descriptor(x, shape=[M, K], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_K])
        w_desc = tl.make_tensor_descriptor(w, shape=[N, K], strides=[stride_wn, 1], block_shape=[BLOCK_N, BLOCK_K])
        y_desc = tl.make_tensor_descriptor(y, shape=[M, N], strides=[stride_ym, 1], block_shape=[BLOCK_M, STORE_N])
    pid_m, pid_n = _tile_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in tl.range(tl.cdiv(K, BLOCK_K), warp_specialize=WS_K):
        off_k = kk * BLOCK_K
        acc = tl.dot(x_desc.load([off_m, off_k]), w_desc.load([off_n, off_k]).T, acc)
    _store_tile(y_desc, acc, off_m, off_n, BLOCK_M, BLOCK_N, SUBTILE)


# ------------------------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Cfg:
    bm: int
    bn: int
    bk: int
    stages: int
    warps: int
    subtile: bool = False

    def label(self) -> str:
        return f"{self.bm}x{self.bn}x{self.bk}s{self.stages}w{self.warps}{'+sub' if self.subtile else ''}"


@dataclass
class Variant:
    name: str
    kernel: str  # "persistent" | "tile"
    flags: dict
    cfgs: list
    lora: bool = False

    @property
    def ws(self) -> bool:
        return bool(self.flags.get("WS_TILE") or self.flags.get("WS_K"))


# Plain pipelining: 8 warps (two consumer warp groups) for the tiles that hold a 128x256 accumulator.
CFGS_PLAIN = [Cfg(128, 256, 64, 3, 8), Cfg(128, 256, 64, 4, 8, True), Cfg(128, 256, 64, 3, 8, True),
              Cfg(128, 128, 64, 4, 4), Cfg(256, 128, 64, 3, 8)]
CFGS_NOFLAT = [Cfg(128, 256, 64, 3, 8), Cfg(128, 256, 64, 3, 8, True), Cfg(256, 128, 64, 3, 8)]
# Warp specialization on Hopper: num_warps=4, the default partition's warps; the pass adds a producer warp group.
# (With num_warps=8 Triton 3.6 drops the request silently: Triton's own tests assert that, and the TTGIR check
# below would show it as "!" -- so no w8 config here.)
CFGS_WS = [Cfg(128, 256, 64, 3, 4), Cfg(128, 256, 64, 4, 4, True), Cfg(128, 128, 64, 4, 4),
           Cfg(256, 128, 64, 3, 4)]
CFGS_WS_K = [Cfg(128, 256, 64, 3, 4), Cfg(256, 128, 64, 3, 4)]
CFGS_TILE = [Cfg(128, 256, 64, 3, 8), Cfg(128, 256, 64, 4, 8, True)]


def _pflags(flatten=False, ws_tile=False, ws_k=False, lora_tma=False) -> dict:
    return dict(FLATTEN=flatten, WS_TILE=ws_tile, WS_K=ws_k, LORA_TMA=lora_tma)


BASE_VARIANTS = [
    Variant("persist", "persistent", _pflags(flatten=True), CFGS_PLAIN),
    Variant("persist_noflat", "persistent", _pflags(), CFGS_NOFLAT),
    Variant("persist_ws", "persistent", _pflags(ws_tile=True), CFGS_WS),
]
# LoRA fused into a base kernel, on that kernel's two fastest configs per shape (for a warp-specialized base, its
# fastest configs where warp specialization applied): (name, base, LoRA tiles by TMA rather than pointer loads).
LORA_VARIANTS = [
    ("lora_persist", "persist", False), ("lora_persist_tma", "persist", True),
    ("lora_persist_noflat", "persist_noflat", False), ("lora_persist_noflat_tma", "persist_noflat", True),
    ("lora_persist_ws", "persist_ws", False), ("lora_persist_ws_tma", "persist_ws", True),
]
LORA_TOP = 2
EXTRA_VARIANTS = [
    Variant("persist_wsK", "persistent", _pflags(ws_k=True), CFGS_WS_K),
    Variant("tile_hostdesc", "tile", dict(HOST_DESC=True, WS_K=False), CFGS_TILE),
    Variant("tile_devdesc", "tile", dict(HOST_DESC=False, WS_K=False), CFGS_TILE[:1]),
    Variant("tile_wsK", "tile", dict(HOST_DESC=False, WS_K=True), CFGS_WS_K),
]
if os.environ.get("EXPLORE_WS_FLATTEN") == "1":
    EXTRA_VARIANTS.append(Variant("persist_ws_flat", "persistent", _pflags(flatten=True, ws_tile=True), CFGS_WS[:2]))
DESCRIPTIONS = {
    "cublas": "torch.nn.functional.linear(x, W), measured first",
    "cublas_end": "the same, measured again at the end (drift check)",
    "persist": "persistent TMA, tile and K loops flattened into one pipeline",
    "persist_noflat": "persistent TMA, loops not flattened",
    "persist_ws": "persistent TMA, warp_specialize=True on the tile loop (flatten off)",
    "persist_wsK": "persistent TMA, warp_specialize=True on the K loop",
    "persist_ws_flat": "persistent TMA, warp_specialize + flatten on the tile loop",
    "tile_hostdesc": "non-persistent TMA, host TensorDescriptors (as lora.py)",
    "tile_devdesc": "non-persistent TMA, device descriptors",
    "tile_wsK": "non-persistent TMA, device descriptors, warp_specialize on the K loop",
    "cublas+lora_addmm": "cuBLAS GEMM, then y.addmm_(s xa, B^T) (the op below M=4096)",
    "cublas+lora_beta": "y = s xa B^T first, then y.addmm_(x, W^T) (the op from M=4096)",
}
for _name, _base, _tma in LORA_VARIANTS:
    DESCRIPTIONS[_name] = f"{_base} + LoRA epilogue ({'TMA' if _tma else 'pointer'} loads of xa, B tiles)"
SUMMARY_ORDER = (["cublas", "cublas_end"] + [v.name for v in BASE_VARIANTS] + [v.name for v in EXTRA_VARIANTS]
                 + [n for n, *_ in LORA_VARIANTS] + ["cublas+lora_addmm", "cublas+lora_beta"])
LORA_ROWS = {n for n, *_ in LORA_VARIANTS} | {"cublas+lora_addmm", "cublas+lora_beta"}


@dataclass
class Row:
    variant: str
    cfg: str
    M: int
    N: int
    K: int
    lora: bool = False
    status: str = "pending"  # ok | WRONG | FAILED | SKIPPED
    ms_runs: list = field(default_factory=list)
    ms: Optional[float] = None
    tflops: Optional[float] = None
    cublas_local_ms: Optional[float] = None  # cuBLAS timed between the variant's two runs
    ratio_vs_cublas: Optional[float] = None  # ms / cublas_local_ms
    ratio_vs_cublas_start: Optional[float] = None  # ms / the cuBLAS time taken at the start
    rel_err: Optional[float] = None
    ws_applied: Optional[bool] = None
    total_warps: Optional[int] = None
    n_regs: Optional[int] = None
    n_spills: Optional[int] = None
    shared_bytes: Optional[int] = None
    error: str = ""


# --------------------------------------------------------------------------------------------- harness


class State:
    def __init__(self):
        self.t0 = time.time()
        self.rows: list = []
        self.meta: dict = {}
        self.current: Optional[tuple] = None  # (label, start time) of the variant now running
        self.lock = threading.Lock()
        self.done = False


STATE = State()


def shape_key(M, N, K) -> str:
    return f"{M}x{N}x{K}"


def write_json():
    out = os.environ.get("OUT")
    if not out:
        return
    os.makedirs(out, exist_ok=True)
    payload = {"meta": STATE.meta, "descriptions": DESCRIPTIONS, "rows": [asdict(r) for r in STATE.rows]}
    tmp = os.path.join(out, "explore_gemm_ws.json.tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, os.path.join(out, "explore_gemm_ws.json"))


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    err = torch.linalg.vector_norm(y.float() - ref) / torch.linalg.vector_norm(ref)
    return float(err.item())


def bench_twice(fn: Callable) -> list:
    return [triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") for _ in range(2)]


def set_timing(row: Row, runs: list, cublas_local: Optional[float], cublas_start: Optional[float]):
    row.ms_runs = runs
    row.ms = sum(runs) / len(runs)
    row.tflops = 2.0 * row.M * row.N * row.K / (row.ms * 1e-3) / 1e12
    row.cublas_local_ms = cublas_local
    row.ratio_vs_cublas = row.ms / cublas_local if cublas_local else None
    row.ratio_vs_cublas_start = row.ms / cublas_start if cublas_start else None


def time_against_cublas(row: Row, fn: Callable, p: "Problem"):
    """Variant, cuBLAS, variant: the GPU's clocks drift over a run of minutes (cuBLAS itself by several percent
    between the start and the middle of a trial run on an H100), so each ratio is taken against a cuBLAS time
    measured between the variant's two runs."""
    first = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    local = triton.testing.do_bench(p.cublas_fn, warmup=25, rep=100, return_mode="median")
    second = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    set_timing(row, [first, second], local, p.cublas_ms)


def kernel_info(row: Row, ck, ws_requested: bool):
    """Registers, spills, shared memory, warps, and whether a warp-specialized region is in the TTGIR."""
    if ck is None:
        return
    row.n_regs = getattr(ck, "n_regs", None)
    row.n_spills = getattr(ck, "n_spills", None)
    meta = getattr(ck, "metadata", None)
    row.shared_bytes = getattr(meta, "shared", None)
    try:
        ttgir = ck.asm["ttgir"]
    except Exception:  # noqa: BLE001 - diagnostics only
        return
    row.ws_applied = "ttg.warp_specialize" in ttgir if ws_requested else None
    m = re.search(r'"?ttg\.total-num-warps"?\s*=\s*(\d+)', ttgir)
    row.total_warps = int(m.group(1)) if m else getattr(meta, "num_warps", None)


def first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # Triton's compile errors put the useful part last; keep the type and the last line.
    msg = lines[0] if len(lines) <= 1 else f"{lines[0][:60]} ... {lines[-1]}"
    return msg[:160]


def crash_line(stderr: str) -> str:
    """The line of a dead compiler's stderr that says why (an assertion, UNREACHABLE, an MLIR error)."""
    lines = [ln.strip() for ln in (stderr or "").splitlines() if ln.strip()]
    for key in ("Assertion", "UNREACHABLE", "LLVM ERROR", "error:", "Error"):
        for ln in lines:
            if key in ln:
                return re.sub(r"/\S*/", "", ln)[:160]
    return (lines[-1] if lines else "no stderr")[:160]


def gpu_state() -> str:
    """SM clock, temperature and power right now, from nvidia-smi (read only); "" if it cannot be asked."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,temperature.gpu,power.draw", "--format=csv,noheader",
                              f"--id={torch.cuda.current_device()}"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip().replace(", ", "/") if out.returncode == 0 else ""
    except Exception:  # noqa: BLE001 - diagnostics only
        return ""


def cuda_alive() -> bool:
    try:
        torch.cuda.synchronize()
        torch.zeros(1, device="cuda").add_(1).item()
        return True
    except Exception:  # noqa: BLE001
        return False


def fmt_row(r: Row) -> str:
    shape = shape_key(r.M, r.N, r.K)
    if r.status != "ok":
        return f"  {r.variant:<23} {r.cfg:<18} {shape:<15} {r.status}  {r.error}"
    runs = " ".join(f"{t:.4f}" for t in r.ms_runs)
    extra = []
    if r.ws_applied is not None:
        extra.append("ws=yes" if r.ws_applied else "ws=NOT-APPLIED")
    if r.total_warps is not None:
        extra.append(f"warps {r.total_warps}")
    if r.n_regs is not None:
        extra.append(f"regs {r.n_regs}")
    if r.n_spills:
        extra.append(f"SPILLS {r.n_spills}")
    ratio = f"{r.ratio_vs_cublas:.3f}x" if r.ratio_vs_cublas else "-"
    if r.cublas_local_ms:
        ratio += f" (cuBLAS {r.cublas_local_ms:.4f})"
    return (f"  {r.variant:<23} {r.cfg:<18} {shape:<15} {runs} ms {r.tflops:4.0f} TFLOP/s {ratio} "
            f"err {r.rel_err:.1e} {' '.join(extra)}")


def run_one(row: Row, launch: Callable, y: torch.Tensor, ref: torch.Tensor, p: "Problem",
            ws_requested: bool = False) -> Row:
    """Compile and run once into a NaN-poisoned y, check against ref, then time twice."""
    STATE.rows.append(row)
    with STATE.lock:
        STATE.current = (f"{row.variant} {row.cfg} {shape_key(row.M, row.N, row.K)}", time.time())
    stall = float(os.environ.get("EXPLORE_STALL_S", "60"))
    faulthandler.dump_traceback_later(stall + 30, exit=True)  # last resort if even the watchdog cannot run
    try:
        ck = launch()
        torch.cuda.synchronize()
        kernel_info(row, ck, ws_requested)
        row.rel_err = rel_err(y, ref)
        if not row.rel_err < TOL:
            row.status = "WRONG"
            row.error = f"rel err {row.rel_err:.3g} >= {TOL} (NaN = tiles left unwritten)"
        else:
            time_against_cublas(row, launch, p)
            row.status = "ok"
    except Exception as exc:  # noqa: BLE001 - an unsupported variant is a result, not a crash
        row.status = "FAILED"
        row.error = first_line(exc)
    finally:
        faulthandler.cancel_dump_traceback_later()
        with STATE.lock:
            STATE.current = None
    print(fmt_row(row), flush=True)
    write_json()
    return row


def watchdog():
    stall = float(os.environ.get("EXPLORE_STALL_S", "60"))
    while not STATE.done:
        time.sleep(1.0)
        with STATE.lock:
            cur = STATE.current
        if cur is not None and time.time() - cur[1] > stall:
            print(f"\nHUNG: {cur[0]} ran past {stall:.0f} s (a deadlocked kernel?); stopping here.", flush=True)
            STATE.meta["hung"] = cur[0]
            for r in STATE.rows:
                if r.status == "pending":
                    r.status, r.error = "FAILED", f"hung > {stall:.0f} s"
            print_summary()
            write_json()
            sys.stdout.flush()
            os._exit(2)


# ----------------------------------------------------------------------------------------------- problems


class Problem:
    def __init__(self, M: int, N: int, K: int):
        self.M, self.N, self.K = M, N, K
        dev, dt = "cuda", torch.bfloat16
        self.x = torch.randn(M, K, device=dev, dtype=dt)
        self.W = (torch.randn(N, K, device=dev, dtype=torch.float32) * K ** -0.5).to(dt)
        A = (torch.randn(RANK, K, device=dev, dtype=torch.float32) * K ** -0.5).to(dt)
        # B is large enough that a dropped or wrong LoRA term fails the 1e-2 check (the term is ~ the GEMM's size).
        self.B = (torch.randn(N, RANK, device=dev, dtype=torch.float32) * RANK ** -0.5).to(dt)
        self.xa = (self.x.float() @ A.float().t()).contiguous()  # (M, r) float32, as the op saves it
        self.ref = self.x.float() @ self.W.float().t()
        self.ref_lora = self.ref + SCALING * (self.xa @ self.B.float().t())
        self.cublas_ms: Optional[float] = None  # measured at the start

    def cublas_fn(self):
        return torch.nn.functional.linear(self.x, self.W)

    @property
    def key(self) -> str:
        return shape_key(self.M, self.N, self.K)

    def poisoned(self) -> torch.Tensor:
        return torch.full((self.M, self.N), float("nan"), device="cuda", dtype=torch.bfloat16)


def make_launch(p: Problem, cfg: Cfg, v: Variant, y: torch.Tensor, num_sms: int) -> Callable:
    store_n = cfg.bn // 2 if cfg.subtile else cfg.bn
    common = dict(BLOCK_M=cfg.bm, BLOCK_N=cfg.bn, BLOCK_K=cfg.bk, GROUP_M=GROUP_M, STORE_N=store_n,
                  SUBTILE=cfg.subtile, num_warps=cfg.warps, num_stages=cfg.stages, **v.flags)
    if v.kernel == "persistent":
        grid = (min(num_sms, triton.cdiv(p.M, cfg.bm) * triton.cdiv(p.N, cfg.bn)),)
        xa, b = (p.xa, p.B) if v.lora else (p.x, p.W)  # unused pointers when there is no LoRA term

        def launch():
            return gemm_persistent_kernel[grid](
                p.x, p.W, y, xa, b, p.M, p.N, p.K, RANK,
                p.x.stride(0), p.W.stride(0), y.stride(0), xa.stride(0), b.stride(0), SCALING,
                NUM_SMS=num_sms, BLOCK_R=max(16, triton.next_power_of_2(RANK)), HAS_LORA=v.lora, **common,
            )

        return launch

    grid = (triton.cdiv(p.M, cfg.bm) * triton.cdiv(p.N, cfg.bn),)
    if v.flags["HOST_DESC"]:
        from triton.tools.tensor_descriptor import TensorDescriptor

        # Built once, outside the timed call: the descriptors stay bound to these buffers.
        args = (TensorDescriptor.from_tensor(p.x, [cfg.bm, cfg.bk]),
                TensorDescriptor.from_tensor(p.W, [cfg.bn, cfg.bk]),
                TensorDescriptor.from_tensor(y, [cfg.bm, store_n]))
    else:
        args = (p.x, p.W, y)

    def launch():
        return gemm_tile_kernel[grid](*args, p.M, p.N, p.K, p.x.stride(0), p.W.stride(0), y.stride(0), **common)

    return launch


def over_budget() -> bool:
    return time.time() - STATE.t0 > float(os.environ.get("EXPLORE_BUDGET_S", "100"))


# A compiler pass that dies (Hopper's warp-specialization pass can abort on an assertion) would take the whole run
# with it, so every warp-specialized config is first compiled and run once on a small problem in a child process.
# The small problem has the same argument specialization (every size a multiple of 16) as the real ones, so the
# parent then finds the kernel in Triton's on-disk cache.
PROBE_SHAPE = (512, 512, 512)


def probe(pairs: list, num_sms: int) -> dict:
    """{(variant, cfg label): why} for the (Variant, Cfg) pairs whose probe failed, crashed or hung."""
    items = [dict(id=i, name=v.name, kernel=v.kernel, flags=v.flags, lora=v.lora, cfg=asdict(c))
             for i, (v, c) in enumerate(pairs)]
    verdict: dict = {}
    timeout = float(os.environ.get("EXPLORE_PROBE_TIMEOUT_S", "120"))
    pending = items
    while pending:
        spec = json.dumps(dict(num_sms=num_sms, items=pending))
        try:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--probe", spec],
                                  capture_output=True, text=True, timeout=timeout)
            out, err, rc = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            err, rc = "", None
        # The child marks each item's start on stderr too, so what the compiler printed there (an MLIR pass's
        # reason for failing) can be told apart per item.
        err_of: dict = {}
        current = None
        for line in err.splitlines():
            if line.startswith("@@START "):
                current = int(line.split()[1])
            elif current is not None:
                err_of[current] = err_of.get(current, "") + line + "\n"
        started = None
        for line in out.splitlines():
            parts = line.split(" ", 2)
            if parts[0] == "START":
                started = int(parts[1])
            elif parts[0] in ("OK", "FAIL"):
                i = int(parts[1])
                verdict[i] = "" if parts[0] == "OK" else "probe: " + (parts[2] if len(parts) > 2 else "")
                if parts[0] == "FAIL" and err_of.get(i, "").strip():
                    verdict[i] += f" [{crash_line(err_of[i])}]"
                started = None
        if started is not None:
            verdict[started] = (f"compiler/process died (rc {rc}): {crash_line(err_of.get(started, err))}"
                                if rc is not None else f"probe hung > {timeout:.0f} s")
        left = [it for it in pending if it["id"] not in verdict]
        if len(left) == len(pending):  # no progress: the child failed before its first item
            for it in left:
                verdict[it["id"]] = f"probe process failed (rc {rc}): {crash_line(err)}"
            break
        pending = left
    return {(items[i]["name"], Cfg(**items[i]["cfg"]).label()): why for i, why in verdict.items() if why}


def probe_child(spec: str) -> int:
    """Child side of probe(): compile and run each item once on a small problem, reporting as it goes."""
    task = json.loads(spec)
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, device="cuda", dtype=torch.int8))
    torch.manual_seed(0)
    p = Problem(*PROBE_SHAPE)
    for it in task["items"]:
        print(f"START {it['id']}", flush=True)
        print(f"@@START {it['id']}", file=sys.stderr, flush=True)
        try:
            v = Variant(it["name"], it["kernel"], it["flags"], [], lora=it["lora"])
            launch = make_launch(p, Cfg(**it["cfg"]), v, p.poisoned(), task["num_sms"])
            launch()
            torch.cuda.synchronize()
            print(f"OK {it['id']}", flush=True)
        except Exception as exc:  # noqa: BLE001
            print(f"FAIL {it['id']} {first_line(exc)}", flush=True)
            if not cuda_alive():
                return 3
    return 0


def plan(v: Variant, problems: list, cfgs_for: Optional[Callable]) -> dict:
    """{cfg: [problems]}: each config compiles once and then serves every shape."""
    cfg_shapes: dict = {}
    for p in problems:
        for cfg in (cfgs_for(p) if cfgs_for else v.cfgs):
            cfg_shapes.setdefault(cfg, []).append(p)
    return cfg_shapes


def run_variant(v: Variant, cfg_shapes: dict, blocked: dict, num_sms: int) -> bool:
    """Returns False if the CUDA context died and nothing more can run."""
    for cfg, plist in cfg_shapes.items():
        why = blocked.get((v.name, cfg.label()))
        if why:
            for p in plist:
                STATE.rows.append(Row(v.name, cfg.label(), p.M, p.N, p.K, lora=v.lora, status="FAILED", error=why))
            print(f"  {v.name:<23} {cfg.label():<18} {'all shapes':<15} FAILED  {why}", flush=True)
            continue
        for i, p in enumerate(plist):
            row = Row(v.name, cfg.label(), p.M, p.N, p.K, lora=v.lora)
            if over_budget():
                row.status, row.error = "SKIPPED", "time budget spent"
                STATE.rows.append(row)
                continue
            y = p.poisoned()
            run_one(row, make_launch(p, cfg, v, y, num_sms), y, p.ref_lora if v.lora else p.ref, p, v.ws)
            if row.status == "FAILED" and not cuda_alive():
                print("CUDA context lost after that failure: stopping the Triton runs.", flush=True)
                STATE.meta["cuda_context_lost_at"] = f"{row.variant} {row.cfg} {p.key}"
                return False
            if row.status == "FAILED" and i == 0:
                # A compile or launch failure is the same on every shape: record it for all, run it once.
                for q in plist[1:]:
                    STATE.rows.append(Row(v.name, cfg.label(), q.M, q.N, q.K, lora=v.lora, status="FAILED",
                                          error=row.error))
                break
    return True


def run_phase(variants: list, problems: list, num_sms: int, cfgs_for: Optional[dict] = None) -> bool:
    plans = {v.name: plan(v, problems, (cfgs_for or {}).get(v.name)) for v in variants}
    risky = [(v, c) for v in variants if v.ws for c in plans[v.name]]
    blocked = probe(risky, num_sms) if risky and not over_budget() else {}
    for v in variants:
        if not run_variant(v, plans[v.name], blocked, num_sms):
            return False
    return True


def best_configs(variant: str, p: Problem, n: int, ws_only: bool) -> list:
    """The n best configs of a base variant at p's shape; for a warp-specialized base, only configs where it
    applied, each also with one stage fewer (the warp-specialized kernel keeps more buffers in shared memory)."""
    rows = [r for r in STATE.rows if r.variant == variant and r.status == "ok" and (r.M, r.N, r.K) == (p.M, p.N, p.K)
            and (r.ws_applied or not ws_only)]
    rows.sort(key=lambda r: r.ratio_vs_cublas)
    by_label = {c.label(): c for v in BASE_VARIANTS for c in v.cfgs}
    cfgs = [by_label[r.cfg] for r in rows[:n]]
    if ws_only:
        cfgs += [dataclasses.replace(c, stages=c.stages - 1) for c in cfgs if c.stages > 2]
    return cfgs


def cublas_rows(problems: list, name: str):
    for p in problems:
        y = torch.nn.functional.linear(p.x, p.W)
        row = Row(name, "torch", p.M, p.N, p.K)
        row.rel_err = rel_err(y, p.ref)
        set_timing(row, bench_twice(p.cublas_fn), None, p.cublas_ms)
        if p.cublas_ms is None:
            p.cublas_ms = row.ms
            row.ratio_vs_cublas_start = 1.0
        row.ratio_vs_cublas = row.ratio_vs_cublas_start  # for cuBLAS itself: the drift since the start
        row.status = "ok" if row.rel_err < TOL else "WRONG"
        STATE.rows.append(row)
        print(fmt_row(row), flush=True)


def cublas_lora_rows(p: Problem):
    x, W, xa, bt = p.x, p.W, p.xa, p.B.t()

    def addmm_after():
        return torch.nn.functional.linear(x, W).addmm_((xa * SCALING).to(x.dtype), bt)

    def beta_first():
        return torch.mm((xa * SCALING).to(x.dtype), bt).addmm_(x, W.t())

    for name, fn in (("cublas+lora_addmm", addmm_after), ("cublas+lora_beta", beta_first)):
        row = Row(name, "torch", p.M, p.N, p.K, lora=True)
        STATE.rows.append(row)
        try:
            row.rel_err = rel_err(fn(), p.ref_lora)
            time_against_cublas(row, fn, p)
            row.status = "ok" if row.rel_err < TOL else "WRONG"
        except Exception as exc:  # noqa: BLE001
            row.status, row.error = "FAILED", first_line(exc)
        print(fmt_row(row), flush=True)


# ------------------------------------------------------------------------------------------------ summary


def print_summary():
    keys = [shape_key(*s) for s in SHAPES]
    best: dict = {}
    for r in STATE.rows:
        if r.status != "ok":
            continue
        k = (r.variant, shape_key(r.M, r.N, r.K))
        if k not in best or (r.ratio_vs_cublas or 0) < (best[k].ratio_vs_cublas or 0):
            best[k] = r
    m = STATE.meta
    print(f"\n==== explore_gemm_ws: {m.get('device', '?')}, {m.get('num_sms', '?')} SMs, triton {triton.__version__}, "
          f"torch {torch.__version__}, {time.time() - STATE.t0:.0f} s ====")
    print("best valid config per variant, picked by Nx = its ms / a cuBLAS ms timed between its two runs (drift);")
    print("ms = the mean of two do_bench medians; T = TFLOP/s of 2MNK; for cublas_end, Nx = drift since the start;")
    print("* = warp specialization applied (TTGIR has ttg.warp_specialize), ! = asked for but not applied; "
          f"GPU clock/temp/power after warm-up {m.get('gpu_after_warmup') or '?'}, at the end "
          f"{m.get('gpu_end') or '?'}")
    print((f"{'variant':<24}" + "".join(f"| {k:<38}" for k in keys)).rstrip())
    for name in SUMMARY_ORDER:
        cells = []
        for k in keys:
            r = best.get((name, k))
            if r is None:
                cells.append(f"| {'-':<38}")
                continue
            mark = {True: "*", False: "!", None: ""}[r.ws_applied]
            cfg = "" if r.cfg == "torch" else r.cfg + mark
            ratio = f"{r.ratio_vs_cublas:5.2f}x" if r.ratio_vs_cublas else "    -"
            cells.append(f"| {r.ms:.3f} {r.tflops:4.0f}T {ratio} {cfg:<19}")
        if any(c.strip() != "| -" for c in cells):
            print((f"{name:<24}" + "".join(cells)).rstrip())
    bad = [r for r in STATE.rows if r.status in ("WRONG", "FAILED")]
    print(f"rows: {sum(r.status == 'ok' for r in STATE.rows)} ok, {sum(r.status == 'WRONG' for r in STATE.rows)} "
          f"WRONG, {sum(r.status == 'FAILED' for r in STATE.rows)} FAILED, "
          f"{sum(r.status == 'SKIPPED' for r in STATE.rows)} SKIPPED (time budget); not valid (variant config: why):")
    seen: list = []
    for r in bad:
        k = (r.variant, r.cfg, r.status)
        if k not in seen:
            seen.append(k)
            if len(seen) <= 5:
                print(f"  {r.status} {r.variant} {r.cfg}: {r.error[:100]}")
    if len(seen) > 5:
        print(f"  ... and {len(seen) - 5} more variant configs, in the JSON")
    for k in keys:
        cub = best.get(("cublas", k))
        if cub is None:
            continue
        gemm = [best[(n, k)] for n in SUMMARY_ORDER
                if n not in LORA_ROWS and n not in ("cublas", "cublas_end") and (n, k) in best]
        fused = [best[(n, k)] for n, *_ in LORA_VARIANTS if (n, k) in best]
        unfused = [best[(n, k)] for n in ("cublas+lora_addmm", "cublas+lora_beta") if (n, k) in best]
        parts = [f"{k}: cuBLAS {cub.ms:.3f}"]
        if gemm:
            g = min(gemm, key=lambda r: r.ratio_vs_cublas)
            parts.append(f"best Triton GEMM {g.ms:.3f} = {g.ratio_vs_cublas:.2f}x ({g.variant})")
        if fused:
            f = min(fused, key=lambda r: r.ratio_vs_cublas)
            tail = ""
            if unfused:
                u = min(unfused, key=lambda r: r.ratio_vs_cublas)
                tail = f" vs {u.ratio_vs_cublas:.2f}x for the best cuBLAS LoRA"
            parts.append(f"fused LoRA {f.ms:.3f} = {f.ratio_vs_cublas:.2f}x cuBLAS GEMM{tail} ({f.variant})")
        print("; ".join(parts))
    sys.stdout.flush()


# --------------------------------------------------------------------------------------------------- main


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        print("explore_gemm_ws: needs a CUDA GPU (Hopper, sm90) and compiled Triton; none here, nothing measured.")
        return 0
    if len(sys.argv) > 2 and sys.argv[1] == "--probe":
        return probe_child(sys.argv[2])
    cap = torch.cuda.get_device_capability()
    if cap[0] < 9:
        print(f"explore_gemm_ws: needs TMA (compute capability >= 9.0), this GPU is {cap[0]}.{cap[1]}: nothing run.")
        return 0
    if not hasattr(tl, "make_tensor_descriptor") or not hasattr(triton, "set_allocator"):
        print(f"explore_gemm_ws: triton {triton.__version__} lacks tl.make_tensor_descriptor/set_allocator.")
        return 0
    props = torch.cuda.get_device_properties(0)
    num_sms = props.multi_processor_count
    STATE.meta.update(device=props.name, capability=f"{cap[0]}.{cap[1]}", num_sms=num_sms, triton=triton.__version__,
                      torch=torch.__version__, cuda=torch.version.cuda, shapes=SHAPES, rank=RANK, scaling=SCALING,
                      tol=TOL, timing="do_bench(warmup=25, rep=100, median) x2, mean; cuBLAS timed between")

    # Device-side descriptors need global scratch for their tensormaps (128 bytes each, per program).
    def scratch(size: int, alignment: int, stream: Optional[int]):
        return torch.empty(size, device="cuda", dtype=torch.int8)

    triton.set_allocator(scratch)
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 references are exact products, not TF32
    threading.Thread(target=watchdog, daemon=True).start()
    torch.manual_seed(0)
    problems = [Problem(*s) for s in SHAPES]
    print(f"{props.name} ({num_sms} SMs, sm{cap[0]}{cap[1]}), triton {triton.__version__}, torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}", flush=True)
    t_warm = time.time()
    while time.time() - t_warm < 1.0:  # let the clocks settle before the first measurement
        torch.nn.functional.linear(problems[0].x, problems[0].W)
    torch.cuda.synchronize()
    STATE.meta["gpu_after_warmup"] = gpu_state()

    cublas_rows(problems, "cublas")
    # The main question first (persistent, with and without warp specialization), then LoRA fused on the best
    # configs of each, then the comparisons, so a spent time budget drops the least important rows.
    alive = run_phase(BASE_VARIANTS, problems, num_sms)
    for p in problems:
        cublas_lora_rows(p)
    if alive:
        lora_variants, cfgs_for = [], {}
        for name, base, tma in LORA_VARIANTS:
            src = next(v for v in BASE_VARIANTS if v.name == base)
            lora_variants.append(Variant(name, src.kernel, dict(src.flags, LORA_TMA=tma), [], lora=True))
            cfgs_for[name] = lambda p, b=base, ws=src.ws: best_configs(b, p, LORA_TOP, ws)
        alive = run_phase(lora_variants, problems, num_sms, cfgs_for)
    if alive:
        run_phase(EXTRA_VARIANTS, problems, num_sms)
    cublas_rows(problems, "cublas_end")
    STATE.meta["gpu_end"] = gpu_state()

    STATE.done = True
    write_json()
    print_summary()
    return 0


if __name__ == "__main__":
    sys.exit(main())
