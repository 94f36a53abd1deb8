#pragma once
// CUDA device basics for the CUDA backend: error checking that names the failing call, device
// discovery that tolerates machines without a GPU or driver, and an owning device buffer.
// Compiled by nvcc in the user's .cu file (MOPT_ENABLE_CUDA).
#include <cuda_runtime.h>

#include <cstddef>
#include <span>
#include <utility>

#include "mopt/error.hpp"

namespace mopt::backend::cuda {

inline void check_cuda(cudaError_t status, const char* call) {
    check(status == cudaSuccess, "CUDA: ", call, " failed: ", cudaGetErrorString(status));
}

// Usable devices; 0 when the machine has no GPU or no driver (CUDA tests then skip).
[[nodiscard]] inline int device_count() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        (void)cudaGetLastError();  // clear the sticky error so later calls are not blamed for it
        return 0;
    }
    return n;
}

// An owning, typed device allocation.
template <class T>
class DeviceBuffer {
public:
    DeviceBuffer() = default;
    explicit DeviceBuffer(std::size_t count) : count_(count) {
        if (count_) check_cuda(cudaMalloc(reinterpret_cast<void**>(&data_), count_ * sizeof(T)), "cudaMalloc");
    }
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    DeviceBuffer(DeviceBuffer&& o) noexcept : data_(std::exchange(o.data_, nullptr)), count_(std::exchange(o.count_, 0)) {}
    DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
        std::swap(data_, o.data_);
        std::swap(count_, o.count_);
        return *this;
    }
    ~DeviceBuffer() {
        if (data_) cudaFree(data_);
    }

    void upload(std::span<const T> host) {
        check(host.size() == count_, "DeviceBuffer::upload: ", host.size(), " values into a buffer of ", count_);
        check_cuda(cudaMemcpy(data_, host.data(), count_ * sizeof(T), cudaMemcpyHostToDevice), "cudaMemcpy (upload)");
    }
    void download(std::span<T> host) const {
        check(host.size() == count_, "DeviceBuffer::download: ", count_, " values into ", host.size());
        check_cuda(cudaMemcpy(host.data(), data_, count_ * sizeof(T), cudaMemcpyDeviceToHost), "cudaMemcpy (download)");
    }

    [[nodiscard]] T* data() { return data_; }
    [[nodiscard]] const T* data() const { return data_; }
    [[nodiscard]] std::size_t size() const { return count_; }

private:
    T* data_ = nullptr;
    std::size_t count_ = 0;
};

}  // namespace mopt::backend::cuda
