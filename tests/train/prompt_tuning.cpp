// Tests of the prompt-tuning loop (train/prompt_tuning.hpp) on tiny random frozen models: only the
// prompt moves, the loss falls, an interrupted run resumes to the same prompt, the best validation
// prompt is put back, gate pretraining trains only the gate, and a non-finite loss names its step.
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <catch2/catch.hpp>

#include "test_util.hpp"
#include <mopt/prompt/mixture_of_prompts.hpp>
#include <mopt/prompt/soft_prompt.hpp>
#include <mopt/train/prompt_tuning.hpp>

using namespace mopt;

namespace {

using SoftModel = nn::Transformer<nn::Llama, nn::DenseFFN<>, compress::None, prompt::SoftPrompt>;
using SwitchSoftModel = nn::Transformer<nn::Llama, nn::SwitchFFN<nn::Top1, nn::EveryLayer>, compress::None, prompt::SoftPrompt>;
using MopModel = nn::Transformer<nn::Llama, nn::DenseFFN<>, compress::None, prompt::MixtureOfPrompts>;

constexpr int symbols = 16;

// Two domains with a pattern each: "abcd..." cycles and "ppqq..." pairs.
data::Corpus pattern_corpus(int docs) {
    data::Corpus c;
    for (int i = 0; i < docs; ++i) {
        c.docs.push_back({"abcdefgabcdefgabcdefgabcdefgabcdefgabcdefg", "cycle", "c" + std::to_string(i)});
        c.docs.push_back({"ppqqrrssppqqrrssppqqrrssppqqrrssppqqrrss", "pairs", "p" + std::to_string(i)});
    }
    c.domains = {"cycle", "pairs"};
    return c;
}

data::Batches batches(int docs, std::uint64_t seed) {
    return data::Batches(pattern_corpus(docs), test::ByteTokenizer{.symbols = symbols},
                         {.batch_size = 4, .seq_len = 12, .seed = seed});
}

// The documents of one domain only (the corpus keeps both domain names).
data::Batches one_domain(const char* domain, int docs, std::uint64_t seed) {
    data::Corpus all = pattern_corpus(docs), c;
    for (const data::Document& d : all.docs)
        if (d.domain == domain) c.docs.push_back(d);
    c.domains = all.domains;
    return data::Batches(c, test::ByteTokenizer{.symbols = symbols}, {.batch_size = 4, .seq_len = 12, .seed = seed});
}

nn::ModelConfig tiny_config(std::int64_t experts = 0) {
    return {.vocab_size = 3 + symbols, .d_model = 16, .n_layers = 2, .n_heads = 2, .d_ff = 32, .max_seq = 24,
            .num_experts = experts, .capacity_factor = 0.0f};
}

template <class Model>
Model tiny_model(prompt::PromptConfig pc, std::int64_t experts = 0) {
    Model m(tiny_config(experts), 11);
    test::randomize_matrices(m, 5, 0.3f);
    m.init_prompt(pc);
    return m;
}

template <class Model>
std::vector<Tensor> model_weights(Model& m) {
    std::vector<Tensor> out;
    m.visit_parameters([&](autodiff::Parameter& p) { out.push_back(p.value().clone()); });
    return out;
}

template <class Model>
std::vector<Tensor> prompt_values(Model& m) {
    std::vector<Tensor> out;
    m.prompt().visit([&](autodiff::Parameter& p) { out.push_back(p.value().clone()); });
    return out;
}

// The largest |a − b| over all values (infinity when the shapes differ).
float max_diff(const std::vector<Tensor>& a, const std::vector<Tensor>& b) {
    if (a.size() != b.size()) return INFINITY;
    float d = 0.0f;
    for (std::size_t i = 0; i < a.size(); ++i) {
        if (a[i].shape() != b[i].shape()) return INFINITY;
        for (std::int64_t j = 0; j < a[i].numel(); ++j) d = std::max(d, std::abs(a[i].f32()[j] - b[i].f32()[j]));
    }
    return d;
}

// The cells of a CSV file as numbers (blank cells as NaN), after the header.
std::vector<std::vector<double>> csv_numbers(const std::filesystem::path& p) {
    std::ifstream in(p);
    std::string line;
    std::getline(in, line);
    std::vector<std::vector<double>> rows;
    while (std::getline(in, line)) {
        std::vector<double> row;
        std::stringstream ss(line);
        for (std::string c; std::getline(ss, c, ',');)
            row.push_back(c.empty() ? NAN : c == "prompt" ? 1.0 : c == "gate" ? 2.0 : std::stod(c));
        rows.push_back(row);
    }
    return rows;
}

bool same(const std::vector<Tensor>& a, const std::vector<Tensor>& b) {
    if (a.size() != b.size()) return false;
    for (std::size_t i = 0; i < a.size(); ++i)
        if (a[i].shape() != b[i].shape() || std::memcmp(a[i].f32(), b[i].f32(), a[i].bytes()) != 0) return false;
    return true;
}

train::PromptTuningOptions quiet(train::PromptTuningOptions o) {
    o.show_progress = false;
    return o;
}

}  // namespace

TEMPLATE_TEST_CASE("Prompt tuning moves only the prompt and lowers the loss", "[train][prompt]", SoftModel,
                   SwitchSoftModel) {
    const bool switch_model = TestType::FFN::has_experts;
    TestType model = tiny_model<TestType>({.length = 4, .init = prompt::PromptInit::uniform, .seed = 1},
                                          switch_model ? 4 : 0);
    const std::vector<Tensor> weights = model_weights(model), prompt0 = prompt_values(model);
    data::Batches train = batches(4, 1), val = batches(2, 2);
    const double before = eval::corpus_perplexity(model, val).ppl();
    const train::PromptTuningResult r = train::tune_prompt(
        model, train, &val,
        quiet({.steps = 40, .lr = 5e-2f, .warmup = 4, .aux_loss_coef = switch_model ? 0.01f : 0.0f, .eval_every = 20}));
    const double after = eval::corpus_perplexity(model, val).ppl();
    INFO("validation ppl " << before << " -> " << after);
    CHECK(r.finished);
    CHECK(r.steps_done == 40);
    CHECK(r.trainable_params == 4 * 16);
    CHECK(same(model_weights(model), weights));  // the frozen model is bit-identical
    CHECK_FALSE(same(prompt_values(model), prompt0));
    model.visit_parameters([](autodiff::Parameter& p) { CHECK_FALSE(p.trainable()); });
    CHECK(after < 0.8 * before);
    CHECK(r.best_val_ppl == Approx(after).epsilon(1e-6));  // the prompt left in the model is the best one
}

TEST_CASE("An interrupted prompt-tuning run resumes to the prompt of an uninterrupted one", "[train][prompt]") {
    const test::TempDir tmp("mopt_prompt_resume");
    const prompt::PromptConfig pc{.length = 3, .init = prompt::PromptInit::uniform, .seed = 4};
    const train::PromptTuningOptions o = quiet({.steps = 24, .lr = 3e-2f, .warmup = 3, .eval_every = 5,
                                                .ckpt_every = 100, .log_every = 1, .identity = {{"policy", "soft"}}});
    auto run = [&](const std::filesystem::path& dir, std::int64_t stop_after) {
        SoftModel m = tiny_model<SoftModel>(pc);
        data::Batches train = batches(4, 1), val = batches(2, 2);
        train::PromptTuningOptions oo = o;
        oo.run_dir = dir;
        oo.stop_after = stop_after;
        const train::PromptTuningResult r = train::tune_prompt(m, train, &val, oo);
        return std::pair{r, prompt_values(m)};
    };
    const auto [whole, whole_prompt] = run(tmp / "whole", 0);
    const auto [part1, p1] = run(tmp / "split", 7);  // stops after step 7 with a checkpoint
    CHECK_FALSE(part1.finished);
    CHECK(part1.steps_done == 7);
    const auto [part2, p2] = run(tmp / "split", 9);  // a new process: resumes at 7, stops at 16
    CHECK(part2.resumed_from == 7);
    CHECK(part2.steps_done == 16);
    const auto [part3, resumed_prompt] = run(tmp / "split", 0);
    CHECK(part3.resumed_from == 16);
    CHECK(part3.finished);
    CHECK(part3.best_step == whole.best_step);
    CHECK(part3.best_val_ppl == Approx(whole.best_val_ppl).epsilon(1e-6));
    // Equal up to the last bits: within one process, two runs of the same steps on two model
    // instances sometimes differ in the last bit (6e-8 on values about 0.5, on one thread too;
    // it comes and goes with the heap layout, e.g. the random checkpoint temp names).
    CHECK(max_diff(resumed_prompt, whole_prompt) < 1e-5f);
    const auto split_log = csv_numbers(tmp / "split" / "log.csv"), whole_log = csv_numbers(tmp / "whole" / "log.csv");
    REQUIRE(split_log.size() == 24);
    REQUIRE(whole_log.size() == 24);
    for (std::size_t i = 0; i < 24; ++i) {
        REQUIRE(split_log[i].size() == whole_log[i].size());
        for (std::size_t j = 0; j < split_log[i].size(); ++j) {
            INFO("log.csv row " << i + 1 << " column " << j);
            if (std::isnan(whole_log[i][j])) CHECK(std::isnan(split_log[i][j]));
            else CHECK(split_log[i][j] == Approx(whole_log[i][j]).epsilon(1e-5).margin(1e-6));
        }
    }

    // A checkpoint made with other settings is refused, naming the setting.
    SoftModel m = tiny_model<SoftModel>(pc);
    data::Batches train = batches(4, 1);
    train::PromptTuningOptions other = o;
    other.run_dir = tmp / "split";
    other.identity = {{"policy", "injected"}};
    CHECK_THROWS_WITH(train::tune_prompt(m, train, nullptr, other), Catch::Contains("policy"));
}

TEST_CASE("The prompt of the best validation perplexity is put back at the end", "[train][prompt]") {
    // Trained on one domain and validated on the other, the prompt first helps (the character set)
    // and then overfits, so the best is not the last. With min_lr_ratio = 1 the trajectory to step
    // s does not depend on the run's length.
    const prompt::PromptConfig pc{.length = 3, .init = prompt::PromptInit::uniform, .seed = 2};
    train::PromptTuningOptions o = quiet({.steps = 30, .lr = 0.05f, .min_lr_ratio = 1.0f, .clip = 0.0f, .eval_every = 3});
    SoftModel m = tiny_model<SoftModel>(pc);
    data::Batches train = one_domain("cycle", 4, 1), val = one_domain("pairs", 2, 2);
    const train::PromptTuningResult r = train::tune_prompt(m, train, &val, o);
    REQUIRE(r.validation.size() == 10);
    double lowest = r.validation.front().second;
    for (const auto& [step, ppl] : r.validation) lowest = std::min(lowest, ppl);
    CHECK(r.best_val_ppl == lowest);
    INFO("best step " << r.best_step);
    CHECK(r.best_step < 30);  // the test means something only when the best is not the last
    CHECK(eval::corpus_perplexity(m, val).ppl() == Approx(r.best_val_ppl).epsilon(1e-6));

    // The same run stopped at the best step leaves the same prompt.
    SoftModel m2 = tiny_model<SoftModel>(pc);
    data::Batches train2 = one_domain("cycle", 4, 1);
    o.steps = r.best_step;
    o.restore_best = false;
    train::tune_prompt(m2, train2, nullptr, o);
    CHECK(max_diff(prompt_values(m2), prompt_values(m)) < 1e-5f);  // last bits: see the resume test
}

TEST_CASE("Gate pretraining trains only the gate, towards each domain's expert", "[train][prompt]") {
    MopModel m = tiny_model<MopModel>(
        {.length = 4, .inject_layer = 1, .experts = 2, .gate_dim = 8, .init = prompt::PromptInit::uniform, .seed = 3});
    const std::vector<Tensor> rows0{m.prompt().prompt.value().clone()};
    data::Batches train = batches(4, 1);
    const train::PromptTuningResult r = train::tune_prompt(
        m, train, nullptr, quiet({.steps = 0, .gate_pretrain_steps = 40, .lr = 3e-2f, .expert_of_domain = {1, 0}}));
    CHECK(r.finished);
    CHECK(same({m.prompt().prompt.value().clone()}, rows0));  // the prompt rows did not move
    // The gate now sends each domain to its expert: cycle -> 1, pairs -> 0.
    autodiff::NoGrad ng;
    autodiff::Tape tape;
    data::Batch b;
    train.start_epoch(0);
    int right = 0, total = 0;
    while (train.next(b)) {
        tape.reset();
        const nn::ForwardOutput out = m.forward(tape, b.ids);
        for (std::int64_t i = 0; i < b.size(); ++i) {
            const float* g = out.gate.value().f32() + i * 2;
            const int expert = g[1] > g[0] ? 1 : 0;
            right += expert == (b.domains.data<std::int32_t>()[i] == 0 ? 1 : 0);
            ++total;
        }
    }
    CHECK(right == total);
    CHECK(r.last_loss < 0.2);

    SoftModel soft = tiny_model<SoftModel>({.length = 2, .init = prompt::PromptInit::uniform});
    CHECK_THROWS_WITH(train::tune_prompt(soft, train, nullptr, quiet({.steps = 1, .gate_pretrain_steps = 2})),
                      Catch::Contains("gate pretraining") && Catch::Contains("Mixture of Prompts"));
}

TEST_CASE("A non-finite loss stops prompt tuning with an error naming the step", "[train][prompt]") {
    SoftModel m = tiny_model<SoftModel>({.length = 2, .init = prompt::PromptInit::uniform});
    m.prompt().prompt.value().f32()[0] = NAN;
    data::Batches train = batches(4, 1);
    CHECK_THROWS_WITH(train::tune_prompt(m, train, nullptr, quiet({.steps = 5})),
                      Catch::Contains("step 1") && Catch::Contains("nan"));
}

// ---- Knowledge distillation from the dense model ----

namespace {

// The dense teacher: the student's base as another type (no prompt slot), the same weights.
using DenseModel = nn::Transformer<nn::Llama, nn::DenseFFN<>, compress::None>;

DenseModel dense_teacher() {
    DenseModel m(tiny_config(), 11);
    test::randomize_matrices(m, 5, 0.3f);
    return m;
}

// A "compressed" student: the dense weights with every other value of each matrix zeroed.
SoftModel pruned_student(const prompt::PromptConfig& pc) {
    SoftModel m = tiny_model<SoftModel>(pc);
    m.visit_parameters([](autodiff::Parameter& p) {
        if (p.shape().rank() == 2)
            for (std::int64_t i = 0; i < p.numel(); i += 2) p.value().f32()[i] = 0.0f;
    });
    return m;
}

// The mean KL(teacher ‖ student) over `batches` (student with its prompt): the distillation loss
// less the teacher's entropy (the loss of the teacher against itself).
double mean_kl(SoftModel& student, const train::Teacher& teacher, data::Batches& batches) {
    autodiff::NoGrad no_grad;
    autodiff::Tape tape;
    data::Batch b;
    batches.start_epoch(0);
    double total = 0.0;
    int n = 0;
    while (batches.next(b)) {
        tape.reset();
        const nn::ForwardOutput out = student.forward(tape, b.ids);
        const Tensor t = teacher(b.ids);
        total += autodiff::soft_cross_entropy(out.logits, t, {.targets = &b.targets}).item() -
                 autodiff::soft_cross_entropy(tape.constant(t), t, {.targets = &b.targets}).item();
        ++n;
    }
    return total / n;
}

}  // namespace

TEST_CASE("Distillation from the dense model lowers the student's KD loss and moves only the prompt",
          "[train][prompt][distill]") {
    const test::TempDir tmp("mopt_prompt_kd");
    DenseModel dense = dense_teacher();
    {  // the teacher is the student's own base: the same weights, another type
        SoftModel base = tiny_model<SoftModel>({.length = 4, .init = prompt::PromptInit::uniform, .seed = 1});
        REQUIRE(same(model_weights(dense), model_weights(base)));
    }
    SoftModel student = pruned_student({.length = 4, .init = prompt::PromptInit::uniform, .seed = 1});
    const std::vector<Tensor> weights = model_weights(student), prompt0 = prompt_values(student);
    int calls = 0;
    const train::Teacher dense_logits = train::teacher_of(dense);
    const train::Teacher counted = [&](const Tensor& ids) {
        ++calls;
        return dense_logits(ids);
    };
    data::Batches train = batches(4, 1), val = batches(2, 2);
    const double before = mean_kl(student, dense_logits, val);
    const train::PromptTuningResult r = train::tune_prompt(
        student, train, &val,
        quiet({.steps = 40, .lr = 5e-2f, .warmup = 4, .teacher = counted, .kd_weight = 1.0f, .eval_every = 20,
               .run_dir = tmp / "run"}));
    const double after = mean_kl(student, dense_logits, val);
    // The same run on the LM loss alone: it fits the text, not the teacher (the KL grows here).
    SoftModel lm = pruned_student({.length = 4, .init = prompt::PromptInit::uniform, .seed = 1});
    data::Batches train2 = batches(4, 1);
    train::tune_prompt(lm, train2, &val, quiet({.steps = 40, .lr = 5e-2f, .warmup = 4, .eval_every = 20}));
    const double after_lm = mean_kl(lm, dense_logits, val);
    INFO("validation KL(teacher || student) " << before << " -> " << after << " (LM loss: " << after_lm << ")");
    CHECK(calls == 40);  // once per step, validation does not run the teacher
    CHECK(after < 0.85 * before);
    CHECK(after < 0.8 * after_lm);
    CHECK(same(model_weights(student), weights));
    CHECK_FALSE(same(prompt_values(student), prompt0));
    CHECK(std::isfinite(r.last_kd_loss));
    // Validation (and the best prompt) stay on the LM perplexity.
    CHECK(r.best_val_ppl == Approx(eval::corpus_perplexity(student, val).ppl()).epsilon(1e-6));
    const auto log = csv_numbers(tmp / "run" / "log.csv");
    REQUIRE(log.size() == 4);  // log_every 10
    CHECK(log.back().size() == 9);  // kd_loss after val_ppl
    CHECK(log.back()[8] == Approx(r.last_kd_loss).epsilon(1e-5));
    CHECK(log.back()[8] < log.front()[8]);
}

TEST_CASE("kd_weight mixes the LM and KD gradients, and kd_weight = 0 is the LM run without calling the teacher",
          "[train][prompt][distill]") {
    const prompt::PromptConfig pc{.length = 3, .init = prompt::PromptInit::uniform, .seed = 4};
    DenseModel dense = dense_teacher();
    int calls = 0;
    const train::Teacher dense_logits = train::teacher_of(dense);
    const train::Teacher counted = [&](const Tensor& ids) {
        ++calls;
        return dense_logits(ids);
    };

    SECTION("one step: the gradient at w = 0.3 is 0.7 of the LM gradient plus 0.3 of the KD gradient") {
        SoftModel m = pruned_student(pc);
        train::freeze_model(m);
        const auto params = train::prompt_parameters(m);
        struct KeepGradients {  // an "optimizer" that leaves the prompt and its gradient as they are
            std::vector<autodiff::Parameter*> ps;
            const std::vector<autodiff::Parameter*>& parameters() const { return ps; }
            void step() {}
        } frozen{params};
        data::Batches train = batches(4, 1);
        data::Batch b;
        train.next_wrapping(b);
        autodiff::Tape tape;
        const auto grad_at = [&](float w) {
            const train::PromptStepResult s = train::prompt_step(
                m, tape, b, params, frozen, {.clip = 0.0f, .teacher = &counted, .kd_weight = w}, 1);
            return std::pair{s, params.front()->grad().clone()};
        };
        const auto [s0, g0] = grad_at(0.0f);
        const auto [s1, g1] = grad_at(1.0f);
        const auto [sm, gm] = grad_at(0.3f);
        CHECK(calls == 2);  // w = 0 runs no teacher
        CHECK(s0.kd == 0.0);
        CHECK(s1.kd > 0.0);
        CHECK(sm.kd == Approx(s1.kd).epsilon(1e-6));
        CHECK(sm.loss == Approx(s0.loss).epsilon(1e-6));  // loss is the LM loss whatever w
        CHECK(max_diff({g0}, {g1}) > 1e-3f);                 // the two objectives pull differently
        double worst = 0.0;
        for (std::int64_t k = 0; k < gm.numel(); ++k)
            worst = std::max(worst, std::abs(gm.f32()[k] - (0.7 * g0.f32()[k] + 0.3 * g1.f32()[k])));
        CHECK(worst < 1e-6);
    }
    SECTION("a whole run at w = 0 leaves the prompt of a run without a teacher") {
        const auto run = [&](const train::Teacher& t) {
            SoftModel m = pruned_student(pc);
            data::Batches train = batches(4, 1), val = batches(2, 2);
            train::tune_prompt(m, train, &val, quiet({.steps = 20, .lr = 3e-2f, .teacher = t, .eval_every = 5}));
            return prompt_values(m);
        };
        const std::vector<Tensor> plain = run({}), with_teacher = run(counted);
        CHECK(calls == 0);
        CHECK(max_diff(plain, with_teacher) < 1e-6f);  // last bits only: see the resume test
        // ... and distilling leaves another prompt.
        SoftModel m = pruned_student(pc);
        data::Batches train = batches(4, 1);
        train::tune_prompt(m, train, nullptr, quiet({.steps = 20, .lr = 3e-2f, .teacher = counted, .kd_weight = 0.5f}));
        CHECK(calls == 20);
        CHECK(max_diff(prompt_values(m), plain) > 1e-3f);
    }
}

TEST_CASE("Distillation settings are checked, naming the setting", "[train][prompt][distill]") {
    SoftModel m = tiny_model<SoftModel>({.length = 2, .init = prompt::PromptInit::uniform});
    DenseModel dense = dense_teacher();
    data::Batches train = batches(4, 1);
    for (const float w : {-0.1f, 1.5f, NAN})
        CHECK_THROWS_WITH(train::tune_prompt(m, train, nullptr,
                                             quiet({.steps = 1, .teacher = train::teacher_of(dense), .kd_weight = w})),
                          Catch::Contains("kd_weight") && Catch::Contains("[0, 1]"));
    CHECK_THROWS_WITH(train::tune_prompt(m, train, nullptr, quiet({.steps = 1, .kd_weight = 0.5f})),
                      Catch::Contains("kd_weight") && Catch::Contains("teacher"));
    CHECK_THROWS_WITH(
        train::tune_prompt(m, train, nullptr,
                           quiet({.steps = 1, .teacher = train::teacher_of(dense), .kd_weight = 1.0f, .kd_temperature = 0.0f})),
        Catch::Contains("kd_temperature"));
    // A teacher whose logits are not the student's shape (another vocabulary).
    const train::Teacher wrong = [](const Tensor& ids) { return Tensor::zeros({ids.dim(0), ids.dim(1), 7}); };
    CHECK_THROWS_WITH(train::tune_prompt(m, train, nullptr, quiet({.steps = 1, .teacher = wrong, .kd_weight = 1.0f})),
                      Catch::Contains("teacher logits") && Catch::Contains("7]"));
}
