"""What LoRALinear, IA3Linear and KronALinear share: a frozen linear layer (weight (N, K), or (K, N) as GPT-2's
Conv1D stores it) with a mergeable adapter beside it.

- from_linear wraps a user's layer: its weight and bias Parameters are shared, not copied, and frozen once the adapter
  is built (a rejected argument leaves the user's layer as it was).
- reset_parameters initialises the base as nn.Linear does and the adapter as the constructor does, for construction
  on the meta device (`to_empty()`, then `reset_parameters()` on every module, as FSDP2 users do).
- state_dict holds the frozen weight and the adapter apart whether the layer is merged or not (a merged layer saves
  its weight unmerged), and a merged layer unmerges before it loads: a checkpoint written after merge() no longer
  adds the adapter twice when it is loaded.
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops._common import FLOAT_DTYPES, check_flag


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's transformers.pytorch_utils.Conv1D: a linear layer whose weight is stored (K, N)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
              "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")
_MODULE_STATE = frozenset(vars(nn.Module()))  # what nn.Module.__init__ sets: training, _parameters, hooks ...


def _reparametrizes_another_tensor(hook) -> bool:
    """Whether `hook` is torch.nn.utils' old-style reparametrization (prune's, weight_norm's, spectral_norm's forward
    pre-hook) of a tensor other than the weight and bias: an adapter's, which merge_and_unload's plain layer lacks."""
    if not type(hook).__module__.startswith("torch.nn.utils"):
        return False
    name = getattr(hook, "_tensor_name", None) or getattr(hook, "name", None)
    return isinstance(name, str) and name not in ("weight", "bias")


def _rebuild_attributes(module: nn.Module) -> Optional[dict]:
    """The plain attributes (nn.Linear's in_features and out_features, Conv1D's nf and nx) from which, with its class
    and Parameters, merge_and_unload rebuilds `module`; None where it holds more (buffers, submodules, other state) or
    its class is local (a local class would stop the wrapping layer pickling)."""
    extra = {k: v for k, v in vars(module).items() if k not in _MODULE_STATE}
    plain = {k: v for k, v in extra.items() if isinstance(v, (bool, int, float, str, type(None)))}
    if (module._buffers or module._modules or not set(module._parameters) <= {"weight", "bias"}
            or len(plain) != len(extra) or "<locals>" in type(module).__qualname__):
        return None
    return plain


def _cpu_twin(linear: nn.Linear) -> nn.Linear:
    """A shallow copy of a meta-device nn.Linear subclass with a small random CPU weight (and bias), whose class's
    forward can be tried: a meta weight holds no values. The layer itself is left alone."""
    twin = copy.copy(linear)
    g = torch.Generator().manual_seed(0)
    twin._parameters = dict(linear._parameters)
    twin._parameters["weight"] = nn.Parameter(torch.randn(4, 3, generator=g), requires_grad=False)
    if linear.bias is not None:
        twin._parameters["bias"] = nn.Parameter(torch.randn(4, generator=g), requires_grad=False)
    twin.in_features, twin.out_features = 3, 4
    return twin


def computes_linear(linear: nn.Linear) -> bool:
    """Whether an nn.Linear subclass's own forward computes x W^T + b (transformers' FalconLinear, Falcon's every
    projection, writes out the same product): a layer with no state of its own beside weight and bias, whose output on
    two random rows is x W^T + b within two roundings, on two one-hot rows within one, in F.linear's dtype (and, for a
    float32 layer without a bias, under autocast too). A layer built on the meta device (the FSDP2 recipe: build on
    meta, attach adapters, to_empty) is tried through a small CPU twin of its class: add_lora on a meta Falcon model
    blamed FalconLinear's forward, which it could not try (a review, 2026-12-05)."""
    weight = linear.weight
    if weight.dim() != 2 or not weight.dtype.is_floating_point:
        return False
    # Parameters, buffers or modules of its own beside weight and bias (and a parametrization's container, which the
    # caller names): its forward reads them, and what it computes can change after the try (a load_state_dict).
    # transformers' DoryLMHead scales by a learned logit_scale, 1.5% off at its try and 2x after a checkpoint loaded
    # (an exploratory test, 2026-12-07).
    own = [name for group in (linear._parameters, linear._buffers) for name, t in group.items() if t is not None]
    if set(own) - {"weight", "bias"} or set(linear._modules) - {"parametrizations"}:
        return False
    if weight.device.type == "meta":
        return computes_linear(_cpu_twin(linear))
    K = weight.shape[1]
    try:
        with torch.no_grad():  # a generator of its own: fuse() and add_lora leave the global random state alone
            g = torch.Generator().manual_seed(0)
            # two random rows, and two one-hot rows, whose products are the weight's columns exactly: whatever order a
            # faithful forward adds in, it rounds them (with the bias) as F.linear does
            x = torch.cat([torch.randn(2, K, generator=g), torch.zeros(2, K)])
            x[2, 0] = x[3, K - 1] = 1.0  # not torch.eye(K)'s rows: K x K floats, 1.2 GB at Falcon-7B's K = 18176
            x = x.to(weight.device, weight.dtype)
            got, want = linear(x), F.linear(x, weight, linear.bias)
    except Exception:
        return False
    # the output's dtype too, under autocast as well: Ergo's router (an nn.Linear subclass) turns autocast off and
    # returns float32 logits, which the fused op returned in bf16 (an exploratory test, 2026-12-07). Under autocast only
    # without a bias: FalconLinear's x @ W.T + b returns float32 there too, promoted by the float32 bias, and is fused
    if not (isinstance(got, torch.Tensor) and got.shape == want.shape and got.dtype == want.dtype):
        return False
    if weight.dtype == torch.float32 and linear.bias is None:
        try:
            with torch.no_grad(), warnings.catch_warnings(), torch.autocast(weight.device.type, torch.bfloat16):
                warnings.simplefilter("ignore")  # a device without autocast: the try below tells nothing
                cast = (linear(x[:1]).dtype, F.linear(x[:1], weight, linear.bias).dtype)
        except Exception:
            cast = None
        if cast is not None and cast[0] != cast[1]:
            return False
    # random rows: the two products' roundings apart, and no more (an 8-bit fake-quantized weight, torch.ao's QAT
    # Linear, is ~1e-2 off in float32); one-hot rows: within one rounding of each element
    tolerance = 2e-2 if weight.element_size() < 4 else 1e-4
    rows, exact = (got[:2] - want[:2]).abs(), (got[2:] - want[2:]).abs()
    return bool((rows.max() <= tolerance * (want[:2].abs().max() + 1e-6)).item()
                and (exact <= torch.finfo(weight.dtype).eps * want[2:].abs()).all().item())


def global_hooks() -> bool:
    """Whether module hooks registered for every module (register_module_forward_hook, ...) are in place: PEFT's path,
    and an adapter's eager one, run them on their inner modules' calls too, which a fused op does not make."""
    m = nn.modules.module
    return bool(m._global_forward_pre_hooks or m._global_forward_hooks or m._global_backward_pre_hooks
                or m._global_backward_hooks)


def hooked(module: nn.Module) -> bool:
    """Whether calling `module` runs more than its class's forward: hooks (a user's, accelerate's offload, DeepSpeed
    ZeRO-3's parameter gathering) or a forward replaced on the instance. PEFT's path calls the base layer and the
    adapters' modules, so their hooks run there; a fused op or a wrapping layer reads their weights without calling
    them."""
    return bool(module._forward_pre_hooks or module._forward_hooks or module._backward_pre_hooks
                or module._backward_hooks or "forward" in module.__dict__)


def check_wrappable(linear: nn.Module, allow_conv1d: bool = True) -> None:
    """A TypeError unless `linear` is an nn.Linear (or GPT-2's Conv1D) computing x W^T + b: a subclass with its own
    forward that computes something else (a quantized layer, a custom op) would lose it inside the wrapping layer,
    which computes the plain product from its weight (an nn.Linear subclass's scaled output changed by 0.97 at init,
    a review, 2026-12-05)."""
    transposed = allow_conv1d and is_conv1d(linear)
    if not transposed and not isinstance(linear, nn.Linear):
        kinds = "an nn.Linear or a transformers Conv1D" if allow_conv1d else "an nn.Linear"
        raise TypeError(f"from_linear takes {kinds}, got {type(linear).__name__}")
    # parametrize / weight_norm / spectral_norm compute a tensor on each access (the bias's raised torch's "cannot
    # assign 'torch.FloatTensor' object to parameter 'bias'", an exploratory test, 2026-12-07); named before the
    # forward's try, which refuses a parametrized subclass for its state
    for name in ("weight", "bias"):
        if name in getattr(linear, "parametrizations", {}) or (name == "weight" and name not in linear._parameters):
            raise TypeError(f"this {type(linear).__name__}'s {name} is computed on each access (a parametrization "
                            "such as weight_norm or spectral_norm), which the wrapping layer would replace by one "
                            "computed copy, out of the state_dict; remove the parametrization first")
    if not transposed and type(linear).forward is not nn.Linear.forward and not computes_linear(linear):
        raise TypeError(f"{type(linear).__name__} is an nn.Linear whose own forward does not compute x W^T + b, "
                        "which the wrapping layer would drop (it computes x W^T + b from the weight); PEFT with "
                        "peftkern.fuse leaves such layers on PEFT's path")
    if hooked(linear):  # accelerate's offload hook loads the weight from the CPU / disk on each call
        raise TypeError(f"this {type(linear).__name__} has hooks or an instance forward (accelerate's device_map "
                        "offload, a user's hook), which the wrapping layer would drop; PEFT with peftkern.fuse leaves "
                        "such layers on PEFT's path")


def adapter_dtype_for(base_dtype: Optional[torch.dtype], adapter_dtype: Optional[torch.dtype],
                      name: str = "adapter_dtype") -> Optional[torch.dtype]:
    """adapter_dtype, or PEFT's default (autocast_adapter_dtype=True): float32 beside a float16 / bfloat16 base, whose
    rounding would lose most of an optimizer's small updates to the adapter; otherwise the base's dtype. A TypeError
    for a dtype that is not floating (an integer base or adapter_dtype reached nn.Parameter's RuntimeError) or one the
    ops do not take (float8, floating to is_floating_point: LoRA's init raised NotImplementedError, an IA3 layer was
    built and raised at its first call)."""
    if base_dtype is not None and base_dtype not in FLOAT_DTYPES:
        raise TypeError(f"the base layer's weight must be floating (float16, bfloat16, float32, float64), got "
                        f"{base_dtype}")
    if adapter_dtype is not None:
        return check_float_dtype(name, adapter_dtype)
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


def check_float_dtype(name: str, dtype) -> torch.dtype:
    """dtype, a floating torch.dtype the ops take (a TypeError naming `name` otherwise: an integer, float8)."""
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating torch.dtype (float16, bfloat16, float32, float64), got {dtype!r}")
    return dtype


def check_features(**sizes) -> None:
    """Each a non-negative int (a TypeError / ValueError naming it; a negative size reached torch.empty's
    RuntimeError)."""
    for name, n in sizes.items():
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(n).__name__} {n!r}")
        if n < 0:
            raise ValueError(f"{name} must be >= 0, got {n}")


class FrozenLinear(nn.Module):
    """Base of the wrapping layers. A subclass sets in_features, out_features, weight_transposed and merged in its
    adapter's init, and defines reset_adapter_parameters() and the adapter's parameter names (ADAPTER_PARAMETERS)."""

    ADAPTER_PARAMETERS: tuple = ()

    def _make_base(self, in_features: int, out_features: int, bias: bool, weight_transposed: bool, device,
                   dtype) -> None:
        check_features(in_features=in_features, out_features=out_features)
        check_flag("weight_transposed", weight_transposed)
        check_flag("bias", bias)  # bias="no" made one (an exploratory test, 2026-12-07)
        adapter_dtype_for(dtype, None)  # an integer base dtype: TypeError here, not nn.Parameter's RuntimeError
        self.in_features, self.out_features, self.weight_transposed = in_features, out_features, weight_transposed
        shape = (in_features, out_features) if weight_transposed else (out_features, in_features)
        self.weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype), requires_grad=False)
        # registered even when None, as nn.Linear(bias=False) does: register_parameter("bias", ...) then works
        self.register_parameter("bias", nn.Parameter(torch.empty(out_features, device=device, dtype=dtype),
                                                     requires_grad=False) if bias else None)

    @classmethod
    def _wrap(cls, linear: nn.Module, init_adapter: Callable, allow_conv1d: bool = True):
        """A `cls` holding `linear`'s weight and bias Parameters, with init_adapter(layer, K, N, transposed) called on
        it; the Parameters are frozen only once that returns."""
        check_wrappable(linear, allow_conv1d)
        transposed = allow_conv1d and is_conv1d(linear)
        K, N = (linear.weight.shape if transposed else linear.weight.shape[::-1])
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.weight = linear.weight
        layer.register_parameter("bias", linear.bias)  # None too, as nn.Linear(bias=False) registers it
        init_adapter(layer, K, N, transposed)
        # what merge_and_unload() rebuilds: the layer's class and its plain attributes (in_features, nf, ...), where
        # those are all it holds beside weight and bias and the class pickles (else an nn.Linear / Conv1D is rebuilt)
        attributes = _rebuild_attributes(linear)
        if attributes is not None:
            layer._base_class, layer._base_attributes = type(linear), attributes
        layer.weight.requires_grad_(False)
        if layer.bias is not None:
            layer.bias.requires_grad_(False)
        return layer

    @torch.no_grad()
    def merge_and_unload(self) -> nn.Module:
        """The adapter merged into the weight (merge()), returned as the plain layer this one wrapped (from_linear's
        class: an nn.Linear, GPT-2's Conv1D, FalconLinear ...; an nn.Linear or Conv1D for a layer built by its
        constructor) holding this layer's weight and bias Parameters, for saving or serving a merged model."""
        self.merge()
        cls = getattr(self, "_base_class", None)
        attributes = getattr(self, "_base_attributes", None)
        if cls is None:
            if self.weight_transposed:
                from transformers.pytorch_utils import Conv1D as cls
                attributes = {"nf": self.out_features, "nx": self.in_features}
            else:
                cls, attributes = nn.Linear, {"in_features": self.in_features, "out_features": self.out_features}
        plain = cls.__new__(cls)
        nn.Module.__init__(plain)
        vars(plain).update(attributes)
        plain.weight = self.weight
        plain.register_parameter("bias", self.bias)
        for name in HOOK_DICTS:  # hooks added after wrapping (a bottleneck adapter's, a user's) carry over, copied
            # (shared, a hook added to either layer later fired on both); torch's old-style reparametrizations of the
            # adapter's own tensors (prune, weight_norm, spectral_norm on lora_A ...) stay behind: merge() read the
            # factors they compute, and on the plain layer they raised (no lora_A_mask: an exploratory test, 2026-12-08)
            hooks = type(getattr(self, name))((key, hook) for key, hook in getattr(self, name).items()
                                               if not _reparametrizes_another_tensor(hook))
            setattr(plain, name, hooks)
        # the flag that makes torch run _backward_hooks as full backward hooks (without it they were dropped: a
        # review, 2026-12-05); the state-dict hooks stay with this layer, whose keys and semantics they were for
        plain._is_full_backward_hook = self._is_full_backward_hook
        return plain.train(self.training)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The base weight and bias as nn.Linear initialises them (uniform within 1/sqrt(in_features)), the adapter
        as the constructor does; the layer is then unmerged."""
        self._reset_base()
        self.merged = False
        self.reset_adapter_parameters()

    @torch.no_grad()
    def _reset_base(self) -> None:
        bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0  # Kaiming-uniform(a=sqrt(5))
        self.weight.uniform_(-bound, bound)
        if self.bias is not None:
            self.bias.uniform_(-bound, bound)

    def reset_adapter_parameters(self) -> None:
        raise NotImplementedError

    def _merged_forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.t() if self.weight_transposed else self.weight, self.bias)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        """A merged layer saves its weight (and IA3's bias) unmerged: a checkpoint always holds the frozen base and
        the adapter apart, whatever the layer's state, so it loads into any layer (merged or not, or a plain
        nn.Linear for the base) without the adapter applied twice. The keys are the unmerged layer's."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            weight, bias = self._unmerged_base()
            destination[prefix + "weight"] = weight
            if bias is not None:
                destination[prefix + "bias"] = bias

    @torch.no_grad()
    def _unmerged_base(self) -> tuple:
        """(weight, bias) with the adapter taken out, as copies: what unmerge() would leave (bias None: unchanged)."""
        weight, bias = self.weight.detach().clone(), None
        self._unmerge_into(weight)
        return weight, bias

    def _unmerge_into(self, weight: Tensor) -> None:
        raise NotImplementedError

    def _check_mergeable(self) -> None:
        """A RuntimeError where the weight is not this layer's Parameter but recomputed from others on each access
        (torch.nn.utils.parametrize, weight_norm, prune): merge would write into the recomputed copy, and the layer,
        marked merged, would run without its adapter (20.7 off, a review, 2026-12-05). Likewise every parameter merge
        changes: IA3's output form scales the bias too (a pruned bias: 0.085 off, a review, 2026-12-05)."""
        for name in self._merged_into():
            if name not in self._parameters:
                raise RuntimeError(f"{type(self).__name__}.merge: the {name} is recomputed from other tensors "
                                   "(parametrize, weight_norm or prune), so it cannot be merged into in place; remove "
                                   "the parametrization first, or keep the layer unmerged")

    def _merged_into(self) -> tuple:
        """The base parameters that merge() changes: a state dict holding any of them makes a merged layer unmerge
        before it loads (IA3's output form scales the bias too)."""
        return ("weight",)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """A merged layer unmerges before it loads a weight or adapter weights: checkpoints hold them apart. The
        module's load pre-hooks (which nn.Module runs inside this method) run first, here, once: one that renames
        the checkpoint's keys (PEFT's base_layer.weight to weight) decides what is loaded (decided before them, a
        merged layer loaded the renamed keys without unmerging and lost its adapter: a review, 2026-12-05)."""
        hooks = self._load_state_dict_pre_hooks
        for hook in hooks.values():
            hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self._load_state_dict_pre_hooks = type(hooks)()
        try:
            self._unmerge_to_load(state_dict, prefix)
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
        finally:
            self._load_state_dict_pre_hooks = hooks

    def _unmerge_to_load(self, state_dict, prefix) -> None:
        merged_into = self._merged_into()
        if self.merged and any(prefix + name in state_dict for name in (*merged_into, *self.ADAPTER_PARAMETERS)):
            try:
                self.unmerge()
            except ValueError:  # IA3 with zeros in l cannot unmerge: fine where everything merged is replaced
                if not all(prefix + name in state_dict for name in merged_into):
                    raise
                self.merged = False
