//! PEFT's target-module rules against PEFT 0.21.2 itself: tests/data/peft_target_rules.json
//! (made by tests/data/make_target_rules.py) holds, for 20 configs, PEFT's decision on 24
//! module paths of Llama-, Mixtral-, GPT-2- and BERT-style models, or the error `LoraConfig`
//! raises.

mod common;

use common::data;
use modula::peft::{TargetDecision, TargetRules};

#[test]
fn target_rules_decide_every_path_as_peft_does() {
    let text = std::fs::read_to_string(data("peft_target_rules.json")).unwrap();
    let table: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = table["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 20);
    let mut checked = 0;
    for case in cases {
        let config = case["config"].as_object().unwrap();
        let rules = TargetRules::from_config(config);
        if let Some(peft_error) = case.get("error") {
            let e = rules.expect_err(&format!("PEFT refuses {config:?}: {peft_error}"));
            let key = if peft_error
                .as_str()
                .unwrap()
                .contains("layers_to_transform` cannot")
            {
                "layers_to_transform"
            } else {
                "layers_pattern"
            };
            assert!(e.to_string().contains(key), "{e}");
            continue;
        }
        let rules = rules.unwrap();
        for (path, want) in case["decisions"].as_object().unwrap() {
            let want = match want.as_str().unwrap() {
                "target" => TargetDecision::Target,
                "excluded" => TargetDecision::Excluded,
                _ => TargetDecision::NotTarget,
            };
            assert_eq!(rules.decide(path), want, "{path} under {config:?}");
            checked += 1;
        }
    }
    assert_eq!(checked, 18 * 24);
}

#[test]
fn malformed_target_keys_are_errors_that_name_the_key() {
    let parse = |s: &str| {
        let v: serde_json::Value = serde_json::from_str(s).unwrap();
        TargetRules::from_config(v.as_object().unwrap())
    };
    for (json, key) in [
        (r#"{}"#, "target_modules"),
        (r#"{"target_modules": 3}"#, "target_modules"),
        (r#"{"target_modules": ["q", 1]}"#, "target_modules"),
        (r#"{"target_modules": "(?<=a)b"}"#, "target_modules"),
        (
            r#"{"target_modules": ["q"], "exclude_modules": 2}"#,
            "exclude_modules",
        ),
        (
            r#"{"target_modules": ["q"], "layers_to_transform": -1}"#,
            "layers_to_transform",
        ),
        (
            r#"{"target_modules": ["q"], "layers_to_transform": ["a"]}"#,
            "layers_to_transform",
        ),
    ] {
        let e = parse(json).expect_err(json);
        assert!(e.to_string().contains(key), "{json}: {e}");
    }
    // all-linear: every linear layer by full path but the output layer; exclusions still
    // apply. It is a string to PEFT, so layers_to_transform is refused with it.
    assert!(
        parse(r#"{"target_modules": "all-linear", "layers_to_transform": [1]}"#)
            .unwrap_err()
            .to_string()
            .contains("layers_to_transform")
    );
    let mut all =
        parse(r#"{"target_modules": "ALL-LINEAR", "exclude_modules": ["o_proj"]}"#).unwrap();
    assert!(all.is_all_linear());
    assert_eq!(
        all.decide("model.layers.0.mlp.up_proj"),
        TargetDecision::NotTarget
    );
    let linear = [
        "model.layers.0.mlp.up_proj",
        "model.layers.0.self_attn.o_proj",
        "lm_head",
    ];
    all.resolve_all_linear(linear, Some("lm_head"));
    assert!(!all.is_all_linear());
    assert_eq!(
        all.decide("model.layers.0.mlp.up_proj"),
        TargetDecision::Target
    );
    assert_eq!(
        all.decide("model.layers.0.self_attn.o_proj"),
        TargetDecision::Excluded
    );
    assert_eq!(all.decide("lm_head"), TargetDecision::NotTarget);
    assert_eq!(all.decide("model.norm"), TargetDecision::NotTarget);
}

#[test]
fn all_linear_resolves_to_the_layers_peft_adapts() {
    let text = std::fs::read_to_string(data("peft_target_rules.json")).unwrap();
    let table: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = table["all_linear"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    for case in cases {
        let strs = |k: &str| -> Vec<String> {
            case[k]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect()
        };
        let (linear, want) = (strs("linear"), strs("targets"));
        let mut rules = TargetRules::from_config(case["config"].as_object().unwrap()).unwrap();
        rules.resolve_all_linear(
            linear.iter().map(String::as_str),
            case["output_layer"].as_str(),
        );
        let got: Vec<&String> = linear
            .iter()
            .filter(|p| rules.decide(p) == TargetDecision::Target)
            .collect();
        let mut got: Vec<String> = got.into_iter().cloned().collect();
        got.sort();
        assert_eq!(got, want, "{} {}", case["model"], case["config"]);
    }
}
