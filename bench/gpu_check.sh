#!/usr/bin/env bash
# The prepared GPU run: build, test, measure — one script, under 8 minutes.
#
#   bench/gpu_check.sh OUTDIR             on the GPU machine (one H200, CUDA 13, Python 3.12)
#   bench/gpu_check.sh --rehearse OUTDIR  anywhere: same steps, GPU tests skip, bench emulated
#
# On the GPU machine there is no package registry. Everything fastface needs is
# already in its Python (/opt/torch/.venv/bin/python3: CuPy, Numba + numba-cuda,
# PyTorch, CMake, ninja, pybind11, pytest, ...) except FAISS's CPU wheel, which
# travels in .whl/ (gitignored). Fetch it once, on a machine with a registry:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl faiss-cpu==1.15.1
#
# (its own needs, numpy and packaging, are on the machine). Writes to OUTDIR:
# log (everything printed), build.log, pytest.xml, gpu-quick.json (or
# gpu-emulate.json when rehearsing) and status.json (each step's exit code and seconds).
set -uo pipefail
cd "$(dirname "$0")/.."

REHEARSE=0
if [[ "${1:-}" == "--rehearse" ]]; then REHEARSE=1; shift; fi
OUT="${1:?usage: bench/gpu_check.sh [--rehearse] OUTDIR}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
exec > >(tee "$OUT/log") 2>&1

if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x /opt/torch/.venv/bin/python3 ]]; then PY=/opt/torch/.venv/bin/python3
else PY="$(command -v python3)"; fi
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
START=$(date +%s)
declare -A RC SECS

step() {  # step NAME TIMEOUT_S CMD...: run with a time limit, record exit code and seconds
  local name=$1 limit=$2; shift 2
  local t0; t0=$(date +%s)
  echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)"
  timeout --signal=TERM --kill-after=10 "$limit" "$@"
  RC[$name]=$?
  SECS[$name]=$(( $(date +%s) - t0 ))
  echo "=== $name: exit ${RC[$name]} after ${SECS[$name]}s"
}

write_status() {
  {
    echo "{"
    echo "  \"rehearse\": $REHEARSE, \"python\": \"$PY\", \"total_s\": $(( $(date +%s) - START )),"
    local first=1
    for k in "${!RC[@]}"; do
      [[ $first == 1 ]] || echo ","
      first=0
      printf '  "%s": {"rc": %s, "seconds": %s}' "$k" "${RC[$k]}" "${SECS[$k]}"
    done
    echo ""
    echo "}"
  } > "$OUT/status.json"
}
trap write_status EXIT

echo "python: $PY ($("$PY" --version 2>&1)); rehearse=$REHEARSE; git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
command -v nvcc >/dev/null && nvcc --version | tail -2

# 1. wheels that the machine lacks (FAISS's CPU wheel), into a private site folder
SITE=/tmp/fastface-site
if compgen -G ".whl/*.whl" > /dev/null && ! "$PY" -c "import faiss" 2>/dev/null; then
  step wheels 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import faiss, numpy; print('faiss', faiss.__version__, 'numpy', numpy.__version__)" \
  || { echo "FAISS missing: put the faiss-cpu wheel in .whl/ (see the top of this script)"; exit 2; }

# 2. build the extension in place (CPU module, CUDA module, emulation), no pip
BUILD="build/gpu-check-$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
PB_DIR="$("$PY" -c 'import pybind11; print(pybind11.get_cmake_dir())')"
GEN=(); command -v ninja >/dev/null && GEN=(-GNinja)
step configure 120 cmake -S . -B "$BUILD" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="$PY" -Dpybind11_DIR="$PB_DIR" \
  -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$PWD/src/fastface/"
step build 240 bash -c "cmake --build '$BUILD' --parallel $(nproc) > '$OUT/build.log' 2>&1; rc=\$?; tail -5 '$OUT/build.log'; exit \$rc"
[[ ${RC[build]} == 0 ]] || { echo "build failed: see build.log"; exit 3; }
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import fastface, json; print(json.dumps(fastface.build_info(), indent=1))"

# 3. tests: the GPU tests, the emulation twins and the Numba simulator test
#    (DeprecationWarnings of the machine's packages are shown, not errors, in this run only)
step tests 200 "$PY" -m pytest -q -p no:cacheprovider -W "default::DeprecationWarning" \
  --junitxml="$OUT/pytest.xml" tests/test_gpu.py tests/test_gpu_emulate.py tests/test_gpu_numba_sim.py

# 4. the benchmark
if [[ $REHEARSE == 1 ]]; then
  step bench 240 "$PY" bench/gpu.py --emulate --out "$OUT"
else
  step bench 330 "$PY" bench/gpu.py --quick --out "$OUT"
fi
echo "total $(( $(date +%s) - START ))s"
