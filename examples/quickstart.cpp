// quickstart — the main example until the compress-then-prompt experiment lands: a two-layer
// attention model learns to copy a random sequence (…, SEP, then the same symbols again) with
// mopt's own autodiff, and prints the loss curve. Copying needs attention to look back exactly
// L+1 positions, which rotary attention learns within a few hundred steps.
//
//   quickstart [--steps N] [--batch B] [--length L] [--lr LR] [--seed S] [--json PATH]
#include <boost/program_options.hpp>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <mopt/mopt.hpp>
#include <nlohmann/json.hpp>
#include <random>

namespace po = boost::program_options;
using namespace mopt;
using namespace mopt::autodiff;

namespace {

constexpr std::int32_t bos = 0, sep = 1, first_symbol = 2;

struct Config {
    std::int64_t vocab = 16, d_model = 64, heads = 4, ffn = 128, layers = 2, length = 8;
};

// A pre-norm decoder block: RMSNorm → causal rotary attention → residual; RMSNorm → SwiGLU → residual.
struct Block {
    Parameter attn_norm, wq, wk, wv, wo, ffn_norm, w_gate, w_up, w_down;
};

struct CopyModel {
    Config cfg;
    Parameter embed, final_norm, head;
    std::vector<Block> blocks;

    CopyModel(Config c, std::mt19937_64& rng) : cfg(c) {
        auto init = [&](const char* name, Shape s, float stddev) {
            std::normal_distribution<float> dist(0.0f, stddev);
            Tensor t = Tensor::empty(s);
            for (float& v : t.span()) v = dist(rng);
            return Parameter(name, t);
        };
        const float s = 1.0f / std::sqrt(static_cast<float>(c.d_model));
        embed = init("embed", {c.vocab, c.d_model}, 1.0f);
        final_norm = Parameter("final_norm", Tensor::full({c.d_model}, 1.0f));
        head = init("head", {c.vocab, c.d_model}, s);
        for (std::int64_t l = 0; l < c.layers; ++l)
            blocks.push_back({Parameter("attn_norm", Tensor::full({c.d_model}, 1.0f)),
                              init("wq", {c.d_model, c.d_model}, s), init("wk", {c.d_model, c.d_model}, s),
                              init("wv", {c.d_model, c.d_model}, s), init("wo", {c.d_model, c.d_model}, s),
                              Parameter("ffn_norm", Tensor::full({c.d_model}, 1.0f)),
                              init("w_gate", {c.ffn, c.d_model}, s), init("w_up", {c.ffn, c.d_model}, s),
                              init("w_down", {c.d_model, c.ffn}, 1.0f / std::sqrt(static_cast<float>(c.ffn)))});
    }

    std::vector<Parameter*> parameters() {
        std::vector<Parameter*> p{&embed, &final_norm, &head};
        for (auto& b : blocks)
            for (auto* q : {&b.attn_norm, &b.wq, &b.wk, &b.wv, &b.wo, &b.ffn_norm, &b.w_gate, &b.w_up, &b.w_down})
                p.push_back(q);
        return p;
    }

    // ids: i32 [B, T] -> logits [B, T, vocab]
    Var forward(Tape& tape, const Tensor& ids) {
        const std::int64_t B = ids.dim(0), T = ids.dim(1), H = cfg.heads, Dh = cfg.d_model / H;
        Var x = embedding(tape.parameter(embed), ids);
        for (auto& b : blocks) {
            Var h = rms_norm(x, tape.parameter(b.attn_norm));
            Var q = rope(reshape(linear(h, tape.parameter(b.wq)), {B, T, H, Dh}));
            Var k = rope(reshape(linear(h, tape.parameter(b.wk)), {B, T, H, Dh}));
            Var v = reshape(linear(h, tape.parameter(b.wv)), {B, T, H, Dh});
            x = add(x, linear(reshape(attention(q, k, v), {B, T, cfg.d_model}), tape.parameter(b.wo)));
            h = rms_norm(x, tape.parameter(b.ffn_norm));
            Var f = swiglu(linear(h, tape.parameter(b.w_gate)), linear(h, tape.parameter(b.w_up)));
            x = add(x, linear(f, tape.parameter(b.w_down)));
        }
        return linear(rms_norm(x, tape.parameter(final_norm)), tape.parameter(head));
    }
};

// A batch of [BOS, s_1..s_L, SEP, s_1..s_L]; only the predictions of the copy count.
struct Batch {
    Tensor ids, targets;
};
Batch make_batch(std::int64_t batch, std::int64_t length, std::int64_t vocab, std::mt19937_64& rng) {
    const std::int64_t T = 2 * length + 2;
    Batch b{Tensor::empty({batch, T}, DType::i32), Tensor::empty({batch, T}, DType::i32)};
    std::uniform_int_distribution<std::int32_t> symbol(first_symbol, static_cast<std::int32_t>(vocab) - 1);
    auto* ids = b.ids.data<std::int32_t>();
    auto* tgt = b.targets.data<std::int32_t>();
    for (std::int64_t r = 0; r < batch; ++r) {
        std::int32_t* s = ids + r * T;
        s[0] = bos;
        for (std::int64_t i = 0; i < length; ++i) s[1 + i] = symbol(rng);
        s[length + 1] = sep;
        for (std::int64_t i = 0; i < length; ++i) s[length + 2 + i] = s[1 + i];
        for (std::int64_t t = 0; t < T; ++t)  // position t predicts token t+1 when that is a copied symbol
            tgt[r * T + t] = (t >= length + 1 && t + 1 < T) ? s[t + 1] : -100;
    }
    return b;
}

// Accuracy of greedy predictions on the copied half.
double copy_accuracy(const Tensor& logits, const Tensor& targets) {
    const std::int64_t V = logits.shape().back(), n = targets.numel();
    std::int64_t right = 0, total = 0;
    for (std::int64_t i = 0; i < n; ++i) {
        const std::int32_t t = targets.data<std::int32_t>()[i];
        if (t < 0) continue;
        const float* row = logits.f32() + i * V;
        right += std::max_element(row, row + V) - row == t;
        ++total;
    }
    return total ? static_cast<double>(right) / static_cast<double>(total) : 0.0;
}

}  // namespace

int main(int argc, char** argv) try {
    std::int64_t steps = 300, batch = 32, length = 8;
    float lr = 3e-3f;
    std::uint64_t seed = 1;
    std::string json_path;
    po::options_description opts("quickstart: a two-layer attention model learns to copy (mopt autodiff on the CPU)");
    opts.add_options()("help,h", "show this help")
        ("steps", po::value(&steps)->default_value(steps), "training steps")
        ("batch", po::value(&batch)->default_value(batch), "sequences per step")
        ("length", po::value(&length)->default_value(length), "symbols to copy (sequence = 2*length + 2)")
        ("lr", po::value(&lr)->default_value(lr), "AdamW learning rate")
        ("seed", po::value(&seed)->default_value(seed), "random seed (data and initialisation)")
        ("json", po::value(&json_path), "write the loss curve and final metrics as JSON to this file");
    po::variables_map vm;
    po::store(po::parse_command_line(argc, argv, opts), vm);
    if (vm.count("help")) {
        std::cout << opts << "\n";
        return 0;
    }
    po::notify(vm);
    check(steps > 0, "--steps must be positive, got ", steps);
    check(batch > 0, "--batch must be positive, got ", batch);
    check(length > 0 && length <= 64, "--length must be in [1, 64], got ", length);
    check(lr > 0 && std::isfinite(lr), "--lr must be a positive number, got ", lr);

    std::mt19937_64 rng(seed);
    CopyModel model(Config{.length = length}, rng);
    auto params = model.parameters();
    train::AdamW opt(params, {.lr = lr, .weight_decay = 0.0f});
    Tape tape;
    std::vector<double> curve;
    const auto start = std::chrono::steady_clock::now();
    std::printf("step   loss    (chance: %.3f)\n", std::log(static_cast<double>(model.cfg.vocab - first_symbol)));
    for (std::int64_t step = 0; step < steps; ++step) {
        tape.reset();
        Batch b = make_batch(batch, length, model.cfg.vocab, rng);
        Var loss = cross_entropy(model.forward(tape, b.ids), b.targets);
        tape.backward(loss);
        train::clip_grad_norm(params, 1.0);
        opt.step();
        curve.push_back(loss.item());
        if (step % std::max<std::int64_t>(steps / 15, 1) == 0 || step + 1 == steps) {
            const int bar = static_cast<int>(std::min(60.0, 20.0 * curve.back()));
            std::printf("%5lld  %6.3f  %s\n", static_cast<long long>(step), curve.back(), std::string(bar, '#').c_str());
        }
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

    NoGrad eval;
    tape.reset();
    Batch test = make_batch(256, length, model.cfg.vocab, rng);
    const Tensor& logits = model.forward(tape, test.ids).value();
    const double accuracy = copy_accuracy(logits, test.targets);
    auto mean_of = [&](std::size_t from, std::size_t to) {
        double s = 0;
        for (std::size_t i = from; i < to; ++i) s += curve[i];
        return s / static_cast<double>(to - from);
    };
    const std::size_t w = std::max<std::size_t>(curve.size() / 10, 1);
    const double first = mean_of(0, w), last = mean_of(curve.size() - w, curve.size());
    std::printf("\n%lld steps in %.1f s (%.0f tokens/s); copy accuracy on 256 new sequences: %.1f%%\n",
                static_cast<long long>(steps), seconds, static_cast<double>(steps * batch * (2 * length + 2)) / seconds,
                100.0 * accuracy);
    const bool fell = last < 0.5 * first;
    std::printf("%s from %.3f to %.3f (mean of the first and last tenth of the steps)\n",
                fell ? "loss fell" : "loss did not fall by half", first, last);
    if (!json_path.empty()) {
        nlohmann::json j{{"steps", steps},       {"loss_first", first}, {"loss_last", last},
                         {"accuracy", accuracy}, {"seconds", seconds},  {"loss_curve", curve}};
        std::ofstream(json_path) << j.dump(2) << "\n";
        check(std::ifstream(json_path).good(), "--json: could not write ", json_path);
    }
    return fell ? 0 : 1;
} catch (const std::exception& e) {
    std::fprintf(stderr, "quickstart: %s\n", e.what());
    return 2;
}
