#!/usr/bin/env python3
"""Loads folders written by modula into transformers / PEFT and compares their logits with the
stored goldens (a manual check; the Rust tests compare modula's own reading of them).

    python tests/data/check_modula_outputs.py baked BAKED_DIR GOLDEN.safetensors
    python tests/data/check_modula_outputs.py adapter SAVED_ADAPTER_DIR GOLDEN.safetensors

`baked`: a model folder written by `modula bake --base tests/data/tiny_decoders/llama`, loaded by
transformers alone. For a prompt-tuning folder the input tokens' logits are compared (PEFT
returns the soft tokens' positions first). `adapter`: a PEFT folder written by modula (`PeftLora::save`), loaded by PEFT
onto tests/data/tiny_decoders/llama. Both are compared with the `logits` of GOLDEN.safetensors
for its `input_ids` (PEFT's logits with the original adapter, e.g.
tiny_decoders/llama_lora_qvd/golden.safetensors, or modula's own, the
modula_logits.safetensors examples/tiny_lm.rs writes beside the adapter it trained).
For `adapter`, PEFT's logits are also written to SAVED_ADAPTER_DIR/peft_golden.safetensors:
tests/data/tiny_decoders/llama_lora_trained is such a folder (trained and saved by
examples/tiny_lm.rs), which tests/models.rs reads back against them.
"""
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM


def main():
    kind, folder, golden_file = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    golden = load_file(golden_file)
    ids = golden["input_ids"].long()
    if kind == "baked":
        model = LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    else:
        from peft import PeftModel
        base = Path(__file__).with_name("tiny_decoders") / "llama"
        model = LlamaForCausalLM.from_pretrained(base, attn_implementation="eager").eval()
        model = PeftModel.from_pretrained(model, folder).eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    # A prompt-tuning adapter: PEFT returns the soft tokens' positions first; modula's logits
    # are the input tokens' (the last seq positions).
    logits = logits[:, logits.shape[1] - ids.shape[1]:, :]
    if kind == "adapter":
        from safetensors.torch import save_file
        save_file({"input_ids": golden["input_ids"], "logits": logits.contiguous()},
                  str(folder / "peft_golden.safetensors"))
    want = golden["logits"]
    rel = ((logits - want).abs().max() / want.abs().max()).item()
    print(f"{kind} {folder}: max |difference| / max |logit| = {rel:.2e}")
    sys.exit(0 if rel <= 1e-4 else 1)


if __name__ == "__main__":
    main()
