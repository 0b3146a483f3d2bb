//! Structured pruning under limited task data, with and without a transfer task (Dery's thesis,
//! CMU-CS-24-136, limited-data chapter, arXiv 2311.06382): CoFi-style hard-concrete gates on
//! the attention heads and feed-forward neurons, a Lagrangian that drives the expected
//! sparsity to 50 %, trained together with the weights.
//!
//! The end task is language modelling of man pages from only 16 windows of 128 bytes; the
//! transfer task is the other five domains of data/. The byte-level Llama of `modular_lm` is
//! pre-trained on all six domains first. Compared:
//! - **end task only**: gates and weights trained on the 16 windows;
//! - **+ transfer, shared masks**: both tasks' losses through one set of gates;
//! - **+ transfer, independent masks**: a gate set per task over shared weights (the end
//!   task's gates decide the pruned model);
//! - **+ transfer, coupled masks**: independent sets pulled together by a penalty on the
//!   squared difference of their open probabilities.
//!
//! Each model is then pruned physically to 50 % of its prunable parameters by its end-task
//! gates; reported: held-out bits per byte on man pages and on the other domains. Writes
//! docs/prune_transfer.md; `--quick` runs a few steps and only prints.
//!
//! Run: `cargo run --release --features wgpu,cli --example prune_transfer`

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
use byte_lm::{DOMAINS, Res, SEQ, bits_per_byte, lm_loss, mean_bpb};
use modula::models::LlamaForCausalLm;
use modula::prune::{
    HardConcrete, Lagrangian, MaskSharing, Prunable, coupling_penalty, expected_model_sparsity,
    gates_for, keep_by_gates, sample_masks,
};
use progress::bar;
use rng::Rng;

const END: &str = "man";
const END_WINDOWS: usize = 16;
const TARGET: f64 = 0.5;
const COUPLING: f64 = 1.0;

/// The model and every gate set, trained together.
#[derive(Module, Debug)]
struct Gated {
    model: LlamaForCausalLm,
    end: Vec<HardConcrete>,
    transfer: Vec<HardConcrete>,
    lagrangians: Vec<Lagrangian>,
}

/// `n` windows drawn from `texts` (a text chosen uniformly per row).
fn windows<'a>(texts: &[&'a [u8]], n: usize, rng: &mut Rng) -> Vec<&'a [u8]> {
    (0..n)
        .map(|_| {
            let t = texts[rng.below(texts.len())];
            let s = rng.below(t.len() - SEQ + 1);
            &t[s..s + SEQ]
        })
        .collect()
}

fn main() -> Res<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let (pretrain_steps, steps, eval_windows) = if quick { (20, 4, 4) } else { (400, 250, 64) };
    let started = Instant::now();
    let train = byte_lm::read_all("train")?;
    let test = byte_lm::read_all("test")?;
    let all: Vec<&[u8]> = train.iter().map(Vec::as_slice).collect();
    let end_i = DOMAINS
        .iter()
        .position(|d| *d == END)
        .ok_or("no man domain")?;
    // The limited end-task data: the first END_WINDOWS windows of its training text.
    let end_text = &train[end_i][..END_WINDOWS * SEQ];
    let transfer: Vec<&[u8]> = (0..DOMAINS.len())
        .filter(|&i| i != end_i)
        .map(|i| train[i].as_slice())
        .collect();
    let other_test: Vec<&[u8]> = (0..DOMAINS.len())
        .filter(|&i| i != end_i)
        .map(|i| test[i].as_slice())
        .collect();

    let cpu = Device::flex();
    let ad = cpu.clone().autodiff();
    let mut rng = Rng(1);
    let base = byte_lm::pretrain(&all, pretrain_steps, &ad, &mut rng)?;
    let pre_secs = started.elapsed().as_secs_f64();
    let plain = base.clone().valid();
    let groups = plain.unit_groups();
    let base_end = bits_per_byte(&plain, &test[end_i], eval_windows, &cpu)?;
    let base_other = mean_bpb(&plain, &other_test, eval_windows, &cpu)?;

    let configs: [(&str, Option<MaskSharing>); 4] = [
        ("end task only", None),
        ("+ transfer, shared masks", Some(MaskSharing::Shared)),
        (
            "+ transfer, independent masks",
            Some(MaskSharing::Independent),
        ),
        (
            "+ transfer, coupled masks",
            Some(MaskSharing::Coupled(COUPLING)),
        ),
    ];
    let pb = bar(configs.len() * steps, "gates")?;
    let mut rows = Vec::new();
    for (name, sharing) in configs {
        ad.seed(21);
        let separate = matches!(
            sharing,
            Some(MaskSharing::Independent | MaskSharing::Coupled(_))
        );
        let mut g = Gated {
            model: base.clone(),
            end: gates_for(&groups, 2.3, &ad)?,
            transfer: if separate {
                gates_for(&groups, 2.3, &ad)?
            } else {
                Vec::new()
            },
            lagrangians: vec![Lagrangian::new(&ad), Lagrangian::new(&ad)],
        };
        let (mut opt_w, mut opt_g, mut opt_t, mut opt_l) = (
            AdamConfig::new().init(),
            AdamConfig::new().init(),
            AdamConfig::new().init(),
            AdamConfig::new().init(),
        );
        let mut srng = Rng(33);
        let t0 = Instant::now();
        let mut sparsity = 0.0;
        for _ in 0..steps {
            g.model.set_unit_masks(Some(sample_masks(&g.end)))?;
            let batch = windows(&[end_text], 8, &mut srng);
            let mut loss = lm_loss(&g.model, &batch, &ad)?.0;
            let s_end = expected_model_sparsity(&g.end, &groups)?;
            sparsity = f64::from(s_end.clone().into_scalar::<f32>());
            loss = loss + g.lagrangians[0].penalty(s_end, TARGET)?;
            if let Some(sharing) = sharing {
                let masks = if separate {
                    sample_masks(&g.transfer)
                } else {
                    sample_masks(&g.end)
                };
                g.model.set_unit_masks(Some(masks))?;
                let batch = windows(&transfer, 8, &mut srng);
                loss = loss + lm_loss(&g.model, &batch, &ad)?.0;
                if separate {
                    let s_tr = expected_model_sparsity(&g.transfer, &groups)?;
                    loss = loss + g.lagrangians[1].penalty(s_tr, TARGET)?;
                }
                if let MaskSharing::Coupled(w) = sharing {
                    loss = loss + coupling_penalty(&g.end, &g.transfer)?.mul_scalar(w);
                }
            }
            let mut grads = loss.backward();
            let gw = GradientsParams::from_module(&mut grads, &g.model);
            let gg = GradientsParams::from_module(&mut grads, &g.end);
            let gt = GradientsParams::from_module(&mut grads, &g.transfer);
            let gl = GradientsParams::from_module(&mut grads, &g.lagrangians);
            g.model = opt_w.step(3e-4, g.model, gw);
            g.end = opt_g.step(0.1, g.end, gg);
            if separate {
                g.transfer = opt_t.step(0.1, g.transfer, gt);
            }
            // Ascent on the multipliers.
            g.lagrangians = opt_l.step(-0.1, g.lagrangians, gl);
            pb.inc(1);
        }
        let secs = t0.elapsed().as_secs_f64();
        let keep = keep_by_gates(&groups, &g.end, TARGET)?;
        let mut pruned = g.model.valid();
        pruned.set_unit_masks(None)?;
        pruned.prune_units(&keep)?;
        rows.push((
            name,
            sparsity,
            pruned.prunable_params(),
            bits_per_byte(&pruned, &test[end_i], eval_windows, &cpu)?,
            mean_bpb(&pruned, &other_test, eval_windows, &cpu)?,
            secs,
        ));
    }
    pb.finish();

    let mut md = String::new();
    writeln!(
        md,
        "# Pruning under limited task data, with a transfer task (issue 15)\n\n\
         Generated by `cargo run --release --features wgpu,cli --example prune_transfer`. The \
         byte-level Llama of `modular_lm` pre-trained for {pretrain_steps} steps on all six \
         domains ({pre_secs:.0} s); the end task is man pages from only {END_WINDOWS} windows \
         of {SEQ} bytes, the transfer task the other five domains. Hard-concrete gates on every \
         head and neuron (log α from 2.3), trained with the weights for {steps} steps \
         (batches of 8 windows per task; Adam: weights 3e-4, gates 0.1, Lagrangian \
         multipliers −0.1 for ascent) toward {:.0} % expected sparsity; coupling weight \
         {COUPLING}. Then each model keeps the units its end-task gates leave most open, \
         {:.0} % of the {} prunable parameters, physically pruned. Bits per byte on {} \
         held-out windows per domain; one run.\n",
        100.0 * TARGET,
        100.0 * (1.0 - TARGET),
        plain.prunable_params(),
        eval_windows,
    )?;
    writeln!(
        md,
        "| training | expected sparsity at the end | prunable params kept | man pages bits/byte | other domains bits/byte | training time (s) |\n|---|---:|---:|---:|---:|---:|"
    )?;
    writeln!(
        md,
        "| unpruned pre-trained model | 0 | {} | {base_end:.3} | {base_other:.3} | — |",
        plain.prunable_params()
    )?;
    for (name, s, kept, end, other, secs) in &rows {
        writeln!(
            md,
            "| {name} | {s:.3} | {kept} | {end:.3} | {other:.3} | {secs:.0} |"
        )?;
    }
    println!("{md}");
    if !quick {
        let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/prune_transfer.md");
        std::fs::write(&out, &md)?;
    }
    Ok(())
}
