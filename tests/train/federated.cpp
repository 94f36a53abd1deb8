// Tests of the federated simulation: the skewed non-i.i.d. split of Dun et al. (Appendix A), FedAvg
// and client sampling.
#include <algorithm>
#include <set>

#include <catch2/catch.hpp>

#include "test_util.hpp"
#include <mopt/prompt/soft_prompt.hpp>
#include <mopt/train/federated.hpp>

using namespace mopt;

namespace {
// `per_domain[d]` samples of domain d, interleaved so sample indices do not follow domains.
std::vector<std::int32_t> sample_domains(const std::vector<std::int64_t>& per_domain) {
    std::vector<std::int32_t> out;
    std::vector<std::int64_t> left = per_domain;
    for (bool any = true; any;) {
        any = false;
        for (std::size_t d = 0; d < left.size(); ++d)
            if (left[d] > 0) {
                out.push_back(static_cast<std::int32_t>(d));
                --left[d];
                any = true;
            }
    }
    return out;
}

Tensor values(std::vector<float> v) {
    const auto n = static_cast<std::int64_t>(v.size());
    return Tensor::from({n}, std::span<const float>(v));
}

train::ClientUpdate update(std::int64_t client, std::int64_t samples, std::vector<Tensor> params) {
    return {.client = client, .samples = samples, .params = std::move(params), .loss = 0.0};
}
}  // namespace

TEST_CASE("apportion splits by largest remainder, each share within one of its quota", "[train][federated]") {
    CHECK(data::apportion(114, {15, 1, 1}) == std::vector<std::int64_t>{100, 7, 7});
    CHECK(data::apportion(10, {1, 1, 1}) == std::vector<std::int64_t>{4, 3, 3});  // tie: lower index
    CHECK(data::apportion(8, {1, 15, 1, 1}) == std::vector<std::int64_t>{1, 7, 0, 0});  // remainders 8, 8·15 mod 18 = 12, 8, 8
    CHECK(data::apportion(0, {15, 1}) == std::vector<std::int64_t>{0, 0});
}

TEST_CASE("The skewed split: one 15x partition per domain, every client holds every domain, disjoint and complete",
          "[train][federated]") {
    const std::vector<std::string> domains{"press", "religion", "fiction", "learned"};
    const std::vector<std::int64_t> per_domain{114, 500, 233, 45};
    const auto sd = sample_domains(per_domain);
    const std::int64_t N = 20;
    const data::FederatedSplit s = data::skewed_split(sd, domains, {.clients = N, .skew = 15, .seed = 7});
    REQUIRE(s.clients() == N);
    REQUIRE(s.big_client.size() == domains.size());
    // The big partitions sit with different clients (a seeded permutation, domain d -> perm[d]).
    CHECK(std::set<std::int64_t>(s.big_client.begin(), s.big_client.end()).size() == domains.size());

    std::vector<int> seen(sd.size(), 0);
    for (std::int64_t c = 0; c < N; ++c) {
        for (std::int64_t i : s.client_samples[static_cast<std::size_t>(c)]) ++seen[static_cast<std::size_t>(i)];
        std::vector<std::int64_t> counted(domains.size(), 0);
        for (std::int64_t i : s.client_samples[static_cast<std::size_t>(c)]) ++counted[static_cast<std::size_t>(sd[static_cast<std::size_t>(i)])];
        CHECK(counted == s.counts[static_cast<std::size_t>(c)]);
    }
    CHECK(std::all_of(seen.begin(), seen.end(), [](int k) { return k == 1; }));  // disjoint and complete

    const double W = static_cast<double>(N - 1 + 15);
    for (std::size_t d = 0; d < domains.size(); ++d) {
        std::int64_t sum = 0;
        for (std::int64_t c = 0; c < N; ++c) {
            const std::int64_t k = s.counts[static_cast<std::size_t>(c)][d];
            const bool big = c == s.big_client[d];
            const double quota = static_cast<double>(per_domain[d]) * (big ? 15.0 : 1.0) / W;
            INFO("domain " << domains[d] << " client " << c << " holds " << k << ", quota " << quota);
            CHECK(k >= 1);                        // every client holds every domain
            CHECK(std::abs(static_cast<double>(k) - quota) < 1.0);  // the 15x skew up to rounding
            sum += k;
        }
        CHECK(sum == per_domain[d]);
    }
    // Exact 15x when the domain divides evenly: 34 · 15 / 34 = 15 and 34 · 1 / 34 = 1 ... scaled.
    const data::FederatedSplit even = data::skewed_split(sample_domains({340}), {"x"}, {.clients = 20, .skew = 15, .seed = 1});
    for (std::int64_t c = 0; c < 20; ++c)
        CHECK(even.counts[static_cast<std::size_t>(c)][0] == (c == even.big_client[0] ? 150 : 10));

    // Same seed, same split; another seed moves the big partitions and the samples.
    const data::FederatedSplit again = data::skewed_split(sd, domains, {.clients = N, .skew = 15, .seed = 7});
    CHECK(again.client_samples == s.client_samples);
    const data::FederatedSplit other = data::skewed_split(sd, domains, {.clients = N, .skew = 15, .seed = 8});
    CHECK(other.client_samples != s.client_samples);
}

TEST_CASE("The skewed split refuses a domain too small for every client to hold it", "[train][federated]") {
    // 20 clients, skew 15: a domain needs N - 1 + 15 = 34 samples.
    CHECK_NOTHROW(data::skewed_split(sample_domains({34, 40}), {"a", "b"}, {.clients = 20}));
    CHECK_THROWS_WITH(data::skewed_split(sample_domains({40, 33}), {"a", "b"}, {.clients = 20}),
                      Catch::Contains("domain 'b' has 33 samples") && Catch::Contains("34"));
    CHECK_THROWS_WITH(data::skewed_split({0, 2}, {"a", "b"}, {.clients = 1}), Catch::Contains("outside the 2 domains"));
}

TEST_CASE("SubsetBatches serves exactly a client's windows each epoch", "[train][federated]") {
    data::Corpus c;
    for (int i = 0; i < 4; ++i) {
        c.docs.push_back({std::string(40, static_cast<char>('a' + i)), "x", "x" + std::to_string(i)});
        c.docs.push_back({std::string(40, static_cast<char>('k' + i)), "y", "y" + std::to_string(i)});
    }
    c.domains = {"x", "y"};
    data::Batches all(c, test::ByteTokenizer{.symbols = 64}, {.batch_size = 4, .seq_len = 8});
    const std::vector<std::int64_t> mine{1, 3, 5, 20, 30};
    data::SubsetBatches sub(all, mine, 2, 9);
    data::Batch b;
    std::multiset<std::string> got;
    for (int k = 0; k < 3; ++k) {
        REQUIRE(sub.next(b));
        for (std::int64_t r = 0; r < b.size(); ++r) {
            got.insert(std::string(b.ids.data<std::int32_t>() + r * 8, b.ids.data<std::int32_t>() + r * 8 + 8)
                           .substr(0, 0) + std::to_string(b.ids.data<std::int32_t>()[r * 8 + 1]) + "/" +
                       std::to_string(b.domains.data<std::int32_t>()[r]));
        }
    }
    CHECK_FALSE(sub.next(b));
    std::multiset<std::string> want;
    std::vector<std::int32_t> ids(8), targets(8);
    for (std::int64_t w : mine) {
        all.fill_window(w, ids.data(), targets.data());
        want.insert(std::to_string(ids[1]) + "/" + std::to_string(all.window_domain(w)));
    }
    CHECK(got == want);
}

TEST_CASE("FedAvg of identical clients equals one client; weights follow sample counts", "[train][federated]") {
    const Tensor a = test::random_tensor({3, 4}, 1), g = test::random_tensor({2}, 2);
    std::vector<train::ClientUpdate> same;
    for (int c = 0; c < 5; ++c) same.push_back(update(c, 3 + 7 * c, {a.clone(), g.clone()}));
    for (bool weighted : {true, false}) {
        const std::vector<Tensor> avg = train::fed_avg(same, weighted);
        REQUIRE(avg.size() == 2);
        CHECK(std::memcmp(avg[0].f32(), a.f32(), a.bytes()) == 0);
        CHECK(std::memcmp(avg[1].f32(), g.f32(), g.bytes()) == 0);
    }
    // By hand: clients with 1, 3 and 4 samples and values 8, 0, 2 -> (8 + 0 + 8) / 8 = 2; unweighted 10 / 3.
    std::vector<train::ClientUpdate> ups{update(0, 1, {values({8.0f, -1.0f})}),
                                         update(4, 3, {values({0.0f, 1.0f})}),
                                         update(9, 4, {values({2.0f, 0.5f})})};
    const std::vector<Tensor> w = train::fed_avg(ups);
    CHECK(w[0].f32()[0] == Approx(2.0f));
    CHECK(w[0].f32()[1] == Approx((-1.0f + 3.0f + 2.0f) / 8.0f));
    const std::vector<Tensor> u = train::fed_avg(ups, false);
    CHECK(u[0].f32()[0] == Approx(10.0f / 3.0f));
    CHECK(u[0].f32()[1] == Approx(0.5f / 3.0f));
    ups[1].params[0] = Tensor::zeros({3});
    CHECK_THROWS_WITH(train::fed_avg(ups), Catch::Contains("client 4") && Catch::Contains("shape"));
    CHECK_THROWS_WITH(train::fed_avg({}), Catch::Contains("no client updates"));
}

TEST_CASE("Each round draws C distinct clients from (seed, round)", "[train][federated]") {
    const train::FederatedOptions o{.clients = 100, .active = 10, .rounds = 5, .seed = 3};
    std::set<std::vector<std::int64_t>> rounds;
    for (std::int64_t r = 0; r < 5; ++r) {
        const auto cs = train::sample_clients(o, r);
        REQUIRE(cs.size() == 10);
        CHECK(std::set<std::int64_t>(cs.begin(), cs.end()).size() == 10);
        CHECK(std::is_sorted(cs.begin(), cs.end()));
        CHECK(cs.back() < 100);
        CHECK(cs == train::sample_clients(o, r));
        rounds.insert(cs);
    }
    CHECK(rounds.size() == 5);
    CHECK_THROWS_WITH((train::FederatedOptions{.clients = 5, .active = 6}.validate()), Catch::Contains("active clients = 6"));

    // run_federated: the aggregation sees the round's updates, in client order.
    std::vector<std::int64_t> seen;
    train::GlobalState g0{.round = 0, .params = {values({0.0f})}};
    const train::GlobalState end = train::run_federated(
        g0,
        [&](std::int64_t c, const train::GlobalState& g) {
            seen.push_back(c);
            return update(c, 1, {values({g.params[0].f32()[0] + 1.0f})});
        },
        {.clients = 6, .active = 3, .rounds = 4, .seed = 1}, [](const train::GlobalState&, const std::vector<train::ClientUpdate>&) {});
    CHECK(end.round == 4);
    CHECK(end.params[0].f32()[0] == Approx(4.0f));  // every client adds one; the average moves by one a round
    CHECK(seen.size() == 12);
}

TEST_CASE("Federated prompt tuning on a frozen tiny model: the global prompt improves, the model does not move",
          "[train][federated]") {
    using Model = nn::Transformer<nn::Llama, nn::DenseFFN<>, compress::None, prompt::SoftPrompt>;
    data::Corpus c;
    for (int i = 0; i < 10; ++i) {
        c.docs.push_back({"abcdefgabcdefgabcdefgabcdefgabcdefgabcdefg", "cycle", "c" + std::to_string(i)});
        c.docs.push_back({"ppqqrrssppqqrrssppqqrrssppqqrrssppqqrrss", "pairs", "p" + std::to_string(i)});
    }
    c.domains = {"cycle", "pairs"};
    const test::ByteTokenizer tok{.symbols = 16};
    data::Batches train(c, tok, {.batch_size = 4, .seq_len = 12, .seed = 1});
    data::Batches val(c, tok, {.batch_size = 8, .seq_len = 12, .seed = 0});
    Model m({.vocab_size = 19, .d_model = 16, .n_layers = 2, .n_heads = 2, .d_ff = 32, .max_seq = 24}, 11);
    test::randomize_matrices(m, 5, 0.3f);
    m.init_prompt({.length = 3, .init = prompt::PromptInit::uniform, .seed = 1});
    std::vector<Tensor> weights;
    m.visit_parameters([&](autodiff::Parameter& p) { weights.push_back(p.value().clone()); });
    const double before = eval::corpus_perplexity(m, val).ppl();

    const data::FederatedSplit split = data::skewed_split(train, {.clients = 4, .skew = 15, .seed = 2});
    const train::FederatedResult r = train::tune_prompt_federated(
        m, train, &val, split, {.clients = 4, .active = 2, .rounds = 6, .seed = 3},
        {.local_steps = 3, .batch_size = 4, .lr = 5e-2f}, /*eval_every=*/2, 0, /*show_progress=*/false);
    REQUIRE(r.rounds.size() == 6);
    CHECK(r.local_steps_total == 6 * 2 * 3);
    CHECK(r.trainable_params == 3 * 16);
    CHECK(std::isnan(r.rounds[0].val_ppl));  // validated every 2 rounds
    CHECK_FALSE(std::isnan(r.rounds[1].val_ppl));
    const double after = eval::corpus_perplexity(m, val).ppl();
    INFO("validation ppl " << before << " -> " << after << " (best round " << r.best_round << ")");
    CHECK(after == Approx(r.best_val_ppl).epsilon(1e-6));  // the best global prompt is in the model
    CHECK(after < 0.9 * before);
    std::size_t i = 0;
    m.visit_parameters([&](autodiff::Parameter& p) {
        CHECK(std::memcmp(p.value().f32(), weights[i].f32(), weights[i].bytes()) == 0);
        ++i;
    });
}
