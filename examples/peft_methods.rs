//! Prompt tuning, LoHa and LoKr on a small Llama, end to end: train a soft prompt with burn's
//! Adam so the frozen model continues a pattern, build LoHa and LoKr adapters from their
//! modules, save all three as PEFT folders, and serve them (prompt rows beside plain rows in
//! one batch; LoHa and LoKr rows mixed in one batch).
//!
//! `cargo run --release --features wgpu,cli --example peft_methods [-- --out DIR]`
//!
//! The model is the tiny random Llama of tests/data/tiny_decoders/llama. The folders go to
//! `--out` (default: a temporary folder), each with `modula_logits.safetensors` (modula's
//! logits of its test batch, the input tokens' positions), which
//! `python tests/data/check_modula_outputs.py adapter DIR DIR/modula_logits.safetensors`
//! compares with PEFT's. tests/data/tiny_decoders/modula_{prompt,loha,lokr} are such folders,
//! with PEFT's logits beside them (tests/peft_methods.rs reads them back). Writes
//! docs/peft_methods.md.

#[path = "common/alloc.rs"]
mod alloc;
#[path = "common/tiny_llama.rs"]
mod tiny_llama;

use std::fmt::Write as _;
use std::path::PathBuf;

use burn::module::{Module, Param};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Distribution, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use modula::checkpoint::load_decoder;
use modula::models::{GenerationConfig, KvCache, LlamaForCausalLm, causal_lm_loss, generate_after};
use modula::{
    KronFactor, LohaModule, LokrModule, LokrShape, LycorisModule, PeftLycoris, PeftPrompt,
    PromptEmbedding,
};

use tiny_llama::{data, ids, out_dir, pattern_rows, test_rows, write_logits};

type Res<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Soft tokens of the trained prompt.
const VIRTUAL: usize = 16;

/// Greedy continuation of `start` (after `prompt`'s soft tokens when given).
fn continue_greedy(
    model: &LlamaForCausalLm,
    prompt: Option<&PromptEmbedding>,
    start: &[i64],
    n: usize,
    device: &Device,
) -> Res<Vec<i64>> {
    let mut cache = KvCache::new();
    if let Some(p) = prompt {
        model.prefill_prompts(&[Some(p)], None, &mut cache)?;
    }
    let config = GenerationConfig {
        eos_token_ids: vec![],
        ..GenerationConfig::greedy(model, n)
    };
    let out = generate_after(
        model,
        cache,
        ids(&[start.to_vec()], device),
        None,
        None,
        &config,
        |_| {},
    )?;
    Ok(out.into_iter().next().unwrap_or_default())
}

fn main() -> Res<()> {
    println!("allocator: {}", alloc::name());
    let out = out_dir("modula-peft-methods");
    let device = Device::flex();
    device.seed(0);
    let mut md = String::from(
        "# Prompt tuning, LoHa and LoKr on a small Llama (examples/peft_methods.rs)\n\n",
    );

    // 1. Prompt tuning: VIRTUAL soft tokens, initialised from the embeddings of `11 22` (PEFT's TEXT
    //    init), trained so the frozen model continues the pattern.
    let ad = device.clone().autodiff();
    let model_ad = load_decoder(data("llama"), &ad)?;
    let table = model_ad.model.embed_tokens.weight.val();
    let mut prompt = PromptEmbedding::from_tokens(table, &[11, 22], VIRTUAL)?;
    let rows = pattern_rows(12);
    let x = ids(&rows, &ad);
    let mut optim = AdamConfig::new().init();
    let steps = 400;
    let pb = ProgressBar::new(steps as u64).with_style(
        ProgressStyle::with_template("prompt [{bar:30}] {pos}/{len} loss {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut losses = Vec::new();
    for _ in 0..steps {
        let ps = vec![Some(&prompt); 4];
        let logits = model_ad.forward_prompted(x.clone(), None, &ps, None)?;
        let loss = causal_lm_loss(logits, x.clone(), None)?;
        let v = loss.clone().into_scalar::<f32>();
        losses.push(v);
        pb.set_message(format!("{v:.3}"));
        let grads = GradientsParams::from_grads(loss.backward(), &prompt);
        prompt = optim.step(1e-1, prompt, grads);
        pb.inc(1);
    }
    pb.finish();
    let base_model = load_decoder(data("llama"), &device)?;
    let plain_loss = causal_lm_loss(
        base_model.forward(ids(&rows, &device))?,
        ids(&rows, &device),
        None,
    )?
    .into_scalar::<f32>();
    let trained = prompt.valid();
    let start = [11i64, 22, 33, 44, 11];
    let with = continue_greedy(&base_model, Some(&trained), &start, 8, &device)?;
    let without = continue_greedy(&base_model, None, &start, 8, &device)?;
    let _ = writeln!(
        md,
        "## Prompt tuning\n\n{VIRTUAL} soft tokens initialised from the embeddings of `11 22` (PEFT's \
         `TEXT` init), Adam (lr 0.1), {steps} steps of the causal-LM loss on 4 sequences of a \
         repeating 4-token pattern; the model is frozen (only the {} prompt numbers train).\n\n\
         | | loss on the pattern |\n|---|---:|\n| no prompt | {plain_loss:.3} |\n\
         | prompt, step 0 | {:.3} |\n| prompt, step {} | {:.3} |\n\n\
         Greedy continuation of `11 22 33 44 11`: without the prompt `{}`, with it `{}`. The \
         model is random and frozen: a soft prompt only steers its attention, so the loss falls \
         far less than with a rank-8 LoRA on the same task (docs/tiny_lm.md).\n",
        VIRTUAL * 32,
        losses[0],
        steps - 1,
        losses[steps - 1],
        without
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(" "),
        with.iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(" "),
    );
    println!(
        "prompt: loss {:.3} -> {:.3} (no prompt {plain_loss:.3})",
        losses[0],
        losses[steps - 1]
    );
    let dir = out.join("prompt");
    let saved = PeftPrompt::new(trained);
    saved.save(&dir)?;
    let test = ids(&test_rows(), &device);
    let logits =
        base_model.forward_prompted(test.clone(), None, &[Some(&saved.prompt); 2], None)?;
    write_logits(&dir, logits)?;

    // 2. LoHa and LoKr adapters built from their modules (random non-zero factors, as PEFT's
    //    init_weights=False), saved as PEFT folders and attached by PEFT's target rules.
    let u =
        |r: usize, c: usize| Tensor::<2>::random([r, c], Distribution::Uniform(-0.3, 0.3), &device);
    let mut loha = PeftLycoris::new_loha(2, 4.0);
    let mut lokr = PeftLycoris::new_lokr(LokrShape::new(2));
    for (path, layer) in modula::models::LinearLayers::linear_layers(&base_model) {
        let (d_in, d_out) = (layer.d_in(), layer.d_out());
        if path.ends_with("q_proj") || path.ends_with("v_proj") {
            let m =
                LohaModule::from_factors(u(d_out, 2), u(2, d_in), u(d_out, 2), u(2, d_in), 4.0)?;
            loha.insert(&path, LycorisModule::Loha(m))?;
        }
        if path.ends_with("o_proj") || path.ends_with("gate_proj") {
            let mut m = LokrModule::new(d_in, d_out, LokrShape::new(2), &device)?;
            if let KronFactor::Full(w) = &mut m.w1 {
                let [o, i] = w.shape().dims::<2>();
                *w = Param::from_tensor(u(o, i));
            }
            lokr.insert(&path, LycorisModule::Lokr(m))?;
        }
    }
    let mut served = load_decoder(data("llama"), &device)?;
    let _ = writeln!(
        md,
        "## LoHa and LoKr\n\nBuilt from their modules with random non-zero factors (r = 2; LoHa \
         on q and v, LoKr on o and gate, whose Kronecker sides follow PEFT's `factorization`), \
         saved as PEFT folders, attached by PEFT's target rules in their exact LoRA forms:\n\n\
         | adapter | layers | stored numbers | LoRA-form rank per layer |\n|---|---:|---:|---|"
    );
    for (name, a) in [("loha", &loha), ("lokr", &lokr)] {
        let dir = out.join(name);
        a.save(&dir)?;
        let reloaded = PeftLycoris::load(&dir, &device)?;
        reloaded.attach_to_model(&mut served, name)?;
        let numbers: usize = a
            .modules
            .values()
            .map(|m| match m {
                LycorisModule::Loha(m) => m.num_params(),
                LycorisModule::Lokr(m) => m.num_params(),
            })
            .sum();
        let ranks: Vec<String> = reloaded
            .to_lora()
            .modules
            .values()
            .map(|l| l.rank().to_string())
            .collect();
        let _ = writeln!(
            md,
            "| {name} | {} | {numbers} | {} |",
            a.modules.len(),
            ranks.join(", ")
        );
        let logits = served.forward_mixed(test.clone(), None, &[Some(name), Some(name)])?;
        write_logits(&dir, logits)?;
    }
    let mixed = served.forward_mixed(test.clone(), None, &[Some("loha"), Some("lokr")])?;
    let [_, s, v] = mixed.dims();
    let alone = served.forward_mixed(test, None, &[Some("lokr"), Some("lokr")])?;
    let diff = (mixed.slice([1..2, 0..s, 0..v]) - alone.slice([1..2, 0..s, 0..v]))
        .abs()
        .max()
        .into_scalar::<f32>();
    let _ = writeln!(
        md,
        "\nIn one batch, row 0 through LoHa and row 1 through LoKr: row 1 is within {diff:.1e} \
         of LoKr alone.\n\nEach folder (under `--out`) loads in PEFT 0.21.2 \
         (`PeftModel.from_pretrained`) with modula's logits: `python \
         tests/data/check_modula_outputs.py adapter DIR DIR/modula_logits.safetensors`; \
         tests/data/tiny_decoders/modula_{{prompt,loha,lokr}} hold such folders with PEFT's \
         logits, which tests/peft_methods.rs compares with modula's."
    );
    println!("saved PEFT folders under {}", out.display());
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/peft_methods.md");
    modula::io::atomic_write(&path, md.as_bytes())?;
    println!("wrote {}", path.display());
    Ok(())
}
