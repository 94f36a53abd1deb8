#pragma once
// A small test harness for the CUDA tests (nvcc compiles them; Catch2 is not used so that device
// code stays out of its headers). Each file registers cases with MOPT_CUDA_TEST; main.cu runs them,
// or exits 77 (ctest: skipped) with a message where the machine has no GPU.
//
// Closeness is measured normwise: max|got - want| / max(max|want|, 1e-30) over the whole tensor,
// so one tolerance works for values of every scale (the issue's "f32 <= 1e-4, bf16 <= 1e-2").
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <span>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <mopt/backend/cuda/allocator.cuh>
#include <mopt/backend/cuda/common.cuh>
#include <mopt/backend/cuda/device.cuh>
#include <mopt/error.hpp>

namespace mopt::cuda_test {

// Host f32 values -> a device array, the copy finished (a model's own stream does not wait for the
// legacy-stream copy).
inline backend::cuda::DeviceArray<float> device_prompt(const std::vector<float>& p) {
    backend::cuda::DeviceArray<float> a(p.size());
    a.upload(p);
    backend::cuda::check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    return a;
}

// A device array's values on the host, after all queued work.
inline std::vector<float> download(const backend::cuda::DeviceArray<float>& a) {
    backend::cuda::check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    std::vector<float> out(a.size());
    a.download(out);
    return out;
}

// "bf16" or "f32", for messages.
template <class T>
constexpr const char* type_name() {
    return std::is_same_v<T, float> ? "f32" : "bf16";
}

// The values a T array can hold (bf16 cases give these to both the GPU and the CPU reference).
template <class T>
std::vector<float> representable(std::vector<float> v) {
    if constexpr (!std::is_same_v<T, float>)
        for (float& x : v) x = backend::cuda::to_f32(backend::cuda::from_f32<T>(x));
    return v;
}
// Host f32 values -> a device array of T (rounded to T).
template <class T>
backend::cuda::DeviceArray<T> to_device(const std::vector<float>& v) {
    std::vector<T> host(v.size());
    for (std::size_t i = 0; i < v.size(); ++i) host[i] = backend::cuda::from_f32<T>(v[i]);
    backend::cuda::DeviceArray<T> d(v.size());
    d.upload(host);
    return d;
}
// A device array of T as host f32 values, after all queued work.
template <class T>
std::vector<float> to_host(const backend::cuda::DeviceArray<T>& d) {
    backend::cuda::check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize (to_host)");
    std::vector<T> host(d.size());
    d.download(host);
    std::vector<float> v(host.size());
    for (std::size_t i = 0; i < host.size(); ++i) v[i] = backend::cuda::to_f32(host[i]);
    return v;
}

struct Case {
    const char* name;
    void (*fn)();
};
inline std::vector<Case>& registry() {
    static std::vector<Case> cases;
    return cases;
}
struct Register {
    Register(const char* name, void (*fn)()) { registry().push_back({name, fn}); }
};

struct Failure : std::runtime_error {
    using std::runtime_error::runtime_error;
};

template <class... Parts>
[[noreturn]] void fail(const char* file, int line, const Parts&... parts) {
    std::ostringstream os;
    os << file << ':' << line << ": ";
    (os << ... << parts);
    throw Failure(os.str());
}

// Normwise relative difference (see the header comment).
inline double relative_error(std::span<const float> got, std::span<const float> want) {
    double diff = 0, scale = 0;
    for (std::size_t i = 0; i < want.size(); ++i) {
        const double g = got[i], w = want[i];
        if (!std::isfinite(g)) return INFINITY;
        diff = std::max(diff, std::abs(g - w));
        scale = std::max(scale, std::abs(w));
    }
    return diff / std::max(scale, 1e-30);
}

// Relative difference of two scalars (a loss, a norm).
inline double scalar_error(double got, double want) { return std::abs(got - want) / std::max(std::abs(want), 1e-30); }

// The mopt::Error thrown by `f`, or "" when it throws none.
template <class F>
std::string error_of(F&& f) {
    try {
        f();
    } catch (const mopt::Error& e) {
        return e.what();
    }
    return "";
}

}  // namespace mopt::cuda_test

#define MOPT_CUDA_TEST(name)                                                        \
    static void name();                                                             \
    static const ::mopt::cuda_test::Register name##_registered{#name, &name};       \
    static void name()

// CUDA_CHECK(cond, message parts...): fails the current case with the message.
#define CUDA_CHECK(cond, ...) \
    do {                      \
        if (!(cond)) ::mopt::cuda_test::fail(__FILE__, __LINE__, "CHECK(" #cond ") failed: ", __VA_ARGS__); \
    } while (0)

// CUDA_CHECK_CLOSE(got, want, tol, what): normwise relative error of two float ranges <= tol. The
// arguments are bound to references first, so a temporary vector stays alive for the whole check.
#define CUDA_CHECK_CLOSE(got, want, tol, what)                                                          \
    do {                                                                                                \
        const auto& got_ref_ = (got);   /* a temporary (e.g. a download) lives until the check ends */  \
        const auto& want_ref_ = (want);                                                                  \
        const std::span<const float> got_ = got_ref_, want_ = want_ref_;                                 \
        CUDA_CHECK(got_.size() == want_.size(), what, ": sizes ", got_.size(), " vs ", want_.size());    \
        const double err_ = ::mopt::cuda_test::relative_error(got_, want_);                              \
        CUDA_CHECK(err_ <= (tol), what, ": relative error ", err_, " > ", (tol));                       \
    } while (0)
