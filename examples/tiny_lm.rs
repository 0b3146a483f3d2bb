//! A language model with PEFT adapters, end to end on a small Llama: load a Hugging Face
//! folder, attach a PEFT LoRA by PEFT's target rules, fine-tune a new LoRA with burn's Adam,
//! save it as a PEFT folder, and serve a mixed batch (base, PEFT's adapter, the new one) with
//! greedy generation.
//!
//! `cargo run --release --features wgpu,cli --example tiny_lm [-- --out DIR]`
//!
//! The model is the tiny random Llama of tests/data/tiny_decoders/llama (2 layers, GQA,
//! Llama-3 RoPE; written by transformers 5.23), the PEFT folder tests/data/tiny_decoders/
//! llama_lora_qvd (written by PEFT 0.21.2). The new adapter learns to continue a repeating
//! 4-token pattern. The trained folder goes to `--out` (default: a temporary folder) with
//! `modula_logits.safetensors`, modula's logits for its test batch, which
//! tests/data/check_modula_outputs.py compares with PEFT's. The run's table is written to
//! docs/tiny_lm.md.

#[path = "common/alloc.rs"]
mod alloc;
#[path = "common/tiny_llama.rs"]
mod tiny_llama;

use std::fmt::Write as _;
use std::path::PathBuf;

use burn::module::Module;
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Int, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use modula::checkpoint::load_decoder;
use modula::models::{GenerationConfig, LinearLayers, causal_lm_loss};
use modula::prelude::*;
use tiny_llama::{data, ids, out_dir, pattern_rows, test_rows, write_logits};

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    println!("allocator: {}", alloc::name());
    let out = out_dir("modula-tiny-lm-adapter");
    let device = Device::flex();
    let mut md = String::from("# A small LM with PEFT adapters (examples/tiny_lm.rs)\n\n");

    // 1. A Hugging Face folder and a PEFT folder, checked against PEFT's own logits.
    let mut model = load_decoder(data("llama"), &device)?;
    let peft = PeftLora::load(data("llama_lora_qvd"), &device)?;
    let adapted = peft.attach_to_model(&mut model, "qvd")?;
    let golden = TensorFile::open(data("llama_lora_qvd/golden.safetensors"))?;
    let x: Tensor<2, Int> = golden.tensor::<2>("input_ids", &device)?.int();
    let want: Tensor<3> = golden.tensor("logits", &device)?;
    let diff = (model.forward(x)? - want.clone())
        .abs()
        .max()
        .into_scalar::<f32>()
        / want.abs().max().into_scalar::<f32>();
    println!(
        "PEFT folder on {} layers: logits within {diff:.1e} of PEFT's",
        adapted.len()
    );
    let _ = writeln!(
        md,
        "PEFT's `llama_lora_qvd` attached to {} layers by its target rules: logits within \
         {diff:.1e} (relative) of PEFT's.\n",
        adapted.len()
    );

    // 2. Fine-tune a new LoRA on q, k, v, o (the base model is frozen).
    let ad = device.clone().autodiff();
    ad.seed(7);
    let mut train = load_decoder(data("llama"), &ad)?;
    let config = LoraConfig::new(8).with_alpha(16.0);
    train.add_lora("pattern", &config, &|p| p.contains("self_attn"))?;
    let rows = pattern_rows(12);
    let (x, steps) = (ids(&rows, &ad), 80);
    let mut optim = AdamConfig::new().init();
    let pb = ProgressBar::new(steps as u64);
    pb.set_style(
        ProgressStyle::with_template("fine-tune [{bar:30}] {pos}/{len} loss {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut losses = Vec::new();
    for _ in 0..steps {
        let loss = causal_lm_loss(train.forward(x.clone())?, x.clone(), None)?;
        let v = loss.clone().into_scalar::<f32>();
        losses.push(v);
        pb.set_message(format!("{v:.3}"));
        let grads = GradientsParams::from_grads(loss.backward(), &train);
        train = optim.step(3e-2, train, grads);
        pb.inc(1);
    }
    pb.finish();
    let trained = train.valid();
    let _ = writeln!(
        md,
        "## Fine-tuning\n\nA rank-8 LoRA on q, k, v, o, Adam (lr 3e-2), {steps} steps on 4 \
         sequences of a repeating 4-token pattern:\n\n| step | loss |\n|---:|---:|"
    );
    for s in [0, 10, 20, 40, steps - 1] {
        let _ = writeln!(md, "| {s} | {:.3} |", losses[s]);
    }

    // 3. Save it for PEFT, with modula's logits on a test batch beside it.
    let saved = PeftLora::from_model(&trained, "pattern")?;
    saved.save(&out)?;
    let logits = trained.forward(ids(&test_rows(), &device))?;
    write_logits(&out, logits)?;
    println!("saved the adapter as a PEFT folder: {}", out.display());

    // 4. Serve a mixed batch: each row its own adapter, generated greedily.
    let reloaded = PeftLora::load(&out, &device)?;
    reloaded.attach_to_model(&mut model, "pattern")?;
    let prompts = vec![vec![11i64, 22, 33, 44, 11]; 3];
    let names = [None, Some("qvd"), Some("pattern")];
    let greedy = GenerationConfig {
        eos_token_ids: vec![],
        ..GenerationConfig::greedy(&model, 8)
    };
    let new = model.generate(ids(&prompts, &device), None, Some(&names), &greedy, |_| {})?;
    let _ = writeln!(
        md,
        "\n## A mixed batch\n\nOne batch, each row through its own adapter (one gathered pass \
         per layer), greedy, 8 new tokens after `11 22 33 44 11`:\n\n| adapter | new tokens |\n|---|---|"
    );
    for (name, toks) in names.iter().zip(&new) {
        let toks: Vec<String> = toks.iter().map(i64::to_string).collect();
        println!("{:>8}: {}", name.unwrap_or("base"), toks.join(" "));
        let _ = writeln!(md, "| {} | {} |", name.unwrap_or("(base)"), toks.join(" "));
    }
    let _ = writeln!(
        md,
        "\nThe saved folder loads in PEFT 0.21.2 (`PeftModel.from_pretrained`) with modula's \
         logits: `python tests/data/check_modula_outputs.py adapter DIR DIR/modula_logits.safetensors` \
         compares them."
    );
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/tiny_lm.md");
    modula::io::atomic_write(&path, md.as_bytes())?;
    println!("wrote {}", path.display());
    Ok(())
}
