//! Every error the public API can return, from bad input: a typed error whose message says what
//! to fix, never a panic.

mod common;

use std::path::Path;

use burn::nn::LinearConfig;
use burn::tensor::{Device, Tensor};
use common::{Rng, data};
use modula::prelude::*;
use modula::{Error, PeftAdapter};

fn copy_folder(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

/// A copy of the golden LoRA folder with its config edited by `edit`.
fn edited_lora_folder(edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_folder(&data("peft_lora_tiny_mlp"), dir.path());
    let p = dir.path().join("adapter_config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
    dir
}

fn peft_err(dir: &Path) -> String {
    let err = PeftLora::load(dir, &Device::flex()).unwrap_err();
    assert!(
        matches!(err, Error::Peft { .. } | Error::SafeTensors { .. }),
        "{err:?}"
    );
    err.to_string()
}

#[test]
fn shape_mismatch_on_forward() {
    let device = Device::flex();
    let layer = LoraLinear::new(LinearConfig::new(8, 4).init(&device));
    let err = layer
        .forward(Tensor::<2>::zeros([2, 7], &device))
        .unwrap_err();
    assert!(matches!(err, Error::Shape { .. }));
    assert!(err.to_string().contains("last axis 8"), "{err}");
    let ia3 = Ia3Linear::new(LinearConfig::new(8, 4).init(&device), true);
    assert!(matches!(
        ia3.forward(Tensor::<2>::zeros([2, 3], &device)),
        Err(Error::Shape { .. })
    ));
}

#[test]
fn rank_zero_and_bad_settings() {
    let device = Device::flex();
    let mut layer = LoraLinear::new(LinearConfig::new(8, 4).init(&device));
    let err = layer.add_adapter("x", &LoraConfig::new(0)).unwrap_err();
    assert!(err.to_string().contains("rank must be at least 1"), "{err}");
    let err = layer
        .add_adapter("x", &LoraConfig::new(2).with_dropout(1.5))
        .unwrap_err();
    assert!(matches!(err, Error::Invalid { .. }), "{err}");
    // Factors whose inner ranks disagree.
    let err = LoraModule::from_factors(
        Tensor::zeros([8, 3], &device),
        Tensor::zeros([2, 4], &device),
        1.0,
        false,
        0.0,
    )
    .unwrap_err();
    assert!(matches!(err, Error::Shape { .. }), "{err}");
    // An adapter whose widths do not fit the layer.
    let wrong = LoraConfig::new(2).init(5, 4, &device).unwrap();
    assert!(matches!(
        layer.insert_adapter("w", wrong),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        BottleneckConfig::new(0).init(&device),
        Err(Error::Invalid { .. })
    ));
    assert!(matches!(
        PrefixConfig::new(0, 1, 16).init(&device),
        Err(Error::Invalid { .. })
    ));
}

#[test]
fn unknown_and_duplicate_adapter_names() {
    let device = Device::flex();
    let mut layer = LoraLinear::new(LinearConfig::new(8, 4).init(&device));
    layer.add_adapter("math", &LoraConfig::new(2)).unwrap();
    let err = layer.set_active(&["code"]).unwrap_err();
    assert!(matches!(err, Error::UnknownAdapter { .. }));
    assert!(err.to_string().contains("known adapters: [math]"), "{err}");
    assert!(matches!(
        layer.merge("nope"),
        Err(Error::UnknownAdapter { .. })
    ));
    assert!(matches!(
        layer.add_adapter("math", &LoraConfig::new(2)),
        Err(Error::DuplicateAdapter { .. })
    ));
    assert!(matches!(
        layer.unmerge("math"),
        Err(Error::NotMerged { .. })
    ));
    layer.merge("math").unwrap();
    assert!(matches!(
        layer.merge("math"),
        Err(Error::AlreadyMerged { .. })
    ));
    let peft = PeftLora::load(data("peft_lora_tiny_mlp"), &device).unwrap();
    let err = peft.get("fc3").unwrap_err();
    assert!(err.to_string().contains("fc1, fc2"), "{err}");
}

#[test]
fn missing_and_malformed_config_keys() {
    let no_r = edited_lora_folder(|v| {
        v.as_object_mut().unwrap().remove("r");
    });
    assert!(peft_err(no_r.path()).contains("missing key `r`"));
    let bad_r = edited_lora_folder(|v| v["r"] = serde_json::json!("four"));
    assert!(peft_err(bad_r.path()).contains("r: must be a positive integer"));
    // A mistyped key is named, with what was found and what was expected.
    let bad_flag = edited_lora_folder(|v| v["fan_in_fan_out"] = serde_json::json!("yes"));
    let msg = peft_err(bad_flag.path());
    assert!(
        msg.contains("fan_in_fan_out") && msg.contains("\"yes\"") && msg.contains("boolean"),
        "{msg}"
    );
    let bad_pattern = edited_lora_folder(|v| v["rank_pattern"] = serde_json::json!({"fc1": 0}));
    let msg = peft_err(bad_pattern.path());
    assert!(
        msg.contains("rank_pattern.fc1") && msg.contains("positive integer"),
        "{msg}"
    );
    let no_type = edited_lora_folder(|v| {
        v.as_object_mut().unwrap().remove("peft_type");
    });
    assert!(peft_err(no_type.path()).contains("peft_type"));
    let other = edited_lora_folder(|v| v["peft_type"] = serde_json::json!("OFT"));
    let msg = peft_err(other.path());
    assert!(
        msg.contains("not supported") && msg.contains("LOHA"),
        "{msg}"
    );
    // A supported type read with another type's loader names the loader to use.
    let loha = edited_lora_folder(|v| v["peft_type"] = serde_json::json!("LOHA"));
    let msg = peft_err(loha.path());
    assert!(msg.contains("PeftLycoris::load"), "{msg}");
    let dir = tempfile::tempdir().unwrap();
    copy_folder(&data("peft_lora_tiny_mlp"), dir.path());
    std::fs::write(dir.path().join("adapter_config.json"), "{ not json").unwrap();
    assert!(peft_err(dir.path()).contains("not valid JSON"));
    let empty = tempfile::tempdir().unwrap();
    assert!(peft_err(empty.path()).contains("adapter_config.json"));
}

#[test]
fn unsupported_peft_features_are_rejected() {
    for (key, val, needle) in [
        ("use_dora", serde_json::json!(true), "DoRA"),
        ("lora_bias", serde_json::json!(true), "bias"),
        ("bias", serde_json::json!("all"), "bias"),
        (
            "modules_to_save",
            serde_json::json!(["classifier"]),
            "modules_to_save",
        ),
    ] {
        let dir = edited_lora_folder(|v| v[key] = val);
        let msg = peft_err(dir.path());
        assert!(msg.contains(needle), "{key}: {msg}");
    }
}

#[test]
fn tensor_shapes_that_disagree_with_the_config() {
    // The folder holds rank-4 factors; a config claiming r = 3 must be refused.
    let dir = edited_lora_folder(|v| v["r"] = serde_json::json!(3));
    let msg = peft_err(dir.path());
    assert!(msg.contains("disagree with the config's rank 3"), "{msg}");
    let dir = edited_lora_folder(|v| v["rank_pattern"] = serde_json::json!({"fc2": 2}));
    let msg = peft_err(dir.path());
    assert!(msg.contains("fc2") && msg.contains("rank 2"), "{msg}");
}

#[test]
fn truncated_or_incomplete_weights() {
    let dir = tempfile::tempdir().unwrap();
    copy_folder(&data("peft_lora_tiny_mlp"), dir.path());
    let w = dir.path().join("adapter_model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() - 100]).unwrap();
    let err = PeftLora::load(dir.path(), &Device::flex()).unwrap_err();
    assert!(matches!(err, Error::SafeTensors { .. }), "{err:?}");
    assert!(err.to_string().contains("truncated"), "{err}");
    std::fs::write(&w, &bytes[..5]).unwrap();
    assert!(matches!(
        PeftLora::load(dir.path(), &Device::flex()),
        Err(Error::SafeTensors { .. })
    ));

    // Only the lora_A half of a module.
    let file = TensorFile::open(data("peft_lora_tiny_mlp/adapter_model.safetensors")).unwrap();
    let mut kept = file.tensors().clone();
    kept.remove("base_model.model.fc2.lora_B.weight");
    modula::io::write_safetensors(&w, &kept, None).unwrap();
    let msg = peft_err(dir.path());
    assert!(
        msg.contains("fc2") && msg.contains("only one of lora_A / lora_B"),
        "{msg}"
    );

    // An IA3 folder is not a LoRA one, and vice versa.
    assert!(PeftLora::load(data("peft_ia3_tiny_mlp"), &Device::flex()).is_err());
    assert!(PeftIa3::load(data("peft_lora_tiny_mlp"), &Device::flex()).is_err());
    assert!(matches!(
        PeftAdapter::load(data("peft_ia3_tiny_mlp"), &Device::flex()),
        Ok(PeftAdapter::Ia3(_))
    ));
}

#[test]
fn invalid_routings() {
    let device = Device::flex();
    let err = Routing::from_rows(&[vec![0, 3]], &[vec![0.5, 0.5]], 3, &device).unwrap_err();
    assert!(matches!(
        err,
        Error::ModuleIndex {
            index: 3,
            num_modules: 3
        }
    ));
    assert!(err.to_string().contains("outside 0..3"), "{err}");
    let err = Routing::from_rows(&[vec![0, 1]], &[vec![f32::NAN, 0.5]], 3, &device).unwrap_err();
    assert!(err.to_string().contains("non-finite"), "{err}");
    assert!(matches!(
        Routing::from_rows(
            &[vec![0, 1], vec![1]],
            &[vec![1.0, 0.0], vec![1.0]],
            3,
            &device
        ),
        Err(Error::Shape { .. })
    ));
    // NaN weights in a routing built from tensors are caught when it is planned.
    let idx = Tensor::<2, burn::tensor::Int>::zeros([2, 1], &device);
    let w = Tensor::<2>::from_floats([[1.0], [f32::INFINITY]], &device);
    let routing = Routing::new(idx, w, 2).unwrap();
    assert!(matches!(
        DispatchPlan::new(&routing),
        Err(Error::NonFinite { .. })
    ));
    // A routing over a different number of modules than given.
    let modules = vec![LoraConfig::new(2).init(4, 4, &device).unwrap()];
    let routing = Routing::one_per_row(&[0, 1], 2, &device).unwrap();
    let x = Rng(1).tensor(2, 4, &device);
    assert!(matches!(
        modula::dispatch_modules(&modules, &routing, x, &WeightedSum),
        Err(Error::Shape { .. })
    ));
    let router = FixedRouter {
        assignment: vec![0, 0, 0],
        modules: 1,
    };
    assert!(matches!(
        router.route(&Rng(2).tensor(2, 4, &device)),
        Err(Error::Shape { .. })
    ));
}
