"""peftkern.fuse(model): make a Hugging Face PEFT model train on peftkern's fused kernels, in place.

Fusing replaces the `forward` of each PEFT tuner layer *instance* it can serve (an instance attribute that
shadows the class's method); it creates, copies or moves no parameter, so state_dict, save_pretrained /
from_pretrained / load_adapter, the optimizer's param groups, merge_adapter / unmerge_adapter /
merge_and_unload, set_adapter, disable_adapter(), delete_adapter and requires_grad flags are untouched.
Each call checks whether the fused path covers it (adapters enabled and not merged, no mixed-adapter batch,
vanilla LoRA on a plain float Linear/Conv1D base, ...) and otherwise runs PEFT's own forward, which gives
PEFT's answer, and counts the call in the report's `fallbacks`. `unfuse(model)` deletes the instance
attributes. Both are idempotent.

A fused call is one `lora_linear` (or `ia3_linear`, `krona_linear`) per layer, after per-call checks kept
cheap (a few us on the host): an eager training step of an 8-layer Llama makes 56 of them and is partly bound
by the CPU.

Other PEFT tuner types join through `register_handler(layer_class, handler)`.
"""

from __future__ import annotations

import functools
import importlib
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from ..nn._frozen import computes_linear, global_hooks, hooked, is_conv1d
from ..ops._common import FLOAT_DTYPES, KERNEL_DTYPES
from ..ops.ia3 import ia3_linear
from ..ops.krona import krona_linear
from ..ops.lora import lora_linear

_FUSED_FLAG = "_peftkern_fused"
_REPORT_ENTRY = "_peftkern_report"


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


# The per-call checks read modules' _modules / _parameters dicts (_child, _param) rather than attributes:
# nn.Module.__getattr__ costs 0.5-1 us a lookup, and a fused call made ~20 of them (26 us on the CI host
# before, 4 us after).


def _child(module: nn.Module, name: str) -> nn.Module:
    return module._modules[name]


def _param(module: nn.Module, name: str) -> Optional[torch.Tensor]:
    """module.<name> (a registered parameter, or None for an absent bias); anything else, such as a weight
    computed by a parametrization, through getattr."""
    params = module._parameters
    return params[name] if name in params else getattr(module, name)


def _base_layer(module: nn.Module) -> nn.Module:
    """The layer's own base_layer: the module PEFT's forward calls (self.base_layer(x)). In a mixed model (two adapter
    types on one module) it is the inner tuner layer, which _float_base turns away: the fused op would skip it."""
    return _child(module, "base_layer")


# A plain weight: a Parameter or Tensor, or the FakeTensor that stands for one while torch.export traces the model
_PLAIN_TENSORS = (nn.Parameter, torch.Tensor, FakeTensor)


# Set on an nn.Linear subclass's instance whose own forward fuse() found computing x W^T + b (transformers'
# FalconLinear): read on each call, which tries nothing itself (it may be traced by torch.compile); deepcopy and pickle
# carry it.
_COMPUTES_LINEAR = "_peftkern_computes_linear"


def _float_base(base: nn.Module, try_forward: bool = False) -> Optional[str]:
    """None if `base` is a plain nn.Linear or GPT-2 Conv1D with a float weight, else why the fused op cannot take it.
    An nn.Linear subclass with its own forward passes where fuse() tried it (try_forward) and found x W^T + b."""
    if "base_layer" in base._modules:
        return f"base layer is a nested {type(base).__name__} tuner layer (a mixed model: PEFT's path calls it)"
    if not (isinstance(base, nn.Linear) or is_conv1d(base)):
        return f"base layer is {type(base).__name__} (quantised or not a plain Linear/Conv1D)"
    if hooked(base):
        return "base layer has hooks or an instance forward (PEFT's path calls it)"
    if type(base) is not nn.Linear and isinstance(base, nn.Linear) and type(base).forward is not nn.Linear.forward:
        if try_forward:
            setattr(base, _COMPUTES_LINEAR, computes_linear(base))
        if not getattr(base, _COMPUTES_LINEAR, False):
            return (f"base layer is {type(base).__name__}, an nn.Linear whose own forward does not compute x W^T + b")
    weight = _param(base, "weight")
    # fuse() after FSDP2's fully_shard finds the weight sharded (a DTensor); each forward sees it unsharded, a plain
    # tensor, and the per-call check decides then (a DTensor still there, as tensor parallelism leaves it, falls back)
    sharded = try_forward and type(weight).__name__ == "DTensor"
    if type(weight) not in _PLAIN_TENSORS and not sharded:
        return f"base layer weight is a {type(weight).__name__} (tensor subclass, e.g. quantised)"
    if not weight.is_floating_point():
        return f"base layer weight is {weight.dtype} (quantised)"
    if weight.dtype not in FLOAT_DTYPES:  # float8: floating, but the ops take none (each call raised their TypeError)
        return f"base layer weight is {weight.dtype} (the fused ops take float16, bfloat16, float32, float64)"
    return None


def _lora_static_reason(module: nn.Module) -> Optional[str]:
    reason = _float_base(_base_layer(module), try_forward=True)
    if reason:
        return reason
    with_hooks = [name for name in ("lora_A", "lora_B", "lora_dropout") for m in getattr(module, name).values()
                  if hooked(m)]
    if with_hooks:
        return (f"{' and '.join(sorted(set(with_hooks)))} modules have hooks or an instance forward (PEFT's path calls "
                "them)")
    # Only where no adapter of the layer can take the fused path: a vanilla adapter beside a DoRA or other variant one
    # is fused, and the per-call check (_lora_operands) sends the calls with a variant active to PEFT's path, counted.
    # A layer with no adapter left (delete_adapter of the only one it held) is fused: each call falls back, counted,
    # until an adapter is added to it. It was skipped as "LoRA variant(s) {}" and unfused, so a vanilla adapter
    # added later ran PEFT's path, uncounted, under that reason (a review, 2026-12-05). PEFT keeps a deleted adapter's
    # lora_variant entry, so only the adapters the layer holds count.
    held = set(module.lora_A)
    variants = getattr(module, "lora_variant", _NO_VARIANTS)
    dora = sorted(a for a, on in getattr(module, "use_dora", {}).items() if on and a in held)
    others = {a: type(v).__name__ for a, v in variants.items()
              if not _vanilla_variant(v) and a not in dora and a in held}
    if held and held <= set(dora) | set(others):
        if dora:
            return f"DoRA (use_dora=True) for adapter(s) {dora}"
        return f"LoRA variant(s) {others} (only vanilla LoRA is fused)"
    return None


def _vanilla_variant(variant) -> bool:
    """Whether a PEFT LoraVariant's forward is vanilla LoRA's: MiCA (init_lora_weights="mica") only freezes lora_B
    (its forward is result + lora_B(lora_A(dropout(x))) * scaling, as PEFT's docstring says)."""
    cls = type(variant)
    return cls.__name__ == "MiCALinearVariant" and cls.__module__ == "peft.tuners.lora.variants"


_EXTRA_ARGUMENTS = "extra forward arguments (e.g. adapter_names= for a mixed-adapter batch)"
_NO_VARIANTS: dict = {}


def _dropout_p(drop: nn.Module) -> Optional[float]:
    """The p this call's dropout applies (0 in eval mode, as PEFT's own module decides), None for a module that
    is not PEFT's nn.Dropout / nn.Identity."""
    if type(drop) is nn.Dropout:
        return float(drop.p) if drop.training else 0.0
    return 0.0 if type(drop) is nn.Identity else None


def _lora_operands(module: nn.Module, x) -> Union[tuple, str]:
    """For a call of a PEFT lora.Linear: the operands of the one fused call that gives PEFT's answer,
    (weight, lora_A, lora_B, scaling, bias, dropout_p, weight_transposed), or why PEFT's path must serve it."""
    if module.disable_adapters or module.merged:
        return "adapters disabled or merged"
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return "input is not a floating tensor"
    base = _base_layer(module)
    reason = _float_base(base)
    if reason is not None:
        return reason
    lora_A, lora_B = _child(module, "lora_A")._modules, _child(module, "lora_B")._modules
    dropouts, scalings = _child(module, "lora_dropout")._modules, module.scaling
    active = [a for a in module.active_adapters if a in lora_A]
    if not active:
        return "no active LoRA adapter in this layer"
    variants = getattr(module, "lora_variant", _NO_VARIANTS)
    ps = []
    for a in active:
        if a in variants and not _vanilla_variant(variants[a]):
            return f"adapter {a!r} is a LoRA variant ({type(variants[a]).__name__})"
        if hooked(lora_A[a]) or hooked(lora_B[a]) or hooked(dropouts[a]):
            return f"adapter {a!r}'s lora_A / lora_B / lora_dropout has hooks or an instance forward"
        p = _dropout_p(dropouts[a])
        if p is None:
            return f"adapter {a!r} has a custom dropout module {type(dropouts[a]).__name__}"
        if p >= 1.0:  # the op takes p < 1; nn.Dropout(1.0) zeroes the adapter's input, and PEFT's path does that
            return f"adapter {a!r}'s dropout drops every element (p = 1)"
        ps.append(p)
    if len(active) == 1:
        a = active[0]
        A, B, scaling, p = _param(lora_A[a], "weight"), _param(lora_B[a], "weight"), scalings[a], ps[0]
        if isinstance(scaling, torch.Tensor):
            # PEFT's prepare_model_for_compiled_hotswap makes each scaling a 0-d tensor that a hot swap overwrites in
            # place. The op takes a number (its .item() broke torch.compile's graph in every layer, or failed under
            # fullgraph=True: a review, 2026-12-05): the tensor rides on B, read at each call as PEFT's path reads it.
            B, scaling = B * scaling, 1.0
    elif any(ps):
        return "several active adapters with dropout in training (PEFT draws independent masks)"
    else:
        # One call with the factors stacked along r, each B carrying its own scaling; torch.cat is
        # differentiable, so each adapter still gets its own gradient.
        A = torch.cat([_param(lora_A[a], "weight") for a in active], 0)
        B = torch.cat([_param(lora_B[a], "weight") * scalings[a] for a in active], 1)
        scaling, p = 1.0, 0.0
    bias = _param(base, "bias")
    # A plain loop: torch.compile (dynamo, torch 2.11-2.13) broke the graph at an assignment expression inside a
    # comprehension ("read uninitialized cell"), once in every fused layer.
    lora_biases = []
    for a in active:
        b = _param(lora_B[a], "bias")
        if b is not None:
            lora_biases.append(b * scalings[a])
    if lora_biases:
        # lora_bias=True: PEFT's lora_B bias enters scaled, s (h B^T + b_B). Folded into the base bias,
        # autograd carries its gradient back to lora_B.bias.
        extra = lora_biases[0] if len(lora_biases) == 1 else torch.stack(lora_biases).sum(0)
        bias = extra.to(x.dtype) if bias is None else bias + extra.to(bias.dtype)
    # _float_base let through nn.Linear (N, K) and GPT-2's Conv1D, which stores its weight (K, N).
    return _param(base, "weight"), A, B, scaling, bias, p, not isinstance(base, nn.Linear)


def _fall_back(module: nn.Module, reason: str, x, args, kwargs):
    """PEFT's own forward for this call, counted in the report of the fuse() that fused the layer. Not counted under
    torch.compile: dynamo guarded on the count it read, so each call compiled a new graph until the recompile limit
    (8) left the model eager, or fullgraph=True raised; an exploratory test, 2026-12-08, with adapters disabled)."""
    entry = module.__dict__.get(_REPORT_ENTRY)
    if entry is not None and not torch.compiler.is_compiling():
        report, name = entry
        report.fallbacks[(name, reason)] = report.fallbacks.get((name, reason), 0) + 1
    return type(module).forward(module, x, *args, **kwargs)


_GLOBAL_HOOKS = "module hooks registered for every module (PEFT's path runs them on its inner modules)"


def _fused_lora_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    operands = _EXTRA_ARGUMENTS if args or kwargs else _GLOBAL_HOOKS if global_hooks() else _lora_operands(self, x)
    if isinstance(operands, str):
        return _fall_back(self, operands, x, args, kwargs)
    weight, A, B, scaling, bias, p, transposed = operands
    return lora_linear(x, weight, A, B, scaling, bias, dropout_p=p, training=p > 0.0, weight_transposed=transposed)


def _describe_lora(module: nn.Module) -> str:
    ranks = {a: module.r[a] for a in module.lora_A}
    return f"LoRA {ranks}" + (" (Conv1D)" if is_conv1d(module.get_base_layer()) else "")



# ------------------------------------------------------------------------------------------------- IA3


def _ia3_static_reason(module: nn.Module) -> Optional[str]:
    return _float_base(_base_layer(module), try_forward=True)


def _call_fallback_reason(module: nn.Module, x, args, kwargs) -> Optional[str]:
    """Why this call of a fused IA3 / LoKr layer must take PEFT's path, as far as every method shares it."""
    if args or kwargs:
        return _EXTRA_ARGUMENTS
    if global_hooks():
        return _GLOBAL_HOOKS
    if module.disable_adapters or module.merged:
        return "adapters disabled or merged"
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return "input is not a floating tensor"
    return _float_base(_base_layer(module))


def _ia3_fallback_reason(module: nn.Module, x, args, kwargs) -> Optional[str]:
    reason = _call_fallback_reason(module, x, args, kwargs)
    if reason is not None:
        return reason
    if not any(a in module.ia3_l for a in module.active_adapters):
        return "no active IA3 adapter in this layer"
    return None


def _fused_ia3_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    reason = _ia3_fallback_reason(self, x, args, kwargs)
    if reason is not None:
        return _fall_back(self, reason, x, args, kwargs)
    base = _base_layer(self)  # _ia3_fallback_reason checked it
    active = [a for a in self.active_adapters if a in self.ia3_l]
    # Several active adapters multiply, as in PEFT: the product is a small (N,) or (K,) vector.
    scale = self.ia3_l[active[0]].flatten()
    for a in active[1:]:
        scale = scale * self.ia3_l[a].flatten()
    return ia3_linear(x, _param(base, "weight"), scale, _param(base, "bias"), scale_input=self.is_feedforward,
                      weight_transposed=is_conv1d(base))


def _describe_ia3(module: nn.Module) -> str:
    return f"IA3 ({'input' if module.is_feedforward else 'output'} form, adapters {sorted(module.ia3_l)})"



# ------------------------------------------------------------------------------------------------ LoKr


def _lokr_static_reason(module: nn.Module) -> Optional[str]:
    base = _base_layer(module)
    reason = _float_base(base, try_forward=True)
    if reason:
        return reason
    if not isinstance(base, nn.Linear):
        return f"LoKr on a {type(base).__name__} (the fused op takes nn.Linear)"
    if len(getattr(module, "lokr_t2", {})):
        return "LoKr with a Tucker core (lokr_t2)"
    return None


def _lokr_factor(module: nn.Module, which: str, adapter: str):
    """PEFT's w1 / w2 for `adapter` as krona_linear takes a factor: the tensor, or the low-rank pair (a, b)."""
    full = getattr(module, f"lokr_{which}")
    if adapter in full:
        return full[adapter]
    return getattr(module, f"lokr_{which}_a")[adapter], getattr(module, f"lokr_{which}_b")[adapter]


def _lokr_fallback_reason(module: nn.Module, x, args, kwargs, active: list) -> Optional[str]:
    reason = _call_fallback_reason(module, x, args, kwargs)
    if reason is not None:
        return reason
    if not active:
        return "no active LoKr adapter in this layer"
    if module.training and any(module.rank_dropout[a] or module.module_dropout[a] for a in active):
        return "rank_dropout / module_dropout in training (PEFT draws them on the host per call)"
    return None


def _fused_lokr_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    # PEFT's available adapters are those with a w1 (whole or factored).
    active = [a for a in self.active_adapters if a in self.lokr_w1 or a in self.lokr_w1_a]
    reason = _lokr_fallback_reason(self, x, args, kwargs, active)
    if reason is not None:
        return _fall_back(self, reason, x, args, kwargs)
    base = _base_layer(self)
    A = [_lokr_factor(self, "w1", a) for a in active]
    B = [_lokr_factor(self, "w2", a) for a in active]
    scales = [float(self.scaling[a]) for a in active]
    # one stacked call needs one form per side: the same shapes, and dense factors or low-rank pairs of one rank
    if len({(_form(a), _form(b)) for a, b in zip(A, B)}) > 1:
        return _fall_back(self, "several active LoKr adapters with factors of different shapes, forms or ranks",
                          x, args, kwargs)
    # PEFT's LoKr draws its module dropout on the CPU generator per adapter and call, even at 0: the same draws keep
    # every later random op of a seeded run where PEFT's would be. After the last fallback: PEFT's path draws its own
    # (drawn before the check above, a call that fell back drew twice; a review, 2026-12-05)
    if self.training:
        for _ in active:
            torch.rand(1)
    if len(active) > 1:
        # one scaling for the sum, the largest in magnitude: each term's own ratio to it (at most 1, so no overflow in
        # a 16-bit factor; 0 for a muted adapter) rides on its (small) A factor
        largest = max(scales, key=abs) or 1.0
        A = [_scaled(a, s / largest) for a, s in zip(A, scales)]
        scales[0] = largest
        # the terms are stacked, so they share a dtype (add_adapter keeps PEFT's fp32 default for a second adapter
        # beside bf16 ones); the casts are differentiable and each factor's gradient comes back in its own dtype
        common = functools.reduce(torch.promote_types, [t.dtype for f in A + B for t in _tensors(f)])
        A, B = [_cast(f, common) for f in A], [_cast(f, common) for f in B]
    y = krona_linear(x, _param(base, "weight"), A if len(A) > 1 else A[0], B if len(B) > 1 else B[0], scales[0],
                     _param(base, "bias"))
    # PEFT's LoKr layer returns x's dtype (under autocast: float32 for a float32 model), where the op returns the
    # autocast dtype
    return y if y.dtype == x.dtype else y.to(x.dtype)


def _tensors(factor) -> tuple:
    return factor if isinstance(factor, tuple) else (factor,)


def _cast(factor, dtype: torch.dtype):
    return tuple(t.to(dtype) for t in factor) if isinstance(factor, tuple) else factor.to(dtype)


def _form(factor) -> tuple:
    """A factor's shape, and for a low-rank pair (a, b) its rank too."""
    return (_shape(factor), factor[0].shape[1]) if isinstance(factor, tuple) else (_shape(factor), None)


def _shape(factor) -> tuple:
    return (factor[0].shape[0], factor[1].shape[1]) if isinstance(factor, tuple) else tuple(factor.shape)


def _scaled(factor, ratio: float):
    if ratio == 1.0:
        return factor
    return (factor[0] * ratio, factor[1]) if isinstance(factor, tuple) else factor * ratio


def _describe_lokr(module: nn.Module) -> str:
    adapters = sorted(set(module.lokr_w1) | set(module.lokr_w1_a))
    shapes = {a: (_shape(_lokr_factor(module, "w1", a)), _shape(_lokr_factor(module, "w2", a))) for a in adapters}
    return f"LoKr (w1, w2 shapes {shapes})"



# PEFT's tuner layer classes fuse() serves: (module of the `Linear` class, its handler's functions).
_PEFT_LAYERS = (
    ("peft.tuners.lora.layer", (_lora_static_reason, _fused_lora_forward, _describe_lora)),
    ("peft.tuners.ia3.layer", (_ia3_static_reason, _fused_ia3_forward, _describe_ia3)),
    ("peft.tuners.lokr.layer", (_lokr_static_reason, _fused_lokr_forward, _describe_lokr)),
)


def _register_peft_layers() -> None:
    for module_name, functions in _PEFT_LAYERS:
        try:
            layer_module = importlib.import_module(module_name)
        except ImportError:
            continue
        register_handler(layer_module.Linear, Handler(*functions))


# --------------------------------------------------------------------------------------- fuse / unfuse


@dataclass
class FuseReport:
    """What fuse() did: (module name, detail) for each fused layer and (module name, reason) for each tuner
    layer left on PEFT's path; then, updated live, the calls of fused layers that PEFT's path served (a
    mixed-adapter batch, adapters disabled or merged, ...) as {(module name, reason): calls}."""
    fused: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    fallbacks: dict = field(default_factory=dict)

    def __str__(self) -> str:
        calls = sum(self.fallbacks.values())
        lines = [f"peftkern.fuse: {len(self.fused)} layer(s) fused, {len(self.skipped)} left on PEFT's path"
                 + (f", {calls} call(s) of fused layers served by PEFT" if calls else "")]
        lines += [f"  fused     {name}: {detail}" for name, detail in self.fused]
        lines += [f"  skipped   {name}: {reason}" for name, reason in self.skipped]
        lines += [f"  fallback  {name}: {reason} ({n} call(s))" for (name, reason), n in self.fallbacks.items()]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"fused": [list(t) for t in self.fused], "skipped": [list(t) for t in self.skipped],
                "fallbacks": [[name, reason, n] for (name, reason), n in self.fallbacks.items()]}


def _peft_tuner_layer(module: nn.Module) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    return isinstance(module, BaseTunerLayer)


def _merged_around_each_call(model: nn.Module) -> set:
    """ids of the LoRA Linear layers whose forward PEFT never calls: a LoRA MultiheadAttention's out_proj, which it
    merges into the weight around each call."""
    try:
        from peft.tuners.lora.layer import MultiheadAttention
    except ImportError:
        return set()
    return {id(m.base_layer.out_proj) for m in model.modules()
            if isinstance(m, MultiheadAttention) and hasattr(m.base_layer, "out_proj")}


def _uncalled_by_a_mamba_mixer(model: nn.Module) -> Optional[str]:
    """The reason to skip a Mamba mixer's dt_proj (whose weight the mixer reads without calling the layer, so PEFT's
    LoRA there never runs either), where `model` is a transformers model of such a type, unquantized; else None."""
    from .transformers import DT_PROJ_READ_BY
    for module in model.modules():
        config = getattr(module, "config", None)
        model_type = getattr(config, "model_type", None)
        if isinstance(model_type, str):
            if model_type not in DT_PROJ_READ_BY or hasattr(config, "_is_quantized"):
                return None
            return (f"dt_proj of a {model_type} mixer, which reads its weight without calling the layer: the adapter "
                    "never runs (in PEFT's model either)")
    return None


def fuse(model: nn.Module) -> FuseReport:
    """Make every PEFT tuner layer of `model` that peftkern serves run its fused op; returns a FuseReport.

    Accepts a PeftModel or any nn.Module holding PEFT tuner layers. Idempotent: fusing again fuses what was
    added since (a new adapter on a new module) and returns a new report, which then counts the fallbacks.
    """
    _register_peft_layers()
    report = FuseReport()
    merged_per_call = _merged_around_each_call(model)
    uncalled_dt_proj = _uncalled_by_a_mamba_mixer(model)
    for name, module in model.named_modules():
        if not _peft_tuner_layer(module):
            continue
        handler = _HANDLERS.get(type(module))
        if handler is None:
            report.skipped.append((name, f"{type(module).__module__}.{type(module).__name__} is not fused yet"))
            continue
        if id(module) in merged_per_call:
            report.skipped.append((name, "out_proj of a LoRA MultiheadAttention, which merges it into the weight "
                                         "around each call (its forward never runs)"))
            continue
        if uncalled_dt_proj is not None and name.rsplit(".", 1)[-1] == "dt_proj":
            unfuse(module)
            report.skipped.append((name, uncalled_dt_proj))
            continue
        reason = handler.static_reason(module)
        if reason is None and "forward" in vars(module) and not is_fused(module):
            reason = "its forward is already replaced on the instance (e.g. an accelerate hook)"
        if reason is not None:
            # a layer fused before and now skipped (a hook added since) gets PEFT's forward back, as a first fuse
            # would leave it: it stayed fused, reported skipped, its fallbacks counted in the old report (a review,
            # 2026-12-05)
            unfuse(module)
            report.skipped.append((name, reason))
            continue
        if not is_fused(module):
            _bind(module, handler.forward)
            setattr(module, _FUSED_FLAG, True)
        setattr(module, _REPORT_ENTRY, (report, name))
        report.fused.append((name, handler.describe(module) + _reference_note(module)))
    return report


def _reference_note(module: nn.Module) -> str:
    """What the report adds for a fused layer whose base the kernels do not take (float64): it runs on the reference
    path, with a warning at its first call; said beforehand, as the skipped layers' reasons are."""
    weight = getattr(module.get_base_layer(), "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dtype in FLOAT_DTYPES and weight.dtype not in KERNEL_DTYPES:
        return f"; a {str(weight.dtype).removeprefix('torch.')} base: runs on the reference path (torch ops)"
    return ""


class _FusedForward:
    """A fused layer's forward, set on the instance: impl(module, x, ...). Not a bound method, which pickles as
    getattr(module, name) and so could not be loaded (torch.save(model) wrote a file torch.load refused). It holds
    the layer by a weak reference: a strong one made a cycle through the layer's __dict__, so `del model` freed a fused
    model's weights only at the next collection of cycles (an exploratory test, 2026-12-08)."""

    __slots__ = ("_module", "impl")

    def __init__(self, module: nn.Module, impl: Callable) -> None:
        self._module, self.impl = weakref.ref(module), impl

    @property
    def module(self) -> nn.Module:
        return self._module()

    def __call__(self, x, *args, **kwargs):
        return self.impl(self.module, x, *args, **kwargs)

    def replicate(self) -> nn.Module:
        """nn.DataParallel's replica of the layer (nn.Module._replicate_for_data_parallel), fused on its own: a replica
        copies the instance's __dict__, so its forward would otherwise compute with the original layer's parameters."""
        replica = type(self.module)._replicate_for_data_parallel(self.module)
        _bind(replica, self.impl)
        return replica

    def __reduce__(self):
        return _FusedForward, (self.module, self.impl)


def _bind(module: nn.Module, impl: Callable) -> None:
    fused = _FusedForward(module, impl)
    module.forward = fused
    module._replicate_for_data_parallel = fused.replicate


def unfuse(model: nn.Module) -> int:
    """Put PEFT's own forward back on every fused layer; returns how many were unfused. Idempotent."""
    count = 0
    for module in model.modules():
        if is_fused(module):
            if isinstance(module.__dict__.get("forward"), _FusedForward):
                del module.forward
            elif isinstance(module.__dict__.get("_old_forward"), _FusedForward):
                # an accelerate hook added after fuse() wraps the fused forward (add_hook_to_module keeps it as
                # _old_forward): the hook stays, around PEFT's forward
                module._old_forward = functools.partial(type(module).forward, module)
            module.__dict__.pop("_replicate_for_data_parallel", None)
            delattr(module, _FUSED_FLAG)
            module.__dict__.pop(_REPORT_ENTRY, None)
            count += 1
    return count


def is_fused(module: nn.Module) -> bool:
    """Whether fuse() replaced this layer's forward (and unfuse() has not put PEFT's back)."""
    return bool(module.__dict__.get(_FUSED_FLAG, False))
