"""peftkern's build: the Python package always; the CUDA extension peftkern._C from csrc/ when it can be built.

The extension is built when torch is importable at build time (use `pip install --no-build-isolation`),
torch is a CUDA build, nvcc is found (CUDA_HOME) and csrc/ has sources. PEFTKERN_BUILD_CUDA=0 skips it,
PEFTKERN_BUILD_CUDA=1 makes a failure to build it an error. Otherwise one line says why it was not built.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _say(msg: str) -> None:
    print(f"peftkern: {msg}", file=sys.stderr)


def _nvidia_include_dirs() -> list:
    """Headers shipped by the pip CUDA packages (nvidia/cu13/include and friends: cusparse.h, ...)."""
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for root in getattr(nvidia, "__path__", []):
        dirs += [d for d in glob.glob(os.path.join(root, "*", "include")) if os.path.isdir(d)]
    return sorted(dirs)


def cuda_extensions():
    """([extension], cmdclass) or ([], {}) with the reason said once."""
    mode = os.environ.get("PEFTKERN_BUILD_CUDA", "auto").strip().lower()
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))

    def skip(reason: str):
        if mode == "1":
            raise RuntimeError(f"PEFTKERN_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
        _say(f"the CUDA backend (peftkern._C) is not built: {reason}. The Triton and torch backends work.")
        return [], {}

    if mode == "0":
        return skip("PEFTKERN_BUILD_CUDA=0")
    if not sources:
        return skip("csrc/ has no sources")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return skip("torch is not importable at build time (install torch first, then pip install "
                    "--no-build-isolation)")
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is not a CUDA build")
    if CUDA_HOME is None:
        return skip("nvcc / CUDA_HOME was not found")
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    gencode = [] if archs else ["-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_80,code=sm_80"]
    ext = CUDAExtension(
        name="peftkern._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")] + _nvidia_include_dirs(),
        extra_compile_args={"cxx": ["-O3", "-std=c++17"],
                            "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", *gencode]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extensions()

setup(
    name="peftkern",
    version="0.1.0",
    description="Fused Triton and CUDA kernels for parameter-efficient fine-tuning (LoRA, IA3, KronA, adapters)",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["peftkern", "peftkern.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "numpy",
    ],
    extras_require={
        "peft": ["peft>=0.13", "transformers>=4.45", "safetensors>=0.4"],
        "test": ["pytest>=7", "pytest-benchmark>=4"],
        "bench": ["matplotlib>=3.5", "pytest-benchmark>=4"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["peftkern=peftkern.cli:main"]},
)
