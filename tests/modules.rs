//! Behaviour of the modules beyond the golden vectors: merge/unmerge, several adapters,
//! gradients, dropout, record and PEFT round trips, IA3 and bottleneck adapters.

mod common;

use burn::module::Module;
use burn::nn::LinearConfig;
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Tensor};
use common::{Rng, assert_close, data, devices, golden, max_abs_diff, vals};
use modula::prelude::*;
use modula::{AdapterForm, AdapterPlacement, BlockAdapters};

/// A LoRA layer with two adapters whose B factors are random (so they matter).
fn two_adapter_layer(rng: &mut Rng, d_in: usize, d_out: usize, device: &Device) -> LoraLinear {
    let mut layer = LoraLinear::new(LinearConfig::new(d_in, d_out).init(device));
    for (name, r, rs) in [("a", 4, false), ("b", 8, true)] {
        // Factors of realistic size (outputs O(1)), so 1e-5 is a rounding-level tolerance.
        let a = rng.tensor(d_in, r, device).mul_scalar(0.1);
        let b = rng.tensor(r, d_out, device).mul_scalar(0.1);
        let ad = LoraModule::from_factors(a, b, 16.0, rs, 0.0).unwrap();
        layer.insert_adapter(name, ad).unwrap();
    }
    layer
}

#[test]
fn merged_equals_unmerged_and_unmerge_restores_weight() {
    for device in devices() {
        let mut rng = Rng(1);
        let mut layer = two_adapter_layer(&mut rng, 64, 48, &device);
        let x = rng.tensor(17, 64, &device);
        let w0 = layer.base.weight.val();
        let y = layer.forward(x.clone()).unwrap();
        layer.merge("a").unwrap();
        assert_close(
            layer.forward(x.clone()).unwrap(),
            y.clone(),
            1e-5,
            "one merged",
        );
        layer.merge_active().unwrap();
        assert!(layer.is_merged("b").unwrap());
        assert_close(
            layer.forward(x.clone()).unwrap(),
            y.clone(),
            1e-5,
            "both merged",
        );
        layer.unmerge_all().unwrap();
        let rel = max_abs_diff(layer.base.weight.val(), w0.clone())
            / vals(w0.clone()).iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(rel < 1e-6, "unmerge left a relative error of {rel:e}");
        assert_close(layer.forward(x).unwrap(), y, 1e-5, "after unmerge");
    }
}

#[test]
fn active_subsets_sum_their_deltas() {
    for device in devices() {
        let mut rng = Rng(2);
        let mut layer = two_adapter_layer(&mut rng, 20, 10, &device);
        let x = rng.tensor(6, 20, &device);
        let base = layer.base.forward(x.clone());
        let da = layer.adapter("a").unwrap().delta_forward(x.clone());
        let db = layer.adapter("b").unwrap().delta_forward(x.clone());
        layer.set_active(&["b"]).unwrap();
        assert_eq!(layer.active_adapters(), ["b"]);
        assert_close(
            layer.forward(x.clone()).unwrap(),
            base.clone() + db.clone(),
            1e-5,
            "only b",
        );
        layer.set_active(&["a", "b"]).unwrap();
        assert_close(
            layer.forward(x.clone()).unwrap(),
            base.clone() + da + db,
            1e-5,
            "a and b",
        );
        layer.set_active(&[]).unwrap();
        assert_close(layer.forward(x).unwrap(), base, 0.0, "none active");
        // rsLoRA scaling is alpha/sqrt(r), LoRA alpha/r.
        assert_eq!(layer.adapter("a").unwrap().scaling(), 4.0);
        assert!((layer.adapter("b").unwrap().scaling() - 16.0 / 8f64.sqrt()).abs() < 1e-12);
    }
}

#[test]
fn new_adapters_start_as_identity_with_peft_init() {
    let device = Device::flex();
    device.seed(5);
    let mut layer = LoraLinear::new(LinearConfig::new(256, 32).init(&device));
    layer.add_adapter("k", &LoraConfig::new(8)).unwrap();
    layer
        .add_adapter(
            "g",
            &LoraConfig::new(8).with_init(modula::LoraInit::Gaussian),
        )
        .unwrap();
    let x = Rng(9).tensor(4, 256, &device);
    assert_close(
        layer.forward(x.clone()).unwrap(),
        layer.base.forward(x),
        0.0,
        "B = 0 at init",
    );
    let a = vals(layer.adapter("k").unwrap().a.val());
    let bound = 1.0 / 16.0; // 1/sqrt(d_in)
    assert!(a.iter().all(|v| v.abs() <= bound));
    assert!(
        a.iter().any(|v| v.abs() > 0.8 * bound),
        "kaiming-uniform should fill its range"
    );
    let g = vals(layer.adapter("g").unwrap().a.val());
    let std = (g.iter().map(|v| v * v).sum::<f32>() / g.len() as f32).sqrt();
    // The root mean square of n = 2048 normal draws has standard error σ/√(2n) ≈ 0.002.
    let se = 0.125 / (2.0 * g.len() as f32).sqrt();
    assert!(
        (std - 0.125).abs() < 3.0 * se,
        "gaussian init std {std}, expected 1/r = 0.125 ± {}",
        3.0 * se
    );
    let mean = g.iter().sum::<f32>() / g.len() as f32;
    assert!(
        mean.abs() < 3.0 * 0.125 / (g.len() as f32).sqrt(),
        "mean {mean}"
    );
}

#[test]
fn only_adapter_parameters_receive_gradients_and_training_works() {
    let device = Device::flex().autodiff();
    let mut rng = Rng(4);
    let mut layer = LoraLinear::new(LinearConfig::new(12, 6).init(&device));
    let ad = LoraModule::from_factors(
        rng.tensor(12, 2, &device),
        rng.tensor(2, 6, &device),
        4.0,
        false,
        0.0,
    )
    .unwrap();
    layer.insert_adapter("t", ad).unwrap();
    let x = rng.tensor(32, 12, &device);
    let target = rng.tensor(32, 6, &device);
    let loss = (layer.forward(x.clone()).unwrap() - target.clone())
        .powf_scalar(2.0)
        .mean();
    let grads = loss.backward();
    assert!(
        layer.base.weight.val().grad(&grads).is_none(),
        "base weight must be frozen"
    );
    assert!(
        layer
            .base
            .bias
            .as_ref()
            .unwrap()
            .val()
            .grad(&grads)
            .is_none(),
        "base bias frozen"
    );
    let ad = layer.adapter("t").unwrap();
    for (name, g) in [
        ("A", ad.a.val().grad(&grads)),
        ("B", ad.b.val().grad(&grads)),
    ] {
        let g = g.unwrap_or_else(|| panic!("{name} must receive a gradient"));
        assert!(vals(g).iter().any(|v| *v != 0.0), "{name} gradient is zero");
    }
    // A few Adam steps lower the loss and leave the base bit-identical.
    let w0 = vals(layer.base.weight.val());
    let mut optim = AdamConfig::new().init();
    let mut losses = Vec::new();
    for _ in 0..20 {
        let loss = (layer.forward(x.clone()).unwrap() - target.clone())
            .powf_scalar(2.0)
            .mean();
        losses.push(loss.clone().into_scalar::<f32>());
        let grads = GradientsParams::from_grads(loss.backward(), &layer);
        layer = optim.step(0.05, layer, grads);
    }
    assert!(
        losses[19] < 0.8 * losses[0],
        "loss {} -> {}",
        losses[0],
        losses[19]
    );
    assert_eq!(
        vals(layer.base.weight.val()),
        w0,
        "base weight changed during training"
    );
}

#[test]
fn dropout_applies_in_training_only() {
    let device = Device::flex().autodiff();
    let mut rng = Rng(8);
    let base = LinearConfig::new(32, 8).init(&device);
    let (a, b) = (rng.tensor(32, 4, &device), rng.tensor(4, 8, &device));
    let with_b = |b: Tensor<2>| {
        let mut layer = LoraLinear::new(base.clone());
        let ad = LoraModule::from_factors(a.clone(), b, 8.0, false, 0.5).unwrap();
        layer.insert_adapter("d", ad).unwrap();
        layer
    };
    let layer = with_b(b.clone());
    let x = rng.tensor(16, 32, &device);
    let eval = layer.valid();
    let y_eval = eval.forward(x.clone().without_autodiff()).unwrap();
    let y_eval2 = eval.forward(x.clone().without_autodiff()).unwrap();
    assert_close(y_eval.clone(), y_eval2, 0.0, "eval is deterministic");
    device.seed(8);
    let y_train = layer.forward(x.clone()).unwrap().without_autodiff();
    assert!(
        max_abs_diff(y_train.clone(), y_eval.clone()) > 1e-3,
        "dropout had no effect in training"
    );
    // Seeded: the same seed draws the same mask.
    device.seed(8);
    let again = layer.forward(x.clone()).unwrap().without_autodiff();
    assert_close(again, y_train, 0.0, "seeded dropout");
    // Only the adapter path is dropped: with B = 0 training equals eval exactly.
    let zero_b = with_b(Tensor::zeros([4, 8], &device));
    assert_close(
        zero_b.forward(x.clone()).unwrap().without_autodiff(),
        zero_b
            .valid()
            .forward(x.clone().without_autodiff())
            .unwrap(),
        0.0,
        "base path under dropout",
    );
    // Inverted dropout (kept inputs scaled by 1/(1 − p)) is unbiased: the mean of many
    // training passes is the eval output, within 4 standard errors per entry.
    let n = 600;
    let samples: Vec<Vec<f32>> = (0..n)
        .map(|_| vals(layer.forward(x.clone()).unwrap().without_autodiff()))
        .collect();
    let want = vals(y_eval);
    for (j, w) in want.iter().enumerate() {
        let mean = samples.iter().map(|s| s[j] as f64).sum::<f64>() / n as f64;
        let var = samples
            .iter()
            .map(|s| (s[j] as f64 - mean).powi(2))
            .sum::<f64>()
            / (n - 1) as f64;
        let se = (var / n as f64).sqrt();
        assert!(
            (mean - *w as f64).abs() <= 4.0 * se + 1e-4,
            "entry {j}: mean of training passes {mean} vs eval {w} (se {se})"
        );
    }
}

#[test]
fn record_round_trip_restores_outputs() {
    let device = Device::flex();
    let mut rng = Rng(12);
    let layer = two_adapter_layer(&mut rng, 16, 8, &device);
    let x = rng.tensor(3, 16, &device);
    let y = layer.forward(x.clone()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("layer.bpk");
    layer.clone().save_file(&path).unwrap();
    let fresh = two_adapter_layer(&mut Rng(99), 16, 8, &device);
    assert!(max_abs_diff(fresh.forward(x.clone()).unwrap(), y.clone()) > 1e-3);
    let loaded = fresh.load_file(&path);
    assert_close(loaded.forward(x).unwrap(), y, 0.0, "reloaded layer");
}

#[test]
fn peft_folder_round_trip_keeps_outputs_and_per_module_ranks() {
    for device in devices() {
        let mut rng = Rng(21);
        let mut peft = PeftLora::new(4, 8.0, true);
        let mk = |rng: &mut Rng, din, r, dout, alpha| {
            LoraModule::from_factors(
                rng.tensor(din, r, &device),
                rng.tensor(r, dout, &device),
                alpha,
                true,
                0.0,
            )
            .unwrap()
        };
        peft.insert("encoder.q_proj", mk(&mut rng, 10, 4, 6, 8.0));
        peft.insert("encoder.v_proj", mk(&mut rng, 10, 2, 6, 3.0));
        let dir = tempfile::tempdir().unwrap();
        peft.save(dir.path()).unwrap();
        let back = PeftLora::load(dir.path(), &device).unwrap();
        assert_eq!(back.config.rank_for("encoder.v_proj"), 2);
        assert_eq!(back.config.alpha_for("encoder.v_proj"), 3.0);
        assert_eq!(back.config.rank_for("encoder.q_proj"), 4);
        let x = rng.tensor(5, 10, &device);
        for p in ["encoder.q_proj", "encoder.v_proj"] {
            let (a, b) = (peft.get(p).unwrap(), back.get(p).unwrap());
            assert_eq!(a.scaling(), b.scaling());
            assert_close(
                a.delta_forward(x.clone()),
                b.delta_forward(x.clone()),
                0.0,
                p,
            );
        }
        // The written config is a full PEFT 0.21 LoRA config.
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["peft_type"], "LORA");
        assert_eq!(cfg["use_rslora"], true);
        assert_eq!(cfg["use_dora"], false);
        assert_eq!(
            cfg["target_modules"],
            serde_json::json!(["encoder.q_proj", "encoder.v_proj"])
        );
    }
}

/// What modula writes is what PEFT wrote: the same tensors (names, shapes, values) and the
/// same config document, key for key.
fn assert_same_peft_folder(peft: &std::path::Path, ours: &std::path::Path) {
    let a = TensorFile::open(peft.join("adapter_model.safetensors")).unwrap();
    let b = TensorFile::open(ours.join("adapter_model.safetensors")).unwrap();
    assert_eq!(a.tensors(), b.tensors(), "re-saved tensors differ");
    let read = |p: std::path::PathBuf| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    assert_eq!(
        read(peft.join("adapter_config.json")),
        read(ours.join("adapter_config.json")),
        "re-saved config differs"
    );
}

#[test]
fn golden_peft_folders_survive_save_and_reload() {
    let device = Device::flex();
    let g = golden("peft_lora_tiny_mlp_expected.safetensors");
    let base = golden("tiny_mlp_base.safetensors");
    let loaded = PeftLora::load(data("peft_lora_tiny_mlp"), &device).unwrap();
    let dir = tempfile::tempdir().unwrap();
    loaded.save(dir.path()).unwrap();
    assert_same_peft_folder(&data("peft_lora_tiny_mlp"), dir.path());
    let again = PeftLora::load(dir.path(), &device).unwrap();
    let mut fc1 = LoraLinear::new(base.linear_torch("fc1", &device).unwrap());
    let mut fc2 = LoraLinear::new(base.linear_torch("fc2", &device).unwrap());
    again.attach("fc1", &mut fc1, "default").unwrap();
    again.attach("fc2", &mut fc2, "default").unwrap();
    let x: Tensor<2> = g.tensor("x", &device).unwrap();
    let y = fc2
        .forward(burn::tensor::activation::relu(fc1.forward(x).unwrap()))
        .unwrap();
    assert_close(
        y,
        g.tensor("expected_out", &device).unwrap(),
        1e-5,
        "re-saved LoRA folder",
    );

    let ia3 = PeftIa3::load(data("peft_ia3_tiny_mlp"), &device).unwrap();
    let dir2 = tempfile::tempdir().unwrap();
    ia3.save(dir2.path()).unwrap();
    assert_same_peft_folder(&data("peft_ia3_tiny_mlp"), dir2.path());
    let ia3b = PeftIa3::load(dir2.path(), &device).unwrap();
    for (p, (v, ff)) in &ia3.modules {
        let (v2, ff2) = &ia3b.modules[p];
        assert_eq!(ff, ff2);
        assert_close(v.clone(), v2.clone(), 0.0, p);
    }
}

#[test]
fn ia3_merge_unmerge_round_trip() {
    for device in devices() {
        for ff in [false, true] {
            let mut rng = Rng(31);
            let base = LinearConfig::new(9, 7).init(&device);
            let n = if ff { 9 } else { 7 };
            let l = rng.tensor(1, n, &device).reshape([n]) + 1.5;
            let mut layer = Ia3Linear::with_scale(base, l, ff).unwrap();
            let x = rng.tensor(4, 9, &device);
            let y = layer.forward(x.clone()).unwrap();
            let w0 = layer.base.weight.val();
            layer.merge().unwrap();
            assert_close(
                layer.forward(x.clone()).unwrap(),
                y.clone(),
                1e-5,
                "IA3 merged",
            );
            layer.unmerge().unwrap();
            assert_close(layer.base.weight.val(), w0, 1e-6, "IA3 unmerged weight");
            assert_close(layer.forward(x).unwrap(), y, 1e-5, "IA3 unmerged");
        }
    }
}

#[test]
fn bottleneck_adapters_forms_and_placements() {
    for device in devices() {
        let cfg = BottleneckConfig::new(32)
            .with_reduction_factor(8)
            .with_scaling(0.5);
        assert_eq!(cfg.bottleneck(), 4);
        let mut ad = cfg.init(&device).unwrap();
        let mut rng = Rng(41);
        let h = rng.tensor(5, 32, &device);
        // Zero-initialised up projection: the identity.
        assert_close(
            ad.forward(h.clone(), h.clone()).unwrap(),
            h.clone(),
            0.0,
            "identity at init",
        );
        ad.up.weight = burn::module::Param::from_tensor(rng.tensor(4, 32, &device));
        let x_in = rng.tensor(5, 32, &device);
        let by_hand = |t: Tensor<2>| {
            let z = burn::tensor::activation::relu(ad.down.forward(t));
            ad.up.forward(z).mul_scalar(0.5)
        };
        assert_close(
            ad.forward(x_in.clone(), h.clone()).unwrap(),
            h.clone() + by_hand(h.clone()),
            1e-5,
            "sequential",
        );
        ad.form = AdapterForm::Parallel;
        assert_close(
            ad.forward(x_in.clone(), h.clone()).unwrap(),
            h.clone() + by_hand(x_in),
            1e-5,
            "parallel",
        );
        let houlsby = BlockAdapters::new(AdapterPlacement::Houlsby, &cfg, &device).unwrap();
        let pfeiffer = BlockAdapters::new(AdapterPlacement::Pfeiffer, &cfg, &device).unwrap();
        assert!(houlsby.attention.is_some() && pfeiffer.attention.is_none());
        assert!(houlsby.num_params() == 2 * pfeiffer.num_params());
        assert_close(
            pfeiffer.after_attention(h.clone(), h.clone()).unwrap(),
            h,
            0.0,
            "pfeiffer attention",
        );
    }
}

#[test]
fn lora_embedding_lookup_merge_and_peft_keys() {
    use burn::nn::EmbeddingConfig;
    use burn::tensor::{Int, TensorData};
    for device in devices() {
        let mut rng = Rng(51);
        let mut emb = modula::LoraEmbedding::new(EmbeddingConfig::new(11, 6).init(&device));
        let ad = LoraModule::from_factors(
            rng.tensor(11, 3, &device),
            rng.tensor(3, 6, &device),
            6.0,
            false,
            0.0,
        )
        .unwrap();
        emb.insert_adapter("e", ad.clone()).unwrap();
        let original = emb.base.clone();
        let ids = Tensor::<2, Int>::from_data(
            TensorData::new(vec![0i64, 3, 10, 3, 7, 1], [2, 3]),
            &device,
        );
        let y = emb.forward(ids.clone()).unwrap();
        // By hand: row t of (E + s·A B).
        let table = emb.base.weight.val() + ad.a.val().matmul(ad.b.val()).mul_scalar(2.0);
        let want = burn::tensor::module::embedding(table, ids.clone());
        assert_close(y.clone(), want, 1e-5, "embedding LoRA lookup");
        emb.merge("e").unwrap();
        assert_close(
            emb.forward(ids.clone()).unwrap(),
            y,
            1e-5,
            "merged embedding",
        );
        let bad = Tensor::<2, Int>::from_data(TensorData::new(vec![11i64], [1, 1]), &device);
        assert!(matches!(
            emb.forward(bad),
            Err(modula::Error::Invalid { .. })
        ));
        // PEFT keys: lora_embedding_A [r, n], lora_embedding_B [d, r].
        let mut peft = PeftLora::new(3, 6.0, false);
        peft.insert_embedding("embed_tokens", ad);
        let dir = tempfile::tempdir().unwrap();
        peft.save(dir.path()).unwrap();
        let f = TensorFile::open(dir.path().join("adapter_model.safetensors")).unwrap();
        assert_eq!(
            f.get("base_model.model.embed_tokens.lora_embedding_A")
                .unwrap()
                .shape,
            [3, 11]
        );
        assert_eq!(
            f.get("base_model.model.embed_tokens.lora_embedding_B")
                .unwrap()
                .shape,
            [6, 3]
        );
        let back = PeftLora::load(dir.path(), &device).unwrap();
        let mut emb2 = modula::LoraEmbedding::new(original);
        back.attach_embedding("embed_tokens", &mut emb2, "e")
            .unwrap();
        emb2.merge("e").unwrap();
        assert_close(
            emb2.base.weight.val(),
            emb.base.weight.val(),
            1e-6,
            "re-loaded embedding adapter",
        );
    }
}

#[test]
fn thin_and_fused_weight_forms_agree_and_training_stays_thin() {
    use modula::LoraForward;
    for device in devices() {
        let mut rng = Rng(61);
        let mut layer = two_adapter_layer(&mut rng, 32, 24, &device);
        let x = rng.tensor(40, 32, &device);
        // Auto: 40·(32+24) ≥ 32·24, so inference takes the fused-weight form.
        assert_eq!(layer.resolved_forward(40), LoraForward::FusedWeight);
        assert_eq!(layer.resolved_forward(3), LoraForward::Thin);
        let auto = layer.forward(x.clone()).unwrap();
        layer.set_forward_mode(LoraForward::Thin);
        let thin = layer.forward(x.clone()).unwrap();
        layer.set_forward_mode(LoraForward::FusedWeight);
        assert_eq!(layer.resolved_forward(1), LoraForward::FusedWeight);
        let fused = layer.forward(x.clone()).unwrap();
        assert_close(auto.clone(), thin.clone(), 1e-5, "auto vs thin");
        assert_close(fused, thin, 1e-5, "fused weight vs thin");
        // By hand: base + Σ s (x A) B.
        let mut want = layer.base.forward(x.clone());
        for n in ["a", "b"] {
            let ad = layer.adapter(n).unwrap();
            want = want
                + x.clone()
                    .matmul(ad.a.val())
                    .matmul(ad.b.val())
                    .mul_scalar(ad.scaling());
        }
        assert_close(auto, want, 1e-5, "by hand");
    }
    // While adapters train, even a forced fused-weight mode stays thin.
    let device = Device::flex().autodiff();
    let mut layer = two_adapter_layer(&mut Rng(62), 32, 24, &device);
    layer.set_forward_mode(LoraForward::FusedWeight);
    assert_eq!(layer.resolved_forward(4096), LoraForward::Thin);
    let eval = layer.valid();
    assert_eq!(eval.resolved_forward(4096), LoraForward::FusedWeight);
}

#[test]
fn prefix_tuning_trains_the_prefix_only() {
    let device = Device::flex().autodiff();
    device.seed(3);
    let enc = PrefixConfig::new(4, 2, 16)
        .with_projection_hidden(Some(8))
        .init(&device)
        .unwrap();
    let attn = PrefixAttention::new(16, 4, &device).unwrap().no_grad();
    let h = Rng(71).tensor(6, 16, &device).unsqueeze::<3>();
    let (k, v) = enc.layer_kv(1, 4).unwrap();
    assert_eq!(k.dims(), [4, 4, 4]);
    let out = attn.forward(h.clone(), Some((k, v))).unwrap();
    assert_eq!(out.dims(), [1, 6, 16]);
    let grads = out.powf_scalar(2.0).mean().backward();
    let g = enc
        .embedding
        .val()
        .grad(&grads)
        .expect("prefix embedding gets a gradient");
    assert!(vals(g).iter().any(|x| *x != 0.0));
    let proj = enc.projection.as_ref().unwrap();
    assert!(proj.first.weight.val().grad(&grads).is_some());
    assert!(
        attn.c_attn.weight.val().grad(&grads).is_none(),
        "attention is frozen"
    );
    // Errors: a layer past the end, heads that do not divide the width.
    assert!(enc.layer_kv(2, 4).is_err());
    assert!(enc.layer_kv(0, 5).is_err());
}

#[test]
fn remove_and_merge_and_unload() {
    for device in devices() {
        let mut rng = Rng(81);
        let mut layer = two_adapter_layer(&mut rng, 16, 12, &device);
        let x = rng.tensor(5, 16, &device);
        let base_w = layer.base.weight.val();
        let only_b = {
            let mut l = layer.clone();
            l.set_active(&["b"]).unwrap();
            l.forward(x.clone()).unwrap()
        };
        // Removing a merged adapter unmerges it first: the weight is the base again.
        layer.merge("a").unwrap();
        let removed = layer.remove_adapter("a").unwrap();
        assert_eq!(removed.rank(), 4);
        assert_eq!(layer.names(), ["b"]);
        assert_close(
            layer.base.weight.val(),
            base_w,
            1e-6,
            "weight after removing merged adapter",
        );
        assert_close(
            layer.forward(x.clone()).unwrap(),
            only_b.clone(),
            1e-5,
            "after remove",
        );
        // merge_and_unload: a plain Linear that computes the adapted function.
        let plain = layer.merge_and_unload().unwrap();
        assert_close(plain.forward(x), only_b, 1e-5, "merge_and_unload");
    }
}

/// MSE of `a` against `b`.
fn mse(a: Tensor<2>, b: Tensor<2>) -> Tensor<1> {
    (a - b).powf_scalar(2.0).mean().reshape([1])
}

/// LT-SFT on a planted sparse change: full fine-tuning of a linear map finds the 4 changed
/// entries among the largest moves, and training only those (from the original weight)
/// recovers the target; BitFit fits a planted bias shift with the weights frozen.
#[test]
fn lt_sft_finds_and_fits_a_planted_sparse_change_and_bitfit_fits_a_shift() {
    use modula::{BiasDelta, SparseDelta};
    let device = Device::flex().autodiff();
    device.seed(11);
    let (d_in, d_out) = (8, 6);
    let w0 = Tensor::<2>::random(
        [d_in, d_out],
        burn::tensor::Distribution::Normal(0.0, 0.5),
        &device,
    );
    let planted = [3i64, 17, 30, 44];
    let target = SparseDelta::new(
        &planted,
        Tensor::from_floats([1.5, -2.0, 1.0, 2.5], &device),
        d_in,
        d_out,
    )
    .unwrap();
    let x = Tensor::<2>::random(
        [64, d_in],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &device,
    );
    let y = x.clone().matmul(w0.clone() + target.to_dense()).detach();
    // Phase 1: full fine-tuning of the weight.
    let mut full = burn::nn::Linear {
        weight: burn::module::Param::from_tensor(w0.clone()),
        bias: None,
    };
    let mut optim = AdamConfig::new().init();
    for _ in 0..150 {
        let loss = mse(full.forward(x.clone()), y.clone());
        let g = GradientsParams::from_grads(loss.backward(), &full);
        full = optim.step(0.05, full, g);
    }
    let mut pick = SparseDelta::top_k_changes(w0.clone(), full.weight.val(), 4).unwrap();
    assert_eq!(
        pick.positions(),
        planted,
        "the largest moves are the planted entries"
    );
    // Phase 2: only the picked entries train, from the original weight.
    let mut optim = AdamConfig::new().init();
    let before = mse(x.clone().matmul(w0.clone()), y.clone()).into_scalar::<f32>();
    for _ in 0..300 {
        let out = x.clone().matmul(w0.clone()) + pick.forward_delta(x.clone());
        let loss = mse(out, y.clone());
        let g = GradientsParams::from_grads(loss.backward(), &pick);
        pick = optim.step(0.05, pick, g);
    }
    let after = mse(
        x.clone().matmul(w0.clone()) + pick.forward_delta(x.clone()),
        y.clone(),
    )
    .into_scalar::<f32>();
    assert!(
        after < 1e-3 * before,
        "sparse fit {after} vs {before} before"
    );
    let got: Vec<f32> = pick.values.val().into_data().iter::<f32>().collect();
    for (g, w) in got.iter().zip([1.5, -2.0, 1.0, 2.5]) {
        assert!((g - w).abs() < 0.02, "{got:?}");
    }
    // BitFit: a frozen layer, a planted output shift, the bias delta alone trains.
    let layer = LinearConfig::new(d_in, d_out).init(&device).no_grad();
    let shift = Tensor::<2>::from_floats([[0.5, -1.0, 0.0, 2.0, 1.0, -0.5]], &device);
    let y = layer.forward(x.clone()) + shift.clone().expand([64, d_out]);
    let mut bit = BiasDelta::new(d_in, d_out, &device).unwrap();
    let mut optim = AdamConfig::new().init();
    for _ in 0..200 {
        let loss = mse(bit.apply(layer.forward(x.clone())).unwrap(), y.clone());
        let g = GradientsParams::from_grads(loss.backward(), &bit);
        bit = optim.step(0.05, bit, g);
    }
    let got: Vec<f32> = bit.delta.val().into_data().iter::<f32>().collect();
    let want: Vec<f32> = shift.into_data().iter::<f32>().collect();
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 0.02, "{got:?} vs {want:?}");
    }
}

/// One hypernetwork generates both tasks' adapters: trained on two tasks whose targets are
/// different planted adapters it fits both (each task's error falls below 5 % of its start),
/// and a bad task or layer is an error.
#[test]
fn hypernetwork_adapters_fit_two_tasks_from_one_generator() {
    use modula::HyperAdapters;
    let device = Device::flex().autodiff();
    device.seed(12);
    let d = 6;
    let mut hyper = HyperAdapters::new(2, 2, d, 4, 4, 16, &device).unwrap();
    let x = Tensor::<2>::random(
        [32, d],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &device,
    );
    // Each task's target is a planted bottleneck adapter of the same form.
    let planted = |seed: u64| {
        let mut rng = Rng(seed);
        let (dn, up) = (rng.tensor(d, 4, &device), rng.tensor(4, d, &device));
        x.clone() + burn::tensor::activation::relu(x.clone().matmul(dn)).matmul(up)
    };
    let targets = [planted(21), planted(22)];
    let err = |h: &HyperAdapters, t: usize| {
        mse(h.forward(x.clone(), t, 1).unwrap(), targets[t].clone()).into_scalar::<f32>()
    };
    let start = [err(&hyper, 0), err(&hyper, 1)];
    let loss = mse(hyper.forward(x.clone(), 0, 1).unwrap(), targets[0].clone())
        + mse(hyper.forward(x.clone(), 1, 1).unwrap(), targets[1].clone());
    let g = modula::transfer::tartan::flat_gradient(loss, &hyper);
    assert!(g.iter().all(|v| v.is_finite()));
    let mut optim = AdamConfig::new().init();
    for _ in 0..400 {
        let loss = mse(hyper.forward(x.clone(), 0, 1).unwrap(), targets[0].clone())
            + mse(hyper.forward(x.clone(), 1, 1).unwrap(), targets[1].clone());
        let g = GradientsParams::from_grads(loss.backward(), &hyper);
        hyper = optim.step(0.01, hyper, g);
    }
    for (t, s) in start.iter().enumerate() {
        let e = err(&hyper, t);
        assert!(e < 0.05 * s, "task {t}: {e} from {s}");
    }
    assert!(hyper.forward(x.clone(), 2, 0).is_err());
    assert!(hyper.forward(x.clone(), 0, 2).is_err());
    assert!(hyper.forward(Tensor::zeros([1, 5], &device), 0, 0).is_err());
}

/// The hypernetwork router learns task-to-module routing through the dispatch: with three
/// fixed experts and task t's target the output of expert 2 − t, training the router alone
/// puts more than 0.9 of each task's weight on its expert.
#[test]
fn hypernetwork_router_learns_task_routing_through_the_dispatch() {
    use modula::HyperRouter;
    let device = Device::flex().autodiff();
    device.seed(13);
    let mut rng = Rng(14);
    let experts: Vec<LoraModule> = (0..3)
        .map(|_| {
            LoraModule::from_factors(
                rng.tensor(5, 2, &device),
                rng.tensor(2, 5, &device),
                2.0,
                false,
                0.0,
            )
            .unwrap()
            .no_grad()
        })
        .collect();
    let mut router = HyperRouter::new(2, 1, 3, 4, 8, None, 1.0, &device).unwrap();
    let x = Tensor::<2>::random(
        [16, 5],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &device,
    );
    let tasks: Vec<usize> = (0..16).map(|i| i % 2).collect();
    let target: Tensor<2> = Tensor::cat(
        (0..16)
            .map(|i| experts[2 - tasks[i]].forward_rows(x.clone().slice([i..i + 1, 0..5])))
            .collect(),
        0,
    );
    let mut optim = AdamConfig::new().init();
    for _ in 0..300 {
        let routing = router
            .route_input(RouterInput::TaskIds {
                ids: &tasks,
                device: &device,
            })
            .unwrap();
        let y = dispatch_modules(&experts, &routing, x.clone(), &WeightedSum).unwrap();
        let g = GradientsParams::from_grads(mse(y, target.clone()).backward(), &router);
        router = optim.step(0.02, router, g);
    }
    let w: Vec<f32> = router
        .route_at(&[0, 1], 0)
        .unwrap()
        .weights()
        .into_data()
        .iter::<f32>()
        .collect();
    // Row 0 is task 0 (expert 2), row 1 task 1 (expert 1).
    assert!(w[2] > 0.9 && w[4] > 0.9, "{w:?}");
    assert!(router.route(&x).is_err(), "rows are not task ids");
    assert!(HyperRouter::new(2, 1, 3, 4, 8, Some(4), 1.0, &device).is_err());
}

/// Stacking: a Stack of two bottleneck adapters is the language adapter then the task adapter
/// by hand; routed per stage, each row gets its own (language, task) pair, equal to that
/// pair's Stack.
#[test]
fn stacking_composes_language_then_task_adapters_per_row() {
    use modula::{Stack, stack_routed};
    let device = Device::flex();
    device.seed(15);
    let cfg = BottleneckConfig::new(6).with_reduction_factor(2);
    let langs: Vec<BottleneckAdapter> = (0..2).map(|_| cfg.init(&device).unwrap()).collect();
    let tasks: Vec<BottleneckAdapter> = (0..3).map(|_| cfg.init(&device).unwrap()).collect();
    let mut perturb = |a: BottleneckAdapter| {
        let mut a = a;
        a.up.weight =
            a.up.weight
                .map(|w| w.clone() + w.random_like(burn::tensor::Distribution::Normal(0.0, 0.3)));
        a
    };
    let langs: Vec<_> = langs.into_iter().map(&mut perturb).collect();
    let tasks: Vec<_> = tasks.into_iter().map(&mut perturb).collect();
    let x = Tensor::<2>::random(
        [4, 6],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &device,
    );
    let h1 = x.clone() + langs[1].delta(x.clone());
    let by_hand = h1.clone() + tasks[2].delta(h1);
    let stack = Stack::new(vec![langs[1].clone(), tasks[2].clone()]).unwrap();
    assert_close(stack.forward(x.clone()), by_hand, 1e-6, "stack");
    let pairs = [(0usize, 1usize), (1, 2), (1, 0), (0, 2)];
    let lang = Routing::one_per_row(&pairs.map(|p| p.0 as i64), 2, &device).unwrap();
    let task = Routing::one_per_row(&pairs.map(|p| p.1 as i64), 3, &device).unwrap();
    let y = stack_routed(x.clone(), &[(&langs, &lang), (&tasks, &task)]).unwrap();
    for (i, (l, t)) in pairs.iter().enumerate() {
        let s = Stack::new(vec![langs[*l].clone(), tasks[*t].clone()]).unwrap();
        assert_close(
            y.clone().slice([i..i + 1, 0..6]),
            s.forward(x.clone().slice([i..i + 1, 0..6])),
            1e-5,
            &format!("row {i}"),
        );
    }
    assert!(Stack::<BottleneckAdapter>::new(vec![]).is_err());
    assert!(stack_routed::<BottleneckAdapter>(x, &[]).is_err());
}

/// Compacter: the shared rules get gradient from every layer that uses them.
#[test]
fn compacter_rules_are_shared_across_layers() {
    use modula::Compacter;
    let device = Device::flex().autodiff();
    let mut c = Compacter::new(2, 8, 4, 2, &device).unwrap();
    let x = Tensor::<2>::random(
        [3, 8],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &device,
    );
    // Give the up projections a value so the rules matter in the output.
    for l in &mut c.layers {
        l.up_t = burn::module::Param::from_tensor(Tensor::ones([2, 4], &device));
    }
    let one = |l: usize| {
        c.forward(l, x.clone())
            .unwrap()
            .powf_scalar(2.0)
            .sum()
            .reshape([1])
    };
    let g0 = modula::transfer::tartan::flat_gradient(one(0), &c);
    let g1 = modula::transfer::tartan::flat_gradient(one(1), &c);
    // The rules are the first 8 numbers in parameter order: both layers move them.
    assert!(g0[..8].iter().any(|v| v.abs() > 1e-6) && g1[..8].iter().any(|v| v.abs() > 1e-6));
    // Layer 0's loss does not reach layer 1's factors.
    assert!(g0[8 + 24..].iter().all(|v| *v == 0.0));
}
