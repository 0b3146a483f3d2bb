//! Conversions between PEFT LoRA folders and the library's host factors.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::Device;

use super::lora::{PeftLora, read_lora_folder};
use crate::error::{Error, Result};
use crate::library::factors::{LoraExpert, LoraFactors};
use crate::linalg::Mat;

/// Conversions between a PEFT LoRA and the library's host factors. They live here, in the
/// file-format layer, so the library's math never knows the PEFT format.
impl LoraExpert {
    /// Reads a PEFT LoRA folder straight into host factors, without a device: what the
    /// offline operations (merging, Arrow prototypes, MBC) start from.
    ///
    /// # Errors
    /// As [`PeftLora::load`], and [`Error::Invalid`] if the adapter adapts an embedding table
    /// (library operations cover linear layers).
    pub fn load_peft(dir: impl AsRef<Path>) -> Result<Self> {
        let mut layers = BTreeMap::new();
        let (_, embeddings) = read_lora_folder(dir.as_ref(), |config, path, a, b| {
            let factors = LoraFactors::from_mats(
                Mat::from_f32(a.shape[0], a.shape[1], &a.data),
                Mat::from_f32(b.shape[0], b.shape[1], &b.data),
                config.scaling_for(path),
            )?;
            layers.insert(path.to_string(), factors);
            Ok(())
        })?;
        if let Some(e) = embeddings.iter().next() {
            return Err(Error::invalid(
                "library expert",
                format!(
                    "module `{e}` adapts an embedding table; library operations cover Linear layers only"
                ),
            ));
        }
        Ok(Self { layers })
    }

    /// Host copies of a PEFT LoRA's linear modules.
    ///
    /// # Errors
    /// [`Error::Invalid`] if the adapter adapts an embedding table (library operations cover
    /// linear layers).
    pub fn from_peft(peft: &PeftLora) -> Result<Self> {
        if let Some(e) = peft.embeddings.iter().next() {
            return Err(Error::invalid(
                "library expert",
                format!(
                    "module `{e}` adapts an embedding table; library operations cover Linear layers only"
                ),
            ));
        }
        Ok(Self {
            layers: peft
                .modules
                .iter()
                .map(|(p, a)| (p.clone(), LoraFactors::from_adapter(a)))
                .collect(),
        })
    }

    /// A PEFT LoRA with the same updates (per-module ranks go to `rank_pattern` when saved).
    /// The config's default rank is the most common one and `lora_alpha` is chosen per module
    /// so that `alpha/r` equals each layer's scaling.
    ///
    /// # Errors
    /// [`Error::Invalid`] for an expert with no layers.
    pub fn to_peft(&self, device: &Device) -> Result<PeftLora> {
        let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
        for f in self.layers.values() {
            *counts.entry(f.rank()).or_default() += 1;
        }
        let Some((&r0, _)) = counts
            .iter()
            .max_by_key(|(r, c)| (**c, std::cmp::Reverse(**r)))
        else {
            return Err(Error::invalid("library expert", "it has no layers"));
        };
        let s0 = self
            .layers
            .values()
            .find(|f| f.rank() == r0)
            .map_or(1.0, |f| f.scaling);
        let mut peft = PeftLora::new(r0, s0 * r0 as f64, false);
        for (path, f) in &self.layers {
            peft.insert(path, f.to_adapter(device)?);
        }
        Ok(peft)
    }
}
