//! Mixture-of-experts: sparse ≡ dense, losses on hand-computed cases, bad inputs, gradients
//! (autodiff against finite differences).

mod common;

use burn::module::Module;
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use common::{Rng, assert_close, devices, vals};
use modula::routers::losses::{cv_squared, load_balancing_loss, router_entropy, z_loss};
use modula::{ComputeModule, Error, ExpertConfig, ExpertKind, MoeLayer, TopKRouterConfig};
use modula::{ExpertChoiceRouterConfig, HashRouterConfig, MoeLayerConfig, SoftMoeConfig};

fn t2(v: Vec<f32>, r: usize, c: usize, device: &Device) -> Tensor<2> {
    Tensor::<2>::from_data(TensorData::new(v, [r, c]), device)
}

fn close(a: f32, b: f64, what: &str) {
    assert!((a as f64 - b).abs() < 1e-5, "{what}: {a} vs {b}");
}

#[test]
fn sparse_moe_equals_dense_all_experts() {
    for device in devices() {
        device.seed(1);
        for (k, renorm, kind, bias) in [
            (1, false, ExpertKind::Mlp, true),
            (2, true, ExpertKind::SwiGlu, false),
            (2, false, ExpertKind::SwiGlu, true),
            (4, true, ExpertKind::Mlp, false),
        ] {
            let rc = TopKRouterConfig::new(12, 4)
                .with_k(k)
                .with_renormalize(renorm);
            let ec = ExpertConfig::new(12, 20).with_kind(kind).with_bias(bias);
            let moe = MoeLayerConfig::new(rc.clone(), ec.clone())
                .init(&device)
                .unwrap();
            let x = Rng(k as u64 + 3).tensor(37, 12, &device);
            let (y, routing) = moe.forward(x.clone()).unwrap();
            assert_eq!(routing.k(), k);
            assert_eq!(routing.tokens_per_module().iter().sum::<usize>(), 37 * k);
            let dense = moe.forward_dense(x, &routing).unwrap();
            assert_close(y, dense, 1e-5, &format!("k={k} renorm={renorm} {kind:?}"));
            // Renormalised weights sum to one per token.
            if renorm {
                let sums = vals(routing.weights().sum_dim(1));
                assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5));
            }
        }
    }
}

#[test]
fn top_k_weights_on_a_hand_computed_case() {
    let device = Device::flex();
    let l = vec![0.0, 2f32.ln(), 3f32.ln()]; // probabilities 1/6, 2/6, 3/6
    for (renorm, w0, w1) in [(true, 0.6, 0.4), (false, 0.5, 1.0 / 3.0)] {
        let router = TopKRouterConfig::new(4, 3)
            .with_k(2)
            .with_renormalize(renorm)
            .init(&device)
            .unwrap();
        let r = router.route_logits(t2(l.clone(), 1, 3, &device)).unwrap();
        let idx: Vec<i64> = r.indices().into_data().iter::<i64>().collect();
        assert_eq!(idx, [2, 1]);
        let w = vals(r.weights());
        close(w[0], w0, "first weight");
        close(w[1], w1, "second weight");
    }
}

#[test]
fn losses_match_their_formulas_by_hand() {
    let device = Device::flex();
    let ln3 = 3f32.ln();
    // Balanced: token 0 picks expert 1 (p = 3/4), token 1 picks expert 0.
    let logits = t2(vec![0.0, ln3, ln3, 0.0], 2, 2, &device);
    let probs = burn::tensor::activation::softmax(logits.clone(), 1);
    let idx =
        Tensor::<2, burn::tensor::Int>::from_data(TensorData::new(vec![1i64, 0], [2, 1]), &device);
    // f = [1/2, 1/2], P̄ = [1/2, 1/2]: E·Σ f·P̄ = 2·(1/4 + 1/4) = 1.
    close(
        load_balancing_loss(probs.clone(), idx).into_scalar::<f32>(),
        1.0,
        "balanced LB",
    );
    // logsumexp(0, ln 3) = ln 4 for both tokens.
    close(
        z_loss(logits).into_scalar::<f32>(),
        4f64.ln().powi(2),
        "z-loss",
    );
    let h = -(0.25f64 * 0.25f64.ln() + 0.75 * 0.75f64.ln());
    close(router_entropy(probs).into_scalar::<f32>(), h, "entropy");
    // Imbalanced: both tokens pick expert 1; f = [0, 1], P̄ = [1/4, 3/4]: 2·3/4 = 1.5.
    let logits = t2(vec![0.0, ln3, 0.0, ln3], 2, 2, &device);
    let probs = burn::tensor::activation::softmax(logits, 1);
    let idx =
        Tensor::<2, burn::tensor::Int>::from_data(TensorData::new(vec![1i64, 1], [2, 1]), &device);
    close(
        load_balancing_loss(probs, idx).into_scalar::<f32>(),
        1.5,
        "imbalanced LB",
    );
    // CV² of [1, 2, 3]: population variance 2/3 over mean² 4.
    let v = Tensor::<1>::from_floats([1.0, 2.0, 3.0], &device);
    close(cv_squared(v).into_scalar::<f32>(), 1.0 / 6.0, "cv²");
    // The router attaches the scaled losses to its routing.
    let router = TopKRouterConfig::new(2, 2)
        .with_k(1)
        .with_load_balance_coef(0.5)
        .with_z_loss_coef(0.25)
        .init(&device)
        .unwrap();
    let r = router
        .route_logits(t2(vec![0.0, ln3, ln3, 0.0], 2, 2, &device))
        .unwrap();
    close(
        r.aux_loss("load_balance").unwrap().into_scalar::<f32>(),
        0.5,
        "scaled LB",
    );
    close(
        r.aux_loss("z_loss").unwrap().into_scalar::<f32>(),
        0.25 * 4f64.ln().powi(2),
        "scaled z",
    );
    close(
        r.total_aux_loss().into_scalar::<f32>(),
        0.5 + 0.25 * 4f64.ln().powi(2),
        "total",
    );
}

#[test]
fn bad_router_inputs_are_typed_errors() {
    let device = Device::flex();
    for k in [0, 5] {
        let err = TopKRouterConfig::new(8, 4)
            .with_k(k)
            .init(&device)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("between 1 and the number of experts (4)"),
            "{err}"
        );
    }
    assert!(matches!(
        TopKRouterConfig::new(8, 4).with_jitter(1.5).init(&device),
        Err(Error::Invalid { .. })
    ));
    let router = TopKRouterConfig::new(2, 2).with_k(1).init(&device).unwrap();
    for bad in [f32::NAN, f32::INFINITY] {
        let err = router
            .route_logits(t2(vec![0.0, bad], 1, 2, &device))
            .unwrap_err();
        assert!(matches!(err, Error::NonFinite { .. }), "{err:?}");
    }
    let moe = MoeLayerConfig::new(TopKRouterConfig::new(8, 4), ExpertConfig::new(8, 16))
        .init(&device)
        .unwrap();
    assert!(matches!(
        moe.forward(Tensor::zeros([3, 7], &device)),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        MoeLayerConfig::new(TopKRouterConfig::new(8, 4), ExpertConfig::new(6, 16)).init(&device),
        Err(Error::Shape { .. })
    ));
}

/// Expert `e`'s input (`inner`) or output projection weight.
fn expert_weight(m: &mut MoeLayer, e: usize, inner: bool) -> &mut burn::module::Param<Tensor<2>> {
    let ex = &mut m.experts[e];
    if inner {
        &mut ex.w_in.weight
    } else {
        &mut ex.w_out.weight
    }
}

/// Adds `h` to entry `(r, c)` of a frozen copy of `w`.
fn bump(
    w: &burn::module::Param<Tensor<2>>,
    r: usize,
    c: usize,
    h: f32,
) -> burn::module::Param<Tensor<2>> {
    let [rows, cols] = w.shape().dims();
    let mut d = vec![0.0f32; rows * cols];
    d[r * cols + c] = h;
    let delta = t2(d, rows, cols, &w.device());
    w.clone().map(|t| t + delta)
}

#[test]
fn gradients_reach_router_and_experts_and_match_finite_differences() {
    let device = Device::flex().autodiff();
    device.seed(7);
    let rc = TopKRouterConfig::new(3, 3)
        .with_k(2)
        .with_load_balance_coef(0.1)
        .with_z_loss_coef(0.1);
    let moe = MoeLayerConfig::new(rc.clone(), ExpertConfig::new(3, 4))
        .init(&device)
        .unwrap();
    let x = Rng(5).tensor(5, 3, &device);
    let c = Rng(6).tensor(5, 3, &device);
    let loss_of = |m: &MoeLayer| -> Tensor<1> {
        let (y, r) = m.forward(x.clone()).unwrap();
        (y * c.clone()).sum() + r.total_aux_loss()
    };
    let grads = loss_of(&moe).backward();
    let g_gate = vals(
        moe.router
            .gate
            .weight
            .val()
            .grad(&grads)
            .expect("router gets a gradient"),
    );
    let g_out = vals(
        moe.experts[1]
            .w_out
            .weight
            .val()
            .grad(&grads)
            .expect("expert gets a gradient"),
    );
    // Central differences on every entry of the gate and of one expert's output projection.
    // The loss is computed in f32 (|L| is a few units, rounding about 6e-8·|L| per
    // evaluation), so with h = 1e-2 the rounding part of the error is at most about 3e-5 and
    // the truncation part h²·|f⁽³⁾|/6 is smaller while the routing stays fixed. 1e-4 is what
    // that supports (measured: 1.3e-6).
    let h = 1e-2f32;
    let top_k = |m: &MoeLayer| -> Vec<i64> {
        let routing = m.forward(x.clone()).unwrap().1;
        routing.indices().into_data().iter::<i64>().collect()
    };
    let base_idx = top_k(&moe);
    let eval = |m: &MoeLayer| -> f64 {
        // ±h must leave the top-k choice unchanged, or the difference quotient straddles a
        // jump of the piecewise-smooth loss.
        let idx = top_k(m);
        assert_eq!(idx, base_idx, "a bump of h changed the top-k choice");
        loss_of(m).into_scalar::<f32>() as f64
    };
    let tol = 1e-4;
    let mut worst = 0.0f64;
    for r in 0..3 {
        for col in 0..3 {
            let (mut plus, mut minus) = (moe.clone(), moe.clone());
            plus.router.gate.weight = bump(&moe.router.gate.weight, r, col, h);
            minus.router.gate.weight = bump(&moe.router.gate.weight, r, col, -h);
            let fd = (eval(&plus) - eval(&minus)) / (2.0 * h as f64);
            let ad = g_gate[r * 3 + col] as f64;
            worst = worst.max((fd - ad).abs() / (1.0 + ad.abs()));
            assert!(
                (fd - ad).abs() < tol * (1.0 + ad.abs()),
                "gate[{r},{col}]: fd {fd} vs autodiff {ad}"
            );
        }
    }
    // Every entry of every expert's two projections (an expert that got no row has no
    // gradient, and its difference quotients must then be zero).
    for e in 0..moe.experts.len() {
        for inner in [true, false] {
            let ex = &moe.experts[e];
            let w = if inner { &ex.w_in } else { &ex.w_out }.weight.clone();
            let [rows, cols] = w.shape().dims();
            let g = w
                .val()
                .grad(&grads)
                .map_or_else(|| vec![0.0; rows * cols], vals);
            for r in 0..rows {
                for col in 0..cols {
                    let (mut plus, mut minus) = (moe.clone(), moe.clone());
                    *expert_weight(&mut plus, e, inner) = bump(&w, r, col, h);
                    *expert_weight(&mut minus, e, inner) = bump(&w, r, col, -h);
                    let fd = (eval(&plus) - eval(&minus)) / (2.0 * h as f64);
                    let ad = g[r * cols + col] as f64;
                    worst = worst.max((fd - ad).abs() / (1.0 + ad.abs()));
                    assert!(
                        (fd - ad).abs() < tol * (1.0 + ad.abs()),
                        "expert {e} {}[{r},{col}]: fd {fd} vs autodiff {ad}",
                        if inner { "w_in" } else { "w_out" }
                    );
                }
            }
        }
    }
    assert!(g_out.iter().any(|v| *v != 0.0));
    eprintln!("largest relative fd/autodiff gap: {worst:e}");
}

#[test]
fn jitter_applies_in_training_only() {
    let device = Device::flex().autodiff();
    device.seed(9);
    let eps = 0.2;
    let mut router = TopKRouterConfig::new(6, 6)
        .with_jitter(eps)
        .init(&device)
        .unwrap();
    // An identity gate makes the logits the jittered input itself: x ⊙ n.
    let eye: Vec<f32> = (0..36)
        .map(|i| if i % 7 == 0 { 1.0 } else { 0.0 })
        .collect();
    router.gate.weight = burn::module::Param::from_tensor(t2(eye, 6, 6, &device));
    let x = Rng(4).tensor(50, 6, &device);
    let xs = vals(x.clone());
    let a = vals(router.logits(&x).unwrap());
    let b = vals(router.logits(&x).unwrap());
    assert_ne!(a, b, "jitter should change the logits in training");
    // Every multiplier n = logit / x lies in [1 − ε, 1 + ε], and the draws fill that range.
    let n: Vec<f64> = a
        .iter()
        .zip(&xs)
        .filter(|(_, x)| x.abs() > 1e-2)
        .map(|(l, x)| f64::from(*l) / f64::from(*x))
        .collect();
    assert!(n.len() > 250);
    let (lo, hi) = n
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
    assert!(
        lo >= 1.0 - eps - 1e-4 && hi <= 1.0 + eps + 1e-4,
        "jitter multipliers span [{lo}, {hi}], outside [1 − ε, 1 + ε]"
    );
    assert!(
        lo < 1.0 - 0.8 * eps && hi > 1.0 + 0.8 * eps,
        "jitter multipliers span only [{lo}, {hi}]"
    );
    // Evaluation: exactly the clean logits x W_g, every call.
    let eval = router.valid();
    let xv = x.without_autodiff();
    let clean = vals(eval.gate.forward(xv.clone()));
    assert_eq!(clean, xs, "identity gate");
    assert_eq!(vals(eval.logits(&xv).unwrap()), clean);
    assert_eq!(vals(eval.logits(&xv).unwrap()), clean);
}

#[test]
fn capacity_dropping_matches_a_hand_worked_case() {
    use modula::SecondExpertPolicy;
    use modula::routers::capacity::{apply_capacity, expert_capacity};
    let device = Device::flex();
    // 5 tokens, 2 experts, top-2, capacity 3. First choices 0,0,1,0,0; second 1,1,0,1,1.
    // Firsts in token order: expert 0 accepts tokens 0,1,3 and is full, so token 4's first
    // choice is dropped; expert 1 accepts token 2. Seconds queue after all firsts: expert 1
    // accepts tokens 0,1 (positions 1,2) and is full; token 2's second (expert 0) and
    // tokens 3,4's seconds are dropped.
    let idx = vec![vec![0, 1], vec![0, 1], vec![1, 0], vec![0, 1], vec![0, 1]];
    let w = vec![vec![0.7, 0.3]; 5];
    let r = modula::Routing::from_rows(&idx, &w, 2, &device).unwrap();
    let out = apply_capacity(r, 3, SecondExpertPolicy::All).unwrap();
    let got: Vec<i64> = out.indices().into_data().iter::<i64>().collect();
    assert_eq!(got, [0, 1, 0, 1, 1, -1, 0, -1, -1, -1]);
    assert_eq!(out.dropped_slots(), 4);
    assert_eq!(out.tokens_per_module(), [3, 3]);
    // Threshold policy: second choices below 0.5 are not dispatched at all.
    let r = modula::Routing::from_rows(&idx, &w, 2, &device).unwrap();
    let out = apply_capacity(r, 10, SecondExpertPolicy::Threshold(0.5)).unwrap();
    let got: Vec<i64> = out.indices().into_data().iter::<i64>().collect();
    assert_eq!(got, [0, -1, 0, -1, 1, -1, 0, -1, 0, -1]);
    // Random policy keeps a second choice with probability min(1, 2w): w = 0.6 keeps all.
    let r = modula::Routing::from_rows(&idx, &vec![vec![0.4, 0.6]; 5], 2, &device).unwrap();
    let out = apply_capacity(r, 10, SecondExpertPolicy::Random { seed: 1 }).unwrap();
    assert_eq!(out.dropped_slots(), 0);
    // Where coins are flipped: w₂ = 0.2 keeps each second choice with probability 0.4.
    let n = 4000;
    let many_idx: Vec<Vec<i64>> = (0..n)
        .map(|i| vec![(i % 2) as i64, 1 - (i % 2) as i64])
        .collect();
    let random = |seed: u64| -> Vec<i64> {
        let r =
            modula::Routing::from_rows(&many_idx, &vec![vec![0.8, 0.2]; n], 2, &device).unwrap();
        let out = apply_capacity(r, 2 * n, SecondExpertPolicy::Random { seed }).unwrap();
        out.indices().into_data().iter::<i64>().collect()
    };
    let got = random(3);
    // First choices are never subject to the policy.
    assert!((0..n).all(|i| got[2 * i] == many_idx[i][0]));
    let kept = (0..n).filter(|i| got[2 * i + 1] >= 0).count() as f64 / n as f64;
    // 3σ of a binomial fraction with p = 0.4 over 4000 coins is 0.023.
    let sigma = (0.4f64 * 0.6 / n as f64).sqrt();
    assert!(
        (kept - 0.4).abs() < 3.0 * sigma,
        "kept fraction {kept}, expected 0.4 ± {}",
        3.0 * sigma
    );
    // Kept second choices keep their expert; the draw is fixed by the seed.
    assert!((0..n).all(|i| got[2 * i + 1] < 0 || got[2 * i + 1] == many_idx[i][1]));
    assert_eq!(random(3), got);
    assert_ne!(random(4), got);
    assert_eq!(expert_capacity(1.25, 8, 2, 4).unwrap(), 5);
    for bad in [0.0, -1.0, f64::NAN] {
        assert!(matches!(
            expert_capacity(bad, 8, 2, 4),
            Err(Error::Invalid { .. })
        ));
    }
}

#[test]
fn capacity_mode_router_limits_every_expert_and_stays_exact() {
    for device in devices() {
        device.seed(4);
        let rc = TopKRouterConfig::new(8, 4)
            .with_k(2)
            .with_capacity_factor(Some(0.75));
        let moe = MoeLayerConfig::new(rc.clone(), ExpertConfig::new(8, 12))
            .init(&device)
            .unwrap();
        let x = Rng(12).tensor(40, 8, &device);
        let (y, routing) = moe.forward(x.clone()).unwrap();
        let cap = (0.75f64 * 40.0 * 2.0 / 4.0).ceil() as usize; // 15
        assert!(routing.tokens_per_module().iter().all(|&n| n <= cap));
        // Each expert keeps exactly min(capacity, demand), where demand is what the same
        // router sends it without a capacity: nothing is dropped that did not have to be.
        let mut dropless = moe.router.clone();
        dropless.capacity_factor = None;
        let demand = modula::Router::route(&dropless, &x)
            .unwrap()
            .tokens_per_module();
        assert!(
            demand.iter().any(|&n| n > cap),
            "the case should overflow an expert"
        );
        let want: Vec<usize> = demand.iter().map(|&n| n.min(cap)).collect();
        assert_eq!(routing.tokens_per_module(), want, "demand {demand:?}");
        assert_eq!(
            routing.tokens_per_module().iter().sum::<usize>() + routing.dropped_slots(),
            80
        );
        assert!(routing.dropped_slots() >= 80 - 4 * cap);
        assert_close(
            y,
            moe.forward_dense(x, &routing).unwrap(),
            1e-5,
            "capacity mode sparse vs dense",
        );
    }
    let err = TopKRouterConfig::new(8, 4)
        .with_capacity_factor(Some(0.0))
        .init(&Device::flex())
        .unwrap_err();
    assert!(err.to_string().contains("capacity factor"), "{err}");
}

#[test]
fn expert_choice_gives_each_expert_exactly_its_capacity() {
    for device in devices() {
        device.seed(8);
        let moe = MoeLayerConfig::new(TopKRouterConfig::new(6, 3), ExpertConfig::new(6, 10))
            .init(&device)
            .unwrap();
        let router = ExpertChoiceRouterConfig::new(6, 3)
            .with_capacity_factor(1.5)
            .init(&device)
            .unwrap();
        let x = Rng(13).tensor(20, 6, &device);
        let routing = modula::Router::route(&router, &x).unwrap();
        let cap = router.capacity(20); // ceil(1.5 · 20 / 3) = 10
        assert_eq!(cap, 10);
        assert_eq!(routing.tokens_per_module(), [cap, cap, cap]);
        // Each picked slot's weight is the token's softmax affinity for that expert.
        let y = moe.forward_routed(x.clone(), &routing).unwrap();
        assert_close(
            y,
            moe.forward_dense(x, &routing).unwrap(),
            1e-5,
            "expert choice sparse vs dense",
        );
    }
    // A hand-set case: 4 tokens, 2 experts, capacity 2 (factor 1).
    let device = Device::flex();
    let router = ExpertChoiceRouterConfig::new(2, 2)
        .with_capacity_factor(1.0)
        .init(&device)
        .unwrap();
    let logits = t2(vec![3.0, 0.0, 2.0, 0.0, 0.0, 1.0, 0.0, 4.0], 4, 2, &device);
    let r = router.route_logits(logits).unwrap();
    let idx: Vec<i64> = r.indices().into_data().iter::<i64>().collect();
    // Expert 0 prefers tokens 0 and 1, expert 1 tokens 3 and 2.
    assert_eq!(idx, [0, -1, 0, -1, -1, 1, -1, 1]);
    // A picked slot weighs the token's softmax affinity for that expert, an unpicked one 0:
    // softmax([3, 0])₀ = σ(3), softmax([0, 1])₁ = σ(1), and so on.
    let sig = |z: f64| 1.0 / (1.0 + (-z).exp());
    let want = [sig(3.0), 0.0, sig(2.0), 0.0, 0.0, sig(1.0), 0.0, sig(4.0)];
    let got = vals(r.weights());
    assert_eq!(got.len(), want.len());
    for (i, (got, want)) in got.iter().zip(want).enumerate() {
        close(*got, want, &format!("expert-choice weight {i}"));
    }
    assert!(
        ExpertChoiceRouterConfig::new(2, 2)
            .with_capacity_factor(0.0)
            .init(&device)
            .is_err()
    );
}

#[test]
fn hash_routing_is_balanced_fixed_and_checks_ids() {
    let device = Device::flex();
    let h = HashRouterConfig::new(100, 8).with_seed(42).init().unwrap();
    let ids: Vec<i64> = (0..100).collect();
    let r = h.route_ids(&ids, &device).unwrap();
    let counts = r.tokens_per_module();
    assert!(counts.iter().all(|&c| c == 12 || c == 13), "{counts:?}");
    // The same id always goes to the same expert, and the seed decides the table.
    assert_eq!(
        h.expert_of(17),
        HashRouterConfig::new(100, 8)
            .with_seed(42)
            .init()
            .unwrap()
            .expert_of(17)
    );
    let other = HashRouterConfig::new(100, 8).with_seed(43).init().unwrap();
    assert!((0..100).any(|i| h.expert_of(i) != other.expert_of(i)));
    for bad in [-1i64, 100] {
        let err = h.route_ids(&[3, bad], &device).unwrap_err();
        assert!(
            err.to_string()
                .contains("outside the hash router's vocabulary 0..100"),
            "{err}"
        );
    }
    assert!(HashRouterConfig::new(0, 8).with_seed(1).init().is_err());
}

#[test]
fn noisy_top_k_losses_by_hand() {
    use modula::NoisyTopKRouterConfig;
    let device = Device::flex();
    let router = NoisyTopKRouterConfig::new(4, 3)
        .with_k(1)
        .with_importance_coef(1.0)
        .with_load_coef(1.0)
        .init(&device)
        .unwrap();
    // One token, clean logits [1, 0, 0], noise scale 1, no noise drawn: expert 0 is kept.
    let clean = t2(vec![1.0, 0.0, 0.0], 1, 3, &device);
    let std = t2(vec![1.0; 3], 1, 3, &device);
    let r = router
        .route_parts(clean, std, t2(vec![0.0; 3], 1, 3, &device))
        .unwrap();
    let idx: Vec<i64> = r.indices().into_data().iter::<i64>().collect();
    assert_eq!(idx, [0]);
    close(vals(r.weights())[0], 1.0, "softmax over the one kept logit");
    // Importance [1, 0, 0]: mean 1/3, variance 2/9, CV² = 2.
    close(
        r.aux_loss("importance").unwrap().into_scalar::<f32>(),
        2.0,
        "importance CV²",
    );
    // Load: P(x,0) = Φ((1 − 0)/1) (threshold: the 2nd largest), P(x,1) = P(x,2) = Φ((0 − 1)/1).
    let (p_in, p_out) = (0.841_344_746_068_543, 0.158_655_253_931_457);
    let load = [p_in, p_out, p_out];
    let mean = load.iter().sum::<f64>() / 3.0;
    let var = load.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 3.0;
    close(
        r.aux_loss("load").unwrap().into_scalar::<f32>(),
        var / mean.powi(2),
        "load CV²",
    );
    // Sparse MoE with the noisy router equals the dense mixture under its routing.
    let moe = MoeLayerConfig::new(TopKRouterConfig::new(4, 3), ExpertConfig::new(4, 6))
        .init(&device)
        .unwrap();
    let noisy = NoisyTopKRouterConfig::new(4, 3)
        .with_k(2)
        .init(&device)
        .unwrap();
    let x = Rng(2).tensor(9, 4, &device);
    let routing = modula::Router::route(&noisy, &x).unwrap();
    let y = moe.forward_routed(x.clone(), &routing).unwrap();
    assert_close(
        y,
        moe.forward_dense(x, &routing).unwrap(),
        1e-5,
        "noisy top-k sparse vs dense",
    );
    assert!(
        NoisyTopKRouterConfig::new(4, 3)
            .with_k(4)
            .init(&device)
            .is_err()
    );
}

#[test]
fn mutual_information_loss_by_hand() {
    use modula::routers::losses::mutual_information_loss;
    let device = Device::flex();
    // Confident and balanced: p = one-hot per token, both experts used: MI = ln 2, loss −ln 2.
    let p = t2(vec![1.0, 0.0, 0.0, 1.0], 2, 2, &device);
    close(
        mutual_information_loss(p).into_scalar::<f32>(),
        -(2f64.ln()),
        "MI, one-hot balanced",
    );
    // Uniform per token: no information, loss 0.
    let p = t2(vec![0.5; 4], 2, 2, &device);
    close(
        mutual_information_loss(p).into_scalar::<f32>(),
        0.0,
        "MI, uniform",
    );
    // Collapsed onto one expert: loss 0 as well.
    let p = t2(vec![1.0, 0.0, 1.0, 0.0], 2, 2, &device);
    close(
        mutual_information_loss(p).into_scalar::<f32>(),
        0.0,
        "MI, collapsed",
    );
}

#[test]
fn soft_moe_matches_its_formula() {
    for device in devices() {
        device.seed(21);
        let layer = SoftMoeConfig::new(3, 2, ExpertConfig::new(5, 7))
            .init(&device)
            .unwrap();
        let x = Rng(22).tensor(11, 5, &device);
        let (dmat, cmat) = layer.weights(&x).unwrap();
        // D and C recomputed on the host from the logits X Φ: D is the softmax over tokens
        // (each slot's column), C the softmax over slots (each token's row).
        let (xs, phi) = (vals(x.clone()), vals(layer.phi.val()));
        let logits: Vec<f64> = (0..11 * 6)
            .map(|i| {
                let (t, s) = (i / 6, i % 6);
                (0..5)
                    .map(|j| f64::from(xs[t * 5 + j]) * f64::from(phi[j * 6 + s]))
                    .sum()
            })
            .collect();
        let (dv, cv) = (vals(dmat.clone()), vals(cmat.clone()));
        for t in 0..11 {
            for s in 0..6 {
                let col: f64 = (0..11).map(|u| logits[u * 6 + s].exp()).sum();
                let row: f64 = (0..6).map(|q| logits[t * 6 + q].exp()).sum();
                close(
                    dv[t * 6 + s],
                    logits[t * 6 + s].exp() / col,
                    "Soft MoE dispatch D",
                );
                close(
                    cv[t * 6 + s],
                    logits[t * 6 + s].exp() / row,
                    "Soft MoE combine C",
                );
            }
        }
        // D's columns (slots) and C's rows (tokens) are distributions.
        assert!(
            vals(dmat.clone().sum_dim(0))
                .iter()
                .all(|s| (s - 1.0).abs() < 1e-5)
        );
        assert!(
            vals(cmat.clone().sum_dim(1))
                .iter()
                .all(|s| (s - 1.0).abs() < 1e-5)
        );
        // By hand, slot by slot: y_t = Σ_s C[t, s] · expert_{s / p}(Σ_u D[u, s] x_u).
        let y = layer.forward(x.clone()).unwrap();
        let mut want = Tensor::<2>::zeros([11, 5], &device);
        for s in 0..6 {
            let ds = dmat.clone().slice([0..11, s..s + 1]);
            let slot_in = (x.clone() * ds).sum_dim(0);
            let slot_out = layer.experts[s / 2].forward_rows(slot_in);
            want = want + cmat.clone().slice([0..11, s..s + 1]) * slot_out;
        }
        assert_close(y, want, 1e-5, "Soft MoE");
        assert!(layer.forward(Tensor::zeros([2, 4], &device)).is_err());
    }
}

#[test]
fn swiglu_expert_computes_silu_gate_times_up() {
    use burn::tensor::activation::silu;
    for device in devices() {
        device.seed(31);
        let ex = ExpertConfig::new(6, 5)
            .with_kind(ExpertKind::SwiGlu)
            .init(&device)
            .unwrap();
        // Include large negative and positive pre-activations.
        let x = Rng(32).tensor(7, 6, &device).mul_scalar(40.0);
        let h = ex.w_in.forward(x.clone());
        let gate = h.clone().slice([0..7, 0..5]);
        let up = h.slice([0..7, 5..10]);
        let want = ex.w_out.forward(silu(gate) * up);
        let got = ex.forward_rows(x);
        assert!(vals(got.clone()).iter().all(|v| v.is_finite()));
        let scale = vals(want.clone())
            .iter()
            .fold(1.0f32, |m, v| m.max(v.abs()));
        assert_close(got, want, 1e-5 * scale, "SwiGLU vs burn's silu");
    }
}

#[test]
fn moe_layer_takes_any_router_that_reads_rows() {
    use modula::Router;
    for device in devices() {
        device.seed(13);
        let (d, e, t) = (6, 4, 10);
        let router = ExpertChoiceRouterConfig::new(d, e)
            .with_capacity_factor(1.0)
            .init(&device)
            .unwrap();
        let experts: Vec<_> = (0..e)
            .map(|_| ExpertConfig::new(d, 12).init(&device).unwrap())
            .collect();
        let moe = MoeLayer::with_router(router, experts).unwrap();
        let x = Tensor::<2>::random([t, d], Distribution::Default, &device);
        let (y, routing) = moe.forward(x.clone()).unwrap();
        // Expert choice: every expert processes exactly its capacity of tokens.
        let cap = moe.router.capacity(t);
        assert_eq!(routing.tokens_per_module(), vec![cap; e]);
        assert_eq!(routing.num_modules(), moe.router.num_modules());
        // The sparse layer equals every expert on every row, weighted densely.
        assert_close(
            y,
            moe.forward_dense(x, &routing).unwrap(),
            1e-5,
            "MoeLayer<ExpertChoiceRouter>",
        );
        // A router over another number of experts is refused.
        let three = ExpertChoiceRouterConfig::new(d, 3)
            .with_capacity_factor(1.0)
            .init(&device)
            .unwrap();
        let four: Vec<_> = (0..e)
            .map(|_| ExpertConfig::new(d, 12).init(&device).unwrap())
            .collect();
        assert!(matches!(
            MoeLayer::with_router(three, four),
            Err(Error::Shape { .. })
        ));
    }
}
