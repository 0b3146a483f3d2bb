//! Hugging Face PEFT adapter folders, in and out.
//!
//! A PEFT folder holds `adapter_config.json` and `adapter_model.safetensors`. Tensor keys are
//! `base_model.model.<module path>.<part>` with PyTorch layouts:
//!
//! | method | key | shape | modula |
//! |---|---|---|---|
//! | LoRA | `<path>.lora_A.weight` | `[r, in]` | [`LoraModule::a`](crate::LoraModule::a) = transpose, `[in, r]` |
//! | LoRA | `<path>.lora_B.weight` | `[out, r]` | [`LoraModule::b`](crate::LoraModule::b) = transpose, `[r, out]` |
//! | LoRA (embedding) | `<path>.lora_embedding_A` | `[r, n]` | [`LoraModule::a`](crate::LoraModule::a) = transpose, `[n, r]` |
//! | LoRA (embedding) | `<path>.lora_embedding_B` | `[d, r]` | [`LoraModule::b`](crate::LoraModule::b) = transpose, `[r, d]` |
//! | IA3 | `<path>.ia3_l` | `[out, 1]`, or `[1, in]` for `feedforward_modules` | [`Ia3Linear::scale`](crate::Ia3Linear::scale), `[n]` |
//!
//! The scaling of each LoRA module is `alpha/r` (or `alpha/sqrt(r)` with `use_rslora`), where
//! `r` and `alpha` come from `rank_pattern` / `alpha_pattern` when a pattern matches the module
//! path (PEFT's rule: the pattern matches the whole path or a `.`-separated suffix, as a regular
//! expression), and from `r` / `lora_alpha` otherwise. `fan_in_fan_out` only concerns the
//! *host* weight's layout (GPT-2's `Conv1D`); the factors are stored the same way either way.
//!
//! Settings that would change the model in ways modula does not implement (DoRA, LoRA bias
//! terms, `bias != "none"`, `modules_to_save`, aLoRA, QA-LoRA, layer replication, trainable
//! tokens, target parameters) are rejected with [`Error::Peft`] rather than silently ignored.

//!
//! # Files
//! `config.rs` (`adapter_config.json`, read with serde), `keys.rs` (tensor keys), `folder.rs`
//! (reading and writing a folder), `lora.rs` ([`PeftLora`]), `ia3.rs` ([`PeftIa3`]),
//! `expert.rs` (`LoraExpert::{load_peft, from_peft, to_peft}`), and this file
//! ([`PeftAdapter`]).

mod config;
mod expert;
mod folder;
mod ia3;
mod keys;
mod lora;
mod lycoris;
mod prompt;
pub mod targets;

pub use config::{PeftConfig, PeftType};
pub use ia3::PeftIa3;
pub use lora::PeftLora;
pub use lycoris::PeftLycoris;
pub use prompt::PeftPrompt;
pub use targets::{TargetDecision, TargetRules};

use std::path::Path;

use burn::tensor::Device;

use crate::error::{Error, Result};

/// File name of a PEFT adapter config.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// File name of a PEFT adapter's weights.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The PEFT version whose format modula writes.
const PEFT_VERSION: &str = "0.21.2";

/// [`Error::Peft`] unless `config` is of type `want`, naming the loader for what it is.
pub(super) fn expect_type(config: &PeftConfig, want: PeftType, dir: &Path) -> Result<()> {
    if config.peft_type == want {
        return Ok(());
    }
    let loader = match config.peft_type {
        PeftType::Lora => "PeftLora::load",
        PeftType::Ia3 => "PeftIa3::load",
        PeftType::Loha | PeftType::Lokr => "PeftLycoris::load",
        PeftType::PromptTuning => "PeftPrompt::load",
    };
    Err(Error::peft(
        dir,
        format!(
            "this is a {} adapter, not {}; load it with {loader} (or PeftAdapter::load, which takes any kind)",
            config.peft_type.name(),
            want.name()
        ),
    ))
}

/// Any kind of adapter, as found in a folder.
#[derive(Debug)]
pub enum PeftAdapter {
    /// A LoRA adapter.
    Lora(PeftLora),
    /// An IA3 adapter.
    Ia3(PeftIa3),
    /// A LoHa or LoKr adapter.
    Lycoris(PeftLycoris),
    /// A prompt-tuning adapter (soft tokens, not layer weights).
    Prompt(PeftPrompt),
}

impl PeftAdapter {
    /// Loads whatever adapter `dir` holds.
    ///
    /// # Errors
    /// As [`PeftLora::load`] / [`PeftIa3::load`] / [`PeftLycoris::load`].
    pub fn load(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        let cfg_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        match PeftConfig::from_json(&text, &cfg_path)?.peft_type {
            PeftType::Lora => PeftLora::load(dir, device).map(Self::Lora),
            PeftType::Ia3 => PeftIa3::load(dir, device).map(Self::Ia3),
            PeftType::Loha | PeftType::Lokr => PeftLycoris::load(dir, device).map(Self::Lycoris),
            PeftType::PromptTuning => PeftPrompt::load(dir, device).map(Self::Prompt),
        }
    }

    /// Attaches the adapter to `model` as `name` by PEFT's target rules (PEFT's
    /// `load_adapter`): [`PeftLora::attach_to_model`], [`PeftIa3::attach_to_model`] or
    /// [`PeftLycoris::attach_to_model`].
    /// Returns the adapted paths.
    ///
    /// # Errors
    /// As those; [`Error::Peft`] for a prompt-tuning adapter. Nothing changes on error.
    pub fn attach_to_model(
        &self,
        model: &mut dyn crate::models::LinearLayers,
        name: &str,
    ) -> Result<Vec<String>> {
        match self {
            Self::Lora(a) => a.attach_to_model(model, name),
            Self::Ia3(a) => a.attach_to_model(model, name),
            Self::Lycoris(a) => a.attach_to_model(model, name),
            Self::Prompt(p) => Err(Error::peft(
                p.source.as_deref().unwrap_or(Path::new("<PEFT prompt>")),
                format!(
                    "`{name}` is a prompt-tuning adapter: it adds soft tokens before the input, not weights to layers; pass its prompt to forward_prompted"
                ),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::config::pattern_matches;
    use super::keys::split_key;
    use super::*;

    #[test]
    fn patterns_match_whole_paths_or_dotted_suffixes() {
        assert!(pattern_matches("fc1", "fc1"));
        assert!(pattern_matches("q_proj", "model.layers.0.self_attn.q_proj"));
        assert!(!pattern_matches("proj", "model.layers.0.self_attn.q_proj"));
        assert!(pattern_matches(r"layers\.[01]\.mlp", "model.layers.1.mlp"));
        assert!(!pattern_matches(r"layers\.[01]\.mlp", "model.layers.2.mlp"));
        assert!(!pattern_matches("(unclosed", "x.(unclosed2"));
    }

    #[test]
    fn keys_split_into_module_path_and_part() {
        let parts = ["lora_A.weight", "lora_B.weight"];
        assert_eq!(
            split_key("base_model.model.enc.fc1.lora_A.weight", &parts),
            Some(("enc.fc1", "lora_A.weight"))
        );
        assert_eq!(split_key("base_model.model.fc1.bias", &parts), None);
    }

    #[test]
    fn rank_and_alpha_patterns_override_defaults() {
        let text = r#"{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "use_rslora": true,
            "rank_pattern": {"v_proj": 4}, "alpha_pattern": {"v_proj": 2}}"#;
        let c = PeftConfig::from_json(text, "cfg").unwrap();
        assert_eq!((c.rank_for("a.q_proj"), c.alpha_for("a.q_proj")), (8, 16.0));
        assert_eq!((c.rank_for("a.v_proj"), c.alpha_for("a.v_proj")), (4, 2.0));
        assert_eq!(c.scaling_for("a.v_proj"), 1.0); // rsLoRA: 2 / sqrt(4)
    }

    /// PEFT 0.21's `get_pattern_key` takes the first matching pattern in the file's order:
    /// `get_pattern_key(['layers\\.1\\..*|q_proj', 'v_proj'], 'model.layers.1.self_attn.v_proj')`
    /// is the first key, and with the keys swapped the other.
    #[test]
    fn the_first_matching_pattern_in_file_order_decides() {
        let path = "model.layers.1.self_attn.v_proj";
        for (text, want) in [
            (
                r#"{"rank_pattern": {"layers\\.1\\..*|q_proj": 4, "v_proj": 2}}"#,
                4,
            ),
            (
                r#"{"rank_pattern": {"v_proj": 2, "layers\\.1\\..*|q_proj": 4}}"#,
                2,
            ),
        ] {
            let text = format!(
                r#"{{"peft_type": "LORA", "r": 8, "lora_alpha": 16, {}"#,
                &text[1..]
            );
            let c = PeftConfig::from_json(&text, "cfg").unwrap();
            assert_eq!(c.rank_for(path), want, "{text}");
        }
    }
}
