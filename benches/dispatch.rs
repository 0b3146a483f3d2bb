//! Criterion benchmarks of the sparse dispatch: top-2 of 8 LoRA experts against computing all
//! 8 experts on every row directly (the dense baseline), and all 8 through the dispatch (its
//! gather/scatter overhead) (Flex, f32).

use burn::tensor::{Device, Distribution, Tensor};
use criterion::{Criterion, criterion_group, criterion_main};
use modula::prelude::*;

fn bench_dispatch(c: &mut Criterion) {
    let device = Device::flex();
    let (d, rows, e, k) = (512, 2048, 8, 2);
    let experts: Vec<LoraModule> = (0..e)
        .map(|_| {
            let a = Tensor::<2>::random([d, 64], Distribution::Default, &device);
            let b = Tensor::<2>::random([64, d], Distribution::Default, &device);
            LoraModule::from_factors(a, b, 16.0, false, 0.0).unwrap()
        })
        .collect();
    let x = Tensor::<2>::random([rows, d], Distribution::Default, &device);
    let idx: Vec<Vec<i64>> = (0..rows)
        .map(|i| (0..k).map(|j| ((i * 7 + j * 3) % e) as i64).collect())
        .collect();
    let w: Vec<Vec<f32>> = (0..rows).map(|_| vec![0.5; k]).collect();
    let routing = Routing::from_rows(&idx, &w, e, &device).unwrap();
    let dense = Routing::from_dense(Tensor::<2>::ones([rows, e], &device)).unwrap();

    let mut g = c.benchmark_group("dispatch_8x_lora_r64_d512_2048rows");
    g.sample_size(10);
    g.bench_function("top2_sparse", |bch| {
        bch.iter(|| {
            let y = dispatch_modules(&experts, &routing, x.clone(), &WeightedSum).unwrap();
            device.sync().unwrap();
            y
        })
    });
    g.bench_function("all_experts_direct_sum", |bch| {
        bch.iter(|| {
            let mut y = experts[0].delta_forward(x.clone());
            for e in &experts[1..] {
                y = y + e.delta_forward(x.clone());
            }
            device.sync().unwrap();
            y
        })
    });
    g.bench_function("all_experts_through_dispatch", |bch| {
        bch.iter(|| {
            let y = dispatch_modules(&experts, &dense, x.clone(), &WeightedSum).unwrap();
            device.sync().unwrap();
            y
        })
    });
    g.bench_function("plan_only", |bch| {
        bch.iter(|| DispatchPlan::new(&routing).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench_dispatch);
criterion_main!(benches);
