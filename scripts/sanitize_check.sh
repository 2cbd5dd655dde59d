#!/usr/bin/env bash
# The test suite against a build of fst with AddressSanitizer and UndefinedBehaviorSanitizer
# (gcc or clang), fuzzing included: memory errors and undefined behaviour in the C++ core show
# up as a failing run instead of silent corruption. The fake CUDA driver tests
# (tests/test_fake_driver.py) run too, with the fake itself built with the same sanitizers, so
# the driver-facing code (staging pool, sinks, frees, kernels compiled for the host) is checked
# in the child processes that load it.
#   usage: PYTHON=/path/to/venv/bin/python bash scripts/sanitize_check.sh [FUZZ_EXAMPLES]
# PYTHON must be a virtual environment with the test dependencies (README) plus
# scikit-build-core and pybind11, and without an editable install of fst in its path: fst is
# installed into it.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:?set PYTHON to a virtual environment python}
examples=${1:-2000}
flags="-fsanitize=address,undefined -fno-omit-frame-pointer -g"
FST_CUDA=${FST_CUDA:-AUTO} "$py" -m pip install -q --no-deps --no-build-isolation . \
  -Cbuild-dir=build/sanitize "-Ccmake.define.CMAKE_CXX_FLAGS=$flags" \
  "-Ccmake.define.CMAKE_SHARED_LINKER_FLAGS=-fsanitize=address,undefined" \
  -Ccmake.define.CMAKE_BUILD_TYPE=RelWithDebInfo
cc=${CC:-gcc}
preload="$($cc -print-file-name=libasan.so):$($cc -print-file-name=libubsan.so)"
# Reports go to files (pytest captures stderr, and a sanitizer that stops the process takes
# the captured output with it), printed at the end.
report="$PWD/build/sanitize/report"
rm -f "$report".*
# Leak checking is off (the interpreter itself keeps memory at exit), and the test that bounds
# memory growth over hundreds of loads is left out: the quarantine holds freed memory on purpose.
status=0
LD_PRELOAD=$preload ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:log_path=$report \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:log_path=$report FST_FUZZ_EXAMPLES=$examples \
  FST_FAKE_CUDA_CFLAGS="$flags" \
  "$py" -m pytest -q -p no:cacheprovider tests -k "not test_200_loads_leak_nothing" || status=$?
if compgen -G "$report.*" > /dev/null; then
  cat "$report".*
  status=1
fi
exit $status
