#!/usr/bin/env python3
"""PyTorch side of the issue-8 GPU benchmark (benchmarks/cuda_prompt_step.cu is mopt's side): one
prompt-tuning step of a frozen, randomly initialised Hugging Face LlamaForCausalLM in bf16 (SDPA
attention) and its forward evaluation, eager and under torch.compile. Prints one JSON line per shape
and mode with the same fields as cuda_prompt_step; benchmarks/cuda_vs_torch.sh compares them.

The step is PEFT's prompt tuning written out: the K prompt rows (an f32 master parameter, cast to
bf16) are concatenated before the token embeddings as inputs_embeds, positions 0..K+T-1, causal
attention over [prompt; text], logits of the T text rows only (logits_to_keep), mean cross-entropy
against the next tokens (-100 at each sequence's end), backward to the prompt alone (every model
weight has requires_grad False, so no weight gradient is computed), AdamW on the prompt.

Shape b is shape a with a mixture-of-experts feed-forward in every layer: Hugging Face's
MixtralForCausalLM with num_local_experts=8, num_experts_per_tok=1 (no capacity limit, no token
dropped; the routing weight of top-1 renormalises to 1, so unlike the Switch layer of mopt its router
gets no gradient, which costs the same matmuls). --experts-impl picks transformers' experts
implementation ("eager": a Python loop over the experts; "grouped_mm", "batched_mm"; default: what
transformers picks, grouped_mm in 5.x where torch has it); the JSON line records the one used.

Shape d is a Mixture of Prompts (Dun et al., "Sweeping Heterogeneity with Smart MoPs"; mopt's
prompt/mixture_of_prompts.hpp and prompt/gate.hpp) on shape a's LlamaForCausalLM, whose decoder
layers this script runs itself (embed_tokens, rotary_emb, layers[i], norm, lm_head): E = 7 experts x
p = 10 prompts = K = 70 prompt rows (an f32 master parameter P [K, d], expert-major: expert e owns
rows e*p..e*p+p-1) injected at layer L_int = 3, gate MLP of width d_g = 64.
  - layers 0..L_int-1 run on the T text rows alone, positions K..K+T-1 (causal over the text);
  - at the input of layer L_int: avg[b] = mean over the T text rows of x[b] (f32),
    g = softmax(W2 . ReLU(W1 . avg)) [B, E] (W1 [d_g, d], W2 [E, d_g], f32, no biases), and P (cast
    to bf16 after its scaling) is prepended: [B, K+T, d], positions 0..K+T-1, causal over all rows;
  - at the input of every layer l >= L_int the K prompt rows of expert e are multiplied by g[b, e]
    (so they fade layer by layer); the text rows pass unchanged;
  - final norm and lm_head on the T text rows; the loss, the targets and AdamW as above, on [P, W1,
    W2] (dense gate, no top-k, in the step and the evaluation). Nothing below layer L_int needs a
    gradient, so autograd records those layers nowhere and the backward stops at layer L_int.
Attention is transformers' SDPA with attention_mask=None, i.e. scaled_dot_product_attention's
is_causal=True (integrations/sdpa_attention.py sets is_causal when the mask is None and the query
has more than one row).

  python3 benchmarks/torch_prompt_step.py [--shapes a,c] [--steps 20] [--warmup 3] [--modes eager,compile] [--profile]
                                          [--peak-tflops 989] [--experts-impl eager|grouped_mm|batched_mm]
  (shapes: a, b, c, d; e.g. --shapes d for the Mixture of Prompts alone)

Model FLOPs are counted with the formula in cuda_prompt_step.cu (the forward's matmuls, twice the
matmuls' dX half for the backward, attention backward = 2 x forward; a top-1 MoE layer: the dense
FFN's matmuls plus the router's). With P_l = d*(H + 2*Hkv)*Dh + H*Dh*d + 3*d*F (+ d*E_moe for a
router) the matmul weights of one layer, S = K + T, n_layers layers:
  shapes a, b, c:  N = B*S, P_blk = n_layers*P_l, head = 2*B*T*d*V, attn = 4*n_layers*B*H*Dh*S(S+1)/2
                   forward = 2*N*P_blk + head + attn;   step = 2*(2*N*P_blk + head) + 3*attn
  shape d (MoP, L_int = inject layer, U = n_layers - L_int layers see the prompt, E experts, gate d_g):
    lower  = 2*B*T*L_int*P_l + 4*L_int*B*H*Dh*T(T+1)/2     layers < L_int: T text rows, forward only
    upper  = 2*B*S*U*P_l                                   layers >= L_int: K + T rows (matmuls)
    attn_u = 4*U*B*H*Dh*S(S+1)/2                           their causal attention over S rows
    head   = 2*B*T*d*V                                     logits of the text rows only
    gate   = 2*B*(d_g*d + E*d_g)                           the gate MLP (negligible)
    forward = lower + upper + attn_u + head + gate
    step    = lower + 2*(upper + head) + 3*attn_u + 3*gate
  (the backward runs through layers >= L_int only: their dX half of the matmuls, attention 2 x forward,
  the head's dX half; the layers below L_int are counted once, forward; the gate as a trained MLP,
  forward + dW + dX = 3 x forward; means, scalings and norms are not counted.)
"""
import argparse
import json
import sys

import torch
import torch.nn.functional as F

SHAPES = {
    "a": dict(d_model=768, layers=12, heads=12, kv_heads=12, d_ff=3072, vocab=32000, batch=8, seq=512,
              prompt_len=100),
    "b": dict(d_model=768, layers=12, heads=12, kv_heads=12, d_ff=3072, vocab=32000, batch=8, seq=512,
              prompt_len=100, experts=8, experts_per_token=1),
    "c": dict(d_model=4096, layers=32, heads=32, kv_heads=32, d_ff=11008, vocab=32000, batch=1, seq=1024,
              prompt_len=100),
    # Mixture of Prompts on shape a: 7 experts x 10 prompts, injected at layer 3, gate width 64
    "d": dict(d_model=768, layers=12, heads=12, kv_heads=12, d_ff=3072, vocab=32000, batch=8, seq=512,
              prompt_len=70, prompt_experts=7, prompt_per_expert=10, inject_layer=3, gate_dim=64),
}


def is_mop(s):
    """Whether the shape is a Mixture of Prompts (its prompt injected at an inner layer, gated per expert)."""
    return "inject_layer" in s


def model_flops(s):
    """(forward FLOPs, step FLOPs) by the formulas in the module docstring."""
    B, T, K = s["batch"], s["seq"], s["prompt_len"]
    S = K + T
    d, H, Hkv, F_, V, L = s["d_model"], s["heads"], s["kv_heads"], s["d_ff"], s["vocab"], s["layers"]
    Dh = d // H
    p_layer = d * (H + 2 * Hkv) * Dh + H * Dh * d + 3 * d * F_ + d * s.get("experts", 0)  # + routers
    head = 2 * B * T * d * V

    def attn(layers, rows):  # causal QK^T and PV over `rows` positions in `layers` layers
        return layers * 4 * B * H * Dh * rows * (rows + 1) / 2

    if not is_mop(s):
        N, p_blk = B * S, L * p_layer
        return 2 * N * p_blk + head + attn(L, S), 2 * (2 * N * p_blk + head) + 3 * attn(L, S)
    Li, E, Dg = s["inject_layer"], s["prompt_experts"], s["gate_dim"]
    U = L - Li
    lower = 2 * B * T * Li * p_layer + attn(Li, T)  # below the injection: text rows, forward only
    upper = 2 * B * S * U * p_layer                 # from the injection on: prompt + text rows
    attn_u = attn(U, S)
    gate = 2 * B * (Dg * d + E * Dg)
    return lower + upper + attn_u + head + gate, lower + 2 * (upper + head) + 3 * attn_u + 3 * gate


def build_model(s, experts_impl=None):
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    sizes = dict(vocab_size=s["vocab"], hidden_size=s["d_model"], intermediate_size=s["d_ff"],
                 num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                 max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False, use_cache=False,
                 attn_implementation="sdpa")
    if s.get("experts"):
        config = MixtralConfig(**sizes, num_local_experts=s["experts"], num_experts_per_tok=s["experts_per_token"],
                               output_router_logits=False)
        model_class = MixtralForCausalLM
    else:
        config = LlamaConfig(**sizes)
        model_class = LlamaForCausalLM
    # Built in bf16 directly on the GPU: a 7B model never exists in f32 or on the host.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = model_class(config)
    finally:
        torch.set_default_dtype(previous)
    model.to(device="cuda", dtype=torch.bfloat16)
    model.requires_grad_(False)  # frozen: only the prompt is trained
    model.eval()                 # no dropout (attention_dropout is 0 anyway); gradients still reach inputs_embeds
    if s.get("experts") and experts_impl:
        if hasattr(model, "set_experts_implementation"):
            model.set_experts_implementation(experts_impl)
        else:
            print(f"torch_prompt_step: warning: transformers {transformers_version()} cannot set the experts "
                  f"implementation; --experts-impl {experts_impl} ignored", file=sys.stderr)
    attn = getattr(model.config, "_attn_implementation", None)
    if attn != "sdpa":
        print(f"torch_prompt_step: warning: attention implementation is {attn!r}, not 'sdpa'", file=sys.stderr)
    return model


def transformers_version():
    import transformers

    return transformers.__version__


def experts_implementation(model, s):
    """The experts implementation a MoE model runs (None for dense shapes or transformers without the choice)."""
    if not s.get("experts"):
        return None
    return getattr(model.config, "_experts_implementation", None) or "eager (transformers without the choice)"


def make_loss(model, K, T):
    embed = model.get_input_embeddings()

    # prompt: f32 [K, d], ids, targets: [B, T] -> mean next-token cross-entropy over the text rows
    def loss_fn(prompt, ids, targets):
        B = ids.shape[0]
        x = torch.cat([prompt.to(torch.bfloat16).unsqueeze(0).expand(B, -1, -1), embed(ids)], dim=1)
        logits = model(inputs_embeds=x, use_cache=False, logits_to_keep=T).logits  # [B, T, V]
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)

    return loss_fn


def make_mop_loss(model, s):
    """The Mixture of Prompts' loss (shape d): the decoder layers of the Llama run one by one, the
    prompt prepended at layer inject_layer and its experts' rows scaled by the gate at every layer from there."""
    K, T, Li, per = s["prompt_len"], s["seq"], s["inject_layer"], s["prompt_per_expert"]
    inner = model.model
    layers = list(inner.layers)
    if not 0 <= Li < len(layers) or s["prompt_experts"] * per != K:
        raise ValueError(f"torch_prompt_step: bad Mixture of Prompts shape {s}")

    def layer_out(out):
        # transformers 5.x decoder layers return the hidden states; 4.x returned a tuple (hidden, ...)
        return out[0] if isinstance(out, tuple) else out

    # prompt: f32 [K, d] expert-major, w1: f32 [d_g, d], w2: f32 [E, d_g], ids, targets: [B, T]
    def loss_fn(prompt, ids, targets, w1, w2):
        x = inner.embed_tokens(ids)  # [B, T, d] bf16, no grad (frozen)
        text_pos = torch.arange(K, K + T, device=ids.device).unsqueeze(0)  # [1, T]: the text's positions
        all_pos = torch.arange(0, K + T, device=ids.device).unsqueeze(0)   # [1, K+T] from the injection on
        pos = text_pos
        pe = inner.rotary_emb(x, pos)  # (cos, sin), broadcast over the batch
        scale = None
        for i, layer in enumerate(layers):
            if i == Li:
                avg = x.mean(dim=1, dtype=torch.float32)                    # [B, d] over the text rows
                g = torch.softmax(F.linear(F.relu(F.linear(avg, w1)), w2), dim=-1)  # [B, E]
                scale = g.repeat_interleave(per, dim=1).unsqueeze(-1)      # [B, K, 1]: row e*p+j -> g[b, e]
                x = torch.cat([(prompt.unsqueeze(0) * scale).to(x.dtype), x], dim=1)  # [B, K+T, d]
                pos = all_pos
                pe = inner.rotary_emb(x, pos)
            elif i > Li:
                x = torch.cat([(x[:, :K].float() * scale).to(x.dtype), x[:, K:]], dim=1)
            # attention_mask=None: transformers' SDPA runs with is_causal=True (query rows > 1)
            x = layer_out(layer(x, attention_mask=None, position_ids=pos, position_embeddings=pe, use_cache=False))
        logits = model.lm_head(inner.norm(x[:, K:]))  # [B, T, V]: the text rows only
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)

    return loss_fn


def time_ms(fn, steps, warmup):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def run_shape(name, modes, steps, warmup, peak_tflops, profile=False, experts_impl=None):
    s = SHAPES[name]
    B, T, K, d, V = s["batch"], s["seq"], s["prompt_len"], s["d_model"], s["vocab"]
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    model = build_model(s, experts_impl)
    weight_bytes = torch.cuda.memory_allocated() - base
    params = sum(p.numel() for p in model.parameters())

    g = torch.Generator().manual_seed(7)
    ids_host = torch.randint(0, V, (B, T), generator=g, dtype=torch.int64).pin_memory()
    targets_host = torch.full((B, T), -100, dtype=torch.int64)
    targets_host[:, :-1] = ids_host[:, 1:]
    targets_host = targets_host.pin_memory()
    ids = torch.empty((B, T), dtype=torch.int64, device="cuda")
    targets = torch.empty_like(ids)
    fwd_flops, step_flops = model_flops(s)
    peak = peak_tflops * 1e12
    loss_eager = make_mop_loss(model, s) if is_mop(s) else make_loss(model, K, T)

    for mode in modes:
        loss_fn = torch.compile(loss_eager) if mode == "compile" else loss_eager
        prompt = torch.nn.Parameter(torch.randn(K, d, generator=g).mul_(0.02).to("cuda"))
        gate = []  # MoP: the gate MLP's W1 [d_g, d], W2 [E, d_g], uniform +-1/sqrt(fan_in) as mopt's Gate
        if is_mop(s):
            for rows, fan_in in ((s["gate_dim"], d), (s["prompt_experts"], s["gate_dim"])):
                w = torch.rand(rows, fan_in, generator=g).mul_(2).sub_(1).mul_(fan_in ** -0.5)
                gate.append(torch.nn.Parameter(w.to("cuda")))
        opt = torch.optim.AdamW([prompt, *gate], lr=1e-3, weight_decay=0.0, fused=True)
        last = {}

        def upload():
            ids.copy_(ids_host, non_blocking=True)
            targets.copy_(targets_host, non_blocking=True)

        def step():
            upload()
            loss = loss_fn(prompt, ids, targets, *gate)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            last["loss"] = loss

        def forward():
            upload()
            with torch.no_grad():
                last["eval_loss"] = loss_fn(prompt, ids, targets, *gate)

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step_ms = time_ms(step, steps, warmup)
        fwd_ms = time_ms(forward, steps, warmup)
        if profile:
            # the step's kernels, by total CUDA time over 3 steps, to stderr (the JSON stays on stdout)
            from torch.profiler import ProfilerActivity
            with torch.profiler.profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
            print(f"# torch_{mode} shape {name}: kernels of 3 steps", file=sys.stderr)
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90),
                  file=sys.stderr, flush=True)
        free, total = torch.cuda.mem_get_info()
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        import transformers

        moe = {"experts": s["experts"], "experts_per_token": s["experts_per_token"],
               "experts_implementation": experts_implementation(model, s)} if s.get("experts") else {}
        mop = {"prompt_experts": s["prompt_experts"], "prompt_per_expert": s["prompt_per_expert"],
               "inject_layer": s["inject_layer"], "gate_dim": s["gate_dim"]} if is_mop(s) else {}
        print(json.dumps({
            "impl": f"torch_{mode}", "shape": name, "device": props.name, "dtype": "bf16", "d_model": d,
            "layers": s["layers"], "heads": s["heads"], "kv_heads": s["kv_heads"], "d_ff": s["d_ff"], "vocab": V,
            "batch": B, "seq": T, "prompt_len": K, "params": params, "steps": steps, "step_ms": step_ms,
            "step_tokens_per_s": B * T / (step_ms * 1e-3), "fwd_ms": fwd_ms,
            "fwd_tokens_per_s": B * T / (fwd_ms * 1e-3), "step_flops": step_flops, "fwd_flops": fwd_flops,
            "step_mfu": step_flops / (step_ms * 1e-3) / peak, "fwd_mfu": fwd_flops / (fwd_ms * 1e-3) / peak,
            "peak_tflops": peak_tflops,
            "activation_peak_bytes": torch.cuda.max_memory_allocated() - base - weight_bytes,
            "weight_bytes": weight_bytes, "device_used_bytes": total - free,
            "loss": float(last["loss"]), "eval_loss": float(last["eval_loss"]),
            "torch": torch.__version__, "transformers": transformers.__version__, **moe, **mop,
        }), flush=True)
        del opt, prompt, gate, loss_fn, last
        torch.cuda.empty_cache()
    del model
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="a,c")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--modes", default="eager,compile", help="eager, compile or both (comma-separated)")
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="dense bf16 peak for MFU (H100 SXM 989, H100 PCIe 756)")
    ap.add_argument("--profile", action="store_true",
                    help="also print the step's kernels by CUDA time (torch.profiler) to stderr")
    ap.add_argument("--experts-impl", default=None, choices=["eager", "grouped_mm", "batched_mm"],
                    help="MoE shapes: transformers' experts implementation (default: transformers' choice)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("torch_prompt_step: no CUDA device")
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in ("eager", "compile"):
            sys.exit(f"torch_prompt_step: unknown mode {m!r} (eager, compile)")
    for name in [n for n in args.shapes.split(",") if n]:
        if name not in SHAPES:
            sys.exit(f"torch_prompt_step: unknown shape {name!r} ({', '.join(SHAPES)})")
        run_shape(name, modes, args.steps, args.warmup, args.peak_tflops, args.profile, args.experts_impl)


if __name__ == "__main__":
    main()
