//! `modula`: inspect, merge, cluster, route and bake PEFT LoRA adapters from the shell.
//!
//! Built with the `cli` feature: `cargo run --release --features cli --bin modula -- --help`.

/// A caching allocator: glibc unmaps every freed multi-MB buffer, so each forward pass would
/// page-fault its activations in again (see docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use burn::tensor::Device;
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use modula::io::{HostTensor, write_safetensors};
use modula::library::mbc::{MbcConfig, mbc_cluster};
use modula::library::{
    Combination, LoraExpert, MajoritySign, MergeOptions, MergeSpace, arrow_prototypes,
    merge_experts_with_progress,
};
use modula::{Error, PeftLora, Result, TensorFile};

#[derive(Parser)]
#[command(
    name = "modula",
    version,
    about = "Modular deep learning tools for PEFT LoRA adapters"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a PEFT adapter folder's config and layers (or an expert library's index) as JSON.
    Inspect {
        /// A PEFT adapter folder, or an expert library folder (with library.json).
        dir: PathBuf,
    },
    /// Merge LoRA adapters into one PEFT folder (PEFT's add_weighted_adapter types).
    Merge {
        /// linear, cat, svd, ties, ties_svd, dare_linear, dare_ties, dare_linear_svd,
        /// dare_ties_svd, magnitude_prune, magnitude_prune_svd.
        #[arg(long)]
        method: String,
        /// One weight per adapter, comma-separated (default: equal weights summing to 1).
        #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
        weights: Option<Vec<f64>>,
        /// Fraction of entries kept by ties, dare_* and magnitude_prune.
        #[arg(long)]
        density: Option<f64>,
        /// Rank of the result for SVD re-compression.
        #[arg(long)]
        svd_rank: Option<usize>,
        /// delta (exact, default) or factor (PEFT 0.21's numbers).
        #[arg(long, default_value = "delta")]
        space: String,
        /// TIES sign election: total or frequency.
        #[arg(long, default_value = "total")]
        majority_sign: String,
        /// Seed of DARE's random drops.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output PEFT folder.
        #[arg(long)]
        out: PathBuf,
        /// The PEFT adapter folders to merge.
        #[arg(required = true)]
        adapters: Vec<PathBuf>,
    },
    /// Cluster adapters with MBC; prints a JSON list of clusters of the folders as given.
    Cluster {
        /// Number of clusters.
        #[arg(long)]
        k: usize,
        /// Magnitude quantile zeroed per adapter before embedding.
        #[arg(long, default_value_t = 0.8)]
        sparsity: f64,
        /// k-means restarts.
        #[arg(long, default_value_t = 10)]
        n_init: usize,
        /// Seed.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// The PEFT adapter folders.
        #[arg(required = true)]
        adapters: Vec<PathBuf>,
    },
    /// Compute Arrow prototypes: one [experts, d_in] matrix per adapted layer, keyed by the
    /// layer's module path, rows in argument order.
    Arrow {
        /// Output safetensors file.
        #[arg(long)]
        out: PathBuf,
        /// The PEFT adapter folders.
        #[arg(required = true)]
        adapters: Vec<PathBuf>,
    },
    /// Merge an adapter into base weights (PEFT's merge_and_unload); keys as in the base file.
    Bake {
        /// Base model safetensors (PyTorch layout).
        #[arg(long)]
        base: PathBuf,
        /// Output safetensors (F32).
        #[arg(long)]
        out: PathBuf,
        /// The PEFT adapter folder.
        adapter: PathBuf,
    },
}

fn bar(len: usize, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:30}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// Reads each PEFT folder straight into host factors (no device: merging, clustering and Arrow
/// work on the host). An expert the library cannot use is reported with its folder.
fn load_experts(dirs: &[PathBuf]) -> Result<Vec<LoraExpert>> {
    let pb = bar(dirs.len(), "loading");
    let mut experts = Vec::new();
    for d in dirs {
        experts.push(LoraExpert::load_peft(d).map_err(|e| match e {
            e @ Error::Invalid { .. } => in_file(d, e),
            e => e,
        })?);
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok(experts)
}

fn in_file(path: &Path, e: Error) -> Error {
    Error::Peft {
        path: path.to_path_buf(),
        why: e.to_string(),
    }
}

fn same_layers(dirs: &[PathBuf], experts: &[LoraExpert]) -> Result<()> {
    let first: Vec<&String> = experts[0].layers.keys().collect();
    for (d, e) in dirs.iter().zip(experts).skip(1) {
        let these: Vec<&String> = e.layers.keys().collect();
        if these != first {
            return Err(Error::Peft {
                path: d.clone(),
                why: format!(
                    "adapts layers {these:?} but {} adapts {first:?}; all adapters must target the same modules of one base model",
                    dirs[0].display()
                ),
            });
        }
    }
    Ok(())
}

fn inspect(dir: &Path) -> Result<serde_json::Value> {
    if dir.join("library.json").exists() {
        let lib = modula::store::ExpertLibrary::open(dir)?;
        return serde_json::to_value(lib.list()).map_err(|e| Error::Json {
            path: dir.join("library.json"),
            source: e,
        });
    }
    let device = Device::flex();
    let peft = PeftLora::load(dir, &device)?;
    let expert = LoraExpert::from_peft(&peft).map_err(|e| in_file(dir, e))?;
    let layers: serde_json::Map<String, serde_json::Value> = expert
        .layers
        .iter()
        .map(|(p, f)| {
            (
                p.clone(),
                serde_json::json!({
                    "d_in": f.d_in(), "d_out": f.d_out(), "rank": f.rank(),
                    "scaling": f.scaling(), "delta_frobenius_norm": f.delta_norm(),
                }),
            )
        })
        .collect();
    Ok(serde_json::json!({
        "path": dir.display().to_string(),
        "peft_type": "LORA",
        "r": peft.config.r,
        "lora_alpha": peft.config.lora_alpha,
        "use_rslora": peft.config.use_rslora,
        "fan_in_fan_out": peft.config.fan_in_fan_out,
        "layers": layers,
    }))
}

#[allow(clippy::too_many_arguments)]
fn run_merge(
    method: &str,
    weights: Option<Vec<f64>>,
    density: Option<f64>,
    svd_rank: Option<usize>,
    space: &str,
    majority_sign: &str,
    seed: u64,
    out: &Path,
    adapters: &[PathBuf],
) -> Result<()> {
    let mut opts = MergeOptions::new(Combination::parse(method)?)
        .with_space(space.parse::<MergeSpace>()?)
        .with_seed(seed)
        .with_majority_sign(match majority_sign {
            "total" => MajoritySign::Total,
            "frequency" => MajoritySign::Frequency,
            other => {
                return Err(Error::Invalid {
                    what: "--majority-sign".into(),
                    why: format!("`{other}` is neither `total` nor `frequency`"),
                });
            }
        });
    opts.density = density;
    opts.svd_rank = svd_rank;
    let n = adapters.len();
    let weights = weights.unwrap_or_else(|| vec![1.0 / n as f64; n]);
    let experts = load_experts(adapters)?;
    same_layers(adapters, &experts)?;
    let refs: Vec<&LoraExpert> = experts.iter().collect();
    let pb = bar(experts[0].layers.len(), "merging");
    let merged = merge_experts_with_progress(&refs, &weights, &opts, |_| pb.inc(1))?;
    pb.finish_and_clear();
    merged.save_peft(out)?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

fn run_cluster(
    k: usize,
    sparsity: f64,
    n_init: usize,
    seed: u64,
    adapters: &[PathBuf],
) -> Result<serde_json::Value> {
    let device = Device::flex();
    let experts = load_experts(adapters)?;
    same_layers(adapters, &experts)?;
    let refs: Vec<&LoraExpert> = experts.iter().collect();
    let cfg = MbcConfig::new(k)
        .with_sparsity(sparsity)
        .with_n_init(n_init)
        .with_seed(seed);
    let c = mbc_cluster(&refs, &cfg, &device)?;
    let clusters: Vec<Vec<String>> = c
        .clusters
        .iter()
        .map(|members| {
            members
                .iter()
                .map(|&i| adapters[i].display().to_string())
                .collect()
        })
        .collect();
    Ok(serde_json::json!(clusters))
}

fn run_arrow(out: &Path, adapters: &[PathBuf]) -> Result<()> {
    let experts = load_experts(adapters)?;
    same_layers(adapters, &experts)?;
    let pb = bar(experts[0].layers.len(), "arrow");
    let mut tensors = BTreeMap::new();
    for path in experts[0].layers.keys() {
        let layer: Vec<_> = experts.iter().map(|e| &e.layers[path]).collect();
        let p = arrow_prototypes(&layer)?;
        tensors.insert(
            path.clone(),
            HostTensor {
                shape: p.shape().to_vec(),
                data: p.iter::<f32>().collect(),
            },
        );
        pb.inc(1);
    }
    pb.finish_and_clear();
    let meta: BTreeMap<String, String> = [(
        "experts".to_string(),
        serde_json::json!(
            adapters
                .iter()
                .map(|a| a.display().to_string())
                .collect::<Vec<_>>()
        )
        .to_string(),
    )]
    .into();
    write_safetensors(out, &tensors, Some(meta))?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

fn run_bake(base: &Path, out: &Path, adapter: &Path) -> Result<()> {
    let device = Device::flex();
    let file = TensorFile::open(base)?;
    let peft = PeftLora::load(adapter, &device)?;
    let expert = LoraExpert::from_peft(&peft).map_err(|e| in_file(adapter, e))?;
    let mut tensors = file.tensors().clone();
    let pb = bar(expert.layers.len(), "baking");
    for (path, f) in &expert.layers {
        let exact = format!("{path}.weight");
        let suffix = format!(".{path}.weight");
        let candidates: Vec<&String> = tensors
            .keys()
            .filter(|k| **k == exact || k.ends_with(&suffix))
            .collect();
        let key = match candidates.as_slice() {
            [one] => (*one).clone(),
            [] => {
                return Err(Error::SafeTensors {
                    path: base.to_path_buf(),
                    why: format!(
                        "no tensor `{exact}` (or `*{suffix}`) for the adapter's module `{path}`; is this the adapter's base model?"
                    ),
                });
            }
            many => {
                return Err(Error::SafeTensors {
                    path: base.to_path_buf(),
                    why: format!("module `{path}` matches several tensors: {many:?}"),
                });
            }
        };
        let w = tensors.get_mut(&key).ok_or_else(|| Error::SafeTensors {
            path: base.to_path_buf(),
            why: format!("tensor `{key}` vanished"),
        })?;
        // [d_out, d_in], PyTorch Linear layout, row-major f64.
        let delta: Vec<f64> = f.delta().iter::<f64>().collect();
        let d_in = f.d_in();
        let want = if peft.config.fan_in_fan_out {
            vec![f.d_in(), f.d_out()]
        } else {
            vec![f.d_out(), f.d_in()]
        };
        if w.shape != want {
            return Err(Error::SafeTensors {
                path: base.to_path_buf(),
                why: format!(
                    "tensor `{key}` has shape {:?} but the adapter's `{path}` needs {want:?}",
                    w.shape
                ),
            });
        }
        let cols = w.shape[1];
        for (idx, v) in w.data.iter_mut().enumerate() {
            let (i, j) = (idx / cols, idx % cols);
            let d = if peft.config.fan_in_fan_out {
                delta[j * d_in + i]
            } else {
                delta[i * d_in + j]
            };
            *v = (f64::from(*v) + d) as f32;
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    write_safetensors(out, &tensors, Some(file.metadata().clone()))?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Inspect { dir } => {
            println!(
                "{}",
                serde_json::to_string_pretty(&inspect(&dir)?).unwrap_or_default()
            );
        }
        Command::Merge {
            method,
            weights,
            density,
            svd_rank,
            space,
            majority_sign,
            seed,
            out,
            adapters,
        } => run_merge(
            &method,
            weights,
            density,
            svd_rank,
            &space,
            &majority_sign,
            seed,
            &out,
            &adapters,
        )?,
        Command::Cluster {
            k,
            sparsity,
            n_init,
            seed,
            adapters,
        } => println!("{}", run_cluster(k, sparsity, n_init, seed, &adapters)?),
        Command::Arrow { out, adapters } => run_arrow(&out, &adapters)?,
        Command::Bake { base, out, adapter } => run_bake(&base, &out, &adapter)?,
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
