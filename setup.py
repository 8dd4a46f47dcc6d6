"""peftkern's build: the Python package always; the CUDA extension peftkern._C from csrc/ when it can be built.

The extension is built when torch is importable at build time (install torch first, then
`pip install --no-build-isolation`), torch is a CUDA build and nvcc is found (CUDA_HOME). PEFTKERN_BUILD_CUDA=0
skips it; PEFTKERN_BUILD_CUDA=1 makes any failure to build it an error. Otherwise a failure to build it leaves
the pure-Python package (the Triton and torch backends) and one line says why (pip shows it with -v;
`python -m peftkern info` says it afterwards).

Targets: sm_90 and sm_80 (plus sm_90 PTX for newer GPUs), or TORCH_CUDA_ARCH_LIST when set. The C++ standard
is the one the installed torch asks for (C++17 up to torch 2.13, C++20 from 2.14); csrc/*.cu is C++17.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"}
MODE = os.environ.get("PEFTKERN_BUILD_CUDA", "auto").strip().lower()
GENCODE = [
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=compute_90",
]


def _say(msg: str) -> None:
    """One line, printed only by the command that builds (pip runs setup.py for metadata too)."""
    if BUILD_COMMANDS.intersection(sys.argv[1:]):
        print(f"peftkern: {msg}", file=sys.stderr)


def _not_built(reason: str) -> None:
    _say(f"the CUDA backend (peftkern._C) is not built: {reason}. The Triton and torch backends work.")


def _nvidia_include_dirs() -> list:
    """Headers of the pip CUDA packages that a CUDA torch wheel depends on (nvidia/cu13/include: cublas_v2.h,
    cusparse.h, ... which ATen's CUDA headers include but a bare nvcc toolkit may lack)."""
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for root in getattr(nvidia, "__path__", []):
        dirs += [d for d in glob.glob(os.path.join(root, "*", "include")) if os.path.isdir(d)]
    return sorted(dirs)


def _set_cuda_home() -> None:
    """Point CUDA_HOME at nvcc's toolkit when it is not set. torch guesses the parent of the nvcc on PATH,
    which is wrong for a wrapper such as /usr/local/bin/nvcc (its headers are not under /usr/local)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    for home in candidates + ["/usr/local/cuda"]:
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and \
                os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")):
            os.environ["CUDA_HOME"] = home
            return


def _add_to_cpath(dirs: list) -> None:
    # CPATH, not -I: searched after the toolkit's own include directory, so nvcc's headers win where both
    # have one and the pip packages only fill in what the toolkit lacks.
    current = [p for p in os.environ.get("CPATH", "").split(os.pathsep) if p]
    os.environ["CPATH"] = os.pathsep.join(current + [d for d in dirs if d not in current])


def cuda_extensions():
    """([extension], cmdclass), or ([], {}) with the reason said once."""
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))

    def skip(reason: str):
        if MODE == "1":
            raise RuntimeError(f"PEFTKERN_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
        _not_built(reason)
        return [], {}

    if MODE == "0":
        return skip("PEFTKERN_BUILD_CUDA=0")
    if not sources:
        return skip("csrc/ has no sources")
    _set_cuda_home()
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return skip("torch is not importable at build time (install torch first, then pip install "
                    "--no-build-isolation)")
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is not a CUDA build")
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return skip(f"nvcc was not found (CUDA_HOME={CUDA_HOME})")
    _add_to_cpath(_nvidia_include_dirs())
    # torch adds the arch flags of TORCH_CUDA_ARCH_LIST when no -gencode is given.
    gencode = [] if os.environ.get("TORCH_CUDA_ARCH_LIST") else GENCODE
    ext = CUDAExtension(
        name="peftkern._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo", *gencode]},
    )

    class BuildCuda(BuildExtension.with_options(use_ninja=True)):
        """Compiles csrc/; unless PEFTKERN_BUILD_CUDA=1, a compile error leaves the pure-Python package."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # any compile failure falls back to the Triton backend
                if MODE == "1":
                    raise
                _not_built(f"compiling csrc/ failed ({type(exc).__name__}: {exc}); set PEFTKERN_BUILD_CUDA=1 "
                           f"to see the error")

    return [ext], {"build_ext": BuildCuda}


ext_modules, cmdclass = cuda_extensions()

setup(
    name="peftkern",
    version="0.1.0",
    description="Fused Triton and CUDA kernels for parameter-efficient fine-tuning (LoRA, IA3, KronA, adapters)",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["peftkern*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "numpy",
    ],
    extras_require={
        "peft": ["peft>=0.13", "transformers>=4.45", "safetensors>=0.4"],
        "test": ["pytest>=7", "pytest-benchmark>=4", "pytest-xdist>=3"],
        "bench": ["matplotlib>=3.5", "pytest-benchmark>=4"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["peftkern=peftkern.cli:main"]},
)
