//! The hidden units of a feed-forward [`Expert`] (a two-layer MLP or SwiGLU block, the
//! building block of the digits examples' networks and of every MoE layer) as prunable units:
//! one group, one unit per hidden unit (its column of `w_in`, both halves for SwiGLU, and its
//! row of `w_out`). The mask multiplies the hidden activations
//! ([`Expert::hidden_mask`]); pruning slices the weights.
//!
//! Hidden units record no activations here: prune them with the magnitude or random prior.

use burn::tensor::Tensor;

use super::{
    Prunable, UnitGroup, UnitKind, check_keep, check_masks, row_block_means, slice_linear,
};
use crate::error::{Error, Result};
use crate::moe::experts::{Expert, ExpertKind};

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
        if let Some(m) = &masks {
            check_masks(&self.unit_groups(), m)?;
        }
        self.hidden_mask = masks.and_then(|m| m.into_iter().next());
        Ok(())
    }

    /// Mean |row of `w_out`| per hidden unit.
    fn unit_weight_magnitudes(&self) -> Vec<Vec<f64>> {
        vec![row_block_means(self.w_out.weight.val(), self.d_ff())]
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
        self.w_in = slice_linear(&self.w_in, 1, &cols);
        self.w_out = slice_linear(&self.w_out, 0, k);
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
