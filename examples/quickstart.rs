//! Quick start: load a Hugging Face PEFT LoRA folder onto a small burn model, run it, merge,
//! unmerge, and check every step against the outputs PEFT itself produced.
//!
//! `cargo run --release --example quickstart`
//!
//! The model is TinyMLP (fc1: 16→12, ReLU, fc2: 12→8) whose base weights are in
//! `tests/data/tiny_mlp_base.safetensors` (PyTorch layout); the adapter folder
//! `tests/data/peft_lora_tiny_mlp/` was written by PEFT 0.21.2's `save_pretrained`.

#[path = "common/alloc.rs"]
mod alloc;

use std::path::PathBuf;

use burn::tensor::{Device, Tensor, activation};
use modula::prelude::*;

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn max_diff(a: Tensor<2>, b: Tensor<2>) -> f32 {
    (a - b).abs().max().into_scalar::<f32>()
}

fn forward(fc1: &LoraLinear, fc2: &LoraLinear, x: Tensor<2>) -> Result<Tensor<2>> {
    fc2.forward(activation::relu(fc1.forward(x)?))
}

fn check(what: &str, diff: f32, tol: f32) -> Result<()> {
    let ok = diff <= tol;
    println!(
        "  [{}] {what}: max |diff| = {diff:.2e} (tolerance {tol:.0e})",
        if ok { "ok" } else { "FAIL" }
    );
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid {
            what: what.to_string(),
            why: format!("off by {diff}, above the tolerance {tol:e}"),
        })
    }
}

fn main() -> Result<()> {
    let device = Device::flex();
    println!("modula quickstart on {device:?}");

    // 1. The base model, from PyTorch-layout safetensors.
    let base = TensorFile::open(data("tiny_mlp_base.safetensors"))?;
    let mut fc1 = LoraLinear::new(base.linear_torch("fc1", &device)?);
    let mut fc2 = LoraLinear::new(base.linear_torch("fc2", &device)?);

    // 2. The PEFT adapter folder, attached by module path.
    let peft = PeftLora::load(data("peft_lora_tiny_mlp"), &device)?;
    println!(
        "loaded PEFT LoRA: modules {:?}, r = {}, alpha = {}, scaling = {}",
        peft.paths().collect::<Vec<_>>(),
        peft.config.r,
        peft.config.lora_alpha,
        peft.config.scaling_for("fc1"),
    );
    peft.attach("fc1", &mut fc1, "default")?;
    peft.attach("fc2", &mut fc2, "default")?;

    // 3. Run it and compare with PEFT's own output.
    let expected = TensorFile::open(data("peft_lora_tiny_mlp_expected.safetensors"))?;
    let x: Tensor<2> = expected.tensor("x", &device)?;
    let want: Tensor<2> = expected.tensor("expected_out", &device)?;
    let y = forward(&fc1, &fc2, x.clone())?;
    println!("checks:");
    check(
        "adapted output vs PEFT",
        max_diff(y.clone(), want.clone()),
        1e-5,
    )?;

    // 4. Merge: W += s·A B, so inference costs exactly the base model's.
    fc1.merge("default")?;
    fc2.merge("default")?;
    let merged_w: Tensor<2> = expected.tensor("expected_merged_fc1_weight", &device)?;
    check(
        "merged fc1 weight vs PEFT",
        max_diff(fc1.base.weight.val().transpose(), merged_w),
        1e-5,
    )?;
    check(
        "merged output vs unmerged",
        max_diff(forward(&fc1, &fc2, x.clone())?, y.clone()),
        1e-5,
    )?;

    // 5. Unmerge: back to the base weights, adapter applied separately again.
    fc1.unmerge("default")?;
    fc2.unmerge("default")?;
    let w0 = base.linear_torch("fc1", &device)?.weight.val();
    check(
        "fc1 weight after unmerge vs base",
        max_diff(fc1.base.weight.val(), w0),
        1e-6,
    )?;
    check(
        "unmerged output vs PEFT",
        max_diff(forward(&fc1, &fc2, x.clone())?, want),
        1e-5,
    )?;

    // 6. With the adapter disabled the model is the base model.
    fc1.set_active(&[])?;
    fc2.set_active(&[])?;
    let base_out: Tensor<2> = base.tensor("expected_out_base", &device)?;
    check(
        "adapters off vs base model",
        max_diff(forward(&fc1, &fc2, x)?, base_out),
        1e-5,
    )?;
    println!("all checks passed");
    Ok(())
}
