#pragma once
// compress::None — the Compression slot's default: weights stay dense f32 and every Linear is a
// plain GEMM. The compression issue adds pruning and quantisation policies beside it.
namespace mopt::compress {

struct None {
    static constexpr const char* name = "None";
    static constexpr bool compresses = false;
};

}  // namespace mopt::compress
