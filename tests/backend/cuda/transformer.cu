// nn::Transformer<…, backend::Cuda> (backend/cuda/transformer.cuh) against the same type with
// backend::Cpu: two models built from one config and seed, so with the same weights and the same
// prompt, differing only in the Backend slot. Through the tape, as the library's loops use them:
// forward logits and loss, every prompt parameter's gradient, and three train::prompt_step steps
// (AdamW, clipping) agree to 1e-4 (f32 storage: the CPU's arithmetic up to summation order) for a
// soft prompt, a Mixture of Prompts at layer 1 (with its gate pretraining loss on gate_logits) and
// a Switch model with its auxiliary loss in the objective. Also: evaluation (top-k gates)
// and decoding (the host copy) give the CPU's numbers; host weight changes reach the device; a
// trainable model weight beside a prompt, a Switch model's trainable weights and bad ids are
// refused. Pretraining (every weight trainable, no prompt) matches the CPU step for step.
#include <mopt/nn/linear_role.hpp>  // first: see llama_reference.cpp

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include <mopt/mopt.hpp>
#include <mopt/backend/cuda/transformer.cuh>
#include <mopt/train/prompt_tuning.hpp>

#include "cuda_test.cuh"
#include "reference_weights.hpp"

namespace {

using namespace mopt;
using mopt::cuda_test::error_of;
using mopt::cuda_test::scalar_error;

template <class FFN, class Prompt, class Backend>
using Model = nn::Transformer<nn::Llama, FFN, compress::None, Prompt, Backend>;
using Dense = nn::Llama::FFN;
using Switch = nn::SwitchFFN<nn::Top1, nn::EveryLayer>;

nn::ModelConfig config_of(bool experts) {
    nn::ModelConfig c;
    c.vocab_size = 97;
    c.d_model = 128;
    c.n_layers = 3;
    c.n_heads = 4;
    c.n_kv_heads = 2;
    c.d_ff = 256;
    c.max_seq = 256;
    if (experts) {
        c.num_experts = 4;
        c.experts_per_token = 1;
        c.aux_loss_coef = 0.01f;
        c.z_loss_coef = 0.001f;
    }
    return c;
}

// The CPU model and its CUDA twin, with the same weights and prompt (bf16: weights rounded to bf16
// values on both, so only the GPU's bf16 storage of activations differs).
template <class FFN, class Prompt, class Gpu = backend::Cuda>
struct Pair {
    Model<FFN, Prompt, backend::Cpu> cpu;
    Model<FFN, Prompt, Gpu> gpu;
    Pair(const nn::ModelConfig& c, const prompt::PromptConfig& pc) : cpu(c, 5), gpu(c, 5) {
        const bool bf16 = Gpu::storage == DType::bf16;
        cuda_test::randomize(cpu, 11, bf16);
        cuda_test::randomize(gpu, 11, bf16);
        cpu.init_prompt(pc);
        gpu.init_prompt(pc);
        cpu.set_trainable(false);
        gpu.set_trainable(false);
    }
};

std::vector<float> values(const autodiff::Parameter& p) { return p.value().to_vector(); }
std::vector<float> grads(const autodiff::Parameter& p) { return p.grad().to_vector(); }

data::Batch batch_of(std::int64_t vocab, std::uint64_t seed, std::int64_t domains) {
    auto [ids, targets] = cuda_test::random_batch(vocab, 3, 21, seed);
    data::Batch b{.ids = ids, .targets = targets, .domains = Tensor::empty({3}, DType::i32)};
    for (std::int64_t i = 0; i < 3; ++i) b.domains.data<std::int32_t>()[i] = static_cast<std::int32_t>(i % domains);
    return b;
}

// Evaluation logits, then `steps` prompt_step updates with the same batches on both models; after
// each the loss, every prompt parameter's gradient and value agree.
template <class FFN, class Prompt>
void check_pair(Pair<FFN, Prompt>& m, const train::PromptStepOptions& o, int steps, const char* what) {
    const std::int64_t V = m.cpu.config().vocab_size;
    {
        const data::Batch b = batch_of(V, 3, 1);
        autodiff::NoGrad no_grad;
        autodiff::Tape tc, tg;
        const nn::ForwardOutput c = m.cpu.forward(tc, b.ids, {.targets = &b.targets});
        const nn::ForwardOutput g = m.gpu.forward(tg, b.ids, {.targets = &b.targets});
        CUDA_CHECK_CLOSE(g.logits.value().span(), c.logits.value().span(), 1e-4, what);
        CUDA_CHECK(scalar_error(g.loss.item(), c.loss.item()) <= 1e-4, what, ": evaluation loss ", g.loss.item(),
                   " vs CPU ", c.loss.item());
    }
    std::vector<autodiff::Parameter*> pc = train::prompt_parameters(m.cpu), pg = train::prompt_parameters(m.gpu);
    CUDA_CHECK(pc.size() == pg.size() && !pc.empty(), what, ": prompt parameters ", pg.size(), " vs ", pc.size());
    train::AdamW oc(pc, {.lr = 1e-2f, .weight_decay = 0.01f}), og(pg, {.lr = 1e-2f, .weight_decay = 0.01f});
    autodiff::Tape tc, tg;
    for (int s = 0; s < steps; ++s) {
        const data::Batch b = batch_of(V, 100 + static_cast<std::uint64_t>(s), 3);
        const train::PromptStepResult rc = train::prompt_step(m.cpu, tc, b, pc, oc, o, s + 1);
        const train::PromptStepResult rg = train::prompt_step(m.gpu, tg, b, pg, og, o, s + 1);
        CUDA_CHECK(scalar_error(rg.loss, rc.loss) <= 1e-4, what, ": step ", s + 1, " loss ", rg.loss, " vs CPU ", rc.loss);
        CUDA_CHECK(scalar_error(rg.aux, rc.aux) <= 1e-4 || std::abs(rg.aux - rc.aux) <= 1e-7, what, ": step ", s + 1,
                   " aux ", rg.aux, " vs CPU ", rc.aux);
        CUDA_CHECK(scalar_error(rg.grad_norm, rc.grad_norm) <= 1e-4, what, ": step ", s + 1, " gradient norm ",
                   rg.grad_norm, " vs CPU ", rc.grad_norm);
        for (std::size_t i = 0; i < pc.size(); ++i) {
            const std::string name = std::string(what) + " " + pc[i]->name() + " step " + std::to_string(s + 1);
            CUDA_CHECK_CLOSE(grads(*pg[i]), grads(*pc[i]), 1e-4, (name + " gradient").c_str());
            CUDA_CHECK_CLOSE(values(*pg[i]), values(*pc[i]), 1e-4, (name + " value").c_str());
        }
    }
}

// Pretraining (every weight trainable, no prompt), as examples/pretrain trains: the first step's
// gradient of every parameter, then three steps of clipped AdamW with weight decay (the host's
// optimizer; the device takes the moved weights at the next forward): losses, gradient norms and
// final weights agree with the CPU model's, and so do the evaluation logits after the last step.
// Tolerances: f32 1e-4 on losses, gradients, norms and logits (the CPU's arithmetic up to summation
// order); weights after AdamW 1e-3 (Adam divides each gradient by its own running scale, so
// coordinates whose gradient is near zero move by about lr whatever their sign noise: 1.03e-4 was
// measured). bf16: llama.cu's 3e-2 on tensors (activations and their gradients stored in bf16; the
// embedding's gradient, at the end of the chain, measured 1.24e-2), 5e-3 on losses and norms (the
// GPU's weights are the CPU's f32 masters rounded to bf16 after every step).
struct PretrainTolerance {
    double scalar, gradient, weights;
};

template <class Gpu>
void check_pretraining(const nn::ModelConfig& c, PretrainTolerance tol, const char* what) {
    const bool bf16 = Gpu::storage == DType::bf16;
    Model<Dense, prompt::None, backend::Cpu> cpu(c, 5);
    Model<Dense, prompt::None, Gpu> gpu(c, 5);
    cuda_test::randomize(cpu, 11, bf16);
    cuda_test::randomize(gpu, 11, bf16);
    std::vector<autodiff::Parameter*> pc, pg;
    cpu.visit_parameters([&](autodiff::Parameter& p) { pc.push_back(&p); });
    gpu.visit_parameters([&](autodiff::Parameter& p) { pg.push_back(&p); });
    const train::AdamWOptions ao{.lr = 2e-3f, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f, .weight_decay = 0.1f};
    train::AdamW oc(pc, ao), og(pg, ao);
    double worst_grad = 0.0;
    for (int step = 0; step < 3; ++step) {
        const data::Batch b = batch_of(c.vocab_size, 40 + static_cast<std::uint64_t>(step), 1);
        autodiff::Tape tc, tg;
        const nn::ForwardOutput fc = cpu.forward(tc, b.ids, {.targets = &b.targets});
        // step 0: the loss on the tape from the logits; then (pretrain's way) on the device, no logits
        const nn::ForwardOutput fg = gpu.forward(tg, b.ids, {.targets = &b.targets, .logits = step == 0});
        CUDA_CHECK(fg.logits.defined() == (step == 0), what, " step ", step, ": logits defined ", fg.logits.defined());
        CUDA_CHECK(scalar_error(fg.loss.item(), fc.loss.item()) <= tol.scalar, what, " step ", step, ": loss ",
                   fg.loss.item(), " vs CPU ", fc.loss.item());
        tc.backward(fc.loss);
        tg.backward(fg.loss);
        if (step == 0)
            for (std::size_t i = 0; i < pc.size(); ++i) {
                const double e = cuda_test::relative_error(pg[i]->grad().span(), pc[i]->grad().span());
                worst_grad = std::max(worst_grad, e);
                CUDA_CHECK(e <= tol.gradient, what, ": gradient of ", pc[i]->name(), " off by ", e, " > ", tol.gradient);
            }
        const double nc = train::clip_grad_norm(pc, 1.0), ng = train::clip_grad_norm(pg, 1.0);
        CUDA_CHECK(scalar_error(ng, nc) <= tol.scalar, what, " step ", step, ": gradient norm ", ng, " vs CPU ", nc);
        oc.step();
        og.step();
    }
    double worst_weight = 0.0;
    for (std::size_t i = 0; i < pc.size(); ++i) {
        const double e = cuda_test::relative_error(pg[i]->value().span(), pc[i]->value().span());
        worst_weight = std::max(worst_weight, e);
        CUDA_CHECK(e <= tol.weights, what, ": ", pc[i]->name(), " after three steps off by ", e, " > ", tol.weights);
    }
    autodiff::NoGrad no_grad;
    autodiff::Tape tc, tg;
    const data::Batch b = batch_of(c.vocab_size, 50, 1);
    CUDA_CHECK_CLOSE(gpu.forward(tg, b.ids).logits.value().span(), cpu.forward(tc, b.ids).logits.value().span(),
                     tol.gradient, std::string(what) + ": evaluation logits after training");
    std::printf("    %s: worst first-step gradient error %.2e, weights after three steps %.2e\n", what, worst_grad,
                worst_weight);
}

}  // namespace

MOPT_CUDA_TEST(transformer_cuda_pretraining_matches_cpu) {
    check_pretraining<backend::Cuda>(config_of(false), {1e-4, 1e-4, 1e-3}, "f32, GQA, own head");
    nn::ModelConfig tied = config_of(false);
    tied.tie_embeddings = true;
    tied.n_kv_heads = 0;
    check_pretraining<backend::Cuda>(tied, {1e-4, 1e-4, 1e-3}, "f32, tied embeddings");
}

MOPT_CUDA_TEST(transformer_cuda_bf16_pretraining_close_to_cpu) {
    check_pretraining<backend::CudaBf16>(config_of(false), {5e-3, 3e-2, 3e-2}, "bf16");
}

MOPT_CUDA_TEST(transformer_cuda_soft_prompt_matches_cpu) {
    Pair<Dense, prompt::SoftPrompt> m(config_of(false), {.length = 6, .init = prompt::PromptInit::uniform, .seed = 2});
    check_pair(m, {.clip = 0.5f}, 3, "soft prompt");
}

MOPT_CUDA_TEST(transformer_cuda_bf16_soft_prompt_close_to_cpu) {
    // backend::CudaBf16: llama.cu's bf16 tolerances (3e-2 on tensors, 2e-3 on the loss; see there)
    Pair<Dense, prompt::SoftPrompt, backend::CudaBf16> m(config_of(false),
                                                         {.length = 6, .init = prompt::PromptInit::uniform, .seed = 2});
    for (float& v : m.cpu.prompt().prompt.value().span()) v = cuda_test::round_bf16(v);
    for (float& v : m.gpu.prompt().prompt.value().span()) v = cuda_test::round_bf16(v);
    const data::Batch b = batch_of(97, 3, 1);
    autodiff::Tape tc, tg;
    const nn::ForwardOutput c = m.cpu.forward(tc, b.ids, {.targets = &b.targets});
    const nn::ForwardOutput g = m.gpu.forward(tg, b.ids, {.targets = &b.targets});
    CUDA_CHECK_CLOSE(g.logits.value().span(), c.logits.value().span(), 3e-2, "bf16 logits");
    CUDA_CHECK(scalar_error(g.loss.item(), c.loss.item()) <= 2e-3, "bf16 loss ", g.loss.item(), " vs CPU ", c.loss.item());
    tc.backward(c.loss);
    tg.backward(g.loss);
    CUDA_CHECK_CLOSE(grads(m.gpu.prompt().prompt), grads(m.cpu.prompt().prompt), 3e-2, "bf16 d loss / d prompt");
}

MOPT_CUDA_TEST(transformer_cuda_mixture_of_prompts_matches_cpu) {
    prompt::PromptConfig pc{.length = 6, .inject_layer = 1, .experts = 3, .gate_dim = 16,
                            .init = prompt::PromptInit::uniform, .seed = 4};
    Pair<Dense, prompt::MixtureOfPrompts> m(config_of(false), pc);
    check_pair(m, {.clip = 0.0f}, 3, "MoP");
    // gate pretraining: the cross-entropy of gate_logits against the windows' domains reaches W1, W2
    check_pair(m, {.clip = 0.0f, .gate_phase = true}, 2, "MoP gate phase");
    // top-k at evaluation: the gate and the logits
    m.cpu.prompt().set_top_k(2);
    m.gpu.prompt().set_top_k(2);
    const data::Batch b = batch_of(97, 9, 1);
    autodiff::NoGrad no_grad;
    autodiff::Tape tc, tg;
    const nn::ForwardOutput c = m.cpu.forward(tc, b.ids), g = m.gpu.forward(tg, b.ids);
    CUDA_CHECK_CLOSE(g.gate.value().span(), c.gate.value().span(), 1e-4, "top-2 gate");
    CUDA_CHECK_CLOSE(g.logits.value().span(), c.logits.value().span(), 1e-4, "top-2 logits");
}

MOPT_CUDA_TEST(transformer_cuda_mixture_with_input_prompt_matches_cpu) {
    prompt::PromptConfig pc{.length = 4, .inject_layer = 0, .experts = 2, .gate_dim = 8, .input_prompt = 3,
                            .init = prompt::PromptInit::uniform, .seed = 6};
    Pair<Dense, prompt::MixtureOfPrompts> m(config_of(false), pc);
    Tensor p1 = Tensor::empty({3, 128});
    std::mt19937_64 rng(3);
    std::normal_distribution<float> dist(0.0f, 0.5f);
    for (float& v : p1.span()) v = dist(rng);
    m.cpu.prompt().set_input_prompt(p1);
    m.gpu.prompt().set_input_prompt(p1);
    check_pair(m, {.clip = 1.0f}, 2, "MoP with input prompt");
}

MOPT_CUDA_TEST(transformer_cuda_switch_aux_loss_matches_cpu) {
    Pair<Switch, prompt::InjectedPrompt> m(config_of(true), {.length = 5, .inject_layer = 1,
                                                             .init = prompt::PromptInit::uniform, .seed = 8});
    check_pair(m, {.clip = 0.0f, .aux_loss_coef = 0.5f}, 3, "Switch, injected prompt, aux loss");
    const data::Batch b = batch_of(97, 12, 1);
    autodiff::NoGrad no_grad;
    autodiff::Tape tc, tg;
    const nn::ForwardOutput c = m.cpu.forward(tc, b.ids), g = m.gpu.forward(tg, b.ids);
    CUDA_CHECK(g.experts.size() == c.experts.size(), "expert layers ", g.experts.size(), " vs ", c.experts.size());
    for (std::size_t l = 0; l < c.experts.size(); ++l) {
        CUDA_CHECK(g.experts[l].layer == c.experts[l].layer && g.experts[l].tokens == c.experts[l].tokens &&
                       g.experts[l].dropped == c.experts[l].dropped,
                   "expert layer ", l, ": layer/tokens/dropped differ");
        for (std::size_t e = 0; e < c.experts[l].fraction.size(); ++e)
            CUDA_CHECK(std::abs(g.experts[l].fraction[e] - c.experts[l].fraction[e]) < 1e-9, "layer ", l, " expert ",
                       e, " load ", g.experts[l].fraction[e], " vs CPU ", c.experts[l].fraction[e]);
        CUDA_CHECK(scalar_error(g.experts[l].aux_loss, c.experts[l].aux_loss) <= 1e-4, "layer ", l, " balance ",
                   g.experts[l].aux_loss, " vs CPU ", c.experts[l].aux_loss);
    }
}

MOPT_CUDA_TEST(transformer_cuda_follows_host_weights_and_decodes) {
    Pair<Dense, prompt::SoftPrompt> m(config_of(false), {.length = 4, .init = prompt::PromptInit::uniform, .seed = 1});
    const data::Batch b = batch_of(97, 21, 1);
    auto logits = [&](auto& model) {
        autodiff::NoGrad no_grad;
        autodiff::Tape t;
        return model.forward(t, b.ids).logits.value().to_vector();
    };
    (void)logits(m.gpu);  // builds the device copy
    // change a weight on the host of both (as compression does, through visit_linears)
    auto halve = [](nn::Linear& l, nn::LinearRole) {
        if (!l.is_packed())
            for (float& v : l.weight.value().span()) v *= 0.5f;
    };
    m.cpu.visit_linears(halve);
    m.gpu.visit_linears(halve);
    CUDA_CHECK_CLOSE(logits(m.gpu), logits(m.cpu), 1e-4, "logits after a host weight change");
    // decoding with a KV cache runs the host copy: greedy tokens agree
    const std::vector<std::int32_t> start{1, 5, 7};  // ids of the random model's vocabulary
    const auto gc = eval::generate(m.cpu, start, {.steps = 6, .temperature = 0.0f, .stop_at_eos = false});
    const auto gg = eval::generate(m.gpu, start, {.steps = 6, .temperature = 0.0f, .stop_at_eos = false});
    CUDA_CHECK(gc == gg, "greedy generation differs from the CPU's");
    // trainable model weights beside a learned prompt: refused, naming the parameter
    m.gpu.set_trainable(true);
    const std::string e = error_of([&] {
        autodiff::Tape t;
        (void)m.gpu.forward(t, b.ids, {.targets = &b.targets});
    });
    CUDA_CHECK(e.find("beside a learned prompt") != std::string::npos &&
                   e.find("model.embed_tokens.weight") != std::string::npos,
               "trainable weights with a prompt: got '", e, "'");
    m.gpu.set_trainable(false);
    // a Switch model's weights do not train on the GPU yet: refused, naming the parameter
    Model<Switch, prompt::None, backend::Cuda> moe(config_of(true), 3);
    const std::string s = error_of([&] {
        autodiff::Tape t;
        (void)moe.forward(t, b.ids, {.targets = &b.targets});
    });
    CUDA_CHECK(s.find("Switch model") != std::string::npos && s.find("model.embed_tokens.weight") != std::string::npos,
               "trainable Switch weights: got '", s, "'");
    const std::string bad = error_of([&] {
        autodiff::Tape t;
        (void)m.gpu.forward(t, Tensor::full({1, 3}, 500.0f));
    });
    CUDA_CHECK(bad.find("ids must be i32") != std::string::npos, "f32 ids: got '", bad, "'");
}
