"""Builds the optional CUDA extension `nmoe._C` when a CUDA-enabled torch and nvcc are present.

On a CPU-only machine the package installs without it and nmoe uses its torch reference ops.
"""

import glob
import os
import shutil

from setuptools import setup


def _cuda_extension():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return None
    if os.environ.get("NMOE_SKIP_CUDA_BUILD") == "1":
        return None
    if torch.version.cuda is None or (CUDA_HOME is None and shutil.which("nvcc") is None):
        return None
    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True) + glob.glob("csrc/**/*.cu", recursive=True))
    if not sources:
        return None
    include_dirs = [os.path.abspath("csrc")]
    try:
        import cutlass_library

        include_dirs.append(os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include"))
    except ImportError:
        pass
    arch = os.environ.get("NMOE_CUDA_ARCH", "90a")
    nvcc_flags = [
        "-O3",
        "-std=c++17",
        f"-gencode=arch=compute_{arch},code=sm_{arch}",
        "--expt-relaxed-constexpr",
        "--expt-extended-lambda",
        "-Xptxas=-warn-spills,-warn-lmem-usage",
        "-DNDEBUG",
    ]
    ext = CUDAExtension(
        name="nmoe._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": nvcc_flags},
        py_limited_api=True,
    )
    return ext, BuildExtension


_built = _cuda_extension()
if _built is None:
    setup()
else:
    ext, build_ext = _built
    setup(ext_modules=[ext], cmdclass={"build_ext": build_ext}, options={"bdist_wheel": {"py_limited_api": "cp310"}})
