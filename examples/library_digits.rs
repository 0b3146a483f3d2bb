//! The flagship example: build a library of LoRA experts and reuse it (Ostapenko et al. 2024,
//! arXiv 2405.11157), on the UCI digits shipped in data/.
//!
//! 1. Pre-train a small base network (64 → 64 → 64 → 10 MLP) on upright digits.
//! 2. A family of related tasks: digits rotated by 0°, 90°, 180° or 270°, each task seeing one
//!    of three shards of the training images: 12 tasks. Train a rank-8 LoRA expert on both
//!    hidden layers for each task (base and head frozen, one initialisation for all) and store
//!    them in an expert library folder (JSON index + PEFT folders).
//! 3. Cluster the library with MBC (parameters only, no data) and compare the clusters with the
//!    rotations.
//! 4. Evaluate on the held-out test images of each rotation, which no expert saw, without
//!    telling the model the rotation: the base, the uniform merge µ of all experts, Arrow
//!    routing over the library (per token and layer), Arrow over the MBC cluster merges, and
//!    the oracle (the best single expert for each rotation: an upper bound that zero-shot
//!    routing cannot use).
//!
//! Protocol: 15 % of the training images are a validation slice that neither the base nor any
//! expert trains on. Arrow's top-k (over the library and over the cluster merges) and the
//! oracle's expert are chosen on it, never on the test images. Everything runs for 3 seeds
//! (data order, initialisations) and the table gives test mean ± sd.
//!
//! Run: `cargo run --release --features wgpu,cli --example library_digits` (a few seconds after
//! the build). It prints the table and writes it to docs/library_digits.md.

#[path = "common/alloc.rs"]
mod alloc;

use std::fmt::Write as _;
use std::path::PathBuf;

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use modula::LoraMix;
use modula::library::{
    ArrowLinear, Combination, LoraExpert, MbcConfig, MergeOptions, mbc_cluster, merge_experts,
};
use modula::store::{ExpertInfo, ExpertLibrary};
use modula::{LoraConfig, LoraLinear, PeftLora};

#[path = "common/digits.rs"]
mod digits;
use digits::{CLASSES, PIXELS, Splits, batch, load_digits, mean_sd, pm, rotate, shuffle};

/// Seeds of the runs the table averages.
const SEEDS: [u64; 3] = [0, 1, 2];
/// Arrow top-k candidates, chosen on the validation slice.
const TOP_K: [usize; 3] = [1, 2, 3];

const RANK: usize = 8;
const EPOCHS: usize = 30;
const LR: f64 = 3e-3;

/// The adapted layers (the classifier head stays the pre-trained one).
const LAYERS: [&str; 2] = ["l1", "l2"];
const ROTATIONS: [usize; 4] = [0, 1, 2, 3];
/// Each task sees one of these shards of the training images (all ten digits).
const SHARDS: [&str; 3] = ["a", "b", "c"];

#[derive(Module, Debug)]
struct Mlp {
    l1: Linear,
    l2: Linear,
    head: Linear,
}

#[derive(Module, Debug)]
struct Net {
    l1: LoraLinear,
    l2: LoraLinear,
    head: LoraLinear,
}

impl Net {
    fn from_mlp(m: Mlp) -> Self {
        Self {
            l1: LoraLinear::new(m.l1),
            l2: LoraLinear::new(m.l2),
            head: LoraLinear::new(m.head),
        }
    }

    fn layers_mut(&mut self) -> [&mut LoraLinear; 2] {
        [&mut self.l1, &mut self.l2]
    }

    fn forward(&self, x: Tensor<2>) -> modula::Result<Tensor<2>> {
        let h = relu(self.l1.forward(x)?);
        let h = relu(self.l2.forward(h)?);
        self.head.forward(h)
    }

    /// A copy with `expert` attached (and active) on every layer.
    fn with_expert(&self, expert: &LoraExpert, device: &Device) -> modula::Result<Net> {
        let mut n = self.clone();
        for (name, layer) in LAYERS.iter().zip(n.layers_mut()) {
            layer.insert_adapter("e", expert.layer(name)?.to_adapter(device)?)?;
        }
        Ok(n)
    }
}

/// Every linear layer routed by Arrow over a set of experts.
struct ArrowNet {
    layers: Vec<ArrowLinear>,
    head: Linear,
}

impl ArrowNet {
    fn new(
        base: &Net,
        experts: &[&LoraExpert],
        top_k: usize,
        device: &Device,
    ) -> modula::Result<Self> {
        let bases = [&base.l1, &base.l2];
        let mut layers = Vec::new();
        for (name, b) in LAYERS.iter().zip(bases) {
            let adapters = experts
                .iter()
                .map(|e| e.layer(name)?.to_adapter(device))
                .collect::<modula::Result<Vec<_>>>()?;
            layers.push(ArrowLinear::new(
                b.base.clone(),
                adapters,
                top_k,
                1.0,
                LoraMix::Output,
            )?);
        }
        Ok(Self {
            layers,
            head: base.head.base.clone(),
        })
    }

    fn forward(&self, x: Tensor<2>) -> modula::Result<Tensor<2>> {
        let h = relu(self.layers[0].forward(x)?);
        let h = relu(self.layers[1].forward(h)?);
        Ok(self.head.forward(h))
    }
}

/// What one seed's run measured.
struct Run {
    /// Per rotation: test accuracy of base, µ, Arrow, Arrow over clusters, oracle.
    test: Vec<[f64; 5]>,
    /// The same on the validation slice (Arrow and oracle at their chosen settings).
    val: Vec<[f64; 5]>,
    /// Top-k chosen on validation: over the library, over the cluster merges.
    k: (usize, usize),
    /// The oracle's expert per rotation, chosen on validation.
    oracle: Vec<String>,
    /// Clusters that hold a single rotation, and the clusters by expert name.
    pure: usize,
    clusters: Vec<Vec<String>>,
}

/// Index of the largest value (first on ties).
fn argmax(v: &[f64]) -> usize {
    (0..v.len()).fold(0, |best, i| if v[i] > v[best] { i } else { best })
}

fn accuracy(logits: Tensor<2>, y: &[i64]) -> f64 {
    let pred: Vec<i64> = logits.argmax(1).into_data().iter::<i64>().collect();
    let ok = pred.iter().zip(y).filter(|(p, t)| p == t).count();
    100.0 * ok as f64 / y.len() as f64
}

fn bar(len: u64, what: &str) -> Result<ProgressBar, Box<dyn std::error::Error>> {
    let b = ProgressBar::new(len);
    b.set_style(ProgressStyle::with_template(&format!(
        "{what:>12} {{bar:40}} {{pos}}/{{len}} {{msg}}"
    ))?);
    Ok(b)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (x, y) = load_digits()?;
    let splits = Splits::new(y.len(), 7, 0.15);
    println!("digits: {}", splits.summary());
    let (train, val, test) = (&splits.train, &splits.val, &splits.test);
    let rotated: Vec<Vec<f32>> = ROTATIONS.iter().map(|&q| rotate(&x, q)).collect();
    let mut runs = Vec::new();
    for &seed in &SEEDS {
        runs.push(run(seed, &rotated, &x, &y, train, val, test)?);
    }
    let n_experts = ROTATIONS.len() * SHARDS.len();

    let mut report = String::new();
    writeln!(report, "# A library of LoRA experts on UCI digits")?;
    writeln!(report)?;
    writeln!(
        report,
        "Generated by `cargo run --release --features wgpu,cli --example library_digits`: a 64→64→64→10 MLP pre-trained on upright digits; {n_experts} rank-{RANK} LoRA experts on both hidden layers, one per (rotation, training shard). Each row is the held-out test set ({} images, seen by no expert) under one rotation; no method is told the rotation except the oracle, which uses the best single expert for that rotation.",
        test.len()
    )?;
    writeln!(report)?;
    writeln!(
        report,
        "Protocol: {} training and {} validation images; Arrow's top-k (from {TOP_K:?}) and the oracle's expert are chosen on the validation slice, never on the test images. Test accuracy in %, mean ± sd over seeds {SEEDS:?} (data order and initialisations).",
        train.len(),
        val.len()
    )?;
    writeln!(report)?;
    let ks = |f: &dyn Fn(&Run) -> usize| {
        runs.iter()
            .map(|r| f(r).to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    writeln!(
        report,
        "| held-out test set | base | uniform merge µ | Arrow top-k over {n_experts} experts (k = {}) | Arrow top-k over MBC cluster merges (k = {}) | oracle expert |",
        ks(&|r| r.k.0),
        ks(&|r| r.k.1)
    )?;
    writeln!(report, "|---|---|---|---|---|---|")?;
    let column = |rot: Option<usize>, m: usize| -> Vec<f64> {
        runs.iter()
            .map(|r| match rot {
                Some(i) => r.test[i][m],
                None => r.test.iter().map(|row| row[m]).sum::<f64>() / r.test.len() as f64,
            })
            .collect()
    };
    for (i, &r) in ROTATIONS.iter().enumerate() {
        let cells: Vec<String> = (0..5).map(|m| pm(&column(Some(i), m))).collect();
        let oracle: Vec<&str> = runs.iter().map(|run| run.oracle[i].as_str()).collect();
        writeln!(
            report,
            "| rotated {}° | {} | {} | {} | {} | {} ({}) |",
            90 * r,
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            cells[4],
            oracle.join(", ")
        )?;
    }
    let means: Vec<String> = (0..5).map(|m| pm(&column(None, m))).collect();
    writeln!(report, "| **mean** | {} |", means.join(" | "))?;
    let val_mean = |m: usize| {
        mean_sd(
            &runs
                .iter()
                .map(|r| r.val.iter().map(|row| row[m]).sum::<f64>() / r.val.len() as f64)
                .collect::<Vec<_>>(),
        )
        .0
    };
    writeln!(
        report,
        "| *validation mean* | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
        val_mean(0),
        val_mean(1),
        val_mean(2),
        val_mean(3),
        val_mean(4)
    )?;
    writeln!(report)?;
    let pure: Vec<String> = runs
        .iter()
        .map(|r| format!("{}/{}", r.pure, r.clusters.len()))
        .collect();
    writeln!(
        report,
        "MBC (k = {}, sparsity 0.5, parameters only): clusters that contain a single rotation, per seed: {}. The clusters of seed {}:",
        ROTATIONS.len(),
        pure.join(", "),
        SEEDS[0]
    )?;
    for (i, c) in runs[0].clusters.iter().enumerate() {
        writeln!(report, "- cluster {i}: {}", c.join(", "))?;
    }
    print!("{report}");
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/library_digits.md");
    modula::io::atomic_write(&out, report.as_bytes())?;
    println!("table written to {}", out.display());
    Ok(())
}

/// One seed: pre-train, build and cluster the library, choose on validation, test.
fn run(
    seed: u64,
    rotated: &[Vec<f32>],
    x: &[f32],
    y: &[i64],
    train: &[usize],
    val: &[usize],
    test: &[usize],
) -> Result<Run, Box<dyn std::error::Error>> {
    let mut rng = 7u64.wrapping_add(seed.wrapping_mul(0x9E37_79B9));
    let ad = Device::flex().autodiff();
    ad.seed(seed * 1000);
    let ce = CrossEntropyLossConfig::new().init(&ad);

    // 1. Pre-train the base on upright digits.
    let mut mlp = Mlp {
        l1: LinearConfig::new(PIXELS, 64).init(&ad),
        l2: LinearConfig::new(64, 64).init(&ad),
        head: LinearConfig::new(64, CLASSES).init(&ad),
    };
    let mut optim = AdamConfig::new().init();
    let epochs = 30;
    let pb = bar(epochs, &format!("{seed}: pre-train"))?;
    let mut rows = train.to_vec();
    for _ in 0..epochs {
        shuffle(&mut rows, &mut rng);
        for chunk in rows.chunks(64) {
            let (xb, yb) = batch(x, y, chunk, &ad);
            let h = relu(mlp.l2.forward(relu(mlp.l1.forward(xb))));
            let loss = ce.forward(mlp.head.forward(h), yb);
            let grads = GradientsParams::from_grads(loss.backward(), &mlp);
            mlp = optim.step(3e-3, mlp, grads);
        }
        pb.inc(1);
    }
    pb.finish();
    let base_ad = Net::from_mlp(mlp);

    // 2. Train one LoRA expert per (rotation, shard) and store the library.
    let lib_dir = std::env::temp_dir().join(format!(
        "modula-library-digits-{}-{seed}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&lib_dir);
    let mut library = ExpertLibrary::open_or_create(&lib_dir)?;
    let tasks: Vec<(usize, usize)> = ROTATIONS
        .iter()
        .flat_map(|&r| (0..SHARDS.len()).map(move |s| (r, s)))
        .collect();
    let pb = bar(tasks.len() as u64, &format!("{seed}: experts"))?;
    let lora = LoraConfig::new(RANK).with_alpha(2.0 * RANK as f64);
    for &(r, s) in &tasks {
        let subset_name = SHARDS[s];
        let mut net = base_ad.clone();
        // One initialisation for every expert (same A, B = 0), so parameter differences come
        // from training only, which is what MBC clusters on.
        ad.seed(seed * 1000 + 1);
        for layer in net.layers_mut() {
            layer.add_adapter("task", &lora)?;
        }
        let mut optim = AdamConfig::new().init();
        let mut rows: Vec<usize> = train
            .iter()
            .enumerate()
            .filter(|(j, _)| j % SHARDS.len() == s)
            .map(|(_, &i)| i)
            .collect();
        for _ in 0..EPOCHS {
            shuffle(&mut rows, &mut rng);
            for chunk in rows.chunks(64) {
                let (xb, yb) = batch(&rotated[r], y, chunk, &ad);
                let loss = ce.forward(net.forward(xb)?, yb);
                let grads = GradientsParams::from_grads(loss.backward(), &net);
                net = optim.step(LR, net, grads);
            }
        }
        let mut peft = PeftLora::new(RANK, 2.0 * RANK as f64, false);
        for (name, layer) in LAYERS.iter().zip(net.layers_mut()) {
            peft.insert(name, layer.adapter("task")?.clone());
        }
        let info = ExpertInfo {
            task: Some(format!("digits rotated {}°, shard {subset_name}", 90 * r)),
            notes: Some(format!(
                "{EPOCHS} epochs, Adam lr {LR}, batch 64, base frozen"
            )),
            ..Default::default()
        };
        library.add(&format!("rot{}-{subset_name}", 90 * r), &peft, info)?;
        pb.inc(1);
    }
    pb.finish();

    // 3. MBC clustering of the stored library.
    let cpu = Device::flex();
    let names: Vec<String> = library.names().iter().map(|s| s.to_string()).collect();
    let experts: Vec<LoraExpert> = names
        .iter()
        .map(|n| library.factors(n))
        .collect::<modula::Result<_>>()?;
    let refs: Vec<&LoraExpert> = experts.iter().collect();
    let clustering = mbc_cluster(
        &refs,
        &MbcConfig::new(ROTATIONS.len()).with_sparsity(0.5),
        &cpu,
    )?;
    let pure = clustering
        .clusters
        .iter()
        .filter(|c| c.iter().all(|&i| tasks[i].0 == tasks[c[0]].0))
        .count();

    // 4. Held-out sets: all ten digits under each rotation, validation and test.
    let base = base_ad.valid();
    let uniform = merge_experts(
        &refs,
        &vec![1.0 / refs.len() as f64; refs.len()],
        &MergeOptions::new(Combination::Linear),
    )?;
    let cluster_experts: Vec<LoraExpert> = clustering
        .clusters
        .iter()
        .map(|c| {
            let members: Vec<&LoraExpert> = c.iter().map(|&i| &experts[i]).collect();
            merge_experts(
                &members,
                &vec![1.0 / c.len() as f64; c.len()],
                &MergeOptions::new(Combination::Linear),
            )
        })
        .collect::<modula::Result<_>>()?;
    let cluster_refs: Vec<&LoraExpert> = cluster_experts.iter().collect();
    let mu_net = base.with_expert(&uniform, &cpu)?;
    let expert_nets: Vec<Net> = experts
        .iter()
        .map(|e| base.with_expert(e, &cpu))
        .collect::<modula::Result<_>>()?;
    let arrow: Vec<ArrowNet> = TOP_K
        .iter()
        .map(|&k| ArrowNet::new(&base, &refs, k, &cpu))
        .collect::<modula::Result<_>>()?;
    let k_clusters: Vec<usize> = TOP_K
        .iter()
        .copied()
        .filter(|&k| k <= cluster_refs.len())
        .collect();
    let arrow_clusters: Vec<ArrowNet> = k_clusters
        .iter()
        .map(|&k| ArrowNet::new(&base, &cluster_refs, k, &cpu))
        .collect::<modula::Result<_>>()?;
    // Accuracies per (set, rotation): base, µ, every Arrow k, every cluster k, every expert.
    let pb = bar(2 * ROTATIONS.len() as u64, &format!("{seed}: evaluate"))?;
    let mut measured: Vec<Vec<Vec<f64>>> = Vec::new();
    for rows in [val, test] {
        let yt: Vec<i64> = rows.iter().map(|&i| y[i]).collect();
        let mut per_rot = Vec::new();
        for &r in &ROTATIONS {
            let (xt, _) = batch(&rotated[r], y, rows, &cpu);
            let mut accs = vec![
                accuracy(base.forward(xt.clone())?, &yt),
                accuracy(mu_net.forward(xt.clone())?, &yt),
            ];
            for net in arrow.iter().chain(&arrow_clusters) {
                accs.push(accuracy(net.forward(xt.clone())?, &yt));
            }
            for net in &expert_nets {
                accs.push(accuracy(net.forward(xt.clone())?, &yt));
            }
            per_rot.push(accs);
            pb.inc(1);
        }
        measured.push(per_rot);
    }
    pb.finish();
    std::fs::remove_dir_all(&lib_dir)?;
    // Choices on validation: k by the mean over rotations, the oracle's expert per rotation.
    let (val_m, test_m) = (&measured[0], &measured[1]);
    let mean_over_rot = |col: usize| val_m.iter().map(|a| a[col]).sum::<f64>();
    let arrow_cols: Vec<f64> = (0..TOP_K.len()).map(|i| mean_over_rot(2 + i)).collect();
    let cluster_cols: Vec<f64> = (0..k_clusters.len())
        .map(|i| mean_over_rot(2 + TOP_K.len() + i))
        .collect();
    let (ka, kc) = (argmax(&arrow_cols), argmax(&cluster_cols));
    let first_expert = 2 + TOP_K.len() + k_clusters.len();
    let mut oracle = Vec::new();
    let pick = |m: &Vec<Vec<f64>>, rot: usize, e: usize| -> [f64; 5] {
        [
            m[rot][0],
            m[rot][1],
            m[rot][2 + ka],
            m[rot][2 + TOP_K.len() + kc],
            m[rot][first_expert + e],
        ]
    };
    let (mut val_rows, mut test_rows) = (Vec::new(), Vec::new());
    for rot in 0..ROTATIONS.len() {
        let e = argmax(&val_m[rot][first_expert..]);
        oracle.push(names[e].clone());
        val_rows.push(pick(val_m, rot, e));
        test_rows.push(pick(test_m, rot, e));
    }
    Ok(Run {
        test: test_rows,
        val: val_rows,
        k: (TOP_K[ka], k_clusters[kc]),
        oracle,
        pure,
        clusters: clustering
            .clusters
            .iter()
            .map(|c| c.iter().map(|&j| names[j].clone()).collect())
            .collect(),
    })
}
