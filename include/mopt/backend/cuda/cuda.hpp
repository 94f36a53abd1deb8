#pragma once
// backend::Cuda — the Backend slot's GPU choice: nn::Transformer<…, backend::Cuda> runs its forward
// and the prompt's backward on the GPU (backend/cuda/transformer.cuh, compiled by nvcc in a .cu
// file) with everything else — loading, compression, the prompt's parameters, the tape's loss,
// optimizers, checkpoints — shared with backend::Cpu. This header names the tags only, so g++ code
// can spell the types; the model itself needs transformer.cuh.
//
//   backend::Cuda       weights and activations stored in f32, f32 GEMMs: the CPU's numbers (1e-4)
//   backend::CudaBf16   stored in bf16 (f32 accumulation, f32 prompt and statistics): half the memory
#include "mopt/tensor/dtype.hpp"

namespace mopt::backend {

template <DType Storage>
struct CudaBackend {
    static_assert(Storage == DType::f32 || Storage == DType::bf16, "backend::CudaBackend stores f32 or bf16");
    static constexpr const char* name = Storage == DType::f32 ? "Cuda" : "CudaBf16";
    static constexpr bool is_cuda = true;
    static constexpr DType storage = Storage;
};

using Cuda = CudaBackend<DType::f32>;
using CudaBf16 = CudaBackend<DType::bf16>;

}  // namespace mopt::backend
