//! The one sparse dispatch: for random routings (with modules that receive no rows and dropped
//! slots), running each module on its own rows and scatter-adding must equal computing every
//! module on every row and weighting densely.

mod common;

use burn::tensor::{Device, Tensor};
use common::{Rng, assert_close, devices, vals};
use modula::prelude::*;
use modula::{WeightedMean, dispatch_modules, dispatch_planned};

/// A random LoRA "expert" of rank 3 with non-zero B.
fn expert(rng: &mut Rng, d_in: usize, d_out: usize, device: &Device) -> LoraModule {
    LoraModule::from_factors(
        rng.tensor(d_in, 3, device),
        rng.tensor(3, d_out, device),
        6.0,
        false,
        0.0,
    )
    .unwrap()
}

/// Host reference: `y = Σ_m R[:, m] f_m(x)` with every module computed on every row.
fn dense_reference(modules: &[LoraModule], x: Tensor<2>, dense: &[f32]) -> Vec<f32> {
    let [rows, _] = x.dims();
    let e = modules.len();
    let outs: Vec<Vec<f32>> = modules
        .iter()
        .map(|m| vals(m.forward_rows(x.clone())))
        .collect();
    let d_out = outs[0].len() / rows;
    let mut y = vec![0.0f32; rows * d_out];
    for i in 0..rows {
        for m in 0..e {
            let w = dense[i * e + m];
            for c in 0..d_out {
                y[i * d_out + c] += w * outs[m][i * d_out + c];
            }
        }
    }
    y
}

#[test]
fn sparse_dispatch_equals_dense_mixture() {
    for device in devices() {
        let mut rng = Rng(7);
        for case in 0..12 {
            let (rows, e, k) = (1 + rng.below(40), 1 + rng.below(7), 1 + rng.below(3));
            let (d_in, d_out) = (4 + rng.below(9), 3 + rng.below(6));
            let modules: Vec<_> = (0..e)
                .map(|_| expert(&mut rng, d_in, d_out, &device))
                .collect();
            // Only a random subset of modules is ever chosen, so some get no rows.
            let allowed: Vec<i64> = (0..e as i64).filter(|_| rng.uniform() < 0.6).collect();
            let mut idx = Vec::new();
            let mut w = Vec::new();
            let mut dense = vec![0.0f32; rows * e];
            for i in 0..rows {
                let (mut ri, mut rw) = (Vec::new(), Vec::new());
                for _ in 0..k {
                    let m = if allowed.is_empty() || rng.uniform() < 0.1 {
                        -1
                    } else {
                        allowed[rng.below(allowed.len())]
                    };
                    let wt = rng.uniform() * 2.0 - 0.5;
                    if m >= 0 {
                        dense[i * e + m as usize] += wt;
                    }
                    ri.push(m);
                    rw.push(wt);
                }
                idx.push(ri);
                w.push(rw);
            }
            let routing = Routing::from_rows(&idx, &w, e, &device).unwrap();
            let x = rng.tensor(rows, d_in, &device);
            let got = dispatch_modules(&modules, &routing, x.clone(), &WeightedSum).unwrap();
            let want = dense_reference(&modules, x.clone(), &dense);
            let want =
                Tensor::<2>::from_data(burn::tensor::TensorData::new(want, [rows, d_out]), &device);
            assert_close(
                got,
                want,
                1e-5,
                &format!("case {case} (rows {rows}, E {e}, k {k})"),
            );
            // The dense form is the host accumulation of the same routing.
            let dense_t = Tensor::<2>::from_data(
                burn::tensor::TensorData::new(dense.clone(), [rows, e]),
                &device,
            );
            assert_close(routing.to_dense(), dense_t, 1e-6, "Routing::to_dense");
            // Modules outside the allowed set received no rows.
            let plan = DispatchPlan::new(&routing).unwrap();
            for (m, n) in plan.rows_per_module().iter().enumerate() {
                if !allowed.contains(&(m as i64)) {
                    assert_eq!(*n, 0, "module {m} must get no rows");
                }
            }
        }
    }
}

#[test]
fn general_aggregator_path_matches_weighted_sum_definition() {
    for device in devices() {
        let mut rng = Rng(11);
        let (rows, e, d) = (9, 4, 5);
        let modules: Vec<_> = (0..e).map(|_| expert(&mut rng, d, d, &device)).collect();
        let idx: Vec<Vec<i64>> = (0..rows)
            .map(|i| vec![(i % e) as i64, ((i + 1) % e) as i64])
            .collect();
        let w: Vec<Vec<f32>> = (0..rows)
            .map(|i| vec![0.25 + i as f32 * 0.1, 0.5])
            .collect();
        let routing = Routing::from_rows(&idx, &w, e, &device).unwrap();
        let x = rng.tensor(rows, d, &device);
        let sum = dispatch_modules(&modules, &routing, x.clone(), &WeightedSum).unwrap();
        let mean = dispatch_modules(&modules, &routing, x, &WeightedMean).unwrap();
        // The weighted mean is the weighted sum divided by each row's weight total.
        let totals: Vec<f32> = w.iter().map(|r| r.iter().sum()).collect();
        let t = Tensor::<2>::from_data(burn::tensor::TensorData::new(totals, [rows, 1]), &device);
        assert_close(mean, sum / t, 1e-5, "WeightedMean via slots");
    }
}

#[test]
fn one_module_per_row_is_each_row_alone() {
    for device in devices() {
        let mut rng = Rng(3);
        let (rows, e, d) = (10, 3, 6);
        let modules: Vec<_> = (0..e).map(|_| expert(&mut rng, d, d, &device)).collect();
        let assign: Vec<i64> = (0..rows).map(|i| [2, 0, 2, 1, -1][i % 5]).collect();
        let x = rng.tensor(rows, d, &device);
        let router = FixedRouter {
            assignment: assign.clone(),
            modules: e,
        };
        let (y, routing) =
            modula::route_and_dispatch(&router, &WeightedSum, x.clone(), d, |m, xm| {
                Ok(modules[m].forward_rows(xm))
            })
            .unwrap();
        assert_eq!(routing.k(), 1);
        for (i, &m) in assign.iter().enumerate() {
            let row = x.clone().slice([i..i + 1, 0..d]);
            let yi = y.clone().slice([i..i + 1, 0..d]);
            let want = if m < 0 {
                row.zeros_like()
            } else {
                modules[m as usize].forward_rows(row)
            };
            assert_close(yi, want, 1e-5, &format!("row {i}"));
        }
    }
}

#[test]
fn gradients_flow_to_routing_weights_and_modules() {
    let device = Device::flex().autodiff();
    let mut rng = Rng(17);
    let (rows, e, d) = (8, 3, 5);
    let modules: Vec<_> = (0..e).map(|_| expert(&mut rng, d, d, &device)).collect();
    let idx: Vec<Vec<i64>> = (0..rows)
        .map(|i| vec![(i % e) as i64, ((i + 2) % e) as i64])
        .collect();
    let w0: Vec<f32> = (0..rows * 2).map(|i| 0.1 + 0.05 * i as f32).collect();
    let weights = Tensor::<2>::from_data(
        burn::tensor::TensorData::new(w0.clone(), [rows, 2]),
        &device,
    )
    .require_grad();
    let routing = Routing::new(
        Routing::from_rows(&idx, &vec![vec![0.0; 2]; rows], e, &device)
            .unwrap()
            .indices(),
        weights.clone(),
        e,
    )
    .unwrap();
    let x = rng.tensor(rows, d, &device);
    let y = dispatch_modules(&modules, &routing, x.clone(), &WeightedSum).unwrap();
    let grads = y.clone().sum().backward();
    // d(sum y)/d w_ij = sum_c f_{m_ij}(x_i)[c]: check against the modules' own outputs.
    let gw = vals(
        weights
            .grad(&grads)
            .expect("routing weights get a gradient"),
    );
    for i in 0..rows {
        for j in 0..2 {
            let m = idx[i][j] as usize;
            let row = x.clone().slice([i..i + 1, 0..d]);
            let want: f32 = vals(modules[m].forward_rows(row)).iter().sum();
            assert!(
                (gw[i * 2 + j] - want).abs() < 1e-4,
                "grad w[{i},{j}] {} vs {want}",
                gw[i * 2 + j]
            );
        }
    }
    for (m, module) in modules.iter().enumerate() {
        assert!(
            module.b.val().grad(&grads).is_some(),
            "module {m} B gets a gradient"
        );
    }
}

#[test]
fn one_plan_serves_every_layer_that_shares_the_routing() {
    use burn::nn::LinearConfig;
    use modula::LoraLinear;
    for device in devices() {
        device.seed(31);
        let mut rng = Rng(41);
        let (d, rows, e) = (12, 10, 4);
        // A 4-layer stack of LoRA layers, each with the same 4 adapter names.
        let layers: Vec<LoraLinear> = (0..4)
            .map(|_| {
                let mut l = LoraLinear::new(LinearConfig::new(d, d).init(&device));
                for i in 0..e {
                    l.insert_adapter(&format!("a{i}"), expert(&mut rng, d, d, &device))
                        .unwrap();
                }
                l
            })
            .collect();
        // One mixed-adapter routing for the whole batch: rows mix two adapters, one row none.
        let idx: Vec<Vec<i64>> = (0..rows)
            .map(|i| {
                if i == 3 {
                    vec![-1, -1]
                } else {
                    vec![(i % e) as i64, ((i + 1) % e) as i64]
                }
            })
            .collect();
        let w: Vec<Vec<f32>> = (0..rows)
            .map(|i| vec![0.7, 0.3 + 0.01 * i as f32])
            .collect();
        let routing = Routing::from_rows(&idx, &w, e, &device).unwrap();
        let x = rng.tensor(rows, d, &device);
        // Planned once, the plan passed to every layer.
        let plan = DispatchPlan::new(&routing).unwrap();
        let (mut once, mut per_layer) = (x.clone(), x.clone());
        for l in &layers {
            once = burn::tensor::activation::relu(l.forward_planned(once, &plan).unwrap());
            per_layer =
                burn::tensor::activation::relu(l.forward_routed(per_layer, &routing).unwrap());
        }
        assert_close(once, per_layer, 0.0, "one plan vs a plan per layer");
        // The same plan also drives the generic dispatch (and the weighted sum it computes
        // equals dispatching through the routing).
        let adapters: Vec<LoraModule> = (0..e)
            .map(|i| layers[0].adapter(&format!("a{i}")).unwrap().clone())
            .collect();
        assert_close(
            dispatch_planned(&adapters, &plan, x.clone(), &WeightedSum).unwrap(),
            dispatch_modules(&adapters, &routing, x.clone(), &WeightedSum).unwrap(),
            0.0,
            "dispatch_planned vs dispatch_modules",
        );
        // A plan over another number of modules is a shape error, not a panic.
        let three =
            Routing::from_rows(&vec![vec![0]; 10], &vec![vec![1.0]; 10], 3, &device).unwrap();
        let wrong = DispatchPlan::new(&three).unwrap();
        assert!(matches!(
            layers[0].forward_planned(x, &wrong),
            Err(modula::Error::Shape { .. })
        ));
    }
}

/// A random dense `[rows, e]` weight matrix and its top-k form with every module in every row.
fn dense_and_rows(
    rng: &mut Rng,
    rows: usize,
    e: usize,
) -> (Vec<f32>, Vec<Vec<i64>>, Vec<Vec<f32>>) {
    let dense: Vec<f32> = (0..rows * e).map(|_| rng.uniform() * 2.0 - 0.5).collect();
    let idx = (0..rows).map(|_| (0..e as i64).collect()).collect();
    let w = (0..rows)
        .map(|i| dense[i * e..(i + 1) * e].to_vec())
        .collect();
    (dense, idx, w)
}

#[test]
fn dense_plan_equals_the_row_plan_of_the_same_routing() {
    for device in devices() {
        let mut rng = Rng(17);
        let (rows, e, d) = (11, 4, 6);
        let modules: Vec<_> = (0..e).map(|_| expert(&mut rng, d, d, &device)).collect();
        let (dense, idx, w) = dense_and_rows(&mut rng, rows, e);
        let t = Tensor::<2>::from_data(burn::tensor::TensorData::new(dense, [rows, e]), &device);
        let by_dense = Routing::from_dense(t).unwrap();
        let by_rows = Routing::from_rows(&idx, &w, e, &device).unwrap();
        let (pd, pr) = (
            DispatchPlan::new(&by_dense).unwrap(),
            DispatchPlan::new(&by_rows).unwrap(),
        );
        assert!(pd.is_dense() && !pr.is_dense());
        assert_eq!(pd.rows_per_module(), pr.rows_per_module());
        assert_eq!(by_dense.tokens_per_module(), vec![rows; e]);
        let x = rng.tensor(rows, d, &device);
        for (name, agg) in [
            ("sum", &WeightedSum as &dyn Aggregator),
            ("mean", &WeightedMean),
        ] {
            assert_close(
                dispatch_planned(&modules, &pd, x.clone(), agg).unwrap(),
                dispatch_planned(&modules, &pr, x.clone(), agg).unwrap(),
                1e-5,
                &format!("dense vs rows plan ({name})"),
            );
        }
        // A LoRA layer computes its adapters as one grouped op (DispatchPlan::apply_grouped)
        // under either plan; both must equal the base plus the per-module closure dispatch.
        let base = burn::nn::LinearConfig::new(d, d).init(&device);
        let mut layer = modula::LoraLinear::new(base.clone());
        for (i, m) in modules.iter().enumerate() {
            layer.insert_adapter(&format!("a{i}"), m.clone()).unwrap();
        }
        let reference = base.forward(x.clone())
            + dispatch_planned(&modules, &pr, x.clone(), &WeightedSum).unwrap();
        for (name, plan) in [("dense", &pd), ("rows", &pr)] {
            assert_close(
                layer.forward_planned(x.clone(), plan).unwrap(),
                reference.clone(),
                1e-5,
                &format!("LoRA layer, grouped op under the {name} plan"),
            );
        }
        let f = |m: usize, xm: Tensor<2>| Ok(modules[m].forward_rows(xm));
        assert_close(
            pd.to_slots(pd.run(x.clone(), d, f).unwrap()),
            pr.to_slots(pr.run(x.clone(), d, f).unwrap()),
            1e-6,
            "to_slots",
        );
    }
}

#[test]
fn sequence_plan_equals_the_row_plan_of_its_expanded_routing() {
    use burn::nn::LinearConfig;
    use modula::LoraLinear;
    for device in devices() {
        let mut rng = Rng(23);
        let (seqs, len, e, d) = (5, 3, 3, 8);
        let modules: Vec<_> = (0..e).map(|_| expert(&mut rng, d, d, &device)).collect();
        // Two slots per sequence, some dropped.
        let idx: Vec<Vec<i64>> = (0..seqs)
            .map(|s| {
                vec![
                    (s % e) as i64,
                    if s == 2 { -1 } else { ((s + 2) % e) as i64 },
                ]
            })
            .collect();
        let w: Vec<Vec<f32>> = (0..seqs).map(|s| vec![0.6 + 0.1 * s as f32, 0.4]).collect();
        let per_seq = Routing::from_rows(&idx, &w, e, &device).unwrap();
        let rows_idx: Vec<Vec<i64>> = idx
            .iter()
            .flat_map(|r| std::iter::repeat_n(r.clone(), len))
            .collect();
        let rows_w: Vec<Vec<f32>> = w
            .iter()
            .flat_map(|r| std::iter::repeat_n(r.clone(), len))
            .collect();
        let per_row = Routing::from_rows(&rows_idx, &rows_w, e, &device).unwrap();
        let ps = DispatchPlan::per_sequence(&per_seq, len).unwrap();
        let pr = DispatchPlan::new(&per_row).unwrap();
        assert_eq!((ps.rows(), ps.units(), ps.rows_per_unit()), (15, 5, 3));
        assert_eq!(ps.rows_per_module(), pr.rows_per_module());
        let x = rng.tensor(seqs * len, d, &device);
        for (name, agg) in [
            ("sum", &WeightedSum as &dyn Aggregator),
            ("mean", &WeightedMean),
        ] {
            assert_close(
                dispatch_planned(&modules, &ps, x.clone(), agg).unwrap(),
                dispatch_planned(&modules, &pr, x.clone(), agg).unwrap(),
                1e-5,
                &format!("sequence vs row plan ({name})"),
            );
        }
        // A LoRA layer under a one-slot sequence plan gathers factors per sequence (one rank)
        // and must agree with the row plan; with mixed ranks it runs whole sequences per
        // adapter, and must agree too.
        for ranks in [[3, 3, 3], [2, 5, 3]] {
            let mut layer = LoraLinear::new(LinearConfig::new(d, d).init(&device));
            for (i, &r) in ranks.iter().enumerate() {
                let m = LoraModule::from_factors(
                    rng.tensor(d, r, &device),
                    rng.tensor(r, d, &device),
                    4.0,
                    false,
                    0.0,
                )
                .unwrap();
                layer.insert_adapter(&format!("a{i}"), m).unwrap();
            }
            // One slot per sequence with weights other than 1: the factor-gathering path must
            // weight each sequence's delta as the row plan does.
            let ids: Vec<i64> = vec![1, -1, 0, 2, 1];
            let ws: Vec<f32> = vec![0.3, 1.0, 2.0, -0.5, 0.7];
            let idx: Vec<Vec<i64>> = ids.iter().map(|&i| vec![i]).collect();
            let wts: Vec<Vec<f32>> = ws.iter().map(|&w| vec![w]).collect();
            let one = Routing::from_rows(&idx, &wts, e, &device).unwrap();
            let rows_idx: Vec<Vec<i64>> = idx
                .iter()
                .flat_map(|r| std::iter::repeat_n(r.clone(), len))
                .collect();
            let rows_w: Vec<Vec<f32>> = wts
                .iter()
                .flat_map(|r| std::iter::repeat_n(r.clone(), len))
                .collect();
            let one_rows = Routing::from_rows(&rows_idx, &rows_w, e, &device).unwrap();
            assert_close(
                layer
                    .forward_planned(x.clone(), &DispatchPlan::per_sequence(&one, len).unwrap())
                    .unwrap(),
                layer.forward_routed(x.clone(), &one_rows).unwrap(),
                1e-5,
                &format!("LoRA layer, ranks {ranks:?}"),
            );
        }
        // Rows that are not a whole number of sequences are a shape error.
        assert!(matches!(
            dispatch_planned(&modules, &ps, rng.tensor(14, d, &device), &WeightedSum),
            Err(modula::Error::Shape { .. })
        ));
        assert!(DispatchPlan::per_sequence(&per_seq, 0).is_err());
    }
}

#[test]
fn every_router_reads_its_own_input_kind() {
    use modula::{HashRouterConfig, PolytroponRouterConfig, RouterInput, TopKRouterConfig};
    let device = Device::flex();
    let hash = HashRouterConfig::new(50, 4).with_seed(9).init().unwrap();
    let ids = [3i64, 17, 49, 0];
    let via_trait = hash
        .route_input(RouterInput::TokenIds {
            ids: &ids,
            device: &device,
        })
        .unwrap();
    let want: Vec<i64> = ids
        .iter()
        .map(|&i| hash.expert_of(i).unwrap() as i64)
        .collect();
    assert_eq!(
        via_trait
            .indices()
            .into_data()
            .iter::<i64>()
            .collect::<Vec<_>>(),
        want
    );
    let x = Tensor::<2>::ones([4, 6], &device);
    assert!(matches!(
        hash.route(&x),
        Err(modula::Error::RouterInput { got: "rows", .. })
    ));
    assert!(matches!(
        hash.route_input(RouterInput::TokenIds {
            ids: &[50],
            device: &device
        }),
        Err(modula::Error::IdOutOfRange {
            id: 50,
            bound: 50,
            ..
        })
    ));

    let poly = PolytroponRouterConfig::new(3, 4).init(&device).unwrap();
    let tasks = [2usize, 0, 2];
    let r = poly
        .route_input(RouterInput::TaskIds {
            ids: &tasks,
            device: &device,
        })
        .unwrap();
    assert_close(
        r.to_dense(),
        poly.route_tasks(&tasks, false).unwrap().to_dense(),
        0.0,
        "Polytropon through the trait",
    );
    assert!(matches!(
        poly.route(&x),
        Err(modula::Error::RouterInput {
            router: "PolytroponRouter",
            ..
        })
    ));

    let fixed = FixedRouter::per_task(3);
    let r = fixed
        .route_input(RouterInput::TaskIds {
            ids: &tasks,
            device: &device,
        })
        .unwrap();
    assert_eq!(
        r.indices().into_data().iter::<i64>().collect::<Vec<_>>(),
        [2, 0, 2]
    );
    assert!(matches!(
        fixed.route_input(RouterInput::TaskIds {
            ids: &[3],
            device: &device
        }),
        Err(modula::Error::IdOutOfRange {
            id: 3,
            bound: 3,
            ..
        })
    ));

    let gate = TopKRouterConfig::new(6, 4).with_k(2).init(&device).unwrap();
    assert!(matches!(
        gate.route_input(RouterInput::TaskIds {
            ids: &tasks,
            device: &device
        }),
        Err(modula::Error::RouterInput {
            router: "TopKRouter",
            ..
        })
    ));
}

#[test]
fn adapter_fusion_is_an_aggregator_over_the_routed_outputs() {
    use modula::AdapterFusionConfig;
    for device in devices() {
        device.seed(5);
        let mut rng = Rng(29);
        let (rows, e, d) = (7, 3, 8);
        let modules: Vec<_> = (0..e).map(|_| expert(&mut rng, d, d, &device)).collect();
        let fusion = AdapterFusionConfig::new(d, d, 5)
            .with_temperature(0.7)
            .init(&device)
            .unwrap();
        let routing = Routing::from_dense(Tensor::<2>::ones([rows, e], &device)).unwrap();
        let x = rng.tensor(rows, d, &device);
        let got = dispatch_modules(&modules, &routing, x.clone(), &fusion).unwrap();
        let outs = Tensor::stack::<3>(
            modules.iter().map(|m| m.forward_rows(x.clone())).collect(),
            1,
        );
        let (want, attn) = fusion.fuse(x, outs).unwrap();
        assert_close(got, want, 1e-5, "AdapterFusion via the dispatch");
        // The attention is a distribution over the adapters.
        assert_close(
            attn.sum_dim(1),
            Tensor::<2>::ones([rows, 1], &device),
            1e-5,
            "attention rows",
        );
    }
}

/// A router whose gate is the fixed logits `theta` for the input `x = [1]`.
fn fixed_gate(theta: &[f32], device: &Device) -> burn::nn::Linear {
    let mut g = burn::nn::LinearConfig::new(1, theta.len())
        .with_bias(false)
        .init(device);
    g.weight = burn::module::Param::from_tensor(
        Tensor::<1>::from_floats(theta, device).reshape([1, theta.len()]),
    );
    g
}

fn softmax_host(theta: &[f32]) -> Vec<f64> {
    let m = theta.iter().fold(f32::MIN, |a, &b| a.max(b));
    let e: Vec<f64> = theta.iter().map(|&t| f64::from(t - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

/// REINFORCE on a toy objective (reward `c_a` for choosing module `a`): over 20 000 sampled
/// rows the choices follow softmax(θ), and the autodiff gradient of the surrogate loss, with a
/// fixed baseline, is within 3σ of the exact `∇_θ E[r] = π ⊙ (c − π·c)`.
#[test]
fn reinforce_estimator_is_unbiased_on_a_toy_objective() {
    use modula::routers::{ReinforceRouter, reinforce_loss};
    let device = Device::flex().autodiff();
    let theta = [0.5f32, -0.3, 0.1];
    let c = [1.0f32, 3.0, -2.0];
    let mut router = ReinforceRouter::new(1, 3, 1.0, &device).unwrap();
    router.gate = fixed_gate(&theta, &device);
    let n = 20_000;
    let x = Tensor::<2>::ones([n, 1], &device);
    let s = router.sample(&x).unwrap();
    let actions: Vec<i64> = s.actions.clone().into_data().iter::<i64>().collect();
    let rewards: Vec<f32> = actions.iter().map(|&a| c[a as usize]).collect();
    let b = 0.7;
    let loss = reinforce_loss(s.log_prob, &rewards, b).unwrap();
    let est: Vec<f64> = modula::transfer::tartan::flat_gradient(loss, &router)
        .iter()
        .map(|g| -g)
        .collect();
    let pi = softmax_host(&theta);
    let mean_c: f64 = pi.iter().zip(&c).map(|(p, &c)| p * f64::from(c)).sum();
    for j in 0..3 {
        let exact = pi[j] * (f64::from(c[j]) - mean_c);
        let per_row: Vec<f64> = actions
            .iter()
            .map(|&a| {
                let e = if a as usize == j { 1.0 } else { 0.0 };
                (f64::from(c[a as usize]) - b) * (e - pi[j])
            })
            .collect();
        let mean = per_row.iter().sum::<f64>() / n as f64;
        let sd = (per_row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt();
        assert!(
            (est[j] - mean).abs() < 1e-4,
            "autodiff {} vs rows {mean}",
            est[j]
        );
        let z = (mean - exact) / (sd / (n as f64).sqrt());
        assert!(
            z.abs() < 3.0,
            "component {j}: estimate {mean}, exact {exact}, z = {z}"
        );
        let freq = actions.iter().filter(|&&a| a as usize == j).count() as f64 / n as f64;
        let z = (freq - pi[j]) / (pi[j] * (1.0 - pi[j]) / n as f64).sqrt();
        assert!(z.abs() < 3.0, "choice {j}: {freq} vs {} (z = {z})", pi[j]);
    }
    // Out of training the choice is the argmax.
    router.set_training(false);
    let s = router.sample(&x.slice([0..4, 0..1])).unwrap();
    assert_eq!(
        s.actions.into_data().iter::<i64>().collect::<Vec<_>>(),
        [0; 4]
    );
}

/// REINFORCE with a moving-average baseline learns a context-dependent hard routing: rows
/// `+e₁` are rewarded for module 0 and rows `−e₁` for module 2; after training the greedy
/// choice is right for both, and only the chosen module computes in the dispatch.
#[test]
fn reinforce_learns_a_hard_routing() {
    use burn::optim::{AdamConfig, GradientsParams};
    use modula::routers::{ReinforceRouter, RewardBaseline, reinforce_loss};
    let device = Device::flex().autodiff();
    let mut router = ReinforceRouter::new(2, 3, 1.0, &device).unwrap();
    let mut baseline = RewardBaseline::new(0.9).unwrap();
    let mut optim = AdamConfig::new().init();
    let x = Tensor::<2>::from_floats([[1.0, 0.0], [-1.0, 0.0]], &device).repeat_dim(0, 16);
    let want = |row: usize| if row.is_multiple_of(2) { 0 } else { 2 };
    for _ in 0..150 {
        let s = router.sample(&x).unwrap();
        let acts: Vec<i64> = s.actions.clone().into_data().iter::<i64>().collect();
        let r: Vec<f32> = acts
            .iter()
            .enumerate()
            .map(|(i, &a)| if a == want(i) { 1.0 } else { 0.0 })
            .collect();
        let loss = reinforce_loss(s.log_prob, &r, baseline.value).unwrap();
        baseline.update(&r);
        let grads = GradientsParams::from_grads(loss.backward(), &router);
        router = optim.step(0.1, router, grads);
    }
    router.set_training(false);
    let s = router.sample(&x.clone().slice([0..2, 0..2])).unwrap();
    assert_eq!(
        s.actions.into_data().iter::<i64>().collect::<Vec<_>>(),
        [0, 2]
    );
    assert!(
        baseline.value > 0.8,
        "mean reward at the end {}",
        baseline.value
    );
    // The routing goes through the one dispatch: each row gets its module's output alone.
    let mut rng = Rng(3);
    let modules: Vec<LoraModule> = (0..3).map(|_| expert(&mut rng, 2, 3, &device)).collect();
    let y = dispatch_modules(
        &modules,
        &s.routing,
        x.clone().slice([0..2, 0..2]),
        &WeightedSum,
    )
    .unwrap();
    let y0 = modules[0].forward_rows(x.clone().slice([0..1, 0..2]));
    let y2 = modules[2].forward_rows(x.slice([1..2, 0..2]));
    assert_close(y, Tensor::cat(vec![y0, y2], 0), 1e-6, "dispatched rows");
}

/// Gumbel straight-through: in training the choices follow softmax(logits) (Gumbel-max), the
/// forward weight is exactly 1, and the gradient reaches the gate: through the chosen slot
/// (sparse), or through every logit with `dense_gradient`; bad settings and inputs are errors.
#[test]
fn gumbel_straight_through_routes_hard_and_passes_gradients() {
    use modula::routers::GumbelRouter;
    let device = Device::flex().autodiff();
    let theta = [1.0f32, 0.0, -0.5];
    let mut router = GumbelRouter::new(1, 3, 0.5, &device).unwrap();
    router.gate = fixed_gate(&theta, &device);
    let n = 20_000;
    let routing = router.route(&Tensor::<2>::ones([n, 1], &device)).unwrap();
    let pi = softmax_host(&theta);
    let idx: Vec<i64> = routing.indices().into_data().iter::<i64>().collect();
    let w: Vec<f32> = routing.weights().into_data().iter::<f32>().collect();
    assert_eq!(idx.len(), n, "one module per row");
    assert!(w.iter().all(|&w| w == 1.0), "hard weights");
    for (j, p) in pi.iter().enumerate() {
        let freq = idx.iter().filter(|&&a| a == j as i64).count() as f64 / n as f64;
        let z = (freq - p) / (p * (1.0 - p) / n as f64).sqrt();
        assert!(z.abs() < 3.0, "choice {j}: {freq} vs {p} (z = {z})");
    }
    let mut rng = Rng(5);
    let modules: Vec<LoraModule> = (0..3).map(|_| expert(&mut rng, 1, 4, &device)).collect();
    for dense in [false, true] {
        router.dense_gradient = dense;
        let x = Tensor::<2>::ones([64, 1], &device);
        let routing = router.route(&x).unwrap();
        let y = dispatch_modules(&modules, &routing, x, &WeightedSum).unwrap();
        let g =
            modula::transfer::tartan::flat_gradient(y.powf_scalar(2.0).sum().reshape([1]), &router);
        assert!(g.iter().all(|v| v.is_finite()), "{g:?}");
        let reached = g.iter().filter(|v| v.abs() > 1e-9).count();
        assert!(reached >= 2, "dense = {dense}: gradient {g:?}");
    }
    assert!(GumbelRouter::new(1, 3, 0.0, &device).is_err());
    assert!(router.route(&Tensor::<2>::ones([2, 2], &device)).is_err());
    let nan = Tensor::<2>::from_floats([[f32::NAN, 0.0, 0.0]], &device);
    assert!(router.route_logits(nan).is_err());
    let r = modula::routers::ReinforceRouter::new(1, 3, 1.0, &device).unwrap();
    let s = r.sample(&Tensor::<2>::ones([2, 1], &device)).unwrap();
    assert!(modula::routers::reinforce_loss(s.log_prob.clone(), &[1.0], 0.0).is_err());
    assert!(modula::routers::reinforce_loss(s.log_prob, &[1.0, f32::NAN], 0.0).is_err());
    assert!(modula::routers::RewardBaseline::new(1.0).is_err());
    assert!(modula::routers::ReinforceRouter::new(0, 3, 1.0, &device).is_err());
}
