// Hugging Face checkpoints: config.json fields (transformers 4 and 5 spellings, what mopt refuses),
// save → load round trips for Llama, Mixtral and MoptForCausalLM structures in f32/bf16/f16, and
// bad inputs (malformed config, wrong type, missing/extra/misshapen tensors), each an error that
// names the file and the field or tensor.
#include <catch2/catch.hpp>

#include "test_util.hpp"

#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>

#include <mopt/io/hf_checkpoint.hpp>
#include <nlohmann/json.hpp>

using namespace mopt;
namespace fs = std::filesystem;

namespace {

using Llama = nn::Transformer<nn::Llama>;
using Mixtral = nn::Transformer<nn::Llama, nn::SwitchFFN<nn::TopK, nn::EveryLayer, nn::SwiGLU>>;
using SwitchTop1 = nn::Transformer<nn::Llama, nn::SwitchFFN<nn::Top1, nn::EveryLayer, nn::SwiGLU>>;
using SwitchSparse = nn::Transformer<nn::Llama, nn::SwitchFFN<nn::Top1, nn::EveryOtherLayer, nn::SwiGLU>>;
using Gpt = nn::Transformer<nn::GPT>;

const fs::path reference_dir = fs::path(MOPT_SOURCE_DIR) / "tests" / "reference";

using mopt::test::TempDir;

// The message of the mopt::Error that f throws ("" when it does not throw).
template <class F>
std::string error_of(F&& f) {
    try {
        f();
    } catch (const Error& e) {
        return e.what();
    }
    return "";
}

nlohmann::json read_json(const fs::path& p) {
    std::ifstream in(p);
    return nlohmann::json::parse(in);
}
void write_text(const fs::path& p, const std::string& text) {
    std::ofstream out(p, std::ios::binary | std::ios::trunc);
    out << text;
}
std::string read_bytes(const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// A copy of a reference model folder that a test may damage.
fs::path copy_reference(const TempDir& tmp, const std::string& name) {
    const fs::path dst = tmp / name;
    fs::copy(reference_dir / name, dst, fs::copy_options::recursive);
    return dst;
}

// The config.json of llama_gqa with `edit` applied, in its own folder; returns the file.
template <class Edit>
fs::path edited_config(const TempDir& tmp, const std::string& name, Edit&& edit) {
    nlohmann::json j = read_json(reference_dir / "llama_gqa" / "config.json");
    edit(j);
    fs::create_directories(tmp / name);
    const fs::path file = tmp / name / "config.json";
    write_text(file, j.dump(2));
    return file;
}

// logits of a forward pass without gradients. ids: i32 [B, T] -> [B, T, vocab]
template <class Model>
Tensor logits_of(Model& model, const Tensor& ids) {
    autodiff::NoGrad no_grad;
    autodiff::Tape tape;
    return model.forward(tape, ids).logits.value().clone();
}

bool bit_identical(const Tensor& a, const Tensor& b) {
    return a.shape() == b.shape() && a.dtype() == b.dtype() && std::memcmp(a.raw(), b.raw(), a.bytes()) == 0;
}

// Every parameter of `a` equals the one of the same name in `b` after `round` (bit for bit).
template <class ModelA, class ModelB, class Round>
void expect_same_parameters(ModelA& a, ModelB& b, Round&& round) {
    std::map<std::string, Tensor> values;
    b.visit_parameters([&](autodiff::Parameter& p) { values.emplace(p.name(), p.value()); });
    std::size_t n = 0;
    a.visit_parameters([&](autodiff::Parameter& p) {
        INFO(p.name());
        REQUIRE(values.count(p.name()) == 1);
        const Tensor& other = values.at(p.name());
        REQUIRE(other.shape() == p.shape());
        std::int64_t differ = 0;
        for (std::int64_t i = 0; i < p.numel(); ++i)
            differ += std::bit_cast<std::uint32_t>(round(p.value().f32()[i])) !=
                      std::bit_cast<std::uint32_t>(other.f32()[i]);
        CHECK(differ == 0);
        ++n;
    });
    CHECK(n == values.size());
}

// Every parameter redrawn (norm weights around 1, the rest around 0): a fresh model's norm weights
// are all 1, which would hide a loader that skips them.
template <class Model>
void perturb(Model& model, std::uint64_t seed) {
    model.visit_parameters([&](autodiff::Parameter& p) {
        const Tensor r = p.shape().rank() == 1 ? test::random_tensor(p.shape(), seed++, 0.5f, 1.5f)
                                               : test::random_tensor(p.shape(), seed++, -0.3f, 0.3f);
        p.value().copy_from(r);
    });
}

float same(float x) { return x; }
float via_bf16(float x) { return io::bf16_to_f32(io::f32_to_bf16(x)); }
float via_f16(float x) { return io::f16_to_f32(io::f32_to_f16(x)); }

nn::ModelConfig small_config() {
    nn::ModelConfig c;
    c.vocab_size = 40;
    c.d_model = 16;
    c.n_layers = 3;
    c.n_heads = 4;
    c.n_kv_heads = 2;
    c.d_ff = 20;
    c.max_seq = 32;
    c.rope_theta = 500000.0f;
    c.norm_eps = 1e-6f;
    c.bos_id = 3;
    c.eos_id = 4;
    return c;
}
nn::ModelConfig moe_config(std::int64_t k) {
    nn::ModelConfig c = small_config();
    c.num_experts = 4;
    c.experts_per_token = k;
    c.aux_loss_coef = 0.02f;
    return c;
}

// rope: whether rope_theta is part of the model (not with learned positions).
void expect_same_config(const nn::ModelConfig& a, const nn::ModelConfig& b, bool rope = true) {
    CHECK(a.vocab_size == b.vocab_size);
    CHECK(a.d_model == b.d_model);
    CHECK(a.n_layers == b.n_layers);
    CHECK(a.n_heads == b.n_heads);
    CHECK(a.kv_heads() == b.kv_heads());
    CHECK(a.d_ff == b.d_ff);
    CHECK(a.max_seq == b.max_seq);
    if (rope) CHECK(a.rope_theta == b.rope_theta);
    CHECK(a.norm_eps == b.norm_eps);
    CHECK(a.tie_embeddings == b.tie_embeddings);
    CHECK(a.bos_id == b.bos_id);
    CHECK(a.eos_id == b.eos_id);
    CHECK(a.num_experts == b.num_experts);
    if (a.num_experts > 0) {
        CHECK(a.experts_per_token == b.experts_per_token);
        CHECK(a.expert_interval == b.expert_interval);
        CHECK(a.capacity_factor == b.capacity_factor);
        CHECK(a.aux_loss_coef == b.aux_loss_coef);
        CHECK(a.z_loss_coef == b.z_loss_coef);
    }
}

// Saves `model` as `dtype`, loads it back into the same type, and checks the config, the values
// (rounded as the file stores them) and, for f32, that the logits are identical.
template <class Model>
void round_trip(Model& model, DType dtype, const std::string& expected_arch) {
    TempDir tmp;
    const fs::path dir = tmp / "saved";
    io::save_hf(model, dir, dtype);

    // Exactly the two files, no temporaries left behind.
    std::set<std::string> files;
    for (const auto& e : fs::directory_iterator(dir)) files.insert(e.path().filename().string());
    CHECK(files == std::set<std::string>{"config.json", "model.safetensors"});

    const nlohmann::json j = read_json(dir / "config.json");
    CHECK(j["architectures"][0] == expected_arch);
    CHECK(j["dtype"] == (dtype == DType::f32 ? "float32" : dtype == DType::bf16 ? "bfloat16" : "float16"));
    const io::SafetensorsFile raw = io::read_safetensors(dir / "model.safetensors", /*keep_dtype=*/true);
    CHECK(raw.metadata.at("format") == "pt");  // transformers refuses files without it
    CHECK(raw.tensors.count("lm_head.weight") == (model.config().tie_embeddings ? 0u : 1u));
    for (const auto& [name, t] : raw.tensors) CHECK(t.dtype() == dtype);

    Model loaded = io::load_hf<Model>(dir);
    expect_same_config(loaded.config(), model.config(), !Model::structure().learned_positions);
    expect_same_parameters(model, loaded,
                           dtype == DType::f32 ? same : dtype == DType::bf16 ? via_bf16 : via_f16);
    if (dtype == DType::f32) {
        const Tensor ids = test::random_ids({2, 9}, 11, static_cast<std::int32_t>(model.config().vocab_size));
        CHECK(bit_identical(logits_of(model, ids), logits_of(loaded, ids)));
        // Saving what was loaded writes the same bytes.
        io::save_hf(loaded, tmp / "again", dtype);
        CHECK(read_bytes(tmp / "again" / "model.safetensors") == read_bytes(dir / "model.safetensors"));
        CHECK(read_bytes(tmp / "again" / "config.json") == read_bytes(dir / "config.json"));
    } else {
        // A rounded model stores and loads back exactly.
        io::save_hf(loaded, tmp / "again", dtype);
        Model again = io::load_hf<Model>(tmp / "again");
        expect_same_parameters(loaded, again, same);
    }
}

}  // namespace

// ---- config.json -------------------------------------------------------------------------------

TEST_CASE("read_hf_config: the reference configs as transformers 5 wrote them", "[hf]") {
    const io::HfConfig gqa = io::read_hf_config(reference_dir / "llama_gqa" / "config.json");
    CHECK(gqa.architecture == "LlamaForCausalLM");
    CHECK(gqa.structure.norm == "RMSNorm");
    CHECK(gqa.structure.ffn == "DenseFFN");
    CHECK(gqa.structure.activation == "SwiGLU");
    CHECK_FALSE(gqa.structure.learned_positions);
    CHECK(gqa.config.vocab_size == 48);
    CHECK(gqa.config.d_model == 16);
    CHECK(gqa.config.d_ff == 24);
    CHECK(gqa.config.n_layers == 2);
    CHECK(gqa.config.n_heads == 4);
    CHECK(gqa.config.n_kv_heads == 2);
    CHECK(gqa.config.max_seq == 64);
    CHECK(gqa.config.rope_theta == 500000.0f);  // from rope_parameters
    CHECK(gqa.config.norm_eps == 1e-5f);
    CHECK_FALSE(gqa.config.tie_embeddings);
    CHECK(gqa.config.num_experts == 0);
    CHECK(gqa.config.bos_id == 1);
    CHECK(gqa.config.eos_id == 2);

    CHECK(io::read_hf_config(reference_dir / "llama_tied" / "config.json").config.tie_embeddings);

    const io::HfConfig top1 = io::read_hf_config(reference_dir / "mixtral_top1" / "config.json");
    CHECK(top1.architecture == "MixtralForCausalLM");
    CHECK(top1.structure.ffn == "SwitchFFN");
    CHECK(top1.structure.routing == "TopK");  // renormalised even for k = 1
    CHECK(top1.structure.expert_interval == 1);
    CHECK(top1.config.num_experts == 4);
    CHECK(top1.config.experts_per_token == 1);
    CHECK(top1.config.aux_loss_coef == 0.0f);
    CHECK(top1.config.capacity_factor == 0.0f);
    CHECK(top1.config.rope_theta == 10000.0f);
    CHECK(io::read_hf_config(reference_dir / "mixtral_top2" / "config.json").config.experts_per_token == 2);
}

TEST_CASE("read_hf_config: transformers 4 spellings and fields mopt can or cannot honour", "[hf]") {
    TempDir tmp;
    SECTION("top-level rope_theta (transformers 4), head_dim null, eos list, wide sliding window") {
        const auto f = edited_config(tmp, "legacy", [](nlohmann::json& j) {
            j.erase("rope_parameters");
            j["rope_theta"] = 250000;  // an integer is a number too
            j["rope_scaling"] = nullptr;
            j["head_dim"] = nullptr;
            j["eos_token_id"] = {7, 9};
            j["sliding_window"] = 64;
        });
        const io::HfConfig c = io::read_hf_config(f);
        CHECK(c.config.rope_theta == 250000.0f);
        CHECK(c.config.eos_id == 7);
    }
    SECTION("no rope field at all: transformers' default base 10000") {
        const auto f = edited_config(tmp, "norope", [](nlohmann::json& j) { j.erase("rope_parameters"); });
        CHECK(io::read_hf_config(f).config.rope_theta == 10000.0f);
    }
    SECTION("no rope field in a Mixtral config: MixtralConfig's default base 1e6") {
        nlohmann::json j = read_json(reference_dir / "mixtral_top2" / "config.json");
        j.erase("rope_parameters");
        fs::create_directories(tmp / "mixtral");
        write_text(tmp / "mixtral" / "config.json", j.dump());
        CHECK(io::read_hf_config(tmp / "mixtral" / "config.json").config.rope_theta == 1e6f);
    }
    SECTION("no num_key_value_heads: plain multi-head attention") {
        const auto f = edited_config(tmp, "mha", [](nlohmann::json& j) { j.erase("num_key_value_heads"); });
        CHECK(io::read_hf_config(f).config.kv_heads() == 4);
    }
    SECTION("scaled RoPE is refused, naming the file and the field") {
        const auto f = edited_config(tmp, "llama3", [](nlohmann::json& j) {
            j["rope_parameters"] = {{"rope_theta", 500000.0}, {"rope_type", "llama3"}, {"factor", 8.0}};
        });
        const std::string msg = error_of([&] { (void)io::read_hf_config(f); });
        CHECK_THAT(msg, Catch::Contains(f.string()) && Catch::Contains("rope_parameters.rope_type") &&
                            Catch::Contains("llama3"));
        const auto g = edited_config(tmp, "linear", [](nlohmann::json& j) {
            j.erase("rope_parameters");
            j["rope_theta"] = 10000.0;
            j["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}};
        });
        CHECK_THAT(error_of([&] { (void)io::read_hf_config(g); }),
                   Catch::Contains(g.string()) && Catch::Contains("rope_scaling.type") && Catch::Contains("linear"));
    }
    SECTION("partial rotation is refused") {
        const auto f = edited_config(tmp, "partial", [](nlohmann::json& j) {
            j["rope_parameters"]["partial_rotary_factor"] = 0.5;
        });
        CHECK_THAT(error_of([&] { (void)io::read_hf_config(f); }),
                   Catch::Contains(f.string()) && Catch::Contains("rope_parameters.partial_rotary_factor"));
    }
    SECTION("disagreeing rope_theta spellings are an error") {
        const auto f = edited_config(tmp, "twotheta", [](nlohmann::json& j) { j["rope_theta"] = 10000.0; });
        CHECK_THAT(error_of([&] { (void)io::read_hf_config(f); }),
                   Catch::Contains("rope_theta") && Catch::Contains("disagrees"));
    }
    SECTION("head_dim other than hidden_size / heads") {
        const auto f = edited_config(tmp, "headdim", [](nlohmann::json& j) { j["head_dim"] = 8; });
        CHECK_THAT(error_of([&] { (void)io::read_hf_config(f); }),
                   Catch::Contains(f.string()) && Catch::Contains("'head_dim' is 8"));
    }
    SECTION("biases") {
        const auto f = edited_config(tmp, "bias", [](nlohmann::json& j) { j["attention_bias"] = true; });
        CHECK_THAT(error_of([&] { (void)io::read_hf_config(f); }),
                   Catch::Contains(f.string()) && Catch::Contains("attention_bias"));
        const auto g = edited_config(tmp, "mlpbias", [](nlohmann::json& j) { j["mlp_bias"] = true; });
        CHECK_THAT(error_of([&] { (void)io::read_hf_config(g); }), Catch::Contains("mlp_bias"));
    }
    SECTION("hidden_act must be the structure's activation") {
        const auto f = edited_config(tmp, "gelu", [](nlohmann::json& j) { j["hidden_act"] = "gelu"; });
        CHECK_THAT(error_of([&] { (void)io::read_hf_config(f); }),
                   Catch::Contains(f.string()) && Catch::Contains("hidden_act") && Catch::Contains("gelu"));
    }
    SECTION("a sliding window shorter than the context") {
        const auto f = edited_config(tmp, "window", [](nlohmann::json& j) { j["sliding_window"] = 16; });
        CHECK_THAT(error_of([&] { (void)io::read_hf_config(f); }),
                   Catch::Contains(f.string()) && Catch::Contains("sliding_window"));
    }
    SECTION("an architecture mopt does not know") {
        const auto f = edited_config(tmp, "gpt2", [](nlohmann::json& j) { j["architectures"] = {"GPT2LMHeadModel"}; });
        CHECK_THAT(error_of([&] { (void)io::read_hf_config(f); }),
                   Catch::Contains(f.string()) && Catch::Contains("GPT2LMHeadModel"));
    }
}

TEST_CASE("read_hf_config: malformed files, missing fields, wrong types", "[hf]") {
    TempDir tmp;
    SECTION("not JSON") {
        fs::create_directories(tmp / "broken");
        const fs::path f = tmp / "broken" / "config.json";
        write_text(f, "{\"architectures\": [\"LlamaForCausalLM\"], \"hidden_size\": 16,");
        CHECK_THAT(error_of([&] { (void)io::read_hf_config(f); }),
                   Catch::Contains(f.string()) && Catch::Contains("invalid JSON"));
    }
    SECTION("not an object") {
        fs::create_directories(tmp / "array");
        const fs::path f = tmp / "array" / "config.json";
        write_text(f, "[1, 2]");
        CHECK_THAT(error_of([&] { (void)io::read_hf_config(f); }),
                   Catch::Contains(f.string()) && Catch::Contains("not an object"));
    }
    SECTION("no such file") {
        const fs::path f = tmp / "nothing" / "config.json";
        CHECK_THAT(error_of([&] { (void)io::read_hf_config(f); }), Catch::Contains(f.string()));
    }
    SECTION("each required field missing") {
        for (const char* field : {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                  "num_attention_heads", "max_position_embeddings", "rms_norm_eps"}) {
            INFO(field);
            const auto f = edited_config(tmp, std::string("no_") + field, [&](nlohmann::json& j) { j.erase(field); });
            CHECK_THAT(error_of([&] { (void)io::read_hf_config(f); }),
                       Catch::Contains(f.string()) && Catch::Contains(std::string("missing field '") + field + "'"));
        }
    }
    SECTION("wrong types") {
        const auto f = edited_config(tmp, "string", [](nlohmann::json& j) { j["hidden_size"] = "16"; });
        CHECK_THAT(error_of([&] { (void)io::read_hf_config(f); }),
                   Catch::Contains(f.string()) && Catch::Contains("'hidden_size'") && Catch::Contains("not an integer"));
        const auto g = edited_config(tmp, "float", [](nlohmann::json& j) { j["num_hidden_layers"] = 2.5; });
        CHECK_THAT(error_of([&] { (void)io::read_hf_config(g); }), Catch::Contains("'num_hidden_layers'"));
        const auto h = edited_config(tmp, "eps", [](nlohmann::json& j) { j["rms_norm_eps"] = "small"; });
        CHECK_THAT(error_of([&] { (void)io::read_hf_config(h); }),
                   Catch::Contains("'rms_norm_eps'") && Catch::Contains("not a number"));
        const auto i = edited_config(tmp, "tie", [](nlohmann::json& j) { j["tie_word_embeddings"] = 1; });
        CHECK_THAT(error_of([&] { (void)io::read_hf_config(i); }), Catch::Contains("'tie_word_embeddings'"));
        const auto k = edited_config(tmp, "null", [](nlohmann::json& j) { j["vocab_size"] = nullptr; });
        CHECK_THAT(error_of([&] { (void)io::read_hf_config(k); }), Catch::Contains("'vocab_size' is null"));
    }
    SECTION("numbers that cannot form a model") {
        const auto f = edited_config(tmp, "zero", [](nlohmann::json& j) { j["num_hidden_layers"] = 0; });
        CHECK_THAT(error_of([&] { (void)io::read_hf_config(f); }),
                   Catch::Contains(f.string()) && Catch::Contains("num_hidden_layers"));
        const auto g = edited_config(tmp, "kv", [](nlohmann::json& j) { j["num_key_value_heads"] = 3; });
        CHECK_THAT(error_of([&] { (void)io::read_hf_config(g); }), Catch::Contains("n_kv_heads"));
        const auto h = edited_config(tmp, "negkv", [](nlohmann::json& j) { j["num_key_value_heads"] = -2; });
        CHECK_THAT(error_of([&] { (void)io::read_hf_config(h); }), Catch::Contains("num_key_value_heads"));
        nlohmann::json mixtral = read_json(reference_dir / "mixtral_top2" / "config.json");
        mixtral["num_local_experts"] = 0;
        fs::create_directories(tmp / "noexperts");
        write_text(tmp / "noexperts" / "config.json", mixtral.dump());
        CHECK_THAT(error_of([&] { (void)io::read_hf_config(tmp / "noexperts" / "config.json"); }),
                   Catch::Contains("num_local_experts"));
        mixtral.erase("num_local_experts");
        write_text(tmp / "noexperts" / "config.json", mixtral.dump());
        CHECK_THAT(error_of([&] { (void)io::read_hf_config(tmp / "noexperts" / "config.json"); }),
                   Catch::Contains("missing field 'num_local_experts'"));
    }
    SECTION("MoptForCausalLM without or with a bad mopt_structure") {
        const auto f = edited_config(tmp, "mopt", [](nlohmann::json& j) { j["architectures"] = {"MoptForCausalLM"}; });
        CHECK_THAT(error_of([&] { (void)io::read_hf_config(f); }),
                   Catch::Contains(f.string()) && Catch::Contains("mopt_structure"));
        const auto g = edited_config(tmp, "mopt2", [](nlohmann::json& j) {
            j["architectures"] = {"MoptForCausalLM"};
            j["mopt_structure"] = {{"family", "Llama"}, {"norm", "BatchNorm"}, {"learned_positions", false},
                                   {"ffn", "DenseFFN"}, {"activation", "SwiGLU"}};
        });
        CHECK_THAT(error_of([&] { (void)io::read_hf_config(g); }),
                   Catch::Contains("mopt_structure.norm") && Catch::Contains("BatchNorm"));
    }
}

TEST_CASE("write_hf_config → read_hf_config keeps every number and the structure", "[hf]") {
    TempDir tmp;
    SECTION("Llama") {
        nn::ModelConfig c = small_config();
        c.tie_embeddings = true;
        io::write_hf_config(tmp / "config.json", c, Llama::structure());
        const io::HfConfig r = io::read_hf_config(tmp / "config.json");
        CHECK(r.architecture == "LlamaForCausalLM");
        CHECK(r.structure == Llama::structure());
        expect_same_config(r.config, c);
        const auto j = read_json(tmp / "config.json");
        CHECK(j["rope_parameters"]["rope_type"] == "default");
        CHECK(j["rms_norm_eps"].get<double>() == 1e-6);  // shortest decimal, not 9.99999997e-07
        CHECK(j["hidden_act"] == "silu");
    }
    SECTION("Mixtral with capacity or z-loss is MoptForCausalLM") {
        nn::ModelConfig c = moe_config(2);
        io::write_hf_config(tmp / "config.json", c, Mixtral::structure());
        CHECK(io::read_hf_config(tmp / "config.json").architecture == "MixtralForCausalLM");
        c.capacity_factor = 1.5f;
        c.z_loss_coef = 1e-3f;
        io::write_hf_config(tmp / "config.json", c, Mixtral::structure());
        const io::HfConfig r = io::read_hf_config(tmp / "config.json");
        CHECK(r.architecture == "MoptForCausalLM");
        CHECK(r.structure.routing == "TopK");
        expect_same_config(r.config, c);
    }
    SECTION("the structure read back is the one written, for every kind of model") {
        using Custom = nn::Transformer<nn::Family<nn::RMSNorm, nn::Attention<nn::Rotary>, nn::DenseFFN<nn::SwiGLU>>>;
        using GeluSwitch = nn::Transformer<nn::GPT, nn::SwitchFFN<nn::TopK, nn::EveryOtherLayer, nn::GELU>>;
        const auto check_structure = [&](const nn::ModelConfig& c, const nn::Structure& s, const char* arch) {
            INFO(s.describe());
            io::write_hf_config(tmp / "config.json", c, s);
            const io::HfConfig r = io::read_hf_config(tmp / "config.json");
            CHECK(r.structure == s);
            CHECK(r.architecture == arch);
            expect_same_config(r.config, c, !s.learned_positions);
        };
        check_structure(small_config(), Llama::structure(), "LlamaForCausalLM");
        check_structure(small_config(), Gpt::structure(), "MoptForCausalLM");
        check_structure(small_config(), Custom::structure(), "MoptForCausalLM");  // keeps its family name
        check_structure(moe_config(2), Mixtral::structure(), "MixtralForCausalLM");
        check_structure(moe_config(1), SwitchTop1::structure(), "MoptForCausalLM");
        nn::ModelConfig sparse = moe_config(2);
        sparse.expert_interval = 2;
        check_structure(sparse, GeluSwitch::structure(), "MoptForCausalLM");
    }
    SECTION("a structure and numbers that disagree") {
        CHECK_THAT(error_of([&] { io::write_hf_config(tmp / "config.json", moe_config(1), Llama::structure()); }),
                   Catch::Contains("num_experts"));
    }
}

// ---- load_hf: wrong type, wrong tensors --------------------------------------------------------

TEST_CASE("load_hf: every parameter holds the file's tensor (sharded f32, bf16, f16)", "[hf]") {
    const auto expect_values = [](auto& model, const io::SafetensorsFile& file) {
        std::size_t n = 0;
        model.visit_parameters([&](autodiff::Parameter& p) {
            INFO(p.name());
            REQUIRE(file.tensors.count(p.name()) == 1);
            CHECK(bit_identical(p.value(), file.tensors.at(p.name())));
            ++n;
        });
        return n;
    };
    Llama gqa = io::load_hf<Llama>(reference_dir / "llama_gqa");
    const auto gqa_file = io::read_safetensors_index(reference_dir / "llama_gqa" / "model.safetensors.index.json");
    CHECK(expect_values(gqa, gqa_file) == gqa_file.tensors.size());
    Llama tied = io::load_hf<Llama>(reference_dir / "llama_tied");
    const auto tied_file = io::read_safetensors(reference_dir / "llama_tied" / "model.safetensors");
    CHECK(expect_values(tied, tied_file) == tied_file.tensors.size());
    CHECK(tied_file.tensors.count("lm_head.weight") == 0);
    Mixtral top1 = io::load_hf<Mixtral>(reference_dir / "mixtral_top1");
    const auto top1_file = io::read_safetensors(reference_dir / "mixtral_top1" / "model.safetensors");
    CHECK(expect_values(top1, top1_file) == top1_file.tensors.size());
}

TEST_CASE("load_hf: a checkpoint of another structure names what differs", "[hf]") {
    const std::string mixtral_into_llama = error_of([] { (void)io::load_hf<Llama>(reference_dir / "mixtral_top2"); });
    CHECK_THAT(mixtral_into_llama,
               Catch::Contains((reference_dir / "mixtral_top2" / "config.json").string()) &&
                   Catch::Contains("MixtralForCausalLM is SwitchFFN<SwiGLU, TopK, EveryLayer> but the type is "
                                   "DenseFFN<SwiGLU>"));
    const std::string llama_into_mixtral = error_of([] { (void)io::load_hf<Mixtral>(reference_dir / "llama_gqa"); });
    CHECK_THAT(llama_into_mixtral,
               Catch::Contains("config.json") &&
                   Catch::Contains("LlamaForCausalLM is DenseFFN<SwiGLU> but the type is SwitchFFN<SwiGLU, TopK, "
                                   "EveryLayer>"));
    // Hugging Face's top-1 Mixtral renormalises (weight 1): it is TopK, not Switch's Top1.
    const std::string top1 = error_of([] { (void)io::load_hf<SwitchTop1>(reference_dir / "mixtral_top1"); });
    CHECK_THAT(top1, Catch::Contains("TopK") && Catch::Contains("Top1"));
    const std::string gpt = error_of([] { (void)io::load_hf<Gpt>(reference_dir / "llama_gqa"); });
    CHECK_THAT(gpt, Catch::Contains("RMSNorm") && Catch::Contains("LayerNorm") && Catch::Contains("rotary positions"));
}

TEST_CASE("load_hf: missing, extra and misshapen tensors name the file, the tensor and the shapes", "[hf]") {
    TempDir tmp;
    SECTION("bf16 single file") {
        const fs::path dir = copy_reference(tmp, "llama_tied");
        const fs::path file = dir / "model.safetensors";
        io::SafetensorsFile st = io::read_safetensors(file, /*keep_dtype=*/true);
        REQUIRE(st.tensors.begin()->second.dtype() == DType::bf16);
        const auto rewrite = [&](auto&& edit) {
            auto tensors = st.tensors;
            edit(tensors);
            io::write_safetensors(file, tensors, DType::bf16, {{"format", "pt"}});
        };
        SECTION("the unchanged copy loads") { CHECK_NOTHROW(io::load_hf<Llama>(dir)); }
        SECTION("missing") {
            rewrite([](auto& t) { t.erase("model.layers.1.mlp.up_proj.weight"); });
            CHECK_THAT(error_of([&] { (void)io::load_hf<Llama>(dir); }),
                       Catch::Contains(file.string()) && Catch::Contains("'model.layers.1.mlp.up_proj.weight'") &&
                           Catch::Contains("missing") && Catch::Contains("[24, 16]"));
        }
        SECTION("wrong shape") {
            rewrite([](auto& t) {
                t["model.layers.0.self_attn.k_proj.weight"] = Tensor::zeros({8, 16});
            });
            CHECK_THAT(error_of([&] { (void)io::load_hf<Llama>(dir); }),
                       Catch::Contains(file.string()) && Catch::Contains("'model.layers.0.self_attn.k_proj.weight'") &&
                           Catch::Contains("[8, 16]") && Catch::Contains("[16, 16]"));
        }
        SECTION("extra") {
            rewrite([](auto& t) { t["model.layers.0.self_attn.q_proj.bias"] = Tensor::zeros({16}); });
            CHECK_THAT(error_of([&] { (void)io::load_hf<Llama>(dir); }),
                       Catch::Contains(file.string()) && Catch::Contains("unexpected tensor") &&
                           Catch::Contains("'model.layers.0.self_attn.q_proj.bias'"));
        }
        SECTION("an integer tensor where a weight belongs") {
            rewrite([](auto& t) { t["model.norm.weight"] = Tensor::zeros({16}, DType::i32); });
            CHECK_THAT(error_of([&] { (void)io::load_hf<Llama>(dir); }),
                       Catch::Contains("'model.norm.weight'") && Catch::Contains("i32"));
        }
        SECTION("rotary tables of older transformers are ignored") {
            rewrite([](auto& t) { t["model.layers.0.self_attn.rotary_emb.inv_freq"] = Tensor::full({2}, 1.0f); });
            CHECK_NOTHROW(io::load_hf<Llama>(dir));
        }
        SECTION("tied: lm_head.weight may be present when equal to the embedding, not otherwise") {
            Llama reference = io::load_hf<Llama>(dir);
            rewrite([](auto& t) { t["lm_head.weight"] = t.at("model.embed_tokens.weight"); });
            Llama with_head = io::load_hf<Llama>(dir);
            expect_same_parameters(reference, with_head, same);
            rewrite([](auto& t) {
                Tensor other = t.at("model.embed_tokens.weight").clone();
                static_cast<std::uint16_t*>(other.raw())[5] ^= 0x4000;
                t["lm_head.weight"] = other;
            });
            CHECK_THAT(error_of([&] { (void)io::load_hf<Llama>(dir); }),
                       Catch::Contains(file.string()) && Catch::Contains("lm_head.weight") &&
                           Catch::Contains("tie_word_embeddings"));
        }
        SECTION("a config whose sizes the weights cannot back is refused before allocating") {
            nlohmann::json j = read_json(dir / "config.json");
            j["vocab_size"] = 4000000;
            write_text(dir / "config.json", j.dump());
            CHECK_THAT(error_of([&] { (void)io::load_hf<Llama>(dir); }),
                       Catch::Contains("config.json") && Catch::Contains("do not match"));
        }
        SECTION("no weights at all") {
            fs::remove(file);
            CHECK_THAT(error_of([&] { (void)io::load_hf<Llama>(dir); }),
                       Catch::Contains(dir.string()) && Catch::Contains("model.safetensors"));
        }
    }
    SECTION("sharded: the shard and the index are named") {
        const fs::path dir = copy_reference(tmp, "llama_gqa");
        const fs::path shard = dir / "model-00002-of-00002.safetensors";
        io::SafetensorsFile st = io::read_safetensors(shard);
        REQUIRE(st.tensors.count("model.norm.weight") == 1);
        st.tensors["model.norm.weight"] = Tensor::zeros({17});
        io::write_safetensors(shard, st.tensors, DType::f32, {{"format", "pt"}});
        CHECK_THAT(error_of([&] { (void)io::load_hf<Llama>(dir); }),
                   Catch::Contains(shard.string()) && Catch::Contains("model.safetensors.index.json") &&
                       Catch::Contains("'model.norm.weight'") && Catch::Contains("[17]") && Catch::Contains("[16]"));
    }
}

TEST_CASE("load_hf: the size bound equals what Transformer allocates", "[hf]") {
    // The bound that refuses absurd configs before allocating must never refuse a real one.
    nn::ModelConfig c = small_config();
    Llama llama(c);
    CHECK(io::detail::hf::expected_parameters(llama.config(), Llama::structure()) ==
          static_cast<double>(llama.num_parameters()));
    c.tie_embeddings = true;
    Gpt gpt(c);
    CHECK(io::detail::hf::expected_parameters(gpt.config(), Gpt::structure()) ==
          static_cast<double>(gpt.num_parameters()));
    SwitchSparse sparse(moe_config(1));
    CHECK(io::detail::hf::expected_parameters(sparse.config(), SwitchSparse::structure()) ==
          static_cast<double>(sparse.num_parameters()));
    Mixtral mixtral(moe_config(2));
    CHECK(io::detail::hf::expected_parameters(mixtral.config(), Mixtral::structure()) ==
          static_cast<double>(mixtral.num_parameters()));
}

// ---- save_hf → load_hf -------------------------------------------------------------------------

TEST_CASE("save_hf → load_hf: Llama (GQA, untied) in f32 is bit-identical, in bf16/f16 rounded once", "[hf]") {
    Llama model(small_config(), 5);
    perturb(model, 100);
    round_trip(model, DType::f32, "LlamaForCausalLM");
    round_trip(model, DType::bf16, "LlamaForCausalLM");
    round_trip(model, DType::f16, "LlamaForCausalLM");
}

TEST_CASE("save_hf → load_hf: Llama with tied embeddings", "[hf]") {
    nn::ModelConfig c = small_config();
    c.tie_embeddings = true;
    Llama model(c, 6);
    perturb(model, 100);
    round_trip(model, DType::f32, "LlamaForCausalLM");
}

TEST_CASE("save_hf → load_hf: Mixtral top-2", "[hf]") {
    Mixtral model(moe_config(2), 7);
    perturb(model, 100);
    round_trip(model, DType::f32, "MixtralForCausalLM");
    round_trip(model, DType::bf16, "MixtralForCausalLM");
}

TEST_CASE("save_hf → load_hf: Switch Top1 in every other layer with a capacity factor (MoptForCausalLM)", "[hf]") {
    nn::ModelConfig c = moe_config(1);
    c.capacity_factor = 1.25f;
    c.z_loss_coef = 1e-3f;
    SwitchSparse model(c, 8);
    perturb(model, 100);
    round_trip(model, DType::f32, "MoptForCausalLM");
    round_trip(model, DType::f16, "MoptForCausalLM");

    TempDir tmp;
    io::save_hf(model, tmp / "m");
    const auto j = read_json(tmp / "m" / "config.json");
    CHECK(j["mopt_structure"]["routing"] == "Top1");
    CHECK(j["mopt_structure"]["expert_interval"] == 2);
    CHECK(j["capacity_factor"].get<double>() == 1.25);
    CHECK(j["num_local_experts"] == 4);
    // Only layer 1 of 3 holds experts.
    const io::SafetensorsFile st = io::read_safetensors(tmp / "m" / "model.safetensors");
    CHECK(st.tensors.count("model.layers.0.mlp.gate_proj.weight") == 1);
    CHECK(st.tensors.count("model.layers.1.block_sparse_moe.gate.weight") == 1);
    CHECK(st.tensors.count("model.layers.2.block_sparse_moe.gate.weight") == 0);
    // The same file into a type with experts in every layer, or with TopK routing, is refused.
    CHECK_THAT(error_of([&] { (void)io::load_hf<SwitchTop1>(tmp / "m"); }),
               Catch::Contains("EveryOtherLayer") && Catch::Contains("EveryLayer"));
    CHECK_THAT(error_of([&] { (void)io::load_hf<Mixtral>(tmp / "m"); }),
               Catch::Contains("MoptForCausalLM is SwitchFFN<SwiGLU, Top1, EveryOtherLayer>"));
}

TEST_CASE("save_hf → load_hf: a Family of Llama's parts under its own name", "[hf]") {
    using Custom = nn::Transformer<nn::Family<nn::RMSNorm, nn::Attention<nn::Rotary>, nn::DenseFFN<nn::SwiGLU>>>;
    Custom model(small_config(), 10);
    perturb(model, 200);
    round_trip(model, DType::f32, "MoptForCausalLM");
    // It computes what Llama computes, so a Llama type reads it too.
    TempDir tmp;
    io::save_hf(model, tmp / "m");
    Llama as_llama = io::load_hf<Llama>(tmp / "m");
    expect_same_parameters(model, as_llama, same);
}

TEST_CASE("save_hf → load_hf: GPT family (LayerNorm, learned positions, GELU)", "[hf]") {
    Gpt model(small_config(), 9);
    perturb(model, 100);
    round_trip(model, DType::f32, "MoptForCausalLM");
}

TEST_CASE("save_hf: a reference checkpoint saved again loads to the same values and logits", "[hf]") {
    TempDir tmp;
    Mixtral ref = io::load_hf<Mixtral>(reference_dir / "mixtral_top1");
    io::save_hf(ref, tmp / "f16", DType::f16);
    Mixtral back = io::load_hf<Mixtral>(tmp / "f16");
    expect_same_parameters(ref, back, same);  // values were f16 already: storing them again is exact
    const Tensor ids = test::random_ids({1, 7}, 3, 48);
    CHECK(bit_identical(logits_of(ref, ids), logits_of(back, ids)));
    CHECK_THAT(error_of([&] { io::save_hf(ref, tmp / "i32", DType::i32); }),
               Catch::Contains("f32, bf16 or f16"));
}
