// The dlstore report page: reads the JSON the report embedded, draws every panel with
// Vega-Lite (vegaEmbed, inlined beside this script) and keeps the runs table, the curves and
// the heat maps in step with what the reader picks. No network: everything is in the page.
(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("dlstore-data").textContent);
  const app = document.getElementById("app");
  const PHASES = ["I", "II", "III", "IV-A", "IV-B"];
  const PAGE_ROWS = 500;  // rows of the runs table drawn at once ("show more" draws more)
  const pending = [];

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v);
    }
    for (const c of children) if (c != null) node.append(c);
    return node;
  }
  const q = (v) => v === null || v === undefined ? "NULL"
    : typeof v === "number" ? String(v) : "'" + String(v).replace(/'/g, "''") + "'";
  const ident = (n) => /^[a-z_][a-z0-9_]*$/.test(n) ? n : '"' + n.replace(/"/g, '""') + '"';
  const fmt = (v) => v === null || v === undefined ? "" : typeof v === "number"
    ? (Number.isInteger(v) && Math.abs(v) < 1e15 ? String(v) : Number(v.toPrecision(4)).toString()) : String(v);
  function bytes(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : n) + " " + units[i];
  }

  function copy(text, button) {
    const done = () => { const old = button.textContent; button.textContent = "copied";
      setTimeout(() => { button.textContent = old; }, 900); };
    const fallback = () => {  // file:// pages may have no clipboard API
      const area = el("textarea", {}); area.value = text; document.body.append(area);
      area.select(); try { document.execCommand("copy"); } catch (e) { /* selected to copy */ }
      area.remove(); done();
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, fallback);
    } else fallback();
  }
  function copyButton(text, label) {
    const b = el("button", {class: "copy", type: "button", title: "copy to the clipboard",
                            text: label || "copy"});
    b.addEventListener("click", (e) => { e.stopPropagation(); copy(typeof text === "function" ? text() : text, b); });
    return b;
  }
  function sqlBlock(sql, label) {
    const pre = el("pre", {class: "sql-text", text: sql});
    const box = el("div", {class: "sql"}, el("span", {class: "label", text: label || "SQL"}),
                   copyButton(() => pre.textContent, "copy SQL"), pre);
    box.set = (text) => { pre.textContent = text; };
    return box;
  }
  function panel(title, cls) {
    return el("section", {class: "panel " + (cls || "")}, el("h2", {text: title}));
  }
  function select(name, options, value, onchange) {
    const s = el("select", {name: name, onchange: onchange});
    for (const o of options) s.append(el("option", {value: o, text: o}));
    if (value !== undefined && options.includes(value)) s.value = value;
    return s;
  }
  function labelled(text, control) { return el("label", {}, text + " ", control); }

  // a chart of width "container" measures its element: drawn once the element is in the page
  let queued = [];
  function flush() { const q = queued; queued = []; q.forEach((f) => f()); }
  function embed(div, spec) {
    if (!div.isConnected) { queued.push(() => embed(div, spec)); return null; }
    const base = {$schema: "https://vega.github.io/schema/vega-lite/v6.json",
                  config: {view: {stroke: null}, range: {category: OKABE_ITO}}};
    const p = vegaEmbed(div, Object.assign(base, spec), {renderer: "svg", actions: false})
      .catch((e) => { div.replaceChildren(el("p", {class: "error-message", text: "chart: " + e.message})); });
    pending.push(p);
    return p;
  }
  const OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"];

  // -- one zoo ---------------------------------------------------------------------------
  function zooSection(zoo) {
    const root = el("div", {class: "zoo", "data-zoo": zoo.summary.zoo});
    const runs = rowsOf(zoo.runs);
    const state = {selected: new Set(runs.slice(0, Math.min(5, runs.length)).map((r) => r.run_id))};
    root.append(summaryPanel(zoo.summary));
    const curves = zoo.curves ? curvesPanel(zoo, runs, state) : null;
    root.append(runsPanel(zoo, runs, state, () => curves && curves.redraw()));
    if (curves) root.append(curves);
    const heat = heatPanel(zoo, runs);
    if (heat) root.append(heat);
    if (zoo.phases) root.append(phasePanel(zoo.phases));
    if (zoo.tickets) for (const p of ticketPanels(zoo.tickets)) root.append(p);
    for (const r of zoo.recipes || []) root.append(recipePanel(r));
    return root;
  }

  function rowsOf(table) {
    const n = table.data.length ? table.data[0].length : 0;
    const rows = new Array(n);
    for (let i = 0; i < n; i++) {
      const r = {};
      table.columns.forEach((c, j) => { r[c] = table.data[j][i]; });
      rows[i] = r;
    }
    return rows;
  }

  function summaryPanel(s) {
    const p = panel("Summary: " + s.zoo, "summary");
    const f = s.facts;
    const facts = [
      ["origin", f.origin], ["runs", f.runs],
      ["by status", `${f.complete} complete, ${f.diverged} diverged, ${f.failed} failed` + (f.other ? `, ${f.other} other` : "")],
      ["checkpoints", f.checkpoints], ["weights", bytes(f.weight_bytes || 0)],
      ["metric rows", f.metric_rows],
      ["build time", f.train_seconds === null ? "" : f.train_seconds.toFixed(1) + " s of training"],
      ["device", f.devices || ""],
    ];
    for (const [k, v] of Object.entries(s.zoo_row)) facts.push([k, v]);
    const t = el("table", {class: "facts"});
    for (const [k, v] of facts) t.append(el("tr", {}, el("th", {text: k}), el("td", {class: "fact-" + k.replace(/\W/g, "_"), text: fmt(v)})));
    p.append(t);
    if (s.spec) p.append(el("h3", {text: "spec (TOML)"}), copyButton(s.spec, "copy spec"), el("pre", {class: "spec", text: s.spec.trim()}));
    else p.append(el("p", {class: "note", text: "no spec recorded: the runs were tracked or imported"}));
    if (s.missing_columns.length) p.append(el("p", {class: "note", text: "this store's zoos view has no column " + s.missing_columns.join(", ")}));
    s.sql.forEach((sql) => p.append(sqlBlock(sql)));
    return p;
  }

  // -- the runs table --------------------------------------------------------------------
  function matcher(text, columns) {
    const terms = text.trim().split(/\s+/).filter(Boolean).map((term) => {
      const m = term.match(/^([A-Za-z_][\w.]*)(<=|>=|!=|=|<|>)(.*)$/);
      if (m && columns.includes(m[1])) {
        const [, col, op, raw] = m; const num = Number(raw); const isNum = raw !== "" && !isNaN(num);
        return (r) => {
          const v = r[col]; if (v === null || v === undefined) return op === "!=";
          const a = isNum && typeof v === "number" ? v : String(v); const b = isNum && typeof v === "number" ? num : raw;
          switch (op) { case "=": return a == b; case "!=": return a != b; case "<": return a < b;
            case ">": return a > b; case "<=": return a <= b; default: return a >= b; }
        };
      }
      const needle = term.toLowerCase();
      return (r) => columns.some((c) => r[c] !== null && String(r[c]).toLowerCase().includes(needle));
    });
    return (r) => terms.every((t) => t(r));
  }

  function runsPanel(zoo, runs, state, onSelect) {
    const table = zoo.runs;
    const p = panel(`Runs (${runs.length})`, "runs-panel");
    const cols = table.columns;
    const numeric = new Set(cols.filter((c) => runs.some((r) => typeof r[c] === "number")));
    let shown = runs, sortCol = null, sortDir = 1, limit = PAGE_ROWS;
    const count = el("span", {class: "runs-count"});
    const filter = el("input", {type: "search", class: "runs-filter", placeholder: "filter: words, or column=value, lr>0.01, status!=complete"});
    const more = el("button", {type: "button", class: "more", text: "show more"});
    const all = el("input", {type: "checkbox", title: "select every shown run for the curves"});
    const head = el("tr", {}, el("th", {}, all));
    cols.forEach((c) => head.append(el("th", {"data-col": c, text: c})));
    const body = el("tbody");
    const t = el("table", {class: "runs"}, el("thead", {}, head), body);
    function draw() {
      body.replaceChildren();
      const frag = document.createDocumentFragment();
      for (const r of shown.slice(0, limit)) {
        const tr = el("tr", {class: r.status || "", "data-run": r.run_id});
        const box = el("input", {type: "checkbox", class: "pick"});
        box.checked = state.selected.has(r.run_id);
        box.addEventListener("change", () => { box.checked ? state.selected.add(r.run_id) : state.selected.delete(r.run_id); onSelect(); });
        tr.append(el("td", {}, box));
        for (const c of cols) {
          if (c === "run_id") tr.append(el("td", {class: "run-id"}, el("code", {text: r.run_id}), " ", copyButton(r.run_id)));
          else tr.append(el("td", {class: numeric.has(c) ? "num" : "", text: fmt(r[c])}));
        }
        frag.append(tr);
      }
      body.append(frag);
      count.textContent = `${shown.length} of ${runs.length} runs` + (shown.length > limit ? `, first ${limit} drawn` : "");
      more.hidden = shown.length <= limit;
    }
    function apply() {
      const keep = matcher(filter.value, cols);
      shown = runs.filter(keep);
      if (sortCol) {
        shown.sort((a, b) => {
          const x = a[sortCol], y = b[sortCol];
          if (x === y) return 0; if (x === null || x === undefined) return 1; if (y === null || y === undefined) return -1;
          return (x < y ? -1 : 1) * sortDir;
        });
      }
      limit = PAGE_ROWS; draw();
    }
    filter.addEventListener("input", apply);
    more.addEventListener("click", () => { limit += PAGE_ROWS; draw(); });
    all.addEventListener("change", () => {
      for (const r of shown) all.checked ? state.selected.add(r.run_id) : state.selected.delete(r.run_id);
      draw(); onSelect();
    });
    head.addEventListener("click", (e) => {
      const col = e.target.getAttribute && e.target.getAttribute("data-col"); if (!col) return;
      sortDir = sortCol === col ? -sortDir : 1; sortCol = col;
      head.querySelectorAll("th").forEach((th) => th.classList.remove("sorted-asc", "sorted-desc"));
      e.target.classList.add(sortDir > 0 ? "sorted-asc" : "sorted-desc");
      apply();
    });
    p.append(el("div", {class: "controls"}, filter, count), el("div", {class: "table-wrap"}, t), more,
             el("p", {class: "note", text: "click a header to sort; tick runs to draw their curves; " + table.note}),
             sqlBlock(table.sql));
    apply();
    return p;
  }

  // -- learning curves -------------------------------------------------------------------
  function varying(runs, cols) {
    return cols.filter((c) => new Set(runs.map((r) => r[c])).size > 1);
  }
  function meanStd(values) {
    const v = values.filter((x) => x !== null && Number.isFinite(x));
    if (!v.length) return [null, null, 0];
    const m = v.reduce((a, b) => a + b, 0) / v.length;
    const s = v.length > 1 ? Math.sqrt(v.reduce((a, b) => a + (b - m) ** 2, 0) / (v.length - 1)) : null;
    return [m, s, v.length];
  }

  function curvesPanel(zoo, runs, state) {
    const zooName = zoo.summary.zoo;
    const series = zoo.curves.series;
    if (!zoo.curves.resolved) {  // the shared step and epoch lists, by reference
      for (const entries of Object.values(series)) for (const e of entries) {
        e[1] = zoo.curves.steps[e[1]]; e[2] = e[2] === null ? null : zoo.curves.epochs[e[2]];
      }
      zoo.curves.resolved = true;
    }
    const metrics = Object.keys(series);
    const hyper = zoo.runs.hyper;
    const groupable = varying(runs, hyper.filter((c) => c !== "seed"));
    const p = panel("Learning curves", "curves-panel");
    const chart = el("div", {class: "chart curves-chart"});
    const preferred = ["test_acc", "test_loss", "train_loss"].find((m) => metrics.includes(m)) || metrics[0];
    const metric = select("metric", metrics, preferred, () => redraw());
    const hasEpochs = metrics.some((m) => series[m].some((s) => s[2]));
    const xs = ["step"].concat(hasEpochs ? ["epoch"] : [], metrics.includes("tokens") ? ["tokens"] : []);
    const xSel = select("x", xs, "step", () => redraw());
    const modes = ["selected runs"].concat(groupable.length ? ["mean over seeds, coloured by", "mean per value of"] : []);
    const mode = select("mode", modes, "selected runs", () => redraw());
    const by = select("by", groupable.length ? groupable : ["-"], groupable[0], () => redraw());
    const logY = el("input", {type: "checkbox", name: "logy", onchange: () => redraw()});
    const sql = sqlBlock("", "SQL (what the chart shows)");
    p.append(el("div", {class: "controls"}, labelled("metric", metric), labelled("against", xSel),
                labelled("lines", mode), by, labelled("log y", logY)), chart,
             el("p", {class: "note", text: "bands: one standard deviation over the runs of a line"}),
             sql, sqlBlock(zoo.curves.sql, "SQL (the rows the page holds)"));
    const xOf = (entry, k) => {
      if (xSel.value === "epoch") return entry[2] ? entry[2][k] : null;
      if (xSel.value === "tokens") {
        const tok = (series.tokens || []).find((s) => s[0] === entry[0]);
        const at = tok ? tok[1].indexOf(entry[1][k]) : -1; return at >= 0 ? tok[3][at] : null;
      }
      return entry[1][k];
    };
    function redraw() {
      const m = metric.value, entries = series[m] || [];
      const where = `zoo = ${q(zooName)} AND metric = ${q(m)}`;
      const xcol = xSel.value === "tokens" ? "step" : xSel.value;
      let values = [], encoding, layers, traces;
      by.hidden = mode.value === "selected runs";
      if (mode.value === "selected runs") {
        const picked = entries.filter((e) => state.selected.has(runs[e[0]].run_id));
        for (const e of picked) e[3].forEach((v, k) => values.push({run_id: runs[e[0]].run_id, x: xOf(e, k), value: v}));
        traces = picked.length;
        const ids = picked.map((e) => q(runs[e[0]].run_id)).join(", ");
        sql.set(`SELECT run_id, ${xcol}, value FROM curves\nWHERE ${where}\n  AND run_id IN (${ids || "NULL"})\nORDER BY run_id, ${xcol}`);
        encoding = {x: {field: "x", type: "quantitative", title: xSel.value},
                    y: {field: "value", type: "quantitative", title: m, scale: {type: logY.checked ? "log" : "linear", zero: false}},
                    color: {field: "run_id", type: "nominal", legend: traces <= 20 ? {} : null}};
        layers = [{mark: {type: "line", point: traces <= 20}, encoding: Object.assign({tooltip: [{field: "run_id"}, {field: "x", title: xSel.value}, {field: "value", format: ".4g"}]}, encoding)}];
      } else {
        const h = by.value, perConfig = mode.value.startsWith("mean over seeds");
        const keyCols = perConfig ? hyper.filter((c) => c !== "seed") : [h];
        const groups = new Map();
        for (const e of entries) {
          const r = runs[e[0]]; const key = JSON.stringify(keyCols.map((c) => r[c]));
          if (!groups.has(key)) groups.set(key, {h: r[h], at: new Map()});
          const g = groups.get(key);
          e[3].forEach((v, k) => { const x = xOf(e, k); if (x === null) return; if (!g.at.has(x)) g.at.set(x, []); g.at.get(x).push(v); });
        }
        let i = 0;
        for (const g of groups.values()) {
          for (const [x, vs] of [...g.at.entries()].sort((a, b) => a[0] - b[0])) {
            const [mean, std, n] = meanStd(vs);
            if (mean === null) continue;
            values.push({line: i, [h]: g.h, x: x, mean: mean, lo: std === null ? mean : mean - std, hi: std === null ? mean : mean + std, n: n});
          }
          i++;
        }
        traces = groups.size;
        const cols = keyCols.map(ident).join(", ");
        sql.set(`SELECT ${cols}, ${xcol}, avg(value) AS mean,\n       stddev_samp(value) AS std, count(*) AS runs\nFROM curves\nWHERE ${where} AND NOT isnan(value)\nGROUP BY ALL ORDER BY ALL`);
        const colour = {field: h, type: typeof runs[0][h] === "number" ? "ordinal" : "nominal", scale: {scheme: "viridis"}};
        const y = {field: "mean", type: "quantitative", title: m, scale: {type: logY.checked ? "log" : "linear", zero: false}};
        layers = [
          {mark: {type: "area", opacity: 0.2}, encoding: {x: {field: "x", type: "quantitative", title: xSel.value}, y: y, y2: {field: "hi"}, detail: {field: "line"}, color: colour}},
          {mark: "line", encoding: {x: {field: "x", type: "quantitative"}, y: y, detail: {field: "line"}, color: colour,
                                     tooltip: [{field: h}, {field: "x", title: xSel.value}, {field: "mean", format: ".4g"}, {field: "n", title: "runs"}]}},
        ];
        layers[0].encoding.y = Object.assign({}, y, {field: "lo"});
      }
      chart.setAttribute("data-traces", String(traces));
      if (!values.length) { chart.replaceChildren(el("p", {class: "note", text: "no values: tick runs in the table above"})); return; }
      embed(chart, {width: "container", height: 280, data: {values: values}, layer: layers});
    }
    p.redraw = () => { if (mode.value === "selected runs") redraw(); };
    redraw();
    return p;
  }

  // -- heat maps over two hyperparameters ------------------------------------------------
  function heatPanel(zoo, runs) {
    // n_params follows from the architecture's axes: offered, but not first
    const axes = varying(runs, zoo.runs.hyper.filter((c) => c !== "seed" && c !== "status"))
      .sort((a, b) => (a === "n_params") - (b === "n_params"));
    const metrics = zoo.runs.metrics;
    if (axes.length < 2 || !metrics.length || !runs.length) return null;
    const zooName = zoo.summary.zoo;
    const p = panel("Heat map over two hyperparameters", "heat-panel");
    const chart = el("div", {class: "chart heat-chart"});
    const pick = ["test_acc", "test_loss"].find((m) => metrics.includes(m)) || metrics[0];
    const metric = select("metric", metrics, pick, () => draw());
    const xSel = select("x", axes, axes[0], () => draw());
    const ySel = select("y", axes, axes[1], () => draw());
    const sql = sqlBlock("");
    p.append(el("div", {class: "controls"}, labelled("metric", metric), labelled("x", xSel), labelled("y", ySel)), chart,
             el("p", {class: "note", text: "mean of each run's final value (diverged runs' NaN left out)"}), sql);
    function draw() {
      const x = xSel.value, y = ySel.value, m = metric.value;
      const cells = new Map();
      for (const r of runs) {
        const v = r[m]; if (v === null || v === undefined) continue;
        const key = JSON.stringify([r[x], r[y]]);
        if (!cells.has(key)) cells.set(key, {x: r[x], y: r[y], v: []});
        cells.get(key).v.push(v);
      }
      const values = [...cells.values()].map((c) => ({[x]: c.x, [y]: c.y, mean: meanStd(c.v)[0], runs: c.v.length}));
      sql.set(`SELECT ${ident(x)}, ${ident(y)}, avg(value) AS mean, count(*) AS runs\nFROM final\nWHERE zoo = ${q(zooName)} AND metric = ${q(m)} AND tensor IS NULL\n  AND NOT isnan(value)\nGROUP BY ALL ORDER BY ALL`);
      chart.setAttribute("data-cells", String(values.length));
      const enc = {x: {field: x, type: "ordinal", sort: "ascending"}, y: {field: y, type: "ordinal", sort: "descending"}};
      embed(chart, {data: {values: values}, width: {step: 56}, height: {step: 30}, encoding: enc, layer: [
        {mark: "rect", encoding: {color: {field: "mean", type: "quantitative", title: m, scale: {scheme: "viridis"}},
                                  tooltip: [{field: x}, {field: y}, {field: "mean", format: ".4g", title: m}, {field: "runs"}]}},
        {mark: {type: "text", fontSize: 10}, encoding: {text: {field: "mean", format: ".3g"},
          color: {condition: {test: "datum.mean > " + (Math.min(...values.map((v) => v.mean)) + Math.max(...values.map((v) => v.mean))) / 2, value: "black"}, value: "white"}}},
      ]});
    }
    draw();
    return p;
  }

  // -- phase diagram ---------------------------------------------------------------------
  function phasePanel(ph) {
    const p = panel(`Phase diagram: ${ph.x} x ${ph.y}`, "phase-panel");
    const cells = rowsOf(ph);
    const chart = el("div", {class: "chart phase-chart", "data-cells": String(cells.length)});
    const t = ph.thresholds;
    p.append(chart, el("p", {class: "note", text: `${ph.note}: train_loss > ${t.train_loss} is poorly trained; mc < -${t.mode_connectivity} a barrier; CKA >= ${t.cka} is IV-B`}), sqlBlock(ph.sql));
    const tip = [ph.x, ph.y, "phase", "train_loss", "hessian_top_eig", "mode_connectivity", "cka", "groups"]
      .map((f) => ({field: f, format: ["train_loss", "hessian_top_eig", "mode_connectivity", "cka"].includes(f) ? ".3g" : undefined}))
      .map((o) => (o.format ? o : {field: o.field}));
    embed(chart, {data: {values: cells}, width: {step: 64}, height: {step: 36},
      encoding: {x: {field: ph.x, type: "ordinal", sort: "ascending"}, y: {field: ph.y, type: "ordinal", sort: "descending"}},
      layer: [
        {mark: "rect", encoding: {color: {field: "phase", type: "nominal", scale: {domain: PHASES, range: ["#D55E00", "#E69F00", "#0072B2", "#56B4E9", "#009E73"]}}, tooltip: tip}},
        {mark: {type: "text", fontSize: 11, color: "white", fontWeight: "bold"}, encoding: {text: {field: "phase"}}},
      ]});
    return p;
  }

  // -- lottery tickets -------------------------------------------------------------------
  function ticketPanels(tk) {
    const out = [];
    const rows = rowsOf(tk.density);
    const p = panel("Lottery tickets: accuracy against density", "tickets-panel");
    const chains = [...new Set(rows.filter((r) => r.kind !== "dense").map((r) => `${r.condition} / rewind ${r.rewind_step}`))]
      .sort((a, b) => (!a.startsWith("base /")) - (!b.startsWith("base /")));  // the spec's own first
    const chain = select("chain", chains, chains[0], () => draw());
    const chart = el("div", {class: "chart tickets-chart"});
    p.append(el("div", {class: "controls"}, labelled("condition / rewind", chain)), chart,
             el("p", {class: "note", text: "mean final test accuracy over seeds, band one standard deviation; dense: level 0"}), sqlBlock(tk.density.sql));
    function draw() {
      const [cond, rw] = chain.value.split(" / rewind ");
      const values = rows.filter((r) => r.condition === cond && String(r.rewind_step) === rw || (r.kind === "dense" && r.condition === cond))
        .map((r) => Object.assign({}, r, {lo: r.test_acc - (r.test_acc_std || 0), hi: r.test_acc + (r.test_acc_std || 0)}));
      embed(chart, {width: "container", height: 260, data: {values: values},
        encoding: {x: {field: "density", type: "quantitative", scale: {type: "log", reverse: true}, axis: {format: "%"}},
                   color: {field: "kind", type: "nominal"}},
        layer: [
          {mark: {type: "area", opacity: 0.15}, encoding: {y: {field: "lo", type: "quantitative", title: "test accuracy", scale: {zero: false}}, y2: {field: "hi"}}},
          {mark: {type: "line", point: true}, encoding: {y: {field: "test_acc", type: "quantitative"},
            tooltip: [{field: "kind"}, {field: "level"}, {field: "density", format: ".1%"}, {field: "test_acc", format: ".3f"}, {field: "n"}]}},
        ]});
    }
    draw(); out.push(p);
    if (tk.transfer) {
      const tr = rowsOf(tk.transfer);
      const tp = panel("Lottery tickets: transfer matrix", "transfer-panel");
      const levels = [...new Set(tr.map((r) => String(r.level)))];
      const level = select("level", levels, levels[levels.length - 1], () => drawT());
      const tchart = el("div", {class: "chart transfer-chart"});
      tp.append(el("div", {class: "controls"}, labelled("level", level)), tchart,
                el("p", {class: "note", text: "mean test accuracy of the tickets found under the source condition trained under the target"}), sqlBlock(tk.transfer.sql));
      function drawT() {
        const values = tr.filter((r) => String(r.level) === level.value);
        embed(tchart, {data: {values: values}, width: {step: 80}, height: {step: 34},
          encoding: {x: {field: "target_condition", type: "nominal", title: "target"}, y: {field: "source_condition", type: "nominal", title: "source"}},
          layer: [
            {mark: "rect", encoding: {color: {field: "transferred", type: "quantitative", scale: {scheme: "viridis"}, title: "test acc"},
              tooltip: [{field: "source_condition"}, {field: "target_condition"}, {field: "transferred", format: ".3f"}, {field: "transferred_reinit", format: ".3f"}, {field: "target_ticket", format: ".3f"}]}},
            {mark: {type: "text", fontSize: 10, color: "white"}, encoding: {text: {field: "transferred", format: ".3f"}}},
          ]});
      }
      drawT(); out.push(tp);
    }
    return out;
  }

  // -- the recipes' figures: a recipe's table, one line per y column (and colour value) --
  function recipePanel(r) {
    const p = panel("Recipe: " + r.recipe, "recipe-panel");
    const chart = el("div", {class: "chart recipe-chart"});
    p.append(chart, el("p", {class: "note", text: r.note + "; bands: one standard deviation over seeds"}), sqlBlock(r.sql));
    const values = [];
    for (const row of rowsOf(r)) for (const y of r.y) {
      const v = row[y]; if (v === null || v === undefined) continue;
      const sd = row[y + "_std"];
      const line = r.colour ? `${y}, ${r.colour} ${fmt(row[r.colour])}` : y;
      values.push({x: row[r.x], metric: y, line: line, value: v,
                   lo: sd === null || sd === undefined ? v : v - sd, hi: sd === null || sd === undefined ? v : v + sd});
    }
    chart.setAttribute("data-traces", String(new Set(values.map((v) => v.line)).size));
    const x = {field: "x", type: "quantitative", title: r.x, scale: {type: r.x_scale}};
    embed(chart, {width: "container", height: 260, data: {values: values},
      encoding: {x: x, color: {field: "line", type: "nominal", title: null}},
      layer: [
        {mark: {type: "area", opacity: 0.15}, encoding: {y: {field: "lo", type: "quantitative", title: null}, y2: {field: "hi"}}},
        {mark: {type: "line", point: true}, encoding: {y: {field: "value", type: "quantitative"}, strokeDash: {field: "metric", type: "nominal", legend: null},
          tooltip: [{field: "line"}, {field: "x", title: r.x}, {field: "value", format: ".4g"}]}},
      ]});
    return p;
  }

  // -- fits (store-wide) -----------------------------------------------------------------
  function fitsSection(fits) {
    const root = el("div", {class: "fits"});
    for (const f of fits.scaling) root.append(scalingPanel(f));
    if (fits.wsl.length) root.append(wslPanel(fits.wsl, fits.sql));
    if (fits.scaling.length) root.append(el("section", {class: "panel"}, el("h2", {text: "Fits: the fits view"}), sqlBlock(fits.sql)));
    return root;
  }

  function scalingPanel(f) {
    const p = panel(`Scaling fit ${f.label || f.fit_id} (${f.kind})`, "scaling-panel");
    const names = Object.keys(f.params || {});
    const level = f.ci_level ? Math.round(f.ci_level * 100) + "%" : "";
    const t = el("table", {class: "facts"}, el("tr", {}, el("th", {text: "parameter"}), el("th", {text: "estimate"}), el("th", {text: `${level} interval`})));
    const iv = [];
    for (const n of names) {
      const ci = (f.ci || {})[n] || [null, null];
      t.append(el("tr", {}, el("td", {text: n}), el("td", {text: fmt(f.params[n])}), el("td", {text: `${fmt(ci[0])} - ${fmt(ci[1])}`})));
      iv.push({parameter: n, estimate: f.params[n], low: ci[0] === null ? f.params[n] : ci[0], high: ci[1] === null ? f.params[n] : ci[1]});
    }
    const grid = el("div", {class: "grid2"});
    const curve = el("div", {class: "chart scaling-chart"}), ints = el("div", {class: "chart interval-chart"});
    grid.append(curve, ints);
    p.append(t, grid);
    if (f.warnings && f.warnings.length) p.append(el("p", {class: "note", text: "warnings: " + f.warnings.join("; ")}));
    p.append(sqlBlock(`SELECT * FROM fits WHERE fit_id = ${q(f.fit_id)}`, "SQL (the fit)"), sqlBlock(f.query, "SQL (the points it was fitted to)"));
    embed(ints, {data: {values: iv}, width: 260, height: 40, facet: {row: {field: "parameter", type: "nominal", title: null}},
      resolve: {scale: {x: "independent"}},
      spec: {width: 260, height: 30, layer: [
        {mark: "rule", encoding: {x: {field: "low", type: "quantitative", title: null, scale: {zero: false}}, x2: {field: "high"}}},
        {mark: {type: "point", filled: true}, encoding: {x: {field: "estimate", type: "quantitative"}, tooltip: [{field: "parameter"}, {field: "estimate", format: ".4g"}, {field: "low", format: ".4g"}, {field: "high", format: ".4g"}]}},
      ]}});
    const pts = f.points ? rowsOf(f.points) : [];
    if (!pts.length) { curve.append(el("p", {class: "note", text: "the fit's query returns no points now"})); return p; }
    const P = f.params, two = f.kind === "chinchilla";
    const [xn, yn] = two ? ["N", "loss"] : f.points.names;
    const xsAll = pts.map((r) => r[xn]).filter((v) => v > 0);
    const lo = Math.min(...xsAll), hi = Math.max(...xsAll) * 10;
    const line = [];
    const Ds = two ? [...new Set(pts.map((r) => r.D))].sort((a, b) => a - b) : [null];
    for (const d of Ds) for (let k = 0; k <= 60; k++) {
      const x = lo * Math.pow(hi / lo, k / 60);
      const y = two ? P.E + P.A / Math.pow(x, P.alpha) + P.B / Math.pow(d, P.beta) : P.E + P.A * Math.pow(x, -P.alpha);
      line.push({[xn]: x, fitted: y, D: d});
    }
    const colour = two ? {field: "D", type: "ordinal", scale: {scheme: "viridis"}} : {value: "#0072B2"};
    embed(curve, {width: "container", height: 240, layer: [
      {data: {values: line}, mark: {type: "line", strokeDash: [4, 2]}, encoding: {x: {field: xn, type: "quantitative", scale: {type: "log"}}, y: {field: "fitted", type: "quantitative", scale: {type: "log"}, title: yn}, color: colour, detail: {field: "D"}}},
      {data: {values: pts}, mark: {type: "point", filled: true}, encoding: {x: {field: xn, type: "quantitative"}, y: {field: yn, type: "quantitative"}, color: colour, tooltip: Object.keys(pts[0]).map((c) => ({field: c}))}},
    ]});
    return p;
  }

  function wslPanel(fits, sql) {
    const p = panel("Weight-space fits", "wsl-panel");
    const rows = fits.map((f) => Object.assign({label: f.label || f.fit_id}, f.params || {}));
    const cols = ["label", "target", "model", "features", "task", "kendall_tau", "r2", "accuracy", "n_train_runs", "n_test_runs"];
    const t = el("table", {class: "runs"}, el("tr", {}, ...cols.map((c) => el("th", {text: c}))));
    for (const r of rows) t.append(el("tr", {}, ...cols.map((c) => el("td", {text: fmt(r[c])}))));
    const chart = el("div", {class: "chart wsl-chart"});
    const values = rows.map((r) => ({label: r.label, score: r.task === "classification" ? r.accuracy : r.kendall_tau,
                                     measure: r.task === "classification" ? "accuracy" : "Kendall tau"}));
    p.append(el("div", {class: "table-wrap"}, t), chart, sqlBlock(sql));
    embed(chart, {width: "container", height: {step: 22}, data: {values: values}, mark: "bar",
      encoding: {y: {field: "label", type: "nominal", title: null}, x: {field: "score", type: "quantitative", title: "held-out score"}, color: {field: "measure", type: "nominal"},
                 tooltip: [{field: "label"}, {field: "measure"}, {field: "score", format: ".4f"}]}});
    return p;
  }

  // -- the live server's SQL box ---------------------------------------------------------
  function sqlBox() {
    const p = panel("SQL (read-only, the rules of dlstore sql)", "sql-panel");
    const input = el("textarea", {id: "sql-input", spellcheck: "false"});
    input.value = "SELECT zoo, status, count(*) AS runs FROM runs GROUP BY ALL ORDER BY ALL";
    const result = el("div", {class: "sql-result", id: "sql-result"});
    const go = el("button", {type: "button", id: "sql-run", text: "run"});
    go.addEventListener("click", () => {
      result.replaceChildren(el("p", {class: "note", text: "running..."}));
      fetch("/api/sql?q=" + encodeURIComponent(input.value)).then((r) => r.json()).then((a) => {
        if (a.error) { result.replaceChildren(el("div", {class: "panel error-panel", role: "alert"}, el("p", {class: "error-message", text: a.error}))); return; }
        const t = el("table", {class: "runs"}, el("tr", {}, ...a.columns.map((c) => el("th", {text: c}))));
        for (const row of a.rows) t.append(el("tr", {}, ...row.map((v) => el("td", {text: typeof v === "object" && v !== null ? JSON.stringify(v) : fmt(v)}))));
        result.replaceChildren(el("p", {class: "note sql-count", text: `${a.n} rows` + (a.n > a.rows.length ? `, first ${a.rows.length} shown` : "")}), el("div", {class: "table-wrap"}, t));
      }).catch((e) => { result.replaceChildren(el("div", {class: "panel error-panel", role: "alert"}, el("p", {class: "error-message", text: "the server did not answer: " + e.message}))); });
    });
    p.append(input, el("div", {class: "controls"}, go), result);
    return p;
  }

  function watchCommits() {
    let seen = D.version === undefined ? null : D.version;  // the commits the page was made from
    setInterval(() => {
      fetch("/api/version").then((r) => r.json()).then((a) => {
        if (seen !== null && a.version !== seen) location.reload();
        seen = a.version;
      }).catch(() => { /* the server is away: try again at the next tick */ });
    }, 2000);
  }

  // -- the page --------------------------------------------------------------------------
  const tabs = document.getElementById("zoo-tabs");
  const views = new Map();
  const names = D.zoos.map((z) => z.summary.zoo).concat(D.fits ? ["fits"] : []);
  function show(name) {
    if (!views.has(name)) {
      const view = name === "fits" ? fitsSection(D.fits) : zooSection(D.zoos.find((z) => z.summary.zoo === name));
      views.set(name, view); app.append(view); flush();
    }
    for (const [n, v] of views) v.hidden = n !== name;
    tabs.querySelectorAll("button").forEach((b) => b.classList.toggle("active", b.dataset.zoo === name));
    if (location.hash.slice(1) !== encodeURIComponent(name)) history.replaceState(null, "", "#" + encodeURIComponent(name));
  }
  for (const n of names) tabs.append(el("button", {type: "button", "data-zoo": n, text: n === "fits" ? "fits" : "zoo " + n, onclick: () => show(n)}));
  document.getElementById("loading").remove();
  if (D.live) { app.append(sqlBox()); watchCommits(); }
  const wanted = decodeURIComponent(location.hash.slice(1));
  show(names.includes(wanted) ? wanted : names[0]);
  Promise.all(pending).then(() => {
    window.dlstoreReady = performance.now();
    document.body.setAttribute("data-ready", "1");
  });
})();
