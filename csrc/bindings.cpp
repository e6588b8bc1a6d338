// mlmfast._C: pybind11 bindings on raw pointers (tensor.data_ptr() as ints), no torch headers, so building
// it never needs torch. The Python side (mlmfast/ops.py) validates, allocates and passes addresses.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "mask_select.h"
#include "philox.h"
#if defined(MLMFAST_WITH_CUDA)
#include "cuda_api.h"
#endif

namespace py = pybind11;
using mlmfast::MaskSelectParams;

namespace {

void set_special_ids(MaskSelectParams& p, std::vector<int64_t> ids) {
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  if (ids.size() > static_cast<size_t>(mlmfast::kMaxSpecialIds))
    throw py::value_error("at most " + std::to_string(mlmfast::kMaxSpecialIds) + " distinct special ids");
  p.n_special = static_cast<int32_t>(ids.size());
  std::copy(ids.begin(), ids.end(), p.special_ids);
}

std::vector<int64_t> get_special_ids(const MaskSelectParams& p) {
  return std::vector<int64_t>(p.special_ids, p.special_ids + p.n_special);
}

#if !defined(MLMFAST_WITH_CUDA)
[[noreturn]] void no_cuda() {
  throw std::runtime_error("mlmfast._C was built without its CUDA part (see mlmfast._C.CUDA_SKIP_REASON); "
                           "rebuild with MLMFAST_CUDA=1 pip install --no-build-isolation -e .");
}
#else
void check(const std::string& err, const char* what) {
  if (!err.empty()) throw std::runtime_error(std::string(what) + ": " + err);
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mlmfast C++/CUDA ops: mask_select (C++ twin + CUDA kernel, bit-identical) and row gather";

  py::class_<MaskSelectParams>(m, "MaskSelectParams")
      .def(py::init<>())
#define MLM_FIELD(name) .def_readwrite(#name, &MaskSelectParams::name)
      MLM_FIELD(input_ids) MLM_FIELD(ids_size) MLM_FIELD(attention_mask) MLM_FIELD(attention_mask_size)
      MLM_FIELD(lengths) MLM_FIELD(lengths_size) MLM_FIELD(special_mask) MLM_FIELD(special_mask_size)
      MLM_FIELD(word_ids) MLM_FIELD(word_ids_size) MLM_FIELD(out_ids) MLM_FIELD(labels) MLM_FIELD(positions)
      MLM_FIELD(position_labels) MLM_FIELD(num_selected) MLM_FIELD(num_dropped) MLM_FIELD(B) MLM_FIELD(L)
      MLM_FIELD(P) MLM_FIELD(mask_token_id) MLM_FIELD(vocab_size) MLM_FIELD(n_allowed) MLM_FIELD(thr_select)
      MLM_FIELD(thr_mask) MLM_FIELD(thr_mask_random) MLM_FIELD(p_select) MLM_FIELD(exact) MLM_FIELD(seed)
      MLM_FIELD(offset) MLM_FIELD(row_offset)
#undef MLM_FIELD
      .def_property("special_ids", &get_special_ids, &set_special_ids,
                    "sorted unique special token ids (at most 64)");
  m.attr("MAX_SPECIAL_IDS") = mlmfast::kMaxSpecialIds;

  m.def("mask_select_cpu", &mlmfast::mask_select_cpu, py::arg("params"), py::call_guard<py::gil_scoped_release>(),
        "C++ twin: fill the outputs named in params (contiguous CPU tensors)");
  m.def("cpu_threads", &mlmfast::mask_select_cpu_threads, "threads the C++ twin may use (OpenMP)");

  m.def(
      "philox4x32_10",
      [](uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
        const mlmfast::Philox4 r = mlmfast::philox4x32_10(c0, c1, c2, c3, k0, k1);
        return py::make_tuple(r.w[0], r.w[1], r.w[2], r.w[3]);
      },
      "Philox4x32-10 of counter (c0..c3) and key (k0, k1): 4 uint32 words");

#if defined(MLMFAST_WITH_CUDA)
  m.attr("WITH_CUDA") = true;
  m.def(
      "mask_select_cuda",
      [](const MaskSelectParams& p, int device, uint64_t stream) {
        check(mlmfast::mask_select_cuda(p, device, stream), "mask_select CUDA launch");
      },
      py::arg("params"), py::arg("device"), py::arg("stream"));
  m.def(
      "gather_rows_cuda",
      [](uint64_t hidden, uint64_t positions, uint64_t out, int64_t B, int64_t L, int64_t P, int64_t H, int dtype,
         int pos_size, int device, uint64_t stream) {
        check(mlmfast::gather_rows_cuda(hidden, positions, out, B, L, P, H, dtype, pos_size, device, stream),
              "gather_rows CUDA launch");
      });
  m.def(
      "scatter_rows_cuda",
      [](uint64_t grad, uint64_t positions, uint64_t grad_hidden, int64_t B, int64_t L, int64_t P, int64_t H,
         int dtype, int pos_size, int device, uint64_t stream) {
        check(mlmfast::scatter_rows_cuda(grad, positions, grad_hidden, B, L, P, H, dtype, pos_size, device, stream),
              "scatter_rows CUDA launch");
      });
  m.def("cuda_device_count", &mlmfast::cuda_device_count);
  m.def("cuda_runtime_info", &mlmfast::cuda_runtime_info);
#else
  m.attr("WITH_CUDA") = false;
  m.def("mask_select_cuda", [](py::args, py::kwargs) { no_cuda(); });
  m.def("gather_rows_cuda", [](py::args, py::kwargs) { no_cuda(); });
  m.def("scatter_rows_cuda", [](py::args, py::kwargs) { no_cuda(); });
  m.def("cuda_device_count", []() { return 0; });
  m.def("cuda_runtime_info", []() { return std::string("CUDA part not compiled"); });
#endif
#if defined(MLMFAST_CUDA_SKIP_REASON)
  m.attr("CUDA_SKIP_REASON") = MLMFAST_CUDA_SKIP_REASON;
#else
  m.attr("CUDA_SKIP_REASON") = "";
#endif
#if defined(MLMFAST_CUDA_ARCHS)
  m.attr("CUDA_ARCHS") = MLMFAST_CUDA_ARCHS;
#else
  m.attr("CUDA_ARCHS") = "";
#endif
#if defined(_OPENMP)
  m.attr("WITH_OPENMP") = true;
#else
  m.attr("WITH_OPENMP") = false;
#endif
}
