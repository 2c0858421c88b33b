//! The per-request generation step, driven by hand: one-hot logits pick each token under greedy
//! sampling, so every stop condition and every piece of emitted text can be checked exactly.

use std::path::PathBuf;
use std::sync::OnceLock;

use airlock_engine::generate::{GenerateParams, Generation, Step, StopReason};
use airlock_engine::gguf::GgufFile;
use airlock_engine::sampling::{Sampler, SamplerConfig};
use airlock_engine::tokenizer::{Tokenizer, VocabSpec};

/// The Llama 3 vocabulary of the committed tiny model, built once for all tests.
fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/llama3/tiny-llama3-q8_0.gguf");
        let f = GgufFile::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Tokenizer::from_spec(&VocabSpec::from_gguf(&f).unwrap()).unwrap()
    })
}

/// The id of the token whose bytes are exactly `piece`.
fn id(tok: &Tokenizer, piece: &[u8]) -> u32 {
    (0..tok.vocab_size() as u32)
        .find(|&i| tok.token_piece(i) == Some(piece) && !tok.is_eog(i))
        .unwrap_or_else(|| panic!("no token is {:?}", String::from_utf8_lossy(piece)))
}

/// Logits under which greedy sampling picks `id`.
fn one_hot(tok: &Tokenizer, id: u32) -> Vec<f32> {
    let mut v = vec![0.0; tok.vocab_size()];
    v[id as usize] = 1.0;
    v
}

fn params(max_tokens: Option<usize>, stop: &[&str]) -> GenerateParams {
    GenerateParams {
        max_tokens,
        stop: stop.iter().map(|s| s.to_string()).collect(),
        ..GenerateParams::default()
    }
}

fn start(p: &GenerateParams) -> Generation {
    Generation::new(
        Sampler::new(SamplerConfig::greedy()).unwrap(),
        p,
        &[1, 2, 3],
    )
}

/// Steps once with room in the cache, the logits picking `piece`.
fn step(g: &mut Generation, tok: &Tokenizer, piece: &[u8]) -> Step {
    g.step(tok, &one_hot(tok, id(tok, piece)), true).unwrap()
}

fn token(tok: &Tokenizer, piece: &[u8], text: &str) -> Step {
    Step::Token {
        token: id(tok, piece),
        text: text.into(),
    }
}

fn done(reason: StopReason, text: &str) -> Step {
    Step::Done {
        reason,
        text: text.into(),
    }
}

#[test]
fn a_stop_string_split_across_tokens_is_held_back_and_never_emitted() {
    let tok = tokenizer();
    let mut g = start(&params(None, &["STOP"]));
    assert_eq!(step(&mut g, tok, b"Hello"), token(tok, b"Hello", "Hello"));
    // "ST" may begin "STOP": nothing is emitted yet.
    assert_eq!(step(&mut g, tok, b" ST"), token(tok, b" ST", " "));
    assert_eq!(step(&mut g, tok, b"OP"), done(StopReason::StopString, ""));
    assert_eq!(g.text(), "Hello ");
    assert_eq!(g.stop_reason(), Some(StopReason::StopString));
    assert_eq!(
        g.generated(),
        [id(tok, b"Hello"), id(tok, b" ST"), id(tok, b"OP")]
    );
}

#[test]
fn held_back_text_is_emitted_once_it_cannot_be_a_stop_string() {
    let tok = tokenizer();
    let mut g = start(&params(None, &["STOP"]));
    assert_eq!(step(&mut g, tok, b"ST"), token(tok, b"ST", ""));
    assert_eq!(step(&mut g, tok, b"AR"), token(tok, b"AR", "STAR"));
    assert_eq!(g.text(), "STAR");
}

#[test]
fn text_before_a_stop_string_in_the_same_token_is_emitted() {
    let tok = tokenizer();
    let mut g = start(&params(None, &["lo"]));
    assert_eq!(
        step(&mut g, tok, b"Hello"),
        done(StopReason::StopString, "Hel")
    );
    assert_eq!(g.text(), "Hel");
}

#[test]
fn max_tokens_zero_ends_before_sampling() {
    let tok = tokenizer();
    let mut g = start(&params(Some(0), &[]));
    // No logits at all: sampling them would be an error, so the limit is checked first.
    assert_eq!(
        g.step(tok, &[], true).unwrap(),
        done(StopReason::MaxTokens, "")
    );
    assert!(g.generated().is_empty());
}

#[test]
fn max_tokens_one_samples_one_token_then_ends() {
    let tok = tokenizer();
    let mut g = start(&params(Some(1), &[]));
    assert_eq!(step(&mut g, tok, b"Hello"), token(tok, b"Hello", "Hello"));
    assert_eq!(step(&mut g, tok, b"Hello"), done(StopReason::MaxTokens, ""));
    assert_eq!(g.generated(), [id(tok, b"Hello")]);
    assert_eq!(g.text(), "Hello");
}

#[test]
fn end_of_generation_ends_without_its_text_and_flushes_what_was_held() {
    let tok = tokenizer();
    let eog = tok.eos().expect("the vocabulary has an EOS");
    assert!(tok.is_eog(eog));
    let mut g = start(&params(None, &["STOP"]));
    assert_eq!(step(&mut g, tok, b"ST"), token(tok, b"ST", ""));
    // "ST" was held as a possible stop string; the end shows it was not one.
    assert_eq!(
        g.step(tok, &one_hot(tok, eog), true).unwrap(),
        done(StopReason::EndOfGeneration, "ST")
    );
    // The end-of-generation token is not part of the output.
    assert_eq!(g.generated(), [id(tok, b"ST")]);
    assert_eq!(g.text(), "ST");
}

#[test]
fn ignore_eos_keeps_going_and_prints_nothing_for_the_control_token() {
    let tok = tokenizer();
    let eog = tok.eos().unwrap();
    let p = GenerateParams {
        ignore_eos: true,
        ..params(None, &[])
    };
    let mut g = start(&p);
    assert_eq!(
        g.step(tok, &one_hot(tok, eog), true).unwrap(),
        Step::Token {
            token: eog,
            text: String::new()
        }
    );
    assert_eq!(g.generated(), [eog]);
}

#[test]
fn no_room_ends_with_context_full_after_the_tokens_text() {
    let tok = tokenizer();
    let mut g = start(&params(None, &[]));
    assert_eq!(step(&mut g, tok, b"Hello"), token(tok, b"Hello", "Hello"));
    assert_eq!(
        g.step(tok, &one_hot(tok, id(tok, b" world")), false)
            .unwrap(),
        done(StopReason::ContextFull, " world")
    );
    // The token was sampled (and is reported) though the cache could not take it.
    assert_eq!(g.generated(), [id(tok, b"Hello"), id(tok, b" world")]);
    assert_eq!(g.text(), "Hello world");
}

#[test]
fn context_full_flushes_a_held_stop_prefix() {
    let tok = tokenizer();
    let mut g = start(&params(None, &["STOP"]));
    assert_eq!(
        g.step(tok, &one_hot(tok, id(tok, b"ST")), false).unwrap(),
        done(StopReason::ContextFull, "ST")
    );
}

#[test]
fn a_character_split_across_byte_tokens_is_emitted_whole() {
    let tok = tokenizer();
    // "é" is C3 A9: two byte tokens.
    let mut g = start(&params(Some(3), &[]));
    assert_eq!(step(&mut g, tok, &[0xC3]), token(tok, &[0xC3], ""));
    assert_eq!(step(&mut g, tok, &[0xA9]), token(tok, &[0xA9], "é"));
    // An incomplete character left at the end is flushed as U+FFFD.
    assert_eq!(step(&mut g, tok, &[0xC3]), token(tok, &[0xC3], ""));
    assert_eq!(
        step(&mut g, tok, b"Hello"),
        done(StopReason::MaxTokens, "\u{FFFD}")
    );
    assert_eq!(g.text(), "é\u{FFFD}");
}

#[test]
fn after_the_end_every_step_repeats_it_without_sampling() {
    let tok = tokenizer();
    let mut g = start(&params(None, &[]));
    assert_eq!(step(&mut g, tok, b"Hello"), token(tok, b"Hello", "Hello"));
    let eog = tok.eos().unwrap();
    assert_eq!(
        g.step(tok, &one_hot(tok, eog), true).unwrap(),
        done(StopReason::EndOfGeneration, "")
    );
    assert_eq!(
        g.step(tok, &[], true).unwrap(),
        done(StopReason::EndOfGeneration, "")
    );
    assert_eq!(g.text(), "Hello");
}

#[test]
fn a_borrowed_sampler_keeps_its_state_after_the_generation() {
    let tok = tokenizer();
    // With a repeat penalty over the prompt, the sampler must have accepted the prompt: the
    // prompt's token loses to a slightly lower logit.
    let cfg = SamplerConfig {
        repeat_penalty: 2.0,
        ..SamplerConfig::greedy()
    };
    let mut sampler = Sampler::new(cfg).unwrap();
    let (a, b) = (id(tok, b"Hello"), id(tok, b" world"));
    let mut logits = vec![0.0; tok.vocab_size()];
    logits[a as usize] = 1.0;
    logits[b as usize] = 0.9;
    let mut g = Generation::new(&mut sampler, &params(None, &[]), &[a]);
    assert_eq!(
        g.step(tok, &logits, true).unwrap(),
        token(tok, b" world", " world")
    );
    drop(g);
    // The borrowed sampler accepted the prompt and the sampled token: both are penalised now,
    // so a third token wins (an unpenalised sampler would pick the first of the tied two).
    let c = id(tok, b"!");
    logits[b as usize] = 1.0;
    logits[c as usize] = 0.6;
    assert_eq!(sampler.sample(&logits).unwrap(), c);
}

#[test]
fn sampling_errors_are_returned() {
    let tok = tokenizer();
    let mut g = start(&params(None, &[]));
    assert!(g.step(tok, &[], true).is_err());
    assert!(g.step(tok, &[f32::NAN; 8], true).is_err());
    assert_eq!(g.stop_reason(), None);
}
