"""One transformer decoder layer: the frozen Llama decoder layer against the same layer with PEFT adapters, eager
and fused by peftkern, forward and forward+backward of the hidden states (the middle level between the single
linear layer of bench_lora / bench_ia3 / bench_krona and the whole training step of bench_e2e).

    python -m peftkern bench decoder [--method lora|ia3|lokr|adapter|all] [--shape 1b|7b] [--tokens 8192 ...]
                                     [--no-compile] [--eager] [--out DIR]

Shapes: "1b" is hidden 2048, intermediate 5632, 16 heads; "7b" is hidden 4096, intermediate 11008, 32 heads.
Adapters as in PEFT's defaults for each method: LoRA r=16 on all seven projections, IA3 on k, v and down
(down in the input form), LoKr r=8 on q and v; bottleneck adapters (peftkern's own, add_adapters) at Pfeiffer's
placement after the MLP. Anchors: PEFT eager with its default float32 adapters and with bf16 adapters (for the
bottleneck adapters: the same adapters as eager PyTorch ops), and (LoRA) the bf16 PEFT layer under torch.compile.
Timing as in bench_lora (CUDA-graph replays by default); ratios are to the frozen layer of the same run.
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    PartialResults,
    bench_device,
    compiled,
    note_gpu_only,
    note_spread,
    print_table,
    progress,
    report_failure,
    time_layer_impls,
    timing_label,
)

import peftkern  # noqa: E402
from peftkern.workloads import check_fused, peft_config  # noqa: E402

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=16),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32),
    "cpu": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4),
}
METHODS = ("lora", "ia3", "lokr", "adapter")
SEQ = 2048


class DecoderLayer(torch.nn.Module):
    """A Llama decoder layer called on hidden states alone (its rotary embeddings computed once, outside)."""

    def __init__(self, shape: str, seq: int, device, dtype):
        super().__init__()
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        cfg = LlamaConfig(**SHAPES[shape], num_hidden_layers=1, vocab_size=128, max_position_embeddings=seq)
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(0)
        self.layer = LlamaDecoderLayer(cfg, layer_idx=0).to(device=device, dtype=dtype)
        self.layer.requires_grad_(False)
        pos = torch.arange(seq, device=device)[None]
        probe = torch.zeros(1, seq, cfg.hidden_size, device=device, dtype=dtype)
        self.cos, self.sin = LlamaRotaryEmbedding(cfg).to(device)(probe, pos)
        self.seq = seq

    def forward(self, h):
        h = h.view(-1, self.seq, h.shape[-1])
        out = self.layer(h, attention_mask=None, position_embeddings=(self.cos, self.sin))
        return (out[0] if isinstance(out, tuple) else out).reshape(-1, h.shape[-1])


def with_adapters(frozen: DecoderLayer, method: str, fp32_adapters: bool):
    from peft import get_peft_model

    model = get_peft_model(copy.deepcopy(frozen), peft_config(method), autocast_adapter_dtype=fp32_adapters)
    with torch.no_grad():  # non-trivial adapters (LoRA's B and LoKr's w2 start at zero)
        for n, p in model.named_parameters():
            if "lora_B" in n or "lokr_w2" in n:
                p.normal_(0, 0.01)
    return model, [p for p in model.parameters() if p.requires_grad]


def bottleneck_implementations(frozen: DecoderLayer, dtype) -> dict:
    """Pfeiffer adapters on the layer: eager PyTorch ops (the anchor) and peftkern's, in the layer's dtype and fp32."""
    from peftkern.integrations.adapters import adapters
    from peftkern.workloads import eager_adapter_forward

    impls = {"frozen layer (floor)": (frozen, [])}
    for label, eager, adapter_dtype in ((f"Pfeiffer, eager PyTorch ({str(dtype)[6:]} adapters)", True, None),
                                        (f"peftkern adapters ({str(dtype)[6:]} adapters)", False, None),
                                        ("peftkern adapters (fp32 adapters)", False, torch.float32)):
        if adapter_dtype == dtype:
            continue  # a float32 model's adapters are float32 either way: the same row twice, under two labels
        model = copy.deepcopy(frozen)
        peftkern.add_adapters(model, "pfeiffer", adapter_dtype=adapter_dtype)
        if eager:
            for adapter in adapters(model).values():
                adapter.forward = functools.partial(eager_adapter_forward, adapter)
        impls[label] = (model, [p for p in model.parameters() if p.requires_grad])
    return impls


def implementations(frozen: DecoderLayer, method: str, compile_anchor: bool, dtype) -> dict:
    if method == "adapter":
        return bottleneck_implementations(frozen, dtype)
    impls = {"frozen layer (floor)": (frozen, [])}
    for fp32, label in ((False, f"{str(dtype)[6:]} adapters"), (True, "fp32 adapters, PEFT default")):
        if fp32 and dtype == torch.float32:
            continue  # a float32 model's adapters are float32 either way: the same rows twice, under two labels
        model, params = with_adapters(frozen, method, fp32)
        impls[f"PEFT {method} eager ({label})"] = (model, params)
        fused, fparams = with_adapters(frozen, method, fp32)
        report = peftkern.fuse(fused)
        if report.skipped:  # timed, that row was PEFT's path in part, under peftkern's name (a review, 2026-12-05)
            report_failure(f"decoder {method} peftkern.fuse ({label})",
                           RuntimeError(f"fuse left layers on PEFT's path: {report.skipped}"), ours=True)
            continue
        fused.peftkern_fuse_report = report  # its fallbacks, read after the timing (run_case)
        impls[f"peftkern.fuse ({label})"] = (fused, fparams)
    if compile_anchor and method == "lora":
        model, params = with_adapters(frozen, method, False)
        impls["PEFT lora + torch.compile (bf16 adapters)"] = (compiled(model), params)
    return impls


def run_case(method: str, shape: str, tokens: int, dtype, device, compile_anchor: bool, eager: bool) -> list:
    seq = min(SEQ, tokens)
    frozen = DecoderLayer(shape, seq, device, dtype)
    hidden = SHAPES[shape]["hidden_size"]
    gen = torch.Generator(device=device).manual_seed(1)
    h = torch.randn(tokens, hidden, device=device, dtype=dtype, generator=gen).requires_grad_()
    dy = torch.randn(tokens, hidden, device=device, dtype=dtype, generator=gen)
    case = f"{method} {shape} decoder layer, {tokens} tokens"
    progress(case)
    impls = implementations(frozen, method, compile_anchor, dtype)
    rows = time_layer_impls("decoder", case, impls, h, dy, eager)
    for name, (fn, _) in impls.items():  # a fused row whose calls ran PEFT's path is not peftkern's timing
        try:
            check_fused(fn)
        except RuntimeError as exc:
            report_failure(f"decoder {case} {name}", exc, ours=True)
            rows = [r for r in rows if r.impl != name]
    return rows


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(prog="peftkern bench decoder", description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="lora", choices=[*METHODS, "all"])
    parser.add_argument("--shape", default="1b", choices=["1b", "7b"])
    parser.add_argument("--tokens", type=int, nargs="*", default=[8192])
    parser.add_argument("--no-compile", action="store_true", help="skip the PEFT + torch.compile anchor")
    parser.add_argument("--eager", action="store_true", help="time eager calls instead of CUDA-graph replays")
    parser.add_argument("--out", help="directory for the JSON (default $PEFTKERN_RESULTS_DIR, else "
                                          "benchmarks/results/)")
    args = parser.parse_args(argv)
    bad = [n for n in args.tokens if n < 1 or (n > SEQ and n % SEQ)]
    if bad:
        parser.error(f"--tokens {bad}: a positive number, and above {SEQ} (one sequence) a multiple of it")
    device, dtype = bench_device()
    note_gpu_only(device, eager=args.eager, shape=args.shape != "1b", tokens=args.tokens != [8192])
    shape, tokens = (args.shape, args.tokens) if device == "cuda" else ("cpu", [64])
    methods = METHODS if args.method == "all" else (args.method,)
    results = PartialResults("decoder", {"methods": list(methods), "shape": shape, "tokens": tokens,
                                         "dtype": str(dtype), "timing": timing_label(device, args.eager)},
                             Path(args.out) if args.out else None)
    rows = []
    for method in methods:
        for n in tokens:
            rows += run_case(method, shape, n, dtype, device, not args.no_compile and device == "cuda", args.eager)
            results.save(rows)
    note_spread(rows)
    print_table(rows, f"Decoder layer, {dtype}: ms and ratio to the frozen layer")
    path = results.finish(rows)
    print(f"saved {path}")
    return rows


if __name__ == "__main__":
    main()
