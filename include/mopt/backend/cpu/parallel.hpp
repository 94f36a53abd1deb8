#pragma once
// OpenMP loops that only go parallel when the work pays for the fork (a few microseconds).
#include <algorithm>
#include <cstdint>
#if defined(_OPENMP)
#include <omp.h>
#endif

namespace mopt::backend::cpu {

[[nodiscard]] inline bool in_parallel_region() {
#if defined(_OPENMP)
    return omp_in_parallel() != 0;
#else
    return false;
#endif
}

[[nodiscard]] inline int max_threads() {
#if defined(_OPENMP)
    return omp_get_max_threads();
#else
    return 1;
#endif
}

// Per-thread scratch for a parallel_for body: take `level = nesting_level()` before the loop and
// index the scratch with thread_slot(level) inside it. The slot is the thread's number in the
// team parallel_for forked (< max_threads()), and 0 when the loop ran serially — also when the
// caller itself runs inside someone else's parallel region.
[[nodiscard]] inline int nesting_level() {
#if defined(_OPENMP)
    return omp_get_level();
#else
    return 0;
#endif
}
[[nodiscard]] inline int thread_slot(int outer_level) {
#if defined(_OPENMP)
    return omp_get_level() > outer_level ? omp_get_thread_num() : 0;
#else
    (void)outer_level;
    return 0;
#endif
}

// Calls fn(i) for i in [0, n). `work_per_item` is a rough count of flops or bytes per item; the
// loop is parallel only when n * work_per_item exceeds ~32k (below that a fork costs more).
template <class Fn>
void parallel_for(std::int64_t n, std::int64_t work_per_item, Fn&& fn) {
    const bool go_parallel = n > 1 && n * std::max<std::int64_t>(work_per_item, 1) >= (1 << 15) &&
                             !in_parallel_region() && max_threads() > 1;
    if (!go_parallel) {
        for (std::int64_t i = 0; i < n; ++i) fn(i);
        return;
    }
#if defined(_OPENMP)
#pragma omp parallel for schedule(static)
    for (std::int64_t i = 0; i < n; ++i) fn(i);
#endif
}

// Calls fn(begin, end) on contiguous chunks of [0, n) — one chunk per thread — for element-wise
// work that runs a vectorised kernel over a range.
template <class Fn>
void parallel_chunks(std::int64_t n, Fn&& fn) {
    const int threads = (n >= (1 << 16) && !in_parallel_region()) ? max_threads() : 1;
    if (threads <= 1) {
        fn(std::int64_t{0}, n);
        return;
    }
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int t = 0; t < threads; ++t) {
        const std::int64_t begin = n * t / threads, end = n * (t + 1) / threads;
        if (begin < end) fn(begin, end);
    }
#endif
}

}  // namespace mopt::backend::cpu
