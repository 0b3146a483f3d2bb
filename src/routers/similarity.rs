//! The similarity router, L2R's baseline (Araujo et al. 2024, arXiv 2408.09053): route each
//! input to the task whose memory mean is most cosine-similar, with weight 1. Built from a
//! task memory by [`SimilarityRouter::from_memory`] (in [`continual::l2r`](crate::continual::l2r)).

use burn::tensor::{Device, Tensor};

use crate::error::{Error, Result};
use crate::routing::{Router, RouterInput, Routing};
use crate::tensor_util::float_tensor;

/// Routes each input to the task whose memory mean is most cosine-similar (weight 1).
#[derive(Clone, Debug)]
pub struct SimilarityRouter {
    /// Unit-norm task means, `[d, tasks]`.
    means_t: Tensor<2>,
}

impl SimilarityRouter {
    /// A router from per-task sums (or means) of examples, `sums[t * d..(t + 1) * d]` for task
    /// `t`: each is normalised to unit length; a task whose sum is zero is never chosen.
    pub(crate) fn from_task_sums(means: &[f64], tasks: usize, d: usize, device: &Device) -> Self {
        let mut t_major = vec![0f32; d * tasks];
        for t in 0..tasks {
            let row = &means[t * d..(t + 1) * d];
            let n = row.iter().map(|v| v * v).sum::<f64>().sqrt();
            for (j, v) in row.iter().enumerate() {
                t_major[j * tasks + t] = if n > 0.0 { (v / n) as f32 } else { -1e3 };
            }
        }
        Self {
            means_t: float_tensor(t_major, [d, tasks], device),
        }
    }
}

impl Router for SimilarityRouter {
    fn num_modules(&self) -> usize {
        self.means_t.dims()[1]
    }

    fn route_input(&self, input: RouterInput<'_>) -> Result<Routing> {
        let x = input.into_rows("SimilarityRouter")?;
        let [rows, d] = x.dims();
        if d != self.means_t.dims()[0] {
            return Err(Error::shape(
                "SimilarityRouter input width",
                self.means_t.dims()[0].to_string(),
                d.to_string(),
            ));
        }
        let norms = x.clone().powi_scalar(2).sum_dim(1).sqrt().clamp_min(1e-12);
        let sims = (x.clone() / norms).matmul(self.means_t.clone());
        let idx = sims.argmax(1);
        let w = Tensor::<2>::ones([rows, 1], &x.device());
        Routing::new(idx, w, self.num_modules())
    }
}
