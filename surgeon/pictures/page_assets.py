"""The HTML view's stylesheet and script, inlined into every page (no network at view time).

The script only toggles classes and fills the details panel from the JSON the page carries,
with `textContent` (never innerHTML of data), so a module name cannot inject markup.
"""

CSS = """
:root { --line:#dee2e6; --muted:#868e96; --accent:#d9480f; }
* { box-sizing: border-box; }
body { margin:0; font:13px/1.4 system-ui, -apple-system, Segoe UI, Helvetica, Arial, sans-serif;
       color:#212529; background:#fff; }
header { padding:12px 16px; border-bottom:1px solid var(--line); background:#f8f9fa; }
header h1 { font-size:16px; margin:0 0 4px; }
header .caption, header .note { color:#495057; margin:2px 0; }
header .note { color:#c92a2a; }
header button { margin:6px 6px 0 0; font:inherit; padding:2px 10px; border:1px solid var(--line);
                border-radius:4px; background:#fff; cursor:pointer; }
.legend span { display:inline-block; margin-right:12px; }
.legend i { display:inline-block; width:12px; height:12px; border-radius:3px; vertical-align:-2px;
            margin-right:4px; border:1px solid var(--muted); }
main { display:flex; align-items:flex-start; }
#outline { flex:1 1 auto; padding:12px 16px; min-width:0; }
#details { flex:0 0 380px; position:sticky; top:0; max-height:100vh; overflow:auto; padding:12px 16px;
           border-left:1px solid var(--line); background:#fcfcfd; }
#details h2 { font-size:14px; margin:0 0 6px; word-break:break-all; }
#details dt { color:var(--muted); margin-top:6px; }
#details dd { margin:0; word-break:break-all; }
#details .paths { white-space:pre-line; max-height:160px; overflow:auto; font-family:ui-monospace, monospace; font-size:11px; }
#details .empty { color:var(--muted); }
.arrow { color:var(--muted); text-align:center; font-size:14px; line-height:16px; }
.card { display:block; margin:0 auto; max-width:520px; border:1px solid var(--line); border-radius:6px;
        padding:6px 10px; background:#f1f3f5; cursor:pointer; text-align:center; white-space:pre-line; }
.card.layer { background:#fff; border-color:var(--muted); }
.card.adapted { border:2px solid var(--accent); background:#ffe8cc; }
.card.selected, svg .node.selected rect { outline:3px solid #1c7ed6; }
.block { border:2px solid #495057; border-radius:8px; margin:4px 0; background:#f8f9fa; }
.block.single { border-width:1px; border-color:#ced4da; }
.block > .toggle { display:block; width:100%; text-align:left; font:inherit; font-weight:600;
                   padding:8px 12px; border:0; background:transparent; cursor:pointer; }
.block > .toggle .sum { font-weight:400; color:#495057; margin-left:8px; }
.block > .toggle::before { content:"\\25B8  "; }
.block.expanded > .toggle::before { content:"\\25BE  "; }
.block > .body { display:none; padding:0 12px 12px; overflow:auto; }
.block.expanded > .body { display:block; }
svg { font-family:system-ui, Helvetica, Arial, sans-serif; }
svg .node { cursor:pointer; }
svg .node text { font-size:11px; pointer-events:none; }
svg .edge { fill:none; stroke:#868e96; stroke-width:1.2; }
svg .cluster { fill:none; stroke:#adb5bd; stroke-dasharray:4 3; }
svg .cluster-label { font-size:11px; fill:#495057; }
#details svg { max-width:100%; height:auto; }
.expansion { display:flex; gap:8px; flex-wrap:wrap; }
.expansion figure { margin:0; }
.expansion figcaption { font-weight:600; font-size:12px; }
"""

JS = r"""
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("scene-data").textContent);
  var byId = {};
  data.nodes.forEach(function (n) { byId[n.id] = n; });
  var details = document.getElementById("details");

  function el(tag, text, cls) {
    var e = document.createElement(tag);
    if (text !== undefined && text !== null) { e.textContent = String(text); }
    if (cls) { e.className = cls; }
    return e;
  }
  function row(list, term, value, cls) {
    if (value === undefined || value === null || value === "") { return; }
    list.appendChild(el("dt", term));
    list.appendChild(el("dd", value, cls));
  }
  function show(id) {
    var n = byId[id];
    if (!n) { return; }
    document.querySelectorAll(".selected").forEach(function (s) { s.classList.remove("selected"); });
    document.querySelectorAll('[data-node="' + CSS.escape(id) + '"]').forEach(function (s) {
      s.classList.add("selected");
    });
    details.textContent = "";
    details.appendChild(el("h2", n.paths.length ? n.paths[0] : n.label));
    var list = el("dl");
    row(list, "kind", n.kind + (n.type ? " \u00b7 " + n.type : ""));
    row(list, "weight shape", n.shape);
    row(list, "role", n.role ? "@" + n.role : "");
    row(list, "why (dataflow evidence)", n.evidence);
    if (n.paths.length > 1) { row(list, "stands for " + n.paths.length + " modules", n.paths.join("\n"), "paths"); }
    n.sites.forEach(function (s) {
      row(list, "adapter " + s.adapter, s.summary + " \u00b7 " + s.params.toLocaleString() +
          " params per layer" + (n.paths.length > 1 ? " (" + (s.params * n.paths.length).toLocaleString() + " in all)" : ""));
      row(list, "chosen by rule", s.rule + (s.rule_text ? "   " + s.rule_text : ""));
    });
    var ins = data.edges.filter(function (e) { return e[1] === id; }).map(function (e) { return label(e[0]); });
    var outs = data.edges.filter(function (e) { return e[0] === id; }).map(function (e) { return label(e[1]); });
    row(list, "inputs from", ins.join(", "));
    row(list, "outputs to", outs.join(", "));
    details.appendChild(list);
    if (n.expansion !== undefined && n.expansion !== null) {
      var tpl = document.getElementById("expansion-" + n.expansion);
      if (tpl) {
        details.appendChild(el("h2", "inside the layer: before and after merge"));
        details.appendChild(tpl.content.cloneNode(true));
      }
    }
  }
  function label(id) { var n = byId[id]; return n ? (n.paths[0] || n.label).replace(/\n/g, " ") : id; }

  document.querySelectorAll(".block > .toggle").forEach(function (b) {
    b.addEventListener("click", function () {
      var block = b.parentNode;
      block.classList.toggle("expanded");
      b.setAttribute("aria-expanded", block.classList.contains("expanded") ? "true" : "false");
    });
  });
  document.querySelectorAll("[data-node]").forEach(function (e) {
    e.addEventListener("click", function (ev) { ev.stopPropagation(); show(e.getAttribute("data-node")); });
  });
  function all(open) {
    document.querySelectorAll(".block").forEach(function (b) {
      b.classList.toggle("expanded", open);
      b.querySelector(".toggle").setAttribute("aria-expanded", open ? "true" : "false");
    });
  }
  document.getElementById("expand-all").addEventListener("click", function () { all(true); });
  document.getElementById("collapse-all").addEventListener("click", function () { all(false); });
  if (data.open) {
    var target = document.querySelector('[data-node="' + CSS.escape(data.open) + '"]');
    if (target) {
      var block = target.closest(".block");
      if (block) { block.classList.add("expanded"); }
      show(data.open);
    }
  }
})();
"""
