"""nn.Module layers built on peftkern's fused ops, each reporting its PEFT-Ref properties."""

from ._peft_ref import PEFTRefProperties
from .lora import LoRALinear

__all__ = ["PEFTRefProperties", "LoRALinear"]
