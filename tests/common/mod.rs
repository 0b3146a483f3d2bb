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

/// A 2-D tensor of a golden file as a host matrix.
pub fn mat(f: &TensorFile, name: &str) -> modula::linalg::Mat {
    let t = f.get(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(t.shape.len(), 2, "{name} is not 2-D");
    modula::linalg::Mat::from_f32(t.shape[0], t.shape[1], &t.data)
}

/// Largest absolute difference between two host matrices of the same shape.
pub fn mat_diff(a: &modula::linalg::Mat, b: &modula::linalg::Mat) -> f64 {
    assert_eq!((a.rows, a.cols), (b.rows, b.cols), "shapes differ");
    a.data
        .iter()
        .zip(&b.data)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}
