//! Trains a small mixture-of-experts classifier on the UCI digits shipped in `data/`, then
//! prints per-expert load and accuracy and writes a routing heatmap.
//!
//! `cargo run --release --features wgpu,cli --example moe_digits`
//!
//! Model: `Linear(64 → 32)`, then a residual top-2-of-4 SwiGLU MoE layer (load-balancing and
//! z-losses added to the cross-entropy), then `Linear(32 → 10)`. The heatmap
//! `docs/moe_digits_routing.png` has one row per expert (top to bottom: expert 0..3) and one
//! column per class (left to right: digit 0..9); a cell's colour is the share of that class's
//! test tokens routed to that expert (white 0, blue 1; each column sums to k = 2). The same
//! matrix is printed as a table.
//!
//! Protocol: 15 % of the training rows are a validation slice. The Adam learning rate is
//! chosen from {1e-3, 3e-3, 1e-2} by the mean validation accuracy over 3 seeds; the table
//! gives the test accuracy at that rate as mean ± sd over the seeds, and the per-expert
//! figures and the heatmap of the first seed.

#[path = "common/alloc.rs"]
mod alloc;

use std::fmt::Write as _;
use std::path::PathBuf;

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use modula::MoeLayerConfig;
use modula::{ExpertConfig, MoeLayer, Routing, TopKRouterConfig};
use plotters::prelude::*;

#[path = "common/digits.rs"]
mod digits;
use digits::{CLASSES, Splits, batch, load_digits, mean_sd, pm, shuffle};

const EXPERTS: usize = 4;
/// Learning rates tried on the validation slice.
const LRS: [f64; 3] = [1e-3, 3e-3, 1e-2];
/// Seeds every learning rate runs with.
const SEEDS: [u64; 3] = [0, 1, 2];

#[derive(Module, Debug)]
struct Classifier {
    input: Linear,
    moe: MoeLayer,
    output: Linear,
}

impl Classifier {
    fn new(device: &Device) -> modula::Result<Self> {
        Ok(Self {
            input: LinearConfig::new(64, 32).init(device),
            moe: MoeLayerConfig::new(
                TopKRouterConfig::new(32, EXPERTS).with_k(2),
                ExpertConfig::new(32, 64),
            )
            .init(device)?,
            output: LinearConfig::new(32, CLASSES).init(device),
        })
    }

    fn forward(&self, x: Tensor<2>) -> modula::Result<(Tensor<2>, Routing)> {
        let h = burn::tensor::activation::gelu(self.input.forward(x));
        let (m, routing) = self.moe.forward(h.clone())?;
        Ok((self.output.forward(h + m), routing))
    }
}

/// Trains one model (seed, learning rate) on `train` for 40 epochs.
fn train_model(
    x: &[f32],
    y: &[i64],
    train: &[usize],
    seed: u64,
    lr: f64,
    bar: &ProgressBar,
) -> Result<Classifier, Box<dyn std::error::Error>> {
    let device = Device::flex().autodiff();
    device.seed(seed);
    let mut rng = 42u64.wrapping_add(seed);
    let mut model = Classifier::new(&device)?;
    let ce = CrossEntropyLossConfig::new().init(&device);
    let mut optim = AdamConfig::new().init();
    let mut train_rows = train.to_vec();
    for _ in 0..40 {
        shuffle(&mut train_rows, &mut rng);
        let mut total = 0.0;
        for rows in train_rows.chunks(64) {
            let (xb, yb) = batch(x, y, rows, &device);
            let (logits, routing) = model.forward(xb)?;
            let loss = ce.forward(logits, yb) + routing.total_aux_loss();
            total += loss.clone().into_scalar::<f32>() * rows.len() as f32;
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(lr, model, grads);
        }
        bar.set_message(format!(
            "seed {seed}, lr {lr:e}: loss {:.3}",
            total / train_rows.len() as f32
        ));
        bar.inc(1);
    }
    Ok(model)
}

/// Accuracy in % of a trained model on `rows`, with its routing.
fn evaluate(
    model: &Classifier,
    x: &[f32],
    y: &[i64],
    rows: &[usize],
) -> modula::Result<(f64, Vec<i64>, Routing)> {
    let eval = model.clone().valid();
    let (xt, _) = batch(x, y, rows, &Device::flex());
    let (logits, routing) = eval.forward(xt)?;
    let pred: Vec<i64> = logits.argmax(1).into_data().iter::<i64>().collect();
    let correct = rows
        .iter()
        .zip(&pred)
        .filter(|(r, p)| y[**r] == **p)
        .count();
    Ok((100.0 * correct as f64 / rows.len() as f64, pred, routing))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (x, y) = load_digits()?;
    let splits = Splits::new(y.len(), 42, 0.15);
    println!("digits: {}", splits.summary());
    let (train, val, test) = (&splits.train, &splits.val, &splits.test);

    let bar = ProgressBar::new((40 * LRS.len() * SEEDS.len()) as u64);
    bar.set_style(ProgressStyle::with_template(
        "{bar:40} epoch {pos}/{len} {msg}",
    )?);
    // models[lr][seed], with their validation accuracies.
    let mut models: Vec<Vec<(Classifier, f64)>> = Vec::new();
    for &lr in &LRS {
        let mut per_seed = Vec::new();
        for &seed in &SEEDS {
            let m = train_model(&x, &y, train, seed, lr, &bar)?;
            let (acc, _, _) = evaluate(&m, &x, &y, val)?;
            per_seed.push((m, acc));
        }
        models.push(per_seed);
    }
    bar.finish();
    let val_mean = |l: usize| mean_sd(&models[l].iter().map(|(_, a)| *a).collect::<Vec<_>>()).0;
    let best = (0..LRS.len())
        .max_by(|&a, &b| val_mean(a).total_cmp(&val_mean(b)))
        .unwrap_or(0);
    let mut test_accs = Vec::new();
    for (m, _) in &models[best] {
        test_accs.push(evaluate(m, &x, &y, test)?.0);
    }

    // Per-expert figures of the first seed at the chosen learning rate.
    let (_, pred, routing) = evaluate(&models[best][0].0, &x, &y, test)?;
    let idx: Vec<i64> = routing.indices().into_data().iter::<i64>().collect();
    let k = routing.k();
    let mut per_expert_total = [0usize; EXPERTS];
    let mut per_expert_correct = [0usize; EXPERTS];
    let mut heat = [[0f64; CLASSES]; EXPERTS];
    let mut class_tokens = [0f64; CLASSES];
    for (i, &row) in test.iter().enumerate() {
        let ok = pred[i] == y[row];
        class_tokens[y[row] as usize] += 1.0;
        for j in 0..k {
            let e = idx[i * k + j];
            if e >= 0 {
                let e = e as usize;
                per_expert_total[e] += 1;
                per_expert_correct[e] += usize::from(ok);
                heat[e][y[row] as usize] += 1.0;
            }
        }
    }
    let mut report = String::new();
    writeln!(
        report,
        "# MoE on UCI digits (generated by `cargo run --release --features wgpu,cli --example moe_digits`)\n"
    )?;
    writeln!(
        report,
        "test accuracy: {} % (mean ± sd over seeds {SEEDS:?}; {} test rows, {EXPERTS} experts, top-{k}).\n",
        pm(&test_accs),
        test.len()
    )?;
    writeln!(
        report,
        "Adam learning rate {:e}, chosen from {LRS:?} on a validation slice of {} training rows (mean validation accuracy per rate: {}); {} rows train.\n",
        LRS[best],
        val.len(),
        (0..LRS.len())
            .map(|l| format!("{:.1}", val_mean(l)))
            .collect::<Vec<_>>()
            .join(" / "),
        train.len()
    )?;
    writeln!(
        report,
        "Per expert, on the test rows (seed {}):\n",
        SEEDS[0]
    )?;
    writeln!(
        report,
        "| expert | load (slots) | share | accuracy of its tokens |"
    )?;
    writeln!(report, "|---|---|---|---|")?;
    for e in 0..EXPERTS {
        writeln!(
            report,
            "| {e} | {} | {:.1} % | {:.1} % |",
            per_expert_total[e],
            100.0 * per_expert_total[e] as f64 / (test.len() * k) as f64,
            100.0 * per_expert_correct[e] as f64 / per_expert_total[e].max(1) as f64
        )?;
    }
    writeln!(
        report,
        "\nShare of each digit's tokens routed to each expert (columns sum to k = {k}):\n"
    )?;
    let header: Vec<String> = (0..CLASSES).map(|c| c.to_string()).collect();
    writeln!(report, "| expert | {} |", header.join(" | "))?;
    writeln!(report, "|---|{}", "---|".repeat(CLASSES))?;
    for (e, row) in heat.iter_mut().enumerate() {
        for (c, v) in row.iter_mut().enumerate() {
            *v /= class_tokens[c].max(1.0);
        }
        let cells: Vec<String> = row.iter().map(|v| format!("{v:.2}")).collect();
        writeln!(report, "| {e} | {} |", cells.join(" | "))?;
    }
    print!("{report}");
    let table = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/moe_digits.md");
    modula::io::atomic_write(&table, report.as_bytes())?;
    println!("results table written to {}", table.display());

    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/moe_digits_routing.png");
    let cell = 40u32;
    let area = BitMapBackend::new(&out, (cell * CLASSES as u32, cell * EXPERTS as u32))
        .into_drawing_area();
    area.fill(&WHITE)?;
    for (e, row) in heat.iter().enumerate() {
        for (c, v) in row.iter().enumerate() {
            let shade = (255.0 * (1.0 - v.clamp(0.0, 1.0))) as u8;
            let (x0, y0) = (c as i32 * cell as i32, e as i32 * cell as i32);
            area.draw(&Rectangle::new(
                [(x0, y0), (x0 + cell as i32 - 1, y0 + cell as i32 - 1)],
                RGBColor(shade, shade, 255).filled(),
            ))?;
        }
    }
    area.present()?;
    println!("routing heatmap written to {}", out.display());
    Ok(())
}
