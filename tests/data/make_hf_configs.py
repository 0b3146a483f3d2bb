#!/usr/bin/env python3
"""How transformers 5.23 reads decoder `config.json` files of the Llama family.

For each raw config below (transformers-4 layout with top-level `rope_theta`/`rope_scaling`,
transformers-5 layout with `rope_parameters`, minimal ones that lean on defaults), loads it with
the model type's own config class and records the values a model is built from. Writes
hf_configs.json next to this script. Run with the peers' virtual environment:

    python tests/data/make_hf_configs.py
"""
import json
from pathlib import Path

from transformers import LlamaConfig, MistralConfig, MixtralConfig, Qwen2Config

CLASSES = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "mixtral": MixtralConfig}
LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

RAW = [
    {"model_type": "llama"},
    {"model_type": "mistral"},
    {"model_type": "qwen2"},
    {"model_type": "mixtral"},
    {"model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
     "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24, "rms_norm_eps": 1e-5,
     "max_position_embeddings": 131072, "rope_theta": 500000.0, "rope_scaling": dict(LLAMA3, rope_type="llama3"),
     "tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True, "hidden_act": "silu"},
    {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 131072,
     "rope_parameters": dict(LLAMA3, rope_type="llama3", rope_theta=500000.0)},
    {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "rope_scaling": None, "rope_theta": 1e6},
    {"model_type": "mistral", "hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 2,
     "sliding_window": 32, "rope_theta": 1e6},
    {"model_type": "mistral", "hidden_size": 64, "num_attention_heads": 8, "sliding_window": None},
    {"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
     "tie_word_embeddings": True, "rope_theta": 1e6, "use_sliding_window": False, "sliding_window": 32},
    {"model_type": "mixtral", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4,
     "num_experts_per_tok": 2, "sliding_window": 16},
]


def read(raw):
    c = CLASSES[raw["model_type"]].from_dict(dict(raw))
    rope = dict(c.rope_parameters)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    window = getattr(c, "sliding_window", None)
    if raw["model_type"] == "qwen2" and not getattr(c, "use_sliding_window", False):
        window = None
    out = {
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": head_dim, "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_position_embeddings, "rope_theta": rope["rope_theta"],
        "rope_type": rope.get("rope_type", "default"), "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": bool(getattr(c, "attention_bias", False)), "mlp_bias": bool(getattr(c, "mlp_bias", False)),
        "sliding_window": window,
        "num_local_experts": getattr(c, "num_local_experts", None),
        "num_experts_per_tok": getattr(c, "num_experts_per_tok", None),
    }
    if out["rope_type"] == "llama3":
        out.update({k: rope[k] for k in LLAMA3})
    return out


def main():
    cases = [{"raw": raw, "transformers": read(raw)} for raw in RAW]
    path = Path(__file__).with_name("hf_configs.json")
    path.write_text(json.dumps({"transformers": __import__("transformers").__version__, "cases": cases}, indent=1) + "\n")
    print(f"wrote {path} ({len(cases)} configs)")


if __name__ == "__main__":
    main()
