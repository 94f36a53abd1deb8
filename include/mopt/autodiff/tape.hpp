#pragma once
// Reverse-mode autodiff on a tape (Wengert list). Each op appends a Node holding its output, the
// ids of its inputs, what its backward needs (saved tensors and scalars) and a plain function
// pointer for the backward — no std::function, no per-node heap allocation. Activations and
// gradients live in the tape's Arena; reset() rewinds both, so a fixed-shape training step reaches
// a steady state with no heap growth.
//
// A node requires a gradient only when one of its inputs does: frozen parameters and data are
// constants, ops on constants record no backward, and backward() visits only nodes that lead to a
// trainable leaf (a prompt injected at layer L costs no backward work below L).
#include <array>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <vector>

#include "mopt/autodiff/parameter.hpp"
#include "mopt/tensor/arena.hpp"

namespace mopt::autodiff {

class Tape;
struct Node;
using BackwardFn = void (*)(Tape&, Node&);

struct Node {
    Tensor value;                          // the op's output
    Tensor grad;                           // d loss / d value; defined once something flows in
    BackwardFn backward = nullptr;         // null for leaves and for nodes that need no gradient
    const char* op = "leaf";
    std::array<std::int32_t, 4> in{-1, -1, -1, -1};
    std::uint8_t num_in = 0;
    bool requires_grad = false;
    std::array<Tensor, 3> saved{};         // extra tensors the backward needs (stats, indices, targets)
    std::array<double, 4> f{};             // scalar attributes (eps, scale, theta, ...)
    std::array<std::int64_t, 4> i{};       // integer attributes (axis, offsets, ...)
    const void* context = nullptr;         // a persistent object the op reads (a packed weight)
};

namespace detail {
inline int& no_grad_depth() {
    thread_local int depth = 0;
    return depth;
}
}  // namespace detail

[[nodiscard]] inline bool grad_enabled() { return detail::no_grad_depth() == 0; }

// Within a NoGrad scope ops record no backward: evaluation, generation, finite differences.
class NoGrad {
public:
    NoGrad() { ++detail::no_grad_depth(); }
    ~NoGrad() { --detail::no_grad_depth(); }
    NoGrad(const NoGrad&) = delete;
    NoGrad& operator=(const NoGrad&) = delete;
};

// A handle to a node on a tape: cheap to copy, valid until the tape resets.
class Var {
public:
    Var() = default;
    Var(Tape* tape, std::int32_t id) : tape_(tape), id_(id) {}

    [[nodiscard]] Tape& tape() const { return *tape_; }
    [[nodiscard]] std::int32_t id() const { return id_; }
    [[nodiscard]] bool defined() const { return tape_ != nullptr; }
    [[nodiscard]] const Tensor& value() const;
    [[nodiscard]] const Tensor& grad() const;
    [[nodiscard]] const Shape& shape() const { return value().shape(); }
    [[nodiscard]] bool requires_grad() const;
    [[nodiscard]] float item() const { return value().item(); }

private:
    Tape* tape_ = nullptr;
    std::int32_t id_ = -1;
};

class Tape {
public:
    explicit Tape(std::size_t arena_bytes = 1 << 20) : arena_(arena_bytes) { nodes_.reserve(256); }
    Tape(const Tape&) = delete;
    Tape& operator=(const Tape&) = delete;

    // A model parameter: trainable ones accumulate their gradient straight into p.grad().
    Var parameter(Parameter& p) {
        Node& n = push("parameter", p.value());
        if (p.trainable() && grad_enabled()) {
            n.requires_grad = true;
            n.grad = p.grad();
        }
        return last();
    }
    // Data or a frozen tensor: never gets a gradient.
    Var constant(const Tensor& t) {
        push("constant", t);
        return last();
    }
    // A leaf whose gradient is kept on the tape (read it with var.grad() after backward()).
    Var input(const Tensor& t, bool requires_grad = true) {
        Node& n = push("input", t);
        n.requires_grad = requires_grad && grad_enabled();
        return last();
    }

    // Uninitialised / zeroed arena tensors for op outputs and scratch; valid until reset().
    [[nodiscard]] Tensor alloc(Shape shape, DType dtype = DType::f32) { return arena_.tensor(shape, dtype); }
    [[nodiscard]] Tensor zeros(Shape shape, DType dtype = DType::f32) {
        Tensor t = alloc(shape, dtype);
        t.zero();
        return t;
    }

    // Appends an op's output. The node needs a gradient iff grad mode is on and an input needs one.
    Var record(const char* op, Tensor value, std::initializer_list<Var> inputs, BackwardFn backward) {
        check(inputs.size() <= 4, "Tape::record: op ", op, " has more than 4 inputs");
        bool needs = false;
        std::array<std::int32_t, 4> ids{-1, -1, -1, -1};
        std::uint8_t k = 0;
        for (const Var& v : inputs) {
            check(v.defined() && &v.tape() == this, "Tape::record: op ", op, " got an input from another tape");
            ids[k++] = v.id();
            needs = needs || nodes_[v.id()].requires_grad;
        }
        Node& n = push(op, std::move(value));
        n.in = ids;
        n.num_in = k;
        n.requires_grad = needs && grad_enabled();
        n.backward = n.requires_grad ? backward : nullptr;
        return last();
    }

    [[nodiscard]] Node& node(std::int32_t id) { return nodes_[static_cast<std::size_t>(id)]; }
    [[nodiscard]] const Node& node(std::int32_t id) const { return nodes_[static_cast<std::size_t>(id)]; }
    [[nodiscard]] Node& node(const Var& v) { return node(v.id()); }
    [[nodiscard]] const Tensor& value_of(const Node& n, int k) const { return node(n.in[k]).value; }
    // Whether input k of node n wants a gradient (skip its backward work otherwise).
    [[nodiscard]] bool wants_grad(const Node& n, int k) const { return node(n.in[k]).requires_grad; }
    // The gradient buffer of input k of n (zero-filled on first use) to accumulate into.
    [[nodiscard]] Tensor& grad_of(const Node& n, int k) { return grad_buffer(n.in[k]); }
    [[nodiscard]] Tensor& grad_buffer(std::int32_t id) {
        Node& n = node(id);
        if (!n.grad.defined()) n.grad = zeros(n.value.shape());
        return n.grad;
    }

    // Back-propagates from a scalar loss. A NaN or Inf loss is an error naming the step.
    void backward(const Var& loss) {
        check(loss.defined() && &loss.tape() == this, "Tape::backward: the loss belongs to another tape");
        const Node& l = node(loss.id());
        check(l.value.numel() == 1, "Tape::backward: the loss must be a scalar, got shape ", l.value.shape());
        const float v = l.value.item();
        check(std::isfinite(v), "Tape::backward: the loss is ", v, " at step ", step_,
              " (op '", l.op, "'); check the learning rate and the inputs");
        check(l.requires_grad, "Tape::backward: the loss does not depend on any trainable tensor");
        grad_buffer(loss.id()).f32()[0] += 1.0f;
        run_backward(loss.id());
    }

    // Back-propagates a given output gradient (vector-Jacobian product): d(out) = grad_out.
    void backward(const Var& out, const Tensor& grad_out) {
        check(out.defined() && &out.tape() == this, "Tape::backward: the output belongs to another tape");
        check(grad_out.shape() == out.shape(), "Tape::backward: output gradient of shape ", grad_out.shape(),
              " for an output of shape ", out.shape());
        check(node(out.id()).requires_grad, "Tape::backward: the output does not depend on any trainable tensor");
        ops_add(grad_buffer(out.id()), grad_out);
        run_backward(out.id());
    }

    // Forgets this step's nodes and rewinds the arena (capacity is kept for the next step).
    void reset() {
        nodes_.clear();
        arena_.reset();
        ++step_;
    }

    [[nodiscard]] std::size_t size() const { return nodes_.size(); }
    [[nodiscard]] std::int64_t step() const { return step_; }
    [[nodiscard]] std::size_t last_backward_visits() const { return visited_; }
    [[nodiscard]] const Arena& arena() const { return arena_; }
    [[nodiscard]] std::size_t node_capacity() const { return nodes_.capacity(); }

private:
    static void ops_add(Tensor& dst, const Tensor& src) {
        float* d = dst.f32();
        const float* s = src.f32();
        for (std::int64_t k = 0; k < dst.numel(); ++k) d[k] += s[k];
    }
    void run_backward(std::int32_t from) {
        visited_ = 0;
        for (std::int32_t id = from; id >= 0; --id) {
            Node& n = node(id);
            if (!n.backward || !n.grad.defined()) continue;
            ++visited_;
            n.backward(*this, n);
        }
    }

    Node& push(const char* op, Tensor value) {
        Node& n = nodes_.emplace_back();
        n.op = op;
        n.value = std::move(value);
        return n;
    }
    [[nodiscard]] Var last() { return {this, static_cast<std::int32_t>(nodes_.size() - 1)}; }

    std::vector<Node> nodes_;
    Arena arena_;
    std::int64_t step_ = 0;
    std::size_t visited_ = 0;
};

inline const Tensor& Var::value() const { return tape_->node(id_).value; }
inline const Tensor& Var::grad() const { return tape_->node(id_).grad; }
inline bool Var::requires_grad() const { return tape_->node(id_).requires_grad; }

}  // namespace mopt::autodiff
