// layer_error — why a pruning method wins or loses: for every projection of a dense model, the
// relative output error ‖XWᵀ − XŴᵀ‖_F / ‖XWᵀ‖_F of magnitude, Wanda and SparseGPT pruning on the
// model's own activations X (calibration windows of the Brown train split), averaged over the
// projections, and the share of input features left with no weight at all.
//
//   layer_error [--model models/dense-brown] [--brown-dir data/brown] [--windows 32]
//               [--sparsity 0.5,0.75,0.85,0.9] [--json PATH]
//
// docs/compression.md uses it to explain where Wanda's perplexity falls behind magnitude's.
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <mopt/mopt.hpp>

#include "cli.hpp"

namespace po = boost::program_options;
namespace fs = std::filesystem;
using namespace mopt;

namespace {

// ‖X Wᵀ − X Ŵᵀ‖_F / ‖X Wᵀ‖_F
double relative_error(const Tensor& x, const Tensor& w, const Tensor& wq) {
    const std::int64_t rows = x.shape().rows(), in = w.dim(1), out = w.dim(0);
    Tensor diff = w.clone();
    for (std::int64_t i = 0; i < diff.numel(); ++i) diff.f32()[i] -= wq.f32()[i];
    Tensor y = Tensor::empty({rows, out}), dy = Tensor::empty({rows, out});
    backend::cpu::gemm({.trans_b = true, .m = rows, .n = out, .k = in, .a = x.f32(), .lda = in, .b = w.f32(), .ldb = in,
                        .c = y.f32(), .ldc = out});
    backend::cpu::gemm({.trans_b = true, .m = rows, .n = out, .k = in, .a = x.f32(), .lda = in, .b = diff.f32(),
                        .ldb = in, .c = dy.f32(), .ldc = out});
    double num = 0, den = 0;
    for (std::int64_t i = 0; i < y.numel(); ++i) {
        num += double(dy.f32()[i]) * dy.f32()[i];
        den += double(y.f32()[i]) * y.f32()[i];
    }
    return std::sqrt(num / den);
}

// Share of input columns of w [out, in] with no non-zero weight.
double dead_inputs(const Tensor& w) {
    const std::int64_t out = w.dim(0), in = w.dim(1);
    std::int64_t dead = 0;
    for (std::int64_t c = 0; c < in; ++c) {
        bool any = false;
        for (std::int64_t r = 0; r < out && !any; ++r) any = w.f32()[r * in + c] != 0.0f;
        dead += !any;
    }
    return double(dead) / double(in);
}

}  // namespace

int main(int argc, char** argv) {
    return cli::run("layer_error", [&] {
        std::string model_dir = "models/dense-brown", brown = "data/brown", ratios = "0.5,0.75,0.85,0.9", json;
        std::int64_t windows = 32;
        po::options_description opts("layer_error: per-projection output error of magnitude, Wanda and SparseGPT "
                                     "pruning on a dense model's own activations\nusage: layer_error [options]");
        opts.add_options()("help,h", "show this help")
            ("model", po::value(&model_dir)->default_value(model_dir), "dense Llama model folder")
            ("brown-dir", po::value(&brown)->default_value(brown), "Brown corpus folder")
            ("windows", po::value(&windows)->default_value(windows), "calibration windows of the train split")
            ("sparsity", po::value(&ratios)->default_value(ratios), "comma-separated sparsities")
            ("json", po::value(&json), "write the numbers as JSON");
        po::variables_map vm;
        if (!cli::parse(argc, argv, opts, vm)) return 0;
        std::vector<double> sparsities;
        std::stringstream ss(ratios);
        for (std::string item; std::getline(ss, item, ',');) {
            try {
                sparsities.push_back(std::stod(item));
            } catch (const std::exception&) {
                throw cli::UsageError("--sparsity: '" + item + "' is not a number");
            }
            cli::usage_check(sparsities.back() >= 0 && sparsities.back() < 1, "--sparsity ", item, " is outside [0, 1)");
        }
        cli::usage_check(windows >= 1, "--windows must be >= 1, got ", windows);
        cli::usage_check(fs::is_directory(brown), "--brown-dir ", fs::path(brown), ": no such folder");
        using Base = nn::Transformer<nn::Llama>;
        Base model = Base::load(model_dir);
        const data::Tokenizer tok = data::Tokenizer::load(fs::path(model_dir) / "tokenizer.model");
        const data::CorpusSplits splits = data::split_corpus(data::read_brown(brown, data::BrownDomains::groups7), 1234);
        data::Batches train(splits.train, tok, {.batch_size = 8, .seq_len = model.config().max_seq, .seed = 0});
        const Tensor calibration = compress::calibration_windows(train, windows, 1);

        std::vector<nn::Linear*> linears;
        model.visit_linears([&](nn::Linear& l, nn::LinearRole) { linears.push_back(&l); });
        std::map<const nn::Linear*, compress::InputStats> stats;
        std::map<const nn::Linear*, Tensor> inputs;
        for (nn::Linear* l : linears) stats.emplace(l, compress::InputStats(l->in_features()));
        {
            autodiff::NoGrad no_grad;
            autodiff::Tape tape;
            nn::ObserveLinears observe([&](const nn::Linear& l, const Tensor& x) {
                stats.at(&l).add(x);
                inputs[&l] = x.clone();
            });
            model.forward(tape, calibration);
        }
        const compress::Saliency methods[] = {compress::Saliency::magnitude, compress::Saliency::wanda,
                                              compress::Saliency::sparsegpt};
        nlohmann::json out = nlohmann::json::array();
        std::printf("%lld projections, %lld calibration windows of %lld tokens\n", static_cast<long long>(linears.size()),
                    static_cast<long long>(windows), static_cast<long long>(model.config().max_seq));
        std::printf("%-9s %-10s %14s %20s\n", "sparsity", "method", "mean rel. error", "inputs left empty");
        for (double ratio : sparsities)
            for (compress::Saliency s : methods) {
                double error = 0, dead = 0;
                for (nn::Linear* l : linears) {
                    Tensor w = l->weight.value().clone();
                    compress::prune(w, s, {.ratio = ratio}, &stats.at(l), {}, compress::linear_name(*l));
                    error += relative_error(inputs.at(l), l->weight.value(), w) / double(linears.size());
                    dead += dead_inputs(w) / double(linears.size());
                }
                std::printf("%-9.3f %-10s %14.4f %19.1f%%\n", ratio, compress::name(s), error, 100 * dead);
                out.push_back({{"sparsity", ratio}, {"method", compress::name(s)}, {"mean_relative_error", error},
                               {"inputs_left_empty", dead}});
            }
        cli::write_json(json, {{"model", model_dir}, {"windows", windows}, {"rows", out}});
        return 0;
    });
}
