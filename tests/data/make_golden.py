#!/usr/bin/env python3
"""Rebuilds every golden file under tests/data from Hugging Face PEFT itself.

Run it from the repository root with the pinned peers installed in a virtual environment
outside the repository:

    python3 -m venv ../.peers-venv
    ../.peers-venv/bin/pip install -r ../shared/peers/requirements.txt
    ../.peers-venv/bin/python tests/data/make_golden.py

It checks the versions (torch 2.15.0, peft 0.21.2, transformers 5.23.0, safetensors 0.8.0,
numpy 2.4.6) and refuses to run with others. Every value is drawn from seeded torch
generators on the CPU, so a rerun writes the same files. The numbers the tests compare against
come from PEFT's and transformers' own code paths (layer forwards, get_delta_weight,
merge_adapter, add_weighted_adapter, save_pretrained, GPT2Attention under PrefixTuning, the
Arrow layer's forward); where a value is computed by hand here (prototypes by exact SVD,
statistics over DARE trials) the manifest says so.

Outputs: the *.safetensors files, the PEFT adapter folders peft_*_tiny_mlp/ and manifest.json,
which records versions, shapes, formulas, oracles and the DARE statistics.
"""

import json
import os
import shutil
import sys
import tempfile

# PEFT writes target_modules from a set, whose order follows string hashing: fix the hash seed
# so that a rerun writes byte-identical adapter_config.json files. Under seed 1 the set of
# these module names iterates in sorted order, which is how modula writes the list, so the
# re-save test can compare the documents key for key (save_adapter_folder checks it).
if os.environ.get("PYTHONHASHSEED") != "1":
    os.environ["PYTHONHASHSEED"] = "1"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import numpy as np
import peft
import safetensors
import torch
import transformers
from peft import (
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    get_peft_model,
)
from safetensors.torch import save_file
from torch import nn

PINNED = {
    "torch": "2.15.0",
    "peft": "0.21.2",
    "transformers": "5.23.0",
    "safetensors": "0.8.0",
    "numpy": "2.4.6",
}
OUT = os.path.dirname(os.path.abspath(__file__))
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)


def check_versions():
    found = {
        "torch": torch.__version__.split("+")[0],
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
    }
    wrong = {k: v for k, v in found.items() if v != PINNED[k]}
    if wrong:
        sys.exit(f"make_golden.py needs {PINNED}; found {wrong} (see ../shared/peers/requirements.txt)")
    found["python"] = sys.version.split()[0]
    return found


def gen(seed):
    g = torch.Generator().manual_seed(seed)
    return g


def randn(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g) * scale


def shapes(tensors):
    return {k: list(v.shape) for k, v in tensors.items()}


def save(name, tensors):
    save_file({k: v.detach().contiguous().to(torch.float32) for k, v in tensors.items()}, os.path.join(OUT, name))


class TinyMLP(nn.Module):
    """fc1: Linear(16 -> 12), ReLU, fc2: Linear(12 -> 8)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 12)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(12, 8)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(x)))


BASE_SEED = 20261202


def base_model():
    """The shared base: weights and biases drawn wider than torch's default init so that every
    term is visible at 1e-5."""
    g = gen(BASE_SEED)
    m = TinyMLP()
    with torch.no_grad():
        m.fc1.weight.copy_(randn(g, 12, 16, scale=0.3))
        m.fc1.bias.copy_(randn(g, 12, scale=0.3))
        m.fc2.weight.copy_(randn(g, 8, 12, scale=0.3))
        m.fc2.bias.copy_(randn(g, 8, scale=0.3))
    x = randn(g, 5, 16)
    return m, x


def fill_lora(model, seed, adapter="default"):
    """Non-zero A and B (PEFT initialises B to zero, which would hide every bug)."""
    g = gen(seed)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if hasattr(mod, "lora_A") and adapter in mod.lora_A:
                a, b = mod.lora_A[adapter].weight, mod.lora_B[adapter].weight
                a.copy_(randn(g, *a.shape, scale=0.25))
                b.copy_(randn(g, *b.shape, scale=0.25))


def save_adapter_folder(peft_model, name):
    """save_pretrained into tests/data/<name>, keeping only the two files modula reads."""
    dst = os.path.join(OUT, name)
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp)
        if os.path.exists(dst):
            shutil.rmtree(dst)
        os.makedirs(dst)
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy(os.path.join(tmp, f), os.path.join(dst, f))
    with open(os.path.join(dst, "adapter_config.json")) as f:
        modules = json.load(f)["target_modules"]
    assert modules == sorted(modules), f"{name}: target_modules {modules} not sorted; change PYTHONHASHSEED"
    return ["adapter_config.json", "adapter_model.safetensors"]


LORA_FORMULA = (
    "scaling = alpha/sqrt(r) if use_rslora else alpha/r; out = x@W^T + b + scaling*(x@A^T)@B^T; "
    "delta_weight = scaling*B@A; merged_weight = W + delta_weight (bias unchanged)"
)
ATOL = {"atol": 1e-05}


def tiny_mlp_base(manifest):
    m, x = base_model()
    t = {
        "fc1.weight": m.fc1.weight,
        "fc1.bias": m.fc1.bias,
        "fc2.weight": m.fc2.weight,
        "fc2.bias": m.fc2.bias,
        "x": x,
        "expected_out_base": m(x),
    }
    save("tiny_mlp_base.safetensors", t)
    manifest["tiny_mlp_base.safetensors"] = {
        "description": "Base weights of TinyMLP (fc1: Linear(16->12), ReLU, fc2: Linear(12->8)) plus input x "
        "and the plain model output. Keys follow torch state_dict names; Linear weight is [out, in], "
        "y = x @ W^T + b.",
        "tensors": shapes(t),
    }


def lora_files(manifest, rslora, seed):
    """One PEFT LoRA model per setting: the fc1 layer file and the whole-model folder."""
    tag = "rslora" if rslora else "lora"
    m, x = base_model()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], use_rslora=rslora, lora_dropout=0.0)
    pm = get_peft_model(m, cfg)
    fill_lora(pm, seed)
    pm.eval()
    fc1 = pm.base_model.model.fc1
    scaling = fc1.scaling["default"]
    with torch.no_grad():
        out_fc1 = fc1(x)
        delta = fc1.get_delta_weight("default")
        out_model = pm(x)
    layer = {
        "x": x,
        "base_weight": fc1.base_layer.weight.clone(),
        "base_bias": fc1.base_layer.bias.clone(),
        "lora_A": fc1.lora_A["default"].weight.clone(),
        "lora_B": fc1.lora_B["default"].weight.clone(),
        "expected_out": out_fc1,
        "expected_delta_weight": delta,
    }
    files = save_adapter_folder(pm, f"peft_{tag}_tiny_mlp")
    pm.merge_adapter()
    layer["expected_merged_weight"] = fc1.base_layer.weight.clone()
    save(f"lora_linear_{tag}.safetensors", layer)
    manifest[f"lora_linear_{tag}.safetensors"] = {
        "description": f"PEFT LoRA Linear (fc1 of TinyMLP), {'rsLoRA' if rslora else 'standard LoRA'}; "
        "x [5,16], W [12,16], A [4,16], B [12,4].",
        "params": {
            "d_in": 16,
            "d_out": 12,
            "r": 4,
            "lora_alpha": 8,
            "use_rslora": rslora,
            "scaling": float(scaling),
            "lora_dropout": 0.0,
        },
        "formula": LORA_FORMULA,
        "oracle": "peft.tuners.lora.layer.Linear forward / get_delta_weight / merge_adapter",
        "tolerance": ATOL,
        "tensors": shapes(layer),
    }
    whole = {
        "x": x,
        "expected_out": out_model,
        "expected_merged_fc1_weight": pm.base_model.model.fc1.base_layer.weight.clone(),
        "expected_merged_fc2_weight": pm.base_model.model.fc2.base_layer.weight.clone(),
    }
    save(f"peft_{tag}_tiny_mlp_expected.safetensors", whole)
    manifest[f"peft_{tag}_tiny_mlp_expected.safetensors"] = {
        "description": f"End-to-end check for the on-disk adapter in peft_{tag}_tiny_mlp/ applied to the base "
        "weights in tiny_mlp_base.safetensors: model(x) with the adapter active, and merged weights.",
        "adapter_dir": f"peft_{tag}_tiny_mlp/",
        "adapter_dir_files": files,
        "key_naming": "adapter_model.safetensors keys: base_model.model.<module>.lora_A.weight [r,in] / "
        "lora_B.weight [out,r] (adapter name stripped); adapter_config.json holds r, lora_alpha, use_rslora, "
        "target_modules, ...",
        "oracle": "PeftModel.save_pretrained + PeftModel forward",
        "tolerance": ATOL,
        "tensors": shapes(whole),
    }


def lora_patterns(manifest):
    """A folder PEFT wrote with rank_pattern and alpha_pattern: fc2 gets r = 2, alpha = 3."""
    m, x = base_model()
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["fc1", "fc2"],
        rank_pattern={"fc2": 2},
        alpha_pattern={"fc2": 3},
        lora_dropout=0.0,
    )
    pm = get_peft_model(m, cfg)
    fill_lora(pm, 404)
    pm.eval()
    with torch.no_grad():
        out = pm(x)
    files = save_adapter_folder(pm, "peft_lora_patterns_tiny_mlp")
    fc2 = pm.base_model.model.fc2
    params = {
        "fc1": {"r": 4, "lora_alpha": 8, "scaling": float(pm.base_model.model.fc1.scaling["default"])},
        "fc2": {"r": int(fc2.r["default"]), "lora_alpha": 3, "scaling": float(fc2.scaling["default"])},
    }
    pm.merge_adapter()
    t = {
        "x": x,
        "expected_out": out,
        "expected_merged_fc1_weight": pm.base_model.model.fc1.base_layer.weight.clone(),
        "expected_merged_fc2_weight": fc2.base_layer.weight.clone(),
    }
    save("peft_lora_patterns_tiny_mlp_expected.safetensors", t)
    manifest["peft_lora_patterns_tiny_mlp_expected.safetensors"] = {
        "description": "A LoRA folder PEFT wrote with rank_pattern {fc2: 2} and alpha_pattern {fc2: 3} over "
        "r = 4, lora_alpha = 8, applied to tiny_mlp_base.safetensors: model(x) and merged weights.",
        "adapter_dir": "peft_lora_patterns_tiny_mlp/",
        "adapter_dir_files": files,
        "params": params,
        "oracle": "PeftModel.save_pretrained + PeftModel forward / merge_adapter",
        "tolerance": ATOL,
        "tensors": shapes(t),
    }


MERGE_CASES = [
    ("linear", "linear", [0.5, 0.3, 0.2], {}),
    ("linear_negative_weight", "linear", [0.5, -0.3, 0.2], {}),
    ("cat", "cat", [0.5, 0.3, 0.2], {}),
    ("svd", "svd", [0.5, 0.3, 0.2], {}),
    ("svd_rank2", "svd", [0.5, 0.3, 0.2], {"svd_rank": 2}),
    ("ties", "ties", [0.5, 0.3, 0.2], {"density": 0.5}),
    ("ties_frequency", "ties", [0.5, 0.3, 0.2], {"density": 0.5, "majority_sign_method": "frequency"}),
    ("magnitude_prune", "magnitude_prune", [0.5, 0.3, 0.2], {"density": 0.5}),
    ("ties_svd", "ties_svd", [0.5, 0.3, 0.2], {"density": 0.5}),
    ("magnitude_prune_svd", "magnitude_prune_svd", [0.5, 0.3, 0.2], {"density": 0.5}),
]


def merge_weighted(manifest):
    m, _ = base_model()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["fc1"], lora_dropout=0.0)
    pm = get_peft_model(m, cfg, adapter_name="a0")
    for i in (1, 2):
        pm.add_adapter(f"a{i}", cfg)
    for i in range(3):
        fill_lora(pm, 500 + i, adapter=f"a{i}")
    fc1 = pm.base_model.model.fc1
    names = ["a0", "a1", "a2"]
    t = {}
    for n in names:
        t[f"{n}.lora_A"] = fc1.lora_A[n].weight.clone()
        t[f"{n}.lora_B"] = fc1.lora_B[n].weight.clone()
        t[f"{n}.delta_weight"] = fc1.get_delta_weight(n).detach().clone()
    cases = {}
    with torch.no_grad():
        for case, ctype, weights, kwargs in MERGE_CASES:
            pm.add_weighted_adapter(names, weights, case, combination_type=ctype, **kwargs)
            t[f"{case}.lora_A"] = fc1.lora_A[case].weight.clone()
            t[f"{case}.lora_B"] = fc1.lora_B[case].weight.clone()
            t[f"{case}.delta_weight"] = fc1.get_delta_weight(case).clone()
            cases[case] = {
                "combination_type": ctype,
                "weights": weights,
                "kwargs": kwargs,
                "new_rank": int(fc1.r[case]),
                "new_scaling": float(fc1.scaling[case]),
                "compare": "delta_weight (A/B are sign-ambiguous)"
                if "svd" in ctype
                else "lora_A, lora_B, delta_weight",
            }
            pm.delete_adapter(case)
        exact = sum(w * t[f"{n}.delta_weight"] for n, w in zip(names, [0.5, 0.3, 0.2]))
        t["svd.singular_values_of_merged_delta"] = torch.linalg.svdvals(exact.double()).float()
    dare = {}
    trials = 512
    for ctype in ("dare_linear", "dare_ties"):
        a_s, b_s, d_s = [], [], []
        with torch.no_grad():
            for trial in range(trials):
                torch.manual_seed(1000 + trial)
                pm.add_weighted_adapter(names, [0.5, 0.3, 0.2], "d", combination_type=ctype, density=0.5)
                a_s.append(fc1.lora_A["d"].weight.clone())
                b_s.append(fc1.lora_B["d"].weight.clone())
                d_s.append(fc1.get_delta_weight("d").clone())
                pm.delete_adapter("d")
        a_s, b_s, d_s = torch.stack(a_s), torch.stack(b_s), torch.stack(d_s)
        t[f"{ctype}.sample_seed1000.lora_A"] = a_s[0]
        t[f"{ctype}.sample_seed1000.lora_B"] = b_s[0]
        t[f"{ctype}.mean_lora_A"] = a_s.mean(0)
        t[f"{ctype}.mean_lora_B"] = b_s.mean(0)
        t[f"{ctype}.mean_delta_weight"] = d_s.mean(0)
        t[f"{ctype}.std_lora_A"] = a_s.std(0)
        t[f"{ctype}.std_lora_B"] = b_s.std(0)
        norms = d_s.flatten(1).norm(dim=1)
        dare[ctype] = {
            "combination_type": ctype,
            "weights": [0.5, 0.3, 0.2],
            "density": 0.5,
            "n_trials": trials,
            "seeds": "torch.manual_seed(1000 + trial) before each add_weighted_adapter call",
            "zero_fraction_lora_A_mean": float((a_s == 0).float().mean()),
            "zero_fraction_lora_B_mean": float((b_s == 0).float().mean()),
            "frobenius_delta_mean": float(norms.mean()),
            "frobenius_delta_std": float(norms.std()),
            "note": "sample_seed1000.* is reproducible only with torch's CPU RNG; compare mean_* within a few "
            "std/sqrt(n_trials). For dare_linear E[lora_A] and E[lora_B] equal the 'linear' result exactly, and "
            "the expected zero fraction is (1-density)^3 = 0.125.",
        }
    save("merge_weighted.safetensors", t)
    manifest["merge_weighted.safetensors"] = {
        "description": "PEFT LoraModel.add_weighted_adapter on one Linear(16->12) with 3 LoRAs (r=4, alpha=8, "
        "scaling=2). Keys a{i}.lora_A [4,16], a{i}.lora_B [12,4], a{i}.delta_weight; per case <case>.lora_A, "
        "<case>.lora_B, <case>.delta_weight (= B@A * new_scaling, new_scaling=1 since the new adapter gets "
        "lora_alpha=r).",
        "params": {"weights": [0.5, 0.3, 0.2], "adapter_scaling": 2.0, "d_in": 16, "d_out": 12, "r": 4, "lora_alpha": 8},
        "cases": cases,
        "dare": dare,
        "formula": {
            "cat": "A_new = concat_rows(w_i*s_i*A_i), B_new = concat_cols(B_i); new r = sum r_i",
            "linear/ties/magnitude_prune/dare_*": "A and B are merged separately with per-adapter weights "
            "wA_i = sign(w_i*s_i)*sqrt(|w_i*s_i|), wB_i = sqrt(|w_i*s_i|) (s_i = adapter scaling). linear: "
            "A_new = sum wA_i*A_i, B_new = sum wB_i*B_i. magnitude_prune: keep top int(density*numel) |entries| "
            "of each input, then weighted sum. ties: same pruning, sign = +1 where sum_i(pruned_i) >= 0 else -1 "
            "('total'; 'frequency' uses sum_i sign(pruned_i)); keep entries of the majority sign; result = "
            "sum_i(w_i*pruned_i*mask_i) / max(count_i(mask_i), 1). dare_linear: pruned_i = X_i*Bernoulli(density)"
            "/density then weighted sum. dare_ties: random prune + rescale, then the ties election/disjoint mean.",
            "svd/ties_svd/magnitude_prune_svd": "delta_i = s_i*B_i@A_i (full matrices); merged = "
            "task_arithmetic|ties|magnitude_prune over delta_i with weights w_i; U,S,Vh = svd(merged); "
            "B_new = U[:, :k]@diag(S[:k]), A_new = Vh[:k]; k = svd_rank or max r_i",
        },
        "oracle": "peft.tuners.lora.model.LoraModel.add_weighted_adapter; singular values by torch.linalg.svdvals "
        "of sum_i w_i*delta_i in float64",
        "tolerance": ATOL,
        "tensors": shapes(t),
    }


def ia3(manifest):
    m, x = base_model()
    cfg = IA3Config(target_modules=["fc1", "fc2"], feedforward_modules=["fc2"])
    pm = get_peft_model(m, cfg)
    g = gen(606)
    inner = pm.base_model.model
    with torch.no_grad():
        for mod in (inner.fc1, inner.fc2):
            v = mod.ia3_l["default"]
            v.copy_(1.0 + randn(g, *v.shape, scale=0.5))
    pm.eval()
    with torch.no_grad():
        h1 = inner.fc1(x)
        h2 = inner.fc2(torch.relu(h1))
        out = pm(x)
    files = save_adapter_folder(pm, "peft_ia3_tiny_mlp")
    t = {
        "x": x,
        "fc1.ia3_l": inner.fc1.ia3_l["default"].clone(),
        "fc2.ia3_l": inner.fc2.ia3_l["default"].clone(),
        "expected_fc1_out": h1,
        "expected_fc2_out": h2,
        "expected_out": out,
    }
    pm.merge_adapter()
    for n, mod in (("fc1", inner.fc1), ("fc2", inner.fc2)):
        t[f"expected_merged_{n}_weight"] = mod.base_layer.weight.clone()
        t[f"expected_merged_{n}_bias"] = mod.base_layer.bias.clone()
    save("ia3_tiny_mlp.safetensors", t)
    manifest["ia3_tiny_mlp.safetensors"] = {
        "description": "PEFT (IA)^3 on TinyMLP (base weights in tiny_mlp_base.safetensors): fc1 is a normal "
        "target (scales outputs), fc2 is a feedforward target (scales inputs).",
        "params": {"target_modules": ["fc1", "fc2"], "feedforward_modules": ["fc2"]},
        "formula": "non-feedforward: out = (x@W^T + b) * l (l: [out,1], bias scaled too); merge: W' = W * l "
        "(rows), b' = b * l. feedforward: out = (x * l)@W^T + b (l: [1,in]); merge: W' = W * l (columns), b "
        "unchanged.",
        "adapter_dir": "peft_ia3_tiny_mlp/",
        "adapter_dir_files": files,
        "oracle": "peft.tuners.ia3.layer.Linear forward / merge_adapter",
        "tolerance": ATOL,
        "tensors": shapes(t),
    }


def prefix_tuning(manifest):
    g = gen(707)
    config = transformers.GPT2Config(
        vocab_size=50,
        n_positions=32,
        n_embd=16,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(707)
    model = transformers.GPT2LMHeadModel(config)
    attn = model.transformer.h[0].attn
    with torch.no_grad():
        # GPT-2 initialises these biases to zero; non-zero ones make the bias terms visible.
        attn.c_attn.bias.copy_(randn(g, 48, scale=0.5))
        attn.c_proj.bias.copy_(randn(g, 16, scale=0.5))
        attn.c_attn.weight.copy_(randn(g, 16, 48, scale=0.3))
        attn.c_proj.weight.copy_(randn(g, 16, 16, scale=0.3))
    pcfg = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    pm = get_peft_model(model, pcfg)
    with torch.no_grad():
        emb = pm.prompt_encoder["default"].embedding.weight
        emb.copy_(randn(g, *emb.shape))
    pm.eval()
    seen = {}

    def hook(mod, args, kwargs, output):
        seen["hidden_in"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        seen["out"] = output[0].detach().clone()

    handle = attn.register_forward_hook(hook, with_kwargs=True)
    ids = torch.randint(0, 50, (1, 5), generator=g)
    with torch.no_grad():
        pm(input_ids=ids)
    handle.remove()
    prefix = pm.prompt_encoder["default"].embedding.weight.detach().clone()  # [3, L*2*H]
    kv = prefix.view(3, 2, 2, 8)  # [nvt, L*2, heads, hd]
    keys = kv[:, 0].permute(1, 0, 2)
    values = kv[:, 1].permute(1, 0, 2)
    # The formula by hand, to show what the captured output means.
    h = seen["hidden_in"][0]
    qkv = h @ attn.c_attn.weight + attn.c_attn.bias
    q, k, v = qkv.split(16, dim=1)
    split = lambda z: z.view(-1, 2, 8).permute(1, 0, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    K, V = torch.cat([keys, k], 1), torch.cat([values, v], 1)
    scores = q @ K.transpose(1, 2) / 8**0.5
    mask = torch.ones(5, 8, dtype=torch.bool)
    mask[:, 3:] = torch.tril(torch.ones(5, 5, dtype=torch.bool))
    scores = scores.masked_fill(~mask, float("-inf"))
    manual = (scores.softmax(-1) @ V).permute(1, 0, 2).reshape(5, 16) @ attn.c_proj.weight + attn.c_proj.bias
    manual_err = float((manual - seen["out"][0]).abs().max())
    assert manual_err < 1e-5, manual_err

    from peft.tuners.prefix_tuning.model import PrefixEncoder

    ecfg = PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=3,
        prefix_projection=True,
        encoder_hidden_size=8,
        token_dim=16,
        num_layers=1,
        num_attention_heads=2,
        num_transformer_submodules=1,
    )
    torch.manual_seed(708)
    enc = PrefixEncoder(ecfg)
    with torch.no_grad():
        enc.embedding.weight.copy_(randn(g, 3, 16))
        flat = enc(torch.arange(3).unsqueeze(0))[0]
    t = {
        "hidden_in": h,
        "c_attn.weight": attn.c_attn.weight,
        "c_attn.bias": attn.c_attn.bias,
        "c_proj.weight": attn.c_proj.weight,
        "c_proj.bias": attn.c_proj.bias,
        "prefix_embedding": prefix,
        "prefix_keys": keys,
        "prefix_values": values,
        "expected_attn_out": seen["out"][0],
        "proj.embedding": enc.embedding.weight,
        "proj.transform.0.weight": enc.transform[0].weight,
        "proj.transform.0.bias": enc.transform[0].bias,
        "proj.transform.2.weight": enc.transform[2].weight,
        "proj.transform.2.bias": enc.transform[2].bias,
        "proj.expected_prefix_kv_flat": flat,
    }
    save("prefix_tuning_gpt2_layer.safetensors", t)
    manifest["prefix_tuning_gpt2_layer.safetensors"] = {
        "description": "Prefix tuning on a 1-layer GPT-2 (n_embd=16, 2 heads, 3 virtual tokens, input of 5 "
        "tokens, no dropout, non-zero c_attn/c_proj biases). expected_attn_out is the output of "
        "transformer.h[0].attn captured by a forward hook while PeftModelForCausalLM ran with the prefix; "
        "hidden_in is that module's input (after ln_1). proj.* is a separate PrefixEncoder with "
        "prefix_projection=True (encoder_hidden_size=8).",
        "params": {"n_embd": 16, "n_head": 2, "head_dim": 8, "num_virtual_tokens": 3, "seq_len": 5, "num_layers": 1},
        "formula": "prefix_embedding [nvt, L*2*H] -> view [nvt, L*2, heads, hd]; layer l keys = [:, 2l], values = "
        "[:, 2l+1], permuted to [heads, nvt, hd]. q,k,v = split(h @ c_attn.weight + c_attn.bias) (GPT-2 Conv1D, "
        "weight [in,out]); K = [prefix_keys; k], V = [prefix_values; v]; scores = q K^T / sqrt(hd); query i sees "
        "all prefix slots and tokens <= i; out = merge_heads(softmax(scores) V) @ c_proj.weight + c_proj.bias. "
        "Projection encoder: kv_flat = Linear2(tanh(Linear1(embedding[arange(nvt)]))) (torch Linear, [out,in]).",
        "oracle": "transformers GPT2Attention under peft PrefixTuning (PeftModelForCausalLM); manual formula "
        f"reproduces it to {manual_err:.1e}",
        "tolerance": ATOL,
        "tensors": shapes(t),
    }


def arrow(manifest):
    from peft.tuners.lora.arrow import ArrowLoraLinearLayer
    from peft.tuners.lora.config import ArrowConfig

    g = gen(808)
    E, r, d_in, d_out, scaling = 4, 4, 16, 12, 2.0
    A = {f"task_{e}": nn.Linear(d_in, r, bias=False) for e in range(E)}
    B = {f"task_{e}": nn.Linear(r, d_out, bias=False) for e in range(E)}
    with torch.no_grad():
        for e in range(E):
            A[f"task_{e}"].weight.copy_(randn(g, r, d_in, scale=0.5))
            B[f"task_{e}"].weight.copy_(randn(g, d_out, r, scale=0.5))
    lora_A, lora_B = nn.ModuleDict(A), nn.ModuleDict(B)
    cfg = ArrowConfig(top_k=2, router_temperature=1.0, rng_seed=0)
    cfg.task_adapter_names = [f"task_{e}" for e in range(E)]
    cfg.gks_adapter_names = []
    layer = ArrowLoraLinearLayer(d_in, cfg)
    layer.build_prototypes(lora_A, lora_B)
    power = layer.prototypes.clone()
    # Exact prototypes: the top right singular vector of B@A, largest-|entry| made positive.
    exact = []
    for e in range(E):
        _, _, vh = torch.linalg.svd((B[f"task_{e}"].weight @ A[f"task_{e}"].weight).double())
        v = vh[0]
        exact.append((v * torch.sign(v[v.abs().argmax()])).float())
    exact = torch.stack(exact)
    # PEFT's routing and mixture with the exact prototypes in place of its power iteration.
    layer.prototypes = exact.clone()
    x = randn(g, 6, d_in)
    with torch.no_grad():
        delta = layer(x.unsqueeze(0), lora_A, lora_B, nn.Identity(), {n: scaling for n in cfg.task_adapter_names})[0]
        sim = (x @ exact.T).abs()
        top_v, idx = sim.topk(2, dim=1)
        full = torch.full_like(sim, float("-inf")).scatter(1, idx, top_v)
        coeff = full.softmax(1)
    t = {"x": x, "prototypes": exact, "prototypes_peft_power_iteration": power}
    for e in range(E):
        t[f"task_{e}.lora_A"] = A[f"task_{e}"].weight
        t[f"task_{e}.lora_B"] = B[f"task_{e}"].weight
    t.update(
        {
            "similarity_abs": sim,
            "topk_indices": idx.float(),
            "routing_weights": coeff,
            "expected_delta": delta,
        }
    )
    save("arrow_routing.safetensors", t)
    manifest["arrow_routing.safetensors"] = {
        "description": "Arrow routing over 4 LoRAs (Linear 16->12, r=4, alpha=8 -> scaling 2) for 6 input rows, "
        "top_k=2, temperature=1. prototypes = sign-normalised top right singular vectors of B@A (exact SVD); "
        "prototypes_peft_power_iteration = PEFT's own (15 power iterations from a seeded random start, not "
        "sign-normalised; equal up to sign). expected_delta is ArrowLoraLinearLayer.forward run with the exact "
        "prototypes. topk_indices stored as float.",
        "params": {
            "num_loras": E,
            "r": r,
            "d_in": d_in,
            "d_out": d_out,
            "lora_alpha": 8,
            "scaling": scaling,
            "top_k": 2,
            "router_temperature": 1.0,
            "rng_seed": 0,
        },
        "formula": "prototype_e = v1(B_e@A_e) (unit norm; right singular vector, lives in input space); sign "
        "convention here: the entry with the largest |value| is made positive (Arrow is sign-agnostic). "
        "sim[t,e] = |x_t . prototype_e| (x not normalised); keep the top_k sims per row, others -inf; "
        "routing_weights = softmax(kept_sims / temperature) over experts (zeros outside top-k). expected_delta[t] "
        "= sum_e routing_weights[t,e] * scaling_e * B_e @ A_e @ x_t (the layer output adds the base Linear on top).",
        "oracle": "peft.tuners.lora.arrow.ArrowLoraLinearLayer.build_prototypes / forward (peft 0.21.2)",
        "tolerance": {"atol": 1e-05, "prototypes": "compare up to sign, 1-|cos| < 1e-5"},
        "tensors": shapes(t),
    }


def main():
    versions = check_versions()
    files = {}
    tiny_mlp_base(files)
    lora_files(files, rslora=False, seed=101)
    lora_files(files, rslora=True, seed=202)
    lora_patterns(files)
    merge_weighted(files)
    ia3(files)
    prefix_tuning(files)
    arrow(files)
    manifest = {
        "generator": "tests/data/make_golden.py",
        "versions": versions,
        "dtype": "float32",
        "conventions": "torch Linear weight is [out, in]; LoRA A is [r, in], B is [out, r]; y = x @ W^T + b.",
        "files": files,
    }
    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    print(f"wrote {len(files)} golden files and manifest.json to {OUT}")


if __name__ == "__main__":
    main()
