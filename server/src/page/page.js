'use strict';
// airlock's chat page: talks to this server's own OpenAI-compatible API (relative URLs, so it
// also works behind a proxy's path prefix). Nothing is loaded from anywhere else.
(function () {
  const $ = (id) => document.getElementById(id);
  let key = sessionStorage.getItem('airlock-key') || '';
  let history = [];
  let controller = null;

  function headers() {
    const h = { 'Content-Type': 'application/json' };
    if (key) h.Authorization = 'Bearer ' + key;
    return h;
  }

  function needKey(note) {
    $('keyrow').hidden = false;
    $('keynote').textContent = note || '';
    $('key').focus();
  }

  async function loadModel() {
    try {
      const r = await fetch('v1/models', { headers: headers() });
      if (r.status === 401) {
        $('model').textContent = 'this server needs an API key';
        needKey(key ? 'that key was refused' : '');
        return;
      }
      const j = await r.json();
      $('model').textContent = j.data[0].id;
      $('keyrow').hidden = !key;
      $('keynote').textContent = '';
      document.body.dataset.ready = '1';
    } catch (e) {
      $('model').textContent = 'server unreachable: ' + e.message;
    }
  }

  function addMessage(role, text) {
    const div = document.createElement('div');
    div.className = 'msg ' + role;
    div.textContent = text;
    $('log').appendChild(div);
    div.scrollIntoView({ block: 'end' });
    return div;
  }

  function setBusy(busy) {
    $('send').disabled = busy;
    $('stop').disabled = !busy;
    document.body.dataset.busy = busy ? '1' : '';
  }

  function note(div, text) {
    const span = document.createElement('span');
    span.className = 'note';
    span.textContent = text;
    div.appendChild(span);
  }

  async function send(ev) {
    ev.preventDefault();
    const text = $('input').value.trim();
    if (!text || controller) return;
    $('input').value = '';
    history.push({ role: 'user', content: text });
    addMessage('user', text);
    const out = addMessage('assistant', '');
    const messages = [];
    const system = $('system').value.trim();
    if (system) messages.push({ role: 'system', content: system });
    messages.push(...history);
    const request = { messages, stream: true, stream_options: { include_usage: true } };
    const maxTokens = parseInt($('maxtokens').value, 10);
    if (maxTokens > 0) request.max_tokens = maxTokens;
    const temperature = parseFloat($('temperature').value);
    if (temperature >= 0) request.temperature = temperature;
    controller = new AbortController();
    setBusy(true);
    $('stats').textContent = 'waiting\u2026';
    let reply = '';
    let first = null;
    let pieces = 0;
    let tokens = null;
    let failed = false;
    const showRate = () => {
      const n = tokens === null ? pieces : tokens;
      const secs = first === null ? 0 : (performance.now() - first) / 1000;
      $('stats').textContent = n + ' tokens' + (secs > 0 ? ', ' + (n / secs).toFixed(1) + ' tokens/s' : '');
    };
    try {
      const r = await fetch('v1/chat/completions', {
        method: 'POST',
        headers: headers(),
        body: JSON.stringify(request),
        signal: controller.signal,
      });
      if (!r.ok) {
        let msg = r.status + ' ' + r.statusText;
        try { msg = (await r.json()).error.message; } catch (_) { /* not JSON */ }
        if (r.status === 401) needKey('the server refused the key');
        throw new Error(msg);
      }
      const reader = r.body.getReader();
      const dec = new TextDecoder();
      let buf = '';
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true });
        let cut;
        while ((cut = buf.indexOf('\n\n')) >= 0) {
          const event = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          for (const line of event.split('\n')) {
            if (!line.startsWith('data:')) continue;
            const data = line.slice(5).trim();
            if (data === '[DONE]') continue;
            const c = JSON.parse(data);
            if (c.error) throw new Error(c.error.message);
            if (c.usage) tokens = c.usage.completion_tokens;
            const delta = c.choices && c.choices[0] && c.choices[0].delta;
            if (delta && delta.content) {
              if (first === null) first = performance.now();
              pieces += 1;
              reply += delta.content;
              out.textContent = reply;
              out.scrollIntoView({ block: 'end' });
            }
          }
        }
        showRate();
      }
      showRate();
    } catch (e) {
      if (e.name === 'AbortError') {
        note(out, reply ? ' [stopped]' : '[stopped]');
        showRate();
      } else {
        failed = !reply;
        out.classList.add('error');
        out.textContent = reply;
        note(out, (reply ? ' ' : '') + 'error: ' + e.message);
        $('stats').textContent = '';
      }
    } finally {
      // The reply so far stays in the history, so the next turn's prompt matches what the
      // server's slot already holds (prompt reuse).
      // A request that failed before any reply is taken back, so it can be sent again.
      if (failed) history.pop();
      else history.push({ role: 'assistant', content: reply });
      controller = null;
      setBusy(false);
      $('input').focus();
    }
  }

  $('composer').addEventListener('submit', send);
  $('input').addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey) send(e);
  });
  $('stop').addEventListener('click', () => { if (controller) controller.abort(); });
  $('clear').addEventListener('click', () => {
    if (controller) controller.abort();
    history = [];
    $('log').textContent = '';
    $('stats').textContent = '';
  });
  $('keyrow').addEventListener('submit', (e) => {
    e.preventDefault();
    key = $('key').value.trim();
    sessionStorage.setItem('airlock-key', key);
    loadModel();
  });
  setBusy(false);
  loadModel();
})();
