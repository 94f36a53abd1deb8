#pragma once
// prompt::None — the Prompt slot's default: the model sees the token embeddings only and no
// position is an always-visible prefix. Soft and injected prompts add positions beside it.
#include <cstdint>

namespace mopt::prompt {

struct None {
    static constexpr const char* name = "None";
    static constexpr bool has_prompt = false;
};

}  // namespace mopt::prompt
