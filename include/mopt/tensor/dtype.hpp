#pragma once
// Element types. f32 is what every op computes in today; bf16/f16 are storage types for
// checkpoints and the CUDA backend; q8/q4 are packed quantised weights (int8: one byte a weight,
// int4: two weights a byte) whose scales live beside them in the compression policies.
#include <cstddef>
#include <cstdint>
#include <string_view>

namespace mopt {

enum class DType : std::uint8_t { f32, bf16, f16, i32, q8, q4 };

constexpr std::string_view name(DType t) {
    switch (t) {
        case DType::f32: return "f32";
        case DType::bf16: return "bf16";
        case DType::f16: return "f16";
        case DType::i32: return "i32";
        case DType::q8: return "q8";
        case DType::q4: return "q4";
    }
    return "?";
}

// Bytes needed to hold `numel` elements of type `t` (q4 packs two a byte, rounded up).
constexpr std::size_t storage_bytes(DType t, std::size_t numel) {
    switch (t) {
        case DType::f32:
        case DType::i32: return numel * 4;
        case DType::bf16:
        case DType::f16: return numel * 2;
        case DType::q8: return numel;
        case DType::q4: return (numel + 1) / 2;
    }
    return 0;
}

template <class T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::f32; }
template <> constexpr DType dtype_of<std::int32_t>() { return DType::i32; }

}  // namespace mopt
