#pragma once
// Arena: bump allocation of 64-byte-aligned buffers for a step's activations and gradients.
// reset() rewinds without freeing; if a step overflowed the first block, reset() replaces all
// blocks by one block of the high-water size, so from the second step on a fixed-shape step
// allocates nothing from the heap.
//
// Blocks of 2 MiB or more are 2 MiB-aligned and advised as transparent huge pages (Linux): a new
// block's first touch then costs one page fault per 2 MiB instead of one per 4 KiB. A model's
// forward pass fills hundreds of MiB, and 4 KiB faults made a step with fresh blocks several
// times slower than a warm one (more so with many threads faulting at once).
#include <algorithm>
#include <cstddef>
#include <memory>
#include <new>
#include <vector>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "mopt/tensor/tensor.hpp"

namespace mopt {

namespace detail {
inline constexpr std::size_t huge_page_bytes = std::size_t{2} << 20;

struct HugeDelete {
    void operator()(std::byte* p) const { ::operator delete[](p, std::align_val_t{huge_page_bytes}); }
};
// An arena block: a plain aligned buffer below 2 MiB, huge-page aligned and advised above.
inline std::shared_ptr<std::byte> arena_block(std::size_t bytes) {
    if (bytes < huge_page_bytes) return aligned_buffer(bytes);
    bytes = (bytes + huge_page_bytes - 1) / huge_page_bytes * huge_page_bytes;
    auto* p = static_cast<std::byte*>(::operator new[](bytes, std::align_val_t{huge_page_bytes}));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    (void)::madvise(p, bytes, MADV_HUGEPAGE);  // advice only: without THP the block works as before
#endif
    return {p, HugeDelete{}};
}
}  // namespace detail

class Arena {
public:
    explicit Arena(std::size_t initial_bytes = 1 << 20) : initial_(initial_bytes) {}

    void* allocate(std::size_t bytes) {
        bytes = round_up(std::max<std::size_t>(bytes, 1));
        if (blocks_.empty() || blocks_.back().used + bytes > blocks_.back().size) grow(bytes);
        Block& b = blocks_.back();
        void* p = b.data.get() + b.used;
        b.used += bytes;
        in_use_ += bytes;
        high_water_ = std::max(high_water_, in_use_);
        return p;
    }
    Tensor tensor(Shape shape, DType dtype = DType::f32) {
        return Tensor::borrow(allocate(storage_bytes(dtype, static_cast<std::size_t>(shape.numel()))), shape, dtype);
    }

    void reset() {
        if (blocks_.size() > 1) {
            const std::size_t size = high_water_;
            blocks_.clear();
            blocks_.push_back(Block{detail::arena_block(size), size, 0});
        } else if (!blocks_.empty()) {
            blocks_.back().used = 0;
        }
        in_use_ = 0;
    }

    [[nodiscard]] std::size_t capacity() const {
        std::size_t c = 0;
        for (const auto& b : blocks_) c += b.size;
        return c;
    }
    [[nodiscard]] std::size_t in_use() const { return in_use_; }
    [[nodiscard]] std::size_t high_water() const { return high_water_; }
    [[nodiscard]] std::size_t blocks() const { return blocks_.size(); }

private:
    struct Block {
        std::shared_ptr<std::byte> data;
        std::size_t size = 0, used = 0;
    };
    static std::size_t round_up(std::size_t n) { return (n + tensor_alignment - 1) / tensor_alignment * tensor_alignment; }
    void grow(std::size_t at_least) {
        const std::size_t size = std::max({at_least, initial_, capacity()});
        blocks_.push_back(Block{detail::arena_block(size), size, 0});
    }

    std::vector<Block> blocks_;
    std::size_t initial_, in_use_ = 0, high_water_ = 0;
};

}  // namespace mopt
