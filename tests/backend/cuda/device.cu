// CUDA smoke test: a tensor goes to the device, a kernel scales it, and it comes back equal to the
// CPU result.
#include <mopt/backend/cuda/device.cuh>
#include <mopt/tensor/tensor.hpp>
#include <vector>

#include "cuda_test.cuh"

namespace {
__global__ void scale_kernel(float* x, float s, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= s;
}
}  // namespace

MOPT_CUDA_TEST(device_buffer_round_trip) {
    using namespace mopt;
    const int n = 1000;
    Tensor t = Tensor::empty({n});
    for (int i = 0; i < n; ++i) t.at(i) = 0.5f * static_cast<float>(i) - 3.0f;
    backend::cuda::DeviceBuffer<float> d(n);
    d.upload(t.span());
    scale_kernel<<<(n + 255) / 256, 256>>>(d.data(), -2.0f, n);
    backend::cuda::check_cuda(cudaGetLastError(), "scale_kernel launch");
    std::vector<float> back(n);
    d.download(back);
    for (int i = 0; i < n; ++i) CUDA_CHECK(back[i] == -2.0f * t.at(i), "element ", i, " is ", back[i]);
}
