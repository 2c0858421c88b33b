//! Keeping the rayon pool awake through a forward pass, and handing it work
//! without the OS scheduler.
//!
//! A decode step is a chain of short parallel regions (about 65 matmuls for
//! Llama-3.2-1B, 225 for 8B) with a little sequential work between them
//! (norms, RoPE, attention, activation quantization). Rayon's idle workers
//! spin briefly and then sleep, so most regions began with a futex wake of a
//! sleeping thread: on a 2-vCPU VM, 30 context switches a token and 3% of
//! the samples in the scheduler. [`with_spinning_pool`] instead keeps every
//! other worker inside a job that takes the pool's work as it appears, as
//! llama.cpp's threads spin between graph nodes.
//!
//! Within a pass every parallel loop (matmuls, attention, SwiGLU, a prompt's
//! activation quantization and norms) goes through [`for_each_index`] and the
//! chunk helpers built on it: the calling thread posts the region's tasks where
//! the spinners look, takes tasks itself, and spins until the last is done.
//! A rayon region's waits call `sched_yield` instead (about 290 a token on
//! Llama-3.2-1B): with two `nice -n 19` CPU hogs beside it, that handed them
//! the CPU and cut Llama-3.2-1B decode from 36 to 26 t/s (2 threads), while
//! llama.cpp's spinning threads kept 37.7 (BENCHMARKS.md, "Sharing the CPUs").

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::Mutex;

use rayon::prelude::*;

/// Runs `f` on a thread of the current rayon pool (entering the global pool
/// first when called from outside one) while the pool's other threads spin,
/// each running the pool's jobs and this pass's regions as soon as they are
/// posted, until `f` returns. The spinning costs those threads' cores for as
/// long as `f` runs; use it only where the pool has no more threads than
/// cores.
pub fn with_spinning_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    spinning(|_| f())
}

thread_local! {
    /// The pass this thread owns, while it runs one: where its regions go.
    static CURRENT: Cell<*const Pass> = const { Cell::new(std::ptr::null()) };
}

/// [`with_spinning_pool`], handing `f` the count of threads spinning now.
fn spinning<R: Send>(f: impl FnOnce(&AtomicUsize) -> R + Send) -> R {
    if rayon::current_thread_index().is_none() {
        // Outside the pool the calling thread would run f's sequential steps on a
        // core the workers also want: one thread more than the pool.
        return rayon::join(|| spinning(f), || ()).0;
    }
    let others = rayon::current_num_threads() - 1;
    let pass = Pass {
        done: AtomicBool::new(false),
        owner: rayon::current_thread_index(),
        count: AtomicUsize::new(0),
        region: AtomicPtr::new(std::ptr::null_mut()),
        active: AtomicUsize::new(0),
        epoch: AtomicUsize::new(0),
        posting: Cell::new(false),
    };
    pass.run(others, || {
        // f runs on this thread (a join's first half runs where it is called).
        let _current = Current::set(&pass);
        f(&pass.count)
    })
}

/// One forward pass's spinners: their stop flag, the thread that owns the
/// pass, how many spin now, and the region posted for them.
struct Pass {
    done: AtomicBool,
    owner: Option<usize>,
    count: AtomicUsize,
    /// The owner's region while it runs one, else null.
    region: AtomicPtr<Region<'static>>,
    /// Spinners that may be reading `region`'s target.
    active: AtomicUsize,
    /// Regions posted so far in this pass (the current one's number while one is posted).
    epoch: AtomicUsize,
    /// The owner is inside a region (a task that starts another runs it on rayon).
    posting: Cell<bool>,
}

// SAFETY: `posting` is read and written only by the owner's thread (through
// CURRENT, which only that thread holds); everything else is atomic.
unsafe impl Sync for Pass {}

impl Pass {
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

    /// Takes this pass's regions and the pool's jobs until the pass is done.
    /// The owner can pop its own spinner while it waits inside a join: it
    /// must return at once, or nothing would ever set `done`.
    fn spin(&self) {
        if rayon::current_thread_index() == self.owner {
            return;
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        // The last region this thread has worked on: it enters each region once. Looking
        // again and again while the owner waits for a region's last task would keep this
        // thread counted in `active` most of the time, and when the scheduler took its CPU
        // away there the owner waited a whole time slice at the region's end (one loop in
        // another session then cost decode 26% more than rayon's waits did).
        let mut worked = 0;
        while !self.done.load(Ordering::Acquire) {
            let posted = !self.region.load(Ordering::Relaxed).is_null();
            if posted && self.epoch.load(Ordering::Relaxed) != worked {
                // Announce before looking again: the owner waits for `active` to drain
                // after taking its region down, so a region read here is still alive.
                self.active.fetch_add(1, Ordering::SeqCst);
                let r = self.region.load(Ordering::SeqCst);
                if !r.is_null() {
                    // The region's own epoch: the next is set only after this one is
                    // taken down, which waits for this thread to leave `active`.
                    worked = self.epoch.load(Ordering::SeqCst);
                    // SAFETY: the owner keeps the region alive until `active` is 0
                    // after it cleared `region` (Posted's drop), and this thread
                    // counts in `active` from before this load until after its use.
                    unsafe { (*r).work() };
                }
                self.active.fetch_sub(1, Ordering::Release);
                continue;
            }
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

/// Makes a pass this thread's [`CURRENT`] until dropped, then restores the one before (passes
/// nest).
struct Current(*const Pass);

impl Current {
    fn set(p: &Pass) -> Current {
        Current(CURRENT.with(|c| c.replace(p)))
    }
}

impl Drop for Current {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(self.0));
    }
}

/// Most ranges a region's tasks are cut into: one per thread, up to this many.
const MAX_RANGES: usize = 64;

/// One parallel loop: `task(i)` for i in 0..n. The tasks are cut into one contiguous range
/// per thread; each thread takes its own range's tasks in order, then helps with the others'.
/// Neighbouring tasks read neighbouring weight rows, so a thread that runs a range in order
/// streams through memory, as a rayon loop's halves do: tasks dealt out one by one in turn cost
/// SmolLM2 decode about 10%.
struct Region<'f> {
    task: &'f (dyn Fn(usize) + Sync),
    n: usize,
    ranges: usize,
    /// Tasks taken from each range so far (may run past the range's end).
    taken: [AtomicUsize; MAX_RANGES],
    /// Threads that have joined, the owner first: the next one's range.
    joined: AtomicUsize,
    left: AtomicUsize,
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

impl Region<'_> {
    /// Runs tasks until none is left to take: its own range's first, then the next ranges'.
    /// A panic is kept for the owner to resume, so no thread unwinds while the region is
    /// posted.
    fn work(&self) {
        let me = self.joined.fetch_add(1, Ordering::Relaxed);
        for k in 0..self.ranges {
            let r = (me + k) % self.ranges;
            let (start, end) = (r * self.n / self.ranges, (r + 1) * self.n / self.ranges);
            loop {
                let i = start + self.taken[r].fetch_add(1, Ordering::Relaxed);
                if i >= end {
                    break;
                }
                let run = std::panic::AssertUnwindSafe(|| (self.task)(i));
                if let Err(e) = std::panic::catch_unwind(run) {
                    let mut p = self.panic.lock().unwrap_or_else(|e| e.into_inner());
                    p.get_or_insert(e);
                }
                self.left.fetch_sub(1, Ordering::Release);
            }
        }
    }
}

/// Takes a posted region down when dropped: clears the pass's pointer, then waits until no
/// spinner can still be reading it.
struct Posted<'p>(&'p Pass);

impl Drop for Posted<'_> {
    fn drop(&mut self) {
        self.0.region.store(std::ptr::null_mut(), Ordering::SeqCst);
        while self.0.active.load(Ordering::SeqCst) != 0 {
            std::hint::spin_loop();
        }
        self.0.posting.set(false);
    }
}

/// Runs `task(i)` for every i in 0..n, in parallel. Inside [`with_spinning_pool`], on the
/// thread that runs the pass, the tasks go to the spinning threads and this one, and it waits
/// for the last by spinning; elsewhere (or nested) they run as a rayon loop. Which thread runs
/// which task is never fixed, so a task's result must not depend on it.
pub fn for_each_index(n: usize, task: impl Fn(usize) + Sync) {
    if n == 0 {
        return;
    }
    let pass = CURRENT.with(|c| c.get());
    // SAFETY: CURRENT points at a pass on this thread's stack for as long as it is set
    // (Current's drop clears it before the pass ends).
    let pass = unsafe { pass.as_ref() };
    let Some(pass) = pass.filter(|p| !p.posting.get() && n > 1) else {
        if n == 1 {
            task(0);
        } else {
            (0..n).into_par_iter().for_each(&task);
        }
        return;
    };
    let threads = rayon::current_num_threads();
    if threads == 1 {
        (0..n).for_each(task);
        return;
    }
    // Posted even before the spinners have started (a pass's first region): they take
    // tasks as they arrive, and whatever none takes, this thread runs.
    let region = Region {
        task: &task,
        n,
        ranges: threads.min(n).min(MAX_RANGES),
        taken: [const { AtomicUsize::new(0) }; MAX_RANGES],
        joined: AtomicUsize::new(0),
        left: AtomicUsize::new(n),
        panic: Mutex::new(None),
    };
    pass.posting.set(true);
    pass.epoch.fetch_add(1, Ordering::SeqCst);
    let ptr = &region as *const Region<'_> as *mut Region<'static>;
    pass.region.store(ptr, Ordering::SeqCst);
    let posted = Posted(pass);
    region.work();
    while region.left.load(Ordering::Acquire) != 0 {
        std::hint::spin_loop();
    }
    drop(posted);
    let panic = region.panic.into_inner().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = panic {
        std::panic::resume_unwind(p);
    }
}

/// `data.chunks_mut(size).enumerate()`, each `f(i, chunk)` run as [`for_each_index`] runs
/// its tasks.
pub fn for_each_chunk_mut<T: Send>(
    data: &mut [T],
    size: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    assert!(size > 0, "chunk size 0");
    let len = data.len();
    let base = SendPtr(data.as_mut_ptr());
    for_each_index(len.div_ceil(size), |i| {
        let start = i * size;
        let n = size.min(len - start);
        // SAFETY: chunk i is data[start..start + n], inside data, and no other task has the
        // same i, so the chunks are disjoint; data's borrow outlives the loop.
        let chunk = unsafe { std::slice::from_raw_parts_mut(base.get().add(start), n) };
        f(i, chunk)
    });
}

/// `a.chunks_mut(size_a).zip(b.chunks_mut(size_b)).enumerate()`, each `f(i, a_i, b_i)` run as
/// [`for_each_index`] runs its tasks (a token's quantized activations and their summaries).
pub fn for_each_chunk_pair_mut<A: Send, B: Send>(
    a: &mut [A],
    size_a: usize,
    b: &mut [B],
    size_b: usize,
    f: impl Fn(usize, &mut [A], &mut [B]) + Sync,
) {
    assert!(size_a > 0 && size_b > 0, "chunk size 0");
    let (len_a, len_b) = (a.len(), b.len());
    let n = len_a.div_ceil(size_a);
    assert_eq!(
        n,
        len_b.div_ceil(size_b),
        "the two slices have different chunk counts"
    );
    let (pa, pb) = (SendPtr(a.as_mut_ptr()), SendPtr(b.as_mut_ptr()));
    for_each_index(n, |i| {
        let (sa, sb) = (i * size_a, i * size_b);
        // SAFETY: as in for_each_chunk_mut, for each slice: chunk i of each is inside it, no
        // other task has the same i, and both borrows outlive the loop.
        let (ca, cb) = unsafe {
            (
                std::slice::from_raw_parts_mut(pa.get().add(sa), size_a.min(len_a - sa)),
                std::slice::from_raw_parts_mut(pb.get().add(sb), size_b.min(len_b - sb)),
            )
        };
        f(i, ca, cb)
    });
}

/// `f(item)` for each item of `data`, run as [`for_each_index`] runs its tasks.
pub fn for_each_mut<T: Send>(data: &mut [T], f: impl Fn(&mut T) + Sync) {
    for_each_chunk_mut(data, 1, |_, one| f(&mut one[0]));
}

/// A raw pointer the tasks share; each derives its own disjoint slice from it.
struct SendPtr<T>(*mut T);

impl<T> SendPtr<T> {
    fn get(&self) -> *mut T {
        self.0
    }
}

// SAFETY: the pointer is only used to make disjoint slices of a `&mut [T]` with T: Send.
unsafe impl<T: Send> Sync for SendPtr<T> {}

#[cfg(test)]
mod tests {
    use super::*;
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

    /// Waits up to 10 s for the pass's n - 1 spinners to start.
    fn wait_for_spinners(count: &AtomicUsize, n: usize) {
        let t0 = Instant::now();
        while count.load(Ordering::Relaxed) < n - 1 && t0.elapsed() < Duration::from_secs(10) {
            std::hint::spin_loop();
        }
    }

    /// Inside a pass, every task of a region runs exactly once and every chunk is its own,
    /// for task counts below, at and above the thread count.
    #[test]
    fn regions_run_every_task_once() {
        for n_threads in [1, 2, 3, 4] {
            pool(n_threads).install(|| {
                spinning(|count| {
                    wait_for_spinners(count, n_threads);
                    for n in [0, 1, 2, 3, 7, 64, 1000] {
                        let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                        for_each_index(n, |i| {
                            hits[i].fetch_add(1, Ordering::Relaxed);
                        });
                        assert!(
                            hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                            "{n_threads} threads, {n} tasks"
                        );
                    }
                    let mut v = vec![0usize; 1001];
                    for_each_chunk_mut(&mut v, 10, |c, s| {
                        for (j, x) in s.iter_mut().enumerate() {
                            *x += c * 10 + j;
                        }
                    });
                    assert!(v.iter().enumerate().all(|(i, &x)| x == i));
                    // Two slices in step, both with a short last chunk: 101 chunks of 10
                    // and of 3 (the last 1 and 2 long).
                    let (mut a, mut b) = (vec![0usize; 1001], vec![0usize; 302]);
                    for_each_chunk_pair_mut(&mut a, 10, &mut b, 3, |c, x, y| {
                        x.iter_mut().enumerate().for_each(|(j, v)| *v += c * 10 + j);
                        y.iter_mut().enumerate().for_each(|(j, v)| *v += c * 3 + j);
                    });
                    assert!(a.iter().enumerate().all(|(i, &x)| x == i));
                    assert!(b.iter().enumerate().all(|(i, &x)| x == i));
                })
            });
        }
    }

    /// The spinners take a region's tasks: task 0 waits (up to 60 s) until another thread
    /// has run task 1, which only a spinner can do while the owner is inside task 0. Twenty
    /// regions in a row, at the same stack address: a spinner must tell each from the last.
    /// The wait was 10 s until a CI run (2026-12-08, aarch64 under qemu-user, other tests'
    /// spinners on the same 2 CPUs) saw one region's tasks both run on the owner; 30 runs of
    /// these tests and 3 of the whole suite did not repeat it, and no cause was found. A
    /// correct pool passes as soon as the spinner runs; a pool whose spinners miss regions
    /// still fails, only later, and the message says how long task 0 waited.
    #[test]
    fn spinners_take_region_tasks() {
        pool(2).install(|| {
            spinning(|count| {
                wait_for_spinners(count, 2);
                for _ in 0..20 {
                    two_threads_run_a_region();
                }
            })
        });
    }

    fn two_threads_run_a_region() {
        let threads = Mutex::new(Vec::new());
        let other_ran = AtomicBool::new(false);
        let waited = Mutex::new(Duration::ZERO);
        for_each_index(2, |i| {
            threads.lock().unwrap().push(rayon::current_thread_index());
            if i == 0 {
                let t0 = Instant::now();
                while !other_ran.load(Ordering::Acquire) && t0.elapsed() < Duration::from_secs(60) {
                    std::hint::spin_loop();
                }
                *waited.lock().unwrap() = t0.elapsed();
            } else {
                other_ran.store(true, Ordering::Release);
            }
        });
        let mut t = threads.into_inner().unwrap();
        t.sort();
        t.dedup();
        let waited = waited.into_inner().unwrap();
        assert_eq!(t.len(), 2, "tasks ran on {t:?}; task 0 waited {waited:?}");
    }

    /// A task's panic reaches the caller once the region is down; the pass then goes on,
    /// and a task that starts a region of its own (run on rayon) gets its result.
    #[test]
    fn task_panics_and_nested_regions() {
        pool(2).install(|| {
            spinning(|count| {
                wait_for_spinners(count, 2);
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    for_each_index(8, |i| assert_ne!(i, 5, "task 5"))
                }));
                assert!(r.is_err());
                let sums: Vec<AtomicUsize> = (0..4).map(|_| AtomicUsize::new(0)).collect();
                for_each_index(4, |i| {
                    for_each_index(100, |j| {
                        sums[i].fetch_add(j, Ordering::Relaxed);
                    })
                });
                assert!(sums.iter().all(|s| s.load(Ordering::Relaxed) == 4950));
            })
        });
    }

    /// Outside a pass a region runs as a rayon loop, with the same result.
    #[test]
    fn regions_outside_a_pass() {
        let mut v = vec![0usize; 100];
        for_each_chunk_mut(&mut v, 7, |c, s| s.iter_mut().for_each(|x| *x = c));
        assert!(v.iter().enumerate().all(|(i, &x)| x == i / 7));
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
