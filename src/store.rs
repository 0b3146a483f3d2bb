//! A library of LoRA experts on disk: one folder, a JSON index, and one PEFT adapter folder per
//! expert, so any expert can be loaded by PEFT (or copied out) as it is.
//!
//! ```text
//! my-library/
//!   library.json                 index: format, version, one entry per expert
//!   experts/<name>/adapter_config.json
//!   experts/<name>/adapter_model.safetensors
//!   library.lock                 the writers' lock
//! ```
//!
//! Every write is atomic: an expert's folder is written under a temporary name and renamed
//! into place, and the index is replaced by rename, so an interrupted write never leaves a
//! half-written expert or index behind. The index is the library: an expert is added when the
//! index names it (its folder is written first) and removed when the index drops it (its
//! folder is deleted after), so a writer killed between the two leaves a folder no one lists,
//! which the next writer removes. All experts of a library adapt the same layers with
//! the same shapes (one base model); [`ExpertLibrary::add`] checks it. Writers in several
//! processes ([`ExpertLibrary::add`], [`ExpertLibrary::remove`]) take turns under an exclusive
//! lock on `library.lock` and apply their change to the index as it is on disk, so none of
//! their changes is lost.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, Scope};
use crate::io::{atomic_write, remove_entry};
use crate::library::factors::LoraExpert;
use crate::peft::PeftLora;

const INDEX: &str = "library.json";
/// The writers' lock file.
const LOCK: &str = "library.lock";
const FORMAT: &str = "modula-expert-library";

/// What the caller says about an expert when adding it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ExpertInfo {
    /// The task or domain it was trained on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// Free-form training notes (data, steps, learning rate, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notes: Option<String>,
    /// Any other metadata.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// One index entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExpertMeta {
    /// Unique name (also its folder name).
    pub name: String,
    /// Default rank `r` of its config.
    pub rank: usize,
    /// Default `lora_alpha`.
    pub alpha: f64,
    /// rsLoRA scaling (`alpha/√r`) rather than `alpha/r`.
    pub use_rslora: bool,
    /// The module paths it adapts, with `[d_out, d_in]`.
    pub layers: BTreeMap<String, [usize; 2]>,
    /// The caller's metadata.
    #[serde(flatten)]
    pub info: ExpertInfo,
}

#[derive(Debug, Serialize, Deserialize)]
struct Index {
    format: String,
    version: u32,
    experts: Vec<ExpertMeta>,
}

/// An expert library folder (see the [module docs](self)).
#[derive(Debug)]
pub struct ExpertLibrary {
    dir: PathBuf,
    experts: Vec<ExpertMeta>,
}

impl ExpertLibrary {
    /// Opens the library in `dir`, creating an empty one if `dir` has no index.
    ///
    /// # Errors
    /// [`Error::Io`] if the folder cannot be created; as [`open`](Self::open) for an existing
    /// index.
    pub fn open_or_create(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        if dir.join(INDEX).exists() {
            return Self::open(dir);
        }
        std::fs::create_dir_all(dir.join("experts")).map_err(|e| Error::io(dir, e))?;
        let lib = Self {
            dir: dir.to_path_buf(),
            experts: Vec::new(),
        };
        lib.write_index()?;
        Ok(lib)
    }

    /// Opens an existing library.
    ///
    /// # Errors
    /// [`Error::Io`] for a missing index, [`Error::Json`] for a malformed one,
    /// [`Error::Invalid`] for another format or version.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let path = dir.join(INDEX);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let index: Index = serde_json::from_str(&text).map_err(|e| Error::Json {
            path: path.clone(),
            source: e,
        })?;
        if index.format != FORMAT || index.version != 1 {
            return Err(Error::invalid(
                "expert library index",
                format!(
                    "{} says format `{}` version {}; this modula reads `{FORMAT}` version 1",
                    path.display(),
                    index.format,
                    index.version
                ),
            ));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            experts: index.experts,
        })
    }

    /// The library folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The index entries, in insertion order.
    pub fn list(&self) -> &[ExpertMeta] {
        &self.experts
    }

    /// The expert names, in insertion order.
    pub fn names(&self) -> Vec<&str> {
        self.experts.iter().map(|e| e.name.as_str()).collect()
    }

    /// Number of experts.
    pub fn len(&self) -> usize {
        self.experts.len()
    }

    /// Whether the library is empty.
    pub fn is_empty(&self) -> bool {
        self.experts.is_empty()
    }

    /// The index entry of `name`.
    ///
    /// # Errors
    /// [`Error::UnknownAdapter`] naming the experts the library has.
    pub fn meta(&self, name: &str) -> Result<&ExpertMeta> {
        self.experts
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| self.unknown(name))
    }

    /// The PEFT folder of expert `name`, confined to the library: the name is a plain folder
    /// name (an index edited by hand could say otherwise), and neither the folder nor its files
    /// may be symbolic links (which could point anywhere).
    ///
    /// # Errors
    /// As [`meta`](Self::meta); [`Error::Invalid`] for a name or link that would leave the
    /// library folder.
    pub fn expert_dir(&self, name: &str) -> Result<PathBuf> {
        self.meta(name)?;
        check_name(name)?;
        let dir = self.dir.join("experts").join(name);
        let linked =
            |p: &Path| std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink());
        let escapes = std::iter::once(dir.clone())
            .chain(
                ["adapter_config.json", "adapter_model.safetensors"]
                    .iter()
                    .map(|f| dir.join(f)),
            )
            .find(|p| linked(p));
        if let Some(p) = escapes {
            return Err(Error::invalid(
                format!("expert `{name}`"),
                format!(
                    "{} is a symbolic link; an expert's folder and files must be inside the library",
                    p.display()
                ),
            ));
        }
        Ok(dir)
    }

    /// Adds an expert.
    ///
    /// # Errors
    /// [`Error::DuplicateAdapter`] for a taken name, [`Error::Invalid`] for a name that is not
    /// a plain folder name or an expert that adapts other layers or shapes than the library's,
    /// [`Error::Io`] on write failures (the library is then unchanged).
    pub fn add(&mut self, name: &str, adapter: &PeftLora, info: ExpertInfo) -> Result<()> {
        check_name(name)?;
        self.locked(|lib| lib.add_unlocked(name, adapter, info))
    }

    /// Runs `f` holding the library's writer lock (`library.lock`, an exclusive `flock` through
    /// the standard library), on the index as it is on disk now, so that writers in other
    /// processes lose nothing: each one's change lands on top of the others'.
    ///
    /// # Errors
    /// [`Error::Io`] for a lock file that cannot be opened; [`Error::Invalid`] ("locked") when
    /// another writer holds the lock for 60 s (retry later); `f`'s and
    /// [`open`](Self::open)'s errors.
    fn locked<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let path = self.dir.join(LOCK);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let start = std::time::Instant::now();
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) if start.elapsed().as_secs() < 60 => {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(Error::invalid(
                        format!("expert library {}", self.dir.display()),
                        "locked by another writer for 60 s; retry when it has finished",
                    ));
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
            }
        }
        // Another process may have written since this handle read the index.
        self.experts = Self::open(&self.dir)?.experts;
        let out = self.sweep().and_then(|()| f(self));
        let _ = file.unlock();
        out
    }

    fn add_unlocked(&mut self, name: &str, adapter: &PeftLora, info: ExpertInfo) -> Result<()> {
        if self.experts.iter().any(|e| e.name == name) {
            return Err(Error::DuplicateAdapter {
                name: name.into(),
                scope: Scope::Library(self.dir.clone()),
            });
        }
        let layers: BTreeMap<String, [usize; 2]> = adapter
            .modules
            .iter()
            .map(|(p, a)| (p.clone(), [a.d_out(), a.d_in()]))
            .collect();
        if let Some(first) = self.experts.first()
            && first.layers != layers
        {
            return Err(Error::invalid(
                "library expert",
                format!(
                    "`{name}` adapts {layers:?} but the library's experts adapt {:?}; a library holds experts of one base model and target modules",
                    first.layers
                ),
            ));
        }
        // A stale folder of this name (an interrupted add) was swept under the lock. The save
        // creates `experts/` if needed, writes a temporary sibling and renames it into place
        // (write_dir_atomically).
        adapter.save(self.dir.join("experts").join(name))?;
        self.experts.push(ExpertMeta {
            name: name.into(),
            rank: adapter.config.r,
            alpha: adapter.config.lora_alpha,
            use_rslora: adapter.config.use_rslora,
            layers,
            info,
        });
        if let Err(e) = self.write_index() {
            self.experts.pop();
            return Err(e);
        }
        Ok(())
    }

    /// Imports a PEFT LoRA folder as expert `name`.
    ///
    /// # Errors
    /// As [`PeftLora::load`] and [`add`](Self::add).
    pub fn import_peft(
        &mut self,
        name: &str,
        peft_dir: impl AsRef<Path>,
        info: ExpertInfo,
        device: &Device,
    ) -> Result<()> {
        let peft = PeftLora::load(peft_dir, device)?;
        self.add(name, &peft, info)
    }

    /// Writes expert `name` as a PEFT folder at `out` (atomically per file).
    ///
    /// # Errors
    /// Unknown name; [`Error::Io`].
    pub fn export_peft(&self, name: &str, out: impl AsRef<Path>) -> Result<()> {
        let src = self.expert_dir(name)?;
        let out = out.as_ref();
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        for file in ["adapter_config.json", "adapter_model.safetensors"] {
            let bytes = std::fs::read(src.join(file)).map_err(|e| Error::io(src.join(file), e))?;
            atomic_write(&out.join(file), &bytes)?;
        }
        Ok(())
    }

    /// Loads expert `name` onto `device`.
    ///
    /// # Errors
    /// Unknown name; as [`PeftLora::load`].
    pub fn get(&self, name: &str, device: &Device) -> Result<PeftLora> {
        PeftLora::load(self.expert_dir(name)?, device)
    }

    /// Attaches experts `names` (every expert when empty) to `model` under their library
    /// names, each by its folder's target rules, as
    /// [`PeftLora::attach_to_model`](crate::PeftLora::attach_to_model): ready for
    /// [`route_arrow`](crate::models::route_arrow) or a mixed batch. Returns the names.
    ///
    /// # Errors
    /// Unknown name; as [`get`](Self::get) and `attach_to_model` (naming the expert's
    /// folder). Experts attached before an error stay attached.
    pub fn attach_to_model(
        &self,
        model: &mut dyn crate::models::LinearLayers,
        names: &[&str],
        device: &Device,
    ) -> Result<Vec<String>> {
        let chosen: Vec<String> = if names.is_empty() {
            self.names().iter().map(|n| n.to_string()).collect()
        } else {
            names.iter().map(|n| n.to_string()).collect()
        };
        for name in &chosen {
            self.get(name, device)?.attach_to_model(model, name)?;
        }
        Ok(chosen)
    }

    /// Expert `name`'s factors on the host (for merging, Arrow, clustering).
    ///
    /// # Errors
    /// As [`get`](Self::get).
    pub fn factors(&self, name: &str) -> Result<LoraExpert> {
        LoraExpert::load_peft(self.expert_dir(name)?)
    }

    /// Removes expert `name` (the index first, then its folder).
    ///
    /// # Errors
    /// Unknown name; [`Error::Io`].
    pub fn remove(&mut self, name: &str) -> Result<()> {
        self.locked(|lib| lib.remove_unlocked(name))
    }

    fn remove_unlocked(&mut self, name: &str) -> Result<()> {
        let pos = self
            .experts
            .iter()
            .position(|e| e.name == name)
            .ok_or_else(|| self.unknown(name))?;
        let meta = self.experts.remove(pos);
        if let Err(e) = self.write_index() {
            self.experts.insert(pos, meta);
            return Err(e);
        }
        let dir = self.dir.join("experts").join(name);
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))
    }

    /// Removes what killed writers left in `experts/`: every entry the index does not list (an
    /// add killed after its folder landed but before the index named it, a remove killed
    /// between the index and the folder, a save's temporary folder). Runs under the writer
    /// lock, when no other writer is half-way; a symbolic link is removed, never followed.
    fn sweep(&self) -> Result<()> {
        let experts = self.dir.join("experts");
        let Ok(entries) = std::fs::read_dir(&experts) else {
            return Ok(());
        };
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&experts, e))?;
            let name = entry.file_name();
            if self.experts.iter().any(|e| *name == *e.name) {
                continue;
            }
            let path = entry.path();
            remove_entry(&path).map_err(|e| Error::io(&path, e))?;
        }
        Ok(())
    }

    fn write_index(&self) -> Result<()> {
        let index = Index {
            format: FORMAT.into(),
            version: 1,
            experts: self.experts.clone(),
        };
        let path = self.dir.join(INDEX);
        let text = serde_json::to_string_pretty(&index).map_err(|e| Error::Json {
            path: path.clone(),
            source: e,
        })?;
        atomic_write(&path, text.as_bytes())
    }

    fn unknown(&self, name: &str) -> Error {
        Error::UnknownAdapter {
            name: name.into(),
            scope: Scope::Library(self.dir.clone()),
            known: self.names().iter().map(|n| n.to_string()).collect(),
        }
    }
}

fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "expert name",
            format!(
                "`{name}` must be non-empty, not start with '.', and use only A-Z a-z 0-9 - _ ."
            ),
        ))
    }
}
