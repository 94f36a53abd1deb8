#pragma once
// Shape: up to four extents, row-major. A value type (no heap), cheap to copy into tape nodes.
#include <algorithm>
#include <array>
#include <cstdint>
#include <initializer_list>
#include <ostream>
#include <sstream>
#include <string>

#include "mopt/error.hpp"

namespace mopt {

class Shape {
public:
    static constexpr int max_rank = 4;

    Shape() = default;
    Shape(std::initializer_list<std::int64_t> dims) {
        check(static_cast<int>(dims.size()) <= max_rank, "Shape: rank ", dims.size(),
              " exceeds the maximum of ", max_rank);
        for (auto d : dims) {
            check(d >= 0, "Shape: negative extent ", d);
            dims_[rank_++] = d;
        }
    }

    [[nodiscard]] int rank() const { return rank_; }
    [[nodiscard]] std::int64_t operator[](int i) const { return dims_[index(i)]; }
    [[nodiscard]] std::int64_t& operator[](int i) { return dims_[index(i)]; }
    // The last extent; a scalar (rank 0) is one row of one element.
    [[nodiscard]] std::int64_t back() const { return rank_ == 0 ? 1 : dims_[rank_ - 1]; }

    [[nodiscard]] std::int64_t numel() const {
        std::int64_t n = 1;
        for (int i = 0; i < rank_; ++i) n *= dims_[i];
        return n;
    }
    // Product of all extents but the last: the number of rows when viewed as a matrix.
    [[nodiscard]] std::int64_t rows() const { return rank_ == 0 ? 1 : numel() / std::max<std::int64_t>(back(), 1); }

    // The shape without its first extent (a select along the leading axis).
    [[nodiscard]] Shape drop_front() const {
        Shape s;
        for (int i = 1; i < rank_; ++i) s.dims_[s.rank_++] = dims_[i];
        return s;
    }
    [[nodiscard]] Shape with(int axis, std::int64_t extent) const {
        Shape s = *this;
        s[axis] = extent;
        return s;
    }

    friend bool operator==(const Shape& a, const Shape& b) {
        if (a.rank_ != b.rank_) return false;
        for (int i = 0; i < a.rank_; ++i)
            if (a.dims_[i] != b.dims_[i]) return false;
        return true;
    }

    [[nodiscard]] std::string str() const {
        std::ostringstream os;
        os << *this;
        return os.str();
    }
    friend std::ostream& operator<<(std::ostream& os, const Shape& s) {
        os << '[';
        for (int i = 0; i < s.rank_; ++i) os << (i ? ", " : "") << s.dims_[i];
        return os << ']';
    }

private:
    [[nodiscard]] int index(int i) const {
        if (i < 0) i += rank_;
        check(i >= 0 && i < rank_, "Shape: axis ", i, " out of range for rank ", rank_);
        return i;
    }
    std::array<std::int64_t, max_rank> dims_{};
    int rank_ = 0;
};

}  // namespace mopt
