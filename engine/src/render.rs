//! Chat templates rendered in a child process with a bounded address space.
//!
//! Fuel and the output cap bound what a template prints, not what it builds: a template that
//! doubles a string in a loop, or asks for a huge `indent` width, allocates gigabytes and the
//! process aborts. minijinja has no memory hook, and a counting global allocator cannot fail one
//! allocation without aborting the whole process, so untrusted templates are rendered by a
//! separate process of the same binary that limits its own address space (`RLIMIT_AS`) before
//! it reads anything, renders single-threaded and returns the text over a pipe. One long-lived
//! worker serves every render of a process (a chat or a server makes no process per message);
//! when a template exhausts the limit the worker dies, the render fails with
//! [`ChatError::MemoryExceeded`], and the next render starts a fresh worker.
//!
//! A binary opts in with [`install`] (the `airlock` CLI does, before anything else, and calls
//! [`worker_main`] when started as [`WORKER_ARG`]). Without it, templates render in-process
//! with fuel and the output cap only: library users and tests that never see untrusted
//! templates need no helper binary.
//!
//! Wire format, both ways: one frame per message, a little-endian u64 length then the bytes.
//! Request: JSON ([`Request`]). Reply: one tag byte ([`Tag`]) then UTF-8 text (the rendering,
//! or the error's message).

use std::ffi::OsString;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitCode, Stdio};
use std::sync::{Mutex, OnceLock};

use serde::{Deserialize, Serialize};

use crate::chat::{render_in_process, ChatError, ChatLimits, ChatMessage, Rendered};

/// The hidden first argument that makes the `airlock` binary a render worker.
pub const WORKER_ARG: &str = "__render-chat-template";

/// Address space a render worker may use, the binary's own mappings included: the largest
/// legitimate rendering (16 MiB of output from a 1 MiB template) needs a small fraction of it.
pub const DEFAULT_MEMORY_LIMIT: u64 = 256 << 20;

/// CPU seconds one render may take (fuel bounds instructions, not what each one costs: a loop
/// that builds a 100 MB string per step is cheap in fuel).
pub const RENDER_CPU_SECONDS: u64 = 10;

/// Largest reply a worker may send: the output cap plus room for an error message.
const MAX_REPLY: u64 = (16 << 20) + (1 << 20);

/// One render, as the parent sends it (borrowed).
#[derive(Debug, Serialize)]
pub(crate) struct RequestRef<'a> {
    pub source: &'a str,
    pub bos_token: &'a str,
    pub eos_token: &'a str,
    pub limits: ChatLimits,
    pub messages: &'a [ChatMessage],
    pub add_generation_prompt: bool,
}

/// One render, as the worker reads it.
#[derive(Debug, Deserialize)]
struct Request {
    source: String,
    bos_token: String,
    eos_token: String,
    limits: ChatLimits,
    messages: Vec<ChatMessage>,
    add_generation_prompt: bool,
}

/// The first byte of a reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Tag {
    Ok = 0,
    Syntax = 1,
    Render = 2,
    Raised = 3,
    OutputTooLarge = 4,
    TemplateTooLarge = 5,
    OutOfFuel = 6,
}

impl Tag {
    fn from_u8(b: u8) -> Option<Tag> {
        Some(match b {
            0 => Tag::Ok,
            1 => Tag::Syntax,
            2 => Tag::Render,
            3 => Tag::Raised,
            4 => Tag::OutputTooLarge,
            5 => Tag::TemplateTooLarge,
            6 => Tag::OutOfFuel,
            _ => return None,
        })
    }
}

struct Sandbox {
    program: PathBuf,
    args: Vec<OsString>,
    limit: u64,
    cpu_seconds: u64,
}

static SANDBOX: OnceLock<Sandbox> = OnceLock::new();
static WORKER: Mutex<Option<Worker>> = Mutex::new(None);

/// Makes every untrusted template of this process render in a worker: `program` started with
/// `args`, then the limit in bytes (for the `airlock` binary: itself with [`WORKER_ARG`]).
/// The first call wins; returns false if a sandbox was already installed.
pub fn install(program: PathBuf, args: Vec<OsString>, limit_bytes: u64) -> bool {
    install_with_cpu(program, args, limit_bytes, RENDER_CPU_SECONDS)
}

/// [`install`] with `cpu_seconds` per render instead of [`RENDER_CPU_SECONDS`] (at least 1;
/// tests use a shorter bound to show it holds).
pub fn install_with_cpu(
    program: PathBuf,
    args: Vec<OsString>,
    limit_bytes: u64,
    cpu_seconds: u64,
) -> bool {
    SANDBOX
        .set(Sandbox {
            program,
            args,
            limit: limit_bytes,
            cpu_seconds: cpu_seconds.max(1),
        })
        .is_ok()
}

/// The address-space limit of the installed sandbox, if one is.
pub fn memory_limit() -> Option<u64> {
    SANDBOX.get().map(|s| s.limit)
}

/// How a worker ended: its status, and whether it ran out of CPU time.
struct Ended {
    text: String,
    cpu: bool,
}

struct Worker {
    child: Child,
    stdin: BufWriter<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Worker {
    fn spawn(s: &Sandbox) -> std::io::Result<Worker> {
        let mut cmd = Command::new(&s.program);
        cmd.args(&s.args)
            .arg(s.limit.to_string())
            .arg(s.cpu_seconds.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            // A template that dies of the limit makes the allocator print a line; the error
            // the user sees is ours.
            .stderr(Stdio::null());
        #[cfg(unix)]
        {
            // Its own process group: a Ctrl-C at the terminal is for the front end, which
            // decides what happens (the server keeps rendering while it drains).
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        let mut child = cmd.spawn()?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::other("the render worker has no pipes"));
        };
        Ok(Worker {
            child,
            stdin: BufWriter::new(stdin),
            stdout: BufReader::new(stdout),
        })
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills (if needed) and reaps the worker; returns how it ended.
    fn end(self) -> String {
        self.end_status().text
    }

    fn end_status(mut self) -> Ended {
        // Wait for it first: killing it now would hide how it died.
        let status = match self.child.try_wait() {
            Ok(Some(st)) => Ok(st),
            _ => {
                let _ = self.child.kill();
                self.child.wait()
            }
        };
        match status {
            Ok(st) => {
                #[cfg(unix)]
                let cpu = {
                    use std::os::unix::process::ExitStatusExt;
                    st.signal() == Some(nix::libc::SIGXCPU)
                };
                #[cfg(not(unix))]
                let cpu = false;
                Ended {
                    text: st.to_string(),
                    cpu,
                }
            }
            Err(e) => Ended {
                text: e.to_string(),
                cpu: false,
            },
        }
    }
}

/// Renders `req` in the sandbox's worker, or returns None when no sandbox is installed.
pub(crate) fn render_sandboxed(
    req: &RequestRef,
    template: &str,
) -> Option<Result<Rendered, ChatError>> {
    let sandbox = SANDBOX.get()?;
    Some(render_with(sandbox, req, template))
}

fn render_with(s: &Sandbox, req: &RequestRef, template: &str) -> Result<Rendered, ChatError> {
    let body = serde_json::to_vec(req).map_err(|e| ChatError::Worker(e.to_string()))?;
    let mut slot = WORKER.lock().unwrap_or_else(|e| e.into_inner());
    let exceeded = |how: String| ChatError::MemoryExceeded {
        template: template.to_string(),
        limit_mib: s.limit >> 20,
        how,
    };
    // A worker that died between renders (killed from outside) is replaced once, silently:
    // the request never reached it.
    for attempt in 0..2 {
        let live = match slot.take() {
            Some(mut w) => {
                if w.alive() {
                    Some(w)
                } else {
                    w.end();
                    None
                }
            }
            None => None,
        };
        let mut w = match live {
            Some(w) => w,
            None => Worker::spawn(s).map_err(|e| {
                ChatError::Worker(format!("cannot start {}: {e}", s.program.display()))
            })?,
        };
        if write_frame(&mut w.stdin, &body).is_err() {
            let how = w.end();
            if attempt == 0 {
                continue;
            }
            return Err(exceeded(how));
        }
        match read_reply(&mut w.stdout) {
            Ok(reply) => {
                *slot = Some(w);
                return reply;
            }
            // It died while rendering: the template exhausted a limit (or crashed it).
            Err(_) => {
                let status = w.end_status();
                if status.cpu {
                    return Err(ChatError::TimeExceeded {
                        template: template.to_string(),
                        seconds: s.cpu_seconds,
                    });
                }
                return Err(exceeded(status.text));
            }
        }
    }
    Err(ChatError::Worker(
        "it keeps dying before it reads a request".into(),
    ))
}

fn write_frame(w: &mut impl Write, bytes: &[u8]) -> std::io::Result<()> {
    w.write_all(&(bytes.len() as u64).to_le_bytes())?;
    w.write_all(bytes)?;
    w.flush()
}

fn read_len(r: &mut impl Read) -> std::io::Result<u64> {
    let mut len = [0u8; 8];
    r.read_exact(&mut len)?;
    Ok(u64::from_le_bytes(len))
}

/// A reply: Ok(the render's outcome), or Err when the pipe failed (the worker died).
fn read_reply(r: &mut impl Read) -> std::io::Result<Result<Rendered, ChatError>> {
    let mut tag = [0u8; 1];
    r.read_exact(&mut tag)?;
    let n = read_len(r)?;
    if n > MAX_REPLY {
        return Err(std::io::Error::other("reply too large"));
    }
    let mut text = Vec::new();
    r.take(n).read_to_end(&mut text)?;
    if text.len() as u64 != n {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let text = String::from_utf8(text).map_err(|_| std::io::Error::other("reply not UTF-8"))?;
    let Some(tag) = Tag::from_u8(tag[0]) else {
        return Err(std::io::Error::other("unknown reply tag"));
    };
    Ok(match tag {
        Tag::Ok => Ok(Rendered::Text(text)),
        Tag::OutOfFuel => Ok(Rendered::OutOfFuel(text)),
        Tag::Syntax => Err(ChatError::Syntax(text)),
        Tag::Render => Err(ChatError::Render(text)),
        Tag::Raised => Err(ChatError::Raised(text)),
        Tag::OutputTooLarge => Err(ChatError::OutputTooLarge(text.parse().unwrap_or(0))),
        Tag::TemplateTooLarge => Err(ChatError::Render(text)),
    })
}

/// Limits this process's address space to `bytes` and its core dumps to nothing.
fn limit_self(bytes: u64) -> Result<(), String> {
    #[cfg(unix)]
    {
        use nix::sys::resource::{setrlimit, Resource};
        // A worker that dies of the limit must not leave a core file of that size.
        setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(|e| format!("RLIMIT_CORE: {e}"))?;
        setrlimit(Resource::RLIMIT_AS, bytes, bytes).map_err(|e| format!("RLIMIT_AS: {e}"))?;
        Ok(())
    }
    #[cfg(not(unix))]
    {
        let _ = bytes;
        Err("address-space limits need a Unix system".into())
    }
}

/// Gives the next render `seconds` of CPU time from now: past them the kernel sends SIGXCPU,
/// which ends the worker (and the parent reports the template as too slow).
fn limit_cpu(seconds: u64) -> Result<(), String> {
    #[cfg(unix)]
    {
        use nix::sys::resource::{getrusage, setrlimit, Resource, UsageWho};
        let u = getrusage(UsageWho::RUSAGE_SELF).map_err(|e| e.to_string())?;
        let used = (u.user_time().tv_sec() + u.system_time().tv_sec()).max(0) as u64;
        // The soft limit sends SIGXCPU; the hard one (2 s later) SIGKILL, should it be caught.
        let soft = used + 1 + seconds;
        setrlimit(Resource::RLIMIT_CPU, soft, soft + 2).map_err(|e| format!("RLIMIT_CPU: {e}"))
    }
    #[cfg(not(unix))]
    {
        let _ = seconds;
        Ok(())
    }
}

/// The worker: `args` is what follows [`WORKER_ARG`] (the limit in bytes, then optionally the
/// CPU seconds per render). Limits itself, then renders requests from stdin until it closes.
/// Exit status 0 at EOF, 2 on misuse.
pub fn worker_main(args: &[OsString]) -> ExitCode {
    let number = |i: usize| args.get(i).and_then(|a| a.to_str()?.parse::<u64>().ok());
    let (limit, cpu_seconds) = match (number(0), args.get(1).map(|_| number(1))) {
        (Some(l), None) if l > 0 => (l, RENDER_CPU_SECONDS),
        (Some(l), Some(Some(c))) if l > 0 && c > 0 && args.len() == 2 => (l, c),
        _ => {
            eprintln!(
                "usage: airlock {WORKER_ARG} LIMIT_BYTES [CPU_SECONDS] (internal: renders chat \
                 templates)"
            );
            return ExitCode::from(2);
        }
    };
    if let Err(e) = limit_self(limit) {
        eprintln!("render worker: cannot limit memory: {e}");
        return ExitCode::from(2);
    }
    let mut input = std::io::stdin().lock();
    let mut output = BufWriter::new(std::io::stdout().lock());
    loop {
        let n = match read_len(&mut input) {
            Ok(n) => n,
            Err(_) => return ExitCode::SUCCESS,
        };
        let mut body = Vec::new();
        if (&mut input).take(n).read_to_end(&mut body).is_err() || body.len() as u64 != n {
            return ExitCode::SUCCESS;
        }
        let (tag, text) = match serde_json::from_slice::<Request>(&body) {
            Ok(req) => {
                drop(body);
                if let Err(e) = limit_cpu(cpu_seconds) {
                    eprintln!("render worker: cannot limit CPU time: {e}");
                    return ExitCode::from(2);
                }
                serve(&req)
            }
            Err(e) => (Tag::Render, format!("bad render request: {e}")),
        };
        let sent = (|| {
            output.write_all(&[tag as u8])?;
            write_frame(&mut output, text.as_bytes())
        })();
        if sent.is_err() {
            return ExitCode::SUCCESS;
        }
    }
}

fn serve(req: &Request) -> (Tag, String) {
    let result = std::panic::catch_unwind(|| {
        render_in_process(
            &req.source,
            &req.bos_token,
            &req.eos_token,
            &req.limits,
            &req.messages,
            req.add_generation_prompt,
        )
    });
    match result {
        Ok(Ok(Rendered::Text(t))) => (Tag::Ok, t),
        Ok(Ok(Rendered::OutOfFuel(m))) => (Tag::OutOfFuel, m),
        Ok(Err(ChatError::Syntax(m))) => (Tag::Syntax, m),
        Ok(Err(ChatError::Raised(m))) => (Tag::Raised, m),
        Ok(Err(ChatError::OutputTooLarge(n))) => (Tag::OutputTooLarge, n.to_string()),
        Ok(Err(e @ ChatError::TemplateTooLarge { .. })) => (Tag::TemplateTooLarge, e.to_string()),
        Ok(Err(e)) => (Tag::Render, e.to_string()),
        Err(_) => (Tag::Render, "the template renderer panicked".into()),
    }
}
