//! PEFT IA3 folders.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::{Device, Tensor};
use serde_json::{Map, Value, json};

use super::PEFT_VERSION;
use super::config::{PeftConfig, PeftType};
use super::folder::{read_folder, write_folder};
use super::keys::{KEY_PREFIX, split_key};
use super::lora::select_layers;
use crate::error::{Error, Result, Scope};
use crate::io::HostTensor;
use crate::models::LinearLayers;
use crate::modules::ia3::Ia3Linear;

/// An IA3 adapter read from (or to be written as) a PEFT folder.
#[derive(Debug)]
pub struct PeftIa3 {
    /// The config.
    pub config: PeftConfig,
    /// Per module path: the vector `l` (`[n]`) and whether it is input-side.
    pub modules: BTreeMap<String, (Tensor<1>, bool)>,
}

impl PeftIa3 {
    /// Loads a PEFT IA3 folder onto `device`.
    ///
    /// # Errors
    /// [`Error::Peft`] for a non-IA3 adapter, unknown keys, or a vector whose shape does not
    /// match its placement (`[out, 1]` output-side, `[1, in]` for `feedforward_modules`).
    pub fn load(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        let (config, file) = read_folder(dir)?;
        let w_path = file.path().to_path_buf();
        super::expect_type(&config, PeftType::Ia3, dir)?;
        let mut modules = BTreeMap::new();
        for (key, t) in file.tensors() {
            let Some((path, _)) = split_key(key, &["ia3_l"]) else {
                return Err(Error::peft(
                    &w_path,
                    format!("unexpected tensor `{key}`; expected `<module>.ia3_l`"),
                ));
            };
            let ff = config.is_feedforward(path);
            let ok = t.shape.len() == 2 && if ff { t.shape[0] == 1 } else { t.shape[1] == 1 };
            if !ok {
                return Err(Error::peft(
                    &w_path,
                    format!(
                        "module `{path}`: ia3_l has shape {:?}, expected {} ({} module)",
                        t.shape,
                        if ff { "[1, in]" } else { "[out, 1]" },
                        if ff {
                            "a feedforward"
                        } else {
                            "an output-side"
                        }
                    ),
                ));
            }
            let n = t.data.len();
            let v = HostTensor {
                shape: vec![n],
                data: t.data.clone(),
            }
            .to_tensor::<1>(device)?;
            modules.insert(path.to_string(), (v, ff));
        }
        if modules.is_empty() {
            return Err(Error::peft(&w_path, "contains no ia3_l tensors"));
        }
        Ok(Self { config, modules })
    }

    /// Wraps `base` (the frozen layer at module `path`) with this adapter's vector.
    ///
    /// # Errors
    /// Unknown path, or a vector length that does not fit the layer.
    pub fn apply(&self, path: &str, base: burn::nn::Linear) -> Result<Ia3Linear> {
        let (v, ff) = self
            .modules
            .get(path)
            .ok_or_else(|| Error::UnknownAdapter {
                name: path.to_string(),
                scope: Scope::PeftIa3,
                known: self.modules.keys().cloned().collect(),
            })?;
        Ia3Linear::with_scale(base, v.clone(), *ff)
    }

    /// Attaches this folder's vectors to every layer of `model` that PEFT's target rules
    /// select, as IA3 adapter `name` (active, unmerged; trainable): PEFT's `load_adapter` for
    /// an IA3 folder. Manage it with the model's [`LinearLayers`] methods (activate, merge,
    /// unmerge, delete) and serve it per sequence in mixed batches. Returns the adapted paths.
    ///
    /// # Errors
    /// As [`PeftLora::attach_to_model`](crate::PeftLora::attach_to_model) for the target
    /// rules; [`Error::Peft`] for a vector whose length does not fit its layer or a selected
    /// layer that holds LoRA adapters; [`Error::DuplicateAdapter`] when the model holds
    /// `name`. Nothing changes on error.
    pub fn attach_to_model(&self, model: &mut dyn LinearLayers, name: &str) -> Result<Vec<String>> {
        let origin = std::path::PathBuf::from("<PEFT IA3>");
        if model.adapter_names().iter().any(|n| n == name) {
            return Err(Error::DuplicateAdapter {
                name: name.to_string(),
                scope: Scope::Model,
            });
        }
        let output = model.output_layer().map(str::to_string);
        let mut layers = model.linear_layers_mut();
        let paths: Vec<String> = layers.iter().map(|(p, _)| p.clone()).collect();
        let selected = select_layers(
            &self.config,
            &paths,
            output.as_deref(),
            self.modules.keys().map(String::as_str),
            &origin,
        )?;
        for &i in &selected {
            let (path, layer) = &layers[i];
            let (v, ff) = &self.modules[path];
            let want = if *ff { layer.d_in() } else { layer.d_out() };
            if v.dims()[0] != want {
                return Err(Error::peft(
                    &origin,
                    format!(
                        "`{path}`: ia3_l has {} values, the layer needs {want}",
                        v.dims()[0]
                    ),
                ));
            }
            if !layer.names().is_empty() {
                return Err(Error::peft(
                    &origin,
                    format!(
                        "`{path}` holds LoRA adapters; a layer holds one kind of adapter, as a PEFT model does"
                    ),
                ));
            }
        }
        let mut attached = Vec::with_capacity(selected.len());
        for &i in &selected {
            let (path, layer) = &mut layers[i];
            let (v, ff) = &self.modules[path.as_str()];
            layer.insert_ia3(name, v.clone(), *ff)?;
            attached.push(path.clone());
        }
        Ok(attached)
    }

    /// Merges this folder into every layer of `model` that PEFT's target rules select and
    /// keeps no adapter (PEFT's IA3 `merge_and_unload`, exact): an input-side (feedforward)
    /// vector scales the weight's input rows, `W ← diag(l) W` in burn's `[in, out]` layout;
    /// an output-side one scales its output columns and the bias, `W ← W diag(l)`, `b ← l ⊙
    /// b`, as PEFT scales the layer's whole output. Returns the merged paths. To keep the
    /// adapter switchable, [`attach_to_model`](Self::attach_to_model) instead.
    ///
    /// # Errors
    /// As [`attach_to_model`](Self::attach_to_model). Nothing changes on error.
    pub fn merge_into_model(&self, model: &mut dyn LinearLayers) -> Result<Vec<String>> {
        let name = (0..)
            .map(|i| format!("__merged_ia3_{i}"))
            .find(|n| !model.adapter_names().contains(n))
            .unwrap_or_default();
        let merged = self.attach_to_model(model, &name)?;
        for (_, layer) in model.linear_layers_mut() {
            if layer.ia3_names().contains(&name) {
                layer.merge_ia3(&name)?;
                layer.unload_ia3(&name)?;
            }
        }
        Ok(merged)
    }

    /// The IA3 adapter `name` of every layer of `model` that holds it, as a PEFT IA3 whose
    /// [`save`](Self::save) writes a folder PEFT loads onto the same Hugging Face model with
    /// the same outputs (trained vectors included).
    ///
    /// # Errors
    /// [`Error::UnknownAdapter`] when no layer holds `name` as an IA3 adapter.
    pub fn from_model(model: &dyn LinearLayers, name: &str) -> Result<Self> {
        let layers = model.linear_layers();
        let mut held = Vec::new();
        for (path, layer) in &layers {
            if layer.ia3_names().iter().any(|n| n == name) {
                held.push((path.as_str(), layer.ia3(name)?));
            }
        }
        if held.is_empty() {
            let mut known: Vec<String> = Vec::new();
            for (_, layer) in &layers {
                for n in layer.ia3_names() {
                    if !known.contains(n) {
                        known.push(n.clone());
                    }
                }
            }
            return Err(Error::UnknownAdapter {
                name: name.to_string(),
                scope: Scope::Model,
                known,
            });
        }
        Ok(Self::from_vectors(
            held.into_iter()
                .map(|(p, v)| (p, v.scale.val(), v.feedforward)),
        ))
    }

    /// Builds a PEFT IA3 adapter from layers by module path.
    pub fn from_layers<'a>(layers: impl IntoIterator<Item = (&'a str, &'a Ia3Linear)>) -> Self {
        Self::from_vectors(
            layers
                .into_iter()
                .map(|(p, l)| (p, l.scale.val(), l.feedforward)),
        )
    }

    /// Builds a PEFT IA3 adapter from `(module path, l, input-side)` triples.
    fn from_vectors<'a>(vectors: impl IntoIterator<Item = (&'a str, Tensor<1>, bool)>) -> Self {
        let mut modules = BTreeMap::new();
        let mut ff = Vec::new();
        for (path, l, is_ff) in vectors {
            if is_ff {
                ff.push(path.to_string());
            }
            modules.insert(path.to_string(), (l, is_ff));
        }
        let text = json!({"peft_type": "IA3", "feedforward_modules": ff}).to_string();
        let config = PeftConfig::from_json(&text, "<new>").unwrap_or_else(|_| unreachable!());
        Self { config, modules }
    }

    /// Writes the adapter as a PEFT IA3 folder.
    ///
    /// # Errors
    /// [`Error::Io`].
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let mut tensors = BTreeMap::new();
        let mut ff = Vec::new();
        for (path, (v, is_ff)) in &self.modules {
            let mut h = HostTensor::from_tensor(v.clone());
            let n = h.data.len();
            h.shape = if *is_ff { vec![1, n] } else { vec![n, 1] };
            if *is_ff {
                ff.push(path.clone());
            }
            tensors.insert(format!("{KEY_PREFIX}{path}.ia3_l"), h);
        }
        let mut doc = Map::new();
        for (k, v) in [
            ("auto_mapping", Value::Null),
            ("base_model_name_or_path", Value::Null),
            ("exclude_modules", Value::Null),
            ("fan_in_fan_out", json!(false)),
            ("inference_mode", json!(true)),
            ("init_ia3_weights", json!(true)),
            ("modules_to_save", Value::Null),
            ("revision", Value::Null),
            ("task_type", Value::Null),
        ] {
            doc.insert(k.into(), v);
        }
        for (k, v) in &self.config.raw {
            doc.insert(k.clone(), v.clone());
        }
        let targets: Vec<&String> = self.modules.keys().collect();
        doc.insert("peft_type".into(), json!("IA3"));
        doc.insert("peft_version".into(), json!(PEFT_VERSION));
        doc.insert("target_modules".into(), json!(targets));
        doc.insert("feedforward_modules".into(), json!(ff));
        write_folder(dir.as_ref(), doc, &tensors)
    }
}
