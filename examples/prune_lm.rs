//! Structured pruning of a language model with forward passes only (Bonsai, Dery et al. 2024,
//! arXiv 2402.05406), against one-shot baselines, then adaptation back to the unpruned model.
//!
//! 1. Pre-train the byte-level Llama of `modular_lm` (d = 128, 4 layers, 4 heads over 2
//!    key/value heads) on the six domains of data/.
//! 2. Prune its attention heads and feed-forward neurons to 30 % and 50 % of its prunable
//!    parameters removed, by: random units, weight magnitude, the Wanda-style prior alone
//!    (activation RMS × mean |outgoing weight|, one shot), and Bonsai (rounds of 5 %:
//!    antithetic sub-models scored by −loss on calibration text, a cross-validated lasso over
//!    the masks, global removal within the round's budget). The pruning uses the plain CPU
//!    device: no autodiff device exists until adaptation.
//! 3. Measure bits per byte on held-out text of every domain, the pruned model's forward
//!    speed-up (the weights are sliced, not masked), then adapt each pruned model with a
//!    rank-8 LoRA trained to the unpruned model's distribution (KL to the teacher) and measure
//!    again.
//!
//! Writes docs/prune_lm.md; `--quick` runs every stage for a few steps and only prints.
//!
//! Run: `cargo run --release --features wgpu,cli --example prune_lm`

#[path = "common/alloc.rs"]
mod alloc;
#[path = "common/byte_lm.rs"]
mod byte_lm;
#[path = "common/progress.rs"]
mod progress;
#[path = "common/rng.rs"]
mod rng;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use burn::module::Module;
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::Device;
use byte_lm::{Res, SEQ, lm_loss, mean_bpb, sample, to_ids};
use modula::LoraConfig;
use modula::models::{LinearLayers, LlamaForCausalLm, distillation_loss};
use modula::prune::{BonsaiConfig, Prior, Prunable, bonsai, one_shot};
use progress::bar;
use rng::Rng;

/// Steps of each stage (full run, `--quick`).
struct Budget {
    pretrain: usize,
    adapt: usize,
    pairs: usize,
    eval_windows: usize,
    timing_runs: usize,
}

/// The pruning methods compared.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Method {
    Random,
    Magnitude,
    Wanda,
    Bonsai,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Self::Random => "random (one shot)",
            Self::Magnitude => "weight magnitude (one shot)",
            Self::Wanda => "activation × weight prior (Wanda-style, one shot)",
            Self::Bonsai => "Bonsai (forward passes only)",
        }
    }
}

/// Mean bits per byte over the test text of every domain.
/// Median seconds of a forward pass over 16 windows.
fn forward_secs(
    model: &LlamaForCausalLm,
    windows: &[&[u8]],
    runs: usize,
    device: &Device,
) -> Res<f64> {
    let ids = to_ids(windows, device);
    // One warm-up pass.
    let _ = model.forward(ids.clone())?.into_data();
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let t0 = Instant::now();
            let out = model.forward(ids.clone()).map(|l| l.into_data());
            out.map(|_| t0.elapsed().as_secs_f64())
        })
        .collect::<modula::Result<_>>()?;
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn main() -> Res<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let budget = if quick {
        Budget {
            pretrain: 20,
            adapt: 3,
            pairs: 5,
            eval_windows: 4,
            timing_runs: 3,
        }
    } else {
        Budget {
            pretrain: 400,
            adapt: 60,
            pairs: 40,
            eval_windows: 64,
            timing_runs: 9,
        }
    };
    let started = Instant::now();
    let train = byte_lm::read_all("train")?;
    let test = byte_lm::read_all("test")?;
    let texts: Vec<&[u8]> = train.iter().map(Vec::as_slice).collect();

    let cpu = Device::flex();
    let ad = cpu.clone().autodiff();
    let mut rng = Rng(1);
    let teacher_ad = byte_lm::pretrain(&texts, budget.pretrain, &ad, &mut rng)?.no_grad();
    let base = teacher_ad.clone().valid();
    let pre_secs = started.elapsed().as_secs_f64();

    // Calibration: 8 training windows, the metric every pruning method sees.
    let mut cal_rng = Rng(99);
    let calibration: Vec<&[u8]> = sample(&texts, &mut cal_rng).into_iter().take(8).collect();
    let mut metric = |m: &LlamaForCausalLm| -> modula::Result<f64> {
        Ok(-f64::from(lm_loss(m, &calibration, &cpu)?.1))
    };
    let mut timing_rng = Rng(7);
    let timing: Vec<&[u8]> = sample(&texts, &mut timing_rng);
    let base_bpb = mean_bpb(&base, &test, budget.eval_windows, &cpu)?;
    let base_secs = forward_secs(&base, &timing, budget.timing_runs, &cpu)?;
    let prunable = base.prunable_params();
    let total_params = base.num_params();

    struct Row {
        method: Method,
        sparsity: f64,
        kept: usize,
        before: f64,
        after: f64,
        speedup: f64,
        prune_secs: f64,
        evaluations: usize,
    }
    let methods = [
        Method::Random,
        Method::Magnitude,
        Method::Wanda,
        Method::Bonsai,
    ];
    let sparsities = [0.3, 0.5];
    let pb = bar(methods.len() * sparsities.len(), "prune")?;
    let mut rows = Vec::new();
    for &sparsity in &sparsities {
        for &method in &methods {
            pb.set_message(format!("{} at {:.0} %", method.name(), 100.0 * sparsity));
            let mut m = base.clone();
            let t0 = Instant::now();
            let mut evaluations = usize::from(method == Method::Wanda);
            // The units removed, round by round, to replay on the autodiff copy.
            let mut history: Vec<Vec<Vec<usize>>> = Vec::new();
            match method {
                Method::Bonsai => {
                    let config = BonsaiConfig {
                        pairs_per_round: budget.pairs,
                        seed: 3,
                        ..BonsaiConfig::new(sparsity)
                    };
                    let report = bonsai(&mut m, &config, &cpu, &mut metric, &mut |_, _| {})?;
                    evaluations = report.evaluations + report.removed.len();
                    history = report.keep;
                }
                one => {
                    let prior = match one {
                        Method::Random => Prior::Random,
                        Method::Magnitude => Prior::Magnitude,
                        _ => Prior::ActivationWeight,
                    };
                    let groups = m.unit_groups();
                    let removed = one_shot(&mut m, sparsity, prior, 5, &mut metric)?;
                    history.push(
                        groups
                            .iter()
                            .zip(&removed)
                            .map(|(g, r)| (0..g.units).filter(|u| !r.contains(u)).collect())
                            .collect(),
                    );
                }
            }
            let prune_secs = t0.elapsed().as_secs_f64();
            let kept = m.prunable_params();
            let before = mean_bpb(&m, &test, budget.eval_windows, &cpu)?;
            let speedup = base_secs / forward_secs(&m, &timing, budget.timing_runs, &cpu)?;

            // Adaptation: the same pruning replayed on the autodiff copy, a rank-8 LoRA on every
            // linear layer but the output, trained toward the teacher's distribution.
            let mut student = teacher_ad.clone();
            for keep in &history {
                student.prune_units(keep)?;
            }
            ad.seed(11);
            student.add_lora("adapt", &LoraConfig::new(8).with_alpha(16.0), &|p| {
                p != "lm_head"
            })?;
            let mut optim = AdamConfig::new().init();
            let mut arng = Rng(5);
            for _ in 0..budget.adapt {
                let windows = sample(&texts, &mut arng);
                let ids = to_ids(&windows, &ad);
                let target = teacher_ad.forward(ids.clone())?;
                let loss = distillation_loss(student.forward(ids)?, target, 1.0)?;
                let grads = GradientsParams::from_grads(loss.backward(), &student);
                student = optim.step(3e-3, student, grads);
            }
            let after = mean_bpb(&student.valid(), &test, budget.eval_windows, &cpu)?;
            rows.push(Row {
                method,
                sparsity,
                kept,
                before,
                after,
                speedup,
                prune_secs,
                evaluations,
            });
            pb.inc(1);
        }
    }
    pb.finish();

    let mut md = String::new();
    writeln!(
        md,
        "# Pruning a language model with forward passes only (issue 15)\n\n\
         Generated by `cargo run --release --features wgpu,cli --example prune_lm`. The \
         byte-level Llama of `modular_lm` ({total_params} parameters, of which {prunable} in \
         attention heads and feed-forward neurons) pre-trained for {} steps on the six domains \
         of data/ ({pre_secs:.0} s). Bits per byte are the mean over the six domains' held-out \
         text ({} windows of {SEQ} bytes each). Every method prunes on the plain CPU device \
         with the same metric, −loss on 8 calibration windows of training text; Bonsai runs \
         rounds of 5 % with {} antithetic pairs per round. Speed-up: the forward pass over \
         16 × {SEQ} bytes of the physically pruned model against the unpruned one (median of \
         {} runs, 2 threads). Adaptation: a rank-8 LoRA on every linear layer but the output, \
         {} steps of Adam (lr 3e-3) on the KL divergence to the unpruned model over training \
         windows.\n",
        budget.pretrain, budget.eval_windows, budget.pairs, budget.timing_runs, budget.adapt,
    )?;
    writeln!(
        md,
        "| method | removed | prunable params kept | bits/byte pruned | bits/byte adapted | forward speed-up | pruning time (s) | metric calls |\n|---|---:|---:|---:|---:|---:|---:|---:|"
    )?;
    writeln!(
        md,
        "| unpruned | 0 % | {prunable} | {base_bpb:.3} | — | 1.00× | — | — |"
    )?;
    for r in &rows {
        writeln!(
            md,
            "| {} | {:.0} % | {} | {:.3} | {:.3} | {:.2}× | {:.1} | {} |",
            r.method.name(),
            100.0 * r.sparsity,
            r.kept,
            r.before,
            r.after,
            r.speedup,
            r.prune_secs,
            r.evaluations
        )?;
    }
    writeln!(
        md,
        "\nOne run (seeds fixed). \"metric calls\" counts calibration forward passes: one per \
         round for the activation prior (Wanda-style and Bonsai), plus Bonsai's sub-models."
    )?;
    println!("{md}");
    if !quick {
        let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/prune_lm.md");
        std::fs::write(&out, &md)?;
    }
    Ok(())
}
