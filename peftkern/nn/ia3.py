"""IA3Linear: a frozen linear layer whose output (or input) is rescaled by a learned vector (Liu et al., 2022)."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from ..ops._common import check_flag
from ..ops.ia3 import ia3_linear, ia3_merge_
from ._frozen import FrozenLinear, adapter_dtype_for
from ._peft_ref import PEFTRefProperties

IA3_PEFT_REF = PEFTRefProperties(
    intra_connectivity="none (one vector, no matrices)",
    inter_connectivity="none (independent per adapted layer)",
    parameter_adaptation="rescaling (element-wise multiplication by a learned vector)",
    parameter_sharing="none",
    input_type="the adapted layer's output (keys, values) or input (feed-forward down projection)",
    insertion_form="parallel (inside the frozen linear, on its output or input)",
    number_of_insertions="one per adapted linear layer",
    integration_form="rescaling (gated by the vector l)",
    workspace="attention layer (keys, values) and feed-forward layer",
)


class IA3Linear(FrozenLinear):
    """y = (x W^T + b) * l, or with feedforward=True y = (x * l) W^T + b; W and b frozen, l trains.
    l starts at ones (IA3's init), so the layer starts as the frozen one. l is float32 beside a float16 / bfloat16
    base unless scale_dtype says otherwise (PEFT's default); the output keeps the base's dtype."""

    peft_ref = IA3_PEFT_REF
    ADAPTER_PARAMETERS = ("ia3_l",)

    def __init__(self, in_features: int, out_features: int, feedforward: bool = False, bias: bool = True,
                 weight_transposed: bool = False, device=None, dtype=None,
                 scale_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self._make_base(in_features, out_features, bias, weight_transposed, device, dtype)
        self._init_scale(in_features, out_features, feedforward, weight_transposed,
                         adapter_dtype_for(self.weight.dtype, scale_dtype, "scale_dtype"), device)
        self._reset_base()

    def _init_scale(self, in_features, out_features, feedforward, weight_transposed, scale_dtype, device):
        check_flag("feedforward", feedforward)  # a truthy "no" sized l as the input form's
        self.in_features, self.out_features = in_features, out_features
        self.feedforward, self.weight_transposed, self.merged = feedforward, weight_transposed, False
        n = in_features if feedforward else out_features
        self.ia3_l = nn.Parameter(torch.ones(n, device=device, dtype=scale_dtype))

    @torch.no_grad()
    def reset_adapter_parameters(self) -> None:
        self.ia3_l.fill_(1.0)

    @classmethod
    def from_linear(cls, linear: nn.Module, feedforward: bool = False,
                    scale_dtype: Optional[torch.dtype] = None) -> "IA3Linear":
        """Wrap an nn.Linear (or GPT-2's Conv1D), sharing and freezing its weight and bias."""
        dtype = adapter_dtype_for(linear.weight.dtype, scale_dtype, "scale_dtype")
        return cls._wrap(linear, lambda layer, K, N, transposed: layer._init_scale(
            K, N, feedforward, transposed, dtype, linear.weight.device))

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self._merged_forward(x)
        return ia3_linear(x, self.weight, self.ia3_l, self.bias, self.feedforward, self.weight_transposed)

    def _merged_into(self) -> tuple:
        return ("weight",) if self.feedforward or self.bias is None else ("weight", "bias")

    @torch.no_grad()
    def merge(self) -> None:
        """Fold l into W (and b) in place; forward then runs the plain linear."""
        if not self.merged:
            self._check_mergeable()
            ia3_merge_(self.weight, self.ia3_l, self.bias, self.feedforward, False, self.weight_transposed)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take l out of W again: needs l != 0 everywhere (ValueError otherwise)."""
        if self.merged:
            ia3_merge_(self.weight, self.ia3_l, self.bias, self.feedforward, True, self.weight_transposed)
            self.merged = False

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        if not (self.merged and self.ia3_l.device.type != "meta" and bool((self.ia3_l == 0).any())):
            super()._save_to_state_dict(destination, prefix, keep_vars)
            return
        # W * 0 cannot be divided back: save the merged weight as it is with l = 1, the same function (the vector's
        # values are lost, as unmerge() would refuse)
        nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)
        warnings.warn("IA3Linear.state_dict: a merged layer whose l has zeros cannot be unmerged; its merged "
                      "weight is saved with l = 1, the same outputs", RuntimeWarning, stacklevel=3)
        destination[prefix + "ia3_l"] = torch.ones_like(self.ia3_l.detach())

    @torch.no_grad()
    def _unmerged_base(self) -> tuple:
        weight = self.weight.detach().clone()
        bias = self.bias.detach().clone() if self.bias is not None and not self.feedforward else None
        ia3_merge_(weight, self.ia3_l, bias, self.feedforward, True, self.weight_transposed)
        return weight, bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"feedforward={self.feedforward}, bias={self.bias is not None}, merged={self.merged}")
