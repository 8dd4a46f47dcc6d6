"""peftkern.fuse(model): make a Hugging Face PEFT model train on peftkern's fused kernels, in place.

Fusing replaces the `forward` of each PEFT tuner layer *instance* it can serve (an instance attribute that
shadows the class's method); it creates, copies or moves no parameter, so state_dict, save_pretrained /
from_pretrained / load_adapter, the optimizer's param groups, merge_adapter / unmerge_adapter /
merge_and_unload, set_adapter, disable_adapter(), delete_adapter and requires_grad flags are untouched.
Each call checks whether the fused path covers it (adapters enabled and not merged, no mixed-adapter batch,
vanilla LoRA on a plain float Linear/Conv1D base, ...) and otherwise runs PEFT's own forward, which gives
PEFT's answer. `unfuse(model)` deletes the instance attributes. Both are idempotent.

Other PEFT tuner types join through `register_handler(layer_class, handler)`.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from ..nn.lora import is_conv1d
from ..ops.ia3 import ia3_linear
from ..ops.lora import lora_linear

_FUSED_FLAG = "_peftkern_fused"


@dataclass
class Handler:
    """How to fuse one PEFT tuner layer class.

    static_reason(module) -> None if the layer can be fused, else why not (shown in the report);
    forward(module, x, *args, **kwargs) -> the fused forward, which itself falls back per call.
    """
    static_reason: Callable[[nn.Module], Optional[str]]
    forward: Callable
    describe: Callable[[nn.Module], str]


_HANDLERS: dict[type, Handler] = {}


def register_handler(layer_class: type, handler: Handler) -> None:
    """Let fuse() serve instances of `layer_class` (exact class match) with `handler`."""
    _HANDLERS[layer_class] = handler


# ------------------------------------------------------------------------------------------------ LoRA


def _float_base(base: nn.Module) -> Optional[str]:
    if isinstance(base, nn.Linear) or is_conv1d(base):
        if not base.weight.is_floating_point():
            return f"base layer weight is {base.weight.dtype} (quantised)"
        if type(base.weight) not in (torch.Tensor, nn.Parameter):
            return f"base layer weight is a {type(base.weight).__name__} (tensor subclass, e.g. quantised)"
        return None
    return f"base layer is {type(base).__name__} (quantised or not a plain Linear/Conv1D)"


def _lora_static_reason(module: nn.Module) -> Optional[str]:
    reason = _float_base(module.get_base_layer())
    if reason:
        return reason
    dora = [a for a, on in getattr(module, "use_dora", {}).items() if on]
    if dora:
        return f"DoRA (use_dora=True) for adapter(s) {dora}"
    variants = list(getattr(module, "lora_variant", {}))
    if variants:
        return f"LoRA variant(s) {variants} (only vanilla LoRA is fused)"
    return None


def _lora_call_reason(module: nn.Module, x, args, kwargs) -> Optional[str]:
    """Why this call cannot take the fused path (None: it can)."""
    if args or kwargs:
        return "extra forward arguments (e.g. adapter_names= for a mixed-adapter batch)"
    if module.disable_adapters or module.merged:
        return "adapters disabled or merged"
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return "input is not a floating tensor"
    active = [a for a in module.active_adapters if a in module.lora_A]
    if not active:
        return "no active LoRA adapter in this layer"
    for a in active:
        if a in getattr(module, "lora_variant", {}):
            return f"adapter {a!r} is a LoRA variant"
        drop = module.lora_dropout[a]
        if not isinstance(drop, (nn.Dropout, nn.Identity)):
            return f"adapter {a!r} has a custom dropout module {type(drop).__name__}"
    if len(active) > 1 and module.training and any(_dropout_p(module, a) > 0 for a in active):
        return "several active adapters with dropout in training (PEFT draws independent masks)"
    return _float_base(module.get_base_layer())


def _dropout_p(module: nn.Module, adapter: str) -> float:
    drop = module.lora_dropout[adapter]
    return float(drop.p) if isinstance(drop, nn.Dropout) else 0.0


def _fused_lora_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if _lora_call_reason(self, x, args, kwargs) is not None:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.get_base_layer()
    active = [a for a in self.active_adapters if a in self.lora_A]
    transposed = is_conv1d(base)
    bias = base.bias
    lora_biases = [self.lora_B[a].bias * self.scaling[a] for a in active if self.lora_B[a].bias is not None]
    if lora_biases:
        # PEFT's lora_B bias enters scaled: s (h B^T + b_B). Folded into the base bias, autograd carries its
        # gradient back to lora_B.bias.
        extra = torch.stack(lora_biases).sum(0)
        bias = extra.to(x.dtype) if bias is None else bias + extra.to(bias.dtype)
    if len(active) == 1:
        a = active[0]
        A, B, scaling = self.lora_A[a].weight, self.lora_B[a].weight, self.scaling[a]
    else:
        # Several active adapters with one shared (or no) dropout: one call with their factors stacked along r;
        # each B carries its own scaling. torch.cat is differentiable, so each adapter gets its own gradient.
        A = torch.cat([self.lora_A[a].weight for a in active], 0)
        B = torch.cat([self.lora_B[a].weight * self.scaling[a] for a in active], 1)
        scaling = 1.0
    p = _dropout_p(self, active[0]) if len(active) == 1 else 0.0
    return lora_linear(x, base.weight, A, B, scaling, bias, dropout_p=p, training=self.training,
                       weight_transposed=transposed)


def _describe_lora(module: nn.Module) -> str:
    ranks = {a: module.r[a] for a in module.lora_A}
    return f"LoRA {ranks}" + (" (Conv1D)" if is_conv1d(module.get_base_layer()) else "")


def _register_peft_lora() -> None:
    try:
        from peft.tuners.lora import layer as lora_layer
    except ImportError:
        return
    register_handler(lora_layer.Linear, Handler(_lora_static_reason, _fused_lora_forward, _describe_lora))


# ------------------------------------------------------------------------------------------------- IA3


def _ia3_static_reason(module: nn.Module) -> Optional[str]:
    return _float_base(module.get_base_layer())


def _fused_ia3_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    active = [a for a in self.active_adapters if a in self.ia3_l]
    if args or kwargs or self.disable_adapters or self.merged or not active or not x.is_floating_point():
        return type(self).forward(self, x, *args, **kwargs)
    base = self.get_base_layer()
    # Several active adapters multiply, as in PEFT: the product is a small (N,) or (K,) vector.
    scale = self.ia3_l[active[0]].flatten()
    for a in active[1:]:
        scale = scale * self.ia3_l[a].flatten()
    return ia3_linear(x, base.weight, scale, base.bias, scale_input=self.is_feedforward,
                      weight_transposed=is_conv1d(base))


def _describe_ia3(module: nn.Module) -> str:
    return f"IA3 ({'input' if module.is_feedforward else 'output'} form, adapters {sorted(module.ia3_l)})"


def _register_peft_ia3() -> None:
    try:
        from peft.tuners.ia3 import layer as ia3_layer
    except ImportError:
        return
    register_handler(ia3_layer.Linear, Handler(_ia3_static_reason, _fused_ia3_forward, _describe_ia3))


# --------------------------------------------------------------------------------------- fuse / unfuse


@dataclass
class FuseReport:
    """What fuse() did: (module name, detail) for each fused layer, (module name, reason) for the others."""
    fused: list = field(default_factory=list)
    skipped: list = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"peftkern.fuse: {len(self.fused)} layer(s) fused, {len(self.skipped)} left on PEFT's path"]
        lines += [f"  fused    {name}: {detail}" for name, detail in self.fused]
        lines += [f"  skipped  {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"fused": [list(t) for t in self.fused], "skipped": [list(t) for t in self.skipped]}


def _peft_tuner_layer(module: nn.Module) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    return isinstance(module, BaseTunerLayer)


def fuse(model: nn.Module) -> FuseReport:
    """Make every PEFT tuner layer of `model` that peftkern serves run its fused op; returns a FuseReport.

    Accepts a PeftModel or any nn.Module holding PEFT tuner layers. Idempotent.
    """
    _register_peft_lora()
    _register_peft_ia3()
    report = FuseReport()
    for name, module in model.named_modules():
        if not _peft_tuner_layer(module):
            continue
        handler = _HANDLERS.get(type(module))
        if handler is None:
            report.skipped.append((name, f"{type(module).__module__}.{type(module).__name__} is not fused yet"))
            continue
        reason = handler.static_reason(module)
        if reason is not None:
            report.skipped.append((name, reason))
            continue
        if not getattr(module, _FUSED_FLAG, False):
            module.forward = types.MethodType(handler.forward, module)
            setattr(module, _FUSED_FLAG, True)
        report.fused.append((name, handler.describe(module)))
    return report


def unfuse(model: nn.Module) -> int:
    """Put PEFT's own forward back on every fused layer; returns how many were unfused. Idempotent."""
    count = 0
    for module in model.modules():
        if getattr(module, _FUSED_FLAG, False):
            del module.forward
            delattr(module, _FUSED_FLAG)
            count += 1
    return count


def is_fused(module: nn.Module) -> bool:
    return bool(getattr(module, _FUSED_FLAG, False))
