#pragma once
// perplexity: exp of the mean next-token negative log-likelihood of a text under a model.
//
//   auto r = mopt::eval::perplexity(model, tok.encode(text, /*add_bos=*/false), {.context = 256, .stride = 128});
//   // r.ppl, r.nll (sum over tokens, nats), r.tokens (= text length)
//
// BOS is put in front of the text, so its first token is predicted too and every text token is
// predicted exactly once. A text longer than the context is scored in sliding windows (the
// strided perplexity of Hugging Face's "Perplexity of fixed-length models" guide): each window
// predicts the next `stride` tokens not yet scored and fills the rest of its `context` positions
// with the tokens before them, so with stride < context every prediction but those of the first
// window sees at least context - stride tokens of history. stride = context is the fast,
// non-overlapping evaluation; a smaller stride costs context/stride times more and is closer to
// the model's true perplexity.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "mopt/autodiff/tape.hpp"
#include "mopt/error.hpp"
#include "mopt/nn/transformer.hpp"

namespace mopt::eval {

struct PerplexityOptions {
    std::int64_t context = 0;  // positions per window; 0: the model's max_seq
    std::int64_t stride = 0;   // new tokens predicted per window after the first; 0: the context
};

struct PerplexityResult {
    double ppl = 0;           // exp(nll / tokens)
    double nll = 0;           // Σ −log p(token | history), nats
    std::int64_t tokens = 0;  // tokens predicted (the text's length)
    std::int64_t windows = 0; // forward passes run
};

// ids: the text's tokens [N] without BOS -> its perplexity under `model`
template <class Model>
PerplexityResult perplexity(Model& model, std::span<const std::int32_t> ids, const PerplexityOptions& opt = {}) {
    const nn::ModelConfig& c = model.config();
    const auto N = static_cast<std::int64_t>(ids.size());
    check(N > 0, "perplexity: empty text (no tokens to predict)");
    const std::int64_t context = opt.context > 0 ? opt.context : c.max_seq;
    check(opt.context >= 0 && context <= c.max_seq, "perplexity: context ", opt.context,
          " must be in [1, max_seq = ", c.max_seq, "] (0 = max_seq)");
    const std::int64_t stride = opt.stride > 0 ? opt.stride : context;
    check(opt.stride >= 0 && stride <= context, "perplexity: stride ", opt.stride, " must be in [1, context = ",
          context, "] (0 = context); a larger stride would skip tokens");
    for (std::int64_t i = 0; i < N; ++i)
        check(ids[i] >= 0 && ids[i] < c.vocab_size, "perplexity: token ", i, " of the text is ", ids[i],
              ", outside the vocabulary of ", c.vocab_size);

    // seq = [BOS, text...]; input position p predicts seq[p + 1]. The inputs are seq[0, L - 1).
    std::vector<std::int32_t> seq;
    seq.reserve(static_cast<std::size_t>(N + 1));
    seq.push_back(c.bos_id);
    seq.insert(seq.end(), ids.begin(), ids.end());
    const std::int64_t inputs = N;  // seq[0 .. N-1] are inputs; seq[1 .. N] are targets

    autodiff::NoGrad no_grad;
    autodiff::Tape tape;
    PerplexityResult r;
    std::int64_t done = 0;  // targets seq[1 .. done] are scored
    while (done < inputs) {
        // This window predicts targets seq[done + 1 .. end] from inputs seq[begin .. end - 1].
        const std::int64_t end = std::min(inputs, done == 0 ? context : done + stride);
        const std::int64_t begin = std::max<std::int64_t>(0, end - context);
        const std::int64_t T = end - begin;
        tape.reset();
        const Tensor in = Tensor::from({1, T}, std::span<const std::int32_t>(seq.data() + begin, static_cast<std::size_t>(T)));
        const Tensor& logits = model.forward(tape, in).logits.value();  // [1, T, vocab]
        const std::int64_t V = logits.dim(2);
        for (std::int64_t t = done - begin; t < T; ++t) {
            const float* row = logits.f32() + t * V;
            // −log softmax(row)[target], in double: log Σ exp(row - max) + max - row[target]
            const double mx = *std::max_element(row, row + V);
            double sum = 0;
            for (std::int64_t j = 0; j < V; ++j) sum += std::exp(static_cast<double>(row[j]) - mx);
            r.nll += std::log(sum) + mx - static_cast<double>(row[seq[begin + t + 1]]);
        }
        r.tokens += end - done;
        ++r.windows;
        done = end;
    }
    r.ppl = std::exp(r.nll / static_cast<double>(r.tokens));
    return r;
}

}  // namespace mopt::eval
