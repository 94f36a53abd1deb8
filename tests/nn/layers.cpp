// Tests of the layers of nn/: Linear, RMSNorm and LayerNorm, Attention<Rotary> (GQA, prefix) and
// Attention<LearnedPositions>, and Mlp with SwiGLU, GELU and ReLU. Each forward is compared with a
// naive loop in double written here from the definitions (not from the library's code), and the
// attention layer and the SwiGLU Mlp get finite-difference gradient checks w.r.t. their input
// and every weight matrix.
#include <cmath>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "test_util.hpp"

using namespace mopt::test;

namespace {

// y[r, o] = Σ_i x[r, i] W[o, i] in double. x: [rows, in] (any leading shape), W: [out, in] -> [rows, out]
std::vector<double> naive_linear(const std::vector<double>& x, const Tensor& w) {
    const std::int64_t out = w.dim(0), in = w.dim(1), rows = static_cast<std::int64_t>(x.size()) / in;
    std::vector<double> y(static_cast<std::size_t>(rows * out), 0.0);
    for (std::int64_t r = 0; r < rows; ++r)
        for (std::int64_t o = 0; o < out; ++o) {
            double acc = 0.0;
            for (std::int64_t i = 0; i < in; ++i) acc += x[r * in + i] * static_cast<double>(w.at(o * in + i));
            y[r * out + o] = acc;
        }
    return y;
}

std::vector<double> to_double(const Tensor& t) { return {t.f32(), t.f32() + t.numel()}; }

// |got - want| <= tol · max(1, max |want|) element by element, reporting the first mismatch.
void require_close(const Tensor& got, const std::vector<double>& want, double tol) {
    REQUIRE(got.numel() == static_cast<std::int64_t>(want.size()));
    double scale = 1.0;
    for (double w : want) scale = std::max(scale, std::abs(w));
    for (std::int64_t i = 0; i < got.numel(); ++i) {
        INFO("element " << i << " of " << got.shape());
        REQUIRE(std::abs(static_cast<double>(got.at(i)) - want[static_cast<std::size_t>(i)]) <= tol * scale);
    }
}

mopt::nn::ModelConfig attention_config() {
    mopt::nn::ModelConfig c;
    c.vocab_size = 16;
    c.d_model = 32;
    c.n_layers = 2;
    c.n_heads = 4;
    c.n_kv_heads = 2;  // GQA: query heads {0, 1} read kv head 0, {2, 3} read kv head 1
    c.d_ff = 24;
    c.max_seq = 32;
    c.rope_theta = 500.0f;  // not the default, so a hard-coded 10000 fails
    return c;
}

// The attention layer from its definition, in double. x: [B, T, d] -> [B, T, d]
//   q, k, v = x Wqᵀ, x Wkᵀ, x Wvᵀ; rotate-half RoPE: pair (i, i + Dh/2) turned by
//   (start_pos + t) · theta^(-2i/Dh); query head h reads kv head h / (H / Hkv); key j is seen by
//   query t when j <= t or j < prefix; softmax(q·k / √Dh) v; then o_proj.
template <class L>
std::vector<double> naive_attention_layer(const Tensor& x, L& layer, bool rotary, double theta, std::int64_t prefix,
                                          std::int64_t start_pos = 0) {
    const std::int64_t B = x.dim(0), T = x.dim(1), d = x.dim(2);
    const std::int64_t H = layer.heads, Hkv = layer.kv_heads, Dh = layer.head_dim, half = Dh / 2;
    std::vector<double> q = naive_linear(to_double(x), layer.q_proj.weight.value());
    std::vector<double> k = naive_linear(to_double(x), layer.k_proj.weight.value());
    std::vector<double> v = naive_linear(to_double(x), layer.v_proj.weight.value());
    auto rotate = [&](std::vector<double>& a, std::int64_t heads) {
        for (std::int64_t b = 0; b < B; ++b)
            for (std::int64_t t = 0; t < T; ++t)
                for (std::int64_t h = 0; h < heads; ++h)
                    for (std::int64_t i = 0; i < half; ++i) {
                        const double angle =
                            static_cast<double>(start_pos + t) * std::pow(theta, -2.0 * double(i) / double(Dh));
                        double& a0 = a[((b * T + t) * heads + h) * Dh + i];
                        double& a1 = a[((b * T + t) * heads + h) * Dh + i + half];
                        const double x0 = a0, x1 = a1;
                        a0 = x0 * std::cos(angle) - x1 * std::sin(angle);
                        a1 = x0 * std::sin(angle) + x1 * std::cos(angle);
                    }
    };
    if (rotary) {
        rotate(q, H);
        rotate(k, Hkv);
    }
    std::vector<double> o(static_cast<std::size_t>(B * T * H * Dh), 0.0);
    for (std::int64_t b = 0; b < B; ++b)
        for (std::int64_t h = 0; h < H; ++h) {
            const std::int64_t kh = h / (H / Hkv);
            for (std::int64_t t = 0; t < T; ++t) {
                std::vector<double> w(static_cast<std::size_t>(T), 0.0);
                double mx = -1e300, total = 0.0;
                for (std::int64_t j = 0; j < T; ++j) {
                    if (!(j <= t || j < prefix)) continue;
                    double s = 0.0;
                    for (std::int64_t i = 0; i < Dh; ++i)
                        s += q[((b * T + t) * H + h) * Dh + i] * k[((b * T + j) * Hkv + kh) * Dh + i];
                    w[j] = s / std::sqrt(static_cast<double>(Dh));
                    mx = std::max(mx, w[j]);
                }
                for (std::int64_t j = 0; j < T; ++j) {
                    w[j] = (j <= t || j < prefix) ? std::exp(w[j] - mx) : 0.0;
                    total += w[j];
                }
                for (std::int64_t i = 0; i < Dh; ++i) {
                    double acc = 0.0;
                    for (std::int64_t j = 0; j < T; ++j) acc += w[j] / total * v[((b * T + j) * Hkv + kh) * Dh + i];
                    o[((b * T + t) * H + h) * Dh + i] = acc;
                }
            }
        }
    (void)d;
    return naive_linear(o, layer.o_proj.weight.value());
}

double gelu_tanh(double x) {
    return 0.5 * x * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
}
double gelu_erf(double x) { return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0))); }

}  // namespace

TEST_CASE("Linear is x Wᵀ", "[nn][layers]") {
    std::mt19937_64 rng(3);
    mopt::nn::Linear lin("proj", 4, 5, rng);
    randomize(lin, 11);
    CHECK(lin.weight.name() == "proj.weight");
    CHECK(lin.weight.shape() == Shape{4, 5});
    Tensor x = random_tensor({2, 3, 5}, 12);
    Tape tape;
    Var y = lin(tape, tape.constant(x));
    REQUIRE(y.shape() == Shape{2, 3, 4});
    require_close(y.value(), naive_linear(to_double(x), lin.weight.value()), 1e-6);
}

TEST_CASE("RMSNorm and LayerNorm layers match their definitions", "[nn][layers][norm]") {
    const std::int64_t d = 6;
    // A large eps on small inputs, so an eps that is dropped or misplaced changes the result.
    const float eps = 0.05f;
    Tensor x = random_tensor({2, 3, d}, 21, -0.4f, 0.4f);

    SECTION("RMSNorm: x / √(mean(x²) + eps) ⊙ w") {
        mopt::nn::RMSNorm::Layer norm("model.norm", d, eps);
        CHECK(norm.weight.name() == "model.norm.weight");
        for (std::int64_t i = 0; i < d; ++i) CHECK(norm.weight.value().at(i) == 1.0f);  // starts at 1
        randomize(norm, 22, 1.5f);
        Tape tape;
        Var y = norm(tape, tape.constant(x));
        std::vector<double> want(static_cast<std::size_t>(x.numel()));
        for (std::int64_t r = 0; r < 6; ++r) {
            double ms = 0.0;
            for (std::int64_t j = 0; j < d; ++j) ms += double(x.at(r * d + j)) * x.at(r * d + j) / d;
            for (std::int64_t j = 0; j < d; ++j)
                want[r * d + j] = x.at(r * d + j) / std::sqrt(ms + eps) * norm.weight.value().at(j);
        }
        require_close(y.value(), want, 1e-5);
    }
    SECTION("LayerNorm: (x − μ) / √(σ² + eps) ⊙ w + b") {
        mopt::nn::LayerNorm::Layer norm("model.norm", d, eps);
        CHECK(parameters_of(norm).size() == 2);
        CHECK(norm.bias.name() == "model.norm.bias");
        randomize(norm, 23, 1.5f);
        Tape tape;
        Var y = norm(tape, tape.constant(x));
        std::vector<double> want(static_cast<std::size_t>(x.numel()));
        for (std::int64_t r = 0; r < 6; ++r) {
            double mu = 0.0, var = 0.0;
            for (std::int64_t j = 0; j < d; ++j) mu += double(x.at(r * d + j)) / d;
            for (std::int64_t j = 0; j < d; ++j) var += (x.at(r * d + j) - mu) * (x.at(r * d + j) - mu) / d;
            for (std::int64_t j = 0; j < d; ++j)
                want[r * d + j] =
                    (x.at(r * d + j) - mu) / std::sqrt(var + eps) * norm.weight.value().at(j) + norm.bias.value().at(j);
        }
        require_close(y.value(), want, 1e-5);
    }
}

TEST_CASE("Attention<Rotary> with GQA and a prefix matches a naive reference", "[nn][layers][attention]") {
    const auto c = attention_config();
    std::mt19937_64 rng(1);
    using Layer = mopt::nn::Attention<mopt::nn::Rotary>::Layer;
    Layer attn("model.layers.0.self_attn", c, rng);
    REQUIRE(attn.heads == 4);
    REQUIRE(attn.kv_heads == 2);
    REQUIRE(attn.head_dim == 8);
    CHECK(attn.k_proj.weight.shape() == Shape{16, 32});
    CHECK(attn.q_proj.weight.name() == "model.layers.0.self_attn.q_proj.weight");
    CHECK(attn.o_proj.weight.name() == "model.layers.0.self_attn.o_proj.weight");
    randomize(attn, 100);
    Tensor x = random_tensor({2, 7, 32}, 5);

    for (std::int64_t prefix : {0, 3}) {
        INFO("prefix " << prefix);
        Tape tape;
        Var y = attn(tape, tape.constant(x), {.prefix = prefix});
        REQUIRE(y.shape() == x.shape());
        const auto want = naive_attention_layer(x, attn, true, c.rope_theta, prefix);
        require_close(y.value(), want, 2e-5);
        // The references with and without the prefix differ, so the comparison above sees the mask.
        if (prefix > 0) {
            const auto causal_only = naive_attention_layer(x, attn, true, c.rope_theta, 0);
            double diff = 0.0;
            for (std::size_t i = 0; i < want.size(); ++i) diff = std::max(diff, std::abs(want[i] - causal_only[i]));
            CHECK(diff > 1e-3);
        }
    }
    SECTION("the references that a wrong theta or no rotation would give are far from the output") {
        Tape tape;
        Var y = attn(tape, tape.constant(x), {});
        for (const auto& wrong : {naive_attention_layer(x, attn, true, 10000.0, 0),
                                  naive_attention_layer(x, attn, false, c.rope_theta, 0)}) {
            double diff = 0.0;
            for (std::size_t i = 0; i < wrong.size(); ++i)
                diff = std::max(diff, std::abs(double(y.value().at(static_cast<std::int64_t>(i))) - wrong[i]));
            CHECK(diff > 1e-3);
        }
    }
}

TEST_CASE("Attention<LearnedPositions> is the same attention without rotation", "[nn][layers][attention]") {
    auto c = attention_config();
    c.n_kv_heads = 0;  // plain multi-head attention
    std::mt19937_64 rng(2);
    using Policy = mopt::nn::Attention<mopt::nn::LearnedPositions>;
    STATIC_REQUIRE(Policy::learned_positions);
    STATIC_REQUIRE(!mopt::nn::Attention<mopt::nn::Rotary>::learned_positions);
    Policy::Layer attn("attn", c, rng);
    REQUIRE(attn.kv_heads == 4);
    randomize(attn, 200);
    Tensor x = random_tensor({1, 6, 32}, 6);
    for (std::int64_t prefix : {0, 2}) {
        Tape tape;
        Var y = attn(tape, tape.constant(x), {.prefix = prefix});
        require_close(y.value(), naive_attention_layer(x, attn, false, c.rope_theta, prefix), 2e-5);
    }
    // start_pos must not matter without rotary positions (the table is added before the layer).
    Tape tape;
    Var a = attn(tape, tape.constant(x), {.start_pos = 0});
    Var b = attn(tape, tape.constant(x), {.start_pos = 5});
    for (std::int64_t i = 0; i < x.numel(); ++i) REQUIRE(a.value().at(i) == b.value().at(i));
}

TEST_CASE("Attention<Rotary> layer gradients match finite differences (GQA, prefix)", "[nn][layers][attention][grad]") {
    auto c = attention_config();
    c.d_model = 16;  // head_dim 4: small enough that every weight is probed often
    std::mt19937_64 rng(4);
    mopt::nn::Attention<mopt::nn::Rotary>::Layer attn("attn", c, rng);
    randomize(attn, 300);
    Tensor x = random_tensor({2, 5, 16}, 8);
    const mopt::nn::AttentionContext ctx{.prefix = 2};
    const FdResult r = check_layer_gradients([&](Tape& t, const Var& xv) { return attn(t, xv, ctx); }, x, parameters_of(attn));
    INFO(describe(r));
    CHECK(r.ok);
    CHECK(r.checked == 5 * 24);
    for (double g : r.max_grad) CHECK(g > 1e-2);  // every target gets a real gradient
}

TEST_CASE("Mlp matches SwiGLU, GELU (tanh form) and ReLU feed-forwards", "[nn][layers][mlp]") {
    mopt::nn::ModelConfig c;
    c.d_model = 8;
    c.d_ff = 12;
    c.n_layers = 2;
    Tensor x = random_tensor({2, 3, 8}, 31, -1.5f, 1.5f);
    const auto names = mopt::nn::MlpNames::llama("model.layers.0.mlp");

    SECTION("SwiGLU: down(silu(gate x) ⊙ up x)") {
        std::mt19937_64 rng(1);
        mopt::nn::Mlp<mopt::nn::SwiGLU> mlp(names, c, rng);
        REQUIRE(parameters_of(mlp).size() == 3);
        CHECK(mlp.gate.weight.name() == "model.layers.0.mlp.gate_proj.weight");
        CHECK(mlp.up.weight.name() == "model.layers.0.mlp.up_proj.weight");
        CHECK(mlp.down.weight.name() == "model.layers.0.mlp.down_proj.weight");
        randomize(mlp, 40);
        auto g = naive_linear(to_double(x), mlp.gate.weight.value());
        auto u = naive_linear(to_double(x), mlp.up.weight.value());
        for (std::size_t i = 0; i < g.size(); ++i) g[i] = g[i] / (1.0 + std::exp(-g[i])) * u[i];
        Tape tape;
        require_close(mlp(tape, tape.constant(x)).value(), naive_linear(g, mlp.down.weight.value()), 1e-5);
    }
    SECTION("GELU is the tanh approximation, not the exact erf form") {
        std::mt19937_64 rng(1);
        mopt::nn::Mlp<mopt::nn::GELU> mlp(names, c, rng);
        REQUIRE(parameters_of(mlp).size() == 2);  // no gate matrix
        // Large weights put pre-activations around ±2, where the two forms differ by ~1e-4.
        randomize(mlp, 50, 1.0f);
        auto u = naive_linear(to_double(x), mlp.up.weight.value());
        auto h_tanh = u, h_erf = u;
        for (std::size_t i = 0; i < u.size(); ++i) {
            h_tanh[i] = gelu_tanh(u[i]);
            h_erf[i] = gelu_erf(u[i]);
        }
        Tape tape;
        const Tensor y = mlp(tape, tape.constant(x)).value();
        require_close(y, naive_linear(h_tanh, mlp.down.weight.value()), 1e-6);
        const auto y_erf = naive_linear(h_erf, mlp.down.weight.value());
        double diff = 0.0;
        for (std::int64_t i = 0; i < y.numel(); ++i) diff = std::max(diff, std::abs(double(y.at(i)) - y_erf[i]));
        CHECK(diff > 1e-4);  // the exact form is told apart at this tolerance
        // A Hugging Face config must name the tanh form: "gelu" there is the exact erf GELU.
        CHECK(std::string(mopt::nn::GELU::hf_act) == "gelu_pytorch_tanh");
    }
    SECTION("ReLU: down(max(up x, 0))") {
        std::mt19937_64 rng(1);
        mopt::nn::Mlp<mopt::nn::ReLU> mlp(names, c, rng);
        randomize(mlp, 60);
        auto u = naive_linear(to_double(x), mlp.up.weight.value());
        for (double& v : u) v = std::max(v, 0.0);
        Tape tape;
        require_close(mlp(tape, tape.constant(x)).value(), naive_linear(u, mlp.down.weight.value()), 1e-6);
    }
}

TEST_CASE("SwiGLU Mlp gradients match finite differences", "[nn][layers][mlp][grad]") {
    mopt::nn::ModelConfig c;
    c.d_model = 6;
    c.d_ff = 10;
    c.n_layers = 1;
    std::mt19937_64 rng(9);
    mopt::nn::Mlp<mopt::nn::SwiGLU> mlp(mopt::nn::MlpNames::mixtral_expert("e"), c, rng);
    CHECK(mlp.gate.weight.name() == "e.w1.weight");
    CHECK(mlp.up.weight.name() == "e.w3.weight");
    CHECK(mlp.down.weight.name() == "e.w2.weight");
    randomize(mlp, 70, 0.8f);
    Tensor x = random_tensor({2, 4, 6}, 10);
    const FdResult r = check_layer_gradients([&](Tape& t, const Var& xv) { return mlp(t, xv); }, x, parameters_of(mlp));
    INFO(describe(r));
    CHECK(r.ok);
    for (double g : r.max_grad) CHECK(g > 1e-2);
}
