"""Run csrc/krona.cu's kernels on the CPU (no GPU): a rewrite of the .cu file compiled with g++ into
scripts/emulate_krona_cu.cpp's harness, which checks every kernel against float64 on odd and PEFT-sized factors.

    python3 scripts/emulate_krona_cu.py          # needs g++ (C++20) and the CUDA headers (CUDA_HOME or /usr/local/cuda)

The rewrite: the CUDA-core products for every dtype (the tensor-core path, mma.sync with ldmatrix operands, cannot run
on a CPU), the shared-memory array a global, each `kernel<<<grid, threads, smem, stream>>>(args)` a call of the
harness's launcher. What it cannot check: the tensor-core path's register layouts, memory ordering on a GPU, speed.
Exits non-zero on a failure.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "..", "csrc")


def host_source(text: str) -> str:
    text = text.replace("#include <cuda_pipeline_primitives.h>\n", "")
    text = text.replace("#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800", "#if 0")
    text = text.replace("extern __shared__ __align__(128) unsigned char smem[];", "")
    text = text.replace("namespace peftkern {\nnamespace {\n",
                        "namespace peftkern {\nnamespace {\nalignas(128) unsigned char smem[1 << 19];\n", 1)
    text, launches = re.subn(r"(\w+(?:<[\w, ]+>)?)<<<(.*?)>>>\(", r"emu::launch(\2, \1, ", text, flags=re.S)
    if launches == 0:
        raise SystemExit("emulate_krona_cu: no kernel launch found in csrc/krona.cu")
    return text


def main() -> int:
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(CSRC, "krona.cu")) as f:
            source = host_source(f.read())
        with open(os.path.join(tmp, "krona_host.inc"), "w") as f:
            f.write(source)
        binary = os.path.join(tmp, "emulate_krona_cu")
        subprocess.run(["g++", "-std=c++20", "-O2", "-pthread", f"-I{tmp}", f"-I{CSRC}",
                        f"-I{os.path.join(cuda_home, 'include')}", os.path.join(HERE, "emulate_krona_cu.cpp"), "-o",
                        binary], check=True)
        return subprocess.run([binary]).returncode


if __name__ == "__main__":
    sys.exit(main())
