"""Writes tests/data/tiny_tokenizer: a small Llama-style BPE tokenizer (tokenizer.json, with
BOS added by its post-processor, tokenizer_config.json naming pad and eos tokens) trained by
Hugging Face `tokenizers` on a fixed text, and tokens.json: transformers' left- and
right-padded encodings of a few texts, truncated ones, and their decodings, for
tests/tokenizer.rs.

tokenizer.json also carries padding (with `</s>`) and truncation (8 ids) settings of its own, as
many hub tokenizers do (all-MiniLM-L6-v2 pads to 128): transformers pads with the config's
`pad_token` and truncates only when asked, and the goldens show it.

Run with the peers' virtual environment:

    PYTHONHASHSEED=0 python tests/data/make_tiny_tokenizer.py
"""
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

CORPUS = [
    "the cat sat on the mat", "a dog ran in the park", "modular models route tokens to experts",
    "low rank adapters share one frozen base", "the router picks two experts per token",
    "cats and dogs are friends", "Rust makes fast and safe code", "héllo wörld, ünïcode too!",
]
TEXTS = ["the cat sat", "a dog ran in the park, happily!", "héllo experts", ""]


def main():
    out = Path(__file__).with_name("tiny_tokenizer")
    out.mkdir(exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tok.enable_padding(pad_id=2, pad_token="</s>")
    tok.enable_truncation(max_length=8)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
         "tokenizer_class": "PreTrainedTokenizerFast"}, indent=1) + "\n")
    cases = {}
    for side in ["left", "right"]:
        hf = AutoTokenizer.from_pretrained(str(out), padding_side=side)
        enc = hf(TEXTS, padding=True)
        cases[side] = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    hf = AutoTokenizer.from_pretrained(str(out), padding_side="left")
    truncated = hf(TEXTS, padding=True, truncation=True, max_length=5)
    truncated = {"input_ids": truncated["input_ids"], "attention_mask": truncated["attention_mask"]}
    # The file alone, without tokenizer_config.json: its own padding setting gives the pad id.
    file_only = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    plain = hf(TEXTS, add_special_tokens=False)["input_ids"]
    decoded = [hf.decode(hf(t)["input_ids"], skip_special_tokens=True) for t in TEXTS]
    with_special = [hf.decode(hf(t)["input_ids"]) for t in TEXTS]
    golden = {"texts": TEXTS, "padded": cases, "no_special_tokens": plain,
              "decoded": decoded, "decoded_with_special_tokens": with_special,
              "truncated_left_5": truncated, "vocab_size": len(hf), "pad_id": hf.pad_token_id,
              "file_pad_id": file_only.pad_token_id}
    (out / "tokens.json").write_text(json.dumps(golden, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
