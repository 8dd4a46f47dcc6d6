"""test_fuse.py's whole-model bf16 checks, run on the CPU over many seeds: how far the fused twin's logits are from
PEFT's and from a float64 copy of the model, each as a fraction of the bf16 tolerance.

    python3 scripts/fuse_bf16_margins.py --seeds 0 200            # the margins over seeds 0..199
    python3 scripts/fuse_bf16_margins.py --seeds 0 10 --defect 1.05   # the fused op's scaling off by 5%: must fail

On a GPU these tests build bf16 models with bf16 adapters; on the CPU they run in float32. This script runs them as
on a GPU, in bf16 on the CPU: the fused op on the torch backend, which computes in float32 as the kernels do for bf16
adapters (fp32 adapters the kernels round to bf16, and the torch backend does not), and PEFT rounding x A^T and its
product with B to bf16. Four tests: test_load_adapter_set_adapter_and_requires_grad,
test_two_adapters_switch_and_combine, test_fp32_adapters_beside_bf16_base and the per-layer
test_fp32_adapters_round_as_autocast_does. Each whole-model comparison is printed as three maxima over the seeds:
twin against PEFT, twin against float64, PEFT against float64. Exits non-zero where a test fails without --defect, or
where one passes with it. With CUDA_VISIBLE_DEVICES set it runs on that GPU, on the kernels:

    CUDA_VISIBLE_DEVICES=0 python3 scripts/fuse_bf16_margins.py --seeds 0 100
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs=2, default=(0, 50), metavar=("FIRST", "END"))
    parser.add_argument("--defect", type=float, default=None,
                        help="multiply the fused op's scaling by this factor (a defect the checks must catch)")
    args = parser.parse_args()
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    sys.path.insert(0, str(TESTS))
    import conftest
    import test_fuse as tf
    import torch

    import peftkern.integrations.peft as integration

    bf16 = torch.bfloat16
    tf.DTYPE = bf16
    tf.GRAD_SCALE = conftest.MODEL_TOLERANCE[bf16] / conftest.TOLERANCE[bf16]
    build = tf.build
    tf.build = lambda *args, **kw: build(*args, **{"dtype": bf16, "fp32_adapters": False, **kw})
    if args.defect is not None:
        fused = integration.lora_linear

        def off_by(x, w, A, B, scaling, *rest, **kw):
            return fused(x, w, A, B, scaling * args.defect, *rest, **kw)

        integration.lora_linear = off_by

    rows = collections.defaultdict(list)
    checked = tf.assert_close_or_as_exact

    def recording(actual, expected, exact, dtype, name="output", scale=1.0):
        tol = conftest.TOLERANCE[dtype] * scale
        rows[name].append([conftest.rel_err(a, b) / tol for a, b in ((actual, expected), (actual, exact),
                                                                    (expected, exact))])
        checked(actual, expected, exact, dtype, name, scale)

    tf.assert_close_or_as_exact = recording
    tests = [tf.test_load_adapter_set_adapter_and_requires_grad, tf.test_two_adapters_switch_and_combine,
             tf.test_fp32_adapters_beside_bf16_base, tf.test_fp32_adapters_round_as_autocast_does]
    failed = collections.Counter()
    for seed in range(*args.seeds):
        for test in tests:
            conftest._SEED[0] = seed
            torch.manual_seed(seed)
            try:
                test(Path(tempfile.mkdtemp())) if test is tests[0] else test()
            except AssertionError as error:
                failed[test.__name__] += 1
                print(f"seed {seed} {test.__name__}: {str(error)[:160]}")
    n = args.seeds[1] - args.seeds[0]
    print(f"{'comparison':30s} {'twin~PEFT':>10s} {'twin~f64':>10s} {'PEFT~f64':>10s}   (maxima over {n} seeds)")
    for name, values in rows.items():
        print(f"{name:30s} " + " ".join(f"{max(v[i] for v in values):10.3f}" for i in range(3)))
    for test in tests:
        print(f"{test.__name__}: failed at {failed[test.__name__]} of {n} seeds")
    if args.defect is None:
        return 1 if failed else 0
    return 0 if all(failed[t.__name__] for t in tests) else 1


if __name__ == "__main__":
    sys.exit(main())
