#pragma once
// Saving and restoring optimizer state: a small binary format (magic, kind, step, then for each
// parameter its name, shape and state tensors). Restoring checks every name and shape and names
// the first one that differs.
#include <cstdint>
#include <istream>
#include <ostream>
#include <string>
#include <vector>

#include "mopt/autodiff/parameter.hpp"

namespace mopt::train::detail {

inline constexpr std::uint32_t state_magic = 0x5453504Fu;  // "OPST"

inline void write_u64(std::ostream& os, std::uint64_t v) { os.write(reinterpret_cast<const char*>(&v), sizeof v); }
inline std::uint64_t read_u64(std::istream& is, const char* what) {
    std::uint64_t v = 0;
    is.read(reinterpret_cast<char*>(&v), sizeof v);
    check(is.good(), "optimizer state: truncated while reading ", what);
    return v;
}

inline void write_header(std::ostream& os, const std::string& kind, std::int64_t step, std::size_t count) {
    write_u64(os, state_magic);
    write_u64(os, kind.size());
    os.write(kind.data(), static_cast<std::streamsize>(kind.size()));
    write_u64(os, static_cast<std::uint64_t>(step));
    write_u64(os, count);
}
// Returns the step; checks kind and parameter count.
inline std::int64_t read_header(std::istream& is, const std::string& kind, std::size_t count) {
    check(read_u64(is, "magic") == state_magic, "optimizer state: not an optimizer state (bad magic)");
    const auto len = read_u64(is, "kind");
    check(len < 64, "optimizer state: corrupt kind length ", len);
    std::string k(len, '\0');
    is.read(k.data(), static_cast<std::streamsize>(len));
    check(is.good() && k == kind, "optimizer state: saved by '", k, "', restoring into '", kind, "'");
    const auto step = static_cast<std::int64_t>(read_u64(is, "step"));
    const auto n = read_u64(is, "parameter count");
    check(n == count, "optimizer state: holds ", n, " parameters, the optimizer has ", count);
    return step;
}

inline void write_tensor(std::ostream& os, const std::string& name, const Tensor& t) {
    write_u64(os, name.size());
    os.write(name.data(), static_cast<std::streamsize>(name.size()));
    write_u64(os, static_cast<std::uint64_t>(t.numel()));
    os.write(reinterpret_cast<const char*>(t.f32()), static_cast<std::streamsize>(t.bytes()));
}
inline void read_tensor(std::istream& is, const std::string& name, Tensor& t) {
    const auto len = read_u64(is, "tensor name");
    check(len < (1u << 16), "optimizer state: corrupt name length for '", name, "'");
    std::string saved(len, '\0');
    is.read(saved.data(), static_cast<std::streamsize>(len));
    check(is.good() && saved == name, "optimizer state: expected '", name, "', found '", saved, "'");
    const auto n = read_u64(is, name.c_str());
    check(static_cast<std::int64_t>(n) == t.numel(), "optimizer state: '", name, "' holds ", n,
          " values, the parameter has shape ", t.shape());
    is.read(reinterpret_cast<char*>(t.f32()), static_cast<std::streamsize>(t.bytes()));
    check(is.good(), "optimizer state: truncated in '", name, "'");
}

inline std::vector<autodiff::Parameter*> trainable_only(const std::vector<autodiff::Parameter*>& params) {
    std::vector<autodiff::Parameter*> out;
    for (auto* p : params) {
        check(p != nullptr, "optimizer: null parameter");
        if (p->trainable()) out.push_back(p);
    }
    return out;
}

}  // namespace mopt::train::detail
