// nn::Transformer<…, backend::Cuda> (backend/cuda/transformer.cuh) against the same type with
// backend::Cpu: two models built from one config and seed, so with the same weights and the same
// prompt, differing only in the Backend slot. Through the tape, as the library's loops use them:
// forward logits and loss, every prompt parameter's gradient, and three train::prompt_step steps
// (AdamW, clipping) agree to 1e-4 (f32 storage: the CPU's arithmetic up to summation order) for a
// soft prompt, a Mixture of Prompts at layer 1 (with its gate pretraining loss on gate_logits) and
// a Switch model with its auxiliary loss in the objective. Also: evaluation (top-k gates)
// and decoding (the host copy) give the CPU's numbers; host weight changes reach the device; a
// trainable model weight beside a prompt and bad ids are refused. Pretraining (every weight
// trainable, no prompt; dense and Switch) matches the CPU step for step, with the optimizer on the
// host or on the device (train::step).
#include <mopt/nn/linear_role.hpp>  // first: see llama_reference.cpp

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include <unistd.h>

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

// The pretraining objective: the loss, plus a Switch model's auxiliary losses (as examples/pretrain).
autodiff::Var objective(const nn::ForwardOutput& f) {
    return f.aux_loss.defined() ? autodiff::add(f.loss, f.aux_loss) : f.loss;
}

// A Switch model's auxiliary loss agrees with the CPU's (both absent in a dense model).
void check_aux(const nn::ForwardOutput& g, const nn::ForwardOutput& c, double tol, const char* what, int step) {
    CUDA_CHECK(g.aux_loss.defined() == c.aux_loss.defined(), what, " step ", step, ": aux loss defined ",
               g.aux_loss.defined(), " vs CPU ", c.aux_loss.defined());
    if (c.aux_loss.defined())
        CUDA_CHECK(scalar_error(g.aux_loss.item(), c.aux_loss.item()) <= tol, what, " step ", step, ": aux loss ",
                   g.aux_loss.item(), " vs CPU ", c.aux_loss.item());
}

// Expert layers routed every row alike (as many rows to each expert, as many dropped).
bool same_routing(const nn::ForwardOutput& g, const nn::ForwardOutput& c) {
    if (g.experts.size() != c.experts.size()) return false;
    for (std::size_t l = 0; l < c.experts.size(); ++l) {
        const std::vector<double>&fr_g = g.experts[l].fraction, &fr_c = c.experts[l].fraction;
        if (fr_g.size() != fr_c.size() || g.experts[l].dropped != c.experts[l].dropped) return false;
        for (std::size_t e = 0; e < fr_c.size(); ++e)
            if (std::abs(fr_g[e] - fr_c[e]) >= 1e-9) return false;
    }
    return true;
}

// The CPU model and its CUDA twin without a prompt (pretraining): the same random weights (bf16:
// rounded to bf16 values on both) and their parameters in the same order.
template <class FFN, class Gpu>
struct Twins {
    Model<FFN, prompt::None, backend::Cpu> cpu;
    Model<FFN, prompt::None, Gpu> gpu;
    std::vector<autodiff::Parameter*> pc, pg;
    explicit Twins(const nn::ModelConfig& c) : cpu(c, 5), gpu(c, 5) {
        cuda_test::randomize(cpu, 11, Gpu::storage == DType::bf16);
        cuda_test::randomize(gpu, 11, Gpu::storage == DType::bf16);
        cpu.visit_parameters([&](autodiff::Parameter& p) { pc.push_back(&p); });
        gpu.visit_parameters([&](autodiff::Parameter& p) { pg.push_back(&p); });
    }
};

// Every weight of the GPU model's host copy within tol of the CPU model's; returns the worst error.
double check_weights(const std::vector<autodiff::Parameter*>& pc, const std::vector<autodiff::Parameter*>& pg,
                     double tol, const char* what, const char* when) {
    double worst = 0.0;
    for (std::size_t i = 0; i < pc.size(); ++i) {
        const double e = cuda_test::relative_error(pg[i]->value().span(), pc[i]->value().span());
        worst = std::max(worst, e);
        CUDA_CHECK(e <= tol, what, ": ", pc[i]->name(), " ", when, " off by ", e, " > ", tol);
    }
    return worst;
}

template <class Gpu, class FFN = Dense>
void check_pretraining(const nn::ModelConfig& c, PretrainTolerance tol, const char* what) {
    Twins<FFN, Gpu> t(c);
    auto& cpu = t.cpu;
    auto& gpu = t.gpu;
    const std::vector<autodiff::Parameter*>&pc = t.pc, &pg = t.pg;
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
        check_aux(fg, fc, tol.scalar, what, step);
        tc.backward(objective(fc));
        tg.backward(objective(fg));
        if (step == 0) {
            CUDA_CHECK(same_routing(fg, fc), what, ": the routing differs from the CPU's");
            std::string off;  // every parameter off, not only the first
            for (std::size_t i = 0; i < pc.size(); ++i) {
                const double e = cuda_test::relative_error(pg[i]->grad().span(), pc[i]->grad().span());
                worst_grad = std::max(worst_grad, e);
                if (e > tol.gradient) off += " " + pc[i]->name() + " (" + std::to_string(e) + ")";
            }
            CUDA_CHECK(off.empty(), what, ": gradients off by more than ", tol.gradient, ":", off);
        }
        const double nc = train::clip_grad_norm(pc, 1.0), ng = train::clip_grad_norm(pg, 1.0);
        CUDA_CHECK(scalar_error(ng, nc) <= tol.scalar, what, " step ", step, ": gradient norm ", ng, " vs CPU ", nc);
        oc.step();
        og.step();
    }
    const double worst_weight = check_weights(pc, pg, tol.weights, what, "after three steps");
    autodiff::NoGrad no_grad;
    autodiff::Tape tc, tg;
    const data::Batch b = batch_of(c.vocab_size, 50, 1);
    CUDA_CHECK_CLOSE(gpu.forward(tg, b.ids).logits.value().span(), cpu.forward(tc, b.ids).logits.value().span(),
                     tol.gradient, std::string(what) + ": evaluation logits after training");
    std::printf("    %s: worst first-step gradient error %.2e, weights after three steps %.2e\n", what, worst_grad,
                worst_weight);
}

// Pretraining with the optimizer on the device (train::step, as examples/pretrain steps): both
// models step with train::step over two AdamWs (weight decay on matrices only, as pretrain splits
// them); the GPU model's first step runs on the host, the rest on the device (the optimizers are
// attached, and AdamW::step on the host is refused). After three steps a checkpoint is written
// (fetching the device's state) and read back (the host's state replaces the device's; the next step
// runs on the host again, then moves back), three more steps follow. Losses and gradient norms at
// every step, every weight after six steps (the host's copy fetched) and the evaluation logits
// agree with the CPU model's within the tolerances of check_pretraining.
template <class Gpu, class FFN = Dense>
void check_device_optimizer(const nn::ModelConfig& c, PretrainTolerance tol, const char* what) {
    const bool bf16 = Gpu::storage == DType::bf16;
    Twins<FFN, Gpu> t(c);
    auto& cpu = t.cpu;
    auto& gpu = t.gpu;
    const std::vector<autodiff::Parameter*>&pc = t.pc, &pg = t.pg;
    std::vector<autodiff::Parameter*> mc, mg, nc, ng;  // matrices (weight decay) and norm gains
    for (std::size_t i = 0; i < pc.size(); ++i) {
        (pc[i]->value().rank() >= 2 ? mc : nc).push_back(pc[i]);
        (pg[i]->value().rank() >= 2 ? mg : ng).push_back(pg[i]);
    }
    const train::AdamWOptions ao{.lr = 2e-3f, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f, .weight_decay = 0.1f};
    train::AdamWOptions plain = ao;
    plain.weight_decay = 0.0f;
    train::AdamW oc(mc, ao), oc_plain(nc, plain), og(mg, ao), og_plain(ng, plain);
    const std::filesystem::path dir = std::filesystem::temp_directory_path() / ("mopt_cuda_dopt_" + std::to_string(::getpid()));
    std::filesystem::remove_all(dir);
    for (int step = 0; step < 6; ++step) {
        const data::Batch b = batch_of(c.vocab_size, 60 + static_cast<std::uint64_t>(step), 1);
        autodiff::Tape tc, tg;
        const nn::ForwardOutput fc = cpu.forward(tc, b.ids, {.targets = &b.targets});
        const nn::ForwardOutput fg = gpu.forward(tg, b.ids, {.targets = &b.targets, .logits = false});
        CUDA_CHECK(scalar_error(fg.loss.item(), fc.loss.item()) <= tol.scalar, what, " step ", step, ": loss ",
                   fg.loss.item(), " vs CPU ", fc.loss.item());
        check_aux(fg, fc, tol.scalar, what, step);
        tc.backward(objective(fc));
        tg.backward(objective(fg));
        const double norm_c = train::step(cpu, 0.05, oc, oc_plain), norm_g = train::step(gpu, 0.05, og, og_plain);
        CUDA_CHECK(scalar_error(norm_g, norm_c) <= tol.scalar, what, " step ", step, ": gradient norm ", norm_g,
                   " vs CPU ", norm_c);
        CUDA_CHECK(norm_c > 0.05, what, " step ", step, ": norm ", norm_c, " does not reach the clipping bound");
        CUDA_CHECK(og.attached() && og_plain.attached(), what, " step ", step, ": the optimizers are not on the device");
        CUDA_CHECK(error_of([&] { og.step(); }).find("train::step") != std::string::npos, what,
                   ": AdamW::step on the host was not refused while the state is on the device");
        if (step == 2) {  // checkpoint (the device's state fetched), then resume from it
            train::save_checkpoint(dir, {.step = 3}, pg, 1, og, og_plain);
            const auto state = train::load_latest_checkpoint(dir, pg, og, og_plain);
            CUDA_CHECK(state && state->step == 3, what, ": the checkpoint was not read back");
            CUDA_CHECK(!og.attached() && !og_plain.attached(), what, ": loading did not bring the optimizers home");
            CUDA_CHECK(og.steps() == 3 && oc.steps() == 3, what, ": step counts ", og.steps(), " vs CPU ", oc.steps());
        }
    }
    std::filesystem::remove_all(dir);
    og.fetch();
    const double worst = check_weights(pc, pg, tol.weights, what, "after six steps");
    // The first moments average the gradients: f32 as the weights; bf16 5e-2 (each step's bf16
    // gradient is within llama.cu's 3e-2, and six steps along the two models' paths drift apart: 3.8e-2 seen)
    const double moment_tol = bf16 ? 5e-2 : tol.weights;
    for (std::size_t i = 0; i < mc.size(); ++i)
        CUDA_CHECK_CLOSE(og.first_moment(i).span(), oc.first_moment(i).span(), moment_tol,
                         std::string(what) + ": first moment of " + mc[i]->name());
    autodiff::NoGrad no_grad;
    autodiff::Tape tc, tg;
    const data::Batch b = batch_of(c.vocab_size, 70, 1);
    CUDA_CHECK_CLOSE(gpu.forward(tg, b.ids).logits.value().span(), cpu.forward(tc, b.ids).logits.value().span(),
                     tol.gradient, std::string(what) + ": evaluation logits after training");
    std::printf("    %s, optimizer on the device: weights after six steps %.2e\n", what, worst);
}

}  // namespace

MOPT_CUDA_TEST(transformer_cuda_device_optimizer_matches_cpu) {
    check_device_optimizer<backend::Cuda>(config_of(false), {1e-4, 1e-4, 1e-3}, "f32");
    nn::ModelConfig tied = config_of(false);
    tied.tie_embeddings = true;
    check_device_optimizer<backend::CudaBf16>(tied, {5e-3, 3e-2, 3e-2}, "bf16, tied embeddings");
}

// bf16 Switch pretraining, one step: bf16 activations move router logits by ~1e-2 relative, enough
// to flip a near-tied top-1 choice — a discontinuity no tolerance covers (a flipped row's output
// comes from another expert). So the batch is the first of 40 whose routing on the GPU is the CPU's
// in every layer; on it the loss, aux loss and every parameter's gradient agree within the bf16
// tolerances of check_pretraining.
void check_switch_bf16_step(const nn::ModelConfig& c) {
    Twins<Switch, backend::CudaBf16> t(c);
    auto& cpu = t.cpu;
    auto& gpu = t.gpu;
    const std::vector<autodiff::Parameter*>&pc = t.pc, &pg = t.pg;
    std::uint64_t seed = 40;
    for (;; ++seed) {
        CUDA_CHECK(seed < 80, "Switch bf16: no batch of 40 routed alike on the GPU and the CPU");
        const data::Batch b = batch_of(c.vocab_size, seed, 1);
        autodiff::NoGrad no_grad;
        autodiff::Tape tc, tg;
        if (same_routing(gpu.forward(tg, b.ids), cpu.forward(tc, b.ids))) break;
    }
    const data::Batch b = batch_of(c.vocab_size, seed, 1);
    autodiff::Tape tc, tg;
    const nn::ForwardOutput fc = cpu.forward(tc, b.ids, {.targets = &b.targets});
    const nn::ForwardOutput fg = gpu.forward(tg, b.ids, {.targets = &b.targets, .logits = false});
    CUDA_CHECK(same_routing(fg, fc), "Switch bf16: the training forward routed otherwise than the probe");
    CUDA_CHECK(scalar_error(fg.loss.item(), fc.loss.item()) <= 5e-3, "Switch bf16: loss ", fg.loss.item(), " vs CPU ",
               fc.loss.item());
    check_aux(fg, fc, 5e-3, "Switch bf16", 0);
    tc.backward(objective(fc));
    tg.backward(objective(fg));
    std::string off;
    double worst = 0.0;
    for (std::size_t i = 0; i < pc.size(); ++i) {
        const double e = cuda_test::relative_error(pg[i]->grad().span(), pc[i]->grad().span());
        worst = std::max(worst, e);
        if (e > 3e-2) off += " " + pc[i]->name() + " (" + std::to_string(e) + ")";
    }
    CUDA_CHECK(off.empty(), "Switch bf16: gradients off by more than 3e-2:", off);
    std::printf("    Switch bf16 (batch %llu routed alike): worst gradient error %.2e\n",
                static_cast<unsigned long long>(seed), worst);
}

// Switch pretraining: routers and experts trained on the GPU with the load-balancing and z losses;
// capacity 1.0 drops rows (their experts get no gradient from them, their routers do).
MOPT_CUDA_TEST(transformer_cuda_switch_pretraining_matches_cpu) {
    nn::ModelConfig c = config_of(true);
    c.capacity_factor = 1.0f;
    c.aux_loss_coef = 0.1f;
    c.z_loss_coef = 0.01f;
    check_pretraining<backend::Cuda, Switch>(c, {1e-4, 1e-4, 1e-3}, "Switch f32");
    check_device_optimizer<backend::Cuda, Switch>(c, {1e-4, 1e-4, 1e-3}, "Switch f32");
    check_switch_bf16_step(c);
}

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
    const std::string bad = error_of([&] {
        autodiff::Tape t;
        (void)m.gpu.forward(t, Tensor::full({1, 3}, 500.0f));
    });
    CUDA_CHECK(bad.find("ids must be i32") != std::string::npos, "f32 ids: got '", bad, "'");
}
