"""The autograd layer: one file per method, each a torch.autograd.Function over registered custom ops."""

from .lora import LoRALinearFunction, lora_dropout_mask, lora_linear, lora_merge_

__all__ = ["LoRALinearFunction", "lora_linear", "lora_merge_", "lora_dropout_mask"]
