//! Chat templates: sandboxed Jinja rendering and injection-safe tokenization.
//!
//! A template from a model file is untrusted input. It is rendered with
//! minijinja with no loader (no `include`/`import` of files), a fuel budget
//! (instructions per render), a recursion limit, and a cap on the output size;
//! and, where the binary installed one ([`crate::render`]), in a child process
//! whose address space is limited, so a template that builds huge values fails
//! with [`ChatError::MemoryExceeded`] instead of exhausting the machine. The
//! built-in templates are ours and render in-process.
//! Available to templates: `messages` (list of `{role, content}`),
//! `add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception(msg)`,
//! minijinja's built-in and `minijinja-contrib` filters, and Python string
//! methods (`.strip()`, `.startswith()`, ...) through `pycompat`.
//!
//! **Injection safety.** [`ChatTemplate::render_segments`] splits the output into
//! the template's own framing and the message contents: the template is rendered
//! once with each content replaced by a unique sentinel, the result is cut at the
//! sentinels, and the contents are put back. The reassembled text must equal the
//! template's real output (checked with the contents as given, then with
//! every content trimmed, which is what the Llama 3 template does); otherwise
//! rendering fails with [`ChatError::ContentTransformed`]. [`tokenize_chat`] then
//! parses special tokens only in framing, so a user who types `<|im_end|>` or
//! `<|eot_id|>` gets plain-text tokens, never the control id.
//!
//! **Incremental chat.** [`ChatTemplate::render_delta`] renders only what a new
//! turn adds, for a REPL that keeps earlier turns in the KV cache. It requires the
//! rendering of the earlier messages (without a generation prompt) to be a prefix
//! of the new rendering, and fails with [`ChatError::NotPrefixStable`] otherwise.

use std::io::Write;

use minijinja::{context, Environment, Error as JinjaError, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::render::{render_sandboxed, RequestRef};

use crate::tokenizer::{Tokenizer, TokenizerError};

/// Llama 3 / 3.1 chat format (no tool calls).
pub const LLAMA3_TEMPLATE: &str = "{{- bos_token }}\
{%- for message in messages %}\
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + (message['content'] | trim) + '<|eot_id|>' }}\
{%- endfor %}\
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}";

/// ChatML (`<|im_start|>role\ncontent<|im_end|>\n`).
pub const CHATML_TEMPLATE: &str = "{%- for message in messages %}\
{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}\
{%- endfor %}\
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

/// Names accepted by [`ChatTemplate::builtin`].
pub const BUILTIN_TEMPLATES: [&str; 2] = ["llama3", "chatml"];

const SENTINEL_OPEN: char = '\u{E000}';
const SENTINEL_CLOSE: char = '\u{E001}';
const SENTINEL_TAG: &str = "airlock-content-";

/// Resource limits for rendering an untrusted template.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatLimits {
    /// Largest template source accepted.
    pub max_template_bytes: usize,
    /// Largest rendered output.
    pub max_output_bytes: usize,
    /// minijinja fuel (about one unit per instruction) per render.
    pub fuel: u64,
    /// minijinja recursion limit (macros, nested loops).
    pub recursion_limit: usize,
}

impl Default for ChatLimits {
    fn default() -> Self {
        Self {
            max_template_bytes: 1 << 20,
            max_output_bytes: 16 << 20,
            fuel: 10_000_000,
            recursion_limit: 100,
        }
    }
}

/// Errors from chat rendering.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("chat template is {size} bytes, more than the allowed {max}")]
    TemplateTooLarge { size: usize, max: usize },
    #[error("chat template does not compile: {0}")]
    Syntax(String),
    #[error("chat template failed to render: {0}")]
    Render(String),
    #[error("chat template raised an exception: {0}")]
    Raised(String),
    #[error("chat template output exceeds the {0}-byte limit")]
    OutputTooLarge(usize),
    /// The render process died: the template built values beyond the memory limit.
    #[error(
        "chat template {template:?} exceeded {limit_mib} MiB of memory while rendering (its \
         render process was stopped: {how})"
    )]
    MemoryExceeded {
        template: String,
        limit_mib: u64,
        how: String,
    },
    /// The render process ran out of CPU time.
    #[error("chat template {template:?} took more than {seconds} s of CPU time to render")]
    TimeExceeded { template: String, seconds: u64 },
    /// The render process could not be started or run (a fault of this machine, not of the
    /// template or the messages).
    #[error("chat template render process: {0}")]
    Worker(String),
    #[error("unknown built-in chat template {0:?} (known: llama3, chatml)")]
    UnknownBuiltin(String),
    #[error(
        "the chat template transforms message contents in a way that cannot be separated from \
         its framing; use a built-in template: llama3 or chatml"
    )]
    ContentTransformed,
    #[error(
        "the chat template is not prefix-stable: rendering the earlier messages is not a prefix \
         of rendering the whole conversation"
    )]
    NotPrefixStable,
    #[error("n_prev {n_prev} is larger than the {len} messages given")]
    BadPrefixLength { n_prev: usize, len: usize },
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

type Result<T> = std::result::Result<T, ChatError>;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// A piece of rendered chat: the template's framing (special tokens parsed) or
/// message content (special tokens never parsed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatSegment {
    Framing(String),
    Content(String),
}

impl ChatSegment {
    pub fn text(&self) -> &str {
        match self {
            Self::Framing(s) | Self::Content(s) => s,
        }
    }
    fn is_framing(&self) -> bool {
        matches!(self, Self::Framing(_))
    }
}

/// The text of a segment list.
pub fn segments_to_string(segments: &[ChatSegment]) -> String {
    segments.iter().map(ChatSegment::text).collect()
}

/// A compiled-checked chat template plus the values it is rendered with.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    name: String,
    bos_token: String,
    eos_token: String,
    limits: ChatLimits,
    /// A built-in template (ours): rendered in-process even where a sandbox is installed.
    trusted: bool,
}

impl ChatTemplate {
    /// Checks and keeps a template. `name` is for messages (e.g. "gguf", "llama3").
    pub fn new(
        name: &str,
        source: &str,
        bos_token: &str,
        eos_token: &str,
        limits: ChatLimits,
    ) -> Result<Self> {
        if source.len() > limits.max_template_bytes {
            return Err(ChatError::TemplateTooLarge {
                size: source.len(),
                max: limits.max_template_bytes,
            });
        }
        let t = Self {
            source: source.to_string(),
            name: name.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            limits,
            trusted: false,
        };
        // Parsing is bounded by the source's size, so it is checked here, in-process.
        let env = environment(&t.limits);
        env.template_from_str(&t.source)
            .map_err(|e| ChatError::Syntax(describe(&e)))?;
        Ok(t)
    }

    /// A built-in template by name: `llama3` or `chatml`.
    pub fn builtin(name: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let source = match name {
            "llama3" => LLAMA3_TEMPLATE,
            "chatml" => CHATML_TEMPLATE,
            _ => return Err(ChatError::UnknownBuiltin(name.to_string())),
        };
        let mut t = Self::new(name, source, bos_token, eos_token, ChatLimits::default())?;
        t.trusted = true;
        Ok(t)
    }

    /// The template for a model: `override_name` (a built-in) if given, else the
    /// file's `tokenizer.chat_template`, else `llama3` for Llama 3 vocabularies
    /// and `chatml` for the rest. `bos_token`/`eos_token` are the vocabulary's.
    pub fn for_tokenizer(tok: &Tokenizer, override_name: Option<&str>) -> Result<Self> {
        let text = |id: Option<u32>| {
            id.and_then(|i| tok.token_text(i))
                .unwrap_or_default()
                .to_string()
        };
        let (bos, eos) = (text(tok.bos()), text(tok.eos()));
        match (override_name, tok.chat_template()) {
            (Some(name), _) => Self::builtin(name, &bos, &eos),
            (None, Some(src)) => Self::new("gguf", src, &bos, &eos, ChatLimits::default()),
            (None, None) if tok.is_llama3() => Self::builtin("llama3", &bos, &eos),
            (None, None) => Self::builtin("chatml", &bos, &eos),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders the conversation to a string (contents included as given).
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        match self.render_outcome(messages, add_generation_prompt)? {
            Rendered::Text(t) => Ok(t),
            Rendered::OutOfFuel(m) => Err(ChatError::Render(m)),
        }
    }

    fn render_raw(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render(messages, add_generation_prompt)
    }

    /// One rendering, in the sandbox's worker unless the template is ours or no sandbox is
    /// installed.
    fn render_outcome(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Rendered> {
        if !self.trusted {
            let req = RequestRef {
                source: &self.source,
                bos_token: &self.bos_token,
                eos_token: &self.eos_token,
                limits: self.limits,
                messages,
                add_generation_prompt,
            };
            if let Some(r) = render_sandboxed(&req, &self.name) {
                return r;
            }
        }
        render_in_process(
            &self.source,
            &self.bos_token,
            &self.eos_token,
            &self.limits,
            messages,
            add_generation_prompt,
        )
    }

    /// Renders and splits into framing and content segments (see the module doc).
    /// Adjacent framing is merged; empty segments are dropped.
    pub fn render_segments(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<ChatSegment>> {
        let real = self.render_raw(messages, add_generation_prompt)?;
        let masked: Vec<ChatMessage> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| ChatMessage {
                role: m.role.clone(),
                content: format!("{SENTINEL_OPEN}{SENTINEL_TAG}{i}{SENTINEL_CLOSE}"),
            })
            .collect();
        let skeleton = self.render_raw(&masked, add_generation_prompt)?;
        let pieces = parse_skeleton(&skeleton, messages.len())?;

        for trimmed in [false, true] {
            let mut segs: Vec<ChatSegment> = Vec::with_capacity(pieces.len());
            for p in &pieces {
                match p {
                    Piece::Framing(s) => {
                        push_segment(&mut segs, ChatSegment::Framing(s.to_string()))
                    }
                    Piece::Slot(i) => {
                        let c = messages[*i].content.as_str();
                        let c = if trimmed { c.trim() } else { c };
                        push_segment(&mut segs, ChatSegment::Content(c.to_string()));
                    }
                }
            }
            if segments_to_string(&segs) == real {
                return Ok(segs);
            }
        }
        Err(ChatError::ContentTransformed)
    }

    /// The segments a new turn adds: renders `messages[..n_prev]` without a
    /// generation prompt and all `messages` with `add_generation_prompt`, checks
    /// the first is a prefix of the second and returns the rest.
    pub fn render_delta(
        &self,
        messages: &[ChatMessage],
        n_prev: usize,
        add_generation_prompt: bool,
    ) -> Result<Vec<ChatSegment>> {
        if n_prev > messages.len() {
            return Err(ChatError::BadPrefixLength {
                n_prev,
                len: messages.len(),
            });
        }
        let prev = if n_prev == 0 {
            String::new()
        } else {
            self.render_raw(&messages[..n_prev], false)?
        };
        self.render_after(messages, &prev, add_generation_prompt)
    }

    /// Renders `messages` and returns what follows `rendered_before`, the text a
    /// REPL already has in its KV cache (earlier prompts plus the replies as
    /// generated, end-of-turn token text included). Fails with
    /// [`ChatError::NotPrefixStable`] when the new rendering does not start with it.
    pub fn render_after(
        &self,
        messages: &[ChatMessage],
        rendered_before: &str,
        add_generation_prompt: bool,
    ) -> Result<Vec<ChatSegment>> {
        let full = self.render_segments(messages, add_generation_prompt)?;
        strip_text_prefix(full, rendered_before)
    }
}

const RAISED_PREFIX: &str = "raise_exception: ";

/// A rendering, or the message of a render that ran out of fuel (kept apart from other render
/// errors so [`check_template`] can tell a template that works too hard from one that fails).
#[derive(Debug)]
pub(crate) enum Rendered {
    Text(String),
    OutOfFuel(String),
}

fn environment(limits: &ChatLimits) -> Environment<'static> {
    let mut env = Environment::new();
    env.set_fuel(Some(limits.fuel));
    env.set_recursion_limit(limits.recursion_limit);
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<Value, JinjaError> {
            Err(JinjaError::new(
                ErrorKind::InvalidOperation,
                format!("{RAISED_PREFIX}{msg}"),
            ))
        },
    );
    env
}

/// Compiles and renders `source` in this process: fuel, recursion limit and output cap, no
/// memory bound (the render worker adds that around this very function).
pub(crate) fn render_in_process(
    source: &str,
    bos_token: &str,
    eos_token: &str,
    limits: &ChatLimits,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
) -> Result<Rendered> {
    if source.len() > limits.max_template_bytes {
        return Err(ChatError::TemplateTooLarge {
            size: source.len(),
            max: limits.max_template_bytes,
        });
    }
    let env = environment(limits);
    let tmpl = env
        .template_from_str(source)
        .map_err(|e| ChatError::Syntax(describe(&e)))?;
    let mut out = CappedWriter {
        buf: Vec::new(),
        max: limits.max_output_bytes,
        overflowed: false,
    };
    let ctx = context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token,
        eos_token => eos_token,
    };
    if let Err(e) = tmpl.render_captured_to(ctx, &mut out) {
        if out.overflowed {
            return Err(ChatError::OutputTooLarge(limits.max_output_bytes));
        }
        if e.kind() == ErrorKind::OutOfFuel {
            return Ok(Rendered::OutOfFuel(format!(
                "chat template failed to render: {} (more than {} instructions)",
                describe(&e),
                limits.fuel
            )));
        }
        return Err(match e.detail() {
            Some(d) if d.starts_with(RAISED_PREFIX) => {
                ChatError::Raised(d[RAISED_PREFIX.len()..].to_string())
            }
            _ => ChatError::Render(describe(&e)),
        });
    }
    String::from_utf8(out.buf)
        .map(Rendered::Text)
        .map_err(|_| ChatError::Render("output is not UTF-8".into()))
}

/// A short conversation every chat template should render.
fn sample_conversation() -> [ChatMessage; 4] {
    [
        ChatMessage::system("You are a helpful assistant."),
        ChatMessage::user("Hello!"),
        ChatMessage::assistant("Hi. How can I help?"),
        ChatMessage::user("What is phishing?"),
    ]
}

/// The checks a model file's chat template must pass to be written or called valid
/// (`convert`, `quantize`, `inspect`): within the size limit, compiles, and renders a short
/// sample conversation within the fuel, output and memory limits. A template that raises an
/// exception or fails otherwise on the sample is accepted: it may only refuse that
/// conversation, and `chat` reports it when it happens.
pub fn check_template(name: &str, source: &str, bos_token: &str, eos_token: &str) -> Result<()> {
    let t = ChatTemplate::new(name, source, bos_token, eos_token, ChatLimits::default())?;
    match t.render_outcome(&sample_conversation(), true) {
        Ok(Rendered::Text(_)) => Ok(()),
        Ok(Rendered::OutOfFuel(m)) => Err(ChatError::Render(format!(
            "{m}, on a four-message sample conversation"
        ))),
        Err(
            e @ (ChatError::MemoryExceeded { .. }
            | ChatError::TimeExceeded { .. }
            | ChatError::OutputTooLarge(_)),
        ) => Err(e),
        Err(_) => Ok(()),
    }
}

fn describe(e: &JinjaError) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

fn push_segment(segs: &mut Vec<ChatSegment>, seg: ChatSegment) {
    if seg.text().is_empty() {
        return;
    }
    if let (Some(ChatSegment::Framing(last)), ChatSegment::Framing(s)) = (segs.last_mut(), &seg) {
        last.push_str(s);
        return;
    }
    segs.push(seg);
}

enum Piece<'a> {
    Framing(&'a str),
    Slot(usize),
}

/// Cuts the sentinel rendering into framing text and content slots.
fn parse_skeleton(s: &str, n_messages: usize) -> Result<Vec<Piece<'_>>> {
    let mut pieces = Vec::new();
    let mut rest = s;
    while let Some(open) = rest.find(SENTINEL_OPEN) {
        pieces.push(Piece::Framing(&rest[..open]));
        let after = &rest[open + SENTINEL_OPEN.len_utf8()..];
        let body = after
            .strip_prefix(SENTINEL_TAG)
            .ok_or(ChatError::ContentTransformed)?;
        let close = body
            .find(SENTINEL_CLOSE)
            .ok_or(ChatError::ContentTransformed)?;
        let index: usize = body[..close]
            .parse()
            .map_err(|_| ChatError::ContentTransformed)?;
        if index >= n_messages {
            return Err(ChatError::ContentTransformed);
        }
        pieces.push(Piece::Slot(index));
        rest = &body[close + SENTINEL_CLOSE.len_utf8()..];
    }
    if rest.contains(SENTINEL_CLOSE) {
        return Err(ChatError::ContentTransformed);
    }
    pieces.push(Piece::Framing(rest));
    Ok(pieces)
}

fn strip_text_prefix(full: Vec<ChatSegment>, prefix: &str) -> Result<Vec<ChatSegment>> {
    let mut rest = prefix;
    let mut out = Vec::new();
    for seg in full {
        if rest.is_empty() {
            out.push(seg);
            continue;
        }
        let text = seg.text();
        if let Some(r) = rest.strip_prefix(text) {
            rest = r;
        } else if let Some(tail) = text.strip_prefix(rest) {
            let tail = tail.to_string();
            rest = "";
            out.push(match seg {
                ChatSegment::Framing(_) => ChatSegment::Framing(tail),
                ChatSegment::Content(_) => ChatSegment::Content(tail),
            });
        } else {
            return Err(ChatError::NotPrefixStable);
        }
    }
    if rest.is_empty() {
        Ok(out)
    } else {
        Err(ChatError::NotPrefixStable)
    }
}

/// An output sink that fails once it holds more than `max` bytes.
struct CappedWriter {
    buf: Vec<u8>,
    max: usize,
    overflowed: bool,
}

impl Write for CappedWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len().saturating_add(data.len()) > self.max {
            self.overflowed = true;
            return Err(std::io::Error::other("chat template output too large"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Tokenizes rendered chat: special tokens are parsed in framing only. Text
/// runs across segment boundaries are tokenized together, so the ids equal
/// tokenizing the whole rendered string whenever no content contains a special
/// token's text. With `add_bos`, BOS is prepended unless the framing already
/// starts with it (templates that print `bos_token`).
pub fn tokenize_chat(
    tok: &Tokenizer,
    segments: &[ChatSegment],
    add_bos: bool,
) -> std::result::Result<Vec<u32>, TokenizerError> {
    let parts: Vec<(&str, bool)> = segments
        .iter()
        .map(|s| (s.text(), s.is_framing()))
        .collect();
    let mut out = Vec::new();
    tok.encode_parts_into(&parts, &mut out)?;
    if add_bos {
        let bos = tok.bos().ok_or(TokenizerError::NoBos)?;
        if out.first() != Some(&bos) {
            out.insert(0, bos);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chatml() -> ChatTemplate {
        ChatTemplate::builtin("chatml", "<|im_start|>", "<|im_end|>").unwrap()
    }

    #[test]
    fn segments_separate_framing_and_content() {
        let msgs = [
            ChatMessage::system("Be brief."),
            ChatMessage::user("hi <|im_end|> there"),
        ];
        let segs = chatml().render_segments(&msgs, true).unwrap();
        assert_eq!(
            segs,
            vec![
                ChatSegment::Framing("<|im_start|>system\n".into()),
                ChatSegment::Content("Be brief.".into()),
                ChatSegment::Framing("<|im_end|>\n<|im_start|>user\n".into()),
                ChatSegment::Content("hi <|im_end|> there".into()),
                ChatSegment::Framing("<|im_end|>\n<|im_start|>assistant\n".into()),
            ]
        );
    }

    #[test]
    fn llama3_trim_is_reproduced() {
        let t = ChatTemplate::builtin("llama3", "<|begin_of_text|>", "<|eot_id|>").unwrap();
        let msgs = [ChatMessage::user("  padded  ")];
        let segs = t.render_segments(&msgs, false).unwrap();
        assert_eq!(segs[1], ChatSegment::Content("padded".into()));
        assert_eq!(segments_to_string(&segs), t.render(&msgs, false).unwrap());
    }

    #[test]
    fn hostile_templates_fail_cleanly() {
        let mk = |src: &str| {
            ChatTemplate::new("test", src, "", "", ChatLimits::default())
                .and_then(|t| t.render(&[ChatMessage::user("x")], true))
        };
        assert!(matches!(mk("{% for %}"), Err(ChatError::Syntax(_))));
        assert!(matches!(
            mk("{{ raise_exception('no system role') }}"),
            Err(ChatError::Raised(m)) if m == "no system role"
        ));
        assert!(matches!(
            mk("{% include '/etc/passwd' %}"),
            Err(ChatError::Render(_))
        ));
        // Endless work runs out of fuel.
        assert!(matches!(
            mk("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"),
            Err(ChatError::Render(_))
        ));
        // Huge output hits the cap.
        assert!(matches!(
            mk("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}"),
            Err(ChatError::OutputTooLarge(_))
        ));
        // Deep recursion is bounded.
        assert!(mk("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}").is_err());
        // Python string methods work.
        assert_eq!(
            mk("{{ messages[0].content.upper().startswith('X') }}").unwrap(),
            "True"
        );
        let big = "x".repeat(2 << 20);
        assert!(matches!(
            ChatTemplate::new("big", &big, "", "", ChatLimits::default()),
            Err(ChatError::TemplateTooLarge { .. })
        ));
    }

    #[test]
    fn content_transforming_templates_are_refused() {
        let t = ChatTemplate::new(
            "upper",
            "{% for m in messages %}{{ m.content | upper }}{% endfor %}",
            "",
            "",
            ChatLimits::default(),
        )
        .unwrap();
        assert!(matches!(
            t.render_segments(&[ChatMessage::user("abc")], false),
            Err(ChatError::ContentTransformed)
        ));
    }

    #[test]
    fn delta_is_the_new_suffix() {
        let t = chatml();
        let mut msgs = vec![ChatMessage::user("one")];
        let first = t.render_delta(&msgs, 0, true).unwrap();
        msgs.push(ChatMessage::assistant("two"));
        msgs.push(ChatMessage::user("three"));
        let delta = t.render_delta(&msgs, 2, true).unwrap();
        assert_eq!(
            delta,
            vec![
                ChatSegment::Framing("<|im_start|>user\n".into()),
                ChatSegment::Content("three".into()),
                ChatSegment::Framing("<|im_end|>\n<|im_start|>assistant\n".into()),
            ]
        );
        assert_eq!(
            segments_to_string(&first),
            t.render(&msgs[..1], true).unwrap()
        );
        // A template that rewrites history is not prefix-stable.
        let unstable = ChatTemplate::new(
            "count",
            "{{ messages | length }}{% for m in messages %}{{ m.content }}{% endfor %}",
            "",
            "",
            ChatLimits::default(),
        )
        .unwrap();
        assert!(matches!(
            unstable.render_delta(&msgs, 2, true),
            Err(ChatError::NotPrefixStable)
        ));
        assert!(matches!(
            t.render_delta(&msgs, 4, true),
            Err(ChatError::BadPrefixLength { .. })
        ));
    }
}
