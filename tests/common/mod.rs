//! Shared helpers for the integration tests: the devices to run on, golden data, comparisons.
#![allow(dead_code)]

use std::path::PathBuf;

use burn::tensor::{Device, Tensor};
use modula::TensorFile;

/// The devices every device-parameterised test runs on: Flex always, and wgpu (lavapipe in CI)
/// when the `wgpu` feature is on.
pub fn devices() -> Vec<Device> {
    #[allow(unused_mut)]
    let mut v = vec![Device::flex()];
    #[cfg(feature = "wgpu")]
    v.push(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice));
    v
}

/// Path of a file under tests/data.
pub fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("data")
        .join(name)
}

/// Opens a golden safetensors file under tests/data.
pub fn golden(name: &str) -> TensorFile {
    TensorFile::open(data(name)).unwrap_or_else(|e| panic!("golden file {name}: {e}"))
}

/// Host values of a float tensor.
pub fn vals<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    vals(a)
        .iter()
        .zip(vals(b))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Asserts `|a - b| <= atol` elementwise, with a message naming `what`.
pub fn assert_close<const D: usize>(a: Tensor<D>, b: Tensor<D>, atol: f32, what: &str) {
    let d = max_abs_diff(a, b);
    assert!(d <= atol, "{what}: max |diff| = {d:e} > {atol:e}");
}

/// A tiny deterministic generator (splitmix64) so tests need no RNG crate.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform integer in 0..n.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// A `[r, c]` tensor with entries uniform in [-1, 1).
    pub fn tensor(&mut self, r: usize, c: usize, device: &Device) -> Tensor<2> {
        let v: Vec<f32> = (0..r * c).map(|_| 2.0 * self.uniform() - 1.0).collect();
        Tensor::<2>::from_data(burn::tensor::TensorData::new(v, [r, c]), device)
    }
}

/// A dense row-major `f64` host matrix for hand computations in tests (modula keeps its own
/// crate-private; tests check it against this one and against nalgebra).
#[derive(Clone, Debug, PartialEq)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f64>,
}

impl Mat {
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    pub fn from_f32(rows: usize, cols: usize, values: &[f32]) -> Self {
        assert_eq!(values.len(), rows * cols);
        Self {
            rows,
            cols,
            data: values.iter().map(|&v| f64::from(v)).collect(),
        }
    }

    pub fn at(&self, i: usize, j: usize) -> f64 {
        self.data[i * self.cols + j]
    }

    pub fn at_mut(&mut self, i: usize, j: usize) -> &mut f64 {
        &mut self.data[i * self.cols + j]
    }

    pub fn t(&self) -> Mat {
        let mut out = Mat::zeros(self.cols, self.rows);
        for i in 0..self.rows {
            for j in 0..self.cols {
                *out.at_mut(j, i) = self.at(i, j);
            }
        }
        out
    }

    /// Multiplies column `j` by `s[j]`.
    pub fn scale_cols(&mut self, s: &[f64]) {
        for i in 0..self.rows {
            for (j, &sj) in s.iter().enumerate() {
                *self.at_mut(i, j) *= sj;
            }
        }
    }

    pub fn first_cols(&self, k: usize) -> Mat {
        let mut out = Mat::zeros(self.rows, k);
        for i in 0..self.rows {
            for j in 0..k {
                *out.at_mut(i, j) = self.at(i, j);
            }
        }
        out
    }

    pub fn matmul(&self, other: &Mat) -> Mat {
        assert_eq!(self.cols, other.rows);
        let mut out = Mat::zeros(self.rows, other.cols);
        for i in 0..self.rows {
            for p in 0..self.cols {
                for j in 0..other.cols {
                    *out.at_mut(i, j) += self.at(i, p) * other.at(p, j);
                }
            }
        }
        out
    }

    pub fn frobenius(&self) -> f64 {
        self.data.iter().map(|v| v * v).sum::<f64>().sqrt()
    }

    pub fn to_data(&self) -> burn::tensor::TensorData {
        burn::tensor::TensorData::new(self.data.clone(), [self.rows, self.cols])
    }

    fn to_na(&self) -> nalgebra::DMatrix<f64> {
        nalgebra::DMatrix::from_row_slice(self.rows, self.cols, &self.data)
    }

    fn from_na(m: &nalgebra::DMatrix<f64>) -> Self {
        let mut out = Mat::zeros(m.nrows(), m.ncols());
        for i in 0..m.nrows() {
            for j in 0..m.ncols() {
                *out.at_mut(i, j) = m[(i, j)];
            }
        }
        out
    }
}

impl From<burn::tensor::TensorData> for Mat {
    fn from(d: burn::tensor::TensorData) -> Self {
        let dims = d.shape().to_vec();
        assert_eq!(dims.len(), 2, "not a matrix: {dims:?}");
        Self {
            rows: dims[0],
            cols: dims[1],
            data: d.iter::<f64>().collect(),
        }
    }
}

/// Host views of a LoRA's factors for hand computations.
pub trait HostFactors {
    /// `lora_A`, `[r, d_in]`.
    fn a_mat(&self) -> Mat;
    /// `lora_B`, `[d_out, r]`.
    fn b_mat(&self) -> Mat;
    /// `scaling · B A`, `[d_out, d_in]`.
    fn delta_mat(&self) -> Mat;
}

impl HostFactors for modula::library::LoraFactors {
    fn a_mat(&self) -> Mat {
        self.a().into()
    }
    fn b_mat(&self) -> Mat {
        self.b().into()
    }
    fn delta_mat(&self) -> Mat {
        self.delta().into()
    }
}

/// Factors from host matrices.
pub fn factors(a: &Mat, b: &Mat, scaling: f64) -> modula::library::LoraFactors {
    modula::library::LoraFactors::new(&a.to_data(), &b.to_data(), scaling).unwrap()
}

/// Singular values (descending) and left and right singular vectors (columns of `u` and `v`),
/// by nalgebra: an implementation independent of modula's.
pub struct Svd {
    pub u: Mat,
    pub s: Vec<f64>,
    pub v: Mat,
}

pub fn svd(m: &Mat) -> Svd {
    let svd = m.to_na().svd(true, true);
    let v_t = svd.v_t.expect("computed");
    let u_na = svd.u.expect("computed");
    let mut order: Vec<usize> = (0..svd.singular_values.len()).collect();
    order.sort_by(|&i, &j| svd.singular_values[j].total_cmp(&svd.singular_values[i]));
    let s = order.iter().map(|&i| svd.singular_values[i]).collect();
    let mut v = Mat::zeros(m.cols, order.len());
    for (c, &i) in order.iter().enumerate() {
        for r in 0..m.cols {
            *v.at_mut(r, c) = v_t[(i, r)];
        }
    }
    let mut u = Mat::zeros(m.rows, order.len());
    for (c, &i) in order.iter().enumerate() {
        for r in 0..m.rows {
            *u.at_mut(r, c) = u_na[(r, i)];
        }
    }
    Svd { u, s, v }
}

/// The thin `Q` of a tall matrix (nalgebra's Householder QR).
pub fn qr_q(m: &Mat) -> Mat {
    Mat::from_na(&m.to_na().qr().q())
}

/// A 2-D tensor of a golden file as a host matrix.
pub fn mat(f: &TensorFile, name: &str) -> Mat {
    let t = f.get(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(t.shape.len(), 2, "{name} is not 2-D");
    Mat::from_f32(t.shape[0], t.shape[1], &t.data)
}

/// Largest absolute difference between two host matrices of the same shape.
pub fn mat_diff(a: &Mat, b: &Mat) -> f64 {
    assert_eq!((a.rows, a.cols), (b.rows, b.cols), "shapes differ");
    a.data
        .iter()
        .zip(&b.data)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}
