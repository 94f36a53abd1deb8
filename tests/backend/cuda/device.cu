// CUDA smoke test: a tensor goes to the device, a kernel scales it, and it comes back equal to the
// CPU result. Exits 77 (ctest: skipped) with a message where no GPU is present.
#include <cstdio>
#include <mopt/backend/cuda/device.cuh>
#include <mopt/tensor/tensor.hpp>
#include <vector>

namespace {
__global__ void scale_kernel(float* x, float s, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= s;
}
}  // namespace

int main() try {
    using namespace mopt;
    if (backend::cuda::device_count() == 0) {
        std::printf("SKIPPED: no CUDA device on this machine; the CUDA tests run on a GPU machine\n");
        return 77;
    }
    const int n = 1000;
    Tensor t = Tensor::empty({n});
    for (int i = 0; i < n; ++i) t.at(i) = 0.5f * static_cast<float>(i) - 3.0f;
    backend::cuda::DeviceBuffer<float> d(n);
    d.upload(t.span());
    scale_kernel<<<(n + 255) / 256, 256>>>(d.data(), -2.0f, n);
    backend::cuda::check_cuda(cudaGetLastError(), "scale_kernel launch");
    std::vector<float> back(n);
    d.download(back);
    for (int i = 0; i < n; ++i)
        if (back[i] != -2.0f * t.at(i)) {
            std::printf("FAILED: element %d is %g, expected %g\n", i, back[i], -2.0f * t.at(i));
            return 1;
        }
    std::printf("passed: %d elements scaled on the device match the CPU\n", n);
    return 0;
} catch (const std::exception& e) {
    std::printf("FAILED: %s\n", e.what());
    return 1;
}
