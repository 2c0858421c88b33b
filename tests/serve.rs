//! `airlock serve` as clients see it: the built binary on an ephemeral loopback port with the
//! real SmolLM2 model, driven over plain HTTP/1.1 (raw `TcpStream`, so the tests control every
//! byte and can hang up mid-stream).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod support;

fn smollm2() -> PathBuf {
    let p =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-models.sh",
        p.display()
    );
    p
}

/// A running `airlock serve`, killed when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
    /// Everything the server printed on stderr so far.
    log: Arc<Mutex<String>>,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        Server::start_model(&smollm2(), extra)
    }

    fn start_model(model: &std::path::Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_airlock"))
            .arg("serve")
            .arg("-m")
            .arg(model)
            .args(["-t", "1", "--port", "0"])
            .args(if extra.contains(&"-c") {
                &[][..]
            } else {
                &["-c", "512"][..]
            })
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if let Some(rest) = line.split("listening on http://").nth(1) {
                        let addr = rest.split_whitespace().next().unwrap().to_string();
                        let _ = tx.send(addr);
                    }
                    let mut l = log.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
            });
        }
        let addr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(a) => a.parse().unwrap(),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the server did not start; its log:\n{}",
                    log.lock().unwrap()
                );
            }
        };
        Server { child, addr, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the log contains `needle`.
    fn wait_log(&self, needle: &str, within: Duration) {
        let t0 = Instant::now();
        while !self.log().contains(needle) {
            assert!(
                t0.elapsed() < within,
                "the log never said {needle:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn post(&self, path: &str, body: &Value) -> Resp {
        http(self.addr, "POST", path, &[], body.to_string().as_bytes())
    }

    /// Sends a completion request on a connection of its own and leaves it open, unread.
    fn send_completion(&self, body: &Value) -> TcpStream {
        let mut s = TcpStream::connect(self.addr).unwrap();
        let body = body.to_string();
        s.write_all(&request_bytes(
            self.addr,
            "POST",
            "/v1/completions",
            &[],
            body.as_bytes(),
        ))
        .unwrap();
        s
    }

    /// Sends the server a signal (`TERM`, `INT`).
    fn signal(&self, name: &str) {
        let kill = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
    }

    /// Waits for the server to exit, failing with its log after `within`.
    fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(t0.elapsed() < within, "still running:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Resp {
    status: u16,
    headers: String,
    body: Vec<u8>,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }

    /// The `error` object of an OpenAI-shaped error, checked for its three fields.
    fn error(&self, status: u16) -> Value {
        assert_eq!(
            self.status,
            status,
            "body: {}",
            String::from_utf8_lossy(&self.body)
        );
        let e = self.json()["error"].clone();
        assert!(e["message"].is_string(), "{e}");
        assert!(e["type"].is_string(), "{e}");
        assert!(e.get("code").is_some(), "{e}");
        e
    }
}

fn request_bytes(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &[u8],
) -> Vec<u8> {
    request_bytes_for(&addr.to_string(), method, path, headers, body)
}

/// A request whose Host header is `host`.
fn request_bytes_for(
    host: &str,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &[u8],
) -> Vec<u8> {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// One request on a fresh connection; the whole response (chunked bodies decoded).
fn http(addr: SocketAddr, method: &str, path: &str, headers: &[&str], body: &[u8]) -> Resp {
    http_for(addr, &addr.to_string(), method, path, headers, body)
}

/// One request to `addr` naming `host` in its Host header.
fn http_for(
    addr: SocketAddr,
    host: &str,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &[u8],
) -> Resp {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    s.write_all(&request_bytes_for(host, method, path, headers, body))
        .unwrap();
    // Read to the end of the body: the server closes the connection, but some peers
    // (chromedriver) keep it open, so a Content-Length is honoured.
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        if let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            if len.is_some_and(|len| raw.len() >= split + 4 + len) {
                break;
            }
        }
    }
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Resp {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("no end of headers");
    let head = String::from_utf8(raw[..split].to_vec()).unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut body = raw[split + 4..].to_vec();
    let resp = Resp {
        status,
        headers: head,
        body: Vec::new(),
    };
    if resp
        .header("transfer-encoding")
        .is_some_and(|v| v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    Resp { body, ..resp }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n").expect("chunk size");
        let size =
            usize::from_str_radix(std::str::from_utf8(&b[..eol]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[eol + 2 + size + 2..];
    }
}

/// The `data:` payloads of an SSE body, in order.
fn sse_data(body: &[u8]) -> Vec<String> {
    let text = String::from_utf8(body.to_vec()).unwrap();
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            e.lines()
                .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect()
}

/// A streamed response: its chunks (JSON), checked to end with `[DONE]`.
fn stream_chunks(resp: &Resp) -> Vec<Value> {
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    assert!(resp
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/event-stream")));
    let data = sse_data(&resp.body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

/// Concatenated text and the finish reason of streamed chunks (chat deltas or text).
fn stream_text(chunks: &[Value]) -> (String, String) {
    let mut text = String::new();
    let mut finish = String::new();
    for c in chunks {
        let Some(choice) = c["choices"].get(0) else {
            continue;
        };
        if let Some(t) = choice["delta"]["content"].as_str() {
            text.push_str(t);
        }
        if let Some(t) = choice["text"].as_str() {
            text.push_str(t);
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    (text, finish)
}

fn airlock_run(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .arg("run")
        .arg("-m")
        .arg(smollm2())
        .args(["-t", "1", "-c", "512", "--temp", "0"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = String::from_utf8(out.stdout).unwrap();
    s.strip_suffix('\n').unwrap().to_string()
}

const PROMPT: &str = "The three most common causes of a data breach are";
const QUESTION: &str = "What is a SQL injection attack?";

#[test]
fn greedy_completions_equal_airlock_run() {
    let server = Server::start(&[]);
    let r = server.post(
        "/v1/completions",
        &json!({"model": "anything", "prompt": PROMPT, "max_tokens": 24, "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(v["model"], "SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(v["system_fingerprint"]
        .as_str()
        .unwrap()
        .starts_with("airlock-"));
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    let text = v["choices"][0]["text"].as_str().unwrap();
    let expected = airlock_run(&["-p", PROMPT, "-n", "24"]);
    assert_eq!(text, expected);
    let usage = &v["usage"];
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert!(completion > 0 && completion <= 24, "{usage}");
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 5);
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + completion
    );
    let finish = v["choices"][0]["finish_reason"].as_str().unwrap();
    assert_eq!(finish, if completion == 24 { "length" } else { "stop" });

    let r = server.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": QUESTION}], "max_completion_tokens": 24, "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(text, airlock_run(&["--chat", "-p", QUESTION, "-n", "24"]));
    // Content as an array of text parts is the same message.
    let r = server.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "What is a SQL "}, {"type": "text", "text": "injection attack?"}]}], "max_tokens": 24, "temperature": 0}),
    );
    assert_eq!(r.json()["choices"][0]["message"]["content"], text);

    let models = http(server.addr, "GET", "/v1/models", &[], b"").json();
    assert_eq!(models["data"][0]["id"], "SmolLM2-135M-Instruct.Q4_1.gguf");
    let health = http(server.addr, "GET", "/health", &[], b"");
    assert_eq!(health.status, 200);
    // Logs carry counts and ids, never prompt or completion text.
    let log = server.log();
    assert!(
        !log.contains("SQL") && !log.contains("breach") && !log.contains(text),
        "{log}"
    );
}

#[test]
fn streaming_equals_non_streaming() {
    let server = Server::start(&[]);
    for (path, body) in [
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}], "max_tokens": 40, "temperature": 0.7, "seed": 7}),
        ),
        (
            "/v1/completions",
            json!({"prompt": PROMPT, "max_tokens": 40, "temperature": 0.7, "seed": 7}),
        ),
        // A stop string ends the text before it, in both modes.
        (
            "/v1/completions",
            json!({"prompt": "1, 2, 3, 4,", "max_tokens": 40, "temperature": 0, "stop": [" 7", "never"]}),
        ),
    ] {
        let plain = server.post(path, &body).json();
        let choice = &plain["choices"][0];
        let text = choice["message"]["content"]
            .as_str()
            .or(choice["text"].as_str())
            .unwrap()
            .to_string();
        let mut sbody = body.clone();
        sbody["stream"] = json!(true);
        sbody["stream_options"] = json!({"include_usage": true});
        let chunks = stream_chunks(&server.post(path, &sbody));
        let (streamed, finish) = stream_text(&chunks);
        assert_eq!(streamed, text, "{path} {body}");
        assert_eq!(finish, choice["finish_reason"].as_str().unwrap());
        let object = if path.contains("chat") {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        for c in &chunks {
            assert_eq!(c["object"], object);
            assert_eq!(c["id"], chunks[0]["id"]);
            assert!(c["system_fingerprint"].is_string());
        }
        if path.contains("chat") {
            assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        }
        // The usage chunk comes last, with no choices.
        let last = chunks.last().unwrap();
        assert_eq!(last["choices"], json!([]));
        for k in ["prompt_tokens", "completion_tokens", "total_tokens"] {
            assert_eq!(last["usage"][k], plain["usage"][k]);
        }
        // The same prompt again: all of it but the last token comes from the slot's cache.
        assert_eq!(
            last["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64(),
            Some(plain["usage"]["prompt_tokens"].as_u64().unwrap() - 1)
        );
        if body.get("stop").is_some() {
            assert_eq!(finish, "stop");
            assert!(text.contains(" 5") && !text.contains(" 7"), "{text:?}");
        }
    }
}

#[test]
fn sixteen_concurrent_seeded_clients_match_their_text_alone() {
    // 16 clients on 8 slots: eight run at once, eight wait in the queue. Prompts share
    // prefixes, so the batch also mixes reused caches with fresh ones.
    let server = Server::start(&["--parallel", "8"]);
    let requests: Vec<(&str, Value)> = (0..16u64)
        .map(|i| {
            if i % 2 == 0 {
                (
                    "/v1/chat/completions",
                    json!({"messages": [{"role": "user", "content": format!("Name {} ways to detect malware.", i + 2)}],
                           "max_tokens": 20, "temperature": 1.0, "seed": 100 + i, "stream": i % 4 == 0}),
                )
            } else {
                (
                    "/v1/completions",
                    json!({"prompt": format!("Incident report {i}: the attacker"), "max_tokens": 20,
                           "temperature": 0.9, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": 200 + i, "stream": i % 4 == 3}),
                )
            }
        })
        .collect();
    let text_of = |path: &str, body: &Value, r: &Resp| -> String {
        if body["stream"] == json!(true) {
            stream_text(&stream_chunks(r)).0
        } else {
            assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
            let v = r.json();
            let c = &v["choices"][0];
            if path.contains("chat") {
                c["message"]["content"].as_str().unwrap().to_string()
            } else {
                c["text"].as_str().unwrap().to_string()
            }
        }
    };
    let alone: Vec<String> = requests
        .iter()
        .map(|(p, b)| text_of(p, b, &server.post(p, b)))
        .collect();
    let addr = server.addr;
    let together: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = requests
            .iter()
            .map(|(p, b)| {
                s.spawn(move || {
                    let r = http(addr, "POST", p, &[], b.to_string().as_bytes());
                    text_of(p, b, &r)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert!(!a.is_empty());
        assert_eq!(a, t, "request {i} differs when run among others");
    }
    // Different seeds gave different texts (the comparison above is not vacuous).
    assert_ne!(alone[1], alone[3]);
}

#[test]
fn client_mistakes_get_openai_errors_and_the_server_goes_on() {
    let server = Server::start(&["--api-key", "sekret-1", "--max-body", "4096", "-c", "64"]);
    let a = server.addr;
    let key = "Authorization: Bearer sekret-1";
    let ok_body = json!({"prompt": "Hello", "max_tokens": 4, "temperature": 0}).to_string();

    // Keys: missing, wrong; /health needs none.
    let e = http(a, "POST", "/v1/completions", &[], ok_body.as_bytes()).error(401);
    assert!(e["message"].as_str().unwrap().contains("Bearer"), "{e}");
    http(
        a,
        "POST",
        "/v1/completions",
        &["Authorization: Bearer sekret-2"],
        ok_body.as_bytes(),
    )
    .error(401);
    http(a, "GET", "/v1/models", &["Authorization: Bearer "], b"").error(401);
    assert_eq!(http(a, "GET", "/health", &[], b"").status, 200);
    assert_eq!(http(a, "GET", "/v1/models", &[key], b"").status, 200);

    let post = |path: &str, body: &str| http(a, "POST", path, &[key], body.as_bytes());
    let field_error = |path: &str, body: Value, field: &str| {
        let e = post(path, &body.to_string()).error(400);
        assert!(
            e["message"].as_str().unwrap().contains(field),
            "{body} -> {e}"
        );
    };
    // Malformed JSON and wrong shapes.
    post("/v1/completions", "{\"prompt\": ").error(400);
    post("/v1/completions", "[1, 2]").error(400);
    field_error(
        "/v1/completions",
        json!({"prompt": "x", "temperature": "hot"}),
        "`temperature`",
    );
    field_error(
        "/v1/completions",
        json!({"prompt": "x", "max_tokens": -3}),
        "`max_tokens`",
    );
    field_error(
        "/v1/completions",
        json!({"prompt": "x", "stream": "yes"}),
        "`stream`",
    );
    field_error(
        "/v1/completions",
        json!({"prompt": "x", "stop": [1]}),
        "`stop`",
    );
    field_error(
        "/v1/completions",
        json!({"prompt": "x", "stop": ["y".repeat(300)]}),
        "`stop`",
    );
    field_error(
        "/v1/completions",
        json!({"prompt": "x", "top_p": 0.0}),
        "`top_p`",
    );
    field_error("/v1/completions", json!({"prompt": 5}), "`prompt`");
    field_error("/v1/completions", json!({"max_tokens": 4}), "`prompt`");
    field_error(
        "/v1/chat/completions",
        json!({"messages": "hi"}),
        "`messages`",
    );
    field_error(
        "/v1/chat/completions",
        json!({"messages": [{"role": "user"}]}),
        "`messages[0].content`",
    );
    field_error(
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
        "image_url",
    );
    // Unsupported features are refused, never silently ignored.
    field_error("/v1/completions", json!({"prompt": "x", "n": 2}), "`n`");
    field_error(
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "x"}], "n": 3}),
        "`n`",
    );
    field_error(
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": "many"}),
        "`max_completion_tokens`",
    );
    field_error(
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}),
        "`tools`",
    );
    field_error(
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}),
        "`response_format`",
    );
    // A prompt longer than a slot's context: both numbers in the message.
    let long = "word ".repeat(100);
    let e = post("/v1/completions", &json!({"prompt": long}).to_string()).error(400);
    let msg = e["message"].as_str().unwrap();
    let n: usize = msg
        .strip_prefix("the prompt is ")
        .and_then(|m| m.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{msg}"));
    assert!(n > 64 && msg.contains("64 tokens"), "{msg}");
    // Too large a body.
    let big = json!({"prompt": "x".repeat(5000)}).to_string();
    let e = post("/v1/completions", &big).error(413);
    assert_eq!(e["code"], "request_too_large");
    // Unknown route and method.
    http(a, "GET", "/v1/nothing", &[key], b"").error(404);
    http(a, "GET", "/v1/completions", &[key], b"").error(405);

    // A foreign Host (DNS rebinding) is refused, whatever the key; loopback names pass.
    let e = http_for(a, "evil.example:80", "GET", "/v1/models", &[key], b"").error(403);
    assert_eq!(e["code"], "host_not_allowed");
    assert!(
        e["message"].as_str().unwrap().contains("--allow-host"),
        "{e}"
    );
    http_for(a, "evil.example", "GET", "/", &[], b"").error(403);
    assert_eq!(
        http_for(
            a,
            &format!("localhost:{}", a.port()),
            "GET",
            "/v1/models",
            &[key],
            b""
        )
        .status,
        200
    );
    // No --cors-origin: no CORS headers, and a preflight is not answered.
    let r = http(
        a,
        "GET",
        "/v1/models",
        &[key, "Origin: http://soc.example"],
        b"",
    );
    assert_eq!(r.status, 200);
    assert!(
        r.header("access-control-allow-origin").is_none(),
        "{}",
        r.headers
    );
    let r = http(
        a,
        "OPTIONS",
        "/v1/completions",
        &[
            "Origin: http://soc.example",
            "Access-Control-Request-Method: POST",
        ],
        b"",
    );
    assert_ne!(r.status, 204);
    assert!(
        r.header("access-control-allow-origin").is_none(),
        "{}",
        r.headers
    );
    // The chat page needs no key (it asks for one), and forbids loading anything else.
    let r = http(a, "GET", "/", &[], b"");
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/html"));
    let csp = r.header("content-security-policy").unwrap();
    assert!(csp.starts_with("default-src 'none'"), "{csp}");
    assert!(csp.contains("connect-src 'self'"), "{csp}");
    assert!(String::from_utf8_lossy(&r.body).contains("<title>airlock chat</title>"));
    // Everything else does need the key.
    for path in ["/metrics", "/v1/models"] {
        http(a, "GET", path, &[], b"").error(401);
    }
    http(a, "POST", "/tokenize", &[], b"{\"content\": \"x\"}").error(401);
    // Bad fields of the newer features.
    for (body, name) in [
        (
            json!({"prompt": "x", "frequency_penalty": 2.5}),
            "`frequency_penalty`",
        ),
        (
            json!({"prompt": "x", "presence_penalty": "high"}),
            "`presence_penalty`",
        ),
        (json!({"prompt": "x", "logprobs": 21}), "`logprobs`"),
        (json!({"prompt": "x", "logprobs": true}), "`logprobs`"),
        (json!({"prompt": "x", "cache_prompt": 1}), "`cache_prompt`"),
    ] {
        field_error("/v1/completions", body, name);
    }
    for (body, name) in [
        (
            json!({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}),
            "`top_logprobs`",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 21}),
            "`top_logprobs`",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "logprobs": 3}),
            "`logprobs`",
        ),
    ] {
        field_error("/v1/chat/completions", body, name);
    }
    field_error("/tokenize", json!({"content": 3}), "`content`");
    field_error(
        "/detokenize",
        json!({"tokens": [1, 99999999]}),
        "`tokens[1]`",
    );
    field_error("/detokenize", json!({"tokens": [-1]}), "`tokens[0]`");

    // Unknown fields are ignored, any model name is accepted, and the server still answers.
    let r = post(
        "/v1/completions",
        &json!({"prompt": "Hello", "max_tokens": 4, "temperature": 0, "model": "gpt-4o", "user": "u1", "n": 1}).to_string(),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["usage"]["completion_tokens"], 4);
}

#[test]
fn queue_full_and_disconnects_free_slots() {
    // One slot, a queue of one: a long stream holds the slot.
    let server = Server::start(&["--parallel", "1", "--queue", "1"]);
    let a = server.addr;
    let long =
        json!({"prompt": "Once upon a time", "temperature": 0, "ignore_eos": true, "stream": true})
            .to_string();
    let mut holder = TcpStream::connect(a).unwrap();
    holder
        .write_all(&request_bytes(
            a,
            "POST",
            "/v1/completions",
            &[],
            long.as_bytes(),
        ))
        .unwrap();
    read_until(&mut holder, "\"text\":\"");
    // The second waits in the queue; its client then hangs up, so it must never run.
    let mut queued = TcpStream::connect(a).unwrap();
    queued
        .write_all(&request_bytes(
            a,
            "POST",
            "/v1/completions",
            &[],
            long.as_bytes(),
        ))
        .unwrap();
    server.wait_log("completion queued", Duration::from_secs(30));
    let t0 = Instant::now();
    while server.log().matches("completion queued").count() < 2 {
        assert!(t0.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(20));
    }
    // The third finds the queue full.
    let r = http(
        a,
        "POST",
        "/v1/completions",
        &[],
        b"{\"prompt\": \"x\", \"max_tokens\": 1}",
    );
    let e = r.error(503);
    assert_eq!(e["code"], "queue_full");
    assert_eq!(r.header("retry-after").as_deref(), Some("1"));
    drop(queued);
    // Hanging up mid-stream frees the slot at the next step.
    drop(holder);
    server.wait_log("client left after", Duration::from_secs(30));
    server.wait_log("client left before it ran", Duration::from_secs(30));
    let r = http(
        a,
        "POST",
        "/v1/completions",
        &[],
        b"{\"prompt\": \"Hi\", \"max_tokens\": 3}",
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    server.wait_log(": done (", Duration::from_secs(30));
    // Only this request finished: the first was cut off and the queued one never ran.
    assert_eq!(
        server.log().matches(": done (").count(),
        1,
        "{}",
        server.log()
    );
}

/// Reads from `s` until the bytes so far contain `needle`.
fn read_until(s: &mut TcpStream, needle: &str) -> String {
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains(needle) {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "connection closed before {needle:?}");
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[test]
fn non_loopback_bind_without_a_key_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["serve", "-m"])
        .arg(smollm2())
        .args(["--host", "0.0.0.0", "--port", "0"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to listen on 0.0.0.0") && err.contains("--api-key"),
        "{err}"
    );
}

#[test]
fn sigterm_finishes_in_flight_requests_and_exits_zero() {
    let mut server = Server::start(&[]);
    let a = server.addr;
    let mut s = server.send_completion(&json!({"prompt": "Once upon a time", "max_tokens": 48, "temperature": 0, "ignore_eos": true, "stream": true}));
    let mut got = read_until(&mut s, "\"text\":\"").into_bytes();
    server.signal("TERM");
    server.wait_log("SIGTERM", Duration::from_secs(30));
    // The stream in flight runs to its end.
    s.read_to_end(&mut got).unwrap();
    let resp = parse_response(&got);
    let chunks = stream_chunks(&resp);
    let (_, finish) = stream_text(&chunks);
    assert_eq!(finish, "length");
    let status = server.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status:?}\n{}", server.log());
    assert!(TcpStream::connect(a).is_err());
}

#[test]
fn while_draining_health_and_new_requests_get_503_until_the_stream_ends() {
    let mut server = Server::start(&["--grace", "60"]);
    let a = server.addr;
    assert_eq!(http(a, "GET", "/health", &[], b"").status, 200);
    let mut s = server.send_completion(&json!({"prompt": "Once upon a time", "max_tokens": 64, "temperature": 0, "ignore_eos": true, "stream": true}));
    let mut got = read_until(&mut s, "\"text\":\"").into_bytes();
    server.signal("TERM");
    server.wait_log("no longer accepting requests", Duration::from_secs(30));
    // The listener still answers: a load balancer's probe sees 503, and a new completion is
    // refused with a 503 it may retry elsewhere, while the stream goes on.
    let r = http(a, "GET", "/health", &[], b"");
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["status"], "draining");
    let r = http(
        a,
        "POST",
        "/v1/completions",
        &[],
        b"{\"prompt\": \"Hi\", \"max_tokens\": 2}",
    );
    let e = r.error(503);
    assert_eq!(e["code"], "shutting_down");
    assert_eq!(r.header("retry-after").as_deref(), Some("1"));
    s.read_to_end(&mut got).unwrap();
    let chunks = stream_chunks(&parse_response(&got));
    let (text, finish) = stream_text(&chunks);
    assert_eq!(finish, "length");
    assert!(!text.is_empty());
    // Then it exits 0 well before the 60 s of grace: it waited for the stream only.
    let status = server.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status:?}\n{}", server.log());
    assert!(
        !server.log().contains("grace period over"),
        "{}",
        server.log()
    );
    assert!(TcpStream::connect(a).is_err());
}

#[test]
fn messages_a_model_template_cannot_render_are_the_clients_400() {
    // A model whose template fails on some messages only: it renders the load's sample
    // conversation, so what fails later is the request's messages.
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("picky.gguf");
    let template = "{% for m in messages %}\
        {% if m.content.startswith('grow') %}{% set ns = namespace(v='x') %}\
        {% for i in range(40) %}{% set ns.v = ns.v ~ ns.v %}{% endfor %}{{ ns.v|length }}{% endif %}\
        {% if m.content.startswith('raise') %}{{ raise_exception('no raising here') }}{% endif %}\
        <|start_header_id|>{{ m.role }}<|end_header_id|>\n\n\
        {% if m.content.startswith('shout') %}{{ m.content.upper() }}{% else %}{{ m.content }}{% endif %}\
        <|eot_id|>{% endfor %}\
        {% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}";
    support::rewrite_gguf(&support::tiny_llama3(), &model, |m, _| {
        support::set_key(
            m,
            "tokenizer.chat_template",
            airlock_engine::gguf::Value::String(template.into()),
        )
    });
    let server = Server::start_model(&model, &["-c", "64"]);
    let chat = |content: &str| {
        server.post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": content}], "max_tokens": 2}),
        )
    };
    for (content, needle) in [
        ("grow, please", "MiB"),
        ("raise it", "no raising here"),
        ("shout it", "transforms message contents"),
    ] {
        let e = chat(content).error(400);
        let msg = e["message"].as_str().unwrap();
        assert_eq!(e["type"], "invalid_request_error", "{e}");
        assert!(
            msg.contains("`messages`") && msg.contains(needle),
            "{content}: {msg}"
        );
    }
    // The server goes on, the render worker replaced.
    let r = chat("hello");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["usage"]["completion_tokens"], 2);
}

#[test]
fn a_non_streaming_client_that_hangs_up_frees_its_slot() {
    let server = Server::start(&["--parallel", "1", "-c", "4096"]);
    let a = server.addr;
    // No max_tokens and no end: it would run for seconds, to the end of the context.
    let s = server.send_completion(
        &json!({"prompt": "Once upon a time", "temperature": 0, "ignore_eos": true}),
    );
    server.wait_log("started in slot", Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(200));
    drop(s);
    server.wait_log("client left after", Duration::from_secs(30));
    let r = http(
        a,
        "POST",
        "/v1/completions",
        &[],
        b"{\"prompt\": \"Hi\", \"max_tokens\": 2}",
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

#[test]
fn requests_still_running_when_the_grace_period_ends_are_cut_off() {
    // A context of 4096 tokens takes many seconds to fill: the grace period ends first.
    let mut server = Server::start(&["--grace", "0.5", "-c", "4096", "--parallel", "1"]);
    let mut s = server.send_completion(&json!({"prompt": "Once upon a time", "temperature": 0, "ignore_eos": true, "stream": true}));
    read_until(&mut s, "\"text\":\"");
    server.signal("INT");
    let status = server.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status:?}\n{}", server.log());
    assert!(
        server.log().contains("grace period over"),
        "{}",
        server.log()
    );
    // The stream ended without its [DONE].
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(!String::from_utf8_lossy(&rest).contains("[DONE]"));
}

#[test]
fn a_prompt_read_in_small_chunks_beside_a_running_stream_gives_the_same_text() {
    // -b 8: the long prompt goes in over several steps, each beside the stream's token.
    let server = Server::start(&["-b", "8", "--parallel", "2"]);
    let mut s = server.send_completion(&json!({"prompt": "Once upon a time", "max_tokens": 200, "temperature": 0, "ignore_eos": true, "stream": true}));
    read_until(&mut s, "\"text\":\"");
    let prompt = "An analyst reviewing firewall logs notices repeated outbound connections to an \
                  unfamiliar address on port 4444 at three in the morning. The first step is";
    let r = server.post(
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 24, "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 24);
    assert_eq!(
        v["choices"][0]["text"].as_str().unwrap(),
        airlock_run(&["-p", prompt, "-n", "24"])
    );
    // The stream was still running beside it.
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(String::from_utf8_lossy(&rest).contains("[DONE]"));
}

#[test]
fn sigterm_right_after_the_listening_line_still_exits_zero() {
    let mut server = Server::start(&["-c", "64", "--parallel", "1"]);
    server.signal("TERM");
    let status = server.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status:?}\n{}", server.log());
}

/// The metrics page as (series with labels, value) pairs.
fn metrics(addr: SocketAddr) -> Vec<(String, f64)> {
    let r = http(addr, "GET", "/metrics", &[], b"");
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    String::from_utf8(r.body)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect()
}

fn metric(m: &[(String, f64)], name: &str) -> f64 {
    m.iter()
        .find(|(k, _)| k == name)
        .unwrap_or_else(|| panic!("no {name} in {m:?}"))
        .1
}

fn chat_text(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn prompt_reuse_gives_the_same_text_and_is_counted() {
    // One slot, so every request finds the previous one's cache.
    let server = Server::start(&["--parallel", "1", "--log-prompts"]);
    let a = server.addr;
    let turn1 = json!({"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 24, "temperature": 0});
    let r1 = server.post("/v1/chat/completions", &turn1).json();
    let reply = chat_text(&r1);
    let u1 = &r1["usage"];
    assert_eq!(u1["prompt_tokens_details"]["cached_tokens"], 0, "{u1}");
    // The next turn resends the history: the first turn is cached up to the reply's last
    // token (the slot kept the generated ids, and they re-tokenize the same; the last one was
    // sampled but never fed, as the reply ended there).
    let turn2 = |cache: bool| {
        json!({"messages": [{"role": "user", "content": QUESTION},
                            {"role": "assistant", "content": reply},
                            {"role": "user", "content": "Give one example."}],
               "max_tokens": 24, "temperature": 0, "cache_prompt": cache})
    };
    let r2 = server.post("/v1/chat/completions", &turn2(true)).json();
    let cached = r2["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    let (p1, c1) = (
        u1["prompt_tokens"].as_u64().unwrap(),
        u1["completion_tokens"].as_u64().unwrap(),
    );
    assert_eq!(u1["completion_tokens"], 24);
    assert_eq!(cached, p1 + c1 - 1, "{}", r2["usage"]);
    assert!(r2["usage"]["prompt_tokens"].as_u64().unwrap() > cached);
    // The same request without reuse computes everything and gives the same text.
    let fresh = server.post("/v1/chat/completions", &turn2(false)).json();
    assert_eq!(fresh["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(chat_text(&fresh), chat_text(&r2));
    // The whole prompt cached: the last token is computed again, for its logits.
    let again = server.post("/v1/chat/completions", &turn2(true)).json();
    assert_eq!(
        again["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64(),
        Some(r2["usage"]["prompt_tokens"].as_u64().unwrap() - 1)
    );
    assert_eq!(chat_text(&again), chat_text(&r2));
    // Streaming reports it too.
    let mut sbody = turn2(true);
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let chunks = stream_chunks(&server.post("/v1/chat/completions", &sbody));
    assert_eq!(stream_text(&chunks).0, chat_text(&r2));
    assert!(
        chunks.last().unwrap()["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );

    // /metrics adds it all up.
    let bad = server.post("/v1/completions", &json!({"prompt": 1}));
    assert_eq!(bad.status, 400);
    let responses = [&r1, &r2, &fresh, &again];
    let usage_sum = |key: &str| -> f64 {
        responses
            .iter()
            .map(|r| r["usage"][key].as_u64().unwrap())
            .sum::<u64>() as f64
            + chunks.last().unwrap()["usage"][key].as_u64().unwrap() as f64
    };
    let cached_sum = responses
        .iter()
        .map(|r| {
            r["usage"]["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap()
        })
        .sum::<u64>() as f64
        + chunks.last().unwrap()["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap() as f64;
    // A streamed reply's last bytes reach the client before the scheduler's next step frees the
    // slot (seen on a loaded machine): wait, up to a bound, for the slot to be free.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut m = metrics(a);
    while metric(&m, "airlock_slots_busy") != 0.0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
        m = metrics(a);
    }
    assert_eq!(
        metric(
            &m,
            "airlock_requests_total{route=\"/v1/chat/completions\",status=\"200\"}"
        ),
        5.0
    );
    assert_eq!(
        metric(
            &m,
            "airlock_requests_total{route=\"/v1/completions\",status=\"400\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(&m, "airlock_completion_tokens_total"),
        usage_sum("completion_tokens")
    );
    assert_eq!(metric(&m, "airlock_prompt_tokens_reused_total"), cached_sum);
    assert_eq!(
        metric(&m, "airlock_prompt_tokens_total") + cached_sum,
        usage_sum("prompt_tokens")
    );
    assert!(metric(&m, "airlock_generation_tokens_per_second") > 0.0);
    assert!(metric(&m, "airlock_prompt_tokens_per_second") > 0.0);
    assert_eq!(metric(&m, "airlock_queue_depth"), 0.0);
    assert_eq!(metric(&m, "airlock_slots_busy"), 0.0);
    assert_eq!(metric(&m, "airlock_slots"), 1.0);
    // The idle slot keeps the last conversation for the next turn.
    let kv = metric(&m, "airlock_kv_cache_tokens");
    assert!(kv > cached as f64, "{kv}");
    assert_eq!(metric(&m, "airlock_kv_cache_capacity_tokens"), 512.0);
    // --log-prompts: the prompt and the completion are in the log, escaped onto one line.
    let log = server.log();
    assert!(log.contains(QUESTION), "{log}");
    assert!(log.contains(&format!("completion: {reply:?}")), "{log}");
}

#[test]
fn tokenize_and_detokenize_speak_llama_servers_fields() {
    let server = Server::start(&["-c", "64", "--parallel", "1"]);
    let text = "Phishing <|im_end|> e-mails";
    let ids: Vec<u64> = server.post("/tokenize", &json!({"content": text})).json()["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert!(ids.len() > 3);
    // parse_special (default true) makes the control token one id; false spells it out.
    let plain = server
        .post(
            "/tokenize",
            &json!({"content": text, "parse_special": false}),
        )
        .json();
    assert!(plain["tokens"].as_array().unwrap().len() > ids.len());
    // Pieces: each id with its text, which put together give the content back.
    let pieces = server
        .post("/tokenize", &json!({"content": text, "with_pieces": true}))
        .json();
    let joined: String = pieces["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["piece"].as_str().unwrap())
        .collect();
    assert_eq!(joined, text);
    let back = server.post("/detokenize", &json!({"tokens": ids})).json();
    assert_eq!(back["content"], text);
    // The ids a completion's prompt becomes: add_special gives the model's BOS setting.
    let with_special = server
        .post(
            "/tokenize",
            &json!({"content": PROMPT, "add_special": true}),
        )
        .json()["tokens"]
        .as_array()
        .unwrap()
        .len();
    let r = server.post(
        "/v1/completions",
        &json!({"prompt": PROMPT, "max_tokens": 1}),
    );
    assert_eq!(
        r.json()["usage"]["prompt_tokens"].as_u64(),
        Some(with_special as u64)
    );
}

#[test]
fn logprobs_are_the_raw_log_softmax_and_penalties_change_the_text() {
    let server = Server::start(&["--parallel", "2"]);
    let msgs = json!([{"role": "user", "content": QUESTION}]);
    let greedy = server
        .post(
            "/v1/chat/completions",
            &json!({"messages": msgs, "max_tokens": 8, "temperature": 0, "logprobs": true, "top_logprobs": 5}),
        )
        .json();
    let content = greedy["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(
        content.len() as u64,
        greedy["usage"]["completion_tokens"].as_u64().unwrap()
    );
    let mut bytes = Vec::new();
    for c in &content {
        let top = c["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 5);
        // Greedy picks the most likely token; alternatives are sorted and are probabilities.
        assert_eq!(c["token"], top[0]["token"], "{c}");
        assert_eq!(c["logprob"], top[0]["logprob"], "{c}");
        let lps: Vec<f64> = top.iter().map(|t| t["logprob"].as_f64().unwrap()).collect();
        assert!(lps.windows(2).all(|w| w[0] >= w[1]), "{lps:?}");
        assert!(lps[0] <= 0.0);
        assert!(lps.iter().map(|l| l.exp()).sum::<f64>() <= 1.0 + 1e-5);
        bytes.extend(
            c["bytes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap() as u8),
        );
    }
    assert_eq!(String::from_utf8(bytes).unwrap(), chat_text(&greedy));
    // The first token's distribution comes from the raw logits: temperature, truncation and
    // penalties change what is sampled, never the reported log-probabilities.
    let hot = server
        .post(
            "/v1/chat/completions",
            &json!({"messages": msgs, "max_tokens": 1, "temperature": 1.7, "top_k": 3, "seed": 5,
                    "repeat_penalty": 1.5, "presence_penalty": 2, "frequency_penalty": -1,
                    "logprobs": true, "top_logprobs": 5}),
        )
        .json();
    assert_eq!(
        hot["choices"][0]["logprobs"]["content"][0]["top_logprobs"],
        content[0]["top_logprobs"]
    );
    // Streaming gives the same entries, spread over the chunks.
    let chunks = stream_chunks(&server.post(
        "/v1/chat/completions",
        &json!({"messages": msgs, "max_tokens": 8, "temperature": 0, "logprobs": true, "top_logprobs": 5, "stream": true}),
    ));
    let streamed: Vec<Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array())
        .flatten()
        .cloned()
        .collect();
    assert_eq!(streamed, content);

    // Completions: logprobs = n alternatives, in the legacy shape.
    let r = server
        .post(
            "/v1/completions",
            &json!({"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 3}),
        )
        .json();
    let c = &r["choices"][0];
    let lp = &c["logprobs"];
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens.concat(), c["text"].as_str().unwrap());
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), tokens.len());
    let offsets: Vec<usize> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap() as usize)
        .collect();
    let mut at = 0;
    for (t, o) in tokens.iter().zip(&offsets) {
        assert_eq!(*o, at);
        at += t.len();
    }
    for (i, top) in lp["top_logprobs"].as_array().unwrap().iter().enumerate() {
        let top = top.as_object().unwrap();
        assert!(!top.is_empty() && top.len() <= 3);
        // Greedy: the chosen token is the best alternative.
        let best = top
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert_eq!(lp["token_logprobs"][i].as_f64().unwrap(), best);
    }
    // Without logprobs the field is null.
    let r = server
        .post(
            "/v1/completions",
            &json!({"prompt": PROMPT, "max_tokens": 2}),
        )
        .json();
    assert!(r["choices"][0]["logprobs"].is_null());

    // Penalties, checked token by token against OpenAI's formula: greedy decoding picks the
    // largest `logprob - count * frequency - (count > 0) * presence` among the alternatives,
    // where count is how often that token was picked before (the log-softmax's shift is the
    // same for every token of a position, so comparing logprobs compares logits).
    let (frequency, presence) = (1.5, 0.5);
    let r = server
        .post(
            "/v1/completions",
            &json!({"prompt": "1, 2, 3, 4, 5,", "max_tokens": 16, "temperature": 0, "logprobs": 20,
                    "frequency_penalty": frequency, "presence_penalty": presence}),
        )
        .json();
    let lp = &r["choices"][0]["logprobs"];
    let mut counts: std::collections::HashMap<String, f64> = Default::default();
    let mut overruled = 0;
    for (token, top) in lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .zip(lp["top_logprobs"].as_array().unwrap())
    {
        let token = token.as_str().unwrap();
        let penalized = |t: &str, l: f64| {
            let n = counts.get(t).copied().unwrap_or(0.0);
            l - n * frequency - if n > 0.0 { presence } else { 0.0 }
        };
        let top = top.as_object().unwrap();
        let chosen = penalized(token, top[token].as_f64().unwrap());
        for (t, l) in top {
            assert!(
                chosen >= penalized(t, l.as_f64().unwrap()) - 1e-4,
                "{token:?} over {t:?}"
            );
        }
        let raw_best = top
            .iter()
            .max_by(|a, b| a.1.as_f64().unwrap().total_cmp(&b.1.as_f64().unwrap()))
            .unwrap()
            .0;
        if raw_best != token {
            overruled += 1;
        }
        *counts.entry(token.to_string()).or_default() += 1.0;
    }
    // The penalties did change a choice (the counting goes on without them).
    assert!(overruled > 0, "{}", r["choices"][0]["text"]);
    let plain = server
        .post(
            "/v1/completions",
            &json!({"prompt": "1, 2, 3, 4, 5,", "max_tokens": 16, "temperature": 0}),
        )
        .json();
    assert!(
        plain["choices"][0]["text"]
            .as_str()
            .unwrap()
            .starts_with(" 6, 7, 8, 9,"),
        "{plain}"
    );
}

#[test]
fn cors_only_for_the_given_origins_and_allowed_hosts_pass() {
    let server = Server::start(&[
        "-c",
        "64",
        "--parallel",
        "1",
        "--api-key",
        "k1",
        "--cors-origin",
        "http://soc.example:3000",
        "--allow-host",
        "airlock.internal",
    ]);
    let a = server.addr;
    // A preflight from the allowed origin is answered without a key.
    let r = http(
        a,
        "OPTIONS",
        "/v1/chat/completions",
        &[
            "Origin: http://soc.example:3000",
            "Access-Control-Request-Method: POST",
            "Access-Control-Request-Headers: authorization, content-type",
        ],
        b"",
    );
    assert_eq!(r.status, 204, "{}", r.headers);
    assert_eq!(
        r.header("access-control-allow-origin").as_deref(),
        Some("http://soc.example:3000")
    );
    let allow = r
        .header("access-control-allow-headers")
        .unwrap()
        .to_lowercase();
    assert!(allow.contains("authorization") && allow.contains("content-type"));
    // Its requests get the header (errors too); another origin's get none.
    let r = http(
        a,
        "GET",
        "/v1/models",
        &[
            "Authorization: Bearer k1",
            "Origin: http://soc.example:3000",
        ],
        b"",
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("access-control-allow-origin").as_deref(),
        Some("http://soc.example:3000")
    );
    let r = http(
        a,
        "GET",
        "/v1/models",
        &["Origin: http://soc.example:3000"],
        b"",
    );
    assert_eq!(r.status, 401);
    assert!(r.header("access-control-allow-origin").is_some());
    for origin in ["http://evil.example", "http://soc.example:3001", "null"] {
        let r = http(
            a,
            "GET",
            "/v1/models",
            &["Authorization: Bearer k1", &format!("Origin: {origin}")],
            b"",
        );
        assert!(
            r.header("access-control-allow-origin").is_none(),
            "{origin}"
        );
        let r = http(
            a,
            "OPTIONS",
            "/v1/models",
            &[
                &format!("Origin: {origin}"),
                "Access-Control-Request-Method: GET",
            ],
            b"",
        );
        assert_ne!(r.status, 204, "{origin}");
    }
    // --allow-host lets a proxy's name through; other names are still refused.
    let ok = http_for(a, "airlock.internal", "GET", "/health", &[], b"");
    assert_eq!(ok.status, 200);
    http_for(
        a,
        "airlock.internal.evil.example",
        "GET",
        "/health",
        &[],
        b"",
    )
    .error(403);
}

#[test]
fn the_timeout_ends_a_running_request_and_refuses_a_queued_one() {
    // One slot, 4096 positions: a request without max_tokens would run for many seconds.
    let server = Server::start(&["--parallel", "1", "-c", "4096", "--timeout", "1.5"]);
    let a = server.addr;
    let t0 = Instant::now();
    let r = server.post(
        "/v1/completions",
        &json!({"prompt": "Once upon a time", "temperature": 0, "ignore_eos": true}),
    );
    let took = t0.elapsed();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let n = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(n > 0 && n < 4000, "{n}");
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(30),
        "{took:?}"
    );
    server.wait_log("timed out (--timeout) after", Duration::from_secs(10));
    assert_eq!(metric(&metrics(a), "airlock_requests_timed_out_total"), 1.0);
    // The slot is free again.
    let r = server.post("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 2}));
    assert_eq!(r.status, 200);

    // A queued request times out when the slot stays taken past its deadline: here by one
    // long step, a prompt of hundreds of tokens read in one -b chunk (seconds on one
    // thread), while the limit is 0.3 s.
    let server = Server::start(&[
        "--parallel",
        "1",
        "-c",
        "1024",
        "-b",
        "1024",
        "--timeout",
        "0.3",
    ]);
    let a = server.addr;
    let long = json!({"prompt": "The incident response team reviewed the firewall logs. ".repeat(90), "max_tokens": 4});
    let holder = std::thread::spawn(move || {
        http(
            a,
            "POST",
            "/v1/completions",
            &[],
            long.to_string().as_bytes(),
        )
    });
    server.wait_log("started in slot", Duration::from_secs(30));
    let e = server
        .post("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 2}))
        .error(503);
    assert_eq!(e["code"], "timeout");
    assert!(e["message"].as_str().unwrap().contains("--timeout"), "{e}");
    let r = holder.join().unwrap();
    // The holder's own deadline passed during its prompt: it ends there, as "length".
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() < 4, "{v}");
    assert_eq!(metric(&metrics(a), "airlock_requests_timed_out_total"), 2.0);
}

/// A free loopback port (bound and released: another process could take it in between, which
/// on a test machine does not happen in practice).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until something accepts connections on `port`.
fn wait_listening(port: u16, what: &str, log: impl Fn() -> String) {
    let t0 = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{what} never listened on {port}:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A process stopped (and reaped) when dropped: SIGTERM first, SIGKILL after 10 s. nginx's
/// master stops its workers on SIGTERM; SIGKILL left the worker running after the test, bound
/// to its port and holding the test run's stdout open.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn two_instances_behind_nginx_survive_losing_one() {
    support::require("nginx");
    let one = Server::start(&["--parallel", "2", "-c", "256"]);
    let mut two = Server::start(&["--parallel", "2", "-c", "256"]);
    // The documented configuration, with this test's ports.
    let doc = std::fs::read_to_string(support::root().join("docs/nginx-airlock.conf")).unwrap();
    let port = free_port();
    let conf = doc
        .replace("127.0.0.1:8081", &one.addr.to_string())
        .replace("127.0.0.1:8082", &two.addr.to_string())
        .replace(
            "listen 127.0.0.1:8080;",
            &format!("listen 127.0.0.1:{port};"),
        );
    assert_ne!(conf, doc);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    std::fs::write(dir.path().join("airlock.conf"), conf).unwrap();
    // As root, nginx's workers would switch to `nobody`, who cannot use this directory.
    let root = Command::new("id").arg("-u").output().unwrap().stdout == b"0\n";
    std::fs::write(
        dir.path().join("nginx.conf"),
        format!(
            "{}worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n  \
             proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  \
             uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
             include {d}/airlock.conf;\n}}\n",
            if root { "user root;\n" } else { "" }
        ),
    )
    .unwrap();
    let nginx = ["/usr/sbin/nginx", "nginx"]
        .into_iter()
        .find(|n| Command::new(n).arg("-v").output().is_ok())
        .unwrap();
    let _nginx = Reaped(
        Command::new(nginx)
            .args(["-p", &d.to_string(), "-e", &format!("{d}/error.log"), "-c"])
            .arg(dir.path().join("nginx.conf"))
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let error_log = || std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default();
    wait_listening(port, "nginx", error_log);
    let front: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    // 40 requests from 4 clients; after 12 have succeeded, both instances must have served
    // some, and the second is killed while requests are in flight.
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let done = done.clone();
            std::thread::spawn(move || {
                let mut statuses = Vec::new();
                for i in 0..10 {
                    let body = json!({"prompt": format!("Alert {c}-{i}: suspicious login from"), "max_tokens": 8, "temperature": 0});
                    let r = http(front, "POST", "/v1/completions", &[], body.to_string().as_bytes());
                    if r.status == 200 {
                        assert_eq!(r.json()["usage"]["completion_tokens"], 8);
                    }
                    statuses.push(r.status);
                    done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                statuses
            })
        })
        .collect();
    let served = |m: &[(String, f64)]| {
        m.iter()
            .find(|(k, _)| k == "airlock_requests_total{route=\"/v1/completions\",status=\"200\"}")
            .map_or(0.0, |(_, v)| *v)
    };
    let t0 = Instant::now();
    while done.load(std::sync::atomic::Ordering::SeqCst) < 12 {
        assert!(t0.elapsed() < Duration::from_secs(120), "{}", error_log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let (by_one, by_two) = (served(&metrics(one.addr)), served(&metrics(two.addr)));
    assert!(by_one > 0.0 && by_two > 0.0, "{by_one} {by_two}");
    two.child.kill().unwrap();
    two.child.wait().unwrap();
    let statuses: Vec<u16> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    assert_eq!(statuses.len(), 40);
    assert!(
        statuses.iter().all(|&s| s == 200),
        "{statuses:?}\nnginx: {}",
        error_log()
    );
    // The survivor took the rest, and nginx did meet the dead instance (and moved on).
    let after = served(&metrics(one.addr));
    assert!(after > by_one && after < 40.0, "{by_one} -> {after}");
    let log = error_log();
    assert!(
        log.contains("Connection refused") || log.contains("prematurely closed"),
        "{log}"
    );
}

/// Debian's chromedriver on a free port, driving headless Debian chromium over WebDriver
/// (plain HTTP and JSON, so the test needs no client library).
struct Browser {
    _driver: Reaped,
    driver: SocketAddr,
    session: String,
    /// The browser's process, stopped by hand if the driver cannot close it.
    pid: Option<u64>,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Browser {
        let port = free_port();
        let driver = Reaped(
            Command::new("chromedriver")
                .arg(format!("--port={port}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("chromedriver"),
        );
        wait_listening(port, "chromedriver", String::new);
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let profile = tempfile::tempdir().unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                // --no-sandbox: CI runs as root, where chromium's sandbox cannot start.
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                         "--disable-background-networking", "--disable-component-update",
                         "--disable-sync", "--disable-dev-shm-usage", "--window-size=1000,800",
                         format!("--user-data-dir={}", profile.path().display())],
            },
        }}});
        let r = http(addr, "POST", "/session", &[], caps.to_string().as_bytes());
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let v = r.json()["value"].clone();
        Browser {
            _driver: driver,
            driver: addr,
            session: v["sessionId"].as_str().unwrap().to_string(),
            pid: v["capabilities"]["goog:processID"].as_u64(),
            _profile: profile,
        }
    }

    fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let path = format!("/session/{}{path}", self.session);
        // GET and DELETE carry no body (chromedriver waits for one that is announced).
        let body = if body.is_null() {
            String::new()
        } else {
            body.to_string()
        };
        let r = http(self.driver, method, &path, &[], body.as_bytes());
        assert_eq!(
            r.status,
            200,
            "{method} {path}: {}",
            String::from_utf8_lossy(&r.body)
        );
        r.json()["value"].clone()
    }

    fn eval(&self, script: &str) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            json!({"script": script, "args": []}),
        )
    }

    fn element(&self, css: &str) -> String {
        let v = self.call(
            "POST",
            "/element",
            json!({"using": "css selector", "value": css}),
        );
        v["element-6066-11e4-a52e-4f735466cecf"]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn click(&self, css: &str) {
        let e = self.element(css);
        self.call("POST", &format!("/element/{e}/click"), json!({}));
    }

    fn clear(&self, css: &str) {
        let e = self.element(css);
        self.call("POST", &format!("/element/{e}/clear"), json!({}));
    }

    fn type_into(&self, css: &str, text: &str) {
        let e = self.element(css);
        self.call(
            "POST",
            &format!("/element/{e}/value"),
            json!({"text": text}),
        );
    }

    /// Waits until `script` returns true.
    fn wait_for(&self, script: &str, within: Duration) {
        let t0 = Instant::now();
        while self.eval(script) != json!(true) {
            assert!(
                t0.elapsed() < within,
                "the page never got to `{script}`; it shows: {}",
                self.eval("return document.body.innerText")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Closes the browser; the driver is killed after.
        let path = format!("/session/{}", self.session);
        let closed = std::panic::catch_unwind(|| http(self.driver, "DELETE", &path, &[], b""))
            .is_ok_and(|r| r.status == 200);
        if let (false, Some(pid)) = (closed, self.pid) {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
    }
}

fn base64_decode(text: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let bytes: Vec<u8> = text.bytes().filter(|&c| c != b'=').map(val).collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &v)| n | (v as u32) << (18 - 6 * i));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

#[test]
fn the_chat_page_works_in_a_headless_browser() {
    support::require("chromium");
    // Greedy by default, so the page's reply can be compared with the API's.
    let server = Server::start(&[
        "--parallel",
        "2",
        "--api-key",
        "page-key",
        "--temp",
        "0",
        "-c",
        "1024",
    ]);
    let a = server.addr;
    let system = "You are a concise security analyst.";
    let reference = http(
        a,
        "POST",
        "/v1/chat/completions",
        &["Authorization: Bearer page-key"],
        json!({"messages": [{"role": "system", "content": system}, {"role": "user", "content": QUESTION}], "max_tokens": 24})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(reference.status, 200);
    let reference = chat_text(&reference.json());

    let b = Browser::start();
    b.call("POST", "/url", json!({"url": format!("http://{a}/")}));
    // The server wants a key: the page asks for it, then shows the model's name.
    b.wait_for(
        "return !document.getElementById('keyrow').hidden",
        Duration::from_secs(30),
    );
    b.type_into("#key", "page-key");
    b.click("#keysave");
    b.wait_for(
        "return document.getElementById('model').textContent === 'SmolLM2-135M-Instruct.Q4_1.gguf'",
        Duration::from_secs(30),
    );
    b.click("#sysbox summary");
    b.type_into("#system", system);
    b.type_into("#maxtokens", "24");
    b.type_into("#input", QUESTION);
    b.click("#send");
    b.wait_for(
        "const m = document.querySelectorAll('.msg.assistant'); \
         return m.length === 1 && m[0].textContent.length > 0 && document.body.dataset.busy === ''",
        Duration::from_secs(60),
    );
    let shown = b.eval("return document.querySelector('.msg.assistant').textContent");
    assert_eq!(shown, json!(reference));
    let stats = b.eval("return document.getElementById('stats').textContent");
    assert!(
        stats.as_str().unwrap().contains("24 tokens")
            && stats.as_str().unwrap().contains("tokens/s"),
        "{stats}"
    );
    // The stop button: a long reply, cut off once it is streaming; the server frees the slot.
    b.clear("#maxtokens");
    b.type_into("#input", "Write a long story about a firewall.");
    b.click("#send");
    b.wait_for(
        "const m = document.querySelectorAll('.msg.assistant'); \
         return m.length === 2 && m[1].textContent.length > 20",
        Duration::from_secs(60),
    );
    b.click("#stop");
    b.wait_for(
        "return document.querySelectorAll('.msg.assistant')[1].textContent.endsWith('[stopped]')",
        Duration::from_secs(30),
    );
    server.wait_log("client left after", Duration::from_secs(30));

    let shot = b.call("GET", "/screenshot", Value::Null);
    let png = base64_decode(shot.as_str().unwrap());
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let path = support::root().join("target/serve-chat-page.png");
    std::fs::write(&path, png).unwrap();
}

#[test]
fn a_chat_that_outgrows_the_context_drops_its_oldest_turns_and_says_so() {
    let server = Server::start(&["-c", "256", "--parallel", "1"]);
    let system = json!({"role": "system", "content": "You are a terse security assistant."});
    // Six earlier turns of about 45 tokens each: far over 256 with the system prompt.
    let mut messages = vec![system.clone()];
    for i in 0..6 {
        messages.push(json!({"role": "user", "content": format!(
            "Question {i}: which service usually listens on TCP port {}, and how is it hardened?",
            20 + i
        )}));
        messages.push(json!({"role": "assistant", "content": format!(
            "Answer {i}: see the vendor's hardening guide for port {} and restrict access.",
            20 + i
        )}));
    }
    messages.push(json!({"role": "user", "content": "Last question: what is SSH?"}));
    let body = |m: &[Value], stream: bool| {
        json!({"messages": m, "max_tokens": 8, "temperature": 0, "stream": stream,
               "stream_options": {"include_usage": true}})
    };
    let r = server.post("/v1/chat/completions", &body(&messages, false));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    let shift = &v["usage"]["context_shift"];
    let dropped = shift["dropped_messages"].as_u64().unwrap() as usize;
    assert_eq!(
        r.header("x-airlock-context-shift"),
        Some(format!("dropped {dropped} messages"))
    );
    // Whole turns (a question and its answer) from the oldest, never the newest.
    assert!(dropped >= 2 && dropped.is_multiple_of(2), "{shift}");
    assert!(dropped < messages.len() - 2, "{shift}");
    assert_eq!(shift["dropped_turns"].as_u64(), Some(dropped as u64 / 2));
    // Down to at most half the context, as `airlock chat` does.
    let prompt_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens <= 128, "{}", v["usage"]);
    assert!(server.log().contains("context shift: dropped"));

    // The answer is the one the kept conversation gets sent alone: the system prompt, then
    // the newest turns; that request fits, so it is not shifted and says nothing.
    let mut kept = vec![system];
    kept.extend_from_slice(&messages[1 + dropped..]);
    let alone = server.post("/v1/chat/completions", &body(&kept, false));
    assert_eq!(alone.status, 200);
    assert_eq!(alone.header("x-airlock-context-shift"), None);
    let alone = alone.json();
    assert!(alone["usage"].get("context_shift").is_none(), "{alone}");
    assert_eq!(
        alone["usage"]["prompt_tokens"].as_u64(),
        Some(prompt_tokens)
    );
    assert_eq!(chat_text(&alone), chat_text(&v));

    // Streaming: the header, and the usage chunk.
    let s = server.post("/v1/chat/completions", &body(&messages, true));
    assert_eq!(
        s.header("x-airlock-context-shift"),
        Some(format!("dropped {dropped} messages"))
    );
    let chunks = stream_chunks(&s);
    assert_eq!(stream_text(&chunks).0, chat_text(&v));
    assert_eq!(
        chunks.last().unwrap()["usage"]["context_shift"]["dropped_messages"].as_u64(),
        Some(dropped as u64)
    );

    // A system prompt that alone fills the context cannot be shifted: 400 with both numbers.
    let huge = vec![
        json!({"role": "system", "content": "word ".repeat(300)}),
        json!({"role": "user", "content": "hello"}),
    ];
    let e = server
        .post("/v1/chat/completions", &body(&huge, false))
        .error(400);
    assert_eq!(e["code"], "context_length_exceeded");
    let msg = e["message"].as_str().unwrap();
    let n: usize = msg
        .split(" take ")
        .nth(1)
        .and_then(|m| m.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{msg}"));
    assert!(n > 256 && msg.contains("256 tokens"), "{msg}");
}

#[test]
fn every_request_field_takes_every_hostile_json_value() {
    // Each field the API reads (and some it does not), set to each hostile JSON value in turn,
    // on every POST route, and the same for a chat message's fields: a 200 or a 400, never a
    // 5xx, a cut connection or a server that stops answering.
    let server = Server::start(&["-c", "64"]);
    let a = server.addr;
    let deep = (0..64).fold(json!(1), |v, _| json!([v]));
    let hostile = [
        json!(null),
        json!(true),
        json!(false),
        json!(0),
        json!(-1),
        json!(1),
        json!(2),
        json!(0.5),
        json!(-0.5),
        json!(1e308),
        json!(-1e308),
        json!(5e-324),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(""),
        json!("x"),
        json!("\u{1F642}\u{0}<|im_end|>"),
        json!("y".repeat(3000)),
        json!([]),
        json!([null]),
        json!([1, "a"]),
        json!([[1, 2]]),
        json!([-1, 4294967296u64]),
        json!({}),
        json!({"type": "json_object", "include_usage": true}),
        deep,
    ];
    let fields = [
        "prompt",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "n",
        "echo",
        "logprobs",
        "top_logprobs",
        "presence_penalty",
        "frequency_penalty",
        "repeat_penalty",
        "repeat_last_n",
        "ignore_eos",
        "cache_prompt",
        "response_format",
        "tools",
        "logit_bias",
        "model",
        "user",
        "content",
        "tokens",
        "add_special",
        "parse_special",
        "with_pieces",
    ];
    let routes = [
        (
            "/v1/completions",
            json!({"prompt": "Hi", "max_tokens": 2, "temperature": 0}),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
        ),
        ("/tokenize", json!({"content": "Hi"})),
        ("/detokenize", json!({"tokens": [1, 2]})),
    ];
    let check = |path: &str, body: &Value| {
        // A handler that panics cuts the connection: name the request, not the reader.
        let sent = || http(a, "POST", path, &[], body.to_string().as_bytes());
        let r = std::panic::catch_unwind(sent)
            .unwrap_or_else(|_| panic!("{path} {body}: no HTTP response\n{}", server.log()));
        assert!(
            r.status == 200 || r.status == 400,
            "{path} {body}: {} {}\n{}",
            r.status,
            String::from_utf8_lossy(&r.body),
            server.log()
        );
        r.status
    };
    let mut statuses = [0usize; 2];
    for (path, base) in &routes {
        for field in fields {
            for v in &hostile {
                let mut body = base.clone();
                body[field] = v.clone();
                statuses[usize::from(check(path, &body) == 400)] += 1;
            }
        }
    }
    for field in ["role", "content", "name", "tool_calls"] {
        for v in &hostile {
            let mut body = routes[1].1.clone();
            body["messages"][0][field] = v.clone();
            statuses[usize::from(check(routes[1].0, &body) == 400)] += 1;
        }
    }
    // Both answers were reached: the values are not all refused, nor all ignored.
    assert!(statuses[0] > 0 && statuses[1] > 0, "{statuses:?}");
    assert_eq!(http(a, "GET", "/health", &[], b"").status, 200);
    let r = server.post("/v1/completions", &routes[0].1);
    assert_eq!(r.status, 200);
}
