#pragma once
// Helpers shared by the tests: seeded random tensors and parameters, finite-difference checks of
// the gradients that backward() leaves in Parameters, temporary folders, and the models under
// ../shared/models with the skip that tests take when they are missing.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <initializer_list>
#include <optional>
#include <random>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include <catch2/catch.hpp>

#include <mopt/mopt.hpp>

namespace mopt::test {

// The names most tests use, for a test file's `using namespace mopt::test;`.
using mopt::DType;
using mopt::Shape;
using mopt::Tensor;
using autodiff::NoGrad;
using autodiff::Parameter;
using autodiff::Tape;
using autodiff::Var;

// Uniform values in [lo, hi), reproducible from the seed.
inline Tensor random_tensor(Shape shape, std::uint64_t seed, float lo = -1.0f, float hi = 1.0f) {
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<float> dist(lo, hi);
    Tensor t = Tensor::empty(shape);
    for (auto& v : t.span()) v = dist(rng);
    return t;
}

// Integer ids uniform in [0, bound).
inline Tensor random_ids(Shape shape, std::uint64_t seed, std::int32_t bound) {
    std::mt19937_64 rng(seed);
    std::uniform_int_distribution<std::int32_t> dist(0, bound - 1);
    Tensor t = Tensor::empty(shape, DType::i32);
    for (auto& v : t.span<std::int32_t>()) v = dist(rng);
    return t;
}

// ---- Parameters of a layer (anything with visit(f)) ----

// Overwrites every parameter a layer visits with uniform values in [-scale, scale), the i-th drawn
// from seed + i: the default normal(0, 0.02) init makes attention nearly uniform and activations
// nearly linear, which a wrong mask or activation could pass unnoticed.
template <class L>
void randomize(L& layer, std::uint64_t seed, float scale = 0.5f) {
    layer.visit([&](autodiff::Parameter& p) {
        Tensor r = random_tensor(p.shape(), seed++, -scale, scale);
        std::copy_n(r.f32(), r.numel(), p.value().f32());
    });
}

template <class L>
std::vector<autodiff::Parameter*> parameters_of(L& layer) {
    std::vector<autodiff::Parameter*> ps;
    layer.visit([&](autodiff::Parameter& p) { ps.push_back(&p); });
    return ps;
}

// Overwrites the matrices (rank-2 parameters) of a model with uniform values in [-scale, scale),
// the i-th matrix drawn from seed + i; norm weights keep their init. Logits of such a model are
// not flat, so greedy and sampled paths are not decided by rounding.
template <class Model>
void randomize_matrices(Model& model, std::uint64_t seed, float scale) {
    model.visit_parameters([&](autodiff::Parameter& p) {
        if (p.shape().rank() == 2) p.value().copy_from(random_tensor(p.shape(), seed++, -scale, scale));
    });
}

// ---- Finite-difference gradient checks over Parameters ----
// autodiff::gradcheck checks the gradients of tape inputs; these check what backward() leaves in
// Parameters' gradient buffers (and, for a layer, in its input), by central differences of a
// scalar loss evaluated in double: |analytic − numeric| <= atol + rtol · max(|analytic|, |numeric|).

struct FdOptions {
    float eps = 1e-2f;
    int per_tensor = 24;        // coordinates probed per tensor: all when it has fewer, else random ones
    bool probe_no_grad = true;  // evaluate the perturbed losses under NoGrad (off where a loss term,
                                // such as a router's auxiliary loss, exists only while training)
    double atol = 2e-3;
    double rtol = 2e-2;
    std::uint64_t seed = 7;  // draws R (layers) and the random coordinates
};

struct FdResult {
    bool ok = true;
    int checked = 0;
    double max_abs_error = 0.0;
    std::string worst;              // the worst coordinate: tensor, index, analytic, numeric
    std::vector<double> max_grad;   // per target, in order: max |analytic| over its whole gradient
    double max_checked_grad = 0.0;  // max |analytic| over the probed coordinates
};

inline std::string describe(const FdResult& r) {
    std::ostringstream os;
    os << (r.ok ? "ok" : "FAILED") << ", " << r.checked << " coordinates, max |error| " << r.max_abs_error
       << ", worst " << r.worst << ", max |grad| " << r.max_checked_grad;
    return os.str();
}

// One tensor whose gradient is checked: its value (perturbed in place, so it must share storage
// with what the loss reads), the analytic gradient, and the coordinates to probe.
struct FdTarget {
    std::string name;
    Tensor value;
    Tensor grad;
    std::vector<std::int64_t> coords;
};

// Central differences of `loss` at every target's coordinates against the analytic gradients.
inline FdResult check_parameter_gradients(std::vector<FdTarget>& targets, const std::function<double()>& loss,
                                          const FdOptions& o) {
    auto probe = [&] {
        std::optional<autodiff::NoGrad> no_grad;
        if (o.probe_no_grad) no_grad.emplace();
        return loss();
    };
    FdResult res;
    for (FdTarget& target : targets) {
        double mg = 0.0;
        for (std::int64_t c = 0; c < target.grad.numel(); ++c) mg = std::max(mg, std::abs(double(target.grad.at(c))));
        res.max_grad.push_back(mg);
        for (const std::int64_t c : target.coords) {
            float& v = target.value.at(c);
            const float saved = v;
            v = saved + o.eps;
            const double plus = probe();
            v = saved - o.eps;
            const double minus = probe();
            v = saved;
            const double numeric = (plus - minus) / (2.0 * o.eps), analytic = target.grad.at(c);
            const double err = std::abs(numeric - analytic);
            ++res.checked;
            res.max_checked_grad = std::max(res.max_checked_grad, std::abs(analytic));
            if (err > o.atol + o.rtol * std::max(std::abs(numeric), std::abs(analytic))) res.ok = false;
            if (err >= res.max_abs_error) {
                res.max_abs_error = err;
                std::ostringstream os;
                os << target.name << "[" << c << "]: analytic " << analytic << ", numeric " << numeric;
                res.worst = os.str();
            }
        }
    }
    return res;
}

// build: the layer's output from its input. x: the input (perturbed in place during the check).
using LayerBuild = std::function<autodiff::Var(autodiff::Tape&, const autodiff::Var&)>;

// Checks a layer with L = Σ out ⊙ R for a fixed normal R: the gradients the tape back-propagates
// into x and into `params` against central differences on o.per_tensor coordinates of each.
// Targets in FdResult::max_grad: x first, then the parameters in order.
inline FdResult check_layer_gradients(const LayerBuild& build, Tensor x, const std::vector<autodiff::Parameter*>& params,
                                      const FdOptions& o = {}) {
    for (autodiff::Parameter* p : params) p->zero_grad();
    std::mt19937_64 rng(o.seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    autodiff::Tape tape;
    autodiff::Var xv = tape.input(x);
    autodiff::Var out = build(tape, xv);
    Tensor r = Tensor::empty(out.shape());
    for (float& v : r.span()) v = normal(rng);
    tape.backward(out, r);

    std::vector<FdTarget> targets{{"x", x, xv.grad().defined() ? xv.grad().clone() : Tensor::zeros(x.shape()), {}}};
    for (autodiff::Parameter* p : params) targets.push_back({p->name(), p->value(), p->grad().clone(), {}});
    for (FdTarget& t : targets) {
        const std::int64_t n = t.value.numel();
        std::uniform_int_distribution<std::int64_t> pick(0, n - 1);
        for (int j = 0; j < std::min<std::int64_t>(n, o.per_tensor); ++j) t.coords.push_back(n <= o.per_tensor ? j : pick(rng));
    }
    return check_parameter_gradients(targets, [&] {
        autodiff::Tape t;
        const Tensor& y = build(t, t.constant(x)).value();
        double l = 0.0;
        for (std::int64_t k = 0; k < y.numel(); ++k) l += static_cast<double>(y.at(k)) * r.at(k);
        return l;
    }, o);
}

// ---- Tokenizers and files ----

// A tokenizer of single characters for small synthetic corpora: id 3 + (byte mod symbols), BOS 1,
// EOS 2; decode drops the special ids.
struct ByteTokenizer {
    int symbols = 256;
    [[nodiscard]] std::vector<std::int32_t> encode(std::string_view text, bool add_bos = true) const {
        std::vector<std::int32_t> ids;
        if (add_bos) ids.push_back(1);
        for (unsigned char c : text) ids.push_back(3 + c % symbols);
        return ids;
    }
    [[nodiscard]] std::string decode(std::span<const std::int32_t> ids) const {
        std::string s;
        for (auto i : ids)
            if (i >= 3) s.push_back(static_cast<char>(i - 3));
        return s;
    }
    [[nodiscard]] std::int64_t vocab_size() const { return 3 + symbols; }
    [[nodiscard]] std::int32_t bos_id() const { return 1; }
    [[nodiscard]] std::int32_t eos_id() const { return 2; }
};

// A fresh, uniquely named folder under the system temp folder, removed with everything in it at
// scope exit (also when a REQUIRE fails).
struct TempDir {
    std::filesystem::path path;
    explicit TempDir(const std::string& prefix = "mopt-test") {
        std::random_device rd;
        path = std::filesystem::temp_directory_path() /
               (prefix + "-" + std::to_string(rd()) + "-" + std::to_string(rd()));
        std::filesystem::create_directories(path);
    }
    ~TempDir() {
        std::error_code ec;
        std::filesystem::remove_all(path, ec);
    }
    TempDir(const TempDir&) = delete;
    TempDir& operator=(const TempDir&) = delete;
    std::filesystem::path operator/(const std::string& name) const { return path / name; }
    // Writes `bytes` to the file `rel` below the folder (making its parent folders); returns its path.
    std::filesystem::path write(const std::string& rel, const std::string& bytes) const {
        const std::filesystem::path file = path / rel;
        std::filesystem::create_directories(file.parent_path());
        std::ofstream(file, std::ios::binary) << bytes;
        return file;
    }
    // How many files and folders the folder holds (not recursively).
    [[nodiscard]] std::size_t entries() const {
        return static_cast<std::size_t>(std::distance(std::filesystem::directory_iterator(path),
                                                      std::filesystem::directory_iterator{}));
    }
};

#ifdef MOPT_SHARED_DIR
// A file under ../shared/models (stories260K.bin, tok512.bin, ...).
inline std::filesystem::path shared_model(const std::string& name) {
    return std::filesystem::path(MOPT_SHARED_DIR) / "models" / name;
}
// The llama2.c stories260K model and its 512-token tokenizer (karpathy/tinyllamas).
inline std::filesystem::path stories260k() { return shared_model("stories260K.bin"); }
inline std::filesystem::path tok512() { return shared_model("tok512.bin"); }
#endif

// True when every file exists; otherwise WARNs "skipped: <what>: <file> missing" (Catch2 v2 has
// no SKIP) and returns false, for the test to return.
inline bool have_files(std::initializer_list<std::filesystem::path> files, const std::string& what = "skipped") {
    for (const auto& f : files)
        if (!std::filesystem::exists(f)) {
            WARN(what << ": " << f << " missing (see ../shared/models/README.md)");
            return false;
        }
    return true;
}

}  // namespace mopt::test
