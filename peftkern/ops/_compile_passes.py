"""Inductor passes for LoRA's two ops under torch.compile (ops/lora.py, COMPILED_SPLIT): lora_xa makes xa = drop(x)
A^T, and lora_fwd_xa makes the layer's output from it.

`keep_xa` (Inductor's joint_custom_post_pass). Activation checkpointing tags every op of a checkpointed region
PREFER_RECOMPUTE, and the partitioner then recomputes in backward whatever backward reads. A fused LoRA layer's backward
reads xa (M x r), so lora_xa ran again for every layer: a skinny product that reads all of x (M x K) to make r columns.
Keeping xa instead costs M r elements a layer, r / K of x (16 / 2048 in the 1b model). The pass marks each lora_xa a
checkpoint would recompute MUST_SAVE, as a selective-checkpointing policy does for the ops it names. An op the user's
own policy tags MUST_RECOMPUTE is left so.

`group_xa` and then `rejoin_xa` (Inductor's post_grad_custom_post_pass, on the forward and backward graphs after the
partition): group_xa makes the xa of layers that read one x (an attention's q, k and v) in one product, where their
kernels would not make xa themselves; rejoin_xa makes each forward graph's remaining pair one lora_fwd again. See their
docstrings.

lora_xa's fake implementation installs the passes when dynamo first traces the op (`install`), each wrapping whatever
pass was set in its slot before it, which still runs, first. A pass the user sets after that replaces peftkern's; they
are installed again at the next trace of a LoRA layer. PEFTKERN_LORA_SAVE_XA=0, PEFTKERN_LORA_GROUP_XA=0 and
PEFTKERN_LORA_REJOIN_XA=0 (read at import; SAVE_XA[0] = False and so on later, before a compile) turn them off. Other
backends (aot_eager, a custom partition_fn) run no Inductor pass; `keep_xa`, `group_xa` and `rejoin_xa` are the passes
themselves, for those to call.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import operator
import os
from typing import Any, Optional

import torch

SAVE_XA = [os.environ.get("PEFTKERN_LORA_SAVE_XA", "1") != "0"]
REJOIN_XA = [os.environ.get("PEFTKERN_LORA_REJOIN_XA", "1") != "0"]
GROUP_XA = [os.environ.get("PEFTKERN_LORA_GROUP_XA", "1") != "0"]
# each pass: its Inductor config slot and the switch (a global of this module, looked up at each use). Passes of one
# slot run in this order (group_xa before rejoin_xa)
_PASSES = {"keep_xa": ("joint_custom_post_pass", "SAVE_XA"), "group_xa": ("post_grad_custom_post_pass", "GROUP_XA"),
           "rejoin_xa": ("post_grad_custom_post_pass", "REJOIN_XA")}
_PASS_CLASS: list = []  # built at the first install: importing torch._inductor takes ~1 s, not for peftkern's import


def keep_xa(graph: torch.fx.Graph) -> int:
    """Tag every lora_xa node of graph that a checkpoint would recompute (PREFER_RECOMPUTE) MUST_SAVE; the count."""
    from torch.utils.checkpoint import CheckpointPolicy

    target = torch.ops.peftkern.lora_xa.default
    kept = 0
    for node in graph.nodes:
        if (node.op == "call_function" and node.target is target
                and node.meta.get("recompute") == CheckpointPolicy.PREFER_RECOMPUTE):
            node.meta["recompute"] = CheckpointPolicy.MUST_SAVE
            kept += 1
    return kept


def _source(node: Any) -> Any:
    """node with the detaches and aliases before it skipped (lora_xa takes x and A detached)."""
    aten = torch.ops.aten
    while (isinstance(node, torch.fx.Node) and node.op == "call_function"
           and node.target in (aten.detach.default, aten.alias.default)):
        node = node.args[0]
    return node


def rejoin_xa(graph: torch.fx.Graph) -> int:
    """Where lora_fwd_xa takes the xa of a lora_xa of the same x, A, seed and backend without dropout, one lora_fwd
    makes both (its persistent kernel's workers make xa where the forward's tiles leave SMs free); the count.

    The split (ops/lora.COMPILED_SPLIT) serves the partitioner, which can then recompute xa, or keep it, without the
    product. After the partition it only costs: on an H100 the compiled 1b step without checkpointing took ~0.2 ms
    more with it (NOTES-lora.md, fifty-third session). As Inductor's post-grad pass this runs on the forward and
    backward graphs apart, so the forward's pairs join again and a backward recomputes what the partitioner chose."""
    ops = torch.ops.peftkern
    joined = 0
    order = {node: i for i, node in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not ops.lora_fwd_xa.default or node.kwargs:
            continue
        x, weight, lora_A, lora_B, bias, xa, seed, scaling, dropout_p, weight_transposed, backend = node.args
        if not (isinstance(xa, torch.fx.Node) and xa.op == "call_function" and xa.target is ops.lora_xa.default
                and not xa.kwargs and dropout_p == 0.0):
            continue
        xa_x, xa_A, xa_seed, xa_p, xa_backend = xa.args
        if (_source(xa_x) is not _source(x) or _source(xa_A) is not _source(lora_A) or xa_seed is not seed
                or xa_p != dropout_p or xa_backend != backend):
            continue
        if any(order[user] < order[node] for user in xa.users if user is not node):
            continue  # xa is read before the product: lora_fwd, where the product is, would come too late
        with graph.inserting_before(node):
            joint = graph.call_function(ops.lora_fwd.default, (x, weight, lora_A, lora_B, bias, seed, scaling,
                                                               dropout_p, weight_transposed, backend))
            y_out = graph.call_function(operator.getitem, (joint, 0))
            xa_out = graph.call_function(operator.getitem, (joint, 1))
        # the values alone: Inductor reads the product's eager_input_vals as lora_fwd's arguments, which they are not
        joint.meta["val"] = (node.meta.get("val"), xa.meta.get("val"))
        y_out.meta["val"], xa_out.meta["val"] = node.meta.get("val"), xa.meta.get("val")
        if "stack_trace" in node.meta:
            joint.meta["stack_trace"] = node.meta["stack_trace"]
        order[joint] = order[y_out] = order[xa_out] = order[node]
        node.replace_all_uses_with(y_out)
        graph.erase_node(node)
        xa.replace_all_uses_with(xa_out)
        inputs = xa.all_input_nodes
        graph.erase_node(xa)
        for n in inputs:  # the detaches lora_xa alone read
            if not n.users and n.op == "call_function" and _source(n) is not n:
                graph.erase_node(n)
        joined += 1
    return joined


def _val(node: Any) -> Any:
    """node's fake value, or its source's (a detach added after the trace may have none)."""
    if not isinstance(node, torch.fx.Node):
        return None
    return node.meta["val"] if "val" in node.meta else _source(node).meta.get("val")


def _xa_apart(xa: torch.fx.Node) -> bool:
    """Whether every layer's forward that takes this lora_xa's xa would make it by a product of its own anyway (the
    backend's xa_made_apart), so that a product shared with other layers costs it nothing."""
    from ._common import backend_module

    ops = torch.ops.peftkern
    x, lora_A, _, _, backend = xa.args
    x_val, a_val = _val(x), _val(lora_A)
    if x_val is None or a_val is None or not isinstance(x_val.shape[0], int):
        return False  # a row count known only when it runs: the plan cannot be asked
    apart = backend_module(backend, "lora").xa_made_apart
    for user in xa.users:
        if user.op == "call_function" and user.target is ops.lora_fwd_xa.default:
            weight, transposed = user.args[1], user.args[9]
            if _val(weight) is None or user.args[5] is not xa:
                return False
            n = _val(weight).shape[1 if transposed else 0]
            if not isinstance(n, int) or not apart(x_val.shape[0], n, a_val.shape[0], x_val.device):
                return False
    return True


def group_xa(graph: torch.fx.Graph) -> int:
    """Where several lora_xa of graph take one x without dropout (the attention's q, k and v projections read one
    normed input), on one backend with A's of one dtype, and each layer's forward would make its xa by a product of
    its own anyway (`_xa_apart`), one lora_xa makes them all from the A's stacked: x is read once, not once a layer.
    Each layer takes its columns of that xa, a view (the persistent kernel and the backward read xa by its row
    stride), where they span a multiple of 16 bytes. The count of lora_xa removed.

    Runs before rejoin_xa in the same slot, which then joins the pairs left (the layers whose kernel makes xa)."""
    from torch._guards import detect_fake_mode

    aten, target = torch.ops.aten, torch.ops.peftkern.lora_xa.default
    order = {node: i for i, node in enumerate(graph.nodes)}
    groups: dict = {}
    for node in graph.nodes:
        if node.op != "call_function" or node.target is not target or node.kwargs:
            continue
        x, lora_A, seed, dropout_p, backend = node.args
        a_val, xa_val = _val(lora_A), _val(node)
        # each layer's columns start on 16 bytes and span a multiple of them, as the persistent kernel's TMA
        # descriptors for xa need (r a multiple of 8 in 16 bits, which its persistent_forward_ok asks as well)
        if (seed is not None or dropout_p != 0.0 or a_val is None or xa_val is None
                or a_val.shape[0] * xa_val.element_size() % 16 or not _xa_apart(node)):
            continue
        groups.setdefault((_source(x), backend, a_val.dtype, a_val.device), []).append(node)
    removed = 0
    for members in groups.values():
        first = members[0]
        # the stacked A is made before the first member: each A's own node must come before it
        members = [m for m in members if m is first or order.get(_source(m.args[1]), len(order)) < order[first]]
        if len(members) < 2:
            continue
        sources = [_source(m.args[1]) if m is not first else first.args[1] for m in members]
        vals = [_val(m.args[1]) for m in members]
        fake_mode = detect_fake_mode([_val(first), *vals])
        ends = list(itertools.accumulate(v.shape[0] for v in vals))
        with graph.inserting_before(first):  # all before the first member, which goes below
            stacked = graph.call_function(aten.cat.default, (sources, 0))
            joint = graph.call_function(target, (first.args[0], stacked, None, 0.0, first.args[4]))
            views = [graph.call_function(aten.slice.Tensor, (joint, 1, end - v.shape[0], end))
                     for v, end in zip(vals, ends)]
        with fake_mode if fake_mode is not None else contextlib.nullcontext():
            stacked.meta["val"] = torch.cat(vals, 0)
            joint.meta["val"] = torch.empty_strided((_val(first).shape[0], ends[-1]), (ends[-1], 1),
                                                    dtype=_val(first).dtype, device=_val(first).device)
            for view in views:
                view.meta["val"] = joint.meta["val"][:, view.args[2]:view.args[3]]
        for m, view in zip(members, views):
            m.replace_all_uses_with(view)
            inputs_of_m = m.all_input_nodes
            graph.erase_node(m)
            for n in inputs_of_m:  # the detaches the old lora_xa alone read
                if not n.users and n.op == "call_function" and _source(n) is not n:
                    graph.erase_node(n)
        removed += len(members) - 1
    _take_views(graph)
    return removed


def _take_views(graph: torch.fx.Graph) -> None:
    """Let each lora_fwd_xa and lora_bwd of graph take a grouped xa's columns as they are. Inductor gives a custom op
    its inputs in the strides they had when traced (eager_input_vals), and there xa was whole: in the backward graph,
    which gets the forward's views as inputs, it copied each xa before lora_bwd. Both ops read xa by its row stride."""
    ops = torch.ops.peftkern
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in (ops.lora_fwd_xa.default, ops.lora_bwd.default):
            continue
        inputs, val = node.meta.get("eager_input_vals"), _val(node.args[5])
        if inputs is None or val is None or val.dim() != 2 or val.stride(1) != 1 or val.is_contiguous():
            continue
        args = list(inputs[0])
        args[5] = val
        node.meta["eager_input_vals"] = (tuple(args), inputs[1])


def _switch(name: str) -> bool:
    return globals()[_PASSES[name][1]][0]


@functools.cache
def _code_hash() -> str:
    """A hash of the code the passes' decisions come from (this module, and the backends' xa_made_apart with the plans
    it asks), for Inductor's cache key: a graph compiled by another version of them is not served from the cache."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digest = hashlib.sha256()
    for path in (os.path.join(root, "ops", "_compile_passes.py"), os.path.join(root, "reference.py"),
                 os.path.join(root, "kernels", "triton", "lora.py")):
        try:
            with open(path, "rb") as f:
                digest.update(f.read())
        except OSError:  # pragma: no cover - a file left out of an install: its name stands in
            digest.update(path.encode())
    return digest.hexdigest()[:16]


def _pass_class():
    """The CustomGraphPass that runs peftkern's pass `name` after the pass (or passes) that was set before it in the
    same slot; its uuid names both, for Inductor's cache."""
    if not _PASS_CLASS:
        from torch._inductor.custom_graph_pass import CustomGraphPass

        class PeftkernPass(CustomGraphPass):
            VERSION = 1

            def __init__(self, name: str, inner: Any = None) -> None:
                self.name, self.inner = name, inner

            def _inner(self) -> tuple:
                if self.inner is None:
                    return ()
                return tuple(self.inner) if isinstance(self.inner, (list, tuple)) else (self.inner,)

            def __call__(self, graph: torch.fx.Graph) -> None:
                for p in self._inner():
                    p(graph)
                if _switch(self.name):  # read here too: scripts/step_ab.py switches it between compiles in one process
                    globals()[self.name](graph)

            def uuid(self) -> Optional[Any]:
                inner = []
                for p in self._inner():
                    got = p.uuid() if isinstance(p, CustomGraphPass) else None
                    if not got:  # a plain callable: no key, so the cache is bypassed, as it is with that pass alone
                        return None
                    inner.append(got)
                return (f"peftkern.{self.name}", self.VERSION, _code_hash(), _switch(self.name), tuple(inner))

        _PASS_CLASS.append(PeftkernPass)
    return _PASS_CLASS[0]


def _unwrap(current: Any, cls: type) -> tuple[list, Any]:
    """(the names of peftkern's passes in a slot, innermost first; what the slot held before them)."""
    names = []
    while isinstance(current, cls):
        names.insert(0, current.name)
        current = current.inner
    return names, current


def install() -> bool:
    """Put peftkern's passes in Inductor's config slots (keep_xa in joint_custom_post_pass; group_xa, then rejoin_xa,
    in post_grad_custom_post_pass) around any pass already there, unless they are there; whether any is installed now.
    A slot gets all its passes, in _PASSES's order, where any of their switches is on; each pass reads its own switch
    when it runs. (One at a time, a pass switched on after the first install went around the others: group_xa
    outside rejoin_xa ran after it and found no pair left to group.)"""
    if not any(_switch(name) for name in _PASSES):
        return False
    try:
        from torch._inductor import config
    except ImportError:  # pragma: no cover - a torch without Inductor
        return False
    cls = _pass_class()
    installed = False
    for slot in dict.fromkeys(slot for slot, _ in _PASSES.values()):
        names = [name for name, (s, _) in _PASSES.items() if s == slot]
        if not any(_switch(name) for name in names) or not hasattr(config, slot):
            continue
        chain, current = _unwrap(getattr(config, slot), cls)
        if chain != names:
            for name in names:
                current = cls(name, current)
            setattr(config, slot, current)
        installed = True
    return installed
