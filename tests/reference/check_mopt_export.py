#!/usr/bin/env python3
"""Loads the models that mopt saved (tests/reference/export_for_hf.cpp) with transformers'
from_pretrained and compares transformers' logits and loss with mopt's on the same ids.

    python3 tests/reference/check_mopt_export.py EXPORT_DIR
Exits non-zero when a model does not load or max|a-b|/max|b| of the logits exceeds 1e-4.
"""
import os
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def main(root):
    worst = 0.0
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        ref = load_file(os.path.join(path, "mopt_logits.safetensors"))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
        ids = ref["input_ids"].long()
        with torch.no_grad():
            out = model(input_ids=ids, labels=ids)
        err = ((out.logits - ref["logits"]).abs().max() / ref["logits"].abs().max()).item()
        loss_err = abs(out.loss.item() - ref["loss"].item()) / abs(ref["loss"].item())
        worst = max(worst, err, loss_err)
        print(f"{name}: {type(model).__name__} logits rel err {err:.2e}, loss mopt {ref['loss'].item():.6f} "
              f"transformers {out.loss.item():.6f} (rel {loss_err:.2e})")
    print("PASS" if worst <= 1e-4 else "FAIL", f"worst {worst:.2e}")
    sys.exit(0 if worst <= 1e-4 else 1)


if __name__ == "__main__":
    main(sys.argv[1])
