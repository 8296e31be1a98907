// The p-tuning page: upload a train and a validation file, start a job, watch it, use its prompt. No build step.
"use strict";
const $ = (id) => document.getElementById(id);
let tasks = [];

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function api(path, body) {
  const r = await fetch(path, body === undefined ? { headers: headers() } : { method: "POST", headers: headers(), body: JSON.stringify(body) });
  const data = await r.json();
  if (!r.ok) throw new Error((data.error && data.error.message) || r.statusText);
  return data;
}

function setStatus(text, isError) {
  $("job-status").textContent = text;
  $("job-status").className = isError ? "error" : "muted";
}

async function loadTasks() {
  try { tasks = (await api("/v1/ptune/templates")).data; } catch (e) { setStatus(e.message, true); return; }
  const chosen = $("task").value;
  $("task").replaceChildren(...tasks.map((t) => new Option(`${t.task}: ${t.description}`, t.task)));
  if (chosen) $("task").value = chosen;
  // Reloading (the key changed) keeps a template the person is editing.
  if (!$("template").value) showTask();
  refreshJobs();
}

function showTask() {
  const t = tasks.find((x) => x.task === $("task").value);
  if (!t) return;
  $("task-format").textContent = "Files: " + t.format;
  $("template").value = JSON.stringify(t.template, null, 2);
}

function readFile(id) {
  const f = $(id).files[0];
  if (!f) return Promise.reject(new Error(`choose the ${id.replace("-file", "")} file`));
  return f.text();
}

async function start() {
  $("start").disabled = true;
  try {
    let template;
    try { template = JSON.parse($("template").value); } catch (e) { throw new Error("the template is not valid JSON: " + e.message); }
    const shipped = tasks.find((x) => x.task === $("task").value).template;
    const body = {
      task: $("task").value, name: $("job-name").value, train: await readFile("train-file"), valid: await readFile("valid-file"),
      template: JSON.stringify(template) === JSON.stringify(shipped) ? null : template, encoder: $("encoder").value,
    };
    for (const k of ["prompt_tokens", "hidden_size", "epochs", "lr", "batch_size", "seed"]) body[k] = Number($(k).value);
    const job = await api("/v1/ptune/jobs", body);
    setStatus(`job ${job.id} queued (${job.examples.train} train, ${job.examples.valid} validation examples)`);
    refreshJobs();
  } catch (e) {
    setStatus(e.message, true);
  } finally {
    $("start").disabled = false;
  }
}

function metricText(m) { return m ? Object.entries(m).map(([k, v]) => `${k} ${v.toFixed(2)}`).join(", ") : ""; }

async function refreshJobs() {
  let jobs;
  try { jobs = (await api("/v1/ptune/jobs")).data; } catch (e) { setStatus(e.message, true); return; }
  const body = $("jobs").querySelector("tbody");
  body.replaceChildren();
  for (const j of jobs.slice().reverse()) {
    const tr = document.createElement("tr");
    tr.dataset.job = j.id; tr.dataset.status = j.status;
    const p = j.progress;
    const progress = j.status === "running" ? `epoch ${p.epoch}/${j.config.epochs}, ${p.step}/${p.steps}` : j.status === "done" ? `best epoch ${j.best_epoch}` : "";
    const history = j.history.map((h) => `${h.epoch}: ${metricText(h.valid)}`).join(" · ") + (j.zero_shot ? ` (zero-shot ${metricText(j.zero_shot)})` : "");
    const cells = [`${j.name} (${j.id})`, j.task, j.status + (j.error ? ": " + j.error : ""), progress, history];
    for (const text of cells) {
      const td = document.createElement("td"); td.textContent = text; tr.appendChild(td);
    }
    const td = document.createElement("td");
    if (j.status === "done" && j.served) {
      const a = document.createElement("a");
      a.href = "/?model=" + encodeURIComponent(j.model); a.textContent = j.model; a.className = "use";
      td.appendChild(a);
    }
    tr.appendChild(td);
    if (j.status === "failed") tr.className = "error";
    body.appendChild(tr);
  }
}

$("api-key").value = localStorage.getItem("clova-api-key") || "";
$("api-key").addEventListener("change", () => { localStorage.setItem("clova-api-key", $("api-key").value); loadTasks(); });
$("task").addEventListener("change", showTask);
$("start").addEventListener("click", start);
setInterval(refreshJobs, 1000);
loadTasks();
