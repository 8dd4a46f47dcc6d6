#!/usr/bin/env bash
# Compile checks of csrc/ for CI, on a machine without a GPU.
#
#   bash scripts/check_csrc.sh                 every csrc/*.cu with nvcc for sm_90, torch-free (the .cu files
#                                              include nothing from torch), with the flags torch's build adds,
#                                              so a CUDA typo fails CI even against a CPU build of torch.
#   bash scripts/check_csrc.sh --full [PYTHON] also build the whole extension (csrc/bindings.cpp included) with
#                                              PYTHON's torch (a CUDA build: e.g. .venv-cuda/bin/python) into a
#                                              temporary directory, and import it; nothing lands in the tree.
set -euo pipefail
cd "$(dirname "$0")/.."

full=0
python=python3
if [ "${1:-}" = "--full" ]; then
  full=1
  python=${2:-python3}
elif [ $# -gt 0 ]; then
  echo "usage: $0 [--full [PYTHON]]" >&2
  exit 2
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

shopt -s nullglob
files=(csrc/*.cu)
if [ ${#files[@]} -eq 0 ]; then
  echo "check_csrc: csrc/ has no .cu files"
else
  # The defines torch.utils.cpp_extension passes to nvcc: no implicit half/bfloat16 conversions.
  flags=(-std=c++17 -O3 -Icsrc --expt-relaxed-constexpr -Werror all-warnings
         -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
         -D__CUDA_NO_HALF2_OPERATORS__ -gencode=arch=compute_90,code=sm_90)
  for f in "${files[@]}"; do
    echo "nvcc sm_90: $f"
    nvcc "${flags[@]}" -c "$f" -o "$tmp/$(basename "$f").o"
  done
  echo "check_csrc: ${#files[@]} file(s) compiled"
fi

if [ "$full" -eq 1 ]; then
  echo "check_csrc: building peftkern._C with $python"
  PEFTKERN_BUILD_CUDA=1 "$python" setup.py -q build_ext --build-lib "$tmp/lib" --build-temp "$tmp/build"
  so=$(find "$tmp/lib" -name "_C*.so" | head -n 1)
  [ -n "$so" ] || { echo "check_csrc: no extension was built" >&2; exit 1; }
  "$python" - "$so" <<'EOF'
import importlib.util
import sys

import torch  # noqa: F401  (loads libtorch for the extension)

spec = importlib.util.spec_from_file_location("peftkern._C", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
names = sorted(n for n in dir(module) if not n.startswith("_"))
print(f"check_csrc: {sys.argv[1].rsplit('/', 1)[-1]} imports: {', '.join(names)}")
EOF
fi
