"""peftkern: fused Triton and CUDA kernels for parameter-efficient fine-tuning."""

from . import nn, ops, reference
from ._backend import backend_status, get_backend, set_backend
from .integrations.adapters import (
    AdapterConfig,
    add_adapters,
    convert_adapterhub,
    load_adapterhub,
    load_adapters,
    remove_adapters,
    save_adapters,
)
from .integrations.peft import FuseReport, fuse, unfuse
from .integrations.transformers import add_lora, load_lora, merge_and_unload, save_lora
from .ops._common import set_nvtx
from .ops.adapter import bottleneck_adapter
from .ops.ia3 import ia3_linear, ia3_merge_
from .ops.krona import krona_linear, krona_merge_
from .ops.lora import lora_linear, lora_merge_
from .profiling import profile

__version__ = "0.1.0"

__all__ = [
    "nn", "ops", "reference",
    "set_backend", "get_backend", "backend_status",
    "lora_linear", "lora_merge_", "ia3_linear", "ia3_merge_",
    "profile", "set_nvtx",
    "fuse", "unfuse", "FuseReport", "add_lora", "save_lora", "load_lora", "merge_and_unload",
]
__all__ += ["bottleneck_adapter", "AdapterConfig", "add_adapters", "save_adapters", "load_adapters",
            "remove_adapters", "convert_adapterhub", "load_adapterhub"]
__all__ += ["krona_linear", "krona_merge_"]
