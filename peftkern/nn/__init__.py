"""nn.Module layers built on peftkern's fused ops, each reporting its PEFT-Ref properties."""

from ._peft_ref import PEFTRefProperties
from .ia3 import IA3Linear
from .lora import LoRALinear

__all__ = ["PEFTRefProperties", "LoRALinear", "IA3Linear"]
