// SimMIM service dashboard: vanilla JS over the /v1 API, no build step, no third-party code.
//
// The API key (if the service needs one) lives in localStorage and is sent as
// "Authorization: Bearer <key>" on every request. EventSource cannot send headers, so the
// job's event stream is read with fetch() and a ReadableStream parser; images that need the
// key (previews, plots, thumbnails) and checkpoint downloads are fetched and shown as blob URLs.
// Nothing puts the key in a URL.
"use strict";

const KEY_STORAGE = "simmim.apiKey";
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const PLOT_KEYS = "loss,lr,images_per_sec";
const NEIGHBOURS_K = 5;

const state = {
  key: localStorage.getItem(KEY_STORAGE) || "",
  view: null,        // per-view resources, torn down on navigation
};

class AuthError extends Error {}

const $ = (sel) => document.querySelector(sel);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined) node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

// ---- HTTP --------------------------------------------------------------------------------

function authHeaders(extra) {
  const headers = new Headers(extra || {});
  if (state.key) headers.set("Authorization", `Bearer ${state.key}`);
  return headers;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: authHeaders(options.headers), cache: "no-store" });
  if (response.status === 401) {
    let detail = "";
    try { detail = (await response.json()).detail || ""; } catch (_) { /* not JSON */ }
    showKeyPrompt(detail);
    throw new AuthError(detail);
  }
  if (!response.ok) {
    let problem;
    try { problem = await response.json(); } catch (_) { problem = { detail: response.statusText }; }
    const error = new Error(problem.detail || `${response.status} ${response.statusText}`);
    error.status = response.status;
    error.problem = problem;
    throw error;
  }
  return response;
}

const getJSON = async (path, options) => (await api(path, options)).json();

async function blobURL(path, signal) {
  const blob = await (await api(path, { signal })).blob();
  const url = URL.createObjectURL(blob);
  if (state.view) state.view.blobs.push(url);
  return url;
}

async function loadImage(img, path, signal) {
  img.src = await blobURL(path, signal);
  await img.decode().catch(() => {});
}

// ---- key prompt --------------------------------------------------------------------------

function showKeyPrompt(detail) {
  teardown();
  for (const id of ["jobs-view", "job-view"]) $(`#${id}`).hidden = true;
  $("#key-view").hidden = false;
  $("#key-error").textContent = state.key && detail ? detail : "";
  $("#key-input").focus();
  updateWhoami();
}

function updateWhoami() {
  $("#whoami").textContent = state.key ? "API key set" : "";
  $("#forget-key").hidden = !state.key;
}

$("#key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.key = $("#key-input").value.trim();
  $("#key-input").value = "";
  if (state.key) localStorage.setItem(KEY_STORAGE, state.key);
  route();
});

$("#forget-key").addEventListener("click", () => {
  state.key = "";
  localStorage.removeItem(KEY_STORAGE);
  route();
});

// ---- routing -----------------------------------------------------------------------------

function teardown() {
  const view = state.view;
  if (!view) return;
  view.abort.abort();
  for (const timer of view.timers) clearInterval(timer);
  for (const url of view.blobs) URL.revokeObjectURL(url);
  state.view = null;
}

function newView() {
  teardown();
  state.view = { abort: new AbortController(), timers: [], blobs: [] };
  return state.view;
}

function route() {
  updateWhoami();
  $("#key-view").hidden = true;
  const match = location.hash.match(/^#\/jobs\/([A-Za-z0-9_]+)/);
  const run = match ? showJob(match[1]) : showJobs();
  run.catch((error) => {
    if (!(error instanceof AuthError) && error.name !== "AbortError") console.error(error);
  });
}

window.addEventListener("hashchange", route);

// ---- jobs list ---------------------------------------------------------------------------

function fmtProgress(progress) {
  const step = progress.step ?? 0;
  const total = progress.total_steps;
  return { step, total, fraction: total ? Math.min(1, step / total) : 0 };
}

function fmtNumber(value, digits = 4) {
  return typeof value === "number" && Number.isFinite(value) ? Number(value.toPrecision(digits)).toString() : "–";
}

async function showJobs() {
  const view = newView();
  $("#job-view").hidden = true;
  $("#jobs-view").hidden = false;
  const refresh = async () => {
    const page = await getJSON("/v1/jobs?limit=100", { signal: view.abort.signal });
    if (state.view !== view) return;
    const body = $("#jobs-table tbody");
    body.replaceChildren(...page.data.map((job) => {
      const p = fmtProgress(job.progress || {});
      const fill = el("span");
      fill.style.width = `${(p.fraction * 100).toFixed(1)}%`;  // CSSOM: allowed by the page's CSP
      const bar = el("span", { class: "mini" }, fill);
      return el("tr", { "data-job-id": job.id, "data-status": job.status,
                        onclick: () => { location.hash = `#/jobs/${job.id}`; } },
        el("td", {}, el("a", { href: `#/jobs/${job.id}`, text: job.name || job.id }),
           el("div", { class: "muted" }, el("code", { text: job.id }))),
        el("td", {}, el("span", { class: `badge ${job.status}`, text: job.status })),
        el("td", { class: "job-progress" }, bar, `${p.step}${p.total ? ` / ${p.total}` : ""}`),
        el("td", { text: fmtNumber((job.latest_metrics || {}).loss) }),
        el("td", { text: new Date(job.created_at).toLocaleString() }));
    }));
    $("#jobs-empty").hidden = page.data.length > 0;
  };
  await refresh();
  view.timers.push(setInterval(() => refresh().catch(() => {}), 2000));
}

// ---- one job -----------------------------------------------------------------------------

async function showJob(jobId) {
  const view = newView();
  const signal = view.abort.signal;
  $("#jobs-view").hidden = true;
  $("#job-view").hidden = false;
  for (const sel of ["#previews", "#neighbours-results", "#events", "#checkpoints-table tbody"]) $(sel).replaceChildren();
  for (const sel of ["#previews-note", "#plot-note", "#checkpoints-note", "#neighbours-note", "#job-error"]) $(sel).textContent = "";
  $("#plot-img").removeAttribute("src");
  $("#embed-run-btn").hidden = true;

  const job = { id: jobId, data: null, loss: [], previews: new Set(), lastFiles: null };
  view.job = job;

  const refreshJob = async () => {
    const data = await getJSON(`/v1/jobs/${jobId}`, { signal });
    if (state.view !== view) return data;
    job.data = data;
    renderJob(data);
    return data;
  };
  await refreshJob();

  const metrics = await getJSON(`/v1/jobs/${jobId}/metrics?key=loss&max_points=1000`, { signal });
  job.loss = metrics.points.map((p) => [p.step, p.value]);
  drawLoss(job.loss);

  const loadSlow = () => Promise.allSettled([loadCheckpoints(jobId, signal), loadPreviews(job, signal),
                                             loadPlot(jobId, signal)]);
  loadSlow();
  // At most one reload of checkpoints/previews/plot a second: replaying a long job's event
  // history must not turn into hundreds of requests (and rate limiting).
  let pendingSlow = null;
  const refreshSlow = () => {
    if (pendingSlow) return;
    pendingSlow = setTimeout(() => { pendingSlow = null; if (state.view === view) loadSlow(); }, 1000);
  };

  let pendingRefresh = null;
  const scheduleRefresh = () => {
    if (pendingRefresh) return;
    pendingRefresh = setTimeout(() => {
      pendingRefresh = null;
      if (state.view === view) refreshJob().catch(() => {});
    }, 500);
  };
  const onEvent = (event) => {
    appendEvent(event);
    if (event.type === "metrics") {
      const last = job.loss.length ? job.loss[job.loss.length - 1][0] : -Infinity;
      if (typeof event.data.loss === "number" && event.data.step > last) {  // the stream replays history
        job.loss.push([event.data.step, event.data.loss]);
        drawLoss(job.loss);
      }
      if (job.data && typeof event.data.step === "number") {
        job.data.progress = { ...job.data.progress, step: event.data.step };
        renderProgress(job.data);
      }
      scheduleRefresh();
    } else if (event.type === "status") {
      refreshJob().then((data) => { if (TERMINAL.has(data.status)) refreshSlow(); }).catch(() => {});
    } else if (event.type === "checkpoint") {
      refreshSlow();
    }
  };
  streamEvents(jobId, signal, onEvent, () => job.data && TERMINAL.has(job.data.status), refreshJob);
  view.timers.push(setInterval(() => {
    if (job.data && !TERMINAL.has(job.data.status)) refreshSlow();
  }, 8000));
}

function renderJob(job) {
  $("#job-name").textContent = job.name || job.id;
  const badge = $("#job-status");
  badge.textContent = job.status;
  badge.className = `badge ${job.status}`;
  $("#job-id").textContent = job.id;
  $("#job-dataset").textContent = job.dataset;
  renderProgress(job);
  $("#job-error").textContent = job.error ? `${job.error.code}: ${job.error.message || ""}` : "";
  const cancel = $("#cancel-btn");
  cancel.hidden = TERMINAL.has(job.status);
  cancel.disabled = job.status === "cancelling" || job.cancel_requested;
  cancel.textContent = cancel.disabled ? "Cancelling…" : "Cancel job";
}

function renderProgress(job) {
  const progress = job.progress || {};
  const p = fmtProgress(progress);
  const done = job.status === "succeeded";
  $("#job-progress-bar").style.width = `${((done ? 1 : p.fraction) * 100).toFixed(1)}%`;
  const parts = [`step ${p.step}${p.total ? ` / ${p.total}` : ""}`];
  if (typeof progress.epoch === "number") parts.push(`epoch ${progress.epoch.toFixed(2)}`);
  const loss = progress.loss ?? (job.latest_metrics || {}).loss;
  if (typeof loss === "number") parts.push(`loss ${fmtNumber(loss)}`);
  if (typeof progress.images_per_sec === "number") parts.push(`${progress.images_per_sec.toFixed(1)} img/s`);
  if (typeof progress.eta_seconds === "number" && !TERMINAL.has(job.status)) {
    parts.push(`ETA ${Math.round(progress.eta_seconds)} s`);
  }
  const text = $("#job-progress-text");
  text.textContent = parts.join(" · ");
  text.dataset.step = String(p.step);
}

$("#cancel-btn").addEventListener("click", async () => {
  const view = state.view;
  if (!view || !view.job) return;
  const button = $("#cancel-btn");
  button.disabled = true;
  button.textContent = "Cancelling…";
  try {
    const data = await getJSON(`/v1/jobs/${view.job.id}/cancel`, { method: "POST" });
    view.job.data = data;
    renderJob(data);
  } catch (error) {
    $("#job-error").textContent = `cancel failed: ${error.message}`;
    button.disabled = false;
  }
});

function appendEvent(event) {
  const list = $("#events");
  const text = event.type === "log" ? event.data.message
    : event.type === "status" ? `${event.data.status}${event.data.error ? ` (${event.data.error.code})` : ""}`
    : event.type === "metrics" ? `step ${event.data.step} loss ${fmtNumber(event.data.loss)}`
    : event.type === "checkpoint" ? `${event.data.kind} at step ${event.data.step}`
    : JSON.stringify(event.data);
  list.append(el("li", { "data-type": event.type, text: `${event.type}: ${text}` }));
  while (list.children.length > 300) list.firstElementChild.remove();
  list.scrollTop = list.scrollHeight;
}

// Server-Sent Events over fetch(): the key goes in a header, never in the URL.
async function streamEvents(jobId, signal, onEvent, isTerminal, refreshJob) {
  let lastId = null;
  while (!signal.aborted) {
    const headers = lastId === null ? {} : { "Last-Event-ID": String(lastId) };
    try {
      const response = await api(`/v1/jobs/${jobId}/events`, { headers, signal });
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      let event = { type: "message", data: [], id: null };
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let newline;
        while ((newline = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, newline).replace(/\r$/, "");
          buffer = buffer.slice(newline + 1);
          if (line === "") {
            if (event.data.length) {
              if (event.id !== null) lastId = Number(event.id);
              let data;
              try { data = JSON.parse(event.data.join("\n")); } catch (_) { data = { raw: event.data.join("\n") }; }
              onEvent({ id: lastId, type: event.type, data });
            }
            event = { type: "message", data: [], id: null };
            continue;
          }
          if (line.startsWith(":")) continue;
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let val = colon < 0 ? "" : line.slice(colon + 1);
          if (val.startsWith(" ")) val = val.slice(1);
          if (field === "id") event.id = val;
          else if (field === "event") event.type = val;
          else if (field === "data") event.data.push(val);
        }
      }
    } catch (error) {
      if (signal.aborted || error instanceof AuthError) return;
    }
    // The stream ends after the terminal event; otherwise reconnect where it stopped.
    try {
      const data = await refreshJob();
      if (TERMINAL.has(data.status) && isTerminal()) return;
    } catch (_) { /* retry below */ }
    await sleep(1500);
  }
}

// ---- loss curve ----------------------------------------------------------------------------

function drawLoss(points) {
  const canvas = $("#loss-canvas");
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = { l: 56, r: 12, t: 12, b: 28 };
  ctx.clearRect(0, 0, w, h);
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#6b7280";
  canvas.dataset.points = String(points.length);
  if (points.length === 0) {
    ctx.fillText("no loss reported yet", pad.l, h / 2);
    return;
  }
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  let x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const X = (x) => pad.l + ((x - x0) / (x1 - x0)) * (w - pad.l - pad.r);
  const Y = (y) => h - pad.b - ((y - y0) / (y1 - y0)) * (h - pad.t - pad.b);
  ctx.strokeStyle = "#e5e7eb";
  ctx.beginPath();
  for (let i = 0; i <= 4; i++) {
    const y = y0 + ((y1 - y0) * i) / 4;
    ctx.moveTo(pad.l, Y(y)); ctx.lineTo(w - pad.r, Y(y));
    ctx.fillText(fmtNumber(y, 3), 4, Y(y) + 4);
  }
  ctx.stroke();
  ctx.fillText(`step ${x0}`, pad.l, h - 8);
  const right = `step ${x1}`;
  ctx.fillText(right, w - pad.r - ctx.measureText(right).width, h - 8);
  ctx.strokeStyle = "#2563eb";
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  points.forEach(([x, y], i) => (i ? ctx.lineTo(X(x), Y(y)) : ctx.moveTo(X(x), Y(y))));
  ctx.stroke();
  ctx.lineWidth = 1;
}

// ---- plot, previews, checkpoints -----------------------------------------------------------

async function loadPlot(jobId, signal) {
  try {
    await loadImage($("#plot-img"), `/v1/jobs/${jobId}/plot.png?keys=${PLOT_KEYS}`, signal);
    $("#plot-note").textContent = "";
  } catch (error) {
    if (error.name !== "AbortError") $("#plot-note").textContent = `no plot yet (${error.message})`;
  }
}

async function loadPreviews(job, signal) {
  let listing;
  try {
    listing = await getJSON(`/v1/jobs/${job.id}/previews`, { signal });
  } catch (error) {
    if (error.name !== "AbortError") $("#previews-note").textContent = `no previews (${error.message})`;
    return;
  }
  const items = listing.data.slice(-6).reverse();  // newest first
  $("#previews-note").textContent = listing.data.length
    ? `original · masked · reconstruction, ${listing.data.length} preview(s); newest first` : "no previews yet";
  const gallery = $("#previews");
  const wanted = new Set(items.map((item) => item.name));
  for (const figure of [...gallery.children]) if (!wanted.has(figure.dataset.name)) figure.remove();
  for (const item of items) {
    if (gallery.querySelector(`figure[data-name="${CSS.escape(item.name)}"]`)) continue;
    const img = el("img", { alt: `preview at step ${item.step}`, width: item.width, height: item.height });
    const figure = el("figure", { "data-name": item.name }, img, el("figcaption", { class: "muted", text: `step ${item.step}` }));
    const before = [...gallery.children].find((f) => Number(f.dataset.step) < item.step);
    figure.dataset.step = String(item.step);
    gallery.insertBefore(figure, before || null);
    loadImage(img, item.url, signal).catch(() => { figure.remove(); });
  }
}

function fmtBytes(n) {
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

async function loadCheckpoints(jobId, signal) {
  const listing = await getJSON(`/v1/jobs/${jobId}/checkpoints`, { signal });
  const body = $("#checkpoints-table tbody");
  body.replaceChildren(...listing.data.map((ckpt) => el("tr", { "data-checkpoint-id": ckpt.id },
    el("td", { text: ckpt.kind + (ckpt.final ? " (final)" : "") }),
    el("td", { text: String(ckpt.step) }),
    el("td", { text: fmtBytes(ckpt.size) }),
    el("td", {}, el("code", { text: ckpt.sha256.slice(0, 12) })),
    el("td", {}, el("button", { type: "button", class: "download", onclick: (e) => download(jobId, ckpt, e.target) },
                    "Download")))));
  $("#checkpoints-note").textContent = listing.data.length ? "" : "no checkpoints yet";
}

async function download(jobId, ckpt, button) {
  button.disabled = true;
  const label = button.textContent;
  button.textContent = "Downloading…";
  try {
    const response = await api(`/v1/jobs/${jobId}/checkpoints/${ckpt.id}/content`);
    const disposition = response.headers.get("Content-Disposition") || "";
    const name = (disposition.match(/filename="([^"]+)"/) || [])[1] || `${ckpt.kind}_${ckpt.step}`;
    const url = URL.createObjectURL(await response.blob());
    const link = el("a", { href: url, download: name });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  } catch (error) {
    $("#checkpoints-note").textContent = `download failed: ${error.message}`;
  } finally {
    button.disabled = false;
    button.textContent = label;
  }
}

// ---- nearest neighbours --------------------------------------------------------------------

const drop = $("#drop-zone");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  const files = [...event.dataTransfer.files].filter((f) => f.type.startsWith("image/"));
  if (files.length) findNeighbours(files);
});
$("#neighbours-input").addEventListener("change", (event) => {
  const files = [...event.target.files];
  event.target.value = "";
  if (files.length) findNeighbours(files);
});
$("#embed-run-btn").addEventListener("click", () => startEmbeddingRun());

async function findNeighbours(files) {
  const view = state.view;
  if (!view || !view.job) return;
  view.job.lastFiles = files;
  const note = $("#neighbours-note");
  note.textContent = `embedding ${files.length} image(s)…`;
  $("#embed-run-btn").hidden = true;
  const form = new FormData();
  for (const file of files) form.append("files", file, file.name);
  let result;
  try {
    result = await getJSON(`/v1/jobs/${view.job.id}/neighbours?k=${NEIGHBOURS_K}`,
                           { method: "POST", body: form, signal: view.abort.signal });
  } catch (error) {
    if (error.status === 409 && error.problem && "embedding_run" in error.problem) {
      const run = error.problem.embedding_run;
      if (run && (run.status === "queued" || run.status === "running")) {
        note.textContent = `the dataset is being embedded (run ${run.id}, ${run.status})…`;
        return pollRun(view, run.id);
      }
      note.textContent = "The job's dataset has not been embedded yet: neighbours need an embedding run.";
      $("#embed-run-btn").hidden = false;
      return;
    }
    note.textContent = `neighbours failed: ${error.message}`;
    return;
  }
  if (state.view !== view) return;
  note.textContent = `${result.count} dataset images compared (embedding run ${result.run_id})`;
  const results = $("#neighbours-results");
  results.replaceChildren();
  result.data.forEach((item, i) => {
    const own = el("img", { alt: item.name || `image ${i}` });
    own.src = URL.createObjectURL(files[i]);
    view.blobs.push(own.src);
    const row = el("div", { class: "neighbours" });
    for (const n of item.neighbours) {
      const img = el("img", { alt: n.name, title: n.name });
      row.append(el("div", { class: "neighbour", "data-index": n.index }, img,
                    el("div", { text: n.score.toFixed(3) }), el("div", { class: "muted", text: n.name })));
      loadImage(img, n.thumbnail_url, view.abort.signal).catch(() => {});
    }
    results.append(el("div", { class: "query" }, el("div", {}, own, el("div", { class: "muted", text: item.name || "" })), row));
  });
}

async function startEmbeddingRun() {
  const view = state.view;
  if (!view || !view.job || !view.job.data) return;
  const button = $("#embed-run-btn");
  button.disabled = true;
  try {
    const run = await getJSON(`/v1/jobs/${view.job.id}/embedding-runs`, {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ dataset: view.job.data.dataset, normalize: true }), signal: view.abort.signal });
    button.hidden = true;
    await pollRun(view, run.id);
  } catch (error) {
    $("#neighbours-note").textContent = `could not start the embedding run: ${error.message}`;
  } finally {
    button.disabled = false;
  }
}

async function pollRun(view, runId) {
  const note = $("#neighbours-note");
  while (state.view === view) {
    const run = await getJSON(`/v1/jobs/${view.job.id}/embedding-runs/${runId}`, { signal: view.abort.signal });
    const p = run.progress || {};
    note.textContent = `embedding the dataset (run ${run.id}): ${run.status}` +
      (p.total ? `, ${p.done} / ${p.total}` : "");
    if (run.status === "succeeded") {
      if (view.job.lastFiles) return findNeighbours(view.job.lastFiles);
      note.textContent = "the dataset is embedded: drop images to find their neighbours";
      return;
    }
    if (run.status === "failed") {
      note.textContent = `the embedding run failed: ${run.error || "unknown error"}`;
      $("#embed-run-btn").hidden = false;
      return;
    }
    await sleep(1000);
  }
}

route();
