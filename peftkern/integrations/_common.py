"""What the integrations share."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..nn import TO_SAVE

_WRAPPERS = ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel")
# The children that wrappers keep the wrapped module under: torch.compile's, FSDP1's (at the root and around each
# unit it wraps) and the activation-checkpointing wrapper's. Their names are not the model's: saved keys leave them out.
WRAPPED_CHILDREN = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside torch.compile's OptimizedModule and DDP / DataParallel / FSDP wrappers, whose own names and
    state_dict keys carry a prefix (_orig_mod., module., _fsdp_wrapped_module.): the adapters' keys are the inner
    model's."""
    return _unwrap(model)[0]


def _unwrap(model: nn.Module) -> tuple:
    """(the inner model, the prefix its wrappers give its names: "module." under DDP, "" for none)."""
    path = []
    while True:
        child = next((c for c in WRAPPED_CHILDREN if model._modules.get(c) is not None), None)
        if child is None and type(model).__name__ in _WRAPPERS and model._modules.get("module") is not None:
            child = "module"
        if child is None:
            return model, "".join(f"{c}." for c in path)
        path.append(child)
        model = model._modules[child]


def distributed_wrapper(model: nn.Module) -> Optional[str]:
    """The data-parallel wrapper that wraps or shards `model` or a module inside it, a sharding one first:
    "fully_shard (FSDP2)", "FullyShardedDataParallel" (FSDP1) or "DistributedDataParallel"; None for a plain model or
    DataParallel (which replicates at every call)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # older torch
        FSDPModule = ()
    found = {"fully_shard (FSDP2)" if isinstance(m, FSDPModule) else type(m).__name__ for m in model.modules()}
    return next((w for w in ("fully_shard (FSDP2)", "FullyShardedDataParallel", "DistributedDataParallel")
                 if w in found), None)


def check_not_distributed(model: nn.Module, caller: str) -> None:
    """A ValueError where a data-parallel wrapper (distributed_wrapper) wraps or shards `model`: parameters added now
    are not ones the wrapper knows, so their gradients would never be all-reduced (each rank trained its own adapters,
    silently: a review, 2026-12-05) or they would meet sharded weights (FSDP2: a DTensor error in the first
    forward)."""
    wrapper = distributed_wrapper(model)
    if wrapper is not None:
        raise ValueError(f"{caller}: the model is already wrapped by {wrapper}, which would not synchronise (or "
                         "shard) the parameters added now: each rank would train its own. Add the adapters to the "
                         "plain model first, then wrap it")


def inner_state(model: nn.Module, state_dict: dict, keep_compiled: bool = False) -> dict:
    """A full state dict of `model` (a wrapper's, as DDP's state_dict() gives it, or the inner model's) with the inner
    model's names as keys, as saved files hold them (clean_name)."""
    prefix = _unwrap(model)[1]
    return {clean_name(k[len(prefix):] if prefix and k.startswith(prefix) else k, keep_compiled): v
            for k, v in state_dict.items()}


def saved_tensor(state: Optional[dict], key: str, value: torch.Tensor, caller: str) -> torch.Tensor:
    """The tensor a file saves for `key`: state[key] where the caller passed the model's full state dict, else the
    model's own `value`; refused where it is a shard (full_tensor)."""
    return full_tensor(from_state(state, key, caller) if state is not None else value, caller)


def from_state(state: dict, key: str, caller: str) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"{caller}: state_dict holds no {key!r}: pass the model's full state dict (its state_dict(), "
                         "or get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)))")
    return state[key]


def clean_name(name: str, keep_compiled: bool = False) -> str:
    """A module's name in the model without the wrappers' segments (FSDP1 wraps each unit in place, so its layers'
    names hold _fsdp_wrapped_module. inside them): the name the unwrapped model, and PEFT's keys, give it.
    keep_compiled keeps _orig_mod. (a layer compiled in place), as the bottleneck adapters' own files hold it."""
    drop = WRAPPED_CHILDREN[1:] if keep_compiled else WRAPPED_CHILDREN
    return ".".join(part for part in name.split(".") if part not in drop)


def full_tensor(t: torch.Tensor, caller: str) -> torch.Tensor:
    """t detached, or a ValueError for a shard of a DTensor (FSDP2's fully_shard), which a file cannot hold."""
    if type(t).__name__ == "DTensor" or type(getattr(t, "data", None)).__name__ == "DTensor":
        raise ValueError(f"{caller}: the model's parameters are sharded (DTensor, e.g. FSDP2's fully_shard): pass "
                         "state_dict=torch.distributed.checkpoint.state_dict.get_model_state_dict(model, options="
                         "StateDictOptions(full_state_dict=True)), computed on every rank, as PEFT's save_pretrained "
                         "takes it")
    return t.detach()


def matches_suffix(name: str, targets) -> bool:
    """PEFT's rule for a list of names: the module's name, or a dotted suffix of it."""
    return any(name == t or name.endswith("." + t) for t in targets)


def _to_save_match(name: str, targets) -> bool:
    """PEFT's rule for modules_to_save: the name ends with a target, with no dot boundary (so "classifier" names
    DistilBERT's pre_classifier too, as PEFT wraps it)."""
    return any(name.endswith(t) for t in targets)


def _outermost(name: str, targets):
    """The outermost module of the dotted `name` (itself included) that the modules_to_save `targets` name."""
    parts = name.split(".")
    return next((".".join(parts[:i]) for i in range(1, len(parts) + 1)
                 if _to_save_match(".".join(parts[:i]), targets)), None)


def find_modules_to_save(model: nn.Module, targets, caller: str) -> list[str]:
    """PEFT's modules_to_save: the modules named by `targets` (names ending so: ["score"], ["lm_head"]), outermost
    where they nest. Raises where no target names a module."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    found = []
    for name, _ in model.named_modules():  # parents come first: a match inside a found module is skipped
        if name and _to_save_match(name, targets) and not inside(name, found):
            found.append(name)
    if not found:
        raise ValueError(f"{caller}: modules_to_save {targets} named no module of the model")
    return found


def inside(name: str, outer) -> bool:
    """Whether the module `name` is one of the modules `outer` or lies inside one."""
    return any(name == o or name.startswith(o + ".") for o in outer)


def mark_to_save(model: nn.Module, names) -> None:
    """The modules `names` trained whole beside the adapters (a task head made at random): trainable, kept trainable by
    later freezes (freeze_all_but_adapters) and saved with the adapters. Trained in place, where PEFT trains a copy
    beside the original; a parameter shared with a module outside them (GPT-2's lm_head is its token embedding) is
    untied first, as PEFT's copy is, so that the other module keeps its weights."""
    for name in names:
        module = model.get_submodule(name)
        own = {id(p) for p in module.parameters()}
        shared = {id(p) for n, p in model.named_parameters(remove_duplicate=False)
                  if id(p) in own and not n.startswith(name + ".")}
        for owner in module.modules():
            for key, p in list(owner._parameters.items()):
                if p is not None and id(p) in shared:
                    owner._parameters[key] = nn.Parameter(p.detach().clone(), requires_grad=True)
        setattr(module, TO_SAVE, True)
        module.requires_grad_(True)


def unmark_to_save(module: nn.Module) -> None:
    """mark_to_save undone: the module frozen again, and no longer saved with the adapters."""
    module.__dict__.pop(TO_SAVE, None)
    module.requires_grad_(False)


def saved_module_names(model: nn.Module, clean: bool = False) -> list[str]:
    """The names of the modules marked by mark_to_save (the outermost where they nest); clean: without wrappers'
    segments (clean_name), as files hold them."""
    found = []
    for name, module in model.named_modules():
        if vars(module).get(TO_SAVE, False) and not inside(name, found):
            found.append(name)
    return [clean_name(n) for n in found] if clean else found


def saved_module_state(model: nn.Module, state: Optional[dict] = None, caller: str = "save") -> dict:
    """The state (parameters and persistent buffers) of the modules to save, under their (clean) names in the model:
    from `state` (the model's full state dict, keys as model.state_dict() gives them) where given."""
    out = {}
    for name in saved_module_names(model):
        prefix = clean_name(name)
        for key, value in model.get_submodule(name).state_dict().items():
            key = f"{prefix}.{clean_name(key)}"
            out[key] = saved_tensor(state, key, value, caller)
    return out


def check_saved_modules(model: nn.Module, state: dict, targets, source: str) -> list[str]:
    """The modules that `state` (keys <module>.<param>, as saved_module_state writes them) loads into: each key a
    tensor of a module named by `targets` (PEFT's modules_to_save) with the model's shape, else a ValueError."""
    own = model.state_dict(keep_vars=True)
    names = set()
    for key, tensor in state.items():
        owner = _outermost(key.rpartition(".")[0], targets)
        if not owner or key not in own:
            raise ValueError(f"{source}: {key} is neither an adapter weight nor a tensor of the model's "
                             f"modules_to_save {list(targets)}")
        if own[key].shape != tensor.shape:
            raise ValueError(f"{source}: {key} has shape {tuple(tensor.shape)}, the model's {tuple(own[key].shape)}")
        names.add(owner)
    return sorted(names)


def load_saved_modules(model: nn.Module, state: dict, targets, source: str) -> list[str]:
    """`state` copied into the modules_to_save (every key and shape checked first: check_saved_modules), which are
    marked to save (trainable). Returns their names."""
    names = check_saved_modules(model, state, targets, source)
    mark_to_save(model, names)  # untied before the copy: a tied embedding keeps its weights
    own = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, tensor in state.items():
            own[key].copy_(tensor)
    return names
