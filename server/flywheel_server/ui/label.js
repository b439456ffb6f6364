// The labeling page: one task at a time, ranked by keyboard or by dragging.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { config: null, task: null, tiers: [], tie: false, key: "", today: 0, busy: false };

const labelerField = () => (state.config.auth ? "" : Flywheel.credential());

function show(message) { $("status").textContent = message; }

async function start() {
  state.config = await Flywheel.call("GET", "../ui/config.json").catch(() => ({ auth: true }));
  $("guidelines").innerHTML = state.config.guidelines
    ? Flywheel.markdown(state.config.guidelines) : "<p>No guidelines were set.</p>";
  if (!Flywheel.credential()) { $("signin").hidden = false; return; }
  $("who").textContent = state.config.auth ? "signed in with a key" : Flywheel.credential();
  $("work").hidden = false;
  await next();
}

async function next(body = {}, path = "tasks/next") {
  state.busy = true;
  try {
    const answer = await Flywheel.call("POST", path, { labeler: labelerField(), ...body });
    load(answer.task);
  } catch (e) {
    show(`Error: ${e.message}`);
  } finally {
    state.busy = false;
  }
}

function load(task) {
  state.task = task;
  state.tiers = [];
  state.tie = false;
  state.key = task ? `task:${task.task_id}:${crypto.randomUUID()}` : "";
  $("better").value = "";
  if (!task) {
    $("prompt").textContent = "";
    $("candidates").innerHTML = "";
    show("Nothing to label right now; new tasks arrive with traffic. Checking again shortly.");
    setTimeout(() => { if (!state.task) next(); }, 10000);
    renderRanking();
    return;
  }
  state.today = task.ranked_today;
  $("today").textContent = `${state.today} today`;
  show("");
  $("source").textContent = `(${task.source}${task.shared ? ", shared" : ""})`;
  $("prompt").textContent = task.prompt;
  $("candidates").innerHTML = "";
  task.candidates.forEach((c, i) => {
    const li = document.createElement("li");
    li.className = "candidate";
    li.draggable = true;
    li.dataset.index = i;
    li.innerHTML = `<span class="number">${i + 1}</span><pre></pre>`;
    li.querySelector("pre").textContent = c.text || "(empty)";
    li.addEventListener("dragstart", (e) => e.dataTransfer.setData("text/plain", String(i)));
    li.addEventListener("click", () => pick(i));
    $("candidates").appendChild(li);
  });
  renderRanking();
}

const picked = () => state.tiers.flat();

function pick(index, tieWith = null) {
  if (!state.task || index >= state.task.candidates.length || picked().includes(index)) return;
  if (tieWith !== null) state.tiers[tieWith].push(index);
  else if (state.tie && state.tiers.length) state.tiers[state.tiers.length - 1].push(index);
  else state.tiers.push([index]);
  state.tie = false;
  renderRanking();
}

function undo() {
  const last = state.tiers[state.tiers.length - 1];
  if (!last) return;
  last.pop();
  if (!last.length) state.tiers.pop();
  state.tie = false;
  renderRanking();
}

function renderRanking() {
  const list = $("ranking");
  list.innerHTML = "";
  state.tiers.forEach((tier, t) => {
    const li = document.createElement("li");
    li.className = "tier";
    li.dataset.tier = t;
    li.textContent = tier.map((i) => `#${i + 1}`).join(" = ");
    li.addEventListener("dragover", (e) => e.preventDefault());
    li.addEventListener("drop", (e) => {
      e.preventDefault();
      e.stopPropagation();
      pick(Number(e.dataTransfer.getData("text/plain")), t);
    });
    list.appendChild(li);
  });
  for (const li of document.querySelectorAll(".candidate")) {
    li.classList.toggle("picked", picked().includes(Number(li.dataset.index)));
  }
  $("ranking").classList.toggle("tie-next", state.tie);
}

async function submit() {
  const task = state.task;
  if (!task || state.busy) return;
  const rest = task.candidates.map((_, i) => i).filter((i) => !picked().includes(i));
  const tiers = rest.length ? [...state.tiers, rest] : state.tiers;
  if (tiers.length < 2) { show("Order at least two candidates (or press x: all bad)."); return; }
  const ranking = tiers.map((tier) => tier.map((i) => task.candidates[i].completion_id));
  state.busy = true;
  try {
    await Flywheel.call("POST", "feedback",
      { ranking, labeler: labelerField(), idempotency_key: state.key });
    const better = $("better").value.trim();
    if (better) {
      const prompt = task.kind === "chat"
        ? { messages: [{ role: "user", content: task.prompt }] } : { prompt: task.prompt };
      await Flywheel.call("POST", "demonstrations", {
        ...prompt, response: better, labeler: labelerField(), idempotency_key: `${state.key}:demo`,
      });
    }
  } catch (e) {
    show(`Not stored: ${e.message}. Press Enter to retry.`);
    state.busy = false;
    return;
  }
  state.busy = false;
  await next();
}

async function pass(allBad) {
  if (!state.task || state.busy) return;
  try {
    await Flywheel.call("POST", "tasks/skip",
      { task_id: state.task.task_id, all_bad: allBad, labeler: labelerField() });
  } catch (e) {
    show(`Error: ${e.message}`);
    return;
  }
  await next();
}

document.addEventListener("keydown", (e) => {
  if ($("work").hidden || e.target.matches("input, textarea") || e.ctrlKey || e.metaKey) return;
  if (/^[1-9]$/.test(e.key)) pick(Number(e.key) - 1);
  else if (e.key === "=") { state.tie = state.tiers.length > 0; renderRanking(); }
  else if (e.key === "u") undo();
  else if (e.key === "Enter") submit();
  else if (e.key === "s") pass(false);
  else if (e.key === "x") pass(true);
  else return;
  e.preventDefault();
});

$("ranking").addEventListener("dragover", (e) => e.preventDefault());
$("ranking").addEventListener("drop", (e) => {
  e.preventDefault();
  pick(Number(e.dataTransfer.getData("text/plain")));
});
$("submit").addEventListener("click", submit);
$("undo").addEventListener("click", undo);
$("skip").addEventListener("click", () => pass(false));
$("allbad").addEventListener("click", () => pass(true));
$("signin").addEventListener("submit", (e) => {
  e.preventDefault();
  Flywheel.setCredential($("credential").value.trim());
  $("signin").hidden = true;
  start();
});
$("own").addEventListener("submit", (e) => {
  e.preventDefault();
  const prompt = $("own-prompt").value.trim();
  if (prompt) next({ prompt }, "tasks/typed").then(() => { $("own-prompt").value = ""; });
});

start();
