//! `airlock serve`: flags in, the server library (`airlock-server`) does the rest.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use airlock_engine::memory::human_bytes;
use airlock_server::{read_key_file, ServerConfig};
use anyhow::Result;

use crate::load::{load, ModelArgs, SamplingArgs};

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    airlock serve -m models/SmolLM2-135M-Instruct.Q4_1.gguf\n  \
    curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\\n    \
      -d '{\"messages\": [{\"role\": \"user\", \"content\": \"What is phishing?\"}]}'\n  \
    airlock serve -m model.gguf --host 0.0.0.0 --api-key-file keys.txt --parallel 8 -c 8192\n\n\
    Endpoints: POST /v1/chat/completions, POST /v1/completions (OpenAI's API, streaming with \
    \"stream\": true), GET /v1/models, GET /health, GET /metrics (Prometheus), POST /tokenize and \
    /detokenize (llama-server's), and a chat page at http://127.0.0.1:8080/ (works offline).\n\
    A new request goes to the free slot whose cache shares the longest prefix with its prompt \
    and computes only the rest (same answer; send \"cache_prompt\": false to turn it off).\n\
    Each of the --parallel slots has its own context of -c tokens; requests beyond the slots wait \
    in a queue of --queue, and beyond that get 503. All generating requests share one forward \
    pass per step. The sampling flags set the defaults for fields a request leaves out.\n\
    A chat whose messages leave no room in a slot's context for a reply has its oldest turns \
    after the system prompt dropped until it takes at most half the context (as `airlock chat` \
    does); the response says so in the header `x-airlock-context-shift: dropped N messages` and \
    in usage.context_shift. If the system prompt and the last turn alone do not fit, 400.\n\
    Keys (--api-key, --api-key-file) are sent as `Authorization: Bearer KEY`; /health needs none. \
    Prefer --api-key-file: a key on the command line shows in the process list.\n\
    SIGINT, SIGTERM or SIGHUP stops accepting connections, lets running requests finish for --grace \
    seconds and exits 0; a second signal exits at once (status 130).")]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on: an IP address or localhost. Anything but loopback needs an API key
    /// (or --insecure-no-auth)
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on; 0 picks a free one (the address is printed on stderr)
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// API key clients must send as `Authorization: Bearer KEY` (repeatable; printable ASCII
    /// without spaces)
    #[arg(long = "api-key", value_name = "KEY")]
    pub api_key: Vec<String>,
    /// File of API keys, one per line
    #[arg(long = "api-key-file", value_name = "FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Allow listening on a non-loopback address with no API key
    #[arg(long = "insecure-no-auth")]
    pub insecure_no_auth: bool,
    /// Requests generating at once (slots); each has its own KV cache of -c tokens
    #[arg(long = "parallel", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub parallel: u32,
    /// Requests that may wait for a free slot; more get 503 with Retry-After
    #[arg(long = "queue", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub queue: u32,
    /// Largest request body in bytes (413 beyond it)
    #[arg(long = "max-body", default_value_t = 1 << 20, value_name = "BYTES")]
    pub max_body: usize,
    /// Seconds that running requests may take to finish after SIGINT, SIGTERM or SIGHUP (0 to
    /// 31536000)
    #[arg(long = "grace", default_value_t = 10.0, value_name = "SECONDS")]
    pub grace: f64,
    /// Model name to report in /v1/models and responses (default: the file's name)
    #[arg(long = "alias", value_name = "NAME")]
    pub alias: Option<String>,
    /// Built-in chat template to use instead of the model's: llama3 or chatml
    #[arg(long = "chat-template", value_name = "NAME")]
    pub chat_template: Option<String>,
    /// Seconds a request may take from arrival to its last token (queue, prompt and
    /// generation); one still waiting for a slot then gets 503, one running ends with what it
    /// has (finish_reason "length"). 0 = no limit
    #[arg(long = "timeout", default_value_t = 600.0, value_name = "SECONDS")]
    pub timeout: f64,
    /// Most tokens a request may ask for (more gets 400); also what a request without
    /// max_tokens gets. Default: until a stop or the slot's context is full
    #[arg(long = "max-tokens", value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_tokens: Option<u64>,
    /// Send CORS headers to browsers on this origin (scheme://host[:port], or * for any;
    /// repeatable). Without it no CORS headers are sent, so other sites' pages cannot read
    /// answers
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    pub cors_origin: Vec<String>,
    /// On a loopback address, also answer requests whose Host is NAME (repeatable). Others
    /// that are not localhost or a loopback address get 403 (DNS rebinding)
    #[arg(long = "allow-host", value_name = "NAME")]
    pub allow_host: Vec<String>,
    /// Log prompt and completion text on stderr (by default logs carry only ids, token
    /// counts and timings)
    #[arg(long = "log-prompts")]
    pub log_prompts: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

pub fn run(args: ServeArgs) -> Result<ExitCode> {
    let mut api_keys = args.api_key.clone();
    if let Some(f) = &args.api_key_file {
        api_keys.extend(read_key_file(f)?);
    }
    // Bounded as --timeout is: a Duration from a huge float panics, and so would the deadline.
    if !(args.grace.is_finite() && (0.0..=31_536_000.0).contains(&args.grace)) {
        anyhow::bail!("--grace must be a number of seconds from 0 to 31536000");
    }
    // Bounded so that the deadline arithmetic cannot overflow: a year is plenty.
    if !(args.timeout.is_finite() && (0.0..=31_536_000.0).contains(&args.timeout)) {
        anyhow::bail!("--timeout must be a number of seconds from 0 (no limit) to 31536000");
    }
    let model_name = args.alias.clone().unwrap_or_else(|| {
        args.model
            .model
            .file_name()
            .map_or("model".into(), |n| n.to_string_lossy().into_owned())
    });
    let cfg = ServerConfig {
        host: args.host.clone(),
        port: args.port,
        api_keys,
        insecure_no_auth: args.insecure_no_auth,
        parallel: args.parallel as usize,
        queue: args.queue as usize,
        batch: args.model.batch_size as usize,
        max_body: args.max_body,
        grace: Duration::from_secs_f64(args.grace),
        model_name,
        defaults: args.sampling.config(),
        chat_template: args.chat_template.clone(),
        timeout: (args.timeout > 0.0).then(|| Duration::from_secs_f64(args.timeout)),
        max_tokens: args
            .max_tokens
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
        cors_origins: args.cors_origin.clone(),
        allow_hosts: args.allow_host.clone(),
        log_prompts: args.log_prompts,
    };
    // Refuse an unsafe bind, or a busy port, before spending time on the load.
    let listener = cfg.bind()?;
    // Until the model is loaded, every request gets 503 (/health says "loading").
    airlock_server::serve_after_load(listener, cfg, || {
        let loaded = load(&args.model)?;
        // The load checked one context's KV cache; the server holds one per slot.
        let est = &loaded.report.estimate;
        let slots = args.parallel as u64;
        let extra = est.kv_cache.saturating_mul(slots - 1);
        let need = est.total().saturating_add(extra);
        if let Some(machine) = airlock_engine::memory::machine_memory() {
            let resident = est
                .kv_cache
                .saturating_mul(slots)
                .saturating_add(est.buffers);
            if resident > machine {
                anyhow::bail!(
                    "{slots} slots need at least {} of KV cache and buffers but this machine has {} \
                     of memory and swap in all; --force cannot help, lower --parallel or -c/--ctx-size",
                    human_bytes(resident),
                    human_bytes(machine)
                );
            }
        }
        if let Some(avail) = loaded.report.available {
            if need > avail && !args.model.force {
                anyhow::bail!(
                "{} slots need about {} (weights {}, KV cache {} per slot at -c {}) but only {} is \
                 available; lower --parallel or -c/--ctx-size, or pass --force to try anyway",
                slots,
                human_bytes(need),
                human_bytes(est.weights),
                human_bytes(est.kv_cache),
                loaded.n_ctx,
                human_bytes(avail)
            );
            }
        }
        Ok(loaded)
    })?;
    Ok(ExitCode::SUCCESS)
}
