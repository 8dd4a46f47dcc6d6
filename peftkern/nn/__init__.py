"""nn.Module layers built on peftkern's fused ops, each reporting its PEFT-Ref properties."""

from ._peft_ref import PEFTRefProperties
from .adapter import BottleneckAdapter
from .ia3 import IA3Linear
from .krona import KronALinear
from .lora import LoRALinear

__all__ = ["PEFTRefProperties", "LoRALinear", "IA3Linear"]
__all__ += ["BottleneckAdapter"]
__all__ += ["KronALinear"]
