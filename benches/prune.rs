//! Criterion benchmarks of structured pruning on the decoder (the random d = 256, 4-layer
//! Llama of the decoder bench): a prefill of 4 × 64 tokens dense, with half of the heads and
//! neurons masked (the masked forward costs what the dense one does), and physically pruned;
//! and one Bonsai round's regression (200 masks over 96 units).

#[path = "common/decoder.rs"]
mod decoder;

use burn::tensor::{Device, Tensor, TensorData};
use criterion::{Criterion, criterion_group, criterion_main};
use modula::prune::{Prunable, lasso_cv};

fn bench_prune(c: &mut Criterion) {
    let device = Device::flex();
    let (model, ids) = decoder::model_and_prompts(&device);
    let groups = model.unit_groups();
    let keep: Vec<Vec<usize>> = groups.iter().map(|g| (0..g.units / 2).collect()).collect();
    let mut masked = model.clone();
    masked
        .set_unit_masks(Some(
            groups
                .iter()
                .map(|g| {
                    let m: Vec<f32> = (0..g.units)
                        .map(|u| if u < g.units / 2 { 1.0 } else { 0.0 })
                        .collect();
                    Tensor::from_data(TensorData::new(m, [g.units]), &device)
                })
                .collect(),
        ))
        .unwrap();
    let mut pruned = model.clone();
    pruned.prune_units(&keep).unwrap();
    let mut g = c.benchmark_group("prune");
    g.sample_size(10);
    g.bench_function("prefill_4x64_dense", |bench| {
        bench.iter(|| model.forward(ids.clone()).unwrap())
    });
    g.bench_function("prefill_4x64_half_masked", |bench| {
        bench.iter(|| masked.forward(ids.clone()).unwrap())
    });
    g.bench_function("prefill_4x64_half_pruned", |bench| {
        bench.iter(|| pruned.forward(ids.clone()).unwrap())
    });
    // A round's regression: 200 masks (100 antithetic pairs) over 96 candidate units.
    let mut state = 1u64;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let beta: Vec<f64> = (0..96).map(|_| next()).collect();
    let mut masks = Vec::new();
    for _ in 0..100 {
        let m: Vec<f64> = (0..96).map(|_| f64::from(next() < 0.5)).collect();
        masks.push(m.iter().map(|v| 1.0 - v).collect::<Vec<f64>>());
        masks.push(m);
    }
    let y: Vec<f64> = masks
        .iter()
        .map(|m| m.iter().zip(&beta).map(|(a, b)| a * b).sum::<f64>() + 0.01 * next())
        .collect();
    g.bench_function("lasso_cv_200_masks_96_units", |bench| {
        bench.iter(|| lasso_cv(&masks, &y, 5, 10).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench_prune);
criterion_main!(benches);
