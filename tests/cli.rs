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
