#!/usr/bin/env bash
# One device call's worth of checks on a fresh GPU machine: installs the CUTLASS headers from the
# wheel carried in .whl/ (the machine reaches no package index), builds nmoe._C with the system gcc
# (docs/kernels.md, "Building on the GPU machine"), runs the GPU tests, then the decode step at the
# seed's point (one rank of EP8, full depth) - or an A/B of NMOE_* settings. A short table comes last.
#
# Here, once per checkout (.whl/ is git-ignored), then `run` the script with carry [".whl"]:
#   python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl 'nvidia-cutlass>=4.2'
#
# Usage: scripts/gpu_session.sh [TEST_PATH ...]   (default: tests/cuda tests/test_benchmarks.py)
# Env:   GPU_SESSION_BUDGET (s, default 540, under one 10-minute device command; each step gets what
#        is left), GPU_SESSION_AB (settings for benchmarks/ab_env.py separated by "|", e.g.
#        "|NMOE_MLA_LAZY=0": one round each instead of the plain decode run), GPU_SESSION_DECODE=0
#        (no decode step at all), GPU_SESSION_SEED=1 (instead of the decode step, the seed's three
#        benchmarks at the points of issue 9's targets: prefill at 16384 tokens a step with the
#        decode step, mixed load at a 128-token prefill cap, the 128k long-context smoke; 330 s
#        with the build on the H200, so pass a short test list), OUT (log folder: the device
#        call's returned folder; else /tmp/gpu_session).
set -uo pipefail
cd "$(dirname "$0")/.."
budget=${GPU_SESSION_BUDGET:-540}
out=${OUT:-/tmp/gpu_session}
mkdir -p "$out"
source scripts/steps.sh  # step NAME LIMIT CMD..., left, results

site=/tmp/gpu_session_site
if ! python3 -c "import cutlass_library" 2>/dev/null; then
  compgen -G ".whl/nvidia_cutlass-*.whl" >/dev/null || { echo "gpu_session: no .whl/nvidia_cutlass-*.whl (see the header)"; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/nvidia_cutlass-*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

# The extension's inputs: the sources, the build files and the toolchain (a stale nmoe/_C*.so is
# never reused). A build leaves nmoe/_C*.so.gz (a device call returns files of 16 MiB at most) and
# nmoe/_C.stamp in $OUT; copied into the checkout here and carried along with .whl (carry [".whl",
# "nmoe/<the .so.gz>", "nmoe/_C.stamp"]), the next call skips the 80-90 s build while the stamp
# still matches.
stamp=$( { find csrc -type f | sort | xargs sha256sum; sha256sum setup.py pyproject.toml;
           python3 -c "import torch; print(torch.__version__, torch.version.cuda)"; nvcc --version | tail -1; } |
         sha256sum | cut -d' ' -f1)
gz=$(compgen -G "nmoe/_C*.so.gz" | head -1)
[ -n "$gz" ] && gunzip -kf "$gz"
so=$(compgen -G "nmoe/_C*.so" | head -1)
built=0
if [ -n "$so" ] && [ "$(cat nmoe/_C.stamp 2>/dev/null)" = "$stamp" ]; then
  results+=("| build | reused $so (its stamp matches the sources) | |")
  built=1
# the system gcc: the image's default compiler builds an extension whose error messages segfault
elif step build 300 env CC=/usr/bin/gcc CXX=/usr/bin/g++ MAX_JOBS="$(nproc)" \
    python3 -m pip install -q -e . --no-build-isolation --no-deps; then
  echo "$stamp" >nmoe/_C.stamp
  so=$(compgen -G "nmoe/_C*.so" | head -1)
  [ -n "$so" ] && gzip -1 -c "$so" >"$out/$(basename "$so").gz" && cp nmoe/_C.stamp "$out"/
  built=1
fi
if [ "$built" = 1 ]; then
  tests=("$@")
  [ ${#tests[@]} -gt 0 ] || tests=(tests/cuda tests/test_benchmarks.py)
  step tests 300 python3 -m pytest -q -rf "${tests[@]}"
  sim=(--device cuda --random-weights --simulate-world-size 8)  # one rank of EP8 on this GPU
  decode=("${sim[@]}" --prefill-requests 1 --prefill-lens 1024 --decode-tokens 40)
  if [ -n "${GPU_SESSION_AB:-}" ]; then
    IFS='|' read -r -a settings <<<"$GPU_SESSION_AB"
    ab=()
    for s in "${settings[@]}"; do ab+=(--set "$s"); done
    step ab 300 python3 benchmarks/ab_env.py --rounds 1 "${ab[@]}" -- "${decode[@]}"
  elif [ "${GPU_SESSION_SEED:-0}" = 1 ]; then
    step lmsys 180 python3 -m nmoe.serve.benchmark_lmsys_e2e "${sim[@]}" --prefill-requests 4 --prefill-lens 4096 \
      --max-prefill-tokens 16384 --chunk-size 4096 --decode-tokens 40
    step mixed 150 python3 -m nmoe.serve.benchmark_mixed_latency "${sim[@]}" --concurrency 32 --prompt-len 512 \
      --output-len 32 --duration 8 --backlog 2 --backlog-prompt-len 4096 --baseline-steps 10 --mixed-prefill-tokens 128
    step long 300 python3 -m nmoe.serve.benchmark_long_context_smoke "${sim[@]}" --prompt-len 131072 \
      --chunk-size 2048 --output-len 16
  elif [ "${GPU_SESSION_DECODE:-1}" != 0 ]; then
    step decode 120 python3 -m nmoe.serve.benchmark_lmsys_e2e "${decode[@]}"
  fi
fi

echo
echo "gpu_session: $((SECONDS - start)) s, logs in $out"
echo "| step | result | summary |"
echo "| --- | --- | --- |"
printf '%s\n' "${results[@]}"
if [ -f "$out/decode.log" ]; then
  tail -1 "$out/decode.log" | python3 -c "import json, sys; d = json.loads(sys.stdin.read()); \
print({k: round(d[k], 3) for k in ('decode_step_ms', 'decode_step_p99_ms', 'decode_floor_ms', 'decode_floor_ratio')})" || true
fi
[ -f "$out/ab.log" ] && tail -1 "$out/ab.log"
for name in lmsys mixed long; do  # the last line of each is its JSON figures
  [ -f "$out/$name.log" ] && echo "$name: $(tail -1 "$out/$name.log" | cut -c1-1500)"
done
exit 0
