#pragma once
// import_llama2c: a llama2.c checkpoint (Karpathy's run.c format) as a mopt Transformer.
//
//   auto model = mopt::io::import_llama2c<mopt::nn::Transformer<mopt::nn::Llama>>("stories260K.bin");
//
// The llama2.c tensors map one to one onto the Hugging Face names the Transformer uses:
//   token_embedding -> model.embed_tokens.weight        rms_att -> model.layers.{i}.input_layernorm.weight
//   wq, wk, wv, wo  -> model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
//   rms_ffn         -> model.layers.{i}.post_attention_layernorm.weight
//   w1, w3, w2      -> model.layers.{i}.mlp.{gate,up,down}_proj.weight   (w2(silu(w1 x) * w3 x))
//   rms_final       -> model.norm.weight                 classifier -> lm_head.weight (or tied)
// llama2.c rotates interleaved pairs (2i, 2i+1) of each head; mopt's Attention<Rotary> rotates
// Hugging Face's halves (i, i + Dh/2). Rotating a pair is the same whichever rows hold it, so
// permuting the rows of wq and wk within each head (new row j·Dh/2 + i = old row 2i + j) gives the
// same attention scores — the permutation of Hugging Face's convert_llama_weights_to_hf.py.
#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <map>
#include <string>

#include "mopt/autodiff/parameter.hpp"
#include "mopt/error.hpp"
#include "mopt/io/llama2c.hpp"
#include "mopt/nn/config.hpp"
#include "mopt/tensor/tensor.hpp"

namespace mopt::io {

// The ModelConfig of a llama2.c checkpoint (llama2.c fixes RMSNorm eps 1e-5 and RoPE theta 10000).
inline nn::ModelConfig llama2c_model_config(const Llama2cConfig& c) {
    nn::ModelConfig m;
    m.vocab_size = c.vocab_size;
    m.d_model = c.dim;
    m.d_ff = c.hidden_dim;
    m.n_layers = c.n_layers;
    m.n_heads = c.n_heads;
    m.n_kv_heads = c.n_kv_heads;
    m.max_seq = c.seq_len;
    m.norm_eps = 1e-5f;
    m.rope_theta = 10000.0f;
    m.tie_embeddings = c.shared_classifier;
    m.bos_id = 1;  // llama2.c's tokenizers: 0 <unk>, 1 <s>, 2 </s>
    m.eos_id = 2;
    return m;
}

// Reorders the rows of each head of a query or key projection from interleaved rotary pairs
// (2i, 2i+1) to rotate-half pairs (i, i + head_dim/2): new row j·half + i = old row 2i + j.
// w: [heads · head_dim, in] -> [heads · head_dim, in]
inline Tensor interleaved_to_half_rows(const Tensor& w, std::int64_t heads) {
    check(w.rank() == 2 && heads > 0 && w.dim(0) % heads == 0 && (w.dim(0) / heads) % 2 == 0,
          "interleaved_to_half_rows: cannot split ", w.shape(), " into ", heads, " heads of even size");
    const std::int64_t head_dim = w.dim(0) / heads, half = head_dim / 2, in = w.dim(1);
    Tensor out = Tensor::empty(w.shape());
    for (std::int64_t h = 0; h < heads; ++h)
        for (std::int64_t i = 0; i < half; ++i)
            for (std::int64_t j = 0; j < 2; ++j) {
                const float* src = w.f32() + (h * head_dim + 2 * i + j) * in;
                float* dst = out.f32() + (h * head_dim + j * half + i) * in;
                std::copy_n(src, in, dst);
            }
    return out;
}

// Reads a llama2.c checkpoint into a Model of the Llama structure (RMSNorm, rotary attention,
// dense SwiGLU). A model type of another structure, a truncated or corrupt file: mopt::Error naming
// the file (and the tensor where one is at fault).
template <class Model>
Model import_llama2c(const std::filesystem::path& file) {
    const nn::Structure s = Model::structure();
    check(s.norm == "RMSNorm" && !s.learned_positions && s.ffn == "DenseFFN" && s.activation == "SwiGLU",
          "llama2.c checkpoint ", file, ": llama2.c models are Llama (RMSNorm, rotary, DenseFFN<SwiGLU>) but the "
          "model type is ", s.describe());
    Llama2cCheckpoint ck = load_llama2c(file);
    const Llama2cConfig& c = ck.config;

    // Hugging Face name -> the tensor it takes (wq, wk already in rotate-half order).
    std::map<std::string, Tensor> by_name;
    by_name["model.embed_tokens.weight"] = ck.token_embedding;
    for (std::size_t l = 0; l < ck.layers.size(); ++l) {
        const Llama2cLayer& L = ck.layers[l];
        const std::string p = "model.layers." + std::to_string(l);
        by_name[p + ".input_layernorm.weight"] = L.rms_att;
        by_name[p + ".self_attn.q_proj.weight"] = interleaved_to_half_rows(L.wq, c.n_heads);
        by_name[p + ".self_attn.k_proj.weight"] = interleaved_to_half_rows(L.wk, c.n_kv_heads);
        by_name[p + ".self_attn.v_proj.weight"] = L.wv;
        by_name[p + ".self_attn.o_proj.weight"] = L.wo;
        by_name[p + ".post_attention_layernorm.weight"] = L.rms_ffn;
        by_name[p + ".mlp.gate_proj.weight"] = L.w1;
        by_name[p + ".mlp.up_proj.weight"] = L.w3;
        by_name[p + ".mlp.down_proj.weight"] = L.w2;
    }
    by_name["model.norm.weight"] = ck.rms_final;
    if (!c.shared_classifier) by_name["lm_head.weight"] = ck.classifier;

    Model model(llama2c_model_config(c));
    std::size_t filled = 0;
    model.visit_parameters([&](autodiff::Parameter& p) {
        const auto it = by_name.find(p.name());
        check(it != by_name.end(), "llama2.c checkpoint ", file, ": the model has a parameter ", p.name(),
              " that llama2.c checkpoints do not hold");
        check(it->second.shape() == p.shape(), "llama2.c checkpoint ", file, ": parameter ", p.name(), " has shape ",
              p.shape(), " but the checkpoint gives ", it->second.shape());
        // Owned copies: the tied embedding and classifier of the file share storage.
        p.value().copy_from(it->second);
        ++filled;
    });
    check(filled == by_name.size(), "llama2.c checkpoint ", file, ": ", by_name.size() - filled,
          " of its tensors have no parameter in the model (", filled, " of ", by_name.size(), " were filled)");
    return model;
}

}  // namespace mopt::io
