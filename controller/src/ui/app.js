// Outpost's status page: reads the API (/v1/status, /v1/overview, /v1/instances) and follows
// the event stream (/v1/events, Server-Sent Events read through fetch so that a token can be
// sent). Read-only until an API token is given; then nodes can be cordoned and instances
// stopped or started. No framework, no build step, no CDN.
"use strict";

const state = { token: sessionStorage.getItem("outpost-token") || "", instances: [], overview: null, events: [], lastSeq: 0 };
const MAX_ROWS = 500, MAX_EVENTS = 60;
const $ = (id) => document.getElementById(id);
const clock = (ms) => new Date(ms).toLocaleTimeString([], { hour12: false });
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));

// Every request says it is Outpost's own page (the API refuses changes that do not).
function headers() {
  const h = { "X-Outpost-Client": "status-page" };
  if (state.token) h.Authorization = "Bearer " + state.token;
  return h;
}

async function get(path) {
  const r = await fetch(path, { headers: headers() });
  if (r.status === 401) throw new Error("this controller needs its API token: enter it above");
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return r.json();
}

async function act(method, path) {
  const r = await fetch(path, { method, headers: headers() });
  if (!r.ok) {
    const b = await r.json().catch(() => ({}));
    alert(b.error || "HTTP " + r.status);
  }
  refreshSoon();
}

const phaseClass = (p) => ({ running: "ok", stopped: "info", scheduled: "info", building: "info", downloading: "info",
  pending: "warn", deleting: "warn", crashed: "bad", error: "bad", held: "warn" }[p] || "");
const stateClass = (s) => ({ up: "ok", cordoned: "warn", draining: "warn", down: "bad", foreign: "bad" }[s] || "");

function age(ms) {
  if (!ms) return "";
  const s = Math.max(0, Math.floor((Date.now() - ms) / 1000));
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m";
  if (s < 86400) return Math.floor(s / 3600) + "h";
  return Math.floor(s / 86400) + "d";
}

function bar(label, used, total, unit) {
  const pct = total > 0 ? Math.min(100, Math.round((100 * used) / total)) : 0;
  const cls = pct >= 95 ? "full" : pct >= 80 ? "hot" : "";
  return `<div class="bar" title="${esc(label)}: ${used} of ${total} ${unit} claimed"><span>${esc(label)}</span>` +
    `<span class="track"><span class="fill ${cls}" style="width:${pct}%"></span></span>` +
    `<span class="v">${used}/${total} ${unit}</span></div>`;
}

function renderHealth(h) {
  const pill = (ok, good, bad) => `<span class="pill ${ok ? "ok" : "bad"}">${ok ? good : bad}</span>`;
  $("health").innerHTML = pill(h.ready, "ready", "not ready") + pill(h.broker_connected, "broker connected", "broker DISCONNECTED") +
    pill(h.store_writable, "store writable", "store NOT writable") + `<span class="pill">v${esc(h.version)}</span>` +
    (state.token ? `<span class="pill info">actions on</span>` : `<span class="pill">read-only</span>`);
}

function renderSummary(o) {
  const nodes = o.nodes.length, up = o.nodes.filter((n) => n.state === "up").length;
  const running = o.phases.running || 0;
  const total = Object.values(o.phases).reduce((a, b) => a + b, 0);
  const trouble = (o.phases.error || 0) + (o.phases.crashed || 0);
  const card = (n, l, id) => `<div class="card" id="${id}"><div class="n">${n}</div><div class="l">${l}</div></div>`;
  $("summary").innerHTML = card(`${up}/${nodes}`, "nodes up", "sum-nodes") + card(`${running}/${total}`, "instances running", "sum-running") +
    card(trouble, "in error or crashed", "sum-trouble") + card(o.scheduler.placements, "placed since start", "sum-placed") +
    card(o.scheduler.failures, "refused (no host)", "sum-refused");
}

function renderNodes(o) {
  $("nodes-count").textContent = o.nodes.length;
  $("nodes").innerHTML = o.nodes.map((n) => {
    const cap = n.capacity, cl = n.claimed;
    const labels = (n.labels || []).map((l) => `<span class="chip">${esc(l)}</span>`).join("");
    const actions = state.token
      ? `<div class="actions"><button data-act="${n.state === "cordoned" ? "uncordon" : "cordon"}" data-node="${esc(n.id)}">${n.state === "cordoned" ? "Uncordon" : "Cordon"}</button></div>`
      : "";
    return `<article class="node" data-node="${esc(n.id)}" data-state="${esc(n.state)}">` +
      `<div class="top"><span class="name">${esc(n.id)}</span><span class="pill ${stateClass(n.state)}">${esc(n.state)}</span></div>` +
      `<div class="meta">${esc(n.arch || "?")} · ${esc(n.hypervisor || "?")} · ${n.instances} instance${n.instances === 1 ? "" : "s"}` +
      `${n.agent_version ? " · agent " + esc(n.agent_version) : ""}</div>` +
      bar("vCPU", cl.vcpus, cap.vcpus, "") + bar("Memory", Math.round(cl.memory_mib / 1024 * 10) / 10, Math.round(cap.memory_mib / 1024 * 10) / 10, "GiB") +
      bar("Disk", cl.disk_gib, cap.disk_gib, "GiB") +
      (labels ? `<div class="chips">${labels}</div>` : "") + actions + `</article>`;
  }).join("") || `<p class="muted">No nodes yet: start an agent (see the README).</p>`;
}

function renderInstances() {
  const q = $("filter").value.trim().toLowerCase();
  const all = state.instances;
  const shown = q ? all.filter((i) => [i.name, i.node, i.phase, i.ip, i.id].some((f) => (f || "").toLowerCase().includes(q))) : all;
  $("instances-count").textContent = all.length;
  const rows = shown.slice(0, MAX_ROWS).map((i) => {
    const act = state.token && i.phase !== "held"
      ? (i.power === "running" ? `<button data-act="stop" data-inst="${esc(i.id)}">Stop</button>` : `<button data-act="start" data-inst="${esc(i.id)}">Start</button>`)
      : "";
    return `<tr data-instance="${esc(i.name)}" data-phase="${esc(i.phase)}">` +
      `<td class="name" data-l="">${esc(i.name)}</td>` +
      `<td data-l="phase"><span class="pill ${phaseClass(i.phase)}">${esc(i.phase)}</span></td>` +
      `<td data-l="node">${esc(i.node || "–")}</td><td class="mono" data-l="ip">${esc(i.ip || "–")}</td>` +
      `<td data-l="age">${age(i.created_ms)}</td><td class="reason" data-l="">${esc(i.reason)}</td><td>${act}</td></tr>`;
  }).join("");
  document.querySelector("#instances tbody").innerHTML = rows || `<tr><td colspan="7" class="muted">No instances${q ? " match" : " yet"}.</td></tr>`;
  $("instances-more").textContent = shown.length > MAX_ROWS ? `Showing ${MAX_ROWS} of ${shown.length}: filter to narrow.` : "";
}

function renderWhy(o) {
  const s = o.scheduler;
  const filters = Object.entries(s.refusals).sort((a, b) => b[1] - a[1])
    .map(([f, n]) => `<span class="chip">${esc(f)}: ${n}</span>`).join("");
  const last = s.last_refusals.slice(-5).reverse()
    .map((r) => `<div class="card"><time class="muted">${clock(r.at_ms)}</time><div>${esc(r.why)}</div></div>`).join("");
  $("why").innerHTML = (filters ? `<p class="chips" id="why-filters">${filters}</p>` : "") +
    (last || `<p class="muted">No request has been refused since the controller started.</p>`);
}

function renderEvents() {
  $("events").innerHTML = state.events.map((e) => {
    const what = e.instance ? esc(e.instance) : e.node ? esc(e.node) : "";
    return `<li data-kind="${esc(e.kind)}"><time>${clock(e.at_ms)}</time>` +
      `<span><span class="k">${esc(e.kind)}</span> ${what}${e.node && e.instance ? " on " + esc(e.node) : ""}` +
      `${e.detail ? ` <span class="muted">${esc(e.detail)}</span>` : ""}</span></li>`;
  }).join("");
}

async function refresh() {
  try {
    const [h, o, inst] = await Promise.all([get("/v1/status"), get("/v1/overview"), get("/v1/instances")]);
    state.overview = o;
    state.instances = inst.sort((a, b) => a.name.localeCompare(b.name));
    renderHealth(h);
    renderSummary(o);
    renderNodes(o);
    renderInstances();
    renderWhy(o);
    $("error").hidden = true;
    if (!document.body.dataset.loaded) {
      // Navigation to the first full render, for the page-load benchmark.
      document.body.dataset.renderMs = String(Math.round(performance.now()));
    }
    document.body.dataset.loaded = "true";
  } catch (e) {
    $("error").textContent = e.message;
    $("error").hidden = false;
  }
}

let pending = null;
function refreshSoon() {
  if (!pending) pending = setTimeout(() => { pending = null; refresh(); }, 250);
}

// The event stream: the latest events first, then each as it happens; reconnects from the last seen.
async function follow() {
  for (;;) {
    try {
      if (state.lastSeq === 0) {
        const recent = await get("/v1/events");
        state.events = recent.slice(-MAX_EVENTS).reverse();
        state.lastSeq = recent.length ? recent[recent.length - 1].seq : 0;
        renderEvents();
      }
      const r = await fetch(`/v1/events?follow=true&since=${state.lastSeq}`, { headers: { ...headers(), Accept: "text/event-stream" } });
      if (!r.ok) throw new Error("HTTP " + r.status);
      $("live").classList.add("on");
      const reader = r.body.getReader(), dec = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true });
        let i;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          const msg = buf.slice(0, i);
          buf = buf.slice(i + 2);
          const data = msg.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
          if (!data) continue;
          let e;
          try { e = JSON.parse(data); } catch { continue; }
          if (typeof e.seq !== "number") continue;
          state.lastSeq = Math.max(state.lastSeq, e.seq);
          state.events.unshift(e);
          state.events.length = Math.min(state.events.length, MAX_EVENTS);
          renderEvents();
          refreshSoon();
        }
      }
    } catch (e) {
      // retried below
    }
    $("live").classList.remove("on");
    await new Promise((res) => setTimeout(res, 2000));
  }
}

document.addEventListener("click", (ev) => {
  const b = ev.target.closest("button[data-act]");
  if (!b) return;
  if (b.dataset.node) act("POST", `/v1/nodes/${encodeURIComponent(b.dataset.node)}/${b.dataset.act}`);
  if (b.dataset.inst) act("POST", `/v1/instances/${encodeURIComponent(b.dataset.inst)}/${b.dataset.act}`);
});
$("filter").addEventListener("input", renderInstances);
$("tokenform").addEventListener("submit", (ev) => {
  ev.preventDefault();
  state.token = $("token").value.trim();
  sessionStorage.setItem("outpost-token", state.token);
  $("token").value = "";
  state.lastSeq = 0;
  refresh();
});

refresh();
setInterval(refresh, 5000);
follow();
