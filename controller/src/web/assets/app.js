// Baton's dashboard: plain JavaScript, no dependencies. Every value from the server is
// put on the page as text (textContent, setAttribute), never parsed as HTML.
'use strict';

// ---------- small helpers ----------

const SVGNS = 'http://www.w3.org/2000/svg';

/** An element with attributes and children (strings become text nodes). */
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  setAttrs(e, attrs);
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function svg(tag, attrs, ...children) {
  const e = document.createElementNS(SVGNS, tag);
  setAttrs(e, attrs);
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function setAttrs(e, attrs) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'class') e.setAttribute('class', v);
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else if (k === 'text') e.textContent = v;
    else e.setAttribute(k, v === true ? '' : String(v));
  }
}

/** Replaces a node's children, leaving out absent ones (null, undefined, false). */
function put(node, ...children) {
  node.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** `RUN_STATE_QUARANTINED` → `quarantined`. */
function stateName(v, prefix) {
  if (v === undefined || v === null) return 'unknown';
  const s = String(v);
  return (s.startsWith(prefix) ? s.slice(prefix.length) : s).toLowerCase();
}
const runState = (v) => stateName(v, 'RUN_STATE_');
const stepState = (v) => stateName(v, 'STEP_STATE_');
const attemptState = (v) => stateName(v, 'ATTEMPT_STATE_');

function badge(name) {
  return el('span', { class: 'state s-' + name, 'data-state': name }, name.replace(/_/g, ' '));
}

const TERMINAL_RUN = new Set(['succeeded', 'failed', 'canceled']);
const DONE_STEP = new Set(['succeeded', 'failed', 'skipped', 'canceled', 'reused', 'cached']);

function ms(ts) {
  if (!ts) return null;
  const t = Date.parse(ts);
  return Number.isNaN(t) ? null : t;
}

function fmtTime(ts) {
  const t = ms(ts);
  if (t === null) return '—';
  const d = new Date(t);
  return d.toLocaleString(undefined, { hour12: false });
}

function fmtDuration(millis) {
  if (millis === null || millis === undefined || Number.isNaN(millis)) return '—';
  const s = millis / 1000;
  if (s < 1) return Math.round(millis) + 'ms';
  if (s < 60) return s.toFixed(s < 10 ? 1 : 0) + 's';
  const m = Math.floor(s / 60);
  if (m < 60) return m + 'm' + String(Math.floor(s % 60)).padStart(2, '0') + 's';
  const h = Math.floor(m / 60);
  return h + 'h' + String(m % 60).padStart(2, '0') + 'm';
}

function ago(ts) {
  const t = ms(ts);
  if (t === null) return '—';
  return fmtDuration(Math.max(0, Date.now() - t)) + ' ago';
}

function span(start, end) {
  const a = ms(start);
  if (a === null) return null;
  const b = ms(end) ?? Date.now();
  return b - a;
}

function progressBar(p) {
  const total = Number(p?.total || 0);
  const done = Number(p?.done || 0);
  const pct = total ? Math.round((done / total) * 100) : 0;
  const bar = el('span', { class: 'bar', role: 'progressbar', 'aria-valuenow': pct, 'aria-valuemin': 0, 'aria-valuemax': 100 });
  const fill = el('span');
  fill.style.width = pct + '%';
  bar.append(fill);
  return el('span', { class: 'progress' }, bar, el('span', { class: 'bar-text' }, `${done}/${total} (${pct}%)`));
}

/** Runs `fn` at most once per `wait` ms, at the end of a burst. */
function throttle(fn, wait) {
  let timer = null;
  let last = 0;
  return (...args) => {
    if (timer) return;
    const due = Math.max(0, last + wait() - Date.now());
    timer = setTimeout(async () => {
      timer = null;
      last = Date.now();
      await fn(...args);
    }, due);
  };
}

// ---------- the API: JSON calls and event streams ----------

const TOKEN_KEY = 'baton.token';
const session = { role: null, name: null, authRequired: false };

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function headers() {
  const h = { 'content-type': 'application/json' };
  const t = sessionStorage.getItem(TOKEN_KEY);
  if (t) h.authorization = 'Bearer ' + t;
  return h;
}

async function api(method, body) {
  const r = await fetch('/api/v1/' + method, { method: 'POST', headers: headers(), body: JSON.stringify(body || {}) });
  let j;
  try {
    j = await r.json();
  } catch {
    j = { code: 'UNKNOWN', message: r.statusText || 'no answer' };
  }
  if (!r.ok) {
    if (r.status === 401) showLogin(j.message);
    throw new ApiError(r.status, j.code, j.message);
  }
  return j;
}

/**
 * A server-sent event stream of a streaming RPC, reconnected after a drop: `body()`
 * gives the request for each (re)connection, so a stream that has a sequence resumes
 * after the last message seen.
 */
class Feed {
  constructor(method, body, onMessage, opts = {}) {
    this.method = method;
    this.body = body;
    this.onMessage = onMessage;
    this.onOpen = opts.onOpen || (() => {});
    this.onEnd = opts.onEnd || (() => {});
    this.controller = null;
    this.stopped = false;
    this.loop();
  }

  stop() {
    this.stopped = true;
    if (this.controller) this.controller.abort();
  }

  async loop() {
    let backoff = 250;
    while (!this.stopped) {
      let ended = false;
      try {
        this.controller = new AbortController();
        const r = await fetch('/api/v1/' + this.method, {
          method: 'POST',
          headers: headers(),
          body: JSON.stringify(this.body()),
          signal: this.controller.signal,
        });
        if (!r.ok) {
          const j = await r.json().catch(() => ({}));
          if (r.status === 401) {
            showLogin(j.message);
            return;
          }
          if (r.status >= 400 && r.status < 500) {
            toast(`${this.method}: ${j.message || r.statusText}`, 'bad');
            return;
          }
          throw new Error(j.message || r.statusText);
        }
        setLive(true);
        this.onOpen();
        backoff = 250;
        const reader = r.body.getReader();
        const decoder = new TextDecoder();
        let buf = '';
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += decoder.decode(value, { stream: true });
          let cut;
          while ((cut = buf.indexOf('\n\n')) >= 0) {
            const block = buf.slice(0, cut);
            buf = buf.slice(cut + 2);
            let event = 'message';
            let data = '';
            for (const line of block.split('\n')) {
              if (line.startsWith('event: ')) event = line.slice(7);
              else if (line.startsWith('data: ')) data += line.slice(6);
            }
            if (!data) continue;
            if (event === 'end') ended = true;
            else if (event === 'error') {
              const j = JSON.parse(data);
              // The server ended the stream with an error: reconnect unless it is final.
              if (j.code === 'NOT_FOUND' || j.code === 'PERMISSION_DENIED' || j.code === 'INVALID_ARGUMENT') {
                toast(`${this.method}: ${j.message}`, 'bad');
                return;
              }
            } else this.onMessage(JSON.parse(data));
          }
        }
      } catch (e) {
        if (this.stopped) return;
      }
      if (ended) {
        this.onEnd();
        return;
      }
      if (this.stopped) return;
      setLive(false);
      await sleep(backoff);
      backoff = Math.min(backoff * 2, 4000);
    }
  }
}

function setLive(on) {
  const l = document.getElementById('live');
  l.className = 'live ' + (on ? 'on' : 'off');
  l.textContent = on ? 'live' : 'reconnecting';
}

function toast(text, kind) {
  const t = document.getElementById('toast');
  t.textContent = text;
  t.className = 'toast ' + (kind || '');
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => (t.hidden = true), kind === 'bad' ? 12000 : 5000);
}

// ---------- sign-in and confirmations ----------

function showLogin(why) {
  const d = document.getElementById('login');
  document.getElementById('login-why').textContent = why || 'This controller requires a token.';
  if (!d.open) d.showModal();
}

async function whoami() {
  try {
    const me = await api('WhoAmI', {});
    session.role = me.role || null;
    session.name = me.name;
    session.authRequired = !!me.auth_required;
    const who = document.getElementById('who');
    who.textContent = me.auth_required ? `${me.name} (${me.role || 'no role'})` : 'authentication off';
    document.getElementById('logout').hidden = !sessionStorage.getItem(TOKEN_KEY);
    return true;
  } catch (e) {
    return false;
  }
}

/** Asks before an action; resolves to the comment typed (or '') or null. */
function confirmAction(text, withComment) {
  const d = document.getElementById('confirm');
  document.getElementById('confirm-text').textContent = text;
  document.getElementById('confirm-comment-label').hidden = !withComment;
  document.getElementById('confirm-comment').value = '';
  return new Promise((resolve) => {
    d.onclose = () => resolve(d.returnValue === 'ok' ? document.getElementById('confirm-comment').value : null);
    d.returnValue = '';
    d.showModal();
  });
}

/** An action button: confirms, calls, and shows what the server answered. */
function actionButton(label, question, call, opts = {}) {
  return el('button', {
    type: 'button',
    class: opts.danger ? 'danger' : '',
    'data-action': opts.name || label.toLowerCase(),
    onclick: async () => {
      const comment = await confirmAction(question, opts.comment);
      if (comment === null) return;
      try {
        await call(comment);
        toast(`${label}: done`, 'good');
        if (opts.after) opts.after();
      } catch (e) {
        toast(`${label} refused: ${e.message}`, 'bad');
      }
    },
  }, label);
}

// ---------- views ----------

let current = null; // the view on screen: { stop() }

function route() {
  if (current) current.stop();
  const path = location.pathname;
  for (const a of document.querySelectorAll('.top nav a')) {
    const v = a.dataset.view;
    const active = (v === 'runs' && (path === '/' || path.startsWith('/runs'))) || path === '/' + v;
    a.classList.toggle('active', active);
  }
  const main = document.getElementById('main');
  put(main);
  if (path.startsWith('/runs/')) current = runView(main, decodeURIComponent(path.slice(6)));
  else if (path === '/agents') current = agentsView(main);
  else if (path === '/breakers') current = breakersView(main);
  else current = runsView(main);
}

function go(path) {
  history.pushState(null, '', path);
  route();
}

// ----- runs -----

const RUN_STATES = ['pending', 'running', 'succeeded', 'failed', 'quarantined', 'canceled'];

function runsView(main) {
  const params = new URLSearchParams(location.search);
  const state = el('select', { id: 'filter-state', 'aria-label': 'State' },
    el('option', { value: '' }, 'all states'),
    RUN_STATES.map((s) => el('option', { value: s, selected: params.get('state') === s }, s)));
  const workstream = el('input', { id: 'filter-workstream', placeholder: 'workstream', value: params.get('workstream') || '' });
  const search = el('input', { id: 'filter-id', placeholder: 'run id prefix', value: params.get('q') || '' });
  const count = el('span', { class: 'muted small' });
  const body = el('tbody', { id: 'runs-body' });
  main.append(
    el('h1', {}, 'Runs'),
    el('div', { class: 'filters' }, state, workstream, search, count),
    el('table', { id: 'runs' },
      el('thead', {}, el('tr', {}, ['Run', 'Workstream', 'State', 'Submitted', 'Duration', 'Progress'].map((h) => el('th', {}, h)))),
      body));
  const rows = new Map(); // run id → { run, tr }
  const dirty = new Set();

  function rowOf(run) {
    const tr = el('tr', { class: 'clickable', 'data-run': run.id, onclick: (e) => {
      if (!e.target.closest('a')) go('/runs/' + run.id);
    } });
    fillRow(tr, run);
    return tr;
  }
  function fillRow(tr, run) {
    const st = runState(run.state);
    const end = run.finished_at || null;
    put(tr, 
      el('td', {}, el('a', { href: '/runs/' + run.id }, run.id.slice(0, 8)), run.name ? el('div', { class: 'muted small' }, run.name) : null),
      el('td', {}, run.workstream),
      el('td', {}, badge(st), run.reason ? el('div', { class: 'muted small' }, run.reason) : null),
      el('td', {}, fmtTime(run.created_at)),
      el('td', {}, fmtDuration(span(run.created_at, end))),
      el('td', {}, progressBar(run.progress)));
    tr.dataset.state = st;
  }
  function matches(run) {
    const q = search.value.trim().toLowerCase();
    return !q || run.id.startsWith(q);
  }
  function show() {
    const list = [...rows.values()].map((r) => r.run).filter(matches);
    list.sort((a, b) => (a.id < b.id ? 1 : -1));
    put(body, ...list.map((run) => rows.get(run.id).tr));
    count.textContent = `${list.length} run${list.length === 1 ? '' : 's'}`;
  }
  async function load() {
    const req = { page_size: 200 };
    if (state.value) req.states = ['RUN_STATE_' + state.value.toUpperCase()];
    if (workstream.value.trim()) req.workstream = workstream.value.trim();
    try {
      const res = await api('ListRuns', req);
      rows.clear();
      for (const run of res.runs || []) rows.set(run.id, { run, tr: rowOf(run) });
      const q = search.value.trim();
      if (q.length >= 4 && ![...rows.keys()].some((id) => id.startsWith(q))) {
        // An older run than the page holds: ask for it by its prefix.
        try {
          const one = (await api('GetRun', { run_id: q })).run;
          if (one) rows.set(one.id, { run: { ...one, steps: undefined }, tr: rowOf(one) });
        } catch (e) {
          /* no such run: the list says so by being empty */
        }
      }
      show();
    } catch (e) {
      if (e.status !== 401) toast('ListRuns: ' + e.message, 'bad');
    }
  }
  const reload = throttle(load, () => 500);
  function filtersChanged() {
    const p = new URLSearchParams();
    if (state.value) p.set('state', state.value);
    if (workstream.value.trim()) p.set('workstream', workstream.value.trim());
    if (search.value.trim()) p.set('q', search.value.trim());
    history.replaceState(null, '', '/' + (p.toString() ? '?' + p : ''));
    load();
  }
  state.addEventListener('change', filtersChanged);
  workstream.addEventListener('change', filtersChanged);
  search.addEventListener('input', () => {
    show();
    if (search.value.trim().length >= 4) reload();
  });
  // Follow every run's events; each (re)connection lists the runs again, so nothing
  // that happened while disconnected is missed.
  const feed = new Feed('WatchRuns', () => ({ run_events_only: false }), (ev) => {
    const row = rows.get(ev.run_id);
    if (!row) {
      reload();
      return;
    }
    const st = runState(ev.run_state);
    const changed = runState(row.run.state) !== st;
    row.run.state = ev.run_state;
    if (ev.progress) row.run.progress = ev.progress;
    if (ev.kind.startsWith('run_') && ev.message) row.run.reason = ev.message;
    if (TERMINAL_RUN.has(st) && changed) row.run.finished_at = ev.at;
    if (state.value && state.value !== st) {
      reload();
      return;
    }
    // Rows are redrawn once per frame, however many events arrived: a run of thousands
    // of steps sends thousands of events.
    dirty.add(row);
    if (dirty.size === 1) {
      requestAnimationFrame(() => {
        for (const r of dirty) fillRow(r.tr, r.run);
        dirty.clear();
      });
    }
  }, { onOpen: load });
  return { stop: () => feed.stop() };
}

// ----- one run -----

const NODE_W = 170;
const NODE_H = 30;
const GAP_X = 60;
const GAP_Y = 10;
/** Above this many nodes the graph shows layers as single nodes until one is opened. */
const MAX_NODES = 2500;

/** The group of an expanded step (`test[os=debian]` → `test`), or null. */
function groupOf(id) {
  const i = id.indexOf('[');
  return i > 0 && id.endsWith(']') ? id.slice(0, i) : null;
}

/**
 * Layers of a DAG: each step one layer right of its deepest need. Within a layer,
 * nodes are ordered by the mean position of their needs (one barycentre sweep), which
 * keeps edges short without a costly crossing minimisation.
 */
function layers(nodes) {
  const byId = new Map(nodes.map((n) => [n.id, n]));
  const depth = new Map();
  const indeg = new Map(nodes.map((n) => [n.id, 0]));
  const out = new Map(nodes.map((n) => [n.id, []]));
  for (const n of nodes) {
    for (const d of n.needs) {
      if (!byId.has(d)) continue;
      indeg.set(n.id, indeg.get(n.id) + 1);
      out.get(d).push(n.id);
    }
  }
  const queue = nodes.filter((n) => indeg.get(n.id) === 0).map((n) => n.id);
  for (const id of queue) depth.set(id, 0);
  for (let i = 0; i < queue.length; i++) {
    const id = queue[i];
    for (const next of out.get(id)) {
      depth.set(next, Math.max(depth.get(next) || 0, depth.get(id) + 1));
      indeg.set(next, indeg.get(next) - 1);
      if (indeg.get(next) === 0) queue.push(next);
    }
  }
  const cols = [];
  for (const n of nodes) {
    const d = depth.get(n.id) || 0;
    (cols[d] = cols[d] || []).push(n);
  }
  const pos = new Map();
  cols.forEach((col, c) => {
    if (c > 0) {
      const key = (n) => {
        const ps = n.needs.filter((d) => pos.has(d)).map((d) => pos.get(d));
        return ps.length ? ps.reduce((a, b) => a + b, 0) / ps.length : 0;
      };
      const keys = new Map(col.map((n) => [n.id, key(n)]));
      col.sort((a, b) => keys.get(a.id) - keys.get(b.id));
    }
    col.forEach((n, i) => pos.set(n.id, i));
  });
  return { cols, pos, depth };
}

/** The critical path: from the step that ended last, back through the need that ended last. */
function criticalPath(steps) {
  const byId = new Map(steps.map((s) => [s.id, s]));
  let last = null;
  for (const s of steps) {
    const f = ms(s.finished_at);
    if (f !== null && (last === null || f > ms(last.finished_at))) last = s;
  }
  const path = new Set();
  while (last && !path.has(last.id)) {
    path.add(last.id);
    let prev = null;
    for (const d of last.needs || []) {
      const s = byId.get(d);
      if (s && ms(s.finished_at) !== null && (!prev || ms(s.finished_at) > ms(prev.finished_at))) prev = s;
    }
    last = prev;
  }
  return path;
}

function runView(main, runId) {
  const state = { run: null, steps: new Map(), selected: null, lastSeq: 0, openGroups: new Set(), openLayer: null, fetchMs: 0, logFeed: null };
  const head = el('div', { class: 'card', id: 'run-head' });
  const graphBox = el('div', { class: 'scroll', id: 'graph' });
  const ganttBox = el('div', { class: 'scroll', id: 'gantt' });
  const panel = el('div', { class: 'card panel', id: 'step-panel' }, el('p', { class: 'muted' }, 'Select a step in the graph or the timeline.'));
  const legend = el('div', { class: 'legend' });
  main.append(head,
    el('div', { class: 'layout' },
      el('div', {},
        el('h2', {}, 'Graph'), legend, graphBox,
        el('h2', {}, 'Timeline (attempts per agent)'), ganttBox),
      panel));

  async function fetchRun() {
    const t0 = performance.now();
    let res;
    try {
      res = await api('GetRun', { run_id: runId });
    } catch (e) {
      if (e.status !== 401) put(head, el('p', { class: 'reason' }, `Run ${runId}: ${e.message}`));
      return false;
    }
    state.fetchMs = performance.now() - t0;
    const run = res.run;
    runId = run.id;
    state.run = run;
    state.steps = new Map(run.steps.map((s) => [s.id, s]));
    const first = !state.lastSeq;
    if (first) state.lastSeq = Number(run.last_seq || 0);
    renderAll();
    // A user timing mark once the first drawing is on screen (the frame after it was
    // laid out and painted), with how long fetching the run took.
    if (first) {
      const fetchMs = state.fetchMs;
      requestAnimationFrame(() => setTimeout(() => performance.mark('baton:run-drawn', { detail: { fetchMs } })));
    }
    return true;
  }
  // A refetch for what events do not carry (attempts, timings): at most once a second,
  // less often for runs whose fetch is slow.
  const refetch = throttle(fetchRun, () => Math.max(1000, 5 * state.fetchMs));

  function renderAll() {
    const t0 = performance.now();
    renderHead();
    renderGraph();
    renderGantt();
    renderPanel();
    performance.measure('baton:render', { start: t0 });
  }

  function renderHead() {
    const run = state.run;
    const st = runState(run.state);
    const actions = el('div', { class: 'actions' });
    if (!TERMINAL_RUN.has(st)) {
      actions.append(actionButton('Cancel run', `Cancel run ${run.id}? Its running steps are stopped.`,
        (comment) => api('CancelRun', { run_id: run.id, reason: comment || 'canceled from the dashboard' }),
        { danger: true, comment: true, name: 'cancel-run', after: refetch }));
    }
    if (st === 'quarantined') {
      actions.append(actionButton('Release', `Release quarantined run ${run.id}?`,
        () => api('ReleaseRun', { run_id: run.id }), { name: 'release', after: refetch }));
    }
    if (st === 'failed' || st === 'canceled') {
      actions.append(actionButton('Retry', `Retry the failed, canceled and skipped steps of run ${run.id}?`,
        () => api('RetryRun', { run_id: run.id }), { name: 'retry', after: refetch }));
    }
    const end = run.finished_at;
    put(head, 
      el('div', { class: 'runhead' },
        el('h1', {}, run.name || run.workstream),
        badge(st),
        progressBar(run.progress)),
      run.reason ? el('p', { class: 'reason', id: 'run-reason' }, run.reason) : null,
      el('div', { class: 'runhead' },
        el('dl', {},
          el('dt', {}, 'Run'), el('dd', { id: 'run-id' }, run.id),
          el('dt', {}, 'Workstream'), el('dd', {}, run.workstream),
          el('dt', {}, 'Priority'), el('dd', {}, String(run.priority || 0)),
          costText(run) ? [el('dt', {}, 'Cost'), el('dd', { id: 'run-cost' }, costText(run))] : null),
        el('dl', {},
          el('dt', {}, 'Submitted'), el('dd', {}, fmtTime(run.created_at)),
          el('dt', {}, 'Started'), el('dd', {}, fmtTime(run.started_at)),
          el('dt', {}, 'Duration'), el('dd', {}, fmtDuration(span(run.started_at || run.created_at, end)))),
        run.rerun_of ? el('div', {}, 'Rerun of ', el('a', { href: '/runs/' + run.rerun_of }, run.rerun_of.slice(0, 8))) : null,
        (run.reruns || []).length ? el('div', {}, 'Reruns: ', run.reruns.map((r) => el('a', { href: '/runs/' + r }, r.slice(0, 8) + ' '))) : null),
      actions);
  }

  /** The nodes to draw: steps, with expansion groups and (for huge runs) layers folded. */
  function visibleNodes() {
    const steps = state.run.steps;
    const nodes = [];
    const rep = new Map(); // step id → node id
    const groups = new Map();
    for (const s of steps) {
      const g = groupOf(s.id);
      if (g && !state.openGroups.has(g)) {
        let node = groups.get(g);
        if (!node) {
          node = { id: 'group:' + g, label: g, group: g, members: [], needs: [] };
          groups.set(g, node);
          nodes.push(node);
        }
        node.members.push(s);
        rep.set(s.id, node.id);
      } else {
        nodes.push({ id: s.id, label: s.id, step: s, needs: [] });
        rep.set(s.id, s.id);
      }
    }
    const byId = new Map(nodes.map((n) => [n.id, n]));
    for (const s of steps) {
      const n = byId.get(rep.get(s.id));
      for (const d of s.needs || []) {
        const r = rep.get(d);
        if (r && r !== n.id && !n.needs.includes(r)) n.needs.push(r);
      }
    }
    if (nodes.length <= MAX_NODES) return { nodes, folded: false };
    // Too many to draw: one node per layer, and the opened layer's nodes.
    const { cols } = layers(nodes);
    const out = [];
    const layerOf = new Map();
    cols.forEach((col, i) => {
      if (state.openLayer === i) {
        const shown = col.slice(0, MAX_NODES);
        for (const n of shown) {
          out.push({ ...n, needs: [] });
          layerOf.set(n.id, n.id);
        }
        if (col.length > shown.length) {
          out.push({ id: 'more:' + i, label: `+${col.length - shown.length} more`, layer: i, members: col.slice(shown.length).flatMap(membersOf), needs: [] });
        }
        for (const n of col.slice(shown.length)) layerOf.set(n.id, 'more:' + i);
      } else {
        out.push({ id: 'layer:' + i, label: `layer ${i + 1}`, layer: i, members: col.flatMap(membersOf), needs: [] });
        for (const n of col) layerOf.set(n.id, 'layer:' + i);
      }
    });
    const outById = new Map(out.map((n) => [n.id, n]));
    for (const n of nodes) {
      const o = outById.get(layerOf.get(n.id));
      for (const d of n.needs) {
        const r = layerOf.get(d);
        if (r && r !== o.id && !o.needs.includes(r)) o.needs.push(r);
      }
    }
    return { nodes: out, folded: true };
  }

  function membersOf(n) {
    return n.step ? [n.step] : n.members;
  }

  function nodeState(n) {
    if (n.step) return stepState(n.step.state);
    const counts = {};
    for (const m of n.members) {
      const s = stepState(m.step ? m.step.state : m.state);
      counts[s] = (counts[s] || 0) + 1;
    }
    n.counts = counts;
    for (const s of ['failed', 'running', 'awaiting_approval', 'retry_wait', 'ready', 'waiting', 'canceled', 'skipped', 'succeeded', 'cached', 'reused']) {
      if (counts[s]) return s;
    }
    return 'waiting';
  }

  function renderGraph() {
    const { nodes, folded } = visibleNodes();
    const { cols, pos, depth } = layers(nodes);
    const critical = criticalPath(state.run.steps);
    const width = cols.length * (NODE_W + GAP_X) + 20;
    const height = Math.max(...cols.map((c) => c.length), 1) * (NODE_H + GAP_Y) + 20;
    const root = svg('svg', { width, height, viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-label': 'Steps and their dependencies', 'data-nodes': nodes.length, 'data-folded': folded });
    const xy = (id) => [10 + depth.get(id) * (NODE_W + GAP_X), 10 + pos.get(id) * (NODE_H + GAP_Y)];
    const edges = svg('g', { class: 'edges' });
    const parts = [];
    const crit = [];
    for (const n of nodes) {
      const [x2, y2] = xy(n.id);
      for (const d of n.needs) {
        if (!depth.has(d)) continue;
        const [x1, y1] = xy(d);
        const a = x1 + NODE_W;
        const b = y1 + NODE_H / 2;
        const c = y2 + NODE_H / 2;
        const mid = (a + x2) / 2;
        const path = `M${a},${b}C${mid},${b} ${mid},${c} ${x2},${c}`;
        if (n.step && critical.has(n.id) && critical.has(d)) crit.push(path);
        else parts.push(path);
      }
    }
    // One path element for all ordinary edges: thousands of edges stay cheap to draw.
    edges.append(svg('path', { class: 'edge', d: parts.join('') }));
    if (crit.length) edges.append(svg('path', { class: 'edge critical', d: crit.join('') }));
    root.append(edges);
    const g = svg('g', { class: 'nodes' });
    for (const n of nodes) {
      const [x, y] = xy(n.id);
      const st = nodeState(n);
      const classes = ['node', 's-' + st];
      if (n.step && critical.has(n.id)) classes.push('critical');
      if (n.step && state.selected === n.id) classes.push('selected');
      let text;
      let title;
      if (n.step) {
        text = `${short(n.label, 16)} · ${st.replace(/_/g, ' ')}`;
        title = `${n.label}: ${st}${n.step.reason ? ' — ' + n.step.reason : ''}`;
      } else {
        const total = n.members.length;
        const done = n.members.filter((m) => DONE_STEP.has(stepState(m.state))).length;
        text = `${short(n.label, 12)} ×${total} · ${done} done`;
        title = `${n.label}: ${total} steps — ` + Object.entries(n.counts).map(([k, v]) => `${v} ${k}`).join(', ') + (n.group ? ' (click to expand)' : ' (click to open)');
      }
      const node = svg('g', { class: classes.join(' '), 'data-node': n.id, 'data-state': st, transform: `translate(${x},${y})`, tabindex: 0 },
        svg('title', {}, title),
        svg('rect', { width: NODE_W, height: NODE_H, rx: 5, fill: stateColour(st) }),
        svg('text', { x: 8, y: 19 }, text));
      node.addEventListener('click', () => {
        if (n.step) select(n.id);
        else if (n.group) {
          state.openGroups.add(n.group);
          renderGraph();
        } else if (n.layer !== undefined) {
          state.openLayer = n.layer;
          renderGraph();
        }
      });
      g.append(node);
    }
    root.append(g);
    put(graphBox, root);
    const counts = {};
    for (const s of state.run.steps) {
      const k = stepState(s.state);
      counts[k] = (counts[k] || 0) + 1;
    }
    put(legend, 
      ...Object.entries(counts).map(([k, v]) => el('span', {}, badge(k), ' ', String(v))),
      state.openGroups.size ? el('button', { type: 'button', onclick: () => { state.openGroups.clear(); renderGraph(); } }, 'Collapse groups') : null,
      folded ? el('span', { class: 'muted' }, `${state.run.steps.length} steps: shown by layer; click a layer to open it`) : null,
      folded && state.openLayer !== null ? el('button', { type: 'button', onclick: () => { state.openLayer = null; renderGraph(); } }, `Close layer ${state.openLayer + 1}`) : null);
    if (folded && state.openLayer !== null) {
      // Bring the opened layer into view.
      const first = nodes.find((n) => n.id !== 'layer:' + state.openLayer && depth.has(n.id) && !n.id.startsWith('layer:'));
      if (first) graphBox.scrollLeft = Math.max(0, xy(first.id)[0] - 40);
    }
  }

  function renderGantt() {
    const attempts = [];
    for (const s of state.run.steps) {
      for (const a of s.attempts || []) {
        const start = ms(a.started_at) ?? ms(a.assigned_at);
        if (start === null) continue;
        attempts.push({ step: s.id, a, start, end: ms(a.finished_at) ?? Date.now() });
      }
    }
    if (!attempts.length) {
      put(ganttBox, el('p', { class: 'muted', style: null }, 'No attempts yet.'));
      return;
    }
    const critical = criticalPath(state.run.steps);
    const t0 = Math.min(...attempts.map((x) => x.start));
    const t1 = Math.max(...attempts.map((x) => x.end), t0 + 1);
    // Lanes: per agent, as many rows as attempts overlapped on it.
    const agents = new Map();
    attempts.sort((x, y) => x.start - y.start);
    for (const x of attempts) {
      const name = x.a.agent_name || x.a.agent_id || '?';
      const rows = agents.get(name) || [];
      let r = rows.findIndex((end) => end <= x.start);
      if (r < 0) {
        r = rows.length;
        rows.push(0);
      }
      rows[r] = x.end;
      x.row = r;
      x.agent = name;
      agents.set(name, rows);
    }
    const LABEL = 130;
    const ROW = 16;
    const width = Math.max(600, graphBox.clientWidth - 20 || 900);
    const scale = (width - LABEL - 10) / (t1 - t0);
    let y = 20;
    const laneY = new Map();
    for (const [name, rows] of agents) {
      laneY.set(name, y);
      y += rows.length * ROW + 8;
    }
    const root = svg('svg', { class: 'gantt', width, height: y + 4, role: 'img', 'aria-label': 'Attempts over time per agent', 'data-attempts': attempts.length });
    for (let i = 0; i <= 5; i++) {
      const x = LABEL + ((width - LABEL - 10) * i) / 5;
      root.append(svg('line', { class: 'grid', x1: x, x2: x, y1: 12, y2: y }),
        svg('text', { x: i === 5 ? x - 2 : x + 2, y: 10, fill: '#667085', 'text-anchor': i === 5 ? 'end' : 'start' }, '+' + fmtDuration(((t1 - t0) * i) / 5)));
    }
    for (const [name, top] of laneY) root.append(svg('text', { class: 'lane', x: 4, y: top + 12 }, short(name, 18)));
    const bars = svg('g', {});
    for (const x of attempts) {
      const st = attemptState(x.a.state);
      const w = Math.max(2, (x.end - x.start) * scale);
      const r = svg('rect', {
        class: 'att' + (critical.has(x.step) ? ' critical' : ''),
        x: LABEL + (x.start - t0) * scale, y: laneY.get(x.agent) + x.row * ROW, width: w, height: ROW - 3,
        fill: stateColour(st), 'data-step': x.step,
      }, svg('title', {}, `${x.step} #${x.a.number} on ${x.agent}: ${st}, ${fmtDuration(x.end - x.start)}`));
      r.addEventListener('click', () => select(x.step));
      bars.append(r);
    }
    root.append(bars);
    put(ganttBox, root);
  }

  function select(stepId) {
    state.selected = stepId;
    for (const n of graphBox.querySelectorAll('.node.selected')) n.classList.remove('selected');
    const node = graphBox.querySelector(`[data-node="${CSS.escape(stepId)}"]`);
    if (node) node.classList.add('selected');
    renderPanel(true);
  }

  function renderPanel(reopenLog) {
    const s = state.selected && state.steps.get(state.selected);
    if (!s) return;
    const st = stepState(s.state);
    const run = state.run;
    const actions = el('div', { class: 'actions' });
    if (!DONE_STEP.has(st) && !TERMINAL_RUN.has(runState(run.state))) {
      actions.append(actionButton('Cancel step', `Cancel step ${s.id}? What depends on it is skipped.`,
        () => api('CancelRun', { run_id: run.id, step_id: s.id, reason: 'canceled from the dashboard' }),
        { danger: true, name: 'cancel-step', after: refetch }));
    }
    if (st === 'awaiting_approval') {
      actions.append(
        actionButton('Approve', `Approve step ${s.id}?`, (comment) => api('DecideApproval', { run_id: run.id, step_id: s.id, approve: true, comment }), { comment: true, name: 'approve', after: refetch }),
        actionButton('Reject', `Reject step ${s.id}? The step fails.`, (comment) => api('DecideApproval', { run_id: run.id, step_id: s.id, approve: false, comment }), { comment: true, danger: true, name: 'reject', after: refetch }));
    }
    const attempts = el('table', { class: 'small' },
      el('thead', {}, el('tr', {}, ['#', 'Agent', 'State', 'Exit', 'Class', 'Duration'].map((h) => el('th', {}, h)))),
      el('tbody', {}, (s.attempts || []).map((a) => el('tr', {},
        el('td', {}, String(a.number)),
        el('td', {}, a.agent_name || a.agent_id),
        el('td', {}, badge(attemptState(a.state)), a.error ? el('div', { class: 'muted' }, a.error) : null),
        el('td', {}, a.exit_code === undefined || a.exit_code === null ? '—' : String(a.exit_code)),
        el('td', {}, stateName(a.failure_class, 'FAILURE_CLASS_') === 'unspecified' ? '—' : stateName(a.failure_class, 'FAILURE_CLASS_')),
        el('td', {}, fmtDuration(span(a.started_at || a.assigned_at, a.finished_at)))))));
    const waiting = whyWaiting(s);
    const keepLog = !reopenLog && panel.dataset.step === s.id ? panel.querySelector('.log') : null;
    panel.dataset.step = s.id;
    put(panel, 
      el('h2', {}, s.id),
      el('div', {}, badge(st), ' ', el('span', { class: 'muted' }, `tool ${s.tool}${s.kind ? ', kind ' + s.kind : ''}`)),
      waiting ? el('p', { class: 'reason', id: 'step-reason' }, waiting) : null,
      actions,
      el('h2', {}, 'Attempts'),
      (s.attempts || []).length ? attempts : el('p', { class: 'muted' }, 'None yet.'),
      s.tool === 'approval' ? reviewView(run, s.id) : null,
      s.result !== undefined && s.result !== null ? [el('h2', {}, 'Outputs'), el('pre', { class: 'json', id: 'step-outputs' }, JSON.stringify(s.result, null, 2))] : null,
      keepLog || logView(s));
  }

  function whyWaiting(s) {
    const st = stepState(s.state);
    if (st === 'retry_wait' && s.next_attempt_at) return `${s.reason ? s.reason + ' — ' : ''}next attempt at ${fmtTime(s.next_attempt_at)}`;
    if (s.reason) return s.reason;
    if (st === 'waiting') {
      const open = (s.needs || []).filter((d) => !DONE_STEP.has(stepState(state.steps.get(d)?.state)));
      if (open.length) return `waiting for ${open.join(', ')}`;
    }
    return '';
  }

  /** The latest attempt's output, followed live with its line breaks, searchable. */
  function logView(s) {
    if (state.logFeed) state.logFeed.stop();
    const attempts = s.attempts || [];
    const box = el('div', { class: 'log' });
    if (!attempts.length) return box;
    const latest = attempts[attempts.length - 1];
    const pre = el('pre', { id: 'log', 'aria-label': 'Output' });
    const find = el('input', { type: 'search', id: 'log-search', placeholder: 'search the output' });
    const hits = el('span', { class: 'muted small' });
    let text = '';
    let seq = 0;
    const decoder = new TextDecoder();
    const draw = () => {
      const q = find.value;
      const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      if (!q) {
        pre.textContent = text;
        hits.textContent = '';
      } else {
        // Matching lines only, the match marked.
        const lines = text.split('\n').filter((l) => l.includes(q));
        put(pre, ...lines.flatMap((l) => {
          const parts = l.split(q);
          return [...parts.flatMap((p, i) => (i ? [el('mark', {}, q), p] : [p])), '\n'];
        }));
        hits.textContent = `${lines.length} line${lines.length === 1 ? '' : 's'}`;
      }
      if (atBottom) pre.scrollTop = pre.scrollHeight;
    };
    find.addEventListener('input', draw);
    const copy = el('button', { type: 'button', id: 'log-copy', onclick: async () => {
      try {
        await navigator.clipboard.writeText(text);
        toast('Output copied', 'good');
      } catch (e) {
        toast('Cannot copy: ' + e.message, 'bad');
      }
    } }, 'Copy');
    box.append(el('h2', {}, `Output of attempt ${latest.number}`), el('div', { class: 'logbar' }, find, hits, copy), pre);
    const bytes = (b64) => Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    state.logFeed = new Feed('GetLogs',
      () => ({ run_id: state.run.id, step_id: s.id, attempt: latest.number, follow: true, from_seq: seq + 1 }),
      (chunk) => {
        seq = Number(chunk.seq);
        text += decoder.decode(bytes(chunk.data), { stream: true });
        draw();
      });
    return box;
  }

  function applyEvent(ev) {
    const seq = Number(ev.seq);
    if (seq <= state.lastSeq) return;
    state.lastSeq = seq;
    if (!state.run) return;
    state.run.state = ev.run_state;
    if (ev.progress) state.run.progress = ev.progress;
    const step = ev.step_id && state.steps.get(ev.step_id);
    if (step && ev.step_state && ev.step_state !== 'STEP_STATE_UNSPECIFIED') {
      step.state = ev.step_state;
      const node = graphBox.querySelector(`[data-node="${CSS.escape(step.id)}"]`);
      if (node) {
        const st = stepState(step.state);
        node.setAttribute('class', `node s-${st}${state.selected === step.id ? ' selected' : ''}`);
        node.dataset.state = st;
        node.querySelector('rect').setAttribute('fill', stateColour(st));
        node.querySelector('text').textContent = `${short(step.id, 16)} · ${st.replace(/_/g, ' ')}`;
      }
    }
    if (!step && ev.step_id) {
      // A step that was not there (a for_each expansion): the next fetch brings it.
      refetch();
      return;
    }
    renderHead();
    refetch();
  }

  let feed = null;
  fetchRun().then((ok) => {
    if (!ok) return;
    feed = new Feed('WatchRun', () => ({ run_id: runId, from_seq: state.lastSeq + 1 }), applyEvent, { onEnd: () => refetch() });
  });
  return {
    stop: () => {
      if (feed) feed.stop();
      if (state.logFeed) state.logFeed.stop();
    },
  };
}

/**
 * What an approval step puts before its approver: the patches of the coding (aider)
 * steps above it, each under a line naming its step and commit (as `runs show` and
 * the report show it).
 */
function reviewDiff(run, gateId) {
  const byId = new Map(run.steps.map((s) => [s.id, s]));
  const seen = new Set();
  const todo = [...(byId.get(gateId)?.needs || [])];
  while (todo.length) {
    const id = todo.pop();
    if (seen.has(id)) continue;
    seen.add(id);
    todo.push(...(byId.get(id)?.needs || []));
  }
  let out = '';
  for (const s of run.steps) {
    const o = s.result;
    if (s.tool !== 'aider' || !seen.has(s.id) || !o || typeof o.patch !== 'string' || !o.patch) continue;
    out += `# step ${s.id} (commit ${o.commit || ''})\n${o.patch}${o.patch.endsWith('\n') ? '' : '\n'}`;
    if (o.patch_truncated) out += "# ... the patch is cut here; the whole of it is the step's baton.patch artifact\n";
  }
  return out;
}

function reviewView(run, gateId) {
  const diff = reviewDiff(run, gateId);
  if (!diff) return null;
  const pre = el('pre', { class: 'diff', id: 'review' });
  for (const line of diff.replace(/\n$/, '').split('\n')) {
    const kind = line.startsWith('+') && !line.startsWith('+++') ? 'add' : line.startsWith('-') && !line.startsWith('---') ? 'del' : line.startsWith('# step') ? 'head' : '';
    pre.append(el('span', { class: kind }, line), '\n');
  }
  return [el('h2', {}, 'Changes to review'), pre];
}

/** "$3.10 of $5.00, 4900 tokens", or '' for a run that reported nothing and has no budget. */
function costText(run) {
  const cost = Number(run.cost_usd || 0);
  const tokens = Number(run.tokens || 0);
  const b = run.budget;
  if (!cost && !tokens && !b) return '';
  let t = '$' + cost.toFixed(2);
  if (b && b.max_cost_usd !== undefined && b.max_cost_usd !== null) t += ' of $' + Number(b.max_cost_usd).toFixed(2);
  t += `, ${tokens} tokens`;
  if (b && b.max_tokens !== undefined && b.max_tokens !== null) t += ` of ${b.max_tokens}`;
  return t;
}

function short(s, n) {
  return s.length > n ? s.slice(0, n - 1) + '…' : s;
}

const COLOURS = {
  succeeded: '#2f9e5b', reused: '#2f9e5b', cached: '#2f9e5b', failed: '#c93c37', timed_out: '#c93c37', lost: '#c93c37',
  running: '#1f6feb', assigned: '#5b8def', retry_wait: '#c98a12', awaiting_approval: '#c98a12', quarantined: '#c98a12',
  canceled: '#7a7f8a', skipped: '#7a7f8a', waiting: '#98a2b3', ready: '#6d7c93', pending: '#98a2b3',
};
function stateColour(s) {
  return COLOURS[s] || '#98a2b3';
}

// ----- agents and breakers -----

/** A table kept current: loaded on each (re)connection and after events. */
function liveTable(main, title, id, load) {
  const box = el('div', { id });
  main.append(el('h1', {}, title), box);
  const refresh = throttle(async () => {
    try {
      put(box, await load(refresh));
    } catch (e) {
      if (e.status !== 401) put(box, el('p', { class: 'reason' }, e.message));
    }
  }, () => 1000);
  const feed = new Feed('WatchRuns', () => ({ run_events_only: false }), () => refresh(), { onOpen: () => refresh() });
  // Relative times ("3s ago") are redrawn from what was loaded.
  const tick = setInterval(() => {
    for (const t of box.querySelectorAll('[data-ago]')) t.textContent = ago(t.dataset.ago);
  }, 1000);
  return { stop: () => { feed.stop(); clearInterval(tick); } };
}

function agentsView(main) {
  return liveTable(main, 'Agents', 'agents', async (refresh) => {
    const res = await api('ListAgents', {});
    const agents = res.agents || [];
    if (!agents.length) return el('p', { class: 'muted' }, 'No agent has connected.');
    return el('table', {},
      el('thead', {}, el('tr', {}, ['Agent', 'State', 'Version', 'Labels', 'Tools', 'Slots', 'Last heartbeat', ''].map((h) => el('th', {}, h)))),
      el('tbody', {}, agents.map((a) => {
        const st = stateName(a.state, 'AGENT_STATE_');
        return el('tr', { 'data-agent': a.name },
          el('td', {}, a.name, el('div', { class: 'muted small' }, a.id)),
          el('td', {}, badge(st), a.draining ? el('div', {}, badge('draining')) : null),
          el('td', {}, a.version),
          el('td', {}, Object.entries(a.labels || {}).map(([k, v]) => el('span', { class: 'tag' }, `${k}=${v}`))),
          el('td', {}, (a.tools || []).map((t) => el('span', { class: 'tag' }, t.version ? `${t.name} ${t.version}` : t.name))),
          el('td', {}, `${a.slots_used || 0}/${a.slots || 0}`),
          el('td', { 'data-ago': a.last_seen || '' }, ago(a.last_seen)),
          el('td', {}, a.draining
            ? actionButton('Undrain', `Let agent ${a.name} take work again?`, () => api('DrainAgent', { agent: a.name, undo: true }), { name: 'undrain', after: refresh })
            : actionButton('Drain', `Drain agent ${a.name}? It finishes its attempts and takes no new work.`, () => api('DrainAgent', { agent: a.name }), { name: 'drain', after: refresh })));
      })));
  });
}

function breakersView(main) {
  return liveTable(main, 'Circuit breakers', 'breakers', async (refresh) => {
    const res = await api('ListBreakers', {});
    const list = res.breakers || [];
    if (!list.length) return el('p', { class: 'muted' }, 'No breaker has counted a failure.');
    return el('table', {},
      el('thead', {}, el('tr', {}, ['Tool', 'Agent', 'State', 'Since', 'Failures in a row', 'Probe at', ''].map((h) => el('th', {}, h)))),
      el('tbody', {}, list.map((b) => {
        const st = stateName(b.state, 'BREAKER_STATE_');
        return el('tr', { 'data-breaker': b.tool + '/' + (b.agent_name || '') },
          el('td', {}, b.tool),
          el('td', {}, b.agent_name || 'all agents'),
          el('td', {}, badge(st)),
          el('td', { 'data-ago': b.opened_at || '' }, b.opened_at ? ago(b.opened_at) : '—'),
          el('td', {}, String(b.consecutive_failures || 0)),
          el('td', {}, fmtTime(b.half_open_at)),
          el('td', {}, st === 'closed' ? null : actionButton('Reset', `Reset the ${b.tool} breaker${b.agent_name ? ' of ' + b.agent_name : ''}?`,
            () => api('ResetBreaker', { tool: b.tool, agent: b.agent_name || '' }), { name: 'reset', after: refresh })));
      })));
  });
}

// ---------- start ----------

async function start() {
  document.getElementById('login-form').addEventListener('submit', async (e) => {
    const t = document.getElementById('login-token').value.trim();
    if (!t) {
      e.preventDefault();
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, t);
    if (await whoami()) route();
    else showLogin('That token was refused.');
  });
  document.getElementById('logout').addEventListener('click', () => {
    sessionStorage.removeItem(TOKEN_KEY);
    location.reload();
  });
  document.addEventListener('click', (e) => {
    const a = e.target.closest && e.target.closest('a[href^="/"]');
    if (!a || e.ctrlKey || e.metaKey || e.shiftKey || e.button !== 0) return;
    e.preventDefault();
    go(a.getAttribute('href'));
  });
  window.addEventListener('popstate', route);
  if (await whoami()) route();
}

document.addEventListener('DOMContentLoaded', start);
