#pragma once
// LinearRole: which part of a block a Linear belongs to. Compression acts per role (by default on
// attention, dense feed-forward and expert projections; routers, embeddings, norms and the output
// head stay dense), and a model's visit_linears(f) calls f(Linear&, LinearRole) for each of them.
#include <string_view>

#include "mopt/error.hpp"

namespace mopt::nn {

enum class LinearRole { attention, ffn, expert, router };

[[nodiscard]] inline const char* name(LinearRole r) {
    switch (r) {
        case LinearRole::attention: return "attention";
        case LinearRole::ffn: return "ffn";
        case LinearRole::expert: return "expert";
        case LinearRole::router: return "router";
    }
    return "?";
}

[[nodiscard]] inline LinearRole parse_linear_role(std::string_view s) {
    if (s == "attention") return LinearRole::attention;
    if (s == "ffn") return LinearRole::ffn;
    if (s == "expert") return LinearRole::expert;
    if (s == "router") return LinearRole::router;
    throw Error(mopt::detail::concat("unknown layer type '", s, "' (attention, ffn, expert, router)"));
}

}  // namespace mopt::nn
