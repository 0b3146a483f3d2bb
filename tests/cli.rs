//! The `modula` command-line tool, end to end, against PEFT's stored numbers.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::tensor::{Device, Tensor};
use common::{HostFactors, assert_close, data, factors, golden, mat, mat_diff};
use modula::library::LoraExpert;
use modula::{PeftLora, TensorFile};

fn modula(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_modula"))
        .args(args)
        .output()
        .expect("run modula");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Writes golden factors `{prefix}{i}.lora_A/B` as PEFT folders adapting `fc1` (r=4, alpha=8).
fn golden_folders(file: &str, prefix: &str, n: usize, root: &Path) -> Vec<PathBuf> {
    let g = golden(file);
    let device = Device::flex();
    (0..n)
        .map(|i| {
            let f = factors(
                &mat(&g, &format!("{prefix}{i}.lora_A")),
                &mat(&g, &format!("{prefix}{i}.lora_B")),
                2.0,
            );
            let mut peft = PeftLora::new(4, 8.0, false);
            let a = f.to_adapter(&device).unwrap();
            // Keep PEFT's own alpha (8 for r = 4): the same factors, scaling 2.
            let a =
                modula::LoraModule::from_factors(a.a.val(), a.b.val(), 8.0, false, 0.0).unwrap();
            peft.insert("fc1", a);
            let dir = root.join(format!("{prefix}{i}"));
            peft.save(&dir).unwrap();
            dir
        })
        .collect()
}

#[test]
fn merge_writes_a_peft_folder_with_peft_numbers() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs = golden_folders("merge_weighted.safetensors", "a", 3, tmp.path());
    let g = golden("merge_weighted.safetensors");
    let base = golden("tiny_mlp_base.safetensors");
    let device = Device::flex();
    for (method, extra) in [
        ("ties", vec!["--density", "0.5", "--space", "factor"]),
        ("linear", vec!["--space", "factor"]),
        ("magnitude_prune_svd", vec!["--density", "0.5"]),
        ("cat", vec![]),
    ] {
        let out = tmp.path().join(format!("merged-{method}"));
        let mut args = vec!["merge", "--method", method, "--weights", "0.5,0.3,0.2"];
        args.extend(extra);
        args.extend(["--out", out.to_str().unwrap()]);
        args.extend(dirs.iter().map(|d| d.to_str().unwrap()));
        let (ok, _, err) = modula(&args);
        assert!(ok, "{method}: {err}");
        // The folder is a PEFT folder: config r = lora_alpha (scaling 1), one fc1 module.
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["peft_type"], "LORA");
        assert_eq!(cfg["r"], cfg["lora_alpha"], "{method}: scaling 1");
        let peft = PeftLora::load(&out, &device).unwrap();
        let merged = LoraExpert::from_peft(&peft).unwrap();
        let delta = merged.layers["fc1"].delta_mat();
        let expected = mat(&g, &format!("{method}.delta_weight"));
        assert!(
            mat_diff(&delta, &expected) < 1e-5,
            "{method}: delta vs PEFT"
        );
        // Outputs of fc1 with the merged adapter equal x (W + ΔW_PEFT)ᵀ + b.
        let mut fc1 = modula::LoraLinear::new(base.linear_torch("fc1", &device).unwrap());
        peft.attach("fc1", &mut fc1, "merged").unwrap();
        let x: Tensor<2> = base.tensor("x", &device).unwrap();
        let w: Tensor<2> = base.tensor("fc1.weight", &device).unwrap();
        let d: Tensor<2> = g
            .tensor(&format!("{method}.delta_weight"), &device)
            .unwrap();
        let b: Tensor<1> = base.tensor("fc1.bias", &device).unwrap();
        let want = x.clone().matmul((w + d).transpose()) + b.unsqueeze();
        assert_close(fc1.forward(x).unwrap(), want, 1e-5, method);
    }
}

#[test]
fn arrow_cluster_inspect_and_bake() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs = golden_folders("arrow_routing.safetensors", "task_", 4, tmp.path());
    let args: Vec<&str> = dirs.iter().map(|d| d.to_str().unwrap()).collect();

    // arrow: one [experts, d_in] matrix keyed by module path, rows in argument order.
    let out = tmp.path().join("protos.safetensors");
    let mut a = vec!["arrow", "--out", out.to_str().unwrap()];
    a.extend(&args);
    let (ok, _, err) = modula(&a);
    assert!(ok, "{err}");
    let protos = TensorFile::open(&out).unwrap();
    let g = golden("arrow_routing.safetensors");
    assert!(mat_diff(&mat(&protos, "fc1"), &mat(&g, "prototypes")) < 1e-5);

    // cluster: JSON list of clusters of the folders as given.
    let mut c = vec!["cluster", "--k", "2"];
    c.extend(&args);
    let (ok, stdout, err) = modula(&c);
    assert!(ok, "{err}");
    let clusters: Vec<Vec<String>> = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(clusters.len(), 2);
    let mut all: Vec<String> = clusters.concat();
    all.sort();
    let mut given: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    given.sort();
    assert_eq!(all, given);

    // cluster with a known answer: noisy copies of two different experts, interleaved in the
    // argument list, must come back as the two families.
    let mut rng = common::Rng(77);
    let families: Vec<PathBuf> = (0..6)
        .map(|i| {
            let src = &dirs[i % 2];
            let peft = PeftLora::load(src, &Device::flex()).unwrap();
            let f = LoraExpert::from_peft(&peft).unwrap().layers["fc1"].clone();
            let jitter = |m: &common::Mat, rng: &mut common::Rng| {
                let mut m = m.clone();
                m.data
                    .iter_mut()
                    .for_each(|v| *v += 0.05 * (2.0 * rng.uniform() as f64 - 1.0));
                m
            };
            let noisy = factors(
                &jitter(&f.a_mat(), &mut rng),
                &jitter(&f.b_mat(), &mut rng),
                2.0,
            );
            let mut out = PeftLora::new(4, 8.0, false);
            let a = noisy.to_adapter(&Device::flex()).unwrap();
            let a =
                modula::LoraModule::from_factors(a.a.val(), a.b.val(), 8.0, false, 0.0).unwrap();
            out.insert("fc1", a);
            let dir = tmp.path().join(format!("family{}_{i}", i % 2));
            out.save(&dir).unwrap();
            dir
        })
        .collect();
    let mut c = vec!["cluster", "--k", "2"];
    c.extend(families.iter().map(|d| d.to_str().unwrap()));
    let (ok, stdout, err) = modula(&c);
    assert!(ok, "{err}");
    let mut clusters: Vec<Vec<String>> = serde_json::from_str(stdout.trim()).unwrap();
    clusters.iter_mut().for_each(|c| c.sort());
    clusters.sort();
    let family = |j: usize| -> Vec<String> {
        (0..6)
            .filter(|i| i % 2 == j)
            .map(|i| families[i].to_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(clusters, [family(0), family(1)], "the two families");

    // inspect: config and layers.
    let (ok, stdout, err) = modula(&["inspect", args[0]]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["layers"]["fc1"]["rank"], 4);
    assert_eq!(v["layers"]["fc1"]["scaling"], 2.0);

    // bake: PEFT's merge_and_unload on the golden TinyMLP adapter.
    let baked = tmp.path().join("baked.safetensors");
    let (ok, _, err) = modula(&[
        "bake",
        "--base",
        data("tiny_mlp_base.safetensors").to_str().unwrap(),
        "--out",
        baked.to_str().unwrap(),
        data("peft_lora_tiny_mlp").to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let baked = TensorFile::open(&baked).unwrap();
    let expected = golden("peft_lora_tiny_mlp_expected.safetensors");
    for layer in ["fc1", "fc2"] {
        let d = mat_diff(
            &mat(&baked, &format!("{layer}.weight")),
            &mat(&expected, &format!("expected_merged_{layer}_weight")),
        );
        assert!(d < 1e-5, "{layer}: {d:e}");
    }
    // Biases and the other tensors are carried over unchanged.
    assert_eq!(
        baked.get("fc1.bias").unwrap(),
        golden("tiny_mlp_base.safetensors").get("fc1.bias").unwrap()
    );
}

#[test]
fn errors_name_the_file_and_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope");
    let (ok, _, err) = modula(&["inspect", missing.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("nope"), "{err}");
    let dirs = golden_folders("merge_weighted.safetensors", "a", 2, tmp.path());
    let out = tmp.path().join("o");
    let (ok, _, err) = modula(&[
        "merge",
        "--method",
        "ties",
        "--out",
        out.to_str().unwrap(),
        dirs[0].to_str().unwrap(),
        dirs[1].to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("density"), "{err}");
    assert!(!out.exists(), "nothing written on error");
    let (ok, _, err) = modula(&[
        "merge",
        "--method",
        "average",
        "--out",
        out.to_str().unwrap(),
        dirs[0].to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("average"), "{err}");
    // Baking onto a base without the adapter's module names the base file.
    let other = tmp.path().join("other.safetensors");
    let mut t = std::collections::BTreeMap::new();
    t.insert(
        "head.weight".to_string(),
        modula::HostTensor {
            shape: vec![2, 2],
            data: vec![0.0; 4],
        },
    );
    modula::io::write_safetensors(&other, &t, None).unwrap();
    let (ok, _, err) = modula(&[
        "bake",
        "--base",
        other.to_str().unwrap(),
        "--out",
        tmp.path().join("x.safetensors").to_str().unwrap(),
        dirs[0].to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        err.contains("other.safetensors") && err.contains("fc1"),
        "{err}"
    );
}

/// Runs `modula` and returns its exit code and stderr.
fn modula_code(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_modula"))
        .args(args)
        .output()
        .expect("run modula");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Rows of `width` token ids from the tensor `key` of a golden file (ids stored as F32).
fn golden_rows(g: &TensorFile, key: &str, width: usize) -> Vec<Vec<i64>> {
    g.get(key)
        .unwrap()
        .data
        .chunks(width)
        .map(|r| r.iter().map(|v| *v as i64).collect())
        .collect()
}

/// Each generated row equals transformers' for as long as its top-1/top-2 logit gap is clear
/// (> 1e-3), which must cover at least 4 steps.
fn assert_clear_prefix_equal(
    got: &serde_json::Value,
    want: &serde_json::Value,
    gaps: &serde_json::Value,
) {
    for (r, gaps) in gaps.as_array().unwrap().iter().enumerate() {
        let clear = gaps
            .as_array()
            .unwrap()
            .iter()
            .take_while(|v| v.as_f64().unwrap() > 1e-3)
            .count();
        assert!(clear >= 4, "row {r}: {clear} clear steps");
        let row = |v: &serde_json::Value| v.as_array().unwrap()[..clear].to_vec();
        assert_eq!(row(&got[r]), row(&want[r]), "row {r}");
    }
}

fn write_json(path: &Path, v: serde_json::Value) -> String {
    std::fs::write(path, v.to_string()).unwrap();
    path.to_str().unwrap().to_string()
}

/// `score` on a mixed batch: each row's logits equal PEFT's with that row's adapter, and a
/// row with `null` equals transformers' base model.
#[test]
fn score_gives_each_row_the_logits_of_its_adapter() {
    let root = data("tiny_decoders");
    let tmp = tempfile::tempdir().unwrap();
    let g = |name: &str| TensorFile::open(root.join(name).join("golden.safetensors")).unwrap();
    let ids = g("llama")
        .get("input_ids")
        .unwrap()
        .data
        .iter()
        .map(|v| *v as i64)
        .collect::<Vec<_>>();
    let rows: Vec<Vec<i64>> = ids.chunks(6).map(<[i64]>::to_vec).collect();
    let input = write_json(
        &tmp.path().join("in.json"),
        serde_json::json!({"input_ids": [rows[0], rows[1], rows[0]], "adapters": ["qvd", "all", null]}),
    );
    let out = tmp.path().join("logits.safetensors");
    let (ok, _, err) = modula(&[
        "score",
        "--model",
        root.join("llama").to_str().unwrap(),
        "--adapter",
        &format!("qvd={}", root.join("llama_lora_qvd").display()),
        "--adapter",
        &format!("all={}", root.join("llama_lora_all").display()),
        "--input",
        &input,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let got = TensorFile::open(&out).unwrap();
    let got = got.get("logits").unwrap();
    assert_eq!(got.shape, vec![3, 6, 64]);
    let n = 6 * 64;
    for (row, golden, golden_row) in [
        (0, "llama_lora_qvd", 0),
        (1, "llama_lora_all", 1),
        (2, "llama", 0),
    ] {
        let want =
            g(golden).get("logits").unwrap().data[golden_row * n..(golden_row + 1) * n].to_vec();
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = got.data[row * n..(row + 1) * n]
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff <= 1e-4 * scale, "row {row} vs {golden}: {diff}");
    }
}

/// `--adapter NAME=DIR` takes IA3 folders too: the tiny Llama's IA3 folder gives PEFT's
/// logits on the rows that name it and the base model's where a row names none.
#[test]
fn score_takes_ia3_folders() {
    let root = data("tiny_decoders");
    let tmp = tempfile::tempdir().unwrap();
    let g = TensorFile::open(root.join("llama_ia3/golden.safetensors")).unwrap();
    let rows = golden_rows(&g, "input_ids", 6);
    let input = write_json(
        &tmp.path().join("in.json"),
        serde_json::json!({"input_ids": [rows[0], rows[1]], "adapters": ["ia3", null]}),
    );
    let out = tmp.path().join("logits.safetensors");
    let (ok, _, err) = modula(&[
        "score",
        "--model",
        root.join("llama").to_str().unwrap(),
        "--adapter",
        &format!("ia3={}", root.join("llama_ia3").display()),
        "--input",
        &input,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let got = TensorFile::open(&out).unwrap();
    let got = &got.get("logits").unwrap().data;
    let want = &g.get("logits").unwrap().data;
    let n = 6 * 64;
    let scale = want[..n].iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = got[..n]
        .iter()
        .zip(&want[..n])
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(diff <= 1e-4 * scale, "row 0 vs PEFT's IA3 logits: {diff}");
    // Row 1 names no adapter: it is the base model's row, as `score` without adapters gives.
    let plain = write_json(
        &tmp.path().join("plain.json"),
        serde_json::json!({"input_ids": [rows[0], rows[1]]}),
    );
    let base_out = tmp.path().join("base.safetensors");
    let (ok, _, err) = modula(&[
        "score",
        "--model",
        root.join("llama").to_str().unwrap(),
        "--input",
        &plain,
        "--out",
        base_out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let base = TensorFile::open(&base_out).unwrap();
    let base = &base.get("logits").unwrap().data;
    let diff = got[n..]
        .iter()
        .zip(&base[n..])
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(diff <= 1e-5 * scale, "row 1 vs the base model: {diff}");
    let adapted = got[..n]
        .iter()
        .zip(&base[..n])
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        adapted > 1e-2 * scale,
        "the adapter changes row 0: {adapted}"
    );
}

/// `generate` is greedy and equals transformers' `generate` on a left-padded batch
/// (tests/data/tiny_decoders/generate.json) while the logit gaps are clear; `bake` on a model
/// folder gives a folder `score` reads as the adapted model.
#[test]
fn generate_and_bake_a_model_folder() {
    let root = data("tiny_decoders");
    let tmp = tempfile::tempdir().unwrap();
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("generate.json")).unwrap())
            .unwrap();
    let input = write_json(
        &tmp.path().join("in.json"),
        serde_json::json!({"input_ids": g["input_ids"], "attention_mask": g["attention_mask"]}),
    );
    let out = tmp.path().join("gen.json");
    let (ok, _, err) = modula(&[
        "generate",
        "--model",
        root.join("llama").to_str().unwrap(),
        "--adapter",
        &format!("qvd={}", root.join("llama_lora_qvd").display()),
        "--input",
        &input,
        "--max-new-tokens",
        "8",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let got: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let case = &g["cases"]["llama_lora_qvd"];
    assert_clear_prefix_equal(&got["new_tokens"], &case["new_tokens"], &case["gaps"]);
    // bake --base DIR --out DIR, then score the baked folder without the adapter.
    let baked = tmp.path().join("baked");
    let (ok, _, err) = modula(&[
        "bake",
        "--base",
        root.join("llama").to_str().unwrap(),
        "--out",
        baked.to_str().unwrap(),
        root.join("llama_lora_qvd").to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let golden = TensorFile::open(root.join("llama_lora_qvd").join("golden.safetensors")).unwrap();
    let ids: Vec<i64> = golden
        .get("input_ids")
        .unwrap()
        .data
        .iter()
        .map(|v| *v as i64)
        .collect();
    let input = write_json(
        &tmp.path().join("ids.json"),
        serde_json::json!({"input_ids": ids.chunks(6).collect::<Vec<_>>()}),
    );
    let scored = tmp.path().join("baked.safetensors");
    let (ok, _, err) = modula(&[
        "score",
        "--model",
        baked.to_str().unwrap(),
        "--input",
        &input,
        "--out",
        scored.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let device = Device::flex();
    let got: Tensor<3> = TensorFile::open(&scored)
        .unwrap()
        .tensor("logits", &device)
        .unwrap();
    assert_close(
        got,
        golden.tensor("logits", &device).unwrap(),
        1e-4,
        "baked folder",
    );
}

/// Bad batches and settings exit with status 2 and name the file, key, value or setting.
#[test]
fn score_and_generate_reject_bad_input_with_status_2() {
    let root = data("tiny_decoders");
    let model = root.join("llama");
    let tmp = tempfile::tempdir().unwrap();
    let qvd = format!("qvd={}", root.join("llama_lora_qvd").display());
    let cases: Vec<(serde_json::Value, Vec<&str>, &str)> = vec![
        (
            serde_json::json!({"input_ids": [[1, 2, 3], [4, 5]]}),
            vec![],
            "input_ids[1]",
        ),
        (serde_json::json!({"input_ids": [[1, 2, 64]]}), vec![], "64"),
        (
            serde_json::json!({"input_ids": [[1, -1]]}),
            vec![],
            "input_ids[0][1]",
        ),
        (
            serde_json::json!({"input_ids": [[1, 2]], "attention_mask": [[1, 1, 1]]}),
            vec![],
            "attention_mask[0]",
        ),
        (
            serde_json::json!({"input_ids": [[1, 2]], "attention_mask": [[1, 2]]}),
            vec![],
            "attention_mask[0][1]",
        ),
        (
            serde_json::json!({"input_ids": [[1, 2]], "adapters": ["nope"]}),
            vec![],
            "nope",
        ),
        (
            serde_json::json!({"input_ids": [[1, 2]], "adapters": ["qvd", null]}),
            vec![],
            "adapters",
        ),
        (
            serde_json::json!({"input_ids": [vec![1; 65]]}),
            vec![],
            "max_position_embeddings",
        ),
        (serde_json::json!({"input_ids": "x"}), vec![], "input_ids"),
        (
            serde_json::json!({"input_ids": [[1]], "extra": 1}),
            vec![],
            "extra",
        ),
        (
            serde_json::json!({"input_ids": [[1]]}),
            vec!["--adapter", "qvd"],
            "NAME=DIR",
        ),
        (
            serde_json::json!({"input_ids": [[1]]}),
            vec!["--adapter", "a=/nonexistent"],
            "nonexistent",
        ),
    ];
    for (i, (json, extra, want)) in cases.into_iter().enumerate() {
        let input = write_json(&tmp.path().join(format!("in{i}.json")), json);
        for cmd in ["score", "generate"] {
            let out = tmp.path().join(format!("out{i}"));
            let mut args = vec![
                cmd,
                "--model",
                model.to_str().unwrap(),
                "--adapter",
                &qvd,
                "--input",
                &input,
            ];
            args.extend(extra.iter().copied());
            args.extend(["--out", out.to_str().unwrap()]);
            if cmd == "generate" {
                args.extend(["--max-new-tokens", "2"]);
            }
            let (code, err) = modula_code(&args);
            assert_eq!(code, Some(2), "{cmd} case {i}: {err}");
            assert!(err.contains(want), "{cmd} case {i}: {err}");
            assert!(!out.exists(), "{cmd} case {i} wrote output");
        }
    }
    // Sampling flags without a temperature, and a missing model folder.
    let input = write_json(
        &tmp.path().join("ok.json"),
        serde_json::json!({"input_ids": [[1, 2]]}),
    );
    let out = tmp.path().join("o.json");
    let (code, err) = modula_code(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--input",
        &input,
        "--max-new-tokens",
        "2",
        "--top-k",
        "5",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--temperature"), "{err}");
    let (code, err) = modula_code(&[
        "score",
        "--model",
        tmp.path().join("none").to_str().unwrap(),
        "--input",
        &input,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("none"), "{err}");
}

/// `embed` on the tiny sentence-transformers BERT with a PEFT LoRA loaded: a mixed batch gives
/// row 0 PEFT's hidden states and embedding, row 1 the base model's; bad ids exit with 2.
#[test]
fn embed_writes_hidden_states_and_sentence_embeddings() {
    let root = data("tiny_bert");
    let tmp = tempfile::tempdir().unwrap();
    let g = TensorFile::open(root.join("golden.safetensors")).unwrap();
    let lg = TensorFile::open(data("tiny_bert_lora").join("golden.safetensors")).unwrap();
    let ints = |k: &str| golden_rows(&g, k, 6);
    // The interface has no token types (all 0): compare with the goldens' `_types0` embeddings.
    let ids = ints("input_ids");
    let input = write_json(
        &tmp.path().join("in.json"),
        serde_json::json!({"input_ids": ids, "attention_mask": ints("attention_mask"),
                           "adapters": ["lora", null]}),
    );
    let out = tmp.path().join("emb.safetensors");
    let (ok, _, err) = modula(&[
        "embed",
        "--model",
        root.to_str().unwrap(),
        "--adapter",
        &format!("lora={}", data("tiny_bert_lora").display()),
        "--input",
        &input,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let got = TensorFile::open(&out).unwrap();
    assert_eq!(got.get("last_hidden_state").unwrap().shape, vec![2, 6, 32]);
    let e = got.get("sentence_embedding").unwrap();
    assert_eq!(e.shape, vec![2, 32]);
    let want = |f: &TensorFile, r: usize| {
        f.get("sentence_embedding_types0").unwrap().data[r * 32..(r + 1) * 32].to_vec()
    };
    for (r, w) in [(0, want(&lg, 0)), (1, want(&g, 1))] {
        let diff = e.data[r * 32..(r + 1) * 32]
            .iter()
            .zip(&w)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff < 1e-5, "row {r}: {diff}");
    }
    let bad = write_json(
        &tmp.path().join("bad.json"),
        serde_json::json!({"input_ids": [[1, 99]]}),
    );
    let (code, err) = modula_code(&[
        "embed",
        "--model",
        root.to_str().unwrap(),
        "--input",
        &bad,
        "--out",
        tmp.path().join("x").to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("input_ids[0][1]") && err.contains("99"),
        "{err}"
    );
}

/// `score` reads a GPT-2 folder too: with its PEFT LoRA (fan_in_fan_out) on a left-padded
/// batch, the unpadded logits equal PEFT's.
#[test]
fn score_reads_gpt2_folders() {
    let root = data("tiny_decoders");
    let tmp = tempfile::tempdir().unwrap();
    let g = TensorFile::open(root.join("gpt2/golden.safetensors")).unwrap();
    let rows = |k: &str| golden_rows(&g, k, 6);
    let mask = rows("attention_mask");
    let input = write_json(
        &tmp.path().join("in.json"),
        serde_json::json!({"input_ids": rows("input_ids"), "attention_mask": mask}),
    );
    let out = tmp.path().join("l.safetensors");
    let (ok, _, err) = modula(&[
        "score",
        "--model",
        root.join("gpt2").to_str().unwrap(),
        "--adapter",
        &format!("l={}", root.join("gpt2_lora").display()),
        "--input",
        &input,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let got = TensorFile::open(&out).unwrap();
    let got = got.get("logits").unwrap();
    let want = TensorFile::open(root.join("gpt2_lora/golden.safetensors")).unwrap();
    let want = want.get("logits").unwrap();
    let scale = want.data.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (i, (a, b)) in got.data.iter().zip(&want.data).enumerate() {
        let (r, t) = (i / (6 * 64), (i / 64) % 6);
        if mask[r][t] == 1 {
            assert!(
                (a - b).abs() <= 1e-4 * scale,
                "row {r} token {t}: {a} vs {b}"
            );
        }
    }
}

/// `generate` reads a GPT-2 folder too: greedy, it equals transformers' `generate` on the
/// left-padded batch of tests/data/tiny_decoders/gpt2/generate.json while the gaps are clear.
#[test]
fn generate_reads_gpt2_folders() {
    let root = data("tiny_decoders/gpt2");
    let tmp = tempfile::tempdir().unwrap();
    let g = TensorFile::open(root.join("golden.safetensors")).unwrap();
    let rows = |k: &str| golden_rows(&g, k, 6);
    let input = write_json(
        &tmp.path().join("in.json"),
        serde_json::json!({"input_ids": rows("input_ids"), "attention_mask": rows("attention_mask")}),
    );
    let out = tmp.path().join("gen.json");
    let (ok, _, err) = modula(&[
        "generate",
        "--model",
        root.to_str().unwrap(),
        "--input",
        &input,
        "--max-new-tokens",
        "8",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let got: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("generate.json")).unwrap())
            .unwrap();
    assert_clear_prefix_equal(&got["new_tokens"], &want["new_tokens"], &want["gaps"]);
}

/// `tokenize` writes the input file `score` / `generate` / `embed` read, with transformers'
/// ids (tests/data/tiny_tokenizer, from make_tiny_tokenizer.py): left-padded by default for a
/// folder that is not a BERT encoder, right-padded or truncated when asked, adapters passed
/// through; `decode` gives transformers' texts back.
#[test]
fn tokenize_and_decode_follow_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let folder = data("tiny_tokenizer");
    let folder = folder.to_str().unwrap();
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data("tiny_tokenizer/tokens.json")).unwrap())
            .unwrap();
    let n = g["texts"].as_array().unwrap().len();
    let adapters: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            if i % 2 == 0 {
                "a".into()
            } else {
                serde_json::Value::Null
            }
        })
        .collect();
    let input = write_json(
        &tmp.path().join("texts.json"),
        serde_json::json!({ "texts": g["texts"], "adapters": adapters }),
    );
    let out = tmp.path().join("batch.json");
    let out_s = out.to_str().unwrap();
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    for (extra, key) in [
        (vec![], &g["padded"]["left"]),
        (vec!["--padding-side", "right"], &g["padded"]["right"]),
        (vec!["--max-length", "5"], &g["truncated_left_5"]),
    ] {
        let mut args = vec![
            "tokenize", "--model", folder, "--input", &input, "--out", out_s,
        ];
        args.extend(&extra);
        let (ok, _, err) = modula(&args);
        assert!(ok, "{extra:?}: {err}");
        let b = read(&out);
        assert_eq!(b["input_ids"], key["input_ids"], "{extra:?}");
        assert_eq!(b["attention_mask"], key["attention_mask"], "{extra:?}");
        assert_eq!(b["adapters"], serde_json::json!(adapters), "{extra:?}");
    }
    // Without special tokens, one text per call so that nothing is padded.
    let one = write_json(
        &tmp.path().join("one.json"),
        serde_json::json!({ "texts": [g["texts"][1]] }),
    );
    let (ok, _, err) = modula(&[
        "tokenize",
        "--model",
        folder,
        "--input",
        &one,
        "--out",
        out_s,
        "--no-special-tokens",
    ]);
    assert!(ok, "{err}");
    assert_eq!(read(&out)["input_ids"][0], g["no_special_tokens"][1]);
    assert!(read(&out).get("adapters").is_none());

    // decode: input_ids with their mask (padding left out), and generate's new_tokens.
    let padded = write_json(&tmp.path().join("padded.json"), g["padded"]["left"].clone());
    let texts = tmp.path().join("texts_out.json");
    let texts_s = texts.to_str().unwrap();
    for (flag, want) in [
        (Some("--skip-special-tokens"), &g["decoded"]),
        (None, &g["decoded_with_special_tokens"]),
    ] {
        let mut args = vec![
            "decode", "--model", folder, "--input", &padded, "--out", texts_s,
        ];
        args.extend(flag);
        let (ok, _, err) = modula(&args);
        assert!(ok, "{err}");
        assert_eq!(&read(&texts)["texts"], want, "{flag:?}");
    }
    let plain = g["no_special_tokens"].clone();
    let gen_out = write_json(
        &tmp.path().join("gen.json"),
        serde_json::json!({ "new_tokens": plain }),
    );
    let (ok, _, err) = modula(&[
        "decode", "--model", folder, "--input", &gen_out, "--out", texts_s,
    ]);
    assert!(ok, "{err}");
    assert_eq!(read(&texts)["texts"], g["decoded"]);

    // Bad input: exit 2 naming the flag, file or key.
    let bad_ids = write_json(
        &tmp.path().join("bad_ids.json"),
        serde_json::json!({ "new_tokens": [[1, 2], [5, 100000]] }),
    );
    let wrong_key = write_json(
        &tmp.path().join("wrong.json"),
        serde_json::json!({ "text": ["a"] }),
    );
    let short_adapters = write_json(
        &tmp.path().join("short.json"),
        serde_json::json!({ "texts": ["a", "b"], "adapters": ["x"] }),
    );
    let missing = tmp.path().join("no_such_dir");
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec![
                "tokenize",
                "--model",
                folder,
                "--input",
                &input,
                "--out",
                out_s,
                "--padding-side",
                "up",
            ],
            vec!["--padding-side up", "left or right"],
        ),
        (
            vec![
                "tokenize",
                "--model",
                folder,
                "--input",
                &input,
                "--out",
                out_s,
                "--max-length",
                "0",
            ],
            vec!["max_length"],
        ),
        (
            vec![
                "tokenize", "--model", folder, "--input", &wrong_key, "--out", out_s,
            ],
            vec!["wrong.json", "text"],
        ),
        (
            vec![
                "tokenize",
                "--model",
                folder,
                "--input",
                &short_adapters,
                "--out",
                out_s,
            ],
            vec!["short.json", "adapters", "1 names but there are 2 texts"],
        ),
        (
            vec![
                "tokenize",
                "--model",
                missing.to_str().unwrap(),
                "--input",
                &input,
                "--out",
                out_s,
            ],
            vec!["no_such_dir", "tokenizer.json"],
        ),
        (
            vec![
                "decode", "--model", folder, "--input", &bad_ids, "--out", texts_s,
            ],
            vec!["bad_ids.json", "new_tokens[1]", "100000"],
        ),
        (
            vec![
                "decode", "--model", folder, "--input", &wrong_key, "--out", texts_s,
            ],
            vec!["wrong.json", "new_tokens", "input_ids"],
        ),
    ];
    for (args, needles) in cases {
        let (code, err) = modula_code(&args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        for needle in needles {
            assert!(err.contains(needle), "{args:?}: `{needle}` not in {err}");
        }
    }
}

/// `score --router arrow` gives the logits of the library's `route_arrow` (per token, every
/// adapted layer); `--router uniform` over an adapter and its copy is that adapter (PEFT's
/// logits); routing flags without a router, an unknown router, or rows that name adapters
/// under a router exit with status 2.
#[test]
fn score_routes_adapters_per_token_with_router_arrow() {
    use modula::models::{ArrowOptions, LinearLayers, route_arrow};
    let root = data("tiny_decoders");
    let tmp = tempfile::tempdir().unwrap();
    let golden_qvd = TensorFile::open(root.join("llama_lora_qvd/golden.safetensors")).unwrap();
    let rows = golden_rows(&golden_qvd, "input_ids", 6);
    let input = write_json(
        &tmp.path().join("in.json"),
        serde_json::json!({ "input_ids": rows }),
    );
    let qvd = format!("qvd={}", root.join("llama_lora_qvd").display());
    let all = format!("all={}", root.join("llama_lora_all").display());
    let model = root.join("llama");
    let out = tmp.path().join("logits.safetensors");
    let score = |extra: &[&str]| {
        let mut args = vec![
            "score",
            "--model",
            model.to_str().unwrap(),
            "--input",
            &input,
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend(extra);
        modula_code(&args)
    };
    let (code, err) = score(&[
        "--adapter",
        &qvd,
        "--adapter",
        &all,
        "--router",
        "arrow",
        "--top-k",
        "2",
        "--temperature",
        "0.5",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let device = Device::flex();
    let got: Tensor<3> = TensorFile::open(&out)
        .unwrap()
        .tensor("logits", &device)
        .unwrap();
    let mut m = modula::checkpoint::load_decoder(&model, &device).unwrap();
    for (name, dir) in [("qvd", "llama_lora_qvd"), ("all", "llama_lora_all")] {
        modula::PeftAdapter::load(root.join(dir), &device)
            .unwrap()
            .attach_to_model(&mut m, name)
            .unwrap();
    }
    let options = ArrowOptions {
        top_k: 2,
        temperature: 0.5,
        mix: modula::LoraMix::Output,
    };
    route_arrow(&mut m, &["qvd", "all"], &options, None).unwrap();
    let ids = golden_qvd.tensor::<2>("input_ids", &device).unwrap().int();
    let want = m.forward(ids.clone()).unwrap();
    assert_close(got.clone(), want, 1e-5, "score --router arrow");
    m.set_active_adapters(&["qvd"]).unwrap();
    modula::models::remove_routers(&mut m);
    assert!(
        common::max_abs_diff(got, m.forward(ids).unwrap()) > 1e-3,
        "routing differs from one adapter alone"
    );

    let qvd2 = format!("qvd2={}", root.join("llama_lora_qvd").display());
    let (code, err) = score(&["--adapter", &qvd, "--adapter", &qvd2, "--router", "uniform"]);
    assert_eq!(code, Some(0), "{err}");
    let got: Tensor<3> = TensorFile::open(&out)
        .unwrap()
        .tensor("logits", &device)
        .unwrap();
    let want: Tensor<3> = golden_qvd.tensor("logits", &device).unwrap();
    assert_close(got, want, 1e-4, "uniform merge of an adapter with itself");

    for (extra, needle) in [
        (
            vec!["--adapter", &qvd, "--router-top-k", "2"],
            "--router-top-k",
        ),
        (
            vec!["--adapter", &qvd, "--router", "bogus"],
            "--router bogus",
        ),
        (vec!["--router", "arrow"], "no adapters are loaded"),
        (
            vec!["--adapter", &qvd, "--router", "arrow", "--top-k", "0"],
            "top_k",
        ),
        (
            vec![
                "--adapter",
                &qvd,
                "--router",
                "arrow",
                "--router-mix",
                "both",
            ],
            "--router-mix both",
        ),
        (
            vec!["--adapter", &qvd, "--router", "uniform", "--top-k", "2"],
            "--router uniform",
        ),
    ] {
        let (code, err) = score(&extra);
        assert_eq!(code, Some(2), "{extra:?}: {err}");
        assert!(err.contains(needle), "{extra:?}: {err}");
    }
    let named = write_json(
        &tmp.path().join("named.json"),
        serde_json::json!({ "input_ids": rows, "adapters": ["qvd", "qvd"] }),
    );
    let (code, err) = modula_code(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        &qvd,
        "--router",
        "arrow",
        "--input",
        &named,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("key `adapters`"), "{err}");

    // generate routes every decoding step too: the library's greedy generation under Arrow.
    let gen_out = tmp.path().join("gen.json");
    let (code, err) = modula_code(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        &qvd,
        "--adapter",
        &all,
        "--router",
        "arrow",
        "--router-top-k",
        "2",
        "--router-temperature",
        "0.5",
        "--max-new-tokens",
        "5",
        "--input",
        &input,
        "--out",
        gen_out.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{err}");
    let got: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&gen_out).unwrap()).unwrap();
    route_arrow(&mut m, &["qvd", "all"], &options, None).unwrap();
    let ids = golden_qvd.tensor::<2>("input_ids", &device).unwrap().int();
    let config = modula::models::GenerationConfig::greedy(&m, 5);
    let want = m.generate(ids, None, None, &config, |_| {}).unwrap();
    let got: Vec<Vec<i64>> = serde_json::from_value(got["new_tokens"].clone()).unwrap();
    assert_eq!(got, want, "generate --router arrow");
    assert!(got.iter().all(|r| !r.is_empty()));
}

/// `score --router arrow --router-general NAME`: GenKnowSub then Arrow, PEFT's
/// `ArrowConfig(use_gks=True)` with exact prototypes (tests/data/make_arrow_goldens.py);
/// a general name that is not loaded exits with status 2.
#[test]
fn score_router_general_applies_gen_know_sub_as_peft() {
    let root = data("tiny_decoders");
    let tmp = tempfile::tempdir().unwrap();
    let g = TensorFile::open(root.join("arrow/golden.safetensors")).unwrap();
    let rows = golden_rows(&g, "input_ids", 6);
    let input = write_json(
        &tmp.path().join("in.json"),
        serde_json::json!({ "input_ids": rows }),
    );
    let out = tmp.path().join("logits.safetensors");
    let spec = |name: &str, dir: &str| format!("{name}={}", root.join("arrow").join(dir).display());
    let adapters = [
        spec("task_0", "expert_0"),
        spec("task_1", "expert_1"),
        spec("task_2", "expert_2"),
        spec("gks_0", "close_0"),
        spec("gks_1", "close_1"),
    ];
    let model = root.join("llama");
    let mut args = vec!["score", "--model", model.to_str().unwrap()];
    for a in &adapters {
        args.extend(["--adapter", a.as_str()]);
    }
    args.extend([
        "--router",
        "arrow",
        "--top-k",
        "2",
        "--temperature",
        "0.5",
        "--input",
        &input,
        "--out",
        out.to_str().unwrap(),
    ]);
    let mut with_general = args.clone();
    with_general.extend(["--router-general", "gks_0", "--router-general", "gks_1"]);
    let (code, err) = modula_code(&with_general);
    assert_eq!(code, Some(0), "{err}");
    let device = Device::flex();
    let got: Tensor<3> = TensorFile::open(&out)
        .unwrap()
        .tensor("logits", &device)
        .unwrap();
    let want: Tensor<3> = g.tensor("gks.logits_exact", &device).unwrap();
    assert_close(got, want, 1e-4, "score --router-general");

    let mut unknown = args.clone();
    unknown.extend(["--router-general", "gks_9"]);
    let (code, err) = modula_code(&unknown);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--router-general gks_9"), "{err}");
}

/// `modula arrow` and `modula cluster` on adapters of a real decoder: PEFT folders over the
/// tiny Llama's q/k/v/o/gate/up/down in both layers (14 adapted layers). Every prototype is the
/// unit top right singular vector of its layer's ΔW (checked against a dense f64
/// eigensolver), and noisy copies of two experts, interleaved, cluster back into their two
/// families.
#[test]
fn arrow_and_cluster_work_on_decoder_adapters() {
    use burn::module::Param;
    let tmp = tempfile::tempdir().unwrap();
    let root = data("tiny_decoders/arrow");
    let experts: Vec<PathBuf> = (0..3).map(|i| root.join(format!("expert_{i}"))).collect();
    let args: Vec<&str> = experts.iter().map(|d| d.to_str().unwrap()).collect();
    let out = tmp.path().join("protos.safetensors");
    let mut a = vec!["arrow", "--out", out.to_str().unwrap()];
    a.extend(&args);
    let (ok, _, err) = modula(&a);
    assert!(ok, "{err}");
    let protos = TensorFile::open(&out).unwrap();
    let device = Device::flex();
    let loaded: Vec<PeftLora> = experts
        .iter()
        .map(|d| PeftLora::load(d, &device).unwrap())
        .collect();
    let names: Vec<String> = protos.names().map(String::from).collect();
    assert_eq!(names.len(), 14, "{names:?}");
    for name in &names {
        let p = mat(&protos, name);
        assert_eq!(p.rows, 3, "{name}: one row per expert");
        for (e, peft) in loaded.iter().enumerate() {
            let m = peft.get(name).unwrap();
            let to64 =
                |t: Tensor<2>| -> Vec<f64> { t.into_data().iter::<f32>().map(f64::from).collect() };
            let [d_in, r] = m.a.val().dims();
            let d_out = m.b.val().dims()[1];
            let am = nalgebra::DMatrix::from_row_slice(d_in, r, &to64(m.a.val()));
            let bm = nalgebra::DMatrix::from_row_slice(r, d_out, &to64(m.b.val()));
            let dw = (&am * &bm) * m.scaling();
            let eig = (&dw * dw.transpose()).symmetric_eigen();
            let top = eig.eigenvalues.imax();
            let dot: f64 = (0..d_in)
                .map(|i| eig.eigenvectors[(i, top)] * p.data[e * d_in + i])
                .sum();
            assert!(
                dot.abs() > 1.0 - 1e-4,
                "{name}, expert {e}: |cos| {} with the exact prototype",
                dot.abs()
            );
        }
    }

    // Two families of noisy copies (every factor entry scaled by 1 ± 5 %), interleaved.
    let mut rng = common::Rng(21);
    let mut copies = Vec::new();
    for i in 0..6 {
        let mut peft = PeftLora::load(&experts[i % 2], &device).unwrap();
        for m in peft.modules.values_mut() {
            let [d_in, r] = m.a.val().dims();
            let d_out = m.b.val().dims()[1];
            let ja = rng
                .tensor(d_in, r, &device)
                .mul_scalar(0.05)
                .add_scalar(1.0);
            let jb = rng
                .tensor(r, d_out, &device)
                .mul_scalar(0.05)
                .add_scalar(1.0);
            m.a = Param::from_tensor(m.a.val() * ja);
            m.b = Param::from_tensor(m.b.val() * jb);
        }
        let dir = tmp.path().join(format!("family{}_{i}", i % 2));
        peft.save(&dir).unwrap();
        copies.push(dir.to_str().unwrap().to_string());
    }
    let mut c = vec!["cluster", "--k", "2"];
    c.extend(copies.iter().map(String::as_str));
    let (ok, stdout, err) = modula(&c);
    assert!(ok, "{err}");
    let mut clusters: Vec<Vec<String>> = serde_json::from_str(stdout.trim()).unwrap();
    clusters.iter_mut().for_each(|c| c.sort());
    clusters.sort();
    let family = |j: usize| -> Vec<String> {
        (0..6)
            .filter(|i| i % 2 == j)
            .map(|i| copies[i].clone())
            .collect()
    };
    assert_eq!(clusters, [family(0), family(1)], "the two families");
}

/// `--adapter NAME=DIR` takes PEFT LoHa and LoKr folders, mixed per row in one batch, with
/// PEFT's logits; `bake` merges them into a model folder with PEFT's `merge_and_unload`
/// logits, and refuses an IA3 folder with status 2.
#[test]
fn score_and_bake_take_loha_and_lokr_folders() {
    let root = data("tiny_decoders");
    let tmp = tempfile::tempdir().unwrap();
    let device = Device::flex();
    let g = TensorFile::open(root.join("llama_loha/golden.safetensors")).unwrap();
    let rows = golden_rows(&g, "input_ids", 6);
    let input = write_json(
        &tmp.path().join("in.json"),
        serde_json::json!({"input_ids": [rows[0], rows[1]], "adapters": ["loha", "lokr"]}),
    );
    let out = tmp.path().join("logits.safetensors");
    let (ok, _, err) = modula(&[
        "score",
        "--model",
        root.join("llama").to_str().unwrap(),
        "--adapter",
        &format!("loha={}", root.join("llama_loha").display()),
        "--adapter",
        &format!("lokr={}", root.join("llama_lokr").display()),
        "--input",
        &input,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let got: Tensor<3> = TensorFile::open(&out)
        .unwrap()
        .tensor("logits", &device)
        .unwrap();
    for (i, name) in ["llama_loha", "llama_lokr"].iter().enumerate() {
        let want: Tensor<3> = TensorFile::open(root.join(name).join("golden.safetensors"))
            .unwrap()
            .tensor("logits", &device)
            .unwrap();
        assert_close(
            got.clone().slice([i..i + 1, 0..6, 0..64]),
            want.slice([i..i + 1, 0..6, 0..64]),
            1e-5,
            &format!("row {i} through {name}"),
        );
    }
    for name in ["llama_loha", "llama_lokr_both"] {
        let baked = tmp.path().join(format!("baked_{name}"));
        let (ok, _, err) = modula(&[
            "bake",
            "--base",
            root.join("llama").to_str().unwrap(),
            "--out",
            baked.to_str().unwrap(),
            root.join(name).to_str().unwrap(),
        ]);
        assert!(ok, "{err}");
        let plain = write_json(
            &tmp.path().join("plain.json"),
            serde_json::json!({"input_ids": [rows[0], rows[1]]}),
        );
        let scored = tmp.path().join(format!("{name}.safetensors"));
        let (ok, _, err) = modula(&[
            "score",
            "--model",
            baked.to_str().unwrap(),
            "--input",
            &plain,
            "--out",
            scored.to_str().unwrap(),
        ]);
        assert!(ok, "{err}");
        let got: Tensor<3> = TensorFile::open(&scored)
            .unwrap()
            .tensor("logits", &device)
            .unwrap();
        let want: Tensor<3> = TensorFile::open(root.join(name).join("golden.safetensors"))
            .unwrap()
            .tensor("merged_logits", &device)
            .unwrap();
        assert_close(got, want, 1e-5, &format!("{name} baked"));
    }
    let (code, err) = modula_code(&[
        "bake",
        "--base",
        root.join("llama").to_str().unwrap(),
        "--out",
        tmp.path().join("no").to_str().unwrap(),
        root.join("llama_ia3").to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("llama_ia3") && err.contains("IA3"), "{err}");
    assert!(!tmp.path().join("no").exists());
}

/// `--adapter NAME=DIR` takes a PEFT prompt-tuning folder: rows that name it get PEFT's logits
/// after the soft tokens (the input positions), rows that name a LoRA adapter or none share
/// the batch; `generate` continues after the prompt; GPT-2 and `bake` refuse it with status 2.
#[test]
fn score_and_generate_take_prompt_tuning_folders() {
    let root = data("tiny_decoders");
    let tmp = tempfile::tempdir().unwrap();
    let device = Device::flex();
    let g = TensorFile::open(root.join("llama_prompt/golden.safetensors")).unwrap();
    let rows = golden_rows(&g, "input_ids", 6);
    let input = write_json(
        &tmp.path().join("in.json"),
        serde_json::json!({"input_ids": [rows[0], rows[1], rows[0]], "adapters": ["p", null, "qvd"]}),
    );
    let prompt = format!("p={}", root.join("llama_prompt").display());
    let lora = format!("qvd={}", root.join("llama_lora_qvd").display());
    let out = tmp.path().join("logits.safetensors");
    let model = root.join("llama");
    let (ok, _, err) = modula(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        &prompt,
        "--adapter",
        &lora,
        "--input",
        &input,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let got: Tensor<3> = TensorFile::open(&out)
        .unwrap()
        .tensor("logits", &device)
        .unwrap();
    let want: Tensor<3> = g.tensor("logits", &device).unwrap();
    assert_close(
        got.clone().slice([0..1, 0..6, 0..64]),
        want.slice([0..1, 3..9, 0..64]),
        1e-5,
        "row 0 after the soft prompt",
    );
    let base = modula::checkpoint::load_decoder(&model, &device).unwrap();
    let ids = burn::tensor::Tensor::<2, burn::tensor::Int>::from_data(
        burn::tensor::TensorData::new(rows[1].clone(), [1, 6]),
        &device,
    );
    assert_close(
        got.clone().slice([1..2, 0..6, 0..64]),
        base.forward(ids).unwrap(),
        1e-5,
        "row 1 plain",
    );
    let mut adapted = modula::checkpoint::load_decoder(&model, &device).unwrap();
    modula::PeftLora::load(root.join("llama_lora_qvd"), &device)
        .unwrap()
        .attach_to_model(&mut adapted, "qvd")
        .unwrap();
    let ids0 = burn::tensor::Tensor::<2, burn::tensor::Int>::from_data(
        burn::tensor::TensorData::new(rows[0].clone(), [1, 6]),
        &device,
    );
    assert_close(
        got.slice([2..3, 0..6, 0..64]),
        adapted.forward(ids0).unwrap(),
        1e-5,
        "row 2 through the LoRA",
    );
    // generate: the same tokens as the library's prefilled generation.
    let gen_in = write_json(
        &tmp.path().join("gen.json"),
        serde_json::json!({"input_ids": [rows[1]], "adapters": ["p"]}),
    );
    let gen_out = tmp.path().join("gen_out.json");
    let (ok, _, err) = modula(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        &prompt,
        "--input",
        &gen_in,
        "--max-new-tokens",
        "4",
        "--out",
        gen_out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let got: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&gen_out).unwrap()).unwrap();
    let p = modula::PeftPrompt::load(root.join("llama_prompt"), &device).unwrap();
    let mut cache = modula::models::KvCache::new();
    base.prefill_prompts(&[Some(&p.prompt)], None, &mut cache)
        .unwrap();
    let ids = burn::tensor::Tensor::<2, burn::tensor::Int>::from_data(
        burn::tensor::TensorData::new(rows[1].clone(), [1, 6]),
        &device,
    );
    let config = modula::models::GenerationConfig::greedy(&base, 4);
    let want =
        modula::models::generate_after(&base, cache, ids, None, None, &config, |_| {}).unwrap();
    assert_eq!(got["new_tokens"], serde_json::json!(want));
    // GPT-2 and bake refuse a prompt-tuning folder, naming it.
    let (code, err) = modula_code(&[
        "score",
        "--model",
        root.join("gpt2").to_str().unwrap(),
        "--adapter",
        &prompt,
        "--input",
        &gen_in,
        "--out",
        tmp.path().join("x.safetensors").to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("prompt-tuning") && err.contains("GPT-2"),
        "{err}"
    );
    let (code, err) = modula_code(&[
        "bake",
        "--base",
        model.to_str().unwrap(),
        "--out",
        tmp.path().join("no").to_str().unwrap(),
        root.join("llama_prompt").to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("soft tokens"), "{err}");
}
