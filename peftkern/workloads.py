"""The Llama-style training workloads that `python -m peftkern bench e2e` and `python -m peftkern profile` share.

A model is built from a config (nothing is downloaded), its body frozen, and one method attached the way its
users attach it:

    impl "frozen"  no adapters; the embedding stays trainable so that backward runs through every layer (the floor)
    impl "frozen-norm"  no adapters; only the first layer's input norm trains: backward runs through every layer
                   as in a PEFT model, without the embedding's gradient and AdamW over its parameters, which the
                   floor pays and a PEFT model does not (~2-3% of the 1b step on an H200, NOTES-lora.md, twentieth
                   session). It still computes the first layer's q, k and v input gradients, which a PEFT model skips.
    impl "peft"    Hugging Face PEFT's own layers (get_peft_model), eager
    impl "fused"   the same PEFT model after peftkern.fuse(model)

Method "adapter" (bottleneck adapters at Pfeiffer's placement) is peftkern's own (`add_adapters`); its "peft"
impl is the same adapters computed by eager PyTorch ops, the anchor a user without peftkern would write.
Adapters per method: LoRA r=16 on all seven projections (PEFT's Llama default is r=8 on q and v; the issues
measure all seven), IA3 on k, v and down (down in the input form: PEFT's Llama default), LoKr r=8 on q and v, a
Pfeiffer adapter (reduction 16) after each MLP.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Optional, Union

import torch

SHAPES = {
    # the foundation and fuse issues' model (about 1B parameters at 22 layers; 8 layers here)
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
               num_key_value_heads=16, vocab_size=32000),
    # Llama-2-7B's layer shapes, 4 layers so that a step fits beside the other models of a run
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=4, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=128),
}
METHODS = ("lora", "ia3", "lokr", "adapter")
IMPLS = ("frozen", "frozen-norm", "peft", "fused")
FROZEN_IMPLS = ("frozen", "frozen-norm")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_config(method: str, r: int = 16):
    """PEFT's configuration of `method` for a Llama model, as the benchmarks use it."""
    import peft

    if method == "lora":
        return peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=LORA_TARGETS, lora_dropout=0.0)
    if method == "ia3":
        return peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    if method == "lokr":
        # r // 2 was 0 at --rank 1, which PEFT refuses: every LoKr row of that run failed (a review, 2026-12-06)
        return peft.LoKrConfig(r=max(1, r // 2), alpha=r, target_modules=["q_proj", "v_proj"])
    raise ValueError(f"no PEFT config for method {method!r}; choose from lora, ia3, lokr")


def build_llama(shape: str, device, dtype: torch.dtype, max_positions: int = 4096):
    """LlamaForCausalLM from SHAPES[shape], seeded, SDPA attention, in `dtype` on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=max(max_positions, 128), attn_implementation="sdpa")
    with torch.device(device):  # initialised where it runs: a 1b model's CPU init alone takes seconds
        return LlamaForCausalLM(cfg).to(dtype=dtype)


def freeze_body(model: torch.nn.Module, trainable: str = "embedding") -> torch.nn.Module:
    """Every parameter frozen but the embedding (trainable="embedding", the floor) or the first decoder layer's input
    norm ("norm"): either way backward runs through every layer."""
    for p in model.parameters():
        p.requires_grad_(False)
    if trainable == "embedding":
        model.get_input_embeddings().weight.requires_grad_(True)
    else:
        model.model.layers[0].input_layernorm.weight.requires_grad_(True)
    return model


def eager_adapter_forward(adapter, h, residual=None):
    """A BottleneckAdapter's function as plain PyTorch ops, its modules called one by one (the anchor of the adapter
    rows): the layer's own eager path."""
    return adapter._eager_forward(h, residual)


def build(method: str, impl: str, shape: str, device, dtype: torch.dtype, r: int = 16, fp32_adapters: bool = False,
          max_positions: int = 4096):
    """A model ready to train: SHAPES[shape] with `method` attached as `impl` (see the module docstring).

    fp32_adapters: adapter weights in float32 beside the model's dtype (PEFT's default, autocast_adapter_dtype).
    A fused model whose fuse() left a layer on PEFT's path raises: its timing would be PEFT's under peftkern's name.
    """
    import peftkern

    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    model = build_llama(shape, device, dtype, max_positions)
    if impl in FROZEN_IMPLS or method == "none":
        return freeze_body(model, "norm" if impl == "frozen-norm" else "embedding")
    if method == "adapter":
        peftkern.add_adapters(model, "pfeiffer", adapter_dtype=torch.float32 if fp32_adapters else None)
        if impl == "peft":
            for adapter in peftkern.integrations.adapters.adapters(model).values():
                adapter.forward = functools.partial(eager_adapter_forward, adapter)
        return model
    from peft import get_peft_model

    model = get_peft_model(model, peft_config(method, r), autocast_adapter_dtype=fp32_adapters)
    if impl == "fused":
        report = peftkern.fuse(model)
        if report.skipped:
            raise RuntimeError(f"fuse left layers on PEFT's path:\n{report}")
        model.peftkern_fuse_report = report  # its fallbacks: the calls that ran PEFT's path (check_fused)
    return model


def check_fused(model: torch.nn.Module) -> None:
    """Raise where a model build() fused made calls on PEFT's path since (FuseReport.fallbacks): a row timed so would
    be PEFT's under peftkern's name (nothing read the report's fallbacks; a review of the workloads, 2026-12-05)."""
    report = getattr(model, "peftkern_fuse_report", None)
    if report is not None and report.fallbacks:
        raise RuntimeError(f"the fused model fell back to PEFT's path: {dict(report.fallbacks)}")


# The optimizers a training step can use. "adamw" is torch.optim.AdamW's defaults: on CUDA its foreach path, whose
# host cost grows with the number of parameter tensors (4.07 ms a step under the profiler for the 1b LoRA model's 224
# against 1.05 for the floor's one; NOTES-lora.md, twentieth session's trace). "adamw-fused" is AdamW(fused=True),
# which Hugging Face's Trainer runs by default (TrainingArguments.optim "adamw_torch_fused").
OPTIMIZERS = ("adamw", "adamw-fused")


def make_optimizer(params, name: str = "adamw", lr: float = 1e-5) -> torch.optim.Optimizer:
    """One of OPTIMIZERS over `params`."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    return torch.optim.AdamW(params, lr=lr, fused=True if name == "adamw-fused" else None)


def training_step(model: torch.nn.Module, batch: int, seq: int, device, compile_: Union[bool, str] = False,
                  checkpointing: bool = False, lr: float = 1e-5, seed: int = 0,
                  optimizer: str = "adamw") -> Callable[[], torch.Tensor]:
    """A closure running one forward + backward + optimizer step on fixed random token ids; returns the loss. Its
    `optimizer` attribute is the optimizer.
    compile_: True compiles the model with torch.compile's default mode, a string names the mode
    ("reduce-overhead": CUDA graphs, which take the host's launch costs out of the step). optimizer: one of
    OPTIMIZERS."""
    if checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad. transformers installs
        # enable_input_require_grads's hook anyway; its requires_grad_() on the embedding's output is a graph
        # break under torch.compile (fullgraph refuses it), so it is taken off again.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "disable_input_require_grads"):
            model.disable_input_require_grads()
    model.train()
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], optimizer, lr)
    extra = {}
    if checkpointing:
        # No KV cache to build (transformers warns on every call otherwise), and under torch.compile the side effects
        # of transformers' output capturing inside a checkpointed layer are not replayed in its recompute: with newer
        # transformers (5.25) both broke the graph around every decoder layer, so the compiled + checkpointed rows ran
        # every layer eagerly (a review of the workloads, 2026-12-05: 4 graphs, 5-6 breaks, no peftkern op inside)
        extra["use_cache"] = False
    if compile_ and checkpointing and hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        # for this step's calls only, not the process's
        def traced():
            return torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True)
    else:
        traced = contextlib.nullcontext
    if compile_:
        fwd = torch.compile(model, mode=compile_ if isinstance(compile_, str) else None)
    else:
        fwd = model
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device, generator=gen)

    graphed = compile_ in ("reduce-overhead", "max-autotune")  # the modes that record CUDA graphs

    def step():
        if graphed:  # a new iteration: the graphs may reuse the memory of the last step's outputs
            torch.compiler.cudagraph_mark_step_begin()
        opt.zero_grad(set_to_none=True)
        with traced():
            loss = fwd(input_ids=ids, labels=ids, **extra).loss
            loss.backward()
        opt.step()
        return loss.detach()

    step.optimizer = opt  # for callers that inspect or checkpoint it
    return step


def describe(method: str, impl: str, fp32_adapters: bool, compiled: Union[bool, str] = False,
             model_dtype: str = "bf16") -> str:
    """The row name of a variant in tables and plots; compiled: True, or the torch.compile mode's name."""
    mode = f"({compiled})" if isinstance(compiled, str) else ""
    if impl == "frozen-norm":
        return "frozen model, embedding frozen too" + (f", compiled{mode}" if compiled else "")
    if impl == "frozen" or method == "none":
        return "frozen model" + (f", compiled{mode}" if compiled else " (floor)")
    if fp32_adapters:
        dtype = "fp32 adapters" + (", PEFT default" if method != "adapter" else "")
    else:
        dtype = f"{model_dtype} adapters"
    if method == "adapter":
        who = "Pfeiffer, peftkern" if impl == "fused" else "Pfeiffer, eager PyTorch"
    else:
        who = f"peftkern.fuse(PEFT {method})" if impl == "fused" else f"PEFT {method}"
    return f"{who} ({dtype})" + (f" + torch.compile{mode}" if compiled else "")


def variants(methods, compile_anchors: bool = False) -> list[tuple[str, str, bool, bool]]:
    """(method, impl, fp32_adapters, compiled) for every row of an e2e run, the floor first, then the frozen model
    without the embedding's training (the floor of the same frozen work as the adapters' models). With
    compile_anchors: the compiled frozen model, PEFT LoRA (bf16) compiled and the fused LoRA compiled."""
    rows = [("none", "frozen", False, False), ("none", "frozen-norm", False, False)]
    for method in methods:
        for impl in ("peft", "fused"):
            for fp32 in (False, True):
                if method == "adapter" and impl == "peft" and fp32:
                    continue  # the eager anchor in the model's dtype is enough
                rows.append((method, impl, fp32, False))
    if compile_anchors:  # last: inductor's compile workers keep the CPU busy for a while after a compile, which
        # slowed the eager rows timed after them by up to 30% on the H100 host (host-bound fused steps most)
        rows.append(("none", "frozen", False, True))
        if "lora" in methods:
            rows += [("lora", "peft", False, True), ("lora", "fused", False, True)]
    return rows


def resolve_shape(shape: Optional[str], device) -> str:
    """The shape a run uses: tiny on the CPU, whatever was asked for on a GPU."""
    return "tiny" if torch.device(device).type != "cuda" else (shape or "1b")
