"""KronALinear: a frozen linear layer plus a fused Kronecker adapter (KronA, Edalati et al., 2022), or a sum of
Kronecker terms (Compacter's PHM layer, Mahabadi et al., 2021)."""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor, nn

from ..ops._common import check_scalar
from ..ops.krona import krona_linear, krona_merge_
from ._frozen import FrozenLinear, adapter_dtype_for
from ._peft_ref import PEFTRefProperties

KRONA_PEFT_REF = PEFTRefProperties(
    intra_connectivity="sparse (a Kronecker product of two small dense factors, or a sum of them)",
    inter_connectivity="none (independent per adapted matrix; Compacter may share the A_t across layers)",
    parameter_adaptation="reparametrisation (W + s sum_t A_t (x) B_t)",
    parameter_sharing="none (pass the same A_t tensors to several layers to share them)",
    input_type="the adapted layer's input (hidden states)",
    insertion_form="parallel (beside the frozen linear)",
    number_of_insertions="one per adapted linear layer",
    integration_form="scaled addition (s)",
    workspace="attention layer and/or feed-forward layer",
)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m n = dimension, chosen as PEFT's LoKr `decompose_factor` does: (factor, dimension / factor)
    when factor > 0 divides dimension; otherwise the divisor pair whose smaller member is the largest divisor not
    above factor (-1: no bound, i.e. the pair closest to the square root), smaller member first.
    Examples: 4096 -> (64, 64), 11008 -> (86, 128), (768, factor=64) -> (64, 12), 127 -> (1, 127)."""
    if dimension < 1:
        raise ValueError(f"dimension must be positive, got {dimension}")
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    bound = dimension if factor == -1 else factor
    m = 1
    divisor = 2
    while m < dimension // m:
        while dimension % divisor:
            divisor += 1
        if divisor > bound:
            break
        m = divisor
        divisor += 1
    n = dimension // m
    return min(m, n), max(m, n)


def krona_factor_shapes(in_features: int, out_features: int, a_shape: Optional[tuple] = None,
                        factor: int = -1) -> tuple[tuple[int, int], tuple[int, int]]:
    """((n1, k1), (n2, k2)) of A and B for an (out_features, in_features) weight: A's shape as given, or both
    dimensions split by `factorization(., factor)` (PEFT LoKr's choice, A taking the first member of each pair)."""
    # both checked by name: factor=True or 2.5 built factors silently, 4.0 and "4" raised torch's or Python's errors,
    # and a 0-wide layer factorization's "dimension must be positive" (an exploratory test, 2026-12-07)
    if isinstance(factor, bool) or not isinstance(factor, numbers.Integral):
        raise TypeError(f"factor must be an int (-1: the pair nearest the square root), got {type(factor).__name__} "
                        f"{factor!r}")
    if in_features < 1 or out_features < 1:
        raise ValueError(f"a Kronecker adapter needs in_features and out_features of at least 1, got "
                         f"({in_features}, {out_features})")
    if a_shape is None:
        n1, n2 = factorization(out_features, factor)
        k1, k2 = factorization(in_features, factor)
        return (n1, k1), (n2, k2)
    if len(a_shape) != 2 or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in a_shape):
        raise TypeError(f"a_shape must be two ints (n1, k1), got {a_shape!r}")  # int() made (2.5, 3) (2, 3)
    n1, k1 = a_shape
    if n1 < 1 or k1 < 1 or out_features % n1 or in_features % k1:
        raise ValueError(f"a_shape (n1, k1) = {tuple(a_shape)} must divide the weight's (out_features, in_features) "
                         f"= ({out_features}, {in_features})")
    return (n1, k1), (out_features // n1, in_features // k1)


class KronALinear(FrozenLinear):
    """y = x W^T + b + scaling * x (sum_t A_t (x) B_t)^T with W and b frozen; A_t (n1, k1) and B_t (n2, k2) train.

    terms > 1 sums several Kronecker products (Compacter's PHM layer); rank makes every B_t a low-rank pair
    B_a (n2, r) @ B_b (r, k2) (PEFT LoKr's lokr_w2_a / lokr_w2_b, Compacter's low-rank B_i). The factors are
    stacked over the terms: krona_A (T, n1, k1) and krona_B (T, n2, k2), or krona_B_a (T, n2, r) and
    krona_B_b (T, r, k2). Initialised as KronA: A Kaiming-uniform(a=sqrt(5)) per term, B zeros (B_a zeros,
    B_b Kaiming-uniform when low-rank), so the layer starts as the frozen one.
    """

    peft_ref = KRONA_PEFT_REF
    ADAPTER_PARAMETERS = ("krona_A", "krona_B", "krona_B_a", "krona_B_b")

    def __init__(self, in_features: int, out_features: int, a_shape: Optional[tuple] = None, factor: int = -1,
                 terms: int = 1, rank: Optional[int] = None, scaling: float = 1.0, bias: bool = True,
                 device=None, dtype=None, adapter_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self._make_base(in_features, out_features, bias, False, device, dtype)
        self._reset_base()
        self._init_adapter(in_features, out_features, a_shape, factor, terms, rank, scaling,
                           adapter_dtype_for(self.weight.dtype, adapter_dtype), device)

    def _init_adapter(self, in_features, out_features, a_shape, factor, terms, rank, scaling, adapter_dtype,
                      device) -> None:
        for name, n in (("terms", terms), ("rank", rank)):
            if n is not None and (isinstance(n, bool) or not isinstance(n, numbers.Integral)):
                raise TypeError(f"{name} must be an int, got {type(n).__name__} {n!r}")
        if terms < 1:
            raise ValueError(f"terms must be at least 1, got {terms}")
        if rank is not None and rank < 1:
            raise ValueError(f"rank must be at least 1 (or None for a dense B), got {rank}")
        (n1, k1), (n2, k2) = krona_factor_shapes(in_features, out_features, a_shape, factor)
        self.in_features, self.out_features, self.terms, self.rank = in_features, out_features, terms, rank
        self.a_shape, self.b_shape = (n1, k1), (n2, k2)
        self.scaling = check_scalar("scaling", scaling)  # as krona_linear: float() took True, "0.5" and a grad tensor
        self.weight_transposed = False
        kw = dict(device=device, dtype=adapter_dtype)
        self.krona_A = nn.Parameter(torch.empty((terms, n1, k1), **kw))
        if rank is None:
            self.krona_B = nn.Parameter(torch.empty((terms, n2, k2), **kw))
        else:
            self.krona_B_a = nn.Parameter(torch.empty((terms, n2, rank), **kw))
            self.krona_B_b = nn.Parameter(torch.empty((terms, rank, k2), **kw))
        self.merged = False
        self.reset_adapter_parameters()

    @torch.no_grad()
    def reset_adapter_parameters(self) -> None:
        for t in range(self.terms):
            nn.init.kaiming_uniform_(self.krona_A[t], a=math.sqrt(5))
            if self.rank is None:
                nn.init.zeros_(self.krona_B[t])
            else:
                nn.init.zeros_(self.krona_B_a[t])
                nn.init.kaiming_uniform_(self.krona_B_b[t], a=math.sqrt(5))

    @classmethod
    def from_linear(cls, linear: nn.Linear, a_shape: Optional[tuple] = None, factor: int = -1, terms: int = 1,
                    rank: Optional[int] = None, scaling: float = 1.0,
                    adapter_dtype: Optional[torch.dtype] = None) -> "KronALinear":
        """Wrap an nn.Linear: its weight and bias Parameters are shared, not copied, and frozen. A's shape is
        a_shape, or PEFT LoKr's `factorization(., factor)` of both dimensions."""
        dtype = adapter_dtype_for(linear.weight.dtype, adapter_dtype)
        return cls._wrap(linear, lambda layer, K, N, _: layer._init_adapter(
            K, N, a_shape, factor, terms, rank, scaling, dtype, linear.weight.device), allow_conv1d=False)

    def factors(self) -> tuple:
        """(A, B) as krona_linear takes them: stacked tensors, B a low-rank tuple when rank is set."""
        return self.krona_A, (self.krona_B if self.rank is None else (self.krona_B_a, self.krona_B_b))

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self._merged_forward(x)
        A, B = self.factors()
        return krona_linear(x, self.weight, A, B, self.scaling, self.bias)

    @torch.no_grad()
    def merge(self) -> None:
        """W += s sum_t A_t (x) B_t in place (a kernel on the GPU); forward then runs the plain linear."""
        if not self.merged:
            self._check_mergeable()
            krona_merge_(self.weight, *self.factors(), self.scaling, 1.0)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W -= s sum_t A_t (x) B_t: the inverse of merge, exact to the weight dtype's rounding."""
        if self.merged:
            self._unmerge_into(self.weight)
            self.merged = False

    def _unmerge_into(self, weight: Tensor) -> None:
        krona_merge_(weight, *self.factors(), self.scaling, -1.0)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, A={self.a_shape}, "
                f"B={self.b_shape}, terms={self.terms}, rank={self.rank}, scaling={self.scaling:g}, "
                f"bias={self.bias is not None}, merged={self.merged}")
