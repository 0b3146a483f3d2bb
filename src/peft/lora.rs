//! PEFT LoRA folders: load by module path, attach to layers, save for PEFT.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use serde_json::json;

use super::config::{PeftConfig, PeftType};
use super::folder::{Patterns, lora_config_template, read_folder, write_folder};
use super::keys::{KEY_PREFIX, split_key};
use super::targets::{TargetDecision, TargetRules};
use crate::error::{Error, Result, Scope};
use crate::io::HostTensor;
use crate::models::LinearLayers;
use crate::modules::lora::{LoraEmbedding, LoraLinear, LoraModule};

/// A LoRA adapter read from (or to be written as) a PEFT folder: one [`LoraModule`] per
/// module path.
#[derive(Debug)]
pub struct PeftLora {
    /// The config (defaults for saving, patterns for per-module rank/alpha).
    pub config: PeftConfig,
    /// The adapters by module path (`fc1`, `model.layers.0.self_attn.q_proj`, ...).
    pub modules: BTreeMap<String, LoraModule>,
    /// The module paths that adapt an embedding table (PEFT's `lora_embedding_A/B` keys).
    pub embeddings: BTreeSet<String>,
    /// Where it was loaded from, if anywhere.
    pub source: Option<PathBuf>,
}

/// The indices of `paths` (a model's linear layers) that PEFT's target rules in `config`
/// select, after checking that they are exactly the `folder`'s module paths: the one check
/// behind LoRA and IA3 attachment.
///
/// # Errors
/// [`Error::Peft`] naming `origin` when the rules select nothing, select a layer the folder
/// lacks, or the folder holds a path that is not a selected layer; the rules' own errors.
pub(super) fn select_layers<'a>(
    config: &PeftConfig,
    paths: &[String],
    output: Option<&str>,
    folder: impl Iterator<Item = &'a str>,
    origin: &Path,
) -> Result<Vec<usize>> {
    let folder: BTreeSet<&str> = folder.collect();
    // An adapter built in memory (`from_model`, `new` + `insert`) has no target rules yet: its
    // modules are its targets, as the folder `save` writes for it says.
    let mut raw = config.raw.clone();
    if raw
        .get("target_modules")
        .is_none_or(serde_json::Value::is_null)
    {
        raw.insert("target_modules".into(), serde_json::json!(folder));
    }
    let mut rules =
        TargetRules::from_config(&raw).map_err(|e| Error::peft(origin, e.to_string()))?;
    if rules.is_all_linear() {
        rules.resolve_all_linear(paths.iter().map(String::as_str), output);
    }
    let selected: Vec<usize> = (0..paths.len())
        .filter(|&i| rules.decide(&paths[i]) == TargetDecision::Target)
        .collect();
    if selected.is_empty() {
        return Err(Error::peft(
            origin,
            "target_modules selects no linear layer of this model",
        ));
    }
    for &i in &selected {
        if !folder.contains(paths[i].as_str()) {
            return Err(Error::peft(
                origin,
                format!(
                    "the rules select `{}`, but the folder has no weights for it",
                    paths[i]
                ),
            ));
        }
    }
    let chosen: BTreeSet<&str> = selected.iter().map(|&i| paths[i].as_str()).collect();
    if let Some(extra) = folder.iter().find(|p| !chosen.contains(**p)) {
        return Err(Error::peft(
            origin,
            format!(
                "the folder has weights for `{extra}`, which is not a selected linear layer of this model"
            ),
        ));
    }
    Ok(selected)
}

/// Reads and validates a PEFT LoRA folder and calls `f(config, path, lora_A, lora_B)` for each
/// adapted module, with A `[r, in]` and B `[out, r]` already checked 2-D and of the config's
/// rank (PyTorch layout). Returns the config and the paths that adapt embedding tables. The one
/// parser behind [`PeftLora::load`] (device tensors) and [`LoraExpert::load_peft`] (host
/// factors, no device).
pub(super) fn read_lora_folder<F>(dir: &Path, mut f: F) -> Result<(PeftConfig, BTreeSet<String>)>
where
    F: FnMut(&PeftConfig, &str, &HostTensor, &HostTensor) -> Result<()>,
{
    let (config, file) = read_folder(dir)?;
    let w_path = file.path().to_path_buf();
    super::expect_type(&config, PeftType::Lora, dir)?;
    let mut halves: BTreeMap<String, (Option<&HostTensor>, Option<&HostTensor>)> = BTreeMap::new();
    let mut embeddings = BTreeSet::new();
    let parts = [
        "lora_A.weight",
        "lora_B.weight",
        "lora_embedding_A",
        "lora_embedding_B",
    ];
    for (key, t) in file.tensors() {
        let Some((path, part)) = split_key(key, &parts) else {
            let why = if key.contains("lora_magnitude_vector") {
                format!("tensor `{key}` belongs to DoRA, which modula does not support")
            } else {
                format!(
                    "unexpected tensor `{key}`; expected `<module>.lora_A.weight` / `.lora_B.weight` (or `.lora_embedding_A` / `.lora_embedding_B`)"
                )
            };
            return Err(Error::peft(&w_path, why));
        };
        if part.starts_with("lora_embedding") {
            embeddings.insert(path.to_string());
        }
        let entry = halves.entry(path.to_string()).or_default();
        if part == "lora_A.weight" || part == "lora_embedding_A" {
            entry.0 = Some(t);
        } else {
            entry.1 = Some(t);
        }
    }
    if halves.is_empty() {
        return Err(Error::peft(&w_path, "contains no LoRA tensors"));
    }
    for (path, (a, b)) in halves {
        let (Some(a), Some(b)) = (a, b) else {
            return Err(Error::peft(
                &w_path,
                format!("module `{path}` has only one of lora_A / lora_B; the file is incomplete"),
            ));
        };
        let r = config.rank_for(&path);
        let ok = a.shape.len() == 2 && b.shape.len() == 2 && a.shape[0] == r && b.shape[1] == r;
        if !ok {
            return Err(Error::peft(
                &w_path,
                format!(
                    "module `{path}`: lora_A {:?} and lora_B {:?} disagree with the config's rank {r} (expected [{r}, in] and [out, {r}]); check r / rank_pattern",
                    a.shape, b.shape
                ),
            ));
        }
        f(&config, &path, a, b)?;
    }
    Ok((config, embeddings))
}

impl PeftLora {
    /// Loads a PEFT LoRA folder onto `device`.
    ///
    /// # Errors
    /// [`Error::Peft`] for a missing or invalid config, a non-LoRA adapter, unknown tensor
    /// keys, a missing `lora_A`/`lora_B` half, or factor shapes that disagree with the config's
    /// rank; [`Error::SafeTensors`] for a truncated weights file.
    pub fn load(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        let mut modules = BTreeMap::new();
        let (config, embeddings) = read_lora_folder(dir, |config, path, a, b| {
            let adapter = LoraModule::from_factors(
                a.to_tensor::<2>(device)?.transpose(),
                b.to_tensor::<2>(device)?.transpose(),
                config.alpha_for(path),
                config.use_rslora,
                config.lora_dropout,
            )?;
            modules.insert(path.to_string(), adapter);
            Ok(())
        })?;
        Ok(Self {
            config,
            modules,
            embeddings,
            source: Some(dir.to_path_buf()),
        })
    }

    /// A new, empty PEFT LoRA with the given defaults (modules added with
    /// [`insert`](Self::insert)).
    pub fn new(r: usize, lora_alpha: f64, use_rslora: bool) -> Self {
        let text = json!({"peft_type": "LORA", "r": r, "lora_alpha": lora_alpha, "use_rslora": use_rslora})
            .to_string();
        let config = PeftConfig::from_json(&text, "<new>").unwrap_or_else(|_| unreachable!());
        Self {
            config,
            modules: BTreeMap::new(),
            embeddings: BTreeSet::new(),
            source: None,
        }
    }

    /// Adds (or replaces) the adapter of the linear module `path`.
    pub fn insert(&mut self, path: &str, adapter: LoraModule) {
        self.embeddings.remove(path);
        self.modules.insert(path.to_string(), adapter);
    }

    /// Adds (or replaces) the adapter of the embedding module `path`.
    pub fn insert_embedding(&mut self, path: &str, adapter: LoraModule) {
        self.embeddings.insert(path.to_string());
        self.modules.insert(path.to_string(), adapter);
    }

    /// The module paths.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.modules.keys().map(String::as_str)
    }

    /// The adapter for module `path`.
    ///
    /// # Errors
    /// [`Error::UnknownAdapter`] naming the paths the folder has.
    pub fn get(&self, path: &str) -> Result<&LoraModule> {
        self.modules.get(path).ok_or_else(|| Error::UnknownAdapter {
            name: path.to_string(),
            scope: Scope::PeftLora,
            known: self.modules.keys().cloned().collect(),
        })
    }

    /// Inserts a copy of module `path`'s adapter into `layer` under `name`.
    ///
    /// # Errors
    /// Unknown path, duplicate name, or widths that differ from the layer's.
    pub fn attach(&self, path: &str, layer: &mut LoraLinear, name: &str) -> Result<()> {
        layer.insert_adapter(name, self.get(path)?.clone())
    }

    /// Attaches this folder to every layer of `model` that PEFT's target-module rules select
    /// ([`TargetRules`]: `target_modules`, `exclude_modules`, `layers_to_transform`,
    /// `layers_pattern`, `all-linear`), under `name`. Returns the adapted paths, in module
    /// order. Nothing is attached unless everything fits.
    ///
    /// # Errors
    /// [`Error::Peft`] naming the folder if the rules select a layer the folder has no factors
    /// for, the folder has factors for a path that is not a selected linear layer of the model
    /// (embedding adapters included, for now), or the rules select nothing; the rules' own
    /// errors; [`Error::DuplicateAdapter`] / [`Error::Shape`] from a layer.
    pub fn attach_to_model(&self, model: &mut dyn LinearLayers, name: &str) -> Result<Vec<String>> {
        let origin = self
            .source
            .clone()
            .unwrap_or_else(|| PathBuf::from("<PEFT LoRA>"));
        let output = model.output_layer().map(str::to_string);
        let mut layers = model.linear_layers_mut();
        let paths: Vec<String> = layers.iter().map(|(p, _)| p.clone()).collect();
        let selected = select_layers(
            &self.config,
            &paths,
            output.as_deref(),
            self.modules
                .keys()
                .filter(|p| !self.embeddings.contains(*p))
                .map(String::as_str),
            &origin,
        )?;
        if let Some(e) = self.embeddings.iter().next() {
            return Err(Error::peft(
                &origin,
                format!(
                    "the folder adapts the embedding `{e}`, which attach_to_model does not attach yet"
                ),
            ));
        }
        // Check every width before touching a layer, so an error leaves the model unchanged.
        for &i in &selected {
            let (path, layer) = &layers[i];
            let a = &self.modules[path];
            if (a.d_in(), a.d_out()) != (layer.d_in(), layer.d_out()) {
                return Err(Error::peft(
                    &origin,
                    format!(
                        "`{path}`: factors for {} -> {}, the layer is {} -> {}",
                        a.d_in(),
                        a.d_out(),
                        layer.d_in(),
                        layer.d_out()
                    ),
                ));
            }
            if layer.holds(name) {
                return Err(Error::DuplicateAdapter {
                    name: name.to_string(),
                    scope: Scope::Layer,
                });
            }
            if !layer.ia3_names().is_empty() {
                return Err(Error::peft(
                    &origin,
                    format!(
                        "`{path}` holds IA3 adapters ({}); a layer holds one kind of adapter, as a PEFT model does",
                        layer.ia3_names().join(", ")
                    ),
                ));
            }
        }
        let mut attached = Vec::with_capacity(selected.len());
        for &i in &selected {
            let (path, layer) = &mut layers[i];
            layer.insert_adapter(name, self.modules[path.as_str()].clone())?;
            attached.push(path.clone());
        }
        Ok(attached)
    }

    /// The adapter `name` of every layer of `model` that holds it, as a PEFT LoRA whose
    /// [`save`](Self::save) writes a folder PEFT loads onto the same Hugging Face model with
    /// the same outputs (trained factors included). The defaults `r` and `lora_alpha` are the
    /// most common pair among the layers; the others go to the patterns on saving.
    ///
    /// # Errors
    /// [`Error::UnknownAdapter`] when no layer holds `name`; [`Error::Invalid`] when the
    /// layers disagree on rsLoRA (PEFT has one setting per adapter).
    pub fn from_model(model: &dyn LinearLayers, name: &str) -> Result<Self> {
        let mut modules = BTreeMap::new();
        for (path, layer) in model.linear_layers() {
            if layer.names().iter().any(|n| n == name) {
                modules.insert(path, layer.adapter(name)?.clone());
            }
        }
        let Some(first) = modules.values().next() else {
            return Err(Error::UnknownAdapter {
                name: name.to_string(),
                scope: Scope::Model,
                known: model.adapter_names(),
            });
        };
        let rslora = first.use_rslora;
        if let Some((p, _)) = modules.iter().find(|(_, m)| m.use_rslora != rslora) {
            return Err(Error::invalid(
                format!("adapter `{name}`"),
                format!(
                    "layer `{p}` disagrees with the others on use_rslora; PEFT has one setting per adapter"
                ),
            ));
        }
        // The most common (rank, alpha) pair, ties to the first met.
        let mut counts: Vec<((usize, f64), usize)> = Vec::new();
        for m in modules.values() {
            let key = (m.rank(), m.alpha);
            match counts.iter_mut().find(|(k, _)| *k == key) {
                Some((_, c)) => *c += 1,
                None => counts.push((key, 1)),
            }
        }
        let (r, alpha) = counts
            .iter()
            .fold(counts[0], |best, c| if c.1 > best.1 { *c } else { best })
            .0;
        let mut out = Self::new(r, alpha, rslora);
        out.modules = modules;
        Ok(out)
    }

    /// This folder on any burn module, through burn 0.22's own reparameterization hooks
    /// (`Module::apply_reparameterization` with burn's `LoraAdapter`): every 2-D parameter
    /// `{path}.weight` whose `path` is one of the folder's modules gets that module's factors
    /// (`a = lora_Aᵀ`, `b = lora_Bᵀ`, scale `alpha/r` or rsLoRA's), and every parameter of the
    /// module is frozen, so training moves the factors only. The user's model code does not
    /// change: a burn `Linear` at that path computes with `W + s·A B`. Returns the adapted
    /// module; `module` itself is left as it was.
    ///
    /// The limits of that route, which [`attach_to_model`](Self::attach_to_model) on modula's
    /// own models does not have: burn re-forms the dense `W + s·A B` on every forward (a
    /// `d_in × d_out` product per layer and call), one adapter per weight, no mixed-adapter
    /// batches, no unmerge (`Module::materialize` folds the update in for good). The folder's
    /// module paths must equal the burn module's field paths (`fc1`, `encoder.layers.0.q`).
    ///
    /// # Errors
    /// [`Error::Peft`] naming the folder for a module path the burn module has no 2-D
    /// `{path}.weight` for, a weight whose shape disagrees with the factors (burn's `[in,
    /// out]`), or an embedding adapter.
    pub fn apply_to_module<M: burn::module::Module>(&self, module: &M) -> Result<M> {
        use std::cell::RefCell;
        use std::rc::Rc;

        use burn::module::{LoraAdapter, Param, Reparameterizer};
        use burn::tensor::Tensor;

        let origin = self
            .source
            .clone()
            .unwrap_or_else(|| PathBuf::from("<PEFT LoRA>"));
        if let Some(e) = self.embeddings.iter().next() {
            return Err(Error::peft(
                &origin,
                format!(
                    "the folder adapts the embedding `{e}`; apply_to_module adapts 2-D weights of Linear layers"
                ),
            ));
        }
        /// What the walk saw: the modules it adapted and the shape mismatches.
        #[derive(Default)]
        struct Seen {
            used: BTreeSet<String>,
            problems: Vec<String>,
        }
        struct Peft<'a> {
            modules: &'a BTreeMap<String, LoraModule>,
            seen: Rc<RefCell<Seen>>,
        }
        impl Reparameterizer for Peft<'_> {
            type Reparam = LoraAdapter;

            fn reparameterize<const D: usize>(
                &mut self,
                path: &str,
                param: Param<Tensor<D>>,
            ) -> (Param<Tensor<D>>, Option<LoraAdapter>) {
                let param = param.set_require_grad(false);
                let Some(m) = path
                    .strip_suffix(".weight")
                    .filter(|_| D == 2)
                    .and_then(|p| self.modules.get_key_value(p))
                else {
                    return (param, None);
                };
                let (name, adapter) = m;
                let dims = param.shape().dims::<D>().to_vec();
                let mut seen = self.seen.borrow_mut();
                if dims != [adapter.d_in(), adapter.d_out()] {
                    seen.problems.push(format!(
                        "`{name}`: the weight is {dims:?} ([in, out]) but the factors are for \
                         {} -> {}",
                        adapter.d_in(),
                        adapter.d_out()
                    ));
                    return (param, None);
                }
                seen.used.insert(name.clone());
                let lora = LoraAdapter {
                    a: Param::from_tensor(adapter.a_masked()),
                    b: Param::from_tensor(adapter.b.val()),
                    scale: adapter.scaling(),
                };
                (param, Some(lora))
            }
        }
        let seen = Rc::new(RefCell::new(Seen::default()));
        let adapted = module.clone().apply_reparameterization(Peft {
            modules: &self.modules,
            seen: Rc::clone(&seen),
        });
        let seen = seen.borrow();
        if let Some(p) = seen.problems.first() {
            return Err(Error::peft(&origin, p.clone()));
        }
        if let Some(missing) = self.modules.keys().find(|k| !seen.used.contains(*k)) {
            return Err(Error::peft(
                &origin,
                format!(
                    "module `{missing}` has no 2-D parameter `{missing}.weight` in this burn \
                     module; the folder's paths must equal the module's field paths"
                ),
            ));
        }
        Ok(adapted)
    }

    /// Inserts a copy of embedding module `path`'s adapter into `layer` under `name`.
    ///
    /// # Errors
    /// Unknown path, a path that is not an embedding, duplicate name, or wrong widths.
    pub fn attach_embedding(
        &self,
        path: &str,
        layer: &mut LoraEmbedding,
        name: &str,
    ) -> Result<()> {
        let adapter = self.get(path)?;
        if !self.embeddings.contains(path) {
            return Err(Error::invalid(
                "PEFT module kind",
                format!("`{path}` adapts a Linear layer; attach it to a LoraLinear"),
            ));
        }
        layer.insert_adapter(name, adapter.clone())
    }

    /// Writes the adapter as a PEFT folder (created if needed) that PEFT 0.21 loads with
    /// identical outputs. Per-module ranks and alphas that differ from the defaults go to
    /// `rank_pattern` / `alpha_pattern` as exact paths.
    ///
    /// # Errors
    /// [`Error::Invalid`] if the adapters disagree on rsLoRA; [`Error::Io`].
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        if self.modules.is_empty() {
            return Err(Error::invalid(
                "PEFT LoRA save",
                "there are no modules to save",
            ));
        }
        let use_rslora = self.config.use_rslora;
        let mut entries = Vec::with_capacity(self.modules.len());
        for (path, ad) in &self.modules {
            if ad.use_rslora != use_rslora {
                return Err(Error::invalid(
                    "PEFT LoRA save",
                    format!(
                        "module `{path}` has use_rslora={} but the config says {use_rslora}; PEFT has one setting per adapter",
                        ad.use_rslora
                    ),
                ));
            }
            entries.push(LoraEntry {
                path,
                rank: ad.rank(),
                alpha: ad.alpha,
                embedding: self.embeddings.contains(path),
                a: HostTensor::from_tensor(ad.a_masked().transpose()),
                b: HostTensor::from_tensor(ad.b.val().transpose()),
            });
        }
        write_lora_folder(dir, &self.config, use_rslora, entries)
    }
}

/// One module of a LoRA folder to write, in PEFT's layout (`a`: `[r, in]`, `b`: `[out, r]`).
pub(super) struct LoraEntry<'a> {
    pub(super) path: &'a str,
    pub(super) rank: usize,
    pub(super) alpha: f64,
    pub(super) embedding: bool,
    pub(super) a: HostTensor,
    pub(super) b: HostTensor,
}

/// Writes a PEFT LoRA folder: `config`'s defaults (`r`, `lora_alpha`) and the keys it keeps,
/// `rank_pattern` / `alpha_pattern` for the modules that differ, and the tensors. The one
/// writer behind [`PeftLora::save`] (device adapters) and
/// [`LoraExpert::save_peft`](crate::library::LoraExpert::save_peft) (host factors).
pub(super) fn write_lora_folder(
    dir: &Path,
    config: &PeftConfig,
    use_rslora: bool,
    entries: Vec<LoraEntry<'_>>,
) -> Result<()> {
    let mut tensors = BTreeMap::new();
    let mut patterns = Patterns::new(config.r, config.lora_alpha);
    let mut targets = Vec::with_capacity(entries.len());
    for e in entries {
        patterns.add(e.path, e.rank, e.alpha);
        let (ka, kb) = if e.embedding {
            ("lora_embedding_A", "lora_embedding_B")
        } else {
            ("lora_A.weight", "lora_B.weight")
        };
        tensors.insert(format!("{KEY_PREFIX}{}.{ka}", e.path), e.a);
        tensors.insert(format!("{KEY_PREFIX}{}.{kb}", e.path), e.b);
        targets.push(e.path);
    }
    let mut doc = lora_config_template();
    for (k, v) in &config.raw {
        doc.insert(k.clone(), v.clone());
    }
    doc.insert("peft_type".into(), json!("LORA"));
    patterns.write(&mut doc, "lora_alpha");
    doc.insert("use_rslora".into(), json!(use_rslora));
    doc.insert("target_modules".into(), json!(targets));
    doc.insert("inference_mode".into(), json!(true));
    write_folder(dir, doc, &tensors)
}
