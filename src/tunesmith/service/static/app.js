// The tunesmith dashboard: one page over the OpenAI-shaped API under /v1, routed by the URL hash.
// Safety rule: text from the API enters the DOM only as text (h(), textContent, setAttribute),
// never as HTML. The one exception is the run report, shown in a sandboxed iframe (no scripts,
// an opaque origin), which is how a browser is meant to show a document it does not trust.
"use strict";

const KEY = "tunesmith.key";
const PICKED = "tunesmith.compare"; // job ids chosen on the Jobs page for the Compare page
const FINAL = ["succeeded", "failed", "cancelled"];
const STATUSES = ["validating_files", "queued", "running", "paused", ...FINAL];
const METHODS = ["supervised", "dpo", "reinforcement"];
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563"];
const SVG_NS = "http://www.w3.org/2000/svg";

let timers = []; // the current view's polling intervals, cleared on every route change

// ---------------------------------------------------------------- DOM helpers

/** An element with properties/attributes and children; strings become text nodes (never HTML). */
function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value == null || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (typeof value === "boolean") el[name] = value; // checked, selected, disabled, required, open
    else el.setAttribute(name, value);
  }
  put(el, children);
  return el;
}

/** Append children (nested lists allowed) to `parent`, leaving out null and false: the optional parts. */
const put = (parent, ...children) => parent.append(...children.flat(Infinity).filter((c) => c != null && c !== false));

function svg(tag, attrs = {}, text = null) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) if (value != null) el.setAttribute(name, value);
  if (text !== null) el.textContent = text;
  return el;
}

const enc = encodeURIComponent;
const fmtTime = (seconds) => (seconds ? new Date(seconds * 1000).toLocaleString() : "—");
const fmtNumber = (x) => (typeof x !== "number" ? "—" : Math.abs(x) >= 1000 || !x ? String(x) : x.toPrecision(4));
const field = (label, control) => h("label", { class: "field" }, h("span", {}, label), control);
const option = (value, label = value, selected = false) => h("option", { value, selected }, label);
const title = (text, ...more) => h("div", { class: "title" }, h("h1", {}, text), more);
const table = (id, heads, body) =>
  h("table", { id }, h("thead", {}, h("tr", {}, heads.map((t) => h("th", {}, t)))), body);

function badge(status) {
  const known = STATUSES.includes(status) || status === "processed" || status === "error";
  return h("span", { class: `badge ${known ? status : "unknown"}`, "data-test": "status" }, status || "?");
}

function progressBar(progress) {
  if (!progress || !progress.steps) return h("span", { class: "muted" }, progress ? `step ${progress.step}` : "—");
  const pct = Math.max(0, Math.min(100, (100 * progress.step) / progress.steps));
  return h("div", { class: "progress", "data-test": "progress" },
    h("div", { class: "fill", style: `width: ${pct.toFixed(1)}%` }),
    h("span", {}, `${progress.step} / ${progress.steps}`));
}

function notice(message) {
  const el = document.getElementById("notice");
  el.textContent = message || "";
  el.hidden = !message;
}

// ---------------------------------------------------------------- API

/** A call to /v1 with the stored key: the parsed JSON, or the Response when `raw`. Throws the API's message. */
async function api(path, options = {}) {
  const { raw, ...init } = options;
  const headers = { Authorization: `Bearer ${localStorage.getItem(KEY) || ""}`, ...(init.headers || {}) };
  const res = await fetch(`/v1${path}`, { ...init, headers });
  if (res.status === 401) askForKey("The server refused this API key; enter a valid one.");
  if (!res.ok) {
    const body = await res.json().catch(() => ({}));
    throw new Error(body.error?.message || `HTTP ${res.status} ${res.statusText}`);
  }
  return raw ? res : res.json();
}

const post = (path, body) =>
  api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body || {}) });

/** Run `fn` now and every `ms` while the view lasts; never two at once; errors go to the notice. */
function every(ms, fn) {
  let busy = false;
  const tick = () => {
    if (busy) return;
    busy = true;
    fn().catch((err) => notice(err.message)).finally(() => { busy = false; });
  };
  tick();
  timers.push(setInterval(tick, ms));
}

// ---------------------------------------------------------------- key and routing

function askForKey(message) {
  timers.forEach(clearInterval);
  timers = [];
  document.getElementById("key-message").textContent = message;
  document.getElementById("key-panel").hidden = false;
  document.getElementById("api-key").focus();
}

const ROUTES = [
  [/^#\/jobs\/([\w-]+)$/, (main, m) => jobView(main, m[1])],
  [/^#\/jobs$/, (main) => jobsView(main)],
  [/^#\/files$/, (main) => filesView(main)],
  [/^#\/new$/, (main) => newJobView(main)],
  [/^#\/chat(?:\?model=(.*))?$/, (main, m) => chatView(main, m[1] ? decodeURIComponent(m[1]) : null)],
  [/^#\/compare$/, (main) => compareView(main)],
];

function route() {
  timers.forEach(clearInterval);
  timers = [];
  notice("");
  const hash = location.hash || "#/jobs";
  for (const link of document.querySelectorAll("#nav a")) {
    link.classList.toggle("active", hash.startsWith(link.getAttribute("href")));
  }
  const main = document.getElementById("view");
  main.replaceChildren();
  if (!localStorage.getItem(KEY)) return askForKey("Enter an API key made with `tunesmith keys create NAME`.");
  document.getElementById("key-panel").hidden = true;
  const found = ROUTES.find(([pattern]) => pattern.test(hash));
  if (!found) return put(main, h("p", { class: "empty" }, "No such page. ", h("a", { href: "#/jobs" }, "Jobs")));
  Promise.resolve(found[1](main, hash.match(found[0]))).catch((err) => notice(err.message));
}

document.getElementById("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  localStorage.setItem(KEY, document.getElementById("api-key").value.trim());
  document.getElementById("api-key").value = "";
  route();
});
document.getElementById("change-key").addEventListener("click", () => askForKey("Enter a new API key."));
window.addEventListener("hashchange", route);
route();

// ---------------------------------------------------------------- jobs

function jobsView(main) {
  const picked = pickedJobs();
  const rows = new Map(); // job id -> <tr>, kept across refreshes so a checkbox is never replaced
  const body = h("tbody");
  put(main,
    title("Fine-tuning jobs", h("a", { class: "button", href: "#/new" }, "New job"),
      h("a", { class: "button secondary", href: "#/compare", id: "compare-selected" }, "Compare selected")),
    table("jobs-table", ["", "Job", "Model", "Method", "Status", "Progress", "Created", "Fine-tuned model"], body));
  every(2000, async () => {
    const list = await api("/fine_tuning/jobs?limit=100");
    body.replaceChildren(...list.data.map((job) => jobRow(job, rows, picked)));
    if (!list.data.length) body.append(h("tr", {}, h("td", { colspan: 8, class: "empty" }, "No jobs yet.")));
  });
}

function jobRow(job, rows, picked) {
  let row = rows.get(job.id);
  if (!row) {
    const box = h("input", {
      type: "checkbox", checked: picked.has(job.id), "data-test": "pick-job", "data-job": job.id,
      title: "Compare this job",
      onchange: (e) => {
        if (e.target.checked) picked.add(job.id);
        else picked.delete(job.id);
        localStorage.setItem(PICKED, JSON.stringify([...picked]));
      },
    });
    row = h("tr", { "data-job": job.id }, h("td", {}, box));
    rows.set(job.id, row);
  }
  row.replaceChildren(row.firstChild,
    h("td", {}, h("a", { href: `#/jobs/${enc(job.id)}`, "data-test": "job-link" }, job.id)),
    h("td", {}, job.model), h("td", {}, job.method?.type || "supervised"),
    h("td", {}, badge(job.status)), h("td", {}, progressBar(job.tunesmith?.progress)),
    h("td", {}, fmtTime(job.created_at)), h("td", { class: "mono" }, job.fine_tuned_model || "—"));
  return row;
}

function pickedJobs() {
  try {
    return new Set(JSON.parse(localStorage.getItem(PICKED) || "[]"));
  } catch {
    return new Set(); // something else wrote there: start afresh
  }
}

/** Whether a job's model writes text (so it can chat), rather than give labels or scores. */
function generatesText(job) {
  return job.tunesmith?.output === "text";
}

// ---------------------------------------------------------------- metrics

const newMetrics = () => ({ train: new Map(), valid: new Map(), newest: null });

/** Read the job's metrics events newer than the ones already read (the API lists newest first). */
async function readMetrics(jobId, metrics) {
  const fresh = [];
  let after = null;
  for (;;) {
    const cursor = after ? `&after=${enc(after)}` : "";
    const page = await api(`/fine_tuning/jobs/${enc(jobId)}/events?type=metrics&limit=500${cursor}`);
    const known = page.data.findIndex((e) => e.id === metrics.newest);
    fresh.push(...(known < 0 ? page.data : page.data.slice(0, known)));
    if (known >= 0 || !page.has_more) break;
    after = page.last_id;
  }
  if (fresh.length) metrics.newest = fresh[0].id;
  // Oldest first, so a step logged again after a resume keeps its last value.
  for (const event of fresh.reverse()) {
    const data = event.data || {};
    if (typeof data.step !== "number") continue;
    if (typeof data.train_loss === "number") metrics.train.set(data.step, data);
    else metrics.valid.set(data.step, data);
  }
  return fresh.length > 0;
}

/** [[step, value], ...] of `name` in a step -> data map, by step. */
function points(byStep, name) {
  return [...byStep.entries()]
    .filter(([, data]) => typeof data[name] === "number")
    .map(([step, data]) => [step, data[name]])
    .sort((a, b) => a[0] - b[0]);
}

const lastOf = (byStep, name) => {
  const all = points(byStep, name);
  return all.length ? all[all.length - 1][1] : undefined;
};

const validMetricNames = (metrics) =>
  [...new Set([...metrics.valid.values()].flatMap((d) => Object.keys(d)))]
    .filter((k) => k.startsWith("valid_") && k !== "valid_loss").sort();

// ---------------------------------------------------------------- chart

/** Round tick values covering [lo, hi], about `count` of them. */
function ticks(lo, hi, count) {
  if (hi === lo) return [lo];
  const raw = (hi - lo) / count;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((f) => f * magnitude).find((s) => s >= raw);
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push(Number(t.toPrecision(12)));
  return out;
}

/** An SVG line chart: series [{name, points: [[x, y]], color, dashed}] with axes, ticks and a legend. */
function lineChart(series, { id, xLabel = "step", yLabel = "", W = 640, H = 300 } = {}) {
  const L = 64, R = 16, B = 40;
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart-svg", id, role: "img", "aria-label": yLabel });
  const drawn = series.filter((s) => s.points.length);
  const all = drawn.flatMap((s) => s.points);
  if (!all.length) {
    root.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "muted" }, "no data yet"));
    return root;
  }
  // The legend goes in rows above the plot (about 6.5 px per character of its 11 px text).
  const legend = [];
  let lx = L, ly = 12;
  for (const s of drawn) {
    const width = 30 + 6.5 * s.name.length;
    if (lx + width > W - R && lx > L) [lx, ly] = [L, ly + 16];
    legend.push([s, lx, ly]);
    lx += width + 14;
  }
  const T = ly + 18;
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const sx = (x) => L + (x1 === x0 ? 0.5 : (x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => H - B - (y1 === y0 ? 0.5 : (y - y0) / (y1 - y0)) * (H - T - B);
  for (const t of ticks(y0, y1, 4)) {
    root.append(svg("line", { x1: L, x2: W - R, y1: sy(t), y2: sy(t), class: "grid" }),
      svg("text", { x: L - 6, y: sy(t) + 4, "text-anchor": "end", class: "tick" }, fmtNumber(t)));
  }
  for (const t of ticks(x0, x1, 6).filter(Number.isInteger)) {
    root.append(svg("line", { x1: sx(t), x2: sx(t), y1: H - B, y2: H - B + 4, class: "axis" }),
      svg("text", { x: sx(t), y: H - B + 16, "text-anchor": "middle", class: "tick" }, String(t)));
  }
  const midY = (T + H - B) / 2;
  root.append(
    svg("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }),
    svg("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" }),
    svg("text", { x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle", class: "label" }, xLabel),
    svg("text", { x: 12, y: midY, transform: `rotate(-90 12 ${midY})`, "text-anchor": "middle", class: "label" },
      yLabel),
  );
  for (const [s, x, y] of legend) {
    const dash = s.dashed ? "6 4" : null;
    const coords = s.points.map(([px, py]) => [sx(px).toFixed(1), sy(py).toFixed(1)]);
    root.append(
      svg("polyline", { points: coords.map((c) => c.join(",")).join(" "), stroke: s.color, fill: "none",
        "stroke-width": 2, "stroke-dasharray": dash, "data-series": s.name, "data-points": s.points.length }),
      ...(coords.length <= 80 ? coords.map(([cx, cy]) => svg("circle", { cx, cy, r: 2.5, fill: s.color })) : []),
      svg("line", { x1: x, x2: x + 22, y1: y, y2: y, stroke: s.color, "stroke-width": 2, "stroke-dasharray": dash }),
      svg("text", { x: x + 28, y: y + 4, class: "legend" }, s.name),
    );
  }
  return root;
}

// ---------------------------------------------------------------- one job

function jobView(main, id) {
  const metrics = newMetrics();
  const summary = h("div", { id: "job-summary" });
  const actions = h("div", { class: "actions", id: "job-actions" });
  const lossChart = h("div", { class: "chart", id: "loss-chart" });
  const metricChart = h("div", { class: "chart", id: "metric-chart" });
  const metricSelect = h("select", { id: "metric-select", onchange: () => draw() });
  const events = h("ol", { class: "events", id: "events" });
  const checkpoints = h("tbody");
  const report = h("div", { id: "job-report" });
  put(main, title(["Job ", h("span", { class: "mono" }, id)]), summary, actions,
    h("div", { class: "charts" },
      h("section", { class: "panel" }, h("h2", {}, "Loss"), lossChart),
      h("section", { class: "panel" }, h("h2", {}, "Validation metric ", metricSelect), metricChart)),
    h("section", { class: "panel" }, h("h2", {}, "Checkpoints"),
      table("checkpoints", ["Step", "Checkpoint model", "train_loss", "valid_loss"], checkpoints)),
    h("section", { class: "panel" }, h("h2", {}, "Events"), events),
    report,
  );

  function draw() {
    lossChart.replaceChildren(lineChart([
      { name: "train_loss", points: points(metrics.train, "train_loss"), color: COLORS[0] },
      { name: "valid_loss", points: points(metrics.valid, "valid_loss"), color: COLORS[1], dashed: true },
    ], { id: "loss-svg", yLabel: "loss" }));
    const names = validMetricNames(metrics);
    const chosen = metricSelect.value || names.find((n) => n.includes("accuracy")) || names[0] || "";
    if (names.join() !== [...metricSelect.options].map((o) => o.value).join()) {
      metricSelect.replaceChildren(...names.map((n) => option(n, n, n === chosen)));
    }
    metricChart.replaceChildren(lineChart(chosen ? [{ name: chosen, points: points(metrics.valid, chosen),
      color: COLORS[2] }] : [], { id: "metric-svg", yLabel: chosen }));
  }

  let settled = false; // a finished job, read once more after it finished: nothing changes any more
  let shownStatus = null;
  const refresh = async () => {
    if (settled) return;
    const job = await api(`/fine_tuning/jobs/${enc(id)}`);
    if (await readMetrics(id, metrics) || !lossChart.firstChild) draw();
    const [eventList, checkpointList] = await Promise.all([
      api(`/fine_tuning/jobs/${enc(id)}/events?limit=100`), api(`/fine_tuning/jobs/${enc(id)}/checkpoints?limit=100`),
    ]);
    summary.replaceChildren(jobSummary(job));
    events.replaceChildren(...eventList.data.map(eventItem));
    checkpoints.replaceChildren(...checkpointList.data.map(checkpointRow));
    if (job.status !== shownStatus) {
      const acted = () => { shownStatus = null; refresh().catch((err) => notice(err.message)); };
      actions.replaceChildren(...jobActions(job, acted));
      report.replaceChildren(...(job.status === "succeeded" ? [reportPanel(job)] : []));
      shownStatus = job.status;
    }
    settled = FINAL.includes(job.status);
  };
  every(1500, refresh);
}

function jobSummary(job) {
  const hp = job.hyperparameters || {};
  const rows = [
    ["Status", badge(job.status)], ["Progress", progressBar(job.tunesmith?.progress)], ["Model", job.model],
    ["Method", job.method?.type || "supervised"],
    ["Fine-tuned model", h("span", { class: "mono", id: "job-fine-tuned-model" }, job.fine_tuned_model || "—")],
    ["Training file", job.training_file], ["Validation file", job.validation_file || "(split from training)"],
    ["n_epochs", String(hp.n_epochs)], ["batch_size", String(hp.batch_size)],
    ["learning_rate_multiplier", String(hp.learning_rate_multiplier)],
    ["Created", fmtTime(job.created_at)], ["Finished", fmtTime(job.finished_at)],
    ["Trained tokens", job.trained_tokens === null ? "—" : String(job.trained_tokens)],
  ];
  const list = h("dl", { class: "summary", id: "job-status", "data-status": job.status },
    rows.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
  const error = job.error?.message && h("p", { class: "error", id: "job-error" }, `Error: ${job.error.message}`);
  return h("div", {}, list, error);
}

function jobActions(job, after) {
  const act = (action, label, cls) => h("button", {
    type: "button", class: cls, "data-test": `job-${action}`,
    onclick: async (e) => {
      e.target.disabled = true;
      await post(`/fine_tuning/jobs/${enc(job.id)}/${action}`).catch((err) => notice(err.message));
      after();
    },
  }, label);
  const chat = job.status === "succeeded" && job.fine_tuned_model && generatesText(job);
  return [
    ["queued", "running"].includes(job.status) && act("pause", "Pause", "secondary"),
    job.status === "paused" && act("resume", "Resume", ""),
    !FINAL.includes(job.status) && act("cancel", "Cancel", "danger"),
    chat && h("a", { class: "button", id: "chat-with-model", href: `#/chat?model=${enc(job.fine_tuned_model)}` },
      "Chat with this model"),
  ].filter(Boolean);
}

function reportPanel(job) {
  // The report is the server's own HTML; sandbox="" runs it with no scripts and no access to this page.
  const frame = h("iframe", { id: "report-frame", sandbox: "", title: "Run report" });
  const status = h("span", { class: "muted" }, "loading the report…");
  api(`/fine_tuning/jobs/${enc(job.id)}/report`, { raw: true })
    .then((res) => res.text())
    .then((html) => { frame.srcdoc = html; status.textContent = ""; })
    .catch((err) => { status.textContent = `No report: ${err.message}`; });
  return h("details", { class: "panel report", id: "report", open: true },
    h("summary", {}, "Run report ", status), frame);
}

function eventItem(event) {
  return h("li", { class: `event ${event.level === "error" ? "error" : ""}`, "data-type": event.type },
    h("time", {}, fmtTime(event.created_at)), h("span", { class: "level" }, event.level), event.message);
}

function checkpointRow(c) {
  const m = c.metrics || {};
  return h("tr", {}, h("td", {}, String(c.step_number)), h("td", { class: "mono" }, c.fine_tuned_model_checkpoint),
    h("td", {}, fmtNumber(m.train_loss)), h("td", {}, fmtNumber(m.valid_loss)));
}

// ---------------------------------------------------------------- files

function filesView(main) {
  const body = h("tbody");
  const message = h("p", { id: "upload-message", role: "status" });
  const input = h("input", { type: "file", id: "upload-file", name: "file", required: true });
  const purpose = h("select", { id: "upload-purpose", name: "purpose" }, option("fine-tune"));
  const refresh = async () => {
    const list = await api("/files");
    body.replaceChildren(...list.data.map((f) => fileRow(f, refresh)));
    if (!list.data.length) body.append(h("tr", {}, h("td", { colspan: 7, class: "empty" }, "No files yet.")));
  };
  const form = h("form", { id: "upload-form", class: "panel inline", onsubmit: async (e) => {
    e.preventDefault();
    if (!input.files.length) return;
    const data = new FormData();
    data.append("file", input.files[0]);
    data.append("purpose", purpose.value);
    message.className = "";
    message.textContent = "uploading…";
    try {
      const file = await api("/files", { method: "POST", body: data });
      message.textContent = `Uploaded ${file.filename} as ${file.id}: ${file.status}`;
      form.reset();
    } catch (err) {
      message.className = "error";
      message.textContent = err.message;
    }
    await refresh();
  } },
  h("h2", {}, "Upload a file"), field("File (JSONL)", input), field("Purpose", purpose),
  h("button", { type: "submit", id: "upload-submit" }, "Upload"), message);
  const heads = ["File", "Name", "Bytes", "Created", "Status", "Details", ""];
  put(main, title("Files"), form, table("files-table", heads, body));
  refresh().catch((err) => notice(err.message));
}

function fileRow(f, refresh) {
  const remove = h("button", { type: "button", class: "danger small", "data-test": "delete-file", onclick: async () => {
    if (!window.confirm(`Delete ${f.filename} (${f.id})?`)) return;
    await api(`/files/${enc(f.id)}`, { method: "DELETE" }).catch((err) => notice(err.message));
    await refresh();
  } }, "Delete");
  return h("tr", { "data-file": f.id, "data-filename": f.filename, "data-status": f.status },
    h("td", { class: "mono" }, f.id), h("td", {}, f.filename), h("td", {}, String(f.bytes)),
    h("td", {}, fmtTime(f.created_at)), h("td", {}, badge(f.status)),
    h("td", { class: "details" }, f.status_details || ""), h("td", {}, remove));
}

// ---------------------------------------------------------------- new job

/** A hyperparameter field's value as the API takes it: "auto" or a number (anything else is sent as is,
 *  for the server to explain). */
function hyperValue(text) {
  const v = text.trim();
  if (v === "" || v === "auto") return "auto";
  return Number.isFinite(Number(v)) ? Number(v) : v;
}

async function newJobView(main) {
  const [models, files] = await Promise.all([api("/models"), api("/files")]);
  const ready = files.data.filter((f) => f.status === "processed");
  const fileOption = (f) => option(f.id, `${f.filename} (${f.id})`);
  const model = h("select", { id: "job-model", required: true },
    models.data.filter((m) => m.owned_by === "tunesmith").map((m) => option(m.id)));
  const training = h("select", { id: "job-training-file", required: true }, ready.map(fileOption));
  const validation = h("select", { id: "job-validation-file" },
    option("", "(none: part of the training file is held out)"), ready.map(fileOption));
  const method = h("select", { id: "job-method" }, METHODS.map((m) => option(m)));
  const hyper = (name) => h("input", { id: `job-${name.replaceAll("_", "-")}`, name, value: "auto", size: 8 });
  const [epochs, batch, lr] = ["n_epochs", "batch_size", "learning_rate_multiplier"].map(hyper);
  const suffix = h("input", { id: "job-suffix", maxlength: 64, placeholder: "optional" });
  const error = h("p", { id: "new-job-error", class: "error", role: "alert" });
  const form = h("form", { id: "new-job-form", class: "panel form", onsubmit: async (e) => {
    e.preventDefault();
    error.textContent = "";
    const type = method.value;
    const body = {
      model: model.value, training_file: training.value,
      method: { type, [type]: { hyperparameters: {
        n_epochs: hyperValue(epochs.value), batch_size: hyperValue(batch.value),
        learning_rate_multiplier: hyperValue(lr.value) } } },
    };
    if (validation.value) body.validation_file = validation.value;
    if (suffix.value.trim()) body.suffix = suffix.value.trim();
    try {
      const job = await post("/fine_tuning/jobs", body);
      location.hash = `#/jobs/${enc(job.id)}`;
    } catch (err) {
      error.textContent = err.message;
    }
  } },
  field("Base model", model), field("Training file", training), field("Validation file", validation),
  field("Method", method), field("n_epochs", epochs), field("batch_size", batch),
  field("learning_rate_multiplier", lr), field("Suffix", suffix),
  h("div", {}, h("button", { type: "submit", id: "create-job" }, "Create job")), error);
  put(main, title("New fine-tuning job"),
    ready.length ? null : h("p", { class: "empty" }, "No processed files yet: ", h("a", { href: "#/files" },
      "upload a training file"), " first."),
    form);
}

// ---------------------------------------------------------------- chat

async function chatView(main, wanted) {
  const tuned = (await api("/models")).data.filter((m) => m.owned_by === "user");
  const model = h("select", { id: "chat-model" }, tuned.map((m) => option(m.id, m.id, m.id === wanted)));
  const maxTokens = h("input", { id: "chat-max-tokens", type: "number", min: 1, max: 4096, value: "64" });
  const temperature = h("input", { id: "chat-temperature", type: "number", min: 0, max: 2, step: "0.1", value: "0" });
  const conversation = h("div", { id: "conversation", class: "conversation" });
  const input = h("textarea", { id: "chat-input", rows: 2, placeholder: "Write a message" });
  const send = h("button", { type: "submit", id: "chat-send" }, "Send");
  let messages = [];
  const form = h("form", { id: "chat-form", class: "chat-form", onsubmit: async (e) => {
    e.preventDefault();
    const text = input.value.trim();
    if (!text || !model.value) return;
    messages.push({ role: "user", content: text });
    conversation.append(bubble("user", text));
    const answer = bubble("assistant", "");
    conversation.append(answer);
    input.value = "";
    send.disabled = true;
    const content = answer.querySelector(".content");
    try {
      const body = { model: model.value, messages, max_tokens: Number(maxTokens.value) || 64,
        temperature: Number(temperature.value) || 0 };
      const reply = await streamChat(body, (piece) => {
        content.textContent += piece;
        content.dataset.pieces = String(Number(content.dataset.pieces || 0) + 1);
        conversation.scrollTop = conversation.scrollHeight;
      });
      messages.push({ role: "assistant", content: reply });
    } catch (err) {
      answer.classList.add("error");
      content.textContent = err.message;
    } finally {
      content.dataset.done = "true";
      send.disabled = false;
    }
  } }, input, send);
  const clear = h("button", { type: "button", class: "secondary", id: "chat-clear",
    onclick: () => { messages = []; conversation.replaceChildren(); } }, "New conversation");
  put(main, title("Chat playground"),
    tuned.length ? null : h("p", { class: "empty" }, "No fine-tuned models yet: a succeeded job makes one."),
    h("div", { class: "panel inline" }, field("Model", model), field("Max tokens", maxTokens),
      field("Temperature", temperature), clear),
    conversation, form,
  );
}

function bubble(role, text) {
  return h("div", { class: `message ${role}` }, h("span", { class: "role" }, role),
    h("div", { class: "content", "data-test": `${role}-message` }, text));
}

/** POST a streamed chat completion; call `onPiece` with each piece of text; return the whole answer. */
async function streamChat(body, onPiece) {
  const res = await api("/chat/completions", {
    method: "POST", raw: true, headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ ...body, stream: true }),
  });
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let text = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return text;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) { // one server-sent event per blank-line-separated block
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n").filter((l) => l.startsWith("data:"))) {
        const data = line.slice(5).trim();
        if (data === "[DONE]") return text;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const piece = chunk.choices?.[0]?.delta?.content;
        if (piece) {
          text += piece;
          onPiece(piece);
        }
      }
    }
  }
}

// ---------------------------------------------------------------- compare

async function compareView(main) {
  const ids = [...pickedJobs()];
  put(main, title("Compare jobs", h("button", { type: "button", class: "secondary", id: "compare-clear",
      onclick: () => { localStorage.removeItem(PICKED); route(); } }, "Clear selection")));
  if (!ids.length) {
    return put(main, h("p", { class: "empty" }, "Pick jobs with the checkboxes on the ",
      h("a", { href: "#/jobs" }, "Jobs"), " page first."));
  }
  const runs = await Promise.all(ids.map(async (id) => {
    try {
      const metrics = newMetrics();
      const job = await api(`/fine_tuning/jobs/${enc(id)}`);
      await readMetrics(id, metrics);
      return { job, metrics };
    } catch (err) {
      return { job: { id }, error: err.message };
    }
  }));
  const series = runs.filter((r) => r.metrics).flatMap(({ job, metrics }, i) => [
    { name: `${job.id} train`, points: points(metrics.train, "train_loss"), color: COLORS[i % COLORS.length] },
    { name: `${job.id} valid`, points: points(metrics.valid, "valid_loss"), color: COLORS[i % COLORS.length],
      dashed: true },
  ]);
  const others = [...new Set(runs.filter((r) => r.metrics).flatMap((r) => validMetricNames(r.metrics)))];
  const columns = ["Job", "Model", "Status", "last train_loss", "last valid_loss", ...others];
  put(main,
    h("section", { class: "panel" }, h("h2", {}, "Loss curves"), h("div", { class: "chart", id: "compare-chart" },
      lineChart(series, { id: "compare-svg", yLabel: "loss", W: 1000, H: 360 }))),
    table("compare-table", columns, h("tbody", {}, runs.map((run) => compareRow(run, others)))));
}

function compareRow({ job, metrics, error }, others) {
  const link = h("td", {}, h("a", { href: `#/jobs/${enc(job.id)}` }, job.id));
  const row = { "data-test": "compare-row", "data-job": job.id };
  if (error) return h("tr", row, link, h("td", { colspan: 4 + others.length, class: "error" }, error));
  const cell = (value, name) => h("td", { "data-metric": name }, fmtNumber(value));
  return h("tr", row, link, h("td", {}, job.model), h("td", {}, badge(job.status)),
    cell(lastOf(metrics.train, "train_loss"), "train_loss"), cell(lastOf(metrics.valid, "valid_loss"), "valid_loss"),
    others.map((n) => cell(lastOf(metrics.valid, n), n)));
}
