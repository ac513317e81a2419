"""The page `graft serve` shows at GET /: drop or pick images, see each one's decision (a class,
"unknown" or "review") and top classes as bars, a review band (a class decided below the slider's
probability is shown as "review"), a Grad-CAM overlay on request, and the model card beside.
One self-contained HTML string: no external URL, works offline; it only calls the JSON API."""

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>graft classifier</title>
<style>
body{font-family:system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{padding:.8em 1.2em;background:#234;color:#fff}header h1{margin:0;font-size:1.3em}
main{display:flex;gap:1.5em;padding:1.2em;flex-wrap:wrap}
#left{flex:3;min-width:320px}#card{flex:1;min-width:240px;background:#fff;border:1px solid #ddd;
padding:1em;border-radius:6px;align-self:flex-start}#card h2{margin-top:0;font-size:1.1em}
#drop{border:2px dashed #89a;border-radius:6px;padding:1.5em;text-align:center;background:#fff}
#drop.over{background:#eef4ff}.controls{margin:.8em 0;display:flex;gap:1.5em;flex-wrap:wrap}
.result{display:flex;gap:1em;background:#fff;border:1px solid #ddd;border-radius:6px;
padding:.8em;margin:.6em 0}.result img{width:160px;height:160px;object-fit:contain;
background:#eee}.info{flex:1}.top{font-weight:600;font-size:1.1em;margin-bottom:.4em}
.top.review{color:#a60}.top.unknown{color:#666;font-style:italic}
.bar{display:grid;grid-template-columns:minmax(0,7em) minmax(4em,1fr) 3.8em;gap:.5em;
align-items:center;margin:.2em 0}.track{background:#eee;height:.9em;border-radius:3px}
.fill{background:#3a7;height:100%;border-radius:3px}.pct{text-align:right;
font-variant-numeric:tabular-nums}.error{color:#b00}button{margin-top:.5em}
table{border-collapse:collapse}td{padding:2px 6px;border-bottom:1px solid #eee}
</style></head><body>
<header><h1>graft classifier</h1></header>
<main><div id="left">
<div id="drop">Drop images here, or <input type="file" id="files" multiple accept="image/*"></div>
<div class="controls">
<label>review below <input type="range" id="threshold" min="0" max="100" value="0">
<span id="thv">0%</span></label>
<label>classes shown <input type="number" id="topk" min="1" max="20" value="3"></label>
</div>
<div id="results"></div></div>
<aside id="card"><h2>Model card</h2><div id="cardbody">loading...</div></aside></main>
<script>
const $ = (s, e = document) => e.querySelector(s);
const esc = t => String(t).replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;",
  '"': "&quot;", "'": "&#39;"}[c]));
const pct = p => (100 * p).toFixed(1) + "%";
function label(el) {
  const probs = JSON.parse(el.dataset.probs || "null");
  const top = $(".top", el);
  if (!probs) return;
  const shown = Object.entries(probs).slice(0, 2).map(([c, p]) => `${c} ${pct(p)}`).join(", ");
  let d = el.dataset.decision || Object.keys(probs)[0];
  // the review band: a class decided below the slider's probability goes to a person too
  if (d in probs && probs[d] * 100 < +$("#threshold").value) d = "review";
  top.className = "top" + (d === "review" ? " review" : d === "unknown" ? " unknown" : "");
  top.textContent = d === "unknown" ? `unknown (closest: ${shown})` :
    d === "review" ? `review: ${shown}` : `${d} ${pct(probs[d])}`;
  top.dataset.cls = d in probs ? d : "";
  top.dataset.decision = d;
}
async function classify(file) {
  const el = document.createElement("div");
  el.className = "result";
  el.innerHTML = `<img alt="${esc(file.name)}"><div class="info"><div class="name">` +
    `${esc(file.name)}</div><div class="top">...</div><div class="bars"></div></div>`;
  $("img", el).src = URL.createObjectURL(file);
  $("#results").prepend(el);
  const body = new FormData();
  body.append("files", file, file.name);
  body.append("top_k", $("#topk").value);
  try {
    const r = await fetch("predict", {method: "POST", body});
    const [res] = await r.json();
    if (!r.ok || res.error) throw new Error(res.error || r.statusText);
    await classesReady;
    el.dataset.probs = JSON.stringify(res.probabilities);
    el.dataset.decision = res.decision || "";
    el.dataset.sha256 = res.sha256 || "";
    $(".bars", el).innerHTML = Object.entries(res.probabilities).map(([c, p]) =>
      `<div class="bar" data-class="${esc(c)}" data-p="${p}"><span>${esc(c)}</span>` +
      `<div class="track"><div class="fill" style="width:${100 * p}%"></div></div>` +
      `<span class="pct">${pct(p)}</span></div>`).join("") +
      `<button class="cam">show Grad-CAM</button> <span class="fix">wrong? it is ` +
      `<select>${CLASSES.map(c => `<option>${esc(c)}</option>`).join("")}</select> ` +
      `<button class="send">send</button></span>`;
    $(".cam", el).onclick = () => explain(file, el);
    $(".send", el).onclick = () => correct(file, el);
    label(el);
    el.classList.add("done");
  } catch (err) {
    $(".top", el).innerHTML = `<span class="error">${esc(err.message)}</span>`;
    el.classList.add("done", "failed");
  }
}
let CLASSES = [];
const classesReady = fetch("classes").then(r => r.json()).then(c => { CLASSES = c; });
async function correct(file, el) {
  const body = {filename: file.name, sha256: el.dataset.sha256,
    predicted: $(".top", el).dataset.decision, corrected: $(".fix select", el).value};
  const r = await fetch("feedback", {method: "POST", headers: {"Content-Type":
    "application/json"}, body: JSON.stringify(body)});
  $(".fix", el).textContent = r.ok ? `saved: it is ${body.corrected}` : (await r.json()).detail;
}
async function explain(file, el) {
  const body = new FormData();
  body.append("file", file, file.name);
  const r = await fetch("explain", {method: "POST", body});
  if (!r.ok) { $(".cam", el).textContent = (await r.json()).detail; return; }
  $("img", el).src = URL.createObjectURL(await r.blob());
  $(".cam", el).remove();
}
function many(files) { for (const f of files) classify(f); }
$("#files").onchange = e => many(e.target.files);
const drop = $("#drop");
drop.ondragover = e => { e.preventDefault(); drop.classList.add("over"); };
drop.ondragleave = () => drop.classList.remove("over");
drop.ondrop = e => { e.preventDefault(); drop.classList.remove("over");
  many(e.dataTransfer.files); };
$("#threshold").oninput = e => { $("#thv").textContent = e.target.value + "%";
  document.querySelectorAll(".result.done").forEach(label); };
fetch("card").then(r => r.json()).then(c => {
  const acc = c.val_accuracy == null ? "not scored" :
    `${pct(c.val_accuracy)} (95% CI ${pct(c.val_ci95[0])}-${pct(c.val_ci95[1])}, ` +
    `n=${c.val_images})`;
  const rows = [["backbone", c.backbone], ["strategy", c.strategy], ["val accuracy", acc],
    ["training images", c.train_images], ["trained", c.created], ["classes", c.classes.join(", ")]];
  $("#cardbody").innerHTML = "<table>" + rows.map(([k, v]) =>
    `<tr><td>${esc(k)}</td><td>${esc(v)}</td></tr>`).join("") + "</table>" +
    (c.unknown ? `<p>An image unlike every training image is answered "unknown" (the ` +
      `threshold flags ${pct(c.unknown_flag_rate)} of held-out training images).</p>` :
      `<p>It always answers one of these classes; it has no "none of these".</p>`) +
    (Object.keys(c.thresholds).length ? "<p>Operating points: " + Object.entries(c.thresholds)
      .map(([k, t]) => esc(`${k} ${t.kind} ${t.target}`)).join(", ") +
      '; what no class claims is "review".</p>' : "");
});
</script></body></html>
"""
