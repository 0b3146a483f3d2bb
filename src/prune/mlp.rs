//! The hidden units of a feed-forward [`Expert`] (a two-layer MLP or SwiGLU block, the
//! building block of the digits examples' networks and of every MoE layer) as prunable units:
//! one group, one unit per hidden unit (its column of `w_in`, both halves for SwiGLU, and its
//! row of `w_out`). The mask multiplies the hidden activations
//! ([`Expert::hidden_mask`]); pruning slices the weights.
//!
//! Hidden units record no activations here: prune them with the magnitude or random prior.

use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::Tensor;

use super::{Prunable, UnitGroup, UnitKind, check_keep};
use crate::error::{Error, Result};
use crate::moe::experts::{Expert, ExpertKind};
use crate::tensor_util::int_tensor;

/// `linear` with `dim` of its weight (0: inputs, 1: outputs) cut to `keep`; the bias follows
/// the outputs.
fn slice(linear: &Linear, dim: usize, keep: &[usize]) -> Linear {
    let w = linear.weight.val();
    let ids: Vec<i64> = keep.iter().map(|&i| i as i64).collect();
    let ids = int_tensor(&ids, &w.device());
    Linear {
        weight: Param::from_tensor(w.select(dim, ids.clone())),
        bias: linear.bias.as_ref().map(|b| {
            Param::from_tensor(if dim == 1 {
                b.val().select(0, ids)
            } else {
                b.val()
            })
        }),
    }
}

impl Prunable for Expert {
    fn unit_groups(&self) -> Vec<UnitGroup> {
        let [d_in, up] = self.w_in.weight.shape().dims::<2>();
        let d_out = self.w_out.weight.shape().dims::<2>()[1];
        let ff = self.d_ff();
        let in_per_unit = (up / ff.max(1)) * (d_in + usize::from(self.w_in.bias.is_some()));
        vec![UnitGroup {
            path: "hidden".into(),
            kind: UnitKind::MlpNeuron,
            units: ff,
            params_per_unit: in_per_unit + d_out,
            min_units: 1,
        }]
    }

    fn set_unit_masks(&mut self, masks: Option<Vec<Tensor<1>>>) -> Result<()> {
        let mask = match masks {
            None => None,
            Some(m) => {
                let [only] = <[Tensor<1>; 1]>::try_from(m).map_err(|m| {
                    Error::shape("expert masks (one group)", "1", m.len().to_string())
                })?;
                if only.dims()[0] != self.d_ff() {
                    return Err(Error::shape(
                        "expert hidden mask",
                        self.d_ff().to_string(),
                        only.dims()[0].to_string(),
                    ));
                }
                Some(only)
            }
        };
        self.hidden_mask = mask;
        Ok(())
    }

    /// Mean |row of `w_out`| per hidden unit.
    fn unit_weight_magnitudes(&self) -> Vec<Vec<f64>> {
        let w = self.w_out.weight.val();
        let [ff, d] = w.dims();
        let v: Vec<f32> = w.abs().into_data().iter::<f32>().collect();
        vec![
            (0..ff)
                .map(|u| {
                    v[u * d..(u + 1) * d]
                        .iter()
                        .map(|&x| f64::from(x))
                        .sum::<f64>()
                        / d as f64
                })
                .collect(),
        ]
    }

    fn record_unit_activations(&mut self, _on: bool) {}

    fn unit_activation_rms(&self) -> Result<Vec<Vec<f64>>> {
        Err(Error::invalid(
            "expert hidden activations",
            "an expert records no activations; prune it with the magnitude or random prior",
        ))
    }

    fn prune_units(&mut self, keep: &[Vec<usize>]) -> Result<()> {
        check_keep(&self.unit_groups(), keep)?;
        let k = &keep[0];
        let cols: Vec<usize> = match self.kind {
            ExpertKind::Mlp => k.clone(),
            // Gate half, then the up half at the same hidden units.
            ExpertKind::SwiGlu => {
                let ff = self.d_ff();
                k.iter().copied().chain(k.iter().map(|&u| ff + u)).collect()
            }
        };
        self.w_in = slice(&self.w_in, 1, &cols);
        self.w_out = slice(&self.w_out, 0, k);
        self.hidden_mask = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Distribution, TensorData};

    use super::*;
    use crate::modules::ComputeModule;
    use crate::modules::adapter::AdapterActivation;
    use crate::moe::experts::ExpertConfig;

    #[test]
    fn masked_hidden_units_equal_the_pruned_expert() {
        let device = Device::flex();
        for kind in [ExpertKind::Mlp, ExpertKind::SwiGlu] {
            let mut e = ExpertConfig::new(8, 12)
                .with_kind(kind)
                .with_activation(AdapterActivation::Gelu)
                .with_bias(kind == ExpertKind::Mlp)
                .init(&device)
                .unwrap();
            let x = Tensor::<2>::random([5, 8], Distribution::Default, &device);
            let full = e.forward_rows(x.clone());
            let keep: Vec<usize> = (0..12).filter(|u| u % 3 != 1).collect();
            let m: Vec<f32> = (0..12).map(|u| f32::from(u8::from(u % 3 != 1))).collect();
            e.set_unit_masks(Some(vec![Tensor::from_data(
                TensorData::new(m, [12]),
                &device,
            )]))
            .unwrap();
            let masked = e.forward_rows(x.clone());
            let diff =
                |a: Tensor<2>, b: Tensor<2>| -> f32 { (a - b).abs().max().into_scalar::<f32>() };
            assert!(diff(masked.clone(), full) > 1e-4, "the mask acts");
            let before = e.unit_groups()[0].params_per_unit;
            e.prune_units(&[keep]).unwrap();
            assert_eq!(e.d_ff(), 8);
            assert!(diff(e.forward_rows(x), masked) < 1e-5, "{kind:?}");
            let after = e.unit_groups()[0].clone();
            assert_eq!((after.units, after.params_per_unit), (8, before));
            assert!(e.unit_activation_rms().is_err());
            assert!(e.prune_units(&[vec![]]).is_err());
            assert!(e.set_unit_masks(Some(vec![])).is_err());
        }
    }
}
