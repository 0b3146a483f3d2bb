#!/usr/bin/env python3
"""PEFT 0.21.2 LoHa, LoKr and prompt-tuning folders on the tiny Llama, with PEFT's logits.

Writes, under tests/data/tiny_decoders/:
- llama_loha: LoHa on q_proj, v_proj, down_proj (r=2, alpha=4; down_proj r=3, alpha=9 by
  rank_pattern / alpha_pattern), random factors (init_weights=False);
- llama_lokr: LoKr on q_proj, o_proj, gate_proj (r=2, alpha=3: W1 full, W2 low-rank);
- llama_lokr_both: LoKr with decompose_both=True, r=1, decompose_factor=4 on k_proj, up_proj
  (both factors low-rank where PEFT's rule says so);
- llama_prompt: prompt tuning with 3 virtual tokens (random init, then perturbed);
each with golden.safetensors: input_ids (as F32) and PEFT's logits (for the prompt folder the
logits of the virtual tokens' positions too, [batch, 3 + seq, vocab], as PEFT returns them).
For the LoHa and LoKr folders also merged_logits: after PEFT's merge_and_unload.

Run with the peers' virtual environment:

    PYTHONHASHSEED=0 python tests/data/make_lycoris_goldens.py
"""
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

ROOT = Path(__file__).with_name("tiny_decoders")
IDS = torch.tensor([[1, 5, 9, 63, 0, 7], [2, 2, 40, 11, 30, 62]])


def base():
    return LlamaForCausalLM.from_pretrained(ROOT / "llama", attn_implementation="eager").eval()


def save(pm, name, merged=True):
    with torch.no_grad():
        logits = pm(input_ids=IDS).logits
    out = ROOT / name
    pm.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)
    tensors = {"input_ids": IDS.float(), "logits": logits.contiguous()}
    if merged:
        with torch.no_grad():
            tensors["merged_logits"] = pm.merge_and_unload()(input_ids=IDS).logits.contiguous()
    save_file(tensors, str(out / "golden.safetensors"))
    print(f"wrote {out}")


def main():
    from peft import LoHaConfig, LoKrConfig, PromptTuningConfig, get_peft_model

    torch.manual_seed(5)
    pm = get_peft_model(base(), LoHaConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                           rank_pattern={"down_proj": 3}, alpha_pattern={"down_proj": 9},
                                           init_weights=False)).eval()
    save(pm, "llama_loha")

    torch.manual_seed(6)
    pm = get_peft_model(base(), LoKrConfig(r=2, alpha=3, target_modules=["q_proj", "o_proj", "gate_proj"],
                                           init_weights=False)).eval()
    save(pm, "llama_lokr")

    torch.manual_seed(7)
    pm = get_peft_model(base(), LoKrConfig(r=1, alpha=2, decompose_both=True, decompose_factor=4,
                                           target_modules=["k_proj", "up_proj"], init_weights=False)).eval()
    save(pm, "llama_lokr_both")

    torch.manual_seed(8)
    pm = get_peft_model(base(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).eval()
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "prompt_encoder" in n:
                p.add_(torch.randn_like(p) * 0.5)
    save(pm, "llama_prompt", merged=False)


if __name__ == "__main__":
    main()
