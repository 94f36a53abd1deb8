// Writes models saved by mopt (save_hf) with their logits on fixed ids, for
// check_mopt_export.py to load with transformers and compare: the other direction of parity.
//   g++ -std=c++20 -O2 -fopenmp -Iinclude -isystem /usr/include/eigen3 tests/reference/export_for_hf.cpp \
//       -o export_for_hf -lopenblas -lsentencepiece -lsentencepiece_train && ./export_for_hf OUT_DIR
#include <iostream>
#include <map>
#include <random>

#include <mopt/mopt.hpp>

using namespace mopt;

template <class Model>
void export_model(const std::filesystem::path& dir, nn::ModelConfig c, std::uint64_t seed, DType on_disk) {
    Model model(c, seed);
    // Weights with a larger spread than the initialisation, so the logits are far from uniform.
    std::mt19937_64 rng(seed + 1);
    std::normal_distribution<float> normal(0.0f, 0.2f);
    std::uniform_real_distribution<float> norm_weight(0.5f, 1.5f);
    model.visit_parameters([&](autodiff::Parameter& p) {
        for (float& v : p.value().span()) v = p.value().rank() >= 2 ? normal(rng) : norm_weight(rng);
    });
    model.save(dir, on_disk);
    Model loaded = Model::load(dir);  // the weights as stored (rounded to on_disk)
    Tensor ids = Tensor::empty({2, 9}, DType::i32);
    for (std::int32_t i = 0; i < 18; ++i) ids.data<std::int32_t>()[i] = (i * 11 + 3) % static_cast<std::int32_t>(c.vocab_size);
    autodiff::Tape tape;
    autodiff::NoGrad no_grad;
    Tensor targets = nn::next_token_targets(ids);
    nn::ForwardOutput o = loaded.forward(tape, ids, {.targets = &targets});
    Tensor loss = Tensor::empty({1});
    loss.f32()[0] = o.loss.item();
    io::write_safetensors(dir / "mopt_logits.safetensors",
                          {{"input_ids", ids}, {"logits", o.logits.value().clone()}, {"loss", loss}});
    std::cout << dir.string() << ": loss " << o.loss.item() << "\n";
}

int main(int argc, char** argv) {
    const std::filesystem::path out = argc > 1 ? argv[1] : "mopt_export";
    nn::ModelConfig c{.vocab_size = 40, .d_model = 16, .n_layers = 2, .n_heads = 4, .n_kv_heads = 2, .d_ff = 24,
                      .max_seq = 32, .rope_theta = 10000.0f};
    export_model<nn::Transformer<nn::Llama>>(out / "llama_f32", c, 1, DType::f32);
    c.tie_embeddings = true;
    export_model<nn::Transformer<nn::Llama>>(out / "llama_tied_bf16", c, 2, DType::bf16);
    c.tie_embeddings = false;
    c.num_experts = 4;
    c.experts_per_token = 2;
    export_model<nn::Transformer<nn::Llama, nn::SwitchFFN<nn::TopK, nn::EveryLayer>>>(out / "mixtral_top2_f32", c, 3,
                                                                                     DType::f32);
}
