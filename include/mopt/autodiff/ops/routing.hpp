#pragma once
// Index ops for mixture-of-experts routing: top-k selection, gather/scatter along the last axis
// (router probabilities), and gather/scatter-add of whole rows (dispatching tokens to an expert
// and combining the experts' outputs). Indices are i32 tensors and carry no gradient.
#include <algorithm>
#include <numeric>

#include "mopt/autodiff/ops/common.hpp"

namespace mopt::autodiff {

namespace ops_detail {
// Checks that every index lies in [0, bound) and names the first one that does not.
inline void expect_indices(const char* op, const Tensor& idx, std::int64_t bound, const char* what) {
    expect_dtype(op, idx, DType::i32, what);
    const std::int32_t* p = idx.data<std::int32_t>();
    for (std::int64_t i = 0; i < idx.numel(); ++i)
        check(p[i] >= 0 && p[i] < bound, op, ": ", what, " ", p[i], " at position ", i, " is outside [0, ", bound, ")");
}

inline Var gather_rows_impl(const char* op, const Var& x, const Tensor& rows) {
    const Tensor& tx = x.value();
    check(tx.rank() == 2, op, ": table must be 2-D [n, d], got shape ", tx.shape());
    expect_indices(op, rows, tx.dim(0), "index");
    const std::int64_t d = tx.dim(1), m = rows.numel();
    check(rows.rank() < Shape::max_rank, op, ": indices of shape ", rows.shape(), " leave no room for the feature axis");
    Shape shape;  // rows' shape with d appended
    if (rows.rank() == 0) shape = Shape{d};
    else if (rows.rank() == 1) shape = Shape{rows.dim(0), d};
    else if (rows.rank() == 2) shape = Shape{rows.dim(0), rows.dim(1), d};
    else shape = Shape{rows.dim(0), rows.dim(1), rows.dim(2), d};
    Tape& tape = x.tape();
    Tensor out = tape.alloc(shape);
    const std::int32_t* r = rows.data<std::int32_t>();
    parallel_for(m, d, [&](std::int64_t i) { std::copy_n(tx.f32() + r[i] * d, d, out.f32() + i * d); });
    Var y = tape.record(op, out, {x}, [](Tape& t, Node& n) {
        if (!t.wants_grad(n, 0)) return;
        // Scatter-add: repeated indices add up. Threads split the columns, so no two write one element.
        float* g = t.grad_of(n, 0).f32();
        const float* gy = n.grad.f32();
        const std::int32_t* idx = n.saved[0].data<std::int32_t>();
        const std::int64_t count = n.saved[0].numel(), cols = n.grad.shape().back();
        const std::int64_t blocks = std::min<std::int64_t>(cols, 16);
        parallel_for(blocks, count * cols / blocks, [&](std::int64_t b) {
            const std::int64_t c0 = cols * b / blocks, c1 = cols * (b + 1) / blocks;
            for (std::int64_t i = 0; i < count; ++i)
                for (std::int64_t c = c0; c < c1; ++c) g[idx[i] * cols + c] += gy[i * cols + c];
        });
    });
    if (y.requires_grad()) tape.node(y).saved[0] = rows;
    return y;
}
}  // namespace ops_detail

// Rows of x. x: [n, d], rows: i32 [...] -> [..., d]. Backward scatter-adds.
inline Var gather_rows(const Var& x, const Tensor& rows) { return ops_detail::gather_rows_impl("gather_rows", x, rows); }

// out[rows[m]] += src[m]; rows that no index names stay zero.
// src: [m, d], rows: i32 [m] -> [n, d]. Backward gathers.
inline Var scatter_add_rows(const Var& src, const Tensor& rows, std::int64_t n) {
    const char* op = "scatter_add_rows";
    const Tensor& ts = src.value();
    check(ts.rank() == 2 && rows.rank() == 1 && rows.dim(0) == ts.dim(0), op, ": src ", ts.shape(), " and rows ",
          rows.shape(), " must be [m, d] and [m]");
    ops_detail::expect_indices(op, rows, n, "row");
    const std::int64_t d = ts.dim(1);
    Tape& tape = src.tape();
    Tensor out = tape.zeros({n, d});
    const std::int32_t* r = rows.data<std::int32_t>();
    for (std::int64_t i = 0; i < rows.numel(); ++i)
        for (std::int64_t c = 0; c < d; ++c) out.f32()[r[i] * d + c] += ts.f32()[i * d + c];
    Var y = tape.record(op, out, {src}, [](Tape& t, Node& n) {
        if (!t.wants_grad(n, 0)) return;
        float* g = t.grad_of(n, 0).f32();
        const std::int32_t* idx = n.saved[0].data<std::int32_t>();
        const std::int64_t cols = n.grad.dim(1);
        ops_detail::parallel_for(n.saved[0].numel(), cols, [&](std::int64_t i) {
            for (std::int64_t c = 0; c < cols; ++c) g[i * cols + c] += n.grad.f32()[idx[i] * cols + c];
        });
    });
    if (y.requires_grad()) tape.node(y).saved[0] = rows;
    return y;
}

// acc[rows[m]] += src[m], written into acc's own buffer, which becomes the output: a mixture of
// experts sums its E experts' outputs into one [n, d] tensor at a cost of the routed rows only,
// where scatter_add_rows followed by add costs a zero-filled [n, d] tensor and a pass over it per
// expert. acc is consumed: it must be an arena tensor (an op output or tape.zeros) that nothing
// reads afterwards, and its gradient is the output's (shared, not copied).
// acc: [n, d] (consumed), src: [m, d], rows: i32 [m] -> [n, d]. Backward gathers into src.
inline Var scatter_add_rows_into(const Var& acc, const Var& src, const Tensor& rows) {
    const char* op = "scatter_add_rows_into";
    const Tensor& ta = acc.value();
    const Tensor& ts = src.value();
    check(ta.rank() == 2 && ts.rank() == 2 && ta.dim(1) == ts.dim(1) && rows.rank() == 1 &&
              rows.dim(0) == ts.dim(0),
          op, ": acc ", ta.shape(), ", src ", ts.shape(), " and rows ", rows.shape(), " must be [n, d], [m, d] and [m]");
    check(!ta.owns_storage(), op, ": acc of shape ", ta.shape(),
          " owns its storage; it must be an arena tensor the op may overwrite (e.g. tape.zeros)");
    ops_detail::expect_indices(op, rows, ta.dim(0), "row");
    Tensor out = ta;  // same buffer
    const std::int32_t* r = rows.data<std::int32_t>();
    const std::int64_t m = ts.dim(0), d = ts.dim(1);
    // Threads split the columns, so repeated rows never race.
    const std::int64_t blocks = std::min<std::int64_t>((d + 15) / 16, 16);
    ops_detail::parallel_for(blocks, m * d / blocks, [&](std::int64_t b) {
        const std::int64_t c0 = d * b / blocks, c1 = d * (b + 1) / blocks;
        float* o = out.f32();
        const float* sp = ts.f32();
        for (std::int64_t i = 0; i < m; ++i)
            for (std::int64_t c = c0; c < c1; ++c) o[r[i] * d + c] += sp[i * d + c];
    });
    Var y = acc.tape().record(op, out, {acc, src}, [](Tape& t, Node& n) {
        if (t.wants_grad(n, 0)) {
            Node& in = t.node(n.in[0]);
            if (!in.grad.defined()) in.grad = n.grad;  // d acc = d out; acc has no other reader
            else ops_detail::add_into(in.grad.f32(), n.grad.f32(), n.grad.numel());
        }
        if (!t.wants_grad(n, 1)) return;
        float* g = t.grad_of(n, 1).f32();
        const std::int32_t* idx = n.saved[0].data<std::int32_t>();
        const std::int64_t cols = n.grad.dim(1);
        ops_detail::parallel_for(n.saved[0].numel(), cols, [&](std::int64_t i) {
            for (std::int64_t c = 0; c < cols; ++c) g[i * cols + c] += n.grad.f32()[idx[i] * cols + c];
        });
    });
    if (y.requires_grad()) acc.tape().node(y).saved[0] = rows;
    return y;
}

// out[r, j] = x[r, idx[r, j]]. x: [n, e], idx: i32 [n, k] -> [n, k]. Backward scatters.
inline Var gather(const Var& x, const Tensor& idx) {
    const char* op = "gather";
    const Tensor& tx = x.value();
    check(tx.rank() == 2 && idx.rank() == 2 && idx.dim(0) == tx.dim(0), op, ": x ", tx.shape(), " and indices ",
          idx.shape(), " must be [n, e] and [n, k]");
    ops_detail::expect_indices(op, idx, tx.dim(1), "index");
    const std::int64_t n = tx.dim(0), e = tx.dim(1), k = idx.dim(1);
    Tape& tape = x.tape();
    Tensor out = tape.alloc({n, k});
    const std::int32_t* p = idx.data<std::int32_t>();
    for (std::int64_t r = 0; r < n; ++r)
        for (std::int64_t j = 0; j < k; ++j) out.f32()[r * k + j] = tx.f32()[r * e + p[r * k + j]];
    Var y = tape.record(op, out, {x}, [](Tape& t, Node& nd) {
        if (!t.wants_grad(nd, 0)) return;
        float* g = t.grad_of(nd, 0).f32();
        const std::int32_t* q = nd.saved[0].data<std::int32_t>();
        const std::int64_t rows = nd.grad.dim(0), kk = nd.grad.dim(1), ee = t.value_of(nd, 0).dim(1);
        for (std::int64_t r = 0; r < rows; ++r)
            for (std::int64_t j = 0; j < kk; ++j) g[r * ee + q[r * kk + j]] += nd.grad.f32()[r * kk + j];
    });
    if (y.requires_grad()) tape.node(y).saved[0] = idx;
    return y;
}

// out[r, idx[r, j]] = src[r, j], zero elsewhere (indices within a row must differ).
// src: [n, k], idx: i32 [n, k] -> [n, width]. Backward gathers.
inline Var scatter(const Var& src, const Tensor& idx, std::int64_t width) {
    const char* op = "scatter";
    const Tensor& ts = src.value();
    check(ts.rank() == 2 && idx.shape() == ts.shape(), op, ": src ", ts.shape(), " and indices ", idx.shape(),
          " must both be [n, k]");
    ops_detail::expect_indices(op, idx, width, "index");
    const std::int64_t n = ts.dim(0), k = ts.dim(1);
    Tape& tape = src.tape();
    Tensor out = tape.zeros({n, width});
    const std::int32_t* p = idx.data<std::int32_t>();
    for (std::int64_t r = 0; r < n; ++r)
        for (std::int64_t j = 0; j < k; ++j) out.f32()[r * width + p[r * k + j]] = ts.f32()[r * k + j];
    Var y = tape.record(op, out, {src}, [](Tape& t, Node& nd) {
        if (!t.wants_grad(nd, 0)) return;
        float* g = t.grad_of(nd, 0).f32();
        const std::int32_t* q = nd.saved[0].data<std::int32_t>();
        const std::int64_t rows = t.value_of(nd, 0).dim(0), kk = t.value_of(nd, 0).dim(1), w = nd.grad.dim(1);
        for (std::int64_t r = 0; r < rows; ++r)
            for (std::int64_t j = 0; j < kk; ++j) g[r * kk + j] += nd.grad.f32()[r * w + q[r * kk + j]];
    });
    if (y.requires_grad()) tape.node(y).saved[0] = idx;
    return y;
}

// The k largest entries of each row, in descending order (ties: the lower index first).
struct TopK {
    Var values;      // [n, k], differentiable (a gather of x)
    Tensor indices;  // i32 [n, k], owned (valid after the tape resets)
};

// x: [n, e] -> values [n, k], indices [n, k]
inline TopK topk(const Var& x, std::int64_t k) {
    const Tensor& tx = x.value();
    check(tx.rank() == 2, "topk: x must be 2-D [n, e], got shape ", tx.shape());
    check(k >= 1 && k <= tx.dim(1), "topk: k = ", k, " outside [1, ", tx.dim(1), "] for shape ", tx.shape());
    const std::int64_t n = tx.dim(0), e = tx.dim(1);
    Tensor idx = Tensor::empty({n, k}, DType::i32);
    std::int32_t* out = idx.data<std::int32_t>();
    ops_detail::parallel_for(n, e * 4, [&](std::int64_t r) {
        const float* row = tx.f32() + r * e;
        std::int32_t* o = out + r * k;
        // Partial selection over the row's indices; stable order on ties.
        std::array<std::int32_t, 256> small{};
        std::vector<std::int32_t> large;
        std::int32_t* order = small.data();
        if (e > 256) {
            large.resize(static_cast<std::size_t>(e));
            order = large.data();
        }
        std::iota(order, order + e, 0);
        std::partial_sort(order, order + k, order + e, [row](std::int32_t a, std::int32_t b) {
            return row[a] > row[b] || (row[a] == row[b] && a < b);
        });
        std::copy_n(order, k, o);
    });
    return {gather(x, idx), idx};
}

}  // namespace mopt::autodiff
