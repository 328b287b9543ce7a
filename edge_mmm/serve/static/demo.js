// edge-mmm live demo page: plain JS, no build step, nothing loaded from outside this server.
// Events arrive as SSE from GET events (read with fetch so the API key can be sent as a header).
"use strict";

const SAMPLE_RATE = 16000;
const FRAME_POLL_MS = 100;       // camera preview refresh
const BROWSER_FRAME_MS = 250;    // browser camera -> POST frame
const BROWSER_AUDIO_MS = 200;    // browser mic -> POST audio
const RECONNECT_MS = 1000;
const MAX_MESSAGES = 30;
const SPEECH_LEAD_S = 0.1;       // spoken audio is scheduled this far ahead: blocks arrive with SSE jitter

// timing fields (runtime timing events: stage "asr" per hypothesis, stage "turn" per answer, stages
// "speculative" / "speculative_asr" for the work done while the user speaks, shown with a spec_ prefix),
// in this order; other numeric fields follow under their own names; ids are not latencies
const LATENCY_LABELS = [
  ["capture_to_vad_s", "capture → VAD"],
  ["asr_s", "ASR (partial hypothesis)"],
  ["spec_asr_s", "speculative final ASR (at the pause)"],
  ["spec_vision_s", "speculative vision (during speech)"],
  ["spec_encodes", "frame encodings during speech"],
  ["spec_prefill_s", "speculative prefill (during speech)"],
  ["spec_prefix_tokens", "prompt tokens prefilled at speech start"],
  ["spec_discarded", "speculations discarded (speech resumed)"],
  ["endpoint_s", "end of speech → VAD end"],
  ["final_pass_lag_s", "end of speech → final ASR pass"],
  ["asr_final_s", "ASR (final)"],
  ["asr_wait_s", "VAD end → final text"],
  ["queue_s", "queued"],
  ["frame_age_s", "frame age"],
  ["preprocess_s", "image preprocess"],
  ["vision_s", "vision encoder (at the turn)"],
  ["prefill_s", "LM prefill (at the turn)"],
  ["ttft_s", "question → first token"],
  ["eos_to_first_token_s", "end of speech → first token"],
  ["eos_to_first_audio_s", "end of speech → first audio out"],
  ["ttfa_s", "question → first audio out"],
  ["first_token_to_audio_s", "first token → first audio out"],
  ["decode_tok_s", "decode tok/s"],
  ["tokens", "answer tokens"],
  ["prompt_tokens", "prompt tokens"],
  ["prompt_reused", "prompt tokens reused (KV cache)"],
  ["answer_s", "whole answer"],
  ["audio_s", "utterance audio"],
];
const NOT_LATENCY = new Set(["turn", "utterance", "took_s"]);
const SPECULATIVE = new Set(["speculative", "speculative_asr"]);

const $ = (id) => document.getElementById(id);
const state = { key: "", pending: [], turns: new Map(), spoken: new Map(), sources: null, connected: false, stats: { events: 0, deltas: 0, lagMsMax: 0, lagMsSum: 0, audioBlocks: 0, audioSamples: 0, audioPeak: 0, speechStops: 0 } };
window.edgeMmmDemo = state.stats; // read by the browser test and handy in the console

// ---------------------------------------------------------------------------------------------
// API key: from the URL fragment (#key=..., never sent to the server in the URL) or the form
// ---------------------------------------------------------------------------------------------
function loadKey() {
  const m = location.hash.match(/key=([^&]+)/);
  if (m) {
    sessionStorage.setItem("edge-mmm-key", decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
  state.key = sessionStorage.getItem("edge-mmm-key") || "";
}

function authHeaders(extra) {
  const h = Object.assign({}, extra || {});
  if (state.key) h["Authorization"] = "Bearer " + state.key;
  return h;
}

function needKey() {
  $("key-form").hidden = false;
  setStatus(false, "API key required");
}

async function api(path, options) {
  const r = await fetch(path, Object.assign({ cache: "no-store" }, options, { headers: authHeaders((options || {}).headers) }));
  if (r.status === 401) needKey();
  return r;
}

function setStatus(ok, text) {
  state.connected = ok;
  const el = $("status");
  el.textContent = text;
  el.className = "status " + (ok ? "on" : "off");
}

function message(kind, text) {
  const li = document.createElement("li");
  li.className = kind;
  li.textContent = new Date().toLocaleTimeString() + "  " + text;
  const list = $("messages");
  list.prepend(li);
  while (list.children.length > MAX_MESSAGES) list.lastChild.remove();
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ---------------------------------------------------------------------------------------------
// conversation: one turn = question (spoken or typed) + streamed answer
// ---------------------------------------------------------------------------------------------
function newTurn(question, how, utterance) {
  const div = document.createElement("div");
  div.className = "turn";
  const q = document.createElement("p");
  q.className = "question final " + how;
  q.textContent = question;
  const a = document.createElement("p");
  a.className = "answer streaming";
  div.append(q, a);
  $("turns").append(div);
  div.scrollIntoView({ block: "end" });
  const turn = { div, answer: a, done: false };
  if (typeof utterance === "number") state.spoken.set(utterance, turn);
  return turn;
}

// the speaker went on after an early endpoint: the earlier question (answered, cut off, or still waiting)
// is withdrawn and asked whole as the next one
function withdraw(utterance) {
  const turn = state.spoken.get(utterance);
  if (!turn) return;
  state.spoken.delete(utterance);
  const waiting = state.pending.indexOf(turn);
  if (waiting >= 0) state.pending.splice(waiting, 1); // never answered: no answer may bind to it
  turn.div.classList.add("withdrawn");
  turn.answer.classList.remove("streaming");
}

// questions are answered in order: the first answer event of turn N binds to the oldest waiting question
function turnFor(id) {
  let t = state.turns.get(id);
  if (!t) {
    t = state.pending.shift() || newTurn("", "none");
    state.turns.set(id, t);
  }
  return t;
}

function textOf(data) {
  if (typeof data.text === "string") return data.text;
  if (typeof data.delta === "string") return data.delta;
  return "";
}

function onPartial(data) {
  const el = $("partial");
  el.replaceChildren();
  const committed = typeof data.committed === "string" ? data.committed : textOf(data);
  const tentative = typeof data.tentative === "string" ? data.tentative : "";
  const c = document.createElement("span");
  c.className = "committed";
  c.textContent = committed;
  const t = document.createElement("span");
  t.className = "tentative";
  t.textContent = (committed && tentative ? " " : "") + tentative;
  el.append(c, t);
}

function onFinal(data) {
  if (data.source !== "text") $("partial").replaceChildren();
  const text = textOf(data).trim();
  if (typeof data.continues === "number") withdraw(data.continues);
  if (text) state.pending.push(newTurn(text, data.source === "text" ? "typed" : "spoken", data.utterance));
  while (state.spoken.size > 32) state.spoken.delete(state.spoken.keys().next().value);
}

function onDelta(data) {
  const turn = turnFor(data.turn);
  turn.answer.append(document.createTextNode(textOf(data)));
  state.stats.deltas += 1;
}

function onDone(data) {
  const turn = turnFor(data.turn);
  const full = textOf(data);
  if (full && turn.answer.textContent.trim() === "") turn.answer.textContent = full;
  turn.answer.classList.remove("streaming");
  if (data.cancelled) turn.answer.classList.add("cancelled");
  else if (data.finish_reason === "loop") turn.answer.classList.add("looped");
  turn.done = true;
  state.turns.delete(data.turn);
}

function fmt(key, value) {
  if (key.endsWith("tok_s")) return value.toFixed(1); // a rate
  if (key === "audio_s") return value.toFixed(2) + " s";
  if (key.endsWith("_s")) return (value * 1000).toFixed(0) + " ms";
  return Number.isInteger(value) ? String(value) : value.toFixed(1);
}

// the last turn's record replaces the previous turn's; live ASR hypotheses fill in between turns
const latency = { turn: new Map(), asr: new Map(), turnId: null };
function numbers(data, prefix) {
  const m = new Map();
  for (const [k, v] of Object.entries(data)) {
    if (typeof v === "number" && Number.isFinite(v) && !NOT_LATENCY.has(k)) m.set((prefix || "") + k, v);
  }
  return m;
}

function onTiming(data) {
  if (data.stage === "speech_out") {
    if (data.turn !== latency.turnId) return; // the spoken part of an older turn
    for (const [k, v] of numbers(data)) latency.turn.set(k, v);
  } else if (data.stage === "turn") {
    latency.turn = numbers(data);
    latency.turnId = data.turn;
    $("latency-turn").textContent = "(turn " + data.turn + ", " + (data.source === "text" ? "typed" : "spoken") + ")";
  } else {
    // work done during speech keeps its own rows: its vision_s / prefill_s are not the turn's
    for (const [k, v] of numbers(data, SPECULATIVE.has(data.stage) ? "spec_" : "")) latency.asr.set(k, v);
  }
  const value = (key) => (latency.turn.has(key) ? latency.turn.get(key) : latency.asr.get(key));
  const keys = new Set([...latency.turn.keys(), ...latency.asr.keys()]);
  const body = $("latency").tBodies[0];
  body.replaceChildren();
  const shown = new Set();
  const row = (label, key) => {
    const tr = document.createElement("tr");
    tr.dataset.key = key;
    const th = document.createElement("th");
    th.textContent = label;
    const td = document.createElement("td");
    td.textContent = fmt(key, value(key));
    tr.append(th, td);
    body.append(tr);
    shown.add(key);
  };
  for (const [key, label] of LATENCY_LABELS) if (keys.has(key) && !shown.has(key)) row(label, key);
  for (const key of keys) if (!shown.has(key)) row(key.replace(/_/g, " "), key);
}

function handle(event) {
  const st = state.stats;
  st.events += 1;
  const lag = Date.now() - 1000 * event.t; // event made -> handled here (same clock only on the same host)
  st.lagMsMax = Math.max(st.lagMsMax, lag);
  st.lagMsSum += lag;
  const data = event.data || {};
  switch (event.type) {
    case "transcript.partial": return onPartial(data);
    case "transcript.final": return onFinal(data);
    case "answer.delta": return onDelta(data);
    case "answer.done": return onDone(data);
    case "timing": return onTiming(data);
    case "error": return message("error", data.message || JSON.stringify(data));
    case "notice": return message("notice", data.message || JSON.stringify(data));
    case "speech.audio": return onSpeechAudio(data);
    case "speech.stop": return stopSpeech();
    default: return message("notice", event.type + " " + JSON.stringify(data));
  }
}

// ---------------------------------------------------------------------------------------------
// speaker: the server's spoken answer arrives as speech.audio blocks (int16 PCM, base64, paced in real
// time) and is scheduled back to back in WebAudio; speech.stop (barge-in) drops what is scheduled
// ---------------------------------------------------------------------------------------------
const speech = { ctx: null, out: null, next: 0, sources: new Set(), meter: null };

function onSpeechAudio(data) {
  if (!$("speak").checked || !speech.ctx || typeof data.pcm !== "string") return;
  const bytes = atob(data.pcm);
  const n = bytes.length >> 1;
  if (!n) return;
  const buf = speech.ctx.createBuffer(1, n, data.rate);
  const ch = buf.getChannelData(0);
  for (let i = 0; i < n; i++) {
    const v = bytes.charCodeAt(2 * i) | (bytes.charCodeAt(2 * i + 1) << 8);
    ch[i] = (v >= 32768 ? v - 65536 : v) / 32768;
  }
  const src = speech.ctx.createBufferSource();
  src.buffer = buf;
  src.connect(speech.out);
  const now = speech.ctx.currentTime;
  const at = speech.next > now ? speech.next : now + SPEECH_LEAD_S; // after a gap: start anew with the lead
  src.start(at);
  speech.next = at + buf.duration;
  speech.sources.add(src);
  src.onended = () => speech.sources.delete(src);
  state.stats.audioBlocks += 1;
  state.stats.audioSamples += n;
}

function stopSpeech() {
  for (const src of speech.sources) { try { src.stop(); } catch (e) { /* already ended */ } }
  speech.sources.clear();
  speech.next = 0;
  state.stats.speechStops += 1;
}

function startSpeechOutput() {
  if (speech.ctx) return speech.ctx.resume();
  speech.ctx = new AudioContext();
  speech.out = speech.ctx.createAnalyser(); // the output level, shown in stats (audioPeak)
  speech.out.fftSize = 2048;
  speech.out.connect(speech.ctx.destination);
  const wave = new Float32Array(speech.out.fftSize);
  speech.meter = setInterval(() => {
    speech.out.getFloatTimeDomainData(wave);
    let peak = 0;
    for (const v of wave) peak = Math.max(peak, Math.abs(v));
    state.stats.audioPeak = Math.max(state.stats.audioPeak, peak);
  }, 40);
  return speech.ctx.resume();
}

async function toggleSpeaker(ev) {
  const on = ev.target.checked;
  if (on) await startSpeechOutput(); // inside the click: browsers let a page start audio only on a gesture
  else stopSpeech();
  let msg = null;
  try {
    const r = await api("speaker", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ on }) });
    if (!r.ok) msg = await errorText(r);
  } catch (e) { msg = String(e); }
  if (msg !== null) {
    ev.target.checked = false;
    message("error", "speaker: " + msg);
  }
}

// ---------------------------------------------------------------------------------------------
// event stream (SSE over fetch), reconnecting
// ---------------------------------------------------------------------------------------------
async function listen() {
  for (;;) {
    try {
      const r = await api("events");
      if (r.ok && r.body) {
        setStatus(true, "live");
        const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
        let buf = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += value;
          let i;
          while ((i = buf.indexOf("\n\n")) >= 0) {
            const block = buf.slice(0, i);
            buf = buf.slice(i + 2);
            const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
            if (data) {
              try { handle(JSON.parse(data)); } catch (e) { message("error", "bad event: " + e); }
            }
          }
        }
      } else if (r.status !== 401) {
        message("error", "event stream: HTTP " + r.status);
      }
    } catch (e) { /* network error: retry below */ }
    if (!$("key-form").hidden) setStatus(false, "API key required");
    else setStatus(false, "reconnecting…");
    await sleep(RECONNECT_MS);
  }
}

// ---------------------------------------------------------------------------------------------
// camera preview: the latest frame the server has, polled
// ---------------------------------------------------------------------------------------------
async function pollFrames() {
  const img = $("camera");
  let url = null;
  for (;;) {
    try {
      const r = await api("frame.jpg");
      if (r.status === 200) {
        const blob = await r.blob();
        const next = URL.createObjectURL(blob);
        await new Promise((resolve) => { img.onload = img.onerror = resolve; img.src = next; });
        if (url) URL.revokeObjectURL(url);
        url = next;
        $("camera-note").hidden = true;
      }
    } catch (e) { /* server away: keep the last frame */ }
    await sleep(FRAME_POLL_MS);
  }
}

// ---------------------------------------------------------------------------------------------
// typed questions
// ---------------------------------------------------------------------------------------------
async function ask(ev) {
  ev.preventDefault();
  const input = $("question");
  const text = input.value.trim();
  if (!text) return;
  input.value = ""; // its turn appears with the server's transcript.final (source "text"), in every open page
  let msg = null;
  try {
    const r = await api("ask", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ text }) });
    if (!r.ok) msg = await errorText(r);
  } catch (e) { msg = String(e); }
  if (msg !== null) {
    input.value = text;
    message("error", "ask: " + msg);
  }
}

async function errorText(r) {
  try { return (await r.json()).error.message; } catch (e) { return "HTTP " + r.status; }
}

// ---------------------------------------------------------------------------------------------
// optional source: this browser's camera and microphone (getUserMedia)
// ---------------------------------------------------------------------------------------------
const browser = { stream: null, ctx: null, timers: [], pcm: [], resample: null };

function makeResampler(rate) {
  // linear interpolation to 16 kHz, carrying the fractional position across blocks
  if (rate === SAMPLE_RATE) return (x) => x;
  const step = rate / SAMPLE_RATE;
  let pos = 0, prev = 0;
  return (x) => {
    const out = [];
    while (pos < x.length) {
      const i = Math.floor(pos), f = pos - i;
      const a = i === 0 ? prev : x[i - 1], b = x[i];
      out.push(a + (b - a) * f);
      pos += step;
    }
    pos -= x.length;
    prev = x[x.length - 1];
    return Float32Array.from(out);
  };
}

// which sources the server reads itself ("server") and which this page may send ("browser")
async function loadSources() {
  try {
    const r = await api("healthz");
    if (r.ok) {
      const health = await r.json();
      state.sources = health.sources;
      state.speaker = health.speaker;
    }
  } catch (e) { /* retried when the toggle is used */ }
  if (state.speaker === null) {
    $("speak").disabled = true;
    $("speak").parentElement.title = "this demo cannot speak: espeak-ng is not installed on the server";
  }
  const toggle = $("use-browser");
  if (state.sources && state.sources.camera === "server" && state.sources.mic === "server") {
    toggle.disabled = true;
    toggle.parentElement.title = "this demo reads its own camera and microphone";
  }
}

// a POST of browser media; the first refusal stops sending and says why
function sendMedia(path, type, body) {
  api(path, { method: "POST", headers: { "Content-Type": type }, body: body }).then(async (r) => {
    if (!r.ok && browser.stream) {
      message("error", "browser " + path + ": " + (await errorText(r)));
      $("use-browser").checked = false;
      stopBrowserSources();
    }
  }).catch(() => { /* server away: the event stream shows it */ });
}

async function startBrowserSources() {
  if (!state.sources) await loadSources();
  const wantVideo = !state.sources || state.sources.camera === "browser";
  const wantAudio = !state.sources || state.sources.mic === "browser";
  if (!wantVideo && !wantAudio) throw new Error("this demo reads its own camera and microphone");
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    throw new Error("getUserMedia needs a secure context: open the page at 127.0.0.1 / localhost or over HTTPS");
  }
  const stream = await navigator.mediaDevices.getUserMedia({
    video: wantVideo ? { width: { ideal: 640 }, height: { ideal: 480 } } : false,
    // the page may speak the answers: the browser's echo canceller keeps them out of the microphone (the
    // server's echo gate is the second line); noise suppression and gain help a far microphone
    audio: wantAudio ? { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true } : false,
  });
  browser.stream = stream;
  const sending = [];
  if (wantVideo) {
    const video = $("local");
    video.srcObject = stream;
    await video.play();
    const canvas = document.createElement("canvas");
    browser.timers.push(setInterval(() => {
      if (!video.videoWidth) return;
      canvas.width = video.videoWidth;
      canvas.height = video.videoHeight;
      canvas.getContext("2d").drawImage(video, 0, 0);
      canvas.toBlob((blob) => { if (blob && browser.stream) sendMedia("frame", "image/jpeg", blob); }, "image/jpeg", 0.8);
    }, BROWSER_FRAME_MS));
    sending.push("camera");
  }
  if (wantAudio) {
    let ctx;
    try { ctx = new AudioContext({ sampleRate: SAMPLE_RATE }); } catch (e) { ctx = new AudioContext(); }
    browser.ctx = ctx;
    browser.resample = makeResampler(ctx.sampleRate);
    const source = ctx.createMediaStreamSource(stream);
    const proc = ctx.createScriptProcessor(4096, 1, 1);
    proc.onaudioprocess = (e) => { browser.pcm.push(browser.resample(new Float32Array(e.inputBuffer.getChannelData(0)))); };
    source.connect(proc);
    proc.connect(ctx.destination); // a ScriptProcessor only runs when connected; it outputs silence
    browser.timers.push(setInterval(() => {
      if (!browser.pcm.length) return;
      const n = browser.pcm.reduce((acc, a) => acc + a.length, 0);
      const all = new Float32Array(n);
      let o = 0;
      for (const a of browser.pcm) { all.set(a, o); o += a.length; }
      browser.pcm = [];
      sendMedia("audio", "application/octet-stream", all.buffer);
    }, BROWSER_AUDIO_MS));
    sending.push(ctx.sampleRate === SAMPLE_RATE ? "microphone" : "microphone (resampled from " + ctx.sampleRate + " Hz)");
  }
  const note = $("browser-note");
  note.textContent = "sending this browser's " + sending.join(" and ");
  note.hidden = false;
}

function stopBrowserSources() {
  browser.timers.forEach(clearInterval);
  browser.timers = [];
  if (browser.stream) browser.stream.getTracks().forEach((t) => t.stop());
  if (browser.ctx) browser.ctx.close();
  browser.stream = browser.ctx = null;
  browser.pcm = [];
  $("browser-note").hidden = true;
}

async function toggleBrowser(ev) {
  if (ev.target.checked) {
    try { await startBrowserSources(); } catch (e) {
      ev.target.checked = false;
      stopBrowserSources();
      message("error", "browser camera/microphone: " + e.message);
    }
  } else {
    stopBrowserSources();
  }
}

// ---------------------------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", () => {
  loadKey();
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    state.key = $("key").value;
    sessionStorage.setItem("edge-mmm-key", state.key);
    $("key-form").hidden = true;
  });
  $("ask-form").addEventListener("submit", ask);
  $("use-browser").addEventListener("change", toggleBrowser);
  $("speak").addEventListener("change", toggleSpeaker);
  listen();
  pollFrames();
  loadSources();
});
