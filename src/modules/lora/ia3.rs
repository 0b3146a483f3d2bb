//! (IA)³ adapters on [`LoraLinear`]: named vectors that rescale the host layer, managed like
//! its LoRA adapters (active set, merge and unmerge, per-sequence batches). A layer holds
//! either LoRA adapters or IA3 adapters, never both, as a PEFT model of one type does.
//!
//! With the active, unmerged vectors `l_1 … l_k` of the layer (PEFT multiplies them):
//!
//! ```text
//! input-side  (feedforward):  y = (x ⊙ Π l_ff) W + b
//! output-side:                y = (x W + b) ⊙ Π l_out
//! ```

use burn::module::Param;
use burn::tensor::Tensor;

use super::{AdapterSlots, LoraLinear};
use crate::error::{Error, Result};
use crate::modules::check_last_dim;
use crate::modules::ia3::{Ia3Vector, check_invertible, fold_ia3};

impl LoraLinear {
    /// Adds the IA3 vector `scale` under `name`, active: input-side (`[d_in]`, PEFT's
    /// `feedforward_modules`) when `feedforward`, output-side (`[d_out]`) otherwise. The
    /// vector is trainable; the base stays frozen.
    ///
    /// # Errors
    /// [`Error::Invalid`] if the layer holds LoRA adapters; [`Error::DuplicateAdapter`];
    /// [`Error::Shape`] for a vector of the wrong length.
    pub fn insert_ia3(&mut self, name: &str, scale: Tensor<1>, feedforward: bool) -> Result<()> {
        if !self.adapters.is_empty() {
            return Err(Error::invalid(
                format!("IA3 adapter `{name}`"),
                format!(
                    "the layer holds LoRA adapters ({}); a layer holds one kind of adapter, as a PEFT model does",
                    self.slots.names().join(", ")
                ),
            ));
        }
        let want = if feedforward {
            self.d_in()
        } else {
            self.d_out()
        };
        let got = scale.dims()[0];
        if got != want {
            return Err(Error::shape(
                format!(
                    "IA3 adapter `{name}`: {} vector",
                    if feedforward {
                        "input-side (d_in)"
                    } else {
                        "output-side (d_out)"
                    }
                ),
                want.to_string(),
                got.to_string(),
            ));
        }
        self.ia3_slots.push(name)?;
        let scale = scale.to_device(&self.base.weight.device());
        self.ia3.push(Ia3Vector {
            scale: Param::from_tensor(scale),
            feedforward,
        });
        Ok(())
    }

    /// Removes IA3 adapter `name` and returns it, unmerging it first where it is merged.
    ///
    /// # Errors
    /// [`Error::UnknownAdapter`]; [`Error::Invalid`] when a merged vector has a (near-)zero
    /// entry, so that the merge cannot be undone (nothing changes).
    pub fn remove_ia3(&mut self, name: &str) -> Result<Ia3Vector> {
        let i = self.ia3_slots.index(name)?;
        if self.ia3_slots.merged[i] {
            self.unmerge_ia3(name)?;
        }
        self.unload_ia3(name)
    }

    /// Removes IA3 adapter `name` and returns it, leaving the weight as it is: a merged
    /// adapter stays folded in (PEFT's `merge_and_unload` after a merge).
    ///
    /// # Errors
    /// [`Error::UnknownAdapter`].
    pub fn unload_ia3(&mut self, name: &str) -> Result<Ia3Vector> {
        let i = self.ia3_slots.index(name)?;
        self.ia3_slots.remove(i);
        Ok(self.ia3.remove(i))
    }

    /// The IA3 adapter names, in insertion order.
    pub fn ia3_names(&self) -> &[String] {
        self.ia3_slots.names()
    }

    /// The IA3 adapter called `name`.
    ///
    /// # Errors
    /// [`Error::UnknownAdapter`].
    pub fn ia3(&self, name: &str) -> Result<&Ia3Vector> {
        Ok(&self.ia3[self.ia3_slots.index(name)?])
    }

    /// Names of the active IA3 adapters.
    pub fn active_ia3(&self) -> Vec<&str> {
        self.ia3_slots.active()
    }

    /// Makes exactly the IA3 adapters in `names` active (an empty slice disables all).
    ///
    /// # Errors
    /// [`Error::UnknownAdapter`] for a name not on the layer; nothing changes then.
    pub fn set_active_ia3(&mut self, names: &[&str]) -> Result<()> {
        self.ia3_slots.set_active(names)
    }

    /// Whether IA3 adapter `name` is folded into the base weight.
    ///
    /// # Errors
    /// [`Error::UnknownAdapter`].
    pub fn is_ia3_merged(&self, name: &str) -> Result<bool> {
        Ok(self.ia3_slots.merged[self.ia3_slots.index(name)?])
    }

    /// Folds IA3 adapter `name` into the base: `W ← diag(l) W` input-side; `W ← W diag(l)`,
    /// `b ← l ⊙ b` output-side (PEFT's merge, exact).
    ///
    /// # Errors
    /// [`Error::UnknownAdapter`]; [`Error::AlreadyMerged`].
    pub fn merge_ia3(&mut self, name: &str) -> Result<()> {
        let i = self.ia3_slots.index_for_merge(name, false)?;
        let v = &self.ia3[i];
        fold_ia3(&mut self.base, v.scale.val(), v.feedforward, false);
        self.ia3_slots.merged[i] = true;
        Ok(())
    }

    /// Undoes [`merge_ia3`](Self::merge_ia3) by dividing by `l` (to f32 rounding).
    ///
    /// # Errors
    /// [`Error::UnknownAdapter`]; [`Error::NotMerged`]; [`Error::Invalid`] when `l` has an
    /// entry of magnitude below `1e-8` (nothing changes).
    pub fn unmerge_ia3(&mut self, name: &str) -> Result<()> {
        let i = self.ia3_slots.index_for_merge(name, true)?;
        let v = &self.ia3[i];
        check_invertible(&v.scale.val())?;
        fold_ia3(&mut self.base, v.scale.val(), v.feedforward, true);
        self.ia3_slots.merged[i] = false;
        Ok(())
    }

    /// Whether the layer holds adapter `name` of either kind.
    pub fn holds(&self, name: &str) -> bool {
        self.names()
            .iter()
            .chain(self.ia3_names())
            .any(|n| n == name)
    }

    /// Whether the layer's adapter `name` (LoRA or IA3) is merged; `None` when it lacks it.
    pub(crate) fn merged_named(&self, name: &str) -> Option<bool> {
        let at = |slots: &AdapterSlots| slots.index(name).ok().map(|i| slots.merged[i]);
        at(&self.slots).or_else(|| at(&self.ia3_slots))
    }

    /// [`Error::Invalid`] when `name` is a merged IA3 adapter whose merge cannot be undone
    /// (see [`unmerge_ia3`](Self::unmerge_ia3)); checked before a model-wide unmerge or
    /// delete touches any layer.
    pub(crate) fn check_undoable(&self, name: &str) -> Result<()> {
        match self.ia3_slots.index(name) {
            Ok(i) if self.ia3_slots.merged[i] => check_invertible(&self.ia3[i].scale.val()),
            _ => Ok(()),
        }
    }

    /// Merges adapter `name` of whichever kind the layer holds it as (nothing when it lacks
    /// it).
    pub(crate) fn merge_named(&mut self, name: &str) -> Result<()> {
        if self.slots.index(name).is_ok() {
            self.merge(name)
        } else if self.ia3_slots.index(name).is_ok() {
            self.merge_ia3(name)
        } else {
            Ok(())
        }
    }

    /// Unmerges adapter `name` of whichever kind the layer holds it as (nothing when it lacks
    /// it).
    pub(crate) fn unmerge_named(&mut self, name: &str) -> Result<()> {
        if self.slots.index(name).is_ok() {
            self.unmerge(name)
        } else if self.ia3_slots.index(name).is_ok() {
            self.unmerge_ia3(name)
        } else {
            Ok(())
        }
    }

    /// Removes adapter `name` of whichever kind the layer holds it as, unmerging it first
    /// (nothing when it lacks it).
    pub(crate) fn remove_named(&mut self, name: &str) -> Result<()> {
        if self.slots.index(name).is_ok() {
            self.remove_adapter(name).map(drop)
        } else if self.ia3_slots.index(name).is_ok() {
            self.remove_ia3(name).map(drop)
        } else {
            Ok(())
        }
    }

    /// The product of the live (active, unmerged) IA3 vectors of one placement, if any.
    fn live_ia3(&self, feedforward: bool) -> Option<Tensor<1>> {
        self.ia3
            .iter()
            .enumerate()
            .filter(|(i, v)| self.ia3_slots.contributes(*i) && v.feedforward == feedforward)
            .map(|(_, v)| v.scale.val())
            .reduce(|a, b| a * b)
    }

    /// The forward pass of a layer that holds IA3 adapters.
    pub(super) fn ia3_forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let x = match self.live_ia3(true) {
            Some(l) => x * l.unsqueeze::<D>(),
            None => x,
        };
        let y = self.base_forward(x);
        match self.live_ia3(false) {
            Some(l) => y * l.unsqueeze::<D>(),
            None => y,
        }
    }

    /// Sequence `i` of `x: [batch, seq, d_in]` uses IA3 adapter `names[i]` (`None`: the base
    /// only), ignoring the active flags: each placement's vectors are gathered per sequence
    /// (`[batch, 1, n]`) and multiplied in, so the base runs once over the whole batch.
    ///
    /// # Errors
    /// [`Error::Shape`] for the wrong width or a name count other than `batch`;
    /// [`Error::UnknownAdapter`]; [`Error::AlreadyMerged`] if an IA3 adapter is merged.
    pub fn forward_ia3_seqs(&self, x: Tensor<3>, names: &[Option<&str>]) -> Result<Tensor<3>> {
        check_last_dim(&x, self.d_in(), "LoraLinear::forward_ia3_seqs input")?;
        let batch = x.dims()[0];
        if names.len() != batch {
            return Err(Error::shape(
                "LoraLinear::forward_ia3_seqs (one adapter name per sequence)",
                batch.to_string(),
                names.len().to_string(),
            ));
        }
        if let Some(i) = self.ia3_slots.merged.iter().position(|m| *m) {
            return Err(Error::AlreadyMerged {
                name: self.ia3_slots.names()[i].clone(),
                operation: "a mixed-adapter forward",
            });
        }
        let ids = names
            .iter()
            .map(|n| n.map(|n| self.ia3_slots.index(n)).transpose())
            .collect::<Result<Vec<_>>>()?;
        let x = match self.per_sequence_scale(&ids, true) {
            Some(l) => x * l,
            None => x,
        };
        let y = self.base_forward(x);
        Ok(match self.per_sequence_scale(&ids, false) {
            Some(l) => y * l,
            None => y,
        })
    }

    /// `[batch, 1, n]`: per sequence, the vector of its adapter when that adapter has this
    /// placement, ones otherwise; `None` when no sequence's adapter has it.
    fn per_sequence_scale(&self, ids: &[Option<usize>], feedforward: bool) -> Option<Tensor<3>> {
        if !ids
            .iter()
            .flatten()
            .any(|&i| self.ia3[i].feedforward == feedforward)
        {
            return None;
        }
        let n = if feedforward {
            self.d_in()
        } else {
            self.d_out()
        };
        let device = self.base.weight.device();
        let ones = Tensor::<1>::ones([n], &device);
        let rows: Vec<Tensor<1>> = ids
            .iter()
            .map(|id| match id {
                Some(i) if self.ia3[*i].feedforward == feedforward => self.ia3[*i].scale.val(),
                _ => ones.clone(),
            })
            .collect();
        Some(Tensor::stack::<2>(rows, 0).unsqueeze_dim::<3>(1))
    }
}
