// Tests of io/peft.hpp: prompt files in PEFT's prompt-tuning layout (adapter_config.json +
// adapter_model.safetensors with prompt_embeddings [K, d]) and the Mixture-of-Prompts layout;
// bit-identical round trips that carry the file's numbers into the layer, a folder as PEFT writes
// it, and the errors for a wrong model width, a wrong policy and broken files.
#include <catch2/catch.hpp>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>

#include <nlohmann/json.hpp>

#include "test_util.hpp"

using mopt::nn::ModelConfig;
using mopt::nn::Transformer;
using mopt::prompt::PromptConfig;
using namespace mopt::test;

namespace nn = mopt::nn;
namespace prompt = mopt::prompt;
namespace io = mopt::io;

namespace {

template <class P>
using Model = Transformer<nn::Llama, nn::Llama::FFN, mopt::compress::None, P>;

ModelConfig tiny_config(std::int64_t d = 8) {
    ModelConfig c;
    c.vocab_size = 11;
    c.d_model = d;
    c.n_layers = 3;
    c.n_heads = 2;
    c.n_kv_heads = 1;
    c.d_ff = 12;
    c.max_seq = 24;
    return c;
}

template <class P>
Model<P> model_with(const PromptConfig& c, std::int64_t d = 8) {
    Model<P> m(tiny_config(d), 1);
    randomize_matrices(m, 50, 0.5f);
    m.set_trainable(false);
    m.init_prompt(c);
    return m;
}

PromptConfig config(std::int64_t K, std::int64_t inject = 0, std::int64_t experts = 1, std::int64_t input = 0) {
    PromptConfig c;
    c.length = K;
    c.inject_layer = inject;
    c.experts = experts;
    c.input_prompt = input;
    c.gate_dim = 4;
    c.init = prompt::PromptInit::uniform;
    c.seed = 3;
    return c;
}

bool same_bits(const Tensor& a, const Tensor& b) {
    return a.shape() == b.shape() && a.dtype() == b.dtype() && std::memcmp(a.raw(), b.raw(), a.bytes()) == 0;
}

nlohmann::json read_json(const std::filesystem::path& f) {
    std::ifstream in(f);
    return nlohmann::json::parse(in);
}

Tensor logits_of(auto& model, const Tensor& ids) {
    NoGrad no_grad;
    Tape tape;
    return model.forward(tape, ids).logits.value().clone();
}

}  // namespace

TEST_CASE("SoftPrompt files follow PEFT's prompt-tuning layout and round-trip bit for bit", "[prompt]") {
    TempDir dir;
    auto a = model_with<prompt::SoftPrompt>(config(5));
    io::save_prompt(a.prompt(), dir.path);
    CHECK(dir.entries() == 3);  // adapter_config.json, adapter_model.safetensors, mopt_prompt.json; no temporaries

    const nlohmann::json cfg = read_json(dir / "adapter_config.json");
    CHECK(cfg["peft_type"] == "PROMPT_TUNING");
    CHECK(cfg["task_type"] == "CAUSAL_LM");
    CHECK(cfg["num_virtual_tokens"] == 5);
    CHECK(cfg["token_dim"] == 8);
    CHECK(cfg["num_transformer_submodules"] == 1);
    CHECK(cfg["num_attention_heads"] == 2);
    CHECK(cfg["num_layers"] == 3);
    CHECK(cfg["prompt_tuning_init"] == "RANDOM");
    CHECK(cfg["inference_mode"] == true);
    const io::SafetensorsFile st = io::read_safetensors(dir / "adapter_model.safetensors", true);
    REQUIRE(st.tensors.size() == 1);
    CHECK(st.tensors.at("prompt_embeddings").dtype() == DType::f32);
    CHECK(same_bits(st.tensors.at("prompt_embeddings"), a.prompt().prompt.value()));

    // Into a model whose prompt has another length and values: the file's K and rows win.
    auto b = model_with<prompt::SoftPrompt>([] {
        PromptConfig c = config(3);
        c.seed = 99;
        return c;
    }());
    io::load_prompt(b.prompt(), dir.path);
    CHECK(b.prompt().length() == 5);
    CHECK(same_bits(b.prompt().prompt.value(), a.prompt().prompt.value()));
    CHECK(b.prompt().prompt.trainable());
    const Tensor ids = random_ids({2, 4}, 3, 11);
    CHECK(same_bits(logits_of(a, ids), logits_of(b, ids)));
}

TEST_CASE("InjectedPrompt files keep L_int in mopt_prompt.json", "[prompt]") {
    TempDir dir;
    auto a = model_with<prompt::InjectedPrompt>(config(4, 2));
    io::save_prompt(a.prompt(), dir.path);
    const nlohmann::json m = read_json(dir / "mopt_prompt.json");
    CHECK(m["policy"] == "InjectedPrompt");
    CHECK(m["inject_layer"] == 2);
    auto b = model_with<prompt::InjectedPrompt>(config(2, 0));
    io::load_prompt(b.prompt(), dir.path);
    CHECK(b.prompt().inject_layer() == 2);
    CHECK(same_bits(b.prompt().prompt.value(), a.prompt().prompt.value()));
    const Tensor ids = random_ids({2, 4}, 4, 11);
    CHECK(same_bits(logits_of(a, ids), logits_of(b, ids)));

    // A folder as PEFT writes it (its own keys, no mopt_prompt.json) loads; L_int stays the layer's.
    std::filesystem::remove(dir / "mopt_prompt.json");
    nlohmann::json peft = read_json(dir / "adapter_config.json");
    peft["auto_mapping"] = nullptr;
    peft["base_model_name_or_path"] = "some/model";
    peft["num_transformer_submodules"] = nullptr;
    peft["prompt_tuning_init"] = "TEXT";
    peft["prompt_tuning_init_text"] = "Classify:";
    dir.write("adapter_config.json", peft.dump());
    auto c = model_with<prompt::InjectedPrompt>(config(2, 1));
    io::load_prompt(c.prompt(), dir.path);
    CHECK(c.prompt().inject_layer() == 1);
    CHECK(c.prompt().length() == 4);
    CHECK(same_bits(c.prompt().prompt.value(), a.prompt().prompt.value()));
}

TEST_CASE("MixtureOfPrompts files round-trip prompts, gate and numbers bit for bit", "[prompt]") {
    TempDir dir;
    PromptConfig ca = config(6, 1, 3, 2);
    ca.top_k = 2;
    auto a = model_with<prompt::MixtureOfPrompts>(ca);
    a.prompt().set_input_prompt(random_tensor({2, 8}, 8));
    io::save_prompt(a.prompt(), dir.path);
    CHECK(dir.entries() == 2);  // mopt_prompt.json, adapter_model.safetensors
    const io::SafetensorsFile st = io::read_safetensors(dir / "adapter_model.safetensors", true);
    CHECK(st.tensors.size() == 4);
    CHECK(st.metadata.at("format") == "mopt-mixture-of-prompts");
    CHECK(st.tensors.at("gate.w1").shape() == Shape{4, 8});
    CHECK(st.tensors.at("gate.w2").shape() == Shape{3, 4});

    auto b = model_with<prompt::MixtureOfPrompts>(config(2, 0, 2, 0));
    io::load_prompt(b.prompt(), dir.path);
    const PromptConfig& cb = b.prompt().config();
    CHECK(cb.length == 6);
    CHECK(cb.experts == 3);
    CHECK(cb.inject_layer == 1);
    CHECK(cb.gate_dim == 4);
    CHECK(cb.input_prompt == 2);
    CHECK(cb.top_k == 2);
    CHECK(same_bits(b.prompt().prompt.value(), a.prompt().prompt.value()));
    CHECK(same_bits(b.prompt().input_prompt.value(), a.prompt().input_prompt.value()));
    CHECK(same_bits(b.prompt().gate.w1.value(), a.prompt().gate.w1.value()));
    CHECK(same_bits(b.prompt().gate.w2.value(), a.prompt().gate.w2.value()));
    CHECK_FALSE(b.prompt().input_prompt.trainable());
    const Tensor ids = random_ids({2, 4}, 5, 11);
    NoGrad no_grad;
    Tape ta, tb;
    const auto oa = a.forward(ta, ids), ob = b.forward(tb, ids);
    CHECK(same_bits(oa.logits.value(), ob.logits.value()));
    CHECK(same_bits(oa.gate.value(), ob.gate.value()));
}

TEST_CASE("Prompt files: a wrong model, policy or file is an error naming the file", "[prompt]") {
    TempDir soft_dir("mopt-soft"), mop_dir("mopt-mop");
    auto soft = model_with<prompt::SoftPrompt>(config(3));
    auto mop = model_with<prompt::MixtureOfPrompts>(config(4, 1, 2));
    io::save_prompt(soft.prompt(), soft_dir.path);
    io::save_prompt(mop.prompt(), mop_dir.path);
    using Catch::Contains;

    auto wide = model_with<prompt::SoftPrompt>(config(3), 12);
    CHECK_THROWS_WITH(io::load_prompt(wide.prompt(), soft_dir.path),
                      Contains("token_dim 8") && Contains("d_model is 12") && Contains("adapter_config.json"));
    auto wide_mop = model_with<prompt::MixtureOfPrompts>(config(4, 1, 2), 12);
    CHECK_THROWS_WITH(io::load_prompt(wide_mop.prompt(), mop_dir.path),
                      Contains("token_dim 8") && Contains("mopt_prompt.json"));

    CHECK_THROWS_WITH(io::load_prompt(soft.prompt(), mop_dir.path), Contains("no adapter_config.json"));
    CHECK_THROWS_WITH(io::load_prompt(mop.prompt(), soft_dir.path), Contains("holds a SoftPrompt, not a MixtureOfPrompts"));
    auto injected = model_with<prompt::InjectedPrompt>(config(3, 1));
    CHECK_THROWS_WITH(io::load_prompt(injected.prompt(), soft_dir.path),
                      Contains("holds a SoftPrompt, not a InjectedPrompt"));

    // Broken files.
    nlohmann::json cfg = read_json(soft_dir / "adapter_config.json");
    cfg["peft_type"] = "LORA";
    soft_dir.write("adapter_config.json", cfg.dump());
    CHECK_THROWS_WITH(io::load_prompt(soft.prompt(), soft_dir.path), Contains("peft_type 'LORA'"));
    cfg["peft_type"] = "PROMPT_TUNING";
    cfg["num_virtual_tokens"] = 4;
    soft_dir.write("adapter_config.json", cfg.dump());
    CHECK_THROWS_WITH(io::load_prompt(soft.prompt(), soft_dir.path),
                      Contains("adapter_model.safetensors") && Contains("'prompt_embeddings' is f32 [3, 8]"));
    std::filesystem::remove(mop_dir / "adapter_model.safetensors");
    CHECK_THROWS_WITH(io::load_prompt(mop.prompt(), mop_dir.path), Contains("adapter_model.safetensors' not found"));
    nlohmann::json mj = read_json(mop_dir / "mopt_prompt.json");
    mj["inject_layer"] = 7;
    mop_dir.write("mopt_prompt.json", mj.dump());
    CHECK_THROWS_WITH(io::load_prompt(mop.prompt(), mop_dir.path),
                      Contains("mopt_prompt.json") && Contains("inject_layer L_int = 7"));
    // The loads that failed left the layers as they were.
    CHECK(soft.prompt().length() == 3);
    CHECK(mop.prompt().config().inject_layer == 1);

    prompt::SoftPrompt::Layer unbuilt;
    CHECK_THROWS_WITH(io::save_prompt(unbuilt, soft_dir.path), Contains("init_prompt"));
}
