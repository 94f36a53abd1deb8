#pragma once
// Hugging Face safetensors files, read and write.
//
// Layout: u64 little-endian N | N bytes of UTF-8 JSON (may end in spaces) | byte buffer.
// The JSON maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets into
// the byte buffer) and an optional "__metadata__" to a {string: string} map.
//
// Files come from the internet, so the reader trusts nothing: every size is checked against the
// file's real size before anything is allocated, and every problem is a mopt::Error naming the
// file (and the tensor). NaN/Inf values are not errors here: the loader only moves bytes.
//
// The writer follows the reference implementation's layout so that other readers accept the files:
// the header is padded with spaces to a multiple of 8 (the buffer starts 8-byte aligned) and the
// tensors are packed without holes (the reference reader rejects holes), largest element first
// and then by name, so every tensor is aligned to its element size.
#include <algorithm>
#include <array>
#include <bit>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <set>
#include <random>
#include <string>
#include <system_error>
#include <vector>

#include <nlohmann/json.hpp>

#include "mopt/error.hpp"
#include "mopt/tensor/dtype.hpp"
#include "mopt/tensor/shape.hpp"
#include "mopt/tensor/tensor.hpp"

namespace mopt::io {

// Tensor bytes are copied straight between file and memory; safetensors is little-endian.
static_assert(std::endian::native == std::endian::little, "mopt::io::safetensors assumes a little-endian host");

// ---- conversions ---------------------------------------------------------------------------------

// bf16 is the upper half of an f32: widening is exact.
inline float bf16_to_f32(std::uint16_t h) { return std::bit_cast<float>(static_cast<std::uint32_t>(h) << 16); }

// Round to nearest, ties to even; NaN stays a (quiet) NaN instead of rounding into Inf.
inline std::uint16_t f32_to_bf16(float f) {
    std::uint32_t b = std::bit_cast<std::uint32_t>(f);
    if ((b & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((b >> 16) | 0x0040u);
    b += 0x7fffu + ((b >> 16) & 1u);  // carries into the exponent give the right Inf on overflow
    return static_cast<std::uint16_t>(b >> 16);
}

// IEEE binary16 -> f32, exact (every half is a float), subnormals included.
inline float f16_to_f32(std::uint16_t h) {
    const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
    std::uint32_t exp = (h >> 10) & 0x1fu;
    std::uint32_t mant = h & 0x3ffu;
    if (exp == 0x1f) return std::bit_cast<float>(sign | 0x7f800000u | (mant << 13));  // Inf, NaN (payload kept)
    if (exp == 0) {
        if (mant == 0) return std::bit_cast<float>(sign);
        // Subnormal half: normalise, since the same value is a normal float.
        int e = 1;
        while (!(mant & 0x400u)) {
            mant <<= 1;
            --e;
        }
        mant &= 0x3ffu;
        return std::bit_cast<float>(sign | (static_cast<std::uint32_t>(e + 112) << 23) | (mant << 13));
    }
    return std::bit_cast<float>(sign | ((exp + 112) << 23) | (mant << 13));  // rebias 15 -> 127
}

// f32 -> IEEE binary16, round to nearest, ties to even; gradual underflow to subnormals and zero,
// overflow (|x| >= 65520) to Inf; NaN stays a quiet NaN.
inline std::uint16_t f32_to_f16(float f) {
    const std::uint32_t b = std::bit_cast<std::uint32_t>(f);
    const auto sign = static_cast<std::uint16_t>((b >> 16) & 0x8000u);
    const std::uint32_t abs = b & 0x7fffffffu;
    if (abs > 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7e00u | ((abs >> 13) & 0x3ffu));
    const std::uint32_t exp = abs >> 23;  // biased f32 exponent
    if (exp >= 143) return static_cast<std::uint16_t>(sign | 0x7c00u);  // >= 2^16 (or Inf)
    std::uint32_t h;
    std::uint32_t rem, half;
    if (exp >= 113) {  // normal half: drop 13 mantissa bits; a rounding carry may reach Inf, correctly
        h = ((exp - 112) << 10) | ((abs >> 13) & 0x3ffu);
        rem = abs & 0x1fffu;
        half = 0x1000u;
    } else {  // subnormal half: the value in units of 2^-24 is full * 2^(exp - 126)
        const std::uint32_t shift = 126 - exp;
        if (shift > 24) return sign;  // below half of the smallest subnormal (f32 subnormals included)
        const std::uint32_t full = (abs & 0x7fffffu) | 0x800000u;
        h = full >> shift;
        rem = full & ((1u << shift) - 1);
        half = 1u << (shift - 1);
    }
    if (rem > half || (rem == half && (h & 1u))) ++h;
    return static_cast<std::uint16_t>(sign | h);
}

// ---- files ---------------------------------------------------------------------------------------

// One file's tensors (owning). Names sort bytewise, as std::map orders them.
struct SafetensorsFile {
    std::map<std::string, std::string> metadata;
    std::map<std::string, Tensor> tensors;
};

namespace detail::safetensors {

// A header above this is not a checkpoint but an attack on the reader's memory.
inline constexpr std::uint64_t max_header = 100ull * 1000 * 1000;

struct FileDType {
    const char* name;   // as spelled in the file
    DType dtype;        // how mopt holds it
    std::size_t bytes;  // one element
};
inline constexpr std::array<FileDType, 4> file_dtypes{{
    {"F32", DType::f32, 4}, {"BF16", DType::bf16, 2}, {"F16", DType::f16, 2}, {"I32", DType::i32, 4}}};

inline const char* file_dtype_name(DType t) {
    for (const auto& d : file_dtypes)
        if (d.dtype == t) return d.name;
    return nullptr;
}

inline std::string quoted(const std::filesystem::path& p) {
    std::string out;
    out.reserve(p.native().size() + 2);
    out.push_back('\'');
    out.append(p.native());
    out.push_back('\'');
    return out;
}

// Size of a regular file; a missing file, a folder or a pipe is an error (a pipe could hang us).
inline std::uint64_t regular_file_size(const std::filesystem::path& file, const char* what) {
    std::error_code ec;
    const auto status = std::filesystem::status(file, ec);
    const bool missing = status.type() == std::filesystem::file_type::not_found ||
                         ec == std::errc::no_such_file_or_directory;
    check(!missing, what, " ", quoted(file), " does not exist");
    check(!ec, "cannot access ", what, " ", quoted(file), ": ", ec.message());
    check(std::filesystem::is_regular_file(status), what, " ", quoted(file), " is not a regular file");
    const auto size = std::filesystem::file_size(file, ec);
    check(!ec, "cannot read the size of ", what, " ", quoted(file), ": ", ec.message());
    return size;
}

inline std::ifstream open_for_reading(const std::filesystem::path& file, const char* what) {
    std::ifstream in(file, std::ios::binary);
    check(in.good(), "cannot open ", what, " ", quoted(file), ": ", std::strerror(errno));
    return in;
}

inline void read_exact(std::ifstream& in, void* dst, std::uint64_t offset, std::uint64_t bytes,
                       const std::filesystem::path& file, const std::string& what) {
    in.seekg(static_cast<std::streamoff>(offset));
    in.read(static_cast<char*>(dst), static_cast<std::streamsize>(bytes));
    check(in.good() && static_cast<std::uint64_t>(in.gcount()) == bytes, "safetensors file ", quoted(file),
          ": could not read ", bytes, " bytes of ", what, " at offset ", offset, " (file changed or I/O error)");
}

// A JSON value for an error message, cut short: a hostile header may hold megabytes in one field.
inline std::string brief(const nlohmann::json& v) {
    std::string s = v.dump();
    if (s.size() > 80) s = s.substr(0, 77) + "...";
    return s;
}

// A JSON integer that fits in [0, 2^63): extents and offsets. Anything else names itself.
inline std::uint64_t json_non_negative(const nlohmann::json& v, const std::filesystem::path& file,
                                       const std::string& tensor, const char* field) {
    check(v.is_number_integer(), "safetensors file ", quoted(file), ": tensor '", tensor, "': ", field,
          " holds ", brief(v), ", not an integer");
    if (v.is_number_unsigned()) {
        const auto u = v.get<std::uint64_t>();
        check(u <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()), "safetensors file ",
              quoted(file), ": tensor '", tensor, "': ", field, " value ", u, " overflows 64-bit sizes");
        return u;
    }
    const auto s = v.get<std::int64_t>();
    check(s >= 0, "safetensors file ", quoted(file), ": tensor '", tensor, "': ", field, " has negative value ", s);
    return static_cast<std::uint64_t>(s);
}

inline Shape make_shape(const std::vector<std::int64_t>& d) {
    switch (d.size()) {
        case 0: return Shape{};
        case 1: return Shape{d[0]};
        case 2: return Shape{d[0], d[1]};
        case 3: return Shape{d[0], d[1], d[2]};
        default: return Shape{d[0], d[1], d[2], d[3]};
    }
}

// One validated header entry.
struct Entry {
    std::string name;
    FileDType type;
    Shape shape;
    std::uint64_t begin, end;
};

inline Entry parse_entry(const std::string& name, const nlohmann::json& v, const std::filesystem::path& file,
                         std::uint64_t buffer_bytes) {
    const auto where = [&] {
        return mopt::detail::concat("safetensors file ", quoted(file), ": tensor '", name, "': ");
    };
    check(v.is_object(), where(), "entry is ", v.type_name(), ", not an object with dtype, shape, data_offsets");
    for (const char* field : {"dtype", "shape", "data_offsets"})
        check(v.contains(field), where(), "missing field '", field, "'");

    Entry e{name, {}, {}, 0, 0};
    const auto& dt = v["dtype"];
    check(dt.is_string(), where(), "dtype is ", brief(dt), ", not a string");
    const auto dname = dt.get<std::string>();
    const auto* found = std::find_if(file_dtypes.begin(), file_dtypes.end(),
                                     [&](const auto& d) { return dname == d.name; });
    check(found != file_dtypes.end(), where(), "unsupported dtype '", dname,
          "' (mopt reads F32, BF16, F16 and I32)");
    e.type = *found;

    const auto& sh = v["shape"];
    check(sh.is_array(), where(), "shape is ", brief(sh), ", not an array");
    check(sh.size() <= static_cast<std::size_t>(Shape::max_rank), where(), "shape ", brief(sh), " has rank ",
          sh.size(), "; mopt's Tensor supports at most ", Shape::max_rank, " dimensions");
    std::vector<std::int64_t> dims;
    bool any_zero = false;
    for (const auto& x : sh) {
        dims.push_back(static_cast<std::int64_t>(json_non_negative(x, file, name, "shape")));
        any_zero = any_zero || dims.back() == 0;
    }
    std::uint64_t numel = 1;
    if (any_zero) {
        numel = 0;
    } else {
        // Bounded by what any byte count can hold, so numel * element size below cannot wrap either.
        const std::uint64_t limit = static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()) / 8;
        for (auto d : dims) {
            check(numel <= limit / static_cast<std::uint64_t>(d), where(), "shape ", brief(sh),
                  ": the number of elements overflows");
            numel *= static_cast<std::uint64_t>(d);
        }
    }
    e.shape = make_shape(dims);

    const auto& off = v["data_offsets"];
    check(off.is_array() && off.size() == 2, where(), "data_offsets is ", brief(off), ", not [begin, end]");
    e.begin = json_non_negative(off[0], file, name, "data_offsets");
    e.end = json_non_negative(off[1], file, name, "data_offsets");
    check(e.begin <= e.end, where(), "data_offsets [", e.begin, ", ", e.end, "] end before begin");
    check(e.end <= buffer_bytes, where(), "data_offsets [", e.begin, ", ", e.end,
          "] out of the data buffer of ", buffer_bytes, " bytes (file truncated?)");
    check(e.end - e.begin == numel * e.type.bytes, where(), "data_offsets [", e.begin, ", ", e.end, "] hold ",
          e.end - e.begin, " bytes but shape ", e.shape, " of ", e.type.name, " needs ", numel * e.type.bytes);
    return e;
}

// Bytes of `e` from the file into an owning tensor: f32 unless keep_dtype (I32 always stays i32).
inline Tensor load_entry(std::ifstream& in, const Entry& e, std::uint64_t data_start, bool keep_dtype,
                         const std::filesystem::path& file) {
    const std::uint64_t bytes = e.end - e.begin;
    const std::string what = mopt::detail::concat("tensor '", e.name, "'");
    if (keep_dtype || e.type.dtype == DType::f32 || e.type.dtype == DType::i32) {
        Tensor t = Tensor::empty(e.shape, e.type.dtype);
        if (bytes) read_exact(in, t.raw(), data_start + e.begin, bytes, file, what);
        return t;
    }
    // bf16/f16 widened to f32 through a bounded staging buffer: no second full-size copy.
    Tensor t = Tensor::empty(e.shape, DType::f32);
    float* out = t.f32();
    const auto convert = e.type.dtype == DType::bf16 ? bf16_to_f32 : f16_to_f32;
    constexpr std::uint64_t chunk = 1 << 16;
    std::vector<std::uint16_t> stage(static_cast<std::size_t>(std::min<std::uint64_t>(chunk, bytes / 2)));
    for (std::uint64_t i = 0, n = bytes / 2; i < n; i += chunk) {
        const std::uint64_t m = std::min(chunk, n - i);
        read_exact(in, stage.data(), data_start + e.begin + 2 * i, 2 * m, file, what);
        for (std::uint64_t k = 0; k < m; ++k) out[i + k] = convert(stage[k]);
    }
    return t;
}

inline nlohmann::json parse_json(const std::string& text, const std::filesystem::path& file, const char* what) {
    try {
        return nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception& ex) {
        throw Error(mopt::detail::concat(what, " ", quoted(file), ": invalid JSON header: ", ex.what()));
    }
}

}  // namespace detail::safetensors

// Reads every tensor of `file`; bf16/f16 are widened to f32 unless keep_dtype (I32 stays i32).
inline SafetensorsFile read_safetensors(const std::filesystem::path& file, bool keep_dtype = false) {
    namespace st = detail::safetensors;
    using st::quoted;
    const std::uint64_t size = st::regular_file_size(file, "safetensors file");
    check(size >= 8, "safetensors file ", quoted(file), " is ", size,
          " bytes long: shorter than the 8-byte header length");
    auto in = st::open_for_reading(file, "safetensors file");

    std::array<unsigned char, 8> len_bytes{};
    st::read_exact(in, len_bytes.data(), 0, 8, file, "the header length");
    std::uint64_t header_len = 0;
    for (int i = 7; i >= 0; --i) header_len = header_len << 8 | len_bytes[static_cast<std::size_t>(i)];
    check(header_len <= st::max_header, "safetensors file ", quoted(file), ": header length ",
          header_len, " is absurd (more than ", st::max_header, " bytes); not a safetensors file?");
    check(header_len <= size - 8, "safetensors file ", quoted(file), ": header length ", header_len,
          " is larger than the file (", size, " bytes)");

    std::string text(static_cast<std::size_t>(header_len), '\0');
    if (header_len) st::read_exact(in, text.data(), 8, header_len, file, "the header");
    const nlohmann::json header = st::parse_json(text, file, "safetensors file");
    check(header.is_object(), "safetensors file ", quoted(file), ": header is a JSON ", header.type_name(),
          ", not an object");

    const std::uint64_t data_start = 8 + header_len;
    const std::uint64_t buffer_bytes = size - data_start;
    SafetensorsFile out;
    std::vector<st::Entry> entries;
    for (const auto& item : header.items()) {
        const std::string& key = item.key();
        const nlohmann::json& value = item.value();
        if (key == "__metadata__") {
            check(value.is_object(), "safetensors file ", quoted(file), ": __metadata__ is ", value.type_name(),
                  ", not an object of strings");
            for (const auto& m : value.items()) {
                const auto& mk = m.key();
                const auto& mv = m.value();
                check(mv.is_string(), "safetensors file ", quoted(file), ": __metadata__ value of '", mk, "' is ",
                      st::brief(mv), ", not a string");
                out.metadata[mk] = mv.get<std::string>();
            }
            continue;
        }
        entries.push_back(st::parse_entry(key, value, file, buffer_bytes));
    }

    // Two tensors sharing bytes would alias after loading and hint at a forged file.
    std::vector<const st::Entry*> by_offset;
    for (const auto& e : entries)
        if (e.end > e.begin) by_offset.push_back(&e);
    std::sort(by_offset.begin(), by_offset.end(), [](auto* a, auto* b) { return a->begin < b->begin; });
    for (std::size_t i = 1; i < by_offset.size(); ++i)
        check(by_offset[i]->begin >= by_offset[i - 1]->end, "safetensors file ", quoted(file), ": tensors '",
              by_offset[i - 1]->name, "' [", by_offset[i - 1]->begin, ", ", by_offset[i - 1]->end, ") and '",
              by_offset[i]->name, "' [", by_offset[i]->begin, ", ", by_offset[i]->end, ") overlap");

    for (const auto& e : entries) out.tensors.emplace(e.name, st::load_entry(in, e, data_start, keep_dtype, file));
    return out;
}

// A sharded checkpoint: `model.safetensors.index.json` = {"metadata": {...}, "weight_map": {name: shard}},
// shards in the index's folder -> every tensor of every shard, metadata of shards and index merged.
inline SafetensorsFile read_safetensors_index(const std::filesystem::path& index_json, bool keep_dtype = false) {
    namespace st = detail::safetensors;
    using st::quoted;
    const std::uint64_t size = st::regular_file_size(index_json, "safetensors index");
    check(size <= st::max_header, "safetensors index ", quoted(index_json), " is ", size,
          " bytes: too large for an index");
    auto in = st::open_for_reading(index_json, "safetensors index");
    std::string text(static_cast<std::size_t>(size), '\0');
    if (size) st::read_exact(in, text.data(), 0, size, index_json, "the index");
    const nlohmann::json index = st::parse_json(text, index_json, "safetensors index");
    check(index.is_object() && index.contains("weight_map") && index["weight_map"].is_object(),
          "safetensors index ", quoted(index_json), ": no \"weight_map\" object of tensor name -> shard file");

    // shard file -> the tensor names the index places there
    std::map<std::string, std::vector<std::string>> shards;
    for (const auto& entry : index["weight_map"].items()) {
        const std::string& name = entry.key();
        const nlohmann::json& shard = entry.value();
        check(shard.is_string(), "safetensors index ", quoted(index_json), ": tensor '", name, "' maps to ",
              st::brief(shard), ", not a shard file name");
        const auto s = shard.get<std::string>();
        // Shards live beside the index; a path could make a downloaded index read any file.
        const std::filesystem::path p(s);
        check(!s.empty() && p == p.filename() && s != "." && s != "..", "safetensors index ", quoted(index_json),
              ": tensor '", name, "' maps to '", s, "', which is not a file name in the index's folder");
        shards[s].push_back(name);
    }

    SafetensorsFile out;
    std::map<std::string, std::string> owner;  // tensor -> shard it was taken from
    const auto folder = index_json.parent_path();
    for (const auto& [shard, names] : shards) {
        const auto path = folder / shard;
        std::error_code ec;
        check(std::filesystem::exists(path, ec), "safetensors index ", quoted(index_json), ": shard ",
              quoted(path), " (holding tensor '", names.front(), "') does not exist");
        SafetensorsFile part = read_safetensors(path, keep_dtype);
        for (const auto& name : names)
            check(part.tensors.count(name) == 1, "safetensors index ", quoted(index_json), ": tensor '", name,
                  "' is mapped to shard ", quoted(path), ", which does not contain it");
        for (auto& [name, t] : part.tensors) {
            auto [it, fresh] = owner.emplace(name, shard);
            check(fresh, "safetensors index ", quoted(index_json), ": tensor '", name, "' is in both shard '",
                  it->second, "' and shard '", shard, "'");
            out.tensors.emplace(name, std::move(t));
        }
        out.metadata.insert(part.metadata.begin(), part.metadata.end());
    }
    // The index's own metadata (e.g. total_size, a number) wins over the shards', as strings.
    if (index.contains("metadata") && index["metadata"].is_object())
        for (const auto& m : index["metadata"].items())
            out.metadata[m.key()] = m.value().is_string() ? m.value().get<std::string>() : m.value().dump();
    return out;
}

// Writes `tensors` to `file` atomically (temporary file in the same folder, then rename), floating
// tensors stored as `dtype` (F32, BF16 or F16; converted with round-to-nearest-even), i32 as I32;
// the tensors named in `keep_f32` (packed weights' scales and values) stay F32 whatever `dtype` is.
inline void write_safetensors(const std::filesystem::path& file, const std::map<std::string, Tensor>& tensors,
                              DType dtype = DType::f32, const std::map<std::string, std::string>& metadata = {},
                              const std::set<std::string>& keep_f32 = {}) {
    namespace st = detail::safetensors;
    using st::quoted;
    check(dtype == DType::f32 || dtype == DType::bf16 || dtype == DType::f16, "write_safetensors ", quoted(file),
          ": cannot store as ", name(dtype), " (F32, BF16 or F16)");
    check(metadata.count("__metadata__") == 0 && tensors.count("__metadata__") == 0, "write_safetensors ",
          quoted(file), ": '__metadata__' is reserved");

    struct Planned {
        const std::string* name;
        const Tensor* tensor;
        DType stored;
        std::uint64_t begin = 0, end = 0;
    };
    std::vector<Planned> plan;
    for (const auto& [n, t] : tensors) {
        const DType src = t.dtype();
        check(src == DType::f32 || src == DType::bf16 || src == DType::f16 || src == DType::i32,
              "write_safetensors ", quoted(file), ": tensor '", n, "' is ", name(src),
              "; safetensors holds f32, bf16, f16 or i32 here");
        check(t.defined() && (t.raw() != nullptr || t.numel() == 0), "write_safetensors ", quoted(file),
              ": tensor '", n, "' has no data");
        plan.push_back({&n, &t, src == DType::i32 ? DType::i32 : keep_f32.count(n) ? DType::f32 : dtype});
    }
    // Largest element first keeps every tensor aligned to its element size without holes.
    std::stable_sort(plan.begin(), plan.end(), [](const Planned& a, const Planned& b) {
        return storage_bytes(a.stored, 1) > storage_bytes(b.stored, 1);
    });
    std::uint64_t offset = 0;
    nlohmann::ordered_json header = nlohmann::ordered_json::object();
    if (!metadata.empty()) header["__metadata__"] = metadata;
    for (auto& p : plan) {
        p.begin = offset;
        p.end = offset += storage_bytes(p.stored, static_cast<std::size_t>(p.tensor->numel()));
    }
    // Header entries by name (the plan is in buffer order).
    std::vector<const Planned*> by_name;
    for (const auto& p : plan) by_name.push_back(&p);
    std::sort(by_name.begin(), by_name.end(), [](auto* a, auto* b) { return *a->name < *b->name; });
    for (const auto* p : by_name) {
        std::vector<std::int64_t> shape;
        for (int i = 0; i < p->tensor->rank(); ++i) shape.push_back(p->tensor->dim(i));
        header[*p->name] = {{"dtype", st::file_dtype_name(p->stored)},
                            {"shape", shape},
                            {"data_offsets", {p->begin, p->end}}};
    }
    std::string text = header.dump();
    text.append((8 - text.size() % 8) % 8, ' ');  // buffer starts 8-byte aligned

    // Unique temporary name beside the target, so the rename stays on one file system.
    std::random_device rd;
    const auto tmp = file.parent_path() / mopt::detail::concat(".", file.filename().string(), ".tmp-", rd(), "-", rd());
    try {
        std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
        check(out.good(), "write_safetensors: cannot create ", quoted(tmp), ": ", std::strerror(errno));
        std::array<char, 8> len{};
        for (int i = 0; i < 8; ++i) len[static_cast<std::size_t>(i)] = static_cast<char>((text.size() >> (8 * i)) & 0xff);
        out.write(len.data(), 8);
        out.write(text.data(), static_cast<std::streamsize>(text.size()));

        constexpr std::size_t chunk = 1 << 16;
        std::vector<std::uint16_t> stage;
        std::vector<float> wide;
        for (const auto& p : plan) {
            const Tensor& t = *p.tensor;
            const auto n = static_cast<std::size_t>(t.numel());
            if (t.dtype() == p.stored) {  // same storage: bytes as they are
                out.write(static_cast<const char*>(t.raw()), static_cast<std::streamsize>(t.bytes()));
                continue;
            }
            // Through f32 (exact from bf16/f16), then one rounding to the stored type.
            const auto* src16 = static_cast<const std::uint16_t*>(t.raw());
            const auto widen = [&](std::size_t i) {
                switch (t.dtype()) {
                    case DType::bf16: return bf16_to_f32(src16[i]);
                    case DType::f16: return f16_to_f32(src16[i]);
                    default: return t.f32()[i];
                }
            };
            for (std::size_t i = 0; i < n; i += chunk) {
                const std::size_t m = std::min(chunk, n - i);
                if (p.stored == DType::f32) {
                    wide.resize(m);
                    for (std::size_t k = 0; k < m; ++k) wide[k] = widen(i + k);
                    out.write(reinterpret_cast<const char*>(wide.data()), static_cast<std::streamsize>(4 * m));
                } else {
                    stage.resize(m);
                    const auto narrow = p.stored == DType::bf16 ? f32_to_bf16 : f32_to_f16;
                    for (std::size_t k = 0; k < m; ++k) stage[k] = narrow(widen(i + k));
                    out.write(reinterpret_cast<const char*>(stage.data()), static_cast<std::streamsize>(2 * m));
                }
            }
        }
        out.close();
        check(!out.fail(), "write_safetensors: writing ", quoted(tmp), " failed (disk full?)");
        std::error_code ec;
        std::filesystem::rename(tmp, file, ec);
        check(!ec, "write_safetensors: cannot move ", quoted(tmp), " to ", quoted(file), ": ", ec.message());
    } catch (...) {
        std::error_code ignore;
        std::filesystem::remove(tmp, ignore);
        throw;
    }
}

}  // namespace mopt::io
