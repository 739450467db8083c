// LLMOS Studio: a story editor whose generations form a tree of alternatives, with a
// probability view, sampler presets, Memory / Author's Note / Lorebook, task forms and chat.
// Projects are saved on the server (/api/projects); the writer's choices among candidates
// (thumbs, the candidate inserted, the branch gone on from) are stored as preference pairs
// (/api/preferences). No build step: plain modern JavaScript.
"use strict";

const $ = (sel) => document.querySelector(sel);
const PRESETS = {
  balanced: { temperature: 0.8, top_p: 0.95, top_k: 0, min_p: 0.0, repetition_penalty: 1.1, max_tokens: 80 },
  creative: { temperature: 1.1, top_p: 0.98, top_k: 0, min_p: 0.05, repetition_penalty: 1.05, max_tokens: 120 },
  precise: { temperature: 0.3, top_p: 0.9, top_k: 40, min_p: 0.0, repetition_penalty: 1.15, max_tokens: 60 },
};
const SAMPLER_FIELDS = ["temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens",
  "xtc_threshold", "xtc_probability", "banned_strings"];
// XTC and banned strings: made here, after the sampler inputs of index.html
const SAMPLER_EXTRAS = `
  <label title="Exclude top choices: on this share of tokens, drop the likeliest ones but the least likely of them (0 = off)">XTC probability <input id="xtc_probability" type="number" step="0.05" min="0" max="1" placeholder="0"></label>
  <label title="Tokens at least this likely count as top choices">XTC threshold <input id="xtc_threshold" type="number" step="0.01" min="0" max="0.5" placeholder="0.1"></label>
  <label title="Text never to write, one per line, any case: generation goes back and writes something else">Banned strings
    <textarea id="banned_strings" rows="3" placeholder="a testament to&#10;shivers down her spine"></textarea></label>`;

function addSamplerExtras() {
  if (!$("#xtc_probability")) $("#max_tokens").closest("label").insertAdjacentHTML("afterend", SAMPLER_EXTRAS);
}

let project = null; // {id, name, data}
let history = { undo: [], redo: [] };
let controller = null; // AbortController of the running generation
let saveTimer = null;
let editTimer = null;

// ---------------------------------------------------------------- project data

function emptyData() {
  return {
    nodes: { root: { id: "root", parent: null, text: "", kind: "root", created: Date.now() } },
    current: "root", memory: "", authors_note: "", an_depth: 3, lorebook: [],
    sampler: { ...PRESETS.balanced }, preset: "balanced", chat_session: null,
  };
}

function nodes() { return project.data.nodes; }
function node(id) { return nodes()[id]; }
function pathTo(id) {
  const out = [];
  for (let n = node(id); n; n = n.parent ? node(n.parent) : null) out.unshift(n);
  return out;
}
function textOf(id) { return pathTo(id).map((n) => n.text).join(""); }
function childrenOf(id) {
  return Object.values(nodes()).filter((n) => n.parent === id).sort((a, b) => a.created - b.created);
}
function newNode(parent, text, kind, tokens) {
  const id = "n" + Date.now().toString(36) + Math.random().toString(36).slice(2, 7);
  nodes()[id] = { id, parent, text, kind, tokens: tokens || null, created: Date.now() };
  return id;
}
function setCurrent(id, record = true) {
  if (id === project.data.current) return;
  if (record) { history.undo.push(project.data.current); history.redo = []; }
  project.data.current = id;
  render();
  scheduleSave();
}

// ---------------------------------------------------------------- server calls

function headers(extra = {}) {
  const key = localStorage.getItem("llmos-api-key");
  return { "Content-Type": "application/json", ...(key ? { Authorization: "Bearer " + key } : {}), ...extra };
}

async function api(path, options = {}) {
  const res = await fetch(path, { ...options, headers: headers(options.headers) });
  if (!res.ok) {
    let message = res.statusText;
    try { message = (await res.json()).error.message; } catch (e) { /* not JSON */ }
    throw new Error(`${res.status}: ${message}`);
  }
  return res;
}

async function* sse(path, body, signal) {
  const res = await api(path, { method: "POST", body: JSON.stringify(body), signal });
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const chunk = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of chunk.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

// ---------------------------------------------------------------- saving and loading

function scheduleSave() {
  $("#save-state").textContent = "unsaved changes";
  clearTimeout(saveTimer);
  saveTimer = setTimeout(save, 600);
}

async function save() {
  clearTimeout(saveTimer);
  project.name = $("#project-name").value || "Untitled story";
  const body = JSON.stringify({ name: project.name, data: project.data });
  try {
    let res;
    if (project.id == null) {
      res = await api("/api/projects", { method: "POST", body });
      project.id = (await res.json()).id;
      location.hash = "p=" + project.id;
      localStorage.setItem("llmos-last-project", project.id);
      await refreshProjectList();
    } else {
      await api(`/api/projects/${project.id}`, { method: "PUT", body });
    }
    $("#save-state").textContent = "saved";
  } catch (e) {
    $("#save-state").textContent = "not saved: " + e.message;
  }
}

async function refreshProjectList() {
  try {
    const { projects } = await (await api("/api/projects")).json();
    const select = $("#project-list");
    select.innerHTML = '<option value="">Open…</option>' + projects.map(
      (p) => `<option value="${p.id}">${escapeHtml(p.name)}</option>`).join("");
  } catch (e) { /* the key may be missing: shown when saving */ }
}

async function openProject(id) {
  const res = await api(`/api/projects/${id}`);
  const p = await res.json();
  project = { id: p.id, name: p.name, data: { ...emptyData(), ...p.data } };
  history = { undo: [], redo: [] };
  location.hash = "p=" + p.id;
  localStorage.setItem("llmos-last-project", p.id);
  loadPanels();
  render();
  $("#save-state").textContent = "saved";
  chat = null;
  if (project.data.chat_session) {
    try { await openSession(project.data.chat_session); } catch (e) { project.data.chat_session = null; }
  }
  renderChat();
}

function newProject() {
  project = { id: null, name: "Untitled story", data: emptyData() };
  history = { undo: [], redo: [] };
  location.hash = "";
  loadPanels();
  render();
  chat = null;
  renderChat();
}

// ---------------------------------------------------------------- rendering

function escapeHtml(s) {
  return String(s).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]));
}

function render() {
  const editor = $("#editor");
  const text = textOf(project.data.current);
  if (editor.value !== text) editor.value = text;
  $("#project-name").value = project.name;
  renderAlternatives();
  renderTree();
  renderProbabilities();
  $("#undo").disabled = history.undo.length === 0;
  $("#redo").disabled = history.redo.length === 0 && childrenOf(project.data.current).length === 0;
  $("#retry").disabled = !["gen"].includes(node(project.data.current).kind);
}

function renderAlternatives() {
  const cur = node(project.data.current);
  const list = $("#alternatives");
  list.innerHTML = "";
  if (!cur.parent) return;
  for (const sib of childrenOf(cur.parent)) {
    const li = document.createElement("li");
    li.textContent = (sib.text.trim().slice(0, 90) || "(empty)") + (sib.kind === "edit" ? "  [edited]" : "");
    li.dataset.id = sib.id;
    if (sib.id === cur.id) li.classList.add("current");
    li.onclick = () => setCurrent(sib.id);
    list.appendChild(li);
  }
}

function renderTree() {
  const onPath = new Set(pathTo(project.data.current).map((n) => n.id));
  const tree = $("#tree");
  tree.innerHTML = "";
  const walk = (id, depth) => {
    for (const child of childrenOf(id)) {
      const li = document.createElement("li");
      li.style.paddingLeft = depth * 1.1 + "rem";
      li.textContent = "• " + (child.text.trim().slice(0, 60) || "(empty)");
      li.dataset.id = child.id;
      if (onPath.has(child.id)) li.classList.add("on-path");
      li.onclick = () => setCurrent(child.id);
      tree.appendChild(li);
      walk(child.id, depth + 1);
    }
  };
  walk("root", 0);
}

function probabilityColor(logprob) {
  const p = Math.exp(logprob);
  const alpha = Math.min(0.85, (1 - p) * 0.9);
  return `rgba(230, 90, 60, ${alpha.toFixed(2)})`;
}

function renderProbabilities() {
  const view = $("#probability");
  const on = $("#show-probs").checked;
  view.classList.toggle("hidden", !on);
  if (!on) return;
  const cur = node(project.data.current);
  view.innerHTML = "";
  const before = cur.parent ? textOf(cur.parent) : "";
  const lead = document.createElement("span");
  lead.className = "muted";
  lead.textContent = before.slice(-300);
  view.appendChild(lead);
  if (!cur.tokens || !cur.tokens.length) {
    view.appendChild(document.createTextNode(cur.text));
    return;
  }
  cur.tokens.forEach((t, i) => {
    const span = document.createElement("span");
    span.className = "tok";
    span.textContent = t.text;
    span.dataset.index = i;
    span.style.background = probabilityColor(t.logprob);
    span.title = `p = ${(Math.exp(t.logprob) * 100).toFixed(1)}%`;
    span.onclick = (ev) => showAlternatives(ev, cur.id, i);
    view.appendChild(span);
  });
}

function showAlternatives(ev, nodeId, index) {
  const popup = $("#token-popup");
  const t = node(nodeId).tokens[index];
  popup.innerHTML = "";
  for (const [text, lp] of t.top || []) {
    const b = document.createElement("button");
    b.innerHTML = `<span>${escapeHtml(JSON.stringify(text))}</span><span class="muted">${(Math.exp(lp) * 100).toFixed(1)}%</span>`;
    b.onclick = () => { popup.classList.add("hidden"); continueFromAlternative(nodeId, index, text, lp); };
    popup.appendChild(b);
  }
  const n = node(nodeId);
  const ids = n.tokens.slice(0, index + 1).map((x) => x.id);
  if (n.prompt && ids.every((x) => Number.isInteger(x))) {
    const why = document.createElement("button");
    why.textContent = "Why this token?";
    why.onclick = () => explainToken(why, n.prompt, ids, index);
    popup.appendChild(why);
  }
  popup.style.left = ev.pageX + "px";
  popup.style.top = ev.pageY + 12 + "px";
  popup.classList.remove("hidden");
}

// Which parts of the prompt a token leaned on (gradient x input: an approximation, see docs).
async function explainToken(button, prompt, ids, index) {
  button.disabled = true;
  button.textContent = "explaining…";
  const box = document.createElement("div");
  box.className = "why";
  try {
    const res = await api("/api/explain", { method: "POST",
      body: JSON.stringify({ prompt, completion: ids, indices: [index], unit: "word", top: 5 }) });
    const att = (await res.json()).attributions[0];
    box.innerHTML = `<div class="muted">p = ${(att.probability * 100).toFixed(1)}%; ` +
      `${(att.prompt_share * 100).toFixed(0)}% of its attribution on the prompt, most on:</div>`;
    for (const s of att.sources) {
      const row = document.createElement("div");
      const mark = document.createElement("mark");
      mark.style.setProperty("--w", Math.min(0.9, 0.15 + s.weight).toFixed(2));
      mark.textContent = s.text;
      row.appendChild(mark);
      row.appendChild(document.createTextNode(` ${(s.weight * 100).toFixed(0)}%`));
      box.appendChild(row);
    }
    button.replaceWith(box);
  } catch (e) {
    button.textContent = "error: " + e.message;
  }
}

// ---------------------------------------------------------------- editing

function applyEdit() {
  const newText = $("#editor").value;
  const cur = project.data.current;
  const old = textOf(cur);
  if (newText === old) return;
  let common = 0;
  while (common < old.length && common < newText.length && old[common] === newText[common]) common++;
  // the deepest node on the path that lies wholly before the change
  let anchor = "root";
  let end = 0;
  for (const n of pathTo(cur)) {
    if (n.id === "root") continue;
    if (end + n.text.length <= common) { anchor = n.id; end += n.text.length; } else break;
  }
  const c = node(cur);
  if (c.kind === "edit" && c.parent === anchor) {
    c.text = newText.slice(end); // keep typing into the same edit
    c.tokens = null;
    render();
    scheduleSave();
    return;
  }
  const id = newNode(anchor, newText.slice(end), "edit");
  setCurrent(id);
}

// ---------------------------------------------------------------- generation

function storyBody(text) {
  const s = project.data.sampler;
  return {
    text, memory: project.data.memory, authors_note: project.data.authors_note,
    authors_note_depth: Number(project.data.an_depth) || 0,
    // every field of an entry (an imported World Info entry keeps its logic, position, depth...)
    lorebook: project.data.lorebook.filter((e) => e.content.trim()).map((e) => ({
      ...e, keys: e.keys.split(",").map((k) => k.trim()).filter(Boolean) })),
    max_tokens: Number(s.max_tokens) || 80, temperature: Number(s.temperature), top_p: Number(s.top_p),
    top_k: Number(s.top_k) || 0, min_p: Number(s.min_p) || 0, repetition_penalty: Number(s.repetition_penalty) || 1,
    xtc_probability: Number(s.xtc_probability) || 0, xtc_threshold: s.xtc_threshold === "" || s.xtc_threshold == null ? 0.1 : Number(s.xtc_threshold),
    banned_strings: (s.banned_strings || "").split("\n").map((b) => b.trim()).filter(Boolean),
    logprobs: 5,
  };
}

async function generateFrom(parentId, prefixTokens = null) {
  if (controller) return;
  clearTimeout(editTimer);
  applyEdit();
  const branchNote = recordBranch(parentId);
  const base = parentId;
  const tokens = prefixTokens ? [...prefixTokens] : [];
  const id = newNode(base, tokens.map((t) => t.text).join(""), "gen", tokens);
  setCurrent(id);
  controller = new AbortController();
  $("#generate").disabled = true;
  $("#stop").disabled = false;
  $("#status").textContent = "writing…";
  const n = node(id);
  let filtered = false;
  try {
    for await (const ev of sse("/api/story/continue", storyBody(textOf(id)), controller.signal)) {
      if (ev.context) { renderContext(ev.context); n.prompt = ev.prompt; n.model = ev.model; continue; }
      if (ev.finish_reason) { if (ev.finish_reason === "content_filter") filtered = true; continue; }
      n.text += ev.text;
      if (ev.logprob !== undefined) n.tokens.push({ text: ev.text, id: ev.token, logprob: ev.logprob, top: ev.top });
      else if (n.tokens.length) n.tokens[n.tokens.length - 1].text += ev.text;
      render();
    }
    $("#status").textContent = filtered ? "stopped by the safety policy (llmos serve --safety)" : await branchNote;
  } catch (e) {
    $("#status").textContent = e.name === "AbortError" ? "stopped" : "error: " + e.message;
  } finally {
    controller = null;
    $("#generate").disabled = false;
    $("#stop").disabled = true;
    render();
    scheduleSave();
  }
}

function continueFromAlternative(nodeId, index, text, logprob) {
  const n = node(nodeId);
  const kept = n.tokens.slice(0, index).concat([{ text, logprob, top: n.tokens[index].top }]);
  generateFrom(n.parent, kept);
}

// Going on from a generated part whose siblings were generated too: that part over them.
const branchesStored = new Set(); // parent|kept|siblings sent this visit (the server skips repeats too)

async function recordBranch(id) {
  const n = node(id);
  if (!n || n.kind !== "gen" || !n.parent || !n.text.trim()) return "";
  const ids = [n.id];
  const texts = [n.text];
  for (const s of childrenOf(n.parent)) {
    if (s.kind === "gen" && s.text.trim() && !texts.some((t) => t.trim() === s.text.trim())) {
      ids.push(s.id);
      texts.push(s.text);
    }
  }
  const key = [n.parent, ...ids].join("|");
  if (texts.length < 2 || branchesStored.has(key)) return "";
  try {
    await savePreference({ prompt: textOf(n.parent), candidates: texts, kept: 0, source: "studio-branch",
                           model: n.model || null, meta: { project: project.id } });
    branchesStored.add(key);
    return "preference saved";
  } catch (e) { return "preference not saved: " + e.message; }
}

function renderContext(parts) {
  const box = $("#context");
  box.innerHTML = "";
  for (const p of parts) {
    const div = document.createElement("div");
    div.className = "part";
    div.innerHTML = `<strong>${escapeHtml(p.kind)}</strong> · ${p.tokens} tokens · <em>${escapeHtml(p.reason)}</em>\n${escapeHtml(p.text.slice(-400))}`;
    box.appendChild(div);
  }
}

// ---------------------------------------------------------------- panels

function loadPanels() {
  const d = project.data;
  addSamplerExtras();
  for (const f of SAMPLER_FIELDS) $("#" + f).value = d.sampler[f] ?? "";
  $("#preset").value = d.preset || "balanced";
  $("#memory").value = d.memory;
  $("#authors-note").value = d.authors_note;
  $("#an-depth").value = d.an_depth;
  if (d.persona) $("#persona").value = d.persona;
  renderLorebook();
  renderChat();
}

function renderLorebook() {
  const box = $("#lorebook");
  box.innerHTML = "";
  project.data.lorebook.forEach((e, i) => {
    const div = document.createElement("div");
    div.className = "lore-entry";
    div.innerHTML = `<input placeholder="keywords, comma separated" value="${escapeHtml(e.keys)}">
      <textarea rows="2" placeholder="What the model should know">${escapeHtml(e.content)}</textarea>
      <button>Remove</button>`;
    const [keys, content, remove] = div.children;
    keys.oninput = () => { e.keys = keys.value; scheduleSave(); };
    content.oninput = () => { e.content = content.value; scheduleSave(); };
    remove.onclick = () => { project.data.lorebook.splice(i, 1); renderLorebook(); scheduleSave(); };
    box.appendChild(div);
  });
}

// ---------------------------------------------------------------- tasks tab

async function loadTasks() {
  try {
    const { tasks, forms } = await (await api("/api/tasks")).json();
    $("#task").innerHTML = Object.keys(tasks).map((t) => `<option>${t}</option>`).join("");
    $("#form").innerHTML = '<option value="">(none)</option>' +
      Object.entries(forms).map(([k, f]) => `<option value="${escapeHtml(k)}">${escapeHtml(k)} (${escapeHtml(f.description)})</option>`).join("");
    const describe = () => { $("#task-description").textContent = tasks[$("#task").value]?.description || ""; };
    $("#task").onchange = describe;
    $("#task").value = "poem";
    describe();
  } catch (e) { $("#task-status").textContent = e.message; }
}

async function runTask() {
  const variables = {};
  if ($("#acrostic").value.trim()) variables.acrostic = $("#acrostic").value.trim();
  if ($("#task-rhyme").checked) variables.rhyme = "true";
  const body = { task: $("#task").value, brief: $("#brief").value, n: Number($("#task-n").value) || 1,
                 variables, form: $("#form").value || null, rank: $("#task-rank").checked,
                 check_copying: $("#task-copying").checked };
  $("#task-status").textContent = "writing…";
  $("#task-results").innerHTML = "";
  try {
    const res = await api("/api/write", { method: "POST", body: JSON.stringify(body) });
    const note = res.headers.get("x-llmos-note");
    const out = await res.json();
    const order = out.ranking ? out.ranking.map((r) => r.index) : out.candidates.map((c) => c.index);
    const scores = Object.fromEntries((out.ranking || []).map((r) => [r.index, r.score]));
    const choice = { prompt: out.prompt, model: out.model, task: body.task,
                     texts: out.candidates.map((c) => c.text), ratings: out.candidates.map(() => null) };
    const choosing = out.prompt != null && choice.texts.filter((t) => t.trim()).length >= 2;
    for (const c of order.map((i) => out.candidates[i])) {
      const div = document.createElement("div");
      div.className = "result";
      div.textContent = c.text;
      if (c.form_problems) {
        const kept = document.createElement("div");
        kept.className = "muted";
        kept.textContent = c.form_problems.length ? "form: " + c.form_problems.join("; ") : "form kept";
        div.appendChild(kept);
      }
      for (const badge of trustBadges(c)) div.appendChild(badge);
      if (c.index in scores) {
        const score = document.createElement("div");
        score.className = "muted score";
        score.textContent = `rank score ${scores[c.index].toFixed(2)}`;
        div.appendChild(score);
      }
      if (choosing && c.text.trim()) div.appendChild(thumbButtons(choice, c.index));
      const insert = document.createElement("button");
      insert.textContent = "Insert into story";
      insert.onclick = () => {
        const id = newNode(project.data.current, "\n\n" + c.text, "edit");
        setCurrent(id);
        switchTab("story");
        if (choosing && c.text.trim()) recordChoice(choice, { kept: c.index, source: "studio-pick" });
      };
      div.appendChild(insert);
      $("#task-results").appendChild(div);
    }
    $("#task-status").textContent = note || "";
  } catch (e) { $("#task-status").textContent = e.message; }
}

// ---------------------------------------------------------------- preferences
// A choice among candidates for one prompt becomes preference pairs on the server
// (`llmos prefs`, for `llmos finetune --dpo`): candidates marked good and bad, the one inserted.

async function savePreference(body) {
  return (await api("/api/preferences", { method: "POST", body: JSON.stringify(body) })).json();
}

function thumbButtons(choice, index) {
  const box = document.createElement("span");
  box.className = "thumbs";
  for (const [value, label, mark] of [[1, "Good", "👍"], [-1, "Bad", "👎"]]) {
    const b = document.createElement("button");
    b.className = "thumb " + (value > 0 ? "up" : "down");
    b.textContent = mark;
    b.title = label;
    b.setAttribute("aria-label", label);
    b.setAttribute("aria-pressed", "false");
    b.onclick = () => {
      choice.ratings[index] = choice.ratings[index] === value ? null : value;
      box.querySelector(".up").setAttribute("aria-pressed", String(choice.ratings[index] === 1));
      box.querySelector(".down").setAttribute("aria-pressed", String(choice.ratings[index] === -1));
      if (choice.ratings.includes(1) && choice.ratings.includes(-1)) {
        recordChoice(choice, { ratings: choice.ratings, source: "studio-thumbs" });
      }
    };
    box.appendChild(b);
  }
  return box;
}

// Blank candidates are left out (they are no answer); kept and ratings follow the others.
async function recordChoice(choice, { kept = null, ratings = null, source }) {
  const keep = choice.texts.map((t, i) => i).filter((i) => choice.texts[i].trim());
  const body = { prompt: choice.prompt, candidates: keep.map((i) => choice.texts[i]), source, model: choice.model,
                 kept: kept == null ? null : keep.indexOf(kept), ratings: ratings && keep.map((i) => ratings[i]),
                 meta: { task: choice.task } };
  const status = $("#task-status");
  try {
    const out = await savePreference(body);
    status.textContent = out.pairs ? "preference saved" : "nothing to save: the candidates are the same text";
  } catch (e) { status.textContent = "preference not saved: " + e.message; }
}

// What the safety policy and the copying check found in a candidate: shown, never hidden.
function badge(kind, text) {
  const b = document.createElement("span");
  b.className = "badge " + kind;
  b.textContent = text;
  return b;
}

function trustBadges(c) {
  const out = [];
  if (c.finish_reason === "content_filter") out.push(badge("block", "stopped by the safety policy"));
  for (const f of (c.safety && c.safety.findings) || []) {
    out.push(badge(f.action === "block" ? "block" : "warn", `safety: ${f.category} (${f.action}, ${f.rule})`));
  }
  if (c.copying) {
    const r = c.copying;
    if (r.spans && r.spans.length) {
      out.push(badge("warn", `copying: ${r.spans.length} verbatim span(s), longest ${r.longest.chars} characters from ${r.longest.source}`));
    } else {
      out.push(badge("ok", `copying: no verbatim span of ${r.min_chars || 50}+ characters`));
    }
  }
  return out;
}

// ---------------------------------------------------------------- chat tab
// Chats are sessions on the server (/api/chat/sessions): the same turns, memory, facts and
// personas as `llmos chat`, so a chat goes on from here to the terminal and back.

let chat = null; // the open session, as GET /api/chat/sessions/{id} returns it, with .alts: its last message's replies
let editing = false; // the next Send replaces the last message

function chatStatus(text) { $("#chat-status").textContent = text || ""; }

function renderChat() {
  const log = $("#chat-log");
  log.innerHTML = "";
  for (const t of chat ? chat.turns : []) {
    const div = document.createElement("div");
    div.className = "msg " + t.role;
    div.textContent = t.content;
    if (t.rating != null) {
      const mark = document.createElement("span");
      mark.className = "rated";
      mark.textContent = t.rating >= 4 ? "(rated good)" : t.rating <= 2 ? "(rated bad)" : `(rated ${t.rating})`;
      div.appendChild(mark);
    }
    log.appendChild(div);
  }
  const last = chat && chat.turns[chat.turns.length - 1];
  const control = last && last.role === "assistant" && swipeControl(last);
  if (control) log.lastChild.appendChild(control);
  log.scrollTop = log.scrollHeight;
  $("#chat-facts-list").innerHTML = (chat ? chat.facts : []).map((f) => `<li>${escapeHtml(f)}</li>`).join("");
  $("#session-pick").value = chat ? String(chat.id) : "";
  if (chat) $("#persona-pick").value = chat.persona;
  $("#kb-pick").value = chat && chat.kb ? chat.kb : "";
  describePersona();
}

async function refreshSessions() {
  const { sessions } = await (await api("/api/chat/sessions")).json();
  $("#session-pick").innerHTML = '<option value="">(new chat)</option>' + sessions.map((s) =>
    `<option value="${s.id}">#${s.id} ${escapeHtml(s.persona)}: ${escapeHtml((s.title || s.first_message || "").slice(0, 40))}</option>`).join("");
  if (chat) $("#session-pick").value = String(chat.id);
}

// Swipes: ‹ k/n › on the last reply browses the replies its message got (before the first
// message: the persona's greetings); › past the last writes a new reply, as Retry.
function swipeControl(turn) {
  const alts = chat.alts;
  if (!alts || !alts.latest || alts.index == null || alts.alternatives[alts.index].id !== turn.id) return null;
  const n = alts.alternatives.length, k = alts.index, greetings = alts.reply_to == null;
  if (greetings && n < 2) return null;
  const span = document.createElement("span");
  span.className = "swipe";
  span.style.marginLeft = ".5rem";
  const button = (id, text, title, disabled, index) => {
    const b = document.createElement("button");
    Object.assign(b, { id, textContent: text, title, disabled });
    b.onclick = () => swipeTo(index);
    return b;
  };
  const pos = document.createElement("span");
  pos.id = "chat-swipe-pos";
  pos.textContent = ` ${k + 1}/${n} `;
  span.append(button("chat-swipe-prev", "‹", "The previous reply", k === 0, k - 1), pos,
    button("chat-swipe-next", "›", k === n - 1 ? "A new reply (as Retry)" : "The next reply", greetings && k === n - 1, k + 1));
  return span;
}

async function swipeTo(index) {
  if (!chat || controller) return;
  if (index >= chat.alts.alternatives.length) {  // one past the last: a new reply
    chat.turns.pop();
    await chatTurn(`/api/chat/sessions/${chat.id}/swipe`, { index });
    return;
  }
  try {
    await api(`/api/chat/sessions/${chat.id}/swipe`, { method: "POST", body: JSON.stringify({ index }) });
    await openSession(chat.id);
  } catch (e) { chatStatus(e.message); }
}

async function loadAlternatives() {
  try {
    chat.alts = await (await api(`/api/chat/sessions/${chat.id}/alternatives`)).json();
  } catch (e) { chat.alts = null; }  // the chat shows without its swipe arrows
}

async function openSession(id) {
  chat = await (await api(`/api/chat/sessions/${id}`)).json();
  await loadAlternatives();
  project.data.chat_session = chat.id;
  scheduleSave();
  renderChat();
}

async function newChat() {
  const body = { persona: $("#persona-pick").value || null, kb: $("#kb-pick").value || null };
  const res = await api("/api/chat/sessions", { method: "POST", body: JSON.stringify(body) });
  noteFrom(res);
  chat = await res.json();
  await loadAlternatives();
  project.data.chat_session = chat.id;
  scheduleSave();
  await refreshSessions();
  renderChat();
}

function noteFrom(res) {
  const note = res.headers.get("x-llmos-note");
  if (note) chatStatus(note);
}

async function chatTurn(path, body) {
  // Stream a reply: the user's turn shows at once, the reply grows as it is written.
  if (controller) return;
  controller = new AbortController();
  document.body.dataset.chatBusy = "true";
  const reply = { role: "assistant", content: "", rating: null };
  if (body.content) chat.turns.push({ role: "user", content: body.content, rating: null });
  chat.turns.push(reply);
  renderChat();
  chatStatus("writing…");
  try {
    for await (const ev of sse(path, { ...body, stream: true }, controller.signal)) {
      if (ev.error) throw new Error(ev.error.message);
      if (ev.context) $("#chat-context").textContent = ev.context;  // what was sent, lore entries and why
      if (ev.text) { reply.content += ev.text; renderChat(); }
    }
    chatStatus("");
  } catch (e) { chatStatus(e.message); }
  controller = null;
  try {
    await openSession(chat.id);  // what the server stored, ratings and facts included
    await refreshSessions();
  } finally { document.body.dataset.chatBusy = "false"; }
}

async function sendChat() {
  const text = $("#chat-message").value.trim();
  if (!text || controller) return;
  if (!chat) await newChat();
  $("#chat-message").value = "";
  if (editing) {
    editing = false;
    const last = [...chat.turns].reverse().findIndex((t) => t.role === "user");
    if (last >= 0) chat.turns.splice(chat.turns.length - 1 - last);
    await chatTurn(`/api/chat/sessions/${chat.id}/edit`, { content: text });
  } else {
    await chatTurn(`/api/chat/sessions/${chat.id}/messages`, { content: text });
  }
}

async function chatCommand(action) {
  if (!chat || controller) return;
  try {
    if (action === "retry") {
      const last = chat.turns.length - 1;
      if (last >= 0 && chat.turns[last].role === "assistant") chat.turns.pop();
      await chatTurn(`/api/chat/sessions/${chat.id}/retry`, {});
      return;
    }
    if (action === "undo") {
      const out = await (await api(`/api/chat/sessions/${chat.id}/undo`, { method: "POST" })).json();
      chatStatus("took back: " + out.taken);
    } else if (action === "edit") {
      const user = [...chat.turns].reverse().find((t) => t.role === "user");
      if (!user) return;
      $("#chat-message").value = user.content;
      editing = true;
      chatStatus("editing your last message: Send replaces it");
      return;
    } else if (action === "up" || action === "down") {
      await api(`/api/chat/sessions/${chat.id}/rate`, { method: "POST", body: JSON.stringify({ rating: action }) });
    } else if (action === "pin") {
      const fact = $("#chat-fact").value.trim();
      if (!fact) return;
      await api(`/api/chat/sessions/${chat.id}/facts`, { method: "POST", body: JSON.stringify({ fact }) });
      $("#chat-fact").value = "";
    } else if (action === "persona") {
      await api(`/api/chat/sessions/${chat.id}`, { method: "PATCH", body: JSON.stringify({ persona: $("#persona-pick").value }) });
    } else if (action === "kb") {
      await api(`/api/chat/sessions/${chat.id}`, { method: "PATCH", body: JSON.stringify({ kb: $("#kb-pick").value }) });
    } else if (action === "delete") {
      await api(`/api/chat/sessions/${chat.id}`, { method: "DELETE" });
      chat = null;
      project.data.chat_session = null;
      scheduleSave();
      await refreshSessions();
      renderChat();
      return;
    }
    await openSession(chat.id);
  } catch (e) { chatStatus(e.message); }
}

async function exportChat() {
  if (!chat) return;
  const blob = await (await api(`/api/chat/sessions/${chat.id}/export?format=md`)).blob();
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = `chat-${chat.id}.md`;
  a.click();
}

// ---------------------------------------------------------------- wiring

function switchTab(name) {
  document.querySelectorAll(".tabs button").forEach((b) => b.classList.toggle("active", b.dataset.tab === name));
  document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t.id === "tab-" + name));
}

function wire() {
  document.querySelectorAll(".tabs button").forEach((b) => { b.onclick = () => switchTab(b.dataset.tab); });
  $("#editor").addEventListener("input", () => { clearTimeout(editTimer); editTimer = setTimeout(applyEdit, 400); });
  $("#editor").addEventListener("keydown", (e) => { if (e.key === "Enter" && e.ctrlKey) generateFrom(project.data.current); });
  $("#generate").onclick = () => { applyEdit(); generateFrom(project.data.current); };
  $("#stop").onclick = () => controller && controller.abort();
  $("#retry").onclick = () => { const cur = node(project.data.current); if (cur.kind === "gen") generateFrom(cur.parent); };
  $("#undo").onclick = () => {
    if (!history.undo.length) return;
    history.redo.push(project.data.current);
    setCurrent(history.undo.pop(), false);
  };
  $("#redo").onclick = () => {
    const target = history.redo.length ? history.redo.pop() : (childrenOf(project.data.current).slice(-1)[0] || {}).id;
    if (!target) return;
    history.undo.push(project.data.current);
    setCurrent(target, false);
  };
  $("#show-probs").onchange = renderProbabilities;
  $("#preset").onchange = () => {
    project.data.preset = $("#preset").value;
    project.data.sampler = { ...PRESETS[project.data.preset] };
    loadPanels();
    scheduleSave();
  };
  addSamplerExtras();
  for (const f of SAMPLER_FIELDS) $("#" + f).oninput = () => { project.data.sampler[f] = $("#" + f).value; scheduleSave(); };
  $("#memory").oninput = () => { project.data.memory = $("#memory").value; scheduleSave(); };
  $("#authors-note").oninput = () => { project.data.authors_note = $("#authors-note").value; scheduleSave(); };
  $("#an-depth").oninput = () => { project.data.an_depth = $("#an-depth").value; scheduleSave(); };
  $("#add-lore").onclick = () => { project.data.lorebook.push({ keys: "", content: "" }); renderLorebook(); };
  $("#project-name").oninput = scheduleSave;
  $("#new-project").onclick = newProject;
  $("#project-list").onchange = () => { if ($("#project-list").value) openProject($("#project-list").value); };
  $("#export-json").onclick = (e) => { e.preventDefault(); download("json"); };
  $("#export-md").onclick = (e) => { e.preventDefault(); download("md"); };
  $("#api-key").value = localStorage.getItem("llmos-api-key") || "";
  $("#api-key").onchange = () => { localStorage.setItem("llmos-api-key", $("#api-key").value); init(); };
  $("#run-task").onclick = runTask;
  $("#chat-send").onclick = sendChat;
  $("#chat-message").addEventListener("keydown", (e) => { if (e.key === "Enter") sendChat(); });
  $("#chat-new").onclick = () => newChat().catch((e) => chatStatus(e.message));
  for (const action of ["retry", "undo", "edit", "up", "down", "pin", "delete"]) {
    $("#chat-" + action).onclick = () => chatCommand(action);
  }
  $("#chat-export").onclick = (e) => { e.preventDefault(); exportChat(); };
  $("#session-pick").onchange = () => {
    const id = $("#session-pick").value;
    if (id) openSession(id).catch((e) => chatStatus(e.message));
    else { chat = null; renderChat(); }
  };
  $("#persona-pick").onchange = () => { describePersona(); if (chat) chatCommand("persona"); };
  $("#kb-pick").onchange = () => { if (chat) chatCommand("kb"); };
  $("#card-file").onchange = (e) => { const f = e.target.files[0]; e.target.value = ""; if (f) importCard(f).catch((err) => chatStatus(err.message)); };
  $("#card-export").onclick = (e) => { e.preventDefault(); exportCard().catch((err) => chatStatus(err.message)); };
  $("#lore-file").onchange = (e) => {
    const f = e.target.files[0]; e.target.value = "";
    if (f) importLorebook(f).catch((err) => { $("#status").textContent = "error: " + err.message; });
  };
  $("#export-lore").onclick = () => exportLorebook().catch((err) => { $("#status").textContent = "error: " + err.message; });
  document.addEventListener("click", (e) => {
    if (!e.target.closest("#token-popup") && !e.target.classList.contains("tok")) $("#token-popup").classList.add("hidden");
  });
}

async function download(format) {
  await save();
  const res = await api(`/api/projects/${project.id}/export?format=${format}`);
  const blob = await res.blob();
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = `${project.name}.${format === "md" ? "md" : "json"}`;
  a.click();
}

let personas = [];
let cards = {}; // persona name -> what its character card adds (GET /api/cards): tags, notes, picture

async function describePersona() {
  const name = $("#persona-pick").value;
  const p = personas.find((x) => x.name === name), card = cards[name];
  const language = (navigator.language || "en").slice(0, 2);  // V3 cards' notes come in several languages
  const notes = card ? [card.tags.length ? "Tags: " + card.tags.join(", ") : "",
    card.creator_notes_multilingual[language] || card.creator_notes] : [];
  $("#persona-about").textContent = [p ? p.description : "", ...notes].filter(Boolean).join("\n");
  $("#card-export").classList.toggle("hidden", !p || p.builtin);
  const img = $("#persona-picture");
  img.classList.add("hidden");
  if (!card || !card.picture) return;
  try {  // fetched, not linked: the API key travels in a header
    const url = URL.createObjectURL(await (await api(card.picture)).blob());
    if ($("#persona-pick").value === name) { img.src = url; img.classList.remove("hidden"); }
  } catch (e) { chatStatus(e.message); }
}

function fileBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result.slice(reader.result.indexOf(",") + 1));
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function importCard(file) {
  const body = JSON.stringify({ file: await fileBase64(file), filename: file.name });
  const r = await (await api("/api/personas/import", { method: "POST", body })).json();
  await loadPersonas();
  $("#persona-pick").value = r.name;
  await describePersona();
  chatStatus(`imported ${r.display_name} as ${r.name}` + (r.lore_entries ? `, ${r.lore_entries} lore entries` : ""));
}

async function exportCard() {
  const name = $("#persona-pick").value;
  const blob = await (await api(`/api/personas/${encodeURIComponent(name)}/card?format=png`)).blob();
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = `${name}.png`;
  a.click();
}

async function importLorebook(file) {
  const body = JSON.stringify({ file: await fileBase64(file), filename: file.name });
  const { entries } = await (await api("/api/lorebooks/read", { method: "POST", body })).json();
  for (const e of entries) project.data.lorebook.push({ ...e, keys: e.keys.join(", ") });
  renderLorebook();
  scheduleSave();
  $("#status").textContent = `imported ${entries.length} lore entries from ${file.name}`;
}

async function exportLorebook() {
  const entries = project.data.lorebook.filter((e) => e.content.trim()).map((e) => ({
    ...e, keys: e.keys.split(",").map((k) => k.trim()).filter(Boolean) }));
  const body = JSON.stringify({ entries, format: "world_info", name: project.name || "" });
  const blob = await (await api("/api/lorebooks/write", { method: "POST", body })).blob();
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = `${project.name || "lorebook"}.json`;
  a.click();
}

async function loadPersonas() {
  try {
    cards = Object.fromEntries((await (await api("/api/cards")).json()).cards.map((c) => [c.name, c]));
    personas = (await (await api("/api/personas")).json()).personas;
    $("#persona-pick").innerHTML = personas.map((p) =>
      `<option value="${escapeHtml(p.name)}">${escapeHtml(p.name)}${p.language && p.language !== "en" ? " (" + escapeHtml(p.language) + ")" : ""}</option>`).join("");
    $("#persona-pick").value = "assistant";
    describePersona();
    const { knowledge_bases } = await (await api("/api/kb")).json();
    $("#kb-pick").innerHTML = '<option value="">(none)</option>' +
      knowledge_bases.map((k) => `<option value="${escapeHtml(k.name)}">${escapeHtml(k.name)}</option>`).join("");
    await refreshSessions();
  } catch (e) { chatStatus(e.message); }
}

async function init() {
  try {
    const models = await (await api("/v1/models")).json();
    $("#model-name").textContent = "model: " + models.data[0].id;
  } catch (e) { $("#model-name").textContent = e.message; }
  await refreshProjectList();
  await loadTasks();
  await loadPersonas();
  const fromHash = (location.hash.match(/p=(\d+)/) || [])[1];
  const id = fromHash || localStorage.getItem("llmos-last-project");
  let opened = false;
  if (id) {
    try { await openProject(id); opened = true; } catch (e) { /* gone: start afresh */ }
  }
  if (!opened) newProject();
  document.body.dataset.ready = "true";  // everything loaded: the page takes input now
}

wire();
init();
