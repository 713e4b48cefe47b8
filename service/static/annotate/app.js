// The annotation page: the next text of /annotations/queue (or a pasted one) with its predicted
// entities; edits by mouse or keyboard; POST /feedback with one Idempotency-Key per text and body.
// Plain browser JavaScript, no build step. Entities are held as token ranges [s, e) over the
// tokens /tag returns, so every span the page can send starts and ends on a token boundary.
"use strict";

(function () {
  const { OffsetMap, pointLength } = window.NerOffsets;
  const $ = (id) => document.getElementById(id);
  const KEY_STORE = "ner-api-key";       // sessionStorage: this tab only
  const SITTING_STORE = "ner-sitting";   // sessionStorage: corrections in this sitting
  const SKIPPED_STORE = "ner-skipped";   // sessionStorage: queue items skipped in this sitting
  const AUTHOR_STORE = "ner-author";     // localStorage: not a secret

  const state = {
    labels: [],
    item: null,        // {kind, predictionId, text, map, tokens, entities, model, key, keyBody, counted}
    caret: 0,          // token index
    anchor: null,      // token index where a selection started, or null
    undo: [],
    busy: false,
    shownAt: 0,        // when the current text appeared (performance.now())
  };
  // a second click of a double click (or a bounced Enter) that lands after the next text appeared
  // must not submit that text unseen
  const config = { freshMs: 400 };

  // ---------------------------------------------------------------- API calls

  class ApiFailure extends Error {
    constructor(code, message, status) { super(message); this.code = code; this.status = status; }
    describe() { return `${this.message} (${this.code}${this.status ? `, HTTP ${this.status}` : ""})`; }
  }

  async function failureFrom(response) {
    let code = "http_error", message = `HTTP ${response.status} ${response.statusText}`;
    const raw = await response.text();
    try {
      const err = JSON.parse(raw).error;
      if (err && err.code) { code = err.code; message = err.message || message; }
    } catch (_) {
      if (raw) message += `: ${raw.slice(0, 200)}`;
    }
    const retry = response.headers.get("Retry-After");
    if (retry) message += `; retry in ${retry} s`;
    return new ApiFailure(code, message, response.status);
  }

  // Every call sends the key the user gave, whatever the server's key scheme; a 401 asks for one.
  async function api(method, path, body, headers = {}) {
    for (;;) {
      const h = { Accept: "application/json", ...headers };
      if (body !== undefined) h["Content-Type"] = "application/json";
      const key = sessionStorage.getItem(KEY_STORE);
      if (key) h["X-API-Key"] = key;
      let response;
      try {
        response = await fetch(path, { method, headers: h, body: body === undefined ? undefined : JSON.stringify(body) });
      } catch (e) {
        throw new ApiFailure("network_error", `the service could not be reached (${e.message}); nothing was lost, try again`);
      }
      // 401: no key or a wrong one; 403 with a key: a key without the right for this call
      if (response.status === 401 || (response.status === 403 && key)) {
        const failure = await failureFrom(response);
        if (await askKey(key ? `The key was refused: ${failure.message}.` : `This service needs an API key: ${failure.message}.`)) continue;
        throw failure;
      }
      if (!response.ok) throw await failureFrom(response);
      return response;
    }
  }

  const getJson = async (path) => (await api("GET", path)).json();
  const postJson = async (path, body, headers) => (await api("POST", path, body, headers)).json();

  let keyPrompt = null;  // one prompt at a time, shared by concurrent calls
  function askKey(reason) {
    if (keyPrompt) return keyPrompt;
    keyPrompt = new Promise((resolve) => {
      const dialog = $("key-dialog"), input = $("key-input");
      $("key-reason").textContent = reason;
      input.value = "";
      dialog.hidden = false;
      input.focus();
      const finish = (ok) => {
        dialog.hidden = true;
        $("key-form").onsubmit = null;
        $("key-cancel").onclick = null;
        input.onkeydown = null;
        keyPrompt = null;
        resolve(ok);
      };
      $("key-form").onsubmit = (ev) => {
        ev.preventDefault();
        sessionStorage.setItem(KEY_STORE, input.value.trim());
        finish(true);
      };
      $("key-cancel").onclick = () => finish(false);
      input.onkeydown = (ev) => { if (ev.key === "Escape") finish(false); };
    });
    return keyPrompt;
  }

  // RFC 4122 version 4 from crypto.getRandomValues (crypto.randomUUID needs a secure context).
  function newKey() {
    const b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
  }

  // ---------------------------------------------------------------- messages and progress

  function showError(e) {
    const box = $("error");
    box.textContent = e instanceof ApiFailure ? `Not done: ${e.describe()}` : `Not done: ${e}`;
    box.hidden = false;
  }
  function clearError() { $("error").hidden = true; $("error").textContent = ""; }
  function notice(text) { $("notice").textContent = text; }

  const sitting = () => Number(sessionStorage.getItem(SITTING_STORE) || 0);
  const skipped = () => new Set(JSON.parse(sessionStorage.getItem(SKIPPED_STORE) || "[]"));

  async function refreshStatus() {
    const s = await getJson("/annotate/status");
    state.labels = s.labels;
    $("total").textContent = s.corrected_total;
    $("queued").textContent = s.queue_remaining;
    $("sitting").textContent = sitting();
    $("model").textContent = `serving ${s.model.name} ${s.model.version}`;
    return s;
  }

  // ---------------------------------------------------------------- loading a text

  // Entities from the API (code point offsets) -> token ranges; a span that does not sit on token
  // boundaries is widened to the tokens it touches, as /feedback itself would.
  function toRanges(entities, tokens) {
    const out = [];
    for (const e of entities) {
      const touched = touchedTokens(tokens, e.start, e.end);
      if (touched) out.push({ s: touched[0], e: touched[1] + 1, label: e.label, score: e.score, ruleId: e.source === "rule" ? e.rule_id : undefined });
    }
    return sortAndDropOverlaps(out);
  }

  // [first, last] token indices that the code point range [start, end) overlaps, or null;
  // tokens are sorted and disjoint, so two binary searches
  function touchedTokens(tokens, start, end) {
    let lo = 0, hi = tokens.length;
    while (lo < hi) { const m = (lo + hi) >> 1; if (tokens[m].end > start) hi = m; else lo = m + 1; }
    const first = lo;
    hi = tokens.length;
    while (lo < hi) { const m = (lo + hi) >> 1; if (tokens[m].start < end) lo = m + 1; else hi = m; }
    return first <= lo - 1 ? [first, lo - 1] : null;
  }

  function sortAndDropOverlaps(ranges) {
    ranges.sort((a, b) => a.s - b.s || a.e - b.e);
    const out = [];
    for (const r of ranges) if (!out.length || out[out.length - 1].e <= r.s) out.push(r);
    return out;
  }

  async function tokensOf(text) {
    const r = await postJson("/tag", { text, include_tokens: true, store: false });
    return r;
  }

  function setItem(item) {
    state.item = item;
    state.undo = [];
    state.shownAt = performance.now();
    // start on the first entity, so arrows and number keys act on something visible
    const first = item && item.entities.length ? item.entities[0] : null;
    state.anchor = first ? first.s : null;
    state.caret = first ? first.e - 1 : 0;
    render();
  }

  async function loadNext() {
    state.busy = true;
    try {
      const skip = skipped();
      const limit = Math.min(500, skip.size + 10);
      const queue = await getJson(`/annotations/queue?limit=${limit}`);
      const next = queue.find((q) => !skip.has(q.prediction_id));
      if (!next) {
        setItem(null);
        $("source").textContent = queue.length
          ? "Only skipped texts are left in the queue. Press S to see them again, or paste a text (P)."
          : "The queue is empty: every stored text is corrected. Paste a text to annotate it (P).";
        if (queue.length) sessionStorage.removeItem(SKIPPED_STORE);
        return;
      }
      const tagged = await tokensOf(next.text);
      const map = new OffsetMap(next.text);
      setItem({
        kind: "queue", predictionId: next.prediction_id, text: next.text, map, tokens: tagged.tokens,
        // the proposals are today's: the served model and the entity rules now (the stored
        // prediction may predate a rule); the queue's order comes from the stored prediction
        entities: toRanges(tagged.entities, tagged.tokens), model: tagged.model, key: null, keyBody: null, counted: false,
      });
      $("source").textContent = `From the queue (least confident first; weakest token ${next.min_score.toFixed(3)}); stored by ${next.model.name} ${next.model.version}, `
        + `proposals from ${tagged.model.name} ${tagged.model.version} and the entity rules`;
      clearError();
    } finally {
      state.busy = false;
    }
  }

  async function loadPasted() {
    const text = $("paste").value;
    if (state.busy) return;
    state.busy = true;
    try {
      const tagged = await tokensOf(text);  // errors (empty, too long, ...) come back in words
      setItem({
        kind: "text", predictionId: null, text, map: new OffsetMap(text), tokens: tagged.tokens,
        entities: toRanges(tagged.entities, tagged.tokens), model: tagged.model, key: null, keyBody: null, counted: false,
      });
      $("source").textContent = `Your text, predicted by ${tagged.model.name} ${tagged.model.version}`;
      clearError();
      notice("");
    } catch (e) {
      showError(e);  // the pasted text stays in the box
    } finally {
      state.busy = false;
    }
  }

  // ---------------------------------------------------------------- rendering

  function labelClass(label) {
    const i = state.labels.indexOf(label);
    return `l${i < 0 ? 8 : i % 9}`;
  }

  function selection() {
    const it = state.item;
    if (!it || !it.tokens.length) return null;
    if (state.anchor === null) {
      const ent = it.entities.find((r) => r.s <= state.caret && state.caret < r.e);
      return ent ? { s: ent.s, e: ent.e, entity: ent } : { s: state.caret, e: state.caret + 1, entity: null };
    }
    const s = Math.min(state.anchor, state.caret), e = Math.max(state.anchor, state.caret) + 1;
    const ent = it.entities.find((r) => r.s === s && r.e === e);
    return { s, e, entity: ent || null };
  }

  function render() {
    const doc = $("doc");
    doc.textContent = "";
    const it = state.item;
    renderLabels();
    $("submit").disabled = !it;
    $("skip").disabled = false;
    $("undo").disabled = !state.undo.length;
    if (!it || !it.tokens.length) { $("hint").textContent = ""; return; }
    const sel = selection();
    const inSel = (i) => sel && state.anchor !== null && sel.s <= i && i < sel.e;
    let pos = 0;     // code point offset rendered so far
    let holder = doc;
    const startsAt = new Map(it.entities.map((r) => [r.s, r]));  // one pass per render, also for long texts
    const gap = (end, selected = false) => {
      if (end > pos) {
        const g = document.createElement("span");
        g.className = selected ? "gap sel" : "gap";
        g.dataset.s = pos;
        g.textContent = it.map.slice(pos, end);
        holder.appendChild(g);
        pos = end;
      }
    };
    it.tokens.forEach((t, i) => {
      const ent = startsAt.get(i);
      const gapSelected = i > 0 && inSel(i - 1) && inSel(i);
      if (ent) {
        gap(t.start, gapSelected);
        holder = document.createElement("span");
        holder.className = `ent ${labelClass(ent.label)}`;
        holder.dataset.label = ent.label;
        holder.dataset.s = t.start;
        holder.dataset.first = ent.s;
        if (ent.ruleId !== undefined) holder.title = `${ent.label}, from entity rule ${ent.ruleId}`;
        else if (ent.score !== undefined) holder.title = `${ent.label}, score ${Number(ent.score).toFixed(3)}`;
        if (sel && sel.entity === ent) holder.classList.add("focused");
        holder.dataset.lastToken = ent.e - 1;
        doc.appendChild(holder);
      }
      gap(t.start, gapSelected);
      const span = document.createElement("span");
      span.className = "tok";
      span.dataset.i = i;
      span.dataset.s = t.start;
      span.textContent = it.map.slice(t.start, t.end);
      if (i === state.caret) span.classList.add("caret");
      if (inSel(i)) span.classList.add("sel");
      holder.appendChild(span);
      pos = t.end;
      if (holder !== doc && Number(holder.dataset.lastToken) === i) holder = doc;
    });
    gap(it.map.length);
    const caret = doc.querySelector(".tok.caret");
    if (caret) caret.scrollIntoView({ block: "nearest", inline: "nearest" });
    const n = state.labels.length;
    const keys = n ? `1–${Math.min(n, 9)}` : "a number";
    $("hint").textContent = sel.entity
      ? `Entity “${it.map.slice(it.tokens[sel.s].start, it.tokens[sel.e - 1].end)}” ${sel.entity.label}: ${keys} relabels, Delete removes.`
      : `Selected “${it.map.slice(it.tokens[sel.s].start, it.tokens[sel.e - 1].end)}”: ${keys} makes it an entity.`;
  }

  function renderLabels() {
    const bar = $("labels");
    bar.textContent = "";
    const sel = state.item ? selection() : null;
    state.labels.forEach((label, i) => {
      const b = document.createElement("button");
      b.type = "button";
      b.className = labelClass(label);
      if (sel && sel.entity && sel.entity.label === label) b.classList.add("current");
      b.dataset.label = label;
      b.innerHTML = i < 9 ? `<kbd>${i + 1}</kbd> ` : "";
      b.appendChild(document.createTextNode(label));
      b.onclick = () => applyLabel(label);
      bar.appendChild(b);
    });
    const rm = document.createElement("button");
    rm.type = "button";
    rm.className = "remove";
    rm.id = "remove";
    rm.innerHTML = "<kbd>Del</kbd> remove";
    rm.disabled = !(sel && sel.entity) && !(sel && state.item.entities.some((r) => r.s < sel.e && sel.s < r.e));
    rm.onclick = () => removeSelected();
    bar.appendChild(rm);
  }

  // ---------------------------------------------------------------- edits

  function remember() {
    state.undo.push({ entities: state.item.entities.map((r) => ({ ...r })), caret: state.caret, anchor: state.anchor });
    if (state.undo.length > 200) state.undo.shift();
  }

  function applyLabel(label) {
    const sel = selection();
    if (!sel) return;
    remember();
    const it = state.item;
    const kept = it.entities.filter((r) => r.e <= sel.s || sel.e <= r.s);
    kept.push({ s: sel.s, e: sel.e, label });
    it.entities = sortAndDropOverlaps(kept);
    state.anchor = null;
    state.caret = sel.s;
    notice("");
    render();
  }

  function removeSelected() {
    const sel = selection();
    if (!sel) return;
    const it = state.item;
    const kept = it.entities.filter((r) => r.e <= sel.s || sel.e <= r.s);
    if (kept.length === it.entities.length) return;
    remember();
    it.entities = kept;
    state.anchor = null;
    render();
  }

  function undo() {
    const last = state.undo.pop();
    if (!last || !state.item) return;
    state.item.entities = last.entities;
    state.caret = last.caret;
    state.anchor = last.anchor;
    render();
  }

  function moveCaret(delta, extend) {
    const it = state.item;
    if (!it || !it.tokens.length) return;
    if (extend && state.anchor === null) state.anchor = state.caret;
    if (!extend) state.anchor = null;
    state.caret = Math.max(0, Math.min(it.tokens.length - 1, state.caret + delta));
    render();
  }

  function jumpEntity(direction) {
    const it = state.item;
    if (!it || !it.entities.length) return;
    const cur = selection();
    const target = direction > 0
      ? it.entities.find((r) => r.s >= (cur ? cur.e : 0)) || it.entities[0]
      : [...it.entities].reverse().find((r) => r.e <= (cur ? cur.s : 0)) || it.entities[it.entities.length - 1];
    state.anchor = target.s;
    state.caret = target.e - 1;
    render();
  }

  // ---------------------------------------------------------------- submit and skip

  function feedbackBody() {
    const it = state.item;
    const entities = it.entities.map((r) => ({ start: it.tokens[r.s].start, end: it.tokens[r.e - 1].end, label: r.label }));
    const body = it.kind === "queue" ? { prediction_id: it.predictionId, entities } : { text: it.text, entities };
    const author = $("author").value.trim();
    if (author) body.author = author;
    return body;
  }

  async function submit() {
    const it = state.item;
    if (!it || state.busy || performance.now() - state.shownAt < config.freshMs) return;
    const body = feedbackBody();
    const json = JSON.stringify(body);
    // one key per text while the body stays the same: a double click or a retry after a lost
    // answer is stored once; after an edit the body differs and needs a key of its own
    if (it.keyBody !== json) { it.key = newKey(); it.keyBody = json; }
    state.busy = true;
    $("submit").disabled = true;
    notice("saving…");
    let stored;
    try {
      stored = await postJson("/feedback", body, { "Idempotency-Key": it.key });
    } catch (e) {
      notice("");
      showError(e);  // the edits stay on the page; Enter tries again with the same key
      state.busy = false;
      $("submit").disabled = false;
      return;
    }
    if (!it.counted) {
      it.counted = true;
      sessionStorage.setItem(SITTING_STORE, String(sitting() + 1));
    }
    if (it.kind === "text" && $("paste").value === it.text) $("paste").value = "";  // done with it
    clearError();
    notice(`Stored correction #${stored.id} (${stored.entities.length} entities${stored.replayed ? ", already stored before" : ""}).`);
    state.busy = false;
    setItem(null);  // stored: should loading the next text fail, this one is not offered again
    await next();
  }

  async function next() {
    try {
      await loadNext();
      await refreshStatus();
      render();
    } catch (e) {
      showError(e);
    }
  }

  async function skip() {
    if (state.busy) return;
    const it = state.item;
    if (it && it.kind === "queue") {
      const s = skipped();
      s.add(it.predictionId);
      sessionStorage.setItem(SKIPPED_STORE, JSON.stringify([...s]));
    }
    notice(it ? "Skipped." : "");
    await next();
  }

  // ---------------------------------------------------------------- mouse

  // A DOM boundary point inside #doc -> code point offset into the text.
  function boundaryToPoint(node, offset) {
    const doc = $("doc"), it = state.item;
    if (!doc.contains(node)) {
      return doc.compareDocumentPosition(node) & Node.DOCUMENT_POSITION_PRECEDING ? 0 : it.map.length;
    }
    if (node.nodeType === Node.TEXT_NODE) {
      const start = Number(node.parentElement.dataset.s);
      return start + pointLength(node.data.slice(0, offset));
    }
    if (offset < node.childNodes.length) return startOf(node.childNodes[offset]);
    return endOf(node);
  }
  function startOf(node) {
    const el = node.nodeType === Node.TEXT_NODE ? node.parentElement : node;
    return Number(el.dataset.s ?? (el.querySelector("[data-s]") || {}).dataset?.s ?? state.item.map.length);
  }
  function endOf(node) {
    const spans = node.querySelectorAll(".tok, .gap");
    if (!spans.length) return node === $("doc") ? state.item.map.length : startOf(node);
    const last = spans[spans.length - 1];
    return Number(last.dataset.s) + pointLength(last.textContent);
  }

  function onMouseUp(ev) {
    const it = state.item;
    if (!it || ev.button !== 0) return;
    const sel = window.getSelection();
    const doc = $("doc");
    if (sel.rangeCount && !sel.isCollapsed) {
      const range = sel.getRangeAt(0);
      if (!range.intersectsNode(doc)) return;
      const start = boundaryToPoint(range.startContainer, range.startOffset);
      const end = boundaryToPoint(range.endContainer, range.endOffset);
      // snap to the whole tokens the selection touches (whitespace alone selects nothing)
      const touched = touchedTokens(it.tokens, start, end);
      sel.removeAllRanges();
      if (!touched) return;
      [state.anchor, state.caret] = touched;
      render();
      return;
    }
    if (!doc.contains(ev.target)) return;
    const tok = ev.target.closest(".tok");
    const ent = ev.target.closest(".ent");
    if (ent) {
      const r = it.entities.find((x) => x.s === Number(ent.dataset.first));
      state.anchor = r.s;
      state.caret = r.e - 1;
    } else if (tok) {
      state.anchor = null;
      state.caret = Number(tok.dataset.i);
    }
    render();
  }

  // ---------------------------------------------------------------- keyboard

  function onKeyDown(ev) {
    if (!$("key-dialog").hidden) return;
    const t = ev.target;
    const typing = t instanceof HTMLInputElement || t instanceof HTMLTextAreaElement || t instanceof HTMLSelectElement;
    if (typing) {
      if (t.id === "paste" && ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); loadPasted(); }
      if (ev.key === "Escape") t.blur();
      return;
    }
    // Enter or Space on a focused button or link does what the button says, not a shortcut
    if ((t instanceof HTMLButtonElement || t instanceof HTMLAnchorElement || t.tagName === "SUMMARY") && (ev.key === "Enter" || ev.key === " ")) return;
    if (ev.altKey) return;
    const rtl = getComputedStyle($("doc")).direction === "rtl";
    const key = ev.key;
    let handled = true;
    if ((ev.ctrlKey || ev.metaKey) && key.toLowerCase() !== "z") return;
    if (key === "ArrowRight" || key === "ArrowLeft") moveCaret((key === "ArrowRight") !== rtl ? 1 : -1, ev.shiftKey);
    else if (key === "ArrowDown") jumpEntity(1);
    else if (key === "ArrowUp") jumpEntity(-1);
    else if (key === "Home") moveCaret(-Infinity, ev.shiftKey);
    else if (key === "End") moveCaret(Infinity, ev.shiftKey);
    else if (/^[1-9]$/.test(key) && state.item) {
      const label = state.labels[Number(key) - 1];
      if (label) applyLabel(label);
    } else if (key === "Delete" || key === "Backspace") { if (state.item) removeSelected(); }
    else if (key === "Enter") submit();
    else if (key.toLowerCase() === "z") undo();
    else if (key.toLowerCase() === "s") skip();
    else if (key === "Escape") { state.anchor = null; if (state.item) render(); }
    else if (key.toLowerCase() === "p") { $("paste-box").open = true; $("paste").focus(); }
    else handled = false;
    if (handled) ev.preventDefault();
  }

  // ---------------------------------------------------------------- export link

  async function downloadExport(ev) {
    ev.preventDefault();
    try {
      const blob = await (await api("GET", $("export").getAttribute("href"))).blob();
      const a = document.createElement("a");
      a.href = URL.createObjectURL(blob);
      a.download = "annotations.jsonl";
      document.body.appendChild(a);
      a.click();
      setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
    } catch (e) {
      showError(e);
    }
  }

  // ---------------------------------------------------------------- start

  async function start() {
    $("author").value = localStorage.getItem(AUTHOR_STORE) || "";
    $("author").addEventListener("change", () => localStorage.setItem(AUTHOR_STORE, $("author").value.trim()));
    document.addEventListener("keydown", onKeyDown);
    document.addEventListener("mouseup", onMouseUp);
    $("submit").onclick = () => submit();
    $("skip").onclick = () => skip();
    $("undo").onclick = () => undo();
    $("paste-go").onclick = () => loadPasted();
    $("queue-go").onclick = () => { if (state.item && state.item.kind === "text") state.item = null; next(); };
    $("export").addEventListener("click", downloadExport);
    try {
      await refreshStatus();
      await loadNext();
      render();
    } catch (e) {
      $("source").textContent = "";
      showError(e);
    }
  }

  // for the browser tests and the curious: the page's state, read-only by convention
  window.nerAnnotate = { state, config, OffsetMap };
  start();
})();
