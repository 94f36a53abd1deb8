#pragma once
// Federated prompt tuning, simulated in one process: FedAvg (McMahan et al. 2017) over the trainable
// prompt parameters. FedPrompt (Zhao et al. 2023: a soft or injected prompt, no gate) is the
// baseline; a Mixture of Prompts with its gate (Dun et al. 2024, federated setting) is the method.
//
//   the data    data::skewed_split: N clients (100), each holding one partition of every domain,
//               one of the N partitions of each domain 15x the others (data/federated_split.hpp)
//   a round     C of the N clients (10) are drawn without replacement from (seed, round); each
//               starts from the global prompt, runs S local steps of prompt tuning on its own
//               windows with a fresh AdamW (stateless clients: nothing but the prompt crosses a round),
//               and returns its prompt; the server replaces the global prompt by the FedAvg
//               θ = Σ_k n_k θ_k / Σ_k n_k   (n_k: the client's training windows; or unweighted 1/C)
//   gate        MoP with gate pretraining: in the first gate_rounds rounds the clients train only the
//               gate, on the cross-entropy of gate_logits vs their windows' domain experts
//
// Shape for spreading clients over MPI ranks or GPUs later: a round needs only
//   ClientUpdate run_client(client, const GlobalState&)      — any function object; it must not
//                                                             depend on which clients ran before it
//   fed_avg(updates)                                         — the list of updates, in client order
// so ranks can run disjoint subsets of sample_clients(...) and gather their updates to one root.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "mopt/data/federated_split.hpp"
#include "mopt/train/prompt_tuning.hpp"

namespace mopt::train {

// What the server broadcasts: the trainable parameters' values, in the model's visit order.
struct GlobalState {
    std::int64_t round = 0;          // rounds completed
    std::vector<Tensor> params;
};

// What a client returns after its local steps.
struct ClientUpdate {
    std::int64_t client = 0;
    std::int64_t samples = 0;        // n_k, the FedAvg weight
    std::vector<Tensor> params;      // same order and shapes as GlobalState::params
    double loss = std::numeric_limits<double>::quiet_NaN();  // mean local training loss
};

// FedAvg: θ = Σ_k w_k θ_k with w_k = n_k / Σ n (weighted) or 1 / C. Sums in double, in the order
// of `updates`, so the result does not depend on where the updates were computed.
[[nodiscard]] inline std::vector<Tensor> fed_avg(const std::vector<ClientUpdate>& updates, bool weighted = true) {
    check(!updates.empty(), "fed_avg: no client updates");
    const std::size_t P = updates.front().params.size();
    double total = 0.0;
    for (const ClientUpdate& u : updates) {
        check(u.params.size() == P, "fed_avg: client ", u.client, " sent ", u.params.size(), " tensors, client ",
              updates.front().client, " sent ", P);
        check(!weighted || u.samples > 0, "fed_avg: client ", u.client, " has ", u.samples,
              " samples; a weighted average needs positive counts");
        total += weighted ? static_cast<double>(u.samples) : 1.0;
    }
    std::vector<Tensor> out;
    out.reserve(P);
    for (std::size_t i = 0; i < P; ++i) {
        const Shape& shape = updates.front().params[i].shape();
        std::vector<double> acc(static_cast<std::size_t>(updates.front().params[i].numel()), 0.0);
        for (const ClientUpdate& u : updates) {
            const Tensor& t = u.params[i];
            check(t.shape() == shape, "fed_avg: tensor ", i, " of client ", u.client, " has shape ", t.shape(),
                  ", client ", updates.front().client, "'s has ", shape);
            const double w = (weighted ? static_cast<double>(u.samples) : 1.0) / total;
            const float* v = t.f32();
            for (std::size_t j = 0; j < acc.size(); ++j) acc[j] += w * static_cast<double>(v[j]);
        }
        Tensor avg = Tensor::empty(shape);
        float* a = avg.f32();
        for (std::size_t j = 0; j < acc.size(); ++j) a[j] = static_cast<float>(acc[j]);
        out.push_back(std::move(avg));
    }
    return out;
}

struct FederatedOptions {
    std::int64_t clients = 100;    // N
    std::int64_t active = 10;      // C: clients per round
    std::int64_t rounds = 50;      // R
    bool weighted = true;          // FedAvg weights n_k (false: 1/C)
    std::uint64_t seed = 0;        // client sampling

    void validate() const {
        check(clients >= 1, "federated: clients = ", clients, " must be positive");
        check(active >= 1 && active <= clients, "federated: active clients = ", active, " must lie in [1, clients = ",
              clients, "]");
        check(rounds >= 1, "federated: rounds = ", rounds, " must be positive");
    }
};

// The C clients of round `round` (0-based): distinct, ascending, drawn from (seed, round).
[[nodiscard]] inline std::vector<std::int64_t> sample_clients(const FederatedOptions& o, std::int64_t round) {
    std::vector<std::int64_t> all(static_cast<std::size_t>(o.clients));
    std::iota(all.begin(), all.end(), std::int64_t{0});
    data::detail::shuffle(all, data::detail::mix_seed(o.seed, static_cast<std::uint64_t>(round)));
    all.resize(static_cast<std::size_t>(o.active));
    std::sort(all.begin(), all.end());
    return all;
}

// Rounds global.round .. o.rounds - 1: each runs run_client(c, global) for the round's clients, one
// after another, and averages. on_round(global, updates) after each round (evaluation, logging).
template <class Runner, class OnRound>
GlobalState run_federated(GlobalState global, Runner&& run_client, const FederatedOptions& o, OnRound&& on_round) {
    o.validate();
    std::vector<ClientUpdate> updates;
    while (global.round < o.rounds) {
        updates.clear();
        for (std::int64_t c : sample_clients(o, global.round)) updates.push_back(run_client(c, std::as_const(global)));
        global.params = fed_avg(updates, o.weighted);
        ++global.round;
        on_round(std::as_const(global), std::as_const(updates));
    }
    return global;
}

// ---- Prompt clients ----

struct PromptClientOptions {
    std::int64_t local_steps = 10;     // S
    std::int64_t batch_size = 8;
    float lr = 1e-2f;                  // constant local learning rate
    float clip = 1.0f;
    float aux_loss_coef = 0.0f;
    std::int64_t gate_rounds = 0;      // MoP: the first rounds train only the gate on domain labels
    std::vector<std::int32_t> expert_of_domain;
    std::uint64_t seed = 0;            // local batch order: (seed, client, round)
};

// The clients of a federated prompt-tuning run, all over one model in this process: a call puts the
// global prompt into the model, trains it locally and returns the client's prompt.
template <class Model>
class PromptClients {
public:
    PromptClients(Model& model, const data::Batches& train, data::FederatedSplit split, PromptClientOptions o)
        : model_(&model), train_(&train), split_(std::move(split)), o_(std::move(o)) {
        check(o_.local_steps >= 1, "federated: local_steps = ", o_.local_steps, " must be positive");
        freeze_model(model);
        params_ = prompt_parameters(model);
        every_ = prompt_parameters(model, /*trainable_only=*/false);
        check(!params_.empty(), "federated: the model's prompt has no trainable parameters (call init_prompt first)");
        for (auto* p : params_)
            if (is_gate_parameter(*p)) gate_params_.push_back(p);
        check(o_.gate_rounds == 0 || !gate_params_.empty(), "federated: gate pretraining rounds need a Mixture of Prompts");
    }

    // The model's current prompt as round 0's global state.
    [[nodiscard]] GlobalState initial_state() const {
        GlobalState g;
        for (auto* p : params_) g.params.push_back(p->value().clone());
        return g;
    }
    // Puts a global state's values into the model's prompt.
    void load(const GlobalState& g) {
        check(g.params.size() == params_.size(), "federated: a global state of ", g.params.size(),
              " tensors for a prompt of ", params_.size());
        for (std::size_t i = 0; i < params_.size(); ++i) params_[i]->value().copy_from(g.params[i]);
    }
    [[nodiscard]] std::int64_t trainable_params() const { return count_values(params_); }
    [[nodiscard]] const data::FederatedSplit& split() const { return split_; }

    ClientUpdate operator()(std::int64_t client, const GlobalState& g) {
        check(client >= 0 && client < split_.clients(), "federated: client ", client, " of ", split_.clients());
        load(g);
        const bool gate_phase = g.round < o_.gate_rounds;
        AdamW opt(gate_phase ? gate_params_ : params_,
                  {.lr = o_.lr, .beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-8f, .weight_decay = 0.0f});
        data::SubsetBatches batches(*train_, split_.client_samples[static_cast<std::size_t>(client)], o_.batch_size,
                                    data::detail::mix_seed(data::detail::mix_seed(o_.seed, static_cast<std::uint64_t>(client)),
                                                           static_cast<std::uint64_t>(g.round)));
        const PromptStepOptions so{.clip = o_.clip, .aux_loss_coef = o_.aux_loss_coef, .gate_phase = gate_phase,
                                   .expert_of_domain = &o_.expert_of_domain};
        double loss = 0.0;
        for (std::int64_t s = 0; s < o_.local_steps; ++s) {
            batches.next_wrapping(batch_);
            loss += prompt_step(*model_, tape_, batch_, every_, opt, so, s + 1).loss;
        }
        ClientUpdate u{.client = client, .samples = split_.samples_of(client), .params = {},
                       .loss = loss / static_cast<double>(o_.local_steps)};
        for (auto* p : params_) u.params.push_back(p->value().clone());
        return u;
    }

private:
    Model* model_;
    const data::Batches* train_;
    data::FederatedSplit split_;
    PromptClientOptions o_;
    std::vector<autodiff::Parameter*> params_, every_, gate_params_;
    autodiff::Tape tape_;
    data::Batch batch_;
};

struct FederatedRound {
    std::int64_t round = 0;             // 1-based: rounds completed
    double client_loss = 0.0;           // mean of the clients' mean local losses
    double val_ppl = std::numeric_limits<double>::quiet_NaN();  // when validated this round
};

struct FederatedResult {
    std::vector<FederatedRound> rounds;
    std::int64_t best_round = -1;       // the round of the best validation perplexity (-1: none)
    double best_val_ppl = std::numeric_limits<double>::quiet_NaN();
    std::int64_t trainable_params = 0;
    std::int64_t local_steps_total = 0; // Σ over rounds and clients of local steps
    double seconds = 0.0;
};

// A whole federated run: rounds of PromptClients, validation of the global prompt every eval_every
// rounds (and after the last), the best global prompt put back into the model at the end (the last
// one when validation is null).
template <class Model>
FederatedResult tune_prompt_federated(Model& model, const data::Batches& train, data::Batches* validation,
                                      const data::FederatedSplit& split, const FederatedOptions& fo,
                                      const PromptClientOptions& co, std::int64_t eval_every = 1,
                                      std::int64_t eval_batches = 0, bool show_progress = true,
                                      std::FILE* progress_out = stderr) {
    fo.validate();
    check(eval_every >= 1, "federated: eval_every = ", eval_every, " rounds must be positive");
    check(split.clients() == fo.clients, "federated: the split has ", split.clients(), " clients, the options ", fo.clients);
    PromptClients<Model> clients(model, train, split, co);
    FederatedResult r;
    r.trainable_params = clients.trainable_params();
    std::optional<GlobalState> best;
    std::optional<Progress> progress;
    if (show_progress) progress.emplace(fo.rounds, 0, 1, progress_out);
    const auto t0 = std::chrono::steady_clock::now();
    GlobalState last = run_federated(clients.initial_state(), clients, fo, [&](const GlobalState& g, const std::vector<ClientUpdate>& ups) {
        FederatedRound fr{.round = g.round};
        for (const ClientUpdate& u : ups) fr.client_loss += u.loss / static_cast<double>(ups.size());
        r.local_steps_total += co.local_steps * static_cast<std::int64_t>(ups.size());
        const bool gate_round = g.round <= co.gate_rounds;
        if (validation != nullptr && !gate_round && (g.round % eval_every == 0 || g.round == fo.rounds)) {
            clients.load(g);
            fr.val_ppl = eval::corpus_perplexity(model, *validation, eval_batches).ppl();
            if (r.best_round < 0 || fr.val_ppl < r.best_val_ppl) {
                r.best_round = g.round;
                r.best_val_ppl = fr.val_ppl;
                best = g;
            }
        }
        r.rounds.push_back(fr);
        if (progress) {
            const std::int64_t tokens =
                static_cast<std::int64_t>(ups.size()) * co.local_steps * co.batch_size * train.options().seq_len;
            progress->update(g.round, tokens, fr.client_loss,
                             std::string(gate_round ? "gate " : "") +
                                 (std::isnan(fr.val_ppl) ? std::string{} : "val ppl " + CsvLog::cell(fr.val_ppl)));
        }
    });
    clients.load(best ? *best : last);
    r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return r;
}

}  // namespace mopt::train
