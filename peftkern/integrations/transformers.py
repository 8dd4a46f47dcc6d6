"""peftkern without PEFT: attach LoRALinear layers to a plain transformers (or any torch) model, and save /
load the adapter weights alone in PEFT's file layout (adapter_config.json + adapter_model.safetensors), so
`peft.PeftModel.from_pretrained(base_model, path)` loads what peftkern trained, and the other way round.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from typing import Iterable, Optional, Union

import torch
from torch import nn

from ..nn import _WRAPPING_LAYERS, BottleneckAdapter, freeze_all_but_adapters
from ..nn._frozen import check_wrappable, is_conv1d
from ..nn.lora import LoRALinear
from ._common import (
    _unwrapped,
    check_not_distributed,
    check_saved_modules,
    clean_name,
    distributed_wrapper,
    find_modules_to_save,
    inner_state,
    inside,
    load_saved_modules,
    mark_to_save,
    matches_suffix,
    saved_module_names,
    saved_module_state,
    saved_tensor,
)
from .adapters import adapter_hooks

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def _matches(name: str, targets: Union[str, Iterable[str]]) -> bool:
    """PEFT's rule: a regex string must match the full module name; a list matches the name's last part
    (or a dotted suffix of it)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return matches_suffix(name, targets)


def _pattern_reaches(key: str, name: str) -> bool:
    """Whether PEFT's rank_pattern / alpha_pattern key (a regex) reaches the module name: it matches the name's end
    on a dot boundary ("v_proj" reaches "model.layers.0.self_attn.v_proj")."""
    return re.match(rf"(.*\.)?({key})$", name) is not None


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the value of the first key that reaches the module name, else the
    default."""
    for key, value in patterns.items():
        if _pattern_reaches(key, name):
            return value
    return default


def add_lora(model: nn.Module, target_modules: Union[str, Iterable[str]], r: int = 8, alpha: float = 8.0,
             dropout: float = 0.0, use_rslora: bool = False, adapter_dtype: Optional[torch.dtype] = None,
             freeze_base: bool = True, modules_to_save: Optional[Iterable[str]] = None) -> list[str]:
    """Replace each nn.Linear / GPT-2 Conv1D whose name matches `target_modules` with a LoRALinear that shares
    its weight and bias; freeze everything else (freeze_base). Returns the adapted module names.

    target_modules: a list of names or name suffixes (["q_proj", "v_proj"]), a regex on the full name, or PEFT's
    "all-linear": every nn.Linear / Conv1D but the output layer (get_output_embeddings(): a causal LM's lm_head).
    adapter_dtype: the factors' dtype; by default PEFT's: float32 beside a float16 / bfloat16 model, else the model's.
    modules_to_save: as PEFT's, names or suffixes of modules trained whole beside the adapters (a classifier head
    made at random: ["score"], ["classifier"]) and saved with them by save_lora; trained in place, where PEFT trains
    a copy.
    """
    check_not_distributed(model, "add_lora")
    model = _unwrapped(model)
    to_save = find_modules_to_save(model, modules_to_save, "add_lora") if modules_to_save else []
    whole = to_save + saved_module_names(model)  # trained whole: no adapter inside them, as in PEFT
    # a bottleneck adapter's projections: its op reads their weights, so a LoRA there would not run (and would freeze
    # them); "all-linear" matched them
    whole = whole + [name for name, module in model.named_modules() if isinstance(module, BottleneckAdapter)]
    all_linear = isinstance(target_modules, str) and target_modules.lower() == "all-linear"
    if all_linear:
        output_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        whole = whole + [name for name, module in model.named_modules() if module is output_layer and name]
    matched = [(name, module) for name, module in model.named_modules()
               if name and (all_linear or _matches(name, target_modules)) and not isinstance(module, LoRALinear)
               and (isinstance(module, nn.Linear) or is_conv1d(module)) and not inside(name, whole)]
    # nn.MultiheadAttention reads its out_proj's weight and bias in its own forward and never calls out_proj: an
    # adapter there would never run (PEFT 0.21's LoRA on it is as silent)
    unused = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    skipped = [name for name, module in matched if id(module) in unused]
    if skipped:
        warnings.warn(f"add_lora: {skipped} left alone: nn.MultiheadAttention uses its out_proj's weight directly, "
                      "so a LoRA there would never run", RuntimeWarning, stacklevel=2)
        matched = [(name, module) for name, module in matched if id(module) not in unused]
    uncalled = _check_mamba_targets(model, [name for name, _ in matched], named=not all_linear)
    matched = [(name, module) for name, module in matched if name not in uncalled]
    for name, module in matched:  # before anything changes
        _check_target("add_lora", name, module)
    adapted = []
    for name, module in matched:
        if freeze_base and not adapted:  # once something matched; the adapters already attached keep training
            freeze_all_but_adapters(model)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear.from_linear(module, r=r, alpha=alpha, dropout=dropout,
                                                      use_rslora=use_rslora, adapter_dtype=adapter_dtype))
        adapted.append(name)
    if not adapted:
        raise ValueError(f"target_modules {target_modules!r} matched no nn.Linear or Conv1D in the model")
    mark_to_save(model, to_save)
    tied = _tied_weights(model, {name: model.get_submodule(name) for name in adapted})
    if tied:
        warnings.warn(f"add_lora: {_describe_tied(tied)}: merging these layers would change the modules their weight "
                      "is tied to as well, so merge_and_unload refuses them until they are untied", RuntimeWarning,
                      stacklevel=2)
    if getattr(model, "_peftkern_lora_config", None) is None:  # a second call's layers differ by rank_pattern
        first = model.get_submodule(adapted[0])  # alpha and dropout as the layers hold them: floats
        model._peftkern_lora_config = dict(r=r, lora_alpha=first.alpha, lora_dropout=first.dropout,
                                           use_rslora=use_rslora)
    return adapted


# Mamba-style mixers read some projections' weights in their own code instead of calling them: dt_proj's in every path
# (dt_proj.weight @ time_step), out_proj's and x_proj's in the scan kernels of mamba-ssm that training takes on a GPU.
# A LoRA there would not run. PEFT refuses out_proj (and conv1d) on these model types, and saves of them cannot load.
MAMBA_MODEL_TYPES = {"mamba", "mamba2", "falcon_mamba", "falcon_h1", "nemotron_h"}
MAMBA_UNCALLED = ("out_proj", "dt_proj")
MAMBA_KERNEL_READS = ("x_proj",)
# Model types whose mixer multiplies by dt_proj's weight itself (dt_proj.weight @ time_step) on every unquantized path;
# jamba's and falcon_mamba's call the layer instead where the config says _is_quantized. (mamba2 and its kin have no
# dt_proj.)
DT_PROJ_READ_BY = {"mamba", "falcon_mamba", "jamba"}


_LOADING = [False]  # load_lora's add_lora calls: layers a file adapts are loaded, with a warning where they do not run


def _check_mamba_targets(model: nn.Module, names: list[str], named: bool) -> set:
    """The targets a Mamba mixer does not call: a ValueError where the caller named them, else (all-linear) they are
    returned to be left alone, with a warning. A warning for those its training kernels skip."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MAMBA_MODEL_TYPES and model_type not in DT_PROJ_READ_BY:
        return set()
    uncalled = MAMBA_UNCALLED if model_type in MAMBA_MODEL_TYPES else ("dt_proj",)
    refused = [n for n in names if n.rsplit(".", 1)[-1] in uncalled]
    why = (f"a {model_type} mixer reads these projections' weights without calling them (dt_proj's always, out_proj's "
           "in mamba-ssm's training kernels), so a LoRA there would not run")
    if refused and _LOADING[0]:  # a file that adapts them (PEFT's, or ours before 2026-12-05) loads as it says
        warnings.warn(f"load_lora: the file adapts {refused[:3]}{' ...' if len(refused) > 3 else ''}: {why} there; "
                      "loaded as the file says", RuntimeWarning, stacklevel=4)
        refused = []
    if refused and named:
        raise ValueError(f"add_lora: {refused}: {why}; PEFT refuses out_proj on these models too. Target in_proj")
    if refused:
        warnings.warn(f"add_lora: all-linear leaves {refused[:3]}{' ...' if len(refused) > 3 else ''} alone: {why}",
                      RuntimeWarning, stacklevel=3)
    read = [n for n in names if n.rsplit(".", 1)[-1] in MAMBA_KERNEL_READS]
    if read:
        warnings.warn(f"add_lora: {read[:3]}{' ...' if len(read) > 3 else ''}: with mamba-ssm's kernels (a GPU) the "
                      "mixer's training path reads x_proj's weight directly, so these adapters run only on the "
                      "other paths", RuntimeWarning, stacklevel=3)
    return set(refused)


def merge_and_unload(model: nn.Module) -> list[str]:
    """Merge every peftkern layer of `model` (LoRALinear, IA3Linear, KronALinear) into its weight and put back the
    plain layer it wrapped (nn.Linear, Conv1D, ...), as PEFT's merge_and_unload does: the model is then a plain
    transformers model that save_pretrained / from_pretrained carry whole (add_lora's layers are not: their
    checkpoints hold the frozen weight and the factors apart, and from_pretrained into a plain model drops the
    factors). Returns the names replaced. Bottleneck adapters, which do not merge, stay (remove_adapters detaches
    them), as do the trained modules_to_save. A model that is a peftkern layer itself raises ValueError: its own
    merge_and_unload() returns the plain layer."""
    _check_not_sharded(model)
    model = _unwrapped(model)
    if isinstance(model, _WRAPPING_LAYERS):
        # the layers are replaced in their parents: the model's root has none, and it returned [] and stayed unmerged,
        # silently (a review, 2026-12-06)
        raise ValueError(f"merge_and_unload: the model is a {type(model).__name__} itself, which has no parent to put "
                         "the plain layer in: call its own merge_and_unload(), which returns that layer")
    from .peft import _peft_tuner_layer

    ours = {name: m for name, m in model.named_modules() if isinstance(m, _WRAPPING_LAYERS)}
    if not ours and any(_peft_tuner_layer(m) for m in model.modules()):
        # it returned [] and left a PEFT model unmerged, silently (a review, 2026-12-05)
        raise ValueError("merge_and_unload: the model's adapters are PEFT's (get_peft_model, with or without "
                         "peftkern.fuse), which this function does not merge: call the PEFT model's own "
                         "merge_and_unload()")
    tied = _tied_weights(model, ours)
    if tied:  # checked before any layer changes
        raise ValueError(f"merge_and_unload: {_describe_tied(tied)}: merging would change them too (a tied lm_head's "
                         "merge changes the input embedding), and the model would compute another function. Untie "
                         "first, e.g. model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone()) "
                         "and model.config.tie_word_embeddings = False, so that save_pretrained keeps both")
    replaced = []
    for name, module in ours.items():
        if name:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.merge_and_unload())
            replaced.append(name)
    vars(model).pop("_peftkern_lora_config", None)
    return replaced


def _check_not_sharded(model: nn.Module) -> None:
    """A ValueError, before anything changes, where FSDP (fully_shard, or FSDP1) shards the model: the merge met
    DTensor weights (a 'mixed torch.Tensor and DTensor' error), and inside unshard() its in-place writes to the
    gathered weights were dropped at the reshard (0.46 off, silently; a review, 2026-12-05)."""
    if distributed_wrapper(model) not in (None, "DistributedDataParallel"):
        raise ValueError("merge_and_unload: the model is sharded by FSDP; gather it first (e.g. "
                         "get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)) loaded into a "
                         "plain copy of the model, on one rank), then merge that copy")


def _tied_weights(model: nn.Module, layers: dict) -> dict[str, list[str]]:
    """For each of `layers` (name -> peftkern layer) whose frozen weight another module of `model` holds too (a tied
    lm_head and input embedding), the names of those parameters. Merging writes into the shared tensor."""
    holders: dict[int, list[str]] = {}
    for pname, param in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(param), []).append(pname)
    tied = {}
    for name, layer in layers.items():
        others = [p for p in holders.get(id(layer.weight), []) if p.rpartition(".")[0] != name]
        if others:
            tied[name] = others
    return tied


def _describe_tied(tied: dict) -> str:
    return "; ".join(f"{name}'s weight is tied to {', '.join(others)}" for name, others in tied.items())


def _check_target(caller: str, name: str, module: nn.Module) -> None:
    """A TypeError unless a LoRALinear can take `module`'s place without dropping what it runs (checked for every
    target before any layer changes)."""
    if adapter_hooks(module):
        raise TypeError(f"{caller}: {name} runs bottleneck adapters through hooks (add_adapters), which the LoRA layer "
                        "would drop: call add_lora before add_adapters")
    try:
        check_wrappable(module)
    except TypeError as e:
        raise TypeError(f"{caller}: {name}: {e}") from None


def _lora_at(model: nn.Module, name: str) -> Optional[LoRALinear]:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    return module if isinstance(module, LoRALinear) else None


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The LoRALinear layers by name, in the model inside torch.compile / DDP / DataParallel / FSDP wrappers (whose
    names carry an _orig_mod. / module. / _fsdp_wrapped_module. segment that PEFT's keys do not)."""
    return {clean_name(name): m for name, m in _unwrapped(model).named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module, state_dict: Optional[dict] = None) -> dict[str, torch.Tensor]:
    """The adapter weights under PEFT's saved key names (base_model.model.<module>.lora_A.weight, ...), and the
    modules_to_save's tensors (base_model.model.<module>.<param>) as PEFT saves them; read from `state_dict` (the
    model's full state dict) where given."""
    if state_dict is not None:
        state_dict = inner_state(model, state_dict)
    model = _unwrapped(model)
    out = {f"base_model.model.{key}": value
           for key, value in saved_module_state(model, state_dict, "save_lora").items()}
    for name, layer in lora_layers(model).items():
        for factor in ("lora_A", "lora_B"):
            value = saved_tensor(state_dict, f"{name}.{factor}", getattr(layer, factor), "save_lora")
            out[f"base_model.model.{name}.{factor}.weight"] = value.contiguous()
    return out


def _target_modules(model: nn.Module, layers: dict) -> Union[list[str], str]:
    """PEFT's target_modules for exactly the adapted layers: their last names (["q_proj", "v_proj"]) where those name
    no other module, else their full names. A layer name that other modules share (T5's q in the encoder when only
    the decoder's was adapted, CLIP's q_proj in both towers) made PeftModel.from_pretrained add LoRA there too, which
    then trained in a resumed run. Where a full name ends another module's name too (nn.Sequential's "0" and "2.0"),
    which PEFT's list matches as a suffix, a regex of the full names, which PEFT matches whole (2026-12-06)."""
    short = sorted({n.rsplit(".", 1)[-1] for n in layers})
    whole = saved_module_names(model, clean=True)  # PEFT puts no LoRA inside modules_to_save
    names = {clean_name(n) for n, _ in model.named_modules()} - {""}

    def others(targets) -> bool:
        return any(n not in layers and matches_suffix(n, targets) and not inside(n, whole) for n in names)

    if not others(short):
        return short
    exact = sorted(layers)
    return "|".join(re.escape(n) for n in exact) if others(exact) else exact


def _pattern_keys(values: dict, layers: dict) -> dict:
    """values (layer name -> rank or alpha) keyed for PEFT's rank_pattern / alpha_pattern, whose key reaches every
    layer whose name it ends (re.match("(.*\\.)?(key)$"): "0" is nn.Sequential's "2.0" too, and PEFT and load_lora
    gave "2.0" the value saved for "0", a 4x scaling, silently; 2026-12-06). A name that reaches another adapted layer
    so is saved escaped and anchored ("^0"), which reaches its own layer alone."""
    keys = {}
    for name, value in values.items():
        reaches = any(other != name and _pattern_reaches(name, other) for other in layers)
        keys[f"^{re.escape(name)}" if reaches else name] = value
    return keys


def save_lora(model: nn.Module, path: str, base_model_name_or_path: Optional[str] = None,
              state_dict: Optional[dict] = None) -> None:
    """Write adapter_config.json and adapter_model.safetensors in PEFT's layout. state_dict: the model's full state dict
    for a sharded model (FSDP2: get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)) on every
    rank, then save_lora on one), as PEFT's save_pretrained takes it."""
    from safetensors.torch import save_file

    wrapper, model = model, _unwrapped(model)
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRALinear layers to save")
    cfg = getattr(model, "_peftkern_lora_config", None)
    first = next(iter(layers.values()))
    if cfg is None:
        cfg = dict(r=first.r, lora_alpha=first.alpha, lora_dropout=first.dropout, use_rslora=first.use_rslora)
    # every adapted layer, whichever add_lora / load_lora call attached it, and no other
    cfg = dict(cfg, target_modules=_target_modules(model, layers))
    ranks = {n: m.r for n, m in layers.items()}
    # A layer whose use_rslora differs from the config's (a second add_lora call) keeps its scaling through its alpha:
    # rsLoRA's alpha / sqrt(r) is plain LoRA's (alpha sqrt(r)) / r.
    alphas = {n: m.alpha if m.use_rslora == cfg["use_rslora"] else
              m.alpha * math.sqrt(m.r) if m.use_rslora else m.alpha / math.sqrt(m.r) for n, m in layers.items()}
    dropouts = sorted({m.dropout for m in layers.values()})
    if len(dropouts) > 1:
        warnings.warn(f"save_lora: the layers use several dropout rates {dropouts}; PEFT's config holds one, "
                      f"{cfg['lora_dropout']} is saved", RuntimeWarning, stacklevel=2)
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "r": cfg["r"], "lora_alpha": cfg["lora_alpha"], "lora_dropout": cfg["lora_dropout"],
        "use_rslora": cfg["use_rslora"], "target_modules": cfg["target_modules"], "bias": "none",
        "fan_in_fan_out": any(m.weight_transposed for m in layers.values()), "inference_mode": True,
        "init_lora_weights": True, "use_dora": False,
        "modules_to_save": saved_module_names(model, clean=True) or None,
        "rank_pattern": _pattern_keys({n: r for n, r in ranks.items() if r != cfg["r"]}, layers),
        "alpha_pattern": _pattern_keys({n: a for n, a in alphas.items() if a != cfg["lora_alpha"]}, layers),
    }
    tensors = lora_state_dict(wrapper, state_dict)  # its keys taken relative to the inner model there
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
    save_file({k: v.cpu() for k, v in tensors.items()}, os.path.join(path, WEIGHTS_NAME))


def load_lora(model: nn.Module, path: str, adapter_dtype: Optional[torch.dtype] = None) -> list[str]:
    """Attach LoRA layers as described by a PEFT adapter directory and load its weights; returns the adapted
    module names. Works for adapters saved by save_lora or by PEFT's save_pretrained (vanilla LoRA)."""
    from safetensors.torch import load_file

    with open(os.path.join(path, CONFIG_NAME)) as f:
        config = json.load(f)
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        raise ValueError(f"{path} holds a {config.get('peft_type')} adapter (use_dora={config.get('use_dora')}); "
                         "load_lora reads vanilla LoRA")
    weights = load_file(os.path.join(path, WEIGHTS_NAME))
    names = sorted({k[len("base_model.model."):].rsplit(".lora_", 1)[0] for k in weights if ".lora_A." in k})
    # PEFT saves an adapted lm_head's (or embedding's) whole weight beside its factors (save_embedding_layers="auto":
    # a resized vocabulary is restored so); PEFT's loading copies it into the model, and so does load_lora. They were
    # refused as more than LoRA factors (an exploratory test, 2026-12-08)
    base_tensors, other = {}, []  # base_tensors: (module name, "weight" or "bias") -> the saved tensor
    for key in sorted(weights):
        if re.search(r"\.lora_[AB]\.weight$", key):
            continue
        found = re.fullmatch(r"base_model\.model\.(.+)\.base_layer\.(weight|bias)", key)
        if found and found.group(1) in names:
            base_tensors[found.group(1), found.group(2)] = weights[key]
        else:
            other.append(key)
    extras = {key: config.get(key) for key in ("bias", "lora_bias") if config.get(key) not in (None, "none", False)}
    to_save = config.get("modules_to_save") or []
    if extras or (other and not to_save):
        raise ValueError(f"{path} holds more than LoRA factors ({extras or ''} {other[:4]}): load_lora would drop "
                         "them. Load it with peft.PeftModel.from_pretrained, then peftkern.fuse(model)")
    alphas = config.get("alpha_pattern") or {}
    outer, model = model, _unwrapped(model)
    targets = [(name, weights[f"base_model.model.{name}.lora_A.weight"].shape[0], _lora_at(model, name))
               for name in names]
    modules = dict(model.named_modules())
    if any(layer is None for _, _, layer in targets):  # loading into LoRA layers there already (a resume) is fine
        check_not_distributed(outer, "load_lora")
    for name, r, layer in targets:  # every layer checked before one changes
        if layer is not None and layer.r != r:
            raise ValueError(f"load_lora: {name} is a LoRALinear of rank {layer.r} already; {path} holds rank {r}")
        module = modules.get(name)
        if layer is None and not (isinstance(module, nn.Linear) or is_conv1d(module)):
            raise ValueError(f"load_lora: {path} adapts {name}, which the model has as {type(module).__name__}, not "
                             "an nn.Linear or Conv1D")
        if layer is None:
            _check_target("load_lora", name, module)
        for kind in ("weight", "bias"):
            tensor = base_tensors.get((name, kind))
            if tensor is None:
                continue
            current = getattr(layer if layer is not None else module, kind)
            if current is None or current.shape != tensor.shape:
                shape = None if current is None else tuple(current.shape)
                raise ValueError(f"load_lora: {path} holds {name}'s whole {kind} of shape {tuple(tensor.shape)}, the "
                                 f"model's is {shape} (resize the model's embeddings to the saved vocabulary first, as "
                                 "PEFT needs too)")
    saved = {k[len("base_model.model."):]: weights[k] for k in other}  # modules_to_save (a task head)
    check_saved_modules(model, saved, to_save, path)
    adapted = []
    for name, r, layer in targets:
        alpha = _pattern_value(alphas, name, config["lora_alpha"])
        dropout, use_rslora = config.get("lora_dropout", 0.0), config.get("use_rslora", False)
        if layer is not None:  # adapted already (add_lora, or a load_lora before): load into it, unmerged
            layer.unmerge()
            layer._set_hyperparameters(alpha, dropout, use_rslora)
        else:
            _LOADING[0] = True
            try:
                # the name alone, matched whole: a list ([name]) took the name as a suffix, and a file adapting
                # nn.Sequential's "0" adapted "2.0" too (or refused a file adapting both; 2026-12-06)
                add_lora(model, re.escape(name), r=r, alpha=alpha,
                         dropout=dropout, use_rslora=use_rslora, adapter_dtype=adapter_dtype, freeze_base=not adapted)
            finally:
                _LOADING[0] = False
            layer = model.get_submodule(name)
        with torch.no_grad():  # the saved base tensors after unmerge (which would take s B A off them)
            for kind in ("weight", "bias"):
                if (name, kind) in base_tensors:
                    getattr(layer, kind).copy_(base_tensors[name, kind])
            layer.lora_A.copy_(weights[f"base_model.model.{name}.lora_A.weight"])
            layer.lora_B.copy_(weights[f"base_model.model.{name}.lora_B.weight"])
        adapted.append(name)
    load_saved_modules(model, saved, to_save, path)
    model._peftkern_lora_config = dict(r=config["r"], lora_alpha=config["lora_alpha"],
                                       lora_dropout=config.get("lora_dropout", 0.0),
                                       use_rslora=config.get("use_rslora", False))
    return adapted
