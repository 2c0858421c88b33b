//! `GET /metrics`: Prometheus' text format (version 0.0.4). Counters end in `_total`; the
//! rates are averages over the server's life, from counters of tokens and of pass time (a
//! scraper that wants a window computes it from the counters).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use crate::api::AppState;

/// Responses by route pattern and status.
#[derive(Default)]
pub struct HttpCounts(Mutex<BTreeMap<(&'static str, u16), u64>>);

impl HttpCounts {
    pub fn add(&self, route: &'static str, status: u16) {
        // A poisoned lock only means another handler panicked mid-increment: keep counting.
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((route, status)).or_insert(0) += 1;
    }

    fn snapshot(&self) -> Vec<((&'static str, u16), u64)> {
        let m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.iter().map(|(k, v)| (*k, *v)).collect()
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn one(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    family(out, name, kind, help);
    let _ = writeln!(out, "{name} {value}");
}

pub fn render(st: &AppState) -> String {
    let s = &st.stats;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let mut out = String::new();
    family(
        &mut out,
        "airlock_requests_total",
        "counter",
        "HTTP responses by route and status code.",
    );
    for ((route, status), n) in st.http.snapshot() {
        let _ = writeln!(
            out,
            "airlock_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
        );
    }
    let prompt = load(&s.prompt_tokens);
    let reused = load(&s.prompt_tokens_reused);
    let generated = load(&s.generated_tokens);
    let prompt_s = load(&s.prompt_nanos) as f64 / 1e9;
    let gen_s = load(&s.generation_nanos) as f64 / 1e9;
    let rate = |n: u64, t: f64| if t > 0.0 { n as f64 / t } else { 0.0 };
    one(
        &mut out,
        "airlock_prompt_tokens_total",
        "counter",
        "Prompt tokens computed by forward passes (reused ones not included).",
        prompt,
    );
    one(
        &mut out,
        "airlock_prompt_tokens_reused_total",
        "counter",
        "Prompt tokens taken from a slot's cache instead of computed (prompt reuse).",
        reused,
    );
    one(
        &mut out,
        "airlock_completion_tokens_total",
        "counter",
        "Tokens generated.",
        generated,
    );
    one(
        &mut out,
        "airlock_prompt_seconds_total",
        "counter",
        "Time of the forward passes that computed prompt tokens.",
        prompt_s,
    );
    one(
        &mut out,
        "airlock_generation_seconds_total",
        "counter",
        "Time of the forward passes that generated tokens (a pass doing both counts for both).",
        gen_s,
    );
    one(
        &mut out,
        "airlock_prompt_tokens_per_second",
        "gauge",
        "Prompt tokens computed per second of prompt passes, over the server's life.",
        rate(prompt, prompt_s),
    );
    one(
        &mut out,
        "airlock_generation_tokens_per_second",
        "gauge",
        "Tokens generated per second of generating passes (all slots together), over the server's life.",
        rate(generated, gen_s),
    );
    one(
        &mut out,
        "airlock_queue_depth",
        "gauge",
        "Requests waiting for a free slot.",
        s.queued.load(Ordering::Relaxed),
    );
    one(
        &mut out,
        "airlock_slots_busy",
        "gauge",
        "Slots running a request.",
        s.busy_slots.load(Ordering::Relaxed),
    );
    one(
        &mut out,
        "airlock_slots",
        "gauge",
        "Slots (--parallel).",
        st.n_slots,
    );
    let capacity = st.n_slots * st.loaded.n_ctx;
    let kv = s.kv_tokens.load(Ordering::Relaxed);
    one(
        &mut out,
        "airlock_kv_cache_tokens",
        "gauge",
        "Positions filled in all slots' KV caches (idle slots keep theirs for prompt reuse).",
        kv,
    );
    one(
        &mut out,
        "airlock_kv_cache_capacity_tokens",
        "gauge",
        "Positions all slots' KV caches hold (--parallel times -c).",
        capacity,
    );
    one(
        &mut out,
        "airlock_kv_cache_usage_ratio",
        "gauge",
        "airlock_kv_cache_tokens / airlock_kv_cache_capacity_tokens.",
        if capacity > 0 {
            kv as f64 / capacity as f64
        } else {
            0.0
        },
    );
    one(
        &mut out,
        "airlock_requests_timed_out_total",
        "counter",
        "Requests ended by --timeout (queued or running).",
        load(&s.timed_out),
    );
    one(
        &mut out,
        "airlock_requests_cancelled_total",
        "counter",
        "Requests whose client left before the end (queued or running).",
        load(&s.cancelled),
    );
    out
}
