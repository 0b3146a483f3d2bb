#!/usr/bin/env python3
"""PEFT 0.21.2's Arrow on the tiny Llama (tests/data/tiny_decoders/llama), for modula's
model-level Arrow routing.

Writes tests/data/tiny_decoders/arrow/:
- expert_0, expert_1, expert_2: PEFT LoRA folders (r = 4, alpha = 8, q/k/v/o/gate/up/down),
  random factors with a dominant direction (the top singular value of each B·A is about 3x
  the second), so that PEFT's 15 power iterations converge;
- close_0, close_1, close_2: the same kind of folders whose top two singular values are within
  1 % of each other, where 15 power iterations from a random start do not converge;
- golden.safetensors, for each set (`sep` and `close`):
  `<set>.logits_peft`: create_arrow_model(top_k = 2, router_temperature = 0.5, rng_seed = 0)
  as PEFT computes it (prototypes by power iteration);
  `<set>.logits_exact`: the same model with every layer's prototypes replaced by the exact top
  right singular vector of B·A (float64 SVD);
  `<set>.proto_cos`: per adapted layer and expert, |cos| between PEFT's prototype and the
  exact one; and `input_ids` (F32);
- the same for set `gks`: the `expert_*` folders as task adapters with GenKnowSub
  (`use_gks=True`) against the general adapters `close_0` and `close_1`.

    PYTHONHASHSEED=0 python tests/data/make_arrow_goldens.py
"""
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.tensor([[1, 5, 9, 63, 0, 7], [2, 2, 40, 11, 30, 62]])


def shaped_factors(out_f, in_f, r, gap, gen):
    """A (r×in), B (out×r) with B·A's singular values [gap·s, s, s/2, s/3]-like: orthonormal
    directions from QR of random matrices, then a random split of the product into A and B."""
    u, _ = torch.linalg.qr(torch.randn(out_f, r, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_f, r, generator=gen, dtype=torch.float64))
    s = torch.tensor([gap, 1.0, 0.5, 0.33][:r], dtype=torch.float64) * 0.6
    m = torch.randn(r, r, generator=gen, dtype=torch.float64) + 3 * torch.eye(r, dtype=torch.float64)
    b = u @ torch.diag(s) @ m  # out × r
    a = torch.linalg.solve(m, v.T)  # r × in, so B·A = U S Vᵀ
    return a.float(), b.float()


def write_experts(root, prefix, gap, seed):
    from peft import LoraConfig, get_peft_model

    dirs = []
    for e in range(3):
        gen = torch.Generator().manual_seed(seed + e)
        model = LlamaForCausalLM.from_pretrained(root / "llama", attn_implementation="eager").eval()
        pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)).eval()
        with torch.no_grad():
            for name, mod in pm.base_model.model.named_modules():
                if hasattr(mod, "lora_A") and "default" in mod.lora_A:
                    a, b = shaped_factors(mod.out_features, mod.in_features, 4, gap, gen)
                    mod.lora_A["default"].weight.copy_(a)
                    mod.lora_B["default"].weight.copy_(b)
        out = root / "arrow" / f"{prefix}_{e}"
        pm.save_pretrained(out)
        (out / "README.md").unlink(missing_ok=True)
        dirs.append(str(out))
    return dirs


def arrow_logits(root, dirs, general=None):
    from peft import ArrowConfig, create_arrow_model

    base = LlamaForCausalLM.from_pretrained(root / "llama", attn_implementation="eager").eval()
    cfg = ArrowConfig(top_k=2, router_temperature=0.5, rng_seed=0, use_gks=general is not None)
    model = create_arrow_model(base, dirs, cfg, general_adapter_paths=general).eval()
    with torch.no_grad():
        peft_logits = model(input_ids=IDS).logits.contiguous()
        cos = []
        for name, mod in model.named_modules():
            if hasattr(mod, "lora_arrow") and "arrow_router" in mod.lora_arrow:
                arrow = mod.lora_arrow["arrow_router"]
                exact = []
                for e, t in enumerate(arrow.task_adapter_names):
                    a = mod.lora_A[t].weight.double()
                    b = mod.lora_B[t].weight.double()
                    vh = torch.linalg.svd(b @ a, full_matrices=False).Vh[0]
                    p = arrow.prototypes[e].double()
                    cos.append(abs(float(p @ vh) / float(p.norm() * vh.norm())))
                    exact.append(vh.float())
                arrow.prototypes = torch.stack(exact)
        exact_logits = model(input_ids=IDS).logits.contiguous()
    return peft_logits, exact_logits, torch.tensor(cos)


def main():
    root = Path(__file__).with_name("tiny_decoders")
    torch.manual_seed(0)
    out = {"input_ids": IDS.float()}
    for prefix, gap, seed in [("sep", 3.0, 100), ("close", 1.01, 200)]:
        dirs = write_experts(root, "expert" if prefix == "sep" else "close", gap, seed)
        peft_logits, exact_logits, cos = arrow_logits(root, dirs)
        out[f"{prefix}.logits_peft"] = peft_logits
        out[f"{prefix}.logits_exact"] = exact_logits
        out[f"{prefix}.proto_cos"] = cos
        diff = (peft_logits - exact_logits).abs().max().item()
        print(f"{prefix}: min |cos(PEFT proto, exact)| = {cos.min():.6f}, "
              f"max |logits PEFT - exact| = {diff:.3e}")
    experts = [str(root / "arrow" / f"expert_{e}") for e in range(3)]
    general = [str(root / "arrow" / f"close_{e}") for e in range(2)]
    peft_logits, exact_logits, cos = arrow_logits(root, experts, general)
    out["gks.logits_peft"] = peft_logits
    out["gks.logits_exact"] = exact_logits
    out["gks.proto_cos"] = cos
    diff = (peft_logits - exact_logits).abs().max().item()
    print(f"gks: min |cos(PEFT proto, exact)| = {cos.min():.6f}, max |logits PEFT - exact| = {diff:.3e}")
    save_file(out, str(root / "arrow" / "golden.safetensors"))


if __name__ == "__main__":
    main()
