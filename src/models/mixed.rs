//! What every transformer's forward pass shares: the checks of its integer inputs (ids in
//! range, 0/1 masks) and mixed-adapter batches, where each sequence names its adapter (PEFT's
//! `adapter_names`) and every linear layer runs each adapter on its own sequences in one
//! gathered pass, with one dispatch plan per set of adapter names, shared by every layer that
//! holds that set.

use std::cell::RefCell;
use std::collections::HashMap;

use burn::tensor::{Int, Tensor};

use super::LinearLayers;
use crate::error::{Error, Result, Scope};
use crate::modules::lora::LoraLinear;
use crate::routing::{DispatchPlan, Routing};
use crate::tensor_util::to_vec_i64;

/// A mixed-adapter batch: the adapter of each sequence, and one plan per set of adapter
/// names a layer can hold (layers that hold the same adapters share it).
pub(crate) struct Mix<'a> {
    adapters: &'a [Option<&'a str>],
    plans: RefCell<HashMap<Vec<String>, DispatchPlan>>,
}

impl<'a> Mix<'a> {
    /// The state for a batch of `b` sequences of `model`, after checking the names.
    ///
    /// # Errors
    /// [`Error::Shape`] for a name count other than `b`; [`Error::UnknownAdapter`] for a name
    /// no layer of the model holds.
    pub(crate) fn new(
        model: &dyn LinearLayers,
        b: usize,
        adapters: &'a [Option<&'a str>],
    ) -> Result<Self> {
        if adapters.len() != b {
            return Err(Error::shape(
                "adapters (one adapter name or None per sequence)",
                b.to_string(),
                adapters.len().to_string(),
            ));
        }
        let known = model.adapter_names();
        if let Some(bad) = adapters
            .iter()
            .flatten()
            .find(|n| !known.iter().any(|k| k == **n))
        {
            return Err(Error::UnknownAdapter {
                name: bad.to_string(),
                scope: Scope::Layer,
                known,
            });
        }
        Ok(Self {
            adapters,
            plans: RefCell::new(HashMap::new()),
        })
    }
}

/// `layer(x)` for `x: [batch, seq, d_in]`, each sequence through its own adapter under `mix`.
pub(crate) fn linear(layer: &LoraLinear, x: Tensor<3>, mix: Option<&Mix<'_>>) -> Result<Tensor<3>> {
    let [b, s, d_in] = x.dims();
    if let Some(mix) = mix.filter(|_| !layer.ia3_names().is_empty()) {
        // A sequence whose adapter this layer lacks takes the base output, as PEFT.
        let held: Vec<Option<&str>> = mix
            .adapters
            .iter()
            .map(|a| a.filter(|a| layer.ia3_names().iter().any(|n| n == a)))
            .collect();
        return layer.forward_ia3_seqs(x, &held);
    }
    let names = layer.names();
    let Some(mix) = mix.filter(|_| !names.is_empty()) else {
        if layer.router().is_some() {
            // Routed: the layer sees the batch's shape (routers by sequence check it).
            return layer.forward(x);
        }
        // One [b·s, d_in] product, the rows the mixed path sees too.
        let y = layer.forward(x.reshape([b * s, d_in]))?;
        return Ok(y.reshape([b, s, layer.d_out()]));
    };
    let mut plans = mix.plans.borrow_mut();
    let plan = match plans.entry(names.to_vec()) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => {
            // A sequence whose adapter this layer lacks takes the base output (-1), as PEFT.
            let ids: Vec<i64> = mix
                .adapters
                .iter()
                .map(|a| {
                    a.and_then(|a| names.iter().position(|n| n == a))
                        .map_or(-1, |i| i as i64)
                })
                .collect();
            let routing = Routing::one_per_row(&ids, names.len(), &x.device())?;
            e.insert(DispatchPlan::per_sequence(&routing, s)?)
        }
    };
    let y = layer.forward_planned(x.reshape([b * s, d_in]), plan)?;
    Ok(y.reshape([b, s, layer.d_out()]))
}

/// The 0/1 values of an `attention_mask` of shape `dims`.
pub(crate) fn mask_values(mask: Tensor<2, Int>, dims: [usize; 2]) -> Result<Vec<i64>> {
    if mask.dims() != dims {
        return Err(Error::shape(
            "attention_mask (the shape of input_ids)",
            format!("{dims:?}"),
            format!("{:?}", mask.dims()),
        ));
    }
    let values = to_vec_i64(mask);
    if let Some(v) = values.iter().find(|&&v| v != 0 && v != 1) {
        return Err(Error::invalid(
            "attention_mask",
            format!("{v}: the mask holds 1 for tokens and 0 for padding"),
        ));
    }
    Ok(values)
}

/// [`Error::IdOutOfRange`] for the first of the ids `t` outside `0..bound` (`what` and
/// `within` name the id and its table in the message).
pub(crate) fn check_ids(
    t: Tensor<2, Int>,
    what: &'static str,
    within: &'static str,
    bound: usize,
) -> Result<()> {
    match to_vec_i64(t)
        .into_iter()
        .find(|&v| v < 0 || v as usize >= bound)
    {
        Some(bad) => Err(Error::IdOutOfRange {
            what,
            within,
            id: bad,
            bound,
        }),
        None => Ok(()),
    }
}
