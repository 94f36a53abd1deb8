#pragma once
// Prompt tuning: a frozen (possibly compressed) language model, and a prompt — a soft prompt
// (Lester et al. 2021), a prompt injected at layer L_int, or a Mixture of Prompts with its gate
// (Dun et al. 2024, Alg. 1) — that is the ONLY thing trained. Xu et al. ("Compress, Then Prompt",
// 2023) show such a prompt wins back much of the quality compression lost; they pick the prompt of
// the best validation perplexity, as this loop does.
//
//   model.set_trainable(false)          the model's weights: no gradients, no optimizer state
//   steps [0, G)                        optional gate pretraining (MoP, domain labels): cross-entropy
//                                       of gate_logits [B, E] against the expert of each window's
//                                       domain (one-to-one: domain d -> expert_of_domain[d], default d);
//                                       only the gate's parameters move, at a constant gate_lr
//   steps [G, G + S)                    joint training: the next-token loss on the text positions (LM;
//                                       with a teacher (1 − w)·LM + w·KD, below)
//                                       + aux_loss_coef · out.aux_loss (a Switch model's load balance),
//                                       AdamW (no weight decay by default) with linear warmup and
//                                       cosine decay (train/schedule.hpp), clipping by global norm
//   every eval_every joint steps        validation perplexity (eval/corpus_perplexity.hpp, which runs
//                                       the model's forward, prompt included); the best prompt is kept
//   the end                             the best prompt is put back into the model
//
// Knowledge distillation (Hinton et al. 2015): with a teacher — usually the dense model the student
// was compressed from — and kd_weight w > 0 the joint objective is (1 − w)·LM + w·KD, KD the
// soft-target cross-entropy of the student's text logits against the teacher's (τ² · Σ −p log q,
// autodiff/ops/distill.hpp) on the positions the LM loss counts. The teacher sees the text alone
// (no prompt); the student's forward returns logits of its text positions only, so row (b, t) of
// both is the same token. Validation and the choice of the best prompt stay on LM perplexity.
//
// With a run folder the loop writes log.csv (step, phase, lr, loss, aux_loss, grad_norm, val_loss,
// val_ppl; kd_loss after them when distilling) and crash-safe checkpoints (train/checkpoint.hpp) of
// the prompt, the best prompt so far, both optimizers and the step; running again resumes exactly
// where it stopped (same batches, same moments, same best). A non-finite loss stops the run with an
// error naming the step.
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "mopt/autodiff/ops.hpp"
#include "mopt/autodiff/tape.hpp"
#include "mopt/data/batches.hpp"
#include "mopt/eval/corpus_perplexity.hpp"
#include "mopt/train/adamw.hpp"
#include "mopt/train/checkpoint.hpp"
#include "mopt/train/csv_log.hpp"
#include "mopt/train/grad_clip.hpp"
#include "mopt/train/progress.hpp"
#include "mopt/train/schedule.hpp"

namespace mopt::train {

// The prompt's parameters (prompt rows, and for MoP the gate), in the policy's visit order;
// with trainable_only = false also the frozen ones (MoP's input prompt P¹).
template <class Model>
[[nodiscard]] std::vector<autodiff::Parameter*> prompt_parameters(Model& model, bool trainable_only = true) {
    std::vector<autodiff::Parameter*> out;
    model.prompt().visit([&](autodiff::Parameter& p) {
        if (!trainable_only || p.trainable()) out.push_back(&p);
    });
    return out;
}

// A MixtureOfPrompts gate weight ("gate.w1", "gate.w2"): what gate pretraining trains.
[[nodiscard]] inline bool is_gate_parameter(const autodiff::Parameter& p) {
    return p.name().find("gate") != std::string::npos;
}

[[nodiscard]] inline std::int64_t count_values(const std::vector<autodiff::Parameter*>& params) {
    std::int64_t n = 0;
    for (const auto* p : params) n += p->numel();
    return n;
}

// Freezes the model's own weights and checks that only prompt parameters are left trainable.
template <class Model>
void freeze_model(Model& model) {
    model.set_trainable(false);
    model.visit_parameters([](autodiff::Parameter& p) {
        check(!p.trainable(), "prompt tuning: model parameter '", p.name(), "' is still trainable after set_trainable(false)");
    });
}

// A distillation teacher: the logits [B, T, V] of a batch's ids [B, T] (the text, no prompt),
// computed without gradients. Any callable will do; teacher_of wraps a model.
using Teacher = std::function<Tensor(const Tensor& ids)>;

// The teacher that runs `model` (forward alone, no tape recording gradients). The model is held by
// reference and must outlive the Teacher; it may be of another type than the student (e.g. the
// dense model of a compressed student), as long as it reads the same token ids.
template <class Model>
[[nodiscard]] Teacher teacher_of(Model& model) {
    auto tape = std::make_shared<autodiff::Tape>();
    return [&model, tape](const Tensor& ids) {
        autodiff::NoGrad no_grad;
        tape->reset();
        return model.forward(*tape, ids).logits.value().clone();  // the tape's arena is reused next call
    };
}

struct PromptStepOptions {
    float clip = 1.0f;             // max global gradient norm (0: no clipping)
    float aux_loss_coef = 0.0f;    // weight of out.aux_loss (Switch load balance) in the objective
    const Teacher* teacher = nullptr;  // knowledge distillation (joint phase), used when kd_weight > 0
    float kd_weight = 0.0f;        // w: objective (1 − w)·LM + w·KD
    float kd_temperature = 1.0f;   // τ of the KD loss
    bool gate_phase = false;       // gate pretraining: cross-entropy on gate_logits vs the domain's expert
    const std::vector<std::int32_t>* expert_of_domain = nullptr;  // gate phase; null or empty: domain d -> expert d
};

struct PromptStepResult {
    double loss = 0.0;       // next-token loss on the text (joint) or gate cross-entropy (gate phase)
    double aux = 0.0;        // out.aux_loss (0 when the model has none)
    double kd = 0.0;         // the distillation loss (0 when kd_weight is 0)
    double grad_norm = 0.0;  // before clipping
    std::int64_t tokens = 0;
};

namespace detail {
template <class Out>
autodiff::Var gate_logits_of(const Out& out) {
    if constexpr (requires { out.gate_logits; }) return out.gate_logits;
    else return {};
}
// gate targets [B]: the expert assigned to each window's domain.
inline Tensor gate_targets(const data::Batch& batch, std::int64_t experts, const std::vector<std::int32_t>* map) {
    const std::int64_t B = batch.size();
    Tensor t = Tensor::empty({B}, DType::i32);
    for (std::int64_t b = 0; b < B; ++b) {
        const std::int32_t d = batch.domains.data<std::int32_t>()[b];
        std::int32_t e = d;
        if (map != nullptr && !map->empty()) {
            check(d >= 0 && static_cast<std::size_t>(d) < map->size(), "gate pretraining: domain ", d,
                  " has no expert in expert_of_domain (", map->size(), " entries)");
            e = (*map)[static_cast<std::size_t>(d)];
        }
        check(e >= 0 && e < experts, "gate pretraining: domain ", d, " maps to expert ", e, " but the gate has ", experts,
              " experts; give at least as many experts as domains or an expert_of_domain map");
        t.data<std::int32_t>()[b] = e;
    }
    return t;
}
}  // namespace detail

// One update of the prompt on `batch`. `opt` holds the parameters this phase trains (all trainable
// prompt parameters, or only the gate's in the gate phase); `all` is every prompt parameter, whose
// gradients are cleared first (the gate loss also reaches prompt rows that the gate phase leaves
// alone). `step` (1-based) names the step in errors.
template <class Model, class Optimizer>
PromptStepResult prompt_step(Model& model, autodiff::Tape& tape, const data::Batch& batch,
                             const std::vector<autodiff::Parameter*>& all, Optimizer& opt,
                             const PromptStepOptions& o, std::int64_t step) {
    for (auto* p : all) p->zero_grad();
    tape.reset();
    nn::ForwardOutput out = model.forward(tape, batch.ids, {.targets = &batch.targets});
    PromptStepResult r;
    r.tokens = batch.ids.numel();
    r.aux = out.aux_loss.defined() ? out.aux_loss.item() : 0.0;
    autodiff::Var objective;
    if (o.gate_phase) {
        const autodiff::Var logits = detail::gate_logits_of(out);
        check(logits.defined(), "prompt tuning: gate pretraining needs a Mixture of Prompts (the model's "
                                "forward returns no gate_logits)");
        const Tensor targets = detail::gate_targets(batch, logits.value().dim(1), o.expert_of_domain);
        objective = autodiff::cross_entropy(logits, targets);
        r.loss = objective.item();
    } else {
        r.loss = out.loss.item();
        objective = out.loss;
        if (o.kd_weight > 0.0f) {
            check(o.teacher != nullptr && *o.teacher, "prompt tuning: kd_weight = ", o.kd_weight, " needs a teacher");
            const Tensor teacher_logits = (*o.teacher)(batch.ids);
            const autodiff::Var kd = autodiff::soft_cross_entropy(
                out.logits, teacher_logits, {.temperature = o.kd_temperature, .targets = &batch.targets});
            r.kd = kd.item();
            objective = o.kd_weight == 1.0f ? kd
                                            : autodiff::add(autodiff::scale(out.loss, 1.0f - o.kd_weight),
                                                            autodiff::scale(kd, o.kd_weight));
        }
        if (o.aux_loss_coef != 0.0f && out.aux_loss.defined())
            objective = autodiff::add(objective, autodiff::scale(out.aux_loss, o.aux_loss_coef));
    }
    check(std::isfinite(r.loss) && std::isfinite(r.aux) && std::isfinite(r.kd), "prompt tuning: step ", step, ": the ",
          o.gate_phase ? "gate" : "training", " loss is ", r.loss, " (aux ", r.aux, ", kd ", r.kd,
          "); lower the learning rate or lengthen the warmup");
    tape.backward(objective);
    r.grad_norm = o.clip > 0.0f ? clip_grad_norm(opt.parameters(), o.clip) : 0.0;
    opt.step();
    return r;
}

struct PromptTuningOptions {
    std::int64_t steps = 1000;                // S: joint training steps
    std::int64_t gate_pretrain_steps = 0;     // G: gate pretraining steps before them (MoP only)
    float lr = 1e-2f;                         // peak learning rate of the prompt
    float gate_lr = 0.0f;                     // gate pretraining learning rate (0: lr)
    std::int64_t warmup = 0;                  // linear warmup steps of the joint phase
    float min_lr_ratio = 0.1f;                // cosine decay to min_lr_ratio · lr at the last step
    float weight_decay = 0.0f;                // AdamW decoupled decay of the prompt
    float clip = 1.0f;                        // gradient clipping by global norm (0: none)
    float aux_loss_coef = 0.0f;               // weight of the Switch load-balancing loss
    Teacher teacher;                          // knowledge distillation: the teacher's logits (teacher_of)
    float kd_weight = 0.0f;                   // w in [0, 1]: objective (1 − w)·LM + w·KD (0: LM only, no teacher run)
    float kd_temperature = 1.0f;              // τ > 0 of the KD loss
    std::vector<std::int32_t> expert_of_domain;  // gate pretraining: domain -> expert (empty: identity)
    std::int64_t eval_every = 100;            // joint steps between validations (and at the last step)
    std::int64_t eval_batches = 0;            // validation batches per check (0: the whole split)
    bool restore_best = true;                 // put the best validation prompt back at the end
    std::filesystem::path run_dir;            // log.csv and checkpoints/; empty: neither (no resume)
    std::int64_t ckpt_every = 100;            // steps between checkpoints (and at the end)
    int keep = 2;                             // checkpoints kept
    std::int64_t log_every = 10;              // steps between log rows and progress lines (off a terminal)
    nlohmann::json identity = nlohmann::json::object();  // a checkpoint resumes only with the same identity
    std::int64_t stop_after = 0;              // checkpoint and return after this many steps of this call (0: never)
    const std::atomic<bool>* stop = nullptr;  // checkpoint and return when it turns true (a signal handler)
    bool show_progress = true;
    std::FILE* progress_out = stderr;
};

struct PromptTuningResult {
    std::int64_t steps_done = 0;      // G + S when finished
    bool finished = false;            // false: stopped early (stop_after / stop), resumable
    std::int64_t resumed_from = 0;    // the step a checkpoint put the run at
    std::int64_t best_step = -1;      // the step of the best validation perplexity (-1: none measured)
    double best_val_ppl = std::numeric_limits<double>::quiet_NaN();
    double last_val_ppl = std::numeric_limits<double>::quiet_NaN();
    double last_loss = std::numeric_limits<double>::quiet_NaN();     // next-token (LM) loss of the last step
    double last_kd_loss = std::numeric_limits<double>::quiet_NaN();  // its distillation loss (when kd_weight > 0)
    std::int64_t trainable_params = 0;
    double seconds = 0.0;
    std::vector<std::pair<std::int64_t, double>> validation;  // (step, val ppl) measured in this call
};

// Trains the prompt of `model` on `train` (batches in order from the start of epoch 0, resumed at
// the step reached), validating on `validation` (may be null: no validation, the last prompt is kept).
template <class Model>
PromptTuningResult tune_prompt(Model& model, data::Batches& train, data::Batches* validation,
                               const PromptTuningOptions& o) {
    namespace fs = std::filesystem;
    check(o.steps >= 0 && o.gate_pretrain_steps >= 0 && o.steps + o.gate_pretrain_steps > 0,
          "prompt tuning: steps = ", o.steps, " and gate_pretrain_steps = ", o.gate_pretrain_steps,
          " must be non-negative and not both 0");
    check(o.eval_every > 0, "prompt tuning: eval_every = ", o.eval_every, " must be positive");
    check(o.ckpt_every > 0 && o.log_every > 0, "prompt tuning: ckpt_every and log_every must be positive");
    check(o.kd_weight >= 0.0f && o.kd_weight <= 1.0f, "prompt tuning: kd_weight = ", o.kd_weight, " must be in [0, 1]");
    check(o.kd_weight == 0.0f || static_cast<bool>(o.teacher), "prompt tuning: kd_weight = ", o.kd_weight,
          " needs a teacher (train::teacher_of(dense_model))");
    check(std::isfinite(o.kd_temperature) && o.kd_temperature > 0.0f, "prompt tuning: kd_temperature = ",
          o.kd_temperature, " must be positive");
    const bool distill = o.kd_weight > 0.0f;
    const std::int64_t G = o.gate_pretrain_steps, total = o.gate_pretrain_steps + o.steps;
    const WarmupCosine schedule{.peak_lr = o.lr, .warmup_steps = o.warmup, .total_steps = std::max<std::int64_t>(o.steps, 1),
                                .min_ratio = o.min_lr_ratio};
    schedule.validate();
    const float gate_lr = o.gate_lr > 0.0f ? o.gate_lr : o.lr;

    freeze_model(model);
    const std::vector<autodiff::Parameter*> params = prompt_parameters(model);
    const std::vector<autodiff::Parameter*> every = prompt_parameters(model, /*trainable_only=*/false);
    check(!params.empty(), "prompt tuning: the model's prompt has no trainable parameters (call init_prompt first)");
    std::vector<autodiff::Parameter*> gate_params;
    for (auto* p : params)
        if (is_gate_parameter(*p)) gate_params.push_back(p);
    check(G == 0 || !gate_params.empty(), "prompt tuning: gate pretraining (", G,
          " steps) needs a Mixture of Prompts; this prompt has no gate");
    AdamW opt(params, {.lr = o.lr, .beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-8f, .weight_decay = o.weight_decay});
    AdamW gate_opt(gate_params, {.lr = gate_lr, .beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-8f, .weight_decay = 0.0f});

    // The best prompt so far travels in the checkpoint as frozen copies named "best.<name>".
    std::vector<autodiff::Parameter> best;
    best.reserve(every.size());
    for (auto* p : every) best.emplace_back("best." + p->name(), p->value().clone(), /*trainable=*/false);
    std::vector<autodiff::Parameter*> saved = every;
    for (auto& b : best) saved.push_back(&b);

    PromptTuningResult r;
    r.trainable_params = count_values(params);
    const fs::path ckpt_dir = o.run_dir.empty() ? fs::path{} : o.run_dir / "checkpoints";
    std::int64_t start = 0;
    if (!ckpt_dir.empty()) {
        if (auto st = load_latest_checkpoint(ckpt_dir, saved, opt, gate_opt)) {
            const nlohmann::json was = st->extra.value("run", nlohmann::json::object());
            for (const auto& [key, value] : o.identity.items())
                check(was.contains(key) && was[key] == value, "prompt tuning: ", key, " is ", value.dump(),
                      " but the run in ", ckpt_dir.string(), " was started with ",
                      was.contains(key) ? was[key].dump() : "no value", "; use the same settings or a fresh folder");
            start = st->step;
            r.best_step = st->extra.value("best_step", std::int64_t{-1});
            if (r.best_step >= 0) r.best_val_ppl = st->extra.at("best_val_ppl").get<double>();
        }
    }
    r.resumed_from = start;
    check(start <= total, "prompt tuning: the checkpoint in ", ckpt_dir.string(), " is at step ", start,
          ", beyond the ", total, " steps asked for");

    std::optional<CsvLog> log;
    if (!o.run_dir.empty()) {
        std::vector<std::string> columns{"step", "phase", "lr", "loss", "aux_loss", "grad_norm", "val_loss", "val_ppl"};
        if (distill) columns.emplace_back("kd_loss");
        log.emplace(o.run_dir / "log.csv", std::move(columns), start > 0 ? start : -1);
    }
    std::optional<Progress> progress;
    if (o.show_progress) progress.emplace(total, start, o.log_every, o.progress_out);
    const auto save = [&](std::int64_t step) {
        if (ckpt_dir.empty()) return;
        nlohmann::json extra{{"run", o.identity}, {"best_step", r.best_step}};
        if (r.best_step >= 0) extra["best_val_ppl"] = r.best_val_ppl;
        save_checkpoint(ckpt_dir, {.step = step, .extra = extra}, saved, o.keep, opt, gate_opt);
    };

    train.seek(start);
    autodiff::Tape tape;
    data::Batch batch;
    const auto t0 = std::chrono::steady_clock::now();
    std::int64_t step = start;
    while (step < total) {
        const bool gate_phase = step < G;
        const float lr = gate_phase ? gate_lr : schedule(step - G);
        (gate_phase ? gate_opt : opt).options().lr = lr;
        train.next_wrapping(batch);
        const PromptStepResult s =
            gate_phase ? prompt_step(model, tape, batch, every, gate_opt,
                                     {.clip = o.clip, .gate_phase = true, .expert_of_domain = &o.expert_of_domain}, step + 1)
                       : prompt_step(model, tape, batch, every, opt,
                                     {.clip = o.clip, .aux_loss_coef = o.aux_loss_coef, .teacher = &o.teacher,
                                      .kd_weight = o.kd_weight, .kd_temperature = o.kd_temperature},
                                     step + 1);
        ++step;
        r.last_loss = s.loss;
        if (distill && !gate_phase) r.last_kd_loss = s.kd;
        if (progress)
            progress->update(step, s.tokens, s.loss,
                             std::string(gate_phase ? "gate " : "") + "lr " + CsvLog::cell(lr) +
                                 (distill && !gate_phase ? " kd " + CsvLog::cell(s.kd) : std::string()));
        std::string val_loss, val_ppl;
        if (validation != nullptr && !gate_phase && ((step - G) % o.eval_every == 0 || step == total)) {
            const eval::CorpusPerplexity v = eval::corpus_perplexity(model, *validation, o.eval_batches);
            r.last_val_ppl = v.ppl();
            r.validation.emplace_back(step, v.ppl());
            val_loss = CsvLog::cell(v.nll / static_cast<double>(v.tokens));
            val_ppl = CsvLog::cell(v.ppl());
            const bool better = r.best_step < 0 || v.ppl() < r.best_val_ppl;
            if (better) {
                r.best_step = step;
                r.best_val_ppl = v.ppl();
                for (std::size_t i = 0; i < every.size(); ++i) best[i].value().copy_from(every[i]->value());
            }
            if (progress)
                progress->message("step " + std::to_string(step) + ": validation ppl " + val_ppl +
                                  (better ? " (best)" : " (best " + CsvLog::cell(r.best_val_ppl) + " at step " +
                                                            std::to_string(r.best_step) + ")"));
        }
        if (log && (step % o.log_every == 0 || !val_ppl.empty() || step == total)) {
            std::vector<std::string> cells{std::to_string(step), gate_phase ? "gate" : "prompt", CsvLog::cell(lr),
                                           CsvLog::cell(s.loss), CsvLog::cell(s.aux), CsvLog::cell(s.grad_norm),
                                           val_loss, val_ppl};
            if (distill) cells.push_back(gate_phase ? std::string() : CsvLog::cell(s.kd));
            log->row(cells);
        }
        const bool stopping = (o.stop_after > 0 && step - start >= o.stop_after) || (o.stop != nullptr && o.stop->load());
        if (step % o.ckpt_every == 0 || step == total || stopping) save(step);
        if (stopping && step < total) {
            r.steps_done = step;
            r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            return r;
        }
    }
    r.steps_done = step;
    r.finished = true;
    if (o.restore_best && r.best_step >= 0)
        for (std::size_t i = 0; i < every.size(); ++i) every[i]->value().copy_from(best[i].value());
    r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return r;
}

}  // namespace mopt::train
