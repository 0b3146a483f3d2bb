//! Hostile and broken inputs (issue 17): non-finite weights are refused at load with an
//! opt-out, and routing with masked (−∞) or huge logits stays finite.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use burn::tensor::{Device, Tensor};
use modula::io::{NonFinitePolicy, set_non_finite_policy, write_safetensors};
use modula::{HostTensor, Router, TensorFile, TopKRouterConfig};

fn modula_cli(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_modula"))
        .args(args)
        .output()
        .expect("the modula binary runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `modula score --model MODEL --input INPUT --out OUT`, with `extra` flags first.
fn score_cli(extra: &[&str], model: &Path, input: &Path, out: &Path) -> (Option<i32>, String) {
    let mut args: Vec<&str> = extra.to_vec();
    args.extend([
        "score",
        "--model",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    modula_cli(&args)
}

/// A copy of the tiny Llama folder whose `tensor` holds a NaN at flat index 5.
fn poisoned_llama(dir: &Path, tensor: &str) {
    let src = common::data("tiny_decoders/llama");
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), dir.join(f.file_name())).unwrap();
    }
    let path = dir.join("model.safetensors");
    let mut t = TensorFile::open(&path).unwrap().tensors().clone();
    t.get_mut(tensor).unwrap().data[5] = f32::NAN;
    write_safetensors(&path, &t, None).unwrap();
}

/// NaN or infinite weights are an error naming the file, the tensor and the first bad index,
/// in a safetensors file, a model folder and the tool (status 2); the process-wide opt-out
/// (`--allow-non-finite` in the tool) loads them.
#[test]
fn non_finite_weights_are_refused_unless_allowed() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("w.safetensors");
    let mut t = BTreeMap::new();
    t.insert(
        "w".to_string(),
        HostTensor {
            shape: vec![2, 3],
            data: vec![0.0, 1.0, 2.0, f32::INFINITY, 4.0, f32::NAN],
        },
    );
    write_safetensors(&file, &t, None).unwrap();
    let e = TensorFile::open(&file).unwrap_err().to_string();
    assert!(
        e.contains("`w`") && e.contains("2 NaN or infinite") && e.contains("index 3"),
        "{e}"
    );
    // The checkpoint reader scans F32 tensors a block (2^16 values) at a time as it reads:
    // a NaN in a later block, or in the last value, is found and placed; the extremes of the
    // finite range (largest, subnormal, negative zero) are not flagged.
    let big = tmp.path().join("big.safetensors");
    for bad in [290_000usize, 262_144, 299_999] {
        let mut data: Vec<f32> = (0..300_000).map(|i| (i as f32 * 0.37).sin()).collect();
        data[1] = f32::MAX;
        data[2] = -f32::MAX;
        data[3] = f32::MIN_POSITIVE / 4.0;
        data[4] = -0.0;
        let mut t = BTreeMap::new();
        t.insert(
            "w".to_string(),
            HostTensor {
                shape: vec![300_000],
                data: data.clone(),
            },
        );
        write_safetensors(&big, &t, None).unwrap();
        let c = modula::checkpoint::Checkpoint::open(&big).unwrap();
        assert_eq!(c.read("w").unwrap().data, data);
        data[bad] = if bad % 2 == 0 {
            f32::NAN
        } else {
            f32::NEG_INFINITY
        };
        t.get_mut("w").unwrap().data = data;
        write_safetensors(&big, &t, None).unwrap();
        let e = modula::checkpoint::Checkpoint::open(&big)
            .unwrap()
            .read("w")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("1 NaN or infinite") && e.contains(&format!("index {bad}")),
            "{e}"
        );
    }
    let model = tmp.path().join("llama");
    std::fs::create_dir(&model).unwrap();
    let name = "model.layers.1.mlp.down_proj.weight";
    poisoned_llama(&model, name);
    let device = Device::flex();
    let e = modula::checkpoint::load_decoder(&model, &device)
        .unwrap_err()
        .to_string();
    assert!(e.contains(name) && e.contains("index 5"), "{e}");
    let input = tmp.path().join("in.json");
    std::fs::write(&input, r#"{"input_ids": [[1, 2, 3]]}"#).unwrap();
    let out = tmp.path().join("out.safetensors");
    let (code, err) = score_cli(&[], &model, &input, &out);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(name) && err.contains("--allow-non-finite"),
        "{err}"
    );
    assert!(!out.exists());
    let (code, err) = score_cli(&["--allow-non-finite"], &model, &input, &out);
    assert_eq!(code, Some(0), "{err}");
    // The library's opt-out, then back to the default for the rest of this process.
    set_non_finite_policy(NonFinitePolicy::Allow);
    let loaded = TensorFile::open(&file).map(|f| f.get("w").unwrap().data[3]);
    set_non_finite_policy(NonFinitePolicy::Refuse);
    assert_eq!(loaded.unwrap(), f32::INFINITY);
    assert!(TensorFile::open(&file).is_err());
}

/// Router logits may mask modules with −∞ and may be huge: the weights stay finite and a
/// masked module is never chosen, by the top-k gate and by the Gumbel and REINFORCE routers;
/// NaN, +∞ or a row with every module masked are errors.
#[test]
fn routing_with_masked_or_huge_logits_stays_finite() {
    use modula::routers::{GumbelRouter, ReinforceRouter};
    let device = Device::flex();
    let ninf = f32::NEG_INFINITY;
    let gate = TopKRouterConfig::new(4, 4).with_k(2).init(&device).unwrap();
    let logits = Tensor::<2>::from_floats(
        [
            [0.0, ninf, 2.0, ninf],
            [1e30, 0.0, ninf, 5.0],
            [-1e30, 1e30, 3.0, 0.0],
        ],
        &device,
    );
    let r = gate.route_logits(logits.clone()).unwrap();
    let w: Vec<f32> = r.weights().into_data().iter::<f32>().collect();
    let idx: Vec<i64> = r.indices().into_data().iter::<i64>().collect();
    assert!(w.iter().all(|v| v.is_finite()), "{w:?}");
    assert_eq!(&idx[0..2], &[2, 0]);
    assert_eq!(idx[2], 0, "the huge logit wins");
    assert!(
        !idx[2..4].contains(&2),
        "a masked module is never chosen: {idx:?}"
    );
    for bad in [
        [[0.0, f32::NAN, 1.0, 1.0]],
        [[0.0, f32::INFINITY, 1.0, 1.0]],
        [[ninf, ninf, ninf, ninf]],
    ] {
        let e = gate
            .route_logits(Tensor::<2>::from_floats(bad, &device))
            .unwrap_err();
        assert!(matches!(e, modula::Error::NonFinite { .. }), "{e}");
    }
    // Gumbel and REINFORCE sample 2000 rows whose module 1 is masked.
    let x = Tensor::<2>::ones([2000, 1], &device);
    let mask_gate = |g: &mut burn::nn::Linear| {
        g.weight = burn::module::Param::from_tensor(Tensor::<2>::from_floats(
            [[0.5, ninf, -0.5, 0.0]],
            &device,
        ));
    };
    let mut gumbel = GumbelRouter::new(1, 4, 1.0, &device).unwrap();
    mask_gate(&mut gumbel.gate);
    let mut reinforce = ReinforceRouter::new(1, 4, 1.0, &device).unwrap();
    mask_gate(&mut reinforce.gate);
    let s = reinforce.sample(&x).unwrap();
    let lp: Vec<f32> = s.log_prob.into_data().iter::<f32>().collect();
    assert!(lp.iter().all(|v| v.is_finite()));
    for routing in [gumbel.route(&x).unwrap(), s.routing] {
        let idx: Vec<i64> = routing.indices().into_data().iter::<i64>().collect();
        assert!(!idx.contains(&1));
        let w: Vec<f32> = routing.weights().into_data().iter::<f32>().collect();
        assert!(w.iter().all(|v| v.is_finite()));
    }
}

/// A safetensors file made of `header` (JSON text) and `data` bytes.
fn safetensors_bytes(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// Hostile safetensors headers are typed errors, found before any allocation the header
/// asks for, in both readers (`TensorFile`, and `Checkpoint`, which reads headers itself for
/// positional reads): a tensor far larger than its bytes, a shape whose element count
/// overflows, offsets past the end, overlapping tensors, a header length past the file, JSON
/// nested 100 000 deep.
#[test]
fn hostile_safetensors_headers_are_typed_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "huge",
            safetensors_bytes(
                r#"{"w":{"dtype":"F32","shape":[1099511627776],"data_offsets":[0,8]}}"#,
                &[0; 8],
            ),
        ),
        (
            "overflow",
            safetensors_bytes(
                r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,0]}}"#,
                &[],
            ),
        ),
        (
            "past the end",
            safetensors_bytes(
                r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
                &[0; 8],
            ),
        ),
        (
            "overlap",
            safetensors_bytes(
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                &[0; 12],
            ),
        ),
        ("header length", {
            let mut b = u64::MAX.to_le_bytes().to_vec();
            b.extend_from_slice(b"{}");
            b
        }),
        (
            "nested",
            safetensors_bytes(&format!(r#"{{"__metadata__":{nested}}}"#), &[]),
        ),
    ];
    for (what, bytes) in cases {
        let path = tmp.path().join("model.safetensors");
        std::fs::write(&path, &bytes).unwrap();
        let e = TensorFile::open(&path).map(|_| ()).unwrap_err();
        assert!(
            matches!(e, modula::Error::SafeTensors { .. }),
            "{what}: {e:?}"
        );
        let e = modula::checkpoint::Checkpoint::open(&path)
            .map(|_| ())
            .unwrap_err();
        assert!(
            matches!(e, modula::Error::SafeTensors { .. }),
            "{what}: {e:?}"
        );
    }
}

/// Absurd `config.json` values are typed errors naming the key, before the weights are read:
/// zero heads, a hidden size the heads do not divide (without `head_dim`), a vocabulary of
/// 10^12, sizes whose products overflow, negative numbers, JSON nested 100 000 deep.
#[test]
fn absurd_model_configs_are_typed_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let src = common::data("tiny_decoders/llama");
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    std::fs::copy(
        src.join("model.safetensors"),
        tmp.path().join("model.safetensors"),
    )
    .unwrap();
    let device = Device::flex();
    let edits: Vec<(&str, &str, serde_json::Value)> = vec![
        ("zero heads", "num_attention_heads", serde_json::json!(0)),
        (
            "vocabulary",
            "vocab_size",
            serde_json::json!(1_000_000_000_000u64),
        ),
        ("layers", "num_hidden_layers", serde_json::json!(1u64 << 40)),
        ("width", "intermediate_size", serde_json::json!(1u64 << 62)),
        ("negative", "hidden_size", serde_json::json!(-32)),
    ];
    for (what, key, value) in edits {
        let mut c = base.clone();
        c[key] = value;
        std::fs::write(tmp.path().join("config.json"), c.to_string()).unwrap();
        let e = modula::checkpoint::load_decoder(tmp.path(), &device)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(e.contains(key) || e.contains("shape"), "{what}: {e}");
    }
    // Hidden size not divisible by the heads, without an explicit head_dim.
    let mut c = base.clone();
    c.as_object_mut().unwrap().remove("head_dim");
    c["hidden_size"] = serde_json::json!(30);
    std::fs::write(tmp.path().join("config.json"), c.to_string()).unwrap();
    let e = modula::checkpoint::load_decoder(tmp.path(), &device)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("hidden_size") && e.contains("head_dim"), "{e}");
    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    std::fs::write(
        tmp.path().join("config.json"),
        format!(r#"{{"x": {nested}}}"#),
    )
    .unwrap();
    assert!(modula::checkpoint::load_decoder(tmp.path(), &device).is_err());
}

/// Every file of a folder, by name.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// Sends `child` SIGKILL at a uniformly random moment within `within` unless it has finished
/// by then, and reaps it; whether it was still running.
fn kill_within(
    mut child: std::process::Child,
    within: std::time::Duration,
    rng: &mut common::Rng,
) -> bool {
    std::thread::sleep(within.mul_f32(rng.uniform()));
    let running = child.try_wait().unwrap().is_none();
    if running {
        child.kill().unwrap();
    }
    child.wait().unwrap();
    running
}

/// Runs `write(false, DIR)` (a `modula` command writing the folder `DIR`) once to time it
/// and keep its folder as the old one, `write(true, DIR)` for the new one, and then
/// `write(true, dest)` `runs` times over a `dest` holding the old folder, killing it with
/// SIGKILL at a random moment within `spread` times the measured time; asserts each time that
/// `dest` holds the old or the new folder, file for file, with no temporary inside; then one
/// completed write leaves the new folder and no temporary beside `dest`; at least
/// `min_killed` writers must have been killed while running. The folders live in
/// `root/label-{old,new,dest}`.
fn kill_loop(
    root: &Path,
    label: &str,
    runs: usize,
    spread: f32,
    write: impl Fn(bool, &Path) -> std::process::Child,
    seed: u64,
    min_killed: usize,
) {
    let [old_dir, new_dir, dest] =
        ["old", "new", "dest"].map(|k| root.join(format!("{label}-{k}")));
    let dest = dest.as_path();
    let t0 = std::time::Instant::now();
    assert!(write(false, &old_dir).wait().unwrap().success());
    let took = t0.elapsed().mul_f32(spread);
    assert!(write(true, &new_dir).wait().unwrap().success());
    let (old, new) = (&snapshot(&old_dir), &snapshot(&new_dir));
    assert_ne!(old, new);
    let mut rng = common::Rng(seed);
    // Writers still running when the kill came, and writers that had finished first.
    let (mut killed, mut finished) = (0, 0);
    for _ in 0..runs {
        // Start from the old folder.
        if dest.exists() {
            std::fs::remove_dir_all(dest).unwrap();
        }
        std::fs::create_dir(dest).unwrap();
        for (name, bytes) in old {
            std::fs::write(dest.join(name), bytes).unwrap();
        }
        if kill_within(write(true, dest), took, &mut rng) {
            killed += 1;
        } else {
            finished += 1;
        }
        let now = snapshot(dest);
        let differ = |other: &BTreeMap<String, Vec<u8>>| -> Vec<String> {
            let keys: std::collections::BTreeSet<&String> =
                now.keys().chain(other.keys()).collect();
            keys.into_iter()
                .filter(|k| now.get(*k) != other.get(*k))
                .cloned()
                .collect()
        };
        assert!(
            now == *old || now == *new,
            "a mixture after a kill: {:?} differ from the old folder, {:?} from the new",
            differ(old),
            differ(new)
        );
        assert!(now.keys().all(|n| !n.starts_with('.')), "{:?}", now.keys());
    }
    // One completed write sweeps the temporaries of the killed ones.
    assert!(write(true, dest).wait().unwrap().success());
    let prefix = format!(".{}", dest.file_name().unwrap().to_string_lossy());
    let stray: Vec<String> = std::fs::read_dir(dest.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
    assert_eq!(snapshot(dest), *new);
    assert!(
        killed >= min_killed,
        "{label}: only {killed} of {runs} runs were killed mid-way"
    );
    eprintln!("{label}: killed {killed}, finished {finished}");
}

/// `modula bake` killed with SIGKILL at random moments, 120 times, over a folder that holds
/// an older bake (three shards written one at a time): each time the folder holds the old bake
/// or the new one, never a mixture, and no temporary is left behind.
#[test]
fn killed_writes_leave_the_old_or_the_new_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let root = common::data("tiny_decoders");
    let bake = |adapter: &str, out: &Path| {
        Command::new(env!("CARGO_BIN_EXE_modula"))
            .args([
                "bake",
                "--base",
                root.join("llama_sharded_bf16").to_str().unwrap(),
                "--out",
            ])
            .arg(out)
            .arg(root.join(adapter))
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let adapter = |new| {
        if new {
            "llama_lora_qvd"
        } else {
            "llama_lora_all"
        }
    };
    kill_loop(
        tmp.path(),
        "bake",
        120,
        1.5,
        |new, out| bake(adapter(new), out),
        17,
        30,
    );

    // `modula merge --out` over an older merge with other weights.
    let merge = |weights: &str, out: &Path| {
        Command::new(env!("CARGO_BIN_EXE_modula"))
            .args(["merge", "--method", "linear", "--weights", weights, "--out"])
            .arg(out)
            .args([root.join("llama_lora_all"), root.join("llama_lora_all")])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    // A merge is quick: kill within 0.9 of its time, so that most kills land mid-way.
    let weights = |new| if new { "0.2,0.3" } else { "0.5,0.5" };
    kill_loop(
        tmp.path(),
        "merge",
        60,
        0.9,
        |new, out| merge(weights(new), out),
        18,
        15,
    );
}

/// The concurrent-writer test's worker process (this test binary, run by
/// `concurrent_library_writers_lose_nothing` with `--ignored`): with
/// `MODULA_LIBRARY_WORKER=DIR,PREFIX` it adds experts `PREFIX-0..20` to the library in DIR and
/// removes every third.
#[test]
#[ignore = "a worker process of concurrent_library_writers_lose_nothing"]
fn library_writer_worker() {
    let spec = std::env::var("MODULA_LIBRARY_WORKER").expect("MODULA_LIBRARY_WORKER=DIR,PREFIX");
    let (dir, prefix) = spec.split_once(',').unwrap();
    let device = Device::flex();
    let mut lib = modula::store::ExpertLibrary::open_or_create(dir).unwrap();
    let src = common::data("peft_lora_tiny_mlp");
    for i in 0..20 {
        let name = format!("{prefix}-{i}");
        lib.import_peft(&name, &src, Default::default(), &device)
            .unwrap();
        if i % 3 == 0 {
            lib.remove(&name).unwrap();
        }
    }
}

/// Starts a [`library_writer_worker`] process on the library in `dir` with expert names
/// `prefix-0..20`, its output discarded.
fn library_worker(dir: &Path, prefix: &str) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "library_writer_worker"])
        .env(
            "MODULA_LIBRARY_WORKER",
            format!("{},{prefix}", dir.display()),
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// Two processes add and remove experts in one library at once: every add that was not
/// removed is in the index with a loadable folder, nothing removed is left, and no folder is
/// orphaned.
#[test]
fn concurrent_library_writers_lose_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("lib");
    modula::store::ExpertLibrary::open_or_create(&dir).unwrap();
    let workers: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|p| library_worker(&dir, p))
        .collect();
    for mut w in workers {
        assert!(w.wait().unwrap().success());
    }
    let lib = modula::store::ExpertLibrary::open(&dir).unwrap();
    let mut want: Vec<String> = ["a", "b", "c"]
        .iter()
        .flat_map(|p| {
            (0..20)
                .filter(|i| i % 3 != 0)
                .map(move |i| format!("{p}-{i}"))
        })
        .collect();
    want.sort();
    let mut got: Vec<String> = lib.names().iter().map(|n| n.to_string()).collect();
    got.sort();
    assert_eq!(got, want, "{} operations", 3 * (20 + 7));
    let mut folders: Vec<String> = std::fs::read_dir(dir.join("experts"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    folders.sort();
    assert_eq!(folders, want);
    let device = Device::flex();
    for n in &want {
        lib.get(n, &device).unwrap();
    }
}

/// The library states a [`library_writer_worker`] run with `prefix` passes through: after
/// each of its adds and removes, the names of its experts then listed.
fn worker_states(prefix: &str) -> Vec<std::collections::BTreeSet<String>> {
    let mut state = std::collections::BTreeSet::new();
    let mut states = vec![state.clone()];
    for i in 0..20 {
        state.insert(format!("{prefix}-{i}"));
        states.push(state.clone());
        if i % 3 == 0 {
            state.remove(&format!("{prefix}-{i}"));
            states.push(state.clone());
        }
    }
    states
}

/// Library writers (adds and removes in a worker process) killed with SIGKILL at random
/// moments, 60 times: after each kill the index reads, names the experts of one state the
/// writer passed through (each add and remove lands whole or not at all), and every listed
/// expert loads; the next write removes what the killed writer left unlisted (an expert
/// folder written but not yet indexed, a folder whose removal was cut short, temporaries), so
/// the experts folder then holds exactly the listed experts and no temporary is left.
#[test]
fn killed_library_writers_leave_a_consistent_library() {
    use modula::store::ExpertLibrary;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("lib");
    ExpertLibrary::open_or_create(&dir).unwrap();
    let worker = |prefix: &str| library_worker(&dir, prefix);
    let t0 = std::time::Instant::now();
    assert!(worker("whole").wait().unwrap().success());
    let took = t0.elapsed();
    let device = Device::flex();
    let src = common::data("peft_lora_tiny_mlp");
    let mut rng = common::Rng(19);
    type Names = std::collections::BTreeSet<String>;
    let entries = |dir: &Path| -> Names {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    let listed =
        |lib: &ExpertLibrary| -> Names { lib.names().iter().map(|n| n.to_string()).collect() };
    let (mut killed, mut finished, mut swept) = (0, 0, 0);
    for run in 0..60 {
        let prefix = format!("k{run}");
        if kill_within(worker(&prefix), took.mul_f32(1.2), &mut rng) {
            killed += 1;
        } else {
            finished += 1;
        }
        let mut lib = ExpertLibrary::open(&dir).unwrap();
        let mine: Names = listed(&lib)
            .into_iter()
            .filter(|n| n.starts_with(&format!("{prefix}-")))
            .collect();
        assert!(
            worker_states(&prefix).contains(&mine),
            "run {run}: {mine:?} is no state the writer passed through"
        );
        for name in lib.names() {
            lib.factors(name).unwrap();
        }
        swept += entries(&dir.join("experts"))
            .difference(&listed(&lib))
            .count();
        // The next write: add a probe, then remove this run's experts and the probe.
        lib.import_peft("probe", &src, Default::default(), &device)
            .unwrap();
        for name in mine.iter().map(String::as_str).chain(["probe"]) {
            lib.remove(name).unwrap();
        }
        assert_eq!(entries(&dir.join("experts")), listed(&lib), "run {run}");
        let stray: Vec<String> = entries(&dir)
            .into_iter()
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(stray.is_empty(), "run {run}: {stray:?}");
    }
    assert!(
        killed >= 20,
        "only {killed} of 60 writers were killed mid-way"
    );
    eprintln!("library: killed {killed}, finished {finished}, swept {swept} unlisted entries");
}

/// Expert names cannot leave the library folder: `..`, absolute paths, separators and hidden
/// names are refused on add, an index edited to name `../x` is refused on read, and an expert
/// folder (or file) replaced by a symbolic link to elsewhere is refused on read; removing such
/// an expert removes the link, never what it points to.
#[test]
fn expert_names_and_links_stay_inside_the_library() {
    use modula::store::ExpertLibrary;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("lib");
    let device = Device::flex();
    let src = common::data("peft_lora_tiny_mlp");
    let mut lib = ExpertLibrary::open_or_create(&dir).unwrap();
    for bad in ["../escape", "/tmp/abs", "a/b", ".hidden", "..", ""] {
        let e = lib.import_peft(bad, &src, Default::default(), &device);
        assert!(
            matches!(e, Err(modula::Error::Invalid { .. })),
            "{bad}: {e:?}"
        );
    }
    assert!(!tmp.path().join("escape").exists());
    lib.import_peft("e", &src, Default::default(), &device)
        .unwrap();
    // An index edited by hand to point outside.
    let index = dir.join("library.json");
    let text = std::fs::read_to_string(&index).unwrap();
    std::fs::write(&index, text.replace("\"e\"", "\"../../outside\"")).unwrap();
    let edited = ExpertLibrary::open(&dir).unwrap();
    assert!(edited.get("../../outside", &device).is_err());
    std::fs::write(&index, text).unwrap();
    // The expert folder replaced by a link to a PEFT folder outside the library.
    let outside = tmp.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(src.join(f), outside.join(f)).unwrap();
    }
    let expert = dir.join("experts/e");
    std::fs::remove_dir_all(&expert).unwrap();
    std::os::unix::fs::symlink(&outside, &expert).unwrap();
    let mut lib = ExpertLibrary::open(&dir).unwrap();
    let e = lib.get("e", &device).unwrap_err().to_string();
    assert!(e.contains("symbolic link"), "{e}");
    assert!(lib.factors("e").is_err());
    lib.remove("e").unwrap();
    assert!(
        outside.join("adapter_model.safetensors").exists(),
        "the link's target is kept"
    );
    assert!(
        std::fs::symlink_metadata(&expert).is_err(),
        "the link is gone"
    );
}

/// Resident memory of this process in bytes (Linux `/proc/self/statm`).
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// Steady serving, short form, in a process of its own (resident memory is per process and
/// other tests run beside it): see `serving_worker`.
#[test]
fn serving_thousands_of_requests_keeps_memory_flat() {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "serving_worker", "--nocapture"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("resident memory"), "{err}");
}

/// 1 200 (`MODULA_SOAK_REQUESTS`) generation requests on the tiny Llama with two LoRA adapters, random batch sizes,
/// prompt lengths, left padding, adapters per row and lengths: none panics, and resident
/// memory after the first 200 grows by less than 5 % (run by
/// `serving_thousands_of_requests_keeps_memory_flat`).
#[test]
#[ignore = "run in its own process by serving_thousands_of_requests_keeps_memory_flat"]
fn serving_worker() {
    use modula::models::{GenerationConfig, LinearLayers};
    let device = Device::flex();
    let root = common::data("tiny_decoders");
    let mut model = modula::checkpoint::load_decoder(root.join("llama"), &device).unwrap();
    for (name, dir) in [("qvd", "llama_lora_qvd"), ("all", "llama_lora_all")] {
        modula::PeftLora::load(root.join(dir), &device)
            .unwrap()
            .attach_to_model(&mut model, name)
            .unwrap();
    }
    assert_eq!(model.adapter_names().len(), 2);
    let mut rng = common::Rng(99);
    let names = [None, Some("qvd"), Some("all")];
    // MODULA_SOAK_REQUESTS sets the length (docs/reliability.md: the long soak).
    let total: usize = std::env::var("MODULA_SOAK_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1200)
        .max(400);
    let mut after_warmup = 0;
    for request in 0..total {
        if request == 200 {
            after_warmup = rss_bytes();
        }
        if request % (total / 10) == 0 {
            eprintln!(
                "request {request}: resident {:.1} MB",
                rss_bytes() as f64 / 1e6
            );
        }
        let b = 1 + (rng.next_u64() % 3) as usize;
        let s = 1 + (rng.next_u64() % 8) as usize;
        let mut ids = Vec::with_capacity(b * s);
        let mut mask = Vec::with_capacity(b * s);
        for _ in 0..b {
            let pad = (rng.next_u64() % s as u64) as usize;
            for t in 0..s {
                ids.push((rng.next_u64() % 64) as i64);
                mask.push(i64::from(t >= pad));
            }
        }
        let ids =
            Tensor::<1, burn::tensor::Int>::from_ints(ids.as_slice(), &device).reshape([b, s]);
        let mask =
            Tensor::<1, burn::tensor::Int>::from_ints(mask.as_slice(), &device).reshape([b, s]);
        let adapters: Vec<Option<&str>> = (0..b)
            .map(|_| names[(rng.next_u64() % 3) as usize])
            .collect();
        let config = GenerationConfig::greedy(&model, 1 + (rng.next_u64() % 6) as usize);
        let out = model
            .generate(ids, Some(mask), Some(&adapters), &config, |_| {})
            .unwrap();
        assert_eq!(out.len(), b);
    }
    let end = rss_bytes();
    let growth = end as f64 / after_warmup as f64 - 1.0;
    eprintln!(
        "resident memory after 200 requests {:.1} MB, after {total} {:.1} MB ({:+.2} %)",
        after_warmup as f64 / 1e6,
        end as f64 / 1e6,
        100.0 * growth
    );
    assert!(growth < 0.05, "grew {:.2} %", 100.0 * growth);
}

/// One random mutation of `bytes`: flip a byte, set one to an edge value, cut the tail, drop
/// or repeat a span, or splice in digits and brackets (what parsers choke on).
fn mutate(bytes: &[u8], rng: &mut common::Rng) -> Vec<u8> {
    let mut b = bytes.to_vec();
    let n = b.len().max(1);
    let at = (rng.next_u64() as usize) % n;
    match rng.next_u64() % 6 {
        0 if !b.is_empty() => b[at] ^= 1 << (rng.next_u64() % 8),
        1 if !b.is_empty() => {
            b[at] = [0u8, 0xff, 0x7f, 0x80, b'"', b'9'][(rng.next_u64() % 6) as usize]
        }
        2 => b.truncate(at),
        3 => {
            let end = (at + 1 + (rng.next_u64() as usize) % 16).min(b.len());
            b.drain(at.min(b.len())..end);
        }
        4 => {
            let end = (at + 1 + (rng.next_u64() as usize) % 16).min(b.len());
            let span = b[at.min(b.len())..end].to_vec();
            b.splice(
                at.min(b.len())..at.min(b.len()),
                span.repeat(1 + (rng.next_u64() % 4) as usize),
            );
        }
        _ => {
            let junk: &[&[u8]] = &[
                b"[[[[[[",
                b"99999999999999999999",
                b"-1",
                b"null",
                b"1e308",
                b"\"\\u0000\"",
            ];
            b.splice(
                at.min(b.len())..at.min(b.len()),
                junk[(rng.next_u64() % 6) as usize].iter().copied(),
            );
        }
    }
    b
}

/// The stable-toolchain guard of the fuzzed entry points (the libFuzzer targets are separate,
/// docs/reliability.md): thousands of random mutations of valid inputs to the safetensors
/// reader, the checkpoint reader, `adapter_config.json`, a PEFT folder, `config.json`, the
/// expert-library index and the tool's input JSON; every one returns (an error is fine, the
/// tool's status 2), none panics.
#[test]
fn mutated_inputs_never_panic() {
    const REQUEST: &[u8] = br#"{"input_ids": [[1, 5, 9], [2, 40, 11]], "attention_mask": [[1, 1, 1], [0, 1, 1]], "adapters": [null, null]}"#;
    use modula::models::DecoderConfig;
    use modula::{PeftAdapter, PeftConfig};
    let tmp = tempfile::tempdir().unwrap();
    let device = Device::flex();
    let mut rng = common::Rng(2026);
    let lora = common::data("peft_lora_tiny_mlp");
    let weights = std::fs::read(lora.join("adapter_model.safetensors")).unwrap();
    let peft_cfg = std::fs::read(lora.join("adapter_config.json")).unwrap();
    let llama_cfg = std::fs::read(common::data("tiny_decoders/llama/config.json")).unwrap();
    let lib_dir = tmp.path().join("lib");
    let mut lib = modula::store::ExpertLibrary::open_or_create(&lib_dir).unwrap();
    lib.import_peft("e", &lora, Default::default(), &device)
        .unwrap();
    let index = std::fs::read(lib_dir.join("library.json")).unwrap();
    let folder = tmp.path().join("peft");
    std::fs::create_dir(&folder).unwrap();
    let (mut runs, mut errors) = (0usize, 0usize);
    let mut check = |what: &str, r: std::thread::Result<bool>| {
        runs += 1;
        match r {
            Ok(ok) => errors += usize::from(!ok),
            Err(_) => panic!("{what} panicked on a mutated input"),
        }
    };
    for _ in 0..600 {
        let w = mutate(&weights, &mut rng);
        let r = std::panic::catch_unwind(|| TensorFile::from_bytes(&w, "m.safetensors").is_ok());
        check("TensorFile::from_bytes", r);
        let path = tmp.path().join("m.safetensors");
        std::fs::write(&path, &w).unwrap();
        let r = std::panic::catch_unwind(|| modula::checkpoint::Checkpoint::open(&path).is_ok());
        check("Checkpoint::open", r);
        let c = String::from_utf8_lossy(&mutate(&peft_cfg, &mut rng)).into_owned();
        let r = std::panic::catch_unwind(|| PeftConfig::from_json(&c, "cfg").is_ok());
        check("PeftConfig::from_json", r);
        std::fs::write(folder.join("adapter_config.json"), c.as_bytes()).unwrap();
        std::fs::write(folder.join("adapter_model.safetensors"), &w).unwrap();
        let r = std::panic::catch_unwind(|| PeftAdapter::load(&folder, &device).is_ok());
        check("PeftAdapter::load", r);
        let c = String::from_utf8_lossy(&mutate(&llama_cfg, &mut rng)).into_owned();
        let r = std::panic::catch_unwind(|| DecoderConfig::from_json(&c, "config.json").is_ok());
        check("DecoderConfig::from_json", r);
        std::fs::write(lib_dir.join("library.json"), mutate(&index, &mut rng)).unwrap();
        let r = std::panic::catch_unwind(|| {
            modula::store::ExpertLibrary::open(&lib_dir)
                .and_then(|l| l.get("e", &device).map(|_| ()))
                .is_ok()
        });
        check("ExpertLibrary::open", r);
        let b = String::from_utf8_lossy(&mutate(REQUEST, &mut rng)).into_owned();
        let r = std::panic::catch_unwind(|| {
            let names = ["a".to_string()];
            let limits = modula::request::BatchLimits {
                vocab: 64,
                positions: 8,
                adapters: &names,
                routed: false,
            };
            let batch = modula::request::BatchRequest::from_json(&b).and_then(|r| r.check(&limits));
            let texts = modula::request::TextsRequest::from_json(&b);
            let rows = modula::request::IdRowsRequest::from_json(&b).and_then(|r| r.rows());
            batch.is_ok() && texts.is_ok() && rows.is_ok()
        });
        check("modula::request", r);
    }
    // The tool's input JSON: it exits 0 or 2 (bad input), never with a panic's 101.
    let model = common::data("tiny_decoders/llama");
    let input = tmp.path().join("in.json");
    let out = tmp.path().join("out.safetensors");
    for _ in 0..150 {
        std::fs::write(&input, mutate(REQUEST, &mut rng)).unwrap();
        let (code, err) = score_cli(&[], &model, &input, &out);
        runs += 1;
        errors += usize::from(code == Some(2));
        assert!(matches!(code, Some(0) | Some(2)), "exit {code:?}: {err}");
    }
    eprintln!("{runs} mutated inputs, {errors} refused with an error, no panic");
    assert!(
        errors > runs / 4,
        "the mutations should mostly break the inputs: {errors}/{runs}"
    );
}
