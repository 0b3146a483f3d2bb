//! Local Module Composition (LMC; Ostapenko et al., NeurIPS 2021, "Continual Learning via
//! Local Module Composition", arXiv 2111.07736).
//!
//! A modular layer whose modules each have
//! - a **functional part** `f_m(x) = relu(x W_m + b_m)`, and
//! - a **structural part**, a small decoder `g_m` that reconstructs the module's input from its
//!   output. Its reconstruction error on a *detached* input,
//!   `γ_m(x) = mean((g_m(f_m(x̄)) − x̄)²)`, is the module's (ir)relevance for `x`.
//!
//! Routing is local: `w_m(x) = softmax_m(−γ_m(x) / (T·μ_m))`, with `μ_m` the module's running
//! mean of `γ` (1 before it has statistics), so each module's relevance is judged against what
//! is normal for it (optionally averaged over the batch, the
//! batch-level prior, when a batch is known to come from one task), and the layer outputs
//! `Σ_m w_m f_m(x)`. The authors' reference code routes differently ([`LmcRouting::Reference`]):
//! `w(x) ∝ softmax_m(−ln γ_m(x) / T) · softmax_m(−ln mean_batch γ_m / T_p)`, a per-row
//! likelihood times a batch-level structural prior; both forms are available and
//! examples/continual_text.rs compares them. The routing weights carry no gradient into the decoders; decoders learn
//! only from the structural loss `Σ_m mean γ_m` over the trainable modules.
//!
//! **Expansion.** Each module keeps running statistics (mean, variance) of its `γ` on the data
//! it was trained on. At the start of a new task the layer z-scores the batch's mean `γ` under
//! every frozen module's statistics; only if **every** frozen module reports an outlier
//! (`z > z_threshold`) is a new module added. A new module first goes through a **projection
//! phase** (a few steps that train only structural parts, so its decoder becomes a reliable
//! relevance estimate before its function is trained). Modules **freeze** at the end of a task
//! (their parameters stop receiving gradients and their statistics are fixed).
//!
//! **Task-agnostic inference.** An [`LmcModel`] has one head per task; for each input it picks
//! the head with the lowest energy `E_h(x) = −logsumexp(head_h(x))` (the free energy of Liu et
//! al. 2020) and predicts with it.
//!
//! **Fusion.** Two independently trained models with the same layer widths are fused by
//! concatenating, layer by layer, their modules (with their statistics) and their heads. Local
//! routing sends each input to the modules whose decoders reconstruct it, so no fine-tuning is
//! needed.

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::{relu, softmax};
use burn::tensor::{Device, Tensor};

use crate::error::{Error, Result};
use crate::routing::{DispatchPlan, Router, RouterInput, Routing, WeightedSum};
use crate::tensor_util::to_vec_f32;

/// One LMC module: functional part and structural decoder.
#[derive(Module, Debug)]
pub struct LmcModule {
    /// Functional part `d_in → d_out` (ReLU after).
    pub func: Linear,
    /// Structural decoder `d_out → d_in`.
    pub decoder: Linear,
}

impl LmcModule {
    fn new(d_in: usize, d_out: usize, device: &Device) -> Self {
        Self {
            func: LinearConfig::new(d_in, d_out).init(device),
            decoder: LinearConfig::new(d_out, d_in).init(device),
        }
    }

    /// Per-row reconstruction error of a detached input, `[rows]`.
    fn gamma(&self, x: &Tensor<2>) -> Tensor<1> {
        let xd = x.clone().detach();
        let rec = self.decoder.forward(relu(self.func.forward(xd.clone())));
        let [rows, _] = xd.dims();
        (rec - xd).powi_scalar(2).mean_dim(1).reshape([rows])
    }
}

/// Running mean and variance (Welford) of one module's `γ`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunningStats {
    /// Samples seen.
    pub count: u64,
    /// Mean.
    pub mean: f64,
    m2: f64,
}

impl RunningStats {
    /// Adds samples.
    pub fn update(&mut self, values: &[f32]) {
        for &v in values {
            let v = f64::from(v);
            self.count += 1;
            let d = v - self.mean;
            self.mean += d / self.count as f64;
            self.m2 += d * (v - self.mean);
        }
    }

    /// Standard deviation (0 with fewer than two samples).
    pub fn std(&self) -> f64 {
        if self.count < 2 {
            0.0
        } else {
            (self.m2 / (self.count - 1) as f64).sqrt()
        }
    }

    /// z-score of `v`.
    pub fn z(&self, v: f64) -> f64 {
        (v - self.mean) / self.std().max(1e-8)
    }
}

/// How an [`LmcLayer`] turns reconstruction errors `γ` into routing weights.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LmcRouting {
    /// `softmax_m(−γ_m / (T·μ_m))`: each module's error relative to its own running mean
    /// (modula's default, the form of the paper's equation).
    Normalized,
    /// The reference implementation's form: `softmax_m(−ln γ_m / T) · p_m`, renormalised,
    /// with the batch-level structural prior `p = softmax_m(−ln mean_batch γ_m / T_p)`
    /// (`prior_temperature = T_p`; `None`: a uniform prior).
    Reference {
        /// Temperature `T_p` of the batch-level prior; `None` turns the prior off.
        prior_temperature: Option<f64>,
    },
}

/// Settings of an [`LmcLayer`]. Serialisable; the fields left out of a JSON document take the
/// defaults.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct LmcConfig {
    /// Routing temperature `T`.
    pub temperature: f64,
    /// z-score above which a frozen module calls a batch an outlier.
    pub z_threshold: f64,
    /// Average the routing over the batch (the batch-level prior of the
    /// [`Normalized`](LmcRouting::Normalized) form).
    pub batch_prior: bool,
    /// The routing form.
    pub routing: LmcRouting,
}

impl Default for LmcConfig {
    fn default() -> Self {
        Self {
            temperature: 0.1,
            z_threshold: 3.0,
            batch_prior: false,
            routing: LmcRouting::Normalized,
        }
    }
}

/// LMC's local routing as a [`Router`]: the dense routing `softmax(−γ / (T·μ))` of the rows.
impl Router for LmcLayer {
    fn num_modules(&self) -> usize {
        self.modules.len()
    }

    fn route_input(&self, input: RouterInput<'_>) -> Result<Routing> {
        let x = input.into_rows("LmcLayer")?;
        Routing::from_dense(self.weights_of(self.gammas(x)?))
    }
}

/// What one layer did on a batch.
#[derive(Clone, Debug)]
pub struct LayerTrace {
    /// Routing weights `[rows, modules]` (each row sums to one).
    pub weights: Tensor<2>,
    /// Per-row `γ` of every module, `[rows, modules]`.
    pub gamma: Tensor<2>,
    /// Structural loss over the trainable modules (a scalar, `[1]`).
    pub structural_loss: Tensor<1>,
}

/// A layer of LMC modules (see the [module docs](self)).
#[derive(Module, Debug)]
pub struct LmcLayer {
    /// The modules.
    pub modules: Vec<LmcModule>,
    #[module(skip)]
    frozen: Vec<bool>,
    #[module(skip)]
    stats: Vec<RunningStats>,
    #[module(skip)]
    config: LmcConfig,
    #[module(skip)]
    d_in: usize,
    #[module(skip)]
    d_out: usize,
}

impl LmcLayer {
    /// A layer `d_in → d_out` with one trainable module.
    ///
    /// # Errors
    /// [`Error::Invalid`] for zero widths or a temperature that is not positive.
    pub fn new(d_in: usize, d_out: usize, config: LmcConfig, device: &Device) -> Result<Self> {
        if d_in == 0 || d_out == 0 {
            return Err(Error::invalid(
                "LMC layer widths",
                "d_in and d_out must be at least 1",
            ));
        }
        crate::routers::check_temperature("LMC temperature", config.temperature)?;
        if let LmcRouting::Reference {
            prior_temperature: Some(tp),
        } = config.routing
        {
            crate::routers::check_temperature("LMC prior temperature", tp)?;
        }
        Ok(Self {
            modules: vec![LmcModule::new(d_in, d_out, device)],
            frozen: vec![false],
            stats: vec![RunningStats::default()],
            config,
            d_in,
            d_out,
        })
    }

    /// Input width.
    pub fn d_in(&self) -> usize {
        self.d_in
    }

    /// Output width.
    pub fn d_out(&self) -> usize {
        self.d_out
    }

    /// Number of modules.
    pub fn num_modules(&self) -> usize {
        self.modules.len()
    }

    /// Which modules are frozen.
    pub fn frozen(&self) -> &[bool] {
        &self.frozen
    }

    /// The modules' running statistics.
    pub fn stats(&self) -> &[RunningStats] {
        &self.stats
    }

    fn check_input(&self, x: &Tensor<2>) -> Result<()> {
        let [rows, d] = x.dims();
        if d != self.d_in {
            return Err(Error::shape(
                "LmcLayer input width",
                self.d_in.to_string(),
                d.to_string(),
            ));
        }
        if rows == 0 {
            return Err(Error::invalid(
                "LMC batch",
                "the batch is empty; give at least one row",
            ));
        }
        Ok(())
    }

    /// `γ` of every module for `x`, `[rows, modules]`.
    ///
    /// # Errors
    /// Wrong width or an empty batch.
    pub fn gammas(&self, x: &Tensor<2>) -> Result<Tensor<2>> {
        self.check_input(x)?;
        Ok(Tensor::stack::<2>(
            self.modules.iter().map(|m| m.gamma(x)).collect(),
            1,
        ))
    }

    /// The forward pass with its routing trace.
    ///
    /// # Errors
    /// Wrong width or an empty batch.
    pub fn forward(&self, x: Tensor<2>) -> Result<(Tensor<2>, LayerTrace)> {
        let gamma = self.gammas(&x)?;
        self.mix(x, gamma)
    }

    /// LMC's local routing weights from `γ` (`[rows, modules]`): each module's `γ` relative
    /// to its own running mean (1 on the data it was trained on), so modules trained
    /// separately (fusion) or on data of other scales compare fairly; softmax of `−γ / (T·μ)`,
    /// averaged over the batch under the batch prior. No gradient flows into `γ`.
    fn weights_of(&self, gamma: Tensor<2>) -> Tensor<2> {
        let [rows, m] = gamma.dims();
        if let LmcRouting::Reference { prior_temperature } = self.config.routing {
            let gamma = gamma.detach().clamp_min(1e-12);
            let likelihood = softmax(
                gamma
                    .clone()
                    .log()
                    .neg()
                    .div_scalar(self.config.temperature),
                1,
            );
            let Some(tp) = prior_temperature else {
                return likelihood;
            };
            let batch = gamma.mean_dim(0).log();
            let prior = softmax(batch.neg().div_scalar(tp), 1);
            let w = likelihood * prior.expand([rows, m]);
            return w.clone() / w.sum_dim(1).clamp_min(1e-30);
        }
        let scale: Vec<f32> = self
            .stats
            .iter()
            .map(|s| {
                let mu = if s.count > 0 && s.mean > 0.0 {
                    s.mean
                } else {
                    1.0
                };
                (mu * self.config.temperature) as f32
            })
            .collect();
        let scale = crate::tensor_util::float_tensor(scale, [1, m], &gamma.device());
        let logits = gamma.detach().neg() / scale;
        if self.config.batch_prior {
            softmax(logits.mean_dim(0), 1).expand([rows, m])
        } else {
            softmax(logits, 1)
        }
    }

    /// The routing and mixture for `x` given its already computed `γ` (`[rows, modules]`):
    /// a dense routing, and the weighted sum of every module's output through the dispatch.
    fn mix(&self, x: Tensor<2>, gamma: Tensor<2>) -> Result<(Tensor<2>, LayerTrace)> {
        let rows = gamma.dims()[0];
        let weights = self.weights_of(gamma.clone());
        let plan = DispatchPlan::new(&Routing::from_dense(weights.clone())?)?;
        let device = x.device();
        let out = plan.apply(x, self.d_out, &WeightedSum, |m, xm| {
            Ok(relu(self.modules[m].func.forward(xm)))
        })?;
        let mut structural = Tensor::<1>::zeros([1], &device);
        for (i, _) in self.frozen.iter().enumerate().filter(|(_, f)| !**f) {
            structural = structural + gamma.clone().slice([0..rows, i..i + 1]).mean().reshape([1]);
        }
        Ok((
            out,
            LayerTrace {
                weights,
                gamma,
                structural_loss: structural,
            },
        ))
    }

    /// Whether `x` (a batch of a new task) is an outlier for every frozen module: the
    /// expansion test. `false` when no module is frozen yet.
    ///
    /// # Errors
    /// Wrong width or an empty batch.
    pub fn is_outlier_for_all(&self, x: &Tensor<2>) -> Result<bool> {
        let gamma = self.gammas(x)?;
        let mean = to_vec_f32(gamma.mean_dim(0));
        let mut any_frozen = false;
        for ((&g, s), &f) in mean.iter().zip(&self.stats).zip(&self.frozen) {
            if f {
                any_frozen = true;
                if s.z(f64::from(g)) <= self.config.z_threshold {
                    return Ok(false);
                }
            }
        }
        Ok(any_frozen)
    }

    /// Turns the batch-level prior on or off (route every row of a batch by the batch's mean
    /// relevance: for batches known to come from one task).
    pub fn set_batch_prior(&mut self, on: bool) {
        self.config.batch_prior = on;
    }

    /// Adds a trainable module (returns its index).
    pub fn add_module(&mut self, device: &Device) -> usize {
        self.modules
            .push(LmcModule::new(self.d_in, self.d_out, device));
        self.frozen.push(false);
        self.stats.push(RunningStats::default());
        self.modules.len() - 1
    }

    /// Updates the running statistics of the trainable modules with `x`'s `γ`.
    ///
    /// # Errors
    /// Wrong width or an empty batch.
    pub fn update_stats(&mut self, x: &Tensor<2>) -> Result<()> {
        let gamma = self.gammas(x)?;
        self.record_gamma(gamma);
        Ok(())
    }

    /// Adds per-row `γ` (`[rows, modules]`, e.g. a forward's [`LayerTrace::gamma`]) to the
    /// trainable modules' running statistics.
    fn record_gamma(&mut self, gamma: Tensor<2>) {
        let [rows, m] = gamma.dims();
        let g = to_vec_f32(gamma);
        for i in 0..m {
            if !self.frozen[i] {
                let col: Vec<f32> = (0..rows).map(|r| g[r * m + i]).collect();
                self.stats[i].update(&col);
            }
        }
    }

    /// Freezes every module (end of a task).
    pub fn freeze_modules(&mut self) {
        let modules = std::mem::take(&mut self.modules);
        self.modules = modules
            .into_iter()
            .zip(&self.frozen)
            .map(|(m, &f)| if f { m } else { m.no_grad() })
            .collect();
        self.frozen.iter_mut().for_each(|f| *f = true);
    }

    fn append(&mut self, other: LmcLayer) {
        self.modules.extend(other.modules);
        self.frozen.extend(other.frozen);
        self.stats.extend(other.stats);
    }
}

/// A multi-layer LMC model with one head per task (see the [module docs](self)).
#[derive(Module, Debug)]
pub struct LmcModel {
    /// The modular layers.
    pub layers: Vec<LmcLayer>,
    /// One classifier head per task.
    pub heads: Vec<Linear>,
    #[module(skip)]
    classes: usize,
}

/// The routing trace of a model forward.
#[derive(Clone, Debug)]
pub struct ModelTrace {
    /// One trace per layer.
    pub layers: Vec<LayerTrace>,
}

impl ModelTrace {
    /// The sum of the layers' structural losses.
    pub fn structural_loss(&self) -> Tensor<1> {
        let mut it = self.layers.iter().map(|l| l.structural_loss.clone());
        let first = it.next();
        it.fold(
            first.unwrap_or_else(|| Tensor::zeros([1], &Device::flex())),
            |a, b| a + b,
        )
    }
}

impl LmcModel {
    /// Layers of widths `widths[0] → widths[1] → …`, heads `widths.last() → classes`, no heads
    /// yet (add one per task with [`add_task`](Self::add_task)).
    ///
    /// # Errors
    /// [`Error::Invalid`] for fewer than two widths or zero classes; as [`LmcLayer::new`].
    pub fn new(
        widths: &[usize],
        classes: usize,
        config: LmcConfig,
        device: &Device,
    ) -> Result<Self> {
        if widths.len() < 2 || classes == 0 {
            return Err(Error::invalid(
                "LMC model",
                "give at least an input and one layer width, and at least one class",
            ));
        }
        let layers = widths
            .windows(2)
            .map(|w| LmcLayer::new(w[0], w[1], config.clone(), device))
            .collect::<Result<_>>()?;
        Ok(Self {
            layers,
            heads: Vec::new(),
            classes,
        })
    }

    /// Number of tasks (heads).
    pub fn num_tasks(&self) -> usize {
        self.heads.len()
    }

    /// Modules per layer.
    pub fn modules_per_layer(&self) -> Vec<usize> {
        self.layers.iter().map(LmcLayer::num_modules).collect()
    }

    /// Starts a new task with `first_batch`: adds its head, and, layer by layer, a module
    /// wherever every frozen module calls the batch an outlier. Returns which layers grew.
    ///
    /// # Errors
    /// Wrong width or an empty batch.
    pub fn add_task(&mut self, first_batch: &Tensor<2>) -> Result<Vec<bool>> {
        let device = first_batch.device();
        let d_last = self.layers.last().map_or(0, LmcLayer::d_out);
        self.heads
            .push(LinearConfig::new(d_last, self.classes).init(&device));
        let mut grew = Vec::new();
        let mut h = first_batch.clone();
        for layer in self.layers.iter_mut() {
            let g = layer.is_outlier_for_all(&h)?;
            if g {
                layer.add_module(&device);
            }
            grew.push(g);
            h = layer.forward(h)?.0.detach();
        }
        Ok(grew)
    }

    /// The shared trunk: features of the last layer and the routing trace.
    ///
    /// # Errors
    /// Wrong width or an empty batch.
    pub fn features(&self, x: Tensor<2>) -> Result<(Tensor<2>, ModelTrace)> {
        let mut h = x;
        let mut traces = Vec::new();
        for layer in &self.layers {
            let (o, t) = layer.forward(h)?;
            h = o;
            traces.push(t);
        }
        Ok((h, ModelTrace { layers: traces }))
    }

    /// Logits of task `task`'s head.
    ///
    /// # Errors
    /// [`Error::Invalid`] for an unknown task; as [`features`](Self::features).
    pub fn forward_task(&self, x: Tensor<2>, task: usize) -> Result<(Tensor<2>, ModelTrace)> {
        let head = self.heads.get(task).ok_or_else(|| {
            Error::invalid(
                "LMC task",
                format!(
                    "task {task} has no head; the model has {} tasks",
                    self.heads.len()
                ),
            )
        })?;
        let (h, trace) = self.features(x)?;
        Ok((head.forward(h), trace))
    }

    /// Task-agnostic prediction: per row, the head with the lowest energy
    /// `−logsumexp(logits)`, and its argmax class. Returns `(classes, chosen heads)`.
    ///
    /// # Errors
    /// [`Error::NotReady`] with no heads; as [`features`](Self::features).
    pub fn predict(&self, x: Tensor<2>) -> Result<(Vec<usize>, Vec<usize>)> {
        if self.heads.is_empty() {
            return Err(Error::NotReady {
                what: "the LMC model".into(),
                fix: "it has no task heads yet; call add_task first".into(),
            });
        }
        let (h, _) = self.features(x)?;
        let rows = h.dims()[0];
        let mut best_e = vec![f32::INFINITY; rows];
        let mut best_h = vec![0usize; rows];
        let mut best_c = vec![0usize; rows];
        for (t, head) in self.heads.iter().enumerate() {
            let logits = head.forward(h.clone());
            let lse = to_vec_f32(logits.clone().exp().sum_dim(1).log().reshape([rows]));
            let cls: Vec<i64> = logits.argmax(1).into_data().iter::<i64>().collect();
            for r in 0..rows {
                let e = -lse[r];
                if e < best_e[r] {
                    best_e[r] = e;
                    best_h[r] = t;
                    best_c[r] = cls[r] as usize;
                }
            }
        }
        Ok((best_c, best_h))
    }

    /// Turns the batch-level prior on or off in every layer.
    pub fn set_batch_prior(&mut self, on: bool) {
        for l in self.layers.iter_mut() {
            l.set_batch_prior(on);
        }
    }

    /// Updates every layer's running statistics on a batch of the current task.
    ///
    /// # Errors
    /// Wrong width or an empty batch.
    pub fn update_stats(&mut self, x: &Tensor<2>) -> Result<()> {
        let mut h = x.clone();
        for layer in self.layers.iter_mut() {
            // γ is computed once: it updates the statistics, then routes the next layer's
            // input under them.
            let gamma = layer.gammas(&h)?;
            layer.record_gamma(gamma.clone());
            h = layer.mix(h, gamma)?.0.detach();
        }
        Ok(())
    }

    /// Freezes every module and head (end of a task).
    pub fn freeze_modules(&mut self) {
        for l in self.layers.iter_mut() {
            l.freeze_modules();
        }
        let heads = std::mem::take(&mut self.heads);
        self.heads = heads.into_iter().map(Module::no_grad).collect();
    }

    /// Fuses two independently trained models: modules concatenated layer by layer, `b`'s
    /// heads after `a`'s (task `i` of `b` becomes `a.num_tasks() + i`). No fine-tuning.
    ///
    /// # Errors
    /// [`Error::Shape`] if the models differ in depth, layer widths or classes.
    pub fn fuse(a: LmcModel, b: LmcModel) -> Result<LmcModel> {
        let wa: Vec<(usize, usize)> = a.layers.iter().map(|l| (l.d_in, l.d_out)).collect();
        let wb: Vec<(usize, usize)> = b.layers.iter().map(|l| (l.d_in, l.d_out)).collect();
        if wa != wb || a.classes != b.classes {
            return Err(Error::shape(
                "LmcModel::fuse (layer widths and classes must match)",
                format!("{wa:?}, {} classes", a.classes),
                format!("{wb:?}, {} classes", b.classes),
            ));
        }
        let mut out = a;
        for (la, lb) in out.layers.iter_mut().zip(b.layers) {
            la.append(lb);
        }
        out.heads.extend(b.heads);
        Ok(out)
    }
}
