"""benchmark_lmsys_e2e with the K-slice counts of `bench_fp8_gemm.py --split-sweep M --json PATH`
forced on the decode-sized dense GEMMs, in the same process: the step time the sweep's choice
gives, to compare with a plain run (the automatic slice counts) before the policy in
`select_dense_config_sm90` is changed.

    python benchmarks/lmsys_with_split_k.py PATH [benchmark_lmsys_e2e flags...]
"""

from __future__ import annotations

import json
import sys

import torch

from nmoe.serve import benchmark_lmsys_e2e
from nmoe.serve.ops._ext import cuda_ops_available


def main() -> int:
    if not cuda_ops_available():
        raise SystemExit("needs a CUDA device and nmoe._C")
    with open(sys.argv[1]) as f:
        splits = json.load(f)
    for shape, s in splits.items():
        n, k = (int(v) for v in shape.split(","))
        torch.ops.nmoe._fp8_split_k_override(n, k, int(s))
    print(f"forced K slices (n,k: splits): {splits}")
    return benchmark_lmsys_e2e.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
