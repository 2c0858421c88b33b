//! Chat templates that try to grow memory (issue 14, item 2): every value a template builds is
//! bounded, not only what it prints. Rendered in airlock's own render worker (the binary's
//! hidden subcommand) with an address-space limit, each is refused with a clear error naming the
//! template and the limit; the worker's peak resident memory, read from the kernel after it
//! died, stays under the limit, and this process's own peak does not grow; a template that only
//! burns CPU time is ended by the worker's CPU limit. One test function,
//! so no other test's allocations blur the peaks.

use airlock_engine::chat::{ChatError, ChatLimits, ChatMessage, ChatTemplate};

/// The limit for these tests: smaller than the CLI's (256 MiB) so each hostile template dies
/// sooner; the mechanism is the same.
const LIMIT: u64 = 128 << 20;

/// CPU seconds per render for these tests: shorter than the CLI's (10 s), the same mechanism.
const CPU_SECONDS: u64 = 2;

/// Templates that double a string (the first is also in tests/hostile.rs), a list or a dict in a loop, or ask for a huge padding.
const GROWING: &[(&str, &str)] = &[
    (
        "string doubled with ~",
        "{% set ns = namespace(v='x') %}{% for i in range(40) %}{% set ns.v = ns.v ~ ns.v %}{% endfor %}{{ ns.v|length }}",
    ),
    (
        "string doubled with replace",
        "{% set ns = namespace(v='xx') %}{% for i in range(40) %}{% set ns.v = ns.v|replace('x', 'xx') %}{% endfor %}{{ ns.v|length }}",
    ),
    (
        "list in a namespace doubled",
        "{% set ns = namespace(l=[1]) %}{% for i in range(40) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l|length }}",
    ),
    (
        "tojson of a doubled dict",
        "{% set ns = namespace(d={'a': 'x'}) %}{% for i in range(40) %}{% set ns.d = {'a': ns.d, 'b': ns.d} %}{% endfor %}{{ ns.d|tojson|length }}",
    ),
    ("huge indent width", "{{ 'a\nb'|indent(2000000000) }}"),
    ("huge format width", "{{ '%2000000000d'|format(1) }}"),
];

/// Peak resident memory (kB) of this process.
fn own_peak_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Peak resident memory (bytes) of the largest child this process has reaped.
fn children_peak_bytes() -> u64 {
    use nix::sys::resource::{getrusage, UsageWho};
    let u = getrusage(UsageWho::RUSAGE_CHILDREN).unwrap();
    u.max_rss() as u64 * 1024
}

fn template(src: &str) -> ChatTemplate {
    ChatTemplate::new("hostile", src, "<s>", "</s>", ChatLimits::default()).unwrap()
}

#[test]
fn templates_that_grow_memory_or_burn_cpu_are_refused_within_the_bounds() {
    assert!(airlock_engine::render::install_with_cpu(
        env!("CARGO_BIN_EXE_airlock").into(),
        vec![airlock_engine::render::WORKER_ARG.into()],
        LIMIT,
        CPU_SECONDS,
    ));
    let msgs = [ChatMessage::user("hi")];
    // An honest template renders through the worker.
    let ok = template("{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}");
    assert_eq!(ok.render(&msgs, true).unwrap(), "[user] hi");
    let before = own_peak_kb();
    for (what, src) in GROWING {
        let e = template(src).render(&msgs, true).unwrap_err();
        match &e {
            ChatError::MemoryExceeded {
                template,
                limit_mib,
                ..
            } => {
                assert_eq!(template, "hostile", "{what}");
                assert_eq!(*limit_mib, LIMIT >> 20, "{what}");
            }
            e => panic!("{what}: expected MemoryExceeded, got {e}"),
        }
        let msg = e.to_string();
        assert!(
            msg.contains("\"hostile\"") && msg.contains("128 MiB"),
            "{what}: {msg}"
        );
        // The worker that died is replaced: the next render works.
        assert_eq!(ok.render(&msgs, true).unwrap(), "[user] hi", "after {what}");
    }
    // Every worker that died stayed under the limit, as the kernel measured it...
    let peak = children_peak_bytes();
    assert!(peak > 0 && peak <= LIMIT, "render worker peak {peak} bytes");
    // ...and this process did not build the values itself.
    let grew_kb = own_peak_kb().saturating_sub(before);
    assert!(
        grew_kb < 32 << 10,
        "this process's peak grew by {grew_kb} kB"
    );
    // Fuel and the output cap still apply in the worker, with their own errors.
    let long = template("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}");
    assert!(matches!(
        long.render(&msgs, true),
        Err(ChatError::OutputTooLarge(_))
    ));
    // Time: a loop cheap in fuel (a few instructions a step), small in memory (two 10 MB
    // strings) and output (8 bytes a step), whose every step copies 10 MB, would run for many
    // minutes; the worker's CPU limit ends it.
    let slow = template(
        "{% set big = 'a' * 10000000 %}{% for i in range(100000) %}{{ big|replace('a', 'b')|length }}{% endfor %}",
    );
    match slow.render(&msgs, true) {
        Err(e @ ChatError::TimeExceeded { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("\"hostile\"") && msg.contains("more than 2 s of CPU time"),
                "{msg}"
            );
        }
        other => panic!("expected TimeExceeded, got {other:?}"),
    }
    assert_eq!(
        ok.render(&msgs, true).unwrap(),
        "[user] hi",
        "after the slow one"
    );
}
