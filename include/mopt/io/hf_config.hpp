#pragma once
// Hugging Face config.json, read and write.
//
// Three architectures:
//   LlamaForCausalLM   ⇔ nn::Transformer<nn::Llama>                        (DenseFFN<SwiGLU>)
//   MixtralForCausalLM ⇔ nn::Transformer<nn::Llama, nn::SwitchFFN<nn::TopK, nn::EveryLayer, nn::SwiGLU>>
//                        (Hugging Face renormalises the top-k router weights even for k = 1, which is
//                        TopK's rule; Top1 scales by the softmax probability as Switch Transformers do)
//   MoptForCausalLM    — every other structure (GPT family, Top1, EveryOtherLayer, capacity factor,
//                        router z-loss): the fields of nn::Structure under "mopt_structure" and the
//                        numbers under Hugging Face's names where they exist.
//
// The reader accepts what transformers 4 and 5 write: RoPE's base in "rope_parameters" (5) or at
// the top level (4); it rejects what mopt cannot compute (scaled RoPE, biases, sliding windows) with
// a mopt::Error naming the file and the field, rather than loading a model that computes something
// else.
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <system_error>
#include <vector>

#include <nlohmann/json.hpp>

#include "mopt/error.hpp"
#include "mopt/nn/config.hpp"
#include "mopt/tensor/dtype.hpp"

namespace mopt::io {

// What a config.json says: the numbers, the structure they need, and the architecture named there.
struct HfConfig {
    nn::ModelConfig config;
    nn::Structure structure;
    std::string architecture;  // "LlamaForCausalLM", "MixtralForCausalLM" or "MoptForCausalLM"
    // mopt's own block for a compressed model: {"recipe": {...}, "layers": {linear name: packed-format
    // meta}}; null for a dense checkpoint (compress/checkpoint.hpp reads and writes it).
    nlohmann::json compression;
};

namespace detail::hf {

using json = nlohmann::json;
using ordered_json = nlohmann::ordered_json;

inline std::string quoted(const std::filesystem::path& p) { return "'" + p.string() + "'"; }

// "config '/m/config.json'": the start of every message about one file.
inline std::string where(const std::filesystem::path& file) { return "config " + quoted(file); }

// A JSON value for a message, cut short.
inline std::string brief(const json& v) {
    std::string s = v.dump();
    if (s.size() > 60) s = s.substr(0, 57) + "...";
    return s;
}

// Field access with messages that name the file and the field. `null` counts as absent (transformers
// writes null for "not set"); a required field that is absent or null is an error.
struct Reader {
    const json& j;
    std::filesystem::path file;

    [[nodiscard]] bool has(const char* key) const { return j.contains(key) && !j[key].is_null(); }

    [[nodiscard]] const json& need(const char* key) const {
        check(j.contains(key), where(file), ": missing field '", key, "'");
        check(!j[key].is_null(), where(file), ": field '", key, "' is null");
        return j[key];
    }

    [[nodiscard]] std::int64_t integer(const json& v, const std::string& key) const {
        check(v.is_number_integer(), where(file), ": field '", key, "' holds ", brief(v), ", not an integer");
        if (v.is_number_unsigned())
            check(v.get<std::uint64_t>() <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()),
                  where(file), ": field '", key, "' value ", brief(v), " overflows a 64-bit integer");
        return v.get<std::int64_t>();
    }
    [[nodiscard]] std::int64_t integer(const char* key) const { return integer(need(key), key); }
    [[nodiscard]] std::int64_t integer(const char* key, std::int64_t fallback) const {
        return has(key) ? integer(j[key], key) : fallback;
    }

    // A finite number that fits a float (integers accepted: rope_theta may be written as 500000).
    [[nodiscard]] float number(const json& v, const std::string& key) const {
        check(v.is_number(), where(file), ": field '", key, "' holds ", brief(v), ", not a number");
        const double d = v.get<double>();
        check(std::isfinite(d) && std::fabs(d) <= std::numeric_limits<float>::max(), where(file), ": field '", key,
              "' value ", brief(v), " is not a finite 32-bit float");
        return static_cast<float>(d);
    }
    [[nodiscard]] float number(const char* key) const { return number(need(key), key); }
    [[nodiscard]] float number(const char* key, float fallback) const {
        return has(key) ? number(j[key], key) : fallback;
    }

    [[nodiscard]] bool boolean(const char* key, bool fallback) const {
        if (!has(key)) return fallback;
        check(j[key].is_boolean(), where(file), ": field '", key, "' holds ", brief(j[key]), ", not true or false");
        return j[key].get<bool>();
    }

    [[nodiscard]] std::string string(const json& v, const std::string& key) const {
        check(v.is_string(), where(file), ": field '", key, "' holds ", brief(v), ", not a string");
        return v.get<std::string>();
    }
    [[nodiscard]] std::string string(const char* key) const { return string(need(key), key); }

    // bos/eos: an id, a list of ids (Llama 3 lists several eos ids; the first is kept) or null.
    [[nodiscard]] std::int32_t token_id(const char* key, std::int32_t fallback) const {
        if (!has(key)) return fallback;
        const json& v = j[key];
        const json& first = v.is_array() && !v.empty() ? v[0] : v;
        const std::int64_t id = integer(first, key);
        check(id >= 0 && id <= std::numeric_limits<std::int32_t>::max(), where(file), ": field '", key, "' value ",
              id, " is not a token id");
        return static_cast<std::int32_t>(id);
    }
};

// The shortest decimal that reads back as `f`: config.json shows 1e-05, not 9.99999974737875e-06.
// JSON readers parse into a double first; where that double would round to another float (a
// shortest decimal next to a rounding boundary), the exact value is written instead.
inline double pretty(float f) {
    char buf[64];
    const auto r = std::to_chars(buf, buf + sizeof buf - 1, f);
    *r.ptr = '\0';
    const double d = std::strtod(buf, nullptr);
    return static_cast<float>(d) == f ? d : static_cast<double>(f);
}

// Hugging Face's hidden_act for an activation of nn::Structure. mopt's GELU is the tanh
// approximation: "gelu_pytorch_tanh" (or its synonym "gelu_new"), not HF's exact-erf "gelu".
inline std::string hf_activation(const std::string& activation) {
    if (activation == "SwiGLU") return "silu";
    if (activation == "GELU") return "gelu_pytorch_tanh";
    if (activation == "ReLU") return "relu";
    return "";
}

inline std::string routing_placement(const nn::Structure& s) {
    return s.expert_interval == 1 ? "EveryLayer" : "EveryOtherLayer";
}

// "DenseFFN<SwiGLU>", "SwitchFFN<SwiGLU, TopK, EveryLayer>".
inline std::string ffn_description(const nn::Structure& s) {
    if (s.ffn != "SwitchFFN") return s.ffn + "<" + s.activation + ">";
    return s.ffn + "<" + s.activation + ", " + s.routing + ", " + routing_placement(s) + ">";
}

inline nn::Structure llama_structure() {
    return nn::Structure{.family = "Llama", .norm = "RMSNorm", .learned_positions = false, .ffn = "DenseFFN",
                         .activation = "SwiGLU", .routing = "", .expert_interval = 1};
}
inline nn::Structure mixtral_structure() {
    nn::Structure s = llama_structure();
    s.ffn = "SwitchFFN";
    s.routing = "TopK";
    return s;
}

// Whether two structures compute the same function. The family's name is only a label (a
// Family<RMSNorm, Attention<Rotary>, …> is a Llama); routing and placement matter only with experts.
inline bool same_computation(const nn::Structure& a, const nn::Structure& b) {
    if (a.norm != b.norm || a.learned_positions != b.learned_positions || a.ffn != b.ffn ||
        a.activation != b.activation)
        return false;
    return a.ffn != "SwitchFFN" || (a.routing == b.routing && a.expert_interval == b.expert_interval);
}

// Which architecture name a model is written under (see the file comment).
// Only the Llama family itself is written under Hugging Face's names, so that the structure read
// back is the one written (a custom Family of the same parts keeps its name as MoptForCausalLM).
inline std::string architecture_for(const nn::ModelConfig& c, const nn::Structure& s) {
    if (s.family != "Llama") return "MoptForCausalLM";
    if (same_computation(s, llama_structure())) return "LlamaForCausalLM";
    if (same_computation(s, mixtral_structure()) && c.capacity_factor == 0.0f && c.z_loss_coef == 0.0f)
        return "MixtralForCausalLM";
    return "MoptForCausalLM";
}

inline const char* hf_dtype_name(DType t) {
    switch (t) {
        case DType::bf16: return "bfloat16";
        case DType::f16: return "float16";
        default: return "float32";
    }
}

// RoPE: "rope_parameters" {"rope_theta", "rope_type"} (transformers 5), or a top-level "rope_theta"
// with an optional "rope_scaling" (transformers 4). Only the unscaled ("default") rotation is what
// mopt computes; any other rope_type would load silently wrong positions, so it is an error.
inline float read_rope_theta(const Reader& r, float fallback) {
    const auto check_type = [&](const json& obj, const std::string& field) {
        check(obj.is_object(), where(r.file), ": field '", field, "' holds ", brief(obj), ", not an object");
        // Per-layer-type parameters ({"full_attention": {...}, ...}) belong to other architectures.
        for (const auto& item : obj.items())
            check(!item.value().is_object(), where(r.file), ": field '", field, ".", item.key(),
                  "' is an object; mopt reads one set of rotary parameters for all layers");
        if (obj.contains("partial_rotary_factor") && !obj["partial_rotary_factor"].is_null())
            check(r.number(obj["partial_rotary_factor"], field + ".partial_rotary_factor") == 1.0f, where(r.file),
                  ": field '", field, ".partial_rotary_factor' is ", brief(obj["partial_rotary_factor"]),
                  "; mopt rotates the whole head");
        const char* key = obj.contains("rope_type") ? "rope_type" : obj.contains("type") ? "type" : nullptr;
        if (key == nullptr || obj[key].is_null()) return;
        const std::string type = r.string(obj[key], field + "." + key);
        check(type == "default", where(r.file), ": field '", field, ".", key, "' is '", type,
              "'; mopt implements only the unscaled rotary embedding (rope_type \"default\")");
    };
    float theta = fallback;  // the config class's default when a file names none
    bool from_parameters = false;
    if (r.has("rope_parameters")) {
        const json& p = r.j["rope_parameters"];
        check_type(p, "rope_parameters");
        if (p.contains("rope_theta") && !p["rope_theta"].is_null()) {
            theta = r.number(p["rope_theta"], "rope_parameters.rope_theta");
            from_parameters = true;
        }
    }
    if (r.has("rope_scaling")) check_type(r.j["rope_scaling"], "rope_scaling");
    if (r.has("rope_theta")) {
        const float top = r.number("rope_theta");
        check(!from_parameters || top == theta, where(r.file), ": field 'rope_theta' (", top,
              ") disagrees with 'rope_parameters.rope_theta' (", theta, ")");
        theta = top;
    }
    if (r.has("partial_rotary_factor"))
        check(r.number("partial_rotary_factor") == 1.0f, where(r.file),
              ": field 'partial_rotary_factor' is ", brief(r.j["partial_rotary_factor"]), "; mopt rotates the whole head");
    return theta;
}

// The structure recorded by MoptForCausalLM, checked word by word.
inline nn::Structure read_mopt_structure(const Reader& r) {
    const json& m = r.need("mopt_structure");
    check(m.is_object(), where(r.file), ": field 'mopt_structure' holds ", brief(m), ", not an object");
    const Reader sub{m, r.file};
    const auto field = [&](const char* key) -> const json& {
        check(m.contains(key) && !m[key].is_null(), where(r.file), ": missing field 'mopt_structure.", key, "'");
        return m[key];
    };
    const auto one_of = [&](const char* key, std::initializer_list<const char*> allowed) {
        const std::string v = sub.string(field(key), std::string("mopt_structure.") + key);
        bool ok = false;
        std::string list;
        for (const char* a : allowed) {
            ok = ok || v == a;
            list += list.empty() ? a : std::string(", ") + a;
        }
        check(ok, where(r.file), ": field 'mopt_structure.", key, "' is '", v, "'; expected one of ", list);
        return v;
    };
    nn::Structure s;
    s.family = sub.string(field("family"), "mopt_structure.family");
    s.norm = one_of("norm", {"RMSNorm", "LayerNorm"});
    const json& lp = field("learned_positions");
    check(lp.is_boolean(), where(r.file), ": field 'mopt_structure.learned_positions' holds ", brief(lp),
          ", not true or false");
    s.learned_positions = lp.get<bool>();
    s.ffn = one_of("ffn", {"DenseFFN", "SwitchFFN"});
    s.activation = one_of("activation", {"SwiGLU", "GELU", "ReLU"});
    if (s.ffn == "SwitchFFN") {
        s.routing = one_of("routing", {"Top1", "TopK"});
        s.expert_interval = sub.integer(field("expert_interval"), "mopt_structure.expert_interval");
        check(s.expert_interval == 1 || s.expert_interval == 2, where(r.file),
              ": field 'mopt_structure.expert_interval' is ", s.expert_interval, "; expected 1 or 2");
    }
    return s;
}

inline HfConfig parse(const json& j, const std::filesystem::path& file) {
    check(j.is_object(), where(file), ": the file holds a JSON ", j.type_name(), ", not an object");
    const Reader r{j, file};
    HfConfig out;

    // The architecture: "architectures"[0], or model_type where a file has no architectures list.
    if (r.has("architectures")) {
        const json& a = j["architectures"];
        check(a.is_array() && !a.empty(), where(file), ": field 'architectures' holds ", brief(a),
              ", not a list of architecture names");
        out.architecture = r.string(a[0], "architectures[0]");
    } else {
        check(r.has("model_type"), where(file), ": missing field 'architectures' (and no 'model_type')");
        const std::string t = r.string("model_type");
        out.architecture = t == "llama" ? "LlamaForCausalLM" : t == "mixtral" ? "MixtralForCausalLM"
                                                          : t == "mopt"    ? "MoptForCausalLM"
                                                                           : t;
    }
    const std::string& arch = out.architecture;
    check(arch == "LlamaForCausalLM" || arch == "MixtralForCausalLM" || arch == "MoptForCausalLM", where(file),
          ": field 'architectures' names '", arch,
          "'; mopt reads LlamaForCausalLM, MixtralForCausalLM and MoptForCausalLM");
    out.structure = arch == "LlamaForCausalLM"     ? llama_structure()
                    : arch == "MixtralForCausalLM" ? mixtral_structure()
                                                   : read_mopt_structure(r);
    const nn::Structure& s = out.structure;

    // hidden_act must be the activation the structure computes ("silu" gated for Llama/Mixtral).
    std::string act = r.has("hidden_act") ? r.string("hidden_act") : hf_activation(s.activation);
    if (act == "gelu_new") act = "gelu_pytorch_tanh";  // the same tanh approximation under its older name
    check(act == hf_activation(s.activation), where(file), ": field 'hidden_act' is '", act, "' but ", arch,
          " here computes ", s.activation, " (hidden_act \"", hf_activation(s.activation), "\")");
    for (const char* bias : {"attention_bias", "mlp_bias"})
        check(!r.boolean(bias, false), where(file), ": field '", bias,
              "' is true; mopt's projections have no bias");

    nn::ModelConfig& c = out.config;
    c.vocab_size = r.integer("vocab_size");
    c.d_model = r.integer("hidden_size");
    c.d_ff = r.integer("intermediate_size");
    c.n_layers = r.integer("num_hidden_layers");
    c.n_heads = r.integer("num_attention_heads");
    // LlamaConfig reads a missing num_key_value_heads as plain multi-head attention; MixtralConfig's
    // default (8) depends on the class version, so a Mixtral file must say.
    c.n_kv_heads = arch == "MixtralForCausalLM" ? r.integer("num_key_value_heads")
                                                : r.integer("num_key_value_heads", c.n_heads);
    check(c.n_kv_heads > 0, where(file), ": field 'num_key_value_heads' must be positive, got ", c.n_kv_heads);
    c.max_seq = r.integer("max_position_embeddings");
    c.norm_eps = s.norm == "RMSNorm" ? r.number("rms_norm_eps") : r.number("layer_norm_eps");
    c.tie_embeddings = r.boolean("tie_word_embeddings", false);
    c.bos_id = r.token_id("bos_token_id", c.bos_id);
    c.eos_id = r.token_id("eos_token_id", c.eos_id);
    // The base where a file names none: MixtralConfig's default is 1e6, LlamaConfig's 10000.
    if (!s.learned_positions) c.rope_theta = read_rope_theta(r, arch == "MixtralForCausalLM" ? 1e6f : 10000.0f);
    if (r.has("head_dim") && c.n_heads > 0) {
        const std::int64_t hd = r.integer("head_dim");
        check(hd == c.d_model / c.n_heads && c.d_model % c.n_heads == 0, where(file), ": field 'head_dim' is ", hd,
              " but hidden_size / num_attention_heads is ", c.d_model, " / ", c.n_heads,
              "; mopt needs head_dim = hidden_size / num_attention_heads");
    }

    if (s.ffn == "SwitchFFN") {
        c.num_experts = r.integer("num_local_experts");
        c.experts_per_token = r.integer("num_experts_per_tok");
        check(c.num_experts >= 1, where(file), ": field 'num_local_experts' is ", c.num_experts, " but ", arch,
              " here is ", ffn_description(s), ", which needs at least one expert");
        check(s.routing != "Top1" || c.experts_per_token == 1, where(file), ": field 'num_experts_per_tok' is ",
              c.experts_per_token, " but Top1 routing sends each token to one expert (TopK takes k > 1)");
        c.aux_loss_coef = r.number("router_aux_loss_coef", 0.001f);  // MixtralConfig's default
        c.capacity_factor = r.number("capacity_factor", 0.0f);
        c.z_loss_coef = r.number("router_z_loss_coef", 0.0f);
        c.expert_interval = r.integer("expert_interval", s.expert_interval);
        check(c.expert_interval == s.expert_interval, where(file), ": field 'expert_interval' is ",
              c.expert_interval, " but mopt_structure.expert_interval is ", s.expert_interval);
        if (arch == "MixtralForCausalLM")
            check(c.capacity_factor == 0.0f && c.z_loss_coef == 0.0f, where(file),
                  ": MixtralForCausalLM has no capacity_factor or router_z_loss_coef; such a model is "
                  "MoptForCausalLM");
        // router_jitter_noise only perturbs training; inference ignores it.
    } else {
        const std::int64_t e = r.integer("num_local_experts", 0);
        check(e == 0, where(file), ": field 'num_local_experts' is ", e, " but ", arch, " here is ",
              ffn_description(s), " (no experts)");
    }
    // Sliding-window attention (Mistral/Mixtral) masks keys further back than the window; mopt
    // attends to the whole context, which is the same only when the window covers it.
    if (r.has("sliding_window")) {
        const std::int64_t w = r.integer("sliding_window");
        check(w >= c.max_seq, where(file), ": field 'sliding_window' is ", w,
              " but max_position_embeddings is ", c.max_seq,
              "; mopt has no sliding-window attention (the window must be null or cover the context)");
    }
    c.validate(where(file));
    if (j.contains("mopt_compression")) {
        check(j["mopt_compression"].is_object(), where(file), ": field 'mopt_compression' holds ",
              brief(j["mopt_compression"]), ", not an object");
        out.compression = j["mopt_compression"];
    }
    return out;
}

// The JSON of a config (what write_hf_config writes), with the on-disk dtype of the weights beside it.
inline ordered_json to_json(const nn::ModelConfig& c, const nn::Structure& s, DType dtype) {
    const std::string where_ = "write_hf_config";
    c.validate(where_);
    const bool experts = s.ffn == "SwitchFFN";
    check(s.ffn == "DenseFFN" || experts, where_, ": unknown feed-forward '", s.ffn, "'");
    check(experts ? c.num_experts >= 1 : c.num_experts == 0, where_, ": structure ", s.describe(),
          " with num_experts = ", c.num_experts);
    check(!hf_activation(s.activation).empty(), where_, ": unknown activation '", s.activation, "'");
    check(s.norm == "RMSNorm" || s.norm == "LayerNorm", where_, ": unknown norm '", s.norm, "'");
    if (experts)
        check(s.expert_interval == 1 || s.expert_interval == 2, where_, ": expert_interval ", s.expert_interval);
    const std::string arch = architecture_for(c, s);

    ordered_json j;
    j["architectures"] = {arch};
    j["model_type"] = arch == "LlamaForCausalLM" ? "llama" : arch == "MixtralForCausalLM" ? "mixtral" : "mopt";
    if (arch == "MoptForCausalLM") {
        ordered_json m;
        m["family"] = s.family;
        m["norm"] = s.norm;
        m["learned_positions"] = s.learned_positions;
        m["ffn"] = s.ffn;
        m["activation"] = s.activation;
        if (experts) {
            m["routing"] = s.routing;
            m["expert_interval"] = s.expert_interval;
        }
        j["mopt_structure"] = m;
    }
    j["vocab_size"] = c.vocab_size;
    j["hidden_size"] = c.d_model;
    j["intermediate_size"] = c.d_ff;
    j["num_hidden_layers"] = c.n_layers;
    j["num_attention_heads"] = c.n_heads;
    j["num_key_value_heads"] = c.kv_heads();
    j["head_dim"] = c.head_dim();
    j["max_position_embeddings"] = c.max_seq;
    j[s.norm == "RMSNorm" ? "rms_norm_eps" : "layer_norm_eps"] = pretty(c.norm_eps);
    if (!s.learned_positions) {
        j["rope_parameters"] = {{"rope_theta", pretty(c.rope_theta)}, {"rope_type", "default"}};
        j["rope_theta"] = pretty(c.rope_theta);  // the same value where transformers 4 looks for it
    }
    j["hidden_act"] = hf_activation(s.activation);
    if (arch != "MixtralForCausalLM") {
        j["attention_bias"] = false;
        j["mlp_bias"] = false;
    }
    j["tie_word_embeddings"] = c.tie_embeddings;
    j["bos_token_id"] = c.bos_id;
    j["eos_token_id"] = c.eos_id;
    if (experts) {
        j["num_local_experts"] = c.num_experts;
        j["num_experts_per_tok"] = c.experts_per_token;
        j["router_aux_loss_coef"] = pretty(c.aux_loss_coef);
        if (arch == "MixtralForCausalLM") {
            j["sliding_window"] = nullptr;
            j["router_jitter_noise"] = 0.0;
        } else {
            j["capacity_factor"] = pretty(c.capacity_factor);
            j["router_z_loss_coef"] = pretty(c.z_loss_coef);
            j["expert_interval"] = s.expert_interval;
        }
    }
    j["dtype"] = hf_dtype_name(dtype);
    return j;
}

// Writes `text` to `file` through a temporary file in the same folder and a rename, so a reader
// never sees half a file and a crash leaves the old one.
inline void write_text_atomic(const std::filesystem::path& file, const std::string& text) {
    std::random_device rd;
    const auto tmp = file.parent_path() / mopt::detail::concat(".", file.filename().string(), ".tmp-", rd(), "-", rd());
    try {
        std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
        check(out.good(), "cannot create ", quoted(tmp), ": ", std::strerror(errno));
        out.write(text.data(), static_cast<std::streamsize>(text.size()));
        out.close();
        check(!out.fail(), "writing ", quoted(tmp), " failed (disk full?)");
        std::error_code ec;
        std::filesystem::rename(tmp, file, ec);
        check(!ec, "cannot move ", quoted(tmp), " to ", quoted(file), ": ", ec.message());
    } catch (...) {
        std::error_code ignore;
        std::filesystem::remove(tmp, ignore);
        throw;
    }
}

inline void write_config(const std::filesystem::path& file, const nn::ModelConfig& c, const nn::Structure& s,
                         DType dtype, const json& compression = nullptr) {
    ordered_json j = to_json(c, s, dtype);
    if (!compression.is_null()) j["mopt_compression"] = ordered_json::parse(compression.dump());
    write_text_atomic(file, j.dump(2) + "\n");
}

}  // namespace detail::hf

// Reads a config.json: sizes into ModelConfig, the structure they need into Structure.
inline HfConfig read_hf_config(const std::filesystem::path& config_json) {
    namespace hf = detail::hf;
    std::error_code ec;
    check(std::filesystem::is_regular_file(config_json, ec), hf::where(config_json),
          ": no such file (or not a regular file)");
    const auto size = std::filesystem::file_size(config_json, ec);
    check(!ec, hf::where(config_json), ": cannot read its size: ", ec.message());
    check(size <= 16u << 20, hf::where(config_json), ": ", size, " bytes is too large for a config");
    std::ifstream in(config_json, std::ios::binary);
    check(in.good(), hf::where(config_json), ": cannot open: ", std::strerror(errno));
    std::string text(static_cast<std::size_t>(size), '\0');
    in.read(text.data(), static_cast<std::streamsize>(size));
    check(static_cast<std::uint64_t>(in.gcount()) == size, hf::where(config_json), ": could not read ", size, " bytes");
    nlohmann::json j;
    try {
        j = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception& e) {
        throw Error(mopt::detail::concat(hf::where(config_json), ": invalid JSON: ", e.what()));
    }
    return hf::parse(j, config_json);
}

// Writes config.json (atomically) for a model of structure `s` with numbers `c`: LlamaForCausalLM or
// MixtralForCausalLM where the structure is theirs, MoptForCausalLM otherwise.
inline void write_hf_config(const std::filesystem::path& config_json, const nn::ModelConfig& c,
                            const nn::Structure& s) {
    detail::hf::write_config(config_json, c, s, DType::f32);
}

}  // namespace mopt::io
