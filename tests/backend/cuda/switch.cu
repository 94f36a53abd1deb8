// The Switch (top-1 mixture of experts) feed-forward on the GPU (backend/cuda/switch.cuh) and
// DeviceLlama on a Switch model, against mopt's CPU nn::SwitchFFN and Transformer (through the
// g++-compiled switch_reference.cpp).
//
// One layer (N = 150 or 600 rows, d = 64, F = 96, E = 4): the output, the input gradient of
// Σ out ⊙ dy + aux_weight · aux, and the routing statistics (rows per expert, dropped rows, balance,
// entropy, aux loss), f32 ≤ 1e-4 and bf16 ≤ 1e-2 (normwise, cuda_test.cuh; the bf16 run and the CPU
// start from the same bf16 weights and inputs), with several GEMM chunk sizes; a case where the
// capacity drops rows (600 rows over 3 tiles of the counting sort, so the token order of the drop
// crosses tiles) and an expert gets no rows, with the load-balancing and z losses in the objective;
// and a CUDA-graph replay after the inputs and weights changed (the routing is all on the device).
//
// Whole model (d = 128, 2 or 4 layers, 4 heads over 2 kv heads, FFN 64, 4 experts, B = 2, T = 19,
// K = 5): logits, loss, aux loss, prompt gradient and each layer's routing against the CPU
// Transformer<Llama, SwitchFFN<Top1, …>> with a SoftPrompt, f32 ≤ 1e-4; bf16 ≤ 3e-2 as llama.cu
// (about 35 bf16 roundings end to end) on a model whose routing is designed to survive bf16 rounding
// (switch_reference.hpp: a flipped top-1 would be an O(1) difference, not a rounding one); AdamW
// steps on the GPU's gradients against train::AdamW, and a CUDA-graph replay of the train forward +
// backward against eager runs. (prompt_tuner.cuh is not included: its kernels are not templates, so
// a second test file including it, after llama.cu, would define them twice at link time.)
#include <cuda_bf16.h>

#include <cmath>
#include <span>
#include <type_traits>
#include <vector>

#include <mopt/backend/cuda/llama.cuh>
#include <mopt/backend/cuda/switch.cuh>

#include "cuda_test.cuh"
#include "switch_reference.hpp"

namespace {

namespace cuda = mopt::backend::cuda;
using bf16 = __nv_bfloat16;
using mopt::cuda_test::SwitchCase;
using mopt::cuda_test::SwitchLlamaCase;
using mopt::cuda_test::SwitchLlamaReference;
using mopt::cuda_test::device_prompt;
using mopt::cuda_test::download;
using mopt::cuda_test::SwitchReference;

using mopt::cuda_test::scalar_error;

template <class T>
cuda::DeviceArray<T> device(const std::vector<float>& v) {
    std::vector<T> t(v.size());
    for (std::size_t i = 0; i < v.size(); ++i) t[i] = cuda::from_f32<T>(v[i]);
    cuda::DeviceArray<T> a(v.size());
    a.upload(t);
    return a;
}

template <class T>
std::vector<float> host(const cuda::DeviceArray<T>& a) {
    cuda::check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    std::vector<T> t(a.size());
    a.download(t);
    std::vector<float> v(t.size());
    for (std::size_t i = 0; i < t.size(); ++i) v[i] = cuda::to_f32(t[i]);
    return v;
}

std::vector<float> sum(const std::vector<float>& a, const std::vector<float>& b) {
    std::vector<float> s(a.size());
    for (std::size_t i = 0; i < a.size(); ++i) s[i] = a[i] + b[i];
    return s;
}

struct Stream {
    cudaStream_t s = nullptr;
    Stream() { cuda::check_cuda(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreateWithFlags"); }
    ~Stream() {
        (void)cudaStreamSynchronize(s);
        (void)cudaStreamDestroy(s);
    }
};

cuda::SwitchConfig config_of(const SwitchCase& c, std::int64_t chunk_rows) {
    return {.d_model = c.d_model, .d_ff = c.d_ff, .experts = c.experts, .capacity_factor = c.capacity_factor,
            .aux_loss_coef = c.aux_loss_coef, .z_loss_coef = c.z_loss_coef, .chunk_rows = chunk_rows};
}

// The layer's routing statistics against the CPU's.
void check_stats(const cuda::SwitchStats& st, const SwitchReference& ref, double tol) {
    CUDA_CHECK(st.assigned == ref.assigned, "rows per expert differ from the CPU's (a different top-1)");
    CUDA_CHECK(st.dropped == ref.dropped, "dropped rows ", st.dropped, " vs CPU ", ref.dropped);
    CUDA_CHECK(scalar_error(st.balance, ref.balance) <= tol, "balance ", st.balance, " vs CPU ", ref.balance);
    CUDA_CHECK(scalar_error(st.router_entropy, ref.router_entropy) <= tol, "router entropy ", st.router_entropy,
               " vs CPU ", ref.router_entropy);
    CUDA_CHECK(std::abs(st.aux_loss - ref.aux_loss) <= tol * std::max(std::abs(ref.aux_loss), 1e-3), "aux loss ",
               st.aux_loss, " vs CPU ", ref.aux_loss);
}

// Forward (with and without the residual), backward and statistics of one layer against the CPU.
template <class T>
void check_layer(const SwitchCase& c, double tol, std::int64_t chunk_rows) {
    const SwitchReference ref = mopt::cuda_test::switch_reference(c);
    CUDA_CHECK(ref.min_margin > 1e-4, "test setup: a row's two best router probabilities are ", ref.min_margin,
               " apart, too close to call");
    Stream stream;
    const cuda::SwitchExpertWeights<T> w =
        cuda::upload_switch_weights<T>(ref.router, ref.gate, ref.up, ref.down, c.experts, c.d_model, c.d_ff, 0);
    cuda::DeviceSwitchFFN<T> ffn(config_of(c, chunk_rows), c.rows, 1, cuda::GemmCompute::f32, stream.s);
    cuda::DeviceArray<T> x = device<T>(ref.x), dy = device<T>(ref.dy);
    cuda::DeviceArray<T> out(ref.x.size()), dx(ref.x.size());
    cuda::check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");

    ffn.forward(0, w.view(), x.data(), x.data(), out.data());  // out = x + Switch(x)
    CUDA_CHECK_CLOSE(host(out), sum(ref.x, ref.out), tol, "x + Switch(x)");
    ffn.forward(0, w.view(), x.data(), nullptr, out.data());
    ffn.backward(0, w.view(), dy.data(), dx.data(), c.aux_weight);
    CUDA_CHECK_CLOSE(host(out), ref.out, tol, "Switch(x)");
    CUDA_CHECK_CLOSE(host(dx), ref.dx, tol, "d objective / d x");
    check_stats(ffn.stats().at(0), ref, tol);

    bool threw = false;  // the backward consumed what the forward saved
    try {
        ffn.backward(0, w.view(), dy.data(), dx.data(), c.aux_weight);
    } catch (const mopt::Error&) {
        threw = true;
    }
    CUDA_CHECK(threw, "a second backward after one forward must be refused");
}

const SwitchCase capacity_case{.rows = 600,
                               .capacity_factor = 1.0f,
                               .aux_loss_coef = 0.1f,
                               .z_loss_coef = 0.01f,
                               .aux_weight = 1.0f,
                               .idle_expert = true};

}  // namespace

MOPT_CUDA_TEST(switch_ffn_f32_matches_cpu) {
    for (std::int64_t chunk : {1, 16, 64, 128}) check_layer<float>(SwitchCase{}, 1e-4, chunk);
}

MOPT_CUDA_TEST(switch_ffn_f32_capacity_drops_and_idle_expert) {
    const SwitchReference ref = mopt::cuda_test::switch_reference(capacity_case);
    CUDA_CHECK(ref.dropped > 0 && ref.assigned.back() == 0, "test setup: the CPU dropped ", ref.dropped,
               " rows and gave the last expert ", ref.assigned.back());
    for (std::int64_t chunk : {16, 64}) check_layer<float>(capacity_case, 1e-4, chunk);
}

MOPT_CUDA_TEST(switch_ffn_bf16_matches_cpu) {
    check_layer<bf16>(SwitchCase{.bf16 = true}, 1e-2, 64);
    SwitchCase c = capacity_case;
    c.bf16 = true;
    check_layer<bf16>(c, 1e-2, 64);
}

// Capture forward + backward once, then change the weights and inputs in place (another seed:
// another routing, other counts and drops) and replay: the replay must give the new case's results,
// so nothing about the routing was fixed at capture; replays allocate nothing.
MOPT_CUDA_TEST(switch_ffn_graph_replay_reroutes) {
    using T = bf16;
    SwitchCase a = capacity_case, b = capacity_case;
    a.bf16 = b.bf16 = true;
    b.seed = 2;
    const SwitchReference ra = mopt::cuda_test::switch_reference(a), rb = mopt::cuda_test::switch_reference(b);
    CUDA_CHECK(ra.assigned != rb.assigned, "test setup: the two cases route alike");
    Stream stream;
    cuda::SwitchExpertWeights<T> w =
        cuda::upload_switch_weights<T>(ra.router, ra.gate, ra.up, ra.down, a.experts, a.d_model, a.d_ff, 0);
    cuda::DeviceSwitchFFN<T> ffn(config_of(a, 64), a.rows, 1, cuda::GemmCompute::f32, stream.s);
    cuda::DeviceArray<T> x = device<T>(ra.x), dy = device<T>(ra.dy);
    cuda::DeviceArray<T> out(ra.x.size()), dx(ra.x.size());
    cuda::check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    auto step = [&] {
        ffn.forward(0, w.view(), x.data(), nullptr, out.data());
        ffn.backward(0, w.view(), dy.data(), dx.data(), a.aux_weight);
    };
    step();  // eager first: cuBLAS and the kernels initialise outside the capture
    cuda::check_cuda(cudaStreamSynchronize(stream.s), "cudaStreamSynchronize");
    const std::size_t mallocs = cuda::Allocator::instance().stats().cuda_malloc_calls;
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    cuda::check_cuda(cudaStreamBeginCapture(stream.s, cudaStreamCaptureModeRelaxed), "cudaStreamBeginCapture");
    step();
    cuda::check_cuda(cudaStreamEndCapture(stream.s, &graph), "cudaStreamEndCapture");
    cuda::check_cuda(cudaGraphInstantiate(&exec, graph, 0), "cudaGraphInstantiate");
    (void)cudaGraphDestroy(graph);

    cuda::check_cuda(cudaGraphLaunch(exec, stream.s), "cudaGraphLaunch");
    CUDA_CHECK_CLOSE(host(out), ra.out, 1e-2, "replay of case a: Switch(x)");
    CUDA_CHECK_CLOSE(host(dx), ra.dx, 1e-2, "replay of case a: dx");

    // Case b into the same buffers.
    const cuda::SwitchExpertWeights<T> wb =
        cuda::upload_switch_weights<T>(rb.router, rb.gate, rb.up, rb.down, b.experts, b.d_model, b.d_ff, 0);
    auto copy = [](auto& dst, const auto& src) {
        cuda::check_cuda(cudaMemcpy(dst.data(), src.data(), src.size() * sizeof(T), cudaMemcpyDeviceToDevice),
                         "cudaMemcpy (new weights)");
    };
    copy(w.router, wb.router);
    copy(w.gate_up, wb.gate_up);
    copy(w.down, wb.down);
    cuda::DeviceArray<T> xb = device<T>(rb.x), dyb = device<T>(rb.dy);
    copy(x, xb);
    copy(dy, dyb);
    cuda::check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    cuda::check_cuda(cudaGraphLaunch(exec, stream.s), "cudaGraphLaunch");
    CUDA_CHECK_CLOSE(host(out), rb.out, 1e-2, "replay of case b: Switch(x)");
    CUDA_CHECK_CLOSE(host(dx), rb.dx, 1e-2, "replay of case b: dx");
    check_stats(ffn.stats().at(0), rb, 1e-2);
    (void)cudaGraphExecDestroy(exec);
    CUDA_CHECK(cuda::Allocator::instance().stats().cuda_malloc_calls == mallocs,
               "the captured Switch step called cudaMalloc");
}

namespace {

cuda::LlamaRunShape shape_of(const SwitchLlamaCase& c) {
    return {.batch = c.batch, .seq = c.seq, .prompt_len = c.prompt_len};
}

// Each Switch layer's rows per expert and dropped rows against the CPU's.
template <class T>
void check_routing(const cuda::DeviceLlama<T>& model, const SwitchLlamaReference& ref) {
    const std::vector<cuda::SwitchStats> st = model.expert_stats();
    CUDA_CHECK(st.size() == ref.assigned.size(), st.size(), " Switch layers vs the CPU's ", ref.assigned.size());
    for (std::size_t l = 0; l < st.size(); ++l) {
        CUDA_CHECK(st[l].assigned == ref.assigned[l], "Switch layer ", l, ": rows per expert differ from the CPU's");
        CUDA_CHECK(st[l].dropped == ref.dropped[l], "Switch layer ", l, ": dropped ", st[l].dropped, " vs CPU ",
                   ref.dropped[l]);
    }
}

// Logits, loss, aux loss, routing and the prompt gradient of the objective, against the CPU.
template <class T>
void check_llama(const SwitchLlamaCase& c, double tol, double loss_tol) {
    const SwitchLlamaReference ref = mopt::cuda_test::switch_llama_reference(c);
    cuda::DeviceLlama<T> model(ref.weights, {.aux_loss_weight = c.aux_weight});
    model.reserve(shape_of(c));
    cuda::DeviceArray<float> prompt = device_prompt(ref.prompt);

    model.forward_logits(ref.ids, prompt.data());
    CUDA_CHECK_CLOSE(model.logits_host(), ref.logits, tol, "logits");
    check_routing(model, ref);
    const float eval_loss = model.forward(ref.ids, ref.targets, prompt.data(), cuda::ForwardMode::loss);
    CUDA_CHECK(scalar_error(eval_loss, ref.loss) <= loss_tol, "evaluation loss ", eval_loss, " vs CPU ", ref.loss);
    const double aux = model.aux_loss();
    CUDA_CHECK(std::abs(aux - ref.aux_loss) <= tol * std::max(ref.aux_loss, 1e-3), "aux loss ", aux, " vs CPU ",
               ref.aux_loss);

    const float train_loss = model.forward(ref.ids, ref.targets, prompt.data(), cuda::ForwardMode::train);
    CUDA_CHECK(scalar_error(train_loss, ref.loss) <= loss_tol, "train loss ", train_loss, " vs CPU ", ref.loss);
    cuda::DeviceArray<float> grad(ref.prompt.size());
    model.backward_to_prompt(grad.data());
    CUDA_CHECK_CLOSE(download(grad), ref.prompt_grad, tol, "d (loss + aux) / d prompt");
}

const SwitchLlamaCase dropping_case{.capacity_factor = 1.0f, .aux_loss_coef = 0.1f, .z_loss_coef = 0.01f,
                                    .aux_weight = 1.0f};

}  // namespace

MOPT_CUDA_TEST(switch_llama_f32_matches_cpu_with_capacity_and_aux) {
    const SwitchLlamaReference ref = mopt::cuda_test::switch_llama_reference(dropping_case);
    CUDA_CHECK(ref.dropped.at(0) > 0 && ref.dropped.at(1) > 0, "test setup: no row dropped on the CPU");
    check_llama<float>(dropping_case, 1e-4, 1e-4);
}

MOPT_CUDA_TEST(switch_llama_f32_every_other_layer_matches_cpu) {
    check_llama<float>(SwitchLlamaCase{.n_layers = 4, .every_other_layer = true}, 1e-4, 1e-4);
}

MOPT_CUDA_TEST(switch_llama_bf16_matches_cpu) {
    SwitchLlamaCase c = dropping_case;
    c.bf16_weights = true;
    c.designed_routing = true;
    check_llama<bf16>(c, 3e-2, 2e-3);
}

// Three prompt-tuning steps on the same batch, the GPU's gradient of loss + aux at each prompt
// driving train/adamw.hpp's update (on the host here: prompt_tuner.cuh's fused AdamW is tested in
// llama.cu): the losses and the final prompt equal train::AdamW's on the CPU, where the routing of
// the prompt rows follows the prompt; no cudaMalloc after the first step.
MOPT_CUDA_TEST(switch_llama_f32_adamw_steps_match_cpu) {
    const SwitchLlamaCase c{.capacity_factor = 1.25f, .aux_loss_coef = 0.1f, .aux_weight = 1.0f, .adamw_steps = 3};
    const SwitchLlamaReference ref = mopt::cuda_test::switch_llama_reference(c);
    cuda::DeviceLlama<float> model(ref.weights, {.aux_loss_weight = c.aux_weight});
    model.reserve(shape_of(c));
    std::vector<float> p = ref.prompt, m(p.size(), 0.0f), v(p.size(), 0.0f);
    cuda::DeviceArray<float> prompt(p.size()), grad(p.size());
    const float beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f;  // train::AdamWOptions' defaults
    std::size_t mallocs_after_first = 0;
    for (int s = 0; s < c.adamw_steps; ++s) {
        prompt.upload(p);
        cuda::check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
        const float loss = model.forward(ref.ids, ref.targets, prompt.data(), cuda::ForwardMode::train);
        CUDA_CHECK(scalar_error(loss, ref.step_losses[s]) <= 1e-4, "step ", s + 1, " loss ", loss, " vs CPU ",
                   ref.step_losses[s]);
        model.backward_to_prompt(grad.data());
        const std::vector<float> g = download(grad);
        const float t = static_cast<float>(s + 1);
        const float bc1 = 1.0f - std::pow(beta1, t), bc2 = 1.0f - std::pow(beta2, t);
        for (std::size_t i = 0; i < p.size(); ++i) {
            m[i] = beta1 * m[i] + (1.0f - beta1) * g[i];
            v[i] = beta2 * v[i] + (1.0f - beta2) * g[i] * g[i];
            p[i] -= c.lr * ((m[i] / bc1) / (std::sqrt(v[i] / bc2) + eps) + c.weight_decay * p[i]);
        }
        if (s == 0) mallocs_after_first = cuda::Allocator::instance().stats().cuda_malloc_calls;
    }
    CUDA_CHECK_CLOSE(p, ref.tuned_prompt, 1e-4, "prompt after 3 AdamW steps");
    CUDA_CHECK(cuda::Allocator::instance().stats().cuda_malloc_calls == mallocs_after_first,
               "steps after the first called cudaMalloc");
}

// bf16 Switch model with capacity and aux loss: the train forward + backward_to_prompt captured once
// as a CUDA graph (as PromptTuner does) and replayed for five prompts equals the eager run at each
// (loss, gradient and every layer's routing, which may change as the prompt rows move); replays
// allocate nothing.
MOPT_CUDA_TEST(switch_llama_bf16_graph_replays_eager_steps) {
    SwitchLlamaCase c = dropping_case;
    c.bf16_weights = true;
    const SwitchLlamaReference ref = mopt::cuda_test::switch_llama_reference(c);
    cuda::DeviceLlama<bf16> model(ref.weights, {.aux_loss_weight = c.aux_weight});
    model.reserve(shape_of(c));
    cuda::DeviceArray<float> prompt(ref.prompt.size()), grad(ref.prompt.size());
    auto run = [&] {
        model.enqueue_forward(prompt.data(), cuda::ForwardMode::train);
        model.enqueue_backward_to_prompt(grad.data());
    };
    // Five prompts, each a signed-gradient step from the last (eager), and what the eager run gives at each.
    std::vector<std::vector<float>> prompts{ref.prompt}, grads;
    std::vector<float> losses;
    std::vector<std::vector<cuda::SwitchStats>> routing;
    for (int s = 0; s < 5; ++s) {
        prompt.upload(prompts.back());
        cuda::check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
        model.set_batch(ref.ids, ref.targets);
        run();
        losses.push_back(model.loss());
        grads.push_back(download(grad));
        routing.push_back(model.expert_stats());
        std::vector<float> next = prompts.back();
        for (std::size_t i = 0; i < next.size(); ++i)
            next[i] -= 0.05f * static_cast<float>((grads.back()[i] > 0.0f) - (grads.back()[i] < 0.0f));
        prompts.push_back(std::move(next));
    }

    cudaStream_t stream = model.stream();
    const std::size_t mallocs = cuda::Allocator::instance().stats().cuda_malloc_calls;
    model.set_batch(ref.ids, ref.targets);  // the upload stays outside the graph, as in PromptTuner
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    cuda::check_cuda(cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed), "cudaStreamBeginCapture");
    run();
    cuda::check_cuda(cudaStreamEndCapture(stream, &graph), "cudaStreamEndCapture");
    cuda::check_cuda(cudaGraphInstantiate(&exec, graph, 0), "cudaGraphInstantiate");
    (void)cudaGraphDestroy(graph);
    for (int s = 0; s < 5; ++s) {
        prompt.upload(prompts[static_cast<std::size_t>(s)]);
        cuda::check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
        cuda::check_cuda(cudaGraphLaunch(exec, stream), "cudaGraphLaunch");
        const float loss = model.loss();
        CUDA_CHECK(scalar_error(loss, losses[s]) <= 1e-6, "replay ", s + 1, " loss ", loss, " vs eager ", losses[s]);
        CUDA_CHECK_CLOSE(download(grad), grads[s], 1e-6, "replay's prompt gradient");
        const std::vector<cuda::SwitchStats> st = model.expert_stats();
        for (std::size_t l = 0; l < st.size(); ++l)
            CUDA_CHECK(st[l].assigned == routing[s][l].assigned && st[l].dropped == routing[s][l].dropped, "replay ",
                       s + 1, ", Switch layer ", l, ": routed differently from the eager run");
    }
    (void)cudaGraphExecDestroy(exec);
    CUDA_CHECK(cuda::Allocator::instance().stats().cuda_malloc_calls == mallocs, "graph replays called cudaMalloc");
}
