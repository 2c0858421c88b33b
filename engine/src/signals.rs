//! One process-wide handler for SIGINT, SIGTERM and SIGHUP (the `ctrlc` crate with its
//! `termination` feature), shared by everything that must react to them: the output helper's
//! cleanup ([`crate::output`]), the converters' cancellation and the server's graceful shutdown.
//!
//! TERM is what `timeout`, systemd and container runtimes send, HUP what a closed terminal
//! sends: each is handled exactly like Ctrl-C.
//!
//! - Work that checks [`interrupted`] holds a [`Cooperate`] guard: the first signal then only
//!   sets the flag (and wakes [`wait`]ers), and the work stops and cleans up by itself.
//! - Otherwise, and on a second signal, the handler removes every path registered with
//!   [`remove_on_exit`] (temporary outputs) and exits at once with status 130.
//!
//! The handler is installed on first use ([`install`]); a process that never asks keeps the
//! default actions (a plain `airlock run` dies on Ctrl-C as any program does).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};

/// Exit status after a signal (the shell's 128 + SIGINT; ctrlc does not say which signal came).
pub const EXIT_INTERRUPTED: i32 = 130;

static COUNTS: Counts = Counts::new();
static NEXT_ID: AtomicU64 = AtomicU64::new(0);
static CLEANUP: Mutex<Vec<(u64, PathBuf)>> = Mutex::new(Vec::new());
static WAKE: (Mutex<()>, Condvar) = (Mutex::new(()), Condvar::new());
static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();

/// Installs the handler (once per process; later calls return the first call's outcome).
pub fn install() -> Result<(), String> {
    INSTALLED
        .get_or_init(|| {
            ctrlc::set_handler(on_signal)
                .map_err(|e| format!("cannot handle SIGINT/SIGTERM/SIGHUP: {e}"))
        })
        .clone()
}

/// Signals received and cooperating guards alive: one instance per process ([`COUNTS`]); the
/// tests build their own.
struct Counts {
    received: AtomicUsize,
    cooperating: AtomicUsize,
}

impl Counts {
    const fn new() -> Self {
        Counts {
            received: AtomicUsize::new(0),
            cooperating: AtomicUsize::new(0),
        }
    }

    /// Counts a signal and says whether the process must exit now. `counted` runs right after
    /// the count (the handler wakes the waiters there).
    ///
    /// The guards are read *before* the signal is counted. A cooperator sees the signal only
    /// after the count, and drops its guard only after it has seen it, so a guard alive when
    /// the signal came is always seen. Read after the count, a handler thread delayed there
    /// saw the guard of a server that had already drained and stopped, and exited 130 in
    /// place of its 0 (a CI run caught it).
    fn signal_must_exit(&self, counted: impl FnOnce()) -> bool {
        let cooperating = self.cooperating.load(Ordering::SeqCst);
        let n = self.received.fetch_add(1, Ordering::SeqCst) + 1;
        counted();
        !(n == 1 && cooperating > 0)
    }
}

/// Runs on ctrlc's own thread (not in signal context), so it may lock, print and remove files.
fn on_signal() {
    let exit = COUNTS.signal_must_exit(|| {
        let _g = WAKE.0.lock().unwrap_or_else(|e| e.into_inner());
        WAKE.1.notify_all();
    });
    if exit {
        remove_registered();
        std::process::exit(EXIT_INTERRUPTED);
    }
}

fn remove_registered() {
    let paths = std::mem::take(&mut *CLEANUP.lock().unwrap_or_else(|e| e.into_inner()));
    for (_, p) in paths {
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => {
                let _ = std::fs::remove_dir_all(&p);
            }
            Ok(_) => {
                let _ = std::fs::remove_file(&p);
            }
            Err(_) => {}
        }
    }
}

/// Has SIGINT, SIGTERM or SIGHUP arrived since the handler was installed?
pub fn interrupted() -> bool {
    COUNTS.received.load(Ordering::SeqCst) > 0
}

/// Blocks until a signal has arrived (at once if one already has).
pub fn wait() {
    let mut g = WAKE.0.lock().unwrap_or_else(|e| e.into_inner());
    while !interrupted() {
        g = WAKE.1.wait(g).unwrap_or_else(|e| e.into_inner());
    }
}

/// While alive, the first signal only sets [`interrupted`]: the holder checks it and stops.
#[must_use = "the guard only works while it is alive"]
pub struct Cooperate(());

impl Drop for Cooperate {
    fn drop(&mut self) {
        COUNTS.cooperating.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Installs the handler and declares that this work checks [`interrupted`] and stops by itself.
pub fn cooperate() -> Result<Cooperate, String> {
    install()?;
    COUNTS.cooperating.fetch_add(1, Ordering::SeqCst);
    Ok(Cooperate(()))
}

/// A path the handler removes (a file, or a directory with its contents) if the process exits
/// on a signal while this guard lives. Dropping the guard only forgets the path.
#[must_use = "the path is forgotten when the guard is dropped"]
pub struct RemoveOnExit(u64);

impl Drop for RemoveOnExit {
    fn drop(&mut self) {
        let mut list = CLEANUP.lock().unwrap_or_else(|e| e.into_inner());
        list.retain(|(id, _)| *id != self.0);
    }
}

/// A guard for no path (for a caller that could not register one).
pub(crate) fn unregistered() -> RemoveOnExit {
    RemoveOnExit(u64::MAX)
}

/// Installs the handler and registers `path` for removal on a signal exit.
pub fn remove_on_exit(path: PathBuf) -> Result<RemoveOnExit, String> {
    install()?;
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    CLEANUP
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((id, path));
    Ok(RemoveOnExit(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guard_dropped_right_after_the_signal_still_counts() {
        // The server's race: the cooperator sees the signal, drains and drops its guard
        // before the handler thread gets on. The first signal must still not exit.
        let c = Counts::new();
        c.cooperating.fetch_add(1, Ordering::SeqCst);
        let exit = c.signal_must_exit(|| {
            assert!(c.received.load(Ordering::SeqCst) > 0);
            c.cooperating.fetch_sub(1, Ordering::SeqCst);
        });
        assert!(!exit);
        // A second signal exits, guard or not.
        assert!(c.signal_must_exit(|| {}));
    }

    #[test]
    fn without_a_guard_the_first_signal_exits() {
        let c = Counts::new();
        assert!(c.signal_must_exit(|| {}));
        let c = Counts::new();
        c.cooperating.fetch_add(1, Ordering::SeqCst);
        assert!(!c.signal_must_exit(|| {}));
        assert!(c.signal_must_exit(|| {}));
    }
}
