#pragma once
// The parsers read files, so each fuzz input is written to one scratch file per process (in
// /dev/shm when it exists) and handed to the parser. A mopt::Error is the expected answer to a
// malformed file; anything else (a crash, a sanitizer report, another exception, a hang) is a bug.
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <unistd.h>

namespace mopt::fuzz {

inline std::filesystem::path scratch_file(const char* suffix) {
    const std::filesystem::path dir = std::filesystem::exists("/dev/shm") ? "/dev/shm" : std::filesystem::temp_directory_path();
    return dir / ("mopt_fuzz_" + std::to_string(::getpid()) + suffix);
}

inline void write_input(const std::filesystem::path& file, const std::uint8_t* data, std::size_t size) {
    std::ofstream out(file, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
}

}  // namespace mopt::fuzz
