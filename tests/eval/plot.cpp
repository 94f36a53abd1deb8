#include <catch2/catch.hpp>
#include <mopt/eval/plot.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "test_util.hpp"

using namespace mopt::eval;
namespace fs = std::filesystem;

namespace {

// ---------------------------------------------------------------------------------------------
// A small PNG reader written from the specifications (PNG §5, RFC 1950, RFC 1951), independent of
// the writer: bitwise CRC, its own length/distance tables, all five scanline filters. It reads
// stored and fixed-Huffman deflate blocks (what mopt writes) and refuses dynamic ones.

std::uint32_t crc_bitwise(const std::uint8_t* p, std::size_t n) {
    std::uint32_t c = 0xFFFFFFFFu;
    for (std::size_t i = 0; i < n; ++i) {
        c ^= p[i];
        for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
    }
    return ~c;
}

std::uint32_t adler_simple(const std::vector<std::uint8_t>& d) {
    std::uint32_t a = 1, b = 0;
    for (auto v : d) a = (a + v) % 65521, b = (b + a) % 65521;
    return (b << 16) | a;
}

std::uint32_t be32(const std::uint8_t* p) {
    return (std::uint32_t{p[0]} << 24) | (std::uint32_t{p[1]} << 16) | (std::uint32_t{p[2]} << 8) | p[3];
}

struct Decoded {
    int width = 0, height = 0;
    std::vector<std::uint8_t> rgb;
    std::vector<std::string> chunks;
    int stored_blocks = 0, fixed_blocks = 0;
    std::vector<std::pair<std::string, std::string>> text;
    [[nodiscard]] Rgb at(int x, int y) const {
        const std::size_t i = (static_cast<std::size_t>(y) * width + x) * 3;
        return {rgb[i], rgb[i + 1], rgb[i + 2]};
    }
};

struct BitReader {
    const std::vector<std::uint8_t>& d;
    std::size_t pos = 0;  // in bits
    std::uint32_t bit() {
        if (pos / 8 >= d.size()) throw std::runtime_error("deflate stream ends early");
        const std::uint32_t b = (d[pos / 8] >> (pos % 8)) & 1u;
        ++pos;
        return b;
    }
    std::uint32_t bits(int n) {  // least significant first
        std::uint32_t v = 0;
        for (int i = 0; i < n; ++i) v |= bit() << i;
        return v;
    }
    std::uint32_t code_bits(int n) {  // Huffman codes: most significant first
        std::uint32_t v = 0;
        for (int i = 0; i < n; ++i) v = (v << 1) | bit();
        return v;
    }
};

// RFC 1951 §3.2.6 fixed literal/length code, read a bit at a time.
int fixed_symbol(BitReader& br) {
    std::uint32_t v = br.code_bits(7);
    if (v <= 0x17) return static_cast<int>(256 + v);
    v = (v << 1) | br.bit();
    if (v >= 0x30 && v <= 0xBF) return static_cast<int>(v - 0x30);
    if (v >= 0xC0 && v <= 0xC7) return static_cast<int>(280 + v - 0xC0);
    v = (v << 1) | br.bit();
    if (v >= 0x190 && v <= 0x1FF) return static_cast<int>(144 + v - 0x190);
    throw std::runtime_error("invalid fixed Huffman code");
}

std::vector<std::uint8_t> inflate(const std::vector<std::uint8_t>& d, std::size_t begin, Decoded& info) {
    // Tables built from the rules of §3.2.5 rather than copied: extra bits grow every 4 (lengths)
    // or 2 (distances) codes.
    std::vector<int> len_base, len_extra, dist_base, dist_extra;
    for (int i = 0, base = 3; i < 28; ++i) {
        const int e = i < 8 ? 0 : (i - 4) / 4;
        len_base.push_back(base), len_extra.push_back(e);
        base += 1 << e;
    }
    len_base.push_back(258), len_extra.push_back(0);
    for (int i = 0, base = 1; i < 30; ++i) {
        const int e = i < 4 ? 0 : (i - 2) / 2;
        dist_base.push_back(base), dist_extra.push_back(e);
        base += 1 << e;
    }
    std::vector<std::uint8_t> out;
    BitReader br{d, begin * 8};
    for (bool last = false; !last;) {
        last = br.bit();
        const auto type = br.bits(2);
        if (type == 0) {
            br.pos = (br.pos + 7) / 8 * 8;
            const std::uint32_t len = br.bits(16), nlen = br.bits(16);
            if ((len ^ 0xFFFFu) != nlen) throw std::runtime_error("stored block LEN/NLEN mismatch");
            for (std::uint32_t i = 0; i < len; ++i) out.push_back(static_cast<std::uint8_t>(br.bits(8)));
            ++info.stored_blocks;
        } else if (type == 1) {
            for (;;) {
                const int sym = fixed_symbol(br);
                if (sym < 256) {
                    out.push_back(static_cast<std::uint8_t>(sym));
                    continue;
                }
                if (sym == 256) break;
                if (sym > 285) throw std::runtime_error("invalid length symbol");
                const int li = sym - 257;
                const int length = len_base[li] + static_cast<int>(br.bits(len_extra[li]));
                const auto dc = static_cast<int>(br.code_bits(5));
                if (dc > 29) throw std::runtime_error("invalid distance code");
                const auto dist = static_cast<std::size_t>(dist_base[dc] + static_cast<int>(br.bits(dist_extra[dc])));
                if (dist > out.size() || dist > 32768) throw std::runtime_error("distance beyond the window");
                for (int k = 0; k < length; ++k) out.push_back(out[out.size() - dist]);
            }
            ++info.fixed_blocks;
        } else {
            throw std::runtime_error("unexpected deflate block type " + std::to_string(type));
        }
    }
    // Adler-32 follows on the next byte boundary.
    const std::size_t end = (br.pos + 7) / 8;
    if (end + 4 != d.size()) throw std::runtime_error("bytes after the zlib stream");
    if (be32(&d[end]) != adler_simple(out)) throw std::runtime_error("Adler-32 mismatch");
    return out;
}

int paeth_predictor(int a, int b, int c) {
    const int p = a + b - c;
    const int pa = std::abs(p - a), pb = std::abs(p - b), pc = std::abs(p - c);
    return (pa <= pb && pa <= pc) ? a : (pb <= pc ? b : c);
}

Decoded decode_png(const std::vector<std::uint8_t>& f) {
    Decoded out;
    const std::uint8_t sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
    if (f.size() < 8 || !std::equal(sig, sig + 8, f.begin())) throw std::runtime_error("bad PNG signature");
    std::vector<std::uint8_t> idat;
    std::size_t p = 8;
    while (p < f.size()) {
        if (p + 12 > f.size()) throw std::runtime_error("truncated chunk");
        const std::uint32_t len = be32(&f[p]);
        if (p + 12 + len > f.size()) throw std::runtime_error("chunk runs past the end");
        const std::string type(f.begin() + static_cast<std::ptrdiff_t>(p + 4), f.begin() + static_cast<std::ptrdiff_t>(p + 8));
        const std::uint8_t* data = &f[p + 8];
        if (crc_bitwise(&f[p + 4], len + 4) != be32(&f[p + 8 + len])) throw std::runtime_error("CRC mismatch in " + type);
        out.chunks.push_back(type);
        if (type == "IHDR") {
            if (len != 13) throw std::runtime_error("IHDR length");
            out.width = static_cast<int>(be32(data));
            out.height = static_cast<int>(be32(data + 4));
            if (data[8] != 8 || data[9] != 2 || data[10] != 0 || data[11] != 0 || data[12] != 0)
                throw std::runtime_error("IHDR: not 8-bit RGB, deflate, adaptive filter, no interlace");
        } else if (type == "IDAT") {
            idat.insert(idat.end(), data, data + len);
        } else if (type == "tEXt") {
            const std::string s(data, data + len);
            const auto z = s.find('\0');
            out.text.emplace_back(s.substr(0, z), s.substr(z + 1));
        }
        p += 12 + len;
    }
    if (out.chunks.empty() || out.chunks.front() != "IHDR" || out.chunks.back() != "IEND")
        throw std::runtime_error("IHDR must come first and IEND last");
    if (idat.size() < 6) throw std::runtime_error("no image data");
    const int cmf = idat[0], flg = idat[1];
    if ((cmf & 0x0F) != 8 || (cmf >> 4) > 7 || (cmf * 256 + flg) % 31 != 0 || (flg & 0x20))
        throw std::runtime_error("bad zlib header");
    const auto raw = inflate(idat, 2, out);
    const std::size_t stride = static_cast<std::size_t>(out.width) * 3;
    if (raw.size() != (stride + 1) * static_cast<std::size_t>(out.height)) throw std::runtime_error("wrong data size");
    out.rgb.assign(stride * static_cast<std::size_t>(out.height), 0);
    for (int y = 0; y < out.height; ++y) {
        const std::uint8_t filter = raw[static_cast<std::size_t>(y) * (stride + 1)];
        const std::uint8_t* in = &raw[static_cast<std::size_t>(y) * (stride + 1) + 1];
        std::uint8_t* row = &out.rgb[static_cast<std::size_t>(y) * stride];
        const std::uint8_t* up = y > 0 ? row - stride : nullptr;
        for (std::size_t i = 0; i < stride; ++i) {
            const int a = i >= 3 ? row[i - 3] : 0, b = up ? up[i] : 0, c = (up && i >= 3) ? up[i - 3] : 0;
            int pred = 0;
            switch (filter) {
                case 0: pred = 0; break;
                case 1: pred = a; break;
                case 2: pred = b; break;
                case 3: pred = (a + b) / 2; break;
                case 4: pred = paeth_predictor(a, b, c); break;
                default: throw std::runtime_error("bad filter type");
            }
            row[i] = static_cast<std::uint8_t>(in[i] + pred);
        }
    }
    return out;
}

std::vector<std::uint8_t> read_bytes(const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

Decoded decode_file(const fs::path& p) { return decode_png(read_bytes(p)); }

using mopt::test::TempDir;

double luma(Rgb c) { return 0.299 * c.r + 0.587 * c.g + 0.114 * c.b; }

bool same_pixels(const Decoded& d, const Image& img) {
    return d.width == img.width() && d.height == img.height() && d.rgb == img.bytes();
}

// Pixels of colour c inside r, minus those inside `except`.
long count_colour(const Decoded& d, const Rect& r, Rgb c, const Rect& except = {}) {
    long n = 0;
    for (int y = r.y0; y < r.y1; ++y)
        for (int x = r.x0; x < r.x1; ++x)
            n += d.at(x, y) == c && !except.contains(x, y);
    return n;
}

}  // namespace

TEST_CASE("plot: the test's PNG reader agrees with the standard check values", "[plot]") {
    const std::string nine = "123456789";  // the CRC-32 check value of ISO 3309 is 0xCBF43926
    const std::vector<std::uint8_t> b(nine.begin(), nine.end());
    CHECK(crc_bitwise(b.data(), b.size()) == 0xCBF43926u);
    CHECK(mopt::eval::detail::png::crc32(b.data(), b.size()) == 0xCBF43926u);
    const std::string wiki = "Wikipedia";  // Adler-32 example value 0x11E60398
    const std::vector<std::uint8_t> w(wiki.begin(), wiki.end());
    CHECK(adler_simple(w) == 0x11E60398u);
    CHECK(mopt::eval::detail::png::adler32(w.data(), w.size()) == 0x11E60398u);
    // Long input: the writer's blocked modulo must equal the per-byte one.
    std::vector<std::uint8_t> big(100000);
    std::mt19937 rng(7);
    for (auto& v : big) v = static_cast<std::uint8_t>(rng() | 0xF0);  // large bytes stress the sums
    CHECK(mopt::eval::detail::png::adler32(big.data(), big.size()) == adler_simple(big));
    CHECK(mopt::eval::detail::png::crc32(big.data(), big.size()) == crc_bitwise(big.data(), big.size()));
}

TEST_CASE("plot: PNG encoder round-trips pixels through stored and fixed-Huffman deflate", "[plot]") {
    // 300x200 RGB is 180 KB of scanlines: several stored blocks, and LZ77 matches across rows.
    Image img(300, 200);
    std::mt19937 rng(3);
    for (int y = 0; y < img.height(); ++y)
        for (int x = 0; x < img.width(); ++x) {
            const bool noisy = x > 250;  // incompressible strip
            img.set(x, y,
                    noisy ? Rgb{static_cast<std::uint8_t>(rng()), static_cast<std::uint8_t>(rng()),
                                static_cast<std::uint8_t>(rng())}
                          : Rgb{static_cast<std::uint8_t>(x), static_cast<std::uint8_t>(y), static_cast<std::uint8_t>((x / 40) * 30)});
        }
    const auto stored = encode_png(img, PngDeflate::stored, {{"Title", "round trip"}});
    const auto fixed = encode_png(img, PngDeflate::fixed_huffman);
    const Decoded ds = decode_png(stored), df = decode_png(fixed);
    CHECK(same_pixels(ds, img));
    CHECK(same_pixels(df, img));
    CHECK(ds.stored_blocks >= 3);  // 180,200 bytes of scanlines / 65,535
    CHECK(ds.fixed_blocks == 0);
    CHECK(df.fixed_blocks == 1);
    CHECK(fixed.size() < stored.size() / 2);
    CHECK(ds.chunks == std::vector<std::string>{"IHDR", "tEXt", "IDAT", "IEND"});
    REQUIRE(ds.text.size() == 1);
    CHECK(ds.text[0] == std::pair<std::string, std::string>{"Title", "round trip"});

    // Pure noise: fixed codes would grow the data, so the writer falls back to stored blocks.
    Image noise(64, 64);
    for (int y = 0; y < 64; ++y)
        for (int x = 0; x < 64; ++x)
            noise.set(x, y, {static_cast<std::uint8_t>(rng()), static_cast<std::uint8_t>(rng()), static_cast<std::uint8_t>(rng())});
    const Decoded dn = decode_png(encode_png(noise));
    CHECK(same_pixels(dn, noise));
    CHECK(dn.stored_blocks >= 1);

    // The reader is not a rubber stamp: a flipped bit fails the chunk CRC.
    auto broken = fixed;
    broken[broken.size() / 2] ^= 0x10;
    CHECK_THROWS(decode_png(broken));

    // 1x1, and a flat image whose matches run the full 258 bytes at distance 3.
    const Image one(1, 1, {9, 8, 7});
    CHECK(same_pixels(decode_png(encode_png(one)), one));
    const Image flat(500, 40, {10, 200, 30});
    const auto flat_png = encode_png(flat);
    CHECK(same_pixels(decode_png(flat_png), flat));
    CHECK(flat_png.size() < 2000);  // 60 KB of pixels
}

TEST_CASE("plot: nice ticks cover the range with 1, 2, 2.5 or 5 times a power of ten", "[plot]") {
    std::mt19937_64 rng(11);
    std::uniform_real_distribution<double> exp10(-6, 6), unit(-1, 1);
    for (int trial = 0; trial < 500; ++trial) {
        const double scale = std::pow(10.0, exp10(rng));
        double a = unit(rng) * scale, b = unit(rng) * scale;
        if (a > b) std::swap(a, b);
        const int max_count = 3 + static_cast<int>(rng() % 10);
        const Ticks t = nice_ticks(a, b, max_count);
        INFO("range [" << a << ", " << b << "], max_count " << max_count << ", step " << t.step);
        REQUIRE(t.values.size() >= 2);
        CHECK(static_cast<int>(t.values.size()) <= max_count);
        CHECK(t.lo <= a + 1e-9 * t.step);  // ends within 1e-9 steps of a multiple count as on it
        CHECK(t.hi >= b - 1e-9 * t.step);
        CHECK(t.lo == t.values.front());
        CHECK(t.hi == t.values.back());
        const double e = std::floor(std::log10(t.step));
        const double mant = t.step / std::pow(10.0, e);
        CHECK((std::abs(mant - 1) < 1e-9 || std::abs(mant - 2) < 1e-9 || std::abs(mant - 2.5) < 1e-9 ||
               std::abs(mant - 5) < 1e-9));
        for (std::size_t i = 0; i < t.values.size(); ++i) {
            const double k = t.values[i] / t.step;
            CHECK(std::abs(k - std::round(k)) < 1e-6);  // on the step grid
            if (i > 0) CHECK(std::abs(t.values[i] - t.values[i - 1] - t.step) < 1e-9 * t.step * 1e3);
        }
        // No needless tick: the range ends within one step outside the data.
        CHECK(a - t.lo < t.step * (1 + 1e-9));
        CHECK(t.hi - b < t.step * (1 + 1e-9));
    }
    const Ticks t = nice_ticks(0, 10, 6);
    CHECK(t.step == 2.0);
    CHECK(t.values == std::vector<double>{0, 2, 4, 6, 8, 10});
    const Ticks same = nice_ticks(3, 3, 8);  // zero width: widened around the value
    CHECK(same.lo < 3);
    CHECK(same.hi > 3);
    CHECK(nice_ticks(0.1, 0.30000000000000004, 3).values == std::vector<double>{0.1, 0.2, 0.30000000000000004});
    CHECK_THROWS_AS(nice_ticks(1, 0, 5), mopt::Error);
    CHECK_THROWS_AS(nice_ticks(0, 1, 2), mopt::Error);
    CHECK_THROWS_AS(nice_ticks(0, std::numeric_limits<double>::infinity(), 5), mopt::Error);

    const Ticks decades = log_ticks(3e-8, 50, 8);
    CHECK(decades.lo <= 3e-8);
    CHECK(decades.hi >= 50);
    CHECK(decades.values.size() <= 8);
    for (std::size_t i = 1; i < decades.values.size(); ++i) {
        const double ratio = decades.values[i] / decades.values[i - 1];
        CHECK(std::abs(std::log10(ratio) - std::round(std::log10(ratio))) < 1e-9);  // whole decades apart
    }
    const Ticks within = log_ticks(2.1, 5.4, 8);
    CHECK(within.lo <= 2.1);
    CHECK(within.hi >= 5.4);
    CHECK(within.values.size() >= 3);
    CHECK(within.hi / within.lo <= 10.0 + 1e-9);  // stays within one decade's worth
    CHECK_THROWS_AS(log_ticks(0, 1, 5), mopt::Error);
}

TEST_CASE("plot: a straight line lands on the expected pixels", "[plot]") {
    TempDir dir;
    LineChart chart{.title = "y = 2x + 1", .x_label = "x", .y_label = "y", .series = {}, .log_y = false};
    Series s;
    for (int i = 0; i <= 100; ++i) {
        s.x.push_back(i * 0.1);
        s.y.push_back(2 * (i * 0.1) + 1);
    }
    chart.series.push_back(s);  // one unlabelled series: no legend
    const auto file = dir.path / "line.png";
    write_png(file, chart, 640, 400);
    CHECK(dir.entries() == 1);  // no temporary file left behind
    const Decoded d = decode_file(file);
    REQUIRE(d.width == 640);
    REQUIRE(d.height == 400);
    const Figure fig = render(chart, 640, 400);
    CHECK(same_pixels(d, fig.image));  // the file holds what render drew
    CHECK(fig.legend.empty());
    const Axes& ax = fig.axes;
    CHECK(ax.x_min <= 0);
    CHECK(ax.x_max >= 10);
    CHECK(ax.y_min <= 1);
    CHECK(ax.y_max >= 21);
    const Rect& plot = ax.plot;
    REQUIRE(plot.width() > 100);
    REQUIRE(plot.height() > 100);

    // The test's own mapping from data to pixel centres (the documented convention).
    auto col = [&](double x) { return plot.x0 + (x - ax.x_min) / (ax.x_max - ax.x_min) * (plot.width() - 1); };
    auto row = [&](double y) { return plot.y1 - 1 - (y - ax.y_min) / (ax.y_max - ax.y_min) * (plot.height() - 1); };
    const double xa = col(0), ya = row(1), xb = col(10), yb = row(21);
    auto dist = [&](double px, double py) {  // distance from the segment's supporting line
        return std::abs((yb - ya) * px - (xb - xa) * py + xb * ya - yb * xa) / std::hypot(yb - ya, xb - xa);
    };
    const Rgb c = series_colour(0);
    long on_line = 0;
    for (int x = static_cast<int>(std::ceil(xa)); x <= static_cast<int>(std::floor(xb)); ++x) {
        // Every column between the ends holds the colour within 1.5 pixels of the line.
        bool found = false;
        for (int y = plot.y0; y < plot.y1; ++y)
            if (d.at(x, y) == c && dist(x, y) <= 1.5) found = true;
        CHECK(found);
        on_line += found;
    }
    CHECK(on_line > plot.width() / 2);
    // And nowhere else in the plot.
    for (int y = plot.y0; y < plot.y1; ++y)
        for (int x = plot.x0; x < plot.x1; ++x)
            if (d.at(x, y) == c) {
                INFO("pixel (" << x << ", " << y << ") is " << dist(x, y) << " from the line");
                CHECK(dist(x, y) <= 2.0);
                CHECK(x >= xa - 2);
                CHECK(x <= xb + 2);
            }
    // Frame drawn just outside the plot box, text above it (title) and left of it (y labels).
    CHECK(d.at(plot.x0 - 1, (plot.y0 + plot.y1) / 2) == detail::plot::frame_colour);
    CHECK(d.at((plot.x0 + plot.x1) / 2, plot.y1) == detail::plot::frame_colour);
    CHECK(count_colour(d, {0, 0, d.width, plot.y0 - 1}, detail::plot::ink) > 50);
    CHECK(count_colour(d, {0, plot.y0, plot.x0 - 1, plot.y1}, detail::plot::ink) > 50);
    CHECK(count_colour(d, {0, plot.y1 + 1, d.width, d.height}, detail::plot::ink) > 50);
    // Without a title, nothing is drawn above the plot box (the top y label pokes up left of it).
    chart.title.clear();
    const Figure untitled = render(chart, 640, 400);
    long above = 0;
    for (int y = 0; y < untitled.axes.plot.y0 - 1; ++y)
        for (int x = untitled.axes.plot.x0; x < 640; ++x) above += !(untitled.image.at(x, y) == Rgb{255, 255, 255});
    CHECK(above == 0);
}

TEST_CASE("plot: log_y draws an exponential as a straight line; bad points are skipped", "[plot]") {
    LineChart chart{.title = "", .x_label = "", .y_label = "", .series = {}, .log_y = true};
    Series s{"", {}, {}};
    for (int i = 0; i <= 40; ++i) {
        s.x.push_back(i * 0.1);
        s.y.push_back(std::pow(10.0, i * 0.1));  // 1 .. 10^4
    }
    s.x.push_back(5), s.y.push_back(0);    // not on a log axis: skipped, not an error
    s.x.push_back(6), s.y.push_back(-3);
    chart.series.push_back(s);
    const Figure fig = render(chart, 640, 400);
    const Axes& ax = fig.axes;
    CHECK(ax.log_y);
    CHECK(ax.x_max == Approx(4.0));  // the skipped points at x = 5, 6 do not widen the axis
    CHECK(std::pow(10.0, ax.y_min) <= 1.0 + 1e-9);
    CHECK(std::pow(10.0, ax.y_max) >= 1e4 * (1 - 1e-9));
    const Rect& plot = ax.plot;
    auto col = [&](double x) { return plot.x0 + (x - ax.x_min) / (ax.x_max - ax.x_min) * (plot.width() - 1); };
    auto row = [&](double y) { return plot.y1 - 1 - (std::log10(y) - ax.y_min) / (ax.y_max - ax.y_min) * (plot.height() - 1); };
    const Rgb c = series_colour(0);
    for (int i = 0; i <= 40; i += 5) {  // 41 points: a line without dots
        const int x = static_cast<int>(std::lround(col(i * 0.1))), y = static_cast<int>(std::lround(row(std::pow(10.0, i * 0.1))));
        bool found = false;
        for (int dy = -2; dy <= 2; ++dy)
            for (int dx = -2; dx <= 2; ++dx)
                if (plot.contains(x + dx, y + dy) && fig.image.at(x + dx, y + dy) == c) found = true;
        INFO("point " << i);
        CHECK(found);
    }
}

TEST_CASE("plot: NaN and infinite points break the line", "[plot]") {
    LineChart chart{.title = "gap", .x_label = "", .y_label = "", .series = {}, .log_y = false};
    Series s{"", {}, {}};
    for (int i = 0; i <= 10; ++i) s.x.push_back(i), s.y.push_back(i % 2 ? 1.0 : 2.0);
    s.y[5] = std::numeric_limits<double>::quiet_NaN();
    s.x[8] = std::numeric_limits<double>::infinity();
    chart.series.push_back(s);
    const Figure fig = render(chart, 640, 400);
    const Axes& ax = fig.axes;
    CHECK(std::isfinite(ax.x_max));
    CHECK(ax.x_max < 20);
    const Rect& plot = ax.plot;
    const Rgb c = series_colour(0);
    auto col = [&](double x) { return plot.x0 + (x - ax.x_min) / (ax.x_max - ax.x_min) * (plot.width() - 1); };
    auto columns_with_colour = [&](double from, double to) {
        long n = 0;
        for (int x = static_cast<int>(std::ceil(from)); x <= static_cast<int>(std::floor(to)); ++x)
            for (int y = plot.y0; y < plot.y1; ++y) n += fig.image.at(x, y) == c;
        return n;
    };
    const double margin = 6;  // dots (radius s + 1) at the neighbours
    CHECK(columns_with_colour(col(4) + margin, col(6) - margin) == 0);  // around the NaN y
    CHECK(columns_with_colour(col(7) + margin, col(9) - margin) == 0);  // around the infinite x
    CHECK(columns_with_colour(col(2) + margin, col(3) - margin) > 0);   // a drawn segment
}

TEST_CASE("plot: several series get distinct colours and a legend", "[plot]") {
    TempDir dir;
    LineChart chart{.title = "three runs", .x_label = "step", .y_label = "loss", .series = {}, .log_y = false};
    for (int k = 0; k < 3; ++k) {
        Series s{"run " + std::to_string(k), {}, {}};
        for (int i = 0; i <= 50; ++i) s.x.push_back(i), s.y.push_back(k + std::exp(-i / 10.0));
        chart.series.push_back(s);
    }
    write_png(dir.path / "runs.png", chart);
    const Decoded d = decode_file(dir.path / "runs.png");
    REQUIRE(d.width == 800);
    REQUIRE(d.height == 500);
    const Figure fig = render(chart);
    REQUIRE(same_pixels(d, fig.image));
    REQUIRE_FALSE(fig.legend.empty());
    const Rect& plot = fig.axes.plot;
    CHECK(fig.legend.x0 >= plot.x0);
    CHECK(fig.legend.x1 <= plot.x1);
    CHECK(fig.legend.y0 >= plot.y0);
    CHECK(fig.legend.y1 <= plot.y1);
    std::set<std::tuple<int, int, int>> colours;
    for (int k = 0; k < 3; ++k) {
        const Rgb c = series_colour(static_cast<std::size_t>(k));
        colours.insert({c.r, c.g, c.b});
        CHECK(count_colour(d, plot, c, fig.legend) > 100);  // the line
        CHECK(count_colour(d, fig.legend, c) > 10);         // its legend sample
    }
    CHECK(colours.size() == 3);
    CHECK(count_colour(d, fig.legend, detail::plot::ink) > 30);  // the legend's labels
    // tEXt carries the title.
    CHECK(std::find(d.text.begin(), d.text.end(), std::pair<std::string, std::string>{"Title", "three runs"}) !=
          d.text.end());

    std::set<std::tuple<int, int, int>> many;
    for (std::size_t i = 0; i < 40; ++i) {
        const Rgb c = series_colour(i);
        many.insert({c.r, c.g, c.b});
        CHECK(!(c == Rgb{255, 255, 255}));
    }
    CHECK(many.size() == 40);
}

TEST_CASE("plot: bar heights follow the values, groups side by side", "[plot]") {
    TempDir dir;
    BarChart chart{.title = "expert load", .x_label = "expert", .y_label = "fraction", .categories = {"0", "1", "2", "3"},
                   .groups = {{"layer 1", {}, {0.1, 0.4, 0.2, 0.3}}, {"layer 2", {}, {0.25, 0.25, -0.1, 0.6}}}};
    chart.groups[1].y[1] = std::numeric_limits<double>::quiet_NaN();
    write_png(dir.path / "bars.png", chart);
    const Decoded d = decode_file(dir.path / "bars.png");
    const Figure fig = render(chart);
    REQUIRE(same_pixels(d, fig.image));
    const Axes& ax = fig.axes;
    CHECK(ax.y_min <= -0.1);
    CHECK(ax.y_max >= 0.6);
    REQUIRE(fig.bars.size() == 8);
    CHECK(fig.bars[1 * 4 + 1].empty());  // the NaN bar is not drawn
    auto row = [&](double y) { return ax.plot.y1 - 1 - (y - ax.y_min) / (ax.y_max - ax.y_min) * (ax.plot.height() - 1); };
    for (std::size_t g = 0; g < 2; ++g)
        for (std::size_t c = 0; c < 4; ++c) {
            const double v = chart.groups[g].y[c];
            if (!std::isfinite(v)) continue;
            const Rect& r = fig.bars[g * 4 + c];
            INFO("group " << g << " category " << c);
            REQUIRE_FALSE(r.empty());
            // From the zero line to the value.
            const double top = std::min(row(v), row(0)), bottom = std::max(row(v), row(0));
            CHECK(std::abs(r.y0 - top) <= 1.0);
            CHECK(std::abs(r.y1 - 1 - bottom) <= 1.0);
            CHECK(d.at((r.x0 + r.x1) / 2, (r.y0 + r.y1) / 2) == series_colour(g));
            // Category c's bars sit in its quarter of the plot, group 0 left of group 1.
            const double slot = ax.plot.width() / 4.0;
            CHECK(r.x0 >= ax.plot.x0 + slot * static_cast<double>(c) - 1);
            CHECK(r.x1 <= ax.plot.x0 + slot * static_cast<double>(c + 1) + 1);
            if (g == 1) CHECK(r.x0 >= fig.bars[c].x1 - 1);
        }
    // Taller value, taller bar.
    CHECK(fig.bars[1].height() > fig.bars[3].height());
    CHECK(fig.bars[3].height() > fig.bars[2].height());
    REQUIRE_FALSE(fig.legend.empty());
    CHECK(count_colour(d, fig.legend, series_colour(1)) > 10);
}

TEST_CASE("plot: heatmap colours follow the value order and the colour bar", "[plot]") {
    TempDir dir;
    // A permutation of 0..11 so that position and value are unrelated.
    const std::vector<std::vector<double>> values = {{7, 2, 11, 0}, {5, 9, 1, 8}, {3, 10, 6, 4}};
    for (bool annotate : {false, true}) {
        Heatmap map{.title = "gates", .x_label = "expert", .y_label = "token", .row_labels = {"a", "b", "c"},
                    .col_labels = {"e0", "e1", "e2", "e3"}, .values = values, .annotate = annotate};
        const auto file = dir.path / (annotate ? "annotated.png" : "plain.png");
        write_png(file, map);
        const Decoded d = decode_file(file);
        const Figure fig = render(map);
        REQUIRE(same_pixels(d, fig.image));
        REQUIRE(fig.cells.size() == 12);
        CHECK(fig.value_min == 0);
        CHECK(fig.value_max == 11);
        // Sample each cell near its top-left corner (annotations are centred).
        std::vector<std::pair<double, double>> value_luma;
        for (std::size_t r = 0; r < 3; ++r)
            for (std::size_t c = 0; c < 4; ++c) {
                const Rect& cell = fig.cells[r * 4 + c];
                REQUIRE(cell.width() > 10);
                REQUIRE(cell.height() > 10);
                const Rgb px = d.at(cell.x0 + 2, cell.y0 + 2);
                CHECK(px == colormap(values[r][c] / 11.0));
                value_luma.emplace_back(values[r][c], luma(px));
                if (c > 0) CHECK(cell.x0 == fig.cells[r * 4 + c - 1].x1);  // cells tile the box
                if (r > 0) CHECK(cell.y0 == fig.cells[(r - 1) * 4 + c].y1);
            }
        std::sort(value_luma.begin(), value_luma.end());
        for (std::size_t i = 1; i < value_luma.size(); ++i) CHECK(value_luma[i].second > value_luma[i - 1].second);
        // Text inside the cells only when annotating.
        long text_pixels = 0;
        for (const auto& cell : fig.cells)
            text_pixels += count_colour(d, cell, Rgb{255, 255, 255}) + count_colour(d, cell, detail::plot::ink);
        if (annotate) CHECK(text_pixels > 12 * 10);
        else CHECK(text_pixels == 0);
        // The colour bar darkens from top to bottom (up to byte rounding of each channel).
        const Rect& bar = fig.colorbar;
        REQUIRE(bar.height() > 50);
        const int mid = (bar.x0 + bar.x1) / 2;
        CHECK(d.at(mid, bar.y1 - 1) == colormap(0));
        CHECK(d.at(mid, bar.y0) == colormap(1));
        for (int y = bar.y0 + 1; y < bar.y1; ++y) CHECK(luma(d.at(mid, y)) <= luma(d.at(mid, y - 1)) + 0.5);
        for (int y = bar.y0 + 10; y < bar.y1; ++y) CHECK(luma(d.at(mid, y)) < luma(d.at(mid, y - 10)));
    }
    // A missing value is grey; equal values give one colour.
    Heatmap gap{.title = "", .x_label = "", .y_label = "", .row_labels = {}, .col_labels = {},
                .values = {{1, std::numeric_limits<double>::quiet_NaN()}, {1, 1}}, .annotate = false};
    const Figure g = render(gap, 400, 300);
    const Rect& missing = g.cells[1];
    CHECK(g.image.at((missing.x0 + missing.x1) / 2, (missing.y0 + missing.y1) / 2) == detail::plot::missing_colour);
    const Rect& one = g.cells[0];
    const Rect& other = g.cells[3];
    CHECK(g.image.at(one.x0 + 2, one.y0 + 2) == g.image.at(other.x0 + 2, other.y0 + 2));
}

TEST_CASE("plot: the bitmap font has a distinct glyph for each printable character", "[plot]") {
    const auto& font = detail::plot::font;
    std::set<std::array<std::uint8_t, 8>> seen;
    for (std::size_t i = 0; i < font.size(); ++i) {
        const char ch = static_cast<char>(32 + i);
        INFO("glyph '" << ch << "'");
        const auto& g = font[i];
        bool any = false;
        for (auto row : g) {
            CHECK(row < 32);  // 5 columns
            any |= row != 0;
        }
        CHECK(any == (ch != ' '));
        const bool descender = std::string(",_gjpqy").find(ch) != std::string::npos;
        CHECK((g[7] != 0) == descender);
        seen.insert(g);
    }
    CHECK(seen.size() == font.size());
    // draw_text puts glyph pixels where the table says, scaled.
    Image img(40, 20);
    detail::plot::draw_text(img, 3, 2, "A1", Rgb{0, 0, 0}, 2);
    const auto& a = font['A' - 32];
    for (int gy = 0; gy < 8; ++gy)
        for (int gx = 0; gx < 5; ++gx) {
            const bool on = (a[static_cast<std::size_t>(gy)] >> (4 - gx)) & 1;
            CHECK((img.at(3 + 2 * gx + 1, 2 + 2 * gy + 1) == Rgb{0, 0, 0}) == on);
        }
    CHECK(detail::plot::text_width("A1", 2) == 22);
    for (int max_px : {0, 10, 11, 23, 35, 60, 400})
        for (int scale : {1, 2, 3}) {
            const std::string long_label = "a rather long legend label \xc3\xa9\xc3\xa9 with UTF-8";
            const std::string cut = detail::plot::fit_text(long_label, max_px, scale);
            INFO("max_px " << max_px << " scale " << scale << ": '" << cut << "'");
            CHECK(detail::plot::text_width(cut, scale) <= max_px);
            if (cut != long_label && !cut.empty()) CHECK(cut.substr(cut.size() - 2) == "..");
            if (max_px >= 11 * scale) CHECK(!cut.empty());  // ".." fits
        }
    CHECK(detail::plot::text_width("\xc3\xa9t\xc3\xa9", 1) == detail::plot::text_width("?t?", 1));  // UTF-8: one glyph each
}

TEST_CASE("plot: bad input throws mopt::Error naming what is wrong", "[plot]") {
    using Catch::Matchers::Contains;
    const double nan = std::numeric_limits<double>::quiet_NaN();
    LineChart none{.title = "loss", .x_label = "", .y_label = "", .series = {}, .log_y = false};
    CHECK_THROWS_WITH(render(none), Contains("no series"));
    LineChart empty{.title = "loss", .x_label = "", .y_label = "", .series = {{"train", {}, {}}}, .log_y = false};
    CHECK_THROWS_WITH(render(empty), Contains("'train'") && Contains("empty"));
    LineChart mismatched{.title = "loss", .x_label = "", .y_label = "",
                         .series = {{"ok", {1, 2}, {1, 2}}, {"valid", {1, 2, 3}, {1, 2}}}, .log_y = false};
    CHECK_THROWS_WITH(render(mismatched), Contains("series 1 'valid'") && Contains("3 x values but 2 y values"));
    LineChart all_nan{.title = "diverged", .x_label = "", .y_label = "", .series = {{"a", {1, 2}, {nan, nan}}}, .log_y = false};
    CHECK_THROWS_WITH(render(all_nan), Contains("diverged") && Contains("no point has finite x and y"));
    LineChart nonpositive{.title = "", .x_label = "", .y_label = "", .series = {{"a", {1, 2}, {0, -1}}}, .log_y = true};
    CHECK_THROWS_WITH(render(nonpositive), Contains("log_y"));
    LineChart fine{.title = "", .x_label = "", .y_label = "", .series = {{"a", {1, 2}, {1, 2}}}, .log_y = false};
    CHECK_THROWS_WITH(render(fine, 50, 40), Contains("50x40"));

    BarChart no_cats{.title = "load", .x_label = "", .y_label = "", .categories = {}, .groups = {{"g", {}, {1}}}};
    CHECK_THROWS_WITH(render(no_cats), Contains("no categories"));
    BarChart no_groups{.title = "load", .x_label = "", .y_label = "", .categories = {"a"}, .groups = {}};
    CHECK_THROWS_WITH(render(no_groups), Contains("no groups"));
    BarChart short_group{.title = "load", .x_label = "", .y_label = "", .categories = {"a", "b", "c"},
                         .groups = {{"layer 2", {}, {1, 2}}}};
    CHECK_THROWS_WITH(render(short_group), Contains("'layer 2'") && Contains("2 values for 3 categories"));
    BarChart bad_x{.title = "load", .x_label = "", .y_label = "", .categories = {"a", "b"}, .groups = {{"g", {1}, {1, 2}}}};
    CHECK_THROWS_WITH(render(bad_x), Contains("1 x values but 2 y values"));
    BarChart bar_nan{.title = "load", .x_label = "", .y_label = "", .categories = {"a"}, .groups = {{"g", {}, {nan}}}};
    CHECK_THROWS_WITH(render(bar_nan), Contains("no finite value"));

    Heatmap no_values{.title = "gates", .x_label = "", .y_label = "", .row_labels = {}, .col_labels = {}, .values = {}, .annotate = true};
    CHECK_THROWS_WITH(render(no_values), Contains("gates") && Contains("no values"));
    Heatmap ragged{.title = "gates", .x_label = "", .y_label = "", .row_labels = {}, .col_labels = {},
                   .values = {{1, 2}, {3}}, .annotate = true};
    CHECK_THROWS_WITH(render(ragged), Contains("row 1 has 1 values but row 0 has 2"));
    Heatmap labels{.title = "gates", .x_label = "", .y_label = "", .row_labels = {"a"}, .col_labels = {},
                   .values = {{1, 2}, {3, 4}}, .annotate = true};
    CHECK_THROWS_WITH(render(labels), Contains("1 row_labels for 2 rows"));
    Heatmap col_labels{.title = "gates", .x_label = "", .y_label = "", .row_labels = {}, .col_labels = {"a", "b", "c"},
                       .values = {{1, 2}, {3, 4}}, .annotate = true};
    CHECK_THROWS_WITH(render(col_labels), Contains("3 col_labels for 2 columns"));
    Heatmap heat_nan{.title = "gates", .x_label = "", .y_label = "", .row_labels = {}, .col_labels = {},
                     .values = {{nan}}, .annotate = true};
    CHECK_THROWS_WITH(render(heat_nan), Contains("no finite value"));

    // write_png names the file; a missing folder fails cleanly and leaves nothing behind.
    TempDir dir;
    CHECK_THROWS_WITH(write_png(dir.path / "m.png", mismatched), Contains("m.png") && Contains("'valid'"));
    CHECK_THROWS_AS(write_png(dir.path / "no" / "such" / "dir.png", fine), mopt::Error);
    CHECK(dir.entries() == 0);
    // Writing again replaces the file atomically (same name, new content, no temporaries).
    write_png(dir.path / "f.png", fine, 320, 200);
    write_png(dir.path / "f.png", fine, 400, 250);
    CHECK(dir.entries() == 1);
    CHECK(decode_file(dir.path / "f.png").width == 400);
    CHECK_THROWS_AS(Image(0, 5), mopt::Error);
}

TEST_CASE("plot: crowded and odd inputs still give a sane picture", "[plot]") {
    // 40 labelled series with long names: the legend stays inside the plot box, listing what fits.
    LineChart crowd{.title = std::string(300, 'T'), .x_label = "x \xe2\x86\x92", .y_label = "y", .series = {},
                    .log_y = false};
    for (int k = 0; k < 40; ++k) {
        Series s{"series with a long descriptive name number " + std::to_string(k), {}, {}};
        for (int i = 0; i < 200; ++i) s.x.push_back(1e9 + i * 1e3), s.y.push_back(1e-7 * (k + 1) * std::sin(i * 0.1));
        crowd.series.push_back(s);
    }
    const Figure f = render(crowd, 400, 300);
    REQUIRE_FALSE(f.legend.empty());
    CHECK(f.legend.x0 >= f.axes.plot.x0);
    CHECK(f.legend.x1 <= f.axes.plot.x1);
    CHECK(f.legend.y1 <= f.axes.plot.y1);
    CHECK(f.axes.x_min <= 1e9);
    CHECK(f.axes.x_max >= 1e9 + 199e3);

    // 512 tokens x 64 experts: cells narrower than their text go unannotated, labels thin out.
    Heatmap big{.title = "big", .x_label = "", .y_label = "", .row_labels = {}, .col_labels = {}, .values = {},
                .annotate = true};
    for (int r = 0; r < 512; ++r) {
        big.values.emplace_back();
        for (int c = 0; c < 64; ++c) big.values.back().push_back((r * 64 + c) % 97);
    }
    const Figure h = render(big);
    REQUIRE(h.cells.size() == 512u * 64u);
    long ink_in_cells = 0;
    for (int y = h.axes.plot.y0; y < h.axes.plot.y1; ++y)
        for (int x = h.axes.plot.x0; x < h.axes.plot.x1; ++x) ink_in_cells += h.image.at(x, y) == detail::plot::ink;
    CHECK(ink_in_cells == 0);

    // All values equal: one colour, one colour-bar label, no division by zero.
    Heatmap flat{.title = "", .x_label = "", .y_label = "", .row_labels = {}, .col_labels = {}, .values = {{2, 2}, {2, 2}},
                 .annotate = true};
    const Figure fl = render(flat, 400, 300);
    CHECK(fl.value_min == 2);
    CHECK(fl.value_max == 2);
    CHECK(fl.image.at(fl.cells[0].x0 + 1, fl.cells[0].y0 + 1) == fl.image.at(fl.cells[3].x0 + 1, fl.cells[3].y0 + 1));

    // One bar, one category, a huge canvas and the smallest one.
    BarChart one{.title = "", .x_label = "", .y_label = "", .categories = {"only"}, .groups = {{"", {}, {3}}}};
    for (auto [w, h2] : {std::pair{160, 120}, std::pair{2400, 1500}}) {
        const Figure b = render(one, w, h2);
        CHECK(b.image.width() == w);
        CHECK(b.legend.empty());  // one unlabelled group
        REQUIRE_FALSE(b.bars[0].empty());
        CHECK(b.bars[0].height() > b.axes.plot.height() / 2);
    }
}
