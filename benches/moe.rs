//! Criterion benchmarks of the MoE layer: top-2 of 8 SwiGLU experts through the sparse
//! dispatch (one grouped op for all experts) against the same dispatch with one burn op chain
//! per expert, and against every expert on every row (Flex, f32).

use burn::module::Module;
use burn::tensor::{Device, Distribution, Tensor};
use criterion::{Criterion, criterion_group, criterion_main};
use modula::{ComputeModule, DispatchPlan, MoeLayerConfig, WeightedSum};
use modula::{ExpertConfig, TopKRouterConfig};

fn bench_moe(c: &mut Criterion) {
    let device = Device::flex();
    let (d, d_ff, tokens) = (512, 1024, 2048);
    let moe = MoeLayerConfig::new(
        TopKRouterConfig::new(d, 8).with_k(2),
        ExpertConfig::new(d, d_ff),
    )
    .init(&device)
    .unwrap()
    .no_grad();
    let x = Tensor::<2>::random([tokens, d], Distribution::Default, &device);
    let (_, routing) = moe.forward(x.clone()).unwrap();

    let mut g = c.benchmark_group("moe_e8_top2_swiglu_d512_ff1024_2048tok");
    g.sample_size(10);
    g.bench_function("sparse_top2", |b| {
        b.iter(|| {
            let y = moe.forward(x.clone()).unwrap();
            device.sync().unwrap();
            y
        })
    });
    let plan = DispatchPlan::new(&routing).unwrap();
    g.bench_function("sparse_top2_grouped_routed", |b| {
        b.iter(|| {
            let y = moe.forward_planned(x.clone(), &plan).unwrap();
            device.sync().unwrap();
            y
        })
    });
    g.bench_function("sparse_top2_per_expert_ops_routed", |b| {
        b.iter(|| {
            let y = plan
                .apply(x.clone(), d, &WeightedSum, |m, xm| {
                    Ok(moe.experts[m].forward_rows(xm))
                })
                .unwrap();
            device.sync().unwrap();
            y
        })
    });
    g.bench_function("dense_all_experts", |b| {
        b.iter(|| {
            let y = moe.forward_dense(x.clone(), &routing).unwrap();
            device.sync().unwrap();
            y
        })
    });
    g.finish();
}

criterion_group!(benches, bench_moe);
criterion_main!(benches);
