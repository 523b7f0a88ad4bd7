// orsgen review page. Every text from the dataset is set with textContent
// (never innerHTML), so an expression holding markup shows as text.
"use strict";

const state = { samples: [], reasons: [], token: "", pos: 0, overlay: true, rejecting: false, busy: false, progress: null };
const $ = (id) => document.getElementById(id);

function setText(id, text) { $(id).textContent = text == null ? "" : String(text); }

function message(text, isError) {
  const m = $("message");
  m.textContent = text;
  m.className = isError ? "error" : "";
}

async function getJson(url) {
  const r = await fetch(url, { cache: "no-store" });
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

function showProgress(p) {
  state.progress = p;
  $("bar").max = Math.max(1, p.total);
  $("bar").value = p.decided;
  setText("progress", `${p.decided} / ${p.total} decided · ${p.accept} accepted · ${p.reject} rejected · ${p.skip} skipped`);
}

function show(pos) {
  if (!state.samples.length) return;
  state.pos = Math.max(0, Math.min(pos, state.samples.length - 1));
  const s = state.samples[state.pos];
  $("image").src = `/api/image/${s.i}?overlay=${state.overlay ? 1 : 0}`;
  setText("position", `sample ${state.pos + 1} of ${state.samples.length}`);
  setText("kind", s.kind);
  setText("ntargets", s.n_targets === 1 ? "1 target" : `${s.n_targets} targets`);
  setText("expression", s.expression);
  setText("split", s.split);
  setText("sample-id", s.sample_id);
  setText("key", s.key);
  setText("template", s.template || "-");
  setText("generator", s.generator || "-");
  const ol = $("targets");
  ol.replaceChildren();
  for (const t of s.targets) {
    const li = document.createElement("li");
    li.textContent = `${t.category || "region"} · box ${t.bbox_xyxy.join(", ")} · ${t.instance_id}`;
    ol.appendChild(li);
  }
  const v = $("verdict");
  const d = s.decision;
  v.className = "verdict" + (d ? " " + d.verdict : "");
  v.textContent = d ? `${d.verdict}${d.reason ? ": " + d.reason : ""} (by ${d.reviewer})` : "not decided yet";
  document.body.dataset.sampleId = s.sample_id;
  closeReject();
}

function nextUndecided(from) {
  const n = state.samples.length;
  for (let k = 1; k <= n; k++) {
    const j = (from + k) % n;
    if (!state.samples[j].decision) return j;
  }
  return Math.min(from + 1, n - 1);
}

async function decide(verdict, reason) {
  if (state.busy) return;
  const s = state.samples[state.pos];
  state.busy = true;
  document.body.dataset.busy = "1";
  try {
    const r = await fetch("/api/decision", {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-Orsgen-Token": state.token },
      body: JSON.stringify({ i: s.i, sample_id: s.sample_id, verdict: verdict, reason: reason || "" }),
    });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error || r.statusText);
    s.decision = body.decision;
    showProgress(body.progress);
    message(`saved: ${verdict}${reason ? " (" + reason + ")" : ""}`, false);
    show(nextUndecided(state.pos));
  } catch (err) {
    message(`not saved: ${err.message}`, true);
  } finally {
    state.busy = false;
    document.body.dataset.busy = "0";
    document.body.dataset.saved = String(state.progress ? state.progress.decided : 0);
  }
}

function openReject() {
  state.rejecting = true;
  $("reject-panel").hidden = false;
  $("reason-text").value = "";
}

function closeReject() {
  state.rejecting = false;
  $("reject-panel").hidden = true;
  if (document.activeElement === $("reason-text")) $("reason-text").blur();
}

function onKey(ev) {
  if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const typing = document.activeElement === $("reason-text");
  if (state.rejecting) {
    if (ev.key === "Escape") { closeReject(); ev.preventDefault(); return; }
    if (typing) {
      if (ev.key === "Enter") {
        const text = $("reason-text").value.trim();
        if (text) decide("reject", text); else message("type a reason, or press a number", true);
        ev.preventDefault();
      }
      return;
    }
    const k = Number.parseInt(ev.key, 10);
    if (k >= 1 && k <= state.reasons.length) { decide("reject", state.reasons[k - 1].code); ev.preventDefault(); return; }
    if (ev.key === "t" || ev.key === "0") { $("reason-text").focus(); ev.preventDefault(); }
    return;
  }
  if (typing) return;
  switch (ev.key) {
    case "a": decide("accept", ""); break;
    case "r": openReject(); break;
    case "s": decide("skip", ""); break;
    case "ArrowRight": case "j": show(state.pos + 1); break;
    case "ArrowLeft": case "k": show(state.pos - 1); break;
    case "n": show(nextUndecided(state.pos)); break;
    case "o": state.overlay = !state.overlay; show(state.pos); break;
    default: return;
  }
  ev.preventDefault();
}

async function main() {
  try {
    const st = await getJson("/api/state");
    state.token = st.token;
    state.reasons = st.reasons;
    setText("where", `${st.root} [${st.splits.join(", ")}] · reviewer ${st.reviewer}`);
    const ol = $("reasons");
    st.reasons.forEach((r, k) => {
      const li = document.createElement("li");
      const b = document.createElement("b");
      b.textContent = r.code;
      li.append(`${k + 1}: `, b, ` (${r.label})`);
      ol.appendChild(li);
    });
    const all = await getJson("/api/samples");
    state.samples = all.samples;
    showProgress(st.progress);
    const first = state.samples.findIndex((s) => !s.decision);
    show(first < 0 ? 0 : first);
    document.addEventListener("keydown", onKey);
    document.body.dataset.ready = "1";
  } catch (err) {
    message(`could not load the review: ${err.message}`, true);
  }
}

main();
