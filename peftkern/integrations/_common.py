"""What the integrations share."""

from __future__ import annotations

from torch import nn

_WRAPPERS = ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel")


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside torch.compile's OptimizedModule and DDP / DataParallel / FSDP wrappers, whose own names and
    state_dict keys carry a prefix (_orig_mod., module.): the adapters' keys are the inner model's."""
    while True:
        inner = model._modules.get("_orig_mod") or (model._modules.get("module")
                                                    if type(model).__name__ in _WRAPPERS else None)
        if inner is None:
            return model
        model = inner
