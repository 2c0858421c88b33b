//! Sampler semantics: greedy, truncations, penalty, reproducibility, distribution.

use airlock_engine::sampling::{
    apply_min_p, apply_top_p, softmax, Candidate, Sampler, SamplerConfig, SamplingError,
};

fn cfg(temperature: f32) -> SamplerConfig {
    SamplerConfig {
        temperature,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        repeat_penalty: 1.0,
        repeat_last_n: 64,
        seed: Some(1234),
    }
}

fn logits_from_probs(p: &[f64]) -> Vec<f32> {
    p.iter().map(|x| x.ln() as f32).collect()
}

#[test]
fn defaults_are_llama_cpp_ones() {
    let d = SamplerConfig::default();
    assert_eq!(
        (
            d.temperature,
            d.top_k,
            d.top_p,
            d.min_p,
            d.repeat_penalty,
            d.repeat_last_n
        ),
        (0.8, 40, 0.95, 0.05, 1.0, 64)
    );
    assert_eq!(d.seed, None);
}

#[test]
fn greedy_is_argmax() {
    let logits = [0.1, 3.0, -2.0, 2.9, 3.0, f32::NAN];
    let mut s = Sampler::new(cfg(0.0)).unwrap();
    // Ties go to the lowest id; NaN never wins.
    assert_eq!(s.sample(&logits).unwrap(), 1);
    let mut s = Sampler::new(SamplerConfig::greedy()).unwrap();
    for _ in 0..10 {
        assert_eq!(s.sample(&[-5.0, -1.0, -3.0]).unwrap(), 1);
    }
}

#[test]
fn top_k_one_is_greedy_at_any_temperature() {
    let logits: Vec<f32> = (0..1000)
        .map(|i| ((i * 7919) % 1000) as f32 * 0.01)
        .collect();
    let argmax = logits
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0 as u32;
    for t in [0.1, 1.0, 5.0, 100.0] {
        let mut s = Sampler::new(SamplerConfig { top_k: 1, ..cfg(t) }).unwrap();
        for _ in 0..50 {
            assert_eq!(s.sample(&logits).unwrap(), argmax, "temp {t}");
        }
    }
}

#[test]
fn seeded_runs_reproduce() {
    let logits: Vec<f32> = (0..500).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
    let run = |seed| {
        let mut s = Sampler::new(SamplerConfig {
            seed: Some(seed),
            ..SamplerConfig::default()
        })
        .unwrap();
        (0..200)
            .map(|_| s.sample(&logits).unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(run(7), run(7));
    assert_ne!(run(7), run(8));
    let s = Sampler::new(SamplerConfig::default()).unwrap();
    // A random seed is drawn and reported.
    let _ = s.seed();
}

#[test]
fn distribution_matches_probabilities() {
    // 20,000 draws at temperature 1 with no truncation. For each token the count is
    // Binomial(n, p); we accept |count - n p| <= 5 sigma (sigma = sqrt(n p (1-p))),
    // which a correct sampler violates with probability < 1e-5 per token.
    let probs = [0.5, 0.25, 0.125, 0.0625, 0.03125, 0.03125];
    let logits = logits_from_probs(&probs);
    let mut s = Sampler::new(cfg(1.0)).unwrap();
    let n = 20_000usize;
    let mut counts = [0usize; 6];
    for _ in 0..n {
        counts[s.sample(&logits).unwrap() as usize] += 1;
    }
    for (i, &p) in probs.iter().enumerate() {
        let mean = n as f64 * p;
        let sigma = (n as f64 * p * (1.0 - p)).sqrt();
        let dev = (counts[i] as f64 - mean).abs();
        assert!(
            dev <= 5.0 * sigma,
            "token {i}: {} draws, expected {mean} +- {}",
            counts[i],
            5.0 * sigma
        );
    }
}

#[test]
fn temperature_sharpens_and_flattens() {
    let probs = [0.6, 0.3, 0.1];
    let logits = logits_from_probs(&probs);
    let share_of_top = |t: f32| {
        let mut s = Sampler::new(cfg(t)).unwrap();
        (0..5000)
            .filter(|_| s.sample(&logits).unwrap() == 0)
            .count()
    };
    assert!(share_of_top(0.25) > 4500);
    assert!(share_of_top(10.0) < 2000);
}

fn sorted(probs: &[f64]) -> Vec<Candidate> {
    let mut c: Vec<Candidate> = logits_from_probs(probs)
        .into_iter()
        .enumerate()
        .map(|(i, logit)| Candidate {
            id: i as u32,
            logit,
            p: 0.0,
        })
        .collect();
    c.sort_by(|a, b| b.logit.total_cmp(&a.logit));
    c
}

fn ids(c: &[Candidate]) -> Vec<u32> {
    c.iter().map(|x| x.id).collect()
}

#[test]
fn top_p_keeps_smallest_prefix_reaching_p() {
    let probs = [0.4, 0.3, 0.2, 0.1];
    let mut c = sorted(&probs);
    apply_top_p(&mut c, 0.65);
    assert_eq!(ids(&c), vec![0, 1]); // 0.4 < 0.65 <= 0.7
    let mut c = sorted(&probs);
    apply_top_p(&mut c, 0.75);
    assert_eq!(ids(&c), vec![0, 1, 2]); // 0.7 < 0.75 <= 0.9
    let mut c = sorted(&probs);
    apply_top_p(&mut c, 0.05);
    assert_eq!(ids(&c), vec![0]); // at least one
    let mut c = sorted(&probs);
    apply_top_p(&mut c, 1.0);
    assert_eq!(c.len(), 4);
}

#[test]
fn min_p_removes_exactly_the_unlikely() {
    let probs = [0.5, 0.2, 0.1, 0.06, 0.04, 0.1];
    // p >= 0.25 * 0.5 = 0.125 keeps ids 0 and 1 only.
    let mut c = sorted(&probs);
    apply_min_p(&mut c, 0.25);
    assert_eq!(ids(&c), vec![0, 1]);
    // p >= 0.1 * 0.5 = 0.05 keeps all but id 4 (0.04).
    let mut c = sorted(&probs);
    apply_min_p(&mut c, 0.1);
    let mut kept = ids(&c);
    kept.sort();
    assert_eq!(kept, vec![0, 1, 2, 3, 5]);
    // Through the sampler: min_p 0.25 never draws anything but 0 or 1.
    let logits = logits_from_probs(&probs);
    let mut s = Sampler::new(SamplerConfig {
        min_p: 0.25,
        ..cfg(1.0)
    })
    .unwrap();
    for _ in 0..2000 {
        assert!(s.sample(&logits).unwrap() <= 1);
    }
    let mut left = ids(s.last_candidates());
    left.sort();
    assert_eq!(left, vec![0, 1]);
    let p: f32 = s.last_candidates().iter().map(|c| c.p).sum();
    assert!((p - 1.0).abs() < 1e-6);
}

#[test]
fn softmax_normalises() {
    let mut c = sorted(&[0.7, 0.2, 0.1]);
    softmax(&mut c);
    let got: Vec<f32> = c.iter().map(|x| x.p).collect();
    for (g, w) in got.iter().zip([0.7, 0.2, 0.1]) {
        assert!((g - w).abs() < 1e-6);
    }
}

#[test]
fn repeat_penalty_divides_positive_and_multiplies_negative() {
    // Greedy shows the penalised logits' order.
    let logits = [2.0, 1.5, -1.0, -1.2];
    let mut s = Sampler::new(SamplerConfig {
        repeat_penalty: 1.5,
        ..cfg(0.0)
    })
    .unwrap();
    assert_eq!(s.sample(&logits).unwrap(), 0);
    s.accept(0); // 2.0 / 1.5 = 1.33 < 1.5
    assert_eq!(s.sample(&logits).unwrap(), 1);
    s.accept(1); // 1.5 / 1.5 = 1.0 < 1.33
    s.accept(1); // counted once (distinct tokens)
    assert_eq!(s.sample(&logits).unwrap(), 0);
    assert_eq!(s.last_candidates()[0].logit, 2.0 / 1.5);

    // Negative logits are multiplied: -1.0 * 1.5 = -1.5 < -1.2.
    let neg = [-1.0, -1.2];
    let mut s = Sampler::new(SamplerConfig {
        repeat_penalty: 1.5,
        ..cfg(0.0)
    })
    .unwrap();
    s.accept(0);
    assert_eq!(s.sample(&neg).unwrap(), 1);

    // Only the last n tokens count.
    let mut s = Sampler::new(SamplerConfig {
        repeat_penalty: 1.5,
        repeat_last_n: 2,
        ..cfg(0.0)
    })
    .unwrap();
    s.accept(0);
    s.accept(3);
    s.accept(3); // 0 has left the window
    assert_eq!(s.sample(&logits).unwrap(), 0);
    s.reset();
    s.accept(0);
    assert_eq!(s.sample(&logits).unwrap(), 1);
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    for bad in [
        SamplerConfig {
            top_p: 0.0,
            ..cfg(1.0)
        },
        SamplerConfig {
            top_p: f32::NAN,
            ..cfg(1.0)
        },
        SamplerConfig {
            min_p: 1.5,
            ..cfg(1.0)
        },
        SamplerConfig {
            repeat_penalty: 0.0,
            ..cfg(1.0)
        },
        cfg(f32::INFINITY),
    ] {
        assert!(Sampler::new(bad).is_err(), "{bad:?}");
    }
    let mut s = Sampler::new(cfg(1.0)).unwrap();
    assert_eq!(s.sample(&[]), Err(SamplingError::Empty));
    assert_eq!(
        s.sample(&[f32::NAN, f32::NEG_INFINITY]),
        Err(SamplingError::NoFiniteLogits)
    );
    assert_eq!(s.sample(&[f32::INFINITY, 0.0]).unwrap(), 0);
    assert!(matches!(
        s.sample(&[0.0; 3]),
        Err(SamplingError::VocabChanged { .. })
    ));
    let mut g = Sampler::new(cfg(0.0)).unwrap();
    assert_eq!(g.sample(&[f32::NAN]), Err(SamplingError::NoFiniteLogits));
}

#[test]
fn top_k_keeps_the_k_first_of_the_full_order_ties_by_id() {
    // The sampler selects the k largest before sorting them: they must be the k first of the
    // whole vocabulary's order (descending logit, ties by ascending id), in that order, whatever
    // k, less the tokens at -inf (and NaN), which are never kept. Logits with many ties, NaNs
    // and infinities, over 1000 ids.
    let mut x = 0x2545_F491u32;
    let logits: Vec<f32> = (0..1000)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            match i % 97 {
                0 => f32::NAN,
                1 => f32::NEG_INFINITY,
                2 => f32::INFINITY,
                _ => (x % 23) as f32 - 11.0,
            }
        })
        .collect();
    let mut want: Vec<(f32, u32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (if l.is_nan() { f32::NEG_INFINITY } else { l }, i as u32))
        .collect();
    want.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    for k in [1, 2, 5, 40, 200, 999] {
        let mut s = Sampler::new(SamplerConfig {
            top_k: k,
            ..cfg(1.0)
        })
        .unwrap();
        s.sample(&logits).unwrap();
        let got: Vec<u32> = ids(s.last_candidates());
        let want: Vec<u32> = want[..k]
            .iter()
            .filter(|w| w.0 > f32::NEG_INFINITY)
            .map(|w| w.1)
            .collect();
        assert_eq!(got, want, "top-k {k}");
    }
}
