// Benchmarks of the packed-weight kernels (compress/packed_weight.hpp) against the f32 GEMM of a
// dense Linear: y[rows, out] = x[rows, in] Ŵᵀ for int8 (one group a row), int4 (group 128) and
// 2:4 sparse weights. items/s counts multiply-adds (rows · in · out), so the rows of a format are
// directly comparable; "weight_bytes" is the weight's stored size. The forward variants compare
// the two tilings: "parallel" (tiles on OpenMP threads, single-threaded GEMM inside — what
// matmul() runs) and "sequential" (all threads expand a tile, then the multi-threaded GEMM).
// Times are wall-clock (UseRealTime): the kernels run on several threads.
#include <benchmark/benchmark.h>

#include <mopt/backend/cpu/gemm.hpp>
#include <mopt/compress/gptq.hpp>
#include <mopt/compress/int8.hpp>
#include <mopt/compress/packed_weight.hpp>
#include <mopt/compress/prune.hpp>
#include <mopt/compress/rtn.hpp>
#include <algorithm>
#include <array>
#include <optional>
#include <random>
#include <string>
#include <vector>

using namespace mopt;

namespace {

Tensor random(Shape s, std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<float> d(-1.0f, 1.0f);
    Tensor t = Tensor::empty(s);
    for (float& v : t.span()) v = d(rng);
    return t;
}

compress::IntCodes codes(std::int64_t out, std::int64_t in, int bits, std::int64_t group) {
    std::mt19937_64 rng(7);
    std::uniform_int_distribution<int> code(0, (1 << bits) - 1);
    compress::IntCodes c;
    c.out = out;
    c.in = in;
    c.bits = bits;
    c.group = group;
    c.q.resize(static_cast<std::size_t>(out * in));
    for (auto& q : c.q) q = static_cast<std::uint8_t>(code(rng));
    c.scale.assign(static_cast<std::size_t>(out * in / group), 0.01f);
    c.zero.assign(static_cast<std::size_t>(out * in / group), static_cast<float>(1 << (bits - 1)));
    return c;
}

Tensor two_four(std::int64_t out, std::int64_t in) {
    Tensor w = random({out, in}, 3);
    for (std::int64_t i = 0; i < out * in; i += 4) w.f32()[i + 1] = w.f32()[i + 3] = 0.0f;
    return w;
}

// The alternative tiling, kept here as the baseline: all threads expand a tile of 256 output rows,
// then the multi-threaded GEMM runs on it.
constexpr std::int64_t sequential_tile = 256;

void forward_sequential_tiles(const compress::PackedWeight& w, const float* x, std::int64_t rows, float* y) {
    const std::int64_t out = w.out(), in = w.in();
    std::vector<float> buf(static_cast<std::size_t>(sequential_tile * in));
    for (std::int64_t o0 = 0; o0 < out; o0 += sequential_tile) {
        const std::int64_t o1 = std::min(out, o0 + sequential_tile);
        backend::cpu::parallel_for(o1 - o0, in, [&](std::int64_t r) { w.dequantize_rows(o0 + r, o0 + r + 1, buf.data() + r * in); });
        backend::cpu::gemm({.trans_b = true, .m = rows, .n = o1 - o0, .k = in, .a = x, .lda = in, .b = buf.data(), .ldb = in,
                            .c = y + o0, .ldc = out});
    }
}

void backward_sequential_tiles(const compress::PackedWeight& w, const float* dy, std::int64_t rows, float* dx) {
    const std::int64_t out = w.out(), in = w.in();
    std::vector<float> buf(static_cast<std::size_t>(sequential_tile * in));
    for (std::int64_t o0 = 0; o0 < out; o0 += sequential_tile) {
        const std::int64_t o1 = std::min(out, o0 + sequential_tile);
        backend::cpu::parallel_for(o1 - o0, in, [&](std::int64_t r) { w.dequantize_rows(o0 + r, o0 + r + 1, buf.data() + r * in); });
        backend::cpu::gemm({.m = rows, .n = in, .k = o1 - o0, .beta = 1.0f, .a = dy + o0, .lda = out, .b = buf.data(),
                            .ldb = in, .c = dx, .ldc = in});
    }
}

enum Format { f32, int8, int4, nm24 };
enum Variant { parallel_tiles, sequential_tiles };

void packed_matmul(benchmark::State& state) {
    const std::int64_t rows = state.range(0), in = state.range(1), out = state.range(2);
    const auto format = static_cast<Format>(state.range(3));
    const auto variant = static_cast<Variant>(state.range(4));
    const Tensor x = random({rows, in}, 1);
    Tensor y = Tensor::zeros({rows, out});
    Tensor dense;
    std::optional<compress::PackedWeight> w;
    switch (format) {
        case f32: dense = random({out, in}, 2); break;
        case int8: w.emplace(compress::PackedWeight::quantized(codes(out, in, 8, in))); break;
        case int4: w.emplace(compress::PackedWeight::quantized(codes(out, in, 4, 128))); break;
        case nm24: w.emplace(compress::PackedWeight::nm(two_four(out, in), 2, 4)); break;
    }
    state.SetLabel((w ? w->format() : std::string("f32")) + (format == f32 ? "" : variant == parallel_tiles ? " parallel" : " sequential"));
    for (auto _ : state) {
        if (!w)
            backend::cpu::gemm({.trans_b = true, .m = rows, .n = out, .k = in, .a = x.f32(), .lda = in, .b = dense.f32(),
                                .ldb = in, .c = y.f32(), .ldc = out});
        else if (variant == parallel_tiles)
            compress::matmul(*w, x.f32(), rows, y.f32());
        else
            forward_sequential_tiles(*w, x.f32(), rows, y.f32());
        benchmark::DoNotOptimize(y.f32());
    }
    state.SetItemsProcessed(state.iterations() * rows * in * out);
    state.counters["weight_bytes"] = static_cast<double>(w ? w->bytes() : dense.bytes());
}

// The backward of a frozen packed Linear: dx[rows, in] += dy[rows, out] Ŵ. "parallel" is
// matmul_backward() (rows of dy split across threads), "sequential" the baseline tiling above.
void packed_matmul_backward(benchmark::State& state) {
    const std::int64_t rows = state.range(0), in = state.range(1), out = state.range(2);
    const auto format = static_cast<Format>(state.range(3));
    const auto variant = static_cast<Variant>(state.range(4));
    const Tensor dy = random({rows, out}, 1);
    Tensor dx = Tensor::zeros({rows, in});
    Tensor dense;
    std::optional<compress::PackedWeight> w;
    switch (format) {
        case f32: dense = random({out, in}, 2); break;
        case int8: w.emplace(compress::PackedWeight::quantized(codes(out, in, 8, in))); break;
        case int4: w.emplace(compress::PackedWeight::quantized(codes(out, in, 4, 128))); break;
        case nm24: w.emplace(compress::PackedWeight::nm(two_four(out, in), 2, 4)); break;
    }
    state.SetLabel((w ? w->format() : std::string("f32")) + (format == f32 ? "" : variant == parallel_tiles ? " parallel" : " sequential"));
    for (auto _ : state) {
        if (!w)
            backend::cpu::gemm({.m = rows, .n = in, .k = out, .beta = 1.0f, .a = dy.f32(), .lda = out, .b = dense.f32(),
                                .ldb = in, .c = dx.f32(), .ldc = in});
        else if (variant == parallel_tiles)
            compress::matmul_backward(*w, dy.f32(), rows, dx.f32());
        else
            backward_sequential_tiles(*w, dy.f32(), rows, dx.f32());
        benchmark::DoNotOptimize(dx.f32());
    }
    state.SetItemsProcessed(state.iterations() * rows * in * out);
}

void sizes(benchmark::internal::Benchmark* b) {
    for (auto [rows, in, out] : {std::array<std::int64_t, 3>{1, 1024, 1024}, {64, 1024, 1024}, {512, 1024, 4096}, {2048, 512, 2048}}) {
        b->Args({rows, in, out, f32, parallel_tiles});
        for (Format f : {int8, int4, nm24})
            for (Variant v : {parallel_tiles, sequential_tiles}) b->Args({rows, in, out, f, v});
    }
}

// Compression time of one layer [n, n] per method, calibrated on 2048 correlated rows (statistics
// collected once outside the timing; the time is the method's own work, as a model run repeats it
// for every projection). method: 0 magnitude, 1 wanda, 2 sparsegpt (50%), 3 rtn, 4 gptq (int4 g128),
// 5 int8.
void compression_time(benchmark::State& state) {
    const std::int64_t n = state.range(0);
    const int method = static_cast<int>(state.range(1));
    const Tensor z = random({2048, n}, 5), mix = random({n, n}, 6);
    Tensor x = Tensor::empty({2048, n});
    backend::cpu::gemm({.m = 2048, .n = n, .k = n, .a = z.f32(), .lda = n, .b = mix.f32(), .ldb = n, .c = x.f32(), .ldc = n});
    compress::InputStats stats(n);
    stats.add(x);
    const Tensor w0 = random({n, n}, 8);
    static const char* names[] = {"magnitude", "wanda", "sparsegpt", "rtn", "gptq", "int8"};
    state.SetLabel(names[method]);
    for (auto _ : state) {
        state.PauseTiming();
        Tensor w = w0.clone();
        state.ResumeTiming();
        const compress::QuantSpec spec{.bits = 4, .group = 128};
        switch (method) {
            case 0: compress::prune(w, compress::Saliency::magnitude, {.ratio = 0.5}, nullptr); break;
            case 1: compress::prune(w, compress::Saliency::wanda, {.ratio = 0.5}, &stats); break;
            case 2: compress::prune(w, compress::Saliency::sparsegpt, {.ratio = 0.5}, &stats); break;
            case 3: benchmark::DoNotOptimize(compress::quantize_rtn(w, spec)); break;
            case 4: benchmark::DoNotOptimize(compress::quantize_gptq(w, stats, spec)); break;
            default: benchmark::DoNotOptimize(compress::quantize_int8(w)); break;
        }
        benchmark::DoNotOptimize(w.f32());
    }
}

}  // namespace

BENCHMARK(compression_time)
    ->ArgNames({"n", "method"})
    ->ArgsProduct({{512, 1024}, {0, 1, 2, 3, 4, 5}})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(packed_matmul)->ArgNames({"rows", "in", "out", "format", "variant"})->Apply(sizes)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(packed_matmul_backward)
    ->ArgNames({"rows", "in", "out", "format", "variant"})
    ->Apply(sizes)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

BENCHMARK_MAIN();
