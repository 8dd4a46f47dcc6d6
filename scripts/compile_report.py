"""The persistent TMA kernels compiled for sm_90 without a GPU: shared memory, registers and spills per config.

Device time is scarce, and a config that does not fit an SM fails only on the device. Triton compiles for a
target it is told, with the ptxas and cuobjdump it ships, so this runs on any machine with Triton installed
(no GPU, no CUDA toolkit). An H100 or H200 SM gives one block at most 227 KB (232448 bytes) of shared memory.
Found with it on 2026-12-03 (Triton 3.9): LoRA's persistent kernel with the rank in two unrolled slices asked
for 377 KB, so it loops over them instead (NOTES-lora.md, seventh session). The device runs Triton 3.6, whose
wheel installs here beside torch for the device's own numbers:
    python3 -m venv --system-site-packages /tmp/v36 && /tmp/v36/bin/pip install --no-deps triton==3.6.0
    /tmp/v36/bin/python scripts/compile_report.py

    python scripts/compile_report.py     # exit status 1 if a config does not fit or spills
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from peftkern.kernels.triton import adapter as ka
from peftkern.kernels.triton import ia3 as ki
from peftkern.kernels.triton import krona as kk
from peftkern.kernels.triton import lora as kl

SMEM_LIMIT = 232448  # bytes of shared memory one block may take on an H100 / H200 SM


def _desc(dtype: str, *block: int) -> str:
    return f"tensordesc<{dtype}[{','.join(map(str, block))}]>"


def compile_sm90(fn, args: dict, constexprs: dict, num_warps: int, num_stages: int) -> dict:
    """fn compiled for sm_90a: {'shared': bytes, 'registers': per thread, 'local': spill bytes per thread}.

    Specialised as a launch at the benchmark's shapes specialises it: every pointer 16-byte aligned and every
    integer but NUM_SMS (132 on an H100 / H200) a multiple of 16. Without these hints the loads cannot be
    vectorised, and the pipeliner leaves plain loads out of its stages. On 2026-12-03 a LoRA epilogue of plain loads
    compiled here into 200 KB without them, and on the GPU into 296 KB: more than an SM has."""
    signature = {**args, **{name: "constexpr" for name in constexprs}}
    names = list(inspect.signature(fn.fn).parameters)
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name, kind in args.items()
             if (kind.startswith("*") or kind == "i32") and name != "NUM_SMS"}
    ck = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                        target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(ck.asm["cubin"])
    try:
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    line = next(w for w in usage.splitlines() if "REG:" in w)
    fields = dict(item.split(":") for item in line.split() if ":" in item)
    return dict(shared=ck.metadata.shared, registers=int(fields["REG"]), local=int(fields["LOCAL"]),
                hazards=mma_operand_hazards(ck.asm["ttgir"]))


def mma_operand_hazards(ttgir: str) -> list:
    """The pipelined shared-memory buffers that an async MMA reads and registers read too, where an MMA may stay in
    flight past its loop iteration (a wait with pendings >= 1). Triton 3.6 gives such a buffer one stage fewer than
    the loop's other operands, so the copy of a later tile can overwrite it under the MMA still reading it. On an H200
    that made the bottleneck adapter's loop-1 product wrong (NOTES-adapter.md, "The LN failure found"): a loaded tile
    fed both the MMA and a row sum."""
    if not re.search(r"warp_group_dot_wait .*pendings = [1-9]", ttgir):
        return []
    views = {}  # a view of a pipelined buffer -> the buffer: its stage (memdesc_index), then transposes and reshapes
    for view, op, base in re.findall(r"(%[\w.#]+) = ttg\.(memdesc_index|memdesc_trans|memdesc_reshape) (%[\w.#]+)",
                                     ttgir):
        if op == "memdesc_index":
            views[view] = base
        elif base in views:
            views[view] = views[base]
    dot_read = {views[a] for pair in re.findall(r"ttng\.warp_group_dot (%[\w.#]+), (%[\w.#]+),", ttgir)
                for a in pair if a in views}
    reg_read = {views[v] for v in re.findall(r"ttg\.local_load (%[\w.#]+)", ttgir) if v in views}
    return sorted(dot_read & reg_read)


def lora_forward(cfg: dict, r: int, xa_scaled: bool = False, workers: int = 0, helpers: int = 0) -> tuple:
    """lora_forward_persistent_kernel as persistent_forward launches it for rank r (xa from cuBLAS, nn.Linear's
    weight read N-major as the backward's dx reads it, B given as B^T). workers: that many programs make xa (dyb)
    themselves from A^T (the backward's B) instead; helpers: that many programs make it before their tiles."""
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    block_r = kl._persistent_block_r(r, cfg["FLATTEN"])
    store_n = bn // 2 if cfg["SUBTILE"] else bn
    args = {"x_desc": _desc("bf16", bm, bk), "w_desc": _desc("bf16", bk, bn), "y_desc": _desc("bf16", bm, store_n),
            "b_desc": _desc("bf16", block_r, bn), "xa_desc": _desc("bf16", bm, block_r), "xa_ptr": "*bf16",
            "bias_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32", "R": "i32", "stride_xam": "i32",
            "scaling": "fp32", "NUM_SMS": "i32", "flags_ptr": "*i32", "xa_scale": "fp32"}
    const = dict(a_desc=None, XA_GIVEN=True, W_KMAJOR=False, HAS_BIAS=False, FLATTEN=cfg["FLATTEN"],
                 SUBTILE=cfg["SUBTILE"], BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=block_r, GROUP_M=cfg["GROUP_M"],
                 B_RMAJOR=True, R_CHUNKS=triton.cdiv(r, block_r), XA_SCALED=xa_scaled, XA_WORKERS=0,
                 A_KMAJOR=True, SPIN=True, WORKER_STAGES=3, XA_HELPERS=0)
    if workers or helpers:
        args.update(a_desc=_desc("bf16", bk, block_r))
        const.pop("a_desc")
        const.update(XA_WORKERS=workers, XA_HELPERS=helpers, A_KMAJOR=False, SPIN=True,
                     WORKER_STAGES=kl._worker_stages(bm, bk, block_r, helpers > 0))
    return kl.lora_forward_persistent_kernel, args, const, cfg["num_warps"], cfg["num_stages"]


def ia3_output(cfg: dict) -> tuple:
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    store_n = bn // 2 if cfg["SUBTILE"] else bn
    args = {"x_desc": _desc("bf16", bm, bk), "w_desc": _desc("bf16", bn, bk), "y_desc": _desc("bf16", bm, store_n),
            "z_desc": _desc("bf16", bm, store_n), "l_ptr": "*fp32", "bias_ptr": "*bf16", "M": "i32", "N": "i32",
            "K": "i32", "NUM_SMS": "i32"}
    const = dict(HAS_BIAS=False, FLATTEN=cfg["FLATTEN"], SUBTILE=cfg["SUBTILE"], BLOCK_M=bm, BLOCK_N=bn,
                 BLOCK_K=bk, GROUP_M=cfg["GROUP_M"])
    return ki.ia3_output_persistent_kernel, args, const, cfg["num_warps"], cfg["num_stages"]


def ia3_input_dx(cfg: dict) -> tuple:
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    store_n = bn // 2 if cfg["SUBTILE"] else bn
    args = {"dy_desc": _desc("bf16", bm, bk), "w_desc": _desc("bf16", bk, bn), "x_desc": _desc("bf16", bm, store_n),
            "dx_desc": _desc("bf16", bm, store_n), "l_ptr": "*fp32", "part_ptr": "*fp32", "M": "i32", "N": "i32",
            "K": "i32", "NUM_SMS": "i32"}
    const = dict(W_KMAJOR=False, WRITE_OUT=True, FLATTEN=cfg["FLATTEN"], SUBTILE=cfg["SUBTILE"], BLOCK_M=bm,
                 BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"])
    return ki.ia3_dx_input_persistent_kernel, args, const, cfg["num_warps"], cfg["num_stages"]


def skinny_grads(r: int) -> tuple:
    """lora_skinny_grads_kernel as skinny_grads launches it on GPUs without dropout at rank r (bf16 operands, float32
    dA, bf16 dB; the bias gradient is a torch sum there): unit strides are constexprs, as the launch specialises them."""
    block_r = kl._block_r(r)
    block_m, block_c, warps, stages = (128, 64, 4, 3) if block_r <= 32 else (64, 64, 4, 3)
    args = {"x_ptr": "*bf16", "dyb_ptr": "*bf16", "da_ptr": "*fp32", "dy_ptr": "*bf16", "xa_ptr": "*bf16",
            "db_ptr": "*bf16", "dbias_ptr": "*fp32", "part_ptr": "*fp32", "sums_ptr": "*fp32", "count_ptr": "*i32",
            "M": "i32", "K": "i32", "N": "i32", "R": "i32", "rows_per_split": "i32", "splits": "i32",
            "blocks_a": "i32", "scale_a": "fp32", "scale_b": "fp32", "stride_xm": "i32", "stride_dybm": "i32",
            "stride_dar": "i32", "stride_dym": "i32", "stride_xam": "i32", "stride_dbn": "i32"}
    const = dict(stride_xk=1, stride_dybr=1, stride_dak=1, stride_dyn=1, stride_xar=1, stride_dbr=1, STORE_DB=True,
                 COLSUM=False, DOT_PRECISION="tf32", BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_R=block_r)
    return kl.lora_skinny_grads_kernel, args, const, warps, stages



def dyb_db(r: int) -> tuple:
    """lora_dyb_db_kernel as dyb_db launches it on GPUs at rank r (bf16 dy, B and xa; unit strides are constexprs, as
    the launch specialises them)."""
    block_m, block_c, warps, stages = kl.DYB_DB_CONFIG
    block_r = kl._block_r(r)
    args = {**{n: "*bf16" for n in ("dy_ptr", "b_ptr", "xa_ptr")}, "dyb_part_ptr": "*fp32", "db_part_ptr": "*fp32",
            **{n: "i32" for n in ("M", "N", "R", "rows_per_split", "stride_dym", "stride_bn", "stride_xam")}}
    const = dict(stride_dyn=1, stride_br=1, stride_xar=1, DOT_PRECISION="tf32", BLOCK_M=block_m, BLOCK_C=block_c,
                 BLOCK_R=block_r, STAGES=stages)
    return kl.lora_dyb_db_kernel, args, const, warps, stages

def column_grad(r: int) -> tuple:
    """lora_column_grad_kernel as column_grad launches it on GPUs at rank r for dA (bf16 x and dyb, float32 dA as
    PEFT's default adapters take it; unit strides are constexprs, as the launch specialises them)."""
    block_m, block_c, warps, stages = kl.COLUMN_GRAD_CONFIG
    args = {"big_ptr": "*bf16", "small_ptr": "*bf16", "out_ptr": "*fp32",
            **{n: "i32" for n in ("M", "C", "R", "stride_bm", "stride_sm", "stride_or")}, "scale": "fp32"}
    const = dict(stride_bc=1, stride_sr=1, stride_oc=1, DOT_PRECISION="tf32", BLOCK_M=block_m, BLOCK_C=block_c,
                 BLOCK_R=kl._block_r(r))
    return kl.lora_column_grad_kernel, args, const, warps, stages


def krona_grad_fused(a_shape: tuple, b_shape: tuple, write_dx: bool, tma: bool = False) -> tuple:
    """krona_grad_fused_kernel as grad_fused launches it for one dense term (bf16 x and dy, bf16 factors); tma: dy, x
    and the dx term as (1, rows, cols) token blocks by TMA."""
    cfg = kk._fused_config(*a_shape, *b_shape)
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    cfg.pop("programs_per_sm")
    ptrs = {name: "*bf16" for name in ("g_ptr", "x_ptr", "a_ptr", "b_ptr", "dx_ptr")}
    if tma:
        ptrs.update(g_ptr=_desc("bf16", 1, cfg["BN1"], cfg["BN2"]), x_ptr=_desc("bf16", 1, cfg["BK1"], cfg["BK2"]),
                    dx_ptr=_desc("bf16", 1, cfg["BK1"], cfg["BK2"]))
    ints = ("M", "n1", "k1", "n2", "k2", "rows_per_split", "stride_gm", "stride_gn", "stride_xm", "stride_xk",
            "stride_at", "stride_ai", "stride_aj", "stride_bt", "stride_bi", "stride_bj", "stride_dm", "stride_dk",
            "stride_pas", "stride_pat", "stride_pbs", "stride_pbt")
    args = {**ptrs, "part_a_ptr": "*fp32", "part_b_ptr": "*fp32", **{n: "i32" for n in ints}, "scaling": "fp32"}
    const = dict(WRITE_DX=write_dx, DOT_PRECISION="tf32", TMA=tma, **cfg)
    return kk.krona_grad_fused_kernel, args, const, warps, stages


def krona_term_whole(a_shape: tuple, b_shape: tuple, tma: bool = False) -> tuple:
    """krona_term_whole_kernel as kron_term launches it for dense factors (bf16 x and factors, no bias); tma: x and
    the term as (1, rows, cols) token blocks by TMA."""
    cfg = kk._whole_config(*a_shape, *b_shape)
    ints = ("M", "n1", "k1", "n2", "k2", "TERMS", "rows_per_split", "stride_xm", "stride_xk", "stride_at",
            "stride_ai", "stride_aj", "stride_bt", "stride_bi", "stride_bj", "stride_om", "stride_on")
    args = {**{n: "*bf16" for n in ("x_ptr", "a_ptr", "b_ptr", "bias_ptr", "out_ptr")}, **{n: "i32" for n in ints},
            "scaling": "fp32"}
    pads = {name: kk._pow2(d, 128) for name, d in zip(("BN1", "BK1", "BN2", "BK2"), (*a_shape, *b_shape))}
    if tma:
        args.update(x_ptr=_desc("bf16", 1, pads["BK1"], pads["BK2"]), out_ptr=_desc("bf16", 1, pads["BN1"], pads["BN2"]))
    const = dict(HAS_BIAS=False, DOT_PRECISION="tf32", TMA=tma, ONE_TERM=True, **pads)
    return kk.krona_term_whole_kernel, args, const, cfg["num_warps"], cfg["num_stages"]


def _signature(fn, const: dict, fp32: tuple) -> dict:
    """Every non-constexpr parameter of fn: pointers to bf16 (those in fp32: float32), the scalings float32, ints."""
    return {name: ("*fp32" if name in fp32 else "*bf16") if name.endswith("_ptr") else
            "fp32" if name in ("scaling", "ln_eps") else "i32"
            for name in inspect.signature(fn.fn).parameters if name not in const}


def adapter_loop_one(backward: bool, b: int = 256, float32: bool = False) -> tuple:
    """adapter_fwd_kernel / adapter_bwd_kernel with loop 1 in the kernel (the fused and two-pass schedules, 64-row
    blocks, 4 warps, 3 stages) as adapter_forward / adapter_backward launch them on GPUs: the forward under LN with the
    statistics given (row_stats_kernel), the backward with a fixed scale (a learned one with an up bias takes g . bu
    and loop 1's product from cuBLAS there). Summing rows inside loop 1 is what made its product wrong
    (adapter.LOOP1_SUMS). float32: the forward on float32 h, which loop 1 centres (CENTRE), at default_config's
    tile for b <= 128 (128 rows, 8 warps)."""
    common = dict(ACT=1, SEQUENTIAL=True, HAS_DOWN_BIAS=True, HAS_UP_BIAS=True, HAS_SCALE=True, EVEN_D=True,
                  DOT_PRECISION="tf32", BLOCK_M=128 if float32 else 64, BLOCK_K=64, BLOCK_N=64,
                  BLOCK_B=ka._block_r(b))
    fp32 = ("z_ptr", "stats_ptr", "c1_ptr", "c2_ptr", "acc_ptr", "r_ptr", "sdot_ptr")
    if backward:
        fn = ka.adapter_bwd_kernel
        const = dict(common, DZ_GIVEN=False, ACC_GIVEN=False, WRITE_DH=True, LAYER_NORM=False, SCALE_GRAD=False,
                     stride_gd=1, stride_hd=1, stride_dhd=1, stride_dd=1, stride_ub=1)
    else:
        fn = ka.adapter_fwd_kernel
        const = dict(common, Z_GIVEN=False, ACC_GIVEN=False, UP_PROJECT=True, LAYER_NORM=True, STATS_GIVEN=True,
                     STORE_A=False, CENTRE=float32, stride_hd=1, stride_rd=1, stride_od=1, stride_dd=1, stride_ub=1)
    if float32:
        signature = {name: "*fp32" if kind.startswith("*") else kind for name, kind in _signature(fn, const, ()).items()}
        return fn, signature, const, 8, 3
    return fn, _signature(fn, const, fp32), const, 4, 3


def adapter_wide_persistent(tile: tuple, b: int, w_kmajor: bool, ln: bool = False) -> tuple:
    """adapter_wide_persistent_kernel as _launch_wide_persistent launches it: the forward (Wu K-major, bias) or the
    backward's dh (Wd N-major, no bias; ln: with the LN epilogue), both with a residual."""
    bm, bn, warps, stages = tile[:4]
    bb = ka._block_r(b)
    args = {"a_desc": _desc("bf16", bm, bb), "w_desc": _desc("bf16", *((bn, bb) if w_kmajor else (bb, bn))),
            "r_desc": _desc("bf16", bm, bn), "y_desc": _desc("bf16", bm, bn), "bias_ptr": "*bf16",
            "scale_ptr": "*bf16", "x_desc": _desc("bf16", bm, bn), "stats_ptr": "*fp32", "rr_ptr": "*fp32",
            "M": "i32", "D": "i32", "scaling": "fp32", "NUM_SMS": "i32"}
    const = dict(W_KMAJOR=w_kmajor, HAS_RES=True, HAS_BIAS=w_kmajor, HAS_SCALE=False, BLOCK_M=bm, BLOCK_N=bn,
                 BLOCK_B=bb, STAGES=stages, LN_BACKWARD=ln)
    return ka.adapter_wide_persistent_kernel, args, const, warps, stages


def cases() -> dict:
    """name -> (kernel, signature, constexprs, warps, stages) for the configs the package picks on a GPU (the
    configs functions are asked as on a GPU, even under TRITON_INTERPRET=1)."""
    real = kl.triton_interpret, ki.triton_interpret, kk.triton_interpret, ka.triton_interpret
    kl.triton_interpret = ki.triton_interpret = kk.triton_interpret = ka.triton_interpret = lambda: False
    try:
        out = {}
        for M in (512, 8192):
            for r in (16, 64, 128):
                out[f"lora persistent forward/dx, M={M}, r={r}"] = lora_forward(kl._persistent_config(M, r), r)
                out[f"lora persistent dx, s xa given, M={M}, r={r}"] = lora_forward(kl._persistent_config(M, r), r, True)
                out[f"lora persistent dx, xa workers, M={M}, r={r}"] = lora_forward(kl._persistent_config(M, r), r, True,
                                                                                    workers=4)
                out[f"lora persistent dx, xa helpers, M={M}, r={r}"] = lora_forward(kl._persistent_config(M, r), r, True,
                                                                                    helpers=32)
        for r in (16, 64, 128):
            out[f"lora skinny grads (dA, dB), r={r}"] = skinny_grads(r)
        out["lora dyb + dB from one read of dy, r=16"] = dyb_db(16)
        out["lora dA by column strips of x, r=16"] = column_grad(16)
        for M in (2048, 8192):
            out[f"ia3 output-form forward, M={M}"] = ia3_output(ki._persistent_config(M))
            out[f"ia3 input-form dx, M={M}"] = ia3_input_dx({**ki._persistent_config(M), "SUBTILE": True})
        out["adapter loop 1 in the kernel, LN forward"] = adapter_loop_one(False)
        out["adapter loop 1 in the kernel, backward"] = adapter_loop_one(True)
        out["adapter loop 1, LN forward, float32, b=64"] = adapter_loop_one(False, 64, float32=True)
        for b in (64, 256):
            tile = ka.PERSISTENT_TILE or (64, 128, 4, 3)
            out[f"adapter persistent loop 2, forward, b={b}"] = adapter_wide_persistent(tile, b, True)
            out[f"adapter persistent loop 2, dh, b={b}"] = adapter_wide_persistent(tile, b, False)
            out[f"adapter persistent loop 2, LN dh, b={b}"] = adapter_wide_persistent(
                ka.PERSISTENT_LN_TILE, b, False, True)
        for a_shape, b_shape in (((64, 64), (64, 64)), ((86, 64), (128, 64)), ((64, 86), (64, 128))):
            shapes = f"A{a_shape[0]}x{a_shape[1]} B{b_shape[0]}x{b_shape[1]}"
            for tma in (False, True):
                how = ", TMA" if tma else ""
                if not tma or kk.fused_tma_fits(kk._fused_config(*a_shape, *b_shape), True):
                    out[f"krona fused grads {shapes}{how}"] = krona_grad_fused(a_shape, b_shape, True, tma)
                out[f"krona whole term {shapes}{how}"] = krona_term_whole(a_shape, b_shape, tma)
        return out
    finally:
        kl.triton_interpret, ki.triton_interpret, kk.triton_interpret, ka.triton_interpret = real


def main() -> int:
    """Prints one line per case; returns 1 if any failed to compile, needs more shared memory than an SM has,
    spills registers, or has a pipelined MMA operand that registers read too (mma_operand_hazards; tests/test_tools.py
    runs it so in CI), else 0."""
    print(f"Triton {triton.__version__}, sm_90a; a block may take {SMEM_LIMIT} bytes of shared memory")
    status = 0
    for name, (fn, args, const, warps, stages) in cases().items():
        try:
            r = compile_sm90(fn, args, const, warps, stages)
        except Exception as e:  # a config Triton refuses
            print(f"{name:42s} {type(e).__name__}: {str(e).splitlines()[0][:80]}")
            status = 1
            continue
        flag = "  TOO MUCH SHARED MEMORY" if r["shared"] > SMEM_LIMIT else ""
        flag += f"  SPILLS {r['local']} B" if r["local"] else ""
        flag += f"  MMA OPERAND ALSO READ INTO REGISTERS: {', '.join(r['hazards'])}" if r["hazards"] else ""
        status = 1 if flag else status
        print(f"{name:42s} shared {r['shared'] / 1024:6.1f} KB  registers {r['registers']:3d}{flag}", flush=True)
    return status


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("compile_report.py compiles for the GPU: run it without TRITON_INTERPRET=1")
    sys.exit(main())
