"""`airlock serve` driven by the official OpenAI Python client (PyPI `openai`), unchanged: what
analysts' scripts, notebooks and chat front ends use. The server is the airlock binary
(AIRLOCK_BIN) on an ephemeral loopback port with the real SmolLM2 model and an API key.
"""

import os
import subprocess
import threading
from pathlib import Path

import openai
import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("AIRLOCK_BIN", str(ROOT / "target" / "debug" / "airlock"))
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
KEY = "compat-key-1"
QUESTION = "What is a SQL injection attack?"


@pytest.fixture(scope="module")
def server():
    assert MODEL.exists(), f"{MODEL} is missing: run scripts/fetch-models.sh"
    proc = subprocess.Popen(
        [BIN, "serve", "-m", str(MODEL), "-t", "1", "-c", "512", "--parallel", "2",
         "--port", "0", "--api-key", KEY],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    found = threading.Event()
    addr = []
    log = []

    def read():
        for line in proc.stderr:
            log.append(line)
            if "listening on http://" in line and not addr:
                addr.append(line.split("listening on http://")[1].split()[0])
                found.set()

    threading.Thread(target=read, daemon=True).start()
    if not found.wait(60):
        proc.kill()
        pytest.fail("the server did not start:\n" + "".join(log))
    yield f"http://{addr[0]}/v1"
    proc.terminate()
    assert proc.wait(30) == 0, "".join(log)


def client(base, key=KEY):
    # No retries: a failure must show as one, not as a slow success.
    return openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=120)


def test_models_lists_the_served_file(server):
    models = client(server).models.list()
    ids = [m.id for m in models.data]
    assert ids == ["SmolLM2-135M-Instruct.Q4_1.gguf"]


def test_chat_and_its_stream_give_the_same_text(server):
    c = client(server)
    messages = [{"role": "user", "content": QUESTION}]
    r = c.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=24, temperature=0)
    assert r.object == "chat.completion"
    assert r.model == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert r.system_fingerprint.startswith("airlock-")
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    stream = c.chat.completions.create(
        model="gpt-4o", messages=messages, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
    assert text == choice.message.content
    assert finish == choice.finish_reason
    assert usage.completion_tokens == r.usage.completion_tokens
    # The same prompt again: all but its last token came from the slot's cache.
    assert usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens - 1


def test_chat_logprobs_parse(server):
    r = client(server).chat.completions.create(
        model="x", messages=[{"role": "user", "content": QUESTION}], max_tokens=4,
        temperature=0, logprobs=True, top_logprobs=3,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.token == t.top_logprobs[0].token
    assert "".join(t.token for t in content) == r.choices[0].message.content


def test_completions_plain_and_streamed(server):
    c = client(server)
    prompt = "The three most common causes of a data breach are"
    r = c.completions.create(model="x", prompt=prompt, max_tokens=16, temperature=0, seed=3)
    assert r.object == "text_completion"
    text = r.choices[0].text
    assert text
    streamed = "".join(
        ch.choices[0].text
        for ch in c.completions.create(model="x", prompt=prompt, max_tokens=16, temperature=0,
                                       seed=3, stream=True)
        if ch.choices
    )
    assert streamed == text


def test_a_bad_key_is_an_authentication_error(server):
    with pytest.raises(openai.AuthenticationError) as e:
        client(server, key="wrong").chat.completions.create(
            model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert e.value.status_code == 401
    assert "invalid API key" in str(e.value)


def test_unsupported_parameters_are_bad_requests(server):
    with pytest.raises(openai.BadRequestError) as e:
        client(server).chat.completions.create(
            model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=2, n=2)
    assert "`n`" in str(e.value)
