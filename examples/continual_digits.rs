//! Continual learning on the UCI digits shipped in data/: split-digits (5 tasks of 2 classes,
//! class-incremental) and rotated-digits (4 tasks: all ten digits rotated by 0/90/180/270°,
//! domain-incremental). Compared:
//!
//! - **fine-tuning**: one MLP trained on the tasks in order (the forgetting baseline);
//! - **task-id oracle**: one MLP per task, evaluated with the true task id (an upper bound);
//! - **latent replay**: a frozen encoder (the first two layers of an MLP trained on task 1),
//!   a reservoir buffer of 20 features per class, a linear classifier trained on the current
//!   task mixed half and half with class-balanced replay;
//! - **LMC**: local module composition without task ids at test time (energy-based head choice);
//! - **L2R**: a LoRA per task on the task-1 network, trained in isolation and frozen; a router
//!   trained on a memory of 10 examples per task picks the module per input; and the
//!   similarity-based selection it is compared with.
//!
//! Metrics: final average accuracy over the tasks, forgetting (mean drop from each task's best
//! accuracy to its final one), task-inference accuracy and modules.
//!
//! Run: `cargo run --release --features wgpu,cli --example continual_digits`; writes
//! docs/continual_digits.md.

use std::fmt::Write as _;
use std::path::PathBuf;

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Int, Tensor, TensorData};
use indicatif::{ProgressBar, ProgressStyle};
use modula::Router;
use modula::continual::{
    LmcConfig, LmcModel, ReplayBuffer, ReplayPolicy, SimilarityRouter, train_task_router,
};
use modula::library::{LoraMix, XLoraRouter, lora_mixture};
use modula::{LoraConfig, LoraLinear, Routing};

#[path = "common/digits.rs"]
mod digits;
use digits::{CLASSES, PIXELS, load_digits, rotate, shuffle};

#[derive(Module, Debug)]
struct Mlp {
    l1: Linear,
    l2: Linear,
    head: Linear,
}

impl Mlp {
    fn new(device: &Device) -> Self {
        Self {
            l1: LinearConfig::new(PIXELS, 64).init(device),
            l2: LinearConfig::new(64, 64).init(device),
            head: LinearConfig::new(64, CLASSES).init(device),
        }
    }
    fn features(&self, x: Tensor<2>) -> Tensor<2> {
        relu(self.l2.forward(relu(self.l1.forward(x))))
    }
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.head.forward(self.features(x))
    }
}

/// One task: its (transformed) images and labels, train and test.
struct Task {
    train_x: Vec<f32>,
    train_y: Vec<i64>,
    test_x: Vec<f32>,
    test_y: Vec<i64>,
}

fn tensors(x: &[f32], y: &[i64], device: &Device) -> (Tensor<2>, Tensor<1, Int>) {
    (
        Tensor::from_data(TensorData::new(x.to_vec(), [y.len(), PIXELS]), device),
        Tensor::from_data(TensorData::new(y.to_vec(), [y.len()]), device),
    )
}

fn rows_of(x: &[f32], y: &[i64], rows: &[usize]) -> (Vec<f32>, Vec<i64>) {
    let xs = rows
        .iter()
        .flat_map(|&r| x[r * PIXELS..(r + 1) * PIXELS].iter().copied())
        .collect();
    (xs, rows.iter().map(|&r| y[r]).collect())
}

fn accuracy(logits: Tensor<2>, y: &[i64]) -> f64 {
    let p: Vec<i64> = logits.argmax(1).into_data().iter::<i64>().collect();
    100.0 * p.iter().zip(y).filter(|(a, b)| a == b).count() as f64 / y.len().max(1) as f64
}

/// Mini-batch training of `loss(model, x, y)` for `epochs` over `(x, y)`.
#[allow(clippy::too_many_arguments)]
fn train<M, F>(
    mut model: M,
    x: &[f32],
    y: &[i64],
    epochs: usize,
    lr: f64,
    rng: &mut u64,
    device: &Device,
    loss: F,
) -> M
where
    M: Module,
    F: Fn(&M, Tensor<2>, Tensor<1, Int>) -> Tensor<1>,
{
    let mut optim = AdamConfig::new().init();
    let mut order: Vec<usize> = (0..y.len()).collect();
    for _ in 0..epochs {
        shuffle(&mut order, rng);
        for chunk in order.chunks(32) {
            let (xs, ys) = rows_of(x, y, chunk);
            let (xb, yb) = tensors(&xs, &ys, device);
            let l = loss(&model, xb, yb);
            let grads = GradientsParams::from_grads(l.backward(), &model);
            model = optim.step(lr, model, grads);
        }
    }
    model
}

/// `R[i][j]`: accuracy on task `j` after training task `i` → (final average, forgetting).
fn summarise(r: &[Vec<f64>]) -> (f64, f64) {
    let t = r.len();
    let last = &r[t - 1];
    let avg = last.iter().sum::<f64>() / t as f64;
    let forget = if t > 1 {
        (0..t - 1)
            .map(|j| (j..t).map(|i| r[i][j]).fold(f64::MIN, f64::max) - last[j])
            .sum::<f64>()
            / (t - 1) as f64
    } else {
        0.0
    };
    (avg, forget)
}

struct Row {
    method: String,
    avg: f64,
    forgetting: Option<f64>,
    task_inference: Option<f64>,
    modules: String,
}

fn run_benchmark(
    name: &str,
    tasks: &[Task],
    seed: u64,
) -> Result<Vec<Row>, Box<dyn std::error::Error>> {
    let ad = Device::flex().autodiff();
    let cpu = Device::flex();
    ad.seed(seed);
    let mut rng = seed.wrapping_mul(7919) | 1;
    let ce = CrossEntropyLossConfig::new().init(&ad);
    let t = tasks.len();
    let pb = ProgressBar::new(5);
    pb.set_style(ProgressStyle::with_template(&format!(
        "{name:>14} {{bar:30}} {{pos}}/{{len}} {{msg}}"
    ))?);
    let mut rows = Vec::new();
    let epochs = 20;
    let eval = |m: &Mlp, task: &Task| {
        let (x, _) = tensors(&task.test_x, &task.test_y, &cpu);
        accuracy(m.forward(x), &task.test_y)
    };

    // Fine-tuning.
    pb.set_message("fine-tuning");
    let mut model = Mlp::new(&ad);
    let mut r = Vec::new();
    for task in tasks {
        model = train(
            model,
            &task.train_x,
            &task.train_y,
            epochs,
            3e-3,
            &mut rng,
            &ad,
            |m, x, y| ce.forward(m.forward(x), y),
        );
        let v = model.valid();
        r.push(tasks.iter().map(|tk| eval(&v, tk)).collect::<Vec<_>>());
    }
    let (avg, forget) = summarise(&r);
    rows.push(Row {
        method: "fine-tuning".into(),
        avg,
        forgetting: Some(forget),
        task_inference: None,
        modules: "1 network".into(),
    });
    pb.inc(1);

    // Task-id oracle: one network per task, evaluated with the task id.
    pb.set_message("oracle");
    let mut accs = Vec::new();
    let mut first_net = None;
    for task in tasks {
        let m = train(
            Mlp::new(&ad),
            &task.train_x,
            &task.train_y,
            epochs,
            3e-3,
            &mut rng,
            &ad,
            |m, x, y| ce.forward(m.forward(x), y),
        );
        accs.push(eval(&m.valid(), task));
        if first_net.is_none() {
            first_net = Some(m);
        }
    }
    let first_net = first_net.ok_or("no tasks")?;
    rows.push(Row {
        method: "task-id oracle (one network per task)".into(),
        avg: accs.iter().sum::<f64>() / t as f64,
        forgetting: Some(0.0),
        task_inference: Some(100.0),
        modules: format!("{t} networks"),
    });
    pb.inc(1);

    // Latent replay on the task-1 network's frozen trunk.
    pb.set_message("latent replay");
    let encoder = first_net.valid();
    let encode = |x: &[f32], y: &[i64]| -> Vec<f32> {
        let (xt, _) = tensors(x, y, &cpu);
        encoder.features(xt).into_data().iter::<f32>().collect()
    };
    let mut buffer = ReplayBuffer::new(64, 20, ReplayPolicy::Reservoir, seed)?;
    let mut clf = LinearConfig::new(64, CLASSES).init(&ad);
    let mut optim = AdamConfig::new().init();
    let mut r = Vec::new();
    let test_feats: Vec<Vec<f32>> = tasks
        .iter()
        .map(|tk| encode(&tk.test_x, &tk.test_y))
        .collect();
    for task in tasks {
        let feats = encode(&task.train_x, &task.train_y);
        let labels: Vec<usize> = task.train_y.iter().map(|&c| c as usize).collect();
        let mut order: Vec<usize> = (0..labels.len()).collect();
        for _ in 0..epochs {
            shuffle(&mut order, &mut rng);
            for chunk in order.chunks(32) {
                let mut xs: Vec<f32> = chunk
                    .iter()
                    .flat_map(|&i| feats[i * 64..(i + 1) * 64].iter().copied())
                    .collect();
                let mut ys: Vec<i64> = chunk.iter().map(|&i| task.train_y[i]).collect();
                if !buffer.is_empty() {
                    let (rx, ry) = buffer.sample_balanced(chunk.len());
                    xs.extend(rx);
                    ys.extend(ry.iter().map(|&c| c as i64));
                }
                let n = ys.len();
                let xb = Tensor::<2>::from_data(TensorData::new(xs, [n, 64]), &ad);
                let yb = Tensor::<1, Int>::from_data(TensorData::new(ys, [n]), &ad);
                let loss = ce.forward(clf.forward(xb), yb);
                let grads = GradientsParams::from_grads(loss.backward(), &clf);
                clf = optim.step(3e-3, clf, grads);
            }
        }
        buffer.add(&feats, &labels)?;
        let v = clf.valid();
        r.push(
            tasks
                .iter()
                .zip(&test_feats)
                .map(|(tk, f)| {
                    accuracy(
                        v.forward(Tensor::<2>::from_data(
                            TensorData::new(f.clone(), [tk.test_y.len(), 64]),
                            &cpu,
                        )),
                        &tk.test_y,
                    )
                })
                .collect::<Vec<_>>(),
        );
    }
    let (avg, forget) = summarise(&r);
    rows.push(Row {
        method: format!("latent replay ({} features kept)", buffer.len()),
        avg,
        forgetting: Some(forget),
        task_inference: None,
        modules: "encoder + linear".into(),
    });
    pb.inc(1);

    // LMC, task-agnostic at test time.
    pb.set_message("LMC");
    let mut lmc = LmcModel::new(&[PIXELS, 64, 64], CLASSES, LmcConfig::default(), &ad)?;
    let mut r = Vec::new();
    let mut inference = 0.0;
    for (ti, task) in tasks.iter().enumerate() {
        let first: Vec<usize> = (0..task.train_y.len().min(64)).collect();
        let (fx, fy) = rows_of(&task.train_x, &task.train_y, &first);
        let grew = lmc.add_task(&tensors(&fx, &fy, &ad).0)?;
        let projection = grew.iter().any(|g| *g);
        let mut optim = AdamConfig::new().init();
        let mut order: Vec<usize> = (0..task.train_y.len()).collect();
        let mut step = 0;
        for _ in 0..epochs {
            shuffle(&mut order, &mut rng);
            for chunk in order.chunks(32) {
                let (xs, ys) = rows_of(&task.train_x, &task.train_y, chunk);
                let (xb, yb) = tensors(&xs, &ys, &ad);
                let (logits, trace) = lmc.forward_task(xb, ti)?;
                let loss = if projection && step < 20 {
                    trace.structural_loss()
                } else {
                    ce.forward(logits, yb).reshape([1]) + trace.structural_loss()
                };
                step += 1;
                let grads = GradientsParams::from_grads(loss.sum().backward(), &lmc);
                lmc = optim.step(3e-3, lmc, grads);
            }
        }
        for chunk in (0..task.train_y.len()).collect::<Vec<_>>().chunks(64) {
            let (xs, ys) = rows_of(&task.train_x, &task.train_y, chunk);
            lmc.update_stats(&tensors(&xs, &ys, &ad).0)?;
        }
        lmc.freeze_modules();
        let v = lmc.valid();
        let mut row = Vec::new();
        let mut inferred = 0usize;
        let mut total = 0usize;
        for (tj, tk) in tasks.iter().enumerate() {
            let (x, _) = tensors(&tk.test_x, &tk.test_y, &cpu);
            let (pred, heads) = v.predict(x)?;
            row.push(
                100.0
                    * pred
                        .iter()
                        .zip(&tk.test_y)
                        .filter(|(p, y)| **p as i64 == **y)
                        .count() as f64
                    / tk.test_y.len() as f64,
            );
            if tj <= ti {
                inferred += heads.iter().filter(|&&h| h == tj).count();
                total += heads.len();
            }
        }
        inference = 100.0 * inferred as f64 / total.max(1) as f64;
        r.push(row);
    }
    let (avg, forget) = summarise(&r);
    rows.push(Row {
        method: "LMC (no task ids at test)".into(),
        avg,
        forgetting: Some(forget),
        task_inference: Some(inference),
        modules: format!("{:?} per layer", lmc.modules_per_layer()),
    });
    pb.inc(1);

    // L2R: frozen LoRA per task on the task-1 network, routers trained on a 10-per-task memory.
    pb.set_message("L2R");
    let base = first_net.valid();
    let mut per_task: Vec<[modula::LoraAdapter; 3]> = Vec::new();
    let mut memory = ReplayBuffer::new(PIXELS, 10, ReplayPolicy::Reservoir, seed)?;
    for (ti, task) in tasks.iter().enumerate() {
        #[derive(Module, Debug)]
        struct Adapted {
            l1: LoraLinear,
            l2: LoraLinear,
            head: LoraLinear,
        }
        let b = first_net.clone();
        let mut net = Adapted {
            l1: LoraLinear::new(b.l1),
            l2: LoraLinear::new(b.l2),
            head: LoraLinear::new(b.head),
        };
        ad.seed(seed + 100 + ti as u64);
        let cfg = LoraConfig::new(8).with_alpha(16.0);
        net.l1.add_adapter("t", &cfg)?;
        net.l2.add_adapter("t", &cfg)?;
        net.head.add_adapter("t", &cfg)?;
        let net = train(
            net,
            &task.train_x,
            &task.train_y,
            epochs,
            3e-3,
            &mut rng,
            &ad,
            |m, x, y| {
                let h = relu(
                    m.l2.forward(relu(m.l1.forward(x).expect("width")))
                        .expect("width"),
                );
                ce.forward(m.head.forward(h).expect("width"), y)
            },
        );
        let net = net.valid();
        per_task.push([
            net.l1.adapter("t")?.clone(),
            net.l2.adapter("t")?.clone(),
            net.head.adapter("t")?.clone(),
        ]);
        memory.add(&task.train_x, &vec![ti; task.train_y.len()])?;
    }
    let layer_adapters: Vec<Vec<modula::LoraAdapter>> = (0..3)
        .map(|l| per_task.iter().map(|a| a[l].clone()).collect())
        .collect();
    let compose = |x: Tensor<2>, routing: &Routing| -> modula::Result<Tensor<2>> {
        let h = relu(
            base.l1.forward(x.clone())
                + lora_mixture(x, routing, &layer_adapters[0], LoraMix::Output)?,
        );
        let h2 = relu(
            base.l2.forward(h.clone())
                + lora_mixture(h, routing, &layer_adapters[1], LoraMix::Output)?,
        );
        Ok(base.head.forward(h2.clone())
            + lora_mixture(h2, routing, &layer_adapters[2], LoraMix::Output)?)
    };
    let learned = train_task_router(
        &memory,
        XLoraRouter::new(PIXELS, 64, t, Some(1), 1.0, &ad)?,
        100,
        3e-3,
        seed,
    )?;
    let similar = SimilarityRouter::from_memory(&memory, &cpu)?;
    for (label, router) in [
        (
            "L2R (learned router, 10 examples/task)",
            &learned as &dyn Router,
        ),
        ("similarity-based selection", &similar as &dyn Router),
    ] {
        let mut acc = 0.0;
        let mut hit = 0usize;
        let mut total = 0usize;
        for (ti, tk) in tasks.iter().enumerate() {
            let (x, _) = tensors(&tk.test_x, &tk.test_y, &cpu);
            let routing = router.route(&x)?;
            let idx: Vec<i64> = routing.indices().into_data().iter::<i64>().collect();
            hit += idx.iter().filter(|&&i| i == ti as i64).count();
            total += idx.len();
            acc += accuracy(compose(x, &routing)?, &tk.test_y) / t as f64;
        }
        rows.push(Row {
            method: label.into(),
            avg: acc,
            forgetting: Some(0.0),
            task_inference: Some(100.0 * hit as f64 / total as f64),
            modules: format!("{t} LoRAs (frozen)"),
        });
    }
    pb.inc(1);
    pb.finish_with_message("done");
    Ok(rows)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (x, y) = load_digits()?;
    let n = y.len();
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = 11u64;
    shuffle(&mut order, &mut rng);
    let (train_rows, test_rows) = order.split_at(n * 4 / 5);
    let pick = |rows: &[usize], keep: &dyn Fn(i64) -> bool, q: usize| -> (Vec<f32>, Vec<i64>) {
        let mut xs = Vec::new();
        let mut ys = Vec::new();
        for &r in rows {
            if keep(y[r]) {
                xs.extend(rotate(&x[r * PIXELS..(r + 1) * PIXELS], q));
                ys.push(y[r]);
            }
        }
        (xs, ys)
    };
    let make = |keep: &dyn Fn(i64) -> bool, q: usize| {
        let (train_x, train_y) = pick(train_rows, keep, q);
        let (test_x, test_y) = pick(test_rows, keep, q);
        Task {
            train_x,
            train_y,
            test_x,
            test_y,
        }
    };
    let split: Vec<Task> = (0..5).map(|t| make(&move |c| c / 2 == t, 0)).collect();
    let rotated: Vec<Task> = (0..4).map(|q| make(&|_| true, q)).collect();
    let mut report = String::new();
    writeln!(report, "# Continual learning on UCI digits")?;
    writeln!(report)?;
    writeln!(
        report,
        "Generated by `cargo run --release --features wgpu,cli --example continual_digits`. Accuracy in % on each task's held-out test images after the last task; forgetting is the mean drop from each task's best accuracy; task inference is how often the right task's module or head was chosen without a task id. Chance is 10 % (10 classes); chance task inference is 20 % (split) and 25 % (rotated)."
    )?;
    for (name, tasks) in [
        (
            "split-digits (5 tasks × 2 classes, class-incremental)",
            &split,
        ),
        (
            "rotated-digits (4 rotations × 10 classes, domain-incremental)",
            &rotated,
        ),
    ] {
        let rows = run_benchmark(name.split(' ').next().unwrap_or(name), tasks, 3)?;
        writeln!(report)?;
        writeln!(report, "## {name}")?;
        writeln!(report)?;
        writeln!(
            report,
            "| method | final avg accuracy | forgetting | task inference | modules |"
        )?;
        writeln!(report, "|---|---|---|---|---|")?;
        for r in rows {
            let f = r.forgetting.map_or("—".into(), |v| format!("{v:.1}"));
            let ti = r.task_inference.map_or("—".into(), |v| format!("{v:.1}"));
            writeln!(
                report,
                "| {} | {:.1} | {f} | {ti} | {} |",
                r.method, r.avg, r.modules
            )?;
        }
    }
    print!("{report}");
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/continual_digits.md");
    modula::io::atomic_write(&out, report.as_bytes())?;
    println!("table written to {}", out.display());
    Ok(())
}
