//! Criterion benchmarks of LoRA layers against the plain Linear they adapt (Flex, f32).

use burn::module::Module;
use burn::nn::LinearConfig;
use burn::tensor::{Device, Distribution, Tensor};
use criterion::{Criterion, criterion_group, criterion_main};
use modula::prelude::*;

fn bench_lora(c: &mut Criterion) {
    let device = Device::flex();
    let (d, tokens) = (1024, 1024);
    let linear = LinearConfig::new(d, d).init(&device).no_grad();
    let x = Tensor::<2>::random([tokens, d], Distribution::Default, &device);
    let mut lora = LoraLinear::new(linear.clone());
    let a = Tensor::<2>::random([d, 8], Distribution::Default, &device);
    let b = Tensor::<2>::random([8, d], Distribution::Default, &device);
    lora.insert_adapter(
        "r8",
        LoraModule::from_factors(a, b, 16.0, false, 0.0).unwrap(),
    )
    .unwrap();
    let mut merged = lora.clone();
    merged.merge("r8").unwrap();
    let sync = || device.sync().unwrap();

    let mut g = c.benchmark_group("lora_1024x1024_1024tok");
    g.sample_size(20);
    g.bench_function("linear_fwd", |bch| {
        bch.iter(|| {
            let y = linear.forward(x.clone());
            sync();
            y
        })
    });
    g.bench_function("lora_r8_fwd", |bch| {
        bch.iter(|| {
            let y = lora.forward(x.clone()).unwrap();
            sync();
            y
        })
    });
    g.bench_function("lora_r8_merged_fwd", |bch| {
        bch.iter(|| {
            let y = merged.forward(x.clone()).unwrap();
            sync();
            y
        })
    });
    g.bench_function("lora_r8_merge_unmerge", |bch| {
        bch.iter(|| {
            let mut l = lora.clone();
            l.merge("r8").unwrap();
            l.unmerge("r8").unwrap();
            sync();
            l
        })
    });
    g.finish();
}

criterion_group!(benches, bench_lora);
criterion_main!(benches);
