#pragma once
// Perplexity of a model over a corpus split served as batches of windows (data::Batches), overall
// and per domain: exp(Σ NLL / number of predicted tokens). Each window's targets mark what is
// predicted (-100: not predicted), so every text token of the split counts once. Also gathers the
// expert statistics of a mixture-of-experts model over the whole split.
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "mopt/autodiff/tape.hpp"
#include "mopt/backend/cpu/parallel.hpp"
#include "mopt/data/batches.hpp"
#include "mopt/nn/transformer.hpp"

namespace mopt::eval {

struct DomainPerplexity {
    std::string domain;
    double nll = 0.0;          // Σ over the domain's predicted tokens
    std::int64_t tokens = 0;   // predicted tokens
    [[nodiscard]] double ppl() const { return tokens > 0 ? std::exp(nll / static_cast<double>(tokens)) : NAN; }
};

// One expert layer's load over the split (token-weighted means of the per-batch statistics).
struct ExpertLoad {
    std::int64_t layer = 0;
    std::int64_t tokens = 0, dropped = 0;
    std::vector<double> fraction;  // of routing assignments per expert
    double router_entropy = 0.0;
};

struct CorpusPerplexity {
    double nll = 0.0;
    std::int64_t tokens = 0;
    std::vector<DomainPerplexity> domains;  // Corpus::domains order; domains absent from the split have 0 tokens
    std::vector<ExpertLoad> experts;        // one per expert layer (empty for a dense model)
    [[nodiscard]] double ppl() const { return tokens > 0 ? std::exp(nll / static_cast<double>(tokens)) : NAN; }
};

// Σ −log softmax(logits)[target] per row, skipping targets of -100.
// logits: [B, T, V], targets: i32 [B, T] -> B sums and B counts
inline void row_nll(const Tensor& logits, const Tensor& targets, std::vector<double>& nll, std::vector<std::int64_t>& count) {
    const std::int64_t B = logits.dim(0), T = logits.dim(1), V = logits.dim(2);
    check(targets.shape() == Shape{B, T}, "corpus_perplexity: targets ", targets.shape(), " do not match logits ",
          logits.shape());
    nll.assign(static_cast<std::size_t>(B), 0.0);
    count.assign(static_cast<std::size_t>(B), 0);
    std::vector<double> pos_nll(static_cast<std::size_t>(B * T), 0.0);
    const float* x = logits.f32();
    const std::int32_t* y = targets.data<std::int32_t>();
    for (std::int64_t i = 0; i < B * T; ++i)  // checked here: an exception must not leave the parallel loop
        check(y[i] == -100 || (y[i] >= 0 && y[i] < V), "corpus_perplexity: target ", y[i], " at position ", i,
              " is outside the vocabulary of ", V);
    backend::cpu::parallel_for(B * T, V, [&](std::int64_t i) {
        const std::int32_t target = y[i];
        if (target == -100) return;
        const float* row = x + i * V;
        float m = row[0];
        for (std::int64_t v = 1; v < V; ++v) m = std::max(m, row[v]);
        double s = 0.0;
        for (std::int64_t v = 0; v < V; ++v) s += std::exp(static_cast<double>(row[v] - m));
        pos_nll[static_cast<std::size_t>(i)] = std::log(s) + m - row[target];
    });
    for (std::int64_t i = 0; i < B * T; ++i) {
        if (y[i] == -100) continue;
        const auto b = static_cast<std::size_t>(i / T);
        nll[b] += pos_nll[static_cast<std::size_t>(i)];
        ++count[b];
    }
}

// Scores up to max_batches batches (0 = the whole epoch) of `batches` from the start of epoch 0,
// under NoGrad. The batches' order does not matter: sums are order-independent up to rounding.
template <class Model>
CorpusPerplexity corpus_perplexity(Model& model, data::Batches& batches, std::int64_t max_batches = 0) {
    autodiff::NoGrad no_grad;
    autodiff::Tape tape;
    CorpusPerplexity out;
    for (const auto& d : batches.streams().domains) out.domains.push_back({.domain = d});
    batches.start_epoch(0);
    data::Batch batch;
    std::vector<double> nll;
    std::vector<std::int64_t> count;
    for (std::int64_t n = 0; (max_batches <= 0 || n < max_batches) && batches.next(batch); ++n) {
        tape.reset();
        nn::ForwardOutput o = model.forward(tape, batch.ids);
        row_nll(o.logits.value(), batch.targets, nll, count);
        for (std::int64_t b = 0; b < batch.size(); ++b) {
            auto& d = out.domains[static_cast<std::size_t>(batch.domains.data<std::int32_t>()[b])];
            d.nll += nll[static_cast<std::size_t>(b)];
            d.tokens += count[static_cast<std::size_t>(b)];
            out.nll += nll[static_cast<std::size_t>(b)];
            out.tokens += count[static_cast<std::size_t>(b)];
        }
        for (std::size_t l = 0; l < o.experts.size(); ++l) {
            const nn::ExpertStats& s = o.experts[l];
            if (out.experts.size() <= l) out.experts.push_back({.layer = s.layer, .fraction = std::vector<double>(s.fraction.size(), 0.0)});
            ExpertLoad& e = out.experts[l];
            const auto w = static_cast<double>(s.tokens);
            for (std::size_t i = 0; i < s.fraction.size(); ++i) e.fraction[i] += s.fraction[i] * w;
            e.router_entropy += s.router_entropy * w;
            e.tokens += s.tokens;
            e.dropped += s.dropped;
        }
    }
    check(out.tokens > 0, "corpus_perplexity: the split predicted no token (", batches.num_windows(), " windows)");
    for (ExpertLoad& e : out.experts) {
        for (double& f : e.fraction) f /= static_cast<double>(e.tokens);
        e.router_entropy /= static_cast<double>(e.tokens);
    }
    return out;
}

}  // namespace mopt::eval
