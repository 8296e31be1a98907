// The playground: presets, the prompt's tokens, and a streamed /v1/completions call. No build step.
"use strict";
const $ = (id) => document.getElementById(id);
let presets = [];
let aborter = null;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "muted";
}

async function api(path, body) {
  const r = await fetch(path, body === undefined ? { headers: headers() } : { method: "POST", headers: headers(), body: JSON.stringify(body) });
  const data = await r.json();
  if (!r.ok) throw Object.assign(new Error((data.error && data.error.message) || r.statusText), { status: r.status });
  return data;
}

// A server started with --api-key answers 401 until a key is typed: ask for it beside the field, not as an error.
function askForKey(wrong) {
  $("api-key").classList.add("needs-key");
  $("key-hint").textContent = wrong ? "this key is not accepted; type the server's --api-key" : "this server needs its --api-key: type it here";
  $("api-key").focus();
}

function unescape(s) { return s.replace(/\\n/g, "\n").replace(/\\t/g, "\t"); }
function escape(s) { return s.replace(/\n/g, "\\n").replace(/\t/g, "\\t"); }

async function loadPresets() {
  try {
    const models = await api("/v1/models");
    $("model").textContent = `${models.data[0].id} (context ${models.data[0].context_length})`;
    // The base model, then the prompts p-tuning jobs trained (?model= picks one, as the jobs page links).
    const want = new URLSearchParams(location.search).get("model") || $("model-select").value;
    $("model-select").replaceChildren(...models.data.map((m) => new Option(m.id, m.id)));
    if (models.data.some((m) => m.id === want)) $("model-select").value = want;
    presets = (await api("/v1/presets")).data;
  } catch (e) {
    if (e.status === 401) askForKey($("api-key").value.trim() !== ""); else setStatus(e.message, true);
    return;
  }
  $("api-key").classList.remove("needs-key");
  $("key-hint").textContent = "";
  const chosen = $("preset").value;
  $("preset").replaceChildren($("preset").options[0]);
  for (const p of presets) {
    const o = document.createElement("option");
    o.value = p.id; o.textContent = p.name;
    $("preset").appendChild(o);
  }
  $("preset").value = presets.some((p) => p.id === chosen) ? chosen : "";
}

function applyPreset() {
  const p = presets.find((x) => x.id === $("preset").value);
  $("preset-description").textContent = p ? p.description : "";
  if (!p) return;
  $("prompt").value = p.prompt;
  for (const k of ["max_tokens", "temperature", "top_p", "top_k"]) $(k).value = p[k];
  $("stop-strings").value = p.stop.map(escape).join("\n");
  showTokens();
}

let tokenTimer = null;
function scheduleTokens() { clearTimeout(tokenTimer); tokenTimer = setTimeout(showTokens, 300); }

let tokenRequests = 0;
async function showTokens() {
  const body = $("tokens").querySelector("tbody");
  const mine = ++tokenRequests;
  let data;
  try { data = await api("/v1/tokenize", { text: $("prompt").value }); } catch (e) { $("token-count").textContent = e.status === 401 ? "" : e.message; return; }
  if (mine !== tokenRequests) return; // a newer edit's answer is on its way
  body.replaceChildren();
  for (const m of data.morphemes) {
    const tr = document.createElement("tr");
    // Spaces as ␣: " 학교" and "학교" are different morphemes with different ids. Tokens come escaped.
    const morpheme = JSON.stringify(m.morpheme).slice(1, -1).replace(/ /g, "\u2423");
    for (const [text, cls] of [[morpheme, ""], [m.tokens.map((t) => t.replace(/ /g, "\u2423")).join(" | "), ""], [m.ids.join(" "), "ids"]]) {
      const td = document.createElement("td");
      td.textContent = text; if (cls) td.className = cls;
      tr.appendChild(td);
    }
    body.appendChild(tr);
  }
  $("token-count").textContent = `${data.morphemes.length} morphemes, ${data.tokens} tokens`;
}

function request() {
  const num = (id) => Number($(id).value);
  const req = {
    prompt: $("prompt").value, stream: true, max_tokens: num("max_tokens"), temperature: num("temperature"),
    top_p: num("top_p"), top_k: num("top_k"), stream_options: { include_usage: true },
  };
  if ($("seed").value !== "") req.seed = num("seed");
  if ($("model-select").value) req.model = $("model-select").value;
  const stops = $("stop-strings").value.split("\n").filter((s) => s.length).map(unescape);
  if (stops.length) req.stop = stops;
  return req;
}

async function generate() {
  $("echo").textContent = $("prompt").value;
  $("completion").textContent = "";
  $("generate").disabled = true; $("stop").disabled = false;
  setStatus("generating...");
  aborter = new AbortController();
  const t0 = performance.now();
  let finish = null, usage = null;
  try {
    const r = await fetch("/v1/completions", { method: "POST", headers: headers(), body: JSON.stringify(request()), signal: aborter.signal });
    if (!r.ok) { const data = await r.json(); throw new Error((data.error && data.error.message) || r.statusText); }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const line = buf.slice(0, cut).trim(); buf = buf.slice(cut + 2);
        if (!line.startsWith("data: ")) continue;
        const payload = line.slice(6);
        if (payload === "[DONE]") continue;
        const event = JSON.parse(payload);
        if (event.error) throw new Error(event.error.message);
        if (event.usage) usage = event.usage;
        for (const c of event.choices) {
          $("completion").textContent += c.text;
          if (c.finish_reason) finish = c.finish_reason;
        }
      }
    }
    const secs = (performance.now() - t0) / 1000;
    const n = usage ? usage.completion_tokens : 0;
    setStatus(`finish: ${finish} · ${n} tokens in ${secs.toFixed(2)} s`);
  } catch (e) {
    setStatus(e.name === "AbortError" ? "stopped" : e.message, e.name !== "AbortError");
  } finally {
    $("generate").disabled = false; $("stop").disabled = true; aborter = null;
  }
}

async function savePreset() {
  const r = request();
  const body = { name: $("preset-name").value, prompt: r.prompt, max_tokens: r.max_tokens, temperature: r.temperature, top_p: r.top_p, top_k: r.top_k, stop: r.stop || [] };
  try {
    const saved = await api("/v1/presets", body);
    await loadPresets();
    $("preset").value = saved.id;
    setStatus(`saved preset ${saved.name}`);
  } catch (e) { setStatus(e.message, true); }
}

$("api-key").value = localStorage.getItem("clova-api-key") || "";
$("api-key").addEventListener("change", () => { localStorage.setItem("clova-api-key", $("api-key").value); loadPresets(); });
$("preset").addEventListener("change", applyPreset);
$("prompt").addEventListener("input", scheduleTokens);
$("generate").addEventListener("click", generate);
$("save-preset").addEventListener("click", savePreset);
$("stop").addEventListener("click", () => aborter && aborter.abort());
loadPresets();
