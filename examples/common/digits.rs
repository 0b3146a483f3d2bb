//! The UCI digits data shipped in data/digits.csv.gz (see data/README.md), shared by the
//! examples: loading, batching and a seeded shuffle.
#![allow(dead_code)]

use std::io::Read;
use std::path::PathBuf;

use burn::tensor::{Device, Int, Tensor, TensorData};

/// Pixels per image (8×8, scaled to [0, 1]).
pub const PIXELS: usize = 64;
/// Classes (digits 0–9).
pub const CLASSES: usize = 10;

/// All 1,797 images (`x`: row-major `[n, 64]`) and labels.
pub fn load_digits() -> Result<(Vec<f32>, Vec<i64>), Box<dyn std::error::Error>> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/digits.csv.gz");
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(&path)?).read_to_string(&mut text)?;
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for (n, line) in text.lines().enumerate() {
        let v: Vec<f32> = line
            .split(',')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{}:{}: {e}", path.display(), n + 1))?;
        if v.len() != PIXELS + 1 {
            return Err(format!(
                "{}:{}: expected 65 values, got {}",
                path.display(),
                n + 1,
                v.len()
            )
            .into());
        }
        x.extend(v[..PIXELS].iter().map(|p| p / 16.0));
        y.push(v[PIXELS] as i64);
    }
    Ok((x, y))
}

/// The rows `rows` of `x`/`y` as tensors on `device`.
pub fn batch(x: &[f32], y: &[i64], rows: &[usize], device: &Device) -> (Tensor<2>, Tensor<1, Int>) {
    let xs: Vec<f32> = rows
        .iter()
        .flat_map(|&r| x[r * PIXELS..(r + 1) * PIXELS].iter().copied())
        .collect();
    let ys: Vec<i64> = rows.iter().map(|&r| y[r]).collect();
    (
        Tensor::from_data(TensorData::new(xs, [rows.len(), PIXELS]), device),
        Tensor::from_data(TensorData::new(ys, [rows.len()]), device),
    )
}

/// Fisher–Yates shuffle driven by a 64-bit LCG state.
pub fn shuffle(v: &mut [usize], state: &mut u64) {
    for i in (1..v.len()).rev() {
        *state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        v.swap(i, ((*state >> 33) % (i as u64 + 1)) as usize);
    }
}

/// Rotates every 8×8 image by `quarter` quarter turns (counter-clockwise).
pub fn rotate(x: &[f32], quarter: usize) -> Vec<f32> {
    let mut out = x.to_vec();
    for (img, src) in out.chunks_mut(PIXELS).zip(x.chunks(PIXELS)) {
        for i in 0..8 {
            for j in 0..8 {
                let (si, sj) = match quarter % 4 {
                    0 => (i, j),
                    1 => (j, 7 - i),
                    2 => (7 - i, 7 - j),
                    _ => (7 - j, i),
                };
                img[i * 8 + j] = src[si * 8 + sj];
            }
        }
    }
    out
}

/// Mean and sample standard deviation (0 for a single value).
pub fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

/// `mean ± sd` with one decimal, as the docs tables print it.
pub fn pm(v: &[f64]) -> String {
    let (m, s) = mean_sd(v);
    format!("{m:.1} ± {s:.1}")
}

/// Row indices of the train, validation and test sets.
pub struct Splits {
    /// Rows the models train on.
    pub train: Vec<usize>,
    /// Rows hyper-parameters are chosen on (never trained on).
    pub val: Vec<usize>,
    /// Rows the tables report (never looked at while choosing).
    pub test: Vec<usize>,
}

impl Splits {
    /// The `n` rows shuffled with `seed`, 80 % / 20 % into training and test, and the last
    /// `val_fraction` of the training rows held out for validation.
    pub fn new(n: usize, seed: u64, val_fraction: f64) -> Self {
        let mut order: Vec<usize> = (0..n).collect();
        let mut rng = seed;
        shuffle(&mut order, &mut rng);
        let (train, test) = order.split_at(n * 4 / 5);
        let n_val = (train.len() as f64 * val_fraction).round() as usize;
        let (train, val) = train.split_at(train.len() - n_val);
        Self {
            train: train.to_vec(),
            val: val.to_vec(),
            test: test.to_vec(),
        }
    }

    /// "1221 train, 216 validation, 360 test".
    pub fn summary(&self) -> String {
        format!(
            "{} train, {} validation, {} test",
            self.train.len(),
            self.val.len(),
            self.test.len()
        )
    }
}
