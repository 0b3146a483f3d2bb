//! Criterion benchmarks of end-task-aware training: one training step of a shared MLP body
//! (64 → 128 → 64) with five objectives (batches of 32), weighted by fixed weights (MT-TARTAN)
//! and with META-TARTAN's weight update first (a gradient per objective on the body and the
//! dev gradient, their cosines); and one AANG sample of 8 objectives from a 4-stage space.

#[path = "../examples/common/tartan_step.rs"]
mod tartan_step;

use burn::tensor::Device;
use criterion::{Criterion, criterion_group, criterion_main};
use modula::transfer::{ObjectiveSpace, Stage};
use tartan_step::Setup;

fn bench_transfer(c: &mut Criterion) {
    let device = Device::flex().autodiff();
    let mut g = c.benchmark_group("transfer");
    g.sample_size(20);
    for (name, meta) in [
        ("mt_tartan_step_5_objectives", false),
        ("meta_tartan_step_5_objectives", true),
    ] {
        let mut setup = Setup::new(&device);
        g.bench_function(name, |b| b.iter(|| setup.step(meta).unwrap()));
    }
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
