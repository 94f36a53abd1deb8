#pragma once
// backend::Cpu — the Backend slot's default: tensors in host memory, GEMMs through OpenBLAS and
// OpenMP loops (backend/cpu/gemm.hpp, parallel.hpp).
namespace mopt::backend {

struct Cpu {
    static constexpr const char* name = "Cpu";
    static constexpr bool is_cuda = false;
};

}  // namespace mopt::backend
