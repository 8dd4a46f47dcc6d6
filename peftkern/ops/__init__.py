"""The autograd layer: one file per method, each a torch.autograd.Function over registered custom ops."""

from .adapter import BottleneckAdapterFunction, bottleneck_adapter
from .ia3 import IA3LinearFunction, ia3_linear, ia3_merge_
from .krona import KronALinearFunction, krona_linear, krona_merge_
from .lora import LoRALinearFunction, lora_dropout_mask, lora_linear, lora_merge_

__all__ = ["LoRALinearFunction", "lora_linear", "lora_merge_", "lora_dropout_mask",
           "IA3LinearFunction", "ia3_linear", "ia3_merge_"]
__all__ += ["BottleneckAdapterFunction", "bottleneck_adapter"]
__all__ += ["KronALinearFunction", "krona_linear", "krona_merge_"]
