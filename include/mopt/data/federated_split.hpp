#pragma once
// The skewed non-i.i.d. client split of Dun et al. ("Sweeping Heterogeneity with Smart MoPs",
// Appendix A) and a batch source over one client's share.
//
// For each domain, its samples are cut into N partitions, one per client, where ONE partition holds
// `skew` (15) times the samples of each other one; every client receives one partition of EVERY
// domain. Which client holds a domain's big partition is a seeded permutation of the clients taken
// in domain order (domain d -> perm[d mod N]), so with D <= N domains no client is big in two.
//
// Sizes (the rounding rule): domain d's n_d samples are apportioned over the weights
// (skew for the big partition, 1 for the others; W = N - 1 + skew) by Hamilton's largest-remainder
// method: partition c first gets floor(n_d·w_c / W), then the samples left over go one each to the
// partitions with the largest remainders n_d·w_c mod W, ties to the lower client index. So every
// partition is within one sample of its exact share n_d·w_c / W, and the sizes sum to n_d.
// Every client gets at least one sample of each domain iff n_d >= W; a smaller domain is an error.
//
// Which samples: each domain's samples are shuffled (SplitMix64 Fisher-Yates, seed mixed with the
// domain index) and dealt out in client order, partition c taking the next size_c of them.
// Samples are windows of a data::Batches (its construction order; see batches.hpp).
#include <algorithm>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

#include "mopt/data/batches.hpp"
#include "mopt/data/corpus.hpp"
#include "mopt/error.hpp"

namespace mopt::data {

struct FederatedSplitOptions {
    std::int64_t clients = 100;  // N
    std::int64_t skew = 15;      // the big partition's size / each other partition's (Dun et al.: 15)
    std::uint64_t seed = 0;
};

struct FederatedSplit {
    std::vector<std::vector<std::int64_t>> client_samples;  // [client]: sample indices, domain by domain
    std::vector<std::vector<std::int64_t>> counts;          // [client][domain]: samples of that domain
    std::vector<std::int64_t> big_client;                   // [domain]: the client with the big partition

    [[nodiscard]] std::int64_t clients() const { return static_cast<std::int64_t>(client_samples.size()); }
    [[nodiscard]] std::int64_t samples_of(std::int64_t client) const {
        return static_cast<std::int64_t>(client_samples.at(static_cast<std::size_t>(client)).size());
    }
};

// Hamilton (largest remainder) apportionment of n items over integer weights (see the header).
[[nodiscard]] inline std::vector<std::int64_t> apportion(std::int64_t n, const std::vector<std::int64_t>& weights) {
    check(n >= 0, "apportion: negative count ", n);
    std::int64_t total = 0;
    for (std::int64_t w : weights) {
        check(w >= 0, "apportion: negative weight ", w);
        total += w;
    }
    check(total > 0, "apportion: the weights sum to 0");
    std::vector<std::int64_t> size(weights.size());
    std::vector<std::int64_t> rem(weights.size());
    std::int64_t given = 0;
    for (std::size_t i = 0; i < weights.size(); ++i) {
        // n·w may overflow for huge inputs; n and W here are sample and client counts.
        size[i] = n * weights[i] / total;
        rem[i] = n * weights[i] % total;
        given += size[i];
    }
    std::vector<std::size_t> order(weights.size());
    std::iota(order.begin(), order.end(), std::size_t{0});
    std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return rem[a] > rem[b]; });
    for (std::int64_t k = 0; k < n - given; ++k) ++size[order[static_cast<std::size_t>(k)]];
    return size;
}

// The skewed split of samples whose domains are `sample_domain` (values in [0, num_domains)).
[[nodiscard]] inline FederatedSplit skewed_split(const std::vector<std::int32_t>& sample_domain,
                                                 const std::vector<std::string>& domains, FederatedSplitOptions opt) {
    const std::int64_t N = opt.clients;
    check(N >= 1, "federated split: clients = ", N, " must be positive");
    check(opt.skew >= 1, "federated split: skew = ", opt.skew, " must be at least 1");
    const auto D = static_cast<std::int64_t>(domains.size());
    std::vector<std::vector<std::int64_t>> by_domain(static_cast<std::size_t>(D));
    for (std::size_t i = 0; i < sample_domain.size(); ++i) {
        const std::int32_t d = sample_domain[i];
        check(d >= 0 && d < D, "federated split: sample ", i, " has domain ", d, ", outside the ", D, " domains");
        by_domain[static_cast<std::size_t>(d)].push_back(static_cast<std::int64_t>(i));
    }
    const std::int64_t W = N - 1 + opt.skew;
    std::vector<std::int64_t> perm(static_cast<std::size_t>(N));
    std::iota(perm.begin(), perm.end(), std::int64_t{0});
    detail::shuffle(perm, detail::mix_seed(opt.seed, ~std::uint64_t{0}));

    FederatedSplit s;
    s.client_samples.resize(static_cast<std::size_t>(N));
    s.counts.assign(static_cast<std::size_t>(N), std::vector<std::int64_t>(static_cast<std::size_t>(D), 0));
    for (std::int64_t d = 0; d < D; ++d) {
        std::vector<std::int64_t>& idx = by_domain[static_cast<std::size_t>(d)];
        const auto n = static_cast<std::int64_t>(idx.size());
        check(n >= W, "federated split: domain '", domains[static_cast<std::size_t>(d)], "' has ", n,
              " samples, too few for ", N, " clients with a ", opt.skew, "x big partition (needs at least N - 1 + skew = ",
              W, " so that every client holds every domain); use fewer clients or shorter samples");
        const std::int64_t big = perm[static_cast<std::size_t>(d % N)];
        s.big_client.push_back(big);
        std::vector<std::int64_t> weights(static_cast<std::size_t>(N), 1);
        weights[static_cast<std::size_t>(big)] = opt.skew;
        const std::vector<std::int64_t> size = apportion(n, weights);
        detail::shuffle(idx, detail::mix_seed(opt.seed, static_cast<std::uint64_t>(d)));
        std::int64_t at = 0;
        for (std::int64_t c = 0; c < N; ++c) {
            auto& mine = s.client_samples[static_cast<std::size_t>(c)];
            const std::int64_t k = size[static_cast<std::size_t>(c)];
            mine.insert(mine.end(), idx.begin() + at, idx.begin() + at + k);
            s.counts[static_cast<std::size_t>(c)][static_cast<std::size_t>(d)] = k;
            at += k;
        }
    }
    return s;
}

// The skewed split of the windows of `batches` (each window's domain from the stream it cuts).
[[nodiscard]] inline FederatedSplit skewed_split(const Batches& batches, FederatedSplitOptions opt) {
    std::vector<std::int32_t> domain(static_cast<std::size_t>(batches.num_windows()));
    for (std::int64_t w = 0; w < batches.num_windows(); ++w) domain[static_cast<std::size_t>(w)] = batches.window_domain(w);
    return skewed_split(domain, batches.streams().domains, opt);
}

// Batches over a subset of another Batches' windows (one client's share): the same windows,
// shuffled anew each epoch from (seed, epoch); an epoch's last batch may be smaller.
class SubsetBatches {
public:
    SubsetBatches(const Batches& all, std::vector<std::int64_t> windows, std::int64_t batch_size, std::uint64_t seed)
        : all_(&all), windows_(std::move(windows)), batch_size_(batch_size), seed_(seed) {
        check(!windows_.empty(), "SubsetBatches: no windows");
        check(batch_size_ >= 1, "SubsetBatches: batch_size = ", batch_size_, " must be positive");
        for (std::int64_t w : windows_)
            check(w >= 0 && w < all.num_windows(), "SubsetBatches: window ", w, " out of ", all.num_windows());
        start_epoch(0);
    }

    [[nodiscard]] std::int64_t num_windows() const { return static_cast<std::int64_t>(windows_.size()); }

    void start_epoch(std::int64_t epoch) {
        epoch_ = epoch;
        next_ = 0;
        order_ = windows_;
        detail::shuffle(order_, detail::mix_seed(seed_, static_cast<std::uint64_t>(epoch)));
    }
    bool next(Batch& out) {
        const std::int64_t left = num_windows() - next_;
        if (left <= 0) return false;
        const std::int64_t b = std::min(batch_size_, left), T = all_->options().seq_len;
        const Shape shape{b, T};
        if (!out.ids.defined() || out.ids.shape() != shape) out.ids = Tensor::empty(shape, DType::i32);
        if (!out.targets.defined() || out.targets.shape() != shape) out.targets = Tensor::empty(shape, DType::i32);
        if (!out.domains.defined() || out.domains.shape() != Shape{b}) out.domains = Tensor::empty(Shape{b}, DType::i32);
        for (std::int64_t r = 0; r < b; ++r) {
            const std::int64_t w = order_[static_cast<std::size_t>(next_ + r)];
            all_->fill_window(w, out.ids.data<std::int32_t>() + r * T, out.targets.data<std::int32_t>() + r * T);
            out.domains.data<std::int32_t>()[r] = all_->window_domain(w);
        }
        next_ += b;
        return true;
    }
    void next_wrapping(Batch& out) {
        if (!next(out)) {
            start_epoch(epoch_ + 1);
            next(out);
        }
    }

private:
    const Batches* all_;
    std::vector<std::int64_t> windows_, order_;
    std::int64_t batch_size_;
    std::uint64_t seed_;
    std::int64_t epoch_ = 0, next_ = 0;
};

}  // namespace mopt::data
