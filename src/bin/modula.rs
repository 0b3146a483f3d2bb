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
use modula::{Error, PeftLora, Result};

#[derive(Parser)]
#[command(
    name = "modula",
    version,
    about = "Modular deep learning tools for PEFT LoRA adapters"
)]
struct Cli {
    /// Load weights that hold NaN or infinite values (refused by default, naming the file and
    /// tensor).
    #[arg(long, global = true)]
    allow_non_finite: bool,
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
    /// Logits of a decoder (a Hugging Face folder: Llama, Mistral, Qwen2, Mixtral, GPT-2) for a batch of token ids, each row through
    /// its adapter: writes the safetensors key `logits`, F32 [rows, seq, vocab].
    Score {
        #[command(flatten)]
        batch: BatchArgs,
        /// With --router arrow: experts kept per token (the same as --router-top-k).
        #[arg(long)]
        top_k: Option<usize>,
        /// With --router arrow: the routing temperature (the same as --router-temperature).
        #[arg(long)]
        temperature: Option<f64>,
        /// Output safetensors file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Token and sentence embeddings of an encoder (a BERT or sentence-transformers folder)
    /// for a batch, each row through its adapter: writes `last_hidden_state` F32 [rows, seq,
    /// hidden] and `sentence_embedding` F32 [rows, hidden] (mean over unmasked tokens,
    /// L2-normalised when modules.json lists Normalize).
    Embed {
        #[command(flatten)]
        batch: BatchArgs,
        /// Output safetensors file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Generate tokens with a decoder (Llama family or GPT-2) after each row of a batch (greedy
    /// unless --temperature is given), each
    /// row through its adapter: writes {"new_tokens": [[...], ...]}.
    Generate {
        #[command(flatten)]
        batch: BatchArgs,
        /// New tokens per row (fewer when the model's EOS ends a row).
        #[arg(long)]
        max_new_tokens: usize,
        /// Sample at this temperature instead of greedy decoding.
        #[arg(long)]
        temperature: Option<f64>,
        /// Sample among the k most likely tokens only (with --temperature).
        #[arg(long)]
        top_k: Option<usize>,
        /// Sample among the most likely tokens up to this probability (with --temperature).
        #[arg(long)]
        top_p: Option<f64>,
        /// Seed of the sampling.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output JSON file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Text to token ids with the model folder's tokenizer.json (as transformers'
    /// `tokenizer(texts, padding=True)`): reads {"texts": [...], "adapters": [...]} (adapters
    /// optional, passed through) and writes the {"input_ids", "attention_mask"} file that
    /// score, generate and embed read.
    Tokenize {
        /// The Hugging Face model folder holding tokenizer.json (and tokenizer_config.json).
        #[arg(long)]
        model: PathBuf,
        /// {"texts": ["...", ...], "adapters": [name or null, ...]}.
        #[arg(long)]
        input: PathBuf,
        /// left or right (default: right for BERT encoders, left for decoders, which generate
        /// after the last token).
        #[arg(long)]
        padding_side: Option<String>,
        /// Truncate each row to at most this many ids, special tokens included.
        #[arg(long)]
        max_length: Option<usize>,
        /// Leave out the special tokens the tokenizer adds (BOS, [CLS] ... [SEP]).
        #[arg(long)]
        no_special_tokens: bool,
        /// Output JSON file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Token ids to text with the model folder's tokenizer.json (as transformers' `decode`):
    /// reads the rows of `new_tokens` (generate's output) or of `input_ids` (padding left out
    /// by `attention_mask`) and writes {"texts": [...]}.
    Decode {
        /// The Hugging Face model folder holding tokenizer.json.
        #[arg(long)]
        model: PathBuf,
        /// A JSON file with `new_tokens`, or `input_ids` and optionally `attention_mask`.
        #[arg(long)]
        input: PathBuf,
        /// Leave special tokens (BOS, EOS, padding) out of the text.
        #[arg(long)]
        skip_special_tokens: bool,
        /// Output JSON file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Merge an adapter into base weights (PEFT's merge_and_unload): a Hugging Face model
    /// folder (sharded or not) into a folder that transformers and modula load, or one
    /// safetensors file into an F32 file with the same keys.
    Bake {
        /// Base model: a Hugging Face folder or a safetensors file (PyTorch layout).
        #[arg(long)]
        base: PathBuf,
        /// Output: a folder (same shards, dtypes and other files) or a safetensors file (F32).
        #[arg(long)]
        out: PathBuf,
        /// The PEFT adapter folder.
        adapter: PathBuf,
    },
}

/// The model, its adapters and the batch, shared by `score` and `generate`.
#[derive(clap::Args, Clone)]
struct BatchArgs {
    /// The Hugging Face model folder (config.json, safetensors weights, sharded or not).
    #[arg(long)]
    model: PathBuf,
    /// A PEFT LoRA folder loaded under a name: NAME=DIR (repeatable).
    #[arg(long = "adapter")]
    adapters: Vec<String>,
    /// {"input_ids": [[...]], "attention_mask": [[...]], "adapters": [name or null, ...]}.
    #[arg(long)]
    input: PathBuf,
    /// Route the loaded adapters in every adapted layer instead of naming one per row:
    /// `arrow` (per token, from each layer's input; Arrow, arXiv 2405.11157) or `uniform`
    /// (their uniform merge µ, the average of the updates). The input then has no `adapters`.
    #[arg(long)]
    router: Option<String>,
    /// Experts Arrow keeps per token (default 3, at most the number loaded).
    #[arg(long = "router-top-k")]
    router_top_k: Option<usize>,
    /// Softmax temperature over Arrow's kept logits (default 1).
    #[arg(long = "router-temperature")]
    router_temperature: Option<f64>,
    /// How Arrow's kept experts combine: output (PEFT: mix the outputs) or factor (mttl: mix
    /// the factors; one rank).
    #[arg(long = "router-mix", default_value = "output")]
    router_mix: String,
    /// With --router arrow: a loaded adapter that is general knowledge rather than a task
    /// (repeatable). GenKnowSub (PEFT's use_gks) subtracts the mean of the general adapters
    /// from every other adapter, which Arrow then routes over.
    #[arg(long = "router-general")]
    router_general: Vec<String>,
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
    let pb = bar(0, "baking");
    modula::checkpoint::bake(base, adapter, out, |done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    })?;
    pb.finish_and_clear();
    eprintln!("wrote {}", out.display());
    Ok(())
}

/// A model with its named adapters and the limits a batch must respect.
struct Loaded<M> {
    model: M,
    /// Every adapter name, prompt-tuning ones included.
    names: Vec<String>,
    /// The prompt-tuning adapters, by name (soft tokens, not layer weights).
    prompts: BTreeMap<String, modula::PromptEmbedding>,
    vocab: usize,
    positions: usize,
    /// Routers chose the adapters (`--router`): rows name none.
    routed: bool,
}

fn load_model(
    batch: &BatchArgs,
    device: &Device,
) -> Result<Loaded<modula::models::LlamaForCausalLm>> {
    let m = modula::checkpoint::load_decoder(&batch.model, device)?;
    let (vocab, positions) = (m.config.vocab_size, m.config.max_position_embeddings);
    Loaded::new(m, batch, device, vocab, positions)
}

impl<M: modula::models::LinearLayers> Loaded<M> {
    /// `model` with each `NAME=DIR` adapter attached (and routed, with `--router`), and its
    /// vocabulary and positions.
    fn new(
        mut model: M,
        batch: &BatchArgs,
        device: &Device,
        vocab: usize,
        positions: usize,
    ) -> Result<Self> {
        let (names, prompts) = attach_adapters(&mut model, &batch.adapters, device)?;
        let layered: Vec<String> = names
            .iter()
            .filter(|n| !prompts.contains_key(*n))
            .cloned()
            .collect();
        let routed = apply_router(&mut model, &layered, batch)?;
        Ok(Self {
            model,
            names,
            prompts,
            vocab,
            positions,
            routed,
        })
    }
}

impl<M> Loaded<M> {
    /// The per-row adapter names a forward pass takes: none when routers choose.
    fn row_adapters<'a>(&self, names: &'a [Option<String>]) -> Option<Vec<Option<&'a str>>> {
        (!self.routed).then(|| {
            names
                .iter()
                .map(|n| n.as_deref().filter(|n| !self.prompts.contains_key(*n)))
                .collect()
        })
    }

    /// Each row's soft prompt, when some row names a prompt-tuning adapter.
    fn row_prompts(
        &self,
        names: &[Option<String>],
    ) -> Option<Vec<Option<&modula::PromptEmbedding>>> {
        let rows: Vec<_> = names
            .iter()
            .map(|n| n.as_ref().and_then(|n| self.prompts.get(n)))
            .collect();
        rows.iter().any(Option::is_some).then_some(rows)
    }

    /// [`Error::Invalid`] when prompt-tuning adapters are loaded for a model that takes none.
    fn refuse_prompts(&self, model: &str) -> Result<()> {
        match self.prompts.keys().next() {
            None => Ok(()),
            Some(name) => Err(invalid(
                format!("--adapter {name}"),
                format!(
                    "a prompt-tuning adapter; modula serves soft prompts on Llama-family decoders, and this model is {model}"
                ),
            )),
        }
    }
}

/// Installs `--router` over the loaded adapters; returns whether routers now choose them.
fn apply_router(
    model: &mut dyn modula::models::LinearLayers,
    names: &[String],
    batch: &BatchArgs,
) -> Result<bool> {
    let Some(kind) = batch.router.as_deref() else {
        for (flag, given) in [
            ("--router-top-k", batch.router_top_k.is_some()),
            ("--router-temperature", batch.router_temperature.is_some()),
            ("--router-mix", batch.router_mix != "output"),
            ("--router-general", !batch.router_general.is_empty()),
        ] {
            if given {
                return Err(invalid(flag, "it sets routing; add --router arrow"));
            }
        }
        return Ok(false);
    };
    if names.is_empty() {
        return Err(invalid(
            format!("--router {kind}"),
            "no adapters are loaded; add --adapter NAME=DIR for each expert",
        ));
    }
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    match kind {
        "arrow" => {
            let mix = match batch.router_mix.as_str() {
                "output" => modula::LoraMix::Output,
                "factor" => modula::LoraMix::Factor,
                other => {
                    return Err(invalid(
                        format!("--router-mix {other}"),
                        "use output (mix the experts' outputs, as PEFT) or factor (mix their factors, as mttl)",
                    ));
                }
            };
            let general: Vec<&str> = batch.router_general.iter().map(String::as_str).collect();
            if let Some(g) = general.iter().find(|g| !refs.contains(g)) {
                return Err(invalid(
                    format!("--router-general {g}"),
                    format!(
                        "`{g}` is not a loaded adapter (loaded: {names:?}); add --adapter {g}=DIR"
                    ),
                ));
            }
            let tasks: Vec<&str> = refs
                .iter()
                .copied()
                .filter(|n| !general.contains(n))
                .collect();
            if tasks.is_empty() {
                return Err(invalid(
                    "--router-general",
                    "every loaded adapter is general; Arrow needs task adapters to route over",
                ));
            }
            if !general.is_empty() {
                modula::models::gen_know_sub(
                    model,
                    &tasks,
                    &general,
                    modula::library::MergeSpace::Factor,
                )?;
            }
            let options = modula::models::ArrowOptions {
                top_k: batch.router_top_k.unwrap_or(3).min(tasks.len()),
                temperature: batch.router_temperature.unwrap_or(1.0),
                mix,
            };
            modula::models::route_arrow(model, &tasks, &options, None)?;
        }
        "uniform" => {
            if batch.router_top_k.is_some()
                || batch.router_temperature.is_some()
                || !batch.router_general.is_empty()
            {
                return Err(invalid(
                    "--router uniform",
                    "the uniform merge takes no top-k, temperature or general adapters; they belong to --router arrow",
                ));
            }
            // µ: the exact average of the updates (concatenated factors, weights 1/N).
            let options = modula::library::MergeOptions::new(modula::library::Combination::Cat);
            let w = vec![1.0 / names.len() as f64; names.len()];
            let mu = "__uniform_merge__";
            model.add_weighted_adapter(&refs, &w, &options, mu)?;
            model.set_active_adapters(&[mu])?;
        }
        other => {
            return Err(invalid(
                format!("--router {other}"),
                "use arrow (per-token Arrow routing) or uniform (the uniform merge of the adapters)",
            ));
        }
    }
    Ok(true)
}

/// Attaches each `NAME=DIR` PEFT folder (LoRA, IA3, LoHa, LoKr) to `m` by its target rules and
/// keeps prompt-tuning folders' soft tokens; returns all the names and the prompts by name.
#[allow(clippy::type_complexity)]
fn attach_adapters(
    m: &mut dyn modula::models::LinearLayers,
    adapters: &[String],
    device: &Device,
) -> Result<(Vec<String>, BTreeMap<String, modula::PromptEmbedding>)> {
    let mut names = Vec::new();
    let mut prompts = BTreeMap::new();
    for spec in adapters {
        let (name, dir) = spec
            .split_once('=')
            .filter(|(n, d)| !n.is_empty() && !d.is_empty())
            .ok_or_else(|| {
                invalid(
                    format!("--adapter {spec}"),
                    "write NAME=DIR (a name for the adapter, then its PEFT folder)",
                )
            })?;
        if names.iter().any(|n| n == name) {
            return Err(invalid(
                format!("--adapter {spec}"),
                format!("the name `{name}` is given twice"),
            ));
        }
        match modula::PeftAdapter::load(dir, device)? {
            modula::PeftAdapter::Prompt(p) => {
                prompts.insert(name.to_string(), p.prompt);
            }
            peft => {
                peft.attach_to_model(m, name)
                    .map_err(|e| in_file(Path::new(dir), e))?;
            }
        }
        names.push(name.to_string());
    }
    Ok((names, prompts))
}

/// Reads and checks an input batch: equal-length rows, a mask of the same shape, one known
/// adapter name (or null) per row. Returns ids, mask and per-row adapters.
#[allow(clippy::type_complexity)]
fn read_batch<M>(
    path: &Path,
    loaded: &Loaded<M>,
    device: &Device,
) -> Result<(
    burn::tensor::Tensor<2, burn::tensor::Int>,
    Option<burn::tensor::Tensor<2, burn::tensor::Int>>,
    Vec<Option<String>>,
)> {
    let limits = modula::request::BatchLimits {
        vocab: loaded.vocab,
        positions: loaded.positions,
        adapters: &loaded.names,
        routed: loaded.routed,
    };
    let batch = modula::request::BatchRequest::from_json(&read_text(path)?)
        .and_then(|b| b.check(&limits))
        .map_err(|e| in_request(path, e))?;
    let (rows, seq) = (batch.rows, batch.seq);
    let to_tensor = |v: Vec<i64>| {
        burn::tensor::Tensor::<1, burn::tensor::Int>::from_data(
            burn::tensor::TensorData::new(v, [rows * seq]),
            device,
        )
        .reshape([rows, seq])
    };
    let mask = batch.attention_mask.map(to_tensor);
    Ok((to_tensor(batch.input_ids), mask, batch.adapters))
}

/// Whether `dir/config.json` declares `model_type: gpt2` (unreadable configs are reported by
/// the loader that follows).
fn is_gpt2(dir: &Path) -> bool {
    is_model_type(dir, "gpt2")
}

/// Whether `dir/config.json` declares this `model_type`.
fn is_model_type(dir: &Path, model_type: &str) -> bool {
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v["model_type"] == model_type)
}

fn run_score(
    batch: &BatchArgs,
    top_k: Option<usize>,
    temperature: Option<f64>,
    out: &Path,
) -> Result<()> {
    let device = Device::flex();
    // --top-k / --temperature are score's spellings of the routing flags.
    let mut batch = batch.clone();
    if top_k.is_some() {
        if batch.router_top_k.is_some() {
            return Err(invalid("--top-k", "given twice (also as --router-top-k)"));
        }
        batch.router_top_k = top_k;
    }
    if temperature.is_some() {
        if batch.router_temperature.is_some() {
            return Err(invalid(
                "--temperature",
                "given twice (also as --router-temperature)",
            ));
        }
        batch.router_temperature = temperature;
    }
    let batch = &batch;
    let logits = if is_gpt2(&batch.model) {
        let model = modula::checkpoint::load_gpt2(&batch.model, &device)?;
        let (vocab, positions) = (model.config.vocab_size, model.config.n_positions);
        let loaded = Loaded::new(model, batch, &device, vocab, positions)?;
        loaded.refuse_prompts("GPT-2")?;
        let (ids, mask, names) = read_batch(&batch.input, &loaded, &device)?;
        let names = loaded.row_adapters(&names);
        loaded.model.forward(ids, mask, names.as_deref())?
    } else {
        let loaded = load_model(batch, &device)?;
        let (ids, mask, names) = read_batch(&batch.input, &loaded, &device)?;
        let prompts = loaded.row_prompts(&names);
        match (loaded.row_adapters(&names), mask, prompts) {
            (names, mask, Some(prompts)) => {
                loaded
                    .model
                    .forward_prompted(ids, mask, &prompts, names.as_deref())?
            }
            (Some(names), mask, None) => loaded.model.forward_mixed(ids, mask, &names)?,
            (None, Some(mask), None) => loaded.model.forward_masked(ids, mask)?,
            (None, None, None) => loaded.model.forward(ids)?,
        }
    };
    let mut tensors = BTreeMap::new();
    tensors.insert("logits".to_string(), HostTensor::from_tensor(logits));
    write_safetensors(out, &tensors, None)?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run_generate(
    batch: &BatchArgs,
    max_new_tokens: usize,
    temperature: Option<f64>,
    top_k: Option<usize>,
    top_p: Option<f64>,
    seed: u64,
    out: &Path,
) -> Result<()> {
    use modula::models::{CausalLm, Decoding, GenerationConfig};
    let device = Device::flex();
    if temperature.is_none() && (top_k.is_some() || top_p.is_some()) {
        return Err(invalid(
            "--top-k / --top-p",
            "they shape sampling; add --temperature T to sample (greedy decoding ignores them)",
        ));
    }
    // Either decoder family, behind the one generation loop.
    let loaded: Loaded<Box<dyn CausalLm>> = if is_gpt2(&batch.model) {
        let m = modula::checkpoint::load_gpt2(&batch.model, &device)?;
        let (vocab, positions) = (m.config.vocab_size, m.config.n_positions);
        let l = Loaded::new(m, batch, &device, vocab, positions)?;
        l.refuse_prompts("GPT-2")?;
        Loaded {
            model: Box::new(l.model),
            names: l.names,
            prompts: l.prompts,
            vocab,
            positions,
            routed: l.routed,
        }
    } else {
        let l = load_model(batch, &device)?;
        Loaded {
            model: Box::new(l.model),
            names: l.names,
            prompts: l.prompts,
            vocab: l.vocab,
            positions: l.positions,
            routed: l.routed,
        }
    };
    let (ids, mask, names) = read_batch(&batch.input, &loaded, &device)?;
    let prompts = loaded.row_prompts(&names);
    let names = loaded.row_adapters(&names);
    let mut cache = modula::models::KvCache::new();
    if let Some(prompts) = &prompts {
        loaded
            .model
            .prefill_prompts(prompts, names.as_deref(), &mut cache)?;
    }
    let mut config = GenerationConfig::greedy(loaded.model.as_ref(), max_new_tokens);
    if let Some(temperature) = temperature {
        config.decoding = Decoding::Sample {
            temperature,
            top_k,
            top_p,
            seed,
        };
    }
    let pb = bar(max_new_tokens, "tokens");
    let new_tokens = modula::models::generate_after(
        loaded.model.as_ref(),
        cache,
        ids,
        mask,
        names.as_deref(),
        &config,
        |_| pb.inc(1),
    )?;
    pb.finish_and_clear();
    let json = serde_json::json!({ "new_tokens": new_tokens });
    modula::io::atomic_write(out, format!("{json}\n").as_bytes())?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

/// An [`Error::Invalid`] for a setting or key.
fn invalid(what: impl Into<String>, why: impl Into<String>) -> Error {
    Error::Invalid {
        what: what.into(),
        why: why.into(),
    }
}

fn run_embed(batch: &BatchArgs, out: &Path) -> Result<()> {
    let device = Device::flex();
    let (model, normalize) = modula::checkpoint::load_encoder(&batch.model, &device)?;
    let (vocab, positions) = (
        model.config.vocab_size,
        model.config.max_position_embeddings,
    );
    let loaded = Loaded::new(model, batch, &device, vocab, positions)?;
    loaded.refuse_prompts("an encoder")?;
    let (ids, mask, names) = read_batch(&batch.input, &loaded, &device)?;
    let names = loaded.row_adapters(&names);
    let hidden = loaded
        .model
        .forward(ids, mask.clone(), None, names.as_deref())?;
    let embedding = modula::models::mean_pooling(hidden.clone(), mask, normalize)?;
    let mut tensors = BTreeMap::new();
    tensors.insert(
        "last_hidden_state".to_string(),
        HostTensor::from_tensor(hidden),
    );
    tensors.insert(
        "sentence_embedding".to_string(),
        HostTensor::from_tensor(embedding),
    );
    write_safetensors(out, &tensors, None)?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

/// The text of a request file.
fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    })
}

/// A request's [`Error::Invalid`] with the file it came from in front of the key.
fn in_request(path: &Path, e: Error) -> Error {
    match e {
        Error::Invalid { what, why } => invalid(format!("{}: {what}", path.display()), why),
        other => other,
    }
}

fn run_tokenize(
    model: &Path,
    input: &Path,
    padding_side: Option<&str>,
    max_length: Option<usize>,
    no_special_tokens: bool,
    out: &Path,
) -> Result<()> {
    use modula::tokenizer::{PaddingSide, Tokenizer};
    let side = match padding_side {
        Some("left") => PaddingSide::Left,
        Some("right") => PaddingSide::Right,
        Some(other) => {
            return Err(invalid(
                format!("--padding-side {other}"),
                "write left or right",
            ));
        }
        None if is_model_type(model, "bert") => PaddingSide::Right,
        None => PaddingSide::Left,
    };
    let mut tok = Tokenizer::from_folder(model)?;
    tok.set_max_length(max_length)
        .map_err(|e| in_file(model, e))?;
    let texts = modula::request::TextsRequest::from_json(&read_text(input)?)
        .map_err(|e| in_request(input, e))?;
    let refs: Vec<&str> = texts.texts.iter().map(String::as_str).collect();
    let batch = tok.encode_batch(&refs, !no_special_tokens, side)?;
    let mut json = serde_json::json!({
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
    });
    if let Some(a) = texts.adapters {
        json["adapters"] = serde_json::json!(a);
    }
    modula::io::atomic_write(out, format!("{json}\n").as_bytes())?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

fn run_decode(model: &Path, input: &Path, skip_special_tokens: bool, out: &Path) -> Result<()> {
    let tok = modula::tokenizer::Tokenizer::from_folder(model)?;
    let rows = modula::request::IdRowsRequest::from_json(&read_text(input)?)
        .and_then(|r| r.rows())
        .map_err(|e| in_request(input, e))?;
    let mut texts = Vec::with_capacity(rows.rows.len());
    for (r, row) in rows.rows.iter().enumerate() {
        let text = tok.decode(row, skip_special_tokens).map_err(|e| {
            invalid(
                format!("{}: key `{}[{r}]`", input.display(), rows.key),
                e.to_string(),
            )
        })?;
        texts.push(text);
    }
    let json = serde_json::json!({ "texts": texts });
    modula::io::atomic_write(out, format!("{json}\n").as_bytes())?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    if cli.allow_non_finite {
        modula::io::set_non_finite_policy(modula::io::NonFinitePolicy::Allow);
    }
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
        Command::Tokenize {
            model,
            input,
            padding_side,
            max_length,
            no_special_tokens,
            out,
        } => run_tokenize(
            &model,
            &input,
            padding_side.as_deref(),
            max_length,
            no_special_tokens,
            &out,
        )?,
        Command::Decode {
            model,
            input,
            skip_special_tokens,
            out,
        } => run_decode(&model, &input, skip_special_tokens, &out)?,
        Command::Score {
            batch,
            top_k,
            temperature,
            out,
        } => run_score(&batch, top_k, temperature, &out)?,
        Command::Embed { batch, out } => run_embed(&batch, &out)?,
        Command::Generate {
            batch,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            out,
        } => run_generate(
            &batch,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            &out,
        )?,
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
