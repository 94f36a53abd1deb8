// libFuzzer target: io::read_safetensors on arbitrary bytes, in both dtype modes, and a write/read
// round trip of whatever it accepted (the round trip must reproduce every tensor bit for bit).
#include <cstring>

#include "fuzz_file.hpp"
#include "mopt/io/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    static const auto file = mopt::fuzz::scratch_file(".safetensors");
    static const auto copy = mopt::fuzz::scratch_file("_copy.safetensors");
    mopt::fuzz::write_input(file, data, size);
    for (bool keep_dtype : {false, true}) {
        try {
            mopt::io::SafetensorsFile f = mopt::io::read_safetensors(file, keep_dtype);
            if (keep_dtype) continue;
            // Accepted: every value is now f32; writing and reading back must be exact.
            mopt::io::write_safetensors(copy, f.tensors);
            mopt::io::SafetensorsFile g = mopt::io::read_safetensors(copy);
            if (g.tensors.size() != f.tensors.size()) __builtin_trap();
            for (const auto& [name, t] : f.tensors) {
                const auto it = g.tensors.find(name);
                if (it == g.tensors.end() || it->second.shape() != t.shape() ||
                    it->second.dtype() != t.dtype() || std::memcmp(it->second.raw(), t.raw(), t.bytes()) != 0)
                    __builtin_trap();
            }
        } catch (const mopt::Error&) {
        }
    }
    return 0;
}
