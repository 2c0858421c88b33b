//! The scheduler: one thread owns the model and `--parallel` KV caches (slots) and runs one
//! batched forward pass per step, with one token for every generating slot plus up to `-b`
//! prompt tokens of newly admitted requests.
//!
//! Requests arrive over a bounded channel (the queue); each carries an unbounded tokio sender
//! for its events. A request whose receiver is gone (the client left) is dropped: when it is
//! still queued it never runs, and when it holds a slot the slot is freed before the next
//! step's batch is built.
//!
//! Prompt reuse: a slot keeps the tokens its cache holds after its request ends (prompt and
//! generated tokens alike), and a new request goes to the free slot whose tokens share the
//! longest prefix with its prompt; only the rest is computed. Batch invariance makes the
//! cached keys and values the ones a fresh computation would give, so the answer is the same.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use airlock_engine::generate::{Generation, Step, StopReason};
use airlock_engine::llama::{forward_batch, BatchSeq, KvCache, Logits, Workspace};
use airlock_engine::load::LoadedModel;
use tokio::sync::mpsc::UnboundedSender;

/// One request as the scheduler runs it: tokenized, validated, with its own sampler.
pub struct Job {
    /// Request id, for the log lines.
    pub id: String,
    pub prompt: Vec<u32>,
    /// Its sampler and stop state, built by the handler (which validated the parameters).
    pub generation: Generation,
    pub events: UnboundedSender<Event>,
    /// Start from the longest prefix of the prompt a free slot already holds (llama-server's
    /// `cache_prompt`); false computes the whole prompt.
    pub cache_prompt: bool,
    /// Report each sampled token's log-probability and this many alternatives.
    pub logprobs: Option<usize>,
    /// The generation's token limit (it ends the moment the last token is sampled).
    pub max_tokens: Option<usize>,
    pub penalties: Penalties,
    /// When the request must end (`--timeout`): a running request stops there with what it has.
    pub deadline: Option<Instant>,
    /// Log the completion's text (`--log-prompts`).
    pub log_text: bool,
}

/// OpenAI's presence and frequency penalties, applied to the logits before the sampler's
/// chain: `logit[j] -= count[j] * frequency + (count[j] > 0) * presence`, where `count[j]` is
/// how often token j was sampled so far in this completion (OpenAI's definition; the prompt
/// does not count, unlike `repeat_penalty`'s window).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Penalties {
    pub presence: f32,
    pub frequency: f32,
}

impl Penalties {
    pub fn is_off(&self) -> bool {
        self.presence == 0.0 && self.frequency == 0.0
    }

    pub fn apply(&self, logits: &mut [f32], counts: &HashMap<u32, u32>) {
        for (&id, &n) in counts {
            if let Some(l) = logits.get_mut(id as usize) {
                let presence = if n > 0 { self.presence } else { 0.0 };
                *l -= n as f32 * self.frequency + presence;
            }
        }
    }
}

/// A sampled token's log-probability and the most likely alternatives at its position, from
/// the log-softmax of the model's raw logits (before penalties, temperature or truncation).
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    /// (token, logprob), most likely first (ties: lower id first).
    pub top: Vec<(u32, f32)>,
}

/// The log-softmax of `logits` at `token`, and its `n` largest entries. NaN reads as -inf and
/// +inf as the largest float, as the sampler reads them. Accumulated in f64, in id order.
pub fn logprobs(logits: &[f32], token: u32, n: usize) -> TokenLogprob {
    let clean = |l: f32| {
        if l.is_nan() {
            f32::NEG_INFINITY
        } else {
            l.min(f32::MAX)
        }
    };
    let max = logits
        .iter()
        .map(|&l| clean(l))
        .fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (clean(l) as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    let lp = |l: f32| (clean(l) as f64 - lse) as f32;
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
    if n > 0 {
        for (i, &l) in logits.iter().enumerate() {
            let l = clean(l);
            // Kept sorted by descending logit, then ascending id: insert where it belongs.
            if top.len() == n && top.last().is_some_and(|&(_, w)| l <= w) {
                continue;
            }
            let at = top.partition_point(|&(_, w)| w >= l);
            top.insert(at, (i as u32, l));
            top.truncate(n);
        }
    }
    TokenLogprob {
        token,
        logprob: logits
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |&l| lp(l)),
        top: top.into_iter().map(|(id, l)| (id, lp(l))).collect(),
    }
}

/// What the scheduler tells a request's handler.
#[derive(Debug)]
pub enum Event {
    /// The request has a slot; `cached_tokens` of its prompt are reused from the slot's cache.
    Started { cached_tokens: usize },
    /// Text ready to show (may be empty when the step held text back), and the log-probabilities
    /// of the tokens sampled since the last event (when asked for).
    Text {
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
    /// Generation ended; `text` is the last piece.
    Done {
        text: String,
        reason: StopReason,
        /// `--timeout` ended it (reported as `length`).
        timed_out: bool,
        prompt_tokens: usize,
        cached_tokens: usize,
        completion_tokens: usize,
        logprobs: Vec<TokenLogprob>,
    },
    /// The engine failed on this request (not the client's mistake).
    Error(String),
}

/// Counters and gauges the scheduler keeps for `/metrics`.
#[derive(Debug, Default)]
pub struct Stats {
    /// Requests waiting for a slot (the handler adds, the scheduler takes away).
    pub queued: AtomicUsize,
    pub busy_slots: AtomicUsize,
    /// Positions filled in all slots' caches (idle slots keep theirs for reuse).
    pub kv_tokens: AtomicUsize,
    /// Prompt tokens computed by forward passes.
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens taken from a slot's cache instead.
    pub prompt_tokens_reused: AtomicU64,
    pub generated_tokens: AtomicU64,
    /// Time of the passes that held prompt tokens, and of those that decoded (a pass doing
    /// both counts for both), in nanoseconds.
    pub prompt_nanos: AtomicU64,
    pub generation_nanos: AtomicU64,
    pub timed_out: AtomicU64,
    /// Requests whose client left (queued or running).
    pub cancelled: AtomicU64,
}

/// A slot's request and where it stands.
struct Active {
    job: Job,
    /// Prompt tokens already in the cache.
    fed: usize,
    /// The token to feed this step once the prompt is in (the last one sampled).
    next: Option<u32>,
    /// Admission order, so earlier requests' prompts go first.
    admitted: u64,
    started: Instant,
    /// Prompt tokens reused from the slot's cache.
    cached: usize,
    /// How often each token was sampled (presence and frequency penalties).
    counts: HashMap<u32, u32>,
}

struct Slot {
    cache: KvCache,
    /// The tokens whose keys and values the cache holds, in order: what a later request's
    /// prompt can reuse.
    tokens: Vec<u32>,
    /// When the slot was last given a request (least recently used goes first on a tie).
    last_used: u64,
    active: Option<Active>,
}

/// The free slot a prompt should go to and how many of its tokens that slot's cache already
/// holds: the longest shared prefix wins, the least recently used slot on a tie (so idle
/// caches live longest). At least one prompt token is always left to compute, for its logits.
fn choose_slot(
    slots: &[(bool, &[u32], u64)],
    prompt: &[u32],
    cache_prompt: bool,
) -> Option<(usize, usize)> {
    let mut best: Option<(usize, usize, u64)> = None;
    for (i, &(busy, tokens, last_used)) in slots.iter().enumerate() {
        if busy {
            continue;
        }
        let shared = if cache_prompt {
            tokens
                .iter()
                .zip(prompt)
                .take_while(|(a, b)| a == b)
                .count()
        } else {
            0
        };
        if best.is_none_or(|(_, s, lu)| shared > s || (shared == s && last_used < lu)) {
            best = Some((i, shared, last_used));
        }
    }
    best.map(|(i, shared, _)| (i, shared.min(prompt.len().saturating_sub(1))))
}

/// Runs until the queue's senders are all gone and no slot is busy.
pub fn run(
    loaded: Arc<LoadedModel>,
    n_slots: usize,
    batch: usize,
    queue: Receiver<Job>,
    stats: Arc<Stats>,
) {
    let model = &loaded.model;
    let tok = &loaded.tokenizer;
    let mut slots: Vec<Slot> = (0..n_slots)
        .map(|_| Slot {
            cache: KvCache::new(model, loaded.n_ctx, loaded.kv_type),
            tokens: Vec::new(),
            last_used: 0,
            active: None,
        })
        .collect();
    let mut ws = Workspace::default();
    let mut admitted = 0u64;
    let mut queue_open = true;
    let batch = batch.max(1);
    let mut penalized: Vec<f32> = Vec::new();

    loop {
        // Admit queued requests into free slots; block only when nothing is running.
        while queue_open {
            if slots.iter().all(|s| s.active.is_some()) {
                break;
            }
            let idle = slots.iter().all(|s| s.active.is_none());
            let job = if idle {
                stats.busy_slots.store(0, Ordering::Relaxed);
                match queue.recv() {
                    Ok(j) => j,
                    Err(_) => {
                        queue_open = false;
                        break;
                    }
                }
            } else {
                match queue.try_recv() {
                    Ok(j) => j,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        queue_open = false;
                        break;
                    }
                }
            };
            stats.queued.fetch_sub(1, Ordering::Relaxed);
            if job.deadline.is_some_and(|d| Instant::now() >= d) {
                // Its handler gives up at the deadline too, answers 503 and counts it.
                eprintln!("{}: timed out before it ran (--timeout)", job.id);
                continue;
            }
            if job.events.is_closed() {
                eprintln!("{}: client left before it ran", job.id);
                stats.cancelled.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let views: Vec<(bool, &[u32], u64)> = slots
                .iter()
                .map(|s| (s.active.is_some(), s.tokens.as_slice(), s.last_used))
                .collect();
            let (free, reuse) =
                choose_slot(&views, &job.prompt, job.cache_prompt).expect("a slot is free");
            let slot = &mut slots[free];
            slot.cache.truncate(reuse);
            slot.tokens.truncate(reuse);
            admitted += 1;
            slot.last_used = admitted;
            eprintln!(
                "{}: started in slot {free}, {reuse} of {} prompt tokens cached",
                job.id,
                job.prompt.len()
            );
            stats
                .prompt_tokens_reused
                .fetch_add(reuse as u64, Ordering::Relaxed);
            let _ = job.events.send(Event::Started {
                cached_tokens: reuse,
            });
            slot.active = Some(Active {
                job,
                fed: reuse,
                next: None,
                admitted,
                started: Instant::now(),
                cached: reuse,
                counts: HashMap::new(),
            });
        }

        // Free the slots whose clients left, and end the requests past their deadline.
        let now = Instant::now();
        for slot in &mut slots {
            let Some(a) = &slot.active else { continue };
            if a.job.events.is_closed() {
                let a = slot.active.take().expect("checked");
                stats.cancelled.fetch_add(1, Ordering::Relaxed);
                eprintln!(
                    "{}: client left after {} generated tokens; slot freed",
                    a.job.id,
                    a.job.generation.generated().len()
                );
            } else if a.job.deadline.is_some_and(|d| now >= d) {
                let a = slot.active.take().expect("checked");
                stats.timed_out.fetch_add(1, Ordering::Relaxed);
                let completion_tokens = a.job.generation.generated().len();
                eprintln!(
                    "{}: timed out (--timeout) after {completion_tokens} generated tokens; slot freed",
                    a.job.id
                );
                let _ = a.job.events.send(Event::Done {
                    text: String::new(),
                    reason: StopReason::MaxTokens,
                    timed_out: true,
                    prompt_tokens: a.job.prompt.len(),
                    cached_tokens: a.cached,
                    completion_tokens,
                    logprobs: Vec::new(),
                });
            }
        }
        publish_gauges(&slots, &stats);
        if slots.iter().all(|s| s.active.is_none()) {
            if queue_open {
                continue;
            }
            return;
        }

        // This step's work: every decoding slot's token, then prompt chunks in admission order.
        let views: Vec<Option<SlotView>> = slots
            .iter()
            .map(|s| {
                s.active.as_ref().map(|a| SlotView {
                    fed: a.fed,
                    prompt_len: a.job.prompt.len(),
                    decoding: a.next.is_some(),
                    admitted: a.admitted,
                })
            })
            .collect();
        let plan = plan_step(&views, batch);

        // One forward pass for all of them.
        let t0 = Instant::now();
        let result = {
            let mut by_slot: Vec<Option<&mut Slot>> = slots.iter_mut().map(Some).collect();
            let mut seqs: Vec<BatchSeq> = Vec::with_capacity(plan.len());
            for (i, range, logits) in &plan {
                let slot = by_slot[*i].take().expect("one entry per slot");
                let a = slot.active.as_ref().expect("planned");
                let tokens: &[u32] = match &a.next {
                    Some(t) => std::slice::from_ref(t),
                    None => &a.job.prompt[range.clone()],
                };
                seqs.push(BatchSeq {
                    cache: &mut slot.cache,
                    tokens,
                    logits: *logits,
                });
            }
            forward_batch(model, loaded.precision, &mut ws, &mut seqs)
        };
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                // Not a client's mistake (prompts are checked against the context on arrival):
                // fail this step's requests and go on with the others. Their caches' contents
                // are no longer known, so nothing of them is reused.
                for (i, _, _) in &plan {
                    let slot = &mut slots[*i];
                    slot.cache.reset();
                    slot.tokens.clear();
                    if let Some(a) = slot.active.take() {
                        eprintln!("{}: engine error: {e}", a.job.id);
                        let _ = a.job.events.send(Event::Error(e.to_string()));
                    }
                }
                continue;
            }
        };
        let elapsed = t0.elapsed().as_nanos() as u64;
        let (mut prompt_rows, mut decode_rows) = (0u64, 0u64);

        // Hand each row to its request's generation.
        let vocab = model.config.vocab_size;
        let mut row = 0;
        for (i, range, wanted) in plan {
            let slot = &mut slots[i];
            let a = slot.active.as_mut().expect("planned");
            match a.next {
                Some(t) => {
                    slot.tokens.push(t);
                    decode_rows += 1;
                }
                None => {
                    slot.tokens.extend_from_slice(&a.job.prompt[range.clone()]);
                    a.fed = range.end;
                    prompt_rows += range.len() as u64;
                }
            }
            let room = slot.cache.pos() < slot.cache.n_ctx();
            if wanted == Logits::None {
                continue;
            }
            let raw = &logits[row * vocab..(row + 1) * vocab];
            row += 1;
            let before = a.job.generation.generated().len();
            let step = if a.job.penalties.is_off() {
                a.job.generation.step(tok, raw, room)
            } else {
                penalized.clear();
                penalized.extend_from_slice(raw);
                a.job.penalties.apply(&mut penalized, &a.counts);
                a.job.generation.step(tok, &penalized, room)
            };
            let mut lp = Vec::new();
            if a.job.generation.generated().len() > before {
                let t = *a.job.generation.generated().last().expect("grew");
                *a.counts.entry(t).or_insert(0) += 1;
                stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
                if let Some(n) = a.job.logprobs {
                    lp.push(logprobs(raw, t, n));
                }
            }
            let step = match step {
                // The limit is reached: end now rather than feed the token for a step that
                // would only say so (Generation reads no logits then).
                Ok(Step::Token { text, .. })
                    if a.job
                        .max_tokens
                        .is_some_and(|m| a.job.generation.generated().len() >= m) =>
                {
                    match a.job.generation.step(tok, &[], room) {
                        Ok(Step::Done { reason, text: rest }) => Ok(Step::Done {
                            reason,
                            text: text + &rest,
                        }),
                        other => other,
                    }
                }
                s => s,
            };
            match step {
                Ok(Step::Token { token, text }) => {
                    a.next = Some(token);
                    if !text.is_empty() || !lp.is_empty() {
                        let _ = a.job.events.send(Event::Text { text, logprobs: lp });
                    }
                }
                Ok(Step::Done { reason, text }) => {
                    let a = slot.active.take().expect("planned");
                    let completion_tokens = a.job.generation.generated().len();
                    eprintln!(
                        "{}: done ({reason:?}): {} prompt ({} cached) + {completion_tokens} generated tokens in {:.2} s",
                        a.job.id,
                        a.job.prompt.len(),
                        a.cached,
                        a.started.elapsed().as_secs_f64()
                    );
                    if a.job.log_text {
                        eprintln!("{}: completion: {:?}", a.job.id, a.job.generation.text());
                    }
                    let _ = a.job.events.send(Event::Done {
                        text,
                        reason,
                        timed_out: false,
                        prompt_tokens: a.job.prompt.len(),
                        cached_tokens: a.cached,
                        completion_tokens,
                        logprobs: lp,
                    });
                }
                Err(e) => {
                    let a = slot.active.take().expect("planned");
                    eprintln!("{}: generation error: {e}", a.job.id);
                    let _ = a.job.events.send(Event::Error(e.to_string()));
                }
            }
        }
        stats
            .prompt_tokens
            .fetch_add(prompt_rows, Ordering::Relaxed);
        if prompt_rows > 0 {
            stats.prompt_nanos.fetch_add(elapsed, Ordering::Relaxed);
        }
        if decode_rows > 0 {
            stats.generation_nanos.fetch_add(elapsed, Ordering::Relaxed);
        }
    }
}

fn publish_gauges(slots: &[Slot], stats: &Stats) {
    let busy = slots.iter().filter(|s| s.active.is_some()).count();
    let kv: usize = slots.iter().map(|s| s.cache.pos()).sum();
    stats.busy_slots.store(busy, Ordering::Relaxed);
    stats.kv_tokens.store(kv, Ordering::Relaxed);
}

/// What the step planner needs to know of a busy slot.
#[derive(Clone, Copy, Debug)]
struct SlotView {
    /// Prompt tokens already in the cache.
    fed: usize,
    prompt_len: usize,
    /// The prompt is in and the slot brings one sampled token per step.
    decoding: bool,
    admitted: u64,
}

/// One step's batch: (slot, the prompt range it brings or 0..1 for a decoding slot's token,
/// which logits it wants). Every decoding slot brings its token (those do not count against
/// `batch`); then the slots still reading their prompts get up to `batch` prompt tokens in
/// all, earliest admitted first, so a long prompt goes in chunks and delays the running
/// streams by at most one chunk per step. Only a chunk that ends its prompt wants logits.
fn plan_step(slots: &[Option<SlotView>], batch: usize) -> Vec<(usize, Range<usize>, Logits)> {
    let mut plan = Vec::new();
    for (i, s) in slots.iter().enumerate() {
        if s.is_some_and(|s| s.decoding) {
            plan.push((i, 0..1, Logits::Last));
        }
    }
    let mut prefill: Vec<(usize, SlotView)> = slots
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.filter(|s| !s.decoding).map(|s| (i, s)))
        .collect();
    prefill.sort_by_key(|(_, s)| s.admitted);
    let mut budget = batch.max(1);
    for (i, s) in prefill {
        let n = (s.prompt_len - s.fed).min(budget);
        if n == 0 {
            break;
        }
        budget -= n;
        let end = s.fed + n;
        let logits = if end == s.prompt_len {
            Logits::Last
        } else {
            Logits::None
        };
        plan.push((i, s.fed..end, logits));
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefill(fed: usize, prompt_len: usize, admitted: u64) -> Option<SlotView> {
        Some(SlotView {
            fed,
            prompt_len,
            decoding: false,
            admitted,
        })
    }

    fn decoding(admitted: u64) -> Option<SlotView> {
        Some(SlotView {
            fed: 5,
            prompt_len: 5,
            decoding: true,
            admitted,
        })
    }

    #[test]
    fn decoding_slots_always_go_and_a_long_prompt_is_chunked() {
        // Two streams decode while a 40-token prompt arrives, with -b 16.
        let mut slots = vec![decoding(1), None, prefill(0, 40, 3), decoding(2)];
        let mut chunks = Vec::new();
        for _ in 0..10 {
            let plan = plan_step(&slots, 16);
            // The streams get their token every step.
            assert_eq!(plan[0], (0, 0..1, Logits::Last));
            assert_eq!(plan[1], (3, 0..1, Logits::Last));
            let (2, r, l) = plan[2].clone() else {
                panic!("{plan:?}")
            };
            assert!(r.len() <= 16);
            chunks.push((r.clone(), l));
            if l == Logits::Last {
                break;
            }
            slots[2] = prefill(r.end, 40, 3);
        }
        assert_eq!(
            chunks,
            vec![
                (0..16, Logits::None),
                (16..32, Logits::None),
                (32..40, Logits::Last)
            ]
        );
    }

    #[test]
    fn prompts_share_the_budget_earliest_admitted_first() {
        let slots = vec![prefill(0, 10, 7), prefill(4, 10, 5), None];
        // Slot 1 was admitted first: its 6 remaining tokens, then 6 of slot 0's.
        assert_eq!(
            plan_step(&slots, 12),
            vec![(1, 4..10, Logits::Last), (0, 0..6, Logits::None)]
        );
        assert_eq!(plan_step(&slots, 6), vec![(1, 4..10, Logits::Last)]);
        assert!(plan_step(&[None, None], 8).is_empty());
    }
    #[test]
    fn the_longest_shared_prefix_wins_then_the_least_recently_used() {
        let a: &[u32] = &[1, 2, 3, 4, 5];
        let b: &[u32] = &[1, 2, 9];
        let empty: &[u32] = &[];
        // Slot 0 is busy (its match does not count); slot 1 shares 4 tokens, slot 2 two.
        let slots = [
            (true, a, 1),
            (false, a, 5),
            (false, b, 2),
            (false, empty, 0),
        ];
        assert_eq!(choose_slot(&slots, &[1, 2, 3, 4, 7], true), Some((1, 4)));
        assert_eq!(choose_slot(&slots, &[1, 2, 9, 9], true), Some((2, 3)));
        // No shared prefix: the least recently used free slot.
        assert_eq!(choose_slot(&slots, &[8], true), Some((3, 0)));
        // The whole prompt cached: one token is left to compute, for its logits.
        assert_eq!(choose_slot(&slots, &[1, 2, 3], true), Some((1, 2)));
        // cache_prompt false: nothing is reused.
        assert_eq!(choose_slot(&slots, &[1, 2, 3, 4, 7], false), Some((3, 0)));
        // On a tie, the least recently used.
        let tie = [(false, b, 7), (false, b, 3)];
        assert_eq!(choose_slot(&tie, &[1, 2, 9, 1], true), Some((1, 3)));
        assert_eq!(choose_slot(&[(true, a, 0)], &[1], true), None);
    }

    #[test]
    fn logprobs_are_the_log_softmax_of_the_raw_logits() {
        let logits = [1.0f32, 3.0, f32::NAN, 3.0, -2.0, f32::NEG_INFINITY];
        let lp = logprobs(&logits, 4, 3);
        // The reference in f64 over the finite entries (NaN and -inf have probability 0).
        let z: f64 = [1.0f64, 3.0, 3.0, -2.0].iter().map(|x| x.exp()).sum();
        let want = |x: f64| (x - z.ln()) as f32;
        assert_eq!(lp.token, 4);
        assert!((lp.logprob - want(-2.0)).abs() < 1e-6, "{lp:?}");
        // Most likely first; the tie between ids 1 and 3 goes to the lower id.
        let ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![1, 3, 0]);
        for (id, l) in &lp.top {
            assert!(
                (l - want(logits[*id as usize] as f64)).abs() < 1e-6,
                "{lp:?}"
            );
        }
        let total: f64 =
            lp.top.iter().map(|t| (t.1 as f64).exp()).sum::<f64>() + (lp.logprob as f64).exp();
        assert!((total - 1.0).abs() < 1e-5, "{total}");
        assert_eq!(logprobs(&logits, 2, 0).logprob, f32::NEG_INFINITY);
        assert!(logprobs(&logits, 2, 0).top.is_empty());
        // Top-n of more than the vocabulary: every entry, sorted.
        assert_eq!(logprobs(&[0.0, 1.0], 0, 5).top.len(), 2);
    }

    #[test]
    fn penalties_follow_openais_formula() {
        let counts: HashMap<u32, u32> = [(1, 3), (2, 1)].into_iter().collect();
        let mut l = vec![0.5f32, 0.5, 0.5, 0.5];
        Penalties {
            presence: 0.25,
            frequency: 0.5,
        }
        .apply(&mut l, &counts);
        // Token 1: 0.5 - 3 * 0.5 - 0.25; token 2: 0.5 - 0.5 - 0.25; unsampled ones unchanged.
        assert_eq!(l, vec![0.5, -1.25, -0.25, 0.5]);
        assert!(Penalties::default().is_off());
    }
}
