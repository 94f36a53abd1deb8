#pragma once
// Batches: a corpus split cut into fixed windows of tokens, shuffled, served as [B, T] batches
// with next-token targets and each window's domain.
//
// Tokens: each domain's documents (in corpus order) are encoded without BOS and concatenated with
// EOS after every document, one stream per domain, so a window never mixes domains (but may span
// a document boundary, marked by EOS, as in GPT-style pre-training).
//
// Windows: window k of a domain covers the stream's text tokens s[kT, kT + T) and reads
//     ids     = BOS, s[kT], ..., s[kT + T - 2]        [T]
//     targets =      s[kT], ..., s[kT + T - 1]        [T]
// i.e. a window of T + 1 tokens (BOS + T text tokens) shifted by one, so every position has a
// target and every text token of the stream is predicted exactly once per epoch (windows do not
// overlap). This differs from nn::next_token_targets on the ids alone, which wastes the last
// position (-100). A domain's remainder of fewer than T tokens is dropped, or with pad_tail kept as
// one short window padded with EOS ids and -100 targets (the loss ignores them).
//
// Order: the windows of all domains are shuffled together, anew each epoch, from seed and epoch
// (SplitMix64 Fisher-Yates: the same order on every machine). An epoch serves every window once.
#include <algorithm>
#include <cstdint>
#include <exception>
#include <string>
#include <utility>
#include <vector>

#include "mopt/data/corpus.hpp"
#include "mopt/data/tokenizer.hpp"
#include "mopt/error.hpp"
#include "mopt/tensor/shape.hpp"
#include "mopt/tensor/tensor.hpp"

namespace mopt::data {

// A corpus split as token streams, one per domain of the corpus (empty for a domain without
// documents in this split).
struct TokenStreams {
    std::vector<std::vector<std::int32_t>> per_domain;  // text ids, EOS after each document
    std::vector<std::string> domains;                   // Corpus::domains
    std::int32_t bos = 1, eos = 2;
    std::int64_t vocab_size = 0;

    [[nodiscard]] std::int64_t num_tokens() const {
        std::int64_t n = 0;
        for (const auto& s : per_domain) n += static_cast<std::int64_t>(s.size());
        return n;
    }
};

// Token ids ordered by how often they occur in `s`, most frequent first (ties by id): a soft
// prompt's vocabulary initialisation samples the most frequent 5000 (Lester et al. 2021, §2.2).
[[nodiscard]] inline std::vector<std::int32_t> ids_by_frequency(const TokenStreams& s) {
    std::vector<std::int64_t> count(static_cast<std::size_t>(s.vocab_size), 0);
    for (const auto& stream : s.per_domain)
        for (std::int32_t t : stream)
            if (t >= 0 && t < s.vocab_size) ++count[static_cast<std::size_t>(t)];
    std::vector<std::int32_t> ids(count.size());
    for (std::size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<std::int32_t>(i);
    std::stable_sort(ids.begin(), ids.end(), [&](std::int32_t a, std::int32_t b) {
        return count[static_cast<std::size_t>(a)] > count[static_cast<std::size_t>(b)];
    });
    return ids;
}

// Encodes every document of `corpus` (in parallel: encoding is const), keeping corpus order
// within each domain's stream.
template <TextTokenizer Tok>
[[nodiscard]] TokenStreams tokenize(const Corpus& corpus, const Tok& tok) {
    const auto n = static_cast<std::int64_t>(corpus.docs.size());
    std::vector<std::vector<std::int32_t>> encoded(corpus.docs.size());
    std::exception_ptr error;
    // Exceptions must not leave an OpenMP region: the first one is kept and rethrown after it.
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1)
#endif
    for (std::int64_t i = 0; i < n; ++i) {
        try {
            encoded[static_cast<std::size_t>(i)] = tok.encode(corpus.docs[static_cast<std::size_t>(i)].text, false);
        } catch (...) {
#if defined(_OPENMP)
#pragma omp critical(mopt_data_tokenize)
#endif
            if (!error) error = std::current_exception();
        }
    }
    if (error) std::rethrow_exception(error);
    TokenStreams s;
    s.domains = corpus.domains;
    s.bos = tok.bos_id();
    s.eos = tok.eos_id();
    s.vocab_size = tok.vocab_size();
    s.per_domain.resize(corpus.domains.size());
    for (std::size_t i = 0; i < corpus.docs.size(); ++i) {
        auto& stream = s.per_domain[static_cast<std::size_t>(corpus.domain_index(corpus.docs[i].domain))];
        stream.insert(stream.end(), encoded[i].begin(), encoded[i].end());
        stream.push_back(s.eos);
    }
    return s;
}

struct BatchOptions {
    std::int64_t batch_size = 8;  // B: windows per batch
    std::int64_t seq_len = 256;   // T: positions per window (BOS + T - 1 text tokens as input)
    std::uint64_t seed = 0;       // window order of epoch e comes from (seed, e)
    bool drop_last = false;       // skip an epoch's last batch when it has fewer than B windows
    bool pad_tail = false;        // keep each domain's last < T tokens as a padded window
};

struct Batch {
    Tensor ids;      // i32 [B, T]: BOS then text tokens
    Tensor targets;  // i32 [B, T]: the next token of each position; -100 only on padding
    Tensor domains;  // i32 [B]: each window's index into Corpus::domains

    [[nodiscard]] std::int64_t size() const { return ids.defined() ? ids.dim(0) : 0; }
};

class Batches {
public:
    Batches(TokenStreams streams, BatchOptions opt) : streams_(std::move(streams)), opt_(opt) {
        check(opt_.batch_size >= 1, "Batches: batch_size = ", opt_.batch_size, " must be positive");
        check(opt_.seq_len >= 1, "Batches: seq_len = ", opt_.seq_len, " must be positive");
        check(streams_.per_domain.size() == streams_.domains.size(), "Batches: ", streams_.per_domain.size(),
              " token streams for ", streams_.domains.size(), " domains");
        const std::int64_t T = opt_.seq_len;
        std::int64_t longest = 0;
        for (std::size_t d = 0; d < streams_.per_domain.size(); ++d) {
            const auto len = static_cast<std::int64_t>(streams_.per_domain[d].size());
            longest = std::max(longest, len);
            for (std::int64_t begin = 0; begin + T <= len; begin += T)
                windows_.push_back({static_cast<std::int32_t>(d), begin, T});
            const std::int64_t tail = len % T;
            if (opt_.pad_tail && tail > 0) windows_.push_back({static_cast<std::int32_t>(d), len - tail, tail});
        }
        check(!windows_.empty(), "Batches: no window of seq_len = ", T, " tokens fits: the split has ",
              streams_.num_tokens(), " tokens, at most ", longest, " in one domain (",
              streams_.domains.size(), " domains); use a smaller seq_len, more text, or pad_tail");
        if (opt_.drop_last)
            check(num_windows() >= opt_.batch_size, "Batches: ", num_windows(), " windows of ", T,
                  " tokens make no full batch of batch_size = ", opt_.batch_size, " (drop_last is on)");
        start_epoch(0);
    }

    // Tokenizes `split` with `tok` (see tokenize) and cuts it into windows.
    template <TextTokenizer Tok>
    Batches(const Corpus& split, const Tok& tok, BatchOptions opt) : Batches(tokenize(split, tok), opt) {}

    [[nodiscard]] std::int64_t num_windows() const { return static_cast<std::int64_t>(windows_.size()); }
    [[nodiscard]] std::int64_t batches_per_epoch() const {
        const std::int64_t B = opt_.batch_size;
        return opt_.drop_last ? num_windows() / B : (num_windows() + B - 1) / B;
    }
    [[nodiscard]] std::int64_t epoch() const { return epoch_; }
    [[nodiscard]] const BatchOptions& options() const { return opt_; }
    [[nodiscard]] const TokenStreams& streams() const { return streams_; }

    // Restarts at the first batch of `epoch`, in that epoch's order.
    void start_epoch(std::int64_t epoch) {
        epoch_ = epoch;
        next_ = 0;
        order_.resize(windows_.size());
        for (std::size_t i = 0; i < order_.size(); ++i) order_[i] = static_cast<std::int64_t>(i);
        detail::shuffle(order_, detail::mix_seed(opt_.seed, static_cast<std::uint64_t>(epoch)));
    }

    // Fills `out` with the epoch's next batch and returns true, or returns false when the epoch is
    // done (call start_epoch for the next). Reuses out's tensors when their shape fits, so the
    // steady state allocates nothing: copies of the previous batch's tensors see the new data.
    bool next(Batch& out) {
        const std::int64_t B = opt_.batch_size, left = num_windows() - next_;
        if (left <= 0 || (opt_.drop_last && left < B)) return false;
        const std::int64_t b = std::min(B, left);
        const Shape shape{b, opt_.seq_len};
        if (!out.ids.defined() || out.ids.shape() != shape || out.ids.dtype() != DType::i32) out.ids = Tensor::empty(shape, DType::i32);
        if (!out.targets.defined() || out.targets.shape() != shape || out.targets.dtype() != DType::i32)
            out.targets = Tensor::empty(shape, DType::i32);
        if (!out.domains.defined() || out.domains.shape() != Shape{b} || out.domains.dtype() != DType::i32)
            out.domains = Tensor::empty(Shape{b}, DType::i32);
        std::int32_t* ids = out.ids.data<std::int32_t>();
        std::int32_t* targets = out.targets.data<std::int32_t>();
        std::int32_t* domains = out.domains.data<std::int32_t>();
        for (std::int64_t r = 0; r < b; ++r) {
            const std::int64_t w = order_[static_cast<std::size_t>(next_ + r)];
            fill_window(w, ids + r * opt_.seq_len, targets + r * opt_.seq_len);
            domains[r] = windows_[static_cast<std::size_t>(w)].domain;
        }
        next_ += b;
        return true;
    }

    // Positions the stream where a loop of next_wrapping calls would be after `batches` calls from
    // the start of epoch 0: how a resumed training run continues with the same batches.
    void seek(std::int64_t batches) {
        check(batches >= 0, "Batches::seek: negative position ", batches);
        const std::int64_t per_epoch = batches_per_epoch();
        start_epoch(batches / per_epoch);
        const std::int64_t skip = batches % per_epoch;
        next_ = std::min(skip * opt_.batch_size, num_windows());
    }

    // The next batch, moving on to the next epoch (reshuffled) when this one is done: for training
    // loops counted in steps.
    void next_wrapping(Batch& out) {
        if (!next(out)) {
            start_epoch(epoch_ + 1);
            const bool ok = next(out);
            check(ok, "Batches: an epoch yields no batch");  // ruled out by the constructor
        }
    }

    // Window `w` (in construction order: domain by domain, front to back) into ids[T], targets[T].
    void fill_window(std::int64_t w, std::int32_t* ids, std::int32_t* targets) const {
        check(w >= 0 && w < num_windows(), "Batches: window ", w, " out of ", num_windows());
        const Window& win = windows_[static_cast<std::size_t>(w)];
        const std::int32_t* s = streams_.per_domain[static_cast<std::size_t>(win.domain)].data() + win.begin;
        const std::int64_t T = opt_.seq_len;
        ids[0] = streams_.bos;
        for (std::int64_t t = 0; t < T; ++t) {
            const bool real = t < win.length;
            if (t + 1 < T) ids[t + 1] = real ? s[t] : streams_.eos;
            targets[t] = real ? s[t] : -100;
        }
    }
    [[nodiscard]] std::int32_t window_domain(std::int64_t w) const {
        check(w >= 0 && w < num_windows(), "Batches: window ", w, " out of ", num_windows());
        return windows_[static_cast<std::size_t>(w)].domain;
    }

private:
    struct Window {
        std::int32_t domain;
        std::int64_t begin;   // first text token in the domain's stream
        std::int64_t length;  // text tokens: T, or fewer for a padded tail
    };

    TokenStreams streams_;
    BatchOptions opt_;
    std::vector<Window> windows_;
    std::vector<std::int64_t> order_;
    std::int64_t epoch_ = 0, next_ = 0;
};

}  // namespace mopt::data
