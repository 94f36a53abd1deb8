#pragma once
// Prompt files: save_prompt / load_prompt for the three prompt policies.
//
// SoftPrompt and InjectedPrompt use Hugging Face PEFT's prompt-tuning adapter layout, so a prompt
// moves between mopt and PEFT (PeftModel.from_pretrained(model, dir)):
//   adapter_config.json        {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM",
//                               "num_virtual_tokens": K, "token_dim": d,
//                               "num_transformer_submodules": 1, "num_attention_heads": H,
//                               "num_layers": L, "prompt_tuning_init": "RANDOM",
//                               "base_model_name_or_path": null, "inference_mode": true, ...}
//   adapter_model.safetensors  "prompt_embeddings": F32 [K, d]
// adapter_config.json holds PEFT's keys only (older PEFT releases reject unknown keys), and
// prompt_tuning_init is "RANDOM": PEFT's "TEXT" needs the text and a tokenizer path, and the saved
// values replace any init on load anyway. What PEFT has no word for — the policy, L_int (PEFT
// always prompts the input, so an InjectedPrompt with L_int > 0 means something else there) and
// mopt's init — goes into
//   mopt_prompt.json           {"format": "mopt-prompt", "version": 1, "policy": "InjectedPrompt",
//                               "num_virtual_tokens": K, "token_dim": d, "inject_layer": L_int,
//                               "experts": E, "per_expert": p, "gate_dim": d_g, "input_prompt": p₁,
//                               "top_k": k, "init": "vocab", "seed": s}
// A folder written by PEFT (no mopt_prompt.json) loads into a SoftPrompt or an InjectedPrompt (which
// keeps its L_int).
//
// MixtureOfPrompts (no PEFT equivalent): mopt_prompt.json as above (policy "MixtureOfPrompts") and
//   adapter_model.safetensors  "prompt_embeddings" F32 [E·p, d] (expert e: rows e·p..e·p+p−1),
//                              "gate.w1" F32 [d_g, d], "gate.w2" F32 [E, d_g],
//                              "input_prompt" F32 [p₁, d] (only when p₁ > 0)
//                              metadata {"format": "mopt-mixture-of-prompts"}
//
// Files are written atomically (temporary file + rename), tensors first, in f32, so a round trip
// is bit-identical. load_prompt needs a built layer (the model's init_prompt) for the model's
// sizes; the file's numbers (K, L_int, E, ...) replace the layer's, its d_model must match, and
// every mismatch (policy, token_dim, shapes, missing tensors, PEFT task or submodules) is an error
// naming the file.
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>

#include <nlohmann/json.hpp>

#include "mopt/error.hpp"
#include "mopt/io/hf_config.hpp"
#include "mopt/io/safetensors.hpp"
#include "mopt/prompt/injected_prompt.hpp"
#include "mopt/prompt/mixture_of_prompts.hpp"
#include "mopt/prompt/soft_prompt.hpp"

namespace mopt::io {

inline constexpr const char* peft_config_file = "adapter_config.json";
inline constexpr const char* peft_weights_file = "adapter_model.safetensors";
inline constexpr const char* mopt_prompt_file = "mopt_prompt.json";

namespace detail::peft {

inline std::string quoted(const std::filesystem::path& p) { return "'" + p.string() + "'"; }

inline nlohmann::json read_json(const std::filesystem::path& file) {
    check(std::filesystem::is_regular_file(file), "load_prompt: ", quoted(file), " not found");
    std::ifstream in(file, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    nlohmann::json j = nlohmann::json::parse(ss.str(), nullptr, false);
    check(!j.is_discarded() && j.is_object(), "load_prompt: ", quoted(file), " is not a JSON object");
    return j;
}

// An integer field of j, checked to be present and >= lo.
inline std::int64_t int_field(const nlohmann::json& j, const char* key, const std::filesystem::path& file,
                              std::int64_t lo = 0) {
    check(j.contains(key) && j[key].is_number_integer(), "load_prompt: ", quoted(file), " lacks the integer '", key,
          "'");
    const auto v = j[key].get<std::int64_t>();
    check(v >= lo, "load_prompt: ", quoted(file), ": '", key, "' = ", v, " must be >= ", lo);
    return v;
}

inline prompt::PromptInit parse_init(const std::string& s, const std::filesystem::path& file) {
    for (auto i : {prompt::PromptInit::uniform, prompt::PromptInit::vocab, prompt::PromptInit::text})
        if (s == prompt::name(i)) return i;
    throw Error(mopt::detail::concat("load_prompt: ", quoted(file), ": unknown init '", s,
                                     "' (uniform, vocab or text)"));
}

inline nlohmann::json mopt_json(const char* policy, const prompt::PromptConfig& c, std::int64_t d) {
    return {{"format", "mopt-prompt"},        {"version", 1},
            {"policy", policy},               {"num_virtual_tokens", c.length},
            {"token_dim", d},                 {"inject_layer", c.inject_layer},
            {"experts", c.experts},           {"per_expert", c.per_expert()},
            {"gate_dim", c.gate_dim},         {"input_prompt", c.input_prompt},
            {"top_k", c.top_k},               {"init", prompt::name(c.init)},
            {"seed", c.seed}};
}

// The layer's config with the numbers of mopt_prompt.json; checks its policy and token_dim.
inline prompt::PromptConfig read_mopt_json(const std::filesystem::path& file, const char* policy,
                                           prompt::PromptConfig c, std::int64_t d) {
    const nlohmann::json j = read_json(file);
    check(j.value("format", std::string()) == "mopt-prompt", "load_prompt: ", quoted(file),
          " is not a mopt prompt description (format '", j.value("format", std::string()), "')");
    const std::string kind = j.value("policy", std::string());
    check(kind == policy, "load_prompt: ", quoted(file), " holds a ", kind.empty() ? "prompt of no policy" : kind,
          ", not a ", policy);
    const std::int64_t dim = int_field(j, "token_dim", file, 1);
    check(dim == d, "load_prompt: ", quoted(file), " has token_dim ", dim, " but the model's d_model is ", d);
    c.length = int_field(j, "num_virtual_tokens", file, 1);
    c.inject_layer = int_field(j, "inject_layer", file);
    c.experts = int_field(j, "experts", file, 1);
    c.gate_dim = int_field(j, "gate_dim", file, 1);
    c.input_prompt = int_field(j, "input_prompt", file);
    c.top_k = int_field(j, "top_k", file);
    if (j.contains("init") && j["init"].is_string()) c.init = parse_init(j["init"].get<std::string>(), file);
    if (j.contains("seed") && j["seed"].is_number_unsigned()) c.seed = j["seed"].get<std::uint64_t>();
    return c;
}

// tensors[name], checked to be f32 of `shape`.
inline const Tensor& tensor(const SafetensorsFile& f, const std::string& name, const Shape& shape,
                            const std::filesystem::path& file) {
    const auto it = f.tensors.find(name);
    check(it != f.tensors.end(), "load_prompt: ", quoted(file), " has no tensor '", name, "'");
    check(it->second.dtype() == DType::f32 && it->second.shape() == shape, "load_prompt: ", quoted(file), ": '", name,
          "' is ", mopt::name(it->second.dtype()), " ", it->second.shape(), ", expected f32 ", shape);
    return it->second;
}

// A layer of the file's numbers; a config that does not fit the model names the file.
template <class Layer>
Layer build(const prompt::PromptConfig& c, const nn::ModelConfig& model, const std::filesystem::path& file) {
    try {
        return Layer(c, model);
    } catch (const Error& e) {
        throw Error(mopt::detail::concat("load_prompt: ", quoted(file), ": ", e.what()));
    }
}

template <class Layer>
void require_built(const Layer& layer, const char* what) {
    check(layer.prompt.value().defined(), what,
          ": the prompt layer is not built; call the model's init_prompt first (it supplies the model's sizes)");
}

// PEFT files of a single prompt (SoftPrompt, InjectedPrompt).
template <class Layer>
void save_single(const Layer& layer, const char* policy, const std::filesystem::path& dir) {
    require_built(layer, "save_prompt");
    std::filesystem::create_directories(dir);
    const prompt::PromptConfig& c = layer.config();
    const nn::ModelConfig& m = layer.model_config();
    const std::int64_t d = layer.prompt.shape()[1];
    write_safetensors(dir / peft_weights_file, {{"prompt_embeddings", layer.prompt.value()}}, DType::f32,
                      {{"format", "pt"}});
    const nlohmann::ordered_json peft = {
        {"base_model_name_or_path", nullptr},
        {"inference_mode", true},
        {"num_attention_heads", m.n_heads},
        {"num_layers", m.n_layers},
        {"num_transformer_submodules", 1},
        {"num_virtual_tokens", c.length},
        {"peft_type", "PROMPT_TUNING"},
        {"prompt_tuning_init", "RANDOM"},
        {"prompt_tuning_init_text", nullptr},
        {"revision", nullptr},
        {"task_type", "CAUSAL_LM"},
        {"token_dim", d},
        {"tokenizer_name_or_path", nullptr},
    };
    detail::hf::write_text_atomic(dir / peft_config_file, peft.dump(2) + "\n");
    detail::hf::write_text_atomic(dir / mopt_prompt_file, mopt_json(policy, c, d).dump(2) + "\n");
}

template <class Layer>
void load_single(Layer& layer, const char* policy, const std::filesystem::path& dir) {
    require_built(layer, "load_prompt");
    const std::int64_t d = layer.prompt.shape()[1];
    const auto cfg_file = dir / peft_config_file;
    const auto mopt_file = dir / mopt_prompt_file;
    check(std::filesystem::is_regular_file(cfg_file) || !std::filesystem::is_regular_file(mopt_file), "load_prompt: ",
          quoted(dir), " holds ", mopt_prompt_file, " but no ", peft_config_file, " (a MixtureOfPrompts?), not a ",
          policy);
    const nlohmann::json j = read_json(cfg_file);
    check(j.value("peft_type", std::string()) == "PROMPT_TUNING", "load_prompt: ", quoted(cfg_file),
          " has peft_type '", j.value("peft_type", std::string()), "', not PROMPT_TUNING");
    check(j.value("task_type", std::string("CAUSAL_LM")) == "CAUSAL_LM", "load_prompt: ", quoted(cfg_file),
          " has task_type '", j.value("task_type", std::string()), "'; mopt models are causal LMs (CAUSAL_LM)");
    const std::int64_t subs = j.contains("num_transformer_submodules") && !j["num_transformer_submodules"].is_null()
                                  ? int_field(j, "num_transformer_submodules", cfg_file, 1)
                                  : 1;
    check(subs == 1, "load_prompt: ", quoted(cfg_file), " has num_transformer_submodules ", subs,
          " (an encoder-decoder prompt); mopt models have one");
    const std::int64_t dim = int_field(j, "token_dim", cfg_file, 1);
    check(dim == d, "load_prompt: ", quoted(cfg_file), " has token_dim ", dim, " but the model's d_model is ", d);
    prompt::PromptConfig c = layer.config();
    if (std::filesystem::is_regular_file(mopt_file)) c = read_mopt_json(mopt_file, policy, c, d);
    c.length = int_field(j, "num_virtual_tokens", cfg_file, 1);
    Layer loaded = build<Layer>(c, layer.model_config(), mopt_file);
    const auto weights = dir / peft_weights_file;
    check(std::filesystem::is_regular_file(weights), "load_prompt: ", quoted(weights), " not found");
    const SafetensorsFile f = read_safetensors(weights);
    loaded.prompt.value().copy_from(tensor(f, "prompt_embeddings", Shape{c.length, d}, weights));
    layer = std::move(loaded);
}

}  // namespace detail::peft

// ---- SoftPrompt, InjectedPrompt: PEFT layout ----
inline void save_prompt(const prompt::SoftPrompt::Layer& layer, const std::filesystem::path& dir) {
    detail::peft::save_single(layer, prompt::SoftPrompt::name, dir);
}
inline void load_prompt(prompt::SoftPrompt::Layer& layer, const std::filesystem::path& dir) {
    detail::peft::load_single(layer, prompt::SoftPrompt::name, dir);
}
inline void save_prompt(const prompt::InjectedPrompt::Layer& layer, const std::filesystem::path& dir) {
    detail::peft::save_single(layer, prompt::InjectedPrompt::name, dir);
}
inline void load_prompt(prompt::InjectedPrompt::Layer& layer, const std::filesystem::path& dir) {
    detail::peft::load_single(layer, prompt::InjectedPrompt::name, dir);
}

// ---- MixtureOfPrompts: mopt_prompt.json + adapter_model.safetensors ----
inline void save_prompt(const prompt::MixtureOfPrompts::Layer& layer, const std::filesystem::path& dir) {
    using namespace detail::peft;
    require_built(layer, "save_prompt");
    std::filesystem::create_directories(dir);
    const prompt::PromptConfig& c = layer.config();
    const std::int64_t d = layer.prompt.shape()[1];
    std::map<std::string, Tensor> tensors{{"prompt_embeddings", layer.prompt.value()},
                                          {"gate.w1", layer.gate.w1.value()},
                                          {"gate.w2", layer.gate.w2.value()}};
    if (c.input_prompt > 0) tensors.emplace("input_prompt", layer.input_prompt.value());
    write_safetensors(dir / peft_weights_file, tensors, DType::f32, {{"format", "mopt-mixture-of-prompts"}});
    detail::hf::write_text_atomic(dir / mopt_prompt_file, mopt_json(prompt::MixtureOfPrompts::name, c, d).dump(2) + "\n");
}

inline void load_prompt(prompt::MixtureOfPrompts::Layer& layer, const std::filesystem::path& dir) {
    using namespace detail::peft;
    require_built(layer, "load_prompt");
    const std::int64_t d = layer.prompt.shape()[1];
    const auto mopt_file = dir / mopt_prompt_file;
    check(std::filesystem::is_regular_file(mopt_file) || !std::filesystem::is_regular_file(dir / peft_config_file),
          "load_prompt: ", quoted(dir), " holds a PEFT prompt (", peft_config_file, ") but no ", mopt_prompt_file,
          "; a MixtureOfPrompts needs its gate and experts");
    const prompt::PromptConfig c = read_mopt_json(mopt_file, prompt::MixtureOfPrompts::name, layer.config(), d);
    auto loaded = build<prompt::MixtureOfPrompts::Layer>(c, layer.model_config(), mopt_file);
    const auto weights = dir / peft_weights_file;
    check(std::filesystem::is_regular_file(weights), "load_prompt: ", quoted(weights), " not found");
    const SafetensorsFile f = read_safetensors(weights);
    loaded.prompt.value().copy_from(tensor(f, "prompt_embeddings", Shape{c.length, d}, weights));
    loaded.gate.w1.value().copy_from(tensor(f, "gate.w1", Shape{c.gate_dim, d}, weights));
    loaded.gate.w2.value().copy_from(tensor(f, "gate.w2", Shape{c.experts, c.gate_dim}, weights));
    if (c.input_prompt > 0)
        loaded.input_prompt.value().copy_from(tensor(f, "input_prompt", Shape{c.input_prompt, d}, weights));
    layer = std::move(loaded);
}

}  // namespace mopt::io
