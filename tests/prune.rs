//! Structured pruning of the decoders: a 0/1-masked forward equals the physically pruned
//! forward (attention heads under grouped-query attention, feed-forward neurons), in prefill
//! and cached decoding; the pruned model is smaller; Bonsai runs on a real model with forward
//! passes only; bad requests are errors that change nothing.

mod common;

use burn::tensor::{Device, Int, Tensor, TensorData};
use common::{Rng, assert_close, vals};
use modula::models::{KvCache, LinearLayers, LlamaForCausalLm, causal_lm_loss};
use modula::prune::{BonsaiConfig, Prior, Prunable, UnitKind, bonsai, one_shot};
use modula::{Error, LoraModule};

fn tiny(device: &Device) -> LlamaForCausalLm {
    modula::checkpoint::load_decoder(common::data("tiny_decoders/llama"), device).unwrap()
}

fn ids(rows: &[Vec<i64>], device: &Device) -> Tensor<2, Int> {
    let (b, s) = (rows.len(), rows[0].len());
    Tensor::<1, Int>::from_data(TensorData::new(rows.concat(), [b * s]), device).reshape([b, s])
}

/// Keep lists and the matching 0/1 masks: `drop[g]` units dropped from group `g`.
fn keep_and_masks(
    model: &LlamaForCausalLm,
    drop: &[Vec<usize>],
    device: &Device,
) -> (Vec<Vec<usize>>, Vec<Tensor<1>>) {
    let groups = model.unit_groups();
    let keep: Vec<Vec<usize>> = groups
        .iter()
        .zip(drop)
        .map(|(g, d)| (0..g.units).filter(|u| !d.contains(u)).collect())
        .collect();
    let masks = groups
        .iter()
        .zip(drop)
        .map(|(g, d)| {
            let m: Vec<f32> = (0..g.units)
                .map(|u| if d.contains(&u) { 0.0 } else { 1.0 })
                .collect();
            Tensor::from_data(TensorData::new(m, [g.units]), device)
        })
        .collect();
    (keep, masks)
}

#[test]
fn masked_forward_equals_the_pruned_forward_for_heads_and_neurons() {
    for device in common::devices() {
        let batch = ids(&[vec![3, 9, 17, 4, 40], vec![60, 2, 8, 31, 5]], &device);
        let mut model = tiny(&device);
        let groups = model.unit_groups();
        // 2 layers × (4 heads, 40 neurons); GQA: 2 key/value heads of 2 query heads each.
        assert_eq!(groups.len(), 4);
        assert_eq!(
            groups.iter().map(|g| (g.kind, g.units)).collect::<Vec<_>>(),
            [
                (UnitKind::AttentionHead, 4),
                (UnitKind::MlpNeuron, 40),
                (UnitKind::AttentionHead, 4),
                (UnitKind::MlpNeuron, 40),
            ]
        );
        let full = model.forward(batch.clone()).unwrap();
        // Heads 0, 1 share key/value head 0 and heads 2, 3 key/value head 1. Layer 0 drops
        // head 3 (an uneven layout: 2 query heads on one key/value head, 1 on the other);
        // layer 1 drops heads 0 and 1, a whole group with its key/value head.
        let drop = vec![
            vec![3],
            vec![0, 5, 6, 7, 20, 39],
            vec![0, 1],
            (0..40).filter(|u| u % 3 == 0).collect(),
        ];
        let (keep, masks) = keep_and_masks(&model, &drop, &device);
        model.set_unit_masks(Some(masks)).unwrap();
        let masked = model.forward(batch.clone()).unwrap();
        assert!(
            common::max_abs_diff(masked.clone(), full) > 1e-3,
            "the masks change the logits"
        );
        let params_before = model.prunable_params();
        let weights_before: usize = model
            .linear_layers()
            .iter()
            .map(|(_, l)| l.d_in() * l.d_out())
            .sum();
        model.prune_units(&keep).unwrap();
        let pruned = model.forward(batch.clone()).unwrap();
        assert_close(pruned.clone(), masked, 1e-5, "masked = pruned");
        // Smaller: the dropped heads' q/o slices, the whole key/value head of layer 1's first
        // group, the dropped neurons.
        let weights_after: usize = model
            .linear_layers()
            .iter()
            .map(|(_, l)| l.d_in() * l.d_out())
            .sum();
        let (d, hd) = (32, 12);
        let dropped_heads = 3;
        let dropped_neurons = 6 + 14;
        let dropped_kv = 1;
        assert_eq!(
            weights_before - weights_after,
            dropped_heads * 2 * hd * d + dropped_neurons * 3 * d + dropped_kv * 2 * hd * d
        );
        assert!(model.prunable_params() < params_before);
        assert_eq!(
            model
                .unit_groups()
                .iter()
                .map(|g| g.units)
                .collect::<Vec<_>>(),
            [3, 34, 2, 26]
        );
        // Cached decoding on the pruned model equals its full forward.
        let mut cache = KvCache::new();
        let mut last = model
            .forward_cached(
                batch.clone().slice([0..2, 0..3]),
                None,
                None,
                &mut cache,
                true,
            )
            .unwrap();
        for s in 3..5 {
            assert_close(
                last,
                pruned.clone().slice([0..2, s - 1..s]),
                1e-4,
                "cached step",
            );
            last = model
                .forward_cached(
                    batch.clone().slice([0..2, s..s + 1]),
                    None,
                    None,
                    &mut cache,
                    true,
                )
                .unwrap();
        }
        assert_close(last, pruned.slice([0..2, 4..5]), 1e-4, "last cached step");
        // Pruning again works on the pruned layout (a second round).
        let groups = model.unit_groups();
        let keep2: Vec<Vec<usize>> = groups.iter().map(|g| vec![g.units - 1]).collect();
        let drop2: Vec<Vec<usize>> = groups.iter().map(|g| (0..g.units - 1).collect()).collect();
        let (_, masks2) = keep_and_masks(&model, &drop2, &device);
        model.set_unit_masks(Some(masks2)).unwrap();
        let masked2 = model.forward(batch.clone()).unwrap();
        model.prune_units(&keep2).unwrap();
        assert_close(
            model.forward(batch.clone()).unwrap(),
            masked2,
            1e-5,
            "round 2",
        );
    }
}

#[test]
fn bad_pruning_requests_are_errors_and_change_nothing() {
    let device = Device::flex();
    let batch = ids(&[vec![3, 9, 17, 4]], &device);
    let mut model = tiny(&device);
    let before = vals(model.forward(batch.clone()).unwrap());
    let groups = model.unit_groups();
    let all: Vec<Vec<usize>> = groups.iter().map(|g| (0..g.units).collect()).collect();
    let mut unsorted = all.clone();
    unsorted[0] = vec![2, 1];
    let mut empty = all.clone();
    empty[1] = vec![];
    let mut out_of_range = all.clone();
    out_of_range[0] = vec![0, 4];
    for bad in [all[..3].to_vec(), unsorted, empty, out_of_range] {
        assert!(matches!(
            model.prune_units(&bad),
            Err(Error::Invalid { .. })
        ));
    }
    assert!(matches!(
        model.set_unit_masks(Some(vec![Tensor::ones([4], &device)])),
        Err(Error::Shape { .. })
    ));
    assert!(model.unit_activation_rms().is_err(), "nothing recorded");
    assert_eq!(vals(model.forward(batch.clone()).unwrap()), before);
    // A layer holding an adapter is not pruned.
    let mut adapted = tiny(&device);
    let mut rng = Rng(1);
    for (path, layer) in adapted.linear_layers_mut() {
        if path.ends_with("q_proj") {
            let m = LoraModule::from_factors(
                rng.tensor(layer.d_in(), 2, &device),
                rng.tensor(2, layer.d_out(), &device),
                4.0,
                false,
                0.0,
            )
            .unwrap();
            layer.insert_adapter("a", m).unwrap();
        }
    }
    let err = adapted.prune_units(&all).unwrap_err().to_string();
    assert!(err.contains("adapters"), "{err}");
}

/// Bonsai and the one-shot baselines on the tiny Llama, scored by −loss on a fixed batch:
/// forward passes only (no autodiff device exists here), the target met, and the activation
/// prior recorded from the model's own forward.
#[test]
fn bonsai_prunes_a_decoder_to_its_target_with_forward_passes_only() {
    let device = Device::flex();
    let batch = ids(
        &[
            vec![3, 9, 17, 4, 40, 2, 8, 8],
            vec![60, 2, 8, 31, 5, 1, 7, 9],
        ],
        &device,
    );
    let metric = |m: &LlamaForCausalLm| -> modula::Result<f64> {
        let loss = causal_lm_loss(m.forward(batch.clone())?, batch.clone(), None)?;
        Ok(-f64::from(vals(loss)[0]))
    };
    let mut model = tiny(&device);
    model.record_unit_activations(true);
    model.forward(batch.clone()).unwrap();
    let rms = model.unit_activation_rms().unwrap();
    assert_eq!(rms.iter().map(Vec::len).collect::<Vec<_>>(), [4, 40, 4, 40]);
    assert!(rms.iter().flatten().all(|v| *v > 0.0 && v.is_finite()));
    model.record_unit_activations(false);

    let start = model.prunable_params();
    let config = BonsaiConfig {
        round_fraction: 0.1,
        pairs_per_round: 10,
        ..BonsaiConfig::new(0.3)
    };
    let mut rounds = 0;
    let report = bonsai(
        &mut model,
        &config,
        &device,
        &mut |m| metric(m),
        &mut |_, _| rounds += 1,
    )
    .unwrap();
    assert_eq!(report.params_before, start);
    let gone = start - report.params_after;
    let largest = model
        .unit_groups()
        .iter()
        .map(|g| g.params_per_unit)
        .max()
        .unwrap();
    let goal = (0.3 * start as f64).round() as usize;
    assert!(
        gone <= goal && gone + largest * rounds > goal,
        "removed {gone} of a {goal} goal"
    );
    assert_eq!(rounds, 3);
    assert!(metric(&model).unwrap().is_finite());
    // The report's keep lists replay the same pruning on a fresh copy.
    let mut replay = tiny(&device);
    for keep in &report.keep {
        replay.prune_units(keep).unwrap();
    }
    assert_close(
        replay.forward(batch.clone()).unwrap(),
        model.forward(batch.clone()).unwrap(),
        1e-6,
        "replayed pruning",
    );

    for prior in [Prior::ActivationWeight, Prior::Magnitude, Prior::Random] {
        let mut m = tiny(&device);
        let removed = one_shot(&mut m, 0.5, prior, 3, &mut |m| metric(m)).unwrap();
        assert_eq!(
            removed.iter().map(Vec::len).collect::<Vec<_>>(),
            [2, 20, 2, 20]
        );
        assert!(metric(&m).unwrap().is_finite());
    }
    assert!(
        one_shot(&mut tiny(&device), 1.0, Prior::Magnitude, 0, &mut |m| {
            metric(m)
        })
        .is_err()
    );
}

/// Distillation to the teacher: zero against itself, the direct f64 KL otherwise, and its
/// gradient trains a LoRA on a pruned model toward the unpruned one.
#[test]
fn distillation_loss_is_the_tempered_kl_and_adapts_a_pruned_model() {
    use burn::optim::{AdamConfig, GradientsParams};
    use modula::LoraConfig;
    use modula::models::distillation_loss;
    let device = Device::flex();
    let batch = ids(
        &[vec![3, 9, 17, 4, 40, 2], vec![60, 2, 8, 31, 5, 1]],
        &device,
    );
    let teacher = tiny(&device);
    let t = teacher.forward(batch.clone()).unwrap();
    let zero = vals(distillation_loss(t.clone(), t.clone(), 2.0).unwrap())[0];
    assert!(zero.abs() < 1e-6, "{zero}");
    let mut student = tiny(&device);
    let groups = student.unit_groups();
    let keep: Vec<Vec<usize>> = groups
        .iter()
        .map(|g| (0..g.units).filter(|u| u % 2 == 0).collect())
        .collect();
    student.prune_units(&keep).unwrap();
    let s = student.forward(batch.clone()).unwrap();
    let got = f64::from(vals(distillation_loss(s.clone(), t.clone(), 2.0).unwrap())[0]);
    let (sv, tv) = (vals(s), vals(t.clone()));
    let mut want = 0.0;
    for row in 0..12 {
        let soft = |v: &[f32]| -> Vec<f64> {
            let x: Vec<f64> = v.iter().map(|&a| f64::from(a) / 2.0).collect();
            let m = x.iter().copied().fold(f64::MIN, f64::max);
            let z: f64 = x.iter().map(|a| (a - m).exp()).sum();
            x.iter().map(|a| (a - m).exp() / z).collect()
        };
        let (p, q) = (
            soft(&tv[row * 64..(row + 1) * 64]),
            soft(&sv[row * 64..(row + 1) * 64]),
        );
        want += p.iter().zip(&q).map(|(p, q)| p * (p / q).ln()).sum::<f64>();
    }
    want *= 4.0 / 12.0;
    assert!((got - want).abs() < 1e-4 * want.max(1.0), "{got} vs {want}");
    assert!(distillation_loss(t.clone(), t.clone().slice([0..1, 0..6, 0..64]), 1.0).is_err());
    assert!(distillation_loss(t.clone(), t.clone(), 0.0).is_err());

    // A LoRA on the pruned model, trained to the teacher, lowers the distillation loss.
    let ad = device.clone().autodiff();
    ad.seed(2);
    let mut student = tiny(&ad);
    student.prune_units(&keep).unwrap();
    student
        .add_lora("adapt", &LoraConfig::new(4).with_alpha(8.0), &|p| {
            p != "lm_head"
        })
        .unwrap();
    let t_ad = Tensor::<3>::from_data(t.into_data(), &ad);
    let b_ad = Tensor::<2, Int>::from_data(batch.into_data(), &ad);
    let mut optim = AdamConfig::new().init();
    let mut losses = Vec::new();
    for _ in 0..20 {
        let loss =
            distillation_loss(student.forward(b_ad.clone()).unwrap(), t_ad.clone(), 2.0).unwrap();
        losses.push(vals(loss.clone())[0]);
        let grads = GradientsParams::from_grads(loss.backward(), &student);
        student = optim.step(1e-2, student, grads);
    }
    assert!(losses[19] < 0.8 * losses[0], "{losses:?}");
}

/// LoRA rank components as units: a 0/1 rank mask equals the adapter cut to the kept ranks
/// (scaling preserved, plain and rsLoRA), on every path (the plain forward and a mixed batch);
/// Bonsai prunes ranks with the magnitude prior, and the activation prior is refused.
#[test]
fn masked_lora_ranks_equal_the_pruned_adapter() {
    use modula::models::AdapterRanks;
    let device = Device::flex();
    let batch = ids(&[vec![3, 9, 17, 4, 40], vec![60, 2, 8, 31, 5]], &device);
    let mut model = tiny(&device);
    let mut rng = Rng(3);
    for (path, layer) in model.linear_layers_mut() {
        if path == "lm_head" {
            continue;
        }
        for (name, rslora) in [("a", false), ("b", true)] {
            let m = LoraModule::from_factors(
                rng.tensor(layer.d_in(), 6, &device),
                rng.tensor(6, layer.d_out(), &device),
                12.0,
                rslora,
                0.0,
            )
            .unwrap();
            layer.insert_adapter(name, m).unwrap();
        }
    }
    model.set_active_adapters(&["a", "b"]).unwrap();
    for name in ["a", "b"] {
        let mut ranks = AdapterRanks::new(model.clone(), name).unwrap();
        let groups = ranks.unit_groups();
        assert_eq!(groups.len(), 14);
        assert!(
            groups
                .iter()
                .all(|g| g.units == 6 && g.kind == UnitKind::LoraRank)
        );
        let drop: Vec<Vec<usize>> = (0..14).map(|g| vec![g % 6, (g + 2) % 6]).collect();
        let (keep, masks) = {
            let keep: Vec<Vec<usize>> = drop
                .iter()
                .map(|d| (0..6).filter(|u| !d.contains(u)).collect())
                .collect();
            let masks: Vec<Tensor<1>> = drop
                .iter()
                .map(|d| {
                    let m: Vec<f32> = (0..6)
                        .map(|u| f32::from(u8::from(!d.contains(&u))))
                        .collect();
                    Tensor::from_data(TensorData::new(m, [6]), &device)
                })
                .collect();
            (keep, masks)
        };
        let full = ranks.model.forward(batch.clone()).unwrap();
        ranks.set_unit_masks(Some(masks)).unwrap();
        let masked = ranks.model.forward(batch.clone()).unwrap();
        let mixed_masked = ranks
            .model
            .forward_mixed(batch.clone(), None, &[Some(name), None])
            .unwrap();
        assert!(
            common::max_abs_diff(masked.clone(), full) > 1e-3,
            "the mask acts"
        );
        ranks.prune_units(&keep).unwrap();
        assert!(ranks.unit_groups().iter().all(|g| g.units == 4));
        assert_close(
            ranks.model.forward(batch.clone()).unwrap(),
            masked,
            1e-5,
            name,
        );
        assert_close(
            ranks
                .model
                .forward_mixed(batch.clone(), None, &[Some(name), None])
                .unwrap(),
            mixed_masked,
            1e-5,
            "mixed batch",
        );
        assert!(ranks.unit_activation_rms().is_err());
    }
    // Bonsai over ranks, scored by −loss; the magnitude prior.
    let mut ranks = AdapterRanks::new(model.clone(), "a").unwrap();
    let start = ranks.prunable_params();
    let config = BonsaiConfig {
        prior: Prior::Magnitude,
        round_fraction: 0.25,
        pairs_per_round: 5,
        ..BonsaiConfig::new(0.5)
    };
    let report = bonsai(
        &mut ranks,
        &config,
        &device,
        &mut |r: &AdapterRanks<LlamaForCausalLm>| {
            let loss = causal_lm_loss(r.model.forward(batch.clone())?, batch.clone(), None)?;
            Ok(-f64::from(vals(loss)[0]))
        },
        &mut |_, _| {},
    )
    .unwrap();
    let largest = ranks
        .unit_groups()
        .iter()
        .map(|g| g.params_per_unit)
        .max()
        .unwrap();
    let (gone, goal) = (start - report.params_after, start / 2);
    assert!(
        gone <= goal && gone + 2 * largest > goal,
        "removed {gone} of {goal} (units of up to {largest})"
    );
    assert!(AdapterRanks::new(model, "zz").is_err());
}

/// Mixtral's experts as units: a 0/1 expert mask (the gate's probabilities masked and
/// renormalised before the top-k choice) equals the layer with those experts removed.
#[test]
fn masked_experts_equal_the_pruned_mixture() {
    let device = Device::flex();
    let batch = ids(&[vec![3, 9, 17, 4, 40], vec![60, 2, 8, 31, 5]], &device);
    let mut model =
        modula::checkpoint::load_decoder(common::data("tiny_decoders/mixtral"), &device).unwrap();
    let groups = model.unit_groups();
    assert_eq!(
        groups
            .iter()
            .map(|g| (g.kind, g.units, g.min_units))
            .collect::<Vec<_>>(),
        [
            (UnitKind::AttentionHead, 4, 1),
            (UnitKind::Expert, 4, 2),
            (UnitKind::AttentionHead, 4, 1),
            (UnitKind::Expert, 4, 2),
        ]
    );
    let full = model.forward(batch.clone()).unwrap();
    let drop = vec![vec![], vec![1], vec![2], vec![0, 3]];
    let (keep, masks) = keep_and_masks(&model, &drop, &device);
    model.set_unit_masks(Some(masks)).unwrap();
    let masked = model.forward(batch.clone()).unwrap();
    assert!(
        common::max_abs_diff(masked.clone(), full) > 1e-3,
        "the masks act"
    );
    model.prune_units(&keep).unwrap();
    assert_eq!(
        model.model.layers[1]
            .block_sparse_moe
            .as_ref()
            .unwrap()
            .experts
            .len(),
        2
    );
    assert_close(
        model.forward(batch.clone()).unwrap(),
        masked,
        1e-5,
        "masked = pruned",
    );
    // Below k experts is refused.
    let groups = model.unit_groups();
    let mut too_few: Vec<Vec<usize>> = groups.iter().map(|g| (0..g.units).collect()).collect();
    too_few[1] = vec![0];
    assert!(model.prune_units(&too_few).is_err());
}
