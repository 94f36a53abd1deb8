#!/usr/bin/env python3
"""Makes the Hugging Face parity references that tests/io/hf_parity.cpp checks on the CPU.

Small random LlamaForCausalLM (grouped-query attention) and MixtralForCausalLM (top-1 and top-2)
models are built from configs, their weights redrawn with a larger spread (std 0.2) so that the
logits are far from uniform, saved with save_pretrained in several on-disk dtypes (one of them
sharded with an index file), and run on fixed token ids. Their logits and next-token loss go into
reference.safetensors beside the model folders.

Run on a machine with PyTorch and transformers (the GPU machine has both; no network needed):
    python3 tests/reference/make_hf_reference.py OUT_DIR
then copy OUT_DIR/* into tests/reference/.
"""
import json
import os
import sys

import torch
import transformers
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

VOCAB, SEQ, BATCH = 48, 11, 2


def common(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
                pad_token_id=None, attn_implementation="eager")
    base.update(kw)
    return base


MODELS = {
    # name: (class, config, on-disk dtype, max shard size or None)
    "llama_gqa": (LlamaForCausalLM, LlamaConfig(**common(rope_theta=500000.0)), torch.float32, "12KB"),
    "llama_tied": (LlamaForCausalLM, LlamaConfig(**common(tie_word_embeddings=True, num_key_value_heads=4)),
                   torch.bfloat16, None),
    "mixtral_top2": (MixtralForCausalLM, MixtralConfig(**common(num_local_experts=4, num_experts_per_tok=2,
                                                                router_aux_loss_coef=0.0)),
                     torch.float32, None),
    "mixtral_top1": (MixtralForCausalLM, MixtralConfig(**common(num_local_experts=4, num_experts_per_tok=1,
                                                                router_aux_loss_coef=0.0)),
                     torch.float16, None),
}


def main(out):
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))
    refs = {"input_ids": ids.to(torch.int32).contiguous()}
    report = {"torch": torch.__version__, "transformers": transformers.__version__, "models": {}}
    for index, (name, (cls, cfg, dtype, shard)) in enumerate(MODELS.items()):
        torch.manual_seed(100 + index)
        model = cls(cfg).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 0.2)
                else:
                    p.uniform_(0.5, 1.5)  # norm weights away from 1 so that they matter
            # The reference is computed with the weights as stored on disk (rounded to dtype).
            model.to(dtype).to(torch.float32)
        path = os.path.join(out, name)
        kwargs = {"max_shard_size": shard} if shard else {}
        model.to(dtype).save_pretrained(path, **kwargs)
        model.to(torch.float32)
        with torch.no_grad():
            o = model(input_ids=ids.long(), labels=ids.long())
        refs[name + ".logits"] = o.logits.float().contiguous()
        refs[name + ".loss"] = o.loss.float().reshape(1).contiguous()
        files = sorted(os.listdir(path))
        keys = {}
        for f in files:
            if f.endswith(".safetensors"):
                from safetensors import safe_open
                with safe_open(os.path.join(path, f), "pt") as st:
                    for k in st.keys():
                        keys[k] = [list(st.get_slice(k).get_shape()), str(st.get_slice(k).get_dtype())]
        report["models"][name] = {"files": files, "loss": o.loss.item(),
                                  "config": json.load(open(os.path.join(path, "config.json"))),
                                  "tensors": keys}
        # Drop files the C++ side does not need.
        for f in files:
            if f == "generation_config.json":
                os.remove(os.path.join(path, f))
    save_file(refs, os.path.join(out, "reference.safetensors"))
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "hf_reference")
