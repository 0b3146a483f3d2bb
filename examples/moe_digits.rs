//! Trains a small mixture-of-experts classifier on the UCI digits shipped in `data/`, then
//! prints per-expert load and accuracy and writes a routing heatmap.
//!
//! `cargo run --release --features wgpu --example moe_digits`
//!
//! Model: `Linear(64 → 32)`, then a residual top-2-of-4 SwiGLU MoE layer (load-balancing and
//! z-losses added to the cross-entropy), then `Linear(32 → 10)`. The heatmap
//! `docs/moe_digits_routing.png` has one row per expert (top to bottom: expert 0..3) and one
//! column per class (left to right: digit 0..9); a cell's colour is the share of that class's
//! test tokens routed to that expert (white 0, blue 1; each column sums to k = 2). The same
//! matrix is printed as a table.

use std::fmt::Write as _;
use std::io::Read;
use std::path::PathBuf;

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData};
use indicatif::{ProgressBar, ProgressStyle};
use modula::{ExpertConfig, MoeLayer, Routing, TopKRouterConfig};
use plotters::prelude::*;

const EXPERTS: usize = 4;
const CLASSES: usize = 10;

#[derive(Module, Debug)]
struct Classifier {
    input: Linear,
    moe: MoeLayer,
    output: Linear,
}

impl Classifier {
    fn forward(&self, x: Tensor<2>) -> modula::Result<(Tensor<2>, Routing)> {
        let h = burn::tensor::activation::gelu(self.input.forward(x));
        let (m, routing) = self.moe.forward(h.clone())?;
        Ok((self.output.forward(h + m), routing))
    }
}

fn load_digits() -> Result<(Vec<f32>, Vec<i64>), Box<dyn std::error::Error>> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/digits.csv.gz");
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(&path)?).read_to_string(&mut text)?;
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for (n, line) in text.lines().enumerate() {
        let v: Vec<f32> = line
            .split(',')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{}:{}: {e}", path.display(), n + 1))?;
        if v.len() != 65 {
            return Err(format!(
                "{}:{}: expected 65 values, got {}",
                path.display(),
                n + 1,
                v.len()
            )
            .into());
        }
        x.extend(v[..64].iter().map(|p| p / 16.0));
        y.push(v[64] as i64);
    }
    Ok((x, y))
}

fn batch(x: &[f32], y: &[i64], rows: &[usize], device: &Device) -> (Tensor<2>, Tensor<1, Int>) {
    let xs: Vec<f32> = rows
        .iter()
        .flat_map(|&r| x[r * 64..(r + 1) * 64].iter().copied())
        .collect();
    let ys: Vec<i64> = rows.iter().map(|&r| y[r]).collect();
    (
        Tensor::from_data(TensorData::new(xs, [rows.len(), 64]), device),
        Tensor::from_data(TensorData::new(ys, [rows.len()]), device),
    )
}

fn shuffle(v: &mut [usize], state: &mut u64) {
    for i in (1..v.len()).rev() {
        *state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        v.swap(i, ((*state >> 33) % (i as u64 + 1)) as usize);
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (x, y) = load_digits()?;
    let n = y.len();
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = 42u64;
    shuffle(&mut order, &mut rng);
    let (train, test) = order.split_at(n * 4 / 5);
    println!("digits: {} train, {} test", train.len(), test.len());

    let device = Device::flex().autodiff();
    device.seed(0);
    let mut model = Classifier {
        input: LinearConfig::new(64, 32).init(&device),
        moe: MoeLayer::new(
            &TopKRouterConfig::new(32, EXPERTS).with_k(2),
            &ExpertConfig::new(32, 64),
            &device,
        )?,
        output: LinearConfig::new(32, CLASSES).init(&device),
    };
    let ce = CrossEntropyLossConfig::new().init(&device);
    let mut optim = AdamConfig::new().init();
    let epochs = 40;
    let bar = ProgressBar::new(epochs);
    bar.set_style(ProgressStyle::with_template(
        "{bar:40} epoch {pos}/{len} {msg}",
    )?);
    let mut train_rows = train.to_vec();
    for _ in 0..epochs {
        shuffle(&mut train_rows, &mut rng);
        let mut total = 0.0;
        for rows in train_rows.chunks(64) {
            let (xb, yb) = batch(&x, &y, rows, &device);
            let (logits, routing) = model.forward(xb)?;
            let loss = ce.forward(logits, yb) + routing.total_aux_loss();
            total += loss.clone().into_scalar::<f32>() * rows.len() as f32;
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(3e-3, model, grads);
        }
        bar.set_message(format!("loss {:.3}", total / train_rows.len() as f32));
        bar.inc(1);
    }
    bar.finish();

    // Evaluation on the held-out rows.
    let eval = model.valid();
    let cpu = Device::flex();
    let (xt, _) = batch(&x, &y, test, &cpu);
    let (logits, routing) = eval.forward(xt)?;
    let pred: Vec<i64> = logits.argmax(1).into_data().iter::<i64>().collect();
    let idx: Vec<i64> = routing.indices().into_data().iter::<i64>().collect();
    let k = routing.k();
    let mut per_expert_total = [0usize; EXPERTS];
    let mut per_expert_correct = [0usize; EXPERTS];
    let mut heat = [[0f64; CLASSES]; EXPERTS];
    let mut class_tokens = [0f64; CLASSES];
    let mut correct = 0;
    for (i, &row) in test.iter().enumerate() {
        let ok = pred[i] == y[row];
        correct += usize::from(ok);
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
        "# MoE on UCI digits (generated by `cargo run --release --example moe_digits`)\n"
    )?;
    writeln!(
        report,
        "test accuracy: {:.1} % ({} test rows, {EXPERTS} experts, top-{k})\n",
        100.0 * correct as f64 / test.len() as f64,
        test.len()
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
