// examples/model_dispatch.hpp: with_model loads a checkpoint of each supported structure into its own
// compiled type (the same logits as the model saved), a llama2.c .bin into dense Llama, and names an
// unsupported structure; load_tokenizer finds the model's tokenizer and refuses one of another
// vocabulary with a message naming both sizes (a usage error only when the user chose the file).
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <string>
#include <typeindex>
#include <utility>
#include <vector>

#include "../../examples/model_dispatch.hpp"
#include "test_util.hpp"

using namespace mopt;
namespace fs = std::filesystem;

namespace {

const fs::path shared_dir = MOPT_SHARED_DIR;
const fs::path source_dir = MOPT_SOURCE_DIR;

using test::TempDir;

nn::ModelConfig tiny_config(bool experts, std::int64_t vocab = 64) {
    nn::ModelConfig c{.vocab_size = vocab, .d_model = 16, .n_layers = 2, .n_heads = 2, .d_ff = 24, .max_seq = 16};
    if (experts) {
        c.num_experts = 4;
        c.experts_per_token = 1;
    }
    return c;
}

// logits: [1, T, vocab] flattened
template <class Model>
std::vector<float> logits_of(Model& model, const Tensor& ids) {
    autodiff::NoGrad no_grad;
    autodiff::Tape tape;
    const Tensor& l = model.forward(tape, ids).logits.value();
    return {l.f32(), l.f32() + l.numel()};
}

// Saves a random Model, loads it back through with_model and checks the type chosen and the logits.
template <class Model>
void round_trip(const TempDir& tmp, const std::string& name, nn::ModelConfig c) {
    Model original(c, 7);
    original.save(tmp / name);  // f32: bit-identical weights
    const Tensor ids = test::random_ids({1, 9}, 3, static_cast<std::int32_t>(c.vocab_size));
    const std::vector<float> expected = logits_of(original, ids);
    for (const fs::path& path : {tmp / name, tmp / name / "config.json"}) {
        INFO(name << " from " << path);
        const auto [type, logits] = examples::with_model(path, [&](auto& model) {
            using Loaded = std::remove_reference_t<decltype(model)>;
            return std::pair{std::type_index(typeid(Loaded)), logits_of(model, ids)};
        });
        CHECK(type == std::type_index(typeid(Model)));
        CHECK(logits == expected);
    }
}

template <class F>
std::string error_of(F&& f) {
    try {
        f();
    } catch (const std::exception& e) {
        return e.what();
    }
    return "";
}

}  // namespace

TEST_CASE("with_model loads each supported structure into its own type", "[examples][dispatch]") {
    TempDir tmp("mopt-dispatch");
    round_trip<examples::DenseLlama>(tmp, "llama", tiny_config(false));
    round_trip<examples::SwitchEveryOther>(tmp, "switch_every_other", tiny_config(true));
    round_trip<examples::SwitchEveryLayer>(tmp, "switch_every_layer", tiny_config(true));
    nn::ModelConfig top2 = tiny_config(true);
    top2.experts_per_token = 2;
    top2.capacity_factor = 0.0f;  // as Hugging Face's Mixtral: written as MixtralForCausalLM
    round_trip<examples::Mixtral>(tmp, "mixtral", top2);
    round_trip<examples::Gpt>(tmp, "gpt", tiny_config(false));

    // The architecture names written are the ones with_model reads: Llama and Mixtral under Hugging
    // Face's names, the Switch models and GPT as MoptForCausalLM.
    CHECK(io::read_hf_config(tmp / "llama" / "config.json").architecture == "LlamaForCausalLM");
    CHECK(io::read_hf_config(tmp / "mixtral" / "config.json").architecture == "MixtralForCausalLM");
    CHECK(io::read_hf_config(tmp / "gpt" / "config.json").architecture == "MoptForCausalLM");
}

TEST_CASE("with_model reads a llama2.c checkpoint as dense Llama", "[examples][dispatch]") {
    const fs::path bin = shared_dir / "models" / "stories260K.bin";
    if (!fs::exists(bin)) {
        WARN("skipped: " << bin << " is missing");
        return;
    }
    const auto [type, vocab] = examples::with_model(bin, [](auto& model) {
        return std::pair{std::type_index(typeid(std::remove_reference_t<decltype(model)>)), model.config().vocab_size};
    });
    CHECK(type == std::type_index(typeid(examples::DenseLlama)));
    CHECK(vocab == 512);
}

TEST_CASE("with_model names a structure it is not compiled for", "[examples][dispatch]") {
    TempDir tmp("mopt-dispatch");
    examples::Gpt gpt(tiny_config(false), 1);
    gpt.save(tmp / "gpt_moe");
    // The same file, turned into a GPT with Switch layers: a valid config.json, but no compiled type.
    const fs::path config = tmp / "gpt_moe" / "config.json";
    nlohmann::json j = nlohmann::json::parse(std::ifstream(config));
    j["mopt_structure"]["ffn"] = "SwitchFFN";
    j["mopt_structure"]["routing"] = "Top1";
    j["mopt_structure"]["expert_interval"] = 1;
    j["num_local_experts"] = 4;
    j["num_experts_per_tok"] = 1;
    std::ofstream(config) << j.dump(2);
    const std::string msg = error_of([&] { examples::with_model(tmp / "gpt_moe", [](auto&) { return 0; }); });
    CHECK_THAT(msg, Catch::Contains(config.string()) && Catch::Contains("SwitchFFN<GELU, Top1, EveryLayer>") &&
                        Catch::Contains("not compiled for") && Catch::Contains("DenseFFN<GELU>"));

    // A missing path is load_model's error, naming it.
    CHECK_THAT(error_of([&] { examples::with_model(tmp / "nothing", [](auto&) { return 0; }); }),
               Catch::Contains("nothing") && Catch::Contains("does not exist"));
}

TEST_CASE("load_tokenizer finds the model's tokenizer and checks its vocabulary", "[examples][dispatch]") {
    const fs::path sp = source_dir / "models" / "dense-brown" / "tokenizer.model";
    if (!fs::exists(sp)) {
        WARN("skipped: " << sp << " is missing");
        return;
    }
    TempDir tmp("mopt-dispatch");
    const fs::path model = tmp / "model";
    fs::create_directories(model);
    fs::path file;

    // No tokenizer in the folder and no --tokenizer: a usage error that says where it looked.
    CHECK_THROWS_AS(examples::load_tokenizer("", model, 4096, file), cli::UsageError);
    CHECK_THAT(error_of([&] { (void)examples::load_tokenizer("", model, 4096, file); }),
               Catch::Contains("--tokenizer") && Catch::Contains("tokenizer.model"));
    CHECK_THROWS_AS(examples::load_tokenizer((tmp / "absent.model").string(), model, 4096, file), cli::UsageError);

    // The folder's own tokenizer.model is found.
    fs::copy_file(sp, model / "tokenizer.model");
    const data::Tokenizer tok = examples::load_tokenizer("", model, 4096, file);
    CHECK(file == model / "tokenizer.model");
    CHECK(tok.vocab_size() == 4096);
    CHECK(tok.kind() == "sentencepiece");

    // The folder's tokenizer does not fit the model: a file error (exit 1), naming both sizes.
    const std::string bad_folder = error_of([&] { (void)examples::load_tokenizer("", model, 512, file); });
    CHECK_THAT(bad_folder, Catch::Contains("4096") && Catch::Contains("512") && Catch::Contains("tokenizer.model"));
    CHECK_THROWS_AS(examples::load_tokenizer("", model, 512, file), Error);

    // A --tokenizer that does not fit: a usage error naming the flag and both sizes.
    CHECK_THROWS_AS(examples::load_tokenizer(sp.string(), model, 512, file), cli::UsageError);
    CHECK_THAT(error_of([&] { (void)examples::load_tokenizer(sp.string(), model, 512, file); }),
               Catch::Contains("--tokenizer") && Catch::Contains("4096") && Catch::Contains("512"));

    // llama2.c: tok<vocab>.bin next to the .bin model.
    const fs::path bin = shared_dir / "models" / "stories260K.bin";
    if (fs::exists(bin) && fs::exists(shared_dir / "models" / "tok512.bin")) {
        const data::Tokenizer l2 = examples::load_tokenizer("", bin, 512, file);
        CHECK(file == shared_dir / "models" / "tok512.bin");
        CHECK(l2.kind() == "llama2c");
        CHECK(l2.vocab_size() == 512);
    }
}
