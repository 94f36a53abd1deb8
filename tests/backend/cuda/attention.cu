// CUDA fused attention (mopt/backend/cuda/attention.cuh) against mopt's CPU attention op: forward
// output, the saved row logsumexp, and dq, dk, dv from the CPU tape's backward, on shapes that
// leave partial tiles (T, S = 1, 37, 70, 130), GQA, a soft-prompt prefix (shorter and longer than
// a tile), queries that are the last T of S keys (KV cache), batch > 1, head_dim 32/64/128, f32
// and bf16 on every code path (reference, SIMT, tensor cores). Normwise tolerances: f32 1e-4, bf16 1e-2.
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <mopt/backend/cuda/attention.cuh>

#include "attention_reference.hpp"
#include "cuda_test.cuh"

namespace {

using mopt::backend::cuda::AttentionKernel;
using mopt::backend::cuda::DeviceBuffer;
using mopt::cuda_test::AttentionCase;
using bf16 = __nv_bfloat16;

constexpr double kTolF32 = 1e-4, kTolBf16 = 1e-2;

std::vector<float> uniform(std::int64_t n, std::uint32_t seed, float lo, float hi) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> dist(lo, hi);
    std::vector<float> x(static_cast<std::size_t>(n));
    for (auto& e : x) e = dist(rng);
    return x;
}

template <class T>
std::vector<T> to_type(const std::vector<float>& x) {
    std::vector<T> y(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) {
        if constexpr (std::is_same_v<T, float>)
            y[i] = x[i];
        else
            y[i] = __float2bfloat16_rn(x[i]);
    }
    return y;
}

template <class T>
std::vector<float> to_f32(const std::vector<T>& x) {
    std::vector<float> y(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) {
        if constexpr (std::is_same_v<T, float>)
            y[i] = x[i];
        else
            y[i] = __bfloat162float(x[i]);
    }
    return y;
}

template <class T>
DeviceBuffer<T> upload(const std::vector<T>& host) {
    DeviceBuffer<T> d(host.size());
    d.upload(host);
    return d;
}

template <class T>
std::vector<float> download(const DeviceBuffer<T>& d) {
    std::vector<T> host(d.size());
    d.download(host);
    return to_f32(host);
}

mopt::backend::cuda::AttentionShape shape_of(const AttentionCase& c) {
    return {c.batch, c.seq_q, c.seq_k, c.heads, c.kv_heads, c.head_dim};
}

template <class T>
std::string describe(const AttentionCase& c, AttentionKernel kernel) {
    std::ostringstream os;
    const char* path = kernel == AttentionKernel::simt          ? " simt"
                       : kernel == AttentionKernel::tensor_core ? " tensor-core"
                       : kernel == AttentionKernel::reference   ? " reference"
                                                                : " automatic";
    os << (std::is_same_v<T, float> ? "f32" : "bf16") << path
       << " B=" << c.batch << " T=" << c.seq_q << " S=" << c.seq_k << " H=" << c.heads << " Hkv=" << c.kv_heads
       << " Dh=" << c.head_dim << (c.causal ? " causal" : " full") << " prefix=" << c.prefix << " scale=" << c.scale;
    return os.str();
}

// Normwise as CUDA_CHECK_CLOSE (max|got - want| / max|want|), but the denominator is at least
// kZeroFloor: a tensor that is zero in exact arithmetic (dq when every query sees one key, where
// dS = P (dP - delta) = dP - dP) is then held to tol · kZeroFloor absolutely instead of being
// divided by the CPU's rounding noise. Every other tensor here has max|want| far above the floor.
// got and want are taken by const reference to named or temporary vectors that outlive the call
// (CUDA_CHECK_CLOSE keeps spans, so a temporary passed straight to it would dangle).
constexpr double kZeroFloor = 1e-2;

void compare(const std::vector<float>& got, const std::vector<float>& want, double tol, const std::string& what) {
    CUDA_CHECK(got.size() == want.size(), what, ": sizes ", got.size(), " vs ", want.size());
    double diff = 0, scale = kZeroFloor;
    for (std::size_t i = 0; i < want.size(); ++i) {
        CUDA_CHECK(std::isfinite(got[i]), what, ": element ", i, " is ", got[i]);
        diff = std::max(diff, std::abs(static_cast<double>(got[i]) - want[i]));
        scale = std::max(scale, std::abs(static_cast<double>(want[i])));
    }
    CUDA_CHECK(diff / scale <= tol, what, ": relative error ", diff / scale, " > ", tol, " (max|want| ", scale, ")");
}

// Which gradients a run asks for (the others are null and must not be needed).
struct Wanted {
    bool dq = true, dk = true, dv = true;
};

// Runs forward and backward on the GPU and compares every output with the CPU op.
template <class T>
void check_case(const AttentionCase& c, AttentionKernel kernel, std::uint32_t seed, Wanted want = {}) {
    const double tol = std::is_same_v<T, float> ? kTolF32 : kTolBf16;
    const std::string what = describe<T>(c, kernel);
    const std::int64_t q_size = c.batch * c.seq_q * c.heads * c.head_dim;
    const std::int64_t kv_size = c.batch * c.seq_k * c.kv_heads * c.head_dim;
    const std::int64_t rows = c.batch * c.heads * c.seq_q;
    // Inputs in the device type; the reference sees exactly those values.
    const auto q = to_type<T>(uniform(q_size, seed, -2.0f, 2.0f));
    const auto k = to_type<T>(uniform(kv_size, seed + 1, -2.0f, 2.0f));
    const auto v = to_type<T>(uniform(kv_size, seed + 2, -1.0f, 1.0f));
    const auto grad_out = to_type<T>(uniform(q_size, seed + 3, -1.0f, 1.0f));
    const auto ref = mopt::cuda_test::attention_reference(c, to_f32(q), to_f32(k), to_f32(v), to_f32(grad_out));

    auto dq_ = upload(q), dk_ = upload(k), dv_ = upload(v), dgo = upload(grad_out);
    DeviceBuffer<T> out(q_size), grad_q(q_size), grad_k(kv_size), grad_v(kv_size);
    DeviceBuffer<float> lse(rows), delta(rows);
    const mopt::backend::cuda::AttentionOptions opt{
        .causal = c.causal, .prefix = c.prefix, .scale = c.scale, .kernel = kernel};
    mopt::backend::cuda::attention_forward<T>(
        {.q = dq_.data(), .k = dk_.data(), .v = dv_.data(), .out = out.data(), .lse = lse.data()}, shape_of(c), opt);
    mopt::backend::cuda::attention_backward<T>({.q = dq_.data(),
                                                .k = dk_.data(),
                                                .v = dv_.data(),
                                                .out = out.data(),
                                                .grad_out = dgo.data(),
                                                .lse = lse.data(),
                                                .delta = delta.data(),
                                                .dq = want.dq ? grad_q.data() : nullptr,
                                                .dk = want.dk ? grad_k.data() : nullptr,
                                                .dv = want.dv ? grad_v.data() : nullptr},
                                               shape_of(c), opt);
    mopt::backend::cuda::check_cuda(cudaDeviceSynchronize(), "attention test synchronize");

    compare(download(out), ref.out, tol, what + ": out");
    compare(download(lse), ref.lse, tol, what + ": lse");
    if (want.dq) compare(download(grad_q), ref.dq, tol, what + ": dq");
    if (want.dk) compare(download(grad_k), ref.dk, tol, what + ": dk");
    if (want.dv) compare(download(grad_v), ref.dv, tol, what + ": dv");
}

using mopt::cuda_test::error_of;

}  // namespace

// ------------------------------------------------------------------------------------------- f32

MOPT_CUDA_TEST(attention_f32_one_query_one_key) {
    check_case<float>({.batch = 1, .seq_q = 1, .seq_k = 1, .heads = 1, .kv_heads = 1, .head_dim = 64},
                      AttentionKernel::simt, 11);
}

MOPT_CUDA_TEST(attention_f32_partial_tile_batch2) {
    check_case<float>({.batch = 2, .seq_q = 37, .seq_k = 37, .heads = 4, .kv_heads = 4, .head_dim = 64},
                      AttentionKernel::simt, 21);
}

MOPT_CUDA_TEST(attention_f32_gqa_prefix_three_tiles_dh32) {
    check_case<float>(
        {.batch = 1, .seq_q = 130, .seq_k = 130, .heads = 8, .kv_heads = 2, .head_dim = 32, .prefix = 5},
        AttentionKernel::simt, 31);
}

// A prefix longer than one tile: prefix queries see keys in later tiles (non-causal within the prefix).
MOPT_CUDA_TEST(attention_f32_prefix_longer_than_a_tile_dh128) {
    check_case<float>(
        {.batch = 2, .seq_q = 130, .seq_k = 130, .heads = 2, .kv_heads = 1, .head_dim = 128, .prefix = 70},
        AttentionKernel::simt, 41);
}

// Queries are the last T of S keys: dK/dV blocks start at a query past 0, dQ/forward stop early.
MOPT_CUDA_TEST(attention_f32_kv_cache) {
    check_case<float>(
        {.batch = 2, .seq_q = 37, .seq_k = 100, .heads = 4, .kv_heads = 2, .head_dim = 64, .prefix = 3},
        AttentionKernel::simt, 51);
    check_case<float>({.batch = 1, .seq_q = 1, .seq_k = 67, .heads = 4, .kv_heads = 1, .head_dim = 32},
                      AttentionKernel::simt, 52);
}

MOPT_CUDA_TEST(attention_f32_non_causal_explicit_scale) {
    check_case<float>({.batch = 2,
                       .seq_q = 70,
                       .seq_k = 70,
                       .heads = 4,
                       .kv_heads = 2,
                       .head_dim = 32,
                       .causal = false,
                       .scale = 0.3f},
                      AttentionKernel::simt, 61);
    // A prefix at least S long makes a causal op see every key.
    check_case<float>(
        {.batch = 1, .seq_q = 70, .seq_k = 70, .heads = 2, .kv_heads = 2, .head_dim = 64, .prefix = 200},
        AttentionKernel::simt, 62);
}

// ------------------------------------------------------------------------------------------ bf16

MOPT_CUDA_TEST(attention_bf16_tensor_core_dh32_gqa_prefix) {
    check_case<bf16>(
        {.batch = 1, .seq_q = 130, .seq_k = 130, .heads = 8, .kv_heads = 2, .head_dim = 32, .prefix = 5},
        AttentionKernel::tensor_core, 71);
}

MOPT_CUDA_TEST(attention_bf16_tensor_core_dh64_partial_tile) {
    check_case<bf16>({.batch = 2, .seq_q = 37, .seq_k = 37, .heads = 4, .kv_heads = 4, .head_dim = 64},
                     AttentionKernel::tensor_core, 81);
    check_case<bf16>({.batch = 1, .seq_q = 1, .seq_k = 1, .heads = 2, .kv_heads = 1, .head_dim = 64},
                     AttentionKernel::tensor_core, 82);
}

MOPT_CUDA_TEST(attention_bf16_tensor_core_dh128_gqa_long_prefix) {
    check_case<bf16>(
        {.batch = 2, .seq_q = 130, .seq_k = 130, .heads = 8, .kv_heads = 2, .head_dim = 128, .prefix = 70},
        AttentionKernel::tensor_core, 91);
}

MOPT_CUDA_TEST(attention_bf16_tensor_core_kv_cache_and_non_causal) {
    check_case<bf16>(
        {.batch = 2, .seq_q = 37, .seq_k = 100, .heads = 4, .kv_heads = 2, .head_dim = 64, .prefix = 3},
        AttentionKernel::tensor_core, 101);
    check_case<bf16>({.batch = 1, .seq_q = 1, .seq_k = 67, .heads = 4, .kv_heads = 1, .head_dim = 128},
                     AttentionKernel::tensor_core, 102);
    check_case<bf16>({.batch = 1,
                      .seq_q = 70,
                      .seq_k = 70,
                      .heads = 4,
                      .kv_heads = 2,
                      .head_dim = 32,
                      .causal = false,
                      .scale = 0.3f},
                     AttentionKernel::tensor_core, 103);
}

// The SIMT path on bf16 inputs (what `automatic` picks for unaligned pointers).
MOPT_CUDA_TEST(attention_bf16_simt) {
    check_case<bf16>(
        {.batch = 2, .seq_q = 130, .seq_k = 130, .heads = 4, .kv_heads = 2, .head_dim = 64, .prefix = 5},
        AttentionKernel::simt, 111);
    check_case<bf16>({.batch = 1, .seq_q = 37, .seq_k = 100, .heads = 2, .kv_heads = 1, .head_dim = 128},
                     AttentionKernel::simt, 112);
}

// ------------------------------------------------------------------------------------- reference

// The one-row-per-block kernels: KV cache with a prefix and GQA, a prefix longer than a tile at
// Dh = 128, non-causal with an explicit scale at Dh = 32, a single key; f32 and bf16.
MOPT_CUDA_TEST(attention_reference_kernel) {
    check_case<float>(
        {.batch = 2, .seq_q = 37, .seq_k = 100, .heads = 4, .kv_heads = 2, .head_dim = 64, .prefix = 3},
        AttentionKernel::reference, 131);
    check_case<float>(
        {.batch = 1, .seq_q = 130, .seq_k = 130, .heads = 2, .kv_heads = 1, .head_dim = 128, .prefix = 70},
        AttentionKernel::reference, 132);
    check_case<float>({.batch = 2,
                       .seq_q = 70,
                       .seq_k = 70,
                       .heads = 4,
                       .kv_heads = 2,
                       .head_dim = 32,
                       .causal = false,
                       .scale = 0.3f},
                      AttentionKernel::reference, 133);
    check_case<float>({.batch = 1, .seq_q = 1, .seq_k = 1, .heads = 1, .kv_heads = 1, .head_dim = 64},
                      AttentionKernel::reference, 134);
    check_case<bf16>(
        {.batch = 1, .seq_q = 70, .seq_k = 70, .heads = 4, .kv_heads = 2, .head_dim = 64, .prefix = 5},
        AttentionKernel::reference, 135);
}

// ---------------------------------------------------------------------------- options and errors

// A null gradient is skipped; the others are still right (dq alone; dk, dv without dq).
MOPT_CUDA_TEST(attention_optional_gradients) {
    const AttentionCase c{.batch = 1, .seq_q = 70, .seq_k = 70, .heads = 4, .kv_heads = 2, .head_dim = 64, .prefix = 3};
    check_case<float>(c, AttentionKernel::simt, 121, {.dq = true, .dk = false, .dv = false});
    check_case<float>(c, AttentionKernel::simt, 122, {.dq = false, .dk = true, .dv = true});
    check_case<bf16>(c, AttentionKernel::tensor_core, 123, {.dq = false, .dk = true, .dv = false});
    check_case<bf16>(c, AttentionKernel::automatic, 124, {.dq = true, .dk = false, .dv = true});
}

MOPT_CUDA_TEST(attention_errors_name_the_op_and_shape) {
    using namespace mopt::backend::cuda;
    DeviceBuffer<float> buf(16);
    float* p = buf.data();
    const AttentionForwardArgs<float> args{.q = p, .k = p, .v = p, .out = p, .lse = p};
    auto forward = [&](AttentionShape s, AttentionOptions o = {}) {
        return error_of([&] { attention_forward<float>(args, s, o); });
    };
    std::string e = forward({.batch = 2, .seq_q = 5, .seq_k = 5, .heads = 4, .kv_heads = 2, .head_dim = 80});
    CUDA_CHECK(e.find("attention_forward") != std::string::npos && e.find("head_dim 80") != std::string::npos &&
                   e.find("[2, 5, 4, 80]") != std::string::npos,
               "message: ", e);
    e = forward({.batch = 2, .seq_q = 5, .seq_k = 5, .heads = 6, .kv_heads = 4, .head_dim = 64});
    CUDA_CHECK(e.find("divisible") != std::string::npos && e.find("[2, 5, 6, 64]") != std::string::npos,
               "message: ", e);
    e = forward({.batch = 1, .seq_q = 6, .seq_k = 5, .heads = 2, .kv_heads = 2, .head_dim = 32});
    CUDA_CHECK(e.find("T = 6 > S = 5") != std::string::npos, "message: ", e);
    e = forward({.batch = 1, .seq_q = 4, .seq_k = 4, .heads = 2, .kv_heads = 2, .head_dim = 32},
                {.kernel = AttentionKernel::tensor_core});
    CUDA_CHECK(e.find("tensor-core") != std::string::npos && e.find("bf16") != std::string::npos, "message: ", e);
    e = error_of([&] {
        attention_backward<float>({.q = p, .k = p, .v = p, .out = p, .grad_out = p, .lse = p, .dq = p},
                                  {.batch = 1, .seq_q = 2, .seq_k = 2, .heads = 1, .kv_heads = 1, .head_dim = 32});
    });
    CUDA_CHECK(e.find("attention_backward") != std::string::npos && e.find("delta") != std::string::npos,
               "message: ", e);
}
