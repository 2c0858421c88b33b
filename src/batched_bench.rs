//! `airlock batched-bench`: what many sequences decoded together cost, as llama-batched-bench
//! measures it: B sequences each take a PP-token prompt (in passes of at most -b tokens), then
//! decode TG tokens together, one token of every sequence per pass. Same table and columns.

use std::path::PathBuf;
use std::time::Instant;

use airlock_engine::llama::{forward_batch, BatchSeq, KvCache, Logits, Workspace};
use airlock_engine::memory::human_bytes;
use anyhow::{bail, Result};

use crate::load::{load, ModelArgs, SignatureArgs};

#[derive(clap::Args, Debug)]
#[command(after_help = "Columns, as llama-batched-bench prints them:\n  \
    PP, TG: prompt and generated tokens per sequence; B: sequences; N_KV: KV cache positions \
    in all, B*(PP+TG)\n  \
    T_PP, S_PP: time of all B prompts and their tokens/s (B*PP/T_PP)\n  \
    T_TG, S_TG: time of the TG decode passes and tokens/s over all sequences (B*TG/T_TG)\n  \
    T, S: total time and tokens/s\n\n\
    Example: airlock batched-bench -m models/SmolLM2-135M-Instruct.Q4_1.gguf --npp 128 --ntg 64 --npl 1,2,4,8")]
pub struct BatchedBenchArgs {
    /// GGUF model file
    #[arg(short = 'm', long = "model", value_name = "FILE")]
    pub model: PathBuf,
    /// Prompt tokens per sequence (comma-separated list)
    #[arg(long = "npp", value_delimiter = ',', default_values_t = [128, 256, 512])]
    pub npp: Vec<usize>,
    /// Generated tokens per sequence (comma-separated list)
    #[arg(long = "ntg", value_delimiter = ',', default_values_t = [128, 256])]
    pub ntg: Vec<usize>,
    /// Sequences decoded together (comma-separated list)
    #[arg(long = "npl", value_delimiter = ',', default_values_t = [1, 2, 4, 8, 16, 32])]
    pub npl: Vec<usize>,
    /// Threads (default: physical cores)
    #[arg(short = 't', long = "threads")]
    pub threads: Option<usize>,
    /// Most prompt tokens per forward pass, over all sequences
    #[arg(short = 'b', long = "batch-size", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub batch_size: u32,
    /// Keep every weight in the file's layout (see `airlock run --help`)
    #[arg(long = "no-repack")]
    pub no_repack: bool,
    /// Run even when the estimated memory exceeds what is available
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub signature: SignatureArgs,
}

pub fn run(args: BatchedBenchArgs) -> Result<std::process::ExitCode> {
    for (name, v) in [
        ("--npp", &args.npp),
        ("--ntg", &args.ntg),
        ("--npl", &args.npl),
    ] {
        if v.is_empty() || v.contains(&0) {
            bail!("{name} needs one or more values of at least 1");
        }
    }
    let (max_pp, max_tg) = (
        args.npp.iter().max().unwrap(),
        args.ntg.iter().max().unwrap(),
    );
    // Checked: a wrapped sum would size the caches below the tests (a panic, not an error).
    let Some(max_len) = max_pp.checked_add(*max_tg) else {
        bail!("--npp {max_pp} plus --ntg {max_tg} tokens is more than any context can hold");
    };
    let model_args = ModelArgs {
        ctx_size: Some(max_len),
        threads: args.threads,
        batch_size: args.batch_size,
        no_repack: args.no_repack,
        force: args.force,
        signature: args.signature.clone(),
        ..ModelArgs::new(args.model.clone())
    };
    let loaded = load(&model_args)?;
    if loaded.n_ctx < max_len {
        bail!(
            "the model's context ({}) is shorter than the longest sequence ({max_len} tokens)",
            loaded.n_ctx
        );
    }
    let model = &loaded.model;
    // The load checked one sequence's KV cache; the largest test holds max(npl) of them.
    let max_pl = args.npl.iter().copied().max().unwrap_or(1) as u64;
    let est = &loaded.report.estimate;
    let extra = est.kv_cache.saturating_mul(max_pl.saturating_sub(1));
    let resident = est
        .kv_cache
        .saturating_mul(max_pl)
        .saturating_add(est.buffers);
    if let Some(machine) = airlock_engine::memory::machine_memory() {
        if resident > machine {
            bail!(
                "{max_pl} sequences of {max_len} tokens need at least {} of KV cache but this \
                 machine has {} of memory and swap in all; --force cannot help, lower -npl, -npp \
                 or -ntg",
                human_bytes(resident),
                human_bytes(machine)
            );
        }
    }
    if let Some(avail) = loaded.report.available {
        let need = est.total().saturating_add(extra);
        if need > avail && !args.force {
            bail!(
                "{max_pl} sequences of {max_len} tokens need about {} but only {} is available; \
                 lower -npl, -npp or -ntg, or pass --force to try anyway",
                human_bytes(need),
                human_bytes(avail)
            );
        }
    }
    let session = loaded.session();
    let (kv_type, precision) = (session.kv_type(), session.precision);
    drop(session);
    let vocab = model.config.vocab_size;
    let b = args.batch_size as usize;
    let mut ws = Workspace::default();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next_id = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % vocab as u64) as u32
    };

    // Warm-up (pages the weights in, grows the buffers), as llama-batched-bench does.
    {
        let mut cache = KvCache::new(model, 16, kv_type);
        let ids: Vec<u32> = (0..16).map(|_| next_id()).collect();
        let mut batch = [BatchSeq {
            cache: &mut cache,
            tokens: &ids,
            logits: Logits::Last,
        }];
        forward_batch(model, precision, &mut ws, &mut batch)?;
    }

    println!(
        "\nmain: n_kv_max per sequence = {max_len}, n_batch = {b}, n_threads = {}, kernels = {}\n",
        rayon::current_num_threads(),
        airlock_kernels::simd::simd_path().map_or("scalar", |p| p.name()),
    );
    println!(
        "|{:>6} |{:>7} |{:>5} |{:>7} |{:>9} |{:>9} |{:>9} |{:>9} |{:>9} |{:>9} |",
        "PP", "TG", "B", "N_KV", "T_PP s", "S_PP t/s", "T_TG s", "S_TG t/s", "T s", "S t/s"
    );
    println!("|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|");
    for &pp in &args.npp {
        for &tg in &args.ntg {
            for &pl in &args.npl {
                let mut caches: Vec<KvCache> = (0..pl)
                    .map(|_| KvCache::new(model, pp + tg, kv_type))
                    .collect();
                let prompts: Vec<Vec<u32>> = (0..pl)
                    .map(|_| (0..pp).map(|_| next_id()).collect())
                    .collect();

                // Prompts: passes of at most b tokens, filled sequence after sequence.
                let t0 = Instant::now();
                let mut last: Vec<u32> = vec![0; pl];
                let mut done = vec![0usize; pl];
                while done.iter().any(|&d| d < pp) {
                    let mut room = b;
                    let mut batch = Vec::new();
                    let mut who = Vec::new();
                    for (i, cache) in caches.iter_mut().enumerate() {
                        if done[i] == pp || room == 0 {
                            continue;
                        }
                        let take = (pp - done[i]).min(room);
                        let ends = done[i] + take == pp;
                        batch.push(BatchSeq {
                            cache,
                            tokens: &prompts[i][done[i]..done[i] + take],
                            logits: if ends { Logits::Last } else { Logits::None },
                        });
                        if ends {
                            who.push(i);
                        }
                        done[i] += take;
                        room -= take;
                    }
                    let logits = forward_batch(model, precision, &mut ws, &mut batch)?;
                    for (row, &i) in logits.chunks_exact(vocab).zip(&who) {
                        last[i] = argmax(row);
                    }
                }
                let t_pp = t0.elapsed().as_secs_f64();

                // Generation: one token of every sequence per pass.
                let t1 = Instant::now();
                for _ in 0..tg {
                    let mut batch: Vec<BatchSeq> = caches
                        .iter_mut()
                        .zip(&last)
                        .map(|(cache, t)| BatchSeq {
                            cache,
                            tokens: std::slice::from_ref(t),
                            logits: Logits::Last,
                        })
                        .collect();
                    let logits = forward_batch(model, precision, &mut ws, &mut batch)?;
                    let next: Vec<u32> = logits.chunks_exact(vocab).map(argmax).collect();
                    last = next;
                }
                let t_tg = t1.elapsed().as_secs_f64();
                let t = t_pp + t_tg;
                let n_kv = pl * (pp + tg);
                println!(
                    "|{:>6} |{:>7} |{:>5} |{:>7} |{:>9.3} |{:>9.2} |{:>9.3} |{:>9.2} |{:>9.3} |{:>9.2} |",
                    pp,
                    tg,
                    pl,
                    n_kv,
                    t_pp,
                    (pl * pp) as f64 / t_pp,
                    t_tg,
                    (pl * tg) as f64 / t_tg,
                    t,
                    n_kv as f64 / t
                );
            }
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}
