// Parity with Hugging Face transformers: tiny Llama and Mixtral checkpoints saved by save_pretrained
// (tests/reference/make_hf_reference.py) load with io::load_hf and give transformers' logits and loss
// on the same token ids.
#include <catch2/catch.hpp>

#include "test_util.hpp"

#include <mopt/io/hf_checkpoint.hpp>

namespace {

using namespace mopt;
using Llama = nn::Transformer<nn::Llama>;
using Mixtral = nn::Transformer<nn::Llama, nn::SwitchFFN<nn::TopK, nn::EveryLayer, nn::SwiGLU>>;

const std::string reference_dir = std::string(MOPT_SOURCE_DIR) + "/tests/reference";

struct Parity {
    double logits_rel = 0;  // max |a - b| / max |b|
    double loss_rel = 0;
    double loss = 0, ref_loss = 0;
};

template <class Model>
Parity run_parity(const std::string& name) {
    const io::SafetensorsFile ref = io::read_safetensors(reference_dir + "/reference.safetensors");
    const Tensor& ids = ref.tensors.at("input_ids");
    const Tensor& ref_logits = ref.tensors.at(name + ".logits");
    const Tensor& ref_loss = ref.tensors.at(name + ".loss");
    REQUIRE(ids.dtype() == DType::i32);
    REQUIRE(ids.shape() == Shape{2, 11});

    Model model = io::load_hf<Model>(reference_dir + "/" + name);
    autodiff::NoGrad no_grad;
    autodiff::Tape tape;
    const Tensor targets = nn::next_token_targets(ids);
    nn::ForwardOutput out = model.forward(tape, ids, {.targets = &targets});
    const Tensor& logits = out.logits.value();
    REQUIRE(logits.shape() == ref_logits.shape());

    double max_diff = 0, max_ref = 0;
    for (std::int64_t i = 0; i < logits.numel(); ++i) {
        max_diff = std::max(max_diff, static_cast<double>(std::fabs(logits.f32()[i] - ref_logits.f32()[i])));
        max_ref = std::max(max_ref, static_cast<double>(std::fabs(ref_logits.f32()[i])));
    }
    Parity p;
    p.logits_rel = max_diff / max_ref;
    p.loss = out.loss.value().item();
    p.ref_loss = ref_loss.f32()[0];
    p.loss_rel = std::fabs(p.loss - p.ref_loss) / std::fabs(p.ref_loss);
    return p;
}

template <class Model>
void expect_parity(const std::string& name) {
    const Parity p = run_parity<Model>(name);
    INFO(name << ": logits max|a-b|/max|b| = " << p.logits_rel << ", loss " << p.loss << " vs transformers "
              << p.ref_loss << " (rel " << p.loss_rel << ")");
    CHECK(p.logits_rel <= 1e-4);
    CHECK(p.loss_rel <= 1e-4);
    // Logged so that the numbers appear in the test output.
    WARN(name << ": logits rel " << p.logits_rel << ", loss " << p.loss << " vs " << p.ref_loss << " (rel "
              << p.loss_rel << ")");
}

}  // namespace

TEST_CASE("HF parity: Llama with grouped-query attention, sharded f32, rope_theta 500000", "[hf]") {
    expect_parity<Llama>("llama_gqa");
}

TEST_CASE("HF parity: Llama with tied embeddings, bf16 on disk", "[hf]") { expect_parity<Llama>("llama_tied"); }

TEST_CASE("HF parity: Mixtral top-2, f32", "[hf]") { expect_parity<Mixtral>("mixtral_top2"); }

TEST_CASE("HF parity: Mixtral top-1 (renormalised weight 1), f16 on disk", "[hf]") {
    expect_parity<Mixtral>("mixtral_top1");
}
