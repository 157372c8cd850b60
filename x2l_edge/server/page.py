"""The small web page served at / (plain HTML + fetch; no build step, no external assets)."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>x2l-edge</title>
<style>
body{font-family:system-ui,sans-serif;max-width:52rem;margin:1.5rem auto;padding:0 1rem;color:#222}
h1{font-size:1.3rem} fieldset{margin:.8rem 0;border:1px solid #ccc} #answer{white-space:pre-wrap;
border:1px solid #ccc;min-height:3rem;padding:.5rem;background:#fafafa} #ranges li{font-family:monospace}
input[type=text]{width:70%} .muted{color:#777;font-size:.9rem} img.thumb{height:64px;vertical-align:middle;margin-left:.5rem}
</style></head><body>
<h1>x2l-edge &mdash; ask a video</h1>
<p class="muted" id="model">model: &hellip;</p>
<fieldset><legend>1. Index a video</legend>
<input type="file" id="file" accept="video/*"> <button id="upload">Upload and index</button>
<div class="muted" id="upstatus"></div></fieldset>
<fieldset><legend>2. Pick an index</legend>
<select id="index"></select> <button id="refresh">Refresh</button></fieldset>
<fieldset><legend>3. Ask</legend>
<input type="text" id="question" value="What is the secret word?"> <button id="ask">Ask</button>
<p>API key (if the server needs one): <input type="password" id="key" size="20"></p></fieldset>
<h2>Answer</h2><div id="answer"></div>
<h2>Reloaded time ranges</h2><ul id="ranges"></ul>
<script>
const $ = id => document.getElementById(id);
const hdr = () => { const k = $('key').value; return k ? {'Authorization': 'Bearer ' + k} : {}; };
async function refresh() {
  const m = await fetch('/v1/models', {headers: hdr()}).then(r => r.json()).catch(() => null);
  if (m && m.data) $('model').textContent = 'model: ' + m.data[0].id;
  const r = await fetch('/v1/videos', {headers: hdr()}).then(r => r.json()).catch(() => ({data: []}));
  const sel = $('index'); sel.innerHTML = '';
  for (const v of (r.data || [])) {
    const o = document.createElement('option'); o.value = v.id;
    o.textContent = v.id + ' (' + v.status + (v.duration_s ? ', ' + v.duration_s + ' s' : '') + ')';
    sel.appendChild(o);
  }
}
$('refresh').onclick = refresh;
$('upload').onclick = async () => {
  const f = $('file').files[0]; if (!f) return;
  const fd = new FormData(); fd.append('file', f);
  const r = await fetch('/v1/videos', {method: 'POST', body: fd, headers: hdr()}).then(r => r.json());
  $('upstatus').textContent = r.id ? 'indexing ' + r.id : JSON.stringify(r);
  const poll = async () => {
    const s = await fetch('/v1/videos/' + r.id, {headers: hdr()}).then(r => r.json());
    $('upstatus').textContent = s.id + ': ' + s.status + ' ' + (s.progress.chunks_done || 0) + '/' +
      (s.progress.chunks_total || '?') + ' chunks';
    if (s.status === 'queued' || s.status === 'indexing') setTimeout(poll, 700); else refresh();
  };
  if (r.id) poll();
};
$('ask').onclick = async () => {
  $('answer').textContent = ''; $('ranges').innerHTML = '';
  const streamed = params.get('stream') !== '0';
  const body = {model: 'x', stream: streamed, temperature: 0, max_tokens: 64, messages: [{role: 'user', content: [
    {type: 'video_index', video_index: {id: $('index').value}}, {type: 'text', text: $('question').value}]}]};
  const resp = await fetch('/v1/chat/completions', {method: 'POST', body: JSON.stringify(body),
    headers: Object.assign({'Content-Type': 'application/json'}, hdr())});
  if (!resp.ok) { $('answer').textContent = await resp.text(); return; }
  if (!streamed) {  // one JSON answer (?stream=0)
    const out = await resp.json();
    $('answer').textContent = out.choices[0].message.content;
    showRanges(out.x2l);
    return;
  }
  const reader = resp.body.getReader(); const dec = new TextDecoder(); let buf = '';
  for (;;) {
    const {value, done} = await reader.read(); if (done) break;
    buf += dec.decode(value, {stream: true});
    let i; while ((i = buf.indexOf('\\n\\n')) >= 0) {
      const line = buf.slice(0, i).replace(/^data: /, ''); buf = buf.slice(i + 2);
      if (line === '[DONE]') continue;
      const ev = JSON.parse(line);
      if (ev.error) { $('answer').textContent += '\\n[error] ' + ev.error.message; continue; }
      const c = ev.choices && ev.choices[0];
      if (c && c.delta && c.delta.content) $('answer').textContent += c.delta.content;
      if (ev.x2l) showRanges(ev.x2l);
    }
  }
};
function showRanges(x2l) {
  if (!x2l) return;
  for (const ch of x2l.chunks) {
    const li = document.createElement('li');
    li.className = 'range';
    li.textContent = 'chunk ' + ch.chunk + ': ' + ch.start_s + ' s - ' + ch.end_s + ' s (score ' + ch.score + ') ';
    $('ranges').appendChild(li);
    if (x2l.index) thumb(x2l.index, ch.chunk, li);
  }
}
async function thumb(id, chunk, parent) {
  // fetched (not <img src>) so that the API key header goes with it
  const r = await fetch('/v1/videos/' + id + '/chunks/' + chunk + '/thumbnail', {headers: hdr()});
  if (!r.ok) return;
  const img = document.createElement('img');
  img.src = URL.createObjectURL(await r.blob()); img.className = 'thumb'; img.alt = 'chunk ' + chunk;
  parent.appendChild(img);
}
// /?index=vid-...&q=question asks at once (links, and the headless test)
const params = new URLSearchParams(location.search);
refresh().then(() => {
  if (params.get('q')) $('question').value = params.get('q');
  if (params.get('index')) {
    const id = params.get('index');
    if (![...$('index').options].some(o => o.value === id)) {
      const o = document.createElement('option'); o.value = id; o.textContent = id; $('index').appendChild(o);
    }
    $('index').value = id;
    if (params.get('q')) $('ask').onclick();
  }
});
</script></body></html>
"""
