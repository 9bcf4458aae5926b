#!/usr/bin/env bash
# Compiles every csrc translation unit (*.cpp, *.cu) for sm_90a with nvcc - no GPU needed - and keeps
# the objects in OUTDIR. Then, where cuobjdump is found (PATH, or the nvidia-cuda-cuobjdump wheel's
# nvidia/cu13/bin), checks that every GEMM object (a source named *gemm*) holds FP8 wgmma (QGMMA)
# and no local-memory traffic (LDL/STL); other objects with local memory are reported.
#
# Usage: scripts/cuda_compile_check.sh [OUTDIR [SOURCE...]]   (default build/cuda_compile_check, every source)
# Env:   NMOE_CUDA_ARCH (default 90a), JOBS (parallel compiles, default nproc)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-build/cuda_compile_check}
arch=${NMOE_CUDA_ARCH:-90a}
jobs=${JOBS:-$(nproc)}
start=$(date +%s)
mkdir -p "$out"

command -v nvcc >/dev/null || { echo "cuda_compile_check: nvcc not on PATH" >&2; exit 1; }
py_include() {
  python3 - <<'PY'
import os, sysconfig
import torch.utils.cpp_extension as ext
dirs = list(ext.include_paths()) + [sysconfig.get_paths()["include"]]
try:
    import cutlass_library
    dirs.append(os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include"))
except ImportError:
    pass
print(" ".join("-I" + d for d in dirs))
PY
}
includes="-Icsrc $(py_include)"
# The flags setup.py passes, plus those torch's BuildExtension adds to every nvcc call. A CPU torch
# wheel lacks the generated c10/cuda/impl/cuda_cmake_macros.h (it only matters on Windows): skip it.
flags="-O3 -std=c++17 -gencode=arch=compute_${arch},code=sm_${arch} --expt-relaxed-constexpr \
--expt-extended-lambda -Xptxas=-warn-spills,-warn-lmem-usage -DNDEBUG -Xcompiler=-fPIC \
-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
-D__CUDA_NO_HALF2_OPERATORS__ -DTORCH_EXTENSION_NAME=_C -D_GLIBCXX_USE_CXX11_ABI=1 -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"

if [ $# -gt 1 ]; then
  sources=("${@:2}")
else
  mapfile -t sources < <(find csrc -name '*.cpp' -o -name '*.cu' | sort)
fi
[ ${#sources[@]} -gt 0 ] || { echo "cuda_compile_check: no sources under csrc/" >&2; exit 1; }
export out flags includes
compile_one() {
  src=$1
  obj="$out/$(echo "${src#csrc/}" | tr '/' '_').o"
  t0=$(date +%s)
  if nice -n 10 nvcc $flags $includes -c "$src" -o "$obj" >"$obj.log" 2>&1; then
    echo "ok   $(( $(date +%s) - t0 ))s  $src"
  else
    echo "FAIL $src"; cat "$obj.log"; return 1
  fi
  # ptxas's notices, except the injected warpgroup.arrive fences (C7519: one after each mbarrier
  # spin before a wgmma, expected and cheap), which are only counted
  if grep -q "ptxas" "$obj.log"; then
    grep -v "C7519" "$obj.log" | sed 's/^/     /' || true
    arrives=$(grep -c "C7519" "$obj.log" || true)
    if [ "$arrives" -gt 0 ]; then echo "     ptxas: $arrives injected warpgroup.arrive (C7519)"; fi
  fi
}
export -f compile_one
printf '%s\n' "${sources[@]}" | xargs -P "$jobs" -I{} bash -c 'compile_one "$@"' _ {}

cuobjdump=$(command -v cuobjdump || python3 -c \
  "import nvidia, os; p=os.path.join(list(nvidia.__path__)[0], 'cu13', 'bin', 'cuobjdump'); print(p if os.path.exists(p) else '')" \
  2>/dev/null || true)
status=0
if [ -z "$cuobjdump" ]; then
  echo "cuobjdump not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm): SASS checks skipped"
else
  export PATH="$(dirname "$cuobjdump"):$PATH"
  for src in "${sources[@]}"; do
    case "$src" in *.cu) ;; *) continue ;; esac
    obj="$out/$(echo "${src#csrc/}" | tr '/' '_').o"
    "$cuobjdump" --dump-sass "$obj" >"$obj.sass"
    qgmma=$(grep -c 'QGMMA' "$obj.sass" || true)
    lmem=$(grep -cE '\b(LDL|STL)(\.|\s)' "$obj.sass" || true)
    case "$(basename "$src")" in
      *gemm*)
        if [ "$qgmma" -eq 0 ] || [ "$lmem" -ne 0 ]; then
          echo "SASS FAIL $src: QGMMA=$qgmma LDL/STL=$lmem"; status=1
        else
          echo "SASS ok   $src: QGMMA=$qgmma LDL/STL=0"
        fi ;;
      *) [ "$lmem" -eq 0 ] || echo "SASS note $src: LDL/STL=$lmem (local memory)" ;;
    esac
  done
fi
echo "cuda_compile_check: ${#sources[@]} translation units -> $out in $(( $(date +%s) - start )) s"
exit $status
