"""An Inductor joint-graph pass for peftkern's registered ops: under a checkpoint, keep LoRA's xa instead of
recomputing it.

Under torch.compile, activation checkpointing tags every op of a checkpointed region PREFER_RECOMPUTE, and the
partitioner then recomputes in backward whatever backward reads. A fused LoRA layer's backward reads xa = drop(x) A^T
(M x r), so lora_xa (ops/lora.py, COMPILED_SPLIT) runs again for every layer: a skinny product that reads all of x
(M x K) to make r columns. Keeping xa instead costs M r elements a layer, r / K of x (16 / 2048 in the 1b model).
This pass marks each lora_xa a checkpoint would recompute MUST_SAVE, as a selective-checkpointing policy does for
the ops it names. An op the user's own policy tags MUST_RECOMPUTE is left so.

It runs as Inductor's joint_custom_post_pass. lora_xa's fake implementation installs it when dynamo first traces the op
(`install`), wrapping whatever pass the user had set there, which still runs, first. A pass the user sets after that
replaces this one; it is installed again at the next trace of a LoRA layer. PEFTKERN_LORA_SAVE_XA=0 (read at import;
SAVE_XA[0] = False later, before a compile) leaves xa to be recomputed. Other backends (aot_eager, a custom
partition_fn) run no Inductor pass; `keep_xa` is the pass itself, for those to call.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch

SAVE_XA = [os.environ.get("PEFTKERN_LORA_SAVE_XA", "1") != "0"]
_PASS_CLASS: list = []  # built at the first install: importing torch._inductor costs ~1 s, so not at peftkern's import


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


def _pass_class():
    if not _PASS_CLASS:
        from torch._inductor.custom_graph_pass import CustomGraphPass

        class KeepXa(CustomGraphPass):
            """keep_xa after the pass (or passes) that was set before it; its uuid names both, for the cache."""

            VERSION = 1

            def __init__(self, inner: Any = None) -> None:
                self.inner = inner

            def _inner(self) -> tuple:
                if self.inner is None:
                    return ()
                return tuple(self.inner) if isinstance(self.inner, (list, tuple)) else (self.inner,)

            def __call__(self, graph: torch.fx.Graph) -> None:
                for p in self._inner():
                    p(graph)
                if SAVE_XA[0]:  # read here too: scripts/step_ab.py switches it between compiles in one process
                    keep_xa(graph)

            def uuid(self) -> Optional[Any]:
                inner = []
                for p in self._inner():
                    got = p.uuid() if isinstance(p, CustomGraphPass) else None
                    if not got:  # a plain callable: no key, so the cache is bypassed, as it is with that pass alone
                        return None
                    inner.append(got)
                return ("peftkern.keep_xa", self.VERSION, SAVE_XA[0], tuple(inner))

        _PASS_CLASS.append(KeepXa)
    return _PASS_CLASS[0]


def install() -> bool:
    """Make keep_xa Inductor's joint_custom_post_pass (around any pass already there) unless it is there or
    SAVE_XA is off; whether it is installed now."""
    if not SAVE_XA[0]:
        return False
    try:
        from torch._inductor import config
    except ImportError:  # pragma: no cover - a torch without Inductor
        return False
    if not hasattr(config, "joint_custom_post_pass"):  # pragma: no cover - older torch
        return False
    cls = _pass_class()
    current = config.joint_custom_post_pass
    if not isinstance(current, cls):
        config.joint_custom_post_pass = cls(current)
    return True
