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
        let model = smollm2();
        let mut child = Command::new(env!("CARGO_BIN_EXE_airlock"))
            .arg("serve")
            .arg("-m")
            .arg(&model)
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
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
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
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    s.write_all(&request_bytes(addr, method, path, headers, body))
        .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
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
        assert_eq!(last["usage"], plain["usage"]);
        if body.get("stop").is_some() {
            assert_eq!(finish, "stop");
            assert!(text.contains(" 5") && !text.contains(" 7"), "{text:?}");
        }
    }
}

#[test]
fn concurrent_seeded_clients_match_their_text_alone() {
    let server = Server::start(&["--parallel", "4"]);
    let requests: Vec<(&str, Value)> = (0..6u64)
        .map(|i| {
            if i % 2 == 0 {
                (
                    "/v1/chat/completions",
                    json!({"messages": [{"role": "user", "content": format!("Name {} ways to detect malware.", i + 2)}],
                           "max_tokens": 32, "temperature": 1.0, "seed": 100 + i, "stream": i % 4 == 0}),
                )
            } else {
                (
                    "/v1/completions",
                    json!({"prompt": format!("Incident report {i}: the attacker"), "max_tokens": 32,
                           "temperature": 0.9, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": 200 + i, "stream": i == 3}),
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
    let body = json!({"prompt": "Once upon a time", "max_tokens": 48, "temperature": 0, "ignore_eos": true, "stream": true}).to_string();
    let mut s = TcpStream::connect(a).unwrap();
    s.write_all(&request_bytes(
        a,
        "POST",
        "/v1/completions",
        &[],
        body.as_bytes(),
    ))
    .unwrap();
    let mut got = read_until(&mut s, "\"text\":\"").into_bytes();
    let kill = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    server.wait_log("SIGTERM", Duration::from_secs(30));
    // The stream in flight runs to its end.
    s.read_to_end(&mut got).unwrap();
    let resp = parse_response(&got);
    let chunks = stream_chunks(&resp);
    let (_, finish) = stream_text(&chunks);
    assert_eq!(finish, "length");
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = server.child.try_wait().unwrap() {
            break st;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "still running");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}\n{}", server.log());
    assert!(TcpStream::connect(a).is_err());
}

#[test]
fn a_non_streaming_client_that_hangs_up_frees_its_slot() {
    let server = Server::start(&["--parallel", "1", "-c", "4096"]);
    let a = server.addr;
    // No max_tokens and no end: it would run for seconds, to the end of the context.
    let body =
        json!({"prompt": "Once upon a time", "temperature": 0, "ignore_eos": true}).to_string();
    let mut s = TcpStream::connect(a).unwrap();
    s.write_all(&request_bytes(
        a,
        "POST",
        "/v1/completions",
        &[],
        body.as_bytes(),
    ))
    .unwrap();
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
    let a = server.addr;
    let body =
        json!({"prompt": "Once upon a time", "temperature": 0, "ignore_eos": true, "stream": true})
            .to_string();
    let mut s = TcpStream::connect(a).unwrap();
    s.write_all(&request_bytes(
        a,
        "POST",
        "/v1/completions",
        &[],
        body.as_bytes(),
    ))
    .unwrap();
    read_until(&mut s, "\"text\":\"");
    let t0 = Instant::now();
    let kill = Command::new("kill")
        .args(["-INT", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = loop {
        if let Some(st) = server.child.try_wait().unwrap() {
            break st;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "still running");
        std::thread::sleep(Duration::from_millis(20));
    };
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
    let a = server.addr;
    let body = json!({"prompt": "Once upon a time", "max_tokens": 200, "temperature": 0, "ignore_eos": true, "stream": true}).to_string();
    let mut s = TcpStream::connect(a).unwrap();
    s.write_all(&request_bytes(
        a,
        "POST",
        "/v1/completions",
        &[],
        body.as_bytes(),
    ))
    .unwrap();
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
    let kill = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = server.child.try_wait().unwrap() {
            break st;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "still running");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}\n{}", server.log());
}
