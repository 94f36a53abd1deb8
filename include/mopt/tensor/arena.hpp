#pragma once
// Arena: bump allocation of 64-byte-aligned buffers for a step's activations and gradients.
// reset() rewinds without freeing; if a step overflowed the first block, reset() replaces all
// blocks by one block of the high-water size, so from the second step on a fixed-shape step
// allocates nothing from the heap.
#include <cstddef>
#include <memory>
#include <vector>

#include "mopt/tensor/tensor.hpp"

namespace mopt {

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
            blocks_.push_back(Block{detail::aligned_buffer(size), size, 0});
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
        blocks_.push_back(Block{detail::aligned_buffer(size), size, 0});
    }

    std::vector<Block> blocks_;
    std::size_t initial_, in_use_ = 0, high_water_ = 0;
};

}  // namespace mopt
