"""LoRALinear: a frozen linear layer plus a fused low-rank adapter (Hu et al., 2021)."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.lora import lora_linear, lora_merge_
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


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's transformers.pytorch_utils.Conv1D: a linear layer whose weight is stored (K, N)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def frozen_shell(cls: type, linear: nn.Module, allow_conv1d: bool = True) -> tuple:
    """(layer, K, N, transposed): an uninitialised `cls` holding `linear`'s weight and bias Parameters, shared
    (not copied) and frozen; K, N are its in and out features, transposed says it is GPT-2's Conv1D."""
    transposed = allow_conv1d and is_conv1d(linear)
    if not transposed and not isinstance(linear, nn.Linear):
        kinds = "an nn.Linear or a transformers Conv1D" if allow_conv1d else "an nn.Linear"
        raise TypeError(f"from_linear takes {kinds}, got {type(linear).__name__}")
    K, N = (linear.weight.shape if transposed else linear.weight.shape[::-1])
    layer = cls.__new__(cls)
    nn.Module.__init__(layer)
    layer.weight = linear.weight.requires_grad_(False)
    layer.bias = linear.bias.requires_grad_(False) if linear.bias is not None else None
    return layer, K, N, transposed


class LoRALinear(nn.Module):
    """y = x W^T + b + scaling * (dropout(x) A^T) B^T with W and b frozen; A (r, K) and B (N, r) train.

    Initialised as PEFT does: A Kaiming-uniform(a=sqrt(5)), B zeros, so the layer starts as the frozen one.
    scaling = alpha / r (alpha / sqrt(r) with use_rslora).
    """

    peft_ref = LORA_PEFT_REF

    def __init__(self, in_features: int, out_features: int, r: int = 16, alpha: float = 32.0,
                 dropout: float = 0.0, bias: bool = True, use_rslora: bool = False,
                 weight_transposed: bool = False, device=None, dtype=None,
                 adapter_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"r must be at least 1, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        shape = (in_features, out_features) if weight_transposed else (out_features, in_features)
        self.weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype), requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False)
                     if bias else None)
        self._init_adapter(in_features, out_features, r, alpha, dropout, use_rslora, weight_transposed,
                           adapter_dtype or dtype, device)
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            nn.init.uniform_(self.bias, -1 / math.sqrt(in_features), 1 / math.sqrt(in_features))

    def _init_adapter(self, in_features, out_features, r, alpha, dropout, use_rslora, weight_transposed,
                      adapter_dtype, device) -> None:
        self.in_features, self.out_features, self.r, self.alpha = in_features, out_features, r, alpha
        self.dropout, self.use_rslora, self.weight_transposed = dropout, use_rslora, weight_transposed
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_A = nn.Parameter(torch.empty((r, in_features), device=device, dtype=adapter_dtype))
        self.lora_B = nn.Parameter(torch.empty((out_features, r), device=device, dtype=adapter_dtype))
        self.merged = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @classmethod
    def from_linear(cls, linear: nn.Module, r: int = 16, alpha: float = 32.0, dropout: float = 0.0,
                    use_rslora: bool = False, adapter_dtype: Optional[torch.dtype] = None) -> "LoRALinear":
        """Wrap an nn.Linear (or GPT-2's Conv1D): its weight and bias Parameters are shared, not copied,
        and frozen."""
        layer, K, N, transposed = frozen_shell(cls, linear)
        layer._init_adapter(K, N, r, alpha, dropout, use_rslora, transposed,
                            adapter_dtype or linear.weight.dtype, linear.weight.device)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            w = self.weight.t() if self.weight_transposed else self.weight
            return F.linear(x, w, self.bias)
        return lora_linear(x, self.weight, self.lora_A, self.lora_B, self.scaling, self.bias,
                           self.dropout, self.training, self.weight_transposed)

    @torch.no_grad()
    def merge(self) -> None:
        """W += s B A in place (a kernel on the GPU); forward then runs the plain linear."""
        if not self.merged:
            lora_merge_(self.weight, self.lora_A, self.lora_B, self.scaling, 1.0, self.weight_transposed)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W -= s B A: the inverse of merge, exact to the weight dtype's rounding."""
        if self.merged:
            lora_merge_(self.weight, self.lora_A, self.lora_B, self.scaling, -1.0, self.weight_transposed)
            self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, dropout={self.dropout}, scaling={self.scaling:g}, "
                f"bias={self.bias is not None}, merged={self.merged}")
