/* autoresearch dashboard: draws one tag's state (from /api/state, or embedded in the HTML report)
   and follows the ledger live through server-sent events. Every text from the ledger is set with
   textContent, never parsed as HTML. */
"use strict";

(function () {
  const body = document.body;
  const live = body.dataset.mode === "live";
  const PAGE = 200; // rows added to the table per "show more"
  const PALETTE = ["#2e6bd9", "#f79009", "#7a5af8", "#ee46bc", "#0e9384", "#dc6803", "#6172f3", "#c11574"];
  const KEEP = "#12b76a";
  let state = null;
  let clockOffset = 0; // server time minus this browser's
  let plot = null;
  let shownRows = PAGE;
  let sortKey = "id", sortUp = false;
  let knownIds = null;
  let needAll = false; // the first page fetches only the newest rows; filters, sorting and "more" need them all
  let refresh = () => {}; // fetches the state again (live only)

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else node.setAttribute(k, v);
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return node;
  }
  const fmt = (v, d = 6) => (v === null || v === undefined ? "" : Number(v).toFixed(d));
  const signed = (v) => (v === null || v === undefined ? "" : (v >= 0 ? "+" : "") + Number(v).toFixed(6));
  const secs = (v) => (v === null || v === undefined ? "" : v < 120 ? v.toFixed(0) + " s" : (v / 60).toFixed(1) + " min");
  const money = (v) => (v === null || v === undefined ? "—" : v >= 0.1 ? "$" + v.toFixed(2) : "$" + v.toFixed(4));
  const href = (id) => (live ? "/e/" + id : document.getElementById("e-" + id) ? "#e-" + id : null);
  const now = () => Date.now() / 1000 + clockOffset;

  function agentColors(s) {
    const colors = {};
    s.agents.forEach((a, i) => { colors[a.agent] = PALETTE[i % PALETTE.length]; });
    for (const p of s.chart.points) if (!(p.agent in colors)) colors[p.agent] = PALETTE[Object.keys(colors).length % PALETTE.length];
    return colors;
  }

  // -- figures -------------------------------------------------------------------------------
  function figure(label, value, sub) {
    return el("div", { class: "figure" }, el("div", { class: "label", text: label }), el("div", { class: "value", text: value }),
      sub ? el("div", { class: "sub", text: sub }) : null);
  }

  function drawFigures(s) {
    const box = document.getElementById("figures");
    const items = [];
    const c = s.champion, b = s.baseline;
    items.push(figure("champion " + s.metric, c ? fmt(c.metric) : "—",
      c ? "#" + c.id + " " + c.commit + (c.runs > 1 ? " · mean of " + c.runs + " runs" : "") : "no kept experiment yet"));
    if (c && b) {
      const gain = s.direction === "min" ? b.metric - c.metric : c.metric - b.metric;
      items.push(figure("gain over the baseline", signed(gain), "baseline " + fmt(b.metric) + (b.runs > 1 ? " (" + b.runs + " runs)" : "")));
    }
    if (c && c.test !== null) items.push(figure("held-out test split", fmt(c.test), b && b.test !== null ? "baseline " + fmt(b.test) : "champion only"));
    items.push(figure("experiments", String(s.experiments),
      Object.entries(s.counts).sort().map(([k, v]) => v + " " + k).join(" · ") + (s.repeats ? " · " + s.repeats + " repeat runs" : "")));
    items.push(figure("per hour", s.per_hour === null ? "—" : s.per_hour.toFixed(1), "finished experiments"));
    items.push(figure("utilization", s.utilization === null ? "—" : (100 * s.utilization).toFixed(0) + " %",
      s.workers.length + " worker" + (s.workers.length === 1 ? "" : "s") + " busy running"));
    items.push(figure("noise σ", s.sigma === null ? "—" : fmt(s.sigma), s.chart.k ? "kept only beyond " + s.chart.k + "·σ" : "strict judge"));
    items.push(figure("cost so far", money(s.cost), s.tokens ? s.tokens.toLocaleString() + " tokens" : "no tokens"));
    box.replaceChildren(...items);
  }

  // -- chart ---------------------------------------------------------------------------------
  function chartData(s) {
    const pts = s.chart.points;
    const n = pts.length;
    const xs = pts.map((p) => p.n);
    const colors = agentColors(s);
    const agents = Object.keys(colors);
    const measured = pts.filter((p) => p.metric !== null).map((p) => p.metric);
    const low = measured.length ? Math.min(...measured) : 0;
    const perAgent = agents.map((a) => pts.map((p) => (p.agent === a && p.metric !== null && p.status !== "keep" ? p.metric : null)));
    const kept = pts.map((p) => (p.status === "keep" ? p.metric : null));
    const failed = pts.map((p) => (p.metric === null ? low : null));
    const fill = (pairs, col) => {
      const out = new Array(n).fill(null);
      for (const row of pairs) if (row[0] < n) out[row[0]] = row[col];
      return out;
    };
    const champ = fill(s.chart.champion, 1), lo = fill(s.chart.band, 1), hi = fill(s.chart.band, 2), test = fill(s.chart.test, 1);
    return { xs, agents, colors, data: [xs, ...perAgent, kept, failed, champ, lo, hi, test] };
  }

  function drawChart(s) {
    const box = document.getElementById("chart");
    const note = document.getElementById("chart-note");
    const d = chartData(s);
    note.textContent = s.metric + ", " + (s.direction === "min" ? "lower" : "higher") + " is better · click a point to open it";
    if (!d.xs.length) { if (plot) { plot.destroy(); plot = null; } box.replaceChildren(el("p", { class: "none", text: "no finished experiment yet" })); return; }
    const stepped = uPlot.paths.stepped({ align: 1 });
    const dots = (color, size) => ({ show: true, size, fill: color, stroke: color });
    const series = [{ label: "experiment" }];
    for (const a of d.agents) series.push({ label: d.agents.length > 1 ? a : "discarded", stroke: d.colors[a], paths: () => null, points: dots(d.colors[a] + "99", 5) });
    series.push({ label: "kept", stroke: KEEP, paths: () => null, points: { show: true, size: 10, width: 2, fill: KEEP, stroke: "#05603a" } });
    series.push({ label: "crash / invalid", stroke: "#d92d20", paths: () => null, points: { show: true, size: 6, fill: "#d92d20", stroke: "#d92d20" } });
    series.push({ label: "champion (mean of its runs)", stroke: KEEP, width: 2, paths: stepped, points: { show: false } });
    series.push({ label: "noise band (lower edge)", stroke: "rgba(18,183,106,0.25)", width: 1, paths: stepped, points: { show: false } });
    series.push({ label: "noise band (±" + (s.chart.k || "k") + "·σ the judge uses)", stroke: "rgba(18,183,106,0.25)", width: 1, paths: stepped, points: { show: false } });
    series.push({ label: "test split (champion)", stroke: "#475467", width: 1.5, dash: [6, 4], paths: stepped, points: { show: true, size: 5 }, spanGaps: true });
    const base = 1 + d.agents.length;
    const hiIdx = base + 4, loIdx = base + 3;
    const width = Math.max(320, box.clientWidth || 900);
    const opts = {
      width, height: 360, series,
      scales: { x: { time: false } },
      axes: [{ label: "experiment", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000], values: (u, v) => v.map((x) => String(Math.round(x))) },
             { label: s.metric, size: 70, values: (u, v) => v.map((x) => x.toFixed(3)) }],
      bands: s.chart.band.length ? [{ series: [hiIdx, loIdx], fill: "rgba(18,183,106,0.10)" }] : [],
      legend: { live: false },
      cursor: { points: { show: false } },
      hooks: { setCursor: [(u) => hover(u, s)] },
    };
    if (plot) plot.destroy();
    box.replaceChildren();
    plot = new uPlot(opts, d.data, box);
    const entries = plot.root.querySelectorAll(".u-legend .u-series");
    if (entries[loIdx]) entries[loIdx].hidden = true; // the band's lower edge: one legend entry for the band
    plot.over.addEventListener("click", () => {
      const i = plot.cursor.idx;
      if (i === null || i === undefined) return;
      const p = s.chart.points[i];
      const to = p && href(p.id);
      if (to) location.href = to;
    });
  }

  function hover(u, s) {
    const i = u.cursor.idx;
    const box = document.getElementById("hover");
    const p = i === null || i === undefined ? null : s.chart.points[i];
    box.textContent = p ? "#" + p.id + " · " + p.status + " · " + (p.metric === null ? "no metric" : fmt(p.metric)) + " · " + p.agent + " · " + p.description : "";
  }

  // -- workers, lineage, agents ----------------------------------------------------------------
  function drawWorkers(s) {
    const box = document.getElementById("workers");
    if (!s.workers.length) { box.replaceChildren(el("p", { class: "none", text: "nothing runs now" })); return; }
    const rows = s.workers.map((w) => {
      const bar = el("div", { class: "bar" }, el("span", { "data-started": w.started_at ?? "", "data-budget": w.budget }));
      const what = w.experiment === null ? el("span", { class: "none", text: "idle" })
        : el("span", {}, linkTo(w.experiment, "#" + w.experiment), " " + (w.kind === "repeat" ? "(repeat) " : ""), w.description);
      return el("tr", {}, el("td", { text: w.name }), el("td", { text: w.node }), el("td", { text: w.device }),
        el("td", { class: "desc" }, what), el("td", {}, w.experiment === null ? "" : bar), el("td", { class: "num elapsed", "data-started": w.started_at ?? "" }));
    });
    box.replaceChildren(el("table", {}, el("thead", {}, el("tr", {}, ...["worker", "node", "device", "runs", "progress", ""].map((h) => el("th", { text: h })))),
      el("tbody", {}, ...rows)));
    tick();
  }

  function tick() {
    for (const span of document.querySelectorAll(".bar > span[data-started]")) {
      const started = parseFloat(span.dataset.started), budget = parseFloat(span.dataset.budget);
      if (!started || !budget) continue;
      span.style.width = Math.min(100, (100 * (now() - started)) / budget).toFixed(1) + "%";
    }
    for (const cell of document.querySelectorAll("td.elapsed[data-started]")) {
      const started = parseFloat(cell.dataset.started);
      cell.textContent = started ? secs(Math.max(0, now() - started)) : "";
    }
  }

  function linkTo(id, text) {
    const to = href(id);
    return to ? el("a", { href: to, text }) : el("span", { text });
  }

  function drawLineage(s) {
    const box = document.getElementById("lineage");
    if (!s.lineage.length) { box.replaceChildren(el("li", { class: "none", text: "no champion yet" })); return; }
    box.replaceChildren(...s.lineage.map((c, i) => el("li", {}, linkTo(c.id, "#" + c.id), " ", el("code", { text: c.commit }), " ",
      el("strong", { text: fmt(c.metric) }), c.runs > 1 ? " (mean of " + c.runs + ")" : "", " ",
      i === 0 ? el("span", { class: "none", text: "baseline" }) : el("span", { class: c.gain > 0 ? "good" : "bad", text: signed(c.gain) }),
      " · ", c.description, s.agents.length > 1 ? " · " + c.agent : "")));
  }

  function drawAgents(s) {
    const card = document.getElementById("agents-card");
    card.hidden = s.agents.length < 2;
    if (card.hidden) return;
    const colors = agentColors(s);
    const rows = s.agents.map((a) => el("tr", {}, el("td", {}, el("span", { class: "status", style: null, "data-color": colors[a.agent] }, "●"), " ", a.agent),
      el("td", { class: "num", text: a.proposals }), el("td", { class: "num", text: a.keeps }), el("td", { class: "num", text: signed(a.gain) }),
      el("td", { class: "num", text: money(a.cost) })));
    document.getElementById("agents").replaceChildren(el("table", {}, el("thead", {}, el("tr", {}, ...["agent", "proposals", "keeps", "gain", "cost"].map((h) => el("th", { text: h })))), el("tbody", {}, ...rows)));
    for (const dot of card.querySelectorAll("[data-color]")) dot.style.color = dot.dataset.color;
  }

  // -- promote and ablate ------------------------------------------------------------------------
  function drawStudies(s) {
    const card = document.getElementById("studies-card");
    const studies = s.studies || [];
    card.hidden = !studies.length;
    if (card.hidden) return;
    const interval = (a) => (a.gain === null ? "—" : a.low === null ? signed(a.gain) : signed(a.gain) + " ± " + fmt((a.high - a.low) / 2));
    const tone = (a) => (/^(carries over|needed)/.test(a.verdict) ? "good" : /^(hurts|removing it helps)/.test(a.verdict) ? "bad" : "none");
    document.getElementById("studies").replaceChildren(...studies.map((st) => {
      const title = st.kind === "promote" ? "promoted" : "ablated";
      const name = live ? el("a", { href: "/?tag=" + encodeURIComponent(st.tag), text: st.tag }) : el("code", { text: st.tag });
      const head = ["#", "arm", "pairs", st.kind === "promote" ? "reference" : "champion", "arm's", st.kind === "promote" ? "gain" : "effect", "verdict"];
      const rows = st.arms.map((a) => el("tr", {}, el("td", { class: "num" }, live ? linkTo(a.id, String(a.id)) : String(a.id)),
        el("td", { class: "desc" }, a.description, ...a.notes.map((n) => el("div", { class: "none", text: n }))),
        el("td", { class: "num", text: a.pairs }), el("td", { class: "num", text: fmt(a.reference) }), el("td", { class: "num", text: fmt(a.metric) }),
        el("td", { class: "num", text: interval(a) }), el("td", {}, el("span", { class: tone(a), text: a.verdict }))));
      return el("div", { class: "study" }, el("h3", {}, title + " · ", name),
        el("table", {}, el("thead", {}, el("tr", {}, ...head.map((h) => el("th", { text: h })))), el("tbody", {}, ...rows)));
    }));
  }

  // -- the table -------------------------------------------------------------------------------
  function options(id, values) {
    const select = document.getElementById(id);
    const current = select.value;
    const first = select.options[0];
    select.replaceChildren(first, ...[...values].sort().map((v) => el("option", { value: v, text: v })));
    select.value = values.has(current) ? current : "";
  }

  function filtered(s) {
    const status = document.getElementById("f-status").value, agent = document.getElementById("f-agent").value;
    const worker = document.getElementById("f-worker").value, kind = document.getElementById("f-kind").value;
    const text = document.getElementById("f-text").value.toLowerCase();
    const rows = s.rows.filter((r) => (!status || r.status === status) && (!agent || r.agent === agent) && (!worker || r.worker === worker)
      && (!kind || r.kind === kind) && (!text || r.description.toLowerCase().includes(text)));
    const key = sortKey, dir = sortUp ? 1 : -1;
    rows.sort((a, b) => {
      const x = a[key], y = b[key];
      if (x === y) return dir * (a.id - b.id);
      if (x === null || x === undefined || x === "") return 1;
      if (y === null || y === undefined || y === "") return -1;
      return dir * (x < y ? -1 : 1);
    });
    return rows;
  }

  const partial = (s) => s.rows.length < s.rows_total;

  function drawTable(s) {
    options("f-status", new Set(s.facets.status));
    options("f-agent", new Set(s.facets.agent));
    options("f-worker", new Set(s.facets.worker));
    const rows = filtered(s);
    const fresh = knownIds === null ? new Set() : new Set(s.rows.filter((r) => !knownIds.has(r.id)).map((r) => r.id));
    knownIds = new Set(s.rows.map((r) => r.id));
    const tbody = document.querySelector("#table tbody");
    tbody.replaceChildren(...rows.slice(0, shownRows).map((r) => {
      const tr = el("tr", { "data-id": r.id, class: fresh.has(r.id) ? "new" : null },
        el("td", { class: "num" }, linkTo(r.id, String(r.id))), el("td", {}, el("span", { class: "status s-" + r.status, text: r.status })),
        el("td", { class: "num", text: fmt(r.metric) }), el("td", { class: "num", text: signed(r.delta) }), el("td", { class: "num", text: fmt(r.test) }),
        el("td", { text: r.agent }), el("td", { text: r.where }), el("td", { class: "num", text: secs(r.seconds) }),
        el("td", { class: "desc" }, (r.kind === "repeat" ? "(repeat of #" + r.repeat_of + ") " : "") + r.description, r.reason ? el("span", { class: "none", text: " (" + r.reason + ")" }) : null));
      return tr;
    }));
    const shown = document.getElementById("shown");
    if (partial(s) && needAll) shown.textContent = "loading all " + s.rows_total + " rows…";
    else if (partial(s)) shown.textContent = Math.min(rows.length, shownRows) + " of " + s.rows_total;
    else shown.textContent = Math.min(rows.length, shownRows) + " of " + rows.length + (rows.length !== s.rows.length ? " (filtered from " + s.rows.length + ")" : "");
    document.getElementById("more").hidden = rows.length <= shownRows && !partial(s);
    for (const th of document.querySelectorAll("#table th[data-sort]")) {
      th.classList.toggle("sorted", th.dataset.sort === sortKey);
      th.classList.toggle("up", th.dataset.sort === sortKey && sortUp);
    }
  }

  function draw(s) {
    state = s;
    clockOffset = s.now - Date.now() / 1000;
    document.getElementById("empty").hidden = true;
    drawFigures(s); drawChart(s); drawWorkers(s); drawLineage(s); drawAgents(s); drawStudies(s); drawTable(s);
    body.dataset.version = String(s.version ?? "");
    body.dataset.rows = String(s.rows_total);
    if (!body.dataset.drawn) body.dataset.drawn = performance.now().toFixed(0); // navigation start to the first draw
  }

  function wantAll() {
    if (!state || !partial(state) || needAll) return;
    needAll = true;
    drawTable(state);
    refresh();
  }

  function hookTable() {
    for (const id of ["f-status", "f-agent", "f-worker", "f-kind", "f-text"]) {
      // a select announces a choice by "change" (some browsers and drivers send no "input" for it)
      document.getElementById(id).addEventListener(id === "f-text" ? "input" : "change", () => { shownRows = PAGE; wantAll(); if (state) drawTable(state); });
    }
    for (const th of document.querySelectorAll("#table th[data-sort]")) {
      th.addEventListener("click", () => {
        if (sortKey === th.dataset.sort) sortUp = !sortUp; else { sortKey = th.dataset.sort; sortUp = sortKey !== "id" && sortKey !== "seconds"; }
        wantAll();
        if (state) drawTable(state);
      });
    }
    document.getElementById("more").addEventListener("click", () => { shownRows += PAGE; wantAll(); drawTable(state); });
    document.querySelector("#table tbody").addEventListener("click", (ev) => {
      if (ev.target.closest("a")) return;
      const tr = ev.target.closest("tr[data-id]");
      const to = tr && href(tr.dataset.id);
      if (to) location.href = to;
    });
    const tag = document.getElementById("tag");
    if (tag) tag.addEventListener("change", () => {
      if (live) location.href = "/?tag=" + encodeURIComponent(tag.value);
    });
  }

  // -- live ------------------------------------------------------------------------------------
  function follow(onChange) {
    const badge = document.getElementById("live");
    const source = new EventSource("/api/events");
    source.addEventListener("version", () => { badge.hidden = false; badge.classList.remove("off"); });
    source.addEventListener("change", (ev) => onChange(JSON.parse(ev.data).version));
    source.onerror = () => { badge.classList.add("off"); badge.textContent = "reconnecting"; };
    source.onopen = () => { badge.classList.remove("off"); badge.textContent = "live"; };
  }

  async function fetchState() {
    const tag = body.dataset.tag;
    const query = new URLSearchParams();
    if (tag) query.set("tag", tag);
    if (!needAll) query.set("rows", String(PAGE));
    const res = await fetch("/api/state?" + query, { cache: "no-store" });
    const s = await res.json();
    if (s.empty) return;
    if (!tag && s.tag) body.dataset.tag = s.tag;
    draw(s);
  }

  function overview() {
    hookTable();
    if (live) {
      // one fetch at a time; a change announced during a fetch is fetched right after it
      let pending = false, again = false;
      refresh = () => {
        if (pending) { again = true; return; }
        pending = true; again = false;
        fetchState().finally(() => { pending = false; if (again) refresh(); });
      };
      fetchState();
      follow(refresh);
      setInterval(tick, 1000);
    } else {
      const s = JSON.parse(document.getElementById("state").textContent);
      draw(s);
    }
    let width = window.innerWidth;
    window.addEventListener("resize", () => { if (state && Math.abs(window.innerWidth - width) > 40) { width = window.innerWidth; drawChart(state); } });
  }

  function experiment() {
    if (!live) return;
    const id = body.dataset.id;
    follow(() => { if (body.dataset.status === "running" || body.dataset.status === "pending") location.reload(); });
    if (body.dataset.status === "running") {
      setInterval(async () => {
        const res = await fetch("/api/log/" + id, { cache: "no-store" });
        const log = await res.json();
        const pre = document.getElementById("log");
        if (pre && typeof log.text === "string") { pre.textContent = log.text; }
      }, 2000);
    }
  }

  if (body.dataset.page === "overview") overview();
  else if (body.dataset.page === "experiment") experiment();
})();
