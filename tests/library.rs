//! Library operations against PEFT 0.21.2's own numbers (merge_weighted, arrow_routing) and
//! their mathematical properties.

mod common;

use burn::tensor::{Device, Tensor};
use common::{
    HostFactors, Mat, Rng, assert_close, devices, factors, golden, mat, mat_diff, qr_q, svd,
};
use modula::library::arith::{ia3_add, ia3_negate, lora_add, lora_negate, lora_scale};
use modula::library::{
    ArrowLinear, Combination, LoraFactors, MajoritySign, MergeOptions, MergeSpace, arrow_prototype,
    arrow_prototypes, compress, gen_know_sub, merge, slerp,
};
use modula::{AdapterFusionConfig, PolytroponRouterConfig, XLoraRouterConfig};
use modula::{ArrowRouter, LoraMix};
use modula::{Router, TensorFile};

fn golden_adapters(f: &TensorFile, prefix: &str, n: usize) -> Vec<LoraFactors> {
    (0..n)
        .map(|i| {
            factors(
                &mat(f, &format!("{prefix}{i}.lora_A")),
                &mat(f, &format!("{prefix}{i}.lora_B")),
                2.0,
            )
        })
        .collect()
}

/// name, type, weights, density, sign election, svd_rank, factors comparable (not SVD).
type Case<'a> = (
    &'a str,
    Combination,
    &'a [f64],
    Option<f64>,
    MajoritySign,
    Option<usize>,
    bool,
);

#[test]
fn every_deterministic_peft_combination_matches() {
    let g = golden("merge_weighted.safetensors");
    let adapters = golden_adapters(&g, "a", 3);
    let refs: Vec<&LoraFactors> = adapters.iter().collect();
    // Each input's own delta first: our s·B·A is PEFT's get_delta_weight.
    for (i, a) in adapters.iter().enumerate() {
        assert!(mat_diff(&a.delta_mat(), &mat(&g, &format!("a{i}.delta_weight"))) < 1e-5);
    }
    let cases: &[Case] = &[
        (
            "linear",
            Combination::Linear,
            &[0.5, 0.3, 0.2],
            None,
            MajoritySign::Total,
            None,
            true,
        ),
        (
            "linear_negative_weight",
            Combination::Linear,
            &[0.5, -0.3, 0.2],
            None,
            MajoritySign::Total,
            None,
            true,
        ),
        (
            "cat",
            Combination::Cat,
            &[0.5, 0.3, 0.2],
            None,
            MajoritySign::Total,
            None,
            true,
        ),
        (
            "svd",
            Combination::Svd,
            &[0.5, 0.3, 0.2],
            None,
            MajoritySign::Total,
            None,
            false,
        ),
        (
            "svd_rank2",
            Combination::Svd,
            &[0.5, 0.3, 0.2],
            None,
            MajoritySign::Total,
            Some(2),
            false,
        ),
        (
            "ties",
            Combination::Ties,
            &[0.5, 0.3, 0.2],
            Some(0.5),
            MajoritySign::Total,
            None,
            true,
        ),
        (
            "ties_frequency",
            Combination::Ties,
            &[0.5, 0.3, 0.2],
            Some(0.5),
            MajoritySign::Frequency,
            None,
            true,
        ),
        (
            "magnitude_prune",
            Combination::MagnitudePrune,
            &[0.5, 0.3, 0.2],
            Some(0.5),
            MajoritySign::Total,
            None,
            true,
        ),
        (
            "ties_svd",
            Combination::TiesSvd,
            &[0.5, 0.3, 0.2],
            Some(0.5),
            MajoritySign::Total,
            None,
            false,
        ),
        (
            "magnitude_prune_svd",
            Combination::MagnitudePruneSvd,
            &[0.5, 0.3, 0.2],
            Some(0.5),
            MajoritySign::Total,
            None,
            false,
        ),
    ];
    for &(name, c, w, density, maj, rank, factors_comparable) in cases {
        let mut opts = MergeOptions::new(c)
            .with_space(MergeSpace::Factor)
            .with_majority_sign(maj);
        opts.density = density;
        opts.svd_rank = rank;
        let m = merge(&refs, w, &opts).unwrap();
        assert_eq!(m.scaling(), 1.0, "{name}: merged adapters have scaling 1");
        let expected_delta = mat(&g, &format!("{name}.delta_weight"));
        let d = mat_diff(&m.delta_mat(), &expected_delta);
        assert!(d < 1e-5, "{name}: delta differs by {d:e}");
        let expected_a = mat(&g, &format!("{name}.lora_A"));
        assert_eq!(m.rank(), expected_a.rows, "{name}: rank");
        if factors_comparable {
            assert!(mat_diff(&m.a_mat(), &expected_a) < 1e-5, "{name}: lora_A");
            assert!(
                mat_diff(&m.b_mat(), &mat(&g, &format!("{name}.lora_B"))) < 1e-5,
                "{name}: lora_B"
            );
        }
    }
}

#[test]
fn svd_merge_singular_values_match_peft() {
    let g = golden("merge_weighted.safetensors");
    let adapters = golden_adapters(&g, "a", 3);
    let refs: Vec<&LoraFactors> = adapters.iter().collect();
    // The exact delta-space linear merge is Σ w s B A, whose spectrum PEFT recorded.
    let exact = merge(
        &refs,
        &[0.5, 0.3, 0.2],
        &MergeOptions::new(Combination::Linear),
    )
    .unwrap();
    let expected = g.get("svd.singular_values_of_merged_delta").unwrap();
    let ours = svd(&exact.delta_mat()).s;
    assert_eq!(ours.len(), expected.data.len(), "number of singular values");
    for (i, (a, b)) in ours.iter().zip(&expected.data).enumerate() {
        assert!((a - f64::from(*b)).abs() < 1e-4, "σ_{i}: {a} vs {b}");
    }
    // The delta-space linear merge is exact: Σ w_i ΔW_i.
    let mut sum = Mat::zeros(12, 16);
    for (a, w) in adapters.iter().zip([0.5, 0.3, 0.2]) {
        for (s, v) in sum.data.iter_mut().zip(a.delta_mat().data) {
            *s += w * v;
        }
    }
    assert!(mat_diff(&exact.delta_mat(), &sum) < 1e-12);
    assert_eq!(exact.rank(), 12);
}

/// Per-entry mean and standard deviation over `samples` (each a flat matrix).
fn entry_stats(samples: &[Vec<f64>]) -> (Vec<f64>, Vec<f64>) {
    let n = samples.len() as f64;
    let len = samples[0].len();
    let mean: Vec<f64> = (0..len)
        .map(|j| samples.iter().map(|s| s[j]).sum::<f64>() / n)
        .collect();
    let sd: Vec<f64> = (0..len)
        .map(|j| {
            let v = samples
                .iter()
                .map(|s| (s[j] - mean[j]).powi(2))
                .sum::<f64>()
                / (n - 1.0);
            v.sqrt()
        })
        .collect();
    (mean, sd)
}

/// Fraction of exact zeros over all entries of all samples.
fn zero_fraction(samples: &[Vec<f64>]) -> f64 {
    let total: usize = samples.iter().map(|s| s.len()).sum();
    let zeros: usize = samples
        .iter()
        .map(|s| s.iter().filter(|v| **v == 0.0).count())
        .sum();
    zeros as f64 / total as f64
}

/// Asserts that the zero fractions of the A and B samples are `p` within 3σ, where σ is the
/// standard deviation of a binomial fraction over all their (independent) entries.
fn assert_zero_fractions(a: &[Vec<f64>], b: &[Vec<f64>], p: f64, what: &str) {
    for (samples, factor) in [(a, "A"), (b, "B")] {
        let frac = zero_fraction(samples);
        let entries = (samples.len() * samples[0].len()) as f64;
        let sigma = (p * (1.0 - p) / entries).sqrt();
        assert!(
            (frac - p).abs() < 3.0 * sigma,
            "{what}: zero fraction of {factor} {frac}, expected {p} ± {}",
            3.0 * sigma
        );
    }
}

/// `trials` seeded factor-space DARE merges of the golden adapters: (A, B, ΔW) samples.
type Samples = (Vec<Vec<f64>>, Vec<Vec<f64>>, Vec<Vec<f64>>);
fn dare_samples(refs: &[&LoraFactors], c: Combination, density: f64, trials: u64) -> Samples {
    let (mut a, mut b, mut d) = (Vec::new(), Vec::new(), Vec::new());
    for t in 0..trials {
        let opts = MergeOptions::new(c)
            .with_space(MergeSpace::Factor)
            .with_density(density)
            .with_seed(1000 + t);
        let m = merge(refs, &[0.5, 0.3, 0.2], &opts).unwrap();
        d.push(m.delta_mat().data);
        a.push(m.a_mat().data);
        b.push(m.b_mat().data);
    }
    (a, b, d)
}

/// z for comparing a few hundred entries at once with a family-wise false-alarm rate of
/// 1e-3 (Bonferroni: two-sided p = 1e-3 / 300 per entry).
const FAMILY_Z: f64 = 4.65;

/// Standard error of the difference of two independent sample means, entry by entry, from
/// the two samples' standard deviations over `n` draws each.
fn se_diff(sd_a: &[f64], sd_b: &[f64], n: f64) -> Vec<f64> {
    sd_a.iter()
        .zip(sd_b)
        .map(|(a, b)| ((a * a + b * b) / n).sqrt())
        .collect()
}

/// Asserts `|ours − theirs| ≤ k·sd` entry by entry.
fn within(ours: &[f64], theirs: &[f64], sd: &[f64], k: f64, what: &str) {
    assert_eq!(ours.len(), theirs.len(), "{what}: lengths");
    assert_eq!(ours.len(), sd.len(), "{what}: lengths");
    for (j, ((o, t), s)) in ours.iter().zip(theirs).zip(sd).enumerate() {
        assert!(
            (o - t).abs() <= k * s + 1e-9,
            "{what}[{j}]: {o} vs {t} (allowed {})",
            k * s
        );
    }
}

#[test]
fn dare_statistics_match_peft() {
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::data("manifest.json")).unwrap())
            .unwrap();
    let g = golden("merge_weighted.safetensors");
    let adapters = golden_adapters(&g, "a", 3);
    let refs: Vec<&LoraFactors> = adapters.iter().collect();
    let linear = merge(
        &refs,
        &[0.5, 0.3, 0.2],
        &MergeOptions::new(Combination::Linear).with_space(MergeSpace::Factor),
    )
    .unwrap();
    let trials = 512u64;
    let n = trials as f64;
    for (c, name) in [
        (Combination::DareLinear, "dare_linear"),
        (Combination::DareTies, "dare_ties"),
    ] {
        let (sa, sb, sd) = dare_samples(&refs, c, 0.5, trials);
        // PEFT's statistics over its own 512 seeded trials, from the golden manifest.
        let peft = &manifest["files"]["merge_weighted.safetensors"]["dare"][name];
        assert_eq!(peft["density"].as_f64(), Some(0.5));
        let peft_mean = peft["frobenius_delta_mean"]
            .as_f64()
            .expect("manifest mean");
        let peft_std = peft["frobenius_delta_std"].as_f64().expect("manifest std");
        // An entry is zero when all three inputs dropped it: p = (1 − density)³. The fraction
        // over 512 trials of 64 (A) or 48 (B) independent entries has σ = √(p(1−p)/N).
        assert_zero_fractions(&sa, &sb, (1.0f64 - 0.5).powi(3), name);
        let norms: Vec<f64> = sd
            .iter()
            .map(|d| d.iter().map(|v| v * v).sum::<f64>().sqrt())
            .collect();
        let mean = norms.iter().sum::<f64>() / n;
        let tol = 4.0 * peft_std / n.sqrt();
        assert!(
            (mean - peft_mean).abs() < tol,
            "{name}: mean ‖ΔW‖ {mean} vs {peft_mean}"
        );
        // E[A], E[B] and E[ΔW] against the means PEFT stored: two independent sample means
        // of 512 draws each, compared with the standard error of their difference. PEFT
        // stored no per-entry std of ΔW; ours stands in for both samples.
        let (mean_a, sd_a) = entry_stats(&sa);
        let (mean_b, sd_b) = entry_stats(&sb);
        let (mean_d, sd_d) = entry_stats(&sd);
        for (ours, sd, key, peft_sd) in [
            (&mean_a, &sd_a, "mean_lora_A", Some("std_lora_A")),
            (&mean_b, &sd_b, "mean_lora_B", Some("std_lora_B")),
            (&mean_d, &sd_d, "mean_delta_weight", None),
        ] {
            let theirs_sd =
                peft_sd.map_or_else(|| sd.clone(), |k| mat(&g, &format!("{name}.{k}")).data);
            within(
                ours,
                &mat(&g, &format!("{name}.{key}")).data,
                &se_diff(sd, &theirs_sd, n),
                FAMILY_Z,
                &format!("{name}: {key} vs PEFT"),
            );
        }
        if c == Combination::DareLinear {
            // E[dare_linear] is the linear merge: one sample mean against the exact value.
            let se = |sd: &[f64]| -> Vec<f64> { sd.iter().map(|s| s / n.sqrt()).collect() };
            within(
                &mean_a,
                &linear.a_mat().data,
                &se(&sd_a),
                FAMILY_Z,
                "E[A] vs linear",
            );
            within(
                &mean_b,
                &linear.b_mat().data,
                &se(&sd_b),
                FAMILY_Z,
                "E[B] vs linear",
            );
        }
    }
}

#[test]
fn dare_at_density_0_3_matches_its_expectation_by_hand() {
    // At density d = 0.3 keeping (prob. d) and dropping (1 − d) differ, and so do 1/d and
    // 1/(1 − d): a swapped comparison or the wrong rescale moves every statistic below.
    let g = golden("merge_weighted.safetensors");
    let adapters = golden_adapters(&g, "a", 3);
    let refs: Vec<&LoraFactors> = adapters.iter().collect();
    let (d, trials) = (0.3f64, 1024u64);
    let n = trials as f64;
    let linear = merge(
        &refs,
        &[0.5, 0.3, 0.2],
        &MergeOptions::new(Combination::Linear).with_space(MergeSpace::Factor),
    )
    .unwrap();
    let p = (1.0 - d).powi(3); // 0.343: all three inputs dropped the entry
    for c in [Combination::DareLinear, Combination::DareTies] {
        let (sa, sb, sdw) = dare_samples(&refs, c, d, trials);
        assert_zero_fractions(&sa, &sb, p, c.name());
        if c != Combination::DareLinear {
            continue;
        }
        // By hand: entry j of the merged A is Σᵢ cᵢ mᵢ / d with mᵢ ~ Bernoulli(d) and
        // cᵢ = sign(wᵢ)·√|wᵢ sᵢ|·Aᵢ[j] (PEFT's factor weights), so E = Σᵢ cᵢ (the linear merge)
        // and Var = Σᵢ cᵢ² (1 − d)/d. B likewise with √|wᵢ sᵢ|·Bᵢ[j]. A and B are drawn
        // independently, so E[ΔW] = E[B] E[A] is the linear merge's ΔW.
        let hand_sd = |inputs: &[&Mat]| -> Vec<f64> {
            (0..inputs[0].data.len())
                .map(|j| {
                    let var: f64 = inputs
                        .iter()
                        .zip([0.5, 0.3, 0.2])
                        .map(|(m, w)| w * 2.0 * m.data[j].powi(2) * (1.0 - d) / d)
                        .sum();
                    (var / n).sqrt()
                })
                .collect()
        };
        let a_own: Vec<Mat> = adapters.iter().map(|f| f.a_mat()).collect();
        let b_own: Vec<Mat> = adapters.iter().map(|f| f.b_mat()).collect();
        let a_in: Vec<&Mat> = a_own.iter().collect();
        let b_in: Vec<&Mat> = b_own.iter().collect();
        let (mean_a, sd_a) = entry_stats(&sa);
        let (mean_b, _) = entry_stats(&sb);
        let (mean_d, sd_d) = entry_stats(&sdw);
        within(
            &mean_a,
            &linear.a_mat().data,
            &hand_sd(&a_in),
            FAMILY_Z,
            "E[A] at d = 0.3",
        );
        within(
            &mean_b,
            &linear.b_mat().data,
            &hand_sd(&b_in),
            FAMILY_Z,
            "E[B] at d = 0.3",
        );
        let se_d: Vec<f64> = sd_d.iter().map(|s| s / n.sqrt()).collect();
        within(
            &mean_d,
            &linear.delta_mat().data,
            &se_d,
            FAMILY_Z,
            "E[ΔW] at d = 0.3",
        );
        // The sample spread agrees with the hand variance (within 15 %, about 5 standard
        // errors of a standard deviation estimated from 1024 draws).
        for (j, (s, h)) in sd_a.iter().zip(hand_sd(&a_in)).enumerate() {
            let h = h * n.sqrt();
            assert!((s - h).abs() <= 0.15 * h + 1e-9, "sd of A[{j}]: {s} vs {h}");
        }
    }
}

#[test]
fn dare_is_deterministic_for_a_seed() {
    let g = golden("merge_weighted.safetensors");
    let adapters = golden_adapters(&g, "a", 3);
    let refs: Vec<&LoraFactors> = adapters.iter().collect();
    let opts = MergeOptions::new(Combination::DareTies)
        .with_density(0.3)
        .with_seed(7);
    let a = merge(&refs, &[0.5, 0.3, 0.2], &opts).unwrap();
    let b = merge(&refs, &[0.5, 0.3, 0.2], &opts).unwrap();
    assert_eq!(a, b);
    let c = merge(&refs, &[0.5, 0.3, 0.2], &opts.clone().with_seed(8)).unwrap();
    assert_ne!(a, c);
}

fn random_factors(rng: &mut Rng, r: usize, d_in: usize, d_out: usize, scaling: f64) -> LoraFactors {
    let a: Vec<f32> = (0..r * d_in).map(|_| 2.0 * rng.uniform() - 1.0).collect();
    let b: Vec<f32> = (0..d_out * r).map(|_| 2.0 * rng.uniform() - 1.0).collect();
    factors(
        &Mat::from_f32(r, d_in, &a),
        &Mat::from_f32(d_out, r, &b),
        scaling,
    )
}

#[test]
fn compression_is_the_best_low_rank_approximation() {
    let mut rng = Rng(11);
    let fs: Vec<LoraFactors> = (0..4)
        .map(|_| random_factors(&mut rng, 6, 40, 30, 0.5))
        .collect();
    let refs: Vec<&LoraFactors> = fs.iter().collect();
    let w = [0.4, -0.2, 0.3, 0.5];
    let exact = merge(&refs, &w, &MergeOptions::new(Combination::Linear)).unwrap();
    let dense = svd(&exact.delta_mat());
    for k in [1, 3, 6, 10] {
        let c = compress(&exact, k);
        assert_eq!(c.rank(), k);
        // Eckart–Young: the error's Frobenius norm is the root of the dropped σ².
        let mut err = exact.delta_mat();
        for (e, v) in err.data.iter_mut().zip(c.delta_mat().data) {
            *e -= v;
        }
        let expected: f64 = dense.s[k..].iter().map(|s| s * s).sum::<f64>().sqrt();
        assert!((err.frobenius() - expected).abs() < 1e-9, "k={k}");
    }
    // svd_rank on the delta-space linear merge is the same compression.
    let opts = MergeOptions::new(Combination::Linear).with_svd_rank(5);
    let m = merge(&refs, &w, &opts).unwrap();
    assert!(mat_diff(&m.delta_mat(), &compress(&exact, 5).delta_mat()) < 1e-10);
}

#[test]
fn large_delta_space_merge_is_the_best_low_rank_fit_of_the_pruned_sum() {
    // At d ≥ 300 the delta-space reducers go through the large-matrix truncated SVD (subspace
    // iteration), not the exact Jacobi SVD the 12×16 goldens take. magnitude_prune_svd at
    // rank 6 must return the Eckart–Young best rank-6 approximation of the pruned sum, which
    // is computed here by hand and decomposed with the exact dense SVD.
    let mut rng = Rng(31);
    let (d_out, d_in, k) = (320, 300, 6);
    let fs: Vec<LoraFactors> = (0..3)
        .map(|_| random_factors(&mut rng, 8, d_in, d_out, 0.5))
        .collect();
    let refs: Vec<&LoraFactors> = fs.iter().collect();
    let w = [0.5, 0.3, 0.2];
    let density = 0.5;
    let mut pruned_sum = Mat::zeros(d_out, d_in);
    for (f, wi) in fs.iter().zip(w) {
        let delta = f.delta_mat();
        let mut mags: Vec<f64> = delta.data.iter().map(|v| v.abs()).collect();
        mags.sort_by(|x, y| y.total_cmp(x));
        let keep = (density * mags.len() as f64) as usize;
        let threshold = mags[keep - 1];
        for (o, v) in pruned_sum.data.iter_mut().zip(&delta.data) {
            if v.abs() >= threshold {
                *o += wi * v;
            }
        }
    }
    let opts = MergeOptions::new(Combination::MagnitudePruneSvd)
        .with_density(density)
        .with_svd_rank(k);
    let merged = merge(&refs, &w, &opts).unwrap();
    assert_eq!(merged.rank(), k);
    let dense = svd(&pruned_sum);
    let mut best = dense.u.first_cols(k);
    best.scale_cols(&dense.s[..k]);
    let best = best.matmul(&dense.v.first_cols(k).t());
    let scale = dense.s[0];
    // The subspace iteration stops on the singular values (1e-12 relative change), so its
    // vectors are accurate to about the square root of that: 1e-6 of σ₁ (measured: 1.3e-8).
    let diff = mat_diff(&merged.delta_mat(), &best);
    assert!(
        diff < 1e-6 * scale,
        "rank-{k} fit differs by {diff:e} (σ₁ = {scale})"
    );
    let mut err = pruned_sum.clone();
    for (e, v) in err.data.iter_mut().zip(merged.delta_mat().data) {
        *e -= v;
    }
    let expected: f64 = dense.s[k..].iter().map(|s| s * s).sum::<f64>().sqrt();
    assert!(
        (err.frobenius() - expected).abs() < 1e-8 * expected,
        "‖M − merged‖ = {} vs Eckart–Young {expected}",
        err.frobenius()
    );
}

#[test]
fn rslora_merges_are_not_over_scaled() {
    // An rsLoRA adapter with r=16, alpha=8 has s = 2; the merged adapter must carry the same
    // update (PEFT 0.21 would scale it by √16 again).
    let mut rng = Rng(5);
    let f = random_factors(&mut rng, 16, 20, 10, 8.0 / 4.0);
    let merged = merge(&[&f], &[1.0], &MergeOptions::new(Combination::Svd)).unwrap();
    assert!(mat_diff(&merged.delta_mat(), &f.delta_mat()) < 1e-10);
    let device = Device::flex();
    let adapter = merged.to_adapter(&device).unwrap();
    assert!((adapter.scaling() - 1.0).abs() < 1e-12);
    let back = LoraFactors::from_adapter(&adapter);
    assert!(mat_diff(&back.delta_mat(), &f.delta_mat()) < 1e-5);
}

#[test]
fn rslora_golden_merges_and_saves_with_its_own_update() {
    // PEFT's rsLoRA golden (r = 4, alpha = 8: s = 8/√4 = 4) merged alone and saved as a PEFT
    // folder: the written config must give scaling 1 (lora_alpha = r, no rsLoRA) and the
    // reloaded update must be PEFT's own ΔW = merged weight − base weight.
    use modula::PeftLora;
    use modula::library::{LoraExpert, merge_experts};
    let device = Device::flex();
    let peft = PeftLora::load(common::data("peft_rslora_tiny_mlp"), &device).unwrap();
    let expert = LoraExpert::from_peft(&peft).unwrap();
    let base = golden("tiny_mlp_base.safetensors");
    let expected = golden("peft_rslora_tiny_mlp_expected.safetensors");
    for c in [Combination::Linear, Combination::Svd] {
        let merged = merge_experts(&[&expert], &[1.0], &MergeOptions::new(c)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        merged.to_peft(&device).unwrap().save(dir.path()).unwrap();
        // Written from the host factors, the folder is the same, byte for byte.
        let host_dir = tempfile::tempdir().unwrap();
        merged.save_peft(host_dir.path()).unwrap();
        for file in ["adapter_config.json", "adapter_model.safetensors"] {
            assert_eq!(
                std::fs::read(dir.path().join(file)).unwrap(),
                std::fs::read(host_dir.path().join(file)).unwrap(),
                "{c:?}: {file} written without a device"
            );
        }
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["use_rslora"], false, "{c:?}: {cfg}");
        let r = cfg["r"].as_f64().unwrap();
        assert_eq!(cfg["lora_alpha"].as_f64(), Some(r), "{c:?}: scaling 1");
        let back = LoraExpert::from_peft(&PeftLora::load(dir.path(), &device).unwrap()).unwrap();
        for layer in ["fc1", "fc2"] {
            let mut want = mat(&expected, &format!("expected_merged_{layer}_weight"));
            let w0 = mat(&base, &format!("{layer}.weight"));
            for (x, y) in want.data.iter_mut().zip(&w0.data) {
                *x -= y;
            }
            let got = back.layer(layer).unwrap();
            assert!((got.scaling() - 1.0).abs() < 1e-12);
            let diff = mat_diff(&got.delta_mat(), &want);
            assert!(diff < 1e-5, "{c:?} {layer}: |ΔW − PEFT's| = {diff:e}");
        }
    }
}

#[test]
fn slerp_interpolates_on_the_sphere() {
    let mut rng = Rng(9);
    let a = random_factors(&mut rng, 4, 12, 8, 1.0);
    let b = random_factors(&mut rng, 4, 12, 8, 1.0);
    let (da, db) = (a.delta_mat(), b.delta_mat());
    assert!(mat_diff(&slerp(&a, &b, 0.0).unwrap().delta_mat(), &da) < 1e-10);
    assert!(mat_diff(&slerp(&a, &b, 1.0).unwrap().delta_mat(), &db) < 1e-10);
    // Unit-norm inputs stay unit-norm along the path, and the angle splits evenly.
    let na = compress_scale(&a, 1.0 / a.delta_norm());
    let nb = compress_scale(&b, 1.0 / b.delta_norm());
    let mid = slerp(&na, &nb, 0.5).unwrap();
    assert!((mid.delta_norm() - 1.0).abs() < 1e-9);
    let cos_a = mid.delta_dot(&na);
    let cos_b = mid.delta_dot(&nb);
    assert!((cos_a - cos_b).abs() < 1e-9);
    // At t = 0.25 the angles are θ/4 and 3θ/4, which normalised lerp does not give.
    let theta = na.delta_dot(&nb).clamp(-1.0, 1.0).acos();
    assert!(theta > 0.5, "the test needs a wide angle, got {theta}");
    let q = slerp(&na, &nb, 0.25).unwrap();
    assert!((q.delta_norm() - 1.0).abs() < 1e-9);
    let angle = |x: &LoraFactors, y: &LoraFactors| {
        (x.delta_dot(y) / (x.delta_norm() * y.delta_norm()))
            .clamp(-1.0, 1.0)
            .acos()
    };
    assert!((angle(&q, &na) - 0.25 * theta).abs() < 1e-9);
    assert!((angle(&q, &nb) - 0.75 * theta).abs() < 1e-9);
    // Parallel and nearly parallel updates (|cos θ| > 0.9995, where sin θ → 0) take linear
    // interpolation: (1 − t)·ΔW_a + t·ΔW_b, finite.
    let twice = lora_scale(&a, 2.0);
    let tiny = lora_scale(&b, 1e-3 * a.delta_norm() / b.delta_norm());
    let near = lora_add(&[&twice, &tiny], &[1.0, 1.0], MergeSpace::Delta).unwrap();
    for other in [&twice, &near] {
        let got = slerp(&a, other, 0.25).unwrap().delta_mat();
        let mut want = da.clone();
        for (w, o) in want.data.iter_mut().zip(other.delta_mat().data) {
            *w = 0.75 * *w + 0.25 * o;
        }
        assert!(got.data.iter().all(|v| v.is_finite()));
        assert!(mat_diff(&got, &want) < 1e-10, "near-parallel slerp");
    }
    assert!(slerp(&a, &b, 1.5).is_err());
}

fn compress_scale(f: &LoraFactors, s: f64) -> LoraFactors {
    lora_scale(f, s)
}

#[test]
fn pem_arithmetic() {
    let mut rng = Rng(3);
    let a = random_factors(&mut rng, 4, 12, 8, 2.0);
    let b = random_factors(&mut rng, 4, 12, 8, 2.0);
    let neg = lora_negate(&a);
    let mut sum = a.delta_mat();
    for (s, v) in sum.data.iter_mut().zip(neg.delta_mat().data) {
        *s += v;
    }
    assert!(sum.frobenius() < 1e-12, "a + (−a) = 0");
    let exact = lora_add(&[&a, &b], &[0.3, 0.7], MergeSpace::Delta).unwrap();
    let mut expected = a.delta_mat();
    for (e, (x, y)) in expected
        .data
        .iter_mut()
        .zip(a.delta_mat().data.iter().zip(b.delta_mat().data))
    {
        *e = 0.3 * x + 0.7 * y;
    }
    assert!(mat_diff(&exact.delta_mat(), &expected) < 1e-12);
    // PEM's factor-space addition: A = Σ w s A, B = Σ w B.
    let factor = lora_add(&[&a, &b], &[0.3, 0.7], MergeSpace::Factor).unwrap();
    assert!(
        (factor.a_mat().at(0, 0)
            - (0.3 * 2.0 * a.a_mat().at(0, 0) + 0.7 * 2.0 * b.a_mat().at(0, 0)))
        .abs()
            < 1e-12
    );
    assert!(
        (factor.b_mat().at(1, 2) - (0.3 * a.b_mat().at(1, 2) + 0.7 * b.b_mat().at(1, 2))).abs()
            < 1e-12
    );

    let device = Device::flex();
    let l = Tensor::<1>::from_floats([1.0, 0.5, 2.0], &device);
    let n = ia3_negate(l.clone(), 1.0);
    assert_close(
        n,
        Tensor::<1>::from_floats([1.0, 1.5, 0.0], &device),
        1e-6,
        "IA3 negation",
    );
    // λ = 0.5: (1 + λ) − λ·l = 1.5 − 0.5·l.
    assert_close(
        ia3_negate(Tensor::<1>::from_floats([1.0, 0.5, 2.0], &device), 0.5),
        Tensor::<1>::from_floats([1.0, 1.25, 0.5], &device),
        1e-6,
        "IA3 negation, λ = 0.5",
    );
    let l2 = Tensor::<1>::from_floats([3.0, 1.0, 1.0], &device);
    let s = ia3_add(&[l, l2], &[0.25, 0.75]).unwrap();
    assert_close(
        s,
        Tensor::<1>::from_floats([2.5, 0.875, 1.25], &device),
        1e-6,
        "IA3 addition",
    );
}

#[test]
fn merge_rejects_bad_input() {
    let mut rng = Rng(1);
    let a = random_factors(&mut rng, 4, 12, 8, 1.0);
    let b = random_factors(&mut rng, 2, 12, 8, 1.0);
    let c = random_factors(&mut rng, 4, 10, 8, 1.0);
    let lin = MergeOptions::new(Combination::Linear);
    assert!(merge(&[], &[], &lin).is_err());
    assert!(merge(&[&a], &[1.0, 2.0], &lin).is_err());
    assert!(
        merge(&[&a, &c], &[1.0, 1.0], &lin).is_err(),
        "different shapes"
    );
    assert!(merge(&[&a], &[f64::NAN], &lin).is_err());
    let factor = lin.clone().with_space(MergeSpace::Factor);
    let err = merge(&[&a, &b], &[1.0, 1.0], &factor)
        .unwrap_err()
        .to_string();
    assert!(err.contains("one rank"), "{err}");
    // Delta space takes any ranks, and the result is the hand sum of the updates.
    let mixed = merge(&[&a, &b], &[1.0, 1.0], &lin).expect("delta space takes any ranks");
    let mut hand = a.delta_mat();
    for (h, v) in hand.data.iter_mut().zip(b.delta_mat().data) {
        *h += v;
    }
    assert!(mat_diff(&mixed.delta_mat(), &hand) < 1e-12);
    let err = merge(&[&a], &[1.0], &MergeOptions::new(Combination::Ties))
        .unwrap_err()
        .to_string();
    assert!(err.contains("needs a density"), "{err}");
    assert!(
        merge(
            &[&a],
            &[1.0],
            &MergeOptions::new(Combination::Ties).with_density(1.5)
        )
        .is_err()
    );
    assert!(Combination::parse("average").is_err());
    assert_eq!(
        Combination::parse("dare_ties_svd").unwrap(),
        Combination::DareTiesSvd
    );
}

#[test]
fn arrow_matches_peft_golden() {
    let g = golden("arrow_routing.safetensors");
    let experts = golden_adapters(&g, "task_", 4);
    let refs: Vec<&LoraFactors> = experts.iter().collect();
    let protos = arrow_prototypes(&refs).unwrap();
    let expected = mat(&g, "prototypes");
    assert!(
        mat_diff(&Mat::from(protos.clone()), &expected) < 1e-5,
        "prototypes (same sign convention)"
    );
    for device in devices() {
        let x: Tensor<2> = g.tensor("x", &device).unwrap();
        let router = ArrowRouter::new(&protos, 2, 1.0, &device).unwrap();
        assert_close(
            router.similarities(&x).unwrap(),
            g.tensor("similarity_abs", &device).unwrap(),
            1e-5,
            "similarities",
        );
        let routing = router.route(&x).unwrap();
        assert_close(
            routing.to_dense(),
            g.tensor("routing_weights", &device).unwrap(),
            1e-5,
            "routing weights",
        );
        let idx: Vec<i64> = routing.indices().into_data().iter::<i64>().collect();
        let exp_idx = g.get("topk_indices").unwrap();
        let mut ours = idx
            .chunks(2)
            .map(|c| {
                let mut c = c.to_vec();
                c.sort();
                c
            })
            .collect::<Vec<_>>();
        let theirs = exp_idx
            .data
            .chunks(2)
            .map(|c| {
                let mut c: Vec<i64> = c.iter().map(|v| *v as i64).collect();
                c.sort();
                c
            })
            .collect::<Vec<_>>();
        ours.iter_mut().for_each(|c| c.sort());
        assert_eq!(ours, theirs, "top-k sets");
        // The layer's delta, output mixture over the gathered top-k.
        let base =
            modula::io::linear_from_torch(Tensor::<2>::zeros([12, 16], &device), None).unwrap();
        let adapters = experts
            .iter()
            .map(|f| f.to_adapter(&device).unwrap())
            .collect();
        let layer = ArrowLinear::new(base, adapters, 2, 1.0, LoraMix::Output).unwrap();
        let (delta, _) = layer.delta(x).unwrap();
        assert_close(
            delta,
            g.tensor("expected_delta", &device).unwrap(),
            1e-5,
            "Arrow delta",
        );
    }
}

#[test]
fn arrow_prototypes_are_exact_where_power_iteration_is_not() {
    // B A with top two singular values 1 and 0.999: 15 power iterations cannot separate them.
    let mut rng = Rng(21);
    let (d_in, d_out, r) = (64, 48, 4);
    let qa = qr_q(&Mat::from_f32(
        d_in,
        r,
        &(0..d_in * r)
            .map(|_| rng.uniform() - 0.5)
            .collect::<Vec<_>>(),
    ));
    let qb = qr_q(&Mat::from_f32(
        d_out,
        r,
        &(0..d_out * r)
            .map(|_| rng.uniform() - 0.5)
            .collect::<Vec<_>>(),
    ));
    let sigma = [1.0, 0.999, 0.5, 0.1];
    let mut b = qb.clone();
    b.scale_cols(&sigma);
    let f = factors(&qa.t(), &b, 1.0);
    let v = arrow_prototype(&f);
    let dense = svd(&f.delta_mat());
    let cos: f64 = v
        .iter()
        .enumerate()
        .map(|(i, x)| x * dense.v.at(i, 0))
        .sum();
    assert!((cos.abs() - 1.0).abs() < 1e-10, "|cos| = {}", cos.abs());
    // And it is the planted direction (first column of qa).
    let cos_planted: f64 = v.iter().enumerate().map(|(i, x)| x * qa.at(i, 0)).sum();
    assert!((cos_planted.abs() - 1.0).abs() < 1e-10);
    // Random spectra: agree with the dense SVD.
    for seed in 0..10 {
        let mut rng = Rng(100 + seed);
        let f = random_factors(&mut rng, 8, 50, 30, 1.0);
        let v = arrow_prototype(&f);
        let dense = svd(&f.delta_mat());
        let cos: f64 = v
            .iter()
            .enumerate()
            .map(|(i, x)| x * dense.v.at(i, 0))
            .sum();
        assert!((cos.abs() - 1.0).abs() < 1e-10);
    }
}

#[test]
fn arrow_top_k_all_is_full_softmax_and_one_hot_is_single_lora() {
    let mut rng = Rng(4);
    let experts: Vec<LoraFactors> = (0..5)
        .map(|_| random_factors(&mut rng, 4, 16, 12, 2.0))
        .collect();
    let refs: Vec<&LoraFactors> = experts.iter().collect();
    for device in devices() {
        let x = rng.tensor(7, 16, &device);
        let router = ArrowRouter::from_experts(&refs, 5, 0.7, &device).unwrap();
        let dense = router.route(&x).unwrap().to_dense();
        let full =
            burn::tensor::activation::softmax(router.similarities(&x).unwrap().div_scalar(0.7), 1);
        assert_close(dense, full, 1e-5, "top_k = E is the full softmax");

        // With top_k = 1 every row uses exactly one LoRA with weight 1.
        let base = modula::io::linear_from_torch(rng.tensor(12, 16, &device), None).unwrap();
        let adapters: Vec<_> = experts
            .iter()
            .map(|f| f.to_adapter(&device).unwrap())
            .collect();
        let layer =
            ArrowLinear::new(base.clone(), adapters.clone(), 1, 1.0, LoraMix::Output).unwrap();
        let (delta, routing) = layer.delta(x.clone()).unwrap();
        let idx: Vec<i64> = routing.indices().into_data().iter::<i64>().collect();
        for (row, &e) in idx.iter().enumerate() {
            let xr = x.clone().slice([row..row + 1, 0..16]);
            let single = adapters[e as usize].delta_forward(xr);
            assert_close(
                delta.clone().slice([row..row + 1, 0..12]),
                single,
                1e-5,
                "one-hot row",
            );
        }
        // Factor mixing with top_k = 1 is the same single LoRA.
        let fl = ArrowLinear::new(base, adapters, 1, 1.0, LoraMix::Factor).unwrap();
        assert_close(fl.delta(x).unwrap().0, delta, 1e-5, "factor mix, one-hot");
    }
}

#[test]
fn gen_know_sub_both_spaces() {
    let mut rng = Rng(8);
    let task = random_factors(&mut rng, 4, 10, 6, 2.0);
    let g1 = random_factors(&mut rng, 4, 10, 6, 2.0);
    let g2 = random_factors(&mut rng, 4, 10, 6, 2.0);
    let exact = gen_know_sub(&task, &[&g1, &g2], MergeSpace::Delta).unwrap();
    let mut expected = task.delta_mat();
    for (e, (a, b)) in expected
        .data
        .iter_mut()
        .zip(g1.delta_mat().data.iter().zip(g2.delta_mat().data))
    {
        *e -= 0.5 * (a + b);
    }
    assert!(mat_diff(&exact.delta_mat(), &expected) < 1e-12);
    let factor = gen_know_sub(&task, &[&g1, &g2], MergeSpace::Factor).unwrap();
    assert!(
        (factor.a_mat().at(2, 3)
            - (task.a_mat().at(2, 3) - 0.5 * (g1.a_mat().at(2, 3) + g2.a_mat().at(2, 3))))
        .abs()
            < 1e-12
    );
    assert!(gen_know_sub(&task, &[], MergeSpace::Delta).is_err());
}

#[test]
fn arrow_rejects_bad_input() {
    let mut rng = Rng(2);
    let f = random_factors(&mut rng, 4, 16, 12, 2.0);
    let device = Device::flex();
    assert!(
        ArrowRouter::from_experts(&[&f], 2, 1.0, &device).is_err(),
        "k > experts"
    );
    assert!(
        ArrowRouter::from_experts(&[&f], 0, 1.0, &device).is_err(),
        "k = 0"
    );
    assert!(
        ArrowRouter::from_experts(&[&f], 1, 0.0, &device).is_err(),
        "temperature 0"
    );
    let router = ArrowRouter::from_experts(&[&f], 1, 1.0, &device).unwrap();
    assert!(
        router.route(&rng.tensor(3, 15, &device)).is_err(),
        "wrong width"
    );
    let nan = Tensor::<2>::full([2, 16], f32::NAN, &device);
    assert!(router.route(&nan).is_err(), "NaN input");
}

fn random_expert(
    rng: &mut Rng,
    layers: &[(&str, usize, usize)],
    r: usize,
) -> modula::library::LoraExpert {
    let mut e = modula::library::LoraExpert::default();
    for &(p, d_in, d_out) in layers {
        e.layers
            .insert(p.to_string(), random_factors(rng, r, d_in, d_out, 2.0));
    }
    e
}

#[test]
fn library_store_round_trip_and_errors() {
    use modula::store::{ExpertInfo, ExpertLibrary};
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("lib");
    let device = Device::flex();
    let mut lib = ExpertLibrary::open_or_create(&root).unwrap();
    assert!(lib.is_empty());
    let mut rng = Rng(31);
    let layers = [("fc1", 16, 12), ("fc2", 12, 8)];
    let e1 = random_expert(&mut rng, &layers, 4);
    let e2 = random_expert(&mut rng, &layers, 4);
    let info = ExpertInfo {
        task: Some("digits 0-4".into()),
        notes: Some("100 steps, lr 1e-2".into()),
        ..Default::default()
    };
    lib.add("t0", &e1.to_peft(&device).unwrap(), info.clone())
        .unwrap();
    lib.add("t1", &e2.to_peft(&device).unwrap(), ExpertInfo::default())
        .unwrap();
    // Reopen from disk: metadata and factors survive.
    let lib2 = ExpertLibrary::open(&root).unwrap();
    assert_eq!(lib2.names(), vec!["t0", "t1"]);
    assert_eq!(lib2.meta("t0").unwrap().info, info);
    assert_eq!(lib2.meta("t0").unwrap().layers["fc1"], [12, 16]);
    let back = lib2.factors("t0").unwrap();
    for (p, f) in &e1.layers {
        assert!(
            mat_diff(&back.layers[p].delta_mat(), &f.delta_mat()) < 1e-5,
            "{p}"
        );
    }
    // Each expert is a PEFT folder PEFT's loader (ours) reads back.
    let exported = dir.path().join("out");
    lib2.export_peft("t1", &exported).unwrap();
    let peft = modula::PeftLora::load(&exported, &device).unwrap();
    assert_eq!(peft.paths().collect::<Vec<_>>(), vec!["fc1", "fc2"]);
    // Errors: duplicate, bad name, other layers, unknown; the library stays as it was.
    assert!(matches!(
        lib.add("t0", &e1.to_peft(&device).unwrap(), ExpertInfo::default()),
        Err(modula::Error::DuplicateAdapter { .. })
    ));
    assert!(
        lib.add(
            "../evil",
            &e1.to_peft(&device).unwrap(),
            ExpertInfo::default()
        )
        .is_err()
    );
    let other = random_expert(&mut rng, &[("fc1", 16, 12)], 4);
    let err = lib
        .add(
            "t2",
            &other.to_peft(&device).unwrap(),
            ExpertInfo::default(),
        )
        .unwrap_err();
    assert!(err.to_string().contains("one base model"), "{err}");
    assert!(matches!(
        lib.get("nope", &device),
        Err(modula::Error::UnknownAdapter { .. })
    ));
    assert_eq!(ExpertLibrary::open(&root).unwrap().len(), 2);
    // Import from a PEFT folder, then remove.
    lib.import_peft("t1copy", &exported, ExpertInfo::default(), &device)
        .unwrap();
    lib.remove("t0").unwrap();
    let lib3 = ExpertLibrary::open(&root).unwrap();
    assert_eq!(lib3.names(), vec!["t1", "t1copy"]);
    assert!(!root.join("experts/t0").exists());
    // No temporary folders are left behind.
    let leftovers: Vec<_> = std::fs::read_dir(root.join("experts"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty());
    // A corrupt index is a typed error, not a panic.
    std::fs::write(root.join("library.json"), "{not json").unwrap();
    assert!(matches!(
        ExpertLibrary::open(&root),
        Err(modula::Error::Json { .. })
    ));
}

#[test]
fn mbc_recovers_planted_clusters_deterministically() {
    use modula::library::{MbcConfig, mbc_cluster};
    // 4 task families; each expert = its family's centre + noise.
    let mut rng = Rng(77);
    let layers = [("fc1", 32, 24), ("fc2", 24, 16)];
    let centres: Vec<_> = (0..4)
        .map(|_| random_expert(&mut rng, &layers, 4))
        .collect();
    let mut truth = Vec::new();
    let experts: Vec<_> = (0..24)
        .map(|i| {
            let fam = (i * 7) % 4;
            truth.push(fam);
            let mut e = centres[fam].clone();
            for f in e.layers.values_mut() {
                let (mut a, mut b) = (f.a_mat(), f.b_mat());
                for v in a.data.iter_mut().chain(b.data.iter_mut()) {
                    *v += 0.6 * (2.0 * f64::from(rng.uniform()) - 1.0);
                }
                *f = factors(&a, &b, f.scaling());
            }
            e
        })
        .collect();
    let refs: Vec<_> = experts.iter().collect();
    for device in devices() {
        let cfg = MbcConfig::new(4).with_sparsity(0.5).with_seed(3);
        let c = mbc_cluster(&refs, &cfg, &device).unwrap();
        let again = mbc_cluster(&refs, &cfg, &device).unwrap();
        assert_eq!(c.assignments, again.assignments, "deterministic for a seed");
        assert_eq!(c.clusters.len(), 4);
        // Same partition as the truth (labels may differ).
        for i in 0..truth.len() {
            for j in 0..truth.len() {
                assert_eq!(
                    truth[i] == truth[j],
                    c.assignments[i] == c.assignments[j],
                    "experts {i} and {j}"
                );
            }
        }
    }
    let device = Device::flex();
    assert!(mbc_cluster(&refs, &MbcConfig::new(0), &device).is_err());
    assert!(mbc_cluster(&refs, &MbcConfig::new(25), &device).is_err());
    assert!(mbc_cluster(&refs, &MbcConfig::new(2).with_sparsity(1.0), &device).is_err());
    let odd = random_expert(&mut rng, &[("fc1", 32, 24)], 4);
    let mut mixed = refs.clone();
    mixed.push(&odd);
    assert!(mbc_cluster(&mixed, &MbcConfig::new(2), &device).is_err());
}

#[test]
fn mixed_batch_equals_each_row_alone() {
    use modula::LoraLinear;
    for device in devices() {
        let mut rng = Rng(13);
        let base = modula::io::linear_from_torch(
            rng.tensor(12, 16, &device),
            Some(rng.tensor(1, 12, &device).reshape([12])),
        )
        .unwrap();
        let mut layer = LoraLinear::new(base);
        let names = ["a", "b", "c"];
        for (i, n) in names.iter().enumerate() {
            let f = random_factors(&mut rng, if i == 2 { 2 } else { 4 }, 16, 12, 0.5 + i as f64);
            layer
                .insert_adapter(n, f.to_adapter(&device).unwrap())
                .unwrap();
        }
        let x = rng.tensor(9, 16, &device);
        let row_names: Vec<Option<&str>> = (0..9)
            .map(|i| if i % 4 == 3 { None } else { Some(names[i % 3]) })
            .collect();
        let mixed = layer.forward_mixed(x.clone(), &row_names).unwrap();
        for (i, n) in row_names.iter().enumerate() {
            let xi = x.clone().slice([i..i + 1, 0..16]);
            let alone = match n {
                Some(n) => {
                    let mut l = layer.clone();
                    l.set_active(&[n]).unwrap();
                    l.forward(xi).unwrap()
                }
                None => layer.base.forward(xi),
            };
            assert_close(
                mixed.clone().slice([i..i + 1, 0..12]),
                alone,
                1e-5,
                "mixed row",
            );
        }
        // Sequences: the batched path (one rank) and the fallback (mixed ranks) agree with rows.
        let x3 = rng.tensor(4 * 5, 16, &device);
        let seq_names = [Some("a"), None, Some("b"), Some("a")];
        let rows: Vec<Option<&str>> = seq_names
            .iter()
            .flat_map(|n| std::iter::repeat_n(*n, 5))
            .collect();
        let by_rows = layer.forward_mixed(x3.clone(), &rows).unwrap();
        let by_seqs = layer
            .forward_mixed_seqs(x3.clone().reshape([4, 5, 16]), &seq_names)
            .unwrap();
        assert_close(
            by_seqs.reshape([20, 12]),
            by_rows.clone(),
            1e-5,
            "sequences (fallback)",
        );
        layer.remove_adapter("c").unwrap();
        let by_seqs = layer
            .forward_mixed_seqs(x3.reshape([4, 5, 16]), &seq_names)
            .unwrap();
        assert_close(
            by_seqs.reshape([20, 12]),
            by_rows,
            1e-5,
            "sequences (batched factors)",
        );
        // Errors.
        assert!(layer.forward_mixed(x.clone(), &row_names[..3]).is_err());
        assert!(matches!(
            layer.forward_mixed(x.clone().slice([0..1, 0..16]), &[Some("zzz")]),
            Err(modula::Error::UnknownAdapter { .. })
        ));
        layer.merge("a").unwrap();
        assert!(matches!(
            layer.forward_mixed(x.clone().slice([0..1, 0..16]), &[Some("b")]),
            Err(modula::Error::AlreadyMerged { .. })
        ));
    }
}

#[test]
fn arrow_prototype_handles_rank_deficient_factors() {
    // A zero row in A makes A Aᵀ singular: the QR route must take over and stay exact.
    let mut rng = Rng(55);
    let f = random_factors(&mut rng, 4, 20, 10, 1.0);
    let mut a = f.a_mat();
    for j in 0..20 {
        *a.at_mut(1, j) = 0.0;
    }
    let f = factors(&a, &f.b_mat(), f.scaling());
    let v = arrow_prototype(&f);
    let dense = svd(&f.delta_mat());
    let cos: f64 = v
        .iter()
        .enumerate()
        .map(|(i, x)| x * dense.v.at(i, 0))
        .sum();
    assert!((cos.abs() - 1.0).abs() < 1e-10, "|cos| = {}", cos.abs());
    let norm: f64 = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!((norm - 1.0).abs() < 1e-12);
}

#[test]
fn polytropon_allocation_trains_and_mixes_factors() {
    use burn::module::Module;
    use modula::{LoraMix, PolytroponRouter, lora_mixture};
    let device = Device::flex().autodiff();
    let mut rng = Rng(91);
    let skills: Vec<_> = (0..3)
        .map(|_| {
            random_factors(&mut rng, 4, 10, 6, 2.0)
                .to_adapter(&device)
                .unwrap()
        })
        .collect();
    let router = PolytroponRouterConfig::new(2, 3).init(&device).unwrap();
    let tasks = [0usize, 1, 1, 0];
    let routing = router.route_tasks(&tasks, true).unwrap();
    let sums: Vec<f32> = routing
        .to_dense()
        .sum_dim(1)
        .into_data()
        .iter::<f32>()
        .collect();
    assert!(
        sums.iter().all(|s| (s - 1.0).abs() < 1e-5),
        "weights sum to one: {sums:?}"
    );
    let x = rng.tensor(4, 10, &device);
    let y = lora_mixture(x.clone(), &routing, &skills, LoraMix::Factor).unwrap();
    let grads = y.powi_scalar(2).sum().backward();
    let g = router
        .logits
        .grad(&grads)
        .expect("allocation logits get a gradient");
    let gsum: f32 = g.abs().sum().into_scalar();
    assert!(gsum > 0.0);
    // Training moves the allocation: fit task 0's mixture to skill 0 alone; the loss falls
    // and task 0's weight on skill 0 grows.
    let target = skills[0].delta_forward(x.clone()).detach();
    let fit = |r: &PolytroponRouter| -> Tensor<1> {
        let routing = r.route_tasks(&[0, 0, 0, 0], false).unwrap();
        (lora_mixture(x.clone(), &routing, &skills, LoraMix::Output).unwrap() - target.clone())
            .powi_scalar(2)
            .sum()
    };
    let w0 = |r: &PolytroponRouter| -> f32 {
        common::vals(r.route_tasks(&[0], false).unwrap().to_dense())[0]
    };
    let (loss_before, w_before) = (fit(&router).into_scalar::<f32>(), w0(&router));
    let mut trained = router.clone();
    let mut optim = burn::optim::AdamConfig::new().init();
    for _ in 0..30 {
        let grads = burn::optim::GradientsParams::from_grads(fit(&trained).backward(), &trained);
        trained = optim.step(0.1, trained, grads);
    }
    let (loss_after, w_after) = (fit(&trained).into_scalar::<f32>(), w0(&trained));
    assert!(
        loss_after < 0.5 * loss_before,
        "loss {loss_before} → {loss_after}"
    );
    assert!(
        w_after > w_before + 0.1,
        "skill-0 weight {w_before} → {w_after}"
    );
    // Factor mixing: row 0 equals (Σ w s B)(Σ w A) x computed by hand.
    let eval = router.valid();
    let r = eval.route_tasks(&[0], false).unwrap();
    let w: Vec<f32> = r.to_dense().into_data().iter::<f32>().collect();
    let cpu = Device::flex();
    let skills_cpu: Vec<_> = skills.iter().map(|a| a.clone().valid()).collect();
    let x0 = x.clone().slice([0..1, 0..10]).inner();
    let mut a_mix = Tensor::<2>::zeros([10, 4], &cpu);
    let mut b_mix = Tensor::<2>::zeros([4, 6], &cpu);
    for (s, wi) in skills_cpu.iter().zip(&w) {
        a_mix = a_mix + s.a.val().mul_scalar(*wi);
        b_mix = b_mix + s.b.val().mul_scalar(*wi * s.scaling() as f32);
    }
    let want = x0.clone().matmul(a_mix).matmul(b_mix);
    let got = lora_mixture(x0, &r, &skills_cpu, LoraMix::Factor).unwrap();
    assert_close(got, want, 1e-5, "Polytropon factor mixture");
    assert!(
        eval.route_tasks(&[2], false).is_err(),
        "task id out of range"
    );
    assert!(PolytroponRouterConfig::new(0, 3).init(&cpu).is_err());
}

#[test]
fn xlora_router_and_adapter_fusion() {
    use modula::{LoraMix, lora_mixture};
    for device in devices() {
        let mut rng = Rng(17);
        let experts: Vec<_> = (0..4)
            .map(|_| {
                random_factors(&mut rng, 4, 12, 8, 1.5)
                    .to_adapter(&device)
                    .unwrap()
            })
            .collect();
        let x = rng.tensor(5, 12, &device);
        // Full softmax: weights sum to one; the mixture is Σ w_e Δ_e(x).
        let router = XLoraRouterConfig::new(12, 16, 4).init(&device).unwrap();
        let routing = router.route(&x).unwrap();
        let dense = routing.to_dense();
        let sums: Vec<f32> = dense.clone().sum_dim(1).into_data().iter::<f32>().collect();
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5));
        let y = lora_mixture(x.clone(), &routing, &experts, LoraMix::Output).unwrap();
        let mut want = Tensor::<2>::zeros([5, 8], &device);
        for (e, ex) in experts.iter().enumerate() {
            want = want + ex.delta_forward(x.clone()) * dense.clone().slice([0..5, e..e + 1]);
        }
        assert_close(y, want, 1e-5, "X-LoRA output mixture");
        // Top-2: per row the two largest logits, weighted by the softmax over those two.
        let top2 = XLoraRouterConfig::new(12, 16, 4)
            .with_top_k(Some(2))
            .init(&device)
            .unwrap();
        let r2 = top2.route(&x).unwrap();
        assert_eq!(r2.k(), 2);
        let logits = common::vals(top2.logits(&x).unwrap());
        let got_idx: Vec<i64> = r2.indices().into_data().iter::<i64>().collect();
        let got_w = common::vals(r2.weights());
        for row in 0..5 {
            let l = &logits[row * 4..row * 4 + 4];
            let mut order: Vec<usize> = (0..4).collect();
            order.sort_by(|&i, &j| l[j].total_cmp(&l[i]));
            assert_eq!(
                &got_idx[row * 2..row * 2 + 2],
                &[order[0] as i64, order[1] as i64],
                "row {row}"
            );
            let w0 = 1.0 / (1.0 + (l[order[1]] - l[order[0]]).exp());
            assert!((got_w[row * 2] - w0).abs() < 1e-5, "row {row} weight");
            assert!(
                (got_w[row * 2 + 1] - (1.0 - w0)).abs() < 1e-5,
                "row {row} weight"
            );
        }
        assert!(
            XLoraRouterConfig::new(12, 16, 4)
                .with_top_k(Some(5))
                .init(&device)
                .is_err()
        );

        // AdapterFusion: attention sums to one; with equal outputs the fusion returns them.
        let fusion = AdapterFusionConfig::new(12, 8, 6).init(&device).unwrap();
        let o = rng.tensor(5, 8, &device);
        let outs = Tensor::stack::<3>(vec![o.clone(), o.clone(), o.clone()], 1);
        let (fused, attn) = fusion.fuse(x.clone(), outs).unwrap();
        let sums: Vec<f32> = attn.sum_dim(1).into_data().iter::<f32>().collect();
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5));
        assert_close(fused, o, 1e-5, "fusion of identical outputs (W_v = I)");
        let bad = Tensor::<3>::zeros([4, 3, 8], &device);
        assert!(fusion.fuse(x.clone(), bad).is_err());
    }
}

#[test]
fn peft_folders_load_straight_to_host_factors() {
    // The host loader (no device) gives exactly what loading onto a device and copying back
    // gives, rank/alpha patterns and rsLoRA included.
    use modula::PeftLora;
    use modula::library::LoraExpert;
    for dir in [
        "peft_lora_tiny_mlp",
        "peft_rslora_tiny_mlp",
        "peft_lora_patterns_tiny_mlp",
    ] {
        let host = LoraExpert::load_peft(common::data(dir)).unwrap();
        let via_device =
            LoraExpert::from_peft(&PeftLora::load(common::data(dir), &Device::flex()).unwrap())
                .unwrap();
        assert_eq!(host, via_device, "{dir}");
    }
    let err = LoraExpert::load_peft(common::data("peft_ia3_tiny_mlp"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("IA3"), "{err}");
}

#[test]
fn merge_and_cluster_settings_round_trip_through_json() {
    use modula::continual::LmcConfig;
    use modula::library::MbcConfig;
    // PEFT's combination names; fields left out take their defaults.
    let opts: MergeOptions =
        serde_json::from_str(r#"{"combination": "dare_ties_svd", "density": 0.3, "seed": 7}"#)
            .unwrap();
    assert_eq!(
        opts,
        MergeOptions::new(Combination::DareTiesSvd)
            .with_density(0.3)
            .with_seed(7)
    );
    let text = serde_json::to_string(&opts).unwrap();
    assert!(text.contains(r#""combination":"dare_ties_svd""#), "{text}");
    assert!(text.contains(r#""space":"delta""#), "{text}");
    assert_eq!(serde_json::from_str::<MergeOptions>(&text).unwrap(), opts);
    assert!(serde_json::from_str::<MergeOptions>(r#"{"combination": "tie"}"#).is_err());
    let mbc: MbcConfig = serde_json::from_str(r#"{"k": 5}"#).unwrap();
    assert_eq!(mbc, MbcConfig::new(5));
    let lmc = LmcConfig {
        temperature: 0.5,
        ..LmcConfig::default()
    };
    let back: LmcConfig = serde_json::from_str(&serde_json::to_string(&lmc).unwrap()).unwrap();
    assert_eq!(back, lmc);
    assert_eq!(
        serde_json::from_str::<LmcConfig>("{}").unwrap(),
        LmcConfig::default()
    );
}

#[test]
fn an_expert_of_mixed_ranks_saves_from_the_host_as_through_a_device() {
    use modula::library::LoraExpert;
    let mut rng = Rng(77);
    let mut expert = LoraExpert::default();
    for (path, r, s) in [
        ("a.q", 2, 0.5),
        ("a.v", 3, 2.0),
        ("b.q", 2, 0.5),
        ("b.v", 4, 1.25),
    ] {
        expert
            .layers
            .insert(path.into(), random_factors(&mut rng, r, 6, 5, s));
    }
    let (host, via) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    expert.save_peft(host.path()).unwrap();
    let device = Device::flex();
    expert.to_peft(&device).unwrap().save(via.path()).unwrap();
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        assert_eq!(
            std::fs::read(host.path().join(file)).unwrap(),
            std::fs::read(via.path().join(file)).unwrap(),
            "{file}"
        );
    }
    // And it reads back with every layer's update (rank_pattern / alpha_pattern at work).
    let back = LoraExpert::load_peft(host.path()).unwrap();
    for (path, f) in &expert.layers {
        assert_eq!(back.layers[path].rank(), f.rank(), "{path}");
        assert!(
            mat_diff(&back.layers[path].delta_mat(), &f.delta_mat()) < 1e-5,
            "{path}"
        );
    }
    assert!(LoraExpert::default().save_peft(host.path()).is_err());
}
