// remap dashboard: live view over server-sent events; no libraries, no build step.
// All text from the server goes in with textContent (job names and error messages are user data).
"use strict";

(function () {
  const CSRF = document.querySelector('meta[name="csrf"]').content;
  const WINDOW = 300; // seconds of throughput shown
  const $ = (id) => document.getElementById(id);
  let samples = []; // [time, done, failed]
  let lastSnapshot = null;

  // ------------------------------------------------------------------ formatting

  function num(n) {
    return Number(n).toLocaleString("en-US");
  }
  function rate(n) {
    if (n >= 1000) return num(Math.round(n));
    if (n >= 10) return n.toFixed(0);
    return n.toFixed(1);
  }
  function duration(s) {
    if (s === null || s === undefined) return "–";
    if (s > 0 && s < 1) return "<1s";
    s = Math.floor(Math.max(0, s));
    if (s < 60) return s + "s";
    if (s < 3600) return Math.floor(s / 60) + "m" + String(s % 60).padStart(2, "0") + "s";
    return Math.floor(s / 3600) + "h" + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + "m";
  }
  function bytes(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : n) + " " + units[i];
  }
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  // ------------------------------------------------------------------ actions

  function confirmThen(title, text, okLabel, action) {
    const dialog = $("confirm");
    $("confirm-title").textContent = title;
    $("confirm-text").textContent = text;
    $("confirm-ok").textContent = okLabel;
    dialog.returnValue = "";
    dialog.onclose = () => { if (dialog.returnValue === "ok") action(); };
    dialog.showModal();
  }

  function toast(text, bad) {
    const t = $("toast");
    t.textContent = text;
    t.className = "toast show" + (bad ? " bad" : "");
    clearTimeout(toast.timer);
    toast.timer = setTimeout(() => { t.className = "toast"; }, 3500);
  }

  async function post(path) {
    const reply = await fetch(path, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": CSRF },
      body: "{}",
    });
    let body = {};
    try { body = await reply.json(); } catch (e) { /* not JSON */ }
    if (!reply.ok) throw new Error(body.message || reply.status + " " + reply.statusText);
    return body;
  }

  function killJob(job) {
    const what = job.detached && job.kind ? "its driver stops its " + job.kind + " job, removes " +
      "its intermediate files and marks its result INCOMPLETE." :
      "queued work is dropped and its running calls are killed.";
    confirmThen("Kill job " + job.id + "?", "“" + job.name + "” stops now: " + what, "Kill job", async () => {
      try {
        const r = await post("/api/v1/jobs/" + job.id + "/kill");
        toast("Job " + r.job + " " + r.state);
      } catch (e) { toast("Kill failed: " + e.message, true); }
    });
  }

  async function undrainNode(node) {
    try {
      const r = await post("/api/v1/nodes/" + encodeURIComponent(node.id) + "/undrain");
      toast("Node " + r.host + " takes work again");
    } catch (e) { toast("Undrain failed: " + e.message, true); }
  }

  function drainNode(node) {
    confirmThen("Drain " + node.host + "?", "The node finishes the work it holds and takes no more " +
      "(it stays drained if it reconnects).", "Drain node", async () => {
      try {
        const r = await post("/api/v1/nodes/" + encodeURIComponent(node.id) + "/drain");
        toast("Node " + r.host + " is draining");
      } catch (e) { toast("Drain failed: " + e.message, true); }
    });
  }

  // ------------------------------------------------------------------ cards

  function renderCards(s, nodes) {
    $("c-nodes").textContent = num(s.nodes);
    const draining = nodes.filter((n) => n.draining).length;
    $("c-nodes-hint").textContent = draining ? draining + " draining" : s.cores + " cores in all";
    $("c-cores").textContent = s.cores_busy + " / " + s.cores;
    $("c-cores-bar").style.width = (s.cores ? (100 * s.cores_busy) / s.cores : 0) + "%";
    $("c-rate").textContent = rate(currentRate());
    $("c-jobs").textContent = num(s.jobs_running);
    $("c-queued").textContent = num(s.queued) + " arguments queued";
    $("c-done").textContent = num(s.tasks_done);
    $("c-failed").textContent = num(s.tasks_failed) + " failed · up " + duration(s.uptime);
  }

  // ------------------------------------------------------------------ chart

  function rates() {
    const out = [];
    for (let i = 1; i < samples.length; i++) {
      const [t0, d0, f0] = samples[i - 1];
      const [t1, d1, f1] = samples[i];
      const dt = t1 - t0;
      if (dt <= 0) continue;
      out.push([t1, Math.max(0, (d1 - d0) / dt), Math.max(0, (f1 - f0) / dt)]);
    }
    return out;
  }

  function currentRate() {
    const r = rates().slice(-3);
    if (!r.length) return 0;
    return r.reduce((a, p) => a + p[1] + p[2], 0) / r.length;
  }

  function renderChart() {
    const points = rates();
    const W = 1000, H = 180, top = 10;
    const now = samples.length ? samples[samples.length - 1][0] : 0;
    // show at least a minute, up to WINDOW, so a young server's chart is not a sliver
    const span = samples.length ? Math.min(WINDOW, Math.max(60, now - samples[0][0])) : 60;
    const start = now - span;
    const visible = points.filter((p) => p[0] >= start);
    let max = Math.max(1, ...visible.map((p) => p[1] + p[2]));
    const magnitude = Math.pow(10, Math.floor(Math.log10(max)));
    max = Math.ceil(max / magnitude) * magnitude;
    const x = (t) => ((t - start) / span) * W;
    const y = (v) => H - (v / max) * (H - top);
    const grid = $("chart-grid");
    grid.textContent = "";
    for (let i = 1; i <= 3; i++) {
      const line = document.createElementNS("http://www.w3.org/2000/svg", "line");
      line.setAttribute("x1", "0");
      line.setAttribute("x2", String(W));
      line.setAttribute("y1", String(y((max * i) / 4)));
      line.setAttribute("y2", String(y((max * i) / 4)));
      line.setAttribute("class", "gridline");
      grid.appendChild(line);
    }
    if (visible.length < 2) {
      $("chart-line").setAttribute("d", "");
      $("chart-area").setAttribute("d", "");
      $("chart-fail").setAttribute("d", "");
    } else {
      const line = visible.map((p, i) => (i ? "L" : "M") + x(p[0]).toFixed(1) + " " + y(p[1] + p[2]).toFixed(1)).join(" ");
      const fail = visible.map((p, i) => (i ? "L" : "M") + x(p[0]).toFixed(1) + " " + y(p[2]).toFixed(1)).join(" ");
      const area = line + " L" + x(visible[visible.length - 1][0]).toFixed(1) + " " + H + " L" + x(visible[0][0]).toFixed(1) + " " + H + " Z";
      $("chart-line").setAttribute("d", line);
      $("chart-area").setAttribute("d", area);
      $("chart-fail").setAttribute("d", visible.some((p) => p[2] > 0) ? fail : "");
    }
    $("chart-max").textContent = "max " + rate(max) + "/s";
    $("chart-note").textContent = "last " + duration(span);
  }

  // ------------------------------------------------------------------ jobs

  const jobRows = new Map();

  function jobRow(job) {
    let row = jobRows.get(job.id);
    if (row) return row;
    const tr = el("tr");
    tr.dataset.job = job.id;
    const cells = {};
    for (const key of ["id", "name", "state", "progress", "rate", "eta", "elapsed", "action"]) {
      cells[key] = el("td", ["rate", "eta", "elapsed", "action"].includes(key) ? "num" : "");
      tr.appendChild(cells[key]);
    }
    cells.id.className = "sub";
    const bar = el("div", "progress");
    const done = el("div", "done");
    const failed = el("div", "failed");
    bar.append(done, failed);
    const text = el("div", "progress-text");
    const left = el("span");
    const right = el("span");
    text.append(left, right);
    cells.progress.append(bar, text);
    const nameMain = el("div", "name");
    const nameSub = el("div", "sub");
    cells.name.append(nameMain, nameSub);
    const badge = el("span", "badge");
    cells.state.appendChild(badge);
    const kill = el("button", "btn danger", "Kill");
    kill.dataset.action = "kill";
    kill.addEventListener("click", () => killJob(row.job));
    cells.action.appendChild(kill);
    row = { tr, cells, bar, done, failed, left, right, nameMain, nameSub, badge, kill, job };
    jobRows.set(job.id, row);
    return row;
  }

  function renderJobs(jobs) {
    const body = $("jobs-body");
    const seen = new Set();
    const ordered = jobs.slice().sort((a, b) =>
      (a.state === "running" ? 0 : 1) - (b.state === "running" ? 0 : 1) || b.id - a.id);
    ordered.forEach((job, i) => {
      const row = jobRow(job);
      row.job = job;
      seen.add(job.id);
      const c = row.cells;
      c.id.textContent = "#" + job.id;
      row.nameMain.textContent = job.name;
      // a detached data or vertex job: its kind, its phase or superstep, its result once done
      const driven = job.detached && job.kind;
      const result = driven && job.summary ? " · result " + (job.summary.state || job.state) +
        (job.output ? " in " + job.output : "") : "";
      row.nameSub.textContent = job.mode + (driven ? " (detached)" : "") + (job.group ? " · group " + job.group : "") +
        (job.waiting ? " · " + job.waiting : "") + (job.message && job.state !== "running" ? " · " + job.message : "") +
        result;
      // a running job its console keeps open with nothing to do (an Executor's, between calls)
      const idle = job.idle && job.state === "running";
      row.badge.textContent = idle ? "idle" : job.state;
      row.badge.title = idle ? "idle, kept open for reuse" : "";
      row.badge.className = "badge " + (idle ? "idle" : job.state);
      const total = job.expected;
      const finished = job.done + job.failed;
      const known = total !== null && total !== undefined;
      row.bar.className = "progress" + (known ? "" : " unknown");
      // an unknown total: the share of what arrived so far, striped
      const denom = known ? Math.max(total, 1) : Math.max(job.received, 1);
      // a detached job that ended done is complete, whatever its last phase's report said
      const donePct = driven && job.state === "done" ? 100 : (100 * job.done) / denom;
      const failPct = (100 * job.failed) / denom;
      row.done.style.width = Math.min(100, donePct) + "%";
      row.failed.style.left = Math.min(100, donePct) + "%";
      row.failed.style.width = Math.min(100 - donePct, failPct) + "%";
      row.left.textContent = (driven && job.phase ? job.phase + " · " : "") +
        num(finished) + " / " + (known ? num(total) : num(job.received) + "+") +
        (job.failed ? " · " + num(job.failed) + " failed" : "");
      row.right.textContent = known && total ? ((100 * finished) / total).toFixed(1) + "%" : "";
      c.rate.textContent = driven ? "–" : rate(job.rate) + "/s";
      c.eta.textContent = job.state === "running" ? duration(job.eta) : "–";
      c.elapsed.textContent = duration(job.elapsed);
      row.kill.hidden = job.state !== "running";
      if (body.children[i] !== row.tr) body.insertBefore(row.tr, body.children[i] || null);
    });
    for (const [id, row] of jobRows) {
      if (!seen.has(id)) { row.tr.remove(); jobRows.delete(id); }
    }
    $("jobs-empty").hidden = jobs.length > 0;
    $("jobs").hidden = jobs.length === 0;
    const running = jobs.filter((j) => j.state === "running").length;
    $("jobs-note").textContent = jobs.length ? running + " running · " + (jobs.length - running) + " finished" : "";
  }

  // ------------------------------------------------------------------ nodes

  function renderNodes(nodes) {
    const box = $("nodes");
    box.textContent = "";
    for (const node of nodes) {
      const card = el("div", "node");
      card.dataset.node = node.id;
      const head = el("div", "node-head");
      const who = el("div");
      who.append(el("span", "node-host", node.host), el("span", "node-id", node.id.slice(0, 8)));
      const badge = el("span", "badge " + (node.draining ? "draining" : "ready"), node.draining ? "draining" : "ready");
      head.append(who, badge);
      const cores = el("div", "coremap");
      cores.title = node.busy + " of " + node.cores + " cores busy";
      for (let i = 0; i < node.cores; i++) cores.appendChild(el("div", "core" + (i < node.busy ? " busy" : "")));
      const stats = el("div", "stats");
      for (const [label, value] of [
        ["cores busy", node.busy + " / " + node.cores],
        ["load", node.load.toFixed(2)],
        ["memory", bytes(node.memory)],
      ]) {
        const s = el("div", "", label);
        s.prepend(el("b", "", value));
        stats.appendChild(s);
      }
      const foot = el("div", "node-foot");
      foot.append(el("span", "muted", num(node.tasks_done) + " batches · up " + duration(node.connected_for)));
      const drain = el("button", "btn", node.draining ? "Undrain" : "Drain");
      drain.dataset.action = node.draining ? "undrain" : "drain";
      drain.addEventListener("click", () => (node.draining ? undrainNode(node) : drainNode(node)));
      foot.appendChild(drain);
      card.append(head, cores, stats, foot);
      box.appendChild(card);
    }
    $("nodes-empty").hidden = nodes.length > 0;
    const cores = nodes.reduce((a, n) => a + n.cores, 0);
    $("nodes-note").textContent = nodes.length ? nodes.length + " nodes · " + cores + " cores" : "";
  }

  // ------------------------------------------------------------------ errors

  function renderErrors(errors) {
    const list = $("errors");
    list.textContent = "";
    for (const e of errors.slice().reverse()) {
      const li = el("li");
      const head = el("div", "err-head");
      const what = el("span");
      what.append(el("span", "err-type", e.type), document.createTextNode(" in job #" + e.job + " (" + e.job_name + ")"));
      head.append(what, el("span", "", e.index === null ? "" : "argument " + e.index));
      li.append(head, el("div", "err-msg", e.message));
      list.appendChild(li);
    }
    $("errors-empty").hidden = errors.length > 0;
  }

  // ------------------------------------------------------------------ stream

  function render(snap) {
    lastSnapshot = snap;
    const last = samples[samples.length - 1];
    if (!last || snap.sample[0] > last[0]) samples.push(snap.sample);
    const cutoff = snap.sample[0] - WINDOW - 5;
    while (samples.length && samples[0][0] < cutoff) samples.shift();
    renderCards(snap.summary, snap.nodes);
    renderChart();
    renderJobs(snap.jobs);
    renderNodes(snap.nodes);
    renderErrors(snap.errors);
  }

  function setLive(on, text) {
    $("live").className = "live " + (on ? "on" : "off");
    $("live-text").textContent = text;
  }

  function connect() {
    const source = new EventSource("/api/v1/events");
    source.addEventListener("open", () => setLive(true, "live"));
    source.addEventListener("history", (ev) => { samples = JSON.parse(ev.data); });
    source.addEventListener("snapshot", (ev) => {
      setLive(true, "live");
      render(JSON.parse(ev.data));
    });
    source.addEventListener("error", () => {
      setLive(false, source.readyState === EventSource.CLOSED ? "disconnected: open a new login link" : "reconnecting…");
    });
  }

  window.remapDashboard = { last: () => lastSnapshot };
  connect();
})();
