#!/usr/bin/env python3
"""Side-by-side CPU benchmark: mopt (build/benchmarks/mopt_bench) against PyTorch eager on the
same shapes, in the same run, on the same cores. Prints the ratio torch_time / mopt_time for each
case (> 1: mopt is faster) and writes a Markdown table.

  python3 benchmarks/cpu_vs_torch.py --bench build/benchmarks/mopt_bench --threads 16 [--out FILE]
"""
import argparse
import json
import os
import subprocess
import sys
import time


def torch_cases(threads):
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)

    def rand(*shape, grad=False):
        return (torch.rand(*shape, generator=g) * 2 - 1).requires_grad_(grad)

    cases = {}
    for n in (128, 256, 512, 1024):
        a, b = rand(n, n), rand(n, n)
        cases[f"BM_Gemm/{n}"] = lambda a=a, b=b: a @ b.t()
    for tokens, d in ((512, 256), (1024, 512)):
        x, w = rand(tokens, d, grad=True), rand(4 * d, d, grad=True)

        def lin(x=x, w=w):
            F.linear(x, w).sum().backward()
            x.grad = None
            w.grad = None

        cases[f"BM_LinearForwardBackward/{tokens}/{d}"] = lin
    for T in (256, 512):
        H = 8
        q, k, v = (rand(1, H, T, 64, grad=True) for _ in range(3))

        def fwd(q=q, k=k, v=v):
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v, is_causal=True)

        def fwdbwd(q=q, k=k, v=v):
            F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
            q.grad = k.grad = v.grad = None

        cases[f"BM_AttentionForward/{T}/{H}"] = fwd
        cases[f"BM_AttentionForwardBackward/{T}/{H}"] = fwdbwd
    # Whole-model forward, as mopt_bench's BM_TransformerForward: Hugging Face LlamaForCausalLM and,
    # for the Switch model, MixtralForCausalLM with 8 experts and top-1 routing (the same compute),
    # eager attention, batch 4 × 256, evaluation mode under no_grad.
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM
    ids = torch.randint(0, 4096, (4, 256), generator=g)
    for layers in (2, 6):
        for switch in (0, 1):
            common = dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=layers,
                          num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256,
                          attn_implementation="eager")
            model = (MixtralForCausalLM(MixtralConfig(num_local_experts=8, num_experts_per_tok=1, **common))
                     if switch else LlamaForCausalLM(LlamaConfig(**common))).eval()

            def fwd(model=model):
                with torch.no_grad():
                    model(input_ids=ids)

            cases[f"BM_TransformerForward/{layers}/{switch}"] = fwd
    return cases, torch.__version__


def time_it(fn, min_time=0.5):
    for _ in range(3):
        fn()
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time and n >= 5:
            return elapsed / n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", default="build/benchmarks/mopt_bench", help="path of the mopt_bench executable")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both sides")
    ap.add_argument("--out", help="write the Markdown table to this file")
    ap.add_argument("--openblas-coretype", help="set OPENBLAS_CORETYPE for mopt (e.g. SkylakeX) where OpenBLAS "
                    "misdetects the CPU; mopt_bench warns when it does")
    args = ap.parse_args()
    if not os.path.exists(args.bench):
        sys.exit(f"cpu_vs_torch: {args.bench} not found; build it with cmake --build --preset default")

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads))
    if args.openblas_coretype:
        env["OPENBLAS_CORETYPE"] = args.openblas_coretype
    run = subprocess.run([args.bench, "--benchmark_format=json", "--benchmark_min_time=0.5"], env=env,
                         check=True, capture_output=True, text=True)
    sys.stderr.write(run.stderr)
    out = run.stdout
    context = json.loads(out)["context"]
    mopt = {b["name"]: b["real_time"] * {"ms": 1e-3, "us": 1e-6, "ns": 1e-9}[b["time_unit"]]
            for b in json.loads(out)["benchmarks"]}

    cases, version = torch_cases(args.threads)
    rows = ["| case | mopt ms | torch ms | torch / mopt |", "| --- | ---: | ---: | ---: |"]
    for name, fn in cases.items():
        if name not in mopt:
            continue
        t = time_it(fn)
        rows.append(f"| {name} | {mopt[name] * 1e3:.3f} | {t * 1e3:.3f} | {t / mopt[name]:.2f} |")
    table = "\n".join(rows)
    header = (f"PyTorch {version} eager (CPU) vs mopt ({args.bench}), {args.threads} threads; "
              f"OpenBLAS kernel {context.get('openblas_core', '?')}")
    print(header)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(header + "\n\n" + table + "\n")


if __name__ == "__main__":
    main()
