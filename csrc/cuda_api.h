// Host entry points of the CUDA part (compiled by nvcc; declared without CUDA types so that bindings.cpp
// builds with the plain C++ compiler). Each returns "" on success, else the CUDA error string. They only
// enqueue work on `stream` (a cudaStream_t given as an integer): no allocation, no synchronisation.
#pragma once

#include <cstdint>
#include <string>

#include "mask_select.h"

namespace mlmfast {

// One block per row; one launch.
std::string mask_select_cuda(const MaskSelectParams& p, int device, uint64_t stream);

// dtype: 0 = float32, 1 = float16, 2 = bfloat16. pos_size: 4 (int32) or 8 (int64) bytes.
// out[b * P + j, :] = hidden[b, positions[b, j], :]   (a position outside [0, L) gives a zero row)
std::string gather_rows_cuda(uint64_t hidden, uint64_t positions, uint64_t out, int64_t B, int64_t L,
                             int64_t P, int64_t H, int dtype, int pos_size, int device, uint64_t stream);

// grad_hidden[b, l, :] = sum over j with positions[b, j] == l of grad[b * P + j, :], summed in float32 in
// ascending j and rounded once (deterministic); rows no position points to are zero. A memset + one launch.
std::string scatter_rows_cuda(uint64_t grad, uint64_t positions, uint64_t grad_hidden, int64_t B, int64_t L,
                              int64_t P, int64_t H, int dtype, int pos_size, int device, uint64_t stream);

int cuda_device_count();      // 0 when there is no driver or no device
std::string cuda_runtime_info();  // "CUDA runtime X.Y, driver X.Y" or the error

}  // namespace mlmfast
