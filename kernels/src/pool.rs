//! Keeping the rayon pool awake through a forward pass.
//!
//! A decode step is a chain of short parallel regions (about 65 matmuls for
//! Llama-3.2-1B, 225 for 8B) with a little sequential work between them
//! (norms, RoPE, attention, activation quantization). Rayon's idle workers
//! spin briefly and then sleep, so most regions began with a futex wake of a
//! sleeping thread: on a 2-vCPU VM, 30 context switches a token and 3% of
//! the samples in the scheduler. [`with_spinning_pool`] instead keeps every
//! other worker inside a job that takes the pool's work as it appears, as
//! llama.cpp's threads spin between graph nodes.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Runs `f` on a thread of the current rayon pool (entering the global pool
/// first when called from outside one) while the pool's other threads spin,
/// each running the pool's jobs as soon as they are queued, until `f`
/// returns. The spinning costs those threads' cores for as long as `f`
/// runs; use it only where the pool has no more threads than cores.
pub fn with_spinning_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    spinning(|_| f())
}

/// [`with_spinning_pool`], handing `f` the count of threads spinning now.
fn spinning<R: Send>(f: impl FnOnce(&AtomicUsize) -> R + Send) -> R {
    if rayon::current_thread_index().is_none() {
        // Outside the pool the calling thread would run f's sequential steps on a
        // core the workers also want: one thread more than the pool.
        return rayon::join(|| spinning(f), || ()).0;
    }
    let others = rayon::current_num_threads() - 1;
    let count = AtomicUsize::new(0);
    let pass = Pass {
        done: AtomicBool::new(false),
        owner: rayon::current_thread_index(),
        count: &count,
    };
    pass.run(others, || f(&count))
}

/// One forward pass's spinners: their stop flag, the thread that owns the
/// pass, and how many spin now.
struct Pass<'a> {
    done: AtomicBool,
    owner: Option<usize>,
    count: &'a AtomicUsize,
}

impl Pass<'_> {
    /// Queues `spinners` spinners, each the second half of a `rayon::join`
    /// (a job on the stack: no allocation per pass, which runs once a token),
    /// then runs `f` and stops them.
    fn run<R: Send>(&self, spinners: usize, f: impl FnOnce() -> R + Send) -> R {
        if spinners == 0 {
            // Set even if f panics, so the spinners end and the joins can unwind.
            let _stop = Stop(&self.done);
            return f();
        }
        rayon::join(|| self.run(spinners - 1, f), || self.spin()).0
    }

    /// Takes the pool's jobs until the pass is done. The owner can pop its
    /// own spinner while it waits inside a join: it must return at once, or
    /// nothing would ever set `done`.
    fn spin(&self) {
        if rayon::current_thread_index() == self.owner {
            return;
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        while !self.done.load(Ordering::Acquire) {
            if rayon::yield_now() != Some(rayon::Yield::Executed) {
                std::hint::spin_loop();
            }
        }
        self.count.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Sets its flag when dropped.
struct Stop<'a>(&'a AtomicBool);

impl Drop for Stop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;
    use std::time::{Duration, Instant};

    fn pool(n: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .unwrap()
    }

    /// While the pass runs, every other thread of the pool sits in a spinner
    /// (not asleep), and parallel work queued meanwhile completes with the
    /// right result, for every pool size.
    #[test]
    fn other_threads_spin_while_the_pass_runs() {
        for n in [1, 2, 3, 4] {
            let p = pool(n);
            let (spinners, total) = p.install(|| {
                spinning(|count| {
                    // Spinners start when the others wake; give them up to 10 s.
                    let t0 = Instant::now();
                    while count.load(Ordering::Relaxed) < n - 1
                        && t0.elapsed() < Duration::from_secs(10)
                    {
                        std::hint::spin_loop();
                    }
                    let spinners = count.load(Ordering::Relaxed);
                    let total: u64 = (0..200)
                        .map(|_| {
                            (0..10_000u32)
                                .into_par_iter()
                                .with_min_len(64)
                                .map(u64::from)
                                .sum::<u64>()
                        })
                        .sum();
                    (spinners, total)
                })
            });
            assert_eq!(spinners, n - 1, "{n} threads");
            assert_eq!(total, 200 * (0..10_000u64).sum::<u64>(), "{n} threads");
        }
    }

    /// From outside any pool it enters the global one and returns.
    #[test]
    fn works_from_outside_the_pool() {
        let v = with_spinning_pool(|| (0..1000u32).into_par_iter().map(|x| x as u64).sum::<u64>());
        assert_eq!(v, 499_500);
    }

    /// Nested use (a pass inside a pass) and a panic inside both end: no
    /// spinner is left waiting for a flag nobody sets.
    #[test]
    fn nested_passes_and_panics_end() {
        let p = pool(2);
        let v = p.install(|| with_spinning_pool(|| with_spinning_pool(|| 7)));
        assert_eq!(v, 7);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            p.install(|| with_spinning_pool(|| -> u32 { panic!("inside") }))
        }));
        assert!(r.is_err());
        // The pool still works afterwards.
        assert_eq!(p.install(|| with_spinning_pool(|| 3)), 3);
    }
}
