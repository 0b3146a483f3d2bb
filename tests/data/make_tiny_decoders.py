#!/usr/bin/env python3
"""Tiny random Llama-family checkpoints and their logits (transformers 5.23, eager attention).

Writes tests/data/tiny_decoders/<name>/{config.json, model.safetensors, golden.safetensors}:
- llama: GQA (4 query heads, 2 key/value heads), head_dim 12 != hidden/heads, Llama-3 RoPE
  scaling, untied output layer, attention and MLP biases;
- qwen2: q/k/v biases, tied embeddings;
- mistral: a sliding window of 3 over 6 tokens;
- mixtral: 4 SwiGLU experts, top-2 (saved by transformers 5 in the checkpoint layout,
  block_sparse_moe.experts.j.w1/w2/w3).
golden.safetensors holds input_ids (as F32, exact) and the logits. Then:
- <name>_sharded_bf16: the same model in BF16, in shards of at most 20 kB with
  model.safetensors.index.json, and config.json rewritten in transformers 4's layout (top-level
  rope_theta / rope_scaling); its golden holds the logits of the BF16 weights computed in F32;
- two PEFT LoRA folders on the llama (tiny_decoders/llama_lora_*), each with the logits PEFT
  computes with it;
- generate.json: greedy generations (8 new tokens) of the llama, base and with llama_lora_qvd,
  from a left-padded batch, with the top-1/top-2 logit gap of every step (a test compares a
  token only while every gap so far is clear);
- loss.json: transformers' causal-LM loss on a left-padded batch;
- gpt2, gpt2_lora: a tiny GPT-2 and a PEFT LoRA on c_attn / c_fc (fan_in_fan_out), logits
  on a left-padded batch, and gpt2/generate.json: greedy generations from that batch;
- llama_ia3: a PEFT IA3 folder (k, v output-side, down_proj input-side) and PEFT's logits.
Run with the peers' virtual environment (PYTHONHASHSEED fixes the order PEFT writes
target_modules in):

    PYTHONHASHSEED=0 python tests/data/make_tiny_decoders.py
"""
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, MixtralConfig,
                          MixtralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
MODELS = {
    "llama": (LlamaConfig, LlamaForCausalLM, dict(
        COMMON, head_dim=12, attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(COMMON, tie_word_embeddings=True, rope_theta=1000000.0)),
    "mistral": (MistralConfig, MistralForCausalLM, dict(COMMON, sliding_window=3, rope_theta=10000.0)),
    "mixtral": (MixtralConfig, MixtralForCausalLM, dict(COMMON, num_local_experts=4, num_experts_per_tok=2,
                                                        rope_theta=1000000.0)),
}


def main():
    root = Path(__file__).with_name("tiny_decoders")
    for name, (cfg_cls, model_cls, kw) in MODELS.items():
        torch.manual_seed(0)
        config = cfg_cls(**kw)
        config._attn_implementation = "eager"
        model = model_cls(config).eval()
        with torch.no_grad():
            for p in model.parameters():  # random biases and norms too, so every term shows
                p.add_(torch.randn_like(p) * 0.05)
        ids = torch.tensor([[1, 5, 9, 63, 0, 7], [2, 2, 40, 11, 30, 62]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        out = root / name
        out.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(out)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        if name == "mixtral":
            # transformers 5 holds the experts fused; save_pretrained writes the checkpoint
            # layout every Mixtral checkpoint has (block_sparse_moe.experts.j.w1/w2/w3).
            model.save_pretrained(out)
        else:
            save_file(state, str(out / "model.safetensors"))
        save_file({"input_ids": ids.float(), "logits": logits.contiguous()}, str(out / "golden.safetensors"))
        print(f"wrote {out}: {sum(v.numel() for v in state.values())} parameters")
        sharded_bf16(root, name, model, ids)


def sharded_bf16(root, name, model, ids):
    """The model in BF16, sharded, with a transformers-4 config.json, and its logits."""
    import copy
    out = root / f"{name}_sharded_bf16"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.safetensors"):
        old.unlink()
    m16 = copy.deepcopy(model).to(torch.bfloat16)
    m16.save_pretrained(out, max_shard_size="20KB")
    cfg = json.loads((out / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    m32 = m16.float()
    with torch.no_grad():
        logits = m32(input_ids=ids).logits
    save_file({"input_ids": ids.float(), "logits": logits.contiguous()}, str(out / "golden.safetensors"))
    print(f"wrote {out}: {len(list(out.glob('*.safetensors')))} shards")


ADAPTERS = {
    # suffix names filtered by layer, a rank and an alpha pattern
    "llama_lora_qvd": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                           layers_to_transform=[1], rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3.0}),
    # all-linear (lm_head left out by PEFT) with an exclusion and rsLoRA
    "llama_lora_all": dict(r=2, lora_alpha=4, target_modules="all-linear", exclude_modules=["o_proj"],
                           use_rslora=True),
}


def adapters():
    """PEFT LoRA folders on the tiny Llama, with random (non-zero) factors, and its logits with
    each adapter active: tests/data/tiny_decoders/<name>/ and <name>/golden.safetensors."""
    from peft import LoraConfig, get_peft_model

    root = Path(__file__).with_name("tiny_decoders")
    for name, kw in ADAPTERS.items():
        torch.manual_seed(1)
        model = LlamaForCausalLM.from_pretrained(root / "llama", attn_implementation="eager").eval()
        pm = get_peft_model(model, LoraConfig(init_lora_weights=False, **kw)).eval()
        ids = torch.tensor([[1, 5, 9, 63, 0, 7], [2, 2, 40, 11, 30, 62]])
        with torch.no_grad():
            logits = pm(input_ids=ids).logits
        out = root / name
        pm.save_pretrained(out)
        (out / "README.md").unlink(missing_ok=True)  # PEFT's model card, not needed here
        save_file({"input_ids": ids.float(), "logits": logits.contiguous()}, str(out / "golden.safetensors"))
        targets = sorted(n for n, m in pm.base_model.model.named_modules() if hasattr(m, "lora_A"))
        print(f"wrote {out}: {len(targets)} adapted modules")


def generations():
    """Greedy generations of the tiny llama, base and with llama_lora_qvd, from a left-padded
    batch: tests/data/tiny_decoders/generate.json."""
    from peft import PeftModel

    root = Path(__file__).with_name("tiny_decoders")
    ids = torch.tensor([[0, 0, 5, 9, 63], [2, 40, 11, 30, 62]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    cases = {}
    for adapter in [None, "llama_lora_qvd"]:
        model = LlamaForCausalLM.from_pretrained(root / "llama", attn_implementation="eager").eval()
        if adapter:
            model = PeftModel.from_pretrained(model, root / adapter).eval()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True, pad_token_id=0)
        new = out.sequences[:, ids.shape[1]:].tolist()
        gaps = []
        for step in out.scores:  # [batch, vocab] per step
            top = torch.topk(step.float(), 2, dim=-1).values
            gaps.append((top[:, 0] - top[:, 1]).tolist())
        cases[adapter or "base"] = {"new_tokens": new, "gaps": [list(g) for g in zip(*gaps)]}
    (root / "generate.json").write_text(json.dumps(
        {"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "max_new_tokens": 8, "cases": cases},
        indent=1) + "\n")
    print(f"wrote {root / 'generate.json'}")


def ia3():
    """A PEFT IA3 folder on the tiny llama (output-side k/v, input-side down_proj) with random
    (non-one) vectors, and PEFT's logits with it: tests/data/tiny_decoders/llama_ia3."""
    from peft import IA3Config, get_peft_model

    root = Path(__file__).with_name("tiny_decoders")
    torch.manual_seed(2)
    model = LlamaForCausalLM.from_pretrained(root / "llama", attn_implementation="eager").eval()
    pm = get_peft_model(model, IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                         feedforward_modules=["down_proj"])).eval()
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "ia3_l" in n:
                p.add_(torch.randn_like(p) * 0.3)
    ids = torch.tensor([[1, 5, 9, 63, 0, 7], [2, 2, 40, 11, 30, 62]])
    with torch.no_grad():
        logits = pm(input_ids=ids).logits
    out = root / "llama_ia3"
    pm.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)
    save_file({"input_ids": ids.float(), "logits": logits.contiguous()}, str(out / "golden.safetensors"))
    print(f"wrote {out}")


def gpt2():
    """A tiny random GPT-2 (tiny_decoders/gpt2, saved by save_pretrained: transformer.* names,
    Conv1D weights [in, out], tied lm_head) with its logits on a left-padded batch (positions
    counted over unmasked tokens, as generate passes them), and a PEFT LoRA on c_attn and
    mlp.c_fc (fan_in_fan_out) with PEFT's logits (tiny_decoders/gpt2_lora)."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    root = Path(__file__).with_name("tiny_decoders")
    torch.manual_seed(3)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                        eos_token_id=0)
    config._attn_implementation = "eager"
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ids = torch.tensor([[0, 0, 5, 9, 63, 7], [2, 40, 11, 30, 62, 1]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    positions = (mask.cumsum(-1) - 1).clamp(min=0).masked_fill(mask == 0, 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    out = root / "gpt2"
    model.save_pretrained(out)
    with torch.no_grad():
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    gaps = [(torch.topk(sc.float(), 2, dim=-1).values @ torch.tensor([1.0, -1.0])).tolist() for sc in gen.scores]
    (out / "generate.json").write_text(json.dumps(
        {"new_tokens": gen.sequences[:, ids.shape[1]:].tolist(), "gaps": [list(g) for g in zip(*gaps)],
         "eos_token_id": 0}, indent=1) + "\n")
    save_file({"input_ids": ids.float(), "attention_mask": mask.float(), "logits": logits.contiguous()},
              str(out / "golden.safetensors"))
    torch.manual_seed(4)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                          fan_in_fan_out=True, init_lora_weights=False)).eval()
    with torch.no_grad():
        logits = pm(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    lora = root / "gpt2_lora"
    pm.save_pretrained(lora)
    (lora / "README.md").unlink(missing_ok=True)
    save_file({"logits": logits.contiguous()}, str(lora / "golden.safetensors"))
    print(f"wrote {out} and {lora}")


def loss():
    """transformers' causal-LM loss of the tiny llama on a left-padded batch (labels = ids with
    padding at -100, positions counted over unmasked tokens as generation does):
    tests/data/tiny_decoders/loss.json."""
    root = Path(__file__).with_name("tiny_decoders")
    ids = torch.tensor([[0, 0, 5, 9, 63, 7], [2, 40, 11, 30, 62, 1]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    positions = (mask.cumsum(-1) - 1).clamp(min=0).masked_fill(mask == 0, 1)
    model = LlamaForCausalLM.from_pretrained(root / "llama", attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, labels=ids.masked_fill(mask == 0, -100))
    (root / "loss.json").write_text(json.dumps(
        {"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "loss": out.loss.item()}, indent=1) + "\n")
    print(f"wrote {root / 'loss.json'}: {out.loss.item():.6f}")


if __name__ == "__main__":
    main()
    adapters()
    generations()
    loss()
    ia3()
    gpt2()
