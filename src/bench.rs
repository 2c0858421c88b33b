//! `airlock bench`: prompt-processing and generation speed, measured like llama-bench (random
//! tokens, an empty KV cache per repetition, one warm-up run), printed as its table or as JSON
//! with its field names so scripts written for llama-bench read it unchanged.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use airlock_engine::generate::eval_prompt;
use airlock_engine::llama::Logits;
use airlock_engine::sampling::Rng;
use airlock_kernels::bandwidth::ReadBuffer;
use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::load::{load, KvTypeArg, ModelArgs, SignatureArgs};
use crate::synthetic;

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    airlock bench -m models/SmolLM2-135M-Instruct.Q4_1.gguf -p 512 -n 128 -t 2\n  \
    airlock bench --synthetic llama-3.1-8b --type q4_0 -p 64 -n 16 --save /tmp/llama-8b-q4_0.gguf\n  \
    airlock bench -m /tmp/llama-8b-q4_0.gguf -p 0 -n 16 --ceiling\n\n\
    --synthetic writes a GGUF with the real shape and Llama 3 vocabulary but random weights, to size \
    hardware for Foundation-sec-8b before the real file arrives; llama.cpp's llama-bench can run \
    the same file. Generation reads every weight once per token, so it cannot outrun the \
    machine's memory: --ceiling prints that limit (read bandwidth / weight bytes per token) \
    beside each generation test.")]
pub struct BenchArgs {
    /// GGUF model file (or use --synthetic)
    #[arg(
        short = 'm',
        long = "model",
        value_name = "FILE",
        required_unless_present = "synthetic"
    )]
    pub model: Option<PathBuf>,
    /// Benchmark a random-weight model of this shape: llama-3.1-8b, llama-3.2-1b, smollm2-135m
    #[arg(long, value_name = "SHAPE", conflicts_with = "model")]
    pub synthetic: Option<String>,
    /// File type of the synthetic model, as `airlock convert --type` (q4_0, q4_k_m, q6_k, q8_0,
    /// bf16, ...): the same per-tensor mix the converter and llama-quantize write
    #[arg(long = "type", default_value = "q4_0", value_name = "TYPE")]
    pub ty: String,
    /// Keep the synthetic model at this path (default: a temporary file, removed afterwards)
    #[arg(long, value_name = "PATH")]
    pub save: Option<PathBuf>,
    /// With --save: replace PATH if it exists (a regular file or a symlink; never --vocab)
    #[arg(long, requires = "save")]
    pub overwrite: bool,
    /// GGUF whose Llama 3 vocabulary the synthetic model carries
    #[arg(
        long,
        value_name = "FILE",
        default_value = "tests/fixtures/llama3/tiny-llama3-q8_0.gguf"
    )]
    pub vocab: PathBuf,
    /// Prompt lengths to test (comma-separated; 0 = skip)
    #[arg(
        short = 'p',
        long = "n-prompt",
        value_delimiter = ',',
        default_value = "512"
    )]
    pub n_prompt: Vec<usize>,
    /// Generation lengths to test (comma-separated; 0 = skip)
    #[arg(
        short = 'n',
        long = "n-gen",
        value_delimiter = ',',
        default_value = "128"
    )]
    pub n_gen: Vec<usize>,
    /// Fill the KV cache with this many tokens before each test, then measure on top of them
    /// (comma-separated; llama-bench's -d): how speed holds up deep into a long context
    #[arg(
        short = 'd',
        long = "n-depth",
        value_delimiter = ',',
        default_value = "0"
    )]
    pub n_depth: Vec<usize>,
    /// Thread counts to test (comma-separated; default: physical cores)
    #[arg(short = 't', long = "threads", value_delimiter = ',')]
    pub threads: Vec<usize>,
    /// Repetitions of each test
    #[arg(short = 'r', long = "repetitions", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub repetitions: u32,
    /// Prompt tokens per batch
    #[arg(short = 'b', long = "batch-size", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub batch_size: u32,
    /// Print a JSON array of rows (llama-bench's field names) instead of a table
    #[arg(long)]
    pub json: bool,
    /// Read the weights in the file's layout instead of repacking Q4_0/Q4_1/Q8_0/Q5_0/Q5_1/Q2_K/Q3_K/Q4_K/Q5_K/Q6_K at load
    #[arg(long = "no-repack")]
    pub no_repack: bool,
    /// Also measure the machine's read bandwidth (512 MiB, median of 9, right before and right
    /// after each test; their mean) and show each generation test against its ceiling: read
    /// bandwidth / bytes read per token (every weight, plus the KV cache of the positions before
    /// it)
    #[arg(long)]
    pub ceiling: bool,
    /// KV cache element type, for K and V (llama-bench's -ctk/-ctv)
    #[arg(long = "kv-type", value_enum, default_value_t = KvTypeArg::F16)]
    pub kv_type: KvTypeArg,
    /// Allow tests longer than the model's training context (and a memory estimate above what
    /// is available)
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub signature: SignatureArgs,
}

struct Row {
    n_prompt: usize,
    n_gen: usize,
    n_depth: usize,
    threads: usize,
    samples_ns: Vec<u64>,
    /// Read bandwidth at this thread count right before and right after the test's runs,
    /// bytes/s (`--ceiling`).
    read_bps: Option<(f64, f64)>,
}

impl Row {
    /// The read bandwidth the test is measured against: the mean of the reads on either side.
    fn read_rate(&self) -> Option<f64> {
        self.read_bps.map(|(before, after)| (before + after) / 2.0)
    }

    fn test_name(&self) -> String {
        let test = match (self.n_prompt, self.n_gen) {
            (p, 0) => format!("pp{p}"),
            (0, g) => format!("tg{g}"),
            (p, g) => format!("pp{p}+tg{g}"),
        };
        match self.n_depth {
            0 => test,
            d => format!("{test} @ d{d}"),
        }
    }

    /// Bytes a generation test reads per token: every weight once, plus the KV cache of the
    /// positions before it (on average, depth + (n_gen + 1) / 2 of them).
    fn bytes_per_token(&self, weights: f64, kv_per_position: f64) -> f64 {
        weights + kv_per_position * (self.n_depth as f64 + (self.n_gen as f64 + 1.0) / 2.0)
    }

    fn samples_ts(&self) -> Vec<f64> {
        let n = (self.n_prompt + self.n_gen) as f64;
        self.samples_ns
            .iter()
            .map(|&ns| n * 1e9 / ns.max(1) as f64)
            .collect()
    }
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    if v.len() < 2 {
        return (mean, 0.0);
    }
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// The synthetic model's type: the converter's own parser and mix, so the names and the files
/// are the same.
fn parse_type(s: &str) -> Result<airlock_convert::OutType> {
    airlock_convert::OutType::parse(s).map_err(|e| anyhow::anyhow!("--type: {e}"))
}

/// llama.cpp's name for a file type (general.file_type), as llama-bench prints it.
fn ftype_name(id: Option<u32>) -> &'static str {
    id.and_then(airlock_engine::gguf::FileType::from_id)
        .map_or("?", |f| f.label)
}

fn size_label(params: u64) -> String {
    if params >= 1_000_000_000 {
        format!("{:.0}B", params as f64 / 1e9)
    } else {
        format!("{:.0}M", params as f64 / 1e6)
    }
}

/// Remove a temporary synthetic model however the benchmark ends (a signal included).
struct RemoveOnDrop(Option<(PathBuf, airlock_engine::signals::RemoveOnExit)>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some((p, _)) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

pub fn run(args: BenchArgs) -> Result<ExitCode> {
    let simd = airlock_kernels::simd::simd_path().context("AIRLOCK_SIMD")?;
    let mut _cleanup = RemoveOnDrop(None);
    let model_path = match (&args.model, &args.synthetic) {
        (Some(m), _) => m.clone(),
        (None, Some(name)) => {
            let shape = synthetic::shape(name)?;
            let ty = parse_type(&args.ty)?;
            let path = match &args.save {
                Some(p) => p.clone(),
                None => {
                    let p = std::env::temp_dir().join(format!(
                        "airlock-synthetic-{}-{}-{}.gguf",
                        shape.name,
                        args.ty,
                        std::process::id()
                    ));
                    p
                }
            };
            eprintln!(
                "writing {} ({} random weights) ...",
                path.display(),
                args.ty
            );
            let t0 = Instant::now();
            synthetic::write_synthetic(&shape, ty, &args.vocab, &path, args.overwrite)?;
            if args.save.is_none() {
                // Ours from here on: removed when the benchmark ends, however it ends.
                let on_signal = airlock_engine::signals::remove_on_exit(path.clone())
                    .map_err(|e| anyhow::anyhow!(e))?;
                _cleanup.0 = Some((path.clone(), on_signal));
            }
            eprintln!("written in {:.1} s", t0.elapsed().as_secs_f64());
            path
        }
        (None, None) => bail!("give -m MODEL or --synthetic SHAPE"),
    };

    let threads = if args.threads.is_empty() {
        vec![airlock_engine::load::physical_cores()]
    } else {
        args.threads.clone()
    };
    if threads.contains(&0) {
        bail!("-t/--threads must be at least 1");
    }
    let max = airlock_engine::load::MAX_THREADS;
    if let Some(t) = threads.iter().find(|&&t| t > max) {
        bail!("-t/--threads {t} is above the cap of {max}");
    }
    if let Some(&t) = threads.iter().max() {
        crate::load::warn_oversubscribed(t);
    }
    let max_ctx = (args.n_prompt.iter().max().copied().unwrap_or(0))
        .saturating_add(args.n_gen.iter().max().copied().unwrap_or(0))
        .saturating_add(args.n_depth.iter().max().copied().unwrap_or(0));
    let model_args = ModelArgs {
        ctx_size: Some(max_ctx.max(1)),
        batch_size: args.batch_size,
        no_repack: args.no_repack,
        kv_type: args.kv_type,
        force: args.force,
        signature: args.signature.clone(),
        ..ModelArgs::new(model_path.clone())
    };
    let loaded = load(&model_args)?;
    if loaded.n_ctx < max_ctx {
        bail!(
            "the model's context ({}) is shorter than the longest test ({max_ctx} tokens)",
            loaded.n_ctx
        );
    }
    let model = &loaded.model;
    let file = &model.file;
    let params: u64 = file.tensors().iter().map(|t| t.n_elements).sum();
    let size: u64 = file.tensors().iter().map(|t| t.n_bytes).sum();
    let model_type = format!(
        "llama {} {}",
        size_label(params),
        ftype_name(file.get_u32("general.file_type"))
    );
    let vocab = model.config.vocab_size as u64;

    let mut tests = vec![];
    for &d in &args.n_depth {
        for &p in &args.n_prompt {
            if p > 0 {
                tests.push((p, 0, d));
            }
        }
        for &g in &args.n_gen {
            if g > 0 {
                tests.push((0, g, d));
            }
        }
    }
    let mut rows = vec![];
    let mut rng = Rng::new(1234);
    // Every weight once per token, plus the K and V of every position before it (small
    // beside the weights at short lengths, not at depth).
    let kv_type = loaded.kv_type;
    let bytes_per_token = model.weights.bytes_per_token() as f64;
    let kv_per_position = model.kv_bytes_per_position(kv_type) as f64;
    for &t in &threads {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .spawn_handler(airlock_engine::load::spawn_with_headroom)
            .build()
            // The build error's text already holds its source: one line, not the same twice.
            .map_err(|e| anyhow::anyhow!("cannot start {t} compute threads: {e}"))?;
        // With this thread count, in a buffer freed again before the model runs. Taken on
        // either side of each test's timed runs, not once for all: a shared host's bandwidth
        // drifts over the minutes a deep fill takes.
        let read_rate = || -> Result<Option<f64>> {
            if !args.ceiling {
                return Ok(None);
            }
            let buf = ReadBuffer::new(ReadBuffer::DEFAULT_BYTES)
                .context("cannot map the read-bandwidth buffer")?;
            Ok(Some(pool.install(|| buf.rate(9))))
        };
        for &(n_prompt, n_gen, n_depth) in &tests {
            let mut session = loaded.session();
            let mut samples = vec![];
            if n_depth > 0 {
                // The context before the test, not timed (as llama-bench's -d). Filled once:
                // each repetition drops what the one before added on top of it.
                let fill: Vec<u32> = (0..n_depth)
                    .map(|_| (rng.next_u64() % vocab) as u32)
                    .collect();
                pool.install(|| eval_prompt(model, &mut session, &fill, args.batch_size as usize))?;
            }
            let read_before = read_rate()?;
            // One warm-up run (pages in the weights, warms caches), then the timed ones.
            for rep in 0..=args.repetitions {
                session.truncate(n_depth);
                let tokens: Vec<u32> = (0..n_prompt.max(1))
                    .map(|_| (rng.next_u64() % vocab) as u32)
                    .collect();
                let t0 = Instant::now();
                pool.install(|| -> Result<()> {
                    if n_prompt > 0 {
                        eval_prompt(model, &mut session, &tokens, args.batch_size as usize)?;
                    }
                    let mut tok = tokens[0];
                    for _ in 0..n_gen {
                        let logits = session.forward(model, &[tok], Logits::Last)?;
                        tok = argmax(logits);
                    }
                    Ok(())
                })?;
                if rep > 0 {
                    samples.push(t0.elapsed().as_nanos() as u64);
                }
            }
            let read_after = read_rate()?;
            rows.push(Row {
                n_prompt,
                n_gen,
                n_depth,
                threads: t,
                samples_ns: samples,
                read_bps: read_before.zip(read_after),
            });
        }
    }
    let repacked = loaded.model.weights.packed_bytes() > 0;
    drop(loaded);

    let filename = model_path.display().to_string();
    if args.json {
        let out: Vec<_> = rows
            .iter()
            .map(|r| {
                let ts = r.samples_ts();
                let (avg_ts, stddev_ts) = mean_std(&ts);
                let ns: Vec<f64> = r.samples_ns.iter().map(|&x| x as f64).collect();
                let (avg_ns, stddev_ns) = mean_std(&ns);
                let mut row = json!({
                    "build_commit": env!("CARGO_PKG_VERSION"),
                    "backends": "CPU",
                    "simd": simd.name(),
                    "repack": repacked,
                    "model_filename": filename,
                    "model_type": model_type,
                    "model_size": size,
                    "model_n_params": params,
                    "n_batch": args.batch_size,
                    "n_threads": r.threads,
                    "type_k": kv_type.name(),
                    "type_v": kv_type.name(),
                    "n_prompt": r.n_prompt,
                    "n_gen": r.n_gen,
                    "n_depth": r.n_depth,
                    "avg_ns": avg_ns as u64,
                    "stddev_ns": stddev_ns as u64,
                    "avg_ts": avg_ts,
                    "stddev_ts": stddev_ts,
                    "samples_ns": r.samples_ns,
                    "samples_ts": ts,
                });
                if let Some(read) = r.read_rate() {
                    row["read_bytes_per_s"] = json!(read);
                    row["read_bytes_per_s_before_after"] = json!(r.read_bps);
                    row["weight_bytes_per_token"] = json!(bytes_per_token);
                    if r.n_gen > 0 && r.n_prompt == 0 {
                        let bytes = r.bytes_per_token(bytes_per_token, kv_per_position);
                        row["kv_bytes_per_token"] = json!(bytes - bytes_per_token);
                        row["ceiling_ts"] = json!(read / bytes);
                    }
                }
                row
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        let extra = if args.ceiling {
            " read GB/s | ceiling t/s | of ceiling |"
        } else {
            ""
        };
        println!("| model | size | params | backend | threads | test | t/s |{extra}");
        println!(
            "| --- | ---: | ---: | --- | ---: | ---: | ---: |{}",
            if args.ceiling {
                " ---: | ---: | ---: |"
            } else {
                ""
            }
        );
        for r in &rows {
            let (avg, std) = mean_std(&r.samples_ts());
            let ceiling = match r.read_rate() {
                Some(read) if r.n_gen > 0 && r.n_prompt == 0 => {
                    let c = read / r.bytes_per_token(bytes_per_token, kv_per_position);
                    format!(" {:.1} | {c:.2} | {:.0}% |", read / 1e9, 100.0 * avg / c)
                }
                Some(read) => format!(" {:.1} | - | - |", read / 1e9),
                None => String::new(),
            };
            println!(
                "| {model_type} | {:.2} GiB | {:.2} {} | CPU ({}{}) | {} | {} | {avg:.2} ± {std:.2} |{ceiling}",
                size as f64 / (1u64 << 30) as f64,
                if params >= 1_000_000_000 { params as f64 / 1e9 } else { params as f64 / 1e6 },
                if params >= 1_000_000_000 { "B" } else { "M" },
                simd.name(),
                if repacked { ", repacked" } else { "" },
                r.threads,
                r.test_name(),
            );
        }
        if args.ceiling {
            println!(
                "\nceiling = read bandwidth / bytes read per token: {:.3} GB of weights (every \
                 matrix once) + {:.3} MB of {} KV cache per position before it",
                bytes_per_token / 1e9,
                kv_per_position / 1e6,
                kv_type.name()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
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
