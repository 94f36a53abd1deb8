#pragma once
// SwitchFFN policy: a mixture of expert feed-forwards chosen per token by a learned router.
//   Top1 — Switch Transformer (Fedus et al. 2021): p = softmax(router(x)); the token goes to
//          expert i = argmax p and its output is p_i(x) · E_i(x), so the router learns through p_i.
//   TopK — Mixtral (Jiang et al. 2024): the k largest router logits; weights are their softmax,
//          i.e. the top-k probabilities renormalised to sum to 1; k = config.experts_per_token.
// Capacity (Fedus et al. §2.2): each expert takes at most ceil(capacity_factor · N·k / E)
// assignments in token order; an assignment over capacity is dropped, and a token with all its
// assignments dropped passes through the block's residual unchanged. capacity_factor 0 = no limit.
// Load balancing (Fedus et al. eq. 4): α · E · Σ_i f_i · P_i with f_i the fraction of tokens sent
// to expert i (counts / N, before dropping; Σ f = k as in Hugging Face's Mixtral) and P_i the mean
// router probability; optional router z-loss (Zoph et al. 2022) c_z · mean_x logsumexp(logits)².
// Placement: experts in every layer, or in every other layer (layers 1, 3, 5, …) with a dense
// SwiGLU/GELU/ReLU feed-forward of the same activation in the others.
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "mopt/autodiff/ops.hpp"
#include "mopt/nn/config.hpp"
#include "mopt/nn/dense_ffn.hpp"
#include "mopt/nn/linear.hpp"

namespace mopt::nn {

struct Top1 {
    static constexpr const char* name = "Top1";
    static constexpr bool renormalize = false;
};
struct TopK {
    static constexpr const char* name = "TopK";
    static constexpr bool renormalize = true;
};
struct EveryLayer {
    static constexpr const char* name = "EveryLayer";
    static constexpr std::int64_t interval = 1;
};
struct EveryOtherLayer {
    static constexpr const char* name = "EveryOtherLayer";
    static constexpr std::int64_t interval = 2;
};

template <class Routing = Top1, class Placement = EveryLayer, class Act = SwiGLU>
struct SwitchFFN {
    static constexpr const char* name = "SwitchFFN";
    static constexpr bool has_experts = true;
    static constexpr std::int64_t expert_interval = Placement::interval;
    using Activation = Act;
    using RoutingPolicy = Routing;

    struct Layer {
        bool moe = false;
        Mlp<Act> dense;               // layers without experts
        Linear router;                // [E, d_model]
        std::vector<Mlp<Act>> experts;
        std::int64_t layer = 0, top_k = 1;
        float capacity_factor = 0.0f, aux_loss_coef = 0.0f, z_loss_coef = 0.0f;

        Layer() = default;
        // prefix: "model.layers.3"
        Layer(const std::string& prefix, std::int64_t layer_, const ModelConfig& c, std::mt19937_64& rng)
            // The type's Placement decides where experts sit, not config.expert_interval (which
            // only Transformer keeps in step with it): a layer built on its own must not put
            // experts in layer 0 of an EveryOtherLayer model.
            : moe(c.num_experts > 0 && layer_ % Placement::interval == Placement::interval - 1), layer(layer_),
              top_k(c.experts_per_token),
              capacity_factor(c.capacity_factor), aux_loss_coef(c.aux_loss_coef), z_loss_coef(c.z_loss_coef) {
            if (!moe) {
                dense = Mlp<Act>(MlpNames::llama(prefix + ".mlp"), c, rng);
                return;
            }
            router = Linear(prefix + ".block_sparse_moe.gate", c.num_experts, c.d_model, rng);
            for (std::int64_t e = 0; e < c.num_experts; ++e)
                experts.emplace_back(
                    MlpNames::mixtral_expert(prefix + ".block_sparse_moe.experts." + std::to_string(e)), c, rng);
        }

        // x: [B, T, d_model] -> [B, T, d_model]
        Var operator()(Tape& tape, const Var& x, FeedForwardContext& ctx) {
            if (!moe) return dense(tape, x);
            const Shape in_shape = x.shape();
            const std::int64_t d = in_shape.back(), N = in_shape.rows();
            const auto E = static_cast<std::int64_t>(experts.size());
            Var x2 = autodiff::reshape(x, {N, d});
            Var logits = router(tape, x2);          // [N, E]
            Var probs = autodiff::softmax(logits);  // [N, E]

            // Routing: weights [N, k] (differentiable) and the chosen experts [N, k].
            Var weights;
            Tensor chosen;
            if constexpr (Routing::renormalize) {
                autodiff::TopK tk = autodiff::topk(logits, top_k);
                weights = autodiff::softmax(tk.values);
                chosen = tk.indices;
            } else {
                autodiff::TopK tk = autodiff::topk(probs, 1);
                weights = tk.values;
                chosen = tk.indices;
            }
            const std::int64_t k = chosen.dim(1);

            // Dispatch in token order up to each expert's capacity.
            const std::int64_t capacity =
                capacity_factor > 0.0f
                    ? std::max<std::int64_t>(
                          1, static_cast<std::int64_t>(std::ceil(capacity_factor * static_cast<float>(N * k) /
                                                                 static_cast<float>(E))))
                    : N * k;
            // A counting sort by expert, in token order within each expert: one pass counts, one
            // fills; each expert's rows and slots are then contiguous slices of two arena arrays.
            std::vector<std::int64_t> assigned(static_cast<std::size_t>(E), 0), kept(assigned.size(), 0);
            std::int64_t dropped = 0;
            const std::int32_t* idx = chosen.data<std::int32_t>();
            for (std::int64_t a = 0; a < N * k; ++a) {
                const auto e = static_cast<std::size_t>(idx[a]);
                ++assigned[e];
                if (kept[e] < capacity) ++kept[e];
                else ++dropped;
            }
            std::vector<std::int64_t> begin(assigned.size() + 1, 0), fill(assigned.size(), 0);
            for (std::size_t e = 0; e < assigned.size(); ++e) begin[e + 1] = begin[e] + kept[e];
            Tensor all_rows = tape.alloc({std::max<std::int64_t>(begin.back(), 1)}, DType::i32);
            Tensor all_slots = tape.alloc({std::max<std::int64_t>(begin.back(), 1)}, DType::i32);
            for (std::int64_t a = 0; a < N * k; ++a) {
                const auto e = static_cast<std::size_t>(idx[a]);
                if (fill[e] == kept[e]) continue;  // over capacity (dropped above)
                const std::int64_t at = begin[e] + fill[e]++;
                all_rows.data<std::int32_t>()[at] = static_cast<std::int32_t>(a / k);
                all_slots.data<std::int32_t>()[at] = static_cast<std::int32_t>(a);
            }

            // Σ_e scatter(weight · E_e(x_rows)): one gather per busy expert, whose weighted output
            // is added in place into one [N, d] sum (an expert adds only its own rows).
            Var flat_weights = autodiff::reshape(weights, {N * k, 1});
            Var out = tape.constant(tape.zeros({N, d}));
            for (std::size_t e = 0; e < assigned.size(); ++e) {
                if (kept[e] == 0) continue;
                const Tensor row_ids = all_rows.slice(begin[e], begin[e + 1]);
                const Tensor slot_ids = all_slots.slice(begin[e], begin[e + 1]);
                Var y = experts[e](tape, autodiff::gather_rows(x2, row_ids));
                y = autodiff::scale_rows(y, autodiff::gather_rows(flat_weights, slot_ids));
                out = autodiff::scatter_add_rows_into(out, y, row_ids);
            }

            // Statistics and the auxiliary losses.
            ExpertStats s;
            s.layer = layer;
            s.tokens = N;
            s.dropped = dropped;
            std::vector<double> mean_prob(assigned.size(), 0.0);
            double entropy = 0.0;
            const float* p = probs.value().f32();
            for (std::int64_t r = 0; r < N; ++r)
                for (std::int64_t e = 0; e < E; ++e) {
                    const double pe = p[r * E + e];
                    mean_prob[static_cast<std::size_t>(e)] += pe / static_cast<double>(N);
                    if (pe > 0.0) entropy -= pe * std::log(pe) / static_cast<double>(N);
                }
            s.router_entropy = entropy;
            Tensor f = tape.alloc({E});
            for (std::size_t e = 0; e < assigned.size(); ++e) {
                s.fraction.push_back(static_cast<double>(assigned[e]) / static_cast<double>(N * k));
                f.f32()[e] = static_cast<float>(static_cast<double>(assigned[e]) / static_cast<double>(N));
                s.aux_loss += static_cast<double>(E) * f.f32()[e] * mean_prob[e];
            }
            if (probs.requires_grad() && (aux_loss_coef > 0.0f || z_loss_coef > 0.0f)) {
                Var aux;
                if (aux_loss_coef > 0.0f) {
                    Tensor mean_row = tape.alloc({1, N});
                    mean_row.fill(1.0f / static_cast<float>(N));
                    Var P = autodiff::matmul(tape.constant(mean_row), probs);  // [1, E] mean router probability
                    aux = autodiff::scale(autodiff::sum(autodiff::mul(P, tape.constant(f))),
                                          aux_loss_coef * static_cast<float>(E));
                }
                if (z_loss_coef > 0.0f) {
                    Var lse = autodiff::logsumexp(logits);  // [N, 1]
                    Var z = autodiff::scale(autodiff::mean(autodiff::mul(lse, lse)), z_loss_coef);
                    aux = aux.defined() ? autodiff::add(aux, z) : z;
                }
                ctx.aux_loss = ctx.aux_loss.defined() ? autodiff::add(ctx.aux_loss, aux) : aux;
            }
            if (ctx.stats != nullptr) ctx.stats->push_back(std::move(s));
            return autodiff::reshape(out, in_shape);
        }

        template <class F>
        void visit(F&& f) {
            if (!moe) {
                dense.visit(f);
                return;
            }
            router.visit(f);
            for (auto& e : experts) e.visit(f);
        }
        template <class F>
        void visit_linears(F&& f) {
            if (!moe) {
                dense.visit_linears(f, LinearRole::ffn);
                return;
            }
            f(router, LinearRole::router);
            for (auto& e : experts) e.visit_linears(f, LinearRole::expert);
        }
    };
};

}  // namespace mopt::nn
