// libFuzzer target: the llama2.c checkpoint reader and tokenizer reader on arbitrary bytes. The
// first input byte picks the parser so that one corpus explores both.
#include <string>

#include "fuzz_file.hpp"
#include "mopt/data/llama2c_tokenizer.hpp"
#include "mopt/io/llama2c.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    static const auto file = mopt::fuzz::scratch_file(".bin");
    if (size == 0) return 0;
    const std::uint8_t which = data[0];
    mopt::fuzz::write_input(file, data + 1, size - 1);
    try {
        if (which % 2 == 0) {
            mopt::io::Llama2cCheckpoint c = mopt::io::load_llama2c(file);
            (void)c;
        } else {
            // A vocabulary size from the next byte keeps small inputs meaningful.
            const std::int64_t vocab = 1 + (size > 1 ? data[1] % 64 : 0);
            auto tok = mopt::data::Llama2cTokenizer::load(file, vocab);
            const std::string text(reinterpret_cast<const char*>(data), std::min<std::size_t>(size, 64));
            auto ids = tok.encode(text, true);
            (void)tok.decode(ids);
        }
    } catch (const mopt::Error&) {
    }
    return 0;
}
