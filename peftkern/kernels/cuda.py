"""The compiled CUDA extension (peftkern._C, built from csrc/ by setup.py), if present: LoRA, IA3, KronA and
the bottleneck adapter.

Each op's functions here keep the signatures and return conventions of reference.py's, so ops/ can call any
backend alike. The kernels, what they fuse and how the extension is built: csrc/README.md.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
from torch import Tensor

from .. import reference
from ..reference import (
    krona_dense_factor,
    krona_lowrank_grads,
    lora_xa_dtype,  # noqa: F401  (the extension saves xa in float32, as the reference does)
)

_import_error: Optional[str] = None


@functools.lru_cache(maxsize=None)
def extension():
    """peftkern._C, or None when the package was installed without the CUDA build."""
    global _import_error
    try:
        from .. import _C
    except ImportError as exc:
        _import_error = f"peftkern._C is not built ({exc}); reinstall with a CUDA build of torch and nvcc"
        return None
    return _C


def why_unavailable() -> str:
    extension()
    return _import_error or ""


def _ext():
    ext = extension()
    if ext is None:
        raise RuntimeError(f"the cuda backend cannot run: {why_unavailable()}")
    return ext


# -------------------------------------------------------------------------------------------------- LoRA
def lora_forward(x, weight, lora_A, lora_B, scaling, bias, dropout_p, seed, weight_transposed):
    """(y, xa): y = x W^T + b + s xa B^T (M, N) in x's dtype, xa = drop(x) A^T (M, r) float32, saved for backward.

    Kernels: xa in one read of x (dropout mask from the seed); C = s xa B^T + b written once; cuBLAS adds
    x W^T into C (beta = 1).
    """
    return _ext().lora_forward(x, weight, lora_A, lora_B, float(scaling), bias, float(dropout_p), int(seed),
                               bool(weight_transposed))


def lora_backward(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, weight_transposed, needs):
    """(dx, dA, dB, dbias, dweight) as reference.lora_backward, None where `needs` (5 bools) says no.

    dyb = dy B (one read of dy); dx = s mask/(1-p) (dyb A) written once, then cuBLAS adds dy W; dA = s dyb^T
    drop(x) (one read of x); dB = s dy^T xa and dbias in one more read of dy; dweight by cuBLAS, float32.
    """
    need_x, need_a, need_b, need_bias, need_w = (bool(n) for n in needs)
    return _ext().lora_backward(grad_y, x, weight, lora_A, lora_B, xa, float(scaling), float(dropout_p), int(seed),
                                bool(weight_transposed), need_x, need_a, need_b, need_bias, need_w)


def lora_merge_(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, sign: float,
                weight_transposed: bool = False) -> Tensor:
    """weight += sign * scaling * B A in place (weight (N, K), or (K, N) if weight_transposed), fp32 math
    and one rounding to weight's dtype."""
    return _ext().lora_merge_(weight, lora_A, lora_B, float(scaling), float(sign), bool(weight_transposed))


def dropout_mask(seed: int, shape: tuple, p: float, device: torch.device) -> Tensor:
    """The keep-mask (M, K) bool that this backend's kernels draw for (seed, p): for tests."""
    M, K = shape
    keep = torch.empty((M, K), dtype=torch.bool, device=device)
    _ext().dropout_mask_(keep, int(seed), float(p))
    return keep


# --------------------------------------------------------------------------------------------------- IA3
def ia3_forward(x, weight, scale, bias, scale_input, weight_transposed):
    """(y, z) as reference.ia3_forward: z = x W^T + b (output form: saved for dl) or an empty tensor (input form).

    cuBLAS for the product; l applied by one kernel, in fp32 and rounded once: to z (output form), or folded into
    W (an N x K pass, when M > N) or into x (input form).
    """
    return _ext().ia3_forward(x, weight, scale, bias, bool(scale_input), bool(weight_transposed))


def ia3_backward(grad_y, x, weight, scale, z, scale_input, weight_transposed, needs):
    """(dx, dl, dbias, dweight) as reference.ia3_backward, None where `needs` (4 bools) says no.

    Output form: one pass over dy and z writes g = dy * l and sums dl and dbias, then cuBLAS dx = g W. Input form:
    cuBLAS dy W, then one pass over it and x writes dx and sums dl. dl in l's dtype; dbias, dweight float32.
    """
    need_x, need_l, need_bias, need_w = (bool(n) for n in needs)
    return _ext().ia3_backward(grad_y, x, weight, scale, z, bool(scale_input), bool(weight_transposed), need_x,
                               need_l, need_bias, need_w)


def ia3_merge_(weight: Tensor, scale: Tensor, bias: Optional[Tensor], scale_input: bool, inverse: bool = False,
               weight_transposed: bool = False) -> Tensor:
    """W <- W * l (or / l) in place along N (output form) or K (input form), b <- b * l (or / l) for the output
    form; fp32 math, one rounding. The extension's kernel multiplies, so unmerging runs reference.py's division
    (torch ops on the GPU): times a rounded 1 / l, W drifted by an ulp a merge / unmerge cycle in float32."""
    if inverse:
        return reference.ia3_merge_(weight, scale, bias, scale_input, True, weight_transposed)
    return _ext().ia3_merge_(weight, scale, bias, bool(scale_input), bool(weight_transposed))


# --------------------------------------------------------------------------------------- bottleneck adapter
def adapter_forward(h, down_weight, down_bias, up_weight, up_bias, scale, residual, ln_weight, ln_bias,
                    activation, scaling, layer_norm, ln_eps):
    """(out (M, d), z (M, b) float32, stats (M, 2) float32 or empty) as reference.adapter_forward, for a 2-D h.

    cuBLAS for h W'^T (float32 result; LN folded into W' = Wd gamma, its statistics from one pass over h); one row
    kernel makes z (+ bd, LN's correction) and a = act(z) in h's dtype; out = r + s bu written once, then cuBLAS adds
    scaling a Wu^T into it (beta = 1). A learned scale is read on the device.
    """
    return _ext().adapter_forward(h, down_weight, down_bias, up_weight, up_bias, scale, residual, ln_weight, ln_bias,
                                  str(activation), float(scaling), bool(layer_norm), float(ln_eps))


def adapter_backward(grad_out, h, down_weight, down_bias, up_weight, up_bias, scale, z, stats, ln_weight, ln_bias,
                     activation, scaling, sequential, layer_norm, needs):
    """(dh, dWd, dbd, dWu, dbu, dscale, dgamma, dbeta) as reference.adapter_backward, None where `needs` (8 bools)
    says no.

    cuBLAS g [Wu, bu]; one row kernel writes dz = s act'(z) (g Wu), a = [act(z), 1] and LN's row terms and sums dbd and
    the learned scale's gradient over M (per-block partials added in a fixed order); cuBLAS dh = dz Wd [+ g] (under
    LN dz W' in float32, then a kernel for LN's backward), g^T [a, 1] (dWu, dbu) and dz^T h (dWd; under LN on
    dz rstd, with gamma, beta, dgamma and dbeta from b x d products).
    """
    return _ext().adapter_backward(grad_out, h, down_weight, down_bias, up_weight, up_bias, scale, z, stats, ln_weight,
                                   ln_bias, str(activation), float(scaling), bool(sequential), bool(layer_norm),
                                   *(bool(n) for n in needs))


# ------------------------------------------------------------------------------------------------- KronA
KRONA_GEMMS = [os.environ.get("PEFTKERN_KRONA_CUDA_GEMMS", "0") == "1"]  # a list: tests force the cuBLAS path
# krona_grad_kernel keeps dA and dB in registers where they fit (csrc/krona.cu's kRegTiles); tests and
# scripts/explore_krona.py turn it off to check and time the shared-memory accumulators
KRONA_REG_ACC = [os.environ.get("PEFTKERN_KRONA_CUDA_REG_ACC", "1") != "0"]


def krona_forward(x, weight, a, a2, b, b2, scaling, bias):
    """y = x W^T + b + s sum_t (A_t (x) B_t) x (M, N) in x's dtype, as reference.krona_forward.

    The term C = s sum_t vec(A_t X_m B_t^T) + b is written once by a kernel holding the whole factors in shared memory,
    then cuBLAS adds x W^T into C (beta = 1); factors too big for shared memory take cuBLAS GEMMs on reshaped views.
    """
    return _ext().krona_forward(x, weight, krona_dense_factor(a, a2), krona_dense_factor(b, b2), float(scaling),
                                bias, KRONA_GEMMS[0])


def krona_backward(grad_y, x, weight, a, a2, b, b2, scaling, needs):
    """(dx, da, da2, db, db2, dbias, dweight) as reference.krona_backward, None where `needs` (7 bools) says no.

    One pass over dy and x sums dA and dB (fp32 partial sums per block, added in order) and writes the dx term, to
    which cuBLAS adds dy W; a low-rank factor's pair gets its gradients by the chain rule here. Factor gradients come
    back in each factor's dtype, dbias and dweight in float32.
    """
    need_x, need_a, need_a2, need_b, need_b2, need_bias, need_w = (bool(n) for n in needs)
    dx, dA, dB, dbias, dw = _ext().krona_backward(
        grad_y, x, weight, krona_dense_factor(a, a2), krona_dense_factor(b, b2), float(scaling), need_x,
        need_a or need_a2, need_b or need_b2, need_bias, need_w, KRONA_GEMMS[0], KRONA_REG_ACC[0])
    da, da2 = krona_lowrank_grads(dA, a, a2, need_a, need_a2)
    db, db2 = krona_lowrank_grads(dB, b, b2, need_b, need_b2)
    return dx, da, da2, db, db2, dbias, dw


def krona_merge_(weight, a, a2, b, b2, scaling, sign):
    """weight += sign * scaling * sum_t A_t (x) B_t in place (weight (N, K)): every element its own sum of T products in
    fp32, rounded once to weight's dtype."""
    return _ext().krona_merge_(weight, krona_dense_factor(a, a2), krona_dense_factor(b, b2), float(scaling),
                               float(sign))


_FITS: dict = {}  # krona_kernels_fit's answers: one per device, dtype size and factor shapes


# A constant under torch.compile (krona_linear asks while dynamo traces): dynamo calls it for real and keeps the answer.
@torch.compiler.assume_constant_result
def krona_kernels_fit(device: int, element_size: int, n1: int, k1: int, n2: int, k2: int, terms: int,
                      kernel: str = "term") -> bool:
    """Whether the KronA kernels hold these factors whole in one block's shared memory on GPU `device` for x of
    element_size bytes: "term" (the forward and the dx term), "grad" (dA and dB in one pass) or "grad_dx" (with the dx
    term in the same pass). Elsewhere cuBLAS GEMMs on reshaped views run the term or the factor gradients."""
    key = (device, element_size, n1, k1, n2, k2, terms, kernel)
    fit = _FITS.get(key)
    if fit is None:
        fit = _FITS[key] = bool(_ext().krona_fits(device, element_size, n1, k1, n2, k2, terms, kernel))
    return fit
