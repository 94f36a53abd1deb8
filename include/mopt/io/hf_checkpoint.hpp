#pragma once
// Hugging Face checkpoints for nn::Transformer: a folder with config.json and model.safetensors (or
// model.safetensors.index.json and its shards), as save_pretrained writes them.
//
//   using Mixtral = nn::Transformer<nn::Llama, nn::SwitchFFN<nn::TopK, nn::EveryLayer, nn::SwiGLU>>;
//   auto model = io::load_hf<Mixtral>("models/mixtral-tiny");
//   io::save_hf(model, "out/mixtral-tiny", DType::bf16);
//
// load_hf checks that the file's structure is the type's (config.json names an architecture; see
// hf_config.hpp), builds Model(config, seed) and overwrites every parameter with the tensor of the
// same (Hugging Face) name. A missing tensor, an extra one, or a shape that differs is a mopt::Error
// naming the file, the tensor and both shapes: a checkpoint either loads exactly or not at all.
// bf16/f16 files are widened to f32 on reading (exact).
//
// A compressed model (compress/compress_model.hpp) saves its packed projections as the tensors of
// their packed format (name.qweight, name.scales, …; only F32 and I32) and describes them in
// config.json under "mopt_compression": {"recipe": {…}, "layers": {name: format metadata}}. Such a
// checkpoint loads only into a type whose Compression slot compresses (compress::Any, Prune<…>, …);
// compress::None refuses it with a message saying so.
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <system_error>
#include <vector>

#include <nlohmann/json.hpp>

#include "mopt/autodiff/parameter.hpp"
#include "mopt/compress/packed_weight.hpp"
#include "mopt/nn/linear.hpp"
#include "mopt/nn/linear_role.hpp"
#include "mopt/error.hpp"
#include "mopt/io/hf_config.hpp"
#include "mopt/io/safetensors.hpp"
#include "mopt/nn/config.hpp"
#include "mopt/tensor/tensor.hpp"

namespace mopt::io {

namespace detail::hf {

inline constexpr const char* weights_file = "model.safetensors";
inline constexpr const char* index_file = "model.safetensors.index.json";

// The tensors of a checkpoint folder and where each came from (for messages).
struct Weights {
    SafetensorsFile file;
    std::filesystem::path source;                // model.safetensors or the index
    std::map<std::string, std::string> shard_of;  // tensor -> shard file name (sharded only)

    // "safetensors 'dir/model-00002-of-00002.safetensors' (index 'dir/model.safetensors.index.json')"
    [[nodiscard]] std::string where(const std::string& tensor) const {
        if (shard_of.empty()) return "safetensors " + quoted(source);
        const auto it = shard_of.find(tensor);
        if (it == shard_of.end()) return "safetensors index " + quoted(source);
        return "safetensors " + quoted(source.parent_path() / it->second) + " (index " + quoted(source) + ")";
    }
    [[nodiscard]] std::int64_t total_elements() const {
        std::int64_t n = 0;
        for (const auto& [name, t] : file.tensors) n += t.numel();
        return n;
    }
};

// model.safetensors where it exists (transformers looks there first too), else the sharded index.
inline Weights read_weights(const std::filesystem::path& dir) {
    Weights w;
    std::error_code ec;
    const auto single = dir / weights_file, index = dir / index_file;
    if (std::filesystem::exists(single, ec)) {
        w.source = single;
        w.file = read_safetensors(single);
        return w;
    }
    check(std::filesystem::exists(index, ec), "checkpoint folder ", quoted(dir), ": neither ", weights_file,
          " nor ", index_file, " exists");
    w.source = index;
    w.file = read_safetensors_index(index);
    // The reader has validated the index; read it again only to name shards in messages.
    std::ifstream in(index, std::ios::binary);
    const auto j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
    if (j.is_object() && j.contains("weight_map") && j["weight_map"].is_object())
        for (const auto& e : j["weight_map"].items())
            if (e.value().is_string()) w.shard_of[e.key()] = e.value().get<std::string>();
    return w;
}

// The aspects in which the file's structure and the type's differ, each side in its own words;
// empty when they compute the same function.
inline std::string structure_difference(const HfConfig& file, const nn::Structure& type) {
    const nn::Structure& f = file.structure;
    if (same_computation(f, type)) return "";
    std::string have, want;
    const auto add = [&](const std::string& a, const std::string& b) {
        have += (have.empty() ? "" : ", ") + a;
        want += (want.empty() ? "" : ", ") + b;
    };
    if (f.norm != type.norm) add(f.norm, type.norm);
    if (f.learned_positions != type.learned_positions)
        add(f.learned_positions ? "learned positions" : "rotary positions",
            type.learned_positions ? "learned positions" : "rotary positions");
    if (ffn_description(f) != ffn_description(type)) add(ffn_description(f), ffn_description(type));
    std::string msg = file.architecture + " is " + have + " but the type is " + want;
    if (f.ffn == "SwitchFFN" && type.ffn == "SwitchFFN" && f.routing == "TopK" && type.routing == "Top1")
        msg += " (Hugging Face Mixtral renormalises the chosen experts' weights even for k = 1, which is TopK's "
               "rule; Top1 scales by the router probability as Switch Transformers do)";
    return msg;
}

// Parameters a model of these numbers and this structure holds (what Transformer allocates), in
// floating point so that absurd sizes cannot wrap.
inline double expected_parameters(const nn::ModelConfig& c, const nn::Structure& s) {
    const auto d = static_cast<double>(c.d_model), hd = static_cast<double>(c.head_dim());
    const double norm = s.norm == "LayerNorm" ? 2 * d : d;
    const double attn = 2 * d * static_cast<double>(c.n_heads) * hd + 2 * d * static_cast<double>(c.kv_heads()) * hd;
    const double mlp = (s.activation == "SwiGLU" ? 3 : 2) * d * static_cast<double>(c.d_ff);
    const auto layers = static_cast<double>(c.n_layers);
    double expert_layers = 0;
    if (s.ffn == "SwitchFFN") expert_layers = s.expert_interval == 2 ? std::floor(layers / 2) : layers;
    const auto E = static_cast<double>(c.num_experts);
    double n = static_cast<double>(c.vocab_size) * d * (c.tie_embeddings ? 1 : 2) + norm;
    if (s.learned_positions) n += static_cast<double>(c.max_seq) * d;
    n += layers * (2 * norm + attn) + (layers - expert_layers) * mlp + expert_layers * E * (d + mlp);
    return n;
}

}  // namespace detail::hf

// Loads a Hugging Face checkpoint folder into a Model (an nn::Transformer type); see the file comment.
template <class Model>
Model load_hf(const std::filesystem::path& dir) {
    namespace hf = detail::hf;
    const auto config_path = dir / "config.json";
    const HfConfig cfg = read_hf_config(config_path);
    const nn::Structure type = Model::structure();
    const std::string diff = hf::structure_difference(cfg, type);
    check(diff.empty(), hf::where(config_path), ": ", diff);

    const hf::Weights w = hf::read_weights(dir);
    nn::ModelConfig c = cfg.config;
    // A config with absurd sizes must not make us allocate them: the weights the file really holds
    // bound what the model may be (with slack, so that the per-tensor checks below name a single
    // wrong tensor instead).
    const double expected = hf::expected_parameters(c, type);
    const auto held = static_cast<double>(w.total_elements());
    check(expected <= 2 * held + (1 << 20), hf::where(config_path), ": the sizes there make a model of ", expected,
          " parameters but ", w.where(""), " holds only ", held, " values; config and weights do not match");

    Model model = [&] {
        try {
            return Model(c, 0);
        } catch (const Error& e) {
            throw Error(mopt::detail::concat(hf::where(config_path), ": ", e.what()));
        }
    }();

    std::set<std::string> used;
    if (!cfg.compression.is_null()) {
        const std::string recipe = cfg.compression.contains("recipe") && cfg.compression["recipe"].is_object()
                                       ? cfg.compression["recipe"].value("description", std::string("compressed"))
                                       : std::string("compressed");
        if constexpr (!Model::Compression::compresses) {
            throw Error(mopt::detail::concat(hf::where(config_path), ": the checkpoint is compressed (", recipe,
                                             "); load it into a model whose Compression slot compresses, such as "
                                             "compress::Any, not ", Model::Compression::name));
        } else {
            check(cfg.compression.contains("layers") && cfg.compression["layers"].is_object(), hf::where(config_path),
                  ": mopt_compression has no 'layers' object");
            const nlohmann::json& layers = cfg.compression["layers"];
            std::set<std::string> packed_layers;
            const auto get = [&](const std::string& n) -> const Tensor* {
                const auto it = w.file.tensors.find(n);
                if (it == w.file.tensors.end()) return nullptr;
                used.insert(n);
                return &it->second;
            };
            model.visit_linears([&](nn::Linear& lin, nn::LinearRole) {
                const std::string& wn = lin.weight.name();
                const std::string prefix = wn.substr(0, wn.size() - 7);  // without ".weight"
                if (!layers.contains(prefix)) return;
                try {
                    lin.pack(compress::PackedWeight::from_tensors(layers[prefix], get, prefix));
                } catch (const Error& e) {
                    throw Error(mopt::detail::concat(w.where(prefix), ": ", e.what()));
                }
                packed_layers.insert(prefix);
            });
            model.set_compression_recipe(cfg.compression.value("recipe", nlohmann::json(nullptr)));
            for (const auto& item : layers.items())
                check(packed_layers.count(item.key()) == 1, hf::where(config_path), ": mopt_compression names layer '",
                      item.key(), "', which is not a projection of ", type.describe());
        }
    }
    std::vector<std::string> missing;
    std::string missing_first;
    model.visit_parameters([&](autodiff::Parameter& p) {
        const auto it = w.file.tensors.find(p.name());
        if (it == w.file.tensors.end()) {
            if (missing.empty())
                missing_first = mopt::detail::concat(w.where(p.name()), ": tensor '", p.name(), "' is missing (", type.describe(),
                                               " expects shape ", p.shape(), ")");
            missing.push_back(p.name());
            return;
        }
        const Tensor& t = it->second;
        check(t.dtype() == DType::f32, w.where(p.name()), ": tensor '", p.name(), "' is ", name(t.dtype()),
              ", not a floating-point weight");
        check(t.shape() == p.shape(), w.where(p.name()), ": tensor '", p.name(), "' has shape ", t.shape(),
              " but the model expects ", p.shape());
        p.value().copy_from(t);
        used.insert(p.name());
    });
    if (!missing.empty()) {
        std::string more;
        if (missing.size() > 1) more = mopt::detail::concat(" and ", missing.size() - 1, " more tensors are missing");
        throw Error(missing_first + more);
    }

    std::vector<std::string> extra;
    for (const auto& [n, t] : w.file.tensors) {
        if (used.count(n)) continue;
        // Some older transformers versions saved the rotary tables; they are recomputed here.
        if (n.ends_with(".rotary_emb.inv_freq")) continue;
        if (n == "lm_head.weight" && c.tie_embeddings) {
            const Tensor& embed = w.file.tensors.at("model.embed_tokens.weight");
            bool equal = t.dtype() == DType::f32 && t.shape() == embed.shape();
            for (std::int64_t i = 0; equal && i < t.numel(); ++i) equal = t.f32()[i] == embed.f32()[i];
            check(equal, w.where(n), ": tensor 'lm_head.weight' differs from 'model.embed_tokens.weight' but ",
                  "config.json has tie_word_embeddings = true (one matrix for both)");
            continue;
        }
        extra.push_back(n);
    }
    if (!extra.empty()) {
        const Tensor& t = w.file.tensors.at(extra.front());
        std::string more;
        if (extra.size() > 1) more = mopt::detail::concat(" (and ", extra.size() - 1, " more unexpected tensors)");
        throw Error(mopt::detail::concat(w.where(extra.front()), ": unexpected tensor '", extra.front(), "' of shape ",
                                   t.shape(), ": not a parameter of ", type.describe(), more));
    }
    return model;
}

// Writes config.json and model.safetensors into `dir` (created if needed), each atomically, the
// weights stored as `on_disk` (f32, bf16 or f16; rounded to nearest even).
template <class Model>
void save_hf(Model& model, const std::filesystem::path& dir, DType on_disk = DType::f32) {
    namespace hf = detail::hf;
    check(on_disk == DType::f32 || on_disk == DType::bf16 || on_disk == DType::f16, "save_hf ", hf::quoted(dir),
          ": weights are stored as f32, bf16 or f16, not ", name(on_disk));
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    check(!ec, "save_hf: cannot create the folder ", hf::quoted(dir), ": ", ec.message());
    std::map<std::string, Tensor> tensors;
    model.visit_parameters([&](autodiff::Parameter& p) {
        const bool fresh = tensors.emplace(p.name(), p.value()).second;
        check(fresh, "save_hf ", hf::quoted(dir), ": two parameters are named '", p.name(), "'");
    });
    // Packed projections: their format's tensors (f32 and i32, kept exactly whatever on_disk says).
    nlohmann::json layers = nlohmann::json::object();
    std::set<std::string> keep_f32;
    model.visit_linears([&](nn::Linear& lin, nn::LinearRole) {
        if (!lin.is_packed()) return;
        const std::string& wn = lin.weight.name();
        const std::string prefix = wn.substr(0, wn.size() - 7);
        for (auto& [n, t] : lin.packed->to_tensors(prefix)) {
            check(t.dtype() == DType::i32 || t.dtype() == DType::f32, "save_hf: packed tensor '", n, "' is ", name(t.dtype()));
            check(tensors.emplace(n, t).second, "save_hf ", hf::quoted(dir), ": two tensors are named '", n, "'");
            keep_f32.insert(n);
        }
        layers[prefix] = lin.packed->meta();
    });
    nlohmann::json compression = nullptr;
    if (!layers.empty()) {
        compression = nlohmann::json::object();
        compression["recipe"] = model.compression_recipe();
        compression["layers"] = layers;
    }
    // transformers refuses safetensors files without format "pt" in their metadata.
    write_safetensors(dir / hf::weights_file, tensors, on_disk, {{"format", "pt"}}, keep_f32);
    hf::write_config(dir / "config.json", model.config(), Model::structure(), on_disk, compression);
}

}  // namespace mopt::io
