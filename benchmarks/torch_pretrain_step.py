#!/usr/bin/env python3
"""PyTorch side of the GPU pretraining comparison (examples/pretrain_gpu is mopt's side): one
full-parameter training step of a randomly initialised Hugging Face LlamaForCausalLM shaped as
examples/pretrain's defaults (d 256, 6 layers, 8 heads, FFN 688, vocabulary 8192, batch 16 x 256,
untied head), in f32 (pretrain_gpu's backend::Cuda keeps f32 storage and exact f32 GEMMs; TF32 is
off here too), SDPA attention: forward with labels (mean next-token cross-entropy), backward to every
weight, clip_grad_norm_(1.0), AdamW (betas 0.9/0.95, weight decay 0.1; PyTorch's default foreach
implementation, on the GPU). Eager and torch.compile (the model compiled; the optimizer eager).
Prints one JSON line per mode: ms per step (median of --steps after --warmup) and tokens/s.

  python3 benchmarks/torch_pretrain_step.py [--steps 30] [--warmup 5] [--modes eager,compile]
"""
import argparse
import json
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=688)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--modes", default="eager,compile")
    a = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for mode in a.modes.split(","):
        torch.manual_seed(1)
        cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.d_model, intermediate_size=a.ffn,
                          num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.heads,
                          max_position_embeddings=a.seq, rms_norm_eps=1e-5, rope_theta=10000.0,
                          tie_word_embeddings=False, attn_implementation="sdpa")
        model = LlamaForCausalLM(cfg).cuda().float()
        decay = [q for q in model.parameters() if q.dim() >= 2]
        plain = [q for q in model.parameters() if q.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": plain, "weight_decay": 0.0}],
                                lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
        run = torch.compile(model) if mode == "compile" else model
        times = []
        for step in range(a.warmup + a.steps):
            ids = torch.randint(0, a.vocab, (a.batch, a.seq), device="cuda")
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = run(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if step >= a.warmup:
                times.append(time.perf_counter() - t0)
        ms = statistics.median(times) * 1e3
        print(json.dumps({"mode": mode, "ms_per_step": round(ms, 3),
                          "tokens_per_s": round(a.batch * a.seq / (ms / 1e3)),
                          "parameters": sum(q.numel() for q in model.parameters()),
                          "loss": round(loss.item(), 4)}), flush=True)


if __name__ == "__main__":
    main()
