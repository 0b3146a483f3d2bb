//! Criterion benchmarks of the library operations: Arrow prototypes (exact, from the thin
//! factors), PEFT-parity TIES and exact delta-space merging, MBC clustering, and a
//! mixed-adapter batch against a single adapter (Flex, f32).

use burn::tensor::{Device, Distribution, Tensor, TensorData};
use criterion::{Criterion, criterion_group, criterion_main};
use modula::LoraLinear;
use modula::library::{
    Combination, LoraExpert, LoraFactors, MbcConfig, MergeOptions, MergeSpace, arrow_prototypes,
    mbc_cluster, merge_experts,
};

fn factors(r: usize, d_in: usize, d_out: usize, seed: u64) -> LoraFactors {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    };
    let a: Vec<f64> = (0..r * d_in).map(|_| next()).collect();
    let b: Vec<f64> = (0..d_out * r).map(|_| next()).collect();
    LoraFactors::new(
        &TensorData::new(a, [r, d_in]),
        &TensorData::new(b, [d_out, r]),
        2.0,
    )
    .unwrap()
}

fn expert(layers: usize, r: usize, d: usize, seed: u64) -> LoraExpert {
    let mut e = LoraExpert::default();
    for l in 0..layers {
        e.layers.insert(
            format!("layers.{l}"),
            factors(r, d, d, seed * 100 + l as u64),
        );
    }
    e
}

fn bench_library(c: &mut Criterion) {
    let device = Device::flex();
    let mut g = c.benchmark_group("library");
    g.sample_size(10);

    let arrow_in: Vec<LoraFactors> = (0..64).map(|i| factors(8, 1024, 1024, i)).collect();
    let arrow_refs: Vec<&LoraFactors> = arrow_in.iter().collect();
    g.bench_function("arrow_prototypes_64_r8_d1024", |b| {
        b.iter(|| arrow_prototypes(&arrow_refs).unwrap())
    });

    let experts: Vec<LoraExpert> = (0..8).map(|i| expert(4, 16, 1024, i)).collect();
    let refs: Vec<&LoraExpert> = experts.iter().collect();
    let w = [0.125; 8];
    let ties = MergeOptions::new(Combination::Ties)
        .with_space(MergeSpace::Factor)
        .with_density(0.5);
    g.bench_function("ties_factor_8x_r16_4x1024", |b| {
        b.iter(|| merge_experts(&refs, &w, &ties).unwrap())
    });
    let svd = MergeOptions::new(Combination::Svd);
    g.bench_function("svd_exact_8x_r16_4x1024", |b| {
        b.iter(|| merge_experts(&refs, &w, &svd).unwrap())
    });

    let lib: Vec<LoraExpert> = (0..64).map(|i| expert(2, 4, 512, i)).collect();
    let lib_refs: Vec<&LoraExpert> = lib.iter().collect();
    g.bench_function("mbc_64_experts_k8", |b| {
        b.iter(|| mbc_cluster(&lib_refs, &MbcConfig::new(8), &device).unwrap())
    });

    let mut layer = LoraLinear::new(burn::nn::LinearConfig::new(512, 512).init(&device));
    for i in 0..16 {
        layer
            .insert_adapter(
                &format!("a{i}"),
                factors(8, 512, 512, 900 + i).to_adapter(&device).unwrap(),
            )
            .unwrap();
    }
    let names: Vec<String> = (0..16).map(|i| format!("a{i}")).collect();
    let per_seq: Vec<Option<&str>> = (0..32).map(|s| Some(names[s % 16].as_str())).collect();
    let x = Tensor::<3>::random([32, 32, 512], Distribution::Default, &device);
    let mut single = layer.clone();
    single.set_active(&["a0"]).unwrap();
    single.set_forward_mode(modula::LoraForward::Thin);
    g.bench_function("single_adapter_thin_32x32x512", |b| {
        b.iter(|| {
            let y = single.forward(x.clone()).unwrap();
            device.sync().unwrap();
            y
        })
    });
    g.bench_function("mixed_16_adapters_32x32x512", |b| {
        b.iter(|| {
            let y = layer.forward_mixed_seqs(x.clone(), &per_seq).unwrap();
            device.sync().unwrap();
            y
        })
    });
    g.finish();
}

criterion_group!(benches, bench_library);
criterion_main!(benches);
