"""Where test_fuse.py's test_fp32_adapters_beside_bf16_base loses precision at one seed: each LoRA layer's error
against float64, on the same bf16 input, for PEFT (fp32 adapters), PEFT under bf16 autocast and the fused twin;
then each layer's output error along the whole forward (where the model amplifies it), and the logits'.

    CUDA_VISIBLE_DEVICES=0 python3 scripts/fp32_adapter_layer_errors.py --seed 14

Errors are norm-wise relative (conftest.rel_err). The per-layer columns isolate one op's rounding; the forward's
columns carry every earlier layer's too. Without CUDA_VISIBLE_DEVICES it runs on the CPU, where the torch backend
computes the adapters in fp32 and rounds nothing of them, so the fused and PEFT columns nearly coincide.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=14, help="PEFTKERN_TEST_SEED of the run to look at")
    args = parser.parse_args()
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    sys.path.insert(0, str(TESTS))
    import conftest
    import test_fuse as tf
    import torch
    from peft.tuners.lora import LoraLayer

    import peftkern

    conftest._SEED[0] = args.seed
    bf16 = torch.bfloat16
    device_type = torch.device(tf.DEVICE).type
    reference = tf.build("llama", dtype=bf16, fp32_adapters=True)
    twin = copy.deepcopy(reference)
    assert peftkern.fuse(twin).fused
    exact = copy.deepcopy(reference).double()
    names = [n for n, m in reference.named_modules() if isinstance(m, LoraLayer)]
    modules = {label: dict(model.named_modules()) for label, model in
               (("exact", exact), ("peft", reference), ("twin", twin))}

    def forward(model, label, autocast=False):
        """The logits of train_steps' first forward, and each LoRA layer's input and output along it."""
        seen = {}
        hooks = [modules[label][n].register_forward_hook(
            lambda m, inp, out, n=n: seen.__setitem__(n, (inp[0].detach(), out.detach()))) for n in names]
        torch.manual_seed(conftest.run_seed(5))
        with torch.no_grad(), torch.autocast(device_type, dtype=bf16, enabled=autocast):
            logits = model(**tf.batch("llama", seed=0)).logits
        for h in hooks:
            h.remove()
        return logits, seen

    le, exact_seen = forward(exact, "exact")
    lp, peft_seen = forward(reference, "peft")
    la, autocast_seen = forward(reference, "peft", autocast=True)
    lt, twin_seen = forward(twin, "twin")
    err = conftest.rel_err
    print(f"seed {args.seed} on {tf.DEVICE}: one layer on the float64 forward's input rounded to bf16 | each layer's "
          "output along each model's own forward")
    print(f"{'layer':45s} {'PEFT':>9s} {'autocast':>9s} {'fused':>9s} | {'PEFT':>9s} {'autocast':>9s} {'fused':>9s}")
    for n in names:
        x = exact_seen[n][0].to(bf16)
        with torch.no_grad():
            want = modules["exact"][n](x.double())
            one = [modules["peft"][n](x)]
            with torch.autocast(device_type, dtype=bf16):
                one.append(modules["peft"][n](x))
            one.append(modules["twin"][n](x))
        along = [seen[n][1] for seen in (peft_seen, autocast_seen, twin_seen)]
        print(f"{n.removeprefix('base_model.model.model.'):45s} " + " ".join(f"{err(y, want):9.2e}" for y in one)
              + " | " + " ".join(f"{err(y, exact_seen[n][1]):9.2e}" for y in along))
    print(f"{'logits':45s} {'':29s} | " + " ".join(f"{err(y, le):9.2e}" for y in (lp, la, lt)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
