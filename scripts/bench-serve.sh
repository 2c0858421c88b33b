#!/usr/bin/env bash
# airlock serve against llama.cpp's llama-server on the same GGUF: same threads, 8 slots each,
# the same context per slot (llama-server's -c is the total, so it gets 8x), in rounds that
# alternate which server goes first (a shared host's speed drifts between runs more than the
# servers differ). For each server it measures:
#   - aggregate completion tokens/s with 1, 2, 4 and 8 concurrent clients: non-streaming
#     /v1/completions, temperature 0, ignore_eos, --tokens (64) each, distinct prompts (so no
#     prompt cache helps), --requests (2) per client, back to back;
#   - time to first token of a ~512-token streamed prompt on the idle server, and again while
#     4 other streams decode (the issue's target: at most 2x the idle figure);
#   - how long GET /health takes (p50, p99, max; one probe every 50 ms) while the most clients
#     run: is the HTTP side responsive while the compute threads are busy?
# Then, once, airlock alone for the -t advice in the README: /health latency while the most
# clients decode (one request of 2x --tokens each), at each -t of --health-threads (default:
# THREADS and THREADS-1, e.g. 2 and 1 on a 2-core host: compute threads as many as the cores,
# or one core left to the HTTP side).
#
#   scripts/bench-serve.sh MODEL.gguf [-t THREADS] [--rounds 2] [--clients 1,2,4,8] [--tokens 64]
#                          [--requests 2] [--ctx 1024] [--health-threads T,T-1] [--airlock-only]
#
# About 5 minutes on a quiet 2-core host for the 1B-shape Q4_0 file with the defaults (each
# server-round about a minute, the -t phase under one). --health-threads 0 skips that phase.
# --airlock-only measures airlock alone (no llama-server needed; no ratios between servers).
# llama-server comes from ../shared/tools/llama-cpp-anchor.sh (or LLAMA_SERVER=path); AIRLOCK_BIN=path
# runs that airlock binary instead of building target/release/airlock.
# The issue's file, Llama-3.2-1B-shaped Q4_0 with random weights:
#   target/release/airlock bench --synthetic llama-3.2-1b --type q4_0 --save /tmp/l1b-q4_0.gguf -p 1 -n 0 -r 1
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { sed -n 2,27p "$0" >&2; exit 2; }
model=$1; shift
threads=$(nproc); rounds=2; clients=1,2,4,8; tokens=64; requests=2; ctx=1024; servers="llama airlock"
health_threads=
while [ $# -gt 0 ]; do
  case "$1" in
    -t) threads=$2; shift ;;
    --health-threads) health_threads=$2; shift ;;
    --rounds) rounds=$2; shift ;;
    --clients) clients=$2; shift ;;
    --tokens) tokens=$2; shift ;;
    --requests) requests=$2; shift ;;
    --ctx) ctx=$2; shift ;;
    --airlock-only) servers=airlock ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$health_threads" ]; then
  health_threads=$threads
  [ "$threads" -le 1 ] || health_threads="$threads,$((threads - 1))"
fi
LS=${LLAMA_SERVER:-$HOME/.cache/llama-cpp-anchor/build/bin/llama-server}
[ "$servers" = airlock ] || [ -x "$LS" ] || { echo "llama-server not found: run ../shared/tools/llama-cpp-anchor.sh or set LLAMA_SERVER" >&2; exit 1; }
# AIRLOCK_BIN=path uses a binary already built instead of building target/release/airlock.
if [ -n "${AIRLOCK_BIN:-}" ]; then A=$AIRLOCK_BIN; else cargo build --release --quiet; A=target/release/airlock; fi
slots=8
out=$(mktemp -d)
pid=
cleanup() { [ -z "$pid" ] || kill "$pid" 2>/dev/null || true; rm -rf "$out"; }
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# One server's measurements, into $out/NAME.ROUND.json (MODE full: everything; health: only
# /health latency while the most clients decode).
measure() { # mode name round command...
  local mode=$1 name=$2 round=$3; shift 3
  local p; p=$(port)
  "$@" --port "$p" >"$out/$name.$round.log" 2>&1 &
  pid=$!
  python3 - "$p" "$name" "$round" "$clients" "$tokens" "$requests" "$ctx" "$mode" >"$out/$name.$round.json" <<'PY'
import json, sys, threading, time, urllib.request, http.client
port, name, rnd, clients = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
tokens, requests, ctx, mode = int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7]), sys.argv[8]
base = f"http://127.0.0.1:{port}"
t0 = time.time()
while True:
    try:
        if urllib.request.urlopen(base + "/health", timeout=2).status == 200:
            break
    except Exception:
        pass
    if time.time() - t0 > 300:
        sys.exit(f"{name} did not become healthy")
    time.sleep(0.2)

WORDS = ("alert firewall host process user login network packet domain hash file service "
         "registry token session policy audit event signal threat beacon payload").split()

def prompt(tag, n_words):
    # Distinct from the first word on, so no server can reuse another request's prompt cache.
    return f"[{tag}] " + " ".join(WORDS[(i * 7 + len(tag)) % len(WORDS)] for i in range(n_words))

def post(body):
    c = http.client.HTTPConnection("127.0.0.1", int(port), timeout=600)
    c.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    data = json.loads(r.read())
    c.close()
    if r.status != 200:
        sys.exit(f"{name}: {r.status} {data}")
    return data

post({"prompt": prompt(f"warm {rnd}", 16), "max_tokens": 4, "temperature": 0})
result = {"throughput": {}, "ttft": {}}
most = max(map(int, clients.split(",")))

def run_clients(c, n_requests, n_tokens, tag, probe_health):
    """c clients, each n_requests back to back; returns (tokens, wall seconds) and, with
    probe_health, puts /health latencies (ms: p50, p99, max, probes) in result."""
    done = []
    def client(k):
        for i in range(n_requests):
            r = post({"prompt": prompt(f"{tag}.{c}.{k}.{i}", 24), "max_tokens": n_tokens,
                      "temperature": 0, "ignore_eos": True})
            done.append(r["usage"]["completion_tokens"])
    ts = [threading.Thread(target=client, args=(k,)) for k in range(c)]
    # GET /health every 50 ms, one at a time, on a fresh connection each (as a load
    # balancer's probe): does the HTTP side stay responsive while the compute threads are busy?
    probe_stop, lat = threading.Event(), []
    def probe():
        while not probe_stop.is_set():
            t1 = time.time()
            urllib.request.urlopen(base + "/health", timeout=60).read()
            lat.append(time.time() - t1)
            probe_stop.wait(0.05)
    pt = threading.Thread(target=probe)
    t = time.time()
    for th in ts: th.start()
    if probe_health: pt.start()
    for th in ts: th.join()
    wall = time.time() - t
    probe_stop.set()
    if probe_health:
        pt.join()
        lat.sort()
        q = lambda f: 1000 * lat[min(len(lat) - 1, int(f * len(lat)))]
        result["health_ms"] = [q(0.5), q(0.99), 1000 * lat[-1], len(lat)]
    assert sum(done) == c * n_requests * n_tokens, done
    return sum(done), wall

if mode == "health":
    run_clients(most, 1, 2 * tokens, f"health {rnd}", True)
    print(json.dumps(result))
    sys.exit(0)

for c in map(int, clients.split(",")):
    n, wall = run_clients(c, requests, tokens, rnd, c == most)
    result["throughput"][c] = n / wall

def stream(body, first_token=None, stop=None):
    """Streams a completion; sets first_token (an Event) at the first text and returns the
    seconds to it; reads until `stop` is set (then hangs up) or the end."""
    c = http.client.HTTPConnection("127.0.0.1", int(port), timeout=600)
    t = time.time()
    c.request("POST", "/v1/completions", json.dumps(dict(body, stream=True)), {"Content-Type": "application/json"})
    r = c.getresponse()
    ttft = None
    while True:
        line = r.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data:") or line.endswith(b"[DONE]"):
            continue
        chunk = json.loads(line[5:])
        if ttft is None and chunk.get("choices") and chunk["choices"][0].get("text"):
            ttft = time.time() - t
            if first_token is not None:
                first_token.set()
            if stop is None:
                break
        if stop is not None and stop.is_set():
            break
    c.close()
    return ttft

long_words = 470  # about 512 tokens with the Llama 3 tokenizer (measured below)
n_prompt = post({"prompt": prompt("count", long_words), "max_tokens": 1})["usage"]["prompt_tokens"]
result["ttft_prompt_tokens"] = n_prompt
result["ttft"]["idle"] = stream({"prompt": prompt(f"idle {rnd}", long_words), "max_tokens": 4, "temperature": 0})
stop = threading.Event()
started = [threading.Event() for _ in range(4)]
bg = [threading.Thread(target=stream, args=({"prompt": prompt(f"bg {rnd} {k}", 24), "max_tokens": ctx - 64,
                                              "temperature": 0, "ignore_eos": True}, started[k], stop)) for k in range(4)]
for th in bg: th.start()
for e in started: e.wait(600)
time.sleep(0.5)
result["ttft"]["busy"] = stream({"prompt": prompt(f"busy {rnd}", long_words), "max_tokens": 4, "temperature": 0})
stop.set()
for th in bg: th.join()
print(json.dumps(result))
PY
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
}

run_airlock() { measure full airlock "$1" "$A" serve -m "$model" -t "$threads" --parallel "$slots" -c "$ctx"; }
run_llama() { [ "$servers" = airlock ] || measure full llama "$1" "$LS" -m "$model" -t "$threads" -np "$slots" -c $((slots * ctx)) --host 127.0.0.1; }

echo "model $model, $threads threads, $slots slots of $ctx tokens, $tokens tokens per request, $requests requests per client, $rounds rounds; $(lscpu | sed -n 's/^Model name:[[:space:]]*//p'); $(date -u '+%Y-%m-%d %H:%M UTC')"
for r in $(seq 1 "$rounds"); do
  if [ $((r % 2)) = 1 ]; then run_llama "$r"; run_airlock "$r"; else run_airlock "$r"; run_llama "$r"; fi
done
# The -t advice: airlock's /health while the most clients decode, at each --health-threads.
ht=()
for t in ${health_threads//,/ }; do
  [ "$t" -ge 1 ] || continue
  ht+=("$t")
  measure health health "t$t" "$A" serve -m "$model" -t "$t" --parallel "$slots" -c "$ctx"
done

python3 - "$out" "$rounds" "$servers" "$threads" "${ht[*]:-}" <<'PY'
import json, sys, statistics as st
out, rounds, servers, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4]
health_threads = sys.argv[5].split()
res = {n: [json.load(open(f"{out}/{n}.{r}.json")) for r in range(1, rounds + 1)] for n in servers}
nan = float("nan")
if "llama" not in res:
    res["llama"] = [{"throughput": {c: nan for c in r["throughput"]}, "ttft": {"idle": nan, "busy": nan},
                     "health_ms": [nan, nan, nan, 0]} for r in res["airlock"]]
print()
print("| clients | llama-server tok/s per round | airlock tok/s per round | airlock / llama-server (means) | airlock / its 1 client |")
print("| ---: | --- | --- | ---: | ---: |")
a1 = st.mean(r["throughput"]["1"] for r in res["airlock"]) if "1" in res["airlock"][0]["throughput"] else float("nan")
for c in res["airlock"][0]["throughput"]:
    l = [r["throughput"][c] for r in res["llama"]]
    a = [r["throughput"][c] for r in res["airlock"]]
    print(f"| {c} | {', '.join(f'{x:.1f}' for x in l)} | {', '.join(f'{x:.1f}' for x in a)} | "
          f"{st.mean(a) / st.mean(l):.2f}x | {st.mean(a) / a1:.2f}x |")
print()
most = max(int(c) for c in res["airlock"][0]["throughput"])
print(f"| GET /health while {most} clients decode | -t | p50 per round (ms) | p99 per round (ms) | max (ms) | probes |")
print("| --- | ---: | --- | --- | ---: | ---: |")
def health_row(label, t, h):
    print(f"| {label} | {t} | {', '.join(f'{x[0]:.1f}' for x in h)} | {', '.join(f'{x[1]:.1f}' for x in h)} | "
          f"{max(x[2] for x in h):.1f} | {sum(x[3] for x in h)} |")
for name in ("llama", "airlock"):
    health_row("llama-server" if name == "llama" else "airlock", threads, [r["health_ms"] for r in res[name]])
for t in health_threads:
    health_row(f"airlock, 1 request of 2x tokens per client", t,
               [json.load(open(f"{out}/health.t{t}.json"))["health_ms"]])
print()
n = res["airlock"][0]["ttft_prompt_tokens"]
print(f"| time to first token, {n}-token prompt | idle (s) | while 4 streams decode (s) | busy / idle |")
print("| --- | --- | --- | ---: |")
for name in ("llama", "airlock"):
    idle = [r["ttft"]["idle"] for r in res[name]]
    busy = [r["ttft"]["busy"] for r in res[name]]
    print(f"| {'llama-server' if name == 'llama' else 'airlock'} | {', '.join(f'{x:.2f}' for x in idle)} | "
          f"{', '.join(f'{x:.2f}' for x in busy)} | {st.mean(busy) / st.mean(idle):.2f}x |")
PY
