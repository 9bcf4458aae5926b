#!/usr/bin/env bash
# GPU check of the wgmma MLA decode kernel, on the GPU machine, with nmoe._C already built from this
# tree (MAX_JOBS=16 CC=/usr/bin/gcc CXX=/usr/bin/g++ pip install -e . --no-build-isolation):
#   1. a small smoke test of the wgmma kernel (a hang or a fault shows here, under a short timeout);
#   2. the wgmma tests of tests/cuda/test_mla_decode.py (the case matrix with the kernel forced on,
#      determinism, NMOE_MLA_WGMMA selection), then the rest of the file (the default mma.sync path);
#   3. benchmarks/bench_mla.py: mma.sync and the wgmma variants side by side for H = 128, H = 16 on
#      mma.sync only, no torch baseline.
# A short table comes last: the test results and the benchmark summary. Everything stays inside
# MLA_CHECK_BUDGET seconds (default 540, under one 10-minute device command); each step gets what is
# left, so a hung kernel costs its step's timeout, not the whole call.
#
# Usage: scripts/gpu_check_mla.sh
# Env:   MLA_CHECK_BUDGET (s, default 540), MLA_BENCH_ARGS (replaces the benchmark's arguments),
#        MLA_SANITIZE=1 (also runs the smoke test under compute-sanitizer memcheck), PYTHON (python3),
#        MLA_CHECK_OUT (log folder, default /tmp/gpu_check_mla)
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
budget=${MLA_CHECK_BUDGET:-540}
out=${MLA_CHECK_OUT:-/tmp/gpu_check_mla}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset NMOE_MLA_WGMMA  # the tests pick the kernel explicitly (and set the variable where they test it)

"$py" - <<'PY' || { echo "gpu_check_mla: nmoe._C is missing or predates the wgmma kernel: build it first"; exit 1; }
import torch
import nmoe._C  # noqa: F401

schema = str(torch.ops.nmoe.mla_decode_paged.default._schema)
assert "variant" in schema, schema
print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | {schema}")
PY

source scripts/steps.sh  # step NAME LIMIT CMD..., left, results

T=tests/cuda/test_mla_decode.py
if step smoke 150 "$py" -m pytest -q -x "$T" -k wgmma_smoke; then
  [ "${MLA_SANITIZE:-0}" = 1 ] && command -v compute-sanitizer >/dev/null &&
    step sanitize 180 compute-sanitizer --tool memcheck --error-exitcode 1 \
      "$py" -m pytest -q -x "$T::test_wgmma_smoke[1]"
  step wgmma_tests 300 "$py" -m pytest -q -rf "$T" -k wgmma
  step mma_tests 200 "$py" -m pytest -q -rf "$T" -k "not wgmma"
  # shellcheck disable=SC2086
  step bench 300 "$py" benchmarks/bench_mla.py ${MLA_BENCH_ARGS:---heads 128 16 --batch 32 64 128 256 --ctx 2000 8192 32768 --variants 0 2 4 --no-baseline}
else
  echo "gpu_check_mla: the wgmma smoke test failed or hung; the rest is skipped (log: $out/smoke.log)"
fi

echo
echo "gpu_check_mla: $((SECONDS - start)) s, logs in $out"
echo "| step | result | summary |"
echo "| --- | --- | --- |"
printf '%s\n' "${results[@]}"
if [ -f "$out/bench.log" ]; then
  echo
  sed -n '/^summary:/,$p' "$out/bench.log"
fi
