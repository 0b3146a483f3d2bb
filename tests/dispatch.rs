//! The one sparse dispatch: for random routings (with modules that receive no rows and dropped
//! slots), running each module on its own rows and scatter-adding must equal computing every
//! module on every row and weighting densely.

mod common;

use burn::tensor::{Device, Tensor};
use common::{Rng, assert_close, devices, vals};
use modula::prelude::*;
use modula::{WeightedMean, dispatch_modules};

/// A random LoRA "expert" of rank 3 with non-zero B.
fn expert(rng: &mut Rng, d_in: usize, d_out: usize, device: &Device) -> LoraAdapter {
    LoraAdapter::from_factors(
        rng.tensor(d_in, 3, device),
        rng.tensor(3, d_out, device),
        6.0,
        false,
        0.0,
    )
    .unwrap()
}

/// Host reference: `y = Σ_m R[:, m] f_m(x)` with every module computed on every row.
fn dense_reference(modules: &[LoraAdapter], x: Tensor<2>, dense: &[f32]) -> Vec<f32> {
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
    use modula::{LoraLinear, WeightedSum, dispatch_planned};
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
        let adapters: Vec<LoraAdapter> = (0..e)
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
