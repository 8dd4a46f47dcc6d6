"""nn.Module layers built on peftkern's fused ops, each reporting its PEFT-Ref properties."""

from ._peft_ref import PEFTRefProperties
from .adapter import BottleneckAdapter
from .ia3 import IA3Linear
from .krona import KronALinear
from .lora import LoRALinear

__all__ = ["PEFTRefProperties", "LoRALinear", "IA3Linear"]
__all__ += ["BottleneckAdapter"]
__all__ += ["KronALinear"]

_ADAPTER_LAYERS = (LoRALinear, IA3Linear, KronALinear, BottleneckAdapter)


def freeze_all_but_adapters(model) -> None:
    """requires_grad_(False) on every parameter of `model` except those of peftkern's adapter layers (whose own frozen
    base weights are frozen already): attaching a second set of adapters keeps the first set trainable."""
    keep = {id(p) for m in model.modules() if isinstance(m, _ADAPTER_LAYERS) for p in m.parameters()}
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)
