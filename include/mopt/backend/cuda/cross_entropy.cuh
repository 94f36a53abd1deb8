#pragma once
// Fused softmax cross-entropy over the vocabulary on the GPU, matching cross_entropy in
// mopt/autodiff/ops/softmax.hpp:
//   L = (1/count) Σ_{r: t_r ≠ ignore_index} [(max_r − x_{r,t_r}) + log Σ_j exp(x_rj − max_r)]
//   dL/dx_rj = dloss/count · (exp(x_rj − max_r − log Σ_r) − [j = t_r]),  0 for ignored rows
//
// One block per row. A single read of the row keeps an online (max, sum) pair per thread
// (Milakov & Gimelshein 2018, "Online normalizer calculation for softmax": on a new maximum the
// running sum is rescaled), the pairs are merged across the block, and, when dlogits are wanted,
// a second pass over the row (in L2) overwrites the logits with their gradient: the [rows, vocab]
// probabilities are never stored and no second logits-sized tensor exists.
//
// Three launches on the stream, no host synchronisation: count the non-ignored targets (the
// gradient scale needs the count before any row is written), the row kernel, and one block that
// adds the row losses in double in a fixed order (deterministic) into the mean.
//
// Kernels cannot throw, so the CPU op's errors become NaN: a target outside [0, vocab) that is not
// ignore_index gives its row a NaN loss and NaN gradient, and all rows ignored gives a NaN mean
// (0/0); the tape's finite-loss check then names the step.
//
// logits: f32 or bf16 (math in f32); targets: i32; loss and the per-row losses: f32.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "mopt/backend/cuda/allocator.cuh"
#include "mopt/backend/cuda/common.cuh"

namespace mopt::backend::cuda {

struct CrossEntropyOptions {
    std::int32_t ignore_index = -100;
    bool write_dlogits = true;  // false: evaluation, the logits are left untouched
    float dloss = 1.0f;         // upstream gradient of the loss (the dlogits are scaled by it)
    float* row_loss = nullptr;  // optional [rows] output: each row's loss (0 for ignored rows)
    cudaStream_t stream = nullptr;
};

namespace cross_entropy_detail {

// A running softmax normaliser: max m and s = Σ exp(x − m) over the values seen.
struct MaxSum {
    float m, s;
};

__device__ inline MaxSum merge(MaxSum a, MaxSum b) {
    const float m = fmaxf(a.m, b.m);
    if (m == -INFINITY) return {m, a.s + b.s};  // both empty (or all −inf): exp(−inf − (−inf)) would be NaN
    return {m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

__device__ inline MaxSum block_merge(MaxSum v) {
    __shared__ float warp_m[32], warp_s[32];
    const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
    const int warps = static_cast<int>(blockDim.x) >> 5;
    for (int offset = 16; offset > 0; offset >>= 1)
        v = merge(v, {__shfl_xor_sync(full_warp_mask, v.m, offset), __shfl_xor_sync(full_warp_mask, v.s, offset)});
    __syncthreads();
    if (lane == 0) {
        warp_m[warp] = v.m;
        warp_s[warp] = v.s;
    }
    __syncthreads();
    if (warp == 0) {
        v = lane < warps ? MaxSum{warp_m[lane], warp_s[lane]} : MaxSum{-INFINITY, 0.0f};
        for (int offset = 16; offset > 0; offset >>= 1)
            v = merge(v, {__shfl_xor_sync(full_warp_mask, v.m, offset), __shfl_xor_sync(full_warp_mask, v.s, offset)});
        if (lane == 0) {
            warp_m[0] = v.m;
            warp_s[0] = v.s;
        }
    }
    __syncthreads();
    return {warp_m[0], warp_s[0]};
}

// count[0] = number of targets that are not ignore_index. One block of Threads.
template <int Threads>
__global__ void __launch_bounds__(Threads)
    count_targets_kernel(const std::int32_t* targets, int rows, std::int32_t ignore_index, int* count) {
    int c = 0;
    for (int r = threadIdx.x; r < rows; r += Threads) c += targets[r] != ignore_index ? 1 : 0;
    c = block_sum(c);
    if (threadIdx.x == 0) *count = c;
}

// V logits per access (1, or vec_width<T> when V divides vocab and the rows are 16-byte aligned).
template <int V, class T>
__global__ void __launch_bounds__(1024)
    cross_entropy_rows_kernel(T* logits, const std::int32_t* targets, float* row_loss, const int* count, int vocab,
                              std::int32_t ignore_index, bool write_dlogits, float dloss) {
    T* x = logits + static_cast<std::int64_t>(blockIdx.x) * vocab;
    const std::int32_t t = targets[blockIdx.x];
    const int step = static_cast<int>(blockDim.x) * V;
    // The branches below are uniform over the block (one target per row), so returning early
    // leaves no thread waiting at a barrier.
    if (t == ignore_index || t < 0 || t >= vocab) {
        const float fill = t == ignore_index ? 0.0f : NAN;
        if (threadIdx.x == 0) row_loss[blockIdx.x] = fill;
        if (write_dlogits)
            for (int j = threadIdx.x; j < vocab; j += blockDim.x) x[j] = from_f32<T>(fill);
        return;
    }
    // Every thread reads the target logit before the barrier in block_merge; only after it may
    // any thread overwrite the row.
    const float x_t = to_f32(x[t]);
    MaxSum acc{-INFINITY, 0.0f};
    for (int j = threadIdx.x * V; j < vocab; j += step) {
        float v[V];
        load_values<V>(x + j, v);
        float m = v[0];
#pragma unroll
        for (int k = 1; k < V; ++k) m = fmaxf(m, v[k]);
        if (m > acc.m) {  // rescale once per V values
            acc.s *= expf(acc.m - m);  // acc.m = −inf: 0·0
            acc.m = m;
        }
#pragma unroll
        for (int k = 0; k < V; ++k)  // −inf adds 0, the maximum itself 1 (also when it is +inf); NaN propagates
            acc.s += v[k] == -INFINITY ? 0.0f : (v[k] == acc.m ? 1.0f : expf(v[k] - acc.m));
    }
    const MaxSum total = block_merge(acc);
    const float log_sum = logf(total.s);
    // (max − x_t) + log Σ: no cancellation between two large values.
    if (threadIdx.x == 0) row_loss[blockIdx.x] = (total.m - x_t) + log_sum;
    if (!write_dlogits) return;
    const float scale = dloss / static_cast<float>(*count);
    for (int j = threadIdx.x * V; j < vocab; j += step) {
        float v[V];
        load_values<V>(x + j, v);
#pragma unroll
        for (int k = 0; k < V; ++k) {
            const float p = expf((v[k] - total.m) - log_sum);
            v[k] = j + k == t ? (p - 1.0f) * scale : p * scale;
        }
        store_values<V>(x + j, v);
    }
}

// loss[0] = Σ row_loss / count (NaN when count is 0). One block of Threads.
template <int Threads>
__global__ void __launch_bounds__(Threads)
    mean_loss_kernel(const float* row_loss, int rows, const int* count, float* loss) {
    double s = 0.0;
    for (int r = threadIdx.x; r < rows; r += Threads) s += row_loss[r];
    s = block_sum(s);
    if (threadIdx.x == 0) *loss = *count > 0 ? static_cast<float>(s / *count) : NAN;
}

}  // namespace cross_entropy_detail

// logits: [rows, vocab], targets: [rows] -> loss: [1] (device) and, when opt.write_dlogits, the
// logits overwritten by dloss · dL/dlogits: [rows, vocab]
template <DeviceFloat T>
void cross_entropy(T* logits, const std::int32_t* targets, float* loss, std::int64_t rows, std::int64_t vocab,
                   const CrossEntropyOptions& opt = {}) {
    using namespace cross_entropy_detail;
    check_row_extents("cross_entropy", rows, vocab);
    check(rows > 0, "cuda::cross_entropy: no rows (logits [0, ", vocab,
          "]); the mean loss over no targets is undefined");
    check(logits && targets && loss, "cuda::cross_entropy: null logits, targets or loss pointer for logits [", rows,
          ", ", vocab, "]");
    DeviceArray<int> count(1, opt.stream);
    DeviceArray<float> scratch_loss(opt.row_loss ? 0 : static_cast<std::size_t>(rows), opt.stream);
    float* row_loss = opt.row_loss ? opt.row_loss : scratch_loss.data();
    const int r = static_cast<int>(rows), v = static_cast<int>(vocab);
    count_targets_kernel<1024><<<1, 1024, 0, opt.stream>>>(targets, r, opt.ignore_index, count.data());
    constexpr int V = vec_width<T>;
    if (vocab % V == 0 && is_vec_aligned(logits))
        cross_entropy_rows_kernel<V><<<static_cast<unsigned>(rows), row_threads(vocab / V * 4), 0, opt.stream>>>(
            logits, targets, row_loss, count.data(), v, opt.ignore_index, opt.write_dlogits, opt.dloss);
    else
        cross_entropy_rows_kernel<1><<<static_cast<unsigned>(rows), row_threads(vocab), 0, opt.stream>>>(
            logits, targets, row_loss, count.data(), v, opt.ignore_index, opt.write_dlogits, opt.dloss);
    mean_loss_kernel<1024><<<1, 1024, 0, opt.stream>>>(row_loss, r, count.data(), loss);
    check_launch("cross_entropy", "logits [", rows, ", ", vocab, "]");
}

}  // namespace mopt::backend::cuda
