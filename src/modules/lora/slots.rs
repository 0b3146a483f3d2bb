//! The adapter slots of a host layer (names, activity, merge state) and the adapter-management
//! API [`LoraLinear`](super::LoraLinear) and [`LoraEmbedding`](super::LoraEmbedding) share.

use burn::module::Param;
use burn::tensor::Tensor;

use super::LoraModule;
use crate::error::{Error, Result, Scope};

/// Names, activity and merge state of the adapters on one host layer (shared by
/// [`LoraLinear`](super::LoraLinear) and [`LoraEmbedding`](super::LoraEmbedding)). Index `i` describes the layer's `adapters[i]`.
#[derive(Clone, Debug, Default)]
pub struct AdapterSlots {
    pub(super) names: Vec<String>,
    pub(super) active: Vec<bool>,
    pub(super) merged: Vec<bool>,
}

impl AdapterSlots {
    pub(super) fn push(&mut self, name: &str) -> Result<()> {
        if self.names.iter().any(|n| n == name) {
            return Err(Error::DuplicateAdapter {
                name: name.to_string(),
                scope: Scope::Layer,
            });
        }
        self.names.push(name.to_string());
        self.active.push(true);
        self.merged.push(false);
        Ok(())
    }

    pub(super) fn remove(&mut self, i: usize) {
        self.names.remove(i);
        self.active.remove(i);
        self.merged.remove(i);
    }

    /// The adapter names, in insertion order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Position of adapter `name`.
    ///
    /// # Errors
    /// [`Error::UnknownAdapter`] listing the known names.
    pub fn index(&self, name: &str) -> Result<usize> {
        self.names
            .iter()
            .position(|n| n == name)
            .ok_or_else(|| Error::UnknownAdapter {
                name: name.to_string(),
                scope: Scope::Layer,
                known: self.names.clone(),
            })
    }

    /// Names of the active adapters.
    pub fn active(&self) -> Vec<&str> {
        self.names
            .iter()
            .zip(&self.active)
            .filter(|(_, a)| **a)
            .map(|(n, _)| n.as_str())
            .collect()
    }

    pub(super) fn set_active(&mut self, names: &[&str]) -> Result<()> {
        let idx = names
            .iter()
            .map(|n| self.index(n))
            .collect::<Result<Vec<_>>>()?;
        self.active.iter_mut().for_each(|a| *a = false);
        for i in idx {
            self.active[i] = true;
        }
        Ok(())
    }

    /// Whether adapter `i` contributes through its own path (active and not merged).
    pub(super) fn contributes(&self, i: usize) -> bool {
        self.active[i] && !self.merged[i]
    }

    /// Index of `name`, checking it is (`want_merged`) or is not merged.
    pub(super) fn index_for_merge(&self, name: &str, want_merged: bool) -> Result<usize> {
        let i = self.index(name)?;
        match (self.merged[i], want_merged) {
            (true, false) => Err(Error::AlreadyMerged {
                name: name.to_string(),
                operation: "merging it again",
            }),
            (false, true) => Err(Error::NotMerged {
                name: name.to_string(),
            }),
            _ => Ok(i),
        }
    }

    pub(super) fn active_unmerged(&self) -> Vec<String> {
        (0..self.names.len())
            .filter(|&i| self.contributes(i))
            .map(|i| self.names[i].clone())
            .collect()
    }

    pub(super) fn all_merged(&self) -> Vec<String> {
        (0..self.names.len())
            .filter(|&i| self.merged[i])
            .map(|i| self.names[i].clone())
            .collect()
    }
}

/// Adds (`sign = 1`) or subtracts (`sign = -1`) `s·A B` to a frozen weight `[d_in, d_out]`.
pub(super) fn fold_delta(
    weight: Param<Tensor<2>>,
    adapter: &LoraModule,
    sign: f64,
) -> Param<Tensor<2>> {
    let delta = adapter.delta_weight().detach().mul_scalar(sign);
    weight.map(|w| (w + delta).detach())
}

/// The adapter-management API shared by [`LoraLinear`] and [`LoraEmbedding`].
macro_rules! adapter_host_api {
    ($ty:ty) => {
        impl $ty {
            /// Inserts an existing adapter (e.g. loaded from a PEFT folder) under `name`,
            /// active.
            ///
            /// # Errors
            /// [`Error::DuplicateAdapter`] if the name exists; [`Error::Shape`] if its widths
            /// differ from the host layer's; [`Error::Invalid`] if the layer holds IA3
            /// adapters.
            pub fn insert_adapter(&mut self, name: &str, adapter: LoraModule) -> Result<()> {
                self.accepts_lora(name)?;
                self.check_fits(name, &adapter)?;
                self.slots.push(name)?;
                self.adapters.push(adapter);
                Ok(())
            }

            /// Replaces the factors of adapter `name` (same name, place, activity), returning
            /// the old ones; its rank may change.
            ///
            /// # Errors
            /// [`Error::UnknownAdapter`]; [`Error::AlreadyMerged`] for a merged adapter
            /// (unmerge it first); [`Error::Shape`] if the new widths differ from the host
            /// layer's.
            pub fn replace_adapter(
                &mut self,
                name: &str,
                adapter: LoraModule,
            ) -> Result<LoraModule> {
                let i = self.slots.index(name)?;
                if self.slots.merged[i] {
                    return Err(Error::AlreadyMerged {
                        name: name.to_string(),
                        operation: "replacing its factors",
                    });
                }
                self.check_fits(name, &adapter)?;
                Ok(std::mem::replace(&mut self.adapters[i], adapter))
            }

            /// [`Error::Shape`] unless `adapter`'s widths are the host layer's.
            fn check_fits(&self, name: &str, adapter: &LoraModule) -> Result<()> {
                let (d_in, d_out) = self.host_dims();
                if adapter.d_in() != d_in || adapter.d_out() != d_out {
                    return Err(Error::shape(
                        format!("adapter `{name}` on a LoRA layer"),
                        format!("[{d_in} -> {d_out}]"),
                        format!("[{} -> {}]", adapter.d_in(), adapter.d_out()),
                    ));
                }
                Ok(())
            }

            /// Removes adapter `name` and returns it. A merged adapter is unmerged first.
            ///
            /// # Errors
            /// [`Error::UnknownAdapter`].
            pub fn remove_adapter(&mut self, name: &str) -> Result<LoraModule> {
                let i = self.slots.index(name)?;
                if self.slots.merged[i] {
                    self.unmerge(name)?;
                }
                self.slots.remove(i);
                Ok(self.adapters.remove(i))
            }

            /// The adapter names, in insertion order.
            pub fn names(&self) -> &[String] {
                self.slots.names()
            }

            /// The adapter called `name`.
            ///
            /// # Errors
            /// [`Error::UnknownAdapter`].
            pub fn adapter(&self, name: &str) -> Result<&LoraModule> {
                Ok(&self.adapters[self.slots.index(name)?])
            }

            /// Names of the active adapters.
            pub fn active_adapters(&self) -> Vec<&str> {
                self.slots.active()
            }

            /// Makes exactly the adapters in `names` active (an empty slice disables all).
            ///
            /// # Errors
            /// [`Error::UnknownAdapter`] for a name not on the layer; nothing changes then.
            pub fn set_active(&mut self, names: &[&str]) -> Result<()> {
                self.slots.set_active(names)
            }

            /// Whether adapter `name` is currently merged into the base weight.
            ///
            /// # Errors
            /// [`Error::UnknownAdapter`].
            pub fn is_merged(&self, name: &str) -> Result<bool> {
                Ok(self.slots.merged[self.slots.index(name)?])
            }

            /// Merges adapter `name` into the base weight: `W ← W + s·A B`. It then stops
            /// contributing separately, so outputs are unchanged (up to rounding).
            ///
            /// # Errors
            /// [`Error::UnknownAdapter`]; [`Error::AlreadyMerged`] if it is already merged.
            pub fn merge(&mut self, name: &str) -> Result<()> {
                let i = self.slots.index_for_merge(name, false)?;
                self.base.weight = fold_delta(self.base.weight.clone(), &self.adapters[i], 1.0);
                self.slots.merged[i] = true;
                Ok(())
            }

            /// Undoes [`merge`](Self::merge): `W ← W − s·A B`.
            ///
            /// # Errors
            /// [`Error::UnknownAdapter`]; [`Error::NotMerged`] if it is not merged.
            pub fn unmerge(&mut self, name: &str) -> Result<()> {
                let i = self.slots.index_for_merge(name, true)?;
                self.base.weight = fold_delta(self.base.weight.clone(), &self.adapters[i], -1.0);
                self.slots.merged[i] = false;
                Ok(())
            }

            /// Merges every active adapter that is not merged yet.
            ///
            /// # Errors
            /// None in practice (the names come from the layer).
            pub fn merge_active(&mut self) -> Result<()> {
                for n in self.slots.active_unmerged() {
                    self.merge(&n)?;
                }
                Ok(())
            }

            /// Unmerges every merged adapter.
            ///
            /// # Errors
            /// None in practice (the names come from the layer).
            pub fn unmerge_all(&mut self) -> Result<()> {
                for n in self.slots.all_merged() {
                    self.unmerge(&n)?;
                }
                Ok(())
            }
        }
    };
}

pub(crate) use adapter_host_api;
