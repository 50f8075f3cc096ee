// edgenode's dashboard: polls /stats and /info and draws the node's latency, cost, quality,
// models and routing. Without JavaScript the page still shows the numbers the server put in
// it; this script replaces them with live ones and adds the charts (uPlot, vendored).
"use strict";
(() => {
  const KEY = "edgenode.key";
  const POLL_MS = 2000;
  const HISTORY = 300; // points kept per chart: ten minutes at one poll every 2 s
  const $ = (id) => document.getElementById(id);
  const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  const num = (x, d = 1) => (x == null || !Number.isFinite(Number(x)) ? "—" : Number(x).toFixed(d));
  const usd = (x) => (x == null ? "—" : "$" + (Math.abs(x) < 0.01 && x !== 0 ? Number(x).toPrecision(3) : Number(x).toFixed(2)));
  const pct = (x) => (x == null ? "—" : (100 * x).toFixed(1) + "%");
  const table = (head, rows) =>
    `<div class="scroll"><table><thead><tr>${head.map((h) => `<th>${esc(h)}</th>`).join("")}</tr></thead><tbody>` +
    rows.map((r) => `<tr>${r.map((c) => `<td>${c}</td>`).join("")}</tr>`).join("") +
    "</tbody></table></div>";

  async function get(path) {
    const headers = {};
    const key = sessionStorage.getItem(KEY);
    if (key) headers.Authorization = "Bearer " + key;
    const r = await fetch(path, { headers, cache: "no-store" });
    if (r.status === 401) {
      const e = new Error("this node needs an API key");
      e.auth = true;
      throw e;
    }
    if (!r.ok) throw new Error(`${path} answered ${r.status}`);
    return r.json();
  }

  // Charts: one x (seconds) and named series, redrawn from a rolling history.
  class Chart {
    constructor(el, unit) {
      this.el = el;
      this.unit = unit;
      this.t = [];
      this.series = new Map();
      this.plot = null;
      this.shape = "";
    }
    push(t, values) {
      this.t.push(t);
      for (const [name, v] of Object.entries(values)) {
        if (!this.series.has(name)) this.series.set(name, new Array(this.t.length - 1).fill(null));
      }
      for (const [name, list] of this.series) list.push(values[name] ?? null);
      if (this.t.length > HISTORY) {
        this.t.shift();
        for (const list of this.series.values()) list.shift();
      }
      this.draw();
    }
    draw() {
      const names = [...this.series.keys()];
      const data = [this.t, ...names.map((n) => this.series.get(n))];
      // The chart's own box, else its panel's (less the padding) before the first layout.
      const own = this.el.getBoundingClientRect().width;
      const width = Math.max(240, Math.floor(own || this.el.parentElement.getBoundingClientRect().width - 24));
      const shape = names.join("|") + "@" + width;
      if (this.plot && shape === this.shape) {
        this.plot.setData(data);
        return;
      }
      if (this.plot) this.plot.destroy();
      this.shape = shape;
      const palette = ["#1570ef", "#9e77ed", "#079455", "#dc6803", "#d92d20", "#0e9384", "#6172f3", "#c11574", "#667085"];
      this.plot = new uPlot(
        {
          width,
          height: 220,
          series: [{}, ...names.map((n, i) => ({ label: n, stroke: palette[i % palette.length], width: 1.5, spanGaps: true }))],
          axes: [{}, { label: this.unit, size: 60 }],
          legend: { live: false },
        },
        data,
        this.el,
      );
    }
  }

  const charts = { latency: new Chart($("latency-chart"), "ms"), tiers: new Chart($("tiers-chart"), "requests") };

  function verdict(stats) {
    const r = stats.routing || {};
    const v = r.viability || {};
    const q = v.quality || {};
    const cls = /not/.test(v.verdict || "") ? "not" : /justified/.test(v.verdict || "") ? "justified" : "";
    return (
      `<p class="verdict ${cls}" data-verdict="${esc(v.verdict)}">${esc(v.verdict || "no routed traffic")}</p>` +
      table(
        ["edge requests", "latency value", "cost premium", "edge latency (mean)", "cloud latency", "quality edge / cloud", "quality gap"],
        [[
          `<span data-field="edge_requests">${esc(v.edge_requests ?? 0)}</span>`,
          usd(v.latency_value_usd),
          usd(v.cost_premium_usd),
          num(v.edge_latency_ms_mean) + " ms",
          `${num(v.cloud_latency_ms)} ms <span class="muted">(${esc(v.cloud_latency_source || "")})</span>`,
          `${num(q.edge_mean, 3)} / ${num(q.cloud_mean, 3)}`,
          `${num(q.gap, 3)} <span class="muted">(limit ${num(q.max_quality_gap, 2)})</span>`,
        ]],
      ) +
      `<p class="muted">The edge is justified when the latency it saved (priced at $${esc(v.latency_usd_per_hour)}/hour) is worth more than what it cost over the cloud's price for the same tokens, and its quality is within the limit of the cloud's.</p>`
    );
  }

  function latency(stats) {
    const rows = (stats.workloads || []).map((w) => [
      esc(`${w.workload} · ${w.model}`),
      `<span data-field="count">${esc(w.count)}</span>`,
      num(w.latency_ms?.p50),
      num(w.latency_ms?.p95),
      num(w.latency_ms?.p99),
      num(w.queue_ms_mean, 2),
      num(w.tokenize_ms_mean, 2),
      num(w.compute_ms_mean, 2),
      w.first_token_ms ? `${num(w.first_token_ms.p50)} / ${num(w.first_token_ms.p95)}` : "—",
      num(w.other_ms_mean, 2),
    ]);
    const tiers = stats.routing?.tiers || {};
    for (const tier of ["edge", "cloud"]) {
      const b = tiers[tier];
      if (b && b.count) rows.push([esc(`routed · ${tier}`), esc(b.count), num(b.latency_ms?.p50), "—", num(b.latency_ms?.p99), "—", "—", "—", "—", "—"]);
    }
    return rows.length
      ? table(["workload · model", "requests", "p50 ms", "p95 ms", "p99 ms", "queue ms", "tokenize ms", "inference ms", "first token p50 / p95 ms", "other ms"], rows) +
          `<p class="muted">Over the last ${esc(stats.window_s)} s; stage times are means per request.</p>`
      : `<p class="muted">No requests in the last ${esc(stats.window_s)} s.</p>`;
  }

  function tiers(stats) {
    const l = stats.routing?.ledger || {};
    const day = l.rolling_day || {};
    const budgets = l.budgets_usd_per_day || {};
    const row = (tier) => {
      const t = day[tier] || {};
      const budget = budgets[tier];
      return [
        esc(tier),
        `<span data-field="${tier}_requests">${esc(t.requests ?? 0)}</span>`,
        esc((t.prompt_tokens ?? 0) + (t.completion_tokens ?? 0)),
        usd(t.cost_usd ?? 0),
        esc(t.cache_hits ?? 0),
        budget == null ? "no budget" : usd(Math.max(0, budget - (t.cost_usd ?? 0))) + " left",
      ];
    };
    const share = day.edge_cost_share ?? 0;
    const alert = day.edge_share_alert ?? 0;
    // With a fleet store: each limit's fleet-wide total beside this node's share and lease.
    const fleet = stats.fleet || {};
    const scopes = Object.entries(fleet.scopes || {}).map(([scope, s]) => {
      const d = scope.startsWith("cost") ? 4 : 0;
      return [
        `<code>${esc(scope)}</code>`,
        esc(s.limit),
        `<span data-field="fleet_total">${num(s.fleet_total, d)}</span>`,
        `${num(s.this_node, d)} <span class="muted">(${pct(s.this_node_share)})</span>`,
        num(s.lease_left, d) + (s.exhausted ? " <b>spent</b>" : ""),
      ];
    });
    const fleetTable = scopes.length
      ? `<p>Fleet (<code>${esc(fleet.store)}</code>, ${fleet.reachable === false ? "<b>unreachable</b>" : "reachable"}):</p>` +
        table(["limit", "limit value", "fleet", "this node", "lease left"], scopes)
      : "";
    return (
      table(["tier", "requests", "tokens", "spend (day)", "cache hits", "budget"], [row("edge"), row("cloud")]) +
      fleetTable +
      `<p>Edge share of the day's spend: <b>${pct(share)}</b> <span class="muted">(alert at ${pct(alert)}${day.alerting ? ", alerting" : ""})</span></p>` +
      `<div class="bar" title="edge share of spend"><span style="width:${Math.min(100, 100 * share)}%"></span><i style="left:${Math.min(99, 100 * alert)}%"></i></div>`
    );
  }

  function health(stats, info) {
    const up = stats.routing?.upstream;
    const circuit = up ? `${esc(up.circuit)} <span class="muted">(${esc(up.base_url)}, opened ${esc(up.times_opened)} times)</span>` : "no cloud tier";
    const loads = (info.models || []).map((m) => [esc(m.name), esc(Object.entries(m.load || {}).map(([k, v]) => `${k} ${v}`).join(", ") || "—")]);
    const c = stats.cache || {};
    const cache = c.enabled
      ? `${pct(c.generate?.hit_rate)} generate, ${pct(c.embed?.hit_rate)} embed <span class="muted">(${esc(c.entries)} entries, ${esc(c.weighted_bytes)} bytes)</span>`
      : "off";
    const f = stats.fleet || {};
    const store = f.store
      ? `<span data-field="fleet_store">${f.reachable === false ? "unreachable" : f.reachable ? "reachable" : "not called yet"}</span> <span class="muted">(${esc(f.store)}${f.last_error ? ", " + esc(f.last_error) : ""})</span>`
      : "none (limits are this node's own)";
    return (
      table(["", ""], [["circuit", `<span data-field="circuit">${circuit}</span>`], ["cache hit rate", cache], ["fleet store", store]]) +
      table(["model", "load"], loads)
    );
  }

  function models(info) {
    const drift = info.sync?.models || {};
    const rows = (info.models || []).map((m) => [
      `<span data-field="model">${esc(m.name)}</span>`,
      esc(m.kind),
      esc(m.version ?? "—"),
      `<code>${esc((m.digest || "—").slice(0, 12))}</code>`,
      esc(m.stage),
      esc(m.device ?? "—"),
      esc(drift[m.manifest || m.name]?.status ?? (info.sync?.enabled === false ? "sync off" : "—")),
    ]);
    return table(["name", "kind", "version", "digest", "stage", "device", "sync"], rows);
  }

  async function poll() {
    try {
      const [stats, info] = await Promise.all([get("/stats"), get("/info")]);
      $("key-form").hidden = true;
      $("verdict").querySelector(".body").innerHTML = verdict(stats);
      $("latency").querySelector(".body").innerHTML = latency(stats);
      $("tiers").querySelector(".body").innerHTML = tiers(stats);
      $("health").querySelector(".body").innerHTML = health(stats, info);
      $("models").querySelector(".body").innerHTML = models(info);
      const t = Date.now() / 1000;
      const lat = {};
      for (const w of stats.workloads || []) {
        lat[`${w.model} p50`] = w.latency_ms?.p50;
        lat[`${w.model} p99`] = w.latency_ms?.p99;
        lat[`${w.model} queue`] = w.queue_ms_mean;
        lat[`${w.model} inference`] = w.compute_ms_mean;
        if (w.tokenize_ms_mean) lat[`${w.model} tokenize`] = w.tokenize_ms_mean;
        if (w.first_token_ms) lat[`${w.model} first token p50`] = w.first_token_ms.p50;
      }
      const rt = stats.routing?.tiers || {};
      if (rt.edge?.count) lat["edge p50"] = rt.edge.latency_ms?.p50;
      if (rt.cloud?.count) lat["cloud p50"] = rt.cloud.latency_ms?.p50;
      charts.latency.push(t, lat);
      const day = stats.routing?.ledger?.rolling_day || {};
      charts.tiers.push(t, { edge: day.edge?.requests ?? 0, cloud: day.cloud?.requests ?? 0 });
      $("status").textContent = `${info.name} ${info.version} on ${info.device} · up ${info.uptime_s} s · updated ${new Date().toLocaleTimeString()}`;
      document.body.dataset.ready = "true";
      // How wide the page laid out, against the window: the layout check on narrow screens.
      document.body.dataset.layout = `${document.documentElement.scrollWidth}/${window.innerWidth}`;
    } catch (e) {
      $("status").textContent = e.message;
      if (e.auth) $("key-form").hidden = false;
    }
  }

  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(KEY, $("key").value.trim());
    poll();
  });
  poll();
  setInterval(poll, POLL_MS);
})();
