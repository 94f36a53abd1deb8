#pragma once
// The feed-forward activations on the GPU, forward and backward, matching
// mopt/autodiff/ops/activation.hpp:
//   relu(x)  = max(x, 0)                          relu'  = [x > 0]
//   gelu(x)  = ½x(1 + tanh(k0(x + k1x³)))         gelu'  = ½(1 + t) + ½x(1 − t²)·k0(1 + 3k1x²)
//              (Hendrycks & Gimpel, tanh form; k0 = √(2/π), k1 = 0.044715; the backward clips x to
//              [−10, 10], where tanh is ±1 in f32, so x³ cannot overflow into 0·inf)
//   silu(x)  = x / (1 + e^−x)                     silu'  = σ(x)(1 + x(1 − σ(x)))
//   swiglu(g, u) = silu(g) ⊙ u (Shazeer 2020)     d_gate = dy·u·silu'(g), d_up = dy·silu(g)
// Element-wise and memory-bound: one grid-stride pass, nothing saved (the backward recomputes σ or
// tanh from the input). SwiGLU is fused: one kernel reads gate and up (and dy) once and writes
// both gradients. The packed variants read gate and up from one [rows, 2·width] array, the output
// of a single GEMM against the stacked [Wgate; Wup], and write the gradients in the same packing.
// SwiGLU moves 16 bytes per access where alignment and sizes allow (bf16: 8 values).
//
// x, y, dy, dx, gate, up: f32 or bf16 (math in f32). Outputs are overwritten; an output may alias
// an input of the same index (y = x, dx = dy).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "mopt/backend/cuda/common.cuh"

namespace mopt::backend::cuda {

enum class Activation { relu, gelu, silu };

namespace activation_detail {

inline constexpr float gelu_k0 = 0.7978845608028654f;
inline constexpr float gelu_k1 = 0.044715f;

__device__ inline float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

template <Activation F>
__device__ inline float forward(float x) {
    if constexpr (F == Activation::relu) return fmaxf(x, 0.0f);
    else if constexpr (F == Activation::gelu) return 0.5f * x * (1.0f + tanhf(gelu_k0 * (x + gelu_k1 * x * x * x)));
    else return x / (1.0f + expf(-x));  // −∞ gives a clean −0, never inf·0
}

// d f / dx at x.
template <Activation F>
__device__ inline float derivative(float x) {
    if constexpr (F == Activation::relu) {
        return x > 0.0f ? 1.0f : 0.0f;
    } else if constexpr (F == Activation::gelu) {
        const float xc = fminf(fmaxf(x, -10.0f), 10.0f);
        const float t = tanhf(gelu_k0 * (xc + gelu_k1 * xc * xc * xc));
        return 0.5f * (1.0f + t) + 0.5f * xc * (1.0f - t * t) * gelu_k0 * (1.0f + 3.0f * gelu_k1 * xc * xc);
    } else {
        const float s = sigmoid(x);
        return s * (1.0f + x * (1.0f - s));
    }
}

#define MOPT_CUDA_GRID_STRIDE(i, n)                                                                        \
    for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < (n); \
         i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)

template <Activation F, class T>
__global__ void forward_kernel(const T* x, T* y, std::int64_t n) {
    MOPT_CUDA_GRID_STRIDE(i, n) y[i] = from_f32<T>(forward<F>(to_f32(x[i])));
}

template <Activation F, class T>
__global__ void backward_kernel(const T* x, const T* dy, T* dx, std::int64_t n) {
    // relu' is 0 or 1: select dy rather than multiply, so a NaN/inf dy at x <= 0 gives 0 as on the CPU.
    MOPT_CUDA_GRID_STRIDE(i, n) {
        const float xi = to_f32(x[i]), g = to_f32(dy[i]);
        dx[i] = from_f32<T>(F == Activation::relu ? (xi > 0.0f ? g : 0.0f) : g * derivative<F>(xi));
    }
}

// SwiGLU over n values, V at a time. Element i of gate/up lives at i (separate arrays) or, Packed,
// in row i / width of a [rows, 2·width] array whose first half is gate and second half up
// (up = gate + width); y and dy are dense. V divides width (and n).
// rows_used (device, may be null): only rows below *rows_used are computed (Packed only).
template <bool Packed, int V, class T>
__global__ void swiglu_forward_kernel(const T* gate, const T* up, T* y, std::int64_t n, std::int64_t width,
                                      const std::int32_t* rows_used) {
    // (a ternary, not std::min: that is a host function unless nvcc runs with --expt-relaxed-constexpr)
    const std::int64_t used = rows_used ? *rows_used * width : n;
    const std::int64_t units = (used < n ? used : n) / V, width_units = width / V;
    MOPT_CUDA_GRID_STRIDE(u, units) {
        const std::int64_t i = u * V;
        const std::int64_t j = Packed ? (u / width_units) * 2 * width + (u % width_units) * V : i;
        float g[V], up_v[V], out[V];
        load_values<V>(gate + j, g);
        load_values<V>(up + j, up_v);
#pragma unroll
        for (int k = 0; k < V; ++k) out[k] = g[k] / (1.0f + expf(-g[k])) * up_v[k];
        store_values<V>(y + i, out);
    }
}

template <bool Packed, int V, class T>
__global__ void swiglu_backward_kernel(const T* gate, const T* up, const T* dy, T* d_gate, T* d_up, std::int64_t n,
                                       std::int64_t width, const std::int32_t* rows_used) {
    // (a ternary, not std::min: that is a host function unless nvcc runs with --expt-relaxed-constexpr)
    const std::int64_t used = rows_used ? *rows_used * width : n;
    const std::int64_t units = (used < n ? used : n) / V, width_units = width / V;
    MOPT_CUDA_GRID_STRIDE(u, units) {
        const std::int64_t i = u * V;
        const std::int64_t j = Packed ? (u / width_units) * 2 * width + (u % width_units) * V : i;
        float g[V], up_v[V], d[V], dg[V], du[V];
        load_values<V>(gate + j, g);
        load_values<V>(up + j, up_v);
        load_values<V>(dy + i, d);
#pragma unroll
        for (int k = 0; k < V; ++k) {
            const float s = sigmoid(g[k]);
            dg[k] = d[k] * up_v[k] * s * (1.0f + g[k] * (1.0f - s));
            du[k] = d[k] * g[k] * s;
        }
        // Everything was read before this write: d_gate or d_up may alias gate, up or dy.
        if (d_gate) store_values<V>(d_gate + j, dg);
        if (d_up) store_values<V>(d_up + j, du);
    }
}

// Runs kernel<V> with 16-byte accesses when every pointer is aligned and the vector width divides
// `width`, else one value at a time.
template <class T, class Launch>
void with_vec_width(std::int64_t width, std::initializer_list<const void*> pointers, Launch&& launch) {
    bool vec = width % vec_width<T> == 0;
    for (const void* p : pointers) vec = vec && (p == nullptr || is_vec_aligned(p));
    if (vec) launch(std::integral_constant<int, vec_width<T>>{});
    else launch(std::integral_constant<int, 1>{});
}

#undef MOPT_CUDA_GRID_STRIDE

inline const char* op_name(Activation f, bool backward) {
    switch (f) {
        case Activation::relu: return backward ? "relu_backward" : "relu_forward";
        case Activation::gelu: return backward ? "gelu_backward" : "gelu_forward";
        case Activation::silu: return backward ? "silu_backward" : "silu_forward";
    }
    return "activation";
}

// Calls fn with std::integral_constant<Activation, f>: the run-time choice picks a kernel compiled
// for that activation.
template <class Fn>
void dispatch(Activation f, Fn&& fn) {
    switch (f) {
        case Activation::relu: return fn(std::integral_constant<Activation, Activation::relu>{});
        case Activation::gelu: return fn(std::integral_constant<Activation, Activation::gelu>{});
        case Activation::silu: return fn(std::integral_constant<Activation, Activation::silu>{});
    }
}

inline void check_elementwise(const char* op, std::int64_t n, bool pointers_ok) {
    check(n >= 0, "cuda::", op, ": negative element count ", n);
    check(n == 0 || pointers_ok, "cuda::", op, ": null pointer for [", n, "] elements");
}

}  // namespace activation_detail

// x: [n] -> y: [n]
template <DeviceFloat T>
void activation_forward(Activation f, const T* x, T* y, std::int64_t n, cudaStream_t stream = nullptr) {
    using namespace activation_detail;
    const char* op = op_name(f, false);
    check_elementwise(op, n, x && y);
    if (n == 0) return;
    const int blocks = elementwise_blocks(n);
    dispatch(f, [&](auto kind) {
        forward_kernel<decltype(kind)::value><<<blocks, elementwise_threads, 0, stream>>>(x, y, n);
    });
    check_launch(op, "[", n, "]");
}

// x, dy: [n] -> dx: [n]
template <DeviceFloat T>
void activation_backward(Activation f, const T* x, const T* dy, T* dx, std::int64_t n, cudaStream_t stream = nullptr) {
    using namespace activation_detail;
    const char* op = op_name(f, true);
    check_elementwise(op, n, x && dy && dx);
    if (n == 0) return;
    const int blocks = elementwise_blocks(n);
    dispatch(f, [&](auto kind) {
        backward_kernel<decltype(kind)::value><<<blocks, elementwise_threads, 0, stream>>>(x, dy, dx, n);
    });
    check_launch(op, "[", n, "]");
}

// gate, up: [n] -> y: [n]
template <DeviceFloat T>
void swiglu_forward(const T* gate, const T* up, T* y, std::int64_t n, cudaStream_t stream = nullptr) {
    activation_detail::check_elementwise("swiglu_forward", n, gate && up && y);
    if (n == 0) return;
    activation_detail::with_vec_width<T>(n, {gate, up, y}, [&](auto v) {
        activation_detail::swiglu_forward_kernel<false, decltype(v)::value>
            <<<elementwise_blocks(n / v), elementwise_threads, 0, stream>>>(gate, up, y, n, n, nullptr);
    });
    check_launch("swiglu_forward", "[", n, "]");
}

// gate, up, dy: [n] -> d_gate: [n], d_up: [n] (either may be nullptr when not wanted)
template <DeviceFloat T>
void swiglu_backward(const T* gate, const T* up, const T* dy, T* d_gate, T* d_up, std::int64_t n,
                     cudaStream_t stream = nullptr) {
    activation_detail::check_elementwise("swiglu_backward", n, gate && up && dy);
    if (n == 0 || (!d_gate && !d_up)) return;
    activation_detail::with_vec_width<T>(n, {gate, up, dy, d_gate, d_up}, [&](auto v) {
        activation_detail::swiglu_backward_kernel<false, decltype(v)::value>
            <<<elementwise_blocks(n / v), elementwise_threads, 0, stream>>>(gate, up, dy, d_gate, d_up, n, n,
                                                                                  nullptr);
    });
    check_launch("swiglu_backward", "[", n, "]");
}

// The packed layout of a fused gate|up projection (one GEMM against the stacked [Wgate; Wup]):
// gate_up: [rows, 2·width], gate in columns [0, width), up in [width, 2·width) -> y: [rows, width]
// rows_used: a device count (e.g. the rows a routing step filled); only rows below it are computed,
// the others left as they are (null: all rows). The launch covers `rows`, so it is graph-safe.
template <DeviceFloat T>
void swiglu_forward_packed(const T* gate_up, T* y, std::int64_t rows, std::int64_t width,
                           cudaStream_t stream = nullptr, const std::int32_t* rows_used = nullptr) {
    const std::int64_t n = rows * width;
    activation_detail::check_elementwise("swiglu_forward_packed", n, gate_up && y);
    if (n == 0) return;
    activation_detail::with_vec_width<T>(width, {gate_up, y}, [&](auto v) {
        activation_detail::swiglu_forward_kernel<true, decltype(v)::value>
            <<<elementwise_blocks(n / v), elementwise_threads, 0, stream>>>(gate_up, gate_up + width, y, n, width,
                                                                             rows_used);
    });
    check_launch("swiglu_forward_packed", "[", rows, ", 2 x ", width, "]");
}

// gate_up: [rows, 2·width] (as above), dy: [rows, width] -> d_gate_up: [rows, 2·width], the same
// packing (d gate | d up); it may be gate_up itself, so the backward GEMM reads one array.
// rows_used as in swiglu_forward_packed.
template <DeviceFloat T>
void swiglu_backward_packed(const T* gate_up, const T* dy, T* d_gate_up, std::int64_t rows, std::int64_t width,
                            cudaStream_t stream = nullptr, const std::int32_t* rows_used = nullptr) {
    const std::int64_t n = rows * width;
    activation_detail::check_elementwise("swiglu_backward_packed", n, gate_up && dy && d_gate_up);
    if (n == 0) return;
    activation_detail::with_vec_width<T>(width, {gate_up, dy, d_gate_up}, [&](auto v) {
        activation_detail::swiglu_backward_kernel<true, decltype(v)::value>
            <<<elementwise_blocks(n / v), elementwise_threads, 0, stream>>>(gate_up, gate_up + width, dy, d_gate_up,
                                                                            d_gate_up + width, n, width, rows_used);
    });
    check_launch("swiglu_backward_packed", "[", rows, ", 2 x ", width, "]");
}

}  // namespace mopt::backend::cuda
