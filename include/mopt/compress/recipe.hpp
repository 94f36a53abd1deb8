#pragma once
// Recipe: what compression does to a model, as a run-time value — an optional pruning step
// (magnitude, Wanda or SparseGPT saliency; unstructured ratio or N:M) followed by an optional
// quantisation step (int8 absmax, RTN or GPTQ at 2–8 bits), applied to the projections of the
// chosen roles (attention, dense FFN and experts by default; routers, embeddings, norms and the
// output head stay dense). The Compression slot's policies (policies.hpp) name a recipe at compile
// time; examples/compress builds one from its flags. A recipe is stored in a compressed
// checkpoint's config.json ("mopt_compression.recipe").
#include <cstdio>
#include <optional>
#include <set>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "mopt/compress/rtn.hpp"
#include "mopt/compress/sparsity.hpp"
#include "mopt/error.hpp"
#include "mopt/nn/linear_role.hpp"

namespace mopt::compress {

enum class Quantizer { none, int8, rtn, gptq };

[[nodiscard]] inline const char* name(Quantizer q) {
    switch (q) {
        case Quantizer::none: return "none";
        case Quantizer::int8: return "int8";
        case Quantizer::rtn: return "rtn";
        case Quantizer::gptq: return "gptq";
    }
    return "?";
}
[[nodiscard]] inline Quantizer parse_quantizer(std::string_view s) {
    for (Quantizer q : {Quantizer::none, Quantizer::int8, Quantizer::rtn, Quantizer::gptq})
        if (s == name(q)) return q;
    throw Error(mopt::detail::concat("unknown quantizer '", s, "' (none, int8, rtn, gptq)"));
}

struct Recipe {
    std::optional<Saliency> prune;  // unset: no pruning
    Sparsity sparsity;              // ratio, or N:M with N zeroed in each group of M
    Quantizer quantizer = Quantizer::none;
    QuantSpec quant;                // bits, group, act_order, damping (rtn, gptq)
    float outlier_threshold = 0.0f; // int8: inputs whose calibration max |x| reaches it stay f32 (0: none)
    double damp = 0.01;             // SparseGPT / GPTQ Hessian dampening (fraction of mean diag)
    std::set<nn::LinearRole> roles{nn::LinearRole::attention, nn::LinearRole::ffn, nn::LinearRole::expert};

    [[nodiscard]] bool empty() const { return !prune && quantizer == Quantizer::none; }
    // Wanda, SparseGPT, GPTQ and int8 outliers read calibration activations.
    [[nodiscard]] bool needs_calibration() const {
        return (prune && *prune != Saliency::magnitude) || quantizer == Quantizer::gptq ||
               (quantizer == Quantizer::int8 && outlier_threshold > 0.0f);
    }

    // Checks the numbers that do not depend on a layer (a layer's width is checked when compressed).
    void validate(const std::string& what = "compression recipe") const {
        check(!empty(), what, ": neither pruning nor quantisation is set");
        check(!roles.empty(), what, ": no layer type selected");
        if (prune) {
            if (sparsity.structured()) {
                check(sparsity.nm_zero >= 1 && sparsity.nm_zero < sparsity.nm_group, what, ": N:M needs 1 <= N < M, got N = ",
                      sparsity.nm_zero, " zeroed of M = ", sparsity.nm_group);
            } else {
                check(sparsity.ratio >= 0.0 && sparsity.ratio < 1.0, what, ": sparsity ", sparsity.ratio,
                      " is outside [0, 1)");
            }
        }
        if (quantizer == Quantizer::rtn || quantizer == Quantizer::gptq)
            check(quant.bits >= 2 && quant.bits <= 8, what, ": ", quant.bits, "-bit quantisation is not supported (2..8)");
        check(damp > 0.0 && std::isfinite(damp), what, ": dampening ", damp, " must be > 0");
    }

    // "sparsegpt 50%", "wanda 2:4 (2 of 4 zeroed)", "gptq int4 g128", "sparsegpt 50% + gptq int4 g128".
    [[nodiscard]] std::string describe() const {
        std::string s;
        if (prune) {
            s = name(*prune);
            if (sparsity.structured())
                s += mopt::detail::concat(" ", sparsity.nm_zero, ":", sparsity.nm_group, " (", sparsity.nm_zero, " of ",
                                          sparsity.nm_group, " zeroed)");
            else
                s += mopt::detail::concat(" ", sparsity.ratio * 100.0, "%");
        }
        if (quantizer != Quantizer::none) {
            if (!s.empty()) s += " + ";
            if (quantizer == Quantizer::int8) {
                s += outlier_threshold > 0.0f ? mopt::detail::concat("int8 (outliers >= ", outlier_threshold, ")") : "int8";
            } else {
                s += mopt::detail::concat(name(quantizer), " int", quant.bits);
                s += quant.group > 0 ? mopt::detail::concat(" g", quant.group) : std::string(" per-row");
                if (quant.act_order) s += " act-order";
            }
        }
        return s.empty() ? "none" : s;
    }

    [[nodiscard]] nlohmann::json to_json() const {
        nlohmann::json j;
        j["prune"] = prune ? name(*prune) : "none";
        j["sparsity"] = sparsity.ratio;
        j["nm_zero"] = sparsity.nm_zero;
        j["nm_group"] = sparsity.nm_group;
        j["quantizer"] = name(quantizer);
        j["bits"] = quant.bits;
        j["group"] = quant.group;
        j["act_order"] = quant.act_order;
        j["outlier_threshold"] = outlier_threshold;
        j["damp"] = damp;
        auto& r = j["roles"] = nlohmann::json::array();
        for (nn::LinearRole role : roles) r.push_back(nn::name(role));
        j["description"] = describe();
        return j;
    }
    // The inverse of to_json (config.json of a compressed checkpoint); `where` names the file.
    static Recipe from_json(const nlohmann::json& j, const std::string& where) {
        check(j.is_object(), where, ": mopt_compression.recipe is not an object");
        Recipe r;
        try {
            const std::string p = j.value("prune", "none");
            if (p != "none") r.prune = parse_saliency(p);
            r.sparsity.ratio = j.value("sparsity", 0.0);
            r.sparsity.nm_zero = j.value("nm_zero", 0);
            r.sparsity.nm_group = j.value("nm_group", 0);
            r.quantizer = parse_quantizer(j.value("quantizer", "none"));
            r.quant.bits = j.value("bits", 4);
            r.quant.group = j.value("group", std::int64_t{128});
            r.quant.act_order = j.value("act_order", false);
            r.outlier_threshold = j.value("outlier_threshold", 0.0f);
            r.damp = j.value("damp", 0.01);
            if (j.contains("roles")) {
                r.roles.clear();
                for (const auto& role : j.at("roles")) r.roles.insert(nn::parse_linear_role(role.get<std::string>()));
            }
        } catch (const nlohmann::json::exception& e) {
            throw Error(mopt::detail::concat(where, ": mopt_compression.recipe: ", e.what()));
        } catch (const Error& e) {
            throw Error(mopt::detail::concat(where, ": mopt_compression.recipe: ", e.what()));
        }
        r.validate(where + ": mopt_compression.recipe");
        return r;
    }
};

}  // namespace mopt::compress
