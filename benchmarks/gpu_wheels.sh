#!/usr/bin/env bash
# Wheels that benchmarks/gpu_suite.py needs on a bare GPU machine that has no package registry (`make
# gpu-wheels` calls this). The H200 machine lent here has Python 3.12, torch 2.11 (CUDA 13), transformers,
# tokenizers, safetensors 0.8, huggingface-hub 1.33, numpy, einops, regex, requests, filelock, pillow and
# tqdm; it lacks the three below: about 7 MB of wheels for CPython 3.12 on x86-64 Linux, fetched with
# --no-deps (each one's needs were checked against that machine's packages by hand, here):
#   diffusers  the comparisons (WanTransformer3DModel, AutoencoderKLWan, WanPipeline). Its requirements:
#              filelock, huggingface-hub>=1.32, numpy, regex, requests, safetensors>=0.8, Pillow (all there)
#              and importlib_metadata, which it imports only on Python < 3.8 (not needed);
#   ftfy       wan/text_encoder.py imports it (clean_text), so wan.pipeline needs it;
#   wcwidth    ftfy's only requirement.
# The versions are the ones the test suite runs here (pyproject's ranges). Usage:
#   benchmarks/gpu_wheels.sh [DIR] [--dry-run]     (DIR default run/gpu-wheels; --dry-run prints the commands)
set -euo pipefail

WHEELS=(diffusers==0.42.1 ftfy==6.3.1 wcwidth==0.9.4)

dir=run/gpu-wheels
dry=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry=1 ;;
    -*) echo "unknown option $arg" >&2; exit 2 ;;
    *) dir=$arg ;;
  esac
done
python=${PYTHON:-.venv/bin/python}
[ -x "$python" ] || python=python3

flags=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
       --platform any -d "$dir")
mkdir -p "$dir"
for wheel in "${WHEELS[@]}"; do
  name=${wheel%%==*}
  # one version of each: an older one left here would stop the install there
  find "$dir" -maxdepth 1 -iname "${name//-/_}-*.whl" ! -iname "${name//-/_}-${wheel##*==}-*.whl" -delete
  if [ "$dry" = 1 ]; then
    echo "$python -m pip download ${flags[*]} $wheel"
  else
    "$python" -m pip download --quiet "${flags[@]}" "$wheel"
  fi
done
if [ "$dry" = 0 ]; then
  ls -l "$dir"/*.whl
  du -ch "$dir"/*.whl | tail -1
fi
