//! The grouped ops against a per-segment reference computed on the host in `f64`: empty
//! segments, one-row segments, uneven sizes, ranks 1–64, transposed (strided) weights and a
//! per-row scale, on Flex (host `gemm` body), Flex with autodiff (the tensor-op body) and wgpu.

mod common;

use burn::tensor::{Device, Tensor, TensorData};
use common::{Rng, devices, vals};
use modula::grouped::{
    LowRank, dense_linear, grouped_linear, grouped_low_rank, grouped_swiglu, runs_on_host,
};

/// Uneven sizes with empty and one-row segments; the 300-row group crosses the size at which
/// the host body runs its products in parallel.
const SIZES: [usize; 8] = [0, 1, 7, 0, 300, 2, 1, 0];
const RANKS: [usize; 8] = [4, 1, 64, 2, 16, 5, 8, 3];

/// A host matrix and the same values as a tensor.
struct M {
    rows: usize,
    cols: usize,
    v: Vec<f64>,
}

impl M {
    fn random(rng: &mut Rng, rows: usize, cols: usize, scale: f32) -> Self {
        let v = (0..rows * cols)
            .map(|_| ((2.0 * rng.uniform() - 1.0) * scale) as f64)
            .collect();
        Self { rows, cols, v }
    }

    fn tensor(&self, device: &Device) -> Tensor<2> {
        let v: Vec<f32> = self.v.iter().map(|&x| x as f32).collect();
        Tensor::from_data(TensorData::new(v, [self.rows, self.cols]), device)
    }

    /// The same matrix as a transposed view of its transpose (a strided tensor on Flex).
    fn tensor_strided(&self, device: &Device) -> Tensor<2> {
        let mut t = vec![0f32; self.v.len()];
        for i in 0..self.rows {
            for j in 0..self.cols {
                t[j * self.rows + i] = self.v[i * self.cols + j] as f32;
            }
        }
        Tensor::<2>::from_data(TensorData::new(t, [self.cols, self.rows]), device).transpose()
    }

    /// Rows `r0..r0 + n` times `w`.
    fn rows_times(&self, r0: usize, n: usize, w: &M) -> M {
        let mut v = vec![0.0; n * w.cols];
        for i in 0..n {
            for k in 0..self.cols {
                let a = self.v[(r0 + i) * self.cols + k];
                for j in 0..w.cols {
                    v[i * w.cols + j] += a * w.v[k * w.cols + j];
                }
            }
        }
        M {
            rows: n,
            cols: w.cols,
            v,
        }
    }
}

fn offsets() -> Vec<usize> {
    SIZES
        .iter()
        .scan(0, |s, &n| {
            let o = *s;
            *s += n;
            Some(o)
        })
        .collect()
}

fn n_rows() -> usize {
    SIZES.iter().sum()
}

fn scale_column(rng: &mut Rng) -> Vec<f64> {
    (0..n_rows()).map(|_| 0.25 + rng.uniform() as f64).collect()
}

fn column(c: &[f64], device: &Device) -> Tensor<2> {
    let v: Vec<f32> = c.iter().map(|&x| x as f32).collect();
    Tensor::from_data(TensorData::new(v, [c.len(), 1]), device)
}

/// The devices of the crate's tests plus Flex with autodiff, which takes the tensor-op body.
fn bodies() -> Vec<Device> {
    let mut v = devices();
    v.push(Device::flex().autodiff());
    v
}

#[test]
fn flex_tensors_take_the_host_body_and_tracked_ones_the_tensor_ops() {
    let x = Tensor::<2>::zeros([3, 2], &Device::flex());
    assert_eq!(runs_on_host(&x), cfg!(feature = "flex"));
    assert!(runs_on_host(&x.clone().transpose()) == cfg!(feature = "flex"));
    assert!(!runs_on_host(&Tensor::<2>::zeros(
        [3, 2],
        &Device::flex().autodiff()
    )));
    #[cfg(feature = "wgpu")]
    assert!(!runs_on_host(&Tensor::<2>::zeros(
        [3, 2],
        &Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)
    )));
}

fn assert_matches(y: Tensor<2>, reference: &[f64], what: &str) {
    let got = vals(y);
    assert_eq!(got.len(), reference.len(), "{what}: length");
    let worst = got
        .iter()
        .zip(reference)
        .map(|(g, r)| (*g as f64 - r).abs())
        .fold(0.0, f64::max);
    assert!(worst <= 1e-5, "{what}: max |diff| = {worst:e} > 1e-5");
}

#[test]
fn grouped_linear_equals_each_segment_times_its_weights() {
    let (d_in, d_out) = (24, 20);
    let mut rng = Rng(11);
    let x = M::random(&mut rng, n_rows(), d_in, 1.0);
    let ws: Vec<M> = SIZES
        .iter()
        .map(|_| M::random(&mut rng, d_in, d_out, 0.2))
        .collect();
    let bs: Vec<Vec<f64>> = SIZES
        .iter()
        .map(|_| (0..d_out).map(|_| rng.uniform() as f64 - 0.5).collect())
        .collect();
    let mut reference = Vec::new();
    for (g, (&n, o)) in SIZES.iter().zip(offsets()).enumerate() {
        let y = x.rows_times(o, n, &ws[g]);
        for i in 0..n {
            reference.extend((0..d_out).map(|j| y.v[i * d_out + j] + bs[g][j]));
        }
    }
    for device in bodies() {
        // Odd groups get transposed (strided) weights.
        let wt: Vec<Tensor<2>> = ws
            .iter()
            .enumerate()
            .map(|(g, w)| {
                if g % 2 == 1 {
                    w.tensor_strided(&device)
                } else {
                    w.tensor(&device)
                }
            })
            .collect();
        let bt: Vec<Tensor<1>> = bs
            .iter()
            .map(|b| {
                let v: Vec<f32> = b.iter().map(|&x| x as f32).collect();
                Tensor::from_data(TensorData::new(v, [d_out]), &device)
            })
            .collect();
        let y = grouped_linear(x.tensor(&device), &SIZES, &wt, Some(&bt)).unwrap();
        assert_matches(y, &reference, &format!("grouped_linear on {device:?}"));
    }
}

#[test]
fn grouped_low_rank_equals_each_segment_through_its_factors_at_ranks_1_to_64() {
    let (d_in, d_out) = (40, 36);
    let mut rng = Rng(12);
    let x = M::random(&mut rng, n_rows(), d_in, 1.0);
    let fs: Vec<(M, M, f64)> = RANKS
        .iter()
        .enumerate()
        .map(|(g, &r)| {
            (
                M::random(&mut rng, d_in, r, 0.15),
                M::random(&mut rng, r, d_out, 0.15),
                0.5 + g as f64 / 4.0,
            )
        })
        .collect();
    let c = scale_column(&mut rng);
    let mut reference = Vec::new();
    for (g, (&n, o)) in SIZES.iter().zip(offsets()).enumerate() {
        let (a, b, s) = &fs[g];
        let y = x.rows_times(o, n, a).rows_times(0, n, b);
        for i in 0..n {
            reference.extend((0..d_out).map(|j| y.v[i * d_out + j] * s * c[o + i]));
        }
    }
    for device in bodies() {
        let factors: Vec<LowRank> = fs
            .iter()
            .enumerate()
            .map(|(g, (a, b, s))| LowRank {
                a: if g % 3 == 0 {
                    a.tensor_strided(&device)
                } else {
                    a.tensor(&device)
                },
                b: b.tensor(&device),
                scale: *s,
            })
            .collect();
        let y = grouped_low_rank(
            x.tensor(&device),
            &SIZES,
            &factors,
            Some(column(&c, &device)),
        )
        .unwrap();
        assert_matches(y, &reference, &format!("grouped_low_rank on {device:?}"));
    }
}

#[test]
fn grouped_swiglu_equals_each_segment_through_its_expert() {
    let (d, ff) = (32, 24);
    let mut rng = Rng(13);
    let x = M::random(&mut rng, n_rows(), d, 1.0);
    let w_in: Vec<M> = SIZES
        .iter()
        .map(|_| M::random(&mut rng, d, 2 * ff, 0.3))
        .collect();
    let w_out: Vec<M> = SIZES
        .iter()
        .map(|_| M::random(&mut rng, ff, d, 0.3))
        .collect();
    let c = scale_column(&mut rng);
    let mut reference = Vec::new();
    for (g, (&n, o)) in SIZES.iter().zip(offsets()).enumerate() {
        let h = x.rows_times(o, n, &w_in[g]);
        let mut a = M {
            rows: n,
            cols: ff,
            v: vec![0.0; n * ff],
        };
        for i in 0..n {
            for j in 0..ff {
                let (gate, up) = (h.v[i * 2 * ff + j], h.v[i * 2 * ff + ff + j]);
                a.v[i * ff + j] = gate / (1.0 + (-gate).exp()) * up * c[o + i];
            }
        }
        reference.extend(a.rows_times(0, n, &w_out[g]).v);
    }
    for device in bodies() {
        let wi: Vec<Tensor<2>> = w_in.iter().map(|w| w.tensor(&device)).collect();
        let wo: Vec<Tensor<2>> = w_out
            .iter()
            .enumerate()
            .map(|(g, w)| {
                if g % 2 == 0 {
                    w.tensor_strided(&device)
                } else {
                    w.tensor(&device)
                }
            })
            .collect();
        let y = grouped_swiglu(
            x.tensor(&device),
            &SIZES,
            &wi,
            &wo,
            Some(column(&c, &device)),
        )
        .unwrap();
        assert_matches(y, &reference, &format!("grouped_swiglu on {device:?}"));
    }
}

#[test]
fn grouped_ops_reject_sizes_and_weights_that_do_not_fit() {
    let device = Device::flex();
    let x = Tensor::<2>::zeros([5, 4], &device);
    let w = vec![Tensor::<2>::zeros([4, 3], &device); 2];
    let e = grouped_linear(x.clone(), &[2, 2], &w, None).unwrap_err();
    assert!(e.to_string().contains("sum to the rows"), "{e}");
    let e = grouped_linear(x.clone(), &[5], &w, None).unwrap_err();
    assert!(e.to_string().contains("one per group"), "{e}");
    let odd = vec![Tensor::<2>::zeros([4, 3], &device)];
    let out = vec![Tensor::<2>::zeros([1, 4], &device)];
    let e = grouped_swiglu(x.clone(), &[5], &odd, &out, None).unwrap_err();
    assert!(e.to_string().contains("even width"), "{e}");
    let f = vec![LowRank {
        a: Tensor::zeros([4, 2], &device),
        b: Tensor::zeros([3, 6], &device),
        scale: 1.0,
    }];
    let e = grouped_low_rank(x.clone(), &[5], &f, None).unwrap_err();
    assert!(e.to_string().contains("B ([r, d_out])"), "{e}");
    let bad_scale = Some(Tensor::<2>::ones([4, 1], &device));
    let ok_f = vec![LowRank {
        a: Tensor::zeros([4, 2], &device),
        b: Tensor::zeros([2, 6], &device),
        scale: 1.0,
    }];
    let e = grouped_low_rank(x, &[5], &ok_f, bad_scale).unwrap_err();
    assert!(e.to_string().contains("row scale"), "{e}");
}

/// `dense_linear` at the sizes of a decoding step (1 to 8 rows take Flex's weight-streaming
/// kernel, 9 rows `gemm`) against the `f64` product: inner sizes below and above its 8-row
/// passes and not a multiple of them, output widths narrower and wider than one thread's band
/// and not a multiple of the vector width, strided inputs, with and without a bias, as a 3-d
/// batch (on Flex, where the kernel runs).
#[test]
fn dense_linear_equals_the_product_at_decoding_sizes() {
    let mut rng = Rng(5);
    for (d_in, d_out) in [(5, 64), (1037, 700), (64, 2000), (300, 4099)] {
        let w = M::random(&mut rng, d_in, d_out, 0.2);
        let b: Vec<f64> = (0..d_out).map(|_| rng.uniform() as f64 - 0.5).collect();
        for rows in [1, 3, 8, 9] {
            let x = M::random(&mut rng, rows, d_in, 1.0);
            let y = x.rows_times(0, rows, &w);
            // Flex alone: elsewhere dense_linear is burn's linear.
            let device = Device::flex();
            for (bias, strided) in [(false, false), (true, true)] {
                let xt = if strided {
                    x.tensor_strided(&device)
                } else {
                    x.tensor(&device)
                };
                let bt = bias.then(|| {
                    let v: Vec<f32> = b.iter().map(|&v| v as f32).collect();
                    Tensor::<1>::from_data(TensorData::new(v, [d_out]), &device)
                });
                let got = dense_linear(xt.reshape([1, rows, d_in]), w.tensor(&device), bt);
                assert_eq!(got.dims(), [1, rows, d_out]);
                let want: Vec<f64> = (0..rows * d_out)
                    .map(|i| y.v[i] + if bias { b[i % d_out] } else { 0.0 })
                    .collect();
                // f32 sums of d_in terms: the tolerance grows with d_in.
                let tol = (1e-7 * d_in as f64).max(1e-5);
                let worst = vals(got.reshape([rows, d_out]))
                    .iter()
                    .zip(&want)
                    .map(|(g, r)| (*g as f64 - r).abs())
                    .fold(0.0, f64::max);
                assert!(
                    worst <= tol,
                    "{rows} × {d_in} · {d_in} × {d_out}, bias {bias}, on {device:?}: {worst:e}"
                );
            }
        }
    }
}
