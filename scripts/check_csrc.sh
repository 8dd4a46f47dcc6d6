#!/usr/bin/env bash
# Compile every csrc/*.cu for sm_90 with nvcc, torch-free (the .cu files include nothing from torch), so a
# CUDA typo fails CI on a machine without a GPU. csrc/bindings.cpp (the torch glue) is built by setup.py.
set -euo pipefail
cd "$(dirname "$0")/.."
shopt -s nullglob
files=(csrc/*.cu)
if [ ${#files[@]} -eq 0 ]; then
  echo "check_csrc: csrc/ has no .cu files"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for f in "${files[@]}"; do
  echo "nvcc sm_90: $f"
  nvcc -std=c++17 -O2 -gencode=arch=compute_90,code=sm_90 -Icsrc -c "$f" -o "$tmp/$(basename "$f").o"
done
echo "check_csrc: ${#files[@]} file(s) compiled"
