"""nn.Module layers built on peftkern's fused ops, each reporting its PEFT-Ref properties."""

from ._peft_ref import PEFTRefProperties
from .adapter import BottleneckAdapter
from .ia3 import IA3Linear
from .krona import KronALinear
from .lora import LoRALinear

__all__ = ["PEFTRefProperties", "LoRALinear", "IA3Linear"]
__all__ += ["BottleneckAdapter"]
__all__ += ["KronALinear"]

_WRAPPING_LAYERS = (LoRALinear, IA3Linear, KronALinear)  # hold the wrapped layer's weight and bias beside theirs
TO_SAVE = "_peftkern_modules_to_save"  # marks a module trained whole beside the adapters (PEFT's modules_to_save)


def freeze_all_but_adapters(model) -> None:
    """requires_grad_(False) on every parameter of `model` except the adapter parameters of peftkern's layers (a
    BottleneckAdapter's all; a LoRALinear's, IA3Linear's or KronALinear's other than the base weight and bias):
    attaching a second set of adapters keeps the first set trainable, and freezes a base weight a user unfroze.
    The modules marked TO_SAVE (add_lora's / add_adapters' modules_to_save) stay trainable whole."""
    keep = set()
    for m in model.modules():
        if isinstance(m, BottleneckAdapter) or getattr(m, TO_SAVE, False):
            keep.update(id(p) for p in m.parameters())
        elif isinstance(m, _WRAPPING_LAYERS):
            keep.update(id(p) for name, p in m.named_parameters() if name not in ("weight", "bias"))
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)
