// The sample explorer's page logic. Reads the payload from <script id="si-data">, inflates its
// blobs with the browser's DecompressionStream, draws the views with Plotly (WebGL scatter for
// the data map) and links them: a selection or filter in one view highlights in the others.
// Written for this project; no network access (everything is in the file).
"use strict";
(async function () {
  const $ = (id) => document.getElementById(id);
  const TYPES = {float32: Float32Array, int32: Int32Array, int16: Int16Array, uint16: Uint16Array,
                 uint8: Uint8Array, int8: Int8Array};

  async function inflate(b64) {
    let bytes;
    if (Uint8Array.fromBase64) bytes = Uint8Array.fromBase64(b64);  // native where the browser has it
    else {
      const bin = atob(b64);
      bytes = new Uint8Array(bin.length);
      for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    }
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
    return new Uint8Array(await new Response(stream).arrayBuffer());
  }
  async function unblob(b) {
    if (!b) return null;
    let bytes = await inflate(b.data);
    const T = TYPES[b.dtype];
    if (b.byte_planes) {  // float32 stored as 4 planes of bytes (they compress better)
      const k = T.BYTES_PER_ELEMENT, m = bytes.length / k, out = new Uint8Array(bytes.length);
      for (let j = 0; j < k; j++) for (let i = 0; i < m; i++) out[i * k + j] = bytes[j * m + i];
      bytes = out;
    }
    return new T(bytes.buffer, bytes.byteOffset, bytes.byteLength / T.BYTES_PER_ELEMENT);
  }

  // Curves: (Q, n, E) log-grid codes stored as zigzagged residuals of a prediction, in low and high
  // byte planes, in chunks of samples (explorer/data.py, encode_curves / decode_curves: the same
  // steps, for one sample). A chunk is inflated the first time one of its samples is shown.
  function curveReader(b) {
    const [Q, n, E] = b.curve_shape, L = Q - 2, per = b.chunk;
    const chunks = new Map();
    let table = null;
    const signed = (c) => { c &= 0xffff; return c >= 32768 ? c - 65536 : c; };
    const value = (s) => (s === P.zero_code ? 0 : Math.exp(s * P.log_step));
    return async function (i) {  // sample index -> Q arrays of E values
      const k = Math.floor(i / per), j = i - k * per, m = Math.min(per, n - k * per), N = Q * m * E;
      if (!chunks.has(k)) chunks.set(k, unblob(b.chunks[k]));
      if (!table) table = unblob(b.p_table);
      const [planes, tab] = await Promise.all([chunks.get(k), table]);
      const residual = (q, t) => {
        const x = (q * m + j) * E + t, u = planes[x] | (planes[N + x] << 8);
        return u & 1 ? -((u + 1) >> 1) : u >> 1;
      };
      const C = Array.from({length: Q}, () => new Int32Array(E));
      for (let q = L - 1; q >= 0; q--) {
        let acc = 0;
        for (let t = 0; t < E; t++) {
          acc += residual(q, t);
          C[q][t] = signed(acc + (q === L - 1 ? 0 : C[q + 1][t]));
        }
      }
      let acc = 0;
      for (let t = 0; t < E; t++) {
        acc += residual(L, t);
        C[L][t] = signed(acc + (C[L - 1][t] >> 1));
        C[L + 1][t] = signed(residual(L + 1, t) + tab[C[L][t] - b.p_table_start]);
      }
      return C.map((codes) => Float64Array.from(codes, value));
    };
  }

  // In-run attribution per layer: (L, n, E) int16 codes sign * (log-grid code + offset), 0 = zero
  // (explorer/data.py, encode_signed / decode_signed), in chunks of samples.
  function signedReader(b) {
    const [Lc, n, E] = b.shape, per = b.chunk;
    const chunks = new Map();
    return async function (i) {  // sample index -> Lc arrays of E values
      const k = Math.floor(i / per), j = i - k * per, m = Math.min(per, n - k * per);
      if (!chunks.has(k)) chunks.set(k, unblob(b.chunks[k]));
      const codes = await chunks.get(k);
      return Array.from({length: Lc}, (_, q) => Float64Array.from({length: E}, (_, t) => {
        const s = codes[(q * m + j) * E + t];
        return s === 0 ? 0 : Math.sign(s) * Math.exp((Math.abs(s) - b.offset) * P.log_step);
      }));
    };
  }

  performance.mark("si-start");
  const packed = await inflate($("si-plotly").textContent);
  performance.mark("si-plotly-inflated");
  // Plotly's own bundle travels compressed: inflate it and run it as an inline script.
  const plotly = document.createElement("script");
  plotly.textContent = new TextDecoder().decode(packed);
  document.head.appendChild(plotly);
  performance.mark("si-plotly");
  const P = JSON.parse($("si-data").textContent);
  const n = P.n, E = P.epochs, L = P.layers.length;
  const [sampleId, label, prediction, flipped, cluster] = await Promise.all(
    [P.sample_id, P.label, P.prediction, P.flipped, P.cluster].map(unblob));
  performance.mark("si-blobs");
  const scoreNames = P.scores.map((s) => s.name);
  const scores = {};
  const sorted = {};  // each score's values in ascending order, for ranks
  await Promise.all(P.scores.map(async (s) => {
    scores[s.name] = await unblob(s.values);
    const v = Float64Array.from(scores[s.name]).sort();
    sorted[s.name] = {v, harder_is_larger: s.harder_is_larger};
  }));
  const [curves, ...otherCurves] = [P.curves, ...P.other_runs.map((o) => o.curves)].map(curveReader);
  const contributions = P.contribution ? signedReader(P.contribution) : null;
  const indexOf = new Map();
  for (let i = 0; i < n; i++) indexOf.set(sampleId[i], i);

  // Rank 1 = hardest; ties share the smallest rank (as explorer.data.ranks).
  function rank(name, value) {
    const {v, harder_is_larger} = sorted[name];
    let lo = 0, hi = v.length;
    if (harder_is_larger) {  // count of values strictly larger
      while (lo < hi) { const m = (lo + hi) >> 1; if (v[m] <= value) lo = m + 1; else hi = m; }
      return v.length - lo + 1;
    }
    while (lo < hi) { const m = (lo + hi) >> 1; if (v[m] < value) lo = m + 1; else hi = m; }
    return lo + 1;
  }
  const fmt = (x) => (Number.isInteger(x) ? String(x) : Math.abs(x) >= 1e4 || Math.abs(x) < 1e-3 ? x.toExponential(3) : x.toPrecision(4));
  const className = (c) => `${c}${P.class_names[c] !== String(c) ? " " + P.class_names[c] : ""}`;
  const el = (tag, attrs = {}, text) => {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  };

  performance.mark("si-scores");
  // ---- images: one CSS class per WebP sprite sheet, tiles shown by background position ----
  // Without images (a researcher's own data, through track_run): a tile with the sample id.
  const im = P.images || {sheets: [], width: 28, height: 28};
  const style = el("style");
  style.textContent = im.sheets.map((s, k) => `.si-sheet${k}{background-image:url(${s})}`).join("\n");
  document.head.appendChild(style);
  function thumb(i, scale, extra = {}) {
    if (!P.images) {
      const d = el("div", {class: "si-img si-noimg", title: `sample ${sampleId[i]}`, ...extra}, String(sampleId[i]));
      d.style.width = `${im.width * scale}px`;
      d.style.height = `${im.height * scale}px`;
      return d;
    }
    const k = Math.floor(i / im.per_sheet), j = i % im.per_sheet;
    const r = Math.floor(j / im.columns), c = j % im.columns;
    const d = el("div", {class: `si-img si-sheet${k}`, title: `sample ${sampleId[i]}`, ...extra});
    d.style.width = `${im.width * scale}px`;
    d.style.height = `${im.height * scale}px`;
    d.style.backgroundSize = `${im.columns * im.width * scale}px auto`;
    d.style.backgroundPosition = `-${c * im.width * scale}px -${r * im.height * scale}px`;
    return d;
  }

  // ---- header: where the data came from ----
  $("title").textContent = P.title;
  for (const run of P.runs) {
    const li = el("li");
    li.appendChild(el("span", {}, `${run.role}: `));
    if (run.url) li.appendChild(el("a", {href: run.url, target: "_blank", rel: "noopener"}, run.run_id));
    else li.appendChild(el("code", {}, run.run_id));
    $("runs").appendChild(li);
  }

  // ---- state ----
  let selected = -1;      // the sample shown in the detail panel
  let shownToken = 0;     // the latest selection (a sample's curves are inflated asynchronously)
  let mapSubset = null;   // indices chosen by box/lasso on the map
  const filters = {cls: "", cluster: "", score: scoreNames[0], lo: "", hi: ""};
  let sortBy = "total_importance" in scores ? "total_importance" : scoreNames[0], sortDesc = true;

  // ---- the data map ----
  const [xName, yName] = P.map_axes;
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                   "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd",
                   "#e6550d", "#31a354", "#756bb1", "#636363"];
  const colourOptions = [["class", "class"], ["correct", "final prediction correct"]];
  if (flipped) colourOptions.push(["flipped", "flipped label"]);
  if (cluster) colourOptions.push(["cluster", "cluster"]);
  for (const s of scoreNames) colourOptions.push([`score:${s}`, s]);
  for (const [v, t] of colourOptions) $("colour-by").appendChild(el("option", {value: v}, t));
  $("colour-by").value = "contribution_total" in scores ? "score:contribution_total"
    : "total_importance" in scores ? "score:total_importance" : "class";

  function colouring(what) {
    const cat = (values, names) => ({
      marker: {color: Array.from(values, (v) => (v < 0 ? "#dddddd" : PALETTE[v % PALETTE.length])), showscale: false},
      legend: names});
    if (what === "class") return cat(label, P.class_names.map((c, k) => [className(k), PALETTE[k % PALETTE.length]]));
    if (what === "correct") return cat(Array.from(label, (y, i) => (y === prediction[i] ? 2 : 3)),
                                       [["correct", PALETTE[2]], ["wrong", PALETTE[3]]]);
    if (what === "flipped") return cat(Array.from(flipped, (f) => (f ? 3 : 7)), [["flipped", PALETTE[3]], ["clean", PALETTE[7]]]);
    if (what === "cluster") return cat(cluster, [["outside the clustered class", "#dddddd"]]);
    const name = what.slice(6), v = scores[name];
    let lo = Infinity, hi = -Infinity;
    for (const x of v) { if (x < lo) lo = x; if (x > hi) hi = x; }
    if (lo < 0 && hi > 0) {  // signed (the contribution): red raised the target loss, blue lowered it
      const m = Math.max(-lo, hi);
      return {marker: {color: Array.from(v), colorscale: "RdBu", reversescale: true, cmin: -m, cmax: m, showscale: true,
                       colorbar: {title: {text: name}, thickness: 12}}, legend: [["raised the target loss", "#b2182b"],
                                                                                  ["lowered it", "#2166ac"]]};
    }
    const useLog = lo > 0 && hi / lo > 1e3;  // importance spans orders of magnitude
    return {marker: {color: useLog ? Array.from(v, Math.log10) : Array.from(v), colorscale: "Viridis", showscale: true,
                     colorbar: {title: {text: useLog ? `log10 ${name}` : name}, thickness: 12}}, legend: []};
  }

  function mapTrace(what) {
    const c = colouring(what);
    return {trace: {type: "scattergl", mode: "markers", x: Array.from(scores[xName]), y: Array.from(scores[yName]),
                    customdata: Array.from(sampleId), hovertemplate: "sample %{customdata}<extra></extra>",
                    marker: {size: n > 20000 ? 3 : 5, ...c.marker}, selected: {marker: {opacity: 1}},
                    unselected: {marker: {opacity: 0.12}}}, legend: c.legend};
  }
  const highlight = {type: "scatter", mode: "markers", x: [], y: [], hoverinfo: "skip",
                     marker: {size: 16, color: "rgba(0,0,0,0)", line: {color: "#d00", width: 3}}};
  const first = mapTrace($("colour-by").value);
  await Plotly.newPlot($("map"), [first.trace, highlight], {
    margin: {l: 55, r: 10, t: 10, b: 45}, dragmode: "zoom", hovermode: "closest", showlegend: false,
    xaxis: {title: {text: `${xName} (std of p_true over epochs)`}}, yaxis: {title: {text: `${yName} (mean p_true over epochs)`}},
  }, {responsive: true, displaylogo: false, modeBarButtonsToAdd: ["select2d", "lasso2d"]});
  function drawLegend(items) {
    $("legend").replaceChildren(...items.map(([t, c]) => {
      const s = el("span", {class: "si-key"}); s.appendChild(el("i", {style: `background:${c}`})); s.append(t); return s;
    }));
  }
  performance.mark("si-map");
  drawLegend(first.legend);
  $("colour-by").addEventListener("change", () => {
    const t = mapTrace($("colour-by").value);
    Plotly.restyle($("map"), {marker: [t.trace.marker]}, [0]);
    drawLegend(t.legend);
  });
  $("map").on("plotly_click", (ev) => {
    const p = ev.points.find((q) => q.curveNumber === 0);
    if (p) select(p.pointIndex);
  });
  $("map").on("plotly_selected", (ev) => {
    mapSubset = ev && ev.points.length ? ev.points.filter((q) => q.curveNumber === 0).map((q) => q.pointIndex) : null;
    renderTable();
  });
  $("map").on("plotly_deselect", () => { mapSubset = null; renderTable(); });

  // ---- the table ----
  const classSel = $("f-class"), clusterSel = $("f-cluster"), scoreSel = $("f-score"), sortSel = $("sort-by");
  classSel.appendChild(el("option", {value: ""}, "all classes"));
  P.class_names.forEach((_, k) => classSel.appendChild(el("option", {value: k}, className(k))));
  clusterSel.appendChild(el("option", {value: ""}, "all clusters"));
  if (P.cluster_summary) P.cluster_summary.forEach((c) => clusterSel.appendChild(el("option", {value: c.cluster}, `cluster ${c.cluster}`)));
  else clusterSel.hidden = true;
  for (const s of scoreNames) { scoreSel.appendChild(el("option", {value: s}, s)); sortSel.appendChild(el("option", {value: s}, s)); }
  sortSel.value = sortBy;
  const columns = ["sample_id", "label", "prediction", ...(cluster ? ["cluster"] : []), ...(flipped ? ["flipped"] : []), ...scoreNames];
  const cell = (col, i) => {
    if (col === "sample_id") return String(sampleId[i]);
    if (col === "label") return className(label[i]);
    if (col === "prediction") return className(prediction[i]);
    if (col === "cluster") return cluster[i] < 0 ? "" : String(cluster[i]);
    if (col === "flipped") return flipped[i] ? "yes" : "";
    return fmt(scores[col][i]);
  };
  const key = (col, i) => (col === "sample_id" ? sampleId[i] : col === "label" ? label[i] : col === "prediction" ? prediction[i]
    : col === "cluster" ? cluster[i] : col === "flipped" ? flipped[i] : scores[col][i]);

  function filtered() {
    const lo = filters.lo === "" ? -Infinity : Number(filters.lo), hi = filters.hi === "" ? Infinity : Number(filters.hi);
    const base = mapSubset || Array.from({length: n}, (_, i) => i);
    const cls = filters.cls === "" ? null : Number(filters.cls), cl = filters.cluster === "" ? null : Number(filters.cluster);
    const v = scores[filters.score];
    return base.filter((i) => (cls === null || label[i] === cls) && (cl === null || cluster[i] === cl) && v[i] >= lo && v[i] <= hi);
  }
  let lastFilterKey = JSON.stringify(filters);  // the map starts with nothing dimmed
  function renderTable() {
    const rows = filtered();
    rows.sort((a, b) => (sortDesc ? key(sortBy, b) - key(sortBy, a) : key(sortBy, a) - key(sortBy, b)) || sampleId[a] - sampleId[b]);
    const k = Math.max(1, Number($("top-k").value) || 100);
    $("table-count").textContent = `${rows.length} of ${n} samples match; showing the first ${Math.min(k, rows.length)} by ${sortBy} (${sortDesc ? "largest" : "smallest"} first)`;
    const head = el("tr");
    for (const c of columns) {
      const th = el("th", {"data-col": c}, c + (c === sortBy ? (sortDesc ? " ▼" : " ▲") : ""));
      th.addEventListener("click", () => { if (sortBy === c) sortDesc = !sortDesc; else { sortBy = c; sortDesc = true; }
                                           if (scoreNames.includes(c)) sortSel.value = c; renderTable(); });
      head.appendChild(th);
    }
    const body = rows.slice(0, k).map((i) => {
      const tr = el("tr", {"data-index": i, class: i === selected ? "si-current" : ""});
      for (const c of columns) tr.appendChild(el("td", {}, cell(c, i)));
      tr.addEventListener("click", () => select(i));
      return tr;
    });
    $("table").replaceChildren(el("thead"), el("tbody"));
    $("table").tHead.appendChild(head);
    $("table").tBodies[0].replaceChildren(...body);
    // The table's filters highlight their samples on the map (a map selection already shows itself).
    const fkey = JSON.stringify(filters);
    if (!mapSubset && fkey !== lastFilterKey) {
      const all = !filters.cls && !filters.cluster && filters.lo === "" && filters.hi === "";
      Plotly.restyle($("map"), {selectedpoints: [all ? null : rows]}, [0]);
    }
    lastFilterKey = fkey;
  }
  for (const [id, field] of [["f-class", "cls"], ["f-cluster", "cluster"], ["f-score", "score"], ["f-lo", "lo"], ["f-hi", "hi"]]) {
    $(id).addEventListener("change", () => { filters[field] = $(id).value; renderTable(); });
  }
  sortSel.addEventListener("change", () => { sortBy = sortSel.value; sortDesc = true; renderTable(); });
  if ("contribution_total" in scores) {  // rank by the in-run attribution: positive = raised the target loss
    for (const [id, desc] of [["most-harmful", true], ["most-helpful", false]]) {
      $(id).hidden = false;
      $(id).addEventListener("click", () => { sortBy = "contribution_total"; sortDesc = desc; sortSel.value = sortBy; renderTable(); });
    }
  }
  $("top-k").addEventListener("change", renderTable);
  $("search").addEventListener("keydown", (ev) => {
    if (ev.key !== "Enter") return;
    const i = indexOf.get(Number($("search").value.trim()));
    $("search-msg").textContent = i === undefined ? `no training sample has sample_id ${$("search").value.trim()}` : "";
    if (i !== undefined) select(i);
  });

  // ---- the detail panel of one sample ----
  const epochs = Array.from({length: E}, (_, t) => t + 1);
  const LAYER_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"];

  performance.mark("si-table-setup");
  async function select(i) {
    const token = ++shownToken;
    const [mine, contribution, ...others] = await Promise.all([curves(i), contributions ? contributions(i) : null,
                                                                 ...otherCurves.map((reader) => reader(i))]);
    if (token !== shownToken) return;  // a later selection came first
    selected = i;
    Plotly.restyle($("map"), {x: [[scores[xName][i]]], y: [[scores[yName][i]]]}, [1]);
    const id = sampleId[i], y = label[i], p = prediction[i];
    $("detail-empty").hidden = true;
    $("detail").hidden = false;
    $("detail-image").replaceChildren(thumb(i, Math.max(2, Math.floor(168 / im.width))));
    $("detail-sample-id").textContent = String(id);
    $("detail-label").textContent = className(y) + (flipped && flipped[i] ? " (flipped by label noise)" : "");
    $("detail-prediction").textContent = className(p) + (p === y ? " (correct)" : " (wrong)");
    $("detail-cluster").textContent = cluster ? (cluster[i] < 0 ? "not clustered (other class)" : `cluster ${cluster[i]}`) : "no cluster run";
    const rows = scoreNames.map((s) => {
      const v = scores[s][i];
      const tr = el("tr", {"data-score": s});
      tr.appendChild(el("td", {}, s));
      tr.appendChild(el("td", {class: "value", "data-value": String(v)}, fmt(v)));
      tr.appendChild(el("td", {class: "rank", "data-rank": rank(s, v)}, `${rank(s, v)} / ${n}`));
      return tr;
    });
    $("detail-scores").replaceChildren(...rows);
    const last = [];
    const beta = [];
    P.layers.forEach((name, q) => {
      const c = mine[q];
      beta.push({x: epochs, y: Array.from(c), name: `β ${name}`, mode: "lines", line: {color: LAYER_COLOURS[q % 7]}});
      last.push([`β ${name}`, c[E - 1], `beta_${name}`]);
    });
    const nll = mine[L], pt = mine[L + 1];
    last.push(["in-batch NLL", nll[E - 1], "nll"], ["p_true", pt[E - 1], "p_true"]);
    const lossTraces = [{x: epochs, y: Array.from(nll), name: "NLL", mode: "lines", line: {color: "#333"}},
                        {x: epochs, y: Array.from(pt), name: "p_true", mode: "lines", yaxis: "y2", line: {color: "#2ca02c"}}];
    P.other_runs.forEach((o, k) => {
      const theirs = others[k];
      o.layers.forEach((name, q) => beta.push({x: epochs, y: Array.from(theirs[q]), name: `β ${name}, ${o.name}`,
        mode: "lines", line: {color: LAYER_COLOURS[Math.max(0, P.layers.indexOf(name)) % 7], dash: "dot", width: 1}}));
      const ql = o.layers.length;
      lossTraces.push({x: epochs, y: Array.from(theirs[ql]), name: `NLL, ${o.name}`, mode: "lines",
                       line: {color: "#333", dash: "dot", width: 1}},
                      {x: epochs, y: Array.from(theirs[ql + 1]), name: `p_true, ${o.name}`, mode: "lines",
                       yaxis: "y2", line: {color: "#2ca02c", dash: "dot", width: 1}});
    });
    $("detail-last").replaceChildren(...last.map(([t, v, k]) => {
      const tr = el("tr", {"data-curve": k});
      tr.appendChild(el("td", {}, t));
      tr.appendChild(el("td", {class: "value", "data-value": String(v)}, fmt(v)));
      return tr;
    }));
    $("detail-epoch").textContent = String(E);
    const small = {margin: {l: 55, r: 60, t: 28, b: 35}, legend: {font: {size: 10}}, xaxis: {title: {text: "epoch"}}};
    Plotly.react($("beta-plot"), beta, {...small, title: {text: `β per layer, sample ${id}`, font: {size: 13}},
                                        yaxis: {type: "log", exponentformat: "e"}}, {displaylogo: false});
    Plotly.react($("loss-plot"), lossTraces, {...small, legend: {font: {size: 10}, x: 1.12}, title: {text: `in-batch NLL and p_true, sample ${id}`, font: {size: 13}},
      yaxis: {title: {text: "NLL"}}, yaxis2: {title: {text: "p_true"}, overlaying: "y", side: "right", range: [0, 1], tickformat: ".1f"}},
      {displaylogo: false});
    if (contribution) {  // beside beta: the same steps' contribution to the target loss, signed
      let total = 0;
      for (const c of contribution) for (const x of c) total += x;
      $("contribution-note").hidden = $("contribution-plot").hidden = false;
      $("contribution-note").textContent = `Over its steps, sample ${id} ${total > 0 ? "raised" : total < 0 ? "lowered" : "left"} `
        + `the target loss (${P.target}) by ${fmt(Math.abs(total))} to first order: ${total > 0 ? "it hurt" : total < 0 ? "it helped" : "no effect"}.`;
      Plotly.react($("contribution-plot"), P.layers.map((name, q) => ({x: epochs, y: Array.from(contribution[q]), name: `c ${name}`,
        mode: "lines", line: {color: LAYER_COLOURS[q % 7]}})), {...small, title: {text: `contribution to the target loss per layer, sample ${id} (> 0: hurt)`, font: {size: 13}},
        yaxis: {exponentformat: "e", zeroline: true}}, {displaylogo: false});
    }
    for (const tr of document.querySelectorAll("#table tbody tr")) tr.classList.toggle("si-current", Number(tr.dataset.index) === i);
    document.body.dataset.selected = String(id);
  }

  // ---- clusters of the cluster run ----
  if (P.cluster_summary) {
    const members = new Map();
    for (let i = 0; i < n; i++) if (cluster[i] >= 0) { if (!members.has(cluster[i])) members.set(cluster[i], []); members.get(cluster[i]).push(i); }
    $("clusters-note").textContent = P.cluster_note || "";
    for (const c of P.cluster_summary) {
      const box = el("div", {class: "si-cluster", "data-cluster": c.cluster});
      const h = el("h3", {}, `cluster ${c.cluster} · rank ${c.rank + 1} of ${P.cluster_summary.length} · ${c.size} samples · mean NLL ${fmt(c.difficulty)} · peak epoch ${c.peak_epoch}`);
      h.addEventListener("click", () => { clusterSel.value = String(c.cluster); filters.cluster = String(c.cluster); renderTable(); });
      box.appendChild(h);
      const strip = el("div", {class: "si-strip"});
      for (const i of (members.get(c.cluster) || []).slice(0, 32)) {
        const t = thumb(i, Math.max(1, Math.floor(36 / im.width)));
        t.addEventListener("click", () => select(i));
        strip.appendChild(t);
      }
      box.appendChild(strip);
      $("clusters").appendChild(box);
    }
  } else {
    $("clusters-section").hidden = true;
  }

  renderTable();
  $("loading").hidden = true;
  window.SI_READY_MS = performance.now();
  document.body.dataset.ready = "1";
})().catch((err) => {
  const box = document.getElementById("loading");
  box.hidden = false;
  box.textContent = `The explorer could not start: ${err}`;
  throw err;
});
