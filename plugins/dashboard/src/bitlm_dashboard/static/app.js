// The bitlm dashboard page: a runs table, overlaid curves (uPlot), live updates (server-sent
// events), comparison at a step, a form that starts a run, stop buttons, and gated sampling.
// Everything comes from this server's /api; nothing is loaded from elsewhere.
"use strict";

(function () {
  const token = new URLSearchParams(location.search).get("token");
  const COLUMNS = [
    ["", "select"], ["name", "name"], ["status", "status"], ["layout", "layout"],
    ["d_model", "d_model"], ["layers", "layers"], ["heads", "heads"], ["seq_len", "seq_len"],
    ["steps", "steps"], ["batch", "batch"], ["lr", "lr"], ["objective", "objective"],
    ["compression", "compression"], ["compression_prob", "comp. prob"], ["gate", "gate"],
    ["last_step", "last step"], ["train_bits_per_byte", "train bpb"],
    ["held_out_bits_per_byte", "held-out bpb"], ["parameters", "params"],
    ["time", "seconds"], ["", "actions"]];
  const state = {runs: [], selected: new Set(), data: {}, streams: {}, sort: ["name", 1],
                 chart: null, startedHere: new Set(), updates: {}};
  // for people debugging the page, and for its tests: points drawn, live updates received
  window.bitlm = {state: state, points: points, updates: name => state.updates[name] || 0};

  // -- talking to the server ---------------------------------------------------------------
  function withToken(url) {
    return token ? url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token)
                 : url;
  }
  async function api(method, url, body) {
    const headers = {"X-Bitlm-Dashboard": "1"};
    if (token) headers["Authorization"] = "Bearer " + token;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(url, {method: method, headers: headers,
                                       body: body === undefined ? undefined : JSON.stringify(body)});
    let value = null;
    try { value = await response.json(); } catch (e) { value = {error: response.statusText}; }
    if (!response.ok) throw new Error(value.error || ("HTTP " + response.status));
    return value;
  }
  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    Object.entries(attrs || {}).forEach(([k, v]) => node.setAttribute(k, v));
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function fmt(v) {
    if (v === null || v === undefined) return "";
    if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toPrecision(4);
    return String(v);
  }

  // -- runs table --------------------------------------------------------------------------
  async function loadRuns() {
    try {
      const answer = await api("GET", "/api/runs");
      state.runs = answer.runs;
      document.getElementById("where").textContent = answer.runs_dir + " — " +
        answer.runs.length + " runs";
      document.getElementById("status-line").textContent = "";
      renderTable();
      fillSelect("base", answer.runs.map(r => r.name));
      fillSelect("sample-run", answer.runs.filter(r => r.last_step !== null).map(r => r.name));
      state.selected.forEach(name => follow(name));
    } catch (e) {
      document.getElementById("status-line").textContent = "cannot reach the server: " + e.message;
    }
  }
  function fillSelect(id, names) {
    const select = document.getElementById(id), keep = select.value;
    if (Array.from(select.options).map(o => o.value).join("\n") === names.join("\n")) return;
    select.textContent = "";
    names.forEach(n => select.appendChild(el("option", {value: n}, n)));
    if (names.includes(keep)) select.value = keep;
  }
  function renderTable() {
    const table = document.getElementById("runs-table");
    const head = table.tHead, body = table.tBodies[0];
    if (!head.rows.length) {
      const tr = head.insertRow();
      COLUMNS.forEach(([key, label]) => {
        const th = el("th", {"data-key": key}, label);
        if (key) th.addEventListener("click", () => {
          state.sort = [key, state.sort[0] === key ? -state.sort[1] : 1];
          renderTable();
        });
        tr.appendChild(th);
      });
    }
    Array.from(head.rows[0].cells).forEach(th => {
      th.className = th.dataset.key === state.sort[0] ?
        (state.sort[1] > 0 ? "sorted-asc" : "sorted-desc") : "";
    });
    const [key, dir] = state.sort;
    const filter = document.getElementById("filter").value.toLowerCase();
    const runs = state.runs.filter(r => r.name.toLowerCase().includes(filter)).sort((a, b) => {
      const x = a[key], y = b[key];
      if (x === y) return 0;
      if (x === null || x === undefined) return 1;
      if (y === null || y === undefined) return -1;
      return (x < y ? -1 : 1) * dir;
    });
    body.textContent = "";
    runs.forEach(run => {
      const tr = body.insertRow();
      tr.dataset.run = run.name;
      tr.className = run.status;
      COLUMNS.forEach(([k, label]) => {
        const td = tr.insertCell();
        if (label === "select") {
          const box = el("input", {type: "checkbox", "aria-label": "overlay " + run.name});
          box.checked = state.selected.has(run.name);
          box.addEventListener("change", () => toggle(run.name, box.checked));
          td.appendChild(box);
        } else if (label === "actions") {
          if (run.status === "running") {
            const stop = el("button", {"data-stop": run.name}, "stop");
            stop.addEventListener("click", () => stopRun(run.name));
            td.appendChild(stop);
          }
        } else {
          td.textContent = fmt(run[k]);
          td.className = k;
        }
      });
    });
  }
  async function stopRun(name) {
    try {
      const r = await api("POST", "/api/runs/" + encodeURIComponent(name) + "/stop", {});
      message("start-result", "run " + name + " is stopping (it checkpoints first); resume " +
              "it with: " + r.resume, false);
    } catch (e) { message("start-result", e.message, true); }
  }

  // -- metrics: first read, then live ------------------------------------------------------
  function toggle(name, on) {
    if (on) { state.selected.add(name); follow(name); }
    else {
      state.selected.delete(name);
      if (state.streams[name]) { state.streams[name].close(); delete state.streams[name]; }
    }
    draw();
    exportLinks();
  }
  function merge(name, part) {
    let d = state.data[name];
    if (!d || part.start !== d.offset) {  // first read, or the file was rewritten: from 0
      d = state.data[name] = {series: {}, time: {step: [], seconds: []}, events: [], offset: 0};
    }
    Object.entries(part.series).forEach(([k, s]) => {
      const into = d.series[k] || (d.series[k] = {step: [], value: []});
      into.step.push(...s.step); into.value.push(...s.value);
    });
    d.time.step.push(...part.time.step); d.time.seconds.push(...part.time.seconds);
    d.events.push(...part.events);
    d.offset = part.offset;
  }
  const loading = new Set();
  async function follow(name) {
    if (loading.has(name)) return;  // its first read is under way; the stream opens after
    const run = state.runs.find(r => r.name === name);
    if (!state.data[name]) {
      loading.add(name);
      try {
        for (;;) {  // the server answers a bounded chunk at a time
          const from = state.data[name] ? state.data[name].offset : 0;
          const part = await api("GET", "/api/runs/" + encodeURIComponent(name) +
                                 "/metrics?offset=" + from);
          merge(name, part);
          if (!part.more) break;  // the rest comes live
        }
      } catch (e) {  // a run just started has no folder yet: the next refresh tries again
        delete state.data[name];
        return;
      } finally { loading.delete(name); }
      draw();
    }
    const live = (run && run.status === "running") || state.startedHere.has(name);
    if (live && !state.streams[name] && state.data[name]) {
      const source = new EventSource(withToken("/api/runs/" + encodeURIComponent(name) +
                                               "/events?offset=" + state.data[name].offset));
      state.streams[name] = source;
      source.addEventListener("metrics", ev => {
        merge(name, JSON.parse(ev.data));
        state.updates[name] = (state.updates[name] || 0) + 1;
        draw();
      });
      const done = () => {
        source.close(); delete state.streams[name]; state.startedHere.delete(name);
        loadRuns();
      };
      source.addEventListener("status", done);
      source.onerror = done;
    }
  }

  // -- the chart ---------------------------------------------------------------------------
  function ema(values, weight) {
    const out = []; let last = 0;
    values.forEach((v, i) => {
      last = last * weight + (1 - weight) * v;
      out.push(weight ? last / (1 - Math.pow(weight, i + 1)) : v);
    });
    return out;
  }
  function timeOf(d, steps) {  // seconds at each step, interpolated from training steps
    const ts = d.time.step, secs = d.time.seconds;
    return steps.map(s => {
      let lo = 0, hi = ts.length;
      while (lo < hi) { const mid = (lo + hi) >> 1; if (ts[mid] < s) lo = mid + 1; else hi = mid; }
      const i = lo;
      if (i < ts.length && ts[i] === s) return secs[i];
      if (i === 0) return ts.length ? secs[0] * s / ts[0] : s;
      if (i === ts.length) return secs[ts.length - 1];
      return secs[i - 1] + (secs[i] - secs[i - 1]) * (s - ts[i - 1]) / (ts[i] - ts[i - 1]);
    });
  }
  function metricNames() {
    const names = new Set();
    state.selected.forEach(n => { const d = state.data[n]; if (d) Object.keys(d.series).forEach(k => names.add(k)); });
    return Array.from(names).sort();
  }
  function points() {
    if (!state.chart) return 0;
    return state.chart.data.slice(1).reduce((n, s) => n + s.filter(v => v !== null).length, 0);
  }
  function draw() {
    const select = document.getElementById("metric");
    const names = metricNames(), keep = select.value || "train/bits_per_byte";
    if (Array.from(select.options).map(o => o.value).join() !== names.join()) {
      select.textContent = "";
      names.forEach(n => select.appendChild(el("option", {value: n}, n)));
    }
    select.value = names.includes(keep) ? keep : (names[0] || "");
    const metric = select.value, byTime = document.getElementById("xaxis").value === "time";
    const weight = Number(document.getElementById("smoothing").value);
    const lines = [];
    let i = 0;
    state.selected.forEach(name => {
      const d = state.data[name];
      const colour = "hsl(" + ((i++ * 67) % 360) + ",70%,40%)";
      if (!d || !d.series[metric]) return;
      const s = d.series[metric], xs = byTime ? timeOf(d, s.step) : s.step;
      const evaluation = metric.startsWith("val/") || metric.startsWith("telemetry/") ||
                         metric.startsWith("final/");
      if (evaluation) {
        lines.push({x: xs, y: s.value, label: name + " " + metric, stroke: colour, points: true});
        return;
      }
      lines.push({x: xs, y: s.value, label: name + " raw", stroke: colour, faint: true});
      lines.push({x: xs, y: ema(s.value, weight), label: name + " smoothed", stroke: colour});
      if (metric === "train/bits_per_byte" && d.series["val/bits_per_byte"]) {
        const v = d.series["val/bits_per_byte"];
        lines.push({x: byTime ? timeOf(d, v.step) : v.step, y: v.value,
                    label: name + " held-out", stroke: colour, points: true, dash: [6, 4]});
      }
    });
    const xs = Array.from(new Set(lines.flatMap(l => l.x))).sort((a, b) => a - b);
    const index = new Map(xs.map((x, j) => [x, j]));
    const data = [xs].concat(lines.map(l => {
      const col = new Array(xs.length).fill(null);
      l.x.forEach((x, j) => { col[index.get(x)] = l.y[j]; });
      return col;
    }));
    const series = [{label: byTime ? "seconds" : "step"}].concat(lines.map(l => ({
      label: l.label, stroke: l.faint ? l.stroke.replace("hsl", "hsla").replace(")", ",0.25)") : l.stroke,
      width: l.faint ? 1 : 2, dash: l.dash, spanGaps: true,
      points: {show: !!l.points, size: 6}})));
    const box = document.getElementById("chart");
    if (state.chart) { state.chart.destroy(); state.chart = null; }
    box.textContent = "";
    if (!lines.length) {
      box.appendChild(el("p", {class: "hint"}, "Tick runs in the table to plot them."));
      return;
    }
    state.chart = new uPlot({width: Math.max(400, box.clientWidth || 900), height: 360,
                             series: series, scales: {x: {time: false}},
                             axes: [{label: byTime ? "seconds" : "step"}, {label: metric}]},
                            data, box);
  }

  // -- compare at a step, export -----------------------------------------------------------
  function atStep(s, step) {
    let value = null, at = null;
    for (let j = 0; j < s.step.length && s.step[j] <= step; j++) { value = s.value[j]; at = s.step[j]; }
    return [value, at];
  }
  function compare() {
    const step = Number(document.getElementById("compare-step").value);
    const names = metricNames(), table = document.getElementById("compare-table");
    table.textContent = "";
    const head = table.insertRow();
    ["run"].concat(names).forEach(n => head.appendChild(el("th", {}, n)));
    state.selected.forEach(name => {
      const d = state.data[name], tr = table.insertRow();
      tr.dataset.run = name;
      tr.insertCell().textContent = name;
      names.forEach(n => {
        const td = tr.insertCell();
        if (d && d.series[n]) {
          const [v, at] = atStep(d.series[n], step);
          td.textContent = v === null ? "" : fmt(v) + (at !== step ? " (step " + at + ")" : "");
        }
      });
    });
  }
  function exportLinks() {
    const box = document.getElementById("export");
    const names = Array.from(state.selected);
    box.textContent = names.length ? "export " + names.join(", ") + " (JSON lines)" :
                                     "tick a run to export its metrics";
    box.href = names.length ? withToken("/api/runs/" + encodeURIComponent(names[0]) +
                                        "/metrics.jsonl") : "#";
    box.onclick = names.length > 1 ? (ev) => {
      ev.preventDefault();
      names.forEach(n => window.open(withToken("/api/runs/" + encodeURIComponent(n) +
                                               "/metrics.jsonl")));
    } : null;
  }

  // -- start a run -------------------------------------------------------------------------
  function message(id, text, error) {
    const box = document.getElementById(id);
    box.textContent = text;
    box.className = "message" + (error ? " error" : "");
  }
  async function start(ev) {
    ev.preventDefault();
    const form = ev.target, f = name => form.elements[name];
    const overrides = {};
    if (f("train.steps").value) overrides["train.steps"] = Number(f("train.steps").value);
    const compression = f("compression.mode").value;  // the base run's, on, or off
    if (compression === "on") {
      overrides["compression.name"] = f("compression.name").value;
      overrides["compression.prob"] = Number(f("compression.prob").value);
    } else if (compression === "off") {
      overrides["compression.prob"] = 0;
    }
    ["telemetry.lambda_K", "telemetry.lambda_S"].forEach(k => {
      if (f(k).value !== "") overrides[k] = Number(f(k).value);
    });
    const floors = ["c_floor", "s_floor", "k_floor"].filter(k => f("safety.gate.options." + k).value !== "");
    if (floors.length) {
      overrides["safety.gate.name"] = "kcs";
      floors.forEach(k => { overrides["safety.gate.options." + k] = Number(f("safety.gate.options." + k).value); });
    }
    const name = f("name").value;
    message("start-result", "validating…", false);
    try {
      const answer = await api("POST", "/api/runs", {base: f("base").value, name: name,
                                                     overrides: overrides});
      message("start-result", "started " + answer.name + " (PID " + answer.pid + ")", false);
      state.selected.add(name);
      state.startedHere.add(name);
      follow(name);
    } catch (e) { message("start-result", e.message, true); }
  }

  // -- sample ------------------------------------------------------------------------------
  async function sample(ev) {
    ev.preventDefault();
    const form = ev.target, f = name => form.elements[name];
    const floors = {};
    ["c_floor", "s_floor", "k_floor"].forEach(k => { if (f(k).value !== "") floors[k] = Number(f(k).value); });
    const body = {prompt: f("prompt").value, bytes: Number(f("bytes").value),
                  seed: Number(f("seed").value), max_retries: Number(f("max_retries").value)};
    if (Object.keys(floors).length) { body.gate = "kcs"; body.floors = floors; }
    const box = document.getElementById("sample-result");
    box.textContent = "sampling…";
    try {
      const r = await api("POST", "/api/runs/" + encodeURIComponent(f("run").value) + "/sample", body);
      box.textContent = "";
      box.appendChild(el("p", {class: "verdict " + (r.allowed ? "allowed" : "blocked"),
                               id: "sample-verdict"},
                         (r.allowed ? "allowed" : "blocked") + " by gate " + r.gate +
                         " (step " + r.step + ")"));
      if (r.message) box.appendChild(el("p", {class: "message error"}, r.message));
      box.appendChild(el("pre", {class: "sample-text"}, r.text));
      if (r.decompressed !== undefined) box.appendChild(el("pre", {class: "sample-text"}, r.decompressed));
      const table = el("table", {id: "attempts"});
      const metrics = Array.from(new Set(r.attempts.flatMap(a => Object.keys(a.metrics))));
      const head = table.insertRow();
      ["attempt", "sampler", "seed", "verdict"].concat(metrics.map(m =>
        m + (r.floors[m] !== undefined ? " (floor " + r.floors[m] + ")" : ""))).forEach(h =>
        head.appendChild(el("th", {}, h)));
      r.attempts.forEach(a => {
        const tr = table.insertRow();
        [a.number, a.sampler, a.seed, a.allowed ? "allowed" : "blocked: " + a.reasons.join("; ")]
          .forEach(v => { tr.insertCell().textContent = fmt(v); });
        metrics.forEach(m => {
          const td = tr.insertCell();
          td.textContent = fmt(a.metrics[m]);
          if (r.floors[m] !== undefined && a.metrics[m] < r.floors[m]) td.className = "below";
        });
      });
      box.appendChild(table);
    } catch (e) {
      box.textContent = "";
      box.appendChild(el("p", {class: "message error"}, "Sampling failed: " + e.message));
    }
  }

  // -- wiring ------------------------------------------------------------------------------
  document.getElementById("filter").addEventListener("input", renderTable);
  ["metric", "xaxis"].forEach(id => document.getElementById(id).addEventListener("change", draw));
  document.getElementById("smoothing").addEventListener("input", ev => {
    document.getElementById("smoothing-value").textContent = ev.target.value;
    draw();
  });
  document.getElementById("compare").addEventListener("click", compare);
  document.getElementById("start-form").addEventListener("submit", start);
  document.getElementById("sample-form").addEventListener("submit", sample);
  exportLinks();
  loadRuns();
  setInterval(loadRuns, 3000);
})();
