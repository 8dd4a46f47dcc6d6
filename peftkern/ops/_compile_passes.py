"""Inductor passes for LoRA's two ops under torch.compile (ops/lora.py, COMPILED_SPLIT): lora_xa makes xa = drop(x)
A^T, and lora_fwd_xa makes the layer's output from it.

`keep_xa` (Inductor's joint_custom_post_pass). Activation checkpointing tags every op of a checkpointed region
PREFER_RECOMPUTE, and the partitioner then recomputes in backward whatever backward reads. A fused LoRA layer's backward
reads xa (M x r), so lora_xa ran again for every layer: a skinny product that reads all of x (M x K) to make r columns.
Keeping xa instead costs M r elements a layer, r / K of x (16 / 2048 in the 1b model). The pass marks each lora_xa a
checkpoint would recompute MUST_SAVE, as a selective-checkpointing policy does for the ops it names. An op the user's
own policy tags MUST_RECOMPUTE is left so.

`rejoin_xa` (Inductor's post_grad_custom_post_pass) makes each forward graph's pair one lora_fwd again after the
partition: see its docstring.

lora_xa's fake implementation installs both when dynamo first traces the op (`install`), each wrapping whatever pass
the user had set in its slot, which still runs, first. A pass the user sets after that replaces peftkern's; it is
installed again at the next trace of a LoRA layer. PEFTKERN_LORA_SAVE_XA=0 and PEFTKERN_LORA_REJOIN_XA=0 (read at
import; SAVE_XA[0] / REJOIN_XA[0] = False later, before a compile) turn them off. Other backends (aot_eager, a custom
partition_fn) run no Inductor pass; `keep_xa` and `rejoin_xa` are the passes themselves, for those to call.
"""

from __future__ import annotations

import operator
import os
from typing import Any, Optional

import torch

SAVE_XA = [os.environ.get("PEFTKERN_LORA_SAVE_XA", "1") != "0"]
REJOIN_XA = [os.environ.get("PEFTKERN_LORA_REJOIN_XA", "1") != "0"]
# each pass: its Inductor config slot and the switch (a global of this module, looked up at each use)
_PASSES = {"keep_xa": ("joint_custom_post_pass", "SAVE_XA"), "rejoin_xa": ("post_grad_custom_post_pass", "REJOIN_XA")}
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


def _switch(name: str) -> bool:
    return globals()[_PASSES[name][1]][0]


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
                return (f"peftkern.{self.name}", self.VERSION, _switch(self.name), tuple(inner))

        _PASS_CLASS.append(PeftkernPass)
    return _PASS_CLASS[0]


def install() -> bool:
    """Make keep_xa Inductor's joint_custom_post_pass and rejoin_xa its post_grad_custom_post_pass, each around any
    pass already there, unless it is there or its switch is off; whether either is installed now."""
    if not any(_switch(name) for name in _PASSES):
        return False
    try:
        from torch._inductor import config
    except ImportError:  # pragma: no cover - a torch without Inductor
        return False
    cls = _pass_class()
    installed = False
    for name, (slot, _) in _PASSES.items():
        if not _switch(name) or not hasattr(config, slot):
            continue
        current = getattr(config, slot)
        if not (isinstance(current, cls) and current.name == name):
            setattr(config, slot, cls(name, current))
        installed = True
    return installed
