(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("audit-data").textContent);
  var records = data.records || [];
  var $ = function (id) { return document.getElementById(id); };
  var state = { rec: null, chunk: -1 };

  function el(tag, cls, text) {
    var n = document.createElement(tag);
    if (cls) n.className = cls;
    if (text !== undefined && text !== null) n.textContent = String(text);
    return n;
  }
  function fmt(x, digits) {
    if (x === null || x === undefined || typeof x !== "number" || !isFinite(x)) return "–";
    return Number.isInteger(x) ? String(x) : x.toFixed(digits === undefined ? 3 : digits);
  }
  function colour(t) {
    if (typeof t !== "number" || !isFinite(t)) return "hsl(0,0%,85%)";
    var c = Math.max(0, Math.min(1, t));
    return "hsl(" + Math.round(120 * c) + ",75%,80%)";
  }

  // ---- diff: LCS over tokens (characters or words), bounded ----
  var MAX_CELLS = 250000;
  function tokens(s, mode) {
    if (mode === "word") return s.match(/\s+|[\p{L}\p{N}_]+|[^\s\p{L}\p{N}_]/gu) || [];
    return Array.from(s);
  }
  function push(ops, type, text) {
    if (!text) return;
    var last = ops[ops.length - 1];
    if (last && last.type === type) last.text += text; else ops.push({ type: type, text: text });
  }
  // ops turning a into b: "eq" (in both), "del" (only in a), "ins" (only in b); null when too large
  function diffTokens(a, b) {
    var p = 0;
    while (p < a.length && p < b.length && a[p] === b[p]) p++;
    var s = 0;
    while (s < a.length - p && s < b.length - p && a[a.length - 1 - s] === b[b.length - 1 - s]) s++;
    var A = a.slice(p, a.length - s), B = b.slice(p, b.length - s);
    var n = A.length, m = B.length;
    if ((n + 1) * (m + 1) > MAX_CELLS) return null;
    var W = m + 1, L = new Uint32Array((n + 1) * W);
    for (var i = n - 1; i >= 0; i--) {
      for (var j = m - 1; j >= 0; j--) {
        L[i * W + j] = A[i] === B[j] ? L[(i + 1) * W + j + 1] + 1 : Math.max(L[(i + 1) * W + j], L[i * W + j + 1]);
      }
    }
    var ops = [];
    push(ops, "eq", a.slice(0, p).join(""));
    i = 0; j = 0;
    while (i < n && j < m) {
      if (A[i] === B[j]) { push(ops, "eq", A[i]); i++; j++; }
      else if (L[(i + 1) * W + j] >= L[i * W + j + 1]) { push(ops, "del", A[i]); i++; }
      else { push(ops, "ins", B[j]); j++; }
    }
    while (i < n) { push(ops, "del", A[i]); i++; }
    while (j < m) { push(ops, "ins", B[j]); j++; }
    push(ops, "eq", a.slice(a.length - s).join(""));
    return cleanup(ops);
  }
  // a run of changes broken by tiny equal bits ("e", " ") reads as noise: fold such bits into one
  // deletion + one insertion; both sides still reconstruct exactly
  function cleanup(ops) {
    var out = [], del = "", ins = "";
    function flush() { push(out, "del", del); push(out, "ins", ins); del = ""; ins = ""; }
    for (var k = 0; k < ops.length; k++) {
      var op = ops[k];
      if (op.type === "del") del += op.text;
      else if (op.type === "ins") ins += op.text;
      else if ((del || ins) && k + 1 < ops.length && Array.from(op.text).length <= 2) { del += op.text; ins += op.text; }
      else { flush(); push(out, "eq", op.text); }
    }
    flush();
    return out;
  }
  function diff(a, b, mode) {
    var ops = null, used = mode;
    if (mode === "char") { ops = diffTokens(tokens(a, "char"), tokens(b, "char")); if (!ops) used = "word"; }
    if (!ops) { ops = diffTokens(tokens(a, "word"), tokens(b, "word")); used = "word"; }
    return { ops: ops, mode: ops ? used : "off" };
  }
  window.omniopdDiff = diff;

  // ---- selection ----
  function stepList() {
    var seen = {}, out = [];
    records.forEach(function (r) { if (!seen[r.step]) { seen[r.step] = true; out.push(r.step); } });
    return out.sort(function (x, y) { return x - y; });
  }
  function fillSteps() {
    var sel = $("step");
    sel.textContent = "";
    stepList().forEach(function (s) {
      var n = records.filter(function (r) { return r.step === s; }).length;
      var o = el("option", null, s + "  (" + n + " trajectories)");
      o.value = String(s);
      sel.appendChild(o);
    });
  }
  function fillTrajectories() {
    var sel = $("trajectory"), step = Number($("step").value);
    sel.textContent = "";
    records.forEach(function (r, idx) {
      if (r.step !== step) return;
      var label = "#" + r.trajectory + (r.example_id ? "  ·  " + r.example_id : "") + "  (" + r.chunks.length + " chunks)";
      var o = el("option", null, label);
      o.value = String(idx);
      sel.appendChild(o);
    });
  }

  function showRecord() {
    var idx = Number($("trajectory").value);
    var r = records[idx];
    state.rec = r; state.chunk = -1;
    $("chunk-panel").hidden = true;
    $("chunk-panel").textContent = "";
    if (!r) return;
    var meta = [
      "example " + (r.example_id || "–"),
      "response tokens " + fmt(r.response_tokens),
      "selector " + (r.selector || "–"),
      "φ " + (r.phi || "–"),
      "teacher " + (r.teacher || "–"),
    ];
    $("record-meta").textContent = meta.join("  ·  ");
    $("prompt").textContent = r.prompt || "(no prompt recorded)";
    var resp = $("response");
    resp.textContent = "";
    r.segments.forEach(function (seg) {
      var text = seg[0], ci = seg[1];
      if (ci < 0) { resp.appendChild(document.createTextNode(text)); return; }
      var c = r.chunks[ci];
      var span = el("span", "chunk", text);
      span.style.backgroundColor = colour(c.target);
      span.dataset.chunk = String(ci);
      span.tabIndex = 0;
      span.setAttribute("role", "button");
      span.title = "chunk " + ci + ": π̂ = " + fmt(c.target) + ", k_sem = " + fmt(c.k_sem) + ", entropy = " + fmt(c.entropy);
      span.addEventListener("click", function () { selectChunk(ci); });
      span.addEventListener("keydown", function (ev) { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); selectChunk(ci); } });
      resp.appendChild(span);
    });
    if (!r.segments.length || (r.segments.length === 1 && !r.segments[0][0])) resp.textContent = "(empty response)";
    var body = $("chunk-table").querySelector("tbody");
    body.textContent = "";
    if (!r.chunks.length) {
      var tr0 = el("tr"); var td0 = el("td", null, "no chunks were audited in this trajectory");
      td0.colSpan = 8; tr0.appendChild(td0); body.appendChild(tr0);
    }
    r.chunks.forEach(function (c, ci) {
      var tr = el("tr");
      tr.dataset.chunk = String(ci);
      var sw = el("span", "swatch"); sw.style.backgroundColor = colour(c.target);
      var first = el("td"); first.appendChild(sw); first.appendChild(document.createTextNode(" " + ci));
      tr.appendChild(first);
      var phis = c.phi_scores.filter(function (x) { return typeof x === "number"; });
      var mean = phis.length ? phis.reduce(function (a, b) { return a + b; }, 0) / phis.length : null;
      [fmt(c.start, 0) + "–" + fmt(c.end, 0), fmt(c.entropy), fmt(c.k_sem), fmt(c.prior_mean), fmt(c.target), fmt(mean),
       c.placed ? "" : "not located in response"].forEach(function (t) { tr.appendChild(el("td", null, t)); });
      tr.addEventListener("click", function () { selectChunk(ci); });
      body.appendChild(tr);
    });
  }

  function selectChunk(ci) {
    var r = state.rec;
    if (!r || !r.chunks[ci]) return;
    state.chunk = ci;
    Array.prototype.forEach.call(document.querySelectorAll(".chunk.selected, #chunk-table tr.selected"), function (n) { n.classList.remove("selected"); });
    Array.prototype.forEach.call(document.querySelectorAll('[data-chunk="' + ci + '"]'), function (n) { n.classList.add("selected"); });
    renderPanel();
  }

  function renderPanel() {
    var r = state.rec, ci = state.chunk, panel = $("chunk-panel");
    panel.textContent = "";
    if (!r || ci < 0) { panel.hidden = true; return; }
    var c = r.chunks[ci], mode = $("diff-mode").value;
    panel.hidden = false;
    panel.appendChild(el("h3", null, "Chunk " + ci + " of step " + r.step + ", trajectory " + r.trajectory));
    var stats = el("div", "stats");
    [["tokens", fmt(c.start, 0) + "–" + fmt(c.end, 0)], ["entropy H", fmt(c.entropy)], ["k_sem", fmt(c.k_sem) + " / " + c.continuations.length],
     ["p̄ (prior)", fmt(c.prior_mean)], ["π̂ (target)", fmt(c.target)]].forEach(function (kv) {
      var s = el("span", null, kv[0] + " "); s.appendChild(el("b", null, kv[1])); stats.appendChild(s);
    });
    panel.appendChild(stats);
    var cards = el("div", "cards");
    var sc = el("div", "card student");
    var sh = el("h4"); sh.appendChild(el("span", null, "student chunk")); sc.appendChild(sh);
    var st = el("div", "text student-text");
    if (c.context) st.appendChild(el("span", "context", "…" + c.context));
    st.appendChild(el("span", "chunk-text", c.student_text));
    sc.appendChild(st);
    cards.appendChild(sc);
    if (!c.continuations.length) cards.appendChild(el("p", "note", "no teacher continuations recorded for this chunk"));
    c.continuations.forEach(function (t, k) {
      var card = el("div", "card continuation");
      card.dataset.index = String(k);
      var h = el("h4");
      h.appendChild(el("span", null, "teacher #" + (k + 1)));
      var phi = c.phi_scores[k];
      var ph = el("span", "phi", "φ = " + fmt(phi));
      if (typeof phi === "number") { var bar = el("span", "phibar"); bar.style.width = Math.round(40 * Math.max(0, Math.min(1, phi))) + "px"; ph.appendChild(document.createTextNode(" ")); ph.appendChild(bar); }
      h.appendChild(ph);
      card.appendChild(h);
      var box = el("div", "text cont-text");
      var res = mode === "off" ? { ops: null, mode: "off" } : diff(c.student_text, t, mode);
      if (res.ops) {
        res.ops.forEach(function (op) {
          if (op.type === "eq") box.appendChild(document.createTextNode(op.text));
          else box.appendChild(el(op.type, null, op.text));
        });
      } else {
        box.textContent = t;
      }
      card.appendChild(box);
      if (mode !== "off" && res.mode !== mode) card.appendChild(el("div", "diffnote", res.mode === "off" ? "too long to diff" : "diffed on words (too long for characters)"));
      cards.appendChild(card);
    });
    panel.appendChild(cards);
  }

  if (!records.length) return;
  $("viewer").hidden = false;
  fillSteps();
  fillTrajectories();
  showRecord();
  $("step").addEventListener("change", function () { fillTrajectories(); showRecord(); });
  $("trajectory").addEventListener("change", showRecord);
  $("diff-mode").addEventListener("change", renderPanel);
})();
