//! Transformer building blocks against Hugging Face transformers 5.23:
//! tests/data/rope_golden.safetensors (made by tests/data/make_rope.py) holds Llama's inverse
//! frequencies, cos/sin and rotated queries for a default and a Llama-3-scaled RoPE.

mod common;

use burn::tensor::{Int, Tensor};
use common::{assert_close, devices, golden, vals};
use modula::models::{Rope, RopeScaling};

fn ropes() -> [(&'static str, Rope); 2] {
    [
        ("default", Rope::new(16, 10000.0, None).unwrap()),
        (
            "llama3",
            Rope::new(
                16,
                500000.0,
                Some(RopeScaling::Llama3 {
                    factor: 8.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 8192,
                }),
            )
            .unwrap(),
        ),
    ]
}

#[test]
fn rope_frequencies_equal_transformers_bit_for_bit() {
    let g = golden("rope_golden.safetensors");
    let device = burn::tensor::Device::flex();
    for (name, rope) in ropes() {
        let want = vals(g.tensor::<1>(&format!("{name}.inv_freq"), &device).unwrap());
        assert_eq!(rope.inv_freq(), want.as_slice(), "{name}");
    }
    // Llama-3 scaling leaves the high frequencies, divides the low ones by the factor and
    // interpolates in between.
    let (plain, scaled) = (Rope::new(16, 500000.0, None).unwrap(), ropes()[1].1.clone());
    assert_eq!(plain.inv_freq()[0], scaled.inv_freq()[0]);
    let last = plain.inv_freq().len() - 1;
    assert_eq!(plain.inv_freq()[last] / 8.0, scaled.inv_freq()[last]);
}

#[test]
fn rope_rotates_queries_as_transformers_does() {
    let g = golden("rope_golden.safetensors");
    for device in devices() {
        let positions: Tensor<2, Int> = g.tensor::<2>("positions", &device).unwrap().int();
        let q: Tensor<4> = g.tensor("q", &device).unwrap();
        for (name, rope) in ropes() {
            let (cos, sin) = rope.cos_sin(positions.clone());
            let want = |k: &str| g.tensor::<3>(&format!("{name}.{k}"), &device).unwrap();
            assert_close(cos.clone(), want("cos"), 1e-5, &format!("{name} cos"));
            assert_close(sin.clone(), want("sin"), 1e-5, &format!("{name} sin"));
            let rotated = rope.apply(q.clone(), &cos, &sin).unwrap();
            let want_q: Tensor<4> = g.tensor(&format!("{name}.q_embed"), &device).unwrap();
            assert_close(rotated, want_q, 1e-5, &format!("{name} q on {device:?}"));
        }
    }
}

#[test]
fn rope_rejects_bad_settings_and_shapes() {
    assert!(Rope::new(15, 10000.0, None).is_err());
    assert!(Rope::new(16, 1.0, None).is_err());
    let bad = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 4.0,
        high_freq_factor: 1.0,
        original_max_position_embeddings: 8192,
    };
    let e = Rope::new(16, 500000.0, Some(bad)).unwrap_err();
    assert!(e.to_string().contains("high_freq_factor"), "{e}");
    let device = burn::tensor::Device::flex();
    let rope = Rope::new(8, 10000.0, None).unwrap();
    let (cos, sin) = rope.cos_sin(Tensor::<2, Int>::zeros([1, 3], &device));
    let x = Tensor::<4>::zeros([1, 2, 3, 6], &device);
    assert!(rope.apply(x, &cos, &sin).is_err());
}
