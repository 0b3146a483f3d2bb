//! Criterion benchmarks of end-task-aware training: one training step of a shared MLP body
//! (64 → 128 → 64) with five objectives (batches of 32), weighted by fixed weights (MT-TARTAN)
//! and with META-TARTAN's weight update first (a gradient per objective on the body and the
//! dev gradient, their cosines); and one AANG sample of 8 objectives from a 4-stage space.

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Distribution, Tensor};
use criterion::{Criterion, criterion_group, criterion_main};
use modula::transfer::{ObjectiveSpace, Stage, TaskWeights, flat_gradient};

#[derive(Module, Debug)]
struct Body {
    l1: Linear,
    l2: Linear,
}

fn losses(body: &Body, heads: &[Linear], xs: &[Tensor<2>], ys: &[Tensor<2>]) -> Vec<Tensor<1>> {
    heads
        .iter()
        .zip(xs.iter().zip(ys))
        .map(|(h, (x, y))| {
            let z = relu(body.l2.forward(relu(body.l1.forward(x.clone()))));
            (h.forward(z) - y.clone()).powi_scalar(2).mean()
        })
        .collect()
}

fn bench_transfer(c: &mut Criterion) {
    let device = Device::flex().autodiff();
    device.seed(0);
    let body = Body {
        l1: LinearConfig::new(64, 128).init(&device),
        l2: LinearConfig::new(128, 64).init(&device),
    };
    let heads: Vec<Linear> = (0..6)
        .map(|_| LinearConfig::new(64, 10).init(&device))
        .collect();
    let xs: Vec<Tensor<2>> = (0..6)
        .map(|_| Tensor::random([32, 64], Distribution::Default, &device))
        .collect();
    let ys: Vec<Tensor<2>> = (0..6)
        .map(|_| Tensor::random([32, 10], Distribution::Default, &device))
        .collect();
    let mut g = c.benchmark_group("transfer");
    g.sample_size(20);
    g.bench_function("mt_tartan_step_5_objectives", |b| {
        let mut optim = AdamConfig::new().init();
        let mut body = body.clone();
        let weights = TaskWeights::equal(5);
        b.iter(|| {
            let l = losses(&body, &heads[..5], &xs[..5], &ys[..5]);
            let total = weights.combine(l).unwrap();
            let grads = GradientsParams::from_grads(total.backward(), &body);
            body = optim.step(1e-3, body.clone(), grads);
        })
    });
    g.bench_function("meta_tartan_step_5_objectives", |b| {
        let mut optim = AdamConfig::new().init();
        let mut body = body.clone();
        let mut weights = TaskWeights::equal(5);
        b.iter(|| {
            let dev = flat_gradient(
                losses(&body, &heads[5..], &xs[5..], &ys[5..]).remove(0),
                &body,
            );
            let grads: Vec<Vec<f64>> = losses(&body, &heads[..5], &xs[..5], &ys[..5])
                .into_iter()
                .map(|l| flat_gradient(l, &body))
                .collect();
            weights.meta_step(&grads, &dev, 0.1).unwrap();
            let l = losses(&body, &heads[..5], &xs[..5], &ys[..5]);
            let total = weights.combine(l).unwrap();
            let g = GradientsParams::from_grads(total.backward(), &body);
            body = optim.step(1e-3, body.clone(), g);
        })
    });
    let space = ObjectiveSpace::new(vec![
        Stage::new("input", &["task", "pool"]),
        Stage::new("transform", &["none", "rotate", "mask"]),
        Stage::new("representation", &["body"]),
        Stage::new(
            "output",
            &["digit", "coarse", "shuffled", "rotation", "pixels"],
        ),
    ])
    .unwrap();
    let mut step = 0u64;
    g.bench_function("aang_sample_8_of_30", |b| {
        b.iter(|| {
            step += 1;
            space.sample(8, step).unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, bench_transfer);
criterion_main!(benches);
