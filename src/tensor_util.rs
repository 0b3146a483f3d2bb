//! Small host/device conversion helpers shared by the crate.

use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::error::{Error, Result};

/// Reads a float tensor of any rank into a host `Vec<f32>` (row-major).
pub fn to_vec_f32<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

/// Reads an int tensor of any rank into a host `Vec<i64>` (row-major), whatever the backend's
/// int dtype (I32 on Flex and wgpu, I64 on NdArray).
pub fn to_vec_i64<const D: usize>(t: Tensor<D, Int>) -> Vec<i64> {
    t.into_data().iter::<i64>().collect()
}

/// Builds a 1-D int tensor on `device` in the device's own int dtype.
pub fn int_tensor(values: &[i64], device: &Device) -> Tensor<1, Int> {
    Tensor::<1, Int>::from_data(TensorData::new(values.to_vec(), [values.len()]), device)
}

/// Builds a float tensor of shape `dims` from row-major host values.
pub fn float_tensor<const D: usize>(
    values: Vec<f32>,
    dims: [usize; D],
    device: &Device,
) -> Tensor<D> {
    Tensor::<D>::from_data(TensorData::new(values, dims), device)
}

/// The transpose of a row-major `rows × cols` matrix, row-major (`cols × rows`), in cache
/// blocks.
pub fn transpose_host(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const B: usize = 32;
    let mut out = vec![0f32; values.len()];
    for i0 in (0..rows).step_by(B) {
        for j0 in (0..cols).step_by(B) {
            for i in i0..(i0 + B).min(rows) {
                for j in j0..(j0 + B).min(cols) {
                    out[j * rows + i] = values[i * cols + j];
                }
            }
        }
    }
    out
}

/// Checks that every entry of `t` is finite; `what` names the tensor in the error.
pub fn ensure_finite<const D: usize>(t: &Tensor<D>, what: &str) -> Result<()> {
    let finite = t.clone().is_finite().all().into_scalar::<bool>();
    if finite {
        Ok(())
    } else {
        Err(Error::non_finite(what))
    }
}

/// Checks router logits `[rows, modules]`: `−∞` masks a module (it is never chosen and gets
/// weight 0), but NaN, `+∞`, or a row whose every logit is `−∞` (nothing to choose) are errors;
/// `what` names the tensor in the error. Large finite logits are fine: every softmax subtracts
/// the row's maximum first.
pub fn check_logits(t: &Tensor<2>, what: &str) -> Result<()> {
    // Both counts come back in one read: this runs on every routing call.
    let nan_or_pos_inf =
        (t.clone().is_nan().int() + t.clone().equal_elem(f32::INFINITY).int()).sum();
    let empty_rows = t
        .clone()
        .is_finite()
        .int()
        .sum_dim(1)
        .equal_elem(0)
        .int()
        .sum();
    let counts = to_vec_i64(Tensor::cat(vec![nan_or_pos_inf, empty_rows], 0));
    let (nan_or_pos_inf, empty_rows) = (counts[0], counts[1]);
    if nan_or_pos_inf > 0 {
        return Err(Error::non_finite(format!(
            "{what} ({nan_or_pos_inf} NaN or +inf values; -inf masks a module, nothing else may be non-finite)"
        )));
    }
    if empty_rows > 0 {
        return Err(Error::non_finite(format!(
            "{what}: {empty_rows} row(s) mask every module with -inf; leave at least one finite logit per row"
        )));
    }
    Ok(())
}
