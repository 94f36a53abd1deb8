// libFuzzer target: Hugging Face config.json parsing (io::read_hf_config) and the sharded
// safetensors index (io::read_safetensors_index) on arbitrary bytes. An accepted config must
// validate and survive a write/read round trip with the same numbers and structure.
#include "fuzz_file.hpp"
#include "mopt/io/hf_config.hpp"
#include "mopt/io/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    static const auto dir = [] {
        auto d = mopt::fuzz::scratch_file("_hf");
        std::filesystem::create_directories(d);
        return d;
    }();
    mopt::fuzz::write_input(dir / "config.json", data, size);
    try {
        mopt::io::HfConfig c = mopt::io::read_hf_config(dir / "config.json");
        c.config.validate("fuzz");
        mopt::io::write_hf_config(dir / "copy.json", c.config, c.structure);
        mopt::io::HfConfig d = mopt::io::read_hf_config(dir / "copy.json");
        if (!(d.structure == c.structure) || d.config.d_model != c.config.d_model ||
            d.config.n_layers != c.config.n_layers || d.config.vocab_size != c.config.vocab_size ||
            d.config.num_experts != c.config.num_experts || d.config.rope_theta != c.config.rope_theta)
            __builtin_trap();
    } catch (const mopt::Error&) {
    }
    mopt::fuzz::write_input(dir / "model.safetensors.index.json", data, size);
    try {
        (void)mopt::io::read_safetensors_index(dir / "model.safetensors.index.json");
    } catch (const mopt::Error&) {
    }
    return 0;
}
