//! A modular language model end to end (Ostapenko et al. 2024, arXiv 2405.11157, on a byte-
//! level Llama): a library of LoRA experts trained on real text of several domains, clustered
//! by MBC and reused zero-shot by Arrow routing at every adapted layer and every token.
//!
//! 1. Pre-train a small Llama-architecture LM (bytes as tokens, d = 128, 4 layers, GQA) on a
//!    mix of the six domains of data/ (prose, Rust, TOML, Python, C, man pages).
//! 2. Train rank-8 LoRA experts on four of the domains, two per domain (each on its own half
//!    of the domain's training text, one initialisation for all), on every linear layer but
//!    the output layer; base frozen. C and man pages get no expert.
//! 3. Cluster the eight experts with MBC (parameters only) into four groups.
//! 4. Bits per byte on the held-out test text of all six domains for: the base; the uniform
//!    merge µ of all experts; Arrow top-2 per token over the library; Arrow top-1 over the MBC
//!    cluster merges; a learned router per layer (X-LoRA-style, trained on the composed
//!    model's loss over a small memory of the expert domains); and the oracle (the best single
//!    expert on each domain's test text: an upper bound that zero-shot routing cannot use).
//!
//! Writes docs/modular_lm.md (the tables) and docs/modular_lm_routing.svg (the share of each
//! expert in Arrow's routing, per domain and layer). `--quick` runs a few steps of each stage
//! and only prints.
//!
//! Run: `cargo run --release --features wgpu,cli --example modular_lm`

#[path = "common/alloc.rs"]
mod alloc;
#[path = "common/byte_lm.rs"]
mod byte_lm;
#[path = "common/progress.rs"]
mod progress;
#[path = "common/rng.rs"]
mod rng;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use burn::module::Module;
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::Device;
use byte_lm::{BATCH, DOMAINS, Res, SEQ, bits_per_byte, lm_loss, read, sample};
use modula::library::{Combination, LoraExpert, MbcConfig, MergeOptions, mbc_cluster};
use modula::models::{
    ArrowOptions, LayerRouters, LinearLayers, LlamaForCausalLm, remove_routers, route_arrow,
};
use modula::routers::XLoraRouterConfig;
use modula::{LoraConfig, LoraMix, PeftLora, RoutingTrace};
use progress::bar;
use rng::Rng;

/// The domains that get experts (two each).
const EXPERT_DOMAINS: [&str; 4] = ["prose", "rust", "toml", "python"];
const RANK: usize = 8;

/// Steps of each stage (full run, `--quick`).
struct Budget {
    pretrain: usize,
    expert: usize,
    /// Steps of the learned routers.
    router: usize,
    /// Test windows per domain.
    eval_windows: usize,
}

fn main() -> Res<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    // Every expert from one initialisation (A equal, B = 0), as MBC wants, or each from its
    // own (`--distinct-init`).
    let distinct = std::env::args().any(|a| a == "--distinct-init");
    let budget = if quick {
        Budget {
            pretrain: 20,
            expert: 5,
            router: 3,
            eval_windows: 8,
        }
    } else {
        Budget {
            pretrain: 400,
            expert: 100,
            router: 40,
            eval_windows: 128,
        }
    };
    let started = Instant::now();
    let train: BTreeMap<&str, Vec<u8>> = DOMAINS
        .iter()
        .map(|d| Ok((*d, read(d, "train")?)))
        .collect::<Res<_>>()?;
    let test: BTreeMap<&str, Vec<u8>> = DOMAINS
        .iter()
        .map(|d| Ok((*d, read(d, "test")?)))
        .collect::<Res<_>>()?;

    // 1. Pre-train the base on all six domains.
    let cpu = Device::flex();
    let ad = cpu.clone().autodiff();
    let mut rng = Rng(1);
    let texts: Vec<&[u8]> = DOMAINS.iter().map(|d| train[d].as_slice()).collect();
    let model = byte_lm::pretrain(&texts, budget.pretrain, &ad, &mut rng)?;
    let pre_secs = started.elapsed().as_secs_f64();
    let frozen = model.clone().no_grad();
    let base_params = model.num_params();

    // 2. Two experts per expert domain, each on one half of the domain's training text.
    let lora = LoraConfig::new(RANK).with_alpha(2.0 * RANK as f64);
    let mut experts: Vec<(String, PeftLora)> = Vec::new();
    // The same experts on the autodiff device, for training the routers over them.
    let mut experts_ad: Vec<PeftLora> = Vec::new();
    let jobs: Vec<(String, &[u8])> = EXPERT_DOMAINS
        .iter()
        .flat_map(|d| {
            let t = train[d].as_slice();
            let half = t.len() / 2;
            [
                (format!("{d}-a"), &t[..half]),
                (format!("{d}-b"), &t[half..]),
            ]
        })
        .collect();
    let pb = bar(jobs.len() * budget.expert, "experts")?;
    let expert_started = Instant::now();
    for (j, (name, text)) in jobs.iter().enumerate() {
        let mut m = frozen.clone();
        // One initialisation for every expert (same A, B = 0): MBC then clusters what
        // training changed; or one per expert.
        ad.seed(if distinct { 1000 + j as u64 } else { 1000 });
        m.add_lora("e", &lora, &|p| p != "lm_head")?;
        let mut optim = AdamConfig::new().init();
        for _ in 0..budget.expert {
            let (loss, bits) = lm_loss(&m, &sample(&[text], &mut rng), &ad)?;
            pb.set_message(format!("{name} {bits:.3}"));
            let grads = GradientsParams::from_grads(loss.backward(), &m);
            m = optim.step(5e-3, m, grads);
            pb.inc(1);
        }
        experts_ad.push(PeftLora::from_model(&m, "e")?);
        experts.push((name.clone(), PeftLora::from_model(&m.valid(), "e")?));
    }
    pb.finish();
    let expert_secs = expert_started.elapsed().as_secs_f64();

    // 2b. A learned router per adapted layer (X-LoRA-style classifier on the layer's input,
    // dense softmax over the experts), trained on the composed model's language-modelling
    // loss over a memory of 16 windows per expert domain; experts and base frozen.
    let mut composed = frozen.clone();
    for ((name, _), peft) in experts.iter().zip(&experts_ad) {
        peft.attach_to_model(&mut composed, name)?;
    }
    let composed = composed.no_grad();
    let names: Vec<String> = experts.iter().map(|(n, _)| n.clone()).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    ad.seed(7);
    let mut routers = LayerRouters::new(&composed, &refs, LoraMix::Output, &mut |_, layer| {
        XLoraRouterConfig::new(layer.d_in(), 32, names.len()).init(&ad)
    })?;
    let memory: Vec<&[u8]> = EXPERT_DOMAINS
        .iter()
        .flat_map(|d| {
            let mut r = Rng(99);
            let t = train[d].as_slice();
            (0..16)
                .map(|_| {
                    let s = r.below(t.len() - SEQ);
                    &t[s..s + SEQ]
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let mut optim = AdamConfig::new().init();
    let pb = bar(budget.router, "router")?;
    let router_started = Instant::now();
    for _ in 0..budget.router {
        let mut m = composed.clone();
        routers.install(&mut m)?;
        let batch: Vec<&[u8]> = (0..BATCH)
            .map(|_| memory[rng.below(memory.len())])
            .collect();
        let (loss, bits) = lm_loss(&m, &batch, &ad)?;
        pb.set_message(format!("{bits:.3}"));
        let grads = GradientsParams::from_grads(loss.backward(), &routers);
        routers = optim.step(3e-3, routers, grads);
        pb.inc(1);
    }
    pb.finish();
    let router_secs = router_started.elapsed().as_secs_f64();
    let routers = routers.valid();

    // 3. MBC over the experts' parameters.
    let host: Vec<LoraExpert> = experts
        .iter()
        .map(|(_, p)| LoraExpert::from_peft(p))
        .collect::<modula::Result<_>>()?;
    let refs: Vec<&LoraExpert> = host.iter().collect();
    let clustering = mbc_cluster(&refs, &MbcConfig::new(EXPERT_DOMAINS.len()), &cpu)?;
    let clusters: Vec<Vec<String>> = clustering
        .clusters
        .iter()
        .map(|c| c.iter().map(|&i| experts[i].0.clone()).collect())
        .collect();

    // Arrow's prototypes: mean |cos| between two experts' prototypes at one layer, for
    // experts of the same domain and of different domains.
    let (mut same, mut other) = (Vec::new(), Vec::new());
    for path in host[0].layers.keys() {
        let protos: Vec<Vec<f64>> = host
            .iter()
            .map(|e| modula::library::arrow::arrow_prototype(&e.layers[path]))
            .collect();
        for i in 0..protos.len() {
            for j in i + 1..protos.len() {
                let c: f64 = protos[i].iter().zip(&protos[j]).map(|(a, b)| a * b).sum();
                if i / 2 == j / 2 {
                    &mut same
                } else {
                    &mut other
                }
                .push(c.abs());
            }
        }
    }
    let proto_same = same.iter().sum::<f64>() / same.len().max(1) as f64;
    let proto_other = other.iter().sum::<f64>() / other.len().max(1) as f64;

    // 4. Evaluation on held-out text of every domain.
    let mut eval = model.valid().no_grad();
    for (name, peft) in &experts {
        peft.attach_to_model(&mut eval, name)?;
    }
    // The adapter names again (`refs` above is the experts' host factors).
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let cat = MergeOptions::new(Combination::Cat);
    eval.add_weighted_adapter(
        &refs,
        &vec![1.0 / refs.len() as f64; refs.len()],
        &cat,
        "mu",
    )?;
    let cluster_names: Vec<String> = (0..clusters.len()).map(|i| format!("cluster{i}")).collect();
    for (c, name) in clusters.iter().zip(&cluster_names) {
        let members: Vec<&str> = c.iter().map(String::as_str).collect();
        eval.add_weighted_adapter(&members, &vec![1.0 / c.len() as f64; c.len()], &cat, name)?;
    }
    let windows = budget.eval_windows;
    let n_rows = 6 + names.len();
    let pb = bar(n_rows * DOMAINS.len(), "evaluate")?;
    let eval_all = |m: &LlamaForCausalLm| -> Res<Vec<f64>> {
        DOMAINS
            .iter()
            .map(|d| {
                let v = bits_per_byte(m, &test[d], windows, &cpu);
                pb.inc(1);
                v
            })
            .collect()
    };
    eval.set_active_adapters(&[])?;
    let base = eval_all(&eval)?;
    eval.set_active_adapters(&["mu"])?;
    let mu = eval_all(&eval)?;
    let mut single = Vec::new();
    for n in &names {
        eval.set_active_adapters(&[n.as_str()])?;
        single.push(eval_all(&eval)?);
    }
    eval.set_active_adapters(&[])?;
    let top2 = ArrowOptions {
        top_k: 2,
        temperature: 1.0,
        mix: LoraMix::Output,
    };
    route_arrow(&mut eval, &refs, &top2, None)?;
    let arrow = eval_all(&eval)?;
    remove_routers(&mut eval);
    let top1 = ArrowOptions { top_k: 1, ..top2 };
    route_arrow(&mut eval, &refs, &top1, None)?;
    let arrow1 = eval_all(&eval)?;
    remove_routers(&mut eval);
    let crefs: Vec<&str> = cluster_names.iter().map(String::as_str).collect();
    route_arrow(&mut eval, &crefs, &top1, None)?;
    let arrow_clusters = eval_all(&eval)?;
    remove_routers(&mut eval);
    routers.install(&mut eval)?;
    let learned = eval_all(&eval)?;
    remove_routers(&mut eval);
    pb.finish();

    // Routing shares per domain and layer (Arrow top-2 over the library).
    let trace = RoutingTrace::new();
    route_arrow(&mut eval, &refs, &top2, Some(&trace))?;
    let layers = frozen.config.num_hidden_layers;
    // share[domain][layer][expert]
    let mut share = vec![vec![vec![0f64; names.len()]; layers]; DOMAINS.len()];
    for (d, domain) in DOMAINS.iter().enumerate() {
        let w = windows.min(32);
        bits_per_byte(&eval, &test[domain], w, &cpu)?;
        let mut rows = vec![0f64; layers];
        for dec in trace.take() {
            let l: usize = dec
                .label
                .split('.')
                .nth(2)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let dense = dec.dense(dec.adapters.len());
            for row in dense.chunks(dec.adapters.len()) {
                for (e, v) in row.iter().enumerate() {
                    let idx = names
                        .iter()
                        .position(|n| *n == dec.adapters[e])
                        .unwrap_or(0);
                    share[d][l][idx] += f64::from(*v);
                }
                rows[l] += 1.0;
            }
        }
        for l in 0..layers {
            for v in &mut share[d][l] {
                *v /= rows[l].max(1.0);
            }
        }
    }
    remove_routers(&mut eval);

    // Report.
    let oracle: Vec<(f64, &str)> = (0..DOMAINS.len())
        .map(|d| {
            single
                .iter()
                .zip(&names)
                .map(|(s, n)| (s[d], n.as_str()))
                .fold((f64::INFINITY, ""), |a, b| if b.0 < a.0 { b } else { a })
        })
        .collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let stem = if distinct {
        "modular_lm_distinct_init"
    } else {
        "modular_lm"
    };
    let mut md = String::new();
    writeln!(
        md,
        "# A modular byte-level LM: a LoRA library on real text (issue 14)\n\n\
         Generated by `cargo run --release --features wgpu,cli --example modular_lm`{}. A \
         Llama-architecture LM (bytes as tokens, d = 128, 4 layers, 4 heads / 2 KV heads, \
         {} parameters) pre-trained for {} steps of {BATCH} × {SEQ} bytes on the six domains \
         of data/ ({pre_secs:.0} s); {} rank-{RANK} LoRA experts on every linear layer but the \
         output, two per domain for {} (each on its own half of the domain's training text, \
         {} steps each, {expert_secs:.0} s in all); C and man pages get no expert. Bits per \
         byte on the held-out test text (files no training step saw), {} windows of {SEQ} \
         bytes per domain; lower is better. The learned router is one X-LoRA-style \
         classifier per adapted layer (the layer's input → 32 → {} experts, dense softmax), \
         trained for {} steps on the composed model's language-modelling loss over a memory \
         of 16 training windows per expert domain ({router_secs:.0} s). Total run time {:.0} s \
         on this machine.\n",
        match (quick, distinct) {
            (true, true) => " -- --quick --distinct-init",
            (true, false) => " -- --quick",
            (false, true) => " -- --distinct-init",
            (false, false) => "",
        },
        base_params,
        budget.pretrain,
        names.len(),
        EXPERT_DOMAINS.join(", "),
        budget.expert,
        windows,
        names.len(),
        budget.router,
        started.elapsed().as_secs_f64()
    )?;
    writeln!(
        md,
        "| domain | base | uniform merge µ | Arrow top-2 over {n} experts | Arrow top-1 over {n} experts | Arrow top-1 over {k} MBC cluster merges | learned router | oracle expert |\n|---|---:|---:|---:|---:|---:|---:|---|",
        n = names.len(),
        k = clusters.len()
    )?;
    for (d, domain) in DOMAINS.iter().enumerate() {
        let seen = if EXPERT_DOMAINS.contains(domain) {
            ""
        } else {
            " (no expert)"
        };
        writeln!(
            md,
            "| {domain}{seen} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} ({}) |",
            base[d],
            mu[d],
            arrow[d],
            arrow1[d],
            arrow_clusters[d],
            learned[d],
            oracle[d].0,
            oracle[d].1
        )?;
    }
    let unseen: Vec<usize> = (0..DOMAINS.len())
        .filter(|d| !EXPERT_DOMAINS.contains(&DOMAINS[*d]))
        .collect();
    let pick = |v: &[f64], idx: &[usize]| mean(&idx.iter().map(|&i| v[i]).collect::<Vec<_>>());
    let seen_idx: Vec<usize> = (0..DOMAINS.len())
        .filter(|d| EXPERT_DOMAINS.contains(&DOMAINS[*d]))
        .collect();
    for (label, idx) in [
        ("mean, expert domains", &seen_idx),
        ("mean, no-expert domains", &unseen),
    ] {
        writeln!(
            md,
            "| {label} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |",
            pick(&base, idx),
            pick(&mu, idx),
            pick(&arrow, idx),
            pick(&arrow1, idx),
            pick(&arrow_clusters, idx),
            pick(&learned, idx),
            pick(&oracle.iter().map(|o| o.0).collect::<Vec<_>>(), idx)
        )?;
    }
    // The paper's claims, checked on these numbers.
    let own_wins = names
        .iter()
        .zip(&single)
        .filter(|(n, s)| {
            let d = DOMAINS
                .iter()
                .position(|d| n.starts_with(&format!("{d}-")))
                .unwrap_or(0);
            s[d] < base[d]
        })
        .count();
    let all: Vec<usize> = (0..DOMAINS.len()).collect();
    let yes = |b: bool| if b { "yes" } else { "no" };
    let (a, m, b0, l) = (
        pick(&arrow, &all),
        pick(&mu, &all),
        pick(&base, &all),
        pick(&learned, &all),
    );
    writeln!(
        md,
        "\n## The claims at this scale\n\n\
         - Each expert beats the base on its own domain: {own_wins} of {} experts.\n\
         - Arrow (top-2 over the library) beats µ and the base on held-out text, mean over \
         all six domains: {} (Arrow {a:.4}, µ {m:.4}, base {b0:.4} bits per byte).\n\
         - Arrow over the MBC cluster merges beats Arrow over the library: {} ({:.4} vs \
         {a:.4}).\n\
         - The learned router beats µ: {} ({l:.4} vs {m:.4}).",
        names.len(),
        yes(a < m && a < b0),
        yes(pick(&arrow_clusters, &all) < a),
        pick(&arrow_clusters, &all),
        yes(l < m),
    )?;
    writeln!(md, "\n## Each expert on each domain (bits per byte)\n")?;
    writeln!(md, "| expert | {} |", DOMAINS.join(" | "))?;
    writeln!(md, "|---|{}", "---:|".repeat(DOMAINS.len()))?;
    let cells = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.3}"))
            .collect::<Vec<_>>()
            .join(" | ")
    };
    writeln!(md, "| base | {} |", cells(&base))?;
    for (n, s) in names.iter().zip(&single) {
        writeln!(md, "| {n} | {} |", cells(s))?;
    }
    writeln!(
        md,
        "\nArrow's prototypes (the top right singular vector of each expert's update, per \
         layer): mean |cos| between two experts of one domain {proto_same:.3}, of different \
         domains {proto_other:.3}. Experts from {}.",
        if distinct {
            "one initialisation each (`--distinct-init`)"
        } else {
            "one shared initialisation (A equal, B = 0)"
        }
    )?;
    writeln!(
        md,
        "\n## MBC clusters (k = {}, parameters only)\n",
        clusters.len()
    )?;
    for (i, c) in clusters.iter().enumerate() {
        writeln!(md, "- cluster {i}: {}", c.join(", "))?;
    }
    let pure = clusters
        .iter()
        .filter(|c| {
            let d = |n: &String| n.rsplit_once('-').map(|p| p.0.to_string());
            c.iter().all(|n| d(n) == d(&c[0]))
        })
        .count();
    writeln!(
        md,
        "\n{pure} of {} clusters hold experts of one domain only.\n",
        clusters.len()
    )?;
    writeln!(
        md,
        "## Routing\n\n![Arrow routing shares]({stem}_routing.svg)\n\n\
         docs/{stem}_routing.svg: for each test domain (rows) and layer (blocks), the mean \
         weight Arrow top-2 gives each expert (columns, in the order {}), over the tokens of \
         {} test windows and the layer's seven projections.",
        names.join(", "),
        windows.min(32)
    )?;
    let docs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs");
    // A quick run prints its tables but leaves the full run's files in docs/ alone.
    if !quick {
        std::fs::write(docs.join(format!("{stem}.md")), &md)?;
        std::fs::write(
            docs.join(format!("{stem}_routing.svg")),
            svg(&share, &names),
        )?;
    }
    println!("{md}");
    Ok(())
}

/// The routing shares as an SVG heatmap: one row per domain, one block of expert columns per
/// layer, darker for a larger share.
fn svg(share: &[Vec<Vec<f64>>], names: &[String]) -> String {
    let (cell, left, top) = (16.0, 70.0, 40.0);
    let layers = share.first().map_or(0, Vec::len);
    let block = names.len() as f64 * cell + 12.0;
    let width = left + layers as f64 * block + 10.0;
    let height = top + DOMAINS.len() as f64 * cell + 110.0;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    for l in 0..layers {
        let x0 = left + l as f64 * block;
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\">layer {l}</text>",
            x0,
            top - 22.0
        );
        for (e, n) in names.iter().enumerate() {
            let x = x0 + e as f64 * cell + cell / 2.0;
            let y = top + DOMAINS.len() as f64 * cell + 6.0;
            let _ = writeln!(
                s,
                "<text x=\"{x}\" y=\"{y}\" transform=\"rotate(90 {x} {y})\" font-size=\"9\">{n}</text>"
            );
        }
        for (d, rows) in share.iter().enumerate() {
            for (e, v) in rows[l].iter().enumerate() {
                let shade = (255.0 * (1.0 - v.clamp(0.0, 1.0))) as u8;
                let _ = writeln!(
                    s,
                    "<rect x=\"{}\" y=\"{}\" width=\"{cell}\" height=\"{cell}\" fill=\"rgb({shade},{shade},255)\" stroke=\"#ccc\"><title>{:.2}</title></rect>",
                    x0 + e as f64 * cell,
                    top + d as f64 * cell,
                    v
                );
            }
        }
    }
    for (d, name) in DOMAINS.iter().enumerate() {
        let _ = writeln!(
            s,
            "<text x=\"4\" y=\"{}\">{name}</text>",
            top + d as f64 * cell + cell * 0.75
        );
    }
    s.push_str("</svg>\n");
    s
}
