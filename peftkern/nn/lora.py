"""LoRALinear: a frozen linear layer plus a fused low-rank adapter (Hu et al., 2021)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Optional

import torch
from torch import Tensor, nn

from ..ops._common import check_flag, check_scalar
from ..ops.lora import lora_linear, lora_merge_
from ._frozen import FrozenLinear, adapter_dtype_for
from ._peft_ref import PEFTRefProperties

LORA_PEFT_REF = PEFTRefProperties(
    intra_connectivity="dense (two linear maps, no non-linearity)",
    inter_connectivity="none (independent per adapted matrix)",
    parameter_adaptation="reparametrisation (W + s B A)",
    parameter_sharing="none",
    input_type="the adapted layer's input (hidden states)",
    insertion_form="parallel (beside the frozen linear)",
    number_of_insertions="one per adapted linear layer",
    integration_form="scaled addition (s = alpha / r)",
    workspace="attention layer and/or feed-forward layer",
)


class LoRALinear(FrozenLinear):
    """y = x W^T + b + scaling * (dropout(x) A^T) B^T with W and b frozen; A (r, K) and B (N, r) train.

    Initialised as PEFT does: A Kaiming-uniform(a=sqrt(5)), B zeros, so the layer starts as the frozen one.
    scaling = alpha / r (alpha / sqrt(r) with use_rslora). The adapters are float32 beside a float16 / bfloat16
    base unless adapter_dtype says otherwise (PEFT's default); the output keeps the base's dtype.
    """

    peft_ref = LORA_PEFT_REF
    ADAPTER_PARAMETERS = ("lora_A", "lora_B")

    def __init__(self, in_features: int, out_features: int, r: int = 16, alpha: float = 32.0,
                 dropout: float = 0.0, bias: bool = True, use_rslora: bool = False,
                 weight_transposed: bool = False, device=None, dtype=None,
                 adapter_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self._make_base(in_features, out_features, bias, weight_transposed, device, dtype)
        self._init_adapter(in_features, out_features, r, alpha, dropout, use_rslora, weight_transposed,
                           adapter_dtype_for(self.weight.dtype, adapter_dtype), device)
        self._reset_base()

    def _init_adapter(self, in_features, out_features, r, alpha, dropout, use_rslora, weight_transposed,
                      adapter_dtype, device) -> None:
        if isinstance(r, bool) or not isinstance(r, numbers.Integral):
            raise TypeError(f"r must be an int, got {type(r).__name__} {r!r}")
        if r < 1:
            raise ValueError(f"r must be at least 1, got {r}")
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.weight_transposed = weight_transposed
        self._set_hyperparameters(alpha, dropout, use_rslora)
        self.lora_A = nn.Parameter(torch.empty((r, in_features), device=device, dtype=adapter_dtype))
        self.lora_B = nn.Parameter(torch.empty((out_features, r), device=device, dtype=adapter_dtype))
        self.merged = False
        self.reset_adapter_parameters()

    def _set_hyperparameters(self, alpha: float, dropout: float, use_rslora: bool) -> None:
        """alpha, dropout and rsLoRA, and what follows from them (an unmerged layer only: merge used the old
        scaling)."""
        # as lora_linear checks them, here rather than at the first forward (alpha=True was scaling 1 / r); kept as the
        # floats the checks return: a tensor or numpy alpha was kept as given, and save_lora's json.dump raised on it
        # after writing half the config (2026-12-06)
        alpha = check_scalar("alpha", alpha)
        dropout = check_scalar("dropout", dropout, 0.0, 1.0, high_inclusive=False)
        check_flag("use_rslora", use_rslora)
        self.alpha, self.dropout, self.use_rslora = alpha, dropout, use_rslora
        self.scaling = alpha / math.sqrt(self.r) if use_rslora else alpha / self.r
        self.peft_ref = (dataclasses.replace(LORA_PEFT_REF, integration_form="scaled addition (s = alpha / sqrt(r))")
                         if use_rslora else LORA_PEFT_REF)

    def reset_adapter_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @classmethod
    def from_linear(cls, linear: nn.Module, r: int = 16, alpha: float = 32.0, dropout: float = 0.0,
                    use_rslora: bool = False, adapter_dtype: Optional[torch.dtype] = None) -> "LoRALinear":
        """Wrap an nn.Linear (or GPT-2's Conv1D): its weight and bias Parameters are shared, not copied,
        and frozen."""
        dtype = adapter_dtype_for(linear.weight.dtype, adapter_dtype)
        return cls._wrap(linear, lambda layer, K, N, transposed: layer._init_adapter(
            K, N, r, alpha, dropout, use_rslora, transposed, dtype, linear.weight.device))

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self._merged_forward(x)
        return lora_linear(x, self.weight, self.lora_A, self.lora_B, self.scaling, self.bias,
                           self.dropout, self.training, self.weight_transposed)

    @torch.no_grad()
    def merge(self) -> None:
        """W += s B A in place (a kernel on the GPU); forward then runs the plain linear."""
        if not self.merged:
            self._check_mergeable()
            lora_merge_(self.weight, self.lora_A, self.lora_B, self.scaling, 1.0, self.weight_transposed)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W -= s B A: the inverse of merge, exact to the weight dtype's rounding."""
        if self.merged:
            self._unmerge_into(self.weight)
            self.merged = False

    def _unmerge_into(self, weight: Tensor) -> None:
        lora_merge_(weight, self.lora_A, self.lora_B, self.scaling, -1.0, self.weight_transposed)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, dropout={self.dropout}, scaling={self.scaling:g}, "
                f"bias={self.bias is not None}, merged={self.merged}")
