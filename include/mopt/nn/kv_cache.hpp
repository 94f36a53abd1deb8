#pragma once
// KVCache: the keys and values of the positions already seen, per layer, so that generation
// feeds one new token per step instead of the whole text again.
#include <cstdint>
#include <vector>

#include "mopt/nn/config.hpp"
#include "mopt/tensor/tensor.hpp"

namespace mopt::nn {

class KVCache {
public:
    KVCache() = default;
    // Room for `capacity` positions (at most the model's max_seq) of `batch` sequences.
    KVCache(const ModelConfig& c, std::int64_t batch, std::int64_t capacity = 0)
        : batch_(batch), capacity_(capacity > 0 ? capacity : c.max_seq), kv_heads_(c.kv_heads()),
          head_dim_(c.head_dim()) {
        check(batch > 0, "KVCache: batch must be positive, got ", batch);
        check(capacity_ <= c.max_seq, "KVCache: capacity ", capacity_, " exceeds the model's max_seq ", c.max_seq);
        for (std::int64_t l = 0; l < c.n_layers; ++l) {
            k_.push_back(Tensor::zeros({batch_, capacity_, kv_heads_, head_dim_}));
            v_.push_back(Tensor::zeros({batch_, capacity_, kv_heads_, head_dim_}));
        }
    }

    [[nodiscard]] std::int64_t length() const { return length_; }      // positions stored
    [[nodiscard]] std::int64_t capacity() const { return capacity_; }
    [[nodiscard]] std::int64_t batch() const { return batch_; }
    void clear() { length_ = 0; }
    // Called once per forward, after every layer has appended its `steps` new positions.
    void advance(std::int64_t steps) { length_ += steps; }

    // Stores the new keys/values of layer l at [length, length + T) and returns all keys and
    // values [0, length + T) as contiguous copies in dst_k/dst_v ([B, length + T, Hkv, Dh]).
    // k_new, v_new: [B, T, Hkv, Dh]
    void append(std::int64_t layer, const Tensor& k_new, const Tensor& v_new, Tensor& dst_k, Tensor& dst_v) {
        const std::int64_t steps = k_new.dim(1), total = length_ + steps, row = kv_heads_ * head_dim_;
        // A cache made for another model would otherwise be indexed or copied out of bounds.
        check(layer >= 0 && layer < static_cast<std::int64_t>(k_.size()), "KVCache: layer ", layer,
              " but the cache was made for ", k_.size(), " layers (n_layers of another model?)");
        check(k_new.rank() == 4 && k_new.dim(2) == kv_heads_ && k_new.dim(3) == head_dim_ &&
                  v_new.shape() == k_new.shape(),
              "KVCache: keys ", k_new.shape(), " and values ", v_new.shape(), " do not fit a cache of ", kv_heads_,
              " kv heads × head_dim ", head_dim_, " (made for another model?)");
        check(k_new.dim(0) == batch_, "KVCache: batch ", k_new.dim(0), " but the cache holds ", batch_);
        check(total <= capacity_, "KVCache: ", total, " positions exceed the cache capacity ", capacity_,
              " (the model's context); generate fewer tokens or use a shorter prompt");
        Tensor& k = k_[static_cast<std::size_t>(layer)];
        Tensor& v = v_[static_cast<std::size_t>(layer)];
        for (std::int64_t b = 0; b < batch_; ++b) {
            const std::int64_t src = b * steps * row, at = (b * capacity_ + length_) * row;
            std::copy_n(k_new.f32() + src, steps * row, k.f32() + at);
            std::copy_n(v_new.f32() + src, steps * row, v.f32() + at);
            std::copy_n(k.f32() + b * capacity_ * row, total * row, dst_k.f32() + b * total * row);
            std::copy_n(v.f32() + b * capacity_ * row, total * row, dst_v.f32() + b * total * row);
        }
    }

private:
    std::int64_t batch_ = 0, capacity_ = 0, kv_heads_ = 0, head_dim_ = 0, length_ = 0;
    std::vector<Tensor> k_, v_;
};

}  // namespace mopt::nn
