//! End-task-aware training on handwritten digits with few labels (TARTAN, Dery et al. 2021,
//! arXiv 2109.07437; AANG, Dery et al. 2022, arXiv 2205.14082).
//!
//! The end task: classify the UCI 8×8 digits from 5 labelled images per class (50 in all). An
//! unlabelled-looking pool of 1,000 other images carries the auxiliary objectives:
//! - **coarse** (helpful): the pool's true "0–4 or 5–9" label;
//! - **shuffled** (harmful): the pool's digit labels, randomly permuted;
//! - **rotation** (self-supervised): which of four quarter turns was applied;
//! - **denoise** (self-supervised): the image's pixels from a copy with half of them zeroed.
//!
//! A shared body (64 → 128 → 64, ReLU) with one head per output, trained by
//! - **end task only**;
//! - **MT-TARTAN**: the end task and all four auxiliaries with equal weights;
//! - **META-TARTAN**: the same objectives with weights learned by the dev-head
//!   meta-gradient `−cos(∇_body L_i, ∇_body L_dev)` (a separate head trained on 100 held-out
//!   labelled images, the dev set);
//! - **AANG**: auxiliaries sampled from a space of stages (input: end-task images or pool;
//!   transform: none, rotate, mask; representation: the body; output: digit, coarse,
//!   shuffled, rotation, pixels) with illegal tuples excluded, factored weights learned by the
//!   same meta-gradient.
//!
//! Test accuracy over 5 seeds and the learned weights; writes docs/tartan_digits.md.
//! `--quick` runs a few steps and only prints.
//!
//! Run: `cargo run --release --features wgpu,cli --example tartan_digits`

#[path = "common/alloc.rs"]
mod alloc;
#[path = "common/digits.rs"]
mod digits;
#[path = "common/progress.rs"]
mod progress;

use std::fmt::Write as _;
use std::path::PathBuf;

use burn::module::Module;
use burn::nn::loss::{CrossEntropyLossConfig, MseLoss, Reduction};
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Int, Tensor, TensorData};
use digits::{PIXELS, load_digits, rotate, shuffle};
use modula::transfer::{ObjectiveSpace, Stage, TaskWeights, flat_gradient, meta_gradients};
use progress::bar;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const SEEDS: [u64; 5] = [0, 1, 2, 3, 4];
const PER_CLASS: usize = 5;
const DEV: usize = 100;
const POOL: usize = 1000;
const BATCH: usize = 32;
const LR: f64 = 3e-3;
const META_LR: f64 = 0.1;

/// The objectives of MT- and META-TARTAN, in weight order.
const OBJECTIVES: [&str; 5] = ["end task", "coarse", "shuffled", "rotation", "denoise"];

/// The shared body.
#[derive(Module, Debug)]
struct Body {
    l1: Linear,
    l2: Linear,
}

impl Body {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        relu(self.l2.forward(relu(self.l1.forward(x))))
    }
}

/// The body and one head per output: digit (10), coarse (2), shuffled digit (10), rotation
/// (4), pixels (64).
#[derive(Module, Debug)]
struct Net {
    body: Body,
    digit: Linear,
    coarse: Linear,
    shuffled: Linear,
    rotation: Linear,
    pixels: Linear,
}

/// The data of one seed.
struct Split {
    x: Vec<f32>,
    train: Vec<usize>,
    dev: Vec<usize>,
    pool: Vec<usize>,
    test: Vec<usize>,
    y: Vec<i64>,
    /// The pool's shuffled labels, by image index.
    shuffled: Vec<i64>,
}

fn split(x: &[f32], y: &[i64], seed: u64) -> Split {
    let mut order: Vec<usize> = (0..y.len()).collect();
    let mut state = seed.wrapping_add(0x5EED);
    shuffle(&mut order, &mut state);
    let mut train = Vec::new();
    let mut counts = [0usize; 10];
    let mut rest = Vec::new();
    for &i in &order {
        let c = y[i] as usize;
        if counts[c] < PER_CLASS {
            counts[c] += 1;
            train.push(i);
        } else {
            rest.push(i);
        }
    }
    let dev = rest[..DEV].to_vec();
    let pool = rest[DEV..DEV + POOL].to_vec();
    let test = rest[DEV + POOL..].to_vec();
    let mut perm: Vec<usize> = pool.clone();
    shuffle(&mut perm, &mut state);
    let mut shuffled = vec![0i64; y.len()];
    for (&i, &j) in pool.iter().zip(&perm) {
        shuffled[i] = y[j];
    }
    Split {
        x: x.to_vec(),
        train,
        dev,
        pool,
        test,
        y: y.to_vec(),
        shuffled,
    }
}

/// Rows `idx` of the images as `[n, 64]`, transformed: `rot` quarter turns each (given per
/// row) or, with `mask`, every other pixel zeroed from a per-row offset.
fn images(
    s: &Split,
    idx: &[usize],
    rot: Option<&[usize]>,
    mask: bool,
    device: &Device,
) -> Tensor<2> {
    let mut v = Vec::with_capacity(idx.len() * PIXELS);
    for (r, &i) in idx.iter().enumerate() {
        let img = &s.x[i * PIXELS..(i + 1) * PIXELS];
        let mut img = match rot {
            Some(q) => rotate(img, q[r]),
            None => img.to_vec(),
        };
        if mask {
            img.iter_mut()
                .enumerate()
                .filter(|(p, _)| (p + r) % 2 == 0)
                .for_each(|(_, v)| *v = 0.0);
        }
        v.extend(img);
    }
    Tensor::from_data(TensorData::new(v, [idx.len(), PIXELS]), device)
}

fn labels(v: Vec<i64>, device: &Device) -> Tensor<1, Int> {
    let n = v.len();
    Tensor::from_data(TensorData::new(v, [n]), device)
}

/// A draw of `n` indices from `from` (a small LCG per call site state).
fn draw(from: &[usize], n: usize, state: &mut u64) -> Vec<usize> {
    (0..n)
        .map(|_| {
            *state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            from[((*state >> 33) % from.len() as u64) as usize]
        })
        .collect()
}

/// One objective's loss on a fresh batch: `input` 0 end-task images, 1 pool; `transform` 0
/// none, 1 rotate, 2 mask; `output` 0 digit, 1 coarse, 2 shuffled, 3 rotation, 4 pixels.
fn objective_loss(
    net: &Net,
    s: &Split,
    (input, transform, output): (usize, usize, usize),
    state: &mut u64,
    device: &Device,
) -> Tensor<1> {
    let from = if input == 0 { &s.train } else { &s.pool };
    let idx = draw(from, BATCH, state);
    let rot: Vec<usize> = idx.iter().enumerate().map(|(r, &i)| (r + i) % 4).collect();
    let x = images(
        s,
        &idx,
        (transform == 1).then_some(rot.as_slice()),
        transform == 2,
        device,
    );
    let h = net.body.forward(x);
    let ce = CrossEntropyLossConfig::new().init(device);
    match output {
        0 => ce.forward(
            net.digit.forward(h),
            labels(idx.iter().map(|&i| s.y[i]).collect(), device),
        ),
        1 => ce.forward(
            net.coarse.forward(h),
            labels(
                idx.iter().map(|&i| i64::from(s.y[i] >= 5)).collect(),
                device,
            ),
        ),
        2 => ce.forward(
            net.shuffled.forward(h),
            labels(idx.iter().map(|&i| s.shuffled[i]).collect(), device),
        ),
        3 => ce.forward(
            net.rotation.forward(h),
            labels(rot.iter().map(|&q| q as i64).collect(), device),
        ),
        _ => MseLoss::new().forward(
            net.pixels.forward(h),
            images(s, &idx, None, false, device),
            Reduction::Mean,
        ),
    }
}

/// The fixed objectives of MT/META-TARTAN as (input, transform, output).
const TARTAN_TUPLES: [(usize, usize, usize); 5] =
    [(0, 0, 0), (1, 0, 1), (1, 0, 2), (1, 1, 3), (1, 2, 4)];

/// The dev head's loss on a dev batch (the body's gradient from it is `g_dev`).
fn dev_loss(body: &Body, head: &Linear, s: &Split, state: &mut u64, device: &Device) -> Tensor<1> {
    let idx = draw(&s.dev, BATCH, state);
    let h = body.forward(images(s, &idx, None, false, device));
    CrossEntropyLossConfig::new().init(device).forward(
        head.forward(h),
        labels(idx.iter().map(|&i| s.y[i]).collect(), device),
    )
}

fn accuracy(net: &Net, s: &Split, device: &Device) -> f64 {
    let x = images(s, &s.test, None, false, device);
    let pred: Vec<i64> = net
        .digit
        .forward(net.body.forward(x))
        .argmax(1)
        .into_data()
        .iter::<i64>()
        .collect();
    let right = pred
        .iter()
        .zip(&s.test)
        .filter(|(p, i)| **p == s.y[**i])
        .count();
    100.0 * right as f64 / s.test.len() as f64
}

#[derive(Clone, Copy, PartialEq)]
enum Method {
    EndOnly,
    Mt,
    Meta,
    Aang,
}

fn space() -> Res<ObjectiveSpace> {
    let mut space = ObjectiveSpace::new(vec![
        Stage::new("input", &["end-task", "pool"]),
        Stage::new("transform", &["none", "rotate", "mask"]),
        Stage::new("representation", &["body"]),
        Stage::new(
            "output",
            &["digit", "coarse", "shuffled", "rotation", "pixels"],
        ),
    ])?;
    // Labels exist only where they were given: digits for the end-task images, coarse and
    // shuffled labels for the pool; the end-task objective itself is always trained.
    space.exclude(&[("input", "pool"), ("output", "digit")])?;
    space.exclude(&[("input", "end-task"), ("output", "coarse")])?;
    space.exclude(&[("input", "end-task"), ("output", "shuffled")])?;
    space.exclude(&[
        ("input", "end-task"),
        ("transform", "none"),
        ("output", "digit"),
    ])?;
    // A rotation label needs a rotation; pixels to restore need a mask.
    for t in ["none", "mask"] {
        space.exclude(&[("transform", t), ("output", "rotation")])?;
    }
    for t in ["none", "rotate"] {
        space.exclude(&[("transform", t), ("output", "pixels")])?;
    }
    Ok(space)
}

/// Trains one method on one seed: test accuracy, TARTAN's final weights, AANG's space.
fn run(
    method: Method,
    s: &Split,
    seed: u64,
    steps: usize,
) -> Res<(f64, Vec<f64>, Option<ObjectiveSpace>)> {
    let device = Device::flex().autodiff();
    device.seed(seed);
    let lin = |i, o| LinearConfig::new(i, o).init(&device);
    let mut net = Net {
        body: Body {
            l1: lin(PIXELS, 128),
            l2: lin(128, 64),
        },
        digit: lin(64, 10),
        coarse: lin(64, 2),
        shuffled: lin(64, 10),
        rotation: lin(64, 4),
        pixels: lin(64, PIXELS),
    };
    let mut dev_head = lin(64, 10);
    let mut optim = AdamConfig::new().init();
    let mut dev_optim = AdamConfig::new().init();
    let mut weights = TaskWeights::equal(OBJECTIVES.len());
    let mut aang = space()?;
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for step in 0..steps {
        let loss = match method {
            Method::EndOnly => objective_loss(&net, s, TARTAN_TUPLES[0], &mut state, &device),
            Method::Mt | Method::Meta => {
                if method == Method::Meta {
                    let dev = flat_gradient(
                        dev_loss(&net.body, &dev_head, s, &mut state.clone(), &device),
                        &net.body,
                    );
                    let grads: Vec<Vec<f64>> = TARTAN_TUPLES
                        .iter()
                        .map(|&t| {
                            flat_gradient(
                                objective_loss(&net, s, t, &mut state.clone(), &device),
                                &net.body,
                            )
                        })
                        .collect();
                    weights.meta_step(&grads, &dev, META_LR)?;
                }
                let losses = TARTAN_TUPLES
                    .iter()
                    .map(|&t| objective_loss(&net, s, t, &mut state, &device))
                    .collect();
                weights.combine(losses)?
            }
            Method::Aang => {
                let sampled = aang.sample(3, seed * 1_000_003 + step as u64)?;
                let tuple = |t: &[usize]| (t[0], t[1], t[3]);
                let dev = flat_gradient(
                    dev_loss(&net.body, &dev_head, s, &mut state.clone(), &device),
                    &net.body,
                );
                let grads: Vec<Vec<f64>> = sampled
                    .iter()
                    .map(|t| {
                        flat_gradient(
                            objective_loss(&net, s, tuple(t), &mut state.clone(), &device),
                            &net.body,
                        )
                    })
                    .collect();
                let meta = meta_gradients(&grads, &dev)?;
                aang.meta_step(&sampled, &meta, META_LR)?;
                let mut total = objective_loss(&net, s, TARTAN_TUPLES[0], &mut state, &device);
                for t in &sampled {
                    total = total
                        + objective_loss(&net, s, tuple(t), &mut state, &device)
                            .div_scalar(sampled.len() as f64);
                }
                total
            }
        };
        let g = GradientsParams::from_grads(loss.backward(), &net);
        net = optim.step(LR, net, g);
        if matches!(method, Method::Meta | Method::Aang) {
            // The dev head follows the body (the body does not learn from the dev set).
            let l = dev_loss(&net.body, &dev_head, s, &mut state, &device);
            let g = GradientsParams::from_grads(l.backward(), &dev_head);
            dev_head = dev_optim.step(LR, dev_head, g);
        }
    }
    let acc = accuracy(&net.valid(), s, &Device::flex());
    Ok((
        acc,
        weights.weights(),
        (method == Method::Aang).then_some(aang),
    ))
}

fn main() -> Res<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let steps = if quick { 5 } else { 400 };
    let seeds: &[u64] = if quick { &SEEDS[..1] } else { &SEEDS };
    let (x, y) = load_digits()?;
    let methods = [
        (Method::EndOnly, "end task only"),
        (Method::Mt, "MT-TARTAN (equal weights)"),
        (Method::Meta, "META-TARTAN (learned weights)"),
        (Method::Aang, "AANG (sampled objectives, factored weights)"),
    ];
    let pb = bar(methods.len() * seeds.len(), "train")?;
    let mut md = String::new();
    let mut rows = Vec::new();
    let mut meta_weights = vec![0.0; OBJECTIVES.len()];
    let mut aang_top: Vec<(String, f64)> = Vec::new();
    for (method, name) in methods {
        let mut accs = Vec::new();
        for &seed in seeds {
            let s = split(&x, &y, seed);
            let (acc, w, space) = run(method, &s, seed, steps)?;
            accs.push(acc);
            if method == Method::Meta {
                meta_weights
                    .iter_mut()
                    .zip(&w)
                    .for_each(|(a, b)| *a += b / seeds.len() as f64);
            }
            if let Some(space) = space {
                for (t, p) in space.weights()? {
                    let n = space.name(&t);
                    match aang_top.iter_mut().find(|(m, _)| *m == n) {
                        Some(e) => e.1 += p / seeds.len() as f64,
                        None => aang_top.push((n, p / seeds.len() as f64)),
                    }
                }
            }
            pb.inc(1);
        }
        rows.push((name, accs));
    }
    pb.finish();
    let ms = |v: &[f64]| {
        let m = v.iter().sum::<f64>() / v.len() as f64;
        let sd =
            (v.iter().map(|a| (a - m).powi(2)).sum::<f64>() / (v.len().max(2) - 1) as f64).sqrt();
        format!("{m:.1} ± {sd:.1}")
    };
    writeln!(
        md,
        "# End-task-aware training on digits with few labels (issue 15)\n\n\
         Generated by `cargo run --release --features wgpu,cli --example tartan_digits`. The \
         UCI 8×8 digits: {PER_CLASS} labelled training images per class, a dev set of {DEV} \
         labelled images (META-TARTAN's and AANG's dev head only), a pool of {POOL} images \
         for the auxiliaries, the remaining images for test. Body 64 → 128 → 64 (ReLU), one \
         head per output, {steps} steps of Adam (lr {LR}) on batches of {BATCH}; meta \
         learning rate {META_LR}. Test accuracy in %, mean ± sd over seeds {seeds:?}.\n\n\
         | method | test accuracy (%) |\n|---|---:|"
    )?;
    for (name, accs) in &rows {
        writeln!(md, "| {name} | {} |", ms(accs))?;
    }
    writeln!(
        md,
        "\nMETA-TARTAN's final weights (mean over seeds; equal is {:.2}):\n\n| objective | weight |\n|---|---:|",
        1.0 / OBJECTIVES.len() as f64
    )?;
    for (o, w) in OBJECTIVES.iter().zip(&meta_weights) {
        writeln!(md, "| {o} | {w:.3} |")?;
    }
    aang_top.sort_by(|a, b| b.1.total_cmp(&a.1));
    writeln!(
        md,
        "\nAANG's legal objectives by final weight (mean over seeds; input/transform/representation/output):\n\n| objective | weight |\n|---|---:|"
    )?;
    for (n, p) in &aang_top {
        writeln!(md, "| {n} | {p:.3} |")?;
    }
    println!("{md}");
    if !quick {
        let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/tartan_digits.md");
        std::fs::write(&out, &md)?;
    }
    Ok(())
}
