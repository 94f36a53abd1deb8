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

  python3 benchmarks/torch_prompt_step.py [--shapes a,c] [--steps 20] [--warmup 3] [--modes eager,compile] [--profile]
                                          [--peak-tflops 989] [--experts-impl eager|grouped_mm|batched_mm]

Model FLOPs are counted with the formula in cuda_prompt_step.cu (the forward's matmuls, twice the
matmuls' dX half for the backward, attention backward = 2 x forward; a top-1 MoE layer: the dense
FFN's matmuls plus the router's).
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
}


def model_flops(s):
    B, T, K = s["batch"], s["seq"], s["prompt_len"]
    S = K + T
    N = B * S
    d, H, Hkv, F_, V, L = s["d_model"], s["heads"], s["kv_heads"], s["d_ff"], s["vocab"], s["layers"]
    Dh = d // H
    p_blk = L * (d * (H + 2 * Hkv) * Dh + H * Dh * d + 3 * d * F_ + d * s.get("experts", 0))  # + routers
    head = 2 * B * T * d * V
    attn = L * 4 * B * H * Dh * S * (S + 1) / 2
    return 2 * N * p_blk + head + attn, 2 * (2 * N * p_blk + head) + 3 * attn


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
    loss_eager = make_loss(model, K, T)

    for mode in modes:
        loss_fn = torch.compile(loss_eager) if mode == "compile" else loss_eager
        prompt = torch.nn.Parameter(torch.randn(K, d, generator=g).mul_(0.02).to("cuda"))
        opt = torch.optim.AdamW([prompt], lr=1e-3, weight_decay=0.0, fused=True)
        last = {}

        def upload():
            ids.copy_(ids_host, non_blocking=True)
            targets.copy_(targets_host, non_blocking=True)

        def step():
            upload()
            loss = loss_fn(prompt, ids, targets)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            last["loss"] = loss

        def forward():
            upload()
            with torch.no_grad():
                last["eval_loss"] = loss_fn(prompt, ids, targets)

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
            "torch": torch.__version__, "transformers": transformers.__version__, **moe,
        }), flush=True)
        del opt, prompt, loss_fn, last
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
