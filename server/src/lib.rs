//! `airlock serve`: an OpenAI-compatible HTTP server over one loaded model.
//!
//! The HTTP side runs on a small tokio runtime; one scheduler thread ([`scheduler`]) owns the
//! model and runs one batched forward pass per step for every request that holds a slot. The
//! engine itself has no async runtime.

use std::future::IntoFuture;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use airlock_engine::chat::ChatTemplate;
use airlock_engine::load::LoadedModel;
use airlock_engine::sampling::SamplerConfig;
use anyhow::{anyhow, bail, Context, Result};

mod api;
mod metrics;
mod page;
pub mod scheduler;

/// Everything `airlock serve` is told, apart from the model.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Address to bind: an IP address or `localhost`.
    pub host: String,
    /// Port; 0 picks a free one (the bound address is printed).
    pub port: u16,
    /// Bearer keys; empty = no authentication.
    pub api_keys: Vec<String>,
    /// Allow a non-loopback bind without keys.
    pub insecure_no_auth: bool,
    /// Slots: requests generating at once, each with its own KV cache of the model's n_ctx.
    pub parallel: usize,
    /// Requests that may wait for a slot; more get 503.
    pub queue: usize,
    /// Prompt tokens per step.
    pub batch: usize,
    /// Largest request body in bytes.
    pub max_body: usize,
    /// How long in-flight requests may run after SIGINT/SIGTERM.
    pub grace: Duration,
    /// The model name responses carry and /v1/models lists.
    pub model_name: String,
    /// Sampling defaults for fields a request leaves out.
    pub defaults: SamplerConfig,
    /// A built-in chat template to use instead of the model's.
    pub chat_template: Option<String>,
    /// How long a request may take from arrival (queue, prompt, generation); None = no limit.
    pub timeout: Option<Duration>,
    /// Most tokens a request may ask for, and what one that gives no `max_tokens` gets;
    /// None = up to the slot's context.
    pub max_tokens: Option<usize>,
    /// Origins that get CORS headers (`--cors-origin`); empty = no CORS headers at all.
    pub cors_origins: Vec<String>,
    /// Host names accepted besides loopback ones when bound to loopback (`--allow-host`).
    pub allow_hosts: Vec<String>,
    /// Log prompt and completion text (off: logs carry ids, counts and timings only).
    pub log_prompts: bool,
}

/// Is `origin` what a browser sends as Origin: `scheme://host[:port]`, nothing after?
fn valid_origin(origin: &str) -> bool {
    let Some((scheme, rest)) = origin.split_once("://") else {
        return false;
    };
    !scheme.is_empty()
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'-' || b == b'.')
        && !rest.is_empty()
        && !rest.contains(['/', '?', '#', '@'])
        && rest.bytes().all(|b| b.is_ascii_graphic())
}

/// The address `host` names: an IP address or `localhost` (no name lookups: the server makes
/// no network requests of its own).
pub fn parse_host(host: &str) -> Result<IpAddr> {
    if host.eq_ignore_ascii_case("localhost") {
        return Ok(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    host.trim_matches(|c| c == '[' || c == ']')
        .parse()
        .map_err(|_| anyhow!("--host {host:?} is not an IP address (or localhost)"))
}

/// Reads `--api-key-file`: one key per line; blank lines and surrounding spaces are ignored.
pub fn read_key_file(path: &std::path::Path) -> Result<Vec<String>> {
    // Bounded: a key file is small, and /dev/zero must not be read until memory runs out.
    let text = airlock_engine::bounded::read_bounded_string(path, 1 << 20)
        .with_context(|| format!("cannot read --api-key-file {}", path.display()))?;
    let keys: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if keys.is_empty() {
        bail!("--api-key-file {} holds no key", path.display());
    }
    Ok(keys)
}

impl ServerConfig {
    /// Checks the settings that need no model, so a refused start costs no load: the bind
    /// address's safety and the limits.
    pub fn check(&self) -> Result<SocketAddr> {
        let ip = parse_host(&self.host)?;
        if !ip.is_loopback() && self.api_keys.is_empty() && !self.insecure_no_auth {
            bail!(
                "refusing to listen on {ip} without an API key: anyone who can reach this \
                 address could use the model. Give --api-key KEY or --api-key-file FILE (clients \
                 send `Authorization: Bearer KEY`), bind to 127.0.0.1, or pass \
                 --insecure-no-auth if the network is trusted"
            );
        }
        if self.parallel == 0 {
            bail!("--parallel must be at least 1");
        }
        if self.queue == 0 {
            bail!("--queue must be at least 1");
        }
        if self.api_keys.iter().any(|k| k.is_empty()) {
            bail!("an API key must not be empty");
        }
        // A key no client can send in `Authorization: Bearer KEY` (a space, which the header's
        // parsing trims or splits on, or a control character) would lock every client out.
        if let Some(k) = self
            .api_keys
            .iter()
            .find(|k| !k.bytes().all(|b| b.is_ascii_graphic()))
        {
            bail!(
                "an API key (of {} characters) is not printable ASCII without spaces, so no \
                 client could send it as `Authorization: Bearer KEY`",
                k.chars().count()
            );
        }
        if self.batch == 0 {
            bail!("-b must be at least 1");
        }
        if self.max_tokens == Some(0) {
            bail!("--max-tokens must be at least 1");
        }
        for o in &self.cors_origins {
            if o != "*" && !valid_origin(o) {
                bail!(
                    "--cors-origin {o:?} is not an origin: give scheme://host[:port] as the \
                     browser sends it (e.g. https://soc.example:8443, no path or trailing \
                     slash), or * for any"
                );
            }
        }
        for h in &self.allow_hosts {
            if h.is_empty() || !h.bytes().all(|b| b.is_ascii_graphic()) || h.contains('/') {
                bail!("--allow-host {h:?} is not a host name (e.g. airlock.internal)");
            }
        }
        Ok(SocketAddr::new(ip, self.port))
    }

    /// Binds the listening socket (before the model loads, so a busy port fails at once).
    pub fn bind(&self) -> Result<TcpListener> {
        let addr = self.check()?;
        TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))
    }
}

/// Runs `load` while `listener` already answers: 503 to every request (`/health` says
/// "loading"). Then serves what it loaded, as [`serve`] does.
pub fn serve_after_load(
    listener: TcpListener,
    cfg: ServerConfig,
    load: impl FnOnce() -> Result<LoadedModel>,
) -> Result<()> {
    cfg.check()?;
    // One runtime for both phases (the server's own, started early).
    let rt = http_runtime()?;
    // A second handle on the same socket: connections that arrive while this one is being
    // closed wait in the backlog for the real server.
    let during = listener
        .try_clone()
        .context("cannot share the listening socket")?;
    during.set_nonblocking(true)?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let answering = rt.spawn(async move {
        let Ok(l) = tokio::net::TcpListener::from_std(during) else {
            return;
        };
        let (grace_tx, grace_rx) = tokio::sync::oneshot::channel::<()>();
        let server = axum::serve(l, api::loading_router())
            .with_graceful_shutdown(async {
                let _ = grace_rx.await;
            })
            .into_future();
        tokio::pin!(server);
        tokio::select! {
            _ = &mut server => return,
            _ = stop_rx => {}
        }
        let _ = grace_tx.send(());
        // A connection still busy a moment later is cut: it only ever got 503s.
        let _ = tokio::time::timeout(Duration::from_secs(1), server).await;
    });
    let loaded = load();
    let _ = stop_tx.send(());
    let _ = rt.block_on(answering);
    serve_on(rt, listener, loaded?, cfg)
}

fn http_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("airlock-http")
        .enable_all()
        .build()
        .context("cannot start the HTTP runtime")
}

/// Serves `loaded` on `listener` until SIGINT, SIGTERM or SIGHUP, then lets in-flight requests finish
/// for `cfg.grace` and returns.
pub fn serve(listener: TcpListener, loaded: LoadedModel, cfg: ServerConfig) -> Result<()> {
    serve_on(http_runtime()?, listener, loaded, cfg)
}

fn serve_on(
    rt: tokio::runtime::Runtime,
    listener: TcpListener,
    loaded: LoadedModel,
    cfg: ServerConfig,
) -> Result<()> {
    cfg.check()?;
    let template =
        match ChatTemplate::for_tokenizer(&loaded.tokenizer, cfg.chat_template.as_deref()) {
            Ok(t) => Some(t),
            Err(e) if cfg.chat_template.is_none() => {
                eprintln!(
                "warning: the model's chat template cannot be used ({e}); /v1/chat/completions \
                 will refuse requests (restart with --chat-template llama3|chatml)"
            );
                None
            }
            Err(e) => return Err(anyhow!("--chat-template: {e}")),
        };
    let fingerprint = match airlock_kernels::simd::simd_path() {
        Ok(p) => format!("airlock-{}-{}", env!("CARGO_PKG_VERSION"), p.name()),
        Err(e) => bail!("no usable kernel path: {e}"),
    };
    let loaded = Arc::new(loaded);
    let stats = Arc::new(scheduler::Stats::default());
    let (queue_tx, queue_rx) = std::sync::mpsc::sync_channel(cfg.queue);
    let scheduler = {
        let loaded = loaded.clone();
        let stats = stats.clone();
        let (parallel, batch) = (cfg.parallel, cfg.batch);
        std::thread::Builder::new()
            .name("airlock-scheduler".into())
            .spawn(move || scheduler::run(loaded, parallel, batch, queue_rx, stats))
            .context("cannot start the scheduler thread")?
    };

    let local = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let state = Arc::new(api::AppState::new(
        loaded.clone(),
        template,
        queue_tx,
        &cfg,
        fingerprint,
        stats,
        local.ip().is_loopback(),
    ));
    let app = api::router(state.clone(), cfg.max_body);

    let drained = rt.block_on(async {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let (_signal_guard, signal) = shutdown_signal()?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stop_rx.await;
                })
                .await
        });
        eprintln!(
            "airlock serve: listening on http://{local} ({} slots of {} tokens, KV cache {} of \
             {} per slot, queue {}, model {:?}, auth {})",
            cfg.parallel,
            loaded.n_ctx,
            airlock_engine::memory::human_bytes(loaded.report.estimate.kv_cache),
            loaded.kv_type.name(),
            cfg.queue,
            cfg.model_name,
            if cfg.api_keys.is_empty() { "off" } else { "on" }
        );
        tokio::pin!(signal);
        let mut server = server;
        tokio::select! {
            r = &mut server => {
                r.context("the HTTP server task failed")?.context("the HTTP server failed")?;
                return Ok::<bool, anyhow::Error>(true);
            }
            name = &mut signal => {
                eprintln!(
                    "airlock serve: {name}: no longer accepting requests (503, /health too); \
                     finishing in-flight requests (up to {} s)",
                    cfg.grace.as_secs_f64()
                );
            }
        }
        // Draining: the listener stays open so that load balancers probing /health see 503
        // and new completions get a 503 they can retry elsewhere (rather than a refused
        // connection), until the requests in flight are done or the grace period ends.
        state.draining.store(true, Ordering::SeqCst);
        let grace_end = tokio::time::Instant::now() + cfg.grace;
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        while state.in_flight.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < grace_end
        {
            tokio::select! {
                r = &mut server => {
                    r.context("the HTTP server task failed")?.context("the HTTP server failed")?;
                    return Ok(true);
                }
                _ = tick.tick() => {}
            }
        }
        let _ = stop_tx.send(());
        if state.in_flight.load(Ordering::SeqCst) > 0 {
            eprintln!("airlock serve: grace period over; cancelling what is still running");
            server.abort();
            return Ok(false);
        }
        // Every response is complete: what is left is closing connections (a client still
        // sending a request body is cut after a second).
        match tokio::time::timeout(Duration::from_secs(1), &mut server).await {
            Ok(r) => {
                r.context("the HTTP server task failed")?
                    .context("the HTTP server failed")?;
            }
            Err(_) => server.abort(),
        }
        Ok(true)
    })?;
    // Dropping the runtime drops every handler, and with them the queue's senders: the
    // scheduler frees their slots and returns.
    rt.shutdown_timeout(Duration::from_secs(1));
    drop(state);
    if drained {
        let _ = scheduler.join();
    }
    eprintln!("airlock serve: stopped");
    Ok(())
}

/// Installs the process-wide SIGINT/SIGTERM/SIGHUP handler now ([`airlock_engine::signals`],
/// the one the output helper's cleanup uses too), so a signal that comes right after the
/// "listening" line is not lost to the default action, and returns a future that resolves on
/// the first signal. While the returned guard lives the first signal only starts the graceful
/// shutdown; a second one exits at once (status 130).
fn shutdown_signal() -> Result<(
    airlock_engine::signals::Cooperate,
    impl std::future::Future<Output = &'static str>,
)> {
    let guard = airlock_engine::signals::cooperate().map_err(|e| anyhow!(e))?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("airlock-signal".into())
        .spawn(move || {
            airlock_engine::signals::wait();
            let _ = tx.send(());
        })
        .context("cannot start the signal thread")?;
    Ok((guard, async move {
        let _ = rx.await;
        "signal (SIGINT, SIGTERM or SIGHUP)"
    }))
}

/// Is the server draining (after a signal)? /health answers 503 then.
pub(crate) fn is_draining(flag: &AtomicBool) -> bool {
    flag.load(Ordering::SeqCst)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(host: &str, keys: &[&str], insecure: bool) -> ServerConfig {
        ServerConfig {
            host: host.into(),
            port: 0,
            api_keys: keys.iter().map(|k| k.to_string()).collect(),
            insecure_no_auth: insecure,
            parallel: 4,
            queue: 64,
            batch: 512,
            max_body: 1 << 20,
            grace: Duration::from_secs(10),
            model_name: "m".into(),
            defaults: SamplerConfig::default(),
            chat_template: None,
            timeout: None,
            max_tokens: None,
            cors_origins: Vec::new(),
            allow_hosts: Vec::new(),
            log_prompts: false,
        }
    }

    #[test]
    fn cors_origins_and_allowed_hosts_are_checked_at_start() {
        let with = |origins: &[&str], hosts: &[&str]| {
            let mut c = cfg("127.0.0.1", &[], false);
            c.cors_origins = origins.iter().map(|s| s.to_string()).collect();
            c.allow_hosts = hosts.iter().map(|s| s.to_string()).collect();
            c.check()
        };
        for ok in ["*", "https://soc.example", "http://127.0.0.1:3000"] {
            assert!(with(&[ok], &[]).is_ok(), "{ok}");
        }
        for bad in [
            "soc.example",
            "https://soc.example/",
            "https://",
            "https://a b",
            "",
        ] {
            let e = with(&[bad], &[]).unwrap_err().to_string();
            assert!(e.contains("--cors-origin"), "{bad}: {e}");
        }
        assert!(with(&[], &["airlock.internal"]).is_ok());
        for bad in ["", "a b", "http://x/"] {
            assert!(with(&[], &[bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_loopback_binds_go_without_a_key() {
        for host in ["127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"] {
            assert!(cfg(host, &[], false).check().is_ok(), "{host}");
        }
        for host in ["0.0.0.0", "::", "192.168.1.10"] {
            let err = cfg(host, &[], false).check().unwrap_err().to_string();
            assert!(
                err.contains("--api-key") && err.contains("--insecure-no-auth"),
                "{err}"
            );
            assert!(cfg(host, &["k"], false).check().is_ok());
            assert!(cfg(host, &[], true).check().is_ok());
        }
        // No name lookups: only addresses and localhost.
        assert!(cfg("example.com", &["k"], false).check().is_err());
        assert!(cfg("127.0.0.1", &[""], false).check().is_err());
        // Keys a client cannot send are refused, without echoing the key.
        for key in [" ", "two words", "tab\there", "caf\u{e9}", "bell\u{7}"] {
            let err = cfg("127.0.0.1", &[key], false)
                .check()
                .unwrap_err()
                .to_string();
            assert!(err.contains("printable ASCII"), "{err}");
            assert!(key.len() < 3 || !err.contains(key), "{err}");
        }
        assert!(cfg("127.0.0.1", &["sk-Abc_123.~+/="], false)
            .check()
            .is_ok());
    }

    #[test]
    fn key_files_hold_one_key_per_line() {
        let dir = std::env::temp_dir().join(format!("airlock-keys-{}", std::process::id()));
        std::fs::write(&dir, "  alpha \n\nbeta\n").unwrap();
        let keys = read_key_file(&dir);
        std::fs::write(&dir, "\n \n").unwrap();
        let empty = read_key_file(&dir);
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(keys.unwrap(), vec!["alpha", "beta"]);
        assert!(empty.unwrap_err().to_string().contains("holds no key"));
        // An endless file is read up to the limit, not until memory runs out.
        let e = read_key_file(std::path::Path::new("/dev/zero")).unwrap_err();
        assert!(
            format!("{e:#}").contains("holds more than the limit"),
            "{e:#}"
        );
    }
}
