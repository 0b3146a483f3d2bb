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
//! accuracy to its final one), task-inference accuracy and modules. L2R and the similarity
//! selection are measured like the others: after each task their router is retrained on the
//! memory so far and every task seen is evaluated.
//!
//! Protocol: the last 15 % of each task's training rows are a validation slice. Every method's
//! learning rate is chosen from {1e-3, 3e-3, 1e-2} by its mean final validation accuracy over
//! the seeds; the table reports the test metrics at that learning rate as mean ± sd over 3
//! seeds.
//!
//! Run: `cargo run --release --features wgpu,cli --example continual_digits`; writes
//! docs/continual_digits.md.

#[path = "common/alloc.rs"]
mod alloc;

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
use modula::XLoraRouterConfig;
use modula::continual::{LmcConfig, LmcModel, ReplayBuffer, ReplayPolicy, train_task_router};
use modula::{LoraConfig, LoraLinear, Routing};
use modula::{LoraMix, SimilarityRouter, lora_mixture};

#[path = "common/digits.rs"]
mod digits;
use digits::{CLASSES, PIXELS, Splits, load_digits, mean_sd, pm, rotate, shuffle};

/// Learning rates tried on the validation slice.
const LRS: [f64; 3] = [1e-3, 3e-3, 1e-2];
/// Seeds every configuration runs with.
const SEEDS: [u64; 3] = [3, 4, 5];
/// Evaluation sets: the validation slice (for choosing) and the test set (for reporting).
const VAL: usize = 0;
const TEST: usize = 1;

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

/// One task: its (transformed) images and labels for training, validation and test.
struct Task {
    train_x: Vec<f32>,
    train_y: Vec<i64>,
    /// `[validation, test]` images and labels.
    sets: [(Vec<f32>, Vec<i64>); 2],
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

/// `R[i][j]`: accuracy on task `j` after training task `i` (only `j ≤ i` is read for
/// forgetting) → (final average, forgetting).
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

/// How a method picks the task at test time.
#[derive(Clone, Copy)]
enum Inference {
    /// It does not pick one (one shared network or classifier).
    None,
    /// It is told the task id.
    Given,
    /// It picks one; the percentage picked right.
    Measured(f64),
}

/// A method's figures on one evaluation set.
#[derive(Clone, Copy)]
struct Metrics {
    avg: f64,
    forgetting: f64,
    inference: Inference,
}

/// One method in one run: its figures on the validation and the test set.
struct Row {
    method: String,
    sets: [Metrics; 2],
    modules: String,
}

/// Rows `R[i]` per evaluation set, filled as the tasks are learned.
struct Matrices([Vec<Vec<f64>>; 2]);

impl Matrices {
    fn new() -> Self {
        Self([Vec::new(), Vec::new()])
    }

    /// Records the accuracies after one more task: `acc(set, task)` for every task.
    fn push(&mut self, tasks: usize, mut acc: impl FnMut(usize, usize) -> f64) {
        for (set, r) in self.0.iter_mut().enumerate() {
            r.push((0..tasks).map(|j| acc(set, j)).collect());
        }
    }

    fn metrics(&self, inference: [Inference; 2]) -> [Metrics; 2] {
        [VAL, TEST].map(|set| {
            let (avg, forgetting) = summarise(&self.0[set]);
            Metrics {
                avg,
                forgetting,
                inference: inference[set],
            }
        })
    }
}

fn run_benchmark(
    tasks: &[Task],
    seed: u64,
    lr: f64,
    pb: &ProgressBar,
) -> Result<Vec<Row>, Box<dyn std::error::Error>> {
    let ad = Device::flex().autodiff();
    let cpu = Device::flex();
    ad.seed(seed);
    let mut rng = seed.wrapping_mul(7919) | 1;
    let ce = CrossEntropyLossConfig::new().init(&ad);
    let t = tasks.len();
    let mut rows = Vec::new();
    let epochs = 20;
    let eval = |m: &Mlp, task: &Task, set: usize| {
        let (x, y) = &task.sets[set];
        accuracy(m.forward(tensors(x, y, &cpu).0), y)
    };

    // Fine-tuning.
    pb.set_message(format!("seed {seed}, lr {lr:e}: fine-tuning"));
    let mut model = Mlp::new(&ad);
    let mut r = Matrices::new();
    for task in tasks {
        model = train(
            model,
            &task.train_x,
            &task.train_y,
            epochs,
            lr,
            &mut rng,
            &ad,
            |m, x, y| ce.forward(m.forward(x), y),
        );
        let v = model.valid();
        r.push(t, |set, j| eval(&v, &tasks[j], set));
    }
    rows.push(Row {
        method: "fine-tuning".into(),
        sets: r.metrics([Inference::None; 2]),
        modules: "1 network".into(),
    });
    pb.inc(1);

    // Task-id oracle: one network per task, evaluated with the task id.
    pb.set_message(format!("seed {seed}, lr {lr:e}: oracle"));
    let mut nets: Vec<Mlp> = Vec::new();
    let mut first_ad: Option<Mlp> = None;
    let mut r = Matrices::new();
    for task in tasks {
        let m = train(
            Mlp::new(&ad),
            &task.train_x,
            &task.train_y,
            epochs,
            lr,
            &mut rng,
            &ad,
            |m, x, y| ce.forward(m.forward(x), y),
        );
        nets.push(m.clone().valid());
        first_ad.get_or_insert(m);
        // Tasks not learned yet have no network: their entries are never read.
        r.push(t, |set, j| {
            nets.get(j).map_or(f64::NAN, |n| eval(n, &tasks[j], set))
        });
    }
    rows.push(Row {
        method: "task-id oracle (one network per task)".into(),
        sets: r.metrics([Inference::Given; 2]),
        modules: format!("{t} networks"),
    });
    pb.inc(1);

    // Latent replay on the task-1 network's frozen trunk.
    pb.set_message(format!("seed {seed}, lr {lr:e}: latent replay"));
    let encoder = &nets[0];
    let encode = |x: &[f32], y: &[i64]| -> Vec<f32> {
        let (xt, _) = tensors(x, y, &cpu);
        encoder.features(xt).into_data().iter::<f32>().collect()
    };
    let mut buffer = ReplayBuffer::new(64, 20, ReplayPolicy::Reservoir, seed)?;
    let mut clf = LinearConfig::new(64, CLASSES).init(&ad);
    let mut optim = AdamConfig::new().init();
    let mut r = Matrices::new();
    let eval_feats: Vec<[Vec<f32>; 2]> = tasks
        .iter()
        .map(|tk| [VAL, TEST].map(|s| encode(&tk.sets[s].0, &tk.sets[s].1)))
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
                clf = optim.step(lr, clf, grads);
            }
        }
        buffer.add(&feats, &labels)?;
        let v = clf.valid();
        r.push(t, |set, j| {
            let y = &tasks[j].sets[set].1;
            let f = Tensor::<2>::from_data(
                TensorData::new(eval_feats[j][set].clone(), [y.len(), 64]),
                &cpu,
            );
            accuracy(v.forward(f), y)
        });
    }
    rows.push(Row {
        method: format!("latent replay ({} features kept)", buffer.len()),
        sets: r.metrics([Inference::None; 2]),
        modules: "encoder + linear".into(),
    });
    pb.inc(1);

    // LMC, task-agnostic at test time.
    pb.set_message(format!("seed {seed}, lr {lr:e}: LMC"));
    let mut lmc = LmcModel::new(&[PIXELS, 64, 64], CLASSES, LmcConfig::default(), &ad)?;
    let mut r = Matrices::new();
    let mut inference = [0.0; 2];
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
                lmc = optim.step(lr, lmc, grads);
            }
        }
        for chunk in (0..task.train_y.len()).collect::<Vec<_>>().chunks(64) {
            let (xs, ys) = rows_of(&task.train_x, &task.train_y, chunk);
            lmc.update_stats(&tensors(&xs, &ys, &ad).0)?;
        }
        lmc.freeze_modules();
        let v = lmc.valid();
        let mut acc = [vec![0.0; t], vec![0.0; t]];
        for set in [VAL, TEST] {
            let (mut inferred, mut total) = (0usize, 0usize);
            for (tj, tk) in tasks.iter().enumerate() {
                let (x, y) = &tk.sets[set];
                let (pred, heads) = v.predict(tensors(x, y, &cpu).0)?;
                let right = pred.iter().zip(y).filter(|(p, y)| **p as i64 == **y);
                acc[set][tj] = 100.0 * right.count() as f64 / y.len() as f64;
                if tj <= ti {
                    inferred += heads.iter().filter(|&&h| h == tj).count();
                    total += heads.len();
                }
            }
            inference[set] = 100.0 * inferred as f64 / total.max(1) as f64;
        }
        r.push(t, |set, j| acc[set][j]);
    }
    rows.push(Row {
        method: "LMC (no task ids at test)".into(),
        sets: r.metrics(inference.map(Inference::Measured)),
        modules: format!("{:?} per layer", lmc.modules_per_layer()),
    });
    pb.inc(1);

    // L2R: frozen LoRA per task on the task-1 network; after each task the routers are
    // retrained on the memory so far (10 examples per task) and every task seen is evaluated.
    pb.set_message(format!("seed {seed}, lr {lr:e}: L2R"));
    let base = &nets[0];
    let mut layer_adapters: Vec<Vec<modula::LoraModule>> = vec![Vec::new(); 3];
    let mut memory = ReplayBuffer::new(PIXELS, 10, ReplayPolicy::Reservoir, seed)?;
    let mut r_routed = [Matrices::new(), Matrices::new()];
    let mut inference = [[0.0; 2]; 2];
    for (ti, task) in tasks.iter().enumerate() {
        #[derive(Module, Debug)]
        struct Adapted {
            l1: LoraLinear,
            l2: LoraLinear,
            head: LoraLinear,
        }
        let b = first_ad.clone().ok_or("no tasks")?;
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
            lr,
            &mut rng,
            &ad,
            |m, x, y| {
                let h = relu(
                    m.l2.forward(relu(m.l1.forward(x).expect("width")))
                        .expect("width"),
                );
                ce.forward(m.head.forward(h).expect("width"), y)
            },
        )
        .valid();
        layer_adapters[0].push(net.l1.adapter("t")?.clone());
        layer_adapters[1].push(net.l2.adapter("t")?.clone());
        layer_adapters[2].push(net.head.adapter("t")?.clone());
        memory.add(&task.train_x, &vec![ti; task.train_y.len()])?;
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
        let seen = ti + 1;
        let learned = train_task_router(
            &memory,
            XLoraRouterConfig::new(PIXELS, 64, seen)
                .with_top_k(Some(1))
                .init(&ad)?,
            100,
            lr,
            seed + ti as u64,
        )?;
        let similar = SimilarityRouter::from_memory(&memory, &cpu)?;
        for (k, router) in [&learned as &dyn Router, &similar as &dyn Router]
            .into_iter()
            .enumerate()
        {
            let mut acc = [vec![f64::NAN; t], vec![f64::NAN; t]];
            for set in [VAL, TEST] {
                let (mut hit, mut total) = (0usize, 0usize);
                for (tj, tk) in tasks.iter().enumerate().take(seen) {
                    let (x, y) = &tk.sets[set];
                    let x = tensors(x, y, &cpu).0;
                    let routing = router.route(&x)?;
                    let idx: Vec<i64> = routing.indices().into_data().iter::<i64>().collect();
                    hit += idx.iter().filter(|&&i| i == tj as i64).count();
                    total += idx.len();
                    acc[set][tj] = accuracy(compose(x, &routing)?, y);
                }
                inference[k][set] = 100.0 * hit as f64 / total as f64;
            }
            r_routed[k].push(t, |set, j| acc[set][j]);
        }
    }
    for (k, label) in [
        "L2R (learned router, 10 examples/task)",
        "similarity-based selection",
    ]
    .into_iter()
    .enumerate()
    {
        rows.push(Row {
            method: label.into(),
            sets: r_routed[k].metrics(inference[k].map(Inference::Measured)),
            modules: format!("{t} LoRAs (frozen)"),
        });
    }
    pb.inc(1);
    Ok(rows)
}

/// Runs every (learning rate, seed) configuration and writes the table: per method the
/// learning rate with the best mean validation accuracy, and its test figures over the seeds.
fn benchmark_table(
    name: &str,
    tasks: &[Task],
    report: &mut String,
) -> Result<(), Box<dyn std::error::Error>> {
    let pb = ProgressBar::new((LRS.len() * SEEDS.len() * 5) as u64);
    pb.set_style(ProgressStyle::with_template(&format!(
        "{:>14} {{bar:30}} {{pos}}/{{len}} {{msg}}",
        name.split(' ').next().unwrap_or(name)
    ))?);
    // runs[lr][seed] = that run's rows, in method order.
    let mut runs: Vec<Vec<Vec<Row>>> = Vec::new();
    for &lr in &LRS {
        let mut per_seed = Vec::new();
        for &seed in &SEEDS {
            per_seed.push(run_benchmark(tasks, seed, lr, &pb)?);
        }
        runs.push(per_seed);
    }
    pb.finish_with_message("done");
    writeln!(report)?;
    writeln!(report, "## {name}")?;
    writeln!(report)?;
    writeln!(
        report,
        "| method | lr (chosen on validation) | final avg accuracy | forgetting | task inference | modules |"
    )?;
    writeln!(report, "|---|---|---|---|---|---|")?;
    for m in 0..runs[0][0].len() {
        let val_mean = |l: usize| {
            mean_sd(
                &runs[l]
                    .iter()
                    .map(|r| r[m].sets[VAL].avg)
                    .collect::<Vec<_>>(),
            )
            .0
        };
        let best = (0..LRS.len())
            .max_by(|&a, &b| val_mean(a).total_cmp(&val_mean(b)))
            .unwrap_or(0);
        let chosen = &runs[best];
        let test = |f: &dyn Fn(&Metrics) -> f64| -> String {
            pm(&chosen
                .iter()
                .map(|r| f(&r[m].sets[TEST]))
                .collect::<Vec<_>>())
        };
        let inference = match chosen[0][m].sets[TEST].inference {
            Inference::None => "—".to_string(),
            Inference::Given => "(given)".to_string(),
            Inference::Measured(_) => test(&|x| match x.inference {
                Inference::Measured(v) => v,
                _ => f64::NAN,
            }),
        };
        writeln!(
            report,
            "| {} | {:e} (val {:.1}) | {} | {} | {inference} | {} |",
            chosen[0][m].method,
            LRS[best],
            val_mean(best),
            test(&|x| x.avg),
            test(&|x| x.forgetting),
            chosen[0][m].modules
        )?;
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (x, y) = load_digits()?;
    let splits = Splits::new(y.len(), 11, 0.15);
    let (train_rows, val_rows, test_rows) = (&splits.train, &splits.val, &splits.test);
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
        Task {
            train_x,
            train_y,
            sets: [pick(val_rows, keep, q), pick(test_rows, keep, q)],
        }
    };
    let split: Vec<Task> = (0..5).map(|t| make(&move |c| c / 2 == t, 0)).collect();
    let rotated: Vec<Task> = (0..4).map(|q| make(&|_| true, q)).collect();
    let mut report = String::new();
    writeln!(report, "# Continual learning on UCI digits")?;
    writeln!(report)?;
    writeln!(
        report,
        "Generated by `cargo run --release --features wgpu,cli --example continual_digits`. Accuracy in % on each task's held-out test images after the last task; forgetting is the mean drop from each task's best accuracy to its final one; task inference is how often the right task's module or head was chosen without a task id (the oracle is given it). Chance is 10 % (10 classes); chance task inference is 20 % (split) and 25 % (rotated)."
    )?;
    writeln!(report)?;
    writeln!(
        report,
        "Protocol: {} training, {} validation and {} test images (before the split into tasks). Each method's Adam learning rate is chosen from {{1e-3, 3e-3, 1e-2}} by its mean final validation accuracy over the seeds (shown as `val`); the figures are test mean ± sd over seeds {SEEDS:?} at that learning rate. L2R and similarity selection retrain their router on the memory after every task, so their forgetting is measured like the others'.",
        train_rows.len(),
        val_rows.len(),
        test_rows.len()
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
        benchmark_table(name, tasks, &mut report)?;
    }
    print!("{report}");
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/continual_digits.md");
    modula::io::atomic_write(&out, report.as_bytes())?;
    println!("table written to {}", out.display());
    Ok(())
}
