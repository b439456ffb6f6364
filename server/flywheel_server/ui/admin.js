// The dashboard: figures from GET /v1/stats/..., plotted on the page; promote and roll back.
"use strict";

const $ = (id) => document.getElementById(id);
const fmt = (x, digits = 3) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));
const SVG = "http://www.w3.org/2000/svg";

function svgEl(name, attrs, text) {
  const el = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

// Series of {x, y, low?, high?, label?} on shared axes; x may be a time (seconds) or an index.
function plot(svg, series, { width = 560, height = 200, time = false } = {}) {
  svg.innerHTML = "";
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const points = series.flatMap((s) => s.points);
  if (!points.length) { svg.appendChild(svgEl("text", { x: 10, y: 20 }, "nothing yet")); return; }
  const pad = { l: 48, r: 12, t: 10, b: 26 };
  const xs = points.map((p) => p.x), ys = points.flatMap((p) => [p.y, p.low ?? p.y, p.high ?? p.y]);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs) || 1];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (y0 === y1) { y0 -= 1; y1 += 1; }
  const X = (x) => pad.l + (x1 === x0 ? 0.5 : (x - x0) / (x1 - x0)) * (width - pad.l - pad.r);
  const Y = (y) => height - pad.b - ((y - y0) / (y1 - y0)) * (height - pad.t - pad.b);
  svg.appendChild(svgEl("line", { x1: pad.l, y1: Y(y0), x2: width - pad.r, y2: Y(y0), class: "axis" }));
  svg.appendChild(svgEl("line", { x1: pad.l, y1: pad.t, x2: pad.l, y2: height - pad.b, class: "axis" }));
  for (const y of [y0, (y0 + y1) / 2, y1]) {
    svg.appendChild(svgEl("text", { x: 4, y: Y(y) + 4, class: "tick" }, fmt(y, 2)));
  }
  const label = (x) => (time ? new Date(x * 1000).toISOString().slice(11, 16) : String(x));
  svg.appendChild(svgEl("text", { x: pad.l, y: height - 6, class: "tick" }, label(x0)));
  svg.appendChild(svgEl("text", { x: width - pad.r - 40, y: height - 6, class: "tick" }, label(x1)));
  series.forEach((s, i) => {
    const path = s.points.map((p, j) => `${j ? "L" : "M"}${X(p.x)},${Y(p.y)}`).join(" ");
    if (s.line !== false) svg.appendChild(svgEl("path", { d: path, class: `series s${i}` }));
    for (const p of s.points) {
      if (p.low !== undefined && p.low !== null) {
        svg.appendChild(svgEl("line", { x1: X(p.x), y1: Y(p.low), x2: X(p.x), y2: Y(p.high), class: `series s${i}` }));
      }
      const dot = svgEl("circle", { cx: X(p.x), cy: Y(p.y), r: 3.5, class: `dot s${i} ${p.state || ""}` });
      dot.appendChild(svgEl("title", {}, p.label || fmt(p.y)));
      svg.appendChild(dot);
      if (p.text) svg.appendChild(svgEl("text", { x: X(p.x) + 5, y: Y(p.y) - 5, class: "tick" }, p.text));
    }
    svg.appendChild(svgEl("text", { x: width - pad.r - 150, y: pad.t + 12 + 14 * i, class: `legend s${i}` }, s.name));
  });
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) {
    const td = document.createElement("td");
    if (c instanceof Node) td.appendChild(c); else td.textContent = c;
    tr.appendChild(td);
  }
  return tr;
}

// The gate's checks, as the learner publishes them (metric, threshold, which side passes).
const CHECKS = [
  ["reward_gain", "gate_min_reward_gain", 1, "reward gain"],
  ["greedy_reward_gain", "gate_min_greedy_reward_gain", 1, "greedy reward gain"],
  ["kl_to_reference", "gate_max_kl", -1, "KL"],
  ["ptx_rise", "gate_max_ptx_rise", -1, "pretraining loss rise"],
  ["judge_gain", "gate_min_judge_gain", 1, "judge gain"],
];

// Why the gate refused a version: each check its published metrics fail.
function why(m) {
  const out = [];
  for (const [key, limit, side, name] of CHECKS) {
    if (m[limit] === undefined || m[limit] === null) continue;
    const value = m[key];
    if (value === undefined || value === null) {
      if (key === "judge_gain") out.push("no validated judge scored it");
      continue;
    }
    if (!(side * (value - m[limit]) >= 0)) {
      out.push(`${name} ${fmt(value)} ${side > 0 ? "<" : ">"} ${fmt(m[limit])}`);
    }
  }
  const wins = m.human_greedy_wins, losses = m.human_greedy_losses;
  if (m.gate_min_human_verdicts !== undefined && wins + losses >= m.gate_min_human_verdicts && !(wins > losses)) {
    out.push(`labelers ranked its greedy answers above ${wins}, below ${losses} times`);
  }
  return out;
}

async function act(path, body, question) {
  if (!window.confirm(question)) return;
  try {
    await Flywheel.call("POST", path, body);
  } catch (e) {
    window.alert(`Refused: ${e.message}`);
  }
  await refresh();
}

async function refresh() {
  const [versions, labelers, agreement, ratings] = await Promise.all(
    ["versions", "labelers", "agreement", "ratings"].map((s) => Flywheel.call("GET", `stats/${s}`)));
  $("live").textContent = `live: ${versions.live.policy || "–"} · reward ${versions.live.reward || "–"}`;
  $("updated").textContent = `updated ${new Date().toISOString().slice(11, 19)} UTC`;

  const policies = versions.versions.filter((v) => v.name === "policy" && v.version > 0);
  const metric = (key) => policies.filter((v) => v.metrics[key] !== undefined && v.metrics[key] !== null)
    .map((v) => ({ x: v.created_at, y: v.metrics[key], state: v.state, label: `${v.id} (${v.state}): ${fmt(v.metrics[key])}` }));
  plot($("policy-plot"), [
    { name: "reward gain", points: metric("reward_gain") },
    { name: "KL to the reference", points: metric("kl_to_reference") },
    { name: "ptx loss", points: metric("ptx_loss") },
  ], { time: true });
  const body = $("versions").querySelector("tbody");
  body.innerHTML = "";
  for (const v of [...policies].reverse()) {
    let action = "";
    if (v.state === "ready") {
      action = document.createElement("button");
      action.textContent = "Promote";
      action.dataset.version = v.id;
      action.addEventListener("click", () => act("policies/promote", { name: "policy", version: v.version },
        `Make ${v.id} the live policy?`));
    }
    const gate = v.metrics.gate_passed === 0 ? ` (gate refused: ${why(v.metrics).join("; ") || "see the learner's log"})` : "";
    const tr = row([v.id, v.state + gate, fmt(v.metrics.reward_gain), fmt(v.metrics.kl_to_reference), fmt(v.metrics.ptx_loss),
      new Date(v.created_at * 1000).toISOString().slice(0, 16).replace("T", " "), action]);
    tr.dataset.version = v.id;
    tr.className = v.state;
    body.appendChild(tr);
  }

  const c = versions.challenge;
  $("challenge").textContent = c
    ? `${c.challenger} against ${c.champion}: wins ${fmt(c.win_rate)} ` +
      `(${fmt(c.lower)}–${fmt(c.upper)}) over ${c.rankings} rankings, ${c.outcome}`
    : "No challenge is running.";

  const rewards = versions.versions.filter((v) => v.name === "reward" && v.metrics.held_out_accuracy !== undefined);
  plot($("reward-plot"), [{ name: "held-out accuracy", points: rewards.map((v) => ({
    x: v.created_at, y: v.metrics.held_out_accuracy, state: v.state, label: `${v.id}: ${fmt(v.metrics.held_out_accuracy)}` })) }],
  { time: true });

  const lb = $("labelers").querySelector("tbody");
  lb.innerHTML = "";
  for (const l of labelers.labelers) {
    const last = l.per_day[l.per_day.length - 1];
    lb.appendChild(row([l.labeler, l.rankings, last ? last.rankings : 0]));
  }
  $("agreement").textContent = agreement.pairs
    ? `${fmt(agreement.rate * 100, 1)}% of ${agreement.pairs} candidate pairs ordered alike on ${agreement.shared_comparisons} shared tasks`
    : "No shared task has two rankings yet.";
  const withModel = await Flywheel.call("GET", "stats/reward-agreement").catch(() => null);
  const model = Object.fromEntries((withModel ? withModel.labelers : []).map((l) => [l.labeler, l]));
  const names = [...new Set([...agreement.labelers.map((l) => l.labeler), ...Object.keys(model)])].sort();
  const others = Object.fromEntries(agreement.labelers.map((l) => [l.labeler, l]));
  const pct = (l) => (l && l.pairs ? `${fmt(l.rate * 100, 1)}% of ${l.pairs}` : "–");
  const ab = $("agreement-table").querySelector("tbody");
  ab.innerHTML = "";
  for (const name of names) ab.appendChild(row([name, pct(others[name]), pct(model[name])]));

  plot($("rating-plot"), [{ name: "rating", line: false, points: ratings.ratings.map((r, i) => ({
    x: i + 1, y: r.rating, low: r.low, high: r.high, text: r.policy, label: `${r.policy}: ${fmt(r.rating, 0)} (${fmt(r.low, 0)}–${fmt(r.high, 0)}), ${r.games} games` })) }]);
  $("ratings-note").textContent = `${ratings.games} pairwise outcomes between versions in the newest ${ratings.window} rankings.`;
}

async function start() {
  if (!Flywheel.credential()) { $("signin").hidden = false; return; }
  $("board").hidden = false;
  try {
    await refresh();
  } catch (e) {
    $("updated").textContent = `Error: ${e.message}`;
    if (e.status === 401 || e.status === 403) { Flywheel.setCredential(""); $("board").hidden = true; $("signin").hidden = false; }
  }
  setInterval(() => refresh().catch(() => {}), 15000);
}

$("rollback").addEventListener("click", () => act("policies/rollback", { name: "policy" },
  "Roll the live policy back to the version that was live before it?"));
$("signin").addEventListener("submit", (e) => {
  e.preventDefault();
  Flywheel.setCredential($("credential").value.trim());
  $("signin").hidden = true;
  start();
});
start();
