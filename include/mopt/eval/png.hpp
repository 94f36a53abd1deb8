#pragma once
// png: an RGB image in memory and a dependency-free PNG writer for it (no zlib).
//
//   mopt::eval::Image img(320, 200);                        // white
//   img.set(10, 20, {255, 0, 0});
//   mopt::eval::write_png("out.png", img);                  // temp file + rename
//
// The file is 8-bit truecolour (colour type 2), one IDAT chunk. Each scanline gets the PNG filter
// (None, Sub, Up or Paeth) with the smallest sum of absolute bytes, the usual heuristic from the
// PNG specification §12.8. The zlib stream (RFC 1950) holds one deflate block (RFC 1951): fixed
// Huffman codes over LZ77 matches from a hash chain, or stored blocks where that would be larger
// or when asked for. Charts are large flat areas, so LZ77 with fixed codes already shrinks them
// 20-100x; dynamic Huffman codes would gain little more and cost a lot more code.
#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "mopt/error.hpp"

namespace mopt::eval {

struct Rgb {
    std::uint8_t r = 0, g = 0, b = 0;
    friend bool operator==(const Rgb&, const Rgb&) = default;
};

// Row-major 8-bit RGB pixels, (0, 0) at the top left. Writes outside the image are ignored, so
// drawing code can clip by simply drawing.
class Image {
public:
    Image() = default;
    Image(int width, int height, Rgb fill = {255, 255, 255}) : width_(width), height_(height) {
        check(width > 0 && height > 0, "Image: size ", width, "x", height, " must be positive");
        check(static_cast<std::int64_t>(width) * height <= (std::int64_t{1} << 28), "Image: size ", width, "x",
              height, " is too large (at most 2^28 pixels)");
        pixels_.resize(static_cast<std::size_t>(width) * static_cast<std::size_t>(height) * 3);
        for (std::size_t i = 0; i < pixels_.size(); i += 3) {
            pixels_[i] = fill.r;
            pixels_[i + 1] = fill.g;
            pixels_[i + 2] = fill.b;
        }
    }
    [[nodiscard]] int width() const { return width_; }
    [[nodiscard]] int height() const { return height_; }
    [[nodiscard]] bool contains(int x, int y) const { return x >= 0 && y >= 0 && x < width_ && y < height_; }
    [[nodiscard]] Rgb at(int x, int y) const {
        check(contains(x, y), "Image::at(", x, ", ", y, ") is outside the ", width_, "x", height_, " image");
        const std::size_t i = offset(x, y);
        return {pixels_[i], pixels_[i + 1], pixels_[i + 2]};
    }
    void set(int x, int y, Rgb c) {
        if (!contains(x, y)) return;
        const std::size_t i = offset(x, y);
        pixels_[i] = c.r;
        pixels_[i + 1] = c.g;
        pixels_[i + 2] = c.b;
    }
    // Fills [x0, x1) x [y0, y1), clipped to the image.
    void fill(int x0, int y0, int x1, int y1, Rgb c) {
        x0 = std::max(x0, 0), y0 = std::max(y0, 0), x1 = std::min(x1, width_), y1 = std::min(y1, height_);
        for (int y = y0; y < y1; ++y)
            for (int x = x0; x < x1; ++x) set(x, y, c);
    }
    // The pixels: [height, width, 3] bytes.
    [[nodiscard]] const std::vector<std::uint8_t>& bytes() const { return pixels_; }

private:
    [[nodiscard]] std::size_t offset(int x, int y) const {
        return (static_cast<std::size_t>(y) * static_cast<std::size_t>(width_) + static_cast<std::size_t>(x)) * 3;
    }
    int width_ = 0, height_ = 0;
    std::vector<std::uint8_t> pixels_;
};

enum class PngDeflate {
    fixed_huffman,  // LZ77 + fixed Huffman codes (falls back to stored when that is smaller)
    stored,         // uncompressed deflate blocks: largest files, simplest to read
};

namespace detail::png {

// CRC-32 (ISO 3309 / ITU-T V.42, reflected polynomial 0xEDB88320), as PNG chunks use. `crc` is the
// running value of the bytes before (0 to start).
inline std::uint32_t crc32(const std::uint8_t* data, std::size_t n, std::uint32_t crc = 0) {
    static const auto table = [] {
        std::array<std::uint32_t, 256> t{};
        for (std::uint32_t i = 0; i < 256; ++i) {
            std::uint32_t c = i;
            for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            t[i] = c;
        }
        return t;
    }();
    crc = ~crc;
    for (std::size_t i = 0; i < n; ++i) crc = table[(crc ^ data[i]) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

// Adler-32 (RFC 1950 §8.2). The sums are reduced every 5552 bytes, the most that cannot overflow
// 32 bits before the modulo.
inline std::uint32_t adler32(const std::uint8_t* data, std::size_t n) {
    constexpr std::uint32_t mod = 65521;
    std::uint32_t a = 1, b = 0;
    while (n > 0) {
        const std::size_t chunk = std::min<std::size_t>(n, 5552);
        for (std::size_t i = 0; i < chunk; ++i) {
            a += data[i];
            b += a;
        }
        a %= mod;
        b %= mod;
        data += chunk;
        n -= chunk;
    }
    return (b << 16) | a;
}

// Deflate writes bits least significant first (RFC 1951 §3.1.1).
class BitWriter {
public:
    explicit BitWriter(std::vector<std::uint8_t>& out) : out_(out) {}
    void bits(std::uint32_t value, int count) {
        acc_ |= static_cast<std::uint64_t>(value) << filled_;
        filled_ += count;
        while (filled_ >= 8) {
            out_.push_back(static_cast<std::uint8_t>(acc_));
            acc_ >>= 8;
            filled_ -= 8;
        }
    }
    // Huffman codes are defined most significant bit first, so they go out reversed.
    void code(std::uint32_t code, int length) {
        std::uint32_t rev = 0;
        for (int i = 0; i < length; ++i) rev |= ((code >> i) & 1u) << (length - 1 - i);
        bits(rev, length);
    }
    void flush() {
        if (filled_ > 0) out_.push_back(static_cast<std::uint8_t>(acc_));
        acc_ = 0;
        filled_ = 0;
    }

private:
    std::vector<std::uint8_t>& out_;
    std::uint64_t acc_ = 0;
    int filled_ = 0;
};

// Uncompressed blocks of at most 65535 bytes (RFC 1951 §3.2.4).
inline void deflate_stored(const std::vector<std::uint8_t>& in, std::vector<std::uint8_t>& out) {
    std::size_t pos = 0;
    do {
        const std::size_t len = std::min<std::size_t>(in.size() - pos, 65535);
        const bool final = pos + len == in.size();
        out.push_back(final ? 1 : 0);  // BFINAL, BTYPE = 00, then padding to the byte boundary
        out.push_back(static_cast<std::uint8_t>(len & 0xFF));
        out.push_back(static_cast<std::uint8_t>(len >> 8));
        out.push_back(static_cast<std::uint8_t>(~len & 0xFF));
        out.push_back(static_cast<std::uint8_t>((~len >> 8) & 0xFF));
        out.insert(out.end(), in.begin() + static_cast<std::ptrdiff_t>(pos),
                   in.begin() + static_cast<std::ptrdiff_t>(pos + len));
        pos += len;
    } while (pos < in.size());
}

// The fixed literal/length code of RFC 1951 §3.2.6.
inline void put_fixed_literal(BitWriter& w, int sym) {
    const auto u = static_cast<std::uint32_t>(sym);
    if (u < 144) w.code(0x30 + u, 8);
    else if (u < 256) w.code(0x190 + (u - 144), 9);
    else if (u < 280) w.code(u - 256, 7);
    else w.code(0xC0 + (u - 280), 8);
}

// Length 3..258 and distance 1..32768 as code + extra bits (RFC 1951 §3.2.5 tables).
inline void put_match(BitWriter& w, int length, int distance) {
    static constexpr std::array<int, 29> len_base = {3,  4,  5,  6,  7,  8,  9,  10, 11,  13,  15,  17,  19,  23, 27,
                                                     31, 35, 43, 51, 59, 67, 83, 99, 115, 131, 163, 195, 227, 258};
    static constexpr std::array<int, 29> len_extra = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2,
                                                      2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0};
    static constexpr std::array<int, 30> dist_base = {1,    2,    3,    4,    5,    7,     9,     13,    17,  25,
                                                      33,   49,   65,   97,   129,  193,   257,   385,   513, 769,
                                                      1025, 1537, 2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577};
    static constexpr std::array<int, 30> dist_extra = {0, 0, 0, 0, 1, 1, 2, 2,  3,  3,  4,  4,  5,  5,  6,
                                                       6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13};
    int lc = 28;
    while (len_base[static_cast<std::size_t>(lc)] > length) --lc;
    put_fixed_literal(w, 257 + lc);
    w.bits(static_cast<std::uint32_t>(length - len_base[static_cast<std::size_t>(lc)]),
           len_extra[static_cast<std::size_t>(lc)]);
    int dc = 29;
    while (dist_base[static_cast<std::size_t>(dc)] > distance) --dc;
    w.code(static_cast<std::uint32_t>(dc), 5);  // fixed distance codes: 5 bits each
    w.bits(static_cast<std::uint32_t>(distance - dist_base[static_cast<std::size_t>(dc)]),
           dist_extra[static_cast<std::size_t>(dc)]);
}

// One final block with fixed Huffman codes; greedy LZ77 matches found through hash chains of the
// last 32 KiB (the deflate window), at most `max_chain` candidates per position.
inline void deflate_fixed(const std::vector<std::uint8_t>& in, std::vector<std::uint8_t>& out, int max_chain = 48) {
    constexpr std::size_t window = 32768, hash_size = 1 << 15;
    constexpr int min_match = 3, max_match = 258;
    BitWriter w(out);
    w.bits(1, 1);  // BFINAL
    w.bits(1, 2);  // BTYPE = 01: fixed Huffman
    std::vector<std::int64_t> head(hash_size, -1), prev(window, -1);
    const std::size_t n = in.size();
    auto hash = [&](std::size_t i) {
        return ((static_cast<std::size_t>(in[i]) << 10) ^ (static_cast<std::size_t>(in[i + 1]) << 5) ^ in[i + 2]) &
               (hash_size - 1);
    };
    auto insert = [&](std::size_t i) {
        if (i + min_match > n) return;
        const std::size_t h = hash(i);
        prev[i % window] = head[h];
        head[h] = static_cast<std::int64_t>(i);
    };
    std::size_t i = 0;
    while (i < n) {
        int best_len = 0;
        std::size_t best_dist = 0;
        if (i + min_match <= n) {
            const int limit = static_cast<int>(std::min<std::size_t>(max_match, n - i));
            std::int64_t cand = head[hash(i)];
            for (int chain = 0; chain < max_chain && cand >= 0; ++chain) {
                const auto c = static_cast<std::size_t>(cand);
                if (i - c > window) break;
                int len = 0;
                while (len < limit && in[c + static_cast<std::size_t>(len)] == in[i + static_cast<std::size_t>(len)])
                    ++len;
                if (len > best_len) {
                    best_len = len;
                    best_dist = i - c;
                    if (len == limit) break;
                }
                const std::int64_t next = prev[c % window];
                if (next >= cand) break;  // the slot was reused by a newer position: chain ends
                cand = next;
            }
        }
        if (best_len >= min_match) {
            put_match(w, best_len, static_cast<int>(best_dist));
            for (int k = 0; k < best_len; ++k) insert(i + static_cast<std::size_t>(k));
            i += static_cast<std::size_t>(best_len);
        } else {
            put_fixed_literal(w, in[i]);
            insert(i);
            ++i;
        }
    }
    put_fixed_literal(w, 256);  // end of block
    w.flush();
}

// A zlib stream (RFC 1950): CMF 0x78 (deflate, 32 KiB window), FLG 0x01 (check bits, no
// dictionary), the deflate data, then the Adler-32 of the uncompressed bytes, big-endian.
inline std::vector<std::uint8_t> zlib_compress(const std::vector<std::uint8_t>& in, PngDeflate mode) {
    std::vector<std::uint8_t> out = {0x78, 0x01};
    if (mode == PngDeflate::fixed_huffman) {
        deflate_fixed(in, out);
        // Stored costs 5 bytes per 65535; fixed codes can lose to it on noise-like pixels.
        const std::size_t stored_size = 2 + in.size() + 5 * (in.size() / 65535 + 1);
        if (out.size() > stored_size) {
            out.resize(2);
            deflate_stored(in, out);
        }
    } else {
        deflate_stored(in, out);
    }
    const std::uint32_t adler = adler32(in.data(), in.size());
    for (int s = 24; s >= 0; s -= 8) out.push_back(static_cast<std::uint8_t>(adler >> s));
    return out;
}

inline int paeth(int a, int b, int c) {
    const int p = a + b - c, pa = std::abs(p - a), pb = std::abs(p - b), pc = std::abs(p - c);
    if (pa <= pb && pa <= pc) return a;
    return pb <= pc ? b : c;
}

// Scanlines each prefixed by a filter byte (PNG §9): None, Sub, Up or Paeth, whichever has the
// smallest sum of |byte as signed|.
inline std::vector<std::uint8_t> filter_scanlines(const Image& img) {
    const std::size_t stride = static_cast<std::size_t>(img.width()) * 3;
    const auto& px = img.bytes();
    std::vector<std::uint8_t> out;
    out.reserve((stride + 1) * static_cast<std::size_t>(img.height()));
    std::vector<std::uint8_t> zero(stride, 0), cand(stride);
    std::vector<std::uint8_t> best(stride);
    for (int y = 0; y < img.height(); ++y) {
        const std::uint8_t* row = px.data() + static_cast<std::size_t>(y) * stride;
        const std::uint8_t* up = y > 0 ? row - stride : zero.data();
        std::uint64_t best_cost = ~std::uint64_t{0};
        std::uint8_t best_type = 0;
        for (std::uint8_t type : {std::uint8_t{0}, std::uint8_t{1}, std::uint8_t{2}, std::uint8_t{4}}) {
            std::uint64_t cost = 0;
            for (std::size_t i = 0; i < stride; ++i) {
                const int a = i >= 3 ? row[i - 3] : 0, b = up[i], c = i >= 3 ? up[i - 3] : 0;
                const int pred = type == 0 ? 0 : type == 1 ? a : type == 2 ? b : paeth(a, b, c);
                cand[i] = static_cast<std::uint8_t>(row[i] - pred);
                cost += static_cast<std::uint64_t>(std::abs(static_cast<int>(static_cast<std::int8_t>(cand[i]))));
            }
            if (cost < best_cost) {
                best_cost = cost;
                best_type = type;
                best.swap(cand);
            }
        }
        out.push_back(best_type);
        out.insert(out.end(), best.begin(), best.end());
    }
    return out;
}

inline void put_u32(std::vector<std::uint8_t>& out, std::uint32_t v) {
    for (int s = 24; s >= 0; s -= 8) out.push_back(static_cast<std::uint8_t>(v >> s));
}

// A chunk: length, type, data, CRC of type + data (PNG §5.3).
inline void put_chunk(std::vector<std::uint8_t>& out, const char (&type)[5], const std::vector<std::uint8_t>& data) {
    check(data.size() <= 0x7FFFFFFFu, "PNG chunk ", type, " is too large (", data.size(), " bytes)");
    put_u32(out, static_cast<std::uint32_t>(data.size()));
    const std::size_t start = out.size();
    out.insert(out.end(), type, type + 4);
    out.insert(out.end(), data.begin(), data.end());
    put_u32(out, crc32(out.data() + start, out.size() - start));
}

// Writes `bytes` through a temporary file beside `file` and a rename, so a reader never sees half
// a file and a failure leaves the old one in place.
inline void write_atomic(const std::filesystem::path& file, const std::vector<std::uint8_t>& bytes) {
    std::random_device rd;
    const auto tmp = file.parent_path() / mopt::detail::concat(".", file.filename().string(), ".tmp-", rd(), "-", rd());
    try {
        std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
        check(out.good(), "cannot create '", tmp.string(), "': ", std::strerror(errno));
        out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
        out.close();
        check(!out.fail(), "writing '", tmp.string(), "' failed (disk full?)");
        std::error_code ec;
        std::filesystem::rename(tmp, file, ec);
        check(!ec, "cannot move '", tmp.string(), "' to '", file.string(), "': ", ec.message());
    } catch (...) {
        std::error_code ignore;
        std::filesystem::remove(tmp, ignore);
        throw;
    }
}

}  // namespace detail::png

// The bytes of a PNG file holding `img`. `text` entries become tEXt chunks (keyword, value), e.g.
// {"Title", "loss"}; non-ASCII bytes are written as '?' since tEXt is Latin-1.
inline std::vector<std::uint8_t> encode_png(const Image& img, PngDeflate mode = PngDeflate::fixed_huffman,
                                            const std::vector<std::pair<std::string, std::string>>& text = {}) {
    namespace png = detail::png;
    check(img.width() > 0 && img.height() > 0, "encode_png: the image is empty");
    std::vector<std::uint8_t> out = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
    std::vector<std::uint8_t> ihdr;
    png::put_u32(ihdr, static_cast<std::uint32_t>(img.width()));
    png::put_u32(ihdr, static_cast<std::uint32_t>(img.height()));
    ihdr.insert(ihdr.end(), {8, 2, 0, 0, 0});  // bit depth 8, truecolour, deflate, adaptive filter, no interlace
    png::put_chunk(out, "IHDR", ihdr);
    for (const auto& [key, value] : text) {
        check(!key.empty() && key.size() <= 79, "encode_png: tEXt keyword '", key, "' must have 1 to 79 characters");
        std::vector<std::uint8_t> data;
        for (char c : key) {
            const auto u = static_cast<unsigned char>(c);
            check(u >= 32 && u < 127, "encode_png: tEXt keyword '", key, "' must be printable ASCII");
            data.push_back(u);
        }
        data.push_back(0);
        for (char c : value) {
            const auto u = static_cast<unsigned char>(c);
            data.push_back((u >= 32 && u < 127) || u == '\n' ? u : static_cast<std::uint8_t>('?'));
        }
        png::put_chunk(out, "tEXt", data);
    }
    png::put_chunk(out, "IDAT", png::zlib_compress(png::filter_scanlines(img), mode));
    png::put_chunk(out, "IEND", {});
    return out;
}

// Writes `img` to `file` as PNG, atomically (temporary file beside it, then rename).
inline void write_png(const std::filesystem::path& file, const Image& img, PngDeflate mode = PngDeflate::fixed_huffman,
                      const std::vector<std::pair<std::string, std::string>>& text = {}) {
    detail::png::write_atomic(file, encode_png(img, mode, text));
}

}  // namespace mopt::eval
