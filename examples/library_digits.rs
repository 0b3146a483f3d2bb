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
//!    routing over the library (top-2, per token and layer), Arrow over the MBC cluster merges
//!    (top-1), and the oracle (the best single expert, chosen with the test labels: an upper
//!    bound that zero-shot routing cannot use).
//!
//! Run: `cargo run --release --features wgpu,cli --example library_digits` (a few seconds after
//! the build). It prints the table and writes it to docs/library_digits.md.

use std::fmt::Write as _;
use std::path::PathBuf;

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use modula::library::{
    ArrowLinear, Combination, ExpertInfo, ExpertLibrary, LoraExpert, LoraMix, MbcConfig,
    MergeOptions, mbc_cluster, merge_experts,
};
use modula::{LoraConfig, LoraLinear, PeftLora};

#[path = "common/digits.rs"]
mod digits;
use digits::{CLASSES, PIXELS, batch, load_digits, rotate, shuffle};

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
    let n = y.len();
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = 7u64;
    shuffle(&mut order, &mut rng);
    let (train, test) = order.split_at(n * 4 / 5);
    println!("digits: {} train, {} test", train.len(), test.len());
    let rotated: Vec<Vec<f32>> = ROTATIONS.iter().map(|&q| rotate(&x, q)).collect();
    let ad = Device::flex().autodiff();
    ad.seed(0);
    let ce = CrossEntropyLossConfig::new().init(&ad);

    // 1. Pre-train the base on upright digits.
    let mut mlp = Mlp {
        l1: LinearConfig::new(PIXELS, 64).init(&ad),
        l2: LinearConfig::new(64, 64).init(&ad),
        head: LinearConfig::new(64, CLASSES).init(&ad),
    };
    let mut optim = AdamConfig::new().init();
    let epochs = 30;
    let pb = bar(epochs, "pre-train")?;
    let mut rows = train.to_vec();
    for _ in 0..epochs {
        shuffle(&mut rows, &mut rng);
        for chunk in rows.chunks(64) {
            let (xb, yb) = batch(&x, &y, chunk, &ad);
            let h = relu(mlp.l2.forward(relu(mlp.l1.forward(xb))));
            let loss = ce.forward(mlp.head.forward(h), yb);
            let grads = GradientsParams::from_grads(loss.backward(), &mlp);
            mlp = optim.step(3e-3, mlp, grads);
        }
        pb.inc(1);
    }
    pb.finish();
    let base_ad = Net::from_mlp(mlp);

    // 2. Train one LoRA expert per (rotation, class subset) and store the library.
    let lib_dir =
        std::env::temp_dir().join(format!("modula-library-digits-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&lib_dir);
    let mut library = ExpertLibrary::open_or_create(&lib_dir)?;
    let tasks: Vec<(usize, usize)> = ROTATIONS
        .iter()
        .flat_map(|&r| (0..SHARDS.len()).map(move |s| (r, s)))
        .collect();
    let pb = bar(tasks.len() as u64, "experts")?;
    let lora = LoraConfig::new(RANK).with_alpha(2.0 * RANK as f64);
    for &(r, s) in &tasks {
        let subset_name = SHARDS[s];
        let mut net = base_ad.clone();
        // One initialisation for every expert (same A, B = 0), so parameter differences come
        // from training only, which is what MBC clusters on.
        ad.seed(1);
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
                let (xb, yb) = batch(&rotated[r], &y, chunk, &ad);
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
    println!(
        "library: {} experts in {}",
        library.len(),
        lib_dir.display()
    );

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

    // 4. Held-out tasks: all ten digits under each rotation.
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
    let arrow = ArrowNet::new(&base, &refs, 2, &cpu)?;
    let arrow_clusters = ArrowNet::new(&base, &cluster_refs, 1, &cpu)?;
    let yt: Vec<i64> = test.iter().map(|&i| y[i]).collect();
    let mut rows_out = Vec::new();
    let pb = bar(ROTATIONS.len() as u64, "evaluate")?;
    for &r in &ROTATIONS {
        let (xt, _) = batch(&rotated[r], &y, test, &cpu);
        let base_acc = accuracy(base.forward(xt.clone())?, &yt);
        let mu = accuracy(mu_net.forward(xt.clone())?, &yt);
        let arr = accuracy(arrow.forward(xt.clone())?, &yt);
        let arr_c = accuracy(arrow_clusters.forward(xt.clone())?, &yt);
        let mut oracle = (0.0, String::new());
        for (e, name) in experts.iter().zip(&names) {
            let acc = accuracy(base.with_expert(e, &cpu)?.forward(xt.clone())?, &yt);
            if acc > oracle.0 {
                oracle = (acc, name.clone());
            }
        }
        rows_out.push((r, base_acc, mu, arr, arr_c, oracle));
        pb.inc(1);
    }
    pb.finish();

    let mut report = String::new();
    writeln!(report, "# A library of LoRA experts on UCI digits")?;
    writeln!(report)?;
    writeln!(
        report,
        "Generated by `cargo run --release --features wgpu,cli --example library_digits`: a 64→64→64→10 MLP pre-trained on upright digits; {} rank-{RANK} LoRA experts on both hidden layers, one per (rotation, training shard). Each row is the held-out test set ({} images, seen by no expert) under one rotation; no method is told the rotation except the oracle, which picks the best single expert with the test labels. Test accuracy in %.",
        experts.len(),
        test.len()
    )?;
    writeln!(report)?;
    writeln!(
        report,
        "| held-out test set | base | uniform merge µ | Arrow top-2 (12 experts) | Arrow top-1 over MBC cluster merges | oracle expert |"
    )?;
    writeln!(report, "|---|---|---|---|---|---|")?;
    let mut sums = [0.0; 5];
    for (r, b, mu, a, ac, (o, name)) in &rows_out {
        writeln!(
            report,
            "| rotated {}° | {b:.1} | {mu:.1} | {a:.1} | {ac:.1} | {o:.1} ({name}) |",
            90 * r
        )?;
        for (s, v) in sums.iter_mut().zip([b, mu, a, ac, o]) {
            *s += v / rows_out.len() as f64;
        }
    }
    writeln!(
        report,
        "| **mean** | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
        sums[0], sums[1], sums[2], sums[3], sums[4]
    )?;
    writeln!(report)?;
    writeln!(
        report,
        "MBC (k = {}, sparsity 0.5, parameters only): {pure} of {} clusters contain a single rotation.",
        ROTATIONS.len(),
        clustering.clusters.len()
    )?;
    for (i, c) in clustering.clusters.iter().enumerate() {
        let members: Vec<&str> = c.iter().map(|&j| names[j].as_str()).collect();
        writeln!(report, "- cluster {i}: {}", members.join(", "))?;
    }
    print!("{report}");
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/library_digits.md");
    modula::io::atomic_write(&out, report.as_bytes())?;
    println!("table written to {}", out.display());
    std::fs::remove_dir_all(&lib_dir)?;
    Ok(())
}
