// fpt_fast native extension: op schemas (namespace fpt_fast_native) and the CPU kernel registrations.
//
// The library is an ordinary shared object: loading it (import fpt_fast.ops._C when built ahead of time,
// or torch.ops.load_library after a JIT build) runs these static registrations, and the ops are then
// torch.ops.fpt_fast_native.*, dispatched by device. The CUDA kernels register themselves from the .cu
// file when it is part of the build. No autograd kernels or fake implementations here:
// fpt_fast/ops/native_backend.py registers them from Python once the library is loaded (the backward of
// prompt_attention is prompt_attention_backward).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <mutex>
#include <set>
#include <string>
#include <thread>

#include "cpu_math.h"
#include "fpt_native.h"

namespace {
// Which vector path the CPU kernels picked (cpu_math.cpp): for fpt_fast.ops.native_backend and the tests.
std::string cpu_isa() { return fpt_native::cpu::math().isa; }

// How many distinct threads ran the chunks of an at::parallel_for over `items` items of grain 1: the
// check that this build runs the kernels' loops in parallel (with OpenMP, the chunk split is fixed
// by the thread count, so the answer does not depend on how busy the machine is; without -fopenmp
// torch's inline OpenMP loop runs serially and the answer is 1).
int64_t parallel_for_threads(int64_t items) {
  std::mutex mutex;
  std::set<std::thread::id> seen;
  at::parallel_for(0, items, 1, [&](int64_t, int64_t) {
    std::lock_guard<std::mutex> guard(mutex);
    seen.insert(std::this_thread::get_id());
  });
  return static_cast<int64_t>(seen.size());
}
}  // namespace

TORCH_LIBRARY(fpt_fast_native, m) {
  m.def("token_importance(Tensor q, Tensor k, Tensor? lse, bool class_token) -> Tensor");
  m.def("attention_with_importance(Tensor q, Tensor k, Tensor v, bool class_token) -> (Tensor, Tensor)");
  m.def("select_tokens(Tensor scores, Tensor k, Tensor v, int n, ScalarType? out_dtype) -> (Tensor, Tensor)");
  m.def("select_tokens_with_indices(Tensor scores, Tensor k, Tensor v, int n, ScalarType? out_dtype) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("prompt_attention(Tensor q, Tensor k, Tensor v) -> (Tensor, Tensor)");
  m.def("prompt_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor lse, "
        "bool need_kv_grad) -> (Tensor, Tensor, Tensor)");
  m.def("cpu_isa() -> str", &cpu_isa);
  m.def("parallel_for_threads(int items) -> int", &parallel_for_threads);
}

TORCH_LIBRARY_IMPL(fpt_fast_native, CPU, m) {
  m.impl("token_importance", &fpt_native::token_importance_cpu);
  m.impl("attention_with_importance", &fpt_native::attention_with_importance_cpu);
  m.impl("select_tokens", &fpt_native::select_op<&fpt_native::select_tokens_cpu>);
  m.impl("select_tokens_with_indices", &fpt_native::select_with_indices_op<&fpt_native::select_tokens_cpu>);
  m.impl("prompt_attention", &fpt_native::prompt_attention_cpu);
  m.impl("prompt_attention_backward", &fpt_native::prompt_attention_backward_cpu);
}

// Ahead-of-time builds install this library as the Python module fpt_fast._C: importing it only has to
// load the shared object, so the module itself is empty (no pybind11 needed).
#ifdef FPT_FAST_PYTHON_MODULE
#include <Python.h>
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fpt_fast native ops (torch.ops.fpt_fast_native)",
                                      -1, nullptr};
  return PyModule_Create(&module);
}
#endif
