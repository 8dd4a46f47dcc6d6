"""Bottleneck adapters on transformers models: attach (add_adapters), save / load the adapter weights alone,
and read AdapterHub (`adapters` package) bottleneck checkpoints.

Placements, in PEFT-Ref's vocabulary (workspace, insertion form):
    after_attention        sequential, attention layer:     o = attn_out + s up(act(down(attn_out)))
    after_feed_forward     sequential, feed-forward layer:  o = ffn_out + s up(act(down(ffn_out)))
    parallel_feed_forward  parallel, feed-forward layer:    o = ffn(x) + s up(act(down(x)))
each applied to the block's output before the layer's residual add (and, in BERT, before its LayerNorm), as
Houlsby et al. and He et al. define them. Presets: houlsby = both sequential places (swish), pfeiffer = after
the feed-forward block (relu), parallel = He et al.'s parallel adapter (relu, reduction 2, s = 4).

Where they go: a forward hook on the block's output projection (Llama-style self_attn.o_proj / mlp.down_proj,
GPT-2 attn.c_proj / mlp.c_proj, BERT attention.output.dense / output.dense, and the other LAYOUTS below) for the
sequential places; for the parallel one a hook on the whole feed-forward module (mlp: input and output at hand)
or, where the feed-forward block is not one module (BERT's intermediate and output, OPT's and BART's fc1 and fc2
on the layer itself), a pre-hook on its first module that hands its input to a hook on the output projection.
Hooks leave every name of the model's state_dict as it was; the adapters are submodules of
their layer, so the saved file's keys are predictable:

    <layer>.bottleneck_adapters.<placement>.down.weight    (b, d)     down.bias  (b,)
    <layer>.bottleneck_adapters.<placement>.up.weight      (d, b)     up.bias    (d,)
    <layer>.bottleneck_adapters.<placement>.layer_norm.weight / .bias (d,)   with layer_norm=True
    <layer>.bottleneck_adapters.<placement>.scale          ()         with scaling="learned"

where <layer> is the layer's name in the model (model.layers.0, transformer.h.0, bert.encoder.layer.0):
bottleneck_adapter.safetensors holds exactly these tensors, and those of the modules_to_save (<module>.<param>: a
task head trained beside the adapters) where add_adapters was given some; bottleneck_adapter_config.json the
configuration.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import re
import warnings
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from ..nn import freeze_all_but_adapters
from ..nn._frozen import HOOK_DICTS
from ..nn.adapter import BottleneckAdapter
from ._common import (
    _unwrapped,
    check_not_distributed,
    check_saved_modules,
    clean_name,
    find_modules_to_save,
    full_tensor,
    inner_state,
    load_saved_modules,
    mark_to_save,
    saved_module_names,
    saved_module_state,
    unmark_to_save,
)

CONFIG_NAME = "bottleneck_adapter_config.json"
WEIGHTS_NAME = "bottleneck_adapter.safetensors"
CONTAINER = "bottleneck_adapters"

# placement -> (insertion form, PEFT-Ref workspace)
PLACEMENTS = {
    "after_attention": ("sequential", "attention layer"),
    "after_feed_forward": ("sequential", "feed-forward layer"),
    "parallel_feed_forward": ("parallel", "feed-forward layer"),
}


@dataclass
class AdapterConfig:
    """What add_adapters attaches. bottleneck_size overrides hidden_size // reduction_factor; scaling is a number
    or "learned"; layer_norm adds a pre-adapter LN; layers picks layers by index (None: all): the position in the
    model's layer stack (model.layers.<i>)."""
    placements: tuple = ("after_feed_forward",)
    reduction_factor: float = 16
    bottleneck_size: Optional[int] = None
    non_linearity: str = "relu"
    scaling: Union[float, str] = 1.0
    layer_norm: bool = False
    init: Optional[str] = None
    layers: Optional[tuple] = None

    def __post_init__(self):
        self.placements = (self.placements,) if isinstance(self.placements, str) else tuple(self.placements)
        unknown = [p for p in self.placements if p not in PLACEMENTS]
        if unknown or not self.placements:
            raise ValueError(f"placements must be a non-empty subset of {tuple(PLACEMENTS)}, got {self.placements}")
        if self.layers is not None:
            self.layers = tuple(int(i) for i in self.layers)
        # numbers as Python's own: a numpy or 0-d tensor scaling trained as well, then save_adapters could not write it
        # to JSON and left a config file cut off at "scaling": (an exploratory test, 2026-12-07)
        for name in ("reduction_factor", "bottleneck_size", "scaling"):
            value = getattr(self, name)
            if not isinstance(value, (str, bool, int, float)) and hasattr(value, "item"):
                if (value.numel() if hasattr(value, "numel") else getattr(value, "size", 1)) != 1:  # torch's, numpy's
                    raise TypeError(f"AdapterConfig.{name} must be one number, got {type(value).__name__} of shape "
                                    f"{tuple(value.shape)}")
                setattr(self, name, value.item())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "AdapterConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


PRESETS = {
    "houlsby": dict(placements=("after_attention", "after_feed_forward"), non_linearity="silu"),
    "pfeiffer": dict(placements=("after_feed_forward",), non_linearity="relu"),
    "parallel": dict(placements=("parallel_feed_forward",), non_linearity="relu", reduction_factor=2,
                     scaling=4.0, init="mam"),
}


def adapter_config(config: Union[AdapterConfig, dict, str] = "pfeiffer", **overrides) -> AdapterConfig:
    """An AdapterConfig from a preset name (houlsby, pfeiffer, parallel), a dict or a config, with overrides."""
    if isinstance(config, str):
        if config.lower() not in PRESETS:
            raise ValueError(f"unknown adapter preset {config!r}; choose from {sorted(PRESETS)}")
        config = AdapterConfig(**PRESETS[config.lower()])
    elif isinstance(config, dict):
        # a user's dict is checked (from_dict drops what it does not know, for files a later version wrote): a typo
        # such as "placement" fell back to the default placement without a word (a review, 2026-12-06)
        fields = [f.name for f in dataclasses.fields(AdapterConfig)]
        unknown = sorted(set(config) - set(fields))
        if unknown:
            raise ValueError(f"unknown adapter config keys {unknown}; AdapterConfig has {fields}")
        config = AdapterConfig.from_dict(config)
    elif not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be an AdapterConfig, a dict or a preset name, got {type(config).__name__}")
    return dataclasses.replace(config, **overrides) if overrides else config


# ---------------------------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class _Layout:
    """Where a layer kind's blocks end. feed_forward: the module whose input and output are the feed-forward
    block's; else feed_forward_input = (module, argument index) whose call receives the block's input."""
    name: str
    attention_output: str
    feed_forward_output: str
    feed_forward: Optional[str] = None
    feed_forward_input: Optional[tuple] = None


LAYOUTS = (
    _Layout("llama", "self_attn.o_proj", "mlp.down_proj", feed_forward="mlp"),  # Llama, Mistral, Qwen2, Phi-3
    # a mixture-of-experts block (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): the adapters sit on the whole block's output
    # (the router's weighted sum of the experts), as Llama's on its MLP's
    _Layout("llama_moe", "self_attn.o_proj", "mlp", feed_forward="mlp"),
    _Layout("gpt2", "attn.c_proj", "mlp.c_proj", feed_forward="mlp"),
    # BERT, RoBERTa; the feed-forward input is intermediate's: BertOutput's input_tensor is the same tensor in BERT, but
    # the un-normalised residual in the pre-LN encoders that reuse BERT's names (VideoMAE, YOLOS), and absent from
    # Data2VecVision's output (whose forward failed with an IndexError there)
    _Layout("bert", "attention.output.dense", "output.dense", feed_forward_input=("intermediate", 0)),
    _Layout("clip", "self_attn.out_proj", "mlp.fc2", feed_forward="mlp"),  # CLIP's and SigLIP's towers
    _Layout("vit", "attention.o_proj", "mlp.fc2", feed_forward="mlp"),  # ViT (transformers 5)
    _Layout("phi", "self_attn.dense", "mlp.fc2", feed_forward="mlp"),  # Phi-1, Phi-2
    _Layout("gpt_neox", "attention.dense", "mlp.dense_4h_to_h", feed_forward="mlp"),  # GPT-NeoX, Pythia
    _Layout("falcon", "self_attention.dense", "mlp.dense_4h_to_h", feed_forward="mlp"),
    _Layout("distilbert", "attention.out_lin", "ffn.lin2", feed_forward="ffn"),
    # OPT, and BART / Whisper / Marian encoder and decoder layers (a decoder's cross-attention gets no adapter):
    # the feed-forward block is fc1, activation, fc2 on the layer itself
    _Layout("bart", "self_attn.out_proj", "fc2", feed_forward_input=("fc1", 0)),
    # T5 / mT5 blocks: layer.0 is the self-attention, then a decoder's cross-attention (no adapter), then the
    # feed-forward block (DenseReluDense, gated or not, whose input is the layer-normed hidden state)
    _Layout("t5_decoder", "layer.0.SelfAttention.o", "layer.2.DenseReluDense.wo",
            feed_forward="layer.2.DenseReluDense"),
    _Layout("t5", "layer.0.SelfAttention.o", "layer.1.DenseReluDense.wo", feed_forward="layer.1.DenseReluDense"),
)


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def _layout_of(module: nn.Module) -> Optional[_Layout]:
    for layout in LAYOUTS:
        paths = [layout.attention_output, layout.feed_forward_output,
                 layout.feed_forward or layout.feed_forward_input[0]]
        if all(_has(module, p) for p in paths):
            return layout
    return None


# The layouts peftkern knew first. A model that has layers of these and of the others (a vision-language model: a CLIP
# or SigLIP tower beside a Llama-style language model) gets its adapters on these alone, as before the others came:
# add_adapters' choice of layers and config.layers' indices, and the files saved, stay as they were.
LANGUAGE_MODEL_LAYOUTS = ("llama", "llama_moe", "gpt2", "bert")


def transformer_layers(model: nn.Module) -> list[tuple[str, nn.Module, _Layout]]:
    """(name, module, layout) of every transformer layer peftkern knows how to adapt, in model order."""
    found = []
    for name, module in _unwrapped(model).named_modules():
        if any(name.startswith(prefix + ".") for prefix, _, _ in found):
            continue
        layout = _layout_of(module)
        if layout is not None:
            found.append((name, module, layout))
    if any(layout.name in LANGUAGE_MODEL_LAYOUTS for _, _, layout in found):
        found = [entry for entry in found if entry[2].name in LANGUAGE_MODEL_LAYOUTS]
    return found


def _indexed_layers(model: nn.Module, layers: list) -> dict:
    """{index: (name, module, layout)} of the layers peftkern can adapt, by the index config.layers uses: the layer's
    position in the model's layer stack where one nn.ModuleList holds them all (model.layers.<i>), else its place
    among them in model order."""
    parents = {name.rpartition(".")[0] for name, _, _ in layers}
    if len(parents) == 1:
        parent = next(iter(parents))
        if isinstance(model.get_submodule(parent) if parent else model, nn.ModuleList):
            return {int(entry[0].rpartition(".")[2]): entry for entry in layers}
    return dict(enumerate(layers))


def _layer_stack_gaps(model: nn.Module, found: list) -> list[str]:
    """Layers of the stacks (ModuleLists) that hold the found layers, which have no layout peftkern knows (a
    mixture-of-experts layer among dense ones): add_adapters leaves them without adapters."""
    names = {name for name, _, _ in found}
    gaps = []
    for parent in sorted({name.rpartition(".")[0] for name in names}):
        stack = model.get_submodule(parent) if parent else model
        if isinstance(stack, nn.ModuleList):
            members = (f"{parent}.{i}" if parent else str(i) for i in range(len(stack)))
            gaps += [name for name in members if name not in names]
    return gaps


# ------------------------------------------------------------------------------------------------ hooks


def _argument(module: nn.Module, args: tuple, kwargs: dict, index: int):
    if len(args) > index:
        return args[index]
    name = list(inspect.signature(module.forward).parameters)[index]
    return kwargs[name]


def _on_hidden(output, apply):
    """apply() to a block's hidden states: its output, or the first element of a tuple (a mixture-of-experts block
    that also returns its router logits)."""
    if isinstance(output, tuple):
        return (apply(output[0]), *output[1:])
    return apply(output)


def _sequential_hook(adapter: BottleneckAdapter, module, args, output):
    return _on_hidden(output, adapter)


def _parallel_hook(adapter: BottleneckAdapter, module, args, kwargs, output):
    block_input = _argument(module, args, kwargs, 0)
    return _on_hidden(output, lambda out: adapter(block_input, residual=out))


def _stash_input_hook(adapter: BottleneckAdapter, index: int, module, args, kwargs):
    adapter._block_input = _argument(module, args, kwargs, index)


def _parallel_from_stash_hook(adapter: BottleneckAdapter, module, args, output):
    block_input, adapter._block_input = adapter._block_input, None
    return adapter(block_input, residual=output)


def _before_parallel_adapters(target: nn.Module, handle) -> None:
    """Move the hook of `handle` before the parallel adapters' hooks on `target`: where a family's sequential FFN
    adapter and its parallel one hook the same module (BERT's output.dense, OPT's and BART's fc2, a MoE block), the
    parallel adapter adds s ad_p(x) to the FFN's output with the sequential adapter applied, as in Llama, where they
    hook down_proj inside mlp, whichever was added first (the order of placements or of add_adapters calls changed
    the function: 0.2-0.4 off in OPT and Mixtral, a review, 2026-12-05)."""
    hooks = target._forward_hooks
    items = [(k, h) for k, h in hooks.items() if k != handle.id]
    at = next((i for i, (_, h) in enumerate(items) if isinstance(h, functools.partial)
               and h.func in (_parallel_hook, _parallel_from_stash_hook)), None)
    if at is None:
        return
    items.insert(at, (handle.id, hooks[handle.id]))
    hooks.clear()
    hooks.update(items)


def _attach(layer: nn.Module, layout: _Layout, placement: str, adapter: BottleneckAdapter) -> list:
    # functools.partial binds the adapter as data: copy.deepcopy(model) gives the copy's hooks its own adapters.
    if placement == "after_attention":
        target = layer.get_submodule(layout.attention_output)
        return [target.register_forward_hook(functools.partial(_sequential_hook, adapter))]
    if placement == "after_feed_forward":
        target = layer.get_submodule(layout.feed_forward_output)
        handle = target.register_forward_hook(functools.partial(_sequential_hook, adapter))
        _before_parallel_adapters(target, handle)
        return [handle]
    if layout.feed_forward is not None:
        target = layer.get_submodule(layout.feed_forward)
        return [target.register_forward_hook(functools.partial(_parallel_hook, adapter), with_kwargs=True)]
    source, index = layout.feed_forward_input
    adapter._block_input = None
    return [layer.get_submodule(source).register_forward_pre_hook(
                functools.partial(_stash_input_hook, adapter, index), with_kwargs=True),
            layer.get_submodule(layout.feed_forward_output).register_forward_hook(
                functools.partial(_parallel_from_stash_hook, adapter))]


def _projection(layer: nn.Module, layout: _Layout) -> nn.Module:
    """The layer's output projection whose width the adapters take: the feed-forward block's, or the attention's
    where the block ends in no one projection (a mixture of experts)."""
    proj = layer.get_submodule(layout.feed_forward_output)
    return proj if isinstance(getattr(proj, "weight", None), torch.Tensor) else layer.get_submodule(
        layout.attention_output)


def _hidden_size(layer: nn.Module, layout: _Layout) -> int:
    proj = _projection(layer, layout)
    # the projection's output width: nn.Linear's out_features, GPT-2 Conv1D's nf, and the same attribute on a layer
    # wrapping either (PEFT's tuner layers, peftkern's LoRALinear), whose weight may be Conv1D's (in, out)
    for attr in ("out_features", "nf"):
        width = getattr(proj, attr, None)
        if isinstance(width, int):
            return width
    weight = proj.weight
    return weight.shape[1] if type(proj).__name__ == "Conv1D" else weight.shape[0]


# ------------------------------------------------------------------------------------------- public API


def _adapter_name(layer_name: str, placement: str) -> str:
    return f"{layer_name}.{CONTAINER}.{placement}" if layer_name else f"{CONTAINER}.{placement}"


def _plan(model: nn.Module, layers: list, config: AdapterConfig, adapter_dtype: Optional[torch.dtype],
          device: Optional[torch.device] = None, attached_ok: bool = False) -> tuple:
    """(the chosen layer indices, [(layer name, layer, layout, placement, adapter)]) that add_adapters(model, config)
    attaches to `layers` (transformer_layers(model)), the adapters built (on `device`, else beside the layer's
    weight) and nothing changed; an adapter at a placement already taken is an error unless attached_ok."""
    if not layers:
        known = ", ".join(layout.name for layout in LAYOUTS)
        raise ValueError(f"found no transformer layers of a layout peftkern knows ({known}: "
                         f"peftkern/integrations/adapters.py, LAYOUTS) in {type(model).__name__}")
    indexed = _indexed_layers(model, layers)
    chosen = tuple(indexed) if config.layers is None else config.layers
    bad = [i for i in chosen if i not in indexed]
    if bad:
        raise ValueError(f"config.layers {list(bad)}: no such layer, or one whose layout peftkern does not know; the "
                         f"layers it can adapt are {list(indexed)}")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"config.layers {list(chosen)} names a layer twice")
    planned = []
    for i in chosen:
        layer_name, layer, layout = indexed[i]
        container = getattr(layer, CONTAINER, None)
        weight = _projection(layer, layout).weight
        for placement in config.placements:
            if container is not None and placement in container and not attached_ok:
                raise ValueError(f"{layer_name} already has an adapter at {placement}")
            form, workspace = PLACEMENTS[placement]
            adapter = BottleneckAdapter(
                _hidden_size(layer, layout), config.reduction_factor, config.bottleneck_size, config.non_linearity,
                config.scaling, config.layer_norm, form, config.init, workspace, device=device or weight.device,
                dtype=adapter_dtype or weight.dtype)
            planned.append((layer_name, layer, layout, placement, adapter))
    return chosen, planned


def add_adapters(model: nn.Module, config: Union[AdapterConfig, dict, str] = "pfeiffer",
                 adapter_dtype: Optional[torch.dtype] = None, freeze_base: bool = True,
                 modules_to_save: Optional[list[str]] = None) -> list[str]:
    """Attach BottleneckAdapters to every transformer layer of `model` (or config.layers) at config.placements;
    freeze everything else (freeze_base). Returns the adapters' module names.

    Layers are found by structure (the layouts in this module; the README's bottleneck adapter section lists the
    model families: Llama-style decoders, GPT-2, BERT-style encoders, OPT, BART, Falcon, ViT, ...). The adapters
    take the dtype and device of the layer's weights unless adapter_dtype is given.
    modules_to_save: as PEFT's, names or suffixes of modules trained whole beside the adapters (a classifier head
    made at random: ["classifier"]) and saved with them by save_adapters; trained in place.
    """
    config = adapter_config(config)
    check_not_distributed(model, "add_adapters")
    model = _unwrapped(model)
    to_save = find_modules_to_save(model, modules_to_save, "add_adapters") if modules_to_save else []
    layers = transformer_layers(model)
    gaps = _layer_stack_gaps(model, layers)
    if gaps and config.layers is None:
        warnings.warn(f"add_adapters: layers {gaps} have no layout peftkern knows (e.g. a mixture-of-experts block) "
                      "and get no adapter", RuntimeWarning, stacklevel=2)
    # Every adapter is built and checked before the model changes: a refused call leaves it as it was.
    chosen, planned = _plan(model, layers, config, adapter_dtype)
    if freeze_base:
        freeze_all_but_adapters(model)  # the adapters attached before keep training
    names = []
    for layer_name, layer, layout, placement, adapter in planned:
        if getattr(layer, CONTAINER, None) is None:
            layer.add_module(CONTAINER, nn.ModuleDict())
        getattr(layer, CONTAINER)[placement] = adapter
        _attach(layer, layout, placement, adapter)
        names.append(_adapter_name(layer_name, placement))
    mark_to_save(model, to_save)
    _record_to_save(model, to_save)
    model._peftkern_adapter_configs = list(getattr(model, "_peftkern_adapter_configs", None) or []) + [
        dataclasses.replace(config, layers=tuple(chosen))]
    return names


def _record_to_save(model: nn.Module, names: list) -> None:
    """The modules_to_save that add_adapters / load_adapters marked, which remove_adapters unmarks."""
    model._peftkern_adapters_to_save = sorted(set(getattr(model, "_peftkern_adapters_to_save", ())) | set(names))


def _configs(model: nn.Module) -> list:
    """The AdapterConfig of each add_adapters call on the model or on any module inside it (add_adapters(m.model)
    then save_adapters(m)), in order (save_adapters writes them all)."""
    # vars(): FSDP1's wrapper hands attribute reads to the module it wraps, which would count its configs twice
    model = _unwrapped(model)
    configs, full = [], None
    for prefix, m in model.named_modules():
        recorded = vars(m).get("_peftkern_adapter_configs") or []
        if m is model or not recorded:
            configs += recorded
            continue
        # a call on an inner module counted that module's layers: its config says which of the model's they are (the
        # decoder's layers 0.. of a BART model are the model's after the encoder's, and a file saved from the whole
        # model put the adapters on the encoder at load; a review, 2026-12-05)
        if full is None:
            full = {name: i for i, (name, _, _) in _indexed_layers(model, transformer_layers(model)).items()}
        own = _indexed_layers(m, transformer_layers(m))
        for c in recorded:
            names = [f"{prefix}.{own[i][0]}" for i in (own if c.layers is None else c.layers) if i in own]
            if names and all(n in full for n in names):
                c = dataclasses.replace(c, layers=tuple(sorted(full[n] for n in names)))
            configs.append(c)
    return configs


def adapters(model: nn.Module) -> dict[str, BottleneckAdapter]:
    return {name: m for name, m in _unwrapped(model).named_modules() if isinstance(m, BottleneckAdapter)}


_HOOKS = (_sequential_hook, _parallel_hook, _stash_input_hook, _parallel_from_stash_hook)


def adapter_hooks(module: nn.Module) -> list:
    """The hooks on `module` that run bottleneck adapters (add_adapters'), with their handles' ids."""
    return [(key, hook) for key, hook in list(module._forward_hooks.items()) + list(module._forward_pre_hooks.items())
            if isinstance(hook, functools.partial) and hook.func in _HOOKS]


def _remove_hooks(model: nn.Module, only: Optional[set] = None) -> None:
    """Remove the hooks that run adapters (those of the adapters whose id() is in `only`, else all) from every module
    of the model, wherever add_adapters was called: handles kept on the model that add_adapters was given missed the
    hooks when remove_adapters got another (add_adapters(m.model), remove_adapters(m): the adapters ran on, unseen)."""
    for module in model.modules():
        for key, hook in adapter_hooks(module):
            if only is None or id(hook.args[0]) in only:
                for name in HOOK_DICTS:
                    getattr(module, name, {}).pop(key, None)


def remove_adapters(model: nn.Module) -> None:
    """Detach every adapter add_adapters attached (hooks and modules); the model's own parameters stay frozen, the
    modules_to_save of add_adapters included (they are no longer saved with adapters)."""
    model = _unwrapped(model)
    _remove_hooks(model)
    for module in model.modules():
        # the module's own child, not getattr's: a wrapper that hands attribute reads to the module it wraps (torch's
        # activation-checkpointing CheckpointWrapper, applied after add_adapters) showed its inner module's container,
        # and delattr on the wrapper raised AttributeError with the hooks already gone (a review, 2026-12-06)
        if isinstance(module._modules.get(CONTAINER), nn.ModuleDict):
            del module._modules[CONTAINER]
        module.__dict__.pop("_peftkern_adapter_configs", None)
        for name in module.__dict__.pop("_peftkern_adapters_to_save", ()):
            unmark_to_save(module.get_submodule(name))


def _clean(name: str) -> str:
    """A name without the sharding wrappers' segments; a layer compiled in place keeps its _orig_mod. (the files
    written so load back into the same compiled model, as accelerate's regional compilation makes it)."""
    return clean_name(name, keep_compiled=True)


def adapter_state_dict(model: nn.Module, state_dict: Optional[dict] = None) -> dict[str, torch.Tensor]:
    """The adapter tensors under their names in the model (the key layout in this module's docstring); a compiled
    or DDP / FSDP-wrapped model's are its inner model's; read from `state_dict` (the model's full state dict) where
    given."""
    state = _unwrapped(model).state_dict() if state_dict is None else state_dict
    # a learned scale is saved 0-dim, as files always held it (the parameter is (1,) for FSDP2's sake)
    return {_clean(k): _file_layout(k, full_tensor(v, "save_adapters")) for k, v in state.items()
            if _is_adapter_key(k)}


def _file_layout(key: str, tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(()) if key.endswith(".scale") and tensor.numel() == 1 else tensor


def _is_adapter_key(key: str) -> bool:
    """Whether a state_dict key is an adapter tensor's (<layer>.bottleneck_adapters.<placement>....)."""
    return key.startswith(f"{CONTAINER}.") or f".{CONTAINER}." in key


def save_adapters(model: nn.Module, path: str, state_dict: Optional[dict] = None) -> None:
    """Write bottleneck_adapter_config.json and bottleneck_adapter.safetensors (the adapter weights only). state_dict:
    the model's full state dict for a sharded model (FSDP2: get_model_state_dict(model,
    options=StateDictOptions(full_state_dict=True)) on every rank, then save_adapters on one)."""
    from safetensors.torch import save_file

    if state_dict is not None:
        state_dict = inner_state(model, state_dict, keep_compiled=True)
    model = _unwrapped(model)
    configs = _configs(model)
    state = adapter_state_dict(model, state_dict)
    if not configs or not state:
        raise ValueError("the model has no adapters attached by peftkern.add_adapters to save")
    os.makedirs(path, exist_ok=True)
    # "config": the first call's, as format 1 wrote it; "configs": every add_adapters call's, in order
    # format 2: config.layers are positions in the model's layer stack; format 1 counted the adaptable layers in order
    layers = transformer_layers(model)
    meta = {"peft_type": "BOTTLENECK_ADAPTER", "library": "peftkern", "format_version": 2,
            "config": configs[0].to_dict(), "configs": [c.to_dict() for c in configs],
            "layers": [_clean(n) for n, _, _ in layers],
            "layer_classes": [type(layer).__name__ for _, layer, _ in layers],
            "key_layout": f"<layer>.{CONTAINER}.<placement>.(down|up|layer_norm).(weight|bias) and .scale",
            "modules_to_save": saved_module_names(model, clean=True) or None}
    text = json.dumps(meta, indent=2)  # before the file opens: a value JSON cannot hold leaves no half-written file
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        f.write(text)
    state.update(saved_module_state(model, state_dict, "save_adapters"))
    save_file({k: v.contiguous().cpu() for k, v in state.items()}, os.path.join(path, WEIGHTS_NAME))


def _adapter_of(key: str) -> str:
    """The adapter module's name in a key <layer>.bottleneck_adapters.<placement>.<param...>."""
    if key.startswith(f"{CONTAINER}."):
        head, rest = "", key[len(CONTAINER) + 1:]
    else:
        head, _, rest = key.partition(f".{CONTAINER}.")
    return _adapter_name(head, rest.split(".", 1)[0])


def _copy_state(model: nn.Module, state: dict, source: str, names: set) -> None:
    """state (exactly the tensors of the adapters `names`) into them; every key and shape checked before a copy."""
    own = {k: v for k, v in adapter_state_dict(model).items() if _adapter_of(k) in names}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{source} does not fit the attached adapters (another architecture, or a different "
                         f"configuration: layer norm, learned scale?): missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]}")
    for key, tensor in state.items():
        if own[key].shape != tensor.shape:
            raise ValueError(f"{source}: {key} has shape {tuple(tensor.shape)}, the model's adapter "
                             f"{tuple(own[key].shape)} (a different hidden size or reduction factor)")
    params = {_clean(n): p for n, p in model.named_parameters()}  # the keys' names: no wrapper segments
    with torch.no_grad():
        for key, tensor in state.items():
            params[key].copy_(tensor.reshape(params[key].shape))


def _attach_and_load(model: nn.Module, configs: list, state: dict, source: str,
                     adapter_dtype: Optional[torch.dtype]) -> list[str]:
    """The adapters of `state` loaded: into the model's own where it has all of them already (a resume), else attached
    by add_adapters(model, config) for each of `configs` first. A refused load leaves the model as it was (before, a
    failed check left adapters attached with their initial weights, and the base frozen; a resume raised)."""
    outer, model = model, _unwrapped(model)
    wanted = {_adapter_of(k) for k in state}
    # by the names the files hold (_clean): layers wrapped after add_adapters (torch's activation-checkpointing
    # CheckpointWrapper, FSDP1's units) name their adapters with the wrapper's segment, which the file leaves out, so a
    # resume found none of them and attached a second set, refused with "already has an adapter" (a review, 2026-12-06)
    attached = {_clean(name): module for name, module in adapters(model).items()}
    present = wanted & set(attached)
    if present:
        if present != wanted:
            raise ValueError(f"{source}: the model has some of its adapters ({sorted(present)[:2]}) but not others "
                             f"({sorted(wanted - present)[:2]}); load it into a model with all of them or none")
        layers = transformer_layers(model)
        # the adapter each planned one would be, found from its layer (a layer compiled in place, or wrapped, is found
        # as its wrapper, whose name lacks the _orig_mod. that the adapter's and the file's names hold: the check was
        # skipped there, and a file of silu adapters loaded into gelu ones; a review, 2026-12-06)
        names = {id(module): name for name, module in attached.items()}
        for config in configs:  # the file's configuration against the adapters there (activation, scale, ...)
            for _, layer, _, placement, expected in _plan(model, layers, config, None, torch.device("meta"), True)[1]:
                container = getattr(layer, CONTAINER, None)
                adapter = container[placement] if container is not None and placement in container else None
                name = names.get(id(adapter))
                if name in wanted and adapter.extra_repr() != expected.extra_repr():
                    raise ValueError(f"{source}: {name} is attached as ({adapter.extra_repr()}), the file's "
                                     f"configuration makes ({expected.extra_repr()})")
        _copy_state(model, state, source, wanted)
        return sorted(wanted)
    check_not_distributed(outer, "load_adapters")  # loading into the adapters there already (a resume) is fine
    grads = {p: p.requires_grad for p in model.parameters()}
    recorded = {m: m.__dict__.get("_peftkern_adapter_configs") for m in model.modules()}
    names = []
    try:
        for config in configs:
            names += add_adapters(model, config, adapter_dtype=adapter_dtype)
        _copy_state(model, state, source, set(names))
    except Exception:
        _detach(model, names)
        for p, flag in grads.items():
            p.requires_grad_(flag)
        for m, value in recorded.items():
            if value is None:
                m.__dict__.pop("_peftkern_adapter_configs", None)
            else:
                m._peftkern_adapter_configs = value
        raise
    return names


def _detach(model: nn.Module, names: list) -> None:
    """The adapters `names` (from add_adapters) off the model: their hooks, then the modules."""
    _remove_hooks(model, {id(model.get_submodule(name)) for name in names})
    for name in names:
        container_name, _, placement = name.rpartition(".")
        del model.get_submodule(container_name)[placement]
    for module in model.modules():  # the emptied containers, wherever they sit (inside a wrapper too)
        container = module._modules.get(CONTAINER)
        if isinstance(container, nn.ModuleDict) and not len(container):
            del module._modules[CONTAINER]


def _layer_prefixes(saved: list, own: list, saved_classes: Optional[list], own_classes: list) -> Optional[tuple]:
    """(old, new): the prefix the file's layer names carry in place of the model's, where the two lists name the same
    layer stack under another head (adapters saved from BertForSequenceClassification, bert.encoder.layer.<i>, loaded
    into a BertModel, encoder.layer.<i>; a plain model's into the same model wrapped by PEFT, base_model.model.<...>);
    None where they are the same or not of one stack: layers of other classes (a file written before the classes were
    recorded: names that share less than the stack's attribute and the index), or of another count. A GPT-2's
    adapters loaded into a Llama of the same width as transformer.h.<i> -> model.layers.<i> (the review of the
    change, 2026-12-07)."""
    if not saved or saved == own or len(saved) != len(own) or (saved_classes and saved_classes != own_classes):
        return None
    pairs = set()
    for a, b in zip(saved, own):
        suffix = ".".join(os.path.commonprefix([a.split(".")[::-1], b.split(".")[::-1]])[::-1])
        if suffix.count(".") < 1:  # the stack's attribute and the index, at least
            return None
        pairs.add((a[:len(a) - len(suffix)], b[:len(b) - len(suffix)]))
    return pairs.pop() if len(pairs) == 1 else None


def _rebased(keys, prefixes: Optional[tuple]) -> dict:
    """{key: the key with the file's layer prefix replaced by the model's} for the keys under that prefix."""
    old, new = prefixes if prefixes else ("", "")
    return {k: new + k[len(old):] if k.startswith(old) else k for k in keys}


def load_adapters(model: nn.Module, path: str, adapter_dtype: Optional[torch.dtype] = None) -> list[str]:
    """Attach adapters as saved by save_adapters to a model and load their weights; returns their names. A model that
    has these adapters attached already (a resume) gets the file's weights in them, nothing attached twice.
    adapter_dtype None: the file's dtype (float32 adapters saved beside a bf16 model came back bf16, rounded: 2e-3
    off the saved model's logits, a review, 2026-12-05), or the model's where the file mixes dtypes."""
    from safetensors.torch import load_file

    with open(os.path.join(path, CONFIG_NAME)) as f:
        meta = json.load(f)
    if meta.get("peft_type") != "BOTTLENECK_ADAPTER":
        raise ValueError(f"{path} holds a {meta.get('peft_type')} adapter, not a peftkern bottleneck adapter")
    configs = []
    for values in meta.get("configs") or [meta["config"]]:
        config = AdapterConfig.from_dict(values)
        if meta.get("format_version", 1) < 2 and config.layers is not None:  # the i-th adaptable layer, in order
            order = list(_indexed_layers(_unwrapped(model), transformer_layers(model)))
            config = dataclasses.replace(config, layers=tuple(order[i] for i in config.layers if i < len(order)))
        configs.append(config)
    state = load_file(os.path.join(path, WEIGHTS_NAME))
    targets, inner = meta.get("modules_to_save") or [], _unwrapped(model)
    layers = transformer_layers(inner)
    saved_classes, own_classes = meta.get("layer_classes"), [type(layer).__name__ for _, layer, _ in layers]
    prefixes = _layer_prefixes(meta.get("layers"), [_clean(n) for n, _, _ in layers], saved_classes, own_classes)
    if prefixes:  # the same layers under another head or wrapper: the keys (and modules_to_save) renamed to the model's
        state = {new: state[old] for old, new in _rebased(list(state), prefixes).items()}
        targets = list(_rebased(targets, prefixes).values())
    saved = {k: state.pop(k) for k in list(state) if not _is_adapter_key(k)}  # the modules_to_save
    check_saved_modules(inner, saved, targets, path)  # before the adapters attach
    if adapter_dtype is None:
        dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
        adapter_dtype = dtypes.pop() if len(dtypes) == 1 else None
    # a file of another architecture failed on its keys with a hint at the configuration alone (a documentation
    # audit, 2026-12-07): the layers' classes, which the files record since that day, name it
    theirs, ours = ", ".join(sorted(set(saved_classes or ()))), ", ".join(sorted(set(own_classes)))
    source = f"{path} (saved from a model of {theirs} layers; this model's are {ours})" if theirs and theirs != ours \
        else path
    names = _attach_and_load(model, configs, state, source, adapter_dtype)
    loaded = load_saved_modules(inner, saved, targets, path)
    _record_to_save(inner, loaded)
    return names


# ------------------------------------------------------------------------------------------- AdapterHub

# AdapterHub's bottleneck keys: per layer a BottleneckLayer "attention_adapters" / "output_adapters" (decoders,
# GPT-2), or in BERT the attention.output / output modules themselves; then adapters.<name>.<param>.
_ADAPTERHUB_KEY = [
    (re.compile(r"^(?P<layer>.+)\.attention\.output\.adapters\.(?P<name>[^.]+)\.(?P<param>.+)$"), "attention"),
    (re.compile(r"^(?P<layer>.+)\.attention_adapters\.adapters\.(?P<name>[^.]+)\.(?P<param>.+)$"), "attention"),
    (re.compile(r"^(?P<layer>.+)\.output_adapters\.adapters\.(?P<name>[^.]+)\.(?P<param>.+)$"), "output"),
    (re.compile(r"^(?P<layer>.+)\.output\.adapters\.(?P<name>[^.]+)\.(?P<param>.+)$"), "output"),
]
# T5 / mT5: AdapterHub makes the sub-layers themselves (T5LayerSelfAttention, T5LayerFF: adapters/models/t5/mixin_t5.py)
# the bottleneck layers, so the keys are <stack>.block.<i>.layer.<j>.adapters.<name>.<param>: j = 0 the self-attention;
# then the feed-forward block, j = 1 in the encoder and j = 2 in the decoder, whose j = 1 is the cross-attention (no
# placement). Each is applied to its sub-layer's output before the residual add, as peftkern's T5 placements are.
_ADAPTERHUB_T5_KEY = re.compile(r"^(?P<layer>(?:.+\.)?(?P<stack>encoder|decoder)\.block\.\d+)\.layer\.(?P<sub>\d+)"
                                r"\.adapters\.(?P<name>[^.]+)\.(?P<param>.+)$")
_ADAPTERHUB_T5_SITES = {("encoder", "0"): "attention", ("encoder", "1"): "output", ("decoder", "0"): "attention",
                        ("decoder", "2"): "output"}
_ADAPTERHUB_LEGACY_MODULES = {"attention_text_task_adapters": "adapters", "attention_text_lang_adapters": "adapters",
                              "layer_text_task_adapters": "adapters", "layer_text_lang_adapters": "adapters",
                              "invertible_lang_adapters": "invertible_adapters"}


def _adapterhub_current_name(key: str) -> str:
    """key with the module names of AdapterHub's first files renamed as its loader renames them."""
    for old, new in _ADAPTERHUB_LEGACY_MODULES.items():
        key = key.replace(old, new)
    return key


# AdapterHub's names (its Activation_Function_Class, transformers' ACT2FN for the rest) -> peftkern's
_ADAPTERHUB_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_orig": "gelu", "gelu_python": "gelu",
                           "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "swish": "silu", "silu": "silu"}


def _adapterhub_param(param: str, ln_before: bool) -> Optional[str]:
    """Our parameter name for an AdapterHub one; None for the LN that nn.Sequential lists a second time."""
    down = "adapter_down.1." if ln_before else "adapter_down.0."
    if param.startswith(down):
        return "down." + param[len(down):]
    if param.startswith("adapter_up."):
        return "up." + param[len("adapter_up."):]
    if param.startswith("adapter_norm_before."):
        return "layer_norm." + param[len("adapter_norm_before."):]
    if ln_before and param.startswith("adapter_down.0."):
        return None
    if param == "scaling":
        return "scale"
    raise ValueError(f"AdapterHub parameter {param!r} has no peftkern counterpart (supported: a bottleneck "
                     "adapter with optional ln_before and a scalar or learned scaling)")


def convert_adapterhub(state_dict: dict, config: Optional[dict] = None,
                       adapter_name: Optional[str] = None) -> tuple[dict, AdapterConfig]:
    """(state dict in peftkern's key layout, AdapterConfig) from an AdapterHub bottleneck checkpoint's tensors
    and its config (adapter_config.json's "config" entry: BnConfig fields).

    Weights map one to one (adapter_down.0 -> down, adapter_up -> up, adapter_norm_before -> layer_norm, a learned
    scaling -> scale). AdapterHub computes the adapter on the block's output with the residual taken before
    the layer's LN (original_ln_before=False, as in its Houlsby config) as peftkern's placements do (in GPT-2 and
    BERT peftkern's sequential adapters come before the block's dropout, AdapterHub's after it: the same in eval);
    configs that add the block's residual or LN before the adapter (original_ln_before=True: its Pfeiffer
    config) or an LN after it are converted with a warning, since the same weights then see other inputs.
    """
    config = dict(config or {})
    # the module names of AdapterHub's first files, which its loader renames (adapters/loading.py, AdapterLoader's
    # legacy_weights_mapping): their keys matched no pattern, and the checkpoint was refused as holding no adapter
    state_dict = {_adapterhub_current_name(key): tensor for key, tensor in state_dict.items()}
    matched: dict = {}
    matched_keys = set()
    for key, tensor in state_dict.items():
        t5 = _ADAPTERHUB_T5_KEY.match(key)
        if t5:  # T5's sub-layer sites; its decoder's cross-attention (layer.1) is left unmatched, so refused below
            site = _ADAPTERHUB_T5_SITES.get((t5["stack"], t5["sub"]))
            if site is not None:
                matched.setdefault(t5["name"], []).append((t5["layer"], site, t5["param"], tensor))
                matched_keys.add(key)
            continue
        for pattern, site in _ADAPTERHUB_KEY:
            m = pattern.match(key)
            if m:
                matched.setdefault(m["name"], []).append((m["layer"], site, m["param"], tensor))
                matched_keys.add(key)
                break
    if not matched:
        raise ValueError("no AdapterHub bottleneck adapter keys (...adapters.<name>.adapter_down...) found")
    if adapter_name is None:
        if len(matched) > 1:
            raise ValueError(f"the checkpoint holds adapters {sorted(matched)}: pass adapter_name")
        adapter_name = next(iter(matched))
    if adapter_name not in matched:
        raise ValueError(f"adapter {adapter_name!r} not in the checkpoint (found {sorted(matched)})")
    entries = matched[adapter_name]
    # keys of this adapter at a site peftkern has no placement for (a decoder's cross_attention_adapters) were
    # dropped without a word (a review, 2026-12-05)
    unplaced = sorted(k for k in state_dict if f"adapters.{adapter_name}." in k and k not in matched_keys)
    if unplaced:
        raise ValueError(f"AdapterHub adapter {adapter_name!r} has keys at sites peftkern has no placement for "
                         f"(cross-attention adapters?): {unplaced[:3]}{' ...' if len(unplaced) > 3 else ''}")
    ln_before = any(p.startswith("adapter_norm_before.") for _, _, p, _ in entries)
    if config.get("is_parallel"):
        if any(site == "attention" for _, site, _, _ in entries):
            raise ValueError("an AdapterHub parallel adapter at the attention (mh_adapter=True with is_parallel) has "
                             "no peftkern placement: after_attention is sequential")
        warnings.warn("AdapterHub parallel adapter: AdapterHub's reads the residual stream before the block's "
                      "LayerNorm, peftkern's parallel_feed_forward the feed-forward block's input; the same tensor "
                      "in post-LN encoders (BERT), the LayerNorm's output in pre-LN models (GPT-2, Llama), whose "
                      "outputs will differ from AdapterHub's", RuntimeWarning, stacklevel=2)
    output_place = "parallel_feed_forward" if config.get("is_parallel") else "after_feed_forward"
    state, sites, sizes = {}, set(), set()
    learned = False
    for layer, site, param, tensor in entries:
        ours = _adapterhub_param(param, ln_before)
        if ours is None:
            continue
        placement = "after_attention" if site == "attention" else output_place
        sites.add(placement)
        if ours == "scale":
            if tensor.numel() != 1:
                raise ValueError(f"channel-wise scaling ({tuple(tensor.shape)}) has no peftkern counterpart")
            tensor, learned = tensor.reshape(()), True
        if ours == "down.weight":
            sizes.add(tensor.shape[0])
        state[f"{layer}.{CONTAINER}.{placement}.{ours}"] = tensor
    if len(sizes) != 1:
        raise ValueError(f"adapters of several bottleneck sizes {sorted(sizes)} cannot share one AdapterConfig")
    # original_ln_after=False: AdapterHub then leaves out the block's own residual add and LN after the adapter
    # (bottleneck.py, post_forward), which peftkern's placements keep (noticed by a review, 2026-12-06)
    if (config.get("original_ln_before") or config.get("ln_after") or config.get("residual_before_ln") is False
            or config.get("original_ln_after") is False):
        warnings.warn("AdapterHub config with original_ln_before / ln_after / residual_before_ln=False / "
                      "original_ln_after=False: the weights are converted, but peftkern applies the adapter to the "
                      "block's output before the block's own residual add and LN, so the outputs will differ from "
                      "AdapterHub's", RuntimeWarning, stacklevel=2)
    if "non_linearity" not in config:  # AdapterHub's BnConfig has no default (its Houlsby preset is swish)
        warnings.warn("no AdapterHub non_linearity given (the checkpoint's adapter_config.json has it): relu assumed",
                      RuntimeWarning, stacklevel=2)
    non_linearity = str(config.get("non_linearity", "relu")).lower()
    if non_linearity not in _ADAPTERHUB_ACTIVATIONS:
        raise ValueError(f"AdapterHub non_linearity {non_linearity!r} is not supported: "
                         f"{sorted(_ADAPTERHUB_ACTIVATIONS)}")
    scaling = config.get("scaling", 1.0)
    if scaling == "learned" and not learned:
        raise ValueError("the AdapterHub config says scaling='learned', but the checkpoint holds no adapter's "
                         "'scaling' tensor")
    ours = AdapterConfig(placements=tuple(p for p in PLACEMENTS if p in sites), bottleneck_size=sizes.pop(),
                         non_linearity=_ADAPTERHUB_ACTIVATIONS[non_linearity],
                         scaling="learned" if learned else float(scaling), layer_norm=ln_before)
    return state, ours


# What AdapterHub's loader (adapters/loading.py, load_weights_config) renames in a configuration written before its
# files held a "version": its "gelu" was the tanh approximation (gelu_new), and "gelu_orig" the exact one.
_ADAPTERHUB_LEGACY_ACTIVATIONS = {"gelu": "gelu_new", "gelu_orig": "gelu"}


def _read_adapterhub_dir(path: str) -> tuple[dict, dict]:
    """(tensors, BnConfig dict) of a directory written by AdapterHub's save_adapter: adapter_config.json beside
    adapter.safetensors (use_safetensors=True; adapters/utils.py, SAFE_WEIGHTS_NAME) or pytorch_adapter.bin. Only the
    .bin was found: save_adapter(..., use_safetensors=True)'s directory raised FileNotFoundError (a review,
    2026-12-06)."""
    with open(os.path.join(path, "adapter_config.json")) as f:
        meta = json.load(f)
    config = dict(meta.get("config", meta))
    if "version" not in meta and config.get("non_linearity") in _ADAPTERHUB_LEGACY_ACTIVATIONS:
        config["non_linearity"] = _ADAPTERHUB_LEGACY_ACTIVATIONS[config["non_linearity"]]
    for name in ("adapter.safetensors", "adapter_model.safetensors", "pytorch_adapter.safetensors"):
        if os.path.exists(os.path.join(path, name)):
            from safetensors.torch import load_file

            return load_file(os.path.join(path, name)), config
    return torch.load(os.path.join(path, "pytorch_adapter.bin"), map_location="cpu", weights_only=True), config


def load_adapterhub(model: nn.Module, source: Union[str, dict], config: Optional[dict] = None,
                    adapter_name: Optional[str] = None, adapter_dtype: Optional[torch.dtype] = None) -> list[str]:
    """Attach and load an AdapterHub bottleneck adapter: `source` is its saved directory (adapter_config.json +
    pytorch_adapter.bin or adapter.safetensors) or its state dict (then `config` is its BnConfig dict). Layer names may
    differ in their prefix (bert.encoder.layer.0 vs encoder.layer.0): a layer is matched by the longest common dotted
    suffix."""
    state, ah_config = (source, config) if isinstance(source, dict) else _read_adapterhub_dir(str(source))
    converted, ours = convert_adapterhub(state, ah_config, adapter_name)
    indexed = _indexed_layers(_unwrapped(model), transformer_layers(model))
    renamed, indices = {}, set()
    for key, tensor in converted.items():
        layer, rest = key.split(f".{CONTAINER}.", 1)
        hits = [i for i, (n, _, _) in indexed.items() if n == layer or n.endswith("." + layer) or
                layer.endswith("." + n)]
        if len(hits) != 1:
            raise ValueError(f"AdapterHub layer {layer!r} matches {len(hits)} layers of the model")
        indices.add(hits[0])
        renamed[f"{indexed[hits[0]][0]}.{CONTAINER}.{rest}"] = tensor
    return _attach_and_load(model, [dataclasses.replace(ours, layers=tuple(sorted(indices)))], renamed,
                            "the AdapterHub checkpoint", adapter_dtype)
