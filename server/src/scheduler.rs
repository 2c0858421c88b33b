//! The scheduler: one thread owns the model and `--parallel` KV caches (slots) and runs one
//! batched forward pass per step, with one token for every generating slot plus up to `-b`
//! prompt tokens of newly admitted requests.
//!
//! Requests arrive over a bounded channel (the queue); each carries an unbounded tokio sender
//! for its events. A request whose receiver is gone (the client left) is dropped: when it is
//! still queued it never runs, and when it holds a slot the slot is freed before the next
//! step's batch is built.

use std::ops::Range;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use airlock_engine::generate::{Generation, Step, StopReason};
use airlock_engine::llama::{forward_batch, BatchSeq, KvCache, Logits, Workspace};
use airlock_engine::load::LoadedModel;
use tokio::sync::mpsc::UnboundedSender;

/// One request as the scheduler runs it: tokenized, validated, with its own sampler.
pub struct Job {
    /// Request id, for the log line.
    pub id: String,
    pub prompt: Vec<u32>,
    /// Its sampler and stop state, built by the handler (which validated the parameters).
    pub generation: Generation,
    pub events: UnboundedSender<Event>,
}

/// What the scheduler tells a request's handler.
#[derive(Debug)]
pub enum Event {
    /// Text ready to show (may be empty when the step held text back).
    Text(String),
    /// Generation ended; `text` is the last piece.
    Done {
        text: String,
        reason: StopReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    /// The engine failed on this request (not the client's mistake).
    Error(String),
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
}

struct Slot {
    cache: KvCache,
    active: Option<Active>,
}

/// Runs until the queue's senders are all gone and no slot is busy.
pub fn run(loaded: Arc<LoadedModel>, n_slots: usize, batch: usize, queue: Receiver<Job>) {
    let model = &loaded.model;
    let mut slots: Vec<Slot> = (0..n_slots)
        .map(|_| Slot {
            cache: KvCache::new(model, loaded.n_ctx, loaded.kv_type),
            active: None,
        })
        .collect();
    let mut ws = Workspace::default();
    let mut admitted = 0u64;
    let mut queue_open = true;
    let batch = batch.max(1);

    loop {
        // Admit queued requests into free slots; block only when nothing is running.
        while queue_open {
            let Some(free) = slots.iter().position(|s| s.active.is_none()) else {
                break;
            };
            let idle = slots.iter().all(|s| s.active.is_none());
            let job = if idle {
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
            if job.events.is_closed() {
                eprintln!("{}: client left before it ran", job.id);
                continue;
            }
            eprintln!("{}: started in slot {free}", job.id);
            let slot = &mut slots[free];
            slot.cache.reset();
            admitted += 1;
            slot.active = Some(Active {
                job,
                fed: 0,
                next: None,
                admitted,
                started: Instant::now(),
            });
        }

        // Free the slots whose clients left.
        for slot in &mut slots {
            if slot
                .active
                .as_ref()
                .is_some_and(|a| a.job.events.is_closed())
            {
                let a = slot.active.take().expect("checked");
                eprintln!(
                    "{}: client left after {} generated tokens; slot freed",
                    a.job.id,
                    a.job.generation.generated().len()
                );
            }
        }
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
                // fail this step's requests and go on with the others.
                for (i, _, _) in &plan {
                    if let Some(a) = slots[*i].active.take() {
                        eprintln!("{}: engine error: {e}", a.job.id);
                        let _ = a.job.events.send(Event::Error(e.to_string()));
                    }
                }
                continue;
            }
        };

        // Hand each row to its request's generation.
        let vocab = model.config.vocab_size;
        let mut row = 0;
        for (i, range, wanted) in plan {
            let slot = &mut slots[i];
            let room = slot.cache.pos() < slot.cache.n_ctx();
            let a = slot.active.as_mut().expect("planned");
            if a.next.is_none() {
                a.fed = range.end;
            }
            if wanted == Logits::None {
                continue;
            }
            let logits_row = &logits[row * vocab..(row + 1) * vocab];
            row += 1;
            match a.job.generation.step(&loaded.tokenizer, logits_row, room) {
                Ok(Step::Token { token, text }) => {
                    a.next = Some(token);
                    if !text.is_empty() {
                        let _ = a.job.events.send(Event::Text(text));
                    }
                }
                Ok(Step::Done { reason, text }) => {
                    let a = slot.active.take().expect("planned");
                    let completion_tokens = a.job.generation.generated().len();
                    eprintln!(
                        "{}: done ({reason:?}): {} prompt + {completion_tokens} generated tokens in {:.2} s",
                        a.job.id,
                        a.job.prompt.len(),
                        a.started.elapsed().as_secs_f64()
                    );
                    let _ = a.job.events.send(Event::Done {
                        text,
                        reason,
                        prompt_tokens: a.job.prompt.len(),
                        completion_tokens,
                    });
                }
                Err(e) => {
                    let a = slot.active.take().expect("planned");
                    eprintln!("{}: generation error: {e}", a.job.id);
                    let _ = a.job.events.send(Event::Error(e.to_string()));
                }
            }
        }
    }
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
}
