"""BottleneckAdapter: the bottleneck adapter of Houlsby et al. (2019), Pfeiffer et al. (2020) and the parallel
adapter of He et al. (2022), on the fused op."""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._backend import warn_once
from ..ops._common import autocast_dtype, check_flag, check_scalar
from ..ops.adapter import ACTIVATION_ALIASES, bottleneck_adapter
from ._frozen import check_float_dtype, global_hooks, hooked
from ._peft_ref import PEFTRefProperties

INSERTION_FORMS = ("sequential", "parallel")
INITS = ("bert", "houlsby", "mam")


ADAPTER_PEFT_REF = PEFTRefProperties(
    intra_connectivity="dense (down-projection, non-linearity, up-projection)",
    inter_connectivity="none (independent per insertion)",
    parameter_adaptation="addition (new parameters; the model's weights stay frozen)",
    parameter_sharing="none",
    input_type="hidden states (the block's output, or its input for the parallel form)",
    insertion_form="sequential (after a block) or parallel (beside it)",
    number_of_insertions="one per placement per layer (Houlsby: two, Pfeiffer: one)",
    integration_form="scaled addition (s, a number or learned; s = 1: direct addition)",
    workspace="attention layer and/or feed-forward layer",
)


class AdapterProjection(nn.Linear):
    """The adapter's down or up projection: an nn.Linear whose reset_parameters draws the adapter's init (its
    `init` attribute: "normal" N(0, 0.02), "trunc_normal" N(0, 0.01) cut at 2 std, "kaiming" as nn.Linear, "zeros"; the
    bias is zero), so that a model initialised module by module (meta device, `to_empty()`, then every module's
    reset_parameters, parents before children) keeps the adapter's init rather than nn.Linear's."""

    init = "kaiming"

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.init == "normal":
            nn.init.normal_(self.weight, std=0.02)
        elif self.init == "trunc_normal":
            nn.init.trunc_normal_(self.weight, std=1e-2, a=-2e-2, b=2e-2)
        elif self.init == "zeros":
            nn.init.zeros_(self.weight)
        else:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            nn.init.zeros_(self.bias)


_EAGER_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
                      "silu": F.silu}

# (down, up) projection inits of each adapter init
_PROJECTION_INITS = {"bert": ("normal", "normal"), "houlsby": ("trunc_normal", "trunc_normal"),
                     "mam": ("kaiming", "zeros")}


class BottleneckAdapter(nn.Module):
    """out = r + s * up(act(down(LN(h)))): sequential (r = h, after a block) or parallel (beside a block: h is
    its input, r its output, passed to forward).

    Parameters: down (an nn.Linear d -> b), up (an nn.Linear b -> d), layer_norm (nn.LayerNorm(d), only with
    layer_norm=True: a pre-adapter LN of h), scale (a learned scalar, only with scaling="learned"). The
    bottleneck b is bottleneck_size, or hidden_size // reduction_factor.

    Initialised near the identity, as in the adapter literature (names as AdapterHub's init_weights):
    "bert" -- weights N(0, 0.02), zero biases (AdapterHub's default); "houlsby" -- weights N(0, 0.01) truncated
    at 2 std, zero biases (Houlsby et al.); "mam" -- down Kaiming-uniform, up and biases zero, so the adapter
    starts exactly at the identity (He et al.'s parallel adapter, like LoRA). Default: "bert" for the
    sequential form, "mam" for the parallel one.

    peft_ref: the method's PEFT-Ref properties on the class; an instance's name its own placement.
    """

    peft_ref = ADAPTER_PEFT_REF

    def __init__(self, hidden_size: int, reduction_factor: float = 16, bottleneck_size: Optional[int] = None,
                 non_linearity: str = "relu", scaling: Union[float, str] = 1.0, layer_norm: bool = False,
                 insertion_form: str = "sequential", init: Optional[str] = None, workspace: str = "",
                 device=None, dtype=None) -> None:
        super().__init__()
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, numbers.Integral) or hidden_size < 0:
            raise ValueError(f"hidden_size must be a non-negative int, got {hidden_size!r}")
        if not isinstance(non_linearity, str) or non_linearity.lower() not in ACTIVATION_ALIASES:
            raise ValueError(f"non_linearity must be one of {sorted(ACTIVATION_ALIASES)}, got {non_linearity!r}")
        if insertion_form not in INSERTION_FORMS:
            raise ValueError(f"insertion_form must be one of {INSERTION_FORMS}, got {insertion_form!r}")
        if dtype is not None:
            check_float_dtype("dtype", dtype)
        init = init or ("mam" if insertion_form == "parallel" else "bert")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        # the sizes' types checked too: "8" or 3.0 raised Python's or torch's errors naming neither (an exploratory
        # test, 2026-12-07); numpy's integers are Integral and pass
        if bottleneck_size is None:
            if isinstance(reduction_factor, bool) or not isinstance(reduction_factor, numbers.Real):
                raise TypeError(f"reduction_factor must be a number, got {reduction_factor!r}")
            if not reduction_factor > 0:
                raise ValueError(f"reduction_factor must be positive, got {reduction_factor}")
            bottleneck_size = max(1, int(hidden_size // reduction_factor))
        if isinstance(bottleneck_size, bool) or not isinstance(bottleneck_size, numbers.Integral):
            raise TypeError(f"bottleneck_size must be an int, got {bottleneck_size!r}")
        if bottleneck_size < 1:
            raise ValueError(f"bottleneck_size must be at least 1, got {bottleneck_size}")
        bottleneck_size = int(bottleneck_size)
        self.hidden_size, self.bottleneck_size = hidden_size, bottleneck_size
        self.non_linearity, self.insertion_form, self.init = non_linearity.lower(), insertion_form, init
        self.workspace = workspace
        factory = dict(device=device, dtype=dtype)
        self.down = AdapterProjection(hidden_size, bottleneck_size, **factory)
        self.up = AdapterProjection(bottleneck_size, hidden_size, **factory)
        self.down.init, self.up.init = _PROJECTION_INITS[init]
        self.layer_norm = nn.LayerNorm(hidden_size, **factory) if check_flag("layer_norm", layer_norm) else None
        if scaling == "learned":
            # one element of shape (1,), read as a 0-dim view: FSDP2's fully_shard refuses 0-dim parameters. A state
            # dict's 0-dim scale (files and checkpoints written before 2026-12-05, and save_adapters' files) loads
            self.scaling = 1.0
            self.scale = nn.Parameter(torch.ones(1, **factory))
            self._register_load_state_dict_pre_hook(_scale_of_one_element, with_module=True)
        elif isinstance(scaling, str):
            raise ValueError(f"scaling must be a number or 'learned', got {scaling!r}")
        else:
            self.scaling = check_scalar("scaling", scaling)  # as bottleneck_adapter: float() took True
            self.scale = None
        self.peft_ref = self._peft_ref()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.down.reset_parameters()
        self.up.reset_parameters()
        if self.layer_norm is not None:
            self.layer_norm.reset_parameters()
        if self.scale is not None:
            self.scale.fill_(1.0)

    def _peft_ref(self) -> PEFTRefProperties:
        """This module's properties: insertion form, input, integration and workspace follow its placement."""
        parallel = self.insertion_form == "parallel"
        return dataclasses.replace(
            ADAPTER_PEFT_REF,
            intra_connectivity=f"dense (down-projection, {self.non_linearity}, up-projection)",
            input_type=("the block's input (hidden states)" if parallel else "the block's output (hidden states)"),
            insertion_form=("parallel (beside the block)" if parallel else "sequential (after the block)"),
            integration_form=("scaled addition (learned s)" if self.scale is not None
                              else f"scaled addition (s = {self.scaling:g})" if self.scaling != 1.0
                              else "direct addition (residual)"),
            workspace=self.workspace or ADAPTER_PEFT_REF.workspace,
        )

    def forward(self, h: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        """Sequential: forward(h) = h + s adapter(h). Parallel: forward(h, block(h)) = block(h) + s adapter(h)."""
        if self.insertion_form == "parallel" and residual is None:
            raise ValueError("a parallel adapter needs the block's output: forward(h, residual=block(h))")
        if any(m is not None and hooked(m) for m in (self.down, self.up, self.layer_norm)):
            # the fused op reads the projections' weights without calling them, so their hooks (a user's,
            # torch.nn.utils.prune's, weight_norm's) would not run: they were silently ignored (a review, 2026-12-05)
            warn_once("adapter-hooked-projection", "peftkern: a BottleneckAdapter whose down / up / layer_norm "
                      "module has hooks or an instance forward runs eagerly (its modules called one by one), not fused")
            return self._eager_forward(h, residual)
        if global_hooks():  # hooks for every module (register_module_forward_hook): down / up are modules too
            warn_once("adapter-global-hooks", "peftkern: with module hooks registered for every module, "
                      "BottleneckAdapter runs eagerly (its modules called one by one), not fused")
            return self._eager_forward(h, residual)
        return bottleneck_adapter(h, self.down.weight, self.down.bias, self.up.weight, self.up.bias,
                                  self.non_linearity, self.scale.view(()) if self.scale is not None else self.scaling,
                                  residual, self.layer_norm)

    def _eager_forward(self, h: Tensor, residual: Optional[Tensor]) -> Tensor:
        """r + s up(act(down(LN(h)))) by calling the modules, so that their hooks run; computed in the adapter's
        dtype, returned in the fused op's: h's, or the autocast dtype under torch.autocast (it returned float32 there
        while the fused op returned bf16: a review, 2026-12-05)."""
        x = h.to(self.down.weight.dtype)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        u = self.up(_EAGER_ACTIVATIONS[ACTIVATION_ALIASES[self.non_linearity.lower()]](self.down(x)))
        r = h if residual is None else residual
        s = self.scale.view(()) if self.scale is not None else self.scaling
        return (r.to(u.dtype) + s * u).to(autocast_dtype(h))

    def extra_repr(self) -> str:
        scaling = "learned" if self.scale is not None else f"{self.scaling:g}"
        return (f"hidden_size={self.hidden_size}, bottleneck_size={self.bottleneck_size}, "
                f"non_linearity={self.non_linearity}, scaling={scaling}, "
                f"layer_norm={self.layer_norm is not None}, insertion_form={self.insertion_form}")


def _scale_of_one_element(module, state_dict, prefix, *args) -> None:
    """load_state_dict's pre-hook of a learned scale: a 0-dim `scale` (the saved files' layout, and checkpoints of
    the layer before its parameter became (1,)) is read as the parameter's one element."""
    key = prefix + "scale"
    if key in state_dict and isinstance(state_dict[key], Tensor) and state_dict[key].dim() == 0:
        state_dict[key] = state_dict[key].reshape(1)
