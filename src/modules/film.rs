//! FiLM: feature-wise linear modulation (Perez, Strub, de Vries, Dumoulin & Courville 2018,
//! "FiLM: Visual Reasoning with a General Conditioning Layer", arXiv 1709.07871), the survey's
//! conditioned rescaling (Pfeiffer et al. 2023, §3.3).
//!
//! A condition `c` (a task embedding, a language embedding, a summary of the input) sets a
//! per-feature scale and shift of a hidden state:
//!
//! ```text
//! FiLM(h, c) = (1 + γ(c)) ⊙ h + β(c),     γ(c) = c W_γ + b_γ,  β(c) = c W_β + b_β
//! ```
//!
//! `γ` and `β` start at zero, so a new layer is the identity (the `1 +` keeps the
//! parameterisation centred on it, as in FiLM's residual variant). (IA)³ is the special case
//! with a constant condition and no shift.
//!
//! # Shapes
//! - `h`: `[rows, d]`; `c`: `[rows, d_cond]` (one condition per row) or `[1, d_cond]` (one for
//!   all rows)

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Device, Tensor};

use super::check_last_dim;
use crate::error::{Error, Result};

/// A FiLM layer (see the [module docs](self)).
#[derive(Module, Debug)]
pub struct Film {
    /// `d_cond → d`: the scale offset `γ`.
    pub scale: Linear,
    /// `d_cond → d`: the shift `β`.
    pub shift: Linear,
}

impl Film {
    /// A layer modulating `d` features from a `d_cond`-wide condition, the identity at first.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a zero width.
    pub fn new(d_cond: usize, d: usize, device: &Device) -> Result<Self> {
        if d_cond == 0 || d == 0 {
            return Err(Error::invalid(
                "FiLM widths",
                "d_cond and d must be positive",
            ));
        }
        let zero = |l: Linear| Linear {
            weight: Param::from_tensor(Tensor::zeros(l.weight.shape().dims::<2>(), device)),
            bias: Some(Param::from_tensor(Tensor::zeros([d], device))),
        };
        Ok(Self {
            scale: zero(LinearConfig::new(d_cond, d).init(device)),
            shift: zero(LinearConfig::new(d_cond, d).init(device)),
        })
    }

    /// Feature width `d`.
    pub fn d(&self) -> usize {
        self.scale.weight.shape().dims::<2>()[1]
    }

    /// Condition width.
    pub fn d_cond(&self) -> usize {
        self.scale.weight.shape().dims::<2>()[0]
    }

    /// `(1 + γ(c)) ⊙ h + β(c)`.
    ///
    /// # Errors
    /// [`Error::Shape`] for a width other than `d` / `d_cond`, or a condition with neither one
    /// row nor one per row of `h`.
    pub fn forward(&self, h: Tensor<2>, cond: Tensor<2>) -> Result<Tensor<2>> {
        check_last_dim(&h, self.d(), "FiLM input")?;
        check_last_dim(&cond, self.d_cond(), "FiLM condition")?;
        let rows = h.dims()[0];
        let c_rows = cond.dims()[0];
        if c_rows != rows && c_rows != 1 {
            return Err(Error::shape(
                "FiLM condition rows (one, or one per input row)",
                format!("1 or {rows}"),
                c_rows.to_string(),
            ));
        }
        let d = self.d();
        let gamma = self.scale.forward(cond.clone()).expand([rows, d]);
        let beta = self.shift.forward(cond).expand([rows, d]);
        Ok(h.clone() + h * gamma + beta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor_util::to_vec_f32;

    #[test]
    fn film_starts_as_identity_and_modulates_per_condition() {
        let dev = Device::flex();
        let mut f = Film::new(2, 3, &dev).unwrap();
        let h = Tensor::<2>::from_floats([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], &dev);
        let c = Tensor::<2>::from_floats([[1.0, 0.0], [0.0, 1.0]], &dev);
        assert_eq!(
            to_vec_f32(f.forward(h.clone(), c.clone()).unwrap()),
            to_vec_f32(h.clone())
        );
        // γ(c) = c W: condition 0 doubles the features, condition 1 adds 1 to them.
        f.scale.weight = Param::from_tensor(Tensor::from_floats([[1.0; 3], [0.0; 3]], &dev));
        f.shift.weight = Param::from_tensor(Tensor::from_floats([[0.0; 3], [1.0; 3]], &dev));
        let y = to_vec_f32(f.forward(h.clone(), c).unwrap());
        assert_eq!(y, [2.0, 4.0, 6.0, 5.0, 6.0, 7.0]);
        let one = Tensor::<2>::from_floats([[1.0, 0.0]], &dev);
        assert_eq!(
            to_vec_f32(f.forward(h.clone(), one).unwrap())[..3],
            [2.0, 4.0, 6.0]
        );
        assert!(f.forward(h.clone(), Tensor::zeros([3, 2], &dev)).is_err());
        assert!(f.forward(h, Tensor::zeros([2, 3], &dev)).is_err());
        assert!(Film::new(0, 3, &dev).is_err());
    }
}
