#!/usr/bin/env bash
# mopt's CUDA prompt-tuning step against PyTorch + Hugging Face transformers on the same GPU in the
# same run: runs benchmarks/cuda_prompt_step (building it with nvcc when missing) and
# benchmarks/torch_prompt_step.py with the same arguments, keeps their JSON lines, and prints a table
# with the ratios torch / mopt for the step time (> 1: mopt is faster) and mopt / torch for the
# forward tokens/s (> 1: mopt is faster).
#
#   benchmarks/cuda_vs_torch.sh [--shapes a,c] [--steps 20] [--warmup 3] [--peak-tflops 989]
#   env: MOPT_CUDA_BENCH (binary, default .cache/bin/cuda/cuda_prompt_step), PYTHON (default python3),
#        TORCH_MODES (default eager,compile), OUT (folder for the JSON lines, default a temporary one)
set -euo pipefail
cd "$(dirname "$0")/.."
bench=${MOPT_CUDA_BENCH:-.cache/bin/cuda/cuda_prompt_step}
python=${PYTHON:-python3}
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"

if [[ ! -x $bench ]]; then
  echo "building $bench" >&2
  mkdir -p "$(dirname "$bench")"
  nvcc -std=c++20 -O3 -arch=sm_90 -Xcompiler -march=x86-64-v4 --expt-relaxed-constexpr -Iinclude \
    benchmarks/cuda_prompt_step.cu -o "$bench" -lcublas -lcublasLt
fi

"$bench" "$@" | tee "$out/mopt.jsonl"
"$python" benchmarks/torch_prompt_step.py --modes "${TORCH_MODES:-eager,compile}" "$@" | tee "$out/torch.jsonl"

"$python" - "$out/mopt.jsonl" "$out/torch.jsonl" <<'EOF'
import json, sys

rows = [json.loads(line) for path in sys.argv[1:] for line in open(path) if line.strip().startswith("{")]
mopt = {r["shape"]: r for r in rows if r["impl"] == "mopt_cuda"}
gib = 2.0 ** 30
print()
print(f"device: {rows[0]['device'] if rows else '?'}; MFU against {rows[0]['peak_tflops'] if rows else '?'} TFLOP/s")
print("| shape | impl | step ms | step MFU | fwd ms | fwd tokens/s | fwd MFU | activations GiB | loss "
      "| torch/mopt step | mopt/torch fwd tok/s |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for r in rows:
    m = mopt.get(r["shape"])
    step_ratio = f"{r['step_ms'] / m['step_ms']:.2f}" if m and r is not m else ""
    fwd_ratio = f"{m['fwd_tokens_per_s'] / r['fwd_tokens_per_s']:.2f}" if m and r is not m else ""
    step = f"{r['step_ms']:.2f}" + (f" (eager {r['step_eager_ms']:.2f})" if "step_eager_ms" in r else "")
    print(f"| {r['shape']} | {r['impl']} | {step} | {r['step_mfu']:.3f} | {r['fwd_ms']:.2f} "
          f"| {r['fwd_tokens_per_s']:.0f} | {r['fwd_mfu']:.3f} | {r['activation_peak_bytes'] / gib:.2f} "
          f"| {r['loss']:.3f} | {step_ratio} | {fwd_ratio} |")
EOF
echo "JSON lines in $out" >&2
