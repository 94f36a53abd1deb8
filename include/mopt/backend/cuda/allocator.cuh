#pragma once
// A caching device allocator: cudaMalloc and cudaFree synchronise the device and cost tens of
// microseconds, so a training step must not call them (DESIGN.md: no allocation in the steady
// state). Sizes are rounded up to buckets; a freed block is kept in its bucket and handed to the
// next request of that bucket (best fit, at most twice the rounded size), so a loop that allocates
// the same shapes every step calls cudaMalloc only in its first step.
//
// Stream-ordered: a block is freed on the host while kernels that use it may still be queued, and
// is reused only by a later allocation on the same device and stream, whose work the stream runs
// after them. A block used on a second stream must be synchronised by its user before it is freed.
//
// Buckets: 512-byte granules up to 1 MiB; above, a quarter of the size's power of two (1.25, 1.5,
// 1.75, 2 MiB, ...), so rounding wastes at most 25%.
#include <cuda_runtime.h>

#include <algorithm>
#include <compare>
#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <span>
#include <unordered_map>
#include <utility>

#include "mopt/backend/cuda/device.cuh"

namespace mopt::backend::cuda {

struct AllocatorStats {
    std::size_t bytes_in_use = 0;       // rounded sizes of the live blocks
    std::size_t peak_bytes = 0;         // the most bytes_in_use has been since start or reset_peak()
    std::size_t bytes_cached = 0;       // free blocks kept for reuse
    std::size_t cuda_malloc_calls = 0;  // cudaMalloc calls that succeeded
    std::size_t cache_hits = 0;         // allocations served from a free block
};

class Allocator {
public:
    // The process-wide allocator. Deliberately never destroyed: static destructors run after the
    // CUDA runtime may have unloaded, and the driver reclaims device memory at exit anyway.
    static Allocator& instance() {
        static Allocator* const allocator = new Allocator();
        return *allocator;
    }

    [[nodiscard]] static std::size_t round_size(std::size_t bytes) {
        constexpr std::size_t granule = 512, small_limit = std::size_t{1} << 20;
        if (bytes <= small_limit) return std::max<std::size_t>((bytes + granule - 1) / granule, 1) * granule;
        std::size_t pow2 = small_limit;
        while (pow2 * 2 <= bytes) pow2 *= 2;
        const std::size_t step = pow2 / 4;
        return (bytes + step - 1) / step * step;
    }

    // bytes: any size (0 gives nullptr); the block is for work on `stream` of the current device.
    [[nodiscard]] void* allocate(std::size_t bytes, cudaStream_t stream = nullptr) {
        if (bytes == 0) return nullptr;
        const std::size_t rounded = round_size(bytes);
        int device = 0;
        check_cuda(cudaGetDevice(&device), "cudaGetDevice (Allocator::allocate)");
        const Key want{device, reinterpret_cast<std::uintptr_t>(stream), rounded};
        std::lock_guard lock(mutex_);
        auto it = free_.lower_bound(want);
        if (it != free_.end() && it->first.device == device && it->first.stream == want.stream &&
            it->first.size <= 2 * rounded) {
            void* ptr = it->second;
            const Key key = it->first;
            free_.erase(it);
            stats_.bytes_cached -= key.size;
            ++stats_.cache_hits;
            return take(ptr, key);
        }
        void* ptr = nullptr;
        cudaError_t status = cudaMalloc(&ptr, rounded);
        if (status == cudaErrorMemoryAllocation) {
            (void)cudaGetLastError();  // clear it, give the cached blocks back and try once more
            release_cached_locked(device);
            status = cudaMalloc(&ptr, rounded);
        }
        if (status != cudaSuccess) {
            (void)cudaGetLastError();
            check(false, "cuda::Allocator: cudaMalloc of ", rounded, " bytes (", bytes, " requested) on device ",
                  device, " failed: ", cudaGetErrorString(status), "; ", stats_.bytes_in_use, " bytes in use, peak ",
                  stats_.peak_bytes);
        }
        ++stats_.cuda_malloc_calls;
        return take(ptr, want);
    }

    // Returns a block from allocate() to its bucket (nullptr is ignored).
    void deallocate(void* ptr) {
        if (!ptr) return;
        std::lock_guard lock(mutex_);
        auto it = live_.find(ptr);
        check(it != live_.end(), "cuda::Allocator::deallocate: pointer was not allocated here or freed twice");
        const Key key = it->second;
        live_.erase(it);
        stats_.bytes_in_use -= key.size;
        stats_.bytes_cached += key.size;
        free_.emplace_hint(free_.lower_bound(key), key, ptr);  // first among equal sizes: LIFO, still warm in L2
    }

    // cudaFree every cached free block of every device (live blocks are untouched).
    void release_cached() {
        std::lock_guard lock(mutex_);
        release_cached_locked(-1);
    }

    [[nodiscard]] AllocatorStats stats() const {
        std::lock_guard lock(mutex_);
        return stats_;
    }
    void reset_peak() {
        std::lock_guard lock(mutex_);
        stats_.peak_bytes = stats_.bytes_in_use;
    }

private:
    struct Key {
        int device = 0;
        std::uintptr_t stream = 0;
        std::size_t size = 0;
        auto operator<=>(const Key&) const = default;
    };

    Allocator() = default;

    void* take(void* ptr, const Key& key) {
        live_.emplace(ptr, key);
        stats_.bytes_in_use += key.size;
        stats_.peak_bytes = std::max(stats_.peak_bytes, stats_.bytes_in_use);
        return ptr;
    }

    // device < 0: all devices. cudaFree waits for the blocks' pending work, so this is safe.
    void release_cached_locked(int device) {
        for (auto it = free_.begin(); it != free_.end();) {
            if (device >= 0 && it->first.device != device) {
                ++it;
                continue;
            }
            int current = 0;
            (void)cudaGetDevice(&current);
            (void)cudaSetDevice(it->first.device);
            (void)cudaFree(it->second);
            (void)cudaSetDevice(current);
            stats_.bytes_cached -= it->first.size;
            it = free_.erase(it);
        }
    }

    mutable std::mutex mutex_;
    std::multimap<Key, void*> free_;
    std::unordered_map<void*, Key> live_;
    AllocatorStats stats_;
};

// An owning block from Allocator::instance(); returned to the cache when destroyed.
class DeviceBlock {
public:
    DeviceBlock() = default;
    explicit DeviceBlock(std::size_t bytes, cudaStream_t stream = nullptr)
        : ptr_(Allocator::instance().allocate(bytes, stream)), bytes_(bytes) {}
    DeviceBlock(const DeviceBlock&) = delete;
    DeviceBlock& operator=(const DeviceBlock&) = delete;
    DeviceBlock(DeviceBlock&& o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
    DeviceBlock& operator=(DeviceBlock&& o) noexcept {
        std::swap(ptr_, o.ptr_);
        std::swap(bytes_, o.bytes_);
        return *this;
    }
    ~DeviceBlock() {
        if (ptr_) Allocator::instance().deallocate(ptr_);
    }

    [[nodiscard]] void* get() const { return ptr_; }
    [[nodiscard]] std::size_t bytes() const { return bytes_; }  // as requested, before rounding

private:
    void* ptr_ = nullptr;
    std::size_t bytes_ = 0;
};

// A typed view of an owning DeviceBlock: `count` values of T.
template <class T>
class DeviceArray {
public:
    DeviceArray() = default;
    explicit DeviceArray(std::size_t count, cudaStream_t stream = nullptr)
        : block_(count * sizeof(T), stream), count_(count) {}

    // Blocking copies (tests, setup); a step keeps its data on the device.
    void upload(std::span<const T> host) {
        check(host.size() == count_, "DeviceArray::upload: ", host.size(), " values into an array of ", count_);
        if (count_)
            check_cuda(cudaMemcpy(data(), host.data(), count_ * sizeof(T), cudaMemcpyHostToDevice),
                       "cudaMemcpy (DeviceArray::upload)");
    }
    void download(std::span<T> host) const {
        check(host.size() == count_, "DeviceArray::download: ", count_, " values into ", host.size());
        if (count_)
            check_cuda(cudaMemcpy(host.data(), data(), count_ * sizeof(T), cudaMemcpyDeviceToHost),
                       "cudaMemcpy (DeviceArray::download)");
    }
    void zero(cudaStream_t stream = nullptr) {
        if (count_)
            check_cuda(cudaMemsetAsync(data(), 0, count_ * sizeof(T), stream), "cudaMemsetAsync (DeviceArray::zero)");
    }

    [[nodiscard]] T* data() const { return static_cast<T*>(block_.get()); }
    [[nodiscard]] std::size_t size() const { return count_; }

private:
    DeviceBlock block_;
    std::size_t count_ = 0;
};

}  // namespace mopt::backend::cuda
