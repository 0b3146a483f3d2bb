//! Prints modula's benchmark ratios, measured in one run so machine noise cancels.
//!
//! Run with `cargo run --release --features wgpu,cli --example bench_report`. The last line is
//! one JSON object: every metric, plus a `method` object that records how they were measured
//! (warm-up and timed rounds per section, the statistic, the device, the commit).
//! Shapes follow the peers' script (../shared/peers/bench_peers.py): d_in = d_out = 1024,
//! 4096 tokens, f32, on Flex (or `--wgpu` with the `wgpu` feature); `--quick` for small shapes;
//! `--write-docs` also writes docs/bench_report.json and docs/bench_report.md.
//!
//! `--peers` first runs the PyTorch/PEFT peer, ../shared/peers/bench_peers.py sections a–d and h
//! (`--peers-script PATH` elsewhere; the Python is `$MODULA_PEERS_PYTHON`, else the script
//! folder's `.venv/bin/python`, else `python3`), then modula's measurements, and adds a
//! `pytorch` object to the JSON: for each metric the two sides share, modula's figure,
//! PyTorch's and `modula_over_pytorch`.
//!
//! The example runs on mimalloc (examples/common/alloc.rs); `MODULA_ALLOCATOR=system` measures
//! with the platform's malloc instead, and the JSON records which one ran.
//!
//! Timing: within a section every round runs each variant once, in rotating order, and a
//! variant's time is the median of its timed rounds. Each variant keeps its output alive until
//! the device has synced, so a lazy backend cannot skip the work.
//!
//! `lora_r8_fwd_over_linear_fwd` uses the default [`LoraForward::Auto`](modula::LoraForward)
//! (the fused-weight form at this size), `lora_r8_thin_fwd_over_linear_fwd` forces the thin
//! `s·(x A) B` form.

#[path = "common/alloc.rs"]
mod alloc;
#[path = "common/tartan_step.rs"]
mod tartan_step;

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::PathBuf;
use std::time::Instant;

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use modula::MoeLayerConfig;
use modula::library::{
    Combination, LoraExpert, LoraFactors, MergeOptions, MergeSpace, arrow_prototypes, merge_experts,
};
use modula::prelude::*;
use modula::{ExpertConfig, LoraLinear, TopKRouterConfig};

/// What was measured and how: the metrics, and per section its warm-up and timed rounds.
#[derive(Default)]
struct Report {
    metrics: Vec<(String, f64)>,
    sections: Vec<(String, usize, usize)>,
}

impl Report {
    /// Median wall times in seconds of each closure over `reps` rounds after `warmup` rounds,
    /// recorded under `section`. Every round runs all closures once, in rotating order, so
    /// drift in machine speed and the allocator's state affect them alike. Each closure must
    /// sync the device before it drops its output.
    fn time(
        &mut self,
        section: &str,
        warmup: usize,
        reps: usize,
        fs: &mut [&mut dyn FnMut()],
    ) -> Vec<f64> {
        self.sections.push((section.into(), warmup, reps));
        interleaved(warmup, reps, fs)
    }

    fn push(&mut self, key: impl Into<String>, v: f64) {
        self.metrics.push((key.into(), v));
    }

    /// Prints `label`'s time and its ratio to `base`, and records the ratio under `key`.
    fn ratio(&mut self, label: &str, key: &str, t: f64, base: f64) {
        println!("{label:<17} {:8.2} ms  ratio {:.3}", t * 1e3, t / base);
        self.push(key, t / base);
    }
}

/// Median wall times; see [`Report::time`].
fn interleaved(warmup: usize, reps: usize, fs: &mut [&mut dyn FnMut()]) -> Vec<f64> {
    let n = fs.len();
    let mut times = vec![Vec::with_capacity(reps); n];
    for round in 0..warmup + reps {
        for j in 0..n {
            let i = (round + j) % n;
            let s = Instant::now();
            (fs[i])();
            if round >= warmup {
                times[i].push(s.elapsed().as_secs_f64());
            }
        }
    }
    times
        .into_iter()
        .map(|mut t| {
            t.sort_by(|a, b| a.total_cmp(b));
            t[t.len() / 2]
        })
        .collect()
}

fn device_from_args() -> Device {
    #[cfg(feature = "wgpu")]
    if std::env::args().any(|a| a == "--wgpu") {
        return Device::wgpu(burn::tensor::DeviceKind::DefaultDevice);
    }
    Device::flex()
}

fn lora_layer(base: Linear, rank: usize, device: &Device) -> modula::Result<LoraLinear> {
    let mut layer = LoraLinear::new(base);
    // Non-zero B so the adapter path computes real values (as PEFT's init_lora_weights=False).
    let d = layer.d_in();
    let a = Tensor::<2>::random([d, rank], Distribution::Uniform(-0.03, 0.03), device);
    let b = Tensor::<2>::random(
        [rank, layer.d_out()],
        Distribution::Uniform(-0.03, 0.03),
        device,
    );
    layer.insert_adapter("bench", LoraModule::from_factors(a, b, 16.0, false, 0.0)?)?;
    Ok(layer)
}

fn main() -> modula::Result<()> {
    let device = device_from_args();
    let quick = std::env::args().any(|a| a == "--quick");
    let (d, tokens, warm, reps) = if quick {
        (256, 512, 1, 3)
    } else {
        (1024, 4096, 3, 15)
    };
    let sync = |d: &Device| d.sync().expect("device sync");
    let mut report = Report::default();
    let peers = std::env::args()
        .any(|a| a == "--peers")
        .then(|| run_peers(quick));
    if let Some(dir) = arg_value("--load-peak") {
        return load_peak(&dir);
    }
    if std::env::args().any(|a| a == "--llama-only") {
        llama_metrics(&device, quick, &mut report)?;
        print_json(&report, &device, quick, peers.as_ref());
        return Ok(());
    }
    if std::env::args().any(|a| a == "--library-only") {
        library_metrics(&device, quick, &mut report)?;
        print_json(&report, &device, quick, peers.as_ref());
        return Ok(());
    }

    // --- LoRA forward vs plain Linear forward (inference).
    let linear = LinearConfig::new(d, d).init(&device).no_grad();
    let x = Tensor::<2>::random([tokens, d], Distribution::Default, &device);
    let lora = lora_layer(linear.clone(), 8, &device)?;
    let mut merged = lora.clone();
    merged.merge("bench")?;
    let mut thin = lora.clone();
    thin.set_forward_mode(modula::LoraForward::Thin);
    let t = report.time(
        "lora_fwd",
        warm,
        reps,
        &mut [
            &mut || {
                let y = linear.forward(x.clone());
                sync(&device);
                black_box(y);
            },
            &mut || {
                let y = lora.forward(x.clone()).expect("shapes are right");
                sync(&device);
                black_box(y);
            },
            &mut || {
                let y = merged.forward(x.clone()).expect("shapes are right");
                sync(&device);
                black_box(y);
            },
            &mut || {
                let y = thin.forward(x.clone()).expect("shapes are right");
                sync(&device);
                black_box(y);
            },
        ],
    );
    let (t_lin, t_lora, t_merged, t_thin) = (t[0], t[1], t[2], t[3]);
    let gflop = 2.0 * (tokens * d * d) as f64 / 1e9;
    println!(
        "linear fwd        {:8.2} ms  {:6.1} GFLOP/s",
        t_lin * 1e3,
        gflop / t_lin
    );
    report.push("linear_fwd_gflops", gflop / t_lin);
    report.ratio("lora r8 fwd", "lora_r8_fwd_over_linear_fwd", t_lora, t_lin);
    report.ratio(
        "lora r8 merged",
        "lora_r8_merged_fwd_over_linear_fwd",
        t_merged,
        t_lin,
    );
    report.ratio(
        "lora r8 thin fwd",
        "lora_r8_thin_fwd_over_linear_fwd",
        t_thin,
        t_lin,
    );

    // --- LoHa, LoKr (r = 8) and a 1 % sparse delta: the thin forwards against forming the
    // dense delta on every call, as PEFT's LoHa / LoKr layers do (same backend, one run).
    {
        use modula::{KronFactor, LohaModule, LokrModule, LokrShape, SparseDelta};
        let u = |r: usize, c: usize| {
            Tensor::<2>::random([r, c], Distribution::Uniform(-0.05, 0.05), &device)
        };
        let loha = LohaModule::from_factors(u(d, 8), u(8, d), u(d, 8), u(8, d), 16.0)?;
        let mut lokr = LokrModule::new(d, d, LokrShape::new(8), &device)?;
        if let KronFactor::Full(w) = &mut lokr.w1 {
            let [o, i] = w.shape().dims::<2>();
            *w = burn::module::Param::from_tensor(u(o, i));
        }
        let k = d * d / 100;
        let positions: Vec<i64> = (0..k as i64).map(|i| i * 100 + (i % 97)).collect();
        let sparse = SparseDelta::new(&positions, u(1, k).reshape([k]), d, d)?;
        // A decoding step's few rows.
        let x8 = x.clone().slice([0..8, 0..d]);
        let t = report.time(
            "structured_deltas",
            warm,
            reps,
            &mut [
                &mut || {
                    let y = loha.delta_forward(x.clone());
                    sync(&device);
                    black_box(y);
                },
                &mut || {
                    let y = x.clone().matmul(loha.delta_weight());
                    sync(&device);
                    black_box(y);
                },
                &mut || {
                    let y = lokr.delta_forward(x.clone());
                    sync(&device);
                    black_box(y);
                },
                &mut || {
                    let y = x.clone().matmul(lokr.delta_weight());
                    sync(&device);
                    black_box(y);
                },
                &mut || {
                    let y = sparse.forward_thin(x.clone());
                    sync(&device);
                    black_box(y);
                },
                &mut || {
                    let y = x.clone().matmul(sparse.to_dense());
                    sync(&device);
                    black_box(y);
                },
                &mut || {
                    let y = sparse.forward_delta(x.clone());
                    sync(&device);
                    black_box(y);
                },
                &mut || {
                    let y = sparse.forward_thin(x8.clone());
                    sync(&device);
                    black_box(y);
                },
                &mut || {
                    let y = x8.clone().matmul(sparse.to_dense());
                    sync(&device);
                    black_box(y);
                },
            ],
        );
        report.ratio(
            "loha thin / dense",
            "loha_r8_thin_fwd_over_dense_delta_fwd_time",
            t[0],
            t[1],
        );
        report.ratio(
            "lokr thin / dense",
            "lokr_r8_thin_fwd_over_dense_delta_fwd_time",
            t[2],
            t[3],
        );
        report.ratio(
            "sparse 1% thin",
            "sparse_delta_1pct_thin_fwd_over_dense_delta_fwd_time",
            t[4],
            t[5],
        );
        report.ratio(
            "sparse 1% auto",
            "sparse_delta_1pct_auto_fwd_over_dense_delta_fwd_time",
            t[6],
            t[5],
        );
        report.ratio(
            "sparse 1% 8 rows",
            "sparse_delta_1pct_8_rows_thin_over_dense_delta_time",
            t[7],
            t[8],
        );
    }

    // --- Training step: fwd + bwd. Linear: dX, dW, db. LoRA: dX + dA, dB, base frozen.
    let ad = device.clone().autodiff();
    let lin_t = LinearConfig::new(d, d).init(&ad);
    let lora_t = lora_layer(LinearConfig::new(d, d).init(&ad), 8, &ad)?;
    let xg = Tensor::<2>::random([tokens, d], Distribution::Default, &ad).require_grad();
    let g = Tensor::<2>::random([tokens, d], Distribution::Default, &ad);
    let t = report.time(
        "lora_fwd_bwd",
        warm,
        reps,
        &mut [
            &mut || {
                let grads = (lin_t.forward(xg.clone()) * g.clone()).sum().backward();
                sync(&ad);
                black_box(grads);
            },
            &mut || {
                let y = lora_t.forward(xg.clone()).expect("shapes are right");
                let grads = (y * g.clone()).sum().backward();
                sync(&ad);
                black_box(grads);
            },
        ],
    );
    let (t_lin_fb, t_lora_fb) = (t[0], t[1]);
    println!("linear fwd+bwd    {:8.2} ms", t_lin_fb * 1e3);
    report.ratio(
        "lora r8 fwd+bwd",
        "lora_r8_fwd_bwd_over_linear_fwd_bwd",
        t_lora_fb,
        t_lin_fb,
    );

    // --- Sparse dispatch: top-2 of 8 LoRA experts (r = 64) against all 8 on every row.
    let experts: Vec<LoraModule> = (0..8)
        .map(|_| {
            let a = Tensor::<2>::random([d, 64], Distribution::Uniform(-0.03, 0.03), &device);
            let b = Tensor::<2>::random([64, d], Distribution::Uniform(-0.03, 0.03), &device);
            LoraModule::from_factors(a, b, 16.0, false, 0.0)
        })
        .collect::<modula::Result<_>>()?;
    let idx: Vec<Vec<i64>> = (0..tokens)
        .map(|i| vec![(i % 8) as i64, ((i * 5 + 3) % 8) as i64])
        .map(|mut v| {
            if v[0] == v[1] {
                v[1] = (v[1] + 1) % 8;
            }
            v
        })
        .collect();
    let w: Vec<Vec<f32>> = vec![vec![0.6, 0.4]; tokens];
    let top2 = Routing::from_rows(&idx, &w, 8, &device)?;
    let all8 = Routing::from_dense(Tensor::<2>::ones([tokens, 8], &device))?;
    let t = report.time(
        "dispatch",
        warm,
        reps,
        &mut [
            &mut || {
                let y = dispatch_modules(&experts, &top2, x.clone(), &WeightedSum);
                sync(&device);
                black_box(y.ok());
            },
            &mut || {
                // The dense baseline: every expert on every row, summed directly (no gather,
                // no scatter, no copies of x).
                let mut y = experts[0].delta_forward(x.clone());
                for e in &experts[1..] {
                    y = y + e.delta_forward(x.clone());
                }
                sync(&device);
                black_box(y);
            },
            &mut || {
                let y = dispatch_modules(&experts, &all8, x.clone(), &WeightedSum);
                sync(&device);
                black_box(y.ok());
            },
        ],
    );
    let (t_top2, t_dense, t_all8) = (t[0], t[1], t[2]);
    println!("all 8, dense sum  {:8.2} ms", t_dense * 1e3);
    report.ratio(
        "dispatch top-2/8",
        "dispatch_top2_of_8_over_dense_all_8",
        t_top2,
        t_dense,
    );
    // The dispatch's own overhead: the same all-8 work through gather/scatter.
    report.ratio(
        "dispatch all 8",
        "dispatch_all_8_over_dense_all_8",
        t_all8,
        t_dense,
    );

    // --- Hard learned routing: one module of 8 per row by Gumbel-max sampling (REINFORCE,
    // with the log-probabilities it keeps) and by Gumbel straight-through, against the top-1
    // softmax gate on the same rows, then the dispatch of the chosen expert.
    {
        use modula::routers::{GumbelRouter, ReinforceRouter};
        let gate = TopKRouterConfig::new(d, 8).with_k(1).init(&device)?;
        let gumbel = GumbelRouter::new(d, 8, 1.0, &device)?;
        let reinforce = ReinforceRouter::new(d, 8, 1.0, &device)?;
        let t = report.time(
            "hard_routing",
            warm,
            reps,
            &mut [
                &mut || {
                    let r = gate.route(&x).expect("valid");
                    let y = dispatch_modules(&experts, &r, x.clone(), &WeightedSum);
                    sync(&device);
                    black_box(y.ok());
                },
                &mut || {
                    let r = gumbel.route(&x).expect("valid");
                    let y = dispatch_modules(&experts, &r, x.clone(), &WeightedSum);
                    sync(&device);
                    black_box(y.ok());
                },
                &mut || {
                    let s = reinforce.sample(&x).expect("valid");
                    let y = dispatch_modules(&experts, &s.routing, x.clone(), &WeightedSum);
                    sync(&device);
                    black_box((y.ok(), s.log_prob));
                },
            ],
        );
        report.ratio(
            "gumbel / top-1",
            "gumbel_st_routed_layer_over_top1_gate_time",
            t[1],
            t[0],
        );
        report.ratio(
            "reinforce / top-1",
            "reinforce_routed_layer_over_top1_gate_time",
            t[2],
            t[0],
        );
    }

    // --- MoE layer: E = 8, top-2, SwiGLU d_ff = 2·d, `tokens` tokens (Mixtral-style block).
    let (e, k, d_ff) = (8, 2, 2 * d);
    let moe = MoeLayerConfig::new(
        TopKRouterConfig::new(d, e).with_k(k),
        ExpertConfig::new(d, d_ff),
    )
    .init(&device)?;
    let moe = moe.no_grad();
    let (_, routing) = moe.forward(x.clone())?;
    let w_up = Tensor::<2>::random([d, 2 * d_ff], Distribution::Default, &device);
    let (moe_warm, moe_reps) = if quick { (1, 3) } else { (1, 5) };
    let t = report.time(
        "moe",
        moe_warm,
        moe_reps,
        &mut [
            &mut || {
                let y = moe.forward(x.clone()).expect("valid input");
                sync(&device);
                black_box(y);
            },
            &mut || {
                let y = moe
                    .forward_routed(x.clone(), &routing)
                    .expect("valid input");
                sync(&device);
                black_box(y);
            },
            &mut || {
                let y = moe.forward_dense(x.clone(), &routing).expect("valid input");
                sync(&device);
                black_box(y);
            },
            &mut || {
                // The same dispatch with one burn op chain per expert instead of the
                // grouped op.
                let y = DispatchPlan::new(&routing)
                    .and_then(|plan| {
                        plan.apply(x.clone(), d, &WeightedSum, |m, xm| {
                            Ok(moe.experts[m].forward_rows(xm))
                        })
                    })
                    .expect("valid input");
                sync(&device);
                black_box(y);
            },
            &mut || {
                let r = modula::Router::route(&moe.router, &x).expect("valid input");
                sync(&device);
                black_box(r);
            },
            &mut || {
                let y = x.clone().matmul(w_up.clone());
                sync(&device);
                black_box(y);
            },
        ],
    );
    let (t_moe, t_experts, t_moe_dense, t_per_expert, t_router, t_mm) =
        (t[0], t[1], t[2], t[3], t[4], t[5]);
    // Useful FLOPs: each token through k experts of 3 d×d_ff projections.
    let moe_gflops = (tokens * k * 3 * 2 * d * d_ff) as f64 / 1e9 / t_moe;
    let mm_gflops = (2 * tokens * d * 2 * d_ff) as f64 / 1e9 / t_mm;
    println!("moe dense (all 8) {:8.2} ms", t_moe_dense * 1e3);
    // Expert work against expert work: both sides take the same precomputed routing.
    report.ratio(
        "moe top-2 of 8",
        "moe_top2_over_dense_all_experts",
        t_experts,
        t_moe_dense,
    );
    // The grouped expert op against one op chain per expert, same routing.
    report.ratio(
        "moe grouped",
        "moe_grouped_over_per_expert_ops",
        t_experts,
        t_per_expert,
    );
    // The router (gate matmul, softmax, top-k, losses) as a share of the whole layer.
    report.ratio("moe router", "moe_router_over_layer", t_router, t_moe);
    println!(
        "moe {:.1} GFLOP/s, plain matmul {:.1} GFLOP/s, {:.0} tokens/s",
        moe_gflops,
        mm_gflops,
        tokens as f64 / t_moe
    );
    report.push("moe_gflops_over_matmul_gflops", moe_gflops / mm_gflops);
    report.push("moe_tokens_per_s", tokens as f64 / t_moe);

    transfer_metrics(quick, &mut report)?;
    llama_metrics(&device, quick, &mut report)?;
    library_metrics(&device, quick, &mut report)?;
    print_json(&report, &device, quick, peers.as_ref());
    Ok(())
}

/// META-TARTAN's step over MT-TARTAN's on the same body and objectives: the price of learning
/// the weights (a backward pass per objective and for the dev loss). Autodiff on Flex.
fn transfer_metrics(quick: bool, report: &mut Report) -> modula::Result<()> {
    let device = Device::flex().autodiff();
    let (mut mt, mut meta) = (
        tartan_step::Setup::new(&device),
        tartan_step::Setup::new(&device),
    );
    let t = report.time(
        "transfer",
        2,
        if quick { 5 } else { 30 },
        &mut [&mut || mt.step(false).expect("valid step"), &mut || {
            meta.step(true).expect("valid step")
        }],
    );
    report.ratio(
        "META/MT-TARTAN",
        "meta_tartan_step_over_mt_tartan_step_time",
        t[1],
        t[0],
    );
    Ok(())
}

/// Prefill of the peers' Llama (bench_peers.py section h: vocab 32000, d = 1024, d_ff = 2816,
/// 8 layers, 16 heads, 4 key/value heads; 8 prompts of 128 tokens) with random weights, and the
/// same prefill with 8 LoRAs (r = 8 on q, k, v, o), one per sequence, against one LoRA for all.
fn llama_metrics(device: &Device, quick: bool, report: &mut Report) -> modula::Result<()> {
    use modula::models::{DecoderConfig, GenerationConfig, LlamaForCausalLm};
    let sync = |d: &Device| d.sync().expect("device sync");
    let (d, ff, layers, heads, kv, vocab, b, p) = if quick {
        (128, 352, 2, 4, 2, 1000, 2, 16)
    } else {
        (1024, 2816, 8, 16, 4, 32000, 8, 128)
    };
    let config_json = serde_json::json!({
        "model_type": "llama", "vocab_size": vocab, "hidden_size": d,
        "intermediate_size": ff, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "max_position_embeddings": 4096
    });
    let config = DecoderConfig::from_json(&config_json.to_string(), "bench config")?;
    let model = LlamaForCausalLm::random(&config, 0, device)?.no_grad();
    let mut lora = model.clone();
    let names: Vec<String> = (0..8).map(|i| format!("a{i}")).collect();
    for (l, layer) in lora.model.layers.iter_mut().enumerate() {
        let a = &mut layer.self_attn;
        for (j, proj) in [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj]
            .into_iter()
            .enumerate()
        {
            for (i, name) in names.iter().enumerate() {
                let seed = (l * 100 + j * 10 + i) as u64;
                let f = random_factors(8, proj.d_in(), proj.d_out(), seed);
                proj.insert_adapter(name, f.to_adapter(device)?)?;
            }
        }
    }
    let mut one = lora.clone();
    for layer in one.model.layers.iter_mut() {
        let a = &mut layer.self_attn;
        for proj in [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj] {
            proj.set_active(&["a0"])?;
        }
    }
    let per_seq: Vec<Option<&str>> = (0..b).map(|i| Some(names[i % 8].as_str())).collect();
    let ids: Vec<i32> = (0..b * p)
        .map(|i| (3 + (i * 7919) % (vocab - 3)) as i32)
        .collect();
    let ids = Tensor::<2, burn::tensor::Int>::from_data(TensorData::new(ids, [b, p]), device);
    let t = report.time(
        "llama_prefill",
        1,
        if quick { 3 } else { 5 },
        &mut [
            &mut || {
                let y = model.forward(ids.clone()).expect("valid ids");
                sync(device);
                black_box(y);
            },
            &mut || {
                let y = one.forward(ids.clone()).expect("valid ids");
                sync(device);
                black_box(y);
            },
            &mut || {
                let y = lora
                    .forward_mixed(ids.clone(), None, &per_seq)
                    .expect("valid ids");
                sync(device);
                black_box(y);
            },
        ],
    );
    let tokens = (b * p) as f64;
    println!(
        "llama prefill     {:8.2} ms  {:8.0} tokens/s",
        t[0] * 1e3,
        tokens / t[0]
    );
    report.push("llama_prefill_tokens_per_s", tokens / t[0]);
    report.ratio(
        "llama 8 LoRAs/1",
        "llama_prefill_8_loras_over_one_lora",
        t[2],
        t[1],
    );
    // Greedy decoding of n tokens after the prompt, at batch 1 and b, as the peer measures
    // it: (generate time − prefill time) per new token. EOS is off so every row runs n steps.
    let n = if quick { 8 } else { 32 };
    let greedy = GenerationConfig {
        eos_token_ids: vec![],
        ..GenerationConfig::greedy(&model, n)
    };
    for rows in [1, b] {
        let ids = ids.clone().slice([0..rows, 0..p]);
        let t = report.time(
            &format!("llama_decode_b{rows}"),
            1,
            3,
            &mut [
                &mut || {
                    let y = model.forward(ids.clone()).expect("valid ids");
                    sync(device);
                    black_box(y);
                },
                &mut || {
                    let y = model
                        .generate(ids.clone(), None, None, &greedy, |_| {})
                        .expect("valid ids");
                    black_box(y);
                },
            ],
        );
        let decode = (rows * n) as f64 / (t[1] - t[0]).max(1e-9);
        println!("llama decode b{rows:<2}  {decode:8.1} tokens/s");
        report.push(format!("llama_decode_b{rows}_tokens_per_s"), decode);
    }
    // Arrow in every adapted layer: each token routed to its top 2 of the 8 LoRAs.
    let mut arrow = lora.clone();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let options = modula::models::ArrowOptions {
        top_k: 2,
        ..Default::default()
    };
    modula::models::route_arrow(&mut arrow, &refs, &options, None)?;
    // The alternative to a mixed batch: one copy of the model per adapter with that adapter
    // merged, each serving its own sequence (only the merged q/k/v/o weights are copied).
    use modula::models::LinearLayers;
    let mut merged = Vec::with_capacity(b);
    for name in per_seq.iter().flatten() {
        let mut copy = lora.clone();
        copy.set_active_adapters(&[name])?;
        copy.merge_adapter(name)?;
        merged.push(copy);
    }
    let t = report.time(
        "llama_decode_loras",
        1,
        3,
        &mut [
            &mut || {
                let y = one
                    .generate(ids.clone(), None, None, &greedy, |_| {})
                    .expect("valid ids");
                black_box(y);
            },
            &mut || {
                let y = lora
                    .generate(ids.clone(), None, Some(&per_seq), &greedy, |_| {})
                    .expect("valid ids");
                black_box(y);
            },
            &mut || {
                let y = arrow
                    .generate(ids.clone(), None, None, &greedy, |_| {})
                    .expect("valid ids");
                black_box(y);
            },
            &mut || {
                for (i, copy) in merged.iter().enumerate() {
                    let row = ids.clone().slice([i..i + 1, 0..p]);
                    let y = copy
                        .generate(row, None, None, &greedy, |_| {})
                        .expect("valid ids");
                    black_box(y);
                }
            },
        ],
    );
    // Throughput of 8 sequences on 8 adapters over 8 on one: the peer's ratio_vs_one_lora.
    report.ratio(
        "llama gen 1/8 LoRAs",
        "llama_generate_8_loras_over_one_lora_throughput",
        t[0],
        t[1],
    );
    // Arrow routing per token (top 2 of 8, every layer) over one LoRA for all: the price of
    // routing (no peer measured: bench_peers.py has no Arrow section).
    report.ratio(
        "llama gen Arrow/1",
        "llama_generate_arrow_top2_of_8_over_one_lora_throughput",
        t[0],
        t[2],
    );
    // The mixed batch over one merged copy per adapter, each decoding its sequence alone.
    report.ratio(
        "llama gen mixed/merged copies",
        "llama_generate_8_loras_over_8_merged_copies_throughput",
        t[3],
        t[1],
    );
    pruned_prefill(&model, &ids, quick, report)?;
    load_memory(&model, &config_json, report)
}

/// Prefill of the model with half of its attention heads (whole key/value groups) and half of
/// its feed-forward neurons physically removed, over the unpruned prefill: what structured
/// pruning buys (0.5 would be proportional; attention over the sequence and the output layer
/// do not shrink).
fn pruned_prefill(
    model: &modula::models::LlamaForCausalLm,
    ids: &Tensor<2, burn::tensor::Int>,
    quick: bool,
    report: &mut Report,
) -> modula::Result<()> {
    use modula::prune::Prunable;
    let device = ids.device();
    let sync = |d: &Device| d.sync().expect("device sync");
    let mut pruned = model.clone();
    let keep: Vec<Vec<usize>> = pruned
        .unit_groups()
        .iter()
        .map(|g| (0..g.units / 2).collect())
        .collect();
    pruned.prune_units(&keep)?;
    let t = report.time(
        "llama_prefill_pruned",
        1,
        if quick { 3 } else { 5 },
        &mut [
            &mut || {
                let y = model.forward(ids.clone()).expect("valid ids");
                sync(&device);
                black_box(y);
            },
            &mut || {
                let y = pruned.forward(ids.clone()).expect("valid ids");
                sync(&device);
                black_box(y);
            },
        ],
    );
    report.ratio(
        "llama prefill, half pruned",
        "llama_prefill_half_heads_and_neurons_pruned_over_dense_time",
        t[1],
        t[0],
    );
    Ok(())
}

/// Peak resident memory while loading the benchmark's Llama from an F32 `model.safetensors`,
/// over the file's size, measured in a fresh process (`bench_report --load-peak DIR`) so that
/// no earlier allocation is reused: its peak resident memory (`VmHWM`) after loading, less
/// its resident memory before.
fn load_memory(
    model: &modula::models::LlamaForCausalLm,
    config_json: &serde_json::Value,
    report: &mut Report,
) -> modula::Result<()> {
    let dir = tempfile_dir();
    let io = |e| modula::Error::Io {
        path: dir.clone(),
        source: e,
    };
    std::fs::create_dir_all(&dir).map_err(io)?;
    std::fs::write(dir.join("config.json"), config_json.to_string()).map_err(io)?;
    modula::checkpoint::write_decoder_weights(model, &dir)?;
    let size = std::fs::metadata(dir.join("model.safetensors"))
        .map_err(io)?
        .len() as f64;
    let child = std::env::current_exe().and_then(|exe| {
        std::process::Command::new(exe)
            .arg("--load-peak")
            .arg(&dir)
            .output()
    });
    let costs = reliability_costs(&dir, report);
    let _ = std::fs::remove_dir_all(&dir);
    costs?;
    let grown = child.ok().and_then(|o| {
        String::from_utf8_lossy(&o.stdout).lines().find_map(|l| {
            l.strip_prefix("load-peak-bytes ")?
                .trim()
                .parse::<f64>()
                .ok()
        })
    });
    match grown {
        Some(grown) => {
            let ratio = grown / size;
            println!(
                "llama load        {:8.0} MB file, peak +{:.0} MB resident, ratio {ratio:.3}",
                size / 1e6,
                grown / 1e6
            );
            report.push("llama_load_peak_rss_over_f32_size", ratio);
        }
        None => println!("llama load        peak memory not measurable here (needs Linux /proc)"),
    }
    Ok(())
}

/// What the reliability guards cost (issue 17), on the benchmark's Llama folder: loading with
/// the non-finite check (every weight scanned) over loading without it, and the crash-safe,
/// flushed write of its `model.safetensors` (temporary file, `fsync`, rename, folder `fsync`:
/// `io::atomic_write`) over a plain `std::fs::write` of the same bytes.
fn reliability_costs(dir: &std::path::Path, report: &mut Report) -> modula::Result<()> {
    use modula::io::{NonFinitePolicy, atomic_write, set_non_finite_policy};
    let device = Device::flex();
    let file = dir.join("model.safetensors");
    let bytes = std::fs::read(&file).map_err(|e| modula::Error::Io {
        path: file.clone(),
        source: e,
    })?;
    let t = report.time(
        "reliability_load",
        1,
        5,
        &mut [
            &mut || {
                set_non_finite_policy(NonFinitePolicy::Refuse);
                black_box(modula::checkpoint::load_decoder(dir, &device).expect("loads"));
            },
            &mut || {
                set_non_finite_policy(NonFinitePolicy::Allow);
                black_box(modula::checkpoint::load_decoder(dir, &device).expect("loads"));
                set_non_finite_policy(NonFinitePolicy::Refuse);
            },
        ],
    );
    report.ratio(
        "load checked/unchecked",
        "llama_load_non_finite_check_over_allow",
        t[0],
        t[1],
    );
    let (safe, plain) = (dir.join("safe.safetensors"), dir.join("plain.safetensors"));
    let t = report.time(
        "reliability_write",
        1,
        5,
        &mut [
            &mut || atomic_write(&safe, &bytes).expect("writes"),
            &mut || std::fs::write(&plain, &bytes).expect("writes"),
        ],
    );
    println!(
        "write {:.0} MB       crash-safe {:.1} ms, plain {:.1} ms",
        bytes.len() as f64 / 1e6,
        t[0] * 1e3,
        t[1] * 1e3
    );
    report.ratio(
        "write safe/plain",
        "safetensors_crash_safe_write_over_plain_write",
        t[0],
        t[1],
    );
    Ok(())
}

/// The child of [`load_memory`]: loads the folder and prints how far the peak resident memory
/// rose above the resident memory before loading.
fn load_peak(dir: &str) -> modula::Result<()> {
    let status = |key: &str| -> Option<f64> {
        let text = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = text.lines().find(|l| l.starts_with(key))?;
        let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024.0)
    };
    let before = status("VmRSS:");
    let model = modula::checkpoint::load_decoder(dir, &Device::flex())?;
    if let (Some(before), Some(peak)) = (before, status("VmHWM:")) {
        println!("load-peak-bytes {}", peak - before);
    }
    drop(model);
    Ok(())
}

/// A fresh folder under the system's temporary directory.
fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("modula-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// The value after `flag` on the command line.
fn arg_value(flag: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1).cloned())
}

/// The peer's records by id, and its `meta` object; or why the peer did not run.
type PeerRun = Result<(BTreeMap<String, serde_json::Value>, serde_json::Value), String>;

/// Runs bench_peers.py sections a–d and h (the Linear, PEFT LoRA, mixed-batch, MoE and Llama
/// figures) into
/// a temporary JSON file and reads it back.
fn run_peers(quick: bool) -> PeerRun {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let script = arg_value("--peers-script").map_or_else(
        || root.join("../shared/peers/bench_peers.py"),
        PathBuf::from,
    );
    if !script.is_file() {
        return Err(format!(
            "no peer script at {}; pass --peers-script PATH",
            script.display()
        ));
    }
    let venv = script.with_file_name(".venv").join("bin/python");
    let python = std::env::var("MODULA_PEERS_PYTHON").unwrap_or_else(|_| {
        if venv.is_file() {
            venv.display().to_string()
        } else {
            "python3".into()
        }
    });
    let out = std::env::temp_dir().join(format!("modula-peers-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&out);
    println!("running the PyTorch peer: {python} {}", script.display());
    let mut cmd = std::process::Command::new(&python);
    cmd.arg(&script)
        // --llama-only pairs with the peer's Llama section alone.
        .args([
            "--only",
            if std::env::args().any(|a| a == "--llama-only") {
                "h"
            } else {
                "abcdh"
            },
            "--out",
        ])
        .arg(&out);
    if quick {
        cmd.arg("--quick");
    }
    let status = cmd
        .status()
        .map_err(|e| format!("could not start {python}: {e}"))?;
    if !status.success() {
        return Err(format!(
            "{python} {} failed ({status}); does it have torch and peft? set MODULA_PEERS_PYTHON",
            script.display()
        ));
    }
    let text = std::fs::read_to_string(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let _ = std::fs::remove_file(&out);
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("peer output: {e}"))?;
    let records = json["results"]
        .as_array()
        .ok_or("peer output has no results array")?
        .iter()
        .filter_map(|r| Some((r["id"].as_str()?.to_string(), r.clone())))
        .collect();
    Ok((records, json["meta"].clone()))
}

/// modula's figure, PyTorch's and their ratio, for every metric both sides measure.
fn side_by_side(report: &Report, peers: &PeerRun) -> serde_json::Value {
    let (records, meta) = match peers {
        Ok(p) => p,
        Err(why) => return serde_json::json!({ "error": why }),
    };
    let field = |id: &str, f: &str| records.get(id).and_then(|r| r[f].as_f64());
    let median = |id: &str| field(id, "median_s");
    let ratio = |a: Option<f64>, b: Option<f64>| Some(a? / b?);
    let mut pairs: Vec<(String, Option<f64>)> = vec![
        (
            "linear_fwd_gflops".into(),
            field("a.linear.fwd", "gflop_per_s"),
        ),
        (
            "lora_r8_fwd_over_linear_fwd".into(),
            ratio(median("b.lora_r8.fwd_unmerged"), median("a.linear.fwd")),
        ),
        (
            "moe_tokens_per_s".into(),
            field("d.moe_sparse_top2.fwd", "tokens_per_s"),
        ),
        (
            "llama_prefill_tokens_per_s".into(),
            field("h.llama_prefill.b8", "tokens_per_s"),
        ),
        (
            "llama_decode_b1_tokens_per_s".into(),
            field("h.llama_decode.b1", "tokens_per_s"),
        ),
        (
            "llama_decode_b8_tokens_per_s".into(),
            field("h.llama_decode.b8", "tokens_per_s"),
        ),
        (
            "llama_generate_8_loras_over_one_lora_throughput".into(),
            field("h.llama_generate_8_loras.b8", "ratio_vs_one_lora"),
        ),
        (
            "moe_top2_over_dense_all_experts".into(),
            ratio(
                median("d.moe_sparse_top2.fwd"),
                median("d.moe_dense_all_experts.fwd"),
            ),
        ),
    ];
    for (k, _) in &report.metrics {
        if let Some(n) = k
            .strip_prefix("mixed_")
            .and_then(|r| r.strip_suffix("_adapters_over_single_adapter"))
        {
            let id = format!("c.mixed_{n}_adapters.fwd");
            pairs.push((
                k.clone(),
                ratio(median(&id), median("c.single_adapter.fwd")),
            ));
        }
    }
    let round = |v: f64| (v * 1e4).round() / 1e4;
    let mut obj = serde_json::Map::new();
    for (k, theirs) in pairs {
        let ours = report
            .metrics
            .iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| *v);
        if let (Some(ours), Some(theirs)) = (ours, theirs) {
            obj.insert(
                k,
                serde_json::json!({
                    "modula": round(ours),
                    "pytorch": round(theirs),
                    "modula_over_pytorch": round(ours / theirs),
                }),
            );
        }
    }
    obj.insert(
        "peer".into(),
        serde_json::json!({
            "versions": meta["versions"],
            "torch_num_threads": meta["torch_num_threads"],
            "cpu": meta["cpu"],
            "quick": meta["quick"],
        }),
    );
    serde_json::Value::Object(obj)
}

/// The commit the report was built from, `-dirty` when the work tree has changes.
fn commit() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(head) => match git(&["status", "--porcelain", "--untracked-files=no"]) {
            Some(s) if !s.is_empty() => format!("{head}-dirty"),
            _ => head,
        },
        None => "unknown".into(),
    }
}

/// One JSON object: the metrics at the top level and how they were measured under `method`.
/// With `--write-docs` it is also written to docs/bench_report.json, and the same figures as a
/// markdown table to docs/bench_report.md.
fn print_json(report: &Report, device: &Device, quick: bool, peers: Option<&PeerRun>) {
    let mut obj = serde_json::Map::new();
    for (k, v) in &report.metrics {
        obj.insert(k.clone(), serde_json::json!((v * 1e4).round() / 1e4));
    }
    let sections: serde_json::Map<String, serde_json::Value> = report
        .sections
        .iter()
        .map(|(name, warmup, rounds)| {
            (
                name.clone(),
                serde_json::json!({ "warmup_rounds": warmup, "timed_rounds": rounds }),
            )
        })
        .collect();
    obj.insert(
        "method".into(),
        serde_json::json!({
            "timing": "Per section, every round runs each variant once in rotating order; a variant's time is the median of its timed rounds; outputs are kept alive until the device has synced",
            "statistic": "median",
            "sections": sections,
            "device": format!("{device:?}"),
            "quick": quick,
            "commit": commit(),
            "threads": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "allocator": alloc::name(),
            "cpu_flags": cpu_flags(),
        }),
    );
    if let Some(p) = peers {
        obj.insert("pytorch".into(), side_by_side(report, p));
    }
    let json = serde_json::Value::Object(obj);
    println!("{json}");
    if std::env::args().any(|a| a == "--write-docs")
        && let Err(e) = write_docs(&json, report)
    {
        eprintln!("error: could not write the docs files: {e}");
        std::process::exit(1);
    }
}

/// The CPU's model name and its vector extensions that matter to the matmul kernels (x86).
fn cpu_flags() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let line = |key: &str| {
        info.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    let flags = line("flags");
    let wanted: Vec<&str> = flags
        .split_whitespace()
        .filter(|f| {
            matches!(
                *f,
                "avx2" | "fma" | "avx512f" | "avx512bw" | "avx512vl" | "avx512_bf16"
            ) || f.starts_with("amx")
        })
        .collect();
    format!("{}: {}", line("model name"), wanted.join(" "))
}

/// docs/bench_report.json (the JSON line, pretty-printed) and docs/bench_report.md (a table
/// of the metrics and the method), each written atomically.
fn write_docs(json: &serde_json::Value, report: &Report) -> modula::Result<()> {
    let docs = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs");
    let pretty = serde_json::to_string_pretty(json).expect("a JSON value serialises") + "\n";
    modula::io::atomic_write(&docs.join("bench_report.json"), pretty.as_bytes())?;
    let method = &json["method"];
    let mut md = String::from("# bench_report: the last recorded run\n\n");
    md.push_str(&format!(
        "Written by `cargo run --release --features wgpu,cli --example bench_report -- --write-docs` \
         (commit `{}`, device `{}`, {} threads{}). {}.\n\n",
        method["commit"].as_str().unwrap_or("unknown"),
        method["device"].as_str().unwrap_or("?"),
        method["threads"],
        if method["quick"] == true { ", `--quick` shapes" } else { "" },
        method["timing"].as_str().unwrap_or_default()
    ));
    md.push_str("| section | warm-up rounds | timed rounds |\n|---|---|---|\n");
    for (name, warmup, rounds) in &report.sections {
        md.push_str(&format!("| {name} | {warmup} | {rounds} |\n"));
    }
    md.push_str("\n| metric | value |\n|---|---|\n");
    for (k, v) in &report.metrics {
        md.push_str(&format!("| `{k}` | {v:.4} |\n"));
    }
    if let Some(peer) = json["pytorch"].as_object() {
        md.push_str("\n## Beside PyTorch (`--peers`, the same run)\n\n");
        match peer.get("error") {
            Some(why) => md.push_str(&format!("The peer did not run: {why}\n")),
            None => {
                md.push_str(
                    "| metric | modula | PyTorch | modula / PyTorch |\n|---|---|---|---|\n",
                );
                for (k, v) in peer.iter().filter(|(k, _)| *k != "peer") {
                    md.push_str(&format!(
                        "| `{k}` | {} | {} | {} |\n",
                        v["modula"], v["pytorch"], v["modula_over_pytorch"]
                    ));
                }
            }
        }
    }
    modula::io::atomic_write(&docs.join("bench_report.md"), md.as_bytes())
}

fn random_factors(r: usize, d_in: usize, d_out: usize, seed: u64) -> LoraFactors {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    };
    let a: Vec<f64> = (0..r * d_in).map(|_| next()).collect();
    let b: Vec<f64> = (0..d_out * r).map(|_| next()).collect();
    LoraFactors::new(
        &TensorData::new(a, [r, d_in]),
        &TensorData::new(b, [d_out, r]),
        2.0,
    )
    .expect("consistent shapes")
}

/// Library metrics: mixed-adapter batches, Arrow prototypes, TIES merging (shapes of the
/// peers' sections c, f and e).
fn library_metrics(device: &Device, quick: bool, report: &mut Report) -> modula::Result<()> {
    let sync = |d: &Device| d.sync().expect("device sync");
    let (d, seqs, seq_len, n_adapters, warm, reps) = if quick {
        (256, 16, 16, 8, 1, 3)
    } else {
        (1024, 64, 64, 32, 2, 9)
    };
    // --- Mixed-adapter batch: 4 layers d×d + ReLU, r = 8, `n_adapters` loaded.
    let mut layers = Vec::new();
    for l in 0..4 {
        let mut layer = LoraLinear::new(LinearConfig::new(d, d).init(device).no_grad());
        for i in 0..n_adapters {
            let f = random_factors(8, d, d, (l * 1000 + i) as u64);
            layer.insert_adapter(&format!("a{i}"), f.to_adapter(device)?)?;
        }
        layers.push(layer);
    }
    let mut single = layers.clone();
    for l in single.iter_mut() {
        l.set_active(&["a0"])?;
    }
    let mut single_thin = single.clone();
    for l in single_thin.iter_mut() {
        l.set_forward_mode(modula::LoraForward::Thin);
    }
    let names: Vec<String> = (0..n_adapters).map(|i| format!("a{i}")).collect();
    let per_seq: Vec<Option<&str>> = (0..seqs)
        .map(|s| Some(names[(s * 7 + s / 3) % n_adapters].as_str()))
        .collect();
    let x = Tensor::<3>::random([seqs, seq_len, d], Distribution::Default, device);
    let t = report.time(
        "mixed_adapters",
        warm,
        reps,
        &mut [
            &mut || {
                let mut h = x.clone();
                for l in &single {
                    h = burn::tensor::activation::relu(l.forward(h).expect("valid"));
                }
                sync(device);
                black_box(h);
            },
            &mut || {
                let mut h = x.clone();
                for l in &single_thin {
                    h = burn::tensor::activation::relu(l.forward(h).expect("valid"));
                }
                sync(device);
                black_box(h);
            },
            &mut || {
                let mut h = x.clone();
                for l in &layers {
                    h = burn::tensor::activation::relu(
                        l.forward_mixed_seqs(h, &per_seq).expect("valid"),
                    );
                }
                sync(device);
                black_box(h);
            },
        ],
    );
    let distinct = per_seq
        .iter()
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    println!("single adapter    {:8.2} ms", t[0] * 1e3);
    report.ratio(
        &format!("mixed ({distinct} of {n_adapters})"),
        &format!("mixed_{n_adapters}_adapters_over_single_adapter"),
        t[2],
        t[0],
    );
    report.ratio(
        "mixed / thin 1",
        &format!("mixed_{n_adapters}_adapters_over_single_adapter_thin"),
        t[2],
        t[1],
    );

    // --- Arrow prototypes of 64 LoRAs (r = 8, d×d) and TIES over 8 LoRAs (r = 16, 4 layers).
    let n_arrow = if quick { 16 } else { 64 };
    let arrow_in: Vec<LoraFactors> = (0..n_arrow)
        .map(|i| random_factors(8, d, d, 5000 + i as u64))
        .collect();
    let arrow_refs: Vec<&LoraFactors> = arrow_in.iter().collect();
    let experts: Vec<LoraExpert> = (0..8)
        .map(|i| {
            let mut e = LoraExpert::default();
            for l in 0..4 {
                e.layers.insert(
                    format!("layers.{l}"),
                    random_factors(16, d, d, 9000 + 10 * i + l),
                );
            }
            e
        })
        .collect();
    let expert_refs: Vec<&LoraExpert> = experts.iter().collect();
    let w = [0.125; 8];
    let ties = MergeOptions::new(Combination::Ties)
        .with_space(MergeSpace::Factor)
        .with_density(0.5);
    let t = report.time(
        "arrow_ties",
        1,
        if quick { 3 } else { 9 },
        &mut [
            &mut || {
                black_box(arrow_prototypes(&arrow_refs).expect("valid"));
            },
            &mut || {
                black_box(merge_experts(&expert_refs, &w, &ties).expect("valid"));
            },
        ],
    );
    println!("arrow {n_arrow} LoRAs    {:8.2} ms (exact)", t[0] * 1e3);
    println!(
        "ties 8x r16 x4    {:8.2} ms (PEFT factor space)",
        t[1] * 1e3
    );
    report.push(format!("arrow_{n_arrow}_loras_s"), t[0]);
    report.push("ties_8x_r16_s", t[1]);

    // --- LMC: a layer with 4 modules against 1 (each module's function and decoder run on
    // every row, so the ideal is 4).
    let lx = Tensor::<2>::random([tokens_for(quick), d], Distribution::Default, device);
    let one = modula::continual::LmcLayer::new(d, d, Default::default(), device)?;
    let mut four = one.clone();
    for _ in 1..4 {
        four.add_module(device);
    }
    let t = report.time(
        "lmc",
        1,
        if quick { 3 } else { 7 },
        &mut [
            &mut || {
                let y = one.forward(lx.clone()).expect("valid");
                sync(device);
                black_box(y);
            },
            &mut || {
                let y = four.forward(lx.clone()).expect("valid");
                sync(device);
                black_box(y);
            },
        ],
    );
    report.ratio(
        "lmc 4 / 1 modules",
        "lmc_4_modules_over_1_module",
        t[1],
        t[0],
    );
    Ok(())
}

fn tokens_for(quick: bool) -> usize {
    if quick { 256 } else { 2048 }
}
