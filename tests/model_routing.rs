//! Model-level routing over a library of LoRA experts: Arrow in every adapted layer of the
//! tiny Llama (tests/data/tiny_decoders/llama), per token, against a direct computation from
//! each layer's input with prototypes from a dense eigensolver (nalgebra), experts of unequal ranks.

mod common;

use std::sync::{Arc, Mutex};

use burn::tensor::{Device, Int, Tensor, TensorData};
use common::{Rng, assert_close, vals};
use modula::library::LoraFactors;
use modula::models::{
    ArrowOptions, KvCache, LinearLayers, LlamaForCausalLm, install_routers, remove_routers,
    route_arrow,
};
use modula::{
    ArrowRouter, Error, LayerRouter, LoraMix, LoraModule, RoutedLora, Router, RouterInput, Routing,
    RoutingTrace,
};

const EXPERTS: [(&str, usize); 3] = [("a", 2), ("b", 4), ("c", 3)];

/// The tiny Llama with three random LoRAs of ranks 2, 4 and 3 on every linear layer but the
/// output layer (non-zero B, so each changes the logits).
fn model_with_experts(device: &Device) -> LlamaForCausalLm {
    let mut model =
        modula::checkpoint::load_decoder(common::data("tiny_decoders/llama"), device).unwrap();
    let mut rng = Rng(7);
    for (path, layer) in model.linear_layers_mut() {
        if path == "lm_head" {
            continue;
        }
        let (d_in, d_out) = (layer.d_in(), layer.d_out());
        for (name, r) in EXPERTS {
            let a = rng.tensor(d_in, r, device).mul_scalar(0.5);
            let b = rng.tensor(r, d_out, device).mul_scalar(0.5);
            let m = LoraModule::from_factors(a, b, 2.0 * r as f64, false, 0.0).unwrap();
            layer.insert_adapter(name, m).unwrap();
        }
    }
    model
}

fn ids(rows: &[Vec<i64>], device: &Device) -> Tensor<2, Int> {
    let (b, s) = (rows.len(), rows[0].len());
    Tensor::<1, Int>::from_data(TensorData::new(rows.concat(), [b * s]), device).reshape([b, s])
}

/// The inputs one router saw.
type Seen = Arc<Mutex<Vec<Tensor<2>>>>;

/// A router that records the rows it routes (each layer's input) and delegates.
#[derive(Clone)]
struct Capture {
    inner: ArrowRouter,
    seen: Seen,
}

impl Router for Capture {
    fn num_modules(&self) -> usize {
        self.inner.num_modules()
    }
    fn route_input(&self, input: RouterInput<'_>) -> modula::Result<Routing> {
        if let RouterInput::Rows(x) = input {
            self.seen.lock().unwrap().push(x.clone());
        }
        self.inner.route_input(input)
    }
}

/// Arrow's layer output for one row `x`, computed directly in f64: prototypes are the top
/// eigenvectors of `M Mᵀ` for burn's `M = s·A·B` (`[d_in, d_out]`, the transpose of PEFT's ΔW:
/// its top right singular vector) by nalgebra's symmetric eigensolver (nalgebra 0.34's `svd`
/// returned a wrong top vector for some of these rank-deficient `M`); logits `|⟨v_e, x⟩|`; top `k`; softmax over the kept logits / τ;
/// `Σ w_e s_e (x A_e) B_e`.
fn arrow_delta_direct(
    x: &[f64],
    experts: &[(Vec<f64>, Vec<f64>, usize, f64)],
    d_out: usize,
    k: usize,
    tau: f64,
) -> Vec<f64> {
    let d_in = x.len();
    let mut logits = Vec::new();
    for (a, b, r, s) in experts {
        let am = nalgebra::DMatrix::from_row_slice(d_in, *r, a);
        let bm = nalgebra::DMatrix::from_row_slice(*r, d_out, b);
        let dw = (&am * &bm) * *s;
        let eig = (&dw * dw.transpose()).symmetric_eigen();
        let top = eig.eigenvalues.imax();
        let u = &eig.eigenvectors;
        let dot: f64 = (0..d_in).map(|i| u[(i, top)] * x[i]).sum();
        logits.push(dot.abs());
    }
    let mut order: Vec<usize> = (0..experts.len()).collect();
    order.sort_by(|&p, &q| logits[q].total_cmp(&logits[p]));
    let kept = &order[..k];
    let m = kept
        .iter()
        .map(|&e| logits[e] / tau)
        .fold(f64::MIN, f64::max);
    let z: f64 = kept.iter().map(|&e| (logits[e] / tau - m).exp()).sum();
    let mut y = vec![0.0; d_out];
    for &e in kept {
        let w = (logits[e] / tau - m).exp() / z;
        let (a, b, r, s) = &experts[e];
        let xa: Vec<f64> = (0..*r)
            .map(|j| (0..d_in).map(|i| x[i] * a[i * r + j]).sum())
            .collect();
        for (o, yo) in y.iter_mut().enumerate() {
            let v: f64 = (0..*r).map(|j| xa[j] * b[j * d_out + o]).sum();
            *yo += w * s * v;
        }
    }
    y
}

fn host(t: Tensor<2>) -> Vec<f64> {
    vals(t).into_iter().map(f64::from).collect()
}

#[test]
fn arrow_in_every_layer_equals_the_direct_computation_from_each_layers_input() {
    let device = Device::flex();
    let batch = ids(&[vec![3, 9, 17, 4, 40], vec![60, 2, 8, 8, 31]], &device);
    for (k, tau) in [(2, 0.7), (3, 1.0), (1, 1.0)] {
        let mut model = model_with_experts(&device);
        let seen: Arc<Mutex<Vec<(String, Seen)>>> = Default::default();
        let paths = install_routers(&mut model, &mut |path, layer| {
            if layer.names().is_empty() {
                return Ok(None);
            }
            let f: Vec<LoraFactors> = EXPERTS
                .iter()
                .map(|(n, _)| LoraFactors::from_adapter(layer.adapter(n).unwrap()))
                .collect();
            let refs: Vec<&LoraFactors> = f.iter().collect();
            let capture = Capture {
                inner: ArrowRouter::from_experts(&refs, k, tau, &device)?,
                seen: Default::default(),
            };
            seen.lock()
                .unwrap()
                .push((path.to_string(), capture.seen.clone()));
            let names = EXPERTS.iter().map(|(n, _)| n.to_string()).collect();
            let routed = RoutedLora::new(capture, names, LoraMix::Output)?;
            Ok(Some(Arc::new(routed) as Arc<dyn LayerRouter>))
        })
        .unwrap();
        assert_eq!(paths.len(), 14, "7 projections in each of 2 layers");
        let logits = model.forward(batch.clone()).unwrap();

        // Every layer, every token: the layer's output from its recorded input.
        let seen = seen.lock().unwrap().clone();
        let layers: std::collections::HashMap<String, &modula::LoraLinear> =
            model.linear_layers().into_iter().collect();
        for (path, inputs) in &seen {
            let x = inputs.lock().unwrap()[0].clone();
            let layer = layers[path];
            let [rows, d_in] = x.dims();
            assert_eq!(rows, 10, "{path}: one row per token");
            let d_out = layer.d_out();
            let experts: Vec<_> = EXPERTS
                .iter()
                .map(|(n, r)| {
                    let m = layer.adapter(n).unwrap();
                    (host(m.a.val()), host(m.b.val()), *r, m.scaling())
                })
                .collect();
            let base = host(layer.base.forward(x.clone()));
            let got = host(layer.forward(x.clone()).unwrap());
            let xs = host(x);
            let mut worst = 0f64;
            let mut scale = 0f64;
            for row in 0..rows {
                let want =
                    arrow_delta_direct(&xs[row * d_in..(row + 1) * d_in], &experts, d_out, k, tau);
                for o in 0..d_out {
                    let w = base[row * d_out + o] + want[o];
                    worst = worst.max((got[row * d_out + o] - w).abs());
                    scale = scale.max(w.abs());
                }
            }
            assert!(
                worst <= 1e-5 * scale.max(1.0),
                "k={k} τ={tau} {path}: max |diff| {worst:e} (largest {scale:e})"
            );
        }

        // The public installer builds the same routers.
        let mut public = model_with_experts(&device);
        let trace = RoutingTrace::new();
        let options = ArrowOptions {
            top_k: k,
            temperature: tau,
            mix: LoraMix::Output,
        };
        route_arrow(&mut public, &["a", "b", "c"], &options, Some(&trace)).unwrap();
        assert_close(
            public.forward(batch.clone()).unwrap(),
            logits,
            1e-5,
            &format!("route_arrow k={k}"),
        );
        let decisions = trace.take();
        assert_eq!(decisions.len(), 14, "one decision per routed layer");
        for d in &decisions {
            assert_eq!((d.rows, d.k), (10, k));
            assert_eq!(d.adapters, ["a", "b", "c"]);
            for row in d.weights.chunks(k) {
                let sum: f32 = row.iter().sum();
                assert!((sum - 1.0).abs() < 1e-5, "{}: weights sum {sum}", d.label);
            }
        }
        assert!(trace.take().is_empty(), "take empties the record");
    }
}

#[test]
fn one_expert_routing_equals_that_adapter_and_decoding_routes_every_token() {
    let device = Device::flex();
    let batch = ids(&[vec![3, 9, 17, 4], vec![60, 2, 8, 31]], &device);
    let mut model = model_with_experts(&device);
    let options = ArrowOptions {
        top_k: 1,
        ..ArrowOptions::default()
    };
    route_arrow(&mut model, &["b"], &options, None).unwrap();
    let routed = model.forward(batch.clone()).unwrap();
    remove_routers(&mut model);
    model.set_active_adapters(&["b"]).unwrap();
    assert_close(
        routed,
        model.forward(batch.clone()).unwrap(),
        1e-5,
        "Arrow over one expert is that expert",
    );
    model.set_active_adapters(&[]).unwrap();
    let base = model.forward(batch.clone()).unwrap();

    // Routed over all three, the cached decoding steps route each new token as the full
    // forward pass does.
    route_arrow(&mut model, &["a", "b", "c"], &ArrowOptions::default(), None).unwrap();
    let full = model.forward(batch.clone()).unwrap();
    assert!(
        common::max_abs_diff(full.clone(), base) > 1e-2,
        "the experts change the logits"
    );
    let mut cache = KvCache::new();
    let prefix = batch.clone().slice([0..2, 0..2]);
    let mut last = model
        .forward_cached(prefix, None, None, &mut cache, true)
        .unwrap();
    for s in 2..4 {
        assert_close(
            last,
            full.clone().slice([0..2, s - 1..s]),
            1e-4,
            &format!("cached step at {s}"),
        );
        let next = batch.clone().slice([0..2, s..s + 1]);
        last = model
            .forward_cached(next, None, None, &mut cache, true)
            .unwrap();
    }
    assert_close(last, full.slice([0..2, 3..4]), 1e-4, "last cached step");
}

#[test]
fn factor_mixing_equals_the_mixed_factors() {
    // Equal ranks for factor mixing: (Σ w s B)(Σ w A) x, checked on one layer against the
    // weights the trace reports.
    let device = Device::flex();
    let mut model =
        modula::checkpoint::load_decoder(common::data("tiny_decoders/llama"), &device).unwrap();
    let mut rng = Rng(11);
    for (path, layer) in model.linear_layers_mut() {
        if path.ends_with("q_proj") {
            for name in ["a", "b", "c"] {
                let a = rng.tensor(layer.d_in(), 3, &device);
                let b = rng.tensor(3, layer.d_out(), &device);
                let m = LoraModule::from_factors(a, b, 6.0, false, 0.0).unwrap();
                layer.insert_adapter(name, m).unwrap();
            }
        }
    }
    let trace = RoutingTrace::new();
    let options = ArrowOptions {
        top_k: 2,
        temperature: 1.0,
        mix: LoraMix::Factor,
    };
    let paths = route_arrow(&mut model, &["a", "b", "c"], &options, Some(&trace)).unwrap();
    assert_eq!(
        paths,
        [
            "model.layers.0.self_attn.q_proj",
            "model.layers.1.self_attn.q_proj"
        ]
    );
    let layers = model.linear_layers();
    let layer = layers[0].1;
    let mut x_rng = Rng(3);
    let x = x_rng.tensor(6, layer.d_in(), &device);
    let y = host(layer.forward(x.clone()).unwrap());
    let d = trace.take().pop().unwrap();
    let base = host(layer.base.forward(x.clone()));
    let xs = host(x);
    let (d_in, d_out) = (layer.d_in(), layer.d_out());
    for row in 0..6 {
        let mut u = [0f64; 3];
        let mut bmix = vec![0f64; 3 * d_out];
        for slot in 0..2 {
            let e = d.indices[row * 2 + slot] as usize;
            let w = f64::from(d.weights[row * 2 + slot]);
            let m = layer.adapter(["a", "b", "c"][e]).unwrap();
            let (a, b) = (host(m.a.val()), host(m.b.val()));
            for j in 0..3 {
                u[j] += w
                    * (0..d_in)
                        .map(|i| xs[row * d_in + i] * a[i * 3 + j])
                        .sum::<f64>();
            }
            for (bm, bv) in bmix.iter_mut().zip(&b) {
                *bm += w * m.scaling() * bv;
            }
        }
        for o in 0..d_out {
            let want =
                base[row * d_out + o] + (0..3).map(|j| u[j] * bmix[j * d_out + o]).sum::<f64>();
            let got = y[row * d_out + o];
            assert!(
                (got - want).abs() < 1e-4,
                "row {row} col {o}: {got} vs {want}"
            );
        }
    }
}

#[test]
fn bad_routing_requests_are_errors_and_install_nothing() {
    let device = Device::flex();
    let mut model = model_with_experts(&device);
    let no_router =
        |m: &LlamaForCausalLm| m.linear_layers().iter().all(|(_, l)| l.router().is_none());
    let all = ["a", "b", "c"];
    let e = route_arrow(&mut model, &["a", "zz"], &ArrowOptions::default(), None).unwrap_err();
    assert!(matches!(e, Error::UnknownAdapter { .. }), "{e}");
    let zero_k = ArrowOptions {
        top_k: 0,
        ..ArrowOptions::default()
    };
    let e = route_arrow(&mut model, &all, &zero_k, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("top_k"), "{e}");
    let cold = ArrowOptions {
        temperature: 0.0,
        ..ArrowOptions::default()
    };
    let e = route_arrow(&mut model, &all, &cold, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("temperature"), "{e}");
    let factor = ArrowOptions {
        mix: LoraMix::Factor,
        ..ArrowOptions::default()
    };
    let e = route_arrow(&mut model, &all, &factor, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("one rank") && e.contains("layer `model.layers.0"),
        "{e}"
    );
    assert!(route_arrow(&mut model, &[], &ArrowOptions::default(), None).is_err());
    model.merge_adapter("b").unwrap();
    let e = route_arrow(&mut model, &all, &ArrowOptions::default(), None).unwrap_err();
    assert!(matches!(e, Error::AlreadyMerged { .. }), "{e}");
    assert!(no_router(&model), "a failed install leaves no router");
    model.unmerge_adapter("b").unwrap();

    // With routers installed, a batch that names adapters per sequence is refused.
    route_arrow(&mut model, &all, &ArrowOptions::default(), None).unwrap();
    let batch = ids(&[vec![3, 9], vec![6, 2]], &device);
    let e = model
        .forward_mixed(batch, None, &[Some("a"), Some("b")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("router"), "{e}");
    // A routed adapter removed later is named at the next forward.
    model.delete_adapter("c").unwrap();
    let e = model.forward(ids(&[vec![3, 9]], &device)).unwrap_err();
    assert!(matches!(e, Error::UnknownAdapter { .. }), "{e}");
    remove_routers(&mut model);
    assert!(no_router(&model));
}

/// PEFT 0.21.2's Arrow (`create_arrow_model`, top 2, temperature 0.5) on the tiny Llama
/// (tests/data/make_arrow_goldens.py): where PEFT's 15 power iterations converge (experts
/// whose top singular value stands out), modula's logits equal PEFT's; where they do not (top
/// two singular values within 1 %), PEFT's prototypes point elsewhere and modula's logits
/// equal PEFT's forward with the exact prototypes put in, not PEFT's own.
#[test]
fn arrow_equals_peft_where_its_power_iteration_converges_and_the_exact_arrow_elsewhere() {
    for device in common::devices() {
        arrow_against_peft_on(&device);
    }
}

fn arrow_against_peft_on(device: &Device) {
    let device = device.clone();
    let root = common::data("tiny_decoders");
    let g = common::golden("tiny_decoders/arrow/golden.safetensors");
    let ids: Tensor<2, Int> = g.tensor::<2>("input_ids", &device).unwrap().int();
    let options = ArrowOptions {
        top_k: 2,
        temperature: 0.5,
        mix: LoraMix::Output,
    };
    for (set, prefix) in [("sep", "expert"), ("close", "close")] {
        let mut model = modula::checkpoint::load_decoder(root.join("llama"), &device).unwrap();
        let names: Vec<String> = (0..3).map(|e| format!("task_{e}")).collect();
        for (e, name) in names.iter().enumerate() {
            modula::PeftLora::load(root.join(format!("arrow/{prefix}_{e}")), &device)
                .unwrap()
                .attach_to_model(&mut model, name)
                .unwrap();
        }
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let paths = route_arrow(&mut model, &refs, &options, None).unwrap();
        assert_eq!(paths.len(), 14);
        let got = model.forward(ids.clone()).unwrap();
        let on = format!("{set} on {device:?}");
        let peft: Tensor<3> = g.tensor(&format!("{set}.logits_peft"), &device).unwrap();
        let exact: Tensor<3> = g.tensor(&format!("{set}.logits_exact"), &device).unwrap();
        let cos = vals(g.tensor::<1>(&format!("{set}.proto_cos"), &device).unwrap());
        let min_cos = cos.iter().copied().fold(1.0f32, f32::min);
        assert_close(got.clone(), exact, 1e-4, &format!("{on}: exact Arrow"));
        if set == "sep" {
            assert!(min_cos > 0.99999, "PEFT converged: min |cos| {min_cos}");
            assert_close(got, peft, 1e-4, &format!("{on}: PEFT's Arrow"));
        } else {
            assert!(min_cos < 0.5, "PEFT did not converge: min |cos| {min_cos}");
            let d = common::max_abs_diff(got, peft);
            assert!(
                d > 0.1,
                "PEFT's unconverged prototypes change the logits: {d}"
            );
        }
    }
}

/// GenKnowSub at model level against PEFT's `ArrowConfig(use_gks=True)` (task adapters
/// `expert_*`, general adapters `close_0`, `close_1`): in factor space modula's logits equal
/// PEFT's forward with exact prototypes (PEFT's own power iteration reaches only |cos| ≈ 0.97
/// on the subtracted factors); the delta-space form differs from the factor form, and errors
/// leave the model unchanged.
#[test]
fn gen_know_sub_equals_peft_with_exact_prototypes() {
    use modula::library::MergeSpace;
    use modula::models::gen_know_sub;
    let device = Device::flex();
    let root = common::data("tiny_decoders");
    let g = common::golden("tiny_decoders/arrow/golden.safetensors");
    let ids: Tensor<2, Int> = g.tensor::<2>("input_ids", &device).unwrap().int();
    let load = || {
        let mut model = modula::checkpoint::load_decoder(root.join("llama"), &device).unwrap();
        for (name, dir) in [
            ("task_0", "expert_0"),
            ("task_1", "expert_1"),
            ("task_2", "expert_2"),
            ("gks_0", "close_0"),
            ("gks_1", "close_1"),
        ] {
            modula::PeftLora::load(root.join(format!("arrow/{dir}")), &device)
                .unwrap()
                .attach_to_model(&mut model, name)
                .unwrap();
        }
        model
    };
    let tasks = ["task_0", "task_1", "task_2"];
    let options = ArrowOptions {
        top_k: 2,
        temperature: 0.5,
        mix: LoraMix::Output,
    };
    let mut model = load();
    let changed =
        gen_know_sub(&mut model, &tasks, &["gks_0", "gks_1"], MergeSpace::Factor).unwrap();
    assert_eq!(changed.len(), 14);
    route_arrow(&mut model, &tasks, &options, None).unwrap();
    let got = model.forward(ids.clone()).unwrap();
    let exact: Tensor<3> = g.tensor("gks.logits_exact", &device).unwrap();
    assert_close(
        got.clone(),
        exact,
        1e-4,
        "GenKnowSub + Arrow, exact prototypes",
    );
    let cos = vals(g.tensor::<1>("gks.proto_cos", &device).unwrap());
    assert!(
        cos.iter().any(|c| *c < 0.999),
        "PEFT's iteration is short here"
    );

    let mut delta = load();
    gen_know_sub(&mut delta, &tasks, &["gks_0", "gks_1"], MergeSpace::Delta).unwrap();
    assert_eq!(
        delta.linear_layers()[0].1.adapter("task_0").unwrap().rank(),
        12
    );
    route_arrow(&mut delta, &tasks, &options, None).unwrap();
    assert!(common::max_abs_diff(delta.forward(ids.clone()).unwrap(), got) > 1e-3);

    let mut bad = load();
    for (t, g) in [
        (&["task_0"][..], &["task_0"][..]),
        (&[][..], &["gks_0"][..]),
        (&["task_0"][..], &["nope"][..]),
    ] {
        assert!(gen_know_sub(&mut bad, t, g, MergeSpace::Factor).is_err());
    }
    let mut merged = load();
    merged.merge_adapter("task_1").unwrap();
    let e = gen_know_sub(&mut merged, &tasks, &["gks_0"], MergeSpace::Factor).unwrap_err();
    assert!(matches!(e, modula::Error::AlreadyMerged { .. }), "{e}");
    // The factors are untouched, and so are the logits of the task adapter alone.
    bad.set_active_adapters(&["task_0"]).unwrap();
    let mut fresh = load();
    fresh.set_active_adapters(&["task_0"]).unwrap();
    assert_close(
        bad.forward(ids.clone()).unwrap(),
        fresh.forward(ids).unwrap(),
        0.0,
        "errors change nothing",
    );
}

/// Learned routers at model level: one X-LoRA-style classifier per adapted layer, trained by
/// Adam through the installed routers on the composed model's loss. The loss falls, only the
/// routers' parameters move, and the trained routers installed in the plain model give the
/// same logits.
#[test]
fn layer_routers_train_through_the_model_and_only_they_move() {
    use burn::module::Module;
    use burn::optim::{AdamConfig, GradientsParams};
    use modula::models::{LayerRouters, causal_lm_loss};
    use modula::routers::XLoraRouterConfig;
    let ad = Device::flex().autodiff();
    ad.seed(5);
    let model = model_with_experts(&ad).no_grad();
    let names = ["a", "b", "c"];
    let mut routers = LayerRouters::new(&model, &names, LoraMix::Output, &mut |_, layer| {
        XLoraRouterConfig::new(layer.d_in(), 8, 3).init(&ad)
    })
    .unwrap();
    assert_eq!(routers.paths.len(), 14);
    let before_router = vals(routers.layers[0].out.weight.val());
    let before_a = vals(model.linear_layers()[0].1.adapter("a").unwrap().a.val());
    let batch = ids(&[vec![3, 9, 17, 4, 40, 2], vec![60, 2, 8, 8, 31, 5]], &ad);
    let mut optim = AdamConfig::new().init();
    let mut losses = Vec::new();
    for _ in 0..15 {
        let mut m = model.clone();
        routers.install(&mut m).unwrap();
        let loss = causal_lm_loss(m.forward(batch.clone()).unwrap(), batch.clone(), None).unwrap();
        losses.push(vals(loss.clone())[0]);
        let grads = GradientsParams::from_grads(loss.backward(), &routers);
        routers = optim.step(1e-2, routers, grads);
    }
    assert!(
        losses[14] < losses[0] - 1e-3,
        "routing learned nothing: {losses:?}"
    );
    assert_ne!(
        before_router,
        vals(routers.layers[0].out.weight.val()),
        "the routers trained"
    );
    assert_eq!(
        before_a,
        vals(model.linear_layers()[0].1.adapter("a").unwrap().a.val()),
        "experts are frozen"
    );
    // The trained routers on the plain device give the trained model's logits.
    let mut trained = model.clone();
    routers.install(&mut trained).unwrap();
    let want = trained.forward(batch.clone()).unwrap().inner();
    let plain_model = model.valid();
    let mut plain = plain_model.clone();
    routers.valid().install(&mut plain).unwrap();
    let plain_ids = batch.inner();
    assert_close(
        plain.forward(plain_ids).unwrap(),
        want,
        1e-5,
        "valid routers",
    );
    // Bad requests.
    assert!(
        LayerRouters::new(&plain_model, &[], LoraMix::Output, &mut |_, l| {
            XLoraRouterConfig::new(l.d_in(), 8, 3).init(&Device::flex())
        })
        .is_err()
    );
    assert!(matches!(
        LayerRouters::new(&plain_model, &["zz"], LoraMix::Output, &mut |_, l| {
            XLoraRouterConfig::new(l.d_in(), 8, 1).init(&Device::flex())
        }),
        Err(Error::UnknownAdapter { .. })
    ));
}

/// An expert library folder routes like the PEFT folders it was imported from:
/// `ExpertLibrary::attach_to_model` then Arrow gives PEFT's Arrow logits (the converging set).
#[test]
fn an_expert_library_attaches_and_routes_like_its_folders() {
    use modula::store::{ExpertInfo, ExpertLibrary};
    let device = Device::flex();
    let root = common::data("tiny_decoders");
    let tmp = tempfile::tempdir().unwrap();
    let mut lib = ExpertLibrary::open_or_create(tmp.path().join("lib")).unwrap();
    for e in 0..3 {
        lib.import_peft(
            &format!("task_{e}"),
            root.join(format!("arrow/expert_{e}")),
            ExpertInfo::default(),
            &device,
        )
        .unwrap();
    }
    let mut model = modula::checkpoint::load_decoder(root.join("llama"), &device).unwrap();
    let names = lib.attach_to_model(&mut model, &[], &device).unwrap();
    assert_eq!(names, ["task_0", "task_1", "task_2"]);
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let options = ArrowOptions {
        top_k: 2,
        temperature: 0.5,
        mix: LoraMix::Output,
    };
    route_arrow(&mut model, &refs, &options, None).unwrap();
    let g = common::golden("tiny_decoders/arrow/golden.safetensors");
    let ids: Tensor<2, Int> = g.tensor::<2>("input_ids", &device).unwrap().int();
    let want: Tensor<3> = g.tensor("sep.logits_peft", &device).unwrap();
    assert_close(model.forward(ids).unwrap(), want, 1e-4, "library + Arrow");
    let mut other = modula::checkpoint::load_decoder(root.join("llama"), &device).unwrap();
    assert!(lib.attach_to_model(&mut other, &["nope"], &device).is_err());
}

/// Task-level routing in a model: each sequence's stated task picks its adapter in every
/// layer (`TaskRouted` over a per-task `FixedRouter`), which is PEFT's mixed batch
/// (`adapter_names`) computed through the routers instead; cached decoding routes each step's
/// rows by the same tasks; bad task states are errors.
#[test]
fn task_routing_per_sequence_equals_a_mixed_batch_and_decodes_alike() {
    use modula::routers::{SequenceTasks, TaskRouted};
    use modula::{FixedRouter, models::LayerRouters};
    let device = Device::flex();
    let batch = ids(
        &[vec![3, 9, 17, 4], vec![60, 2, 8, 31], vec![5, 5, 1, 0]],
        &device,
    );
    let mut model = model_with_experts(&device);
    let want = model
        .forward_mixed(batch.clone(), None, &[Some("c"), Some("a"), Some("c")])
        .unwrap();
    let tasks = SequenceTasks::new();
    let names = ["a", "b", "c"];
    install_routers(&mut model, &mut |_, layer| {
        if layer.names().is_empty() {
            return Ok(None);
        }
        let r = TaskRouted::new(FixedRouter::per_task(3), tasks.clone());
        let names = names.map(String::from).to_vec();
        Ok(Some(
            Arc::new(RoutedLora::new(r, names, LoraMix::Output)?) as _
        ))
    })
    .unwrap();
    // No tasks stated yet: an error naming the fix, not a panic.
    let err = model.forward(batch.clone()).unwrap_err().to_string();
    assert!(err.contains("SequenceTasks::set"), "{err}");
    tasks.set(&[2, 0]);
    assert!(matches!(
        model.forward(batch.clone()),
        Err(Error::Shape { .. })
    ));
    tasks.set(&[2, 0, 2]);
    let full = model.forward(batch.clone()).unwrap();
    assert_close(full.clone(), want, 1e-5, "task routing = mixed batch");
    tasks.set(&[5, 0, 2]);
    assert!(matches!(
        model.forward(batch.clone()),
        Err(Error::IdOutOfRange { .. })
    ));
    tasks.set(&[2, 0, 2]);
    let mut cache = KvCache::new();
    let mut last = model
        .forward_cached(
            batch.clone().slice([0..3, 0..2]),
            None,
            None,
            &mut cache,
            true,
        )
        .unwrap();
    for s in 2..4 {
        assert_close(
            last,
            full.clone().slice([0..3, s - 1..s]),
            1e-4,
            &format!("cached step at {s}"),
        );
        last = model
            .forward_cached(
                batch.clone().slice([0..3, s..s + 1]),
                None,
                None,
                &mut cache,
                true,
            )
            .unwrap();
    }
    remove_routers(&mut model);

    // Polytropon at model level: a task × skill allocation per layer, trained through the
    // model by the loss of each task's own sequences; tasks end up with different mixtures.
    use burn::module::Module;
    use burn::optim::{AdamConfig, GradientsParams};
    use modula::PolytroponRouterConfig;
    use modula::models::causal_lm_loss;
    let ad = Device::flex().autodiff();
    ad.seed(9);
    let model = model_with_experts(&ad).no_grad();
    let tasks = SequenceTasks::new();
    // Output mixing: the experts have ranks 2, 4 and 3 (factor mixing needs one rank).
    let mut routers = LayerRouters::new(&model, &names, LoraMix::Output, &mut |_, _| {
        Ok(TaskRouted::new(
            PolytroponRouterConfig::new(2, 3).init(&ad)?,
            tasks.clone(),
        ))
    })
    .unwrap();
    assert_eq!(routers.paths.len(), 14);
    let train = ids(&[vec![3, 9, 17, 4, 40, 2], vec![60, 2, 8, 8, 31, 5]], &ad);
    tasks.set(&[0, 1]);
    let mut optim = AdamConfig::new().init();
    let mut losses = Vec::new();
    for _ in 0..12 {
        let mut m = model.clone();
        routers.install(&mut m).unwrap();
        let loss = causal_lm_loss(m.forward(train.clone()).unwrap(), train.clone(), None).unwrap();
        losses.push(vals(loss.clone())[0]);
        let grads = GradientsParams::from_grads(loss.backward(), &routers);
        routers = optim.step(5e-2, routers, grads);
    }
    assert!(
        losses[11] < losses[0] - 1e-3,
        "the allocation learned nothing: {losses:?}"
    );
    let z = vals(routers.layers[0].router.logits.val());
    let spread = (0..3)
        .map(|s| (z[s] - z[3 + s]).abs())
        .fold(0.0f32, f32::max);
    assert!(
        spread > 1e-2,
        "the two tasks' allocations stay equal: {z:?}"
    );
}

/// A rows router that sends row `r` to the module with the largest of its first three
/// features (weight 1) and records each call's choices.
#[derive(Clone, Debug, Default)]
struct FirstFeatures(Arc<Mutex<Vec<Vec<i64>>>>);

impl Router for FirstFeatures {
    fn num_modules(&self) -> usize {
        3
    }

    fn route_input(&self, input: RouterInput<'_>) -> modula::Result<Routing> {
        let x = input.into_rows("FirstFeatures")?;
        let [rows, d] = x.dims();
        let v: Vec<f32> = x.clone().into_data().iter::<f32>().collect();
        let picks: Vec<i64> = (0..rows)
            .map(|r| {
                let row = &v[r * d..r * d + 3];
                (0..3).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap() as i64
            })
            .collect();
        self.0.lock().unwrap().push(picks.clone());
        Routing::one_per_row(&picks, 3, &x.device())
    }
}

/// Routing levels on a decoder: one router deciding per sequence in each layer, or once per
/// sequence for the whole model (`PerSequence`). Global: the router runs once per forward and
/// the logits are PEFT's mixed batch with its choices; sequence level: each sequence's logits
/// are those it gets alone in the batch, all its tokens share each layer's choice, and a
/// cached decoding step applies the prefill's choices.
#[test]
fn routing_levels_sequence_and_global_on_a_decoder() {
    use modula::routers::{PerSequence, RoutingLevel, SequenceBatch};
    let device = Device::flex();
    let rows = [vec![3, 9, 17, 4], vec![60, 2, 8, 31], vec![5, 5, 1, 0]];
    let names = ["a", "b", "c"];
    let install = |model: &mut LlamaForCausalLm,
                   level: RoutingLevel,
                   batch: &SequenceBatch,
                   shared: &FirstFeatures| {
        install_routers(model, &mut |_, layer| {
            if layer.names().is_empty() {
                return Ok(None);
            }
            // Global: one recording router shared by every layer; otherwise one per layer.
            let inner = if level == RoutingLevel::Global {
                shared.clone()
            } else {
                FirstFeatures::default()
            };
            let r = PerSequence::new(inner, level, batch.clone());
            Ok(Some(Arc::new(RoutedLora::new(
                r,
                names.map(String::from).to_vec(),
                LoraMix::Output,
            )?) as _))
        })
        .unwrap();
    };
    // Global.
    let mut model = model_with_experts(&device);
    let batch = SequenceBatch::new();
    let shared = FirstFeatures::default();
    install(&mut model, RoutingLevel::Global, &batch, &shared);
    assert!(
        model.forward(ids(&rows, &device)).is_err(),
        "no batch started"
    );
    batch.start(3);
    let got = model.forward(ids(&rows, &device)).unwrap();
    let calls = shared.0.lock().unwrap().clone();
    assert_eq!(calls.len(), 1, "one decision per forward: {calls:?}");
    let choice: Vec<Option<&str>> = calls[0].iter().map(|&i| Some(names[i as usize])).collect();
    let plain = model_with_experts(&device);
    let want = plain
        .forward_mixed(ids(&rows, &device), None, &choice)
        .unwrap();
    assert_close(
        got,
        want,
        1e-5,
        "global routing = mixed batch of its choices",
    );
    batch.start(2);
    assert!(
        model.forward(ids(&rows, &device)).is_err(),
        "3 sequences in a batch of 2"
    );
    // Sequence level: batch independence and decoding reuse.
    let mut model = model_with_experts(&device);
    let batch = SequenceBatch::new();
    install(&mut model, RoutingLevel::Sequence, &batch, &shared);
    batch.start(3);
    let all = model.forward(ids(&rows, &device)).unwrap();
    for (i, row) in rows.iter().enumerate() {
        batch.start(1);
        let alone = model
            .forward(ids(std::slice::from_ref(row), &device))
            .unwrap();
        assert_close(
            all.clone().slice([i..i + 1, 0..4, 0..64]),
            alone,
            1e-5,
            &format!("sequence {i}"),
        );
    }
    // The decisions the layers apply, traced: per sequence at prefill, reused by a step.
    {
        let level = RoutingLevel::Sequence;
        let mut model = model_with_experts(&device);
        let batch = SequenceBatch::new();
        let trace = RoutingTrace::new();
        install_routers(&mut model, &mut |path, layer| {
            if layer.names().is_empty() {
                return Ok(None);
            }
            let r = PerSequence::new(FirstFeatures::default(), level, batch.clone());
            Ok(Some(Arc::new(
                RoutedLora::new(r, names.map(String::from).to_vec(), LoraMix::Output)?
                    .with_trace(path, trace.clone()),
            ) as _))
        })
        .unwrap();
        batch.start(3);
        let mut cache = KvCache::new();
        model
            .forward_cached(ids(&rows, &device), None, None, &mut cache, true)
            .unwrap();
        let prefill = trace.take();
        model
            .forward_cached(
                ids(&[vec![7], vec![8], vec![9]], &device),
                None,
                None,
                &mut cache,
                true,
            )
            .unwrap();
        let step = trace.take();
        assert_eq!(prefill.len(), step.len());
        assert!(!prefill.is_empty());
        for (p, s) in prefill.iter().zip(&step) {
            // Every token of a sequence shares its layer's choice, and the step applies it.
            let first: Vec<i64> = (0..3).map(|i| p.indices[i * 4]).collect();
            for (i, f) in first.iter().enumerate() {
                assert!(p.indices[i * 4..i * 4 + 4].iter().all(|m| m == f), "{p:?}");
            }
            assert_eq!(
                s.indices, first,
                "{}: the step reuses the prefill's choice",
                p.label
            );
        }
    }
}
