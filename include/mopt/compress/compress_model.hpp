#pragma once
// compress(model, recipe, calibration): compresses every projection of the recipe's roles in place
// and packs it (compress/packed_weight.hpp), so the model really shrinks.
//
// Calibration is streamed layer by layer as SparseGPT does: the calibration windows' hidden states
// [N, T, d] are kept for one block at a time; for block l
//   1. the block runs on them (batches of `batch` windows, no gradients) while an observer
//      (nn/linear_observer.hpp) accumulates each projection's input statistics (compress/input_stats.hpp)
//      — experts see only the rows routed to them;
//   2. the block's projections are pruned and/or quantised from those statistics;
//   3. the block runs again, now compressed, and its outputs become block l+1's inputs,
// so later layers calibrate on what the compressed earlier layers really produce and memory stays
// near one block's activations (plus one [in, in] Hessian per projection of the block).
//
// Storage after compression: quantised → PackedQuant (b-bit codes); N:M → PackedNM; unstructured
// pruning → CSR (PackedSparse) when that is smaller than the dense matrix, else the pruned dense f32.
// An expert that no calibration token reached has no statistics: it falls back to the data-free
// method (magnitude saliency, RTN instead of GPTQ, no int8 outliers) with a warning.
#include <chrono>
#include <cstdint>
#include <iostream>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "mopt/autodiff/tape.hpp"
#include "mopt/compress/gptq.hpp"
#include "mopt/compress/input_stats.hpp"
#include "mopt/compress/int8.hpp"
#include "mopt/compress/packed_weight.hpp"
#include "mopt/compress/prune.hpp"
#include "mopt/compress/recipe.hpp"
#include "mopt/compress/rtn.hpp"
#include "mopt/nn/attention.hpp"
#include "mopt/nn/dense_ffn.hpp"
#include "mopt/nn/linear.hpp"
#include "mopt/nn/linear_observer.hpp"
#include "mopt/nn/linear_role.hpp"

namespace mopt::compress {

struct CalibrationOptions {
    std::int64_t batch = 8;      // windows per forward pass
    bool verbose = false;        // one line per block on stderr
};

// What happened to one projection.
struct LayerReport {
    std::string name;            // "model.layers.0.self_attn.q_proj"
    nn::LinearRole role{};
    std::string format;          // packed format, or "dense" (pruned, CSR would not be smaller)
    std::int64_t bytes_before = 0, bytes_after = 0;
    double sparsity = 0.0;       // fraction of exact zeros in the compressed weight
    std::int64_t calibration_rows = 0;
    std::string fallback;        // non-empty when the data-free method stood in (no routed rows)
};

struct CompressionReport {
    Recipe recipe;
    std::vector<LayerReport> layers;
    std::int64_t model_bytes_before = 0, model_bytes_after = 0;
    std::int64_t windows = 0, tokens_per_window = 0;
    double seconds = 0.0;
};

// The name a Linear's tensors carry: its weight's name without ".weight".
[[nodiscard]] inline std::string linear_name(const nn::Linear& l) {
    const std::string& n = l.weight.name();
    return n.ends_with(".weight") ? n.substr(0, n.size() - 7) : n;
}

// Compresses one dense projection by `r` with its input statistics (null: none were collected).
inline LayerReport compress_linear(nn::Linear& lin, nn::LinearRole role, const InputStats* stats, const Recipe& r) {
    LayerReport rep;
    rep.name = linear_name(lin);
    rep.role = role;
    check(!lin.is_packed(), rep.name, ": already compressed (", lin.packed->format(), ")");
    rep.bytes_before = lin.bytes();
    rep.calibration_rows = stats != nullptr ? stats->rows() : 0;
    const bool have_stats = stats != nullptr && stats->rows() > 0;
    Tensor& w = lin.weight.value();

    std::optional<Saliency> saliency = r.prune;
    if (saliency && *saliency != Saliency::magnitude && !have_stats) {
        rep.fallback = mopt::detail::concat("magnitude instead of ", name(*saliency));
        saliency = Saliency::magnitude;
    }
    if (saliency) prune(w, *saliency, r.sparsity, have_stats ? stats : nullptr, SparseGptOptions{.damp = r.damp}, rep.name);

    std::optional<PackedWeight> packed;
    if (r.quantizer != Quantizer::none) {
        QuantSpec spec = r.quant;
        spec.damp = r.damp;
        IntCodes codes;
        if (r.quantizer == Quantizer::int8) {
            const bool outliers = r.outlier_threshold > 0.0f && have_stats;
            if (r.outlier_threshold > 0.0f && !have_stats) rep.fallback = "int8 without outlier columns";
            codes = quantize_int8(w, outliers ? stats : nullptr, outliers ? r.outlier_threshold : 0.0f, rep.name);
        } else if (r.quantizer == Quantizer::gptq && have_stats) {
            codes = quantize_gptq(w, *stats, spec, rep.name);
        } else {
            if (r.quantizer == Quantizer::gptq) rep.fallback += (rep.fallback.empty() ? "" : ", ") + std::string("rtn instead of gptq");
            codes = quantize_rtn(w, spec, rep.name);
        }
        packed = PackedWeight::quantized(codes);
    } else if (r.prune && r.sparsity.structured()) {
        packed = PackedWeight::nm(w, r.sparsity.nm_zero, r.sparsity.nm_group);
    } else if (r.prune) {
        PackedWeight csr = PackedWeight::sparse(w);
        if (static_cast<std::int64_t>(csr.bytes()) < rep.bytes_before) packed = std::move(csr);
    }
    std::int64_t zeros = 0;
    {
        const Tensor dense = packed ? packed->dequantize() : w;
        for (float v : dense.span()) zeros += v == 0.0f;
        rep.sparsity = static_cast<double>(zeros) / static_cast<double>(dense.numel());
    }
    if (packed) {
        rep.format = packed->format();
        lin.pack(std::move(*packed));
    } else {
        rep.format = "dense";
    }
    rep.bytes_after = lin.bytes();
    return rep;
}

// See the file comment. calibration: i32 [N, T] token windows (N >= 1 when the recipe needs data).
template <class Model>
CompressionReport compress(Model& model, const Recipe& recipe, const Tensor& calibration, CalibrationOptions opt = {}) {
    const auto t0 = std::chrono::steady_clock::now();
    recipe.validate();
    CompressionReport report;
    report.recipe = recipe;
    report.model_bytes_before = model.parameter_bytes();
    const bool calibrate = recipe.needs_calibration();
    if (calibrate) {
        check(calibration.rank() == 2 && calibration.dtype() == DType::i32, "compress (", recipe.describe(),
              "): calibration windows must be i32 [windows, tokens], got ", name(calibration.dtype()), " ",
              calibration.shape());
        check(calibration.dim(0) >= 1 && calibration.dim(1) >= 2, "compress (", recipe.describe(),
              "): needs at least one calibration window of 2+ tokens, got ", calibration.shape());
        check(calibration.dim(1) <= model.config().max_seq, "compress: calibration windows of ", calibration.dim(1),
              " tokens exceed the model's context max_seq = ", model.config().max_seq);
        report.windows = calibration.dim(0);
        report.tokens_per_window = calibration.dim(1);
    }
    const std::size_t n_layers = model.blocks().size();

    if (!calibrate) {
        for (std::size_t l = 0; l < n_layers; ++l)
            model.visit_linears(l, [&](nn::Linear& lin, nn::LinearRole role) {
                if (recipe.roles.count(role) && !lin.is_packed())
                    report.layers.push_back(compress_linear(lin, role, nullptr, recipe));
            });
    } else {
        check(opt.batch >= 1, "compress: calibration batch must be >= 1, got ", opt.batch);
        const std::int64_t N = calibration.dim(0), T = calibration.dim(1), d = model.config().d_model;
        autodiff::NoGrad no_grad;
        autodiff::Tape tape;
        // The hidden states of every window entering the current block.
        Tensor hidden = Tensor::empty({N, T, d});
        const auto windows = [&](std::int64_t b0) { return std::min(opt.batch, N - b0); };
        for (std::int64_t b0 = 0; b0 < N; b0 += opt.batch) {
            tape.reset();
            Tensor ids = calibration.slice(b0, b0 + windows(b0));
            autodiff::Var x = model.embed(tape, ids.clone(), 0);
            std::copy_n(x.value().f32(), x.value().numel(), hidden.f32() + b0 * T * d);
        }
        const auto run_block = [&](std::size_t l, bool write_back) {
            for (std::int64_t b0 = 0; b0 < N; b0 += opt.batch) {
                tape.reset();
                const std::int64_t n = windows(b0);
                Tensor xb = tape.alloc({n, T, d});
                std::copy_n(hidden.f32() + b0 * T * d, n * T * d, xb.f32());
                nn::AttentionContext actx{};
                std::vector<nn::ExpertStats> expert_stats;
                nn::FeedForwardContext fctx{.stats = &expert_stats};
                autodiff::Var y = model.block(tape, l, tape.constant(xb), actx, fctx);
                if (write_back) std::copy_n(y.value().f32(), n * T * d, hidden.f32() + b0 * T * d);
            }
        };
        for (std::size_t l = 0; l < n_layers; ++l) {
            std::map<const nn::Linear*, InputStats> stats;
            model.visit_linears(l, [&](nn::Linear& lin, nn::LinearRole role) {
                if (recipe.roles.count(role) && !lin.is_packed()) stats.emplace(&lin, InputStats(lin.in_features()));
            });
            {
                nn::ObserveLinears observe([&](const nn::Linear& lin, const Tensor& x) {
                    auto it = stats.find(&lin);
                    if (it != stats.end()) it->second.add(x);
                });
                run_block(l, false);
            }
            model.visit_linears(l, [&](nn::Linear& lin, nn::LinearRole role) {
                auto it = stats.find(&lin);
                if (it == stats.end()) return;
                LayerReport rep = compress_linear(lin, role, &it->second, recipe);
                if (!rep.fallback.empty())
                    std::cerr << "compress: warning: " << rep.name << " saw no calibration rows; " << rep.fallback << "\n";
                report.layers.push_back(std::move(rep));
                stats.erase(it);  // frees its [in, in] statistics
            });
            if (l + 1 < n_layers) run_block(l, true);
            if (opt.verbose) std::cerr << "compress: block " << l + 1 << "/" << n_layers << " done\n";
        }
    }
    report.model_bytes_after = model.parameter_bytes();
    model.set_compression_recipe(recipe.to_json());
    report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return report;
}

// The Compression slot's own recipe (compress::Prune<…>, Quantize<…>, PruneThenQuantize<…>).
template <class Model>
CompressionReport compress(Model& model, const Tensor& calibration, CalibrationOptions opt = {}) {
    static_assert(Model::Compression::compresses,
                  "compress(model, calibration): the model's Compression slot is compress::None; give a Recipe "
                  "or choose a policy such as compress::Prune<compress::SparseGPT, compress::Unstructured<500>>");
    const std::optional<Recipe> r = Model::Compression::recipe();
    check(r.has_value(), "compress(model, calibration): compress::Any takes its recipe at run time; call "
                         "compress(model, recipe, calibration)");
    return compress(model, *r, calibration, opt);
}

}  // namespace mopt::compress
