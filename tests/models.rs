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
    for name in ["llama", "qwen2", "mistral"] {
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
    assert_eq!(model.model.layers[1].mlp.down_proj.names(), ["a"]);
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
        m.model
            .layers
            .iter()
            .all(|l| l.self_attn.q_proj.names().is_empty() && l.mlp.down_proj.names().is_empty())
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
        e.contains("model.layers.0.self_attn.q_proj") && e.contains("no LoRA factors"),
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
        fn weight(&self, name: &str) -> Option<TensorData> {
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
