// The Python module nmoe._C. It holds no Python functions: importing it loads the shared library,
// whose static initialisers register every op family (TORCH_LIBRARY_FRAGMENT(nmoe, ...)) under
// torch.ops.nmoe. Built against the limited API (abi3), so one .so serves Python 3.10 and later.
#ifndef Py_LIMITED_API
#define Py_LIMITED_API 0x030A0000
#endif
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "nmoe CUDA kernels (ops under torch.ops.nmoe)", -1,
                               nullptr};
  return PyModule_Create(&module);
}
