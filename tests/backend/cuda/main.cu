// Runs every MOPT_CUDA_TEST case (optionally only those whose name contains argv[1]).
// Exit 77 (ctest: skipped) with a message where no GPU is present; 1 if any case fails.
#include <cstdio>
#include <cstring>
#include <exception>

#include <mopt/backend/cuda/device.cuh>

#include "cuda_test.cuh"

int main(int argc, char** argv) {
    if (mopt::backend::cuda::device_count() == 0) {
        std::printf("SKIPPED: no CUDA device on this machine; the CUDA tests run on a GPU machine\n");
        return 77;
    }
    int failed = 0, run = 0;
    for (const auto& c : mopt::cuda_test::registry()) {
        if (argc > 1 && !std::strstr(c.name, argv[1])) continue;
        ++run;
        try {
            c.fn();
            std::printf("passed: %s\n", c.name);
        } catch (const std::exception& e) {
            ++failed;
            std::printf("FAILED: %s: %s\n", c.name, e.what());
        }
    }
    std::printf("%d of %d CUDA test cases passed\n", run - failed, run);
    return failed ? 1 : 0;
}
