#include "test_util.hpp"

#include <catch2/catch.hpp>

#include <mopt/data/batches.hpp>

#include <map>
#include <set>
#include <span>
#include <string>
#include <utility>
#include <vector>

using namespace mopt;
using data::Batch;
using data::Batches;
using data::BatchOptions;

namespace {

// Bytes as tokens (id = byte + 3), so every window can be checked against the text itself.
struct ByteTokenizer {
    std::string fail_on;  // encoding a text that contains this throws (tests error propagation)
    std::vector<std::int32_t> encode(std::string_view text, bool add_bos = true) const {
        check(fail_on.empty() || text.find(fail_on) == std::string_view::npos, "ByteTokenizer: refusing '", fail_on, "'");
        std::vector<std::int32_t> ids;
        if (add_bos) ids.push_back(1);
        for (const char c : text) ids.push_back(static_cast<unsigned char>(c) + 3);
        return ids;
    }
    std::string decode(std::span<const std::int32_t> ids) const {
        std::string s;
        for (const auto id : ids)
            if (id >= 3) s += static_cast<char>(id - 3);
        return s;
    }
    std::int64_t vocab_size() const { return 259; }
    std::int32_t bos_id() const { return 1; }
    std::int32_t eos_id() const { return 2; }
};
static_assert(data::TextTokenizer<ByteTokenizer>);

// Domains "a" (3 documents), "b" (1 long document), "c" (1 short one), "empty" (none in this corpus).
data::Corpus corpus() {
    data::Corpus c;
    c.docs = {{"alpha one two", "a", "a0"},
              {std::string(100, 'x') + "the long b document" + std::string(30, 'y'), "b", "b0"},
              {"alpha three", "a", "a1"},
              {"tiny", "c", "c0"},
              {"alpha four five six seven", "a", "a2"}};
    c.domains = {"a", "b", "c", "empty"};
    return c;
}

// The expected stream of a domain: its documents' bytes + 3, EOS after each.
std::vector<std::int32_t> stream_of(const data::Corpus& c, const std::string& domain) {
    std::vector<std::int32_t> s;
    for (const auto& d : c.docs)
        if (d.domain == domain) {
            for (const char ch : d.text) s.push_back(static_cast<unsigned char>(ch) + 3);
            s.push_back(2);
        }
    return s;
}

struct Row {
    std::vector<std::int32_t> ids, targets;
    std::int32_t domain;
    friend bool operator<(const Row& a, const Row& b) {
        return std::tie(a.domain, a.targets, a.ids) < std::tie(b.domain, b.targets, b.ids);
    }
    friend bool operator==(const Row& a, const Row& b) = default;
};

// All rows of one epoch, in order.
std::vector<Row> epoch_rows(Batches& batches, std::vector<std::int64_t>* sizes = nullptr) {
    std::vector<Row> rows;
    Batch b;
    const std::int64_t T = batches.options().seq_len;
    while (batches.next(b)) {
        REQUIRE(b.ids.dtype() == DType::i32);
        REQUIRE(b.targets.shape() == b.ids.shape());
        REQUIRE(b.ids.dim(1) == T);
        REQUIRE(b.domains.rank() == 1);
        REQUIRE(b.domains.dim(0) == b.size());
        if (sizes) sizes->push_back(b.size());
        for (std::int64_t r = 0; r < b.size(); ++r) {
            const auto* ids = b.ids.data<std::int32_t>() + r * T;
            const auto* tg = b.targets.data<std::int32_t>() + r * T;
            rows.push_back({{ids, ids + T}, {tg, tg + T}, b.domains.data<std::int32_t>()[r]});
        }
    }
    return rows;
}

}  // namespace

TEST_CASE("batches: tokenize makes one stream per domain, EOS after each document", "[data][batches]") {
    const auto c = corpus();
    const auto s = data::tokenize(c, ByteTokenizer{});
    REQUIRE(s.domains == c.domains);
    REQUIRE(s.per_domain.size() == 4);
    for (std::size_t d = 0; d < 4; ++d) REQUIRE(s.per_domain[d] == stream_of(c, c.domains[d]));
    REQUIRE(s.per_domain[3].empty());
    REQUIRE(s.bos == 1);
    REQUIRE(s.eos == 2);
    REQUIRE(s.vocab_size == 259);
    std::int64_t bytes = 0;
    for (const auto& d : c.docs) bytes += static_cast<std::int64_t>(d.text.size()) + 1;
    REQUIRE(s.num_tokens() == bytes);

    // An error while encoding (here inside the parallel loop) reaches the caller.
    ByteTokenizer failing;
    failing.fail_on = "three";
    REQUIRE_THROWS_WITH(data::tokenize(c, failing), Catch::Contains("refusing 'three'"));
}

TEST_CASE("batches: every window once per epoch, BOS first, shifted targets, right domain", "[data][batches]") {
    const auto c = corpus();
    const std::int64_t T = 8, B = 3;
    Batches batches(c, ByteTokenizer{}, {.batch_size = B, .seq_len = T, .seed = 11});
    // Expected windows: T consecutive tokens of one domain's stream at offsets 0, T, 2T, ...
    std::vector<Row> expected;
    for (std::size_t d = 0; d < c.domains.size(); ++d) {
        const auto s = stream_of(c, c.domains[d]);
        for (std::size_t k = 0; (k + 1) * T <= s.size(); ++k) {
            Row r{{1}, {s.begin() + static_cast<std::ptrdiff_t>(k * T), s.begin() + static_cast<std::ptrdiff_t>((k + 1) * T)},
                  static_cast<std::int32_t>(d)};
            r.ids.insert(r.ids.end(), r.targets.begin(), r.targets.end() - 1);
            expected.push_back(r);
        }
    }
    REQUIRE(batches.num_windows() == static_cast<std::int64_t>(expected.size()));
    const auto la = static_cast<std::int64_t>(stream_of(c, "a").size());  // 52 tokens
    const auto lb = static_cast<std::int64_t>(stream_of(c, "b").size());  // 150
    REQUIRE(la == 52);
    REQUIRE(lb == 150);
    REQUIRE(batches.num_windows() == la / T + lb / T);  // c's 5 tokens make no window
    REQUIRE(batches.batches_per_epoch() == (batches.num_windows() + B - 1) / B);

    std::vector<std::int64_t> sizes;
    auto rows = epoch_rows(batches, &sizes);
    REQUIRE(static_cast<std::int64_t>(sizes.size()) == batches.batches_per_epoch());
    for (std::size_t i = 0; i + 1 < sizes.size(); ++i) REQUIRE(sizes[i] == B);
    REQUIRE(sizes.back() == batches.num_windows() - B * (batches.batches_per_epoch() - 1));
    const auto served = rows;
    std::sort(rows.begin(), rows.end());
    std::sort(expected.begin(), expected.end());
    REQUIRE(rows == expected);  // each window exactly once, with its own domain
    REQUIRE(served != rows);    // and shuffled

    // The targets extend nn::next_token_targets: same on positions 0..T-2, plus a real last one.
    Batches again(c, ByteTokenizer{}, {.batch_size = B, .seq_len = T, .seed = 11});
    Batch b;
    REQUIRE(again.next(b));
    const Tensor reference = nn::next_token_targets(b.ids);
    for (std::int64_t r = 0; r < b.size(); ++r)
        for (std::int64_t t = 0; t < T; ++t) {
            const auto got = b.targets.data<std::int32_t>()[r * T + t];
            if (t + 1 < T) REQUIRE(got == reference.data<std::int32_t>()[r * T + t]);
            else REQUIRE((got >= 2 && got != -100));
        }
}

TEST_CASE("batches: order is fixed by seed and epoch", "[data][batches]") {
    const auto c = corpus();
    const BatchOptions opt{.batch_size = 2, .seq_len = 4, .seed = 5};
    Batches a(c, ByteTokenizer{}, opt), b(c, ByteTokenizer{}, opt);
    auto other_opt = opt;
    other_opt.seed = 6;
    Batches other(c, ByteTokenizer{}, other_opt);
    const auto e0 = epoch_rows(a);
    REQUIRE(e0 == epoch_rows(b));
    REQUIRE(e0 != epoch_rows(other));

    a.start_epoch(1);
    REQUIRE(a.epoch() == 1);
    const auto e1 = epoch_rows(a);
    REQUIRE(e1 != e0);
    auto s0 = e0, s1 = e1;
    std::sort(s0.begin(), s0.end());
    std::sort(s1.begin(), s1.end());
    REQUIRE(s0 == s1);  // the same windows, reshuffled
    a.start_epoch(0);
    REQUIRE(epoch_rows(a) == e0);

    // next_wrapping runs into the next epoch by itself, in that epoch's order.
    Batches w(c, ByteTokenizer{}, opt);
    Batch batch;
    for (std::int64_t i = 0; i < w.batches_per_epoch(); ++i) w.next_wrapping(batch);
    REQUIRE(w.epoch() == 0);
    w.next_wrapping(batch);
    REQUIRE(w.epoch() == 1);
    REQUIRE(std::vector<std::int32_t>(batch.targets.data<std::int32_t>(), batch.targets.data<std::int32_t>() + 4) ==
            e1[0].targets);

    // The steady state reuses the batch's buffers.
    Batches r(c, ByteTokenizer{}, opt);
    Batch reuse;
    REQUIRE(r.next(reuse));
    const void* before = reuse.ids.raw();
    REQUIRE(r.next(reuse));
    REQUIRE(reuse.ids.raw() == before);
}

TEST_CASE("batches: drop_last and pad_tail", "[data][batches]") {
    const auto c = corpus();
    Batches full(c, ByteTokenizer{}, {.batch_size = 4, .seq_len = 8, .seed = 1, .drop_last = true});
    std::vector<std::int64_t> sizes;
    epoch_rows(full, &sizes);
    REQUIRE(static_cast<std::int64_t>(sizes.size()) == full.num_windows() / 4);
    REQUIRE(full.batches_per_epoch() == full.num_windows() / 4);
    for (const auto s : sizes) REQUIRE(s == 4);

    // pad_tail: every token is a target exactly once; padding is EOS in, -100 out.
    const std::int64_t T = 16;
    Batches padded(c, ByteTokenizer{}, {.batch_size = 4, .seq_len = T, .seed = 1, .pad_tail = true});
    const auto rows = epoch_rows(padded);
    std::map<std::int32_t, std::int64_t> targets_per_domain;
    std::int64_t padding = 0;
    for (const auto& row : rows) {
        REQUIRE(row.ids[0] == 1);
        for (std::int64_t t = 0; t < T; ++t) {
            if (row.targets[t] == -100) {
                ++padding;
                if (t + 1 < T) REQUIRE(row.ids[t + 1] == 2);
                if (t + 1 < T) REQUIRE(row.targets[t + 1] == -100);  // padding only at the end
            } else {
                ++targets_per_domain[row.domain];
                if (t + 1 < T && row.targets[t + 1] != -100) REQUIRE(row.ids[t + 1] == row.targets[t]);
            }
        }
    }
    REQUIRE(targets_per_domain[0] == 52);
    REQUIRE(targets_per_domain[1] == 150);
    REQUIRE(targets_per_domain[2] == 5);  // "tiny" + EOS: shorter than one window, kept padded
    REQUIRE(padding == (64 - 52) + (160 - 150) + (16 - 5));
    REQUIRE(padded.num_windows() == 4 + 10 + 1);
}

TEST_CASE("batches: too little text and bad options are clear errors", "[data][batches][errors]") {
    const auto c = corpus();
    REQUIRE_THROWS_WITH(Batches(c, ByteTokenizer{}, {.batch_size = 2, .seq_len = 151}),
                        Catch::Contains("seq_len = 151") && Catch::Contains("207 tokens") && Catch::Contains("150 in one domain"));
    REQUIRE_NOTHROW(Batches(c, ByteTokenizer{}, {.batch_size = 2, .seq_len = 150}));
    REQUIRE_THROWS_WITH(Batches(c, ByteTokenizer{}, {.batch_size = 0, .seq_len = 4}), Catch::Contains("batch_size = 0"));
    REQUIRE_THROWS_WITH(Batches(c, ByteTokenizer{}, {.batch_size = 2, .seq_len = 0}), Catch::Contains("seq_len = 0"));
    REQUIRE_THROWS_WITH(Batches(c, ByteTokenizer{}, {.batch_size = 9, .seq_len = 64, .drop_last = true}),
                        Catch::Contains("no full batch"));
    data::Corpus empty;
    empty.domains = {"a"};
    REQUIRE_THROWS_WITH(Batches(empty, ByteTokenizer{}, {.batch_size = 1, .seq_len = 4}), Catch::Contains("0 tokens"));
    Batches b(c, ByteTokenizer{}, {.batch_size = 2, .seq_len = 8});
    std::vector<std::int32_t> ids(8), targets(8);
    REQUIRE_THROWS_WITH(b.fill_window(b.num_windows(), ids.data(), targets.data()), Catch::Contains("out of"));
}
