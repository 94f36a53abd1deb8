#pragma once
// llama2.c checkpoints (Karpathy's run.c format, "version 0"): a header of 7 little-endian int32
// (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len; a negative vocab_size means
// the classifier is stored, not shared with the token embedding), then float32 weights, each kind
// for all layers at once, then the legacy RoPE tables freq_cis_real/imag [seq_len, head_size/2]
// (recomputed by every reader, so skipped here), then the classifier when it is not shared.
//
// The reader validates the header and the file size before it allocates anything, so a hostile or
// truncated file gives a mopt::Error naming the file and the tensor, never a crash or an
// allocation the file cannot back.
#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <system_error>
#include <vector>

#if __has_include(<unistd.h>)
#include <unistd.h>
#endif

#include "mopt/error.hpp"
#include "mopt/tensor/tensor.hpp"

namespace mopt::io {

struct Llama2cConfig {
    std::int64_t dim = 0;         // d_model
    std::int64_t hidden_dim = 0;  // SwiGLU inner width
    std::int64_t n_layers = 0;
    std::int64_t n_heads = 0;     // query heads
    std::int64_t n_kv_heads = 0;  // key/value heads (grouped-query attention)
    std::int64_t vocab_size = 0;  // always positive here; the sign in the file is shared_classifier
    std::int64_t seq_len = 0;     // maximum context
    bool shared_classifier = true;

    [[nodiscard]] std::int64_t head_size() const { return dim / n_heads; }
    [[nodiscard]] std::int64_t kv_dim() const { return dim / n_heads * n_kv_heads; }
    friend bool operator==(const Llama2cConfig&, const Llama2cConfig&) = default;
};

struct Llama2cLayer {
    Tensor rms_att;  // [dim]
    Tensor wq;       // [dim, dim]
    Tensor wk;       // [kv_dim, dim]
    Tensor wv;       // [kv_dim, dim]
    Tensor wo;       // [dim, dim]
    Tensor rms_ffn;  // [dim]
    Tensor w1;       // [hidden, dim]
    Tensor w2;       // [dim, hidden]
    Tensor w3;       // [hidden, dim]
};

struct Llama2cCheckpoint {
    Llama2cConfig config;
    Tensor token_embedding;  // [vocab, dim]
    std::vector<Llama2cLayer> layers;
    Tensor rms_final;   // [dim]
    Tensor classifier;  // [vocab, dim]; shares token_embedding's storage when config.shared_classifier
};

namespace detail::llama2c {

inline constexpr std::int64_t header_bytes = 7 * 4;

// One stored tensor kind: its name in messages, its per-layer shape, and where it lives in a layer.
struct LayerKind {
    const char* name;
    Tensor Llama2cLayer::*member;
};
// File order of the per-layer kinds.
inline constexpr std::array<LayerKind, 9> layer_kinds{{
    {"rms_att", &Llama2cLayer::rms_att},
    {"wq", &Llama2cLayer::wq},
    {"wk", &Llama2cLayer::wk},
    {"wv", &Llama2cLayer::wv},
    {"wo", &Llama2cLayer::wo},
    {"rms_ffn", &Llama2cLayer::rms_ffn},
    {"w1", &Llama2cLayer::w1},
    {"w2", &Llama2cLayer::w2},
    {"w3", &Llama2cLayer::w3},
}};

inline Shape layer_shape(const Llama2cConfig& c, std::size_t kind) {
    switch (kind) {
        case 0: return {c.dim};                 // rms_att
        case 1: return {c.dim, c.dim};          // wq
        case 2: return {c.kv_dim(), c.dim};     // wk
        case 3: return {c.kv_dim(), c.dim};     // wv
        case 4: return {c.dim, c.dim};          // wo
        case 5: return {c.dim};                 // rms_ffn
        case 6: return {c.hidden_dim, c.dim};   // w1
        case 7: return {c.dim, c.hidden_dim};   // w2
        default: return {c.hidden_dim, c.dim};  // w3
    }
}

// A contiguous run of the file: `name` in messages, `bytes` long.
struct Section {
    std::string name;
    std::int64_t bytes;
};

// Products and sums of header values can exceed int64 (seven int32 of up to 2^31): every step is
// checked so an absurd header is reported, not wrapped into a small plausible size.
struct Sizer {
    const std::filesystem::path& file;
    [[nodiscard]] std::int64_t mul(std::int64_t a, std::int64_t b) const {
        check(a == 0 || b <= std::numeric_limits<std::int64_t>::max() / a, "llama2.c checkpoint ", file,
              ": sizes in the header overflow (", a, " * ", b, "): not a llama2.c checkpoint?");
        return a * b;
    }
    [[nodiscard]] std::int64_t add(std::int64_t a, std::int64_t b) const {
        check(b <= std::numeric_limits<std::int64_t>::max() - a, "llama2.c checkpoint ", file,
              ": sizes in the header overflow: not a llama2.c checkpoint?");
        return a + b;
    }
};

// The file's sections after the header, in order; freq_cis included, the classifier when unshared.
inline std::vector<Section> sections(const Llama2cConfig& c, const std::filesystem::path& file) {
    const Sizer z{file};
    std::vector<Section> s;
    s.push_back({"token_embedding", z.mul(z.mul(c.vocab_size, c.dim), 4)});
    for (std::size_t k = 0; k < layer_kinds.size(); ++k) {
        const Shape shape = layer_shape(c, k);
        std::int64_t n = z.mul(c.n_layers, 4);
        for (int i = 0; i < shape.rank(); ++i) n = z.mul(n, shape[i]);
        s.push_back({layer_kinds[k].name, n});
    }
    s.push_back({"rms_final", z.mul(c.dim, 4)});
    const std::int64_t freq = z.mul(z.mul(c.seq_len, c.head_size() / 2), 4);
    s.push_back({"freq_cis_real", freq});
    s.push_back({"freq_cis_imag", freq});
    if (!c.shared_classifier) s.push_back({"classifier", z.mul(z.mul(c.vocab_size, c.dim), 4)});
    return s;
}

inline void check_config(const Llama2cConfig& c, const std::filesystem::path& file) {
    const auto where = [&] { return mopt::detail::concat("llama2.c checkpoint ", file, ": "); };
    const std::pair<const char*, std::int64_t> fields[] = {
        {"dim", c.dim},         {"hidden_dim", c.hidden_dim}, {"n_layers", c.n_layers},
        {"n_heads", c.n_heads}, {"n_kv_heads", c.n_kv_heads}, {"vocab_size", c.vocab_size},
        {"seq_len", c.seq_len},
    };
    for (const auto& [name, value] : fields) {
        check(value > 0, where(), name, " = ", value, " must be positive");
        check(value <= std::numeric_limits<std::int32_t>::max(), where(), name, " = ", value,
              " does not fit the format's int32");
    }
    check(c.dim % c.n_heads == 0, where(), "n_heads = ", c.n_heads, " does not divide dim = ", c.dim);
    check(c.n_heads % c.n_kv_heads == 0, where(), "n_kv_heads = ", c.n_kv_heads, " does not divide n_heads = ",
          c.n_heads);
    // RoPE rotates pairs of adjacent dimensions inside a head.
    check(c.head_size() % 2 == 0, where(), "head_size = dim / n_heads = ", c.head_size(),
          " is odd; rotary encoding needs pairs");
}

// The format is little-endian; std::byteswap is C++23, so swap by hand on big-endian hosts.
inline std::uint32_t swap_bytes(std::uint32_t v) {
    return (v >> 24) | ((v >> 8) & 0xff00u) | ((v << 8) & 0xff0000u) | (v << 24);
}
inline std::int32_t to_le(std::int32_t v) {
    if constexpr (std::endian::native == std::endian::big)
        return std::bit_cast<std::int32_t>(swap_bytes(std::bit_cast<std::uint32_t>(v)));
    return v;
}
inline void float_from_le(std::span<float> v) {
    if constexpr (std::endian::native == std::endian::big)
        for (auto& x : v) x = std::bit_cast<float>(swap_bytes(std::bit_cast<std::uint32_t>(x)));
}

inline void check_finite(const Tensor& t, const std::string& name, const std::filesystem::path& file,
                         const char* prefix) {
    const auto v = t.span();
    for (std::size_t i = 0; i < v.size(); ++i)
        check(std::isfinite(v[i]), prefix, file, ": tensor ", name, " of shape ",
              t.shape(), " has a non-finite value (", v[i], ") at flat index ", i);
}

// Writes through stdio so the data can be fsync'ed before the rename makes it visible.
class AtomicFile {
public:
    explicit AtomicFile(const std::filesystem::path& target) : target_(target) {
        std::random_device rd;
        const auto tag = (static_cast<std::uint64_t>(rd()) << 32) ^ rd();
        char hex[17];
        std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(tag));
        // Hidden and unique, in the destination's folder so the rename stays on one file system.
        std::string name = ".";
        name += target.filename().string();
        name += ".tmp-";
        name += hex;
        tmp_ = target.parent_path() / name;
        f_ = std::fopen(tmp_.string().c_str(), "wb");
        check(f_ != nullptr, "save_llama2c: cannot create temporary file ", tmp_, " next to ", target_, ": ",
              std::strerror(errno));
    }
    AtomicFile(const AtomicFile&) = delete;
    AtomicFile& operator=(const AtomicFile&) = delete;
    ~AtomicFile() {
        if (f_) std::fclose(f_);
        if (!committed_) {
            std::error_code ec;
            std::filesystem::remove(tmp_, ec);
        }
    }
    void write(const void* p, std::size_t n) {
        check(std::fwrite(p, 1, n, f_) == n, "save_llama2c: writing ", tmp_, " (for ", target_,
              ") failed: ", std::strerror(errno));
    }
    void commit() {
        check(std::fflush(f_) == 0, "save_llama2c: flushing ", tmp_, " failed: ", std::strerror(errno));
#if __has_include(<unistd.h>)
        check(::fsync(::fileno(f_)) == 0, "save_llama2c: fsync of ", tmp_, " failed: ", std::strerror(errno));
#endif
        const int rc = std::fclose(f_);
        f_ = nullptr;
        check(rc == 0, "save_llama2c: closing ", tmp_, " failed: ", std::strerror(errno));
        std::error_code ec;
        std::filesystem::rename(tmp_, target_, ec);  // replaces an existing file atomically (POSIX)
        check(!ec, "save_llama2c: cannot rename ", tmp_, " to ", target_, ": ", ec.message());
        committed_ = true;
    }

private:
    std::filesystem::path target_, tmp_;
    std::FILE* f_ = nullptr;
    bool committed_ = false;
};

}  // namespace detail::llama2c

// Reads a llama2.c checkpoint; every tensor is owned, f32, one per layer and kind.
inline Llama2cCheckpoint load_llama2c(const std::filesystem::path& file) {
    namespace d = detail::llama2c;
    const auto where = [&] { return mopt::detail::concat("llama2.c checkpoint ", file, ": "); };
    std::error_code ec;
    check(std::filesystem::is_regular_file(file, ec), where(), "no such file (or not a regular file)");
    const auto file_bytes = static_cast<std::int64_t>(std::filesystem::file_size(file, ec));
    check(!ec, where(), "cannot read its size: ", ec.message());
    std::ifstream in(file, std::ios::binary);
    check(in.good(), where(), "cannot open it for reading");
    check(file_bytes >= d::header_bytes, where(), "header needs ", d::header_bytes, " bytes but the file has only ",
          file_bytes);

    std::array<std::int32_t, 7> h{};
    in.read(reinterpret_cast<char*>(h.data()), d::header_bytes);
    check(in.gcount() == d::header_bytes, where(), "header: read ", in.gcount(), " of ", d::header_bytes, " bytes");
    for (auto& v : h) v = d::to_le(v);

    Llama2cCheckpoint ckpt;
    Llama2cConfig& c = ckpt.config;
    c.dim = h[0];
    c.hidden_dim = h[1];
    c.n_layers = h[2];
    c.n_heads = h[3];
    c.n_kv_heads = h[4];
    c.vocab_size = std::abs(static_cast<std::int64_t>(h[5]));  // int64: |INT32_MIN| fits
    c.seq_len = h[6];
    c.shared_classifier = h[5] > 0;
    d::check_config(c, file);

    // Match the file size against the header before allocating: a bad header must not cost memory.
    const std::vector<d::Section> sections = d::sections(c, file);
    const d::Sizer z{file};
    std::int64_t expected = d::header_bytes;
    for (const auto& s : sections) expected = z.add(expected, s.bytes);
    const std::int64_t freq_bytes = sections[sections.size() - (c.shared_classifier ? 1 : 2)].bytes * 2;
    // Some exporters drop the legacy RoPE tables; that is only unambiguous when nothing follows them.
    const bool has_freq = !(c.shared_classifier && file_bytes == expected - freq_bytes);
    if (file_bytes < expected && has_freq) {
        std::int64_t offset = d::header_bytes;
        for (const auto& s : sections) {
            check(offset + s.bytes <= file_bytes, where(), "truncated: tensor ", s.name, " needs ", s.bytes,
                  " bytes at offset ", offset, " but only ", file_bytes - offset, " remain (file has ", file_bytes,
                  " bytes, the header implies ", expected, ")");
            offset += s.bytes;
        }
    }
    check(file_bytes <= expected, where(), file_bytes - expected, " trailing bytes after the last tensor (",
          sections.back().name, "): the header implies ", expected, " bytes, the file has ", file_bytes);

    auto read_into = [&](Tensor& t, const std::string& name) {
        const auto want = static_cast<std::streamsize>(t.bytes());
        in.read(static_cast<char*>(t.raw()), want);
        // The size was checked above; this catches a file that shrank since.
        check(in.gcount() == want, where(), "truncated: tensor ", name, " needs ", want, " bytes, read ", in.gcount());
        d::float_from_le(t.span());
        d::check_finite(t, name, file, "llama2.c checkpoint ");
    };

    ckpt.token_embedding = Tensor::empty({c.vocab_size, c.dim});
    read_into(ckpt.token_embedding, "token_embedding");
    ckpt.layers.resize(static_cast<std::size_t>(c.n_layers));
    for (std::size_t k = 0; k < d::layer_kinds.size(); ++k) {
        const Shape shape = d::layer_shape(c, k);
        for (std::size_t l = 0; l < ckpt.layers.size(); ++l) {
            Tensor& t = ckpt.layers[l].*d::layer_kinds[k].member;
            t = Tensor::empty(shape);
            read_into(t, mopt::detail::concat(d::layer_kinds[k].name, " (layer ", l, ")"));
        }
    }
    ckpt.rms_final = Tensor::empty({c.dim});
    read_into(ckpt.rms_final, "rms_final");
    if (c.shared_classifier) {
        ckpt.classifier = ckpt.token_embedding;
    } else {
        in.seekg(freq_bytes, std::ios::cur);
        ckpt.classifier = Tensor::empty({c.vocab_size, c.dim});
        read_into(ckpt.classifier, "classifier");
    }
    return ckpt;
}

// Writes `ckpt` in the same format (legacy RoPE tables included, so older readers accept it):
// to a temporary file in the destination's folder, then renamed over `file`, so a reader never sees
// half a checkpoint.
inline void save_llama2c(const std::filesystem::path& file, const Llama2cCheckpoint& ckpt) {
    namespace d = detail::llama2c;
    const Llama2cConfig& c = ckpt.config;
    d::check_config(c, file);
    const auto expect = [&](const Tensor& t, const Shape& shape, const std::string& tensor) {
        check(t.defined() && t.dtype() == DType::f32 && t.shape() == shape, "save_llama2c ", file, ": tensor ",
              tensor, " is ", t.defined() ? t.shape().str() : std::string("undefined"), " ", mopt::name(t.dtype()),
              ", the config needs f32 ", shape);
        d::check_finite(t, tensor, file, "save_llama2c (refusing to write) ");
    };
    check(static_cast<std::int64_t>(ckpt.layers.size()) == c.n_layers, "save_llama2c ", file, ": ",
          ckpt.layers.size(), " layers, the config says n_layers = ", c.n_layers);
    expect(ckpt.token_embedding, {c.vocab_size, c.dim}, "token_embedding");
    for (std::size_t k = 0; k < d::layer_kinds.size(); ++k)
        for (std::size_t l = 0; l < ckpt.layers.size(); ++l)
            expect(ckpt.layers[l].*d::layer_kinds[k].member, d::layer_shape(c, k),
                   mopt::detail::concat(d::layer_kinds[k].name, " (layer ", l, ")"));
    expect(ckpt.rms_final, {c.dim}, "rms_final");
    if (c.shared_classifier) {
        // A shared classifier is not stored: refuse to silently drop one that differs.
        const Tensor& cl = ckpt.classifier;
        check(!cl.defined() || cl.raw() == ckpt.token_embedding.raw() ||
                  (cl.shape() == ckpt.token_embedding.shape() && cl.dtype() == DType::f32 &&
                   std::memcmp(cl.raw(), ckpt.token_embedding.raw(), cl.bytes()) == 0),
              "save_llama2c ", file, ": config.shared_classifier is set but the classifier differs from "
              "token_embedding");
    } else {
        expect(ckpt.classifier, {c.vocab_size, c.dim}, "classifier");
    }

    d::AtomicFile out(file);
    const std::array<std::int32_t, 7> h{
        static_cast<std::int32_t>(c.dim),        static_cast<std::int32_t>(c.hidden_dim),
        static_cast<std::int32_t>(c.n_layers),   static_cast<std::int32_t>(c.n_heads),
        static_cast<std::int32_t>(c.n_kv_heads),
        static_cast<std::int32_t>(c.shared_classifier ? c.vocab_size : -c.vocab_size),
        static_cast<std::int32_t>(c.seq_len)};
    for (auto v : h) {
        v = d::to_le(v);
        out.write(&v, 4);
    }
    std::vector<float> le;
    const auto write_f32 = [&](std::span<const float> v) {
        if constexpr (std::endian::native == std::endian::little) {
            out.write(v.data(), v.size_bytes());
        } else {
            le.assign(v.begin(), v.end());
            d::float_from_le(le);  // a byte swap is its own inverse
            out.write(le.data(), le.size() * 4);
        }
    };
    write_f32(ckpt.token_embedding.span());
    for (const auto& kind : d::layer_kinds)
        for (const auto& layer : ckpt.layers) write_f32((layer.*kind.member).span());
    write_f32(ckpt.rms_final.span());
    // freq_cis [seq_len, head_size/2]: the RoPE angles pos * 10000^(-2i/head_size), real then imaginary.
    const std::int64_t half = c.head_size() / 2;
    std::vector<float> re(static_cast<std::size_t>(c.seq_len * half)), im(re.size());
    for (std::int64_t pos = 0; pos < c.seq_len; ++pos)
        for (std::int64_t i = 0; i < half; ++i) {
            const double freq = std::pow(10000.0, -2.0 * static_cast<double>(i) / static_cast<double>(c.head_size()));
            re[pos * half + i] = static_cast<float>(std::cos(static_cast<double>(pos) * freq));
            im[pos * half + i] = static_cast<float>(std::sin(static_cast<double>(pos) * freq));
        }
    write_f32(re);
    write_f32(im);
    if (!c.shared_classifier) write_f32(ckpt.classifier.span());
    out.commit();
}

}  // namespace mopt::io
