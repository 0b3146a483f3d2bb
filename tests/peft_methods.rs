//! PEFT 0.21.2 LoHa, LoKr and prompt-tuning folders on the tiny Llama against PEFT's logits
//! (tests/data/make_lycoris_goldens.py), saved back in PEFT's format, and refused when bad.

mod common;

use std::path::{Path, PathBuf};

use burn::tensor::{Int, Tensor};
use common::{assert_close, devices};
use modula::models::LinearLayers;
use modula::{PeftAdapter, PeftLycoris, TensorFile};

fn folder(name: &str) -> PathBuf {
    common::data("tiny_decoders").join(name)
}

fn golden(name: &str) -> TensorFile {
    TensorFile::open(folder(name).join("golden.safetensors")).unwrap()
}

/// The three folders and how many layers each adapts (2 layers × its targets).
const LYCORIS: [(&str, usize); 3] = [("llama_loha", 6), ("llama_lokr", 6), ("llama_lokr_both", 4)];

/// Each folder, attached by PEFT's target rules, gives PEFT's logits; merged, PEFT's
/// `merge_and_unload` logits; unmerged, PEFT's logits again and the base weights back;
/// inactive, the base logits. In one mixed batch row 0 takes LoHa and row 1 LoKr.
#[test]
fn loha_and_lokr_folders_give_peft_logits_unmerged_merged_and_mixed() {
    for device in devices() {
        let at = |what: &str| format!("{what} on {device:?}");
        let mut model = modula::checkpoint::load_decoder(folder("llama"), &device).unwrap();
        let g0 = golden("llama_loha");
        let ids: Tensor<2, Int> = g0.tensor::<2>("input_ids", &device).unwrap().int();
        let base = model.forward(ids.clone()).unwrap();
        let base_weights = model.base_weights();
        for (name, layers) in LYCORIS {
            let g = golden(name);
            let want: Tensor<3> = g.tensor("logits", &device).unwrap();
            let merged: Tensor<3> = g.tensor("merged_logits", &device).unwrap();
            let adapter = PeftAdapter::load(folder(name), &device).unwrap();
            assert!(matches!(adapter, PeftAdapter::Lycoris(_)), "{name}");
            let paths = adapter.attach_to_model(&mut model, name).unwrap();
            assert_eq!(paths.len(), layers, "{name}: {paths:?}");
            model.set_active_adapters(&[name]).unwrap();
            assert_close(
                model.forward(ids.clone()).unwrap(),
                want.clone(),
                1e-5,
                &at(name),
            );
            model.merge_adapter(name).unwrap();
            assert_close(
                model.forward(ids.clone()).unwrap(),
                merged,
                1e-5,
                &at(&format!("{name} merged")),
            );
            model.unmerge_adapter(name).unwrap();
            assert_close(
                model.forward(ids.clone()).unwrap(),
                want,
                1e-5,
                &at(&format!("{name} unmerged")),
            );
            model.set_active_adapters(&[]).unwrap();
            assert_close(
                model.forward(ids.clone()).unwrap(),
                base.clone(),
                1e-6,
                &at(&format!("{name} inactive")),
            );
        }
        for ((n, got), (_, before)) in model.base_weights().iter().zip(&base_weights) {
            let (got, before) = (
                got.iter::<f32>().collect::<Vec<_>>(),
                before.iter::<f32>().collect::<Vec<_>>(),
            );
            let d = got
                .iter()
                .zip(&before)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(d < 1e-6, "{n}: unmerging left {d}");
        }
        let y = model
            .forward_mixed(ids.clone(), None, &[Some("llama_loha"), Some("llama_lokr")])
            .unwrap();
        let [_, s, v] = y.dims();
        for (i, name) in ["llama_loha", "llama_lokr"].iter().enumerate() {
            let want: Tensor<3> = golden(name).tensor("logits", &device).unwrap();
            assert_close(
                y.clone().slice([i..i + 1, 0..s, 0..v]),
                want.slice([i..i + 1, 0..s, 0..v]),
                1e-5,
                &at(&format!("mixed row {i} ({name})")),
            );
        }
    }
}

/// Saving a loaded folder writes PEFT's tensors bit for bit under PEFT's keys and a config
/// that gives every module the same rank and alpha; the saved folder reloads with PEFT's
/// logits.
#[test]
fn loha_and_lokr_folders_save_back_in_peft_format() {
    let device = burn::tensor::Device::flex();
    for (name, _) in LYCORIS {
        let tmp = tempfile::tempdir().unwrap();
        let a = PeftLycoris::load(folder(name), &device).unwrap();
        a.save(tmp.path()).unwrap();
        let (orig, saved) = (
            TensorFile::open(folder(name).join("adapter_model.safetensors")).unwrap(),
            TensorFile::open(tmp.path().join("adapter_model.safetensors")).unwrap(),
        );
        assert_eq!(orig.tensors(), saved.tensors(), "{name}");
        let b = PeftLycoris::load(tmp.path(), &device).unwrap();
        assert_eq!(a.config.peft_type, b.config.peft_type);
        assert_eq!(
            (a.config.decompose_both, a.config.decompose_factor),
            (b.config.decompose_both, b.config.decompose_factor)
        );
        for p in a.modules.keys() {
            assert_eq!(a.config.rank_for(p), b.config.rank_for(p), "{name} {p}");
            assert_eq!(a.config.alpha_for(p), b.config.alpha_for(p), "{name} {p}");
        }
        let mut model = modula::checkpoint::load_decoder(folder("llama"), &device).unwrap();
        b.attach_to_model(&mut model, "x").unwrap();
        let g = golden(name);
        let ids: Tensor<2, Int> = g.tensor::<2>("input_ids", &device).unwrap().int();
        assert_close(
            model.forward(ids).unwrap(),
            g.tensor("logits", &device).unwrap(),
            1e-5,
            &format!("{name} saved and reloaded"),
        );
    }
}

/// The exact LoRA forms cost what the math says: LoHa rank r², LoKr rank(W1)·rank(W2).
#[test]
fn lora_forms_have_the_product_ranks() {
    let device = burn::tensor::Device::flex();
    let loha = PeftLycoris::load(folder("llama_loha"), &device).unwrap();
    let lora = loha.to_lora();
    assert_eq!(
        lora.get("model.layers.0.self_attn.q_proj").unwrap().rank(),
        4
    );
    assert_eq!(lora.get("model.layers.1.mlp.down_proj").unwrap().rank(), 9);
    let lokr = PeftLycoris::load(folder("llama_lokr"), &device).unwrap();
    // q_proj 32 -> 48: W1 full [6, 4] (rank <= 4), W2 = [8, 2][2, 8] (rank 2).
    let q = lokr.to_lora();
    assert_eq!(q.get("model.layers.0.self_attn.q_proj").unwrap().rank(), 8);
}

fn copy_folder(from: &Path, to: &Path) {
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

/// Bad folders are errors that name the problem: a convolution's Tucker core, a missing
/// factor, a rank that disagrees with the config, an encoder-decoder prompt; a LoKr module
/// PEFT would shape differently is not saved.
#[test]
fn bad_lycoris_folders_are_refused() {
    use modula::HostTensor;
    use std::collections::BTreeMap;
    let device = burn::tensor::Device::flex();
    let edit = |name: &str, f: &dyn Fn(&mut BTreeMap<String, HostTensor>)| {
        let tmp = tempfile::tempdir().unwrap();
        copy_folder(&folder(name), tmp.path());
        let path = tmp.path().join("adapter_model.safetensors");
        let mut t = TensorFile::open(&path).unwrap().tensors().clone();
        f(&mut t);
        modula::io::write_safetensors(&path, &t, None).unwrap();
        PeftAdapter::load(tmp.path(), &device)
            .unwrap_err()
            .to_string()
    };
    let key = "base_model.model.model.layers.0.self_attn.q_proj";
    let e = edit("llama_loha", &|t| {
        t.insert(
            format!("{key}.hada_t1"),
            HostTensor {
                shape: vec![2, 2, 1, 1],
                data: vec![0.0; 4],
            },
        );
    });
    assert!(e.contains("hada_t1") && e.contains("convolution"), "{e}");
    let e = edit("llama_loha", &|t| {
        t.remove(&format!("{key}.hada_w2_b"));
    });
    assert!(e.contains("hada_w2_b") && e.contains("missing"), "{e}");
    let e = edit("llama_lokr", &|t| {
        t.remove(&format!("{key}.lokr_w2_a"));
    });
    assert!(e.contains("lokr_w2") && e.contains("q_proj"), "{e}");
    // A rank of 3 in a folder whose config says 2.
    let e = edit("llama_loha", &|t| {
        for p in ["hada_w1_a", "hada_w2_a"] {
            t.insert(
                format!("{key}.{p}"),
                HostTensor {
                    shape: vec![48, 3],
                    data: vec![0.1; 144],
                },
            );
        }
        for p in ["hada_w1_b", "hada_w2_b"] {
            t.insert(
                format!("{key}.{p}"),
                HostTensor {
                    shape: vec![3, 32],
                    data: vec![0.1; 96],
                },
            );
        }
    });
    assert!(e.contains("rank 2") && e.contains("q_proj"), "{e}");
    // A LoKr module shaped for another config is not saved where PEFT could not load it.
    let mut a = PeftLycoris::new_lokr(modula::LokrShape::new(2));
    let m = modula::LokrModule::new(
        32,
        48,
        modula::LokrShape {
            decompose_factor: 2,
            ..modula::LokrShape::new(2)
        },
        &device,
    )
    .unwrap();
    a.insert("q", modula::LycorisModule::Lokr(m)).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let e = a.save(tmp.path()).unwrap_err().to_string();
    assert!(e.contains("`q`") && e.contains("LokrModule::new"), "{e}");
    assert!(!tmp.path().join("adapter_model.safetensors").exists());
    let loha = modula::LohaModule::new(32, 48, 2, 4.0, &device).unwrap();
    assert!(a.insert("q", modula::LycorisModule::Loha(loha)).is_err());
}

/// PEFT's prompt-tuning folder: the logits of the input tokens are PEFT's after its 3 soft
/// tokens, and the prompt positions' logits come from the prefill; a row without a prompt in
/// the same batch gets the plain logits; gradients reach the soft tokens.
#[test]
fn prompt_tuning_folders_give_peft_logits() {
    use modula::models::KvCache;
    for device in devices() {
        let at = |what: &str| format!("{what} on {device:?}");
        let model = modula::checkpoint::load_decoder(folder("llama"), &device).unwrap();
        let g = golden("llama_prompt");
        let ids: Tensor<2, Int> = g.tensor::<2>("input_ids", &device).unwrap().int();
        let want: Tensor<3> = g.tensor("logits", &device).unwrap();
        let [b, pt, v] = want.dims();
        let PeftAdapter::Prompt(peft) = PeftAdapter::load(folder("llama_prompt"), &device).unwrap()
        else {
            panic!("a prompt-tuning folder loads as PeftAdapter::Prompt");
        };
        let p = &peft.prompt;
        assert_eq!((p.len(), p.width()), (3, 32));
        let prompts = [Some(p), Some(p)];
        let got = model
            .forward_prompted(ids.clone(), None, &prompts, None)
            .unwrap();
        assert_close(
            got,
            want.clone().slice([0..b, 3..pt, 0..v]),
            1e-5,
            &at("tokens"),
        );
        let mut cache = KvCache::new();
        let head = model.prefill_prompts(&prompts, None, &mut cache).unwrap();
        assert_close(
            head,
            want.clone().slice([0..b, 0..3, 0..v]),
            1e-5,
            &at("prompt"),
        );
        // Row 1 without a prompt: its plain logits, beside row 0's prompted ones.
        let got = model
            .forward_prompted(ids.clone(), None, &[Some(p), None], None)
            .unwrap();
        let plain = model.forward(ids.clone()).unwrap();
        assert_close(
            got.clone().slice([0..1, 0..pt - 3, 0..v]),
            want.slice([0..1, 3..pt, 0..v]),
            1e-5,
            &at("row 0 prompted"),
        );
        assert_close(
            got.slice([1..2, 0..pt - 3, 0..v]),
            plain.slice([1..2, 0..pt - 3, 0..v]),
            1e-5,
            &at("row 1 plain"),
        );
        assert!(
            model
                .prefill_prompts(&[None, None], None, &mut KvCache::new())
                .is_err()
        );
    }
    let device = burn::tensor::Device::flex().autodiff();
    let model = modula::checkpoint::load_decoder(folder("llama"), &device).unwrap();
    let p = modula::PeftPrompt::load(folder("llama_prompt"), &device)
        .unwrap()
        .prompt;
    let ids: Tensor<2, Int> = golden("llama_prompt")
        .tensor::<2>("input_ids", &device)
        .unwrap()
        .int();
    let logits = model.forward_prompted(ids, None, &[Some(&p)], None);
    assert!(logits.is_err(), "one prompt for two rows is a shape error");
    let ids1: Tensor<2, Int> = Tensor::from_ints([[1, 5, 9]], &device);
    let loss = model
        .forward_prompted(ids1, None, &[Some(&p)], None)
        .unwrap()
        .powf_scalar(2.0)
        .mean();
    let g = modula::transfer::tartan::flat_gradient(loss.reshape([1]), &p);
    assert_eq!(g.len(), 3 * 32);
    assert!(g.iter().all(|x| x.is_finite()) && g.iter().any(|x| x.abs() > 1e-6));
}

/// Greedy generation after a prefilled prompt equals greedy decoding by full prompted
/// forwards, token by token; the saved folder holds PEFT's tensor and reloads.
#[test]
fn prompted_generation_and_saving() {
    use modula::models::{GenerationConfig, KvCache, generate_after};
    let device = burn::tensor::Device::flex();
    let model = modula::checkpoint::load_decoder(folder("llama"), &device).unwrap();
    let p = modula::PeftPrompt::load(folder("llama_prompt"), &device).unwrap();
    let prompts = [Some(&p.prompt)];
    let mut cache = KvCache::new();
    model.prefill_prompts(&prompts, None, &mut cache).unwrap();
    let start = vec![2i64, 40, 11];
    let ids: Tensor<2, Int> = Tensor::from_ints([[2, 40, 11]], &device);
    let config = GenerationConfig::greedy(&model, 5);
    let got = generate_after(&model, cache, ids, None, None, &config, |_| {}).unwrap();
    let mut seq = start.clone();
    for _ in 0..5 {
        let n = seq.len();
        let ids = Tensor::<1, Int>::from_ints(seq.as_slice(), &device).reshape([1, n]);
        let logits = model.forward_prompted(ids, None, &prompts, None).unwrap();
        let last: Vec<f32> = logits
            .slice([0..1, n - 1..n])
            .into_data()
            .iter::<f32>()
            .collect();
        let best = (0..last.len())
            .max_by(|&a, &b| last[a].total_cmp(&last[b]))
            .unwrap();
        seq.push(best as i64);
    }
    assert_eq!(got[0], seq[start.len()..]);
    let tmp = tempfile::tempdir().unwrap();
    p.save(tmp.path()).unwrap();
    let (a, b) = (
        TensorFile::open(folder("llama_prompt").join("adapter_model.safetensors")).unwrap(),
        TensorFile::open(tmp.path().join("adapter_model.safetensors")).unwrap(),
    );
    assert_eq!(a.tensors(), b.tensors());
    let back = modula::PeftPrompt::load(tmp.path(), &device).unwrap();
    assert_eq!(back.config.num_virtual_tokens, 3);
    // A prompt of the wrong shape, or for an encoder-decoder model, is refused.
    let text = std::fs::read_to_string(tmp.path().join("adapter_config.json")).unwrap();
    std::fs::write(
        tmp.path().join("adapter_config.json"),
        text.replace("\"num_virtual_tokens\": 3", "\"num_virtual_tokens\": 4"),
    )
    .unwrap();
    let e = modula::PeftPrompt::load(tmp.path(), &device)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("prompt_embeddings") && e.contains("num_virtual_tokens = 4"),
        "{e}"
    );
    std::fs::write(
        tmp.path().join("adapter_config.json"),
        text.replace(
            "\"num_transformer_submodules\": 1",
            "\"num_transformer_submodules\": 2",
        ),
    )
    .unwrap();
    let e = modula::PeftPrompt::load(tmp.path(), &device)
        .unwrap_err()
        .to_string();
    assert!(e.contains("num_transformer_submodules"), "{e}");
}

/// Folders modula wrote (examples/peft_methods.rs: a trained soft prompt, a LoHa and a LoKr
/// built from their modules) load in PEFT 0.21.2 with modula's logits:
/// tests/data/tiny_decoders/modula_{prompt,loha,lokr} hold them with the logits PEFT computes
/// from them (`peft_golden.safetensors`, by tests/data/check_modula_outputs.py), and modula
/// reading them back gives the same.
#[test]
fn folders_modula_saved_give_peft_the_same_logits() {
    let device = burn::tensor::Device::flex();
    for name in ["modula_prompt", "modula_loha", "modula_lokr"] {
        let g = TensorFile::open(folder(name).join("peft_golden.safetensors")).unwrap();
        let ids: Tensor<2, Int> = g.tensor::<2>("input_ids", &device).unwrap().int();
        let want: Tensor<3> = g.tensor("logits", &device).unwrap();
        let mut model = modula::checkpoint::load_decoder(folder("llama"), &device).unwrap();
        let got = match PeftAdapter::load(folder(name), &device).unwrap() {
            PeftAdapter::Prompt(p) => {
                let b = ids.dims()[0];
                model
                    .forward_prompted(ids, None, &vec![Some(&p.prompt); b], None)
                    .unwrap()
            }
            other => {
                other.attach_to_model(&mut model, "x").unwrap();
                model.forward(ids).unwrap()
            }
        };
        assert_close(got, want, 1e-5, name);
    }
}
