#!/usr/bin/env python3
"""Golden table for PEFT's target-module rules (PEFT 0.21.2).

For each config below and each module path of a Llama-, Mixtral- and GPT-2-style model, asks
PEFT's own `check_target_module_exists` whether the path is a target, excluded, or neither,
and whether `LoraConfig` accepts the config at all. Writes peft_target_rules.json next to this
script. Run with the peers' virtual environment (../shared/peers/requirements.txt):

    python tests/data/make_target_rules.py
"""
import json
from pathlib import Path

from peft import LoraConfig
from peft.tuners.tuners_utils import _ExcludedModule, check_target_module_exists

KEYS = [
    "model.embed_tokens",
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.k_proj",
    "model.layers.0.self_attn.v_proj",
    "model.layers.0.self_attn.o_proj",
    "model.layers.0.mlp.gate_proj",
    "model.layers.0.mlp.up_proj",
    "model.layers.0.mlp.down_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.1.self_attn.v_proj",
    "model.layers.1.mlp.down_proj",
    "model.layers.12.self_attn.q_proj",
    "model.layers.1.block_sparse_moe.gate",
    "model.layers.1.block_sparse_moe.experts.0.w1",
    "model.layers.1.block_sparse_moe.experts.3.w2",
    "model.layers.3.block_sparse_moe.experts.1.w3",
    "model.norm",
    "lm_head",
    "transformer.h.0.attn.c_attn",
    "transformer.h.0.attn.c_proj",
    "transformer.h.2.mlp.c_fc",
    "transformer.h.2.mlp.c_proj",
    "q_proj",
    "encoder.layer.4.attention.self.query",
]

CONFIGS = [
    {"target_modules": ["q_proj", "v_proj"]},
    {"target_modules": ["model.layers.0.self_attn.q_proj", "lm_head"]},
    {"target_modules": ["proj"]},
    {"target_modules": ".*\\.(q|v)_proj"},
    {"target_modules": "model\\.layers\\.1\\..*"},
    {"target_modules": "q_proj"},
    {"target_modules": ".*(c_attn|c_fc)"},
    {"target_modules": ["q_proj", "v_proj", "down_proj"], "layers_to_transform": [1]},
    {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": 0},
    {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": [0, 12], "layers_pattern": "layers"},
    {"target_modules": ["w1", "w2", "w3"], "layers_to_transform": [1], "layers_pattern": ["layers"]},
    {"target_modules": ["w1", "w2", "w3"], "layers_to_transform": [0, 1]},
    {"target_modules": ["c_attn", "c_proj", "c_fc"], "layers_to_transform": [2], "layers_pattern": "h"},
    {"target_modules": ["query"], "layers_to_transform": [4], "layers_pattern": "layer"},
    {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": []},
    {"target_modules": ["q_proj", "v_proj", "o_proj"], "exclude_modules": ["o_proj", "model.layers.1.self_attn.v_proj"]},
    {"target_modules": ".*_proj", "exclude_modules": ".*\\.mlp\\..*"},
    {"target_modules": ["c_proj"], "exclude_modules": "transformer\\.h\\.0\\..*"},
    {"target_modules": ".*_proj", "layers_to_transform": [0]},
    {"target_modules": ["q_proj"], "layers_pattern": "layers"},
]


def decide(config, key):
    found = check_target_module_exists(config, key)
    if isinstance(found, _ExcludedModule):
        return "excluded"
    return "target" if found else "no"


def all_linear_cases():
    """`all-linear` on tiny random Llama and GPT-2 models: PEFT's own targets, and every
    linear layer with the output layer, for the caller-side resolution."""
    import torch
    from peft import get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    models = {
        "llama": LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24,
                                              num_hidden_layers=2, num_attention_heads=2,
                                              num_key_value_heads=1)),
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2)),
    }
    out = []
    for name, model in models.items():
        linear = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]
        output = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
        for raw in [{"target_modules": "all-linear"},
                    {"target_modules": "all-linear", "exclude_modules": ["o_proj", "c_fc"]}]:
            pm = get_peft_model(model, LoraConfig(r=2, **raw))
            targets = sorted(n for n, m in pm.base_model.model.named_modules() if hasattr(m, "lora_A"))
            out.append({"model": name, "config": raw, "linear": linear, "output_layer": output,
                        "targets": targets})
            model = pm.unload()
    return out


def main():
    cases = []
    for raw in CONFIGS:
        try:
            config = LoraConfig(r=4, **raw)
            error = None
        except ValueError as e:
            config, error = None, str(e)
        case = {"config": raw}
        if error is not None:
            case["error"] = error
        else:
            case["decisions"] = {key: decide(config, key) for key in KEYS}
        cases.append(case)
    out = Path(__file__).with_name("peft_target_rules.json")
    table = {"peft": __import__("peft").__version__, "cases": cases, "all_linear": all_linear_cases()}
    out.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {out} ({len(cases)} configs x {len(KEYS)} paths)")


if __name__ == "__main__":
    main()
