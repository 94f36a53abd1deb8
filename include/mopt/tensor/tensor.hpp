#pragma once
// Tensor: the one tensor type of user code. Row-major, contiguous, up to 4-D, CPU storage aligned
// to 64 bytes. A tensor either owns its buffer (shared between views through `owner_`) or borrows
// it from an Arena (activations on a Tape: no heap allocation, valid until the tape resets).
// Views — slice/select along the leading axis, reshape — share the buffer and cost nothing.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <span>
#include <vector>

#include "mopt/error.hpp"
#include "mopt/tensor/dtype.hpp"
#include "mopt/tensor/shape.hpp"

namespace mopt {

inline constexpr std::size_t tensor_alignment = 64;

namespace detail {
struct AlignedDelete {
    void operator()(std::byte* p) const { ::operator delete[](p, std::align_val_t{tensor_alignment}); }
};
inline std::shared_ptr<std::byte> aligned_buffer(std::size_t bytes) {
    // Round up so every buffer is a whole number of cache lines (SIMD tails may read to the end).
    bytes = (bytes + tensor_alignment - 1) / tensor_alignment * tensor_alignment;
    auto* p = static_cast<std::byte*>(::operator new[](std::max<std::size_t>(bytes, tensor_alignment),
                                                        std::align_val_t{tensor_alignment}));
    return {p, AlignedDelete{}};
}
}  // namespace detail

class Tensor {
public:
    Tensor() = default;

    // An owning, uninitialised tensor.
    static Tensor empty(Shape shape, DType dtype = DType::f32) {
        Tensor t;
        t.shape_ = shape;
        t.dtype_ = dtype;
        t.owner_ = detail::aligned_buffer(storage_bytes(dtype, static_cast<std::size_t>(shape.numel())));
        t.data_ = t.owner_.get();
        return t;
    }
    static Tensor zeros(Shape shape, DType dtype = DType::f32) {
        Tensor t = empty(shape, dtype);
        std::memset(t.data_, 0, t.bytes());
        return t;
    }
    static Tensor full(Shape shape, float value) {
        Tensor t = empty(shape);
        t.fill(value);
        return t;
    }
    // An owning f32 tensor holding a copy of `values` (numel must match).
    static Tensor from(Shape shape, std::span<const float> values) {
        check(static_cast<std::int64_t>(values.size()) == shape.numel(), "Tensor::from: ", values.size(),
              " values do not fill shape ", shape);
        Tensor t = empty(shape);
        std::copy(values.begin(), values.end(), t.data<float>());
        return t;
    }
    static Tensor from(Shape shape, std::span<const std::int32_t> values) {
        check(static_cast<std::int64_t>(values.size()) == shape.numel(), "Tensor::from: ", values.size(),
              " values do not fill shape ", shape);
        Tensor t = empty(shape, DType::i32);
        std::copy(values.begin(), values.end(), t.data<std::int32_t>());
        return t;
    }
    // A non-owning view of memory someone else keeps alive (an Arena, a mapped file).
    static Tensor borrow(void* data, Shape shape, DType dtype = DType::f32) {
        Tensor t;
        t.data_ = static_cast<std::byte*>(data);
        t.shape_ = shape;
        t.dtype_ = dtype;
        return t;
    }

    [[nodiscard]] bool defined() const { return data_ != nullptr || shape_.rank() > 0; }
    [[nodiscard]] const Shape& shape() const { return shape_; }
    [[nodiscard]] int rank() const { return shape_.rank(); }
    [[nodiscard]] std::int64_t dim(int i) const { return shape_[i]; }
    [[nodiscard]] std::int64_t numel() const { return shape_.numel(); }
    [[nodiscard]] DType dtype() const { return dtype_; }
    [[nodiscard]] std::size_t bytes() const { return storage_bytes(dtype_, static_cast<std::size_t>(numel())); }
    [[nodiscard]] bool owns_storage() const { return owner_ != nullptr; }
    [[nodiscard]] const void* raw() const { return data_; }
    [[nodiscard]] void* raw() { return data_; }

    template <class T> [[nodiscard]] T* data() {
        check(dtype_ == dtype_of<T>(), "Tensor: accessed a ", name(dtype_), " tensor of shape ", shape_,
              " as ", name(dtype_of<T>()));
        return reinterpret_cast<T*>(data_);
    }
    template <class T> [[nodiscard]] const T* data() const { return const_cast<Tensor*>(this)->data<T>(); }
    [[nodiscard]] float* f32() { return data<float>(); }
    [[nodiscard]] const float* f32() const { return data<float>(); }
    template <class T = float> [[nodiscard]] std::span<T> span() { return {data<T>(), static_cast<std::size_t>(numel())}; }
    template <class T = float> [[nodiscard]] std::span<const T> span() const {
        return {data<T>(), static_cast<std::size_t>(numel())};
    }
    // Element access for tests and small tools (not for hot loops).
    [[nodiscard]] float& at(std::int64_t i) { return f32()[i]; }
    [[nodiscard]] float at(std::int64_t i) const { return f32()[i]; }
    [[nodiscard]] float item() const {
        check(numel() == 1, "Tensor::item: tensor of shape ", shape_, " is not a scalar");
        return f32()[0];
    }

    // Rows [begin, end) of the leading axis; shares storage.
    [[nodiscard]] Tensor slice(std::int64_t begin, std::int64_t end) const {
        check(rank() >= 1 && 0 <= begin && begin <= end && end <= dim(0), "Tensor::slice: range [", begin, ", ",
              end, ") out of bounds for shape ", shape_);
        Tensor t = *this;
        t.shape_[0] = end - begin;
        t.data_ += storage_bytes(dtype_, static_cast<std::size_t>(begin * shape_.numel() / std::max<std::int64_t>(dim(0), 1)));
        check(dtype_ != DType::q4 || (begin * (shape_.numel() / std::max<std::int64_t>(dim(0), 1))) % 2 == 0,
              "Tensor::slice: q4 slice must start on a byte boundary");
        return t;
    }
    // Index `i` of the leading axis, dropping that axis; shares storage.
    [[nodiscard]] Tensor select(std::int64_t i) const {
        Tensor t = slice(i, i + 1);
        t.shape_ = shape_.drop_front();
        return t;
    }
    // Same elements, new extents (numel must match); shares storage.
    [[nodiscard]] Tensor reshape(Shape shape) const {
        check(shape.numel() == numel(), "Tensor::reshape: cannot view shape ", shape_, " as ", shape);
        Tensor t = *this;
        t.shape_ = shape;
        return t;
    }

    [[nodiscard]] Tensor clone() const {
        Tensor t = empty(shape_, dtype_);
        if (bytes()) std::memcpy(t.data_, data_, bytes());
        return t;
    }
    void copy_from(const Tensor& src) {
        check(src.shape_ == shape_ && src.dtype_ == dtype_, "Tensor::copy_from: shape ", src.shape_, " ",
              name(src.dtype_), " into ", shape_, " ", name(dtype_));
        if (bytes()) std::memmove(data_, src.data_, bytes());
    }
    void fill(float v) { std::fill_n(f32(), numel(), v); }
    void zero() {
        if (bytes()) std::memset(data_, 0, bytes());
    }

    [[nodiscard]] std::vector<float> to_vector() const { return {span().begin(), span().end()}; }

private:
    std::shared_ptr<std::byte> owner_;
    std::byte* data_ = nullptr;
    Shape shape_;
    DType dtype_ = DType::f32;
};

}  // namespace mopt
