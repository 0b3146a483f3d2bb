//! Criterion benchmarks of the reliability guards (issue 17): reading a 64 MB F32 tensor with
//! and without the non-finite scan, a crash-safe flushed write against a plain write of
//! 16 MB, and parsing and checking a 64 × 512 request batch.

use std::collections::BTreeMap;

use criterion::{Criterion, criterion_group, criterion_main};
use modula::HostTensor;
use modula::io::{NonFinitePolicy, atomic_write, set_non_finite_policy, write_safetensors};
use modula::request::{BatchLimits, BatchRequest};

fn bench_reliability(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("modula-bench-rel-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut g = c.benchmark_group("reliability");
    g.sample_size(10);

    let file = dir.join("w.safetensors");
    let n = 16 << 20;
    let mut t = BTreeMap::new();
    t.insert(
        "w".to_string(),
        HostTensor {
            shape: vec![n],
            data: (0..n).map(|i| (i as f32 * 0.001).sin()).collect(),
        },
    );
    write_safetensors(&file, &t, None).unwrap();
    let ckpt = modula::checkpoint::Checkpoint::open(&file).unwrap();
    for (label, policy) in [
        ("read_64mb_checked", NonFinitePolicy::Refuse),
        ("read_64mb_unchecked", NonFinitePolicy::Allow),
    ] {
        g.bench_function(label, |b| {
            set_non_finite_policy(policy);
            b.iter(|| ckpt.read("w").unwrap());
            set_non_finite_policy(NonFinitePolicy::Refuse);
        });
    }

    let bytes = vec![7u8; 16 << 20];
    let (safe, plain) = (dir.join("safe.bin"), dir.join("plain.bin"));
    g.bench_function("write_16mb_crash_safe", |b| {
        b.iter(|| atomic_write(&safe, &bytes).unwrap())
    });
    g.bench_function("write_16mb_plain", |b| {
        b.iter(|| std::fs::write(&plain, &bytes).unwrap())
    });

    let rows: Vec<String> = (0..64)
        .map(|r| {
            let ids: Vec<String> = (0..512)
                .map(|i| ((r * 31 + i) % 32000).to_string())
                .collect();
            format!("[{}]", ids.join(","))
        })
        .collect();
    let names = vec!["a".to_string(), "b".to_string()];
    let adapters: Vec<&str> = (0..64)
        .map(|r| if r % 2 == 0 { "\"a\"" } else { "null" })
        .collect();
    let json = format!(
        r#"{{"input_ids": [{}], "adapters": [{}]}}"#,
        rows.join(","),
        adapters.join(",")
    );
    let limits = BatchLimits {
        vocab: 32000,
        positions: 4096,
        adapters: &names,
        routed: false,
    };
    g.bench_function("request_64x512_parse_and_check", |b| {
        b.iter(|| {
            BatchRequest::from_json(&json)
                .unwrap()
                .check(&limits)
                .unwrap()
        })
    });
    g.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench_reliability);
criterion_main!(benches);
