// Op schemas of the hogwild_C library (torch.ops.hogwild_C.*) and their CPU implementations.
// CUDA implementations register themselves in csrc/cuda/*.cu; fake (meta) implementations for torch.compile are
// registered in Python (hogwild_vllm/ops/_ext.py). A schema marks each tensor an op mutates with `Tensor!`.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

extern "C" {
// `import hogwild_vllm._C` loads this library, which runs the TORCH_LIBRARY static initializers below. The module
// itself is empty: the ops are reached through the dispatcher (torch.ops.hogwild_C), so the library uses only the
// stable Python ABI.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(hogwild_C, m) {
  // In place: rotates the first rotary_dim dims of every head of x[t] by delta[t] positions (see ops.h).
  m.def("rotate_by_delta(Tensor! x, Tensor delta, Tensor cos_sin_table, int rotary_dim, bool is_neox) -> ()");
  // Writes out (and lse when given): position-delta attention of every query token over its view (see ops.h).
  // packing: 0 = strided [num_blocks, block_size, Hkv, D] caches, 1 = vLLM's amx pages (CPU only).
  m.def(
      "hogwild_attention(Tensor(a!) out, Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
      "Tensor segments, Tensor view_offsets, Tensor query_view, Tensor query_pos, Tensor cos_sin_table, "
      "int rotary_dim, bool is_neox, float scale, Tensor(b!)? lse, int packing=0) -> ()");
  // Whether the CPU op multiplies bf16 amx pages with AMX tiles in this process (see ops.h). No tensor argument,
  // so one kernel for every dispatch key.
  m.def("cpu_amx_tiles() -> bool", &hogwild_cpu_amx_tiles);
}

TORCH_LIBRARY_IMPL(hogwild_C, CPU, m) {
  m.impl("rotate_by_delta", &rotate_by_delta_cpu);
  m.impl("hogwild_attention", &hogwild_attention_cpu);
}
