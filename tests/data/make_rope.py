#!/usr/bin/env python3
"""Golden vectors for Hugging Face's rotary position embedding (transformers 5.23, Llama).

For a default RoPE (theta 10000) and a Llama-3 scaled one (theta 500000, factor 8, low/high
frequency factors 1/4, original context 8192), with head_dim 16: the inverse frequencies,
cos/sin for two rows of position ids (one with large positions), and q rotated by
`apply_rotary_pos_emb`. Writes rope_golden.safetensors next to this script (positions as F32,
exact below 2^24). Run with the peers' virtual environment:

    python tests/data/make_rope.py
"""
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

HEAD_DIM, HEADS = 16, 2
CONFIGS = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
}


def main():
    torch.manual_seed(0)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7], [0, 0, 0, 1, 2, 1000, 8191, 20000]])
    q = torch.randn(2, HEADS, positions.shape[1], HEAD_DIM)
    out = {"positions": positions.float(), "q": q}
    for name, rope in CONFIGS.items():
        config = LlamaConfig(hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS, head_dim=HEAD_DIM,
                             rope_parameters=rope, max_position_embeddings=32768)
        emb = LlamaRotaryEmbedding(config)
        cos, sin = emb(q, positions)
        q_embed, _ = apply_rotary_pos_emb(q, q, cos, sin)
        out[f"{name}.inv_freq"] = emb.inv_freq.float()
        out[f"{name}.cos"] = cos.contiguous()
        out[f"{name}.sin"] = sin.contiguous()
        out[f"{name}.q_embed"] = q_embed.contiguous()
    path = Path(__file__).with_name("rope_golden.safetensors")
    save_file(out, str(path))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
