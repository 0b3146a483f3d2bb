//! Criterion benchmarks of the continual-learning pieces: an LMC layer's forward with 1 and
//! 4 modules (each module's function and decoder run on every row), and the replay buffer.

use burn::tensor::{Device, Distribution, Tensor};
use criterion::{Criterion, criterion_group, criterion_main};
use modula::continual::{LmcConfig, LmcLayer, ReplayBuffer, ReplayPolicy};

fn bench_continual(c: &mut Criterion) {
    let device = Device::flex();
    let mut g = c.benchmark_group("continual");
    g.sample_size(10);
    let x = Tensor::<2>::random([1024, 256], Distribution::Default, &device);
    for m in [1, 4] {
        let mut layer = LmcLayer::new(256, 256, LmcConfig::default(), &device).unwrap();
        for _ in 1..m {
            layer.add_module(&device);
        }
        g.bench_function(format!("lmc_forward_{m}_modules_1024x256"), |b| {
            b.iter(|| {
                let y = layer.forward(x.clone()).unwrap();
                device.sync().unwrap();
                y
            })
        });
    }
    let feats: Vec<f32> = (0..10_000 * 64).map(|i| (i % 97) as f32).collect();
    let labels: Vec<usize> = (0..10_000).map(|i| i % 10).collect();
    g.bench_function("replay_add_10k_sample_256", |b| {
        b.iter(|| {
            let mut buf = ReplayBuffer::new(64, 50, ReplayPolicy::Reservoir, 1).unwrap();
            buf.add(&feats, &labels).unwrap();
            buf.sample_balanced(256)
        })
    });
    g.finish();
}

criterion_group!(benches, bench_continual);
criterion_main!(benches);
