#!/usr/bin/env bash
# Everything fst checks on a GPU machine, in one go: build with the CUDA kernels, run the GPU
# tests, run the benchmark beside the anchors. All output goes to one folder (default $OUT or
# ./gpu_out); the benchmark table is printed last.
#   usage: bash scripts/gpu_check.sh [OUTDIR] [GIB]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_out}}
gib=${2:-6}
mkdir -p "$out"
py=${PYTHON:-python3}

{
  nvidia-smi || true
  $py -c "import torch; print('torch', torch.__version__, torch.version.cuda)" || true
} > "$out/machine.txt" 2>&1

echo "== build" | tee "$out/build.log"
FST_CUDA=ON $py -m pip install --no-build-isolation --no-deps . >> "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
$py -c "import fst, json; print(json.dumps(fst.runtime_info(), indent=1, default=str))" > "$out/runtime_info.json" 2>&1

echo "== gpu tests"
$py -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$out/pytest_gpu.log" | tail -15
# The GDS plan and the cuFile shim's reasons, against this machine's real libcufile and driver.
$py -m pytest -q tests/test_gds.py -p no:cacheprovider 2>&1 | tee "$out/pytest_gds.log" | tail -5

echo "== device conversion kernel against a device-to-device copy and torch's cast"
$py bench/bench_convert.py --device cuda --mib 2048 --repeats 5 2>&1 | tee "$out/convert_gpu.log"

echo "== benchmark"
data=$(mktemp -d /tmp/fst_bench.XXXX)
# The anchor comparison script lives outside the repository; bring it along as
# scripts/anchors_bench.py (ignored by git) when the machine cannot see ../shared.
bench=""
for f in ../shared/gpu/anchors_bench.py scripts/anchors_bench.py; do [ -f "$f" ] && bench=$f && break; done
if [ -n "$bench" ]; then
  $py "$bench" --dir "$data" --gib "$gib" --files 3 --out "$out" > "$out/anchors_bench.log" 2>&1
  tail -30 "$out/anchors_bench.log"
else
  echo "anchors_bench.py not found (looked in ../shared/gpu and scripts/): benchmark skipped" | tee "$out/bench.log"
fi
rm -rf "$data"
