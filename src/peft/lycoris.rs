//! PEFT LoHa and LoKr folders (`peft_type` `LOHA` / `LOKR`): load, attach to a model in their
//! exact LoRA form, save for PEFT.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor};
use serde_json::{Map, Value, json};

use super::config::{PeftConfig, PeftType};
use super::folder::{Patterns, read_folder, write_folder};
use super::keys::{KEY_PREFIX, split_key};
use super::lora::PeftLora;
use super::{PEFT_VERSION, expect_type};
use crate::error::{Error, Result};
use crate::io::HostTensor;
use crate::models::LinearLayers;
use crate::modules::lycoris::{KronFactor, LohaModule, LokrModule, LokrShape, LycorisModule};

const LOHA_PARTS: [&str; 4] = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"];
const LOKR_PARTS: [&str; 6] = [
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w1",
    "lokr_w2_a",
    "lokr_w2_b",
    "lokr_w2",
];

/// One side of a LoKr module as read: the full matrix or the low-rank pair.
type KronSide = (Option<Tensor<2>>, Option<(Tensor<2>, Tensor<2>)>);

/// A LoHa or LoKr adapter read from (or to be written as) a PEFT folder: one
/// [`LycorisModule`] per module path, all of the config's kind.
#[derive(Debug)]
pub struct PeftLycoris {
    /// The config (`peft_type` `LOHA` or `LOKR`; defaults and patterns for rank and alpha).
    pub config: PeftConfig,
    /// The adapters by module path.
    pub modules: BTreeMap<String, LycorisModule>,
    /// Where it was loaded from, if anywhere.
    pub source: Option<PathBuf>,
}

impl PeftLycoris {
    /// Loads a PEFT LoHa or LoKr folder onto `device`.
    ///
    /// # Errors
    /// [`Error::Peft`] for a missing or invalid config, another adapter type, unknown tensor
    /// keys (the convolution-only `hada_t*` / `lokr_t2` included), a module with missing
    /// parts, or factor shapes that disagree with each other or with the config's rank.
    pub fn load(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        let (config, file) = read_folder(dir)?;
        let w_path = file.path().to_path_buf();
        let loha = config.peft_type == PeftType::Loha;
        if !loha {
            expect_type(&config, PeftType::Lokr, dir)?;
        }
        let parts: &[&str] = if loha { &LOHA_PARTS } else { &LOKR_PARTS };
        let mut found: BTreeMap<String, BTreeMap<&str, Tensor<2>>> = BTreeMap::new();
        for (key, t) in file.tensors() {
            let Some((path, part)) = split_key(key, parts) else {
                let why = if key.contains("hada_t") || key.contains("lokr_t2") {
                    format!(
                        "tensor `{key}` belongs to a convolution layer's effective (Tucker) form, which modula does not support"
                    )
                } else {
                    format!(
                        "unexpected tensor `{key}`; a {} folder holds `<module>.{}`",
                        config.peft_type.name(),
                        parts.join(" / ")
                    )
                };
                return Err(Error::peft(&w_path, why));
            };
            if t.shape.len() != 2 {
                return Err(Error::peft(
                    &w_path,
                    format!(
                        "`{key}` has shape {:?}; modula adapts linear layers (2-D factors)",
                        t.shape
                    ),
                ));
            }
            found
                .entry(path.to_string())
                .or_default()
                .insert(part, t.to_tensor::<2>(device)?);
        }
        if found.is_empty() {
            return Err(Error::peft(
                &w_path,
                format!("contains no {} tensors", config.peft_type.name()),
            ));
        }
        let mut modules = BTreeMap::new();
        for (path, mut t) in found {
            let (r, alpha) = (config.rank_for(&path), config.alpha_for(&path));
            let bad = |why: String| Error::peft(&w_path, format!("module `{path}`: {why}"));
            let module = if loha {
                let mut take = |k: &str| {
                    t.remove(k)
                        .ok_or_else(|| bad(format!("`{k}` is missing; the file is incomplete")))
                };
                let (w1a, w1b, w2a, w2b) = (
                    take("hada_w1_a")?,
                    take("hada_w1_b")?,
                    take("hada_w2_a")?,
                    take("hada_w2_b")?,
                );
                if w1a.dims()[1] != r {
                    return Err(bad(format!(
                        "hada_w1_a {:?} disagrees with the config's rank {r}; check r / rank_pattern",
                        w1a.dims()
                    )));
                }
                LycorisModule::Loha(
                    LohaModule::from_factors(w1a, w1b, w2a, w2b, alpha)
                        .map_err(|e| bad(e.to_string()))?,
                )
            } else {
                let mut side = |n: u8| -> Result<KronSide> {
                    let full = t.remove(format!("lokr_w{n}").as_str());
                    let a = t.remove(format!("lokr_w{n}_a").as_str());
                    let b = t.remove(format!("lokr_w{n}_b").as_str());
                    match (full, a, b) {
                        (Some(w), None, None) => Ok((Some(w), None)),
                        (None, Some(a), Some(b)) => {
                            if a.dims()[1] != r {
                                return Err(bad(format!(
                                    "lokr_w{n}_a {:?} disagrees with the config's rank {r}; check r / rank_pattern",
                                    a.dims()
                                )));
                            }
                            Ok((None, Some((a, b))))
                        }
                        _ => Err(bad(format!(
                            "needs either lokr_w{n} or both lokr_w{n}_a and lokr_w{n}_b"
                        ))),
                    }
                };
                let (w1, w1_pair) = side(1)?;
                let (w2, w2_pair) = side(2)?;
                LycorisModule::Lokr(
                    LokrModule::from_factors(w1, w1_pair, w2, w2_pair, alpha, r)
                        .map_err(|e| bad(e.to_string()))?,
                )
            };
            modules.insert(path, module);
        }
        Ok(Self {
            config,
            modules,
            source: Some(dir.to_path_buf()),
        })
    }

    fn empty(doc: Value) -> Self {
        let config = PeftConfig::from_json(&doc.to_string(), "<new>")
            .unwrap_or_else(|e| unreachable!("a generated config parses: {e}"));
        Self {
            config,
            modules: BTreeMap::new(),
            source: None,
        }
    }

    /// A new, empty LoHa adapter with defaults `r` and `alpha` (modules added with
    /// [`insert`](Self::insert)).
    pub fn new_loha(r: usize, alpha: f64) -> Self {
        Self::empty(json!({"peft_type": "LOHA", "r": r, "alpha": alpha}))
    }

    /// A new, empty LoKr adapter with the defaults of `shape` (modules added with
    /// [`insert`](Self::insert), best made with [`LokrModule::new`] and the same shape).
    pub fn new_lokr(shape: LokrShape) -> Self {
        Self::empty(
            json!({"peft_type": "LOKR", "r": shape.rank, "alpha": shape.alpha,
            "decompose_both": shape.decompose_both, "decompose_factor": shape.decompose_factor}),
        )
    }

    /// Adds (or replaces) the adapter of module `path`.
    ///
    /// # Errors
    /// [`Error::Invalid`] when its kind differs from the config's.
    pub fn insert(&mut self, path: &str, module: LycorisModule) -> Result<()> {
        let kind = match module {
            LycorisModule::Loha(_) => PeftType::Loha,
            LycorisModule::Lokr(_) => PeftType::Lokr,
        };
        if kind != self.config.peft_type {
            return Err(Error::invalid(
                format!("module `{path}`"),
                format!(
                    "a {} adapter cannot join a {} folder",
                    kind.name(),
                    self.config.peft_type.name()
                ),
            ));
        }
        self.modules.insert(path.to_string(), module);
        Ok(())
    }

    /// The same adapter as a PEFT LoRA (each module's exact LoRA form, the same target rules):
    /// what [`attach_to_model`](Self::attach_to_model) installs.
    pub fn to_lora(&self) -> PeftLora {
        let mut lora = PeftLora::new(self.config.r, self.config.lora_alpha, false);
        for key in [
            "target_modules",
            "exclude_modules",
            "layers_to_transform",
            "layers_pattern",
        ] {
            if let Some(v) = self.config.raw.get(key) {
                lora.config.raw.insert(key.into(), v.clone());
            }
        }
        for (path, m) in &self.modules {
            lora.insert(path, m.to_lora());
        }
        lora.source = self.source.clone();
        lora
    }

    /// Attaches the adapter to every layer of `model` that PEFT's target rules select, as
    /// adapter `name` (active, unmerged), in its exact LoRA form: it then serves, mixes,
    /// routes, merges and unmerges like a LoRA adapter. Returns the adapted paths.
    ///
    /// The LoRA form is frozen; train LoHa / LoKr factors on the layer-level modules
    /// ([`LohaModule`], [`LokrModule`]).
    ///
    /// # Errors
    /// As [`PeftLora::attach_to_model`]. Nothing changes on error.
    pub fn attach_to_model(&self, model: &mut dyn LinearLayers, name: &str) -> Result<Vec<String>> {
        self.to_lora().attach_to_model(model, name)
    }

    /// Writes the adapter as a PEFT folder (`adapter_config.json` with the module paths as
    /// `target_modules` and `rank_pattern` / `alpha_pattern` for modules that differ from the
    /// defaults; `adapter_model.safetensors` with PEFT's keys).
    ///
    /// # Errors
    /// [`Error::Invalid`] with no modules, or a LoKr module whose factor shapes differ from
    /// those PEFT would build from the config (PEFT could not load it); [`Error::Io`].
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let what = format!("PEFT {} save", self.config.peft_type.name());
        if self.modules.is_empty() {
            return Err(Error::invalid(what, "there are no modules to save"));
        }
        let mut tensors = BTreeMap::new();
        let mut patterns = Patterns::new(self.config.r, self.config.lora_alpha);
        let mut put = |path: &str, part: &str, t: Tensor<2>| {
            tensors.insert(
                format!("{KEY_PREFIX}{path}.{part}"),
                HostTensor::from_tensor(t),
            );
        };
        for (path, m) in &self.modules {
            let (rank, alpha) = match m {
                LycorisModule::Loha(m) => {
                    put(path, "hada_w1_a", m.w1a.val());
                    put(path, "hada_w1_b", m.w1b.val());
                    put(path, "hada_w2_a", m.w2a.val());
                    put(path, "hada_w2_b", m.w2b.val());
                    (m.rank(), m.alpha)
                }
                LycorisModule::Lokr(m) => {
                    let shape = LokrShape {
                        rank: m.rank,
                        alpha: m.alpha,
                        decompose_both: self.config.decompose_both,
                        decompose_factor: self.config.decompose_factor,
                    };
                    let want = LokrModule::peft_layout(m.d_in(), m.d_out(), shape);
                    if m.layout() != want {
                        return Err(Error::invalid(
                            what,
                            format!(
                                "module `{path}` has layout {:?}, but PEFT builds {want:?} from r={}, decompose_both={}, decompose_factor={}; make it with LokrModule::new and the config's shape",
                                m.layout(),
                                m.rank,
                                shape.decompose_both,
                                shape.decompose_factor
                            ),
                        ));
                    }
                    for (n, f) in [(1, &m.w1), (2, &m.w2)] {
                        match f {
                            KronFactor::Full(w) => put(path, &format!("lokr_w{n}"), w.val()),
                            KronFactor::LowRank(p) => {
                                put(path, &format!("lokr_w{n}_a"), p.a.val());
                                put(path, &format!("lokr_w{n}_b"), p.b.val());
                            }
                        }
                    }
                    (m.rank, m.alpha)
                }
            };
            patterns.add(path, rank, alpha);
        }
        let mut doc = Map::new();
        for (k, v) in [
            ("auto_mapping", Value::Null),
            ("base_model_name_or_path", Value::Null),
            ("exclude_modules", Value::Null),
            ("init_weights", json!(true)),
            ("layers_pattern", Value::Null),
            ("layers_to_transform", Value::Null),
            ("module_dropout", json!(0.0)),
            ("modules_to_save", Value::Null),
            ("rank_dropout", json!(0.0)),
            ("revision", Value::Null),
            ("task_type", Value::Null),
            ("use_effective_conv2d", json!(false)),
        ] {
            doc.insert(k.into(), v);
        }
        if self.config.peft_type == PeftType::Lokr {
            doc.insert("decompose_both".into(), json!(self.config.decompose_both));
            doc.insert(
                "decompose_factor".into(),
                json!(self.config.decompose_factor),
            );
            doc.insert("rank_dropout_scale".into(), json!(false));
        }
        for (k, v) in &self.config.raw {
            doc.insert(k.clone(), v.clone());
        }
        let targets: Vec<&String> = self.modules.keys().collect();
        doc.insert("peft_type".into(), json!(self.config.peft_type.name()));
        doc.insert("peft_version".into(), json!(PEFT_VERSION));
        patterns.write(&mut doc, "alpha");
        doc.insert("target_modules".into(), json!(targets));
        doc.insert("inference_mode".into(), json!(true));
        write_folder(dir.as_ref(), doc, &tensors)
    }
}
