"""Shared test helpers: devices, backends, per-dtype tolerances, comparisons that say where they differ."""

from __future__ import annotations

import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; this must be set before any
# kernel module is imported, so the README's one test command works on every machine.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import peftkern  # noqa: E402
from peftkern import _backend  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if HAS_CUDA else "cpu"

# Relative L2 error allowed against reference.py (computed in float32/float64), per input dtype.
# bf16/fp16 operands with float32 accumulation land near 1e-3..1e-2; tf32 near 3e-4.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-3 if HAS_CUDA else 1e-5, torch.float16: 5e-3,
             torch.bfloat16: 2e-2}
# PEFTKERN_MARGIN_LOG=path appends each assert_close's error / tolerance with the test and the name compared: the
# comparisons nearest their limit on fresh random inputs are the ones that can fail by chance (scripts/margins.py).
MARGIN_LOG = os.environ.get("PEFTKERN_MARGIN_LOG")
# Whole models in bf16 against PEFT, which runs the adapter path in fp32: the difference is every bf16
# activation rounding of the network, not the op's (measured 2-9% on adapter gradients of tiny models).
MODEL_TOLERANCE = {torch.float32: TOLERANCE[torch.float32], torch.bfloat16: 0.1}


def dtypes_for(backend: str) -> list:
    """fp32/fp16/bf16 on a GPU; fp32/fp16 for Triton under the CPU interpreter (it mishandles bf16)."""
    if backend == "torch" and not HAS_CUDA:
        return [torch.float32, torch.float64]
    if HAS_CUDA:
        return [torch.float32, torch.float16, torch.bfloat16]
    return [torch.float32, torch.float16]


def backend_params(op: str = "lora") -> list:
    """Every backend for `op`, each skipped with its reason where it cannot run here."""
    params = []
    device = torch.device(DEVICE)
    for name in ("torch", "triton", "cuda"):
        if _backend.available(name, device, op):
            params.append(pytest.param(name, id=name))
        else:
            reason = _backend.backend_status().get(name, "unavailable")
            if _backend.available(name, device):
                reason = f"the extension has no {op} kernel"
            params.append(pytest.param(name, id=name, marks=pytest.mark.skip(reason=f"{name}: {reason}")))
    return params


@pytest.fixture(autouse=True)
def _no_forced_backend_after_a_test():
    """Every test leaves the backend switch as it found it (unforced), whether it fails or not: a GPU test that
    forced "triton" without resetting it made a later test of its process run triton on the meta device and fail
    (the GPU run, 2026-12-05). On a GPU it also hands the allocator's cached blocks back: the suite runs in 16
    processes on one GPU, and on an H100 (80 GB) they held 4-7 GB each and the later tests ran out of memory (28
    of 35 tests of one shard failed so, 2026-12-05)."""
    yield
    peftkern.set_backend(None)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


@pytest.fixture
def backend(request):
    peftkern.set_backend(request.param)
    yield request.param
    peftkern.set_backend(None)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def record_margin(ratio: float, name: str) -> None:
    """One comparison's error / tolerance into PEFTKERN_MARGIN_LOG, when set, with the test and the name compared."""
    if MARGIN_LOG:
        with open(MARGIN_LOG, "a") as log:
            log.write(f"{ratio:.4g}\t{os.environ.get('PYTEST_CURRENT_TEST', '?')}\t{name}\n")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str = "output",
                 scale: float = 1.0) -> None:
    """Relative L2 error within the dtype's tolerance (times scale); on failure say where it was worst."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(a).all(), f"{name}: non-finite values at {torch.nonzero(~torch.isfinite(a))[:5].tolist()}"
    err = rel_err(a, e)
    tol = TOLERANCE[dtype] * scale
    record_margin(err / tol, name)
    if err > tol:
        diff = (a - e).abs()
        idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(f"{name}: relative error {err:.3e} > {tol:.1e} ({dtype}); worst at index {idx}: "
                             f"got {a[idx].item():.6g}, expected {e[idx].item():.6g}")


def assert_close_or_as_exact(actual: torch.Tensor, expected: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype,
                             name: str = "output", scale: float = 1.0) -> None:
    """assert_close(actual, expected); where they differ by more than that, actual must still be as close to `exact`
    (the same computation in float64) as expected is, twice its error at most. Two roundings of a sum that cancels
    (a gradient summed over tokens of both signs) can part by more than either's budget; a defect makes the op's
    answer worse than the reference's, which this still catches.

    actual within the tolerance of `exact` passes as well: the tolerance is the error allowed against the true
    answer, and the same-dtype reference only stands in for it. Where that reference's own error happened to be
    small, twice it was a stricter bar than the tolerance (float32, the interpreter: a lora_B gradient 1.4e-5 off
    float64 against the 2e-5 allowed, the reference's 6.6e-6; test_fuse.py's test_peft_configurations[lora_bias],
    seed 145983949, 2026-12-06)."""
    try:
        assert_close(actual, expected, dtype, name, scale)
    except AssertionError as differ:
        err_actual, err_expected = rel_err(actual, exact), rel_err(expected, exact)
        # not `err_actual > 2 * err_expected`: a NaN in actual makes err_actual NaN, and that comparison passed it
        if not (err_actual <= 2 * err_expected or err_actual <= TOLERANCE[dtype] * scale):
            raise AssertionError(f"{differ}; against float64 its error is {err_actual:.3e}, above the tolerance "
                                 f"and above twice the reference's {err_expected:.3e}") from None


@pytest.fixture
def poison_empty(monkeypatch):
    """Make torch.empty return NaN-filled float tensors, so an element a kernel forgets to write shows up; the
    persistent kernels' buffers too, which _launch.empty_buffers makes in C++ (at::empty) where the extension is
    built."""
    original = torch.empty

    def poisoned(*args, **kwargs):
        t = original(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", poisoned)
    try:
        from peftkern.kernels.triton import _launch
        from peftkern.kernels.triton import lora as triton_lora
    except ImportError:  # no Triton: no persistent kernels
        _launch = None
    if _launch is not None:
        make = _launch.empty_buffers

        def poisoned_buffers(ref, *specs):
            made = make(ref, *specs)
            for t, (_, _, zero) in zip(made, specs):
                if not zero and t.is_floating_point():
                    t.fill_(float("nan"))
            return made

        monkeypatch.setattr(_launch, "empty_buffers", poisoned_buffers)
        monkeypatch.setattr(triton_lora, "empty_buffers", poisoned_buffers)
    yield


# Every test starts torch's generators from a fresh seed, so the inputs it draws differ from run to run; a test that
# needs the same draw twice (two models built alike, a dropout mask replayed) seeds with run_seed(k), which is fresh
# per run too. PEFTKERN_TEST_SEED=N repeats a run; a failing test's report names its seed.
_SEED = [0]


def run_seed(offset: int = 0) -> int:
    """This test's seed plus offset (mod 2^31): the same within the test, different from run to run."""
    return (_SEED[0] + int(offset)) % (2**31 - 1)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    fixed = os.environ.get("PEFTKERN_TEST_SEED")
    _SEED[0] = int(fixed) if fixed else int.from_bytes(os.urandom(4), "little") % (2**31 - 1)
    request.node.peftkern_seed = _SEED[0]
    torch.manual_seed(_SEED[0])
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seed = getattr(item, "peftkern_seed", None)
    if report.failed and seed is not None:
        report.sections.append(("seed", f"this test ran with seed {seed}: PEFTKERN_TEST_SEED={seed} repeats it"))


def pytest_runtest_logreport(report):
    """PEFTKERN_INSTAFAIL=1 (scripts/gpu_check.sh's shards): a failure's traceback printed as it happens, not in the
    session's summary, which a shard cut by the device call's limit never reaches (2026-12-06: a peak-memory test
    failed in such a shard and left only its name)."""
    if report.failed and os.environ.get("PEFTKERN_INSTAFAIL"):
        import sys

        print(f"\n==== FAILED {report.nodeid} ({report.when})\n{report.longreprtext}\n====", file=sys.__stderr__,
              flush=True)


@pytest.fixture
def eager_rng():
    """Compiled random ops draw from torch's generators as eager ones do (inductor's fallback_random), for tests that
    compare compiled dropout with eager. config.patch, not monkeypatch: pytest 9.2's undo deletes a config entry."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch(fallback_random=True):
        yield
