#pragma once
// nn::Transformer<Family, FFN, Compression, Prompt, backend::Cuda>: the same model type as with
// backend::Cpu — one change in the `using` line — whose forward and whose prompt backward run on the
// GPU (DeviceLlama, llama.cuh), compiled by nvcc in the user's .cu file.
//
// What lives where:
//   host (the backend::Cpu model this type derives from)   the weights as loaded or compressed (the
//       master copy: load, save, compress::compress, visit_linears, visit_parameters all act on it),
//       the prompt's parameters, their gradients and optimizer state, the tape;
//   device (built from the host weights at the first forward, and again after any call that could
//       change them: visit_linears, visit_parameters, blocks(), or weights_changed())   the weights
//       in backend::Cuda's storage (compressed weights dequantised) and the activations.
//
// forward(tape, ids, opt) runs the model on the GPU and returns ForwardOutput as the CPU model
// does. Its logits node carries the prompt's parameters as inputs: the loss is the tape's own
// cross_entropy on the (host) logits, and the node's backward uploads d loss / d logits, runs the
// device backward down to the prompt (DeviceLlama::enqueue_backward_to_prompt) and adds d prompt,
// d gate.w1 and d gate.w2 into the parameters' gradients. So every loop written for the CPU model —
// train::tune_prompt with clipping, schedules, checkpoints and resume, knowledge distillation,
// federated MoP training, eval::corpus_perplexity — runs unchanged. Also carried over:
//   Switch models: aux_loss (training, the layers from L_int on, as the CPU); its node's gradient
//       is the weight the device backward gives the layers' auxiliary losses;
//   MixtureOfPrompts: gate and gate_logits are nodes too (gate pretraining's cross-entropy on
//       gate_logits reaches W₁ and W₂ through a host backward of the small gate MLP);
//   decoding with a KV cache (eval::generate) runs on the host copy: the device has no KV cache yet.
// Pretraining: when model weights are trainable (and no prompt is), the node's backward runs the
// device backward to every weight (DeviceLlama::enqueue_backward_weights). A loop that steps with
// train::step(model, max_norm, optimizers…) over train::AdamW (examples/pretrain, pretrain_gpu) gets
// a device-resident optimizer: the first step runs on the host (clip_grad_norm, AdamW::step), then
// the parameters' values (f32 masters; bf16 storage keeps its rounded copy beside them) and the
// moments move to the GPU, and every later step stays there — the backward accumulates the
// gradient on the device, optimizer_step computes its global norm (one scalar read back), clips
// and runs AdamW (adamw.cuh) into the weights the next forward reads. Nothing else crosses the bus
// but the ids, targets and the loss. The host's copy is brought up to date when it is read: save(),
// train::save_checkpoint and AdamW::save fetch it; visit_parameters/visit_linears/blocks(),
// weights_changed(), decoding, and destroying or moving an optimizer bring it home for good;
// AdamW::load (resuming) makes the device drop its copy for the host's. A loop that calls
// clip_grad_norm and AdamW::step itself keeps working as before: each backward adds the weights'
// gradients into their parameters' grad() on the host, and the next forward uploads the weights. A forward with targets and ForwardOptions::logits =
// false (pretrain's) computes the loss on the device: no logits cross to the host. Switch models
// train their routers and experts too, with the load-balancing and z losses (aux_loss, as the CPU's).
// Trainable weights beside a learned prompt are refused. A model the GPU kernels do not take (head_dim 32/64/128) is refused too.
//
// Cost against a fully device-resident step (PromptTuner): each training forward copies the logits
// to the host and d logits back (B·T·vocab floats each way) and synchronises; for small vocabularies
// this is little, for 32000-token ones it is the price of sharing the CPU's loops. Pretraining adds
// a download of the weight gradients and an upload of the weights per step, and the host's AdamW.
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "mopt/autodiff/ops.hpp"
#include "mopt/backend/cuda/adamw.cuh"
#include "mopt/backend/cuda/allocator.cuh"
#include "mopt/backend/cuda/cuda.hpp"
#include "mopt/backend/cuda/llama.cuh"
#include "mopt/backend/cuda/llama_weights.hpp"
#include "mopt/nn/transformer.hpp"
#include "mopt/prompt/mixture_of_prompts.hpp"
#include "mopt/train/adamw.hpp"
#include "mopt/train/step.hpp"

namespace mopt::nn {

template <class FamilyT, class FFNT, class CompressionT, class PromptT, DType Storage>
class Transformer<FamilyT, FFNT, CompressionT, PromptT, backend::CudaBackend<Storage>>
    : public Transformer<FamilyT, FFNT, CompressionT, PromptT, backend::Cpu> {
public:
    using Base = Transformer<FamilyT, FFNT, CompressionT, PromptT, backend::Cpu>;
    using BackendType = backend::CudaBackend<Storage>;
    using Prompt = PromptT;
    using DeviceT = std::conditional_t<Storage == DType::f32, float, __nv_bfloat16>;
    static constexpr bool is_mixture = std::is_same_v<PromptT, prompt::MixtureOfPrompts>;

    using Base::Base;
    explicit Transformer(Base&& host) : Base(std::move(host)) {}

    static Transformer load(const std::filesystem::path& path) { return Transformer(Base::load(path)); }

    // Calls that may change the host weights: the device copy is rebuilt at the next forward.
    ~Transformer() {
        try {
            leave_device_optimizer(true);
        } catch (...) {  // a failing device at teardown: the optimizers keep their last fetched state
        }
    }
    // The host model moves; the device copy is rebuilt at the next forward (a device optimizer's
    // state comes home first: optimizers over the old object's parameters cannot follow it).
    Transformer(Transformer&& o) : Base((o.leave_device_optimizer(true), std::move(static_cast<Base&>(o)))) {}

    template <class F>
    void visit_linears(F&& f) {
        leave_device_optimizer(true);
        stale_ = true;
        Base::visit_linears(std::forward<F>(f));
    }
    template <class F>
    void visit_linears(std::size_t l, F&& f) {
        leave_device_optimizer(true);
        stale_ = true;
        Base::visit_linears(l, std::forward<F>(f));
    }
    template <class F>
    void visit_parameters(F&& f) {
        leave_device_optimizer(true);
        stale_ = true;
        Base::visit_parameters(std::forward<F>(f));
    }
    [[nodiscard]] auto& blocks() {
        leave_device_optimizer(true);
        stale_ = true;
        return Base::blocks();
    }
    // Tells the model its host weights changed by other means (the device copy is rebuilt).
    void weights_changed() {
        leave_device_optimizer(false);
        stale_ = true;
    }
    // Saves the weights (the device optimizer's, when it runs one) as Transformer<…, Cpu>::save.
    void save(const std::filesystem::path& dir, DType on_disk = DType::f32) {
        fetch_device_optimizer();
        Base::save(dir, on_disk);
    }

    // train::step's work for this model: clip the optimizers' gradients by their global norm
    // (max_norm <= 0: no clipping) and step them; returns the norm before clipping. Pretraining with
    // train::AdamW runs on the GPU from the second step on (see the header); anything else on the host.
    template <class... Optimizers>
    double optimizer_step(double max_norm, Optimizers&... optimizers) {
        constexpr bool adamw = (std::is_same_v<Optimizers, train::AdamW> && ...);
        if constexpr (adamw) {
            if (dopt_) {
                const std::vector<train::AdamW*> given{&optimizers...};
                if (given == dopt_->optimizers) return device_step(max_norm);
                leave_device_optimizer(true);  // other optimizers: the state goes home, this step runs there
            }
        }
        const double norm = train::detail::host_step(max_norm, optimizers...);
        if constexpr (adamw)
            if (training_weights_) enter_device_optimizer({&optimizers...});
        return norm;
    }
    // The device model (built on first use).
    [[nodiscard]] backend::cuda::DeviceLlama<DeviceT>& device() {
        sync_device();
        return *device_;
    }

    // ids: i32 [B, T] -> logits [B, T, vocab], the loss against opt.targets, expert statistics and
    // (MoP) the gate, as Transformer<…, Cpu>::forward; run on the GPU (see the header).
    ForwardOutput forward(autodiff::Tape& tape, const Tensor& ids, ForwardOptions opt = {}) {
        if (opt.cache != nullptr) {  // decoding: the host copy
            fetch_device_optimizer();
            return Base::forward(tape, ids, opt);
        }
        check(ids.rank() == 2 && ids.dtype() == DType::i32, "Transformer::forward: ids must be i32 [batch, seq], got ",
              name(ids.dtype()), " of shape ", ids.shape());
        check(ids.dim(1) > 0, "Transformer::forward: empty sequence (ids of shape ", ids.shape(), ")");
        check(opt.targets == nullptr || (opt.targets->shape() == ids.shape() && opt.targets->dtype() == DType::i32),
              "Transformer::forward: targets must be i32 of the ids' shape ", ids.shape());
        const bool weights = trainable_weights();
        sync_device();
        backend::cuda::DeviceLlama<DeviceT>& dev = *device_;
        if (weights_dirty_) {  // an optimizer stepped on the host weights since they were uploaded
            dev.update_weights(backend::cuda::llama_host_weights(static_cast<Base&>(*this)));
            weights_dirty_ = false;
        }
        const std::int64_t B = ids.dim(0), T = ids.dim(1), V = this->config().vocab_size;
        const backend::cuda::LlamaRunShape shape = run_shape(B, T);
        dev.reserve(shape);

        // The trained block [prompt | W₁ | W₂] and (MoP) the frozen input prompt and top-k.
        std::vector<autodiff::Parameter*> params = block_parameters();
        const std::int64_t values = shape.trainable_values(this->config().d_model);
        if (static_cast<std::int64_t>(block_.size()) != values) {
            block_ = backend::cuda::DeviceArray<float>(static_cast<std::size_t>(values), dev.stream());
            block_grad_ = backend::cuda::DeviceArray<float>(static_cast<std::size_t>(values), dev.stream());
        }
        if (values > 0) {
            std::vector<float> host(static_cast<std::size_t>(values));
            std::size_t at = 0;
            for (autodiff::Parameter* p : params) {
                const Tensor& v = p->value();
                std::memcpy(host.data() + at, v.f32(), static_cast<std::size_t>(v.numel()) * sizeof(float));
                at += static_cast<std::size_t>(v.numel());
            }
            backend::cuda::check_cuda(cudaStreamSynchronize(dev.stream()), "cudaStreamSynchronize (Transformer<Cuda>)");
            block_.upload(host);
        }
        if constexpr (is_mixture) {
            if (shape.experts > 0) {
                auto& mop = this->prompt();
                if (shape.input_prompt > 0) dev.set_input_prompt(mop.input_prompt.value().span());
                dev.set_gate_top_k(mop.config().top_k);
            }
        }

        training_weights_ = weights;
        if (weights && opt.targets != nullptr && !opt.logits) return device_loss(tape, ids, *opt.targets);
        bool train = weights;
        if (autodiff::grad_enabled())
            for (autodiff::Parameter* p : params) train = train || p->trainable();
        dev.set_batch(ids.span<std::int32_t>(), {});
        dev.enqueue_forward(values > 0 ? block_.data() : nullptr,
                            train ? backend::cuda::ForwardMode::keep : backend::cuda::ForwardMode::logits);
        Tensor logits = tape.alloc({B, T, V});
        dev.logits_to_host(logits.span());

        ForwardOutput out;
        std::vector<autodiff::Var> inputs;
        for (autodiff::Parameter* p : params) inputs.push_back(tape.parameter(*p));
        // Pretraining: one trainable weight stands for all as the node's input (so its backward runs);
        // the backward adds every weight's gradient into its parameter directly.
        if (weights) inputs.push_back(tape.parameter(*first_trainable_));
        aux_grad_ = 0.0f;
        if (train) {
            out.logits = record(tape, "cuda_forward", logits, inputs, &logits_backward);
        } else {
            out.logits = tape.constant(logits);
        }
        if (opt.targets != nullptr) out.loss = autodiff::cross_entropy(out.logits, *opt.targets);
        if constexpr (FFNT::has_experts) expert_outputs(tape, out, shape, train);
        if constexpr (is_mixture)
            if (shape.experts > 0) gate_outputs(tape, out, shape, inputs, train);
        return out;
    }

private:
    // Whether this forward trains model weights (gradients on, a model parameter trainable): allowed
    // for a model without a learned prompt (pretraining); weights beside a prompt are refused naming
    // the parameter.
    bool trainable_weights() {
        first_trainable_ = nullptr;
        if (!autodiff::grad_enabled()) return false;
        Base::visit_parameters([&](autodiff::Parameter& p) {
            if (p.trainable() && first_trainable_ == nullptr) first_trainable_ = &p;
        });
        if (first_trainable_ == nullptr) return false;
        const std::string& name = first_trainable_->name();
        check(run_shape(1, 1).prompt_len == 0, "Transformer<…, ", BackendType::name, ">: model parameter '", name,
              "' is trainable beside a learned prompt; this backend trains either the prompt of a frozen model "
              "(freeze it with set_trainable(false)) or the weights of a model without a prompt (pretraining)");
        return true;
    }

    void sync_device() {
        if (device_ && !stale_) return;
        block_ = {};  // arrays of the old model's stream go back first, then the model and its stream
        block_grad_ = {};
        weight_grad_ = {};
        weights_dirty_ = false;  // the new device copy is built from the host weights as they are
        device_.reset();
        const backend::cuda::LlamaHostWeights w = backend::cuda::llama_host_weights(static_cast<Base&>(*this));
        const backend::cuda::LlamaOptions o{.compute = backend::cuda::GemmCompute::f32};
        device_ = std::make_unique<backend::cuda::DeviceLlama<DeviceT>>(w, o);
        stale_ = false;
    }

    // The prompt's layout on the device, from the prompt layer's config (none before init_prompt).
    [[nodiscard]] backend::cuda::LlamaRunShape run_shape(std::int64_t B, std::int64_t T) {
        backend::cuda::LlamaRunShape s{.batch = B, .seq = T};
        if constexpr (PromptT::has_prompt) {
            if (this->prompt_positions() > 0) {
                const prompt::PromptConfig& c = this->prompt().config();
                s.prompt_len = c.length;
                s.inject_layer = c.inject_layer;
                if constexpr (is_mixture) {
                    s.experts = c.experts;
                    s.gate_dim = c.gate_dim;
                    s.input_prompt = c.input_prompt;
                }
            }
        }
        return s;
    }
    // The parameters in the device block's order: prompt, then (MoP) gate.w1, gate.w2.
    [[nodiscard]] std::vector<autodiff::Parameter*> block_parameters() {
        std::vector<autodiff::Parameter*> out;
        if constexpr (PromptT::has_prompt) {
            if (this->prompt_positions() > 0) {
                auto& p = this->prompt();
                out.push_back(&p.prompt);
                if constexpr (is_mixture) {
                    out.push_back(&p.gate.w1);
                    out.push_back(&p.gate.w2);
                }
            }
        }
        return out;
    }

    static autodiff::Var record(autodiff::Tape& tape, const char* op, Tensor value,
                                const std::vector<autodiff::Var>& in, autodiff::BackwardFn backward, const void* ctx) {
        autodiff::Var v;
        switch (in.size()) {
            case 1: v = tape.record(op, std::move(value), {in[0]}, backward); break;
            case 2: v = tape.record(op, std::move(value), {in[0], in[1]}, backward); break;
            case 3: v = tape.record(op, std::move(value), {in[0], in[1], in[2]}, backward); break;
            default: check(false, "Transformer<Cuda>: ", in.size(), " inputs for ", op);
        }
        tape.node(v).context = ctx;
        return v;
    }
    autodiff::Var record(autodiff::Tape& tape, const char* op, Tensor value, const std::vector<autodiff::Var>& in,
                         autodiff::BackwardFn backward) {
        return record(tape, op, std::move(value), in, backward, this);
    }
    static Transformer& self(const autodiff::Node& n) {
        return *static_cast<Transformer*>(const_cast<void*>(n.context));
    }

    // d loss / d logits -> the device backward -> d prompt, d W₁, d W₂ added into the inputs' gradients.
    static void logits_backward(autodiff::Tape& t, autodiff::Node& n) {
        Transformer& m = self(n);
        backend::cuda::DeviceLlama<DeviceT>& dev = *m.device_;
        dev.set_logits_gradient(n.grad.span());
        if (m.training_weights_) return m.weight_gradients(1.0f);
        dev.set_aux_loss_weight(m.aux_grad_);
        dev.enqueue_backward_to_prompt(m.block_grad_.data());
        backend::cuda::check_cuda(cudaStreamSynchronize(dev.stream()), "cudaStreamSynchronize (Transformer<Cuda> backward)");
        std::vector<float> g(m.block_grad_.size());
        m.block_grad_.download(g);
        std::size_t at = 0;
        for (int k = 0; k < n.num_in; ++k) {
            const std::int64_t count = t.value_of(n, k).numel();
            if (t.wants_grad(n, k)) {
                float* dst = t.grad_of(n, k).f32();
                for (std::int64_t i = 0; i < count; ++i) dst[i] += g[at + static_cast<std::size_t>(i)];
            }
            at += static_cast<std::size_t>(count);
        }
    }

    // Pretraining with ForwardOptions::logits = false: the loss (and d loss / d logits, in place) on
    // the device; only the scalar comes back. Its node's backward runs the device backward to the weights.
    ForwardOutput device_loss(autodiff::Tape& tape, const Tensor& ids, const Tensor& targets) {
        backend::cuda::DeviceLlama<DeviceT>& dev = *device_;
        dev.set_batch(ids.span<std::int32_t>(), targets.span<std::int32_t>());
        dev.enqueue_forward(nullptr, backend::cuda::ForwardMode::train);
        Tensor v = tape.alloc({});
        v.f32()[0] = dev.loss();
        ForwardOutput out;
        out.loss = record(tape, "cuda_loss", v, {tape.parameter(*first_trainable_)}, &loss_backward);
        aux_grad_ = 0.0f;
        if constexpr (FFNT::has_experts) expert_outputs(tape, out, run_shape(ids.dim(0), ids.dim(1)), true);
        return out;
    }
    // d objective / d loss scales every weight gradient (they are linear in it).
    static void loss_backward(autodiff::Tape&, autodiff::Node& n) { self(n).weight_gradients(n.grad.f32()[0]); }

    // Pretraining: scale × d loss / d every weight on the device, added into the trainable parameters' grad().
    void weight_gradients(float scale) {
        backend::cuda::DeviceLlama<DeviceT>& dev = *device_;
        const auto values = static_cast<std::size_t>(dev.weight_gradient_values());
        if (weight_grad_.size() != values) weight_grad_ = backend::cuda::DeviceArray<float>(values, dev.stream());
        // the backward differentiates loss + w·aux and the result is scaled: w = (d objective / d aux) / scale
        dev.set_aux_loss_weight(scale != 0.0f ? aux_grad_ / scale : 0.0f);
        dev.enqueue_backward_weights(weight_grad_.data());
        if (dopt_) {  // the optimizer runs on the device: the gradient stays there
            backend::cuda::add_scaled(dopt_->grad.data(), weight_grad_.data(), static_cast<std::int64_t>(values), scale,
                                      dev.stream());
            return;
        }
        backend::cuda::check_cuda(cudaStreamSynchronize(dev.stream()),
                                  "cudaStreamSynchronize (Transformer<Cuda> weight backward)");
        std::vector<float> g(values);
        weight_grad_.download(g);
        std::map<std::string, autodiff::Parameter*, std::less<>> by_name;
        Base::visit_parameters([&](autodiff::Parameter& p) { by_name[p.name()] = &p; });
        for (const auto& slot : dev.weight_gradient_layout()) {
            const auto it = by_name.find(slot.name);
            check(it != by_name.end() && it->second->numel() == slot.count, "Transformer<Cuda>: the device's gradient '",
                  slot.name, "' has no host parameter of ", slot.count, " values");
            if (!it->second->trainable()) continue;
            float* dst = it->second->grad().f32();
            const float* src = g.data() + slot.offset;
            for (std::int64_t i = 0; i < slot.count; ++i) dst[i] += scale * src[i];
        }
        weights_dirty_ = true;  // the optimizer steps next: upload the weights before the next forward
    }

    // The device-resident AdamW of pretraining (optimizer_step): per weight the parameter, its optimizer
    // and index there, the f32 weight it updates (the stored weight itself for f32 storage and norm
    // gains, else its f32 master) and the stored copy to round into; moments and the accumulated
    // gradient in the layout of the weight-gradient block.
    struct DeviceOptimizer {
        struct Slot {
            autodiff::Parameter* param = nullptr;
            std::size_t optimizer = 0, index = 0;
            std::int64_t offset = 0, count = 0;
            float* weight = nullptr;
            DeviceT* copy = nullptr;
        };
        std::vector<train::AdamW*> optimizers;
        std::vector<Slot> slots;
        backend::cuda::DeviceArray<float> master, m, v, grad;
        backend::cuda::DeviceArray<double> norm;  // [1]
    };

    // After the first (host) step: the parameters' values and the optimizers' moments move to the
    // device, and the optimizers are attached to it.
    void enter_device_optimizer(std::vector<train::AdamW*> optimizers) {
        backend::cuda::DeviceLlama<DeviceT>& dev = *device_;
        const cudaStream_t stream = dev.stream();
        auto o = std::make_unique<DeviceOptimizer>();
        std::map<const autodiff::Parameter*, std::pair<std::size_t, std::size_t>> where;
        std::size_t stepped = 0;
        for (std::size_t k = 0; k < optimizers.size(); ++k)
            for (std::size_t j = 0; j < optimizers[k]->parameters().size(); ++j, ++stepped)
                where[optimizers[k]->parameters()[j]] = {k, j};
        std::map<std::string, autodiff::Parameter*, std::less<>> by_name;
        Base::visit_parameters([&](autodiff::Parameter& p) { by_name[p.name()] = &p; });
        const auto values = static_cast<std::size_t>(dev.weight_gradient_values());
        if constexpr (!std::is_same_v<DeviceT, float>) o->master = backend::cuda::DeviceArray<float>(values, stream);
        o->m = backend::cuda::DeviceArray<float>(values, stream);
        o->v = backend::cuda::DeviceArray<float>(values, stream);
        o->grad = backend::cuda::DeviceArray<float>(values, stream);
        o->norm = backend::cuda::DeviceArray<double>(1, stream);
        o->grad.zero(stream);
        backend::cuda::check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize (device optimizer)");
        auto up = [](float* dst, const Tensor& src) {
            backend::cuda::check_cuda(cudaMemcpy(dst, src.f32(), static_cast<std::size_t>(src.numel()) * sizeof(float),
                                                 cudaMemcpyHostToDevice),
                                      "cudaMemcpy (device optimizer state upload)");
        };
        for (const auto& g : dev.weight_gradient_layout()) {
            const auto named = by_name.find(g.name);
            if (named == by_name.end()) continue;
            const auto it = where.find(named->second);
            if (it == where.end()) continue;  // frozen, or stepped by no optimizer given
            typename DeviceOptimizer::Slot slot{.param = named->second, .optimizer = it->second.first,
                                                .index = it->second.second, .offset = g.offset, .count = g.count};
            if (g.gain != nullptr) {
                slot.weight = g.gain;
            } else if constexpr (std::is_same_v<DeviceT, float>) {
                slot.weight = g.weight;
            } else {
                slot.weight = o->master.data() + g.offset;
                slot.copy = g.weight;
            }
            check(slot.param->numel() == g.count, "Transformer<Cuda>: the device's weight '", g.name, "' has ", g.count,
                  " values, its parameter ", slot.param->numel());
            train::AdamW& opt = *optimizers[slot.optimizer];
            up(slot.weight, slot.param->value());
            up(o->m.data() + g.offset, opt.first_moment(slot.index));
            up(o->v.data() + g.offset, opt.second_moment(slot.index));
            if (slot.copy != nullptr) backend::cuda::round_to(slot.copy, slot.weight, g.count, stream);
            o->slots.push_back(slot);
        }
        if (o->slots.size() != stepped) {  // an optimizer's parameter the device has no gradient for: stay on the host
            for (const auto& [param, at] : where) {
                bool found = false;
                for (const auto& slot : o->slots) found = found || slot.param == param;
                check(found, "Transformer<Cuda>: the optimizer's parameter '", param->name(),
                      "' has no weight gradient on the device");
            }
        }
        backend::cuda::check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize (device optimizer)");
        o->optimizers = std::move(optimizers);
        for (train::AdamW* opt : o->optimizers)
            opt->attach({.fetch = [this] { fetch_device_optimizer(); },
                         .release = [this](bool fetch_first) { leave_device_optimizer(fetch_first); }});
        dopt_ = std::move(o);
        weights_dirty_ = false;  // the device's weights are the host's (and from now on, ahead of them)
    }

    // The device's weights and moments into the host's parameters and optimizers (they stay on the device).
    void fetch_device_optimizer() {
        if (!dopt_) return;
        backend::cuda::check_cuda(cudaStreamSynchronize(device_->stream()), "cudaStreamSynchronize (device optimizer)");
        auto down = [](Tensor& dst, const float* src) {
            backend::cuda::check_cuda(cudaMemcpy(dst.f32(), src, static_cast<std::size_t>(dst.numel()) * sizeof(float),
                                                 cudaMemcpyDeviceToHost),
                                      "cudaMemcpy (device optimizer state download)");
        };
        for (const auto& slot : dopt_->slots) {
            train::AdamW& opt = *dopt_->optimizers[slot.optimizer];
            down(slot.param->value(), slot.weight);
            down(opt.first_moment(slot.index), dopt_->m.data() + slot.offset);
            down(opt.second_moment(slot.index), dopt_->v.data() + slot.offset);
        }
    }

    // The optimizers go back to the host: fetch_first brings the state (and a gradient not yet
    // stepped, into grad()) home; without it the host's state replaced the device's (the weights are
    // uploaded at the next forward).
    void leave_device_optimizer(bool fetch_first) {
        if (!dopt_) return;
        if (fetch_first) {
            fetch_device_optimizer();
            std::vector<float> g;
            for (const auto& slot : dopt_->slots) {
                g.resize(static_cast<std::size_t>(slot.count));
                backend::cuda::check_cuda(cudaMemcpy(g.data(), dopt_->grad.data() + slot.offset,
                                                     g.size() * sizeof(float), cudaMemcpyDeviceToHost),
                                          "cudaMemcpy (device optimizer gradient download)");
                float* dst = slot.param->grad().f32();
                for (std::size_t i = 0; i < g.size(); ++i) dst[i] += g[i];
            }
        } else {
            weights_dirty_ = true;
        }
        backend::cuda::check_cuda(cudaStreamSynchronize(device_->stream()), "cudaStreamSynchronize (device optimizer)");
        const std::unique_ptr<DeviceOptimizer> o = std::move(dopt_);
        for (train::AdamW* opt : o->optimizers) opt->detach();
    }

    // One step on the device: the accumulated gradient's global norm, the clipping factor, AdamW
    // per weight (each optimizer's options and step count), and the gradient zeroed.
    double device_step(double max_norm) {
        DeviceOptimizer& o = *dopt_;
        const cudaStream_t stream = device_->stream();
        o.norm.zero(stream);
        for (const auto& slot : o.slots) backend::cuda::sum_squares(o.grad.data() + slot.offset, slot.count, o.norm.data(), stream);
        double sq = 0.0;
        backend::cuda::check_cuda(cudaMemcpyAsync(&sq, o.norm.data(), sizeof(double), cudaMemcpyDeviceToHost, stream),
                                  "cudaMemcpyAsync (gradient norm)");
        backend::cuda::check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize (gradient norm)");
        if (!std::isfinite(sq)) {  // name the first weight whose gradient is not finite, as clip_grad_norm does
            for (const auto& slot : o.slots) {
                o.norm.zero(stream);
                backend::cuda::sum_squares(o.grad.data() + slot.offset, slot.count, o.norm.data(), stream);
                double own = 0.0;
                backend::cuda::check_cuda(cudaMemcpyAsync(&own, o.norm.data(), sizeof(double), cudaMemcpyDeviceToHost, stream),
                                          "cudaMemcpyAsync (gradient norm)");
                backend::cuda::check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize (gradient norm)");
                check(std::isfinite(own), "clip_grad_norm: gradient of '", slot.param->name(), "' is not finite");
            }
        }
        const double norm = std::sqrt(sq);
        const float factor = max_norm > 0.0 && norm > max_norm ? static_cast<float>(max_norm / norm) : 1.0f;
        std::vector<backend::cuda::AdamWStep> steps;
        for (train::AdamW* opt : o.optimizers) {  // train::AdamW::step's scalars
            const train::AdamWOptions& a = opt->options();
            const auto t = static_cast<float>(opt->advance());
            steps.push_back({.lr = a.lr, .beta1 = a.beta1, .beta2 = a.beta2, .eps = a.eps, .weight_decay = a.weight_decay,
                             .bc1 = 1.0f - std::pow(a.beta1, t), .bc2 = 1.0f - std::pow(a.beta2, t),
                             .grad_scale = factor});
        }
        for (const auto& slot : o.slots)
            backend::cuda::adamw_update(slot.weight, o.m.data() + slot.offset, o.v.data() + slot.offset,
                                        o.grad.data() + slot.offset, slot.count, steps[slot.optimizer], slot.copy, stream);
        o.grad.zero(stream);
        return norm;
    }

    // Switch layers: routing statistics of every layer; in training the auxiliary loss of the layers
    // from L_int on (the CPU's, whose routers see trainable inputs there; pretraining: every layer).
    void expert_outputs(autodiff::Tape& tape, ForwardOutput& out, const backend::cuda::LlamaRunShape& shape, bool train) {
        const std::vector<backend::cuda::SwitchStats> stats = device_->expert_stats();
        std::int64_t layer = 0;
        for (std::size_t i = 0; i < stats.size(); ++i, ++layer) {
            while (!this->config().has_experts(layer)) ++layer;
            const backend::cuda::SwitchStats& s = stats[i];
            ExpertStats e{.layer = layer, .tokens = s.tokens, .dropped = s.dropped,
                          .router_entropy = s.router_entropy, .aux_loss = s.balance};
            for (const std::int64_t a : s.assigned)
                e.fraction.push_back(static_cast<double>(a) / static_cast<double>(std::max<std::int64_t>(s.tokens, 1)));
            out.experts.push_back(std::move(e));
        }
        const ModelConfig& c = this->config();
        if (!train || (c.aux_loss_coef <= 0.0f && c.z_loss_coef <= 0.0f) || (shape.prompt_len == 0 && !training_weights_))
            return;
        Tensor v = tape.alloc({});
        v.f32()[0] = static_cast<float>(device_->aux_loss());
        out.aux_loss = record(tape, "cuda_aux_loss", v, {out.logits.defined() ? out.logits : out.loss}, &aux_backward);
    }
    // Runs before logits_backward (recorded after it): keeps the objective's weight on aux_loss.
    static void aux_backward(autodiff::Tape&, autodiff::Node& n) { self(n).aux_grad_ += n.grad.f32()[0]; }

    // MoP: gate probabilities and logits [B, E]; in training nodes over W₁, W₂ (gate_backward below).
    void gate_outputs(autodiff::Tape& tape, ForwardOutput& out, const backend::cuda::LlamaRunShape& shape,
                      const std::vector<autodiff::Var>& inputs, bool train) {
        gate_state_ = device_->gate_state();
        const std::int64_t B = shape.batch, E = shape.experts;
        Tensor z = tape.alloc({B, E}), g = tape.alloc({B, E});
        std::memcpy(z.f32(), gate_state_.logits.data(), gate_state_.logits.size() * sizeof(float));
        std::memcpy(g.f32(), gate_state_.probs.data(), gate_state_.probs.size() * sizeof(float));
        if (!train) {
            out.gate_logits = tape.constant(z);
            out.gate = tape.constant(g);
            return;
        }
        const std::vector<autodiff::Var> gate_in{inputs[1], inputs[2]};
        out.gate_logits = record(tape, "cuda_gate_logits", z, gate_in, &gate_logits_backward);
        out.gate = record(tape, "cuda_gate", g, gate_in, &gate_probs_backward);
    }
    static void gate_logits_backward(autodiff::Tape& t, autodiff::Node& n) {
        self(n).gate_weight_gradients(t, n, n.grad.f32());
    }
    static void gate_probs_backward(autodiff::Tape& t, autodiff::Node& n) {  // dz = g ⊙ (dg − ⟨g, dg⟩)
        const std::int64_t B = n.value.dim(0), E = n.value.dim(1);
        std::vector<float> dz(static_cast<std::size_t>(B * E));
        for (std::int64_t b = 0; b < B; ++b) {
            const float* g = n.value.f32() + b * E;
            const float* dg = n.grad.f32() + b * E;
            double dot = 0.0;
            for (std::int64_t e = 0; e < E; ++e) dot += static_cast<double>(g[e]) * dg[e];
            for (std::int64_t e = 0; e < E; ++e) dz[b * E + e] = g[e] * (dg[e] - static_cast<float>(dot));
        }
        self(n).gate_weight_gradients(t, n, dz.data());
    }
    // dW₂ += dzᵀ h; dh = (dz W₂) ⊙ [h > 0]; dW₁ += dhᵀ avg (the gate MLP's backward on the host: its
    // inputs avg are frozen activations, so no gradient goes further).
    void gate_weight_gradients(autodiff::Tape& t, const autodiff::Node& n, const float* dz) {
        const std::int64_t B = n.value.dim(0), E = n.value.dim(1), d = this->config().d_model;
        const Tensor& w2 = t.value_of(n, 1);
        const std::int64_t G = w2.dim(1);
        std::vector<float> dh(static_cast<std::size_t>(B * G), 0.0f);
        for (std::int64_t b = 0; b < B; ++b)
            for (std::int64_t k = 0; k < G; ++k) {
                if (gate_state_.hidden[b * G + k] <= 0.0f) continue;
                float s = 0.0f;
                for (std::int64_t e = 0; e < E; ++e) s += dz[b * E + e] * w2.f32()[e * G + k];
                dh[b * G + k] = s;
            }
        if (t.wants_grad(n, 1)) {
            float* dw2 = t.grad_of(n, 1).f32();
            for (std::int64_t e = 0; e < E; ++e)
                for (std::int64_t k = 0; k < G; ++k)
                    for (std::int64_t b = 0; b < B; ++b) dw2[e * G + k] += dz[b * E + e] * gate_state_.hidden[b * G + k];
        }
        if (t.wants_grad(n, 0)) {
            float* dw1 = t.grad_of(n, 0).f32();
            for (std::int64_t k = 0; k < G; ++k)
                for (std::int64_t b = 0; b < B; ++b) {
                    const float s = dh[b * G + k];
                    if (s == 0.0f) continue;
                    for (std::int64_t j = 0; j < d; ++j) dw1[k * d + j] += s * gate_state_.avg[b * d + j];
                }
        }
    }

    std::unique_ptr<backend::cuda::DeviceLlama<DeviceT>> device_;
    std::unique_ptr<DeviceOptimizer> dopt_;  // pretraining's AdamW on the device, once it runs there
    bool stale_ = true;
    bool weights_dirty_ = false;      // weight gradients were handed out: the host weights may have moved
    bool training_weights_ = false;   // the last forward's node trains the weights (pretraining)
    autodiff::Parameter* first_trainable_ = nullptr;
    backend::cuda::DeviceArray<float> weight_grad_;  // [DeviceLlama::weight_gradient_values()]
    backend::cuda::DeviceArray<float> block_, block_grad_;  // [prompt | W₁ | W₂] and its gradient
    float aux_grad_ = 0.0f;                                 // d objective / d aux_loss of the last forward
    typename backend::cuda::DeviceLlama<DeviceT>::GateState gate_state_;
};

}  // namespace mopt::nn
