//! Host copies of LoRA factors: what the offline library operations (merging, arithmetic,
//! Arrow prototypes, clustering) work on.

use std::collections::BTreeMap;

use burn::tensor::{Device, TensorData};

use crate::error::{Error, Result, Scope};
use crate::linalg::Mat;
use crate::modules::lora::LoraModule;
use crate::tensor_util::{float_tensor, to_vec_f32};

/// One LoRA's factors on the host, in PEFT's layout: `A` is `lora_A` (`r × d_in`), `B` is
/// `lora_B` (`d_out × r`), and the update is `ΔW = scaling · B A` (`d_out × d_in`).
///
/// The factors are kept in `f64`; they come in and go out as burn [`TensorData`] (any float
/// dtype in, `f64` out).
///
/// # Shapes
/// - [`a`](Self::a): `[r, d_in]`, [`b`](Self::b): `[d_out, r]`, [`delta`](Self::delta):
///   `[d_out, d_in]`
#[derive(Debug, Clone, PartialEq)]
pub struct LoraFactors {
    /// `lora_A`, `r × d_in`.
    pub(crate) a: Mat,
    /// `lora_B`, `d_out × r`.
    pub(crate) b: Mat,
    /// The scaling `s` (`alpha/r`, or `alpha/√r` for rsLoRA).
    pub(crate) scaling: f64,
}

/// A 2-D host matrix from `data` (any float dtype); `what` names it in errors.
fn mat_of(data: &TensorData, what: &str) -> Result<Mat> {
    let dims = data.shape().to_vec();
    let &[rows, cols] = dims.as_slice() else {
        return Err(Error::shape(
            format!("{what} (a 2-D matrix)"),
            "2 dimensions",
            format!("{dims:?}"),
        ));
    };
    let values: Vec<f64> = data.iter::<f64>().collect();
    if values.iter().any(|v| !v.is_finite()) {
        return Err(Error::non_finite(what));
    }
    Ok(Mat {
        rows,
        cols,
        data: values,
    })
}

/// A host matrix as `f64` [`TensorData`].
fn data_of(m: &Mat) -> TensorData {
    TensorData::new(m.data.clone(), [m.rows, m.cols])
}

impl LoraFactors {
    /// Factors from `a` (`lora_A`, `[r, d_in]`) and `b` (`lora_B`, `[d_out, r]`), in any float
    /// dtype.
    ///
    /// # Errors
    /// [`Error::Shape`] if either is not 2-D or the ranks differ; [`Error::NonFinite`] for
    /// NaN or infinite entries; [`Error::Invalid`] for rank 0 or a non-finite scaling.
    pub fn new(a: &TensorData, b: &TensorData, scaling: f64) -> Result<Self> {
        Self::from_mats(mat_of(a, "lora_A")?, mat_of(b, "lora_B")?, scaling)
    }

    /// [`new`](Self::new) from host matrices.
    pub(crate) fn from_mats(a: Mat, b: Mat, scaling: f64) -> Result<Self> {
        if a.rows != b.cols {
            return Err(Error::shape(
                "LoRA factors (lora_A: [r, d_in], lora_B: [d_out, r])",
                format!("lora_B with {} columns", a.rows),
                format!("lora_B of shape [{}, {}]", b.rows, b.cols),
            ));
        }
        if a.rows == 0 {
            return Err(Error::invalid("LoRA rank", "rank 0 has no factors"));
        }
        if !scaling.is_finite() {
            return Err(Error::invalid(
                "LoRA scaling",
                format!("{scaling} is not finite"),
            ));
        }
        Ok(Self { a, b, scaling })
    }

    /// Copies an adapter's factors to the host (`a` is stored `[d_in, r]` on the device).
    pub fn from_adapter(adapter: &LoraModule) -> Self {
        let (r, d_in, d_out) = (adapter.rank(), adapter.d_in(), adapter.d_out());
        let a = Mat::from_f32(d_in, r, &to_vec_f32(adapter.a_masked())).t();
        let b = Mat::from_f32(r, d_out, &to_vec_f32(adapter.b.val())).t();
        Self {
            a,
            b,
            scaling: adapter.scaling(),
        }
    }

    /// A device adapter with the same update. Its `alpha` is `scaling · r` with plain (not
    /// rs-) LoRA scaling, so `alpha/r` reproduces `scaling` exactly.
    ///
    /// # Errors
    /// As [`LoraModule::from_factors`].
    pub fn to_adapter(&self, device: &Device) -> Result<LoraModule> {
        let a = float_tensor(self.a.t().to_f32(), [self.d_in(), self.rank()], device);
        let b = float_tensor(self.b.t().to_f32(), [self.rank(), self.d_out()], device);
        LoraModule::from_factors(a, b, self.scaling * self.rank() as f64, false, 0.0)
    }

    /// `lora_A`, `[r, d_in]`, as `f64`.
    pub fn a(&self) -> TensorData {
        data_of(&self.a)
    }

    /// `lora_B`, `[d_out, r]`, as `f64`.
    pub fn b(&self) -> TensorData {
        data_of(&self.b)
    }

    /// The scaling `s` (`alpha/r`, or `alpha/√r` for rsLoRA).
    pub fn scaling(&self) -> f64 {
        self.scaling
    }

    /// Rank `r`.
    pub fn rank(&self) -> usize {
        self.a.rows
    }

    /// Input width.
    pub fn d_in(&self) -> usize {
        self.a.cols
    }

    /// Output width.
    pub fn d_out(&self) -> usize {
        self.b.rows
    }

    /// The dense update `scaling · B A`, `[d_out, d_in]` as `f64`. Only the dense merges,
    /// baking and tests need it; everything else works on the factors.
    pub fn delta(&self) -> TensorData {
        data_of(&self.delta_mat())
    }

    /// [`delta`](Self::delta) as a host matrix.
    pub(crate) fn delta_mat(&self) -> Mat {
        let mut b = self.b.clone();
        b.data.iter_mut().for_each(|v| *v *= self.scaling);
        b.matmul(&self.a)
    }

    /// `⟨ΔW_self, ΔW_other⟩_F` from the factors: `s₁s₂ tr((B₁ᵀB₂)(A₂A₁ᵀ))`, `O(r²(d_in+d_out))`.
    pub fn delta_dot(&self, other: &LoraFactors) -> f64 {
        let btb = self.b.t().matmul(&other.b); // r1 × r2
        let aat = other.a.matmul(&self.a.t()); // r2 × r1
        let mut tr = 0.0;
        for i in 0..btb.rows {
            for j in 0..btb.cols {
                tr += btb.at(i, j) * aat.at(j, i);
            }
        }
        self.scaling * other.scaling * tr
    }

    /// `‖ΔW‖_F` from the factors.
    pub fn delta_norm(&self) -> f64 {
        self.delta_dot(self).max(0.0).sqrt()
    }

    /// Checks that `other` adapts a layer of the same shape; `what` names the caller.
    pub(crate) fn check_same_shape(&self, other: &LoraFactors, what: &str) -> Result<()> {
        if (self.d_in(), self.d_out()) != (other.d_in(), other.d_out()) {
            return Err(Error::shape(
                what,
                format!("[d_out, d_in] = [{}, {}]", self.d_out(), self.d_in()),
                format!("[{}, {}]", other.d_out(), other.d_in()),
            ));
        }
        Ok(())
    }
}

/// One LoRA expert: the factors of every layer it adapts, keyed by module path (the same base
/// model for every expert in a library).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LoraExpert {
    /// Factors by module path (`fc1`, `model.layers.0.self_attn.q_proj`, ...).
    pub layers: BTreeMap<String, LoraFactors>,
}

impl LoraExpert {
    /// The factors of layer `path`.
    ///
    /// # Errors
    /// [`Error::UnknownAdapter`] naming the layers the expert has.
    pub fn layer(&self, path: &str) -> Result<&LoraFactors> {
        self.layers.get(path).ok_or_else(|| Error::UnknownAdapter {
            name: path.to_string(),
            scope: Scope::ExpertLayers,
            known: self.layers.keys().cloned().collect(),
        })
    }
}
