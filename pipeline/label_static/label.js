// The A/B labelling page. Model text is only ever set with textContent, never innerHTML, so a
// response containing markup (or <script>) is shown as text and never runs.
"use strict";

const $ = (id) => document.getElementById(id);
let current = null;   // the comparison on screen: {id, prompt, A, B}
let busy = false;     // one choice in flight at a time, so a double key press cannot label twice

const KEYS = { "1": "A", "a": "A", "ArrowLeft": "A", "2": "B", "b": "B", "ArrowRight": "B",
               "t": "tie", "3": "tie", "x": "both_bad", "0": "both_bad" };

function show(state) {
  $("progress").textContent = `${state.labelled} / ${state.total} labelled`;
  current = state.comparison;
  if (!current) {
    $("task").hidden = true;
    $("done").hidden = false;
    document.body.dataset.comparisonId = "";
    return;
  }
  const prompt = $("prompt");
  prompt.replaceChildren();
  for (const m of current.prompt) {
    const turn = document.createElement("div");
    turn.className = "turn turn-" + m.role;
    const role = document.createElement("span");
    role.className = "role";
    role.textContent = m.role + ":";
    turn.append(role, document.createTextNode(m.content));
    prompt.append(turn);
  }
  $("text-A").textContent = current.A;
  $("text-B").textContent = current.B;
  $("note").value = "";
  $("task").hidden = false;
  $("done").hidden = true;
  document.body.dataset.comparisonId = current.id;
  document.body.dataset.position = String(state.position);
}

function setStatus(msg) { $("status").textContent = msg; }

async function call(method, url, body) {
  const init = { method, headers: {} };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const resp = await fetch(url, init);
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) {
    const err = new Error(data.error || `HTTP ${resp.status}`);
    err.status = resp.status;
    throw err;
  }
  return data;
}

async function choose(label) {
  if (busy || !current) return;
  busy = true;
  document.querySelectorAll("#controls button").forEach((b) => (b.disabled = true));
  try {
    const state = await call("POST", "/api/label", { id: current.id, label, note: $("note").value });
    setStatus("");
    show(state);
  } catch (err) {
    if (err.status === 409) {  // labelled meanwhile, e.g. in another tab: move on to the next one
      try {
        show(await call("GET", "/api/next"));
        setStatus("That comparison was already labelled; here is the next one.");
      } catch (again) {
        setStatus("Cannot reach the labelling server: " + again.message);
      }
    } else {
      setStatus("Not saved: " + err.message);
    }
  } finally {
    busy = false;
    document.querySelectorAll("#controls button").forEach((b) => (b.disabled = false));
  }
}

document.addEventListener("keydown", (ev) => {
  if (ev.target === $("note")) {
    if (ev.key === "Escape") $("note").blur();
    return;   // typing a note must not trigger choices
  }
  if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
  if (ev.key === "n" || ev.key === "N") { ev.preventDefault(); $("note").focus(); return; }
  const label = KEYS[ev.key.length === 1 ? ev.key.toLowerCase() : ev.key];  // Caps Lock too
  if (label) { ev.preventDefault(); choose(label); }
});

document.querySelectorAll("#controls button").forEach((b) =>
  b.addEventListener("click", () => choose(b.dataset.label)));

call("GET", "/api/next").then(show).catch((err) => setStatus("Cannot reach the labelling server: " + err.message));
