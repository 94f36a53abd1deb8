#!/usr/bin/env python3
"""Checks a soft prompt written by mopt (io::save_prompt) against Hugging Face PEFT:
   PEFT loads it onto the base model, its prompt encoder holds mopt's prompt_embeddings exactly,
   PEFT's own save_pretrained writes the same tensor back, and the prompted model's logits on a
   text equal the base model's logits on [prompt embeddings; text embeddings].
   usage: scripts/peft_check.py MODEL_DIR PROMPT_DIR"""
import sys, tempfile, os
import torch
from safetensors.torch import load_file
import peft
from peft import PeftConfig, PeftModel
from transformers import AutoModelForCausalLM

model_dir, prompt_dir = sys.argv[1], sys.argv[2]
print("peft", peft.__version__)
cfg = PeftConfig.from_pretrained(prompt_dir)
print("config:", cfg.peft_type, cfg.task_type, "num_virtual_tokens", cfg.num_virtual_tokens, "token_dim", cfg.token_dim)
ours = load_file(os.path.join(prompt_dir, "adapter_model.safetensors"))["prompt_embeddings"]
base = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
model = PeftModel.from_pretrained(base, prompt_dir)
loaded = model.prompt_encoder["default"].embedding.weight.detach()
print("loaded == file:", torch.equal(loaded, ours), tuple(loaded.shape))
with tempfile.TemporaryDirectory() as d:
    model.save_pretrained(d)
    again = load_file(os.path.join(d, "adapter_model.safetensors"))["prompt_embeddings"]
    print("PEFT re-save == file:", torch.equal(again, ours))
ids = torch.tensor([[1, 100, 200, 300, 400, 500]])
with torch.no_grad():
    out = model(input_ids=ids).logits[:, cfg.num_virtual_tokens:, :]
    emb = base.get_input_embeddings()(ids)
    ref = base(inputs_embeds=torch.cat([ours.unsqueeze(0), emb], dim=1)).logits[:, cfg.num_virtual_tokens:, :]
print("PEFT logits vs manual prefix: max abs diff", (out - ref).abs().max().item())
