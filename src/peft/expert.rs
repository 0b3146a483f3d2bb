//! Conversions between PEFT LoRA folders and the library's host factors.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::Device;

use super::lora::{LoraEntry, PeftLora, read_lora_folder, write_lora_folder};
use crate::error::{Error, Result};
use crate::io::HostTensor;
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
        let (r0, alpha0) = self.default_rank_alpha()?;
        let mut peft = PeftLora::new(r0, alpha0, false);
        for (path, f) in &self.layers {
            peft.insert(path, f.to_adapter(device)?);
        }
        Ok(peft)
    }

    /// Writes the expert as a PEFT LoRA folder straight from its host factors (no device):
    /// the same folder `self.to_peft(device)?.save(dir)` writes.
    ///
    /// # Errors
    /// [`Error::Invalid`] for an expert with no layers; [`Error::Io`] on write failures (the
    /// folder's files are written atomically).
    pub fn save_peft(&self, dir: impl AsRef<Path>) -> Result<()> {
        let (r0, alpha0) = self.default_rank_alpha()?;
        let config = PeftLora::new(r0, alpha0, false).config;
        let entries = self
            .layers
            .iter()
            .map(|(path, f)| LoraEntry {
                path,
                rank: f.rank(),
                alpha: f.scaling * f.rank() as f64,
                embedding: false,
                a: HostTensor {
                    shape: vec![f.a.rows, f.a.cols],
                    data: f.a.to_f32(),
                },
                b: HostTensor {
                    shape: vec![f.b.rows, f.b.cols],
                    data: f.b.to_f32(),
                },
            })
            .collect();
        write_lora_folder(dir.as_ref(), &config, false, entries)
    }

    /// The config defaults of the PEFT form: the most common rank (the smaller on ties) and
    /// an alpha that gives a layer of that rank its scaling.
    fn default_rank_alpha(&self) -> Result<(usize, f64)> {
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
        Ok((r0, s0 * r0 as f64))
    }
}
