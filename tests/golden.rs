//! Reproduces every golden vector of tests/data (produced by Hugging Face PEFT 0.21.2 on
//! PyTorch 2.15, see tests/data/manifest.json) to 1e-5 absolute.

mod common;

use burn::nn::Linear;
use burn::tensor::{Device, Tensor, activation};
use common::{assert_close, data, devices, golden};
use modula::io::linear_from_torch;
use modula::prelude::*;

const ATOL: f32 = 1e-5;

/// fc1 of TinyMLP with the golden single-layer LoRA attached.
fn golden_lora_layer(file: &str, rslora: bool, device: &Device) -> (LoraLinear, TensorFile) {
    let g = golden(file);
    let base = linear_from_torch(
        g.tensor("base_weight", device).unwrap(),
        Some(g.tensor("base_bias", device).unwrap()),
    )
    .unwrap();
    let a: Tensor<2> = g.tensor("lora_A", device).unwrap();
    let b: Tensor<2> = g.tensor("lora_B", device).unwrap();
    let adapter = LoraModule::from_factors(a.transpose(), b.transpose(), 8.0, rslora, 0.0).unwrap();
    let mut layer = LoraLinear::new(base);
    layer.insert_adapter("default", adapter).unwrap();
    (layer, g)
}

fn check_lora_linear(file: &str, rslora: bool, scaling: f64) {
    for device in devices() {
        let (mut layer, g) = golden_lora_layer(file, rslora, &device);
        assert_eq!(layer.adapter("default").unwrap().scaling(), scaling);
        let x: Tensor<2> = g.tensor("x", &device).unwrap();
        let expected: Tensor<2> = g.tensor("expected_out", &device).unwrap();
        assert_close(
            layer.forward(x.clone()).unwrap(),
            expected.clone(),
            ATOL,
            "LoRA output",
        );
        let delta = layer.adapter("default").unwrap().delta_weight().transpose();
        assert_close(
            delta,
            g.tensor("expected_delta_weight", &device).unwrap(),
            ATOL,
            "delta weight",
        );
        layer.merge("default").unwrap();
        let merged = layer.base.weight.val().transpose();
        assert_close(
            merged,
            g.tensor("expected_merged_weight", &device).unwrap(),
            ATOL,
            "merged weight",
        );
        assert_close(layer.forward(x).unwrap(), expected, ATOL, "merged output");
    }
}

#[test]
fn lora_linear_matches_peft() {
    check_lora_linear("lora_linear_lora.safetensors", false, 2.0);
}

#[test]
fn rslora_linear_matches_peft() {
    check_lora_linear("lora_linear_rslora.safetensors", true, 4.0);
}

/// TinyMLP: fc1 (16→12), ReLU, fc2 (12→8), each with a LoRA from a PEFT folder.
struct TinyMlp {
    fc1: LoraLinear,
    fc2: LoraLinear,
}

impl TinyMlp {
    fn load(adapter_dir: &str, device: &Device) -> Self {
        let base = golden("tiny_mlp_base.safetensors");
        let mut fc1 = LoraLinear::new(base.linear_torch("fc1", device).unwrap());
        let mut fc2 = LoraLinear::new(base.linear_torch("fc2", device).unwrap());
        let peft = PeftLora::load(data(adapter_dir), device).unwrap();
        assert_eq!(peft.paths().collect::<Vec<_>>(), ["fc1", "fc2"]);
        peft.attach("fc1", &mut fc1, "default").unwrap();
        peft.attach("fc2", &mut fc2, "default").unwrap();
        Self { fc1, fc2 }
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let h = activation::relu(self.fc1.forward(x).unwrap());
        self.fc2.forward(h).unwrap()
    }
}

fn check_peft_folder(dir: &str, expected_file: &str, scaling: f64) {
    let base = golden("tiny_mlp_base.safetensors");
    for device in devices() {
        let g = golden(expected_file);
        let mut mlp = TinyMlp::load(dir, &device);
        assert_eq!(mlp.fc1.adapter("default").unwrap().scaling(), scaling);
        let x: Tensor<2> = g.tensor("x", &device).unwrap();
        let expected: Tensor<2> = g.tensor("expected_out", &device).unwrap();
        assert_close(
            mlp.forward(x.clone()),
            expected.clone(),
            ATOL,
            "adapted model output",
        );
        // Without the adapter the model is the plain base model.
        mlp.fc1.set_active(&[]).unwrap();
        mlp.fc2.set_active(&[]).unwrap();
        assert_close(
            mlp.forward(x.clone()),
            base.tensor("expected_out_base", &device).unwrap(),
            ATOL,
            "base output with adapters disabled",
        );
        mlp.fc1.set_active(&["default"]).unwrap();
        mlp.fc2.set_active(&["default"]).unwrap();
        mlp.fc1.merge("default").unwrap();
        mlp.fc2.merge("default").unwrap();
        assert_close(
            mlp.fc1.base.weight.val().transpose(),
            g.tensor("expected_merged_fc1_weight", &device).unwrap(),
            ATOL,
            "merged fc1",
        );
        assert_close(
            mlp.fc2.base.weight.val().transpose(),
            g.tensor("expected_merged_fc2_weight", &device).unwrap(),
            ATOL,
            "merged fc2",
        );
        assert_close(mlp.forward(x), expected, ATOL, "merged model output");
    }
}

#[test]
fn peft_lora_folder_matches_peft() {
    check_peft_folder(
        "peft_lora_tiny_mlp",
        "peft_lora_tiny_mlp_expected.safetensors",
        2.0,
    );
}

#[test]
fn peft_rslora_folder_matches_peft() {
    check_peft_folder(
        "peft_rslora_tiny_mlp",
        "peft_rslora_tiny_mlp_expected.safetensors",
        4.0,
    );
}

#[test]
fn peft_folder_with_rank_and_alpha_patterns_matches_peft() {
    // PEFT wrote this folder with r = 4, lora_alpha = 8, rank_pattern {fc2: 2} and
    // alpha_pattern {fc2: 3}: fc1 has scaling 8/4 = 2, fc2 rank 2 and scaling 3/2.
    check_peft_folder(
        "peft_lora_patterns_tiny_mlp",
        "peft_lora_patterns_tiny_mlp_expected.safetensors",
        2.0,
    );
    let peft = PeftLora::load(data("peft_lora_patterns_tiny_mlp"), &Device::flex()).unwrap();
    assert_eq!(peft.config.rank_for("fc1"), 4);
    assert_eq!(peft.config.rank_for("fc2"), 2);
    assert_eq!(peft.config.alpha_for("fc2"), 3.0);
    let fc2 = peft.get("fc2").unwrap();
    assert_eq!(fc2.rank(), 2);
    assert_eq!(fc2.scaling(), 1.5);
}

#[test]
fn peft_ia3_folder_matches_peft() {
    let base = golden("tiny_mlp_base.safetensors");
    let g = golden("ia3_tiny_mlp.safetensors");
    for device in devices() {
        let peft = PeftIa3::load(data("peft_ia3_tiny_mlp"), &device).unwrap();
        let mut fc1 = peft
            .apply("fc1", base.linear_torch("fc1", &device).unwrap())
            .unwrap();
        let mut fc2 = peft
            .apply("fc2", base.linear_torch("fc2", &device).unwrap())
            .unwrap();
        assert!(!fc1.feedforward && fc2.feedforward);
        // The loaded vectors are the golden ones.
        assert_close(
            fc1.scale.val().reshape([12, 1]),
            g.tensor("fc1.ia3_l", &device).unwrap(),
            0.0,
            "fc1 vector",
        );
        let x: Tensor<2> = g.tensor("x", &device).unwrap();
        let h1 = fc1.forward(x.clone()).unwrap();
        assert_close(
            h1.clone(),
            g.tensor("expected_fc1_out", &device).unwrap(),
            ATOL,
            "fc1 out",
        );
        let out = fc2.forward(activation::relu(h1)).unwrap();
        assert_close(
            out.clone(),
            g.tensor("expected_fc2_out", &device).unwrap(),
            ATOL,
            "fc2 out",
        );
        assert_close(
            out,
            g.tensor("expected_out", &device).unwrap(),
            ATOL,
            "model out",
        );
        fc1.merge().unwrap();
        fc2.merge().unwrap();
        let wb = |l: &Ia3Linear| {
            (
                l.base.weight.val().transpose(),
                l.base.bias.as_ref().unwrap().val(),
            )
        };
        let (w1, b1) = wb(&fc1);
        let (w2, b2) = wb(&fc2);
        assert_close(
            w1,
            g.tensor("expected_merged_fc1_weight", &device).unwrap(),
            ATOL,
            "merged fc1 W",
        );
        assert_close(
            b1,
            g.tensor("expected_merged_fc1_bias", &device).unwrap(),
            ATOL,
            "merged fc1 b",
        );
        assert_close(
            w2,
            g.tensor("expected_merged_fc2_weight", &device).unwrap(),
            ATOL,
            "merged fc2 W",
        );
        assert_close(
            b2,
            g.tensor("expected_merged_fc2_bias", &device).unwrap(),
            ATOL,
            "merged fc2 b",
        );
        let merged_out = fc2
            .forward(activation::relu(fc1.forward(x).unwrap()))
            .unwrap();
        assert_close(
            merged_out,
            g.tensor("expected_out", &device).unwrap(),
            ATOL,
            "merged model out",
        );
    }
}

fn torch_linear(g: &TensorFile, prefix: &str, device: &Device) -> Linear {
    g.linear_torch(prefix, device).unwrap()
}

#[test]
fn prefix_tuning_matches_peft_gpt2_layer() {
    let g = golden("prefix_tuning_gpt2_layer.safetensors");
    for device in devices() {
        let embedding: Tensor<2> = g.tensor("prefix_embedding", &device).unwrap();
        let enc = PrefixEncoder::from_embedding(embedding, 1).unwrap();
        let (k, v) = enc.layer_kv(0, 2).unwrap();
        assert_close(
            k.clone(),
            g.tensor("prefix_keys", &device).unwrap(),
            0.0,
            "prefix keys",
        );
        assert_close(
            v.clone(),
            g.tensor("prefix_values", &device).unwrap(),
            0.0,
            "prefix values",
        );
        // GPT-2 Conv1D weights are [in, out], burn's own layout.
        let c_attn = g.linear_conv1d("c_attn", &device).unwrap();
        let c_proj = g.linear_conv1d("c_proj", &device).unwrap();
        let attn = PrefixAttention::from_linears(c_attn, c_proj, 2).unwrap();
        let h: Tensor<2> = g.tensor("hidden_in", &device).unwrap();
        let out = attn.forward(h.clone().unsqueeze(), Some((k, v))).unwrap();
        let expected: Tensor<2> = g.tensor("expected_attn_out", &device).unwrap();
        assert_close(
            out.reshape([5, 16]),
            expected.clone(),
            ATOL,
            "attention with prefix",
        );
        // Without the prefix the output must differ: the prefix really is consumed.
        let plain = attn.forward(h.unsqueeze(), None).unwrap().reshape([5, 16]);
        assert!(common::max_abs_diff(plain, expected) > 1e-3);
    }
}

#[test]
fn prefix_projection_matches_peft() {
    let g = golden("prefix_tuning_gpt2_layer.safetensors");
    for device in devices() {
        let enc = PrefixEncoder::from_projection(
            g.tensor("proj.embedding", &device).unwrap(),
            torch_linear(&g, "proj.transform.0", &device),
            torch_linear(&g, "proj.transform.2", &device),
            1,
        )
        .unwrap();
        let expected: Tensor<2> = g.tensor("proj.expected_prefix_kv_flat", &device).unwrap();
        assert_close(enc.kv_flat(), expected.clone(), ATOL, "projected prefix");
        let frozen = enc.freeze_projection();
        assert!(frozen.projection.is_none());
        assert_close(frozen.kv_flat(), expected, ATOL, "frozen projected prefix");
    }
}

/// A plain burn model (two `burn::nn::Linear`s, no modula layer) with PEFT's TinyMLP folders
/// applied through burn's own reparameterization hooks (`PeftLora::apply_to_module`): the
/// outputs equal PEFT's, every base parameter is frozen, and `materialize` folds the update
/// into PEFT's merged weights. A folder for other paths or widths is an error and the model is
/// left as it was.
#[test]
fn peft_folders_apply_to_plain_burn_modules_through_reparameterization() {
    use burn::module::Module;
    #[derive(Module, Debug)]
    struct Plain {
        fc1: Linear,
        fc2: Linear,
    }
    let base = golden("tiny_mlp_base.safetensors");
    for device in devices() {
        let model = Plain {
            fc1: base.linear_torch("fc1", &device).unwrap(),
            fc2: base.linear_torch("fc2", &device).unwrap(),
        };
        let run = |m: &Plain, x: Tensor<2>| {
            m.fc2
                .forward(burn::tensor::activation::relu(m.fc1.forward(x)))
        };
        for (dir, expected) in [
            (
                "peft_lora_tiny_mlp",
                "peft_lora_tiny_mlp_expected.safetensors",
            ),
            (
                "peft_rslora_tiny_mlp",
                "peft_rslora_tiny_mlp_expected.safetensors",
            ),
        ] {
            let g = golden(expected);
            let peft = PeftLora::load(data(dir), &device).unwrap();
            let adapted = peft.apply_to_module(&model).unwrap();
            let x: Tensor<2> = g.tensor("x", &device).unwrap();
            let want: Tensor<2> = g.tensor("expected_out", &device).unwrap();
            assert_close(run(&adapted, x.clone()), want.clone(), ATOL, dir);
            assert!(!adapted.fc1.bias.as_ref().unwrap().is_require_grad());
            // The original model is untouched.
            let plain: Tensor<2> = base.tensor("expected_out_base", &device).unwrap();
            assert_close(run(&model, x.clone()), plain, ATOL, "original");
            let merged = adapted.materialize();
            assert_close(
                merged.fc1.weight.val().transpose(),
                g.tensor("expected_merged_fc1_weight", &device).unwrap(),
                ATOL,
                "materialized fc1",
            );
            assert_close(run(&merged, x), want, ATOL, "materialized output");
        }
    }
    // Paths the module does not have.
    #[derive(Module, Debug)]
    struct Other {
        first: Linear,
    }
    let device = burn::tensor::Device::flex();
    let other = Other {
        first: base.linear_torch("fc1", &device).unwrap(),
    };
    let peft = PeftLora::load(data("peft_lora_tiny_mlp"), &device).unwrap();
    let e = peft.apply_to_module(&other).unwrap_err().to_string();
    assert!(e.contains("`fc1`") && e.contains("field paths"), "{e}");
    // Widths that disagree: fc2's factors on a layer of fc1's shape.
    let swapped = Plain {
        fc1: base.linear_torch("fc2", &device).unwrap(),
        fc2: base.linear_torch("fc1", &device).unwrap(),
    };
    let e = peft.apply_to_module(&swapped).unwrap_err().to_string();
    assert!(e.contains("factors are for"), "{e}");
}
