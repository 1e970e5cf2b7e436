/*
 * Parallax web UI: setup → join → chat, plain JS, no framework.
 *
 * All URLs are relative, so the page works behind the scheduler (`parallax run`) and behind
 * `parallax chat`. Model output is rendered by markdown.js, which never parses it as HTML.
 */
(function () {
  "use strict";

  const KEY_STORAGE = "parallax-api-key";
  const $ = (id) => document.getElementById(id);

  const state = {
    page: null,            // "setup" | "join" | "chat"
    status: null,          // last cluster status (the `data` object)
    models: null,
    messages: [],          // the conversation, kept while the page lives
    controller: null,      // AbortController of the running request
    autoChatDone: false,   // moved to chat by itself once already
    pendingRetry: null,    // request to resend after an API key was entered
    joinCommand: null,
  };

  // ---------------------------------------------------------------- helpers

  function apiHeaders(extra) {
    const headers = Object.assign({}, extra || {});
    const key = sessionStorage.getItem(KEY_STORAGE);
    if (key) headers.Authorization = "Bearer " + key;
    return headers;
  }

  async function errorMessage(resp) {
    try {
      const body = await resp.json();
      if (body && typeof body.message === "string") return body.message;
    } catch (_) { /* not JSON */ }
    return "HTTP " + resp.status;
  }

  function text(tag, content, className) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    node.textContent = content == null ? "" : String(content);
    return node;
  }

  function showBanner(message, kind) {
    const b = $("banner");
    if (!message) { b.hidden = true; return; }
    b.textContent = message;
    b.className = "banner " + (kind || "info");
    b.hidden = false;
  }

  function fmtGB(x) {
    return typeof x === "number" ? (x >= 10 ? x.toFixed(0) : x.toFixed(1)) + " GB" : "?";
  }

  // ---------------------------------------------------------------- pages

  function showPage(page, byUser) {
    state.page = page;
    for (const name of ["setup", "join", "chat"]) {
      $("page-" + name).hidden = name !== page;
      $("tab-" + name).classList.toggle("active", name === page);
    }
    document.body.dataset.page = page;
    if (page === "setup") loadModels();
    if (page === "join") { loadJoinCommand(); renderJoin(); }
    if (page === "chat") { renderPanel(); $("prompt").focus(); }
    if (byUser && page !== "chat") state.autoChatDone = true;
    updateBanner();
  }

  function updateBanner() {
    const s = state.status;
    if (state.page !== "chat" || !s) { showBanner(null); return; }
    if (!s.model_name) showBanner("No model is chosen yet: open Setup.", "warn");
    else if (s.status !== "available") {
      showBanner(s.status === "rebalancing"
        ? "The cluster is rebalancing; requests may wait a moment."
        : "The cluster is not ready yet: " + (s.reason || "waiting for nodes."), "warn");
    } else if (s.rebalancing) {
      showBanner("Rebalancing: another pipeline is loading; the chat keeps working.", "info");
    } else showBanner(null);
  }

  // ---------------------------------------------------------------- status stream

  function onStatus(s) {
    const first = state.status === null;
    state.status = s;
    const badge = $("cluster-badge");
    badge.textContent = s.status || "unknown";
    badge.className = "badge " + (s.status || "");
    // the status shows the join command with the token only to the operator; the one fetched
    // from node/join/command (with the API key, if any) wins over it
    if (first) {
      if (!s.model_name) showPage("setup");
      else if (s.status === "available") { state.autoChatDone = true; showPage("chat"); }
      else showPage("join");
    } else if (state.page === "join" && s.status === "available" && !state.autoChatDone) {
      state.autoChatDone = true;
      showPage("chat");
    }
    if (state.page === "join") renderJoin();
    if (state.page === "chat") renderPanel();
    updateBanner();
  }

  function connectStatus() {
    fetch("cluster/status_json", { headers: apiHeaders() })
      .then((r) => (r.ok ? r.json() : null))
      .then((obj) => { if (obj && state.status === null) onStatus(obj.data || obj); })
      .catch(() => {});
    const source = new EventSource("cluster/status");
    source.onmessage = (ev) => {
      let obj;
      try { obj = JSON.parse(ev.data); } catch (_) { return; }
      if (obj && obj.object === "error") return;
      onStatus(obj.data || obj);
    };
    source.onerror = () => {
      const badge = $("cluster-badge");
      badge.textContent = "disconnected";
      badge.className = "badge down";
    };
  }

  // ---------------------------------------------------------------- setup

  async function loadModels() {
    if (state.models) return;
    const box = $("model-list");
    try {
      const resp = await fetch("model/list", { headers: apiHeaders() });
      if (!resp.ok) throw new Error(await errorMessage(resp));
      const body = await resp.json();
      state.models = body.data || [];
    } catch (err) {
      box.replaceChildren(text("p", "Could not load the models: " + err.message, "error"));
      return;
    }
    box.replaceChildren();
    state.models.forEach((m, i) => {
      const label = document.createElement("label");
      label.className = "model-option";
      const input = document.createElement("input");
      input.type = "radio";
      input.name = "model";
      input.value = m.name;
      input.checked = i === 0 || m.name === (state.status && state.status.model_name);
      label.appendChild(input);
      label.appendChild(text("span", m.name, "model-name"));
      const facts = [];
      if (m.memory_gb != null) facts.push("needs " + fmtGB(m.memory_gb));
      if (m.num_layers != null) facts.push(m.num_layers + " layers");
      label.appendChild(text("span", facts.join(" · "), "muted"));
      box.appendChild(label);
    });
    if (!state.models.length) box.appendChild(text("p", "The scheduler offers no models.", "error"));
  }

  async function submitSetup(ev) {
    ev.preventDefault();
    const chosen = document.querySelector('input[name="model"]:checked');
    const err = $("setup-error");
    err.hidden = true;
    if (!chosen) { err.textContent = "Choose a model."; err.hidden = false; return; }
    const body = {
      model_name: chosen.value,
      init_nodes_num: parseInt($("nodes-num").value, 10) || 1,
      is_local_network: document.querySelector('input[name="local"]:checked').value === "yes",
    };
    $("setup-submit").disabled = true;
    try {
      const resp = await fetch("scheduler/init", {
        method: "POST", headers: apiHeaders({ "Content-Type": "application/json" }),
        body: JSON.stringify(body),
      });
      if (!resp.ok) {
        const message = await errorMessage(resp);
        if (resp.status === 401) askForKey("Choosing the model needs the API key (" + message + ").");
        throw new Error(message);
      }
      state.autoChatDone = false;
      state.joinCommand = null;
      showPage("join");
    } catch (e) {
      err.textContent = "Setup failed: " + e.message;
      err.hidden = false;
    } finally {
      $("setup-submit").disabled = false;
    }
  }

  // ---------------------------------------------------------------- join

  async function loadJoinCommand() {
    try {
      const resp = await fetch("node/join/command", { headers: apiHeaders() });
      if (!resp.ok) return;
      const body = await resp.json();
      if (body.data && body.data.command) { state.joinCommand = body.data.command; renderJoin(); }
    } catch (_) { /* the status stream carries it too */ }
  }

  function loadText(node) {
    const max = (state.status && state.status.max_running_request) || 0;
    const running = node.running_requests || 0;
    return max ? running + " / " + max + " requests" : running + " requests";
  }

  function loadBar(node) {
    const max = (state.status && state.status.max_running_request) || 0;
    const bar = document.createElement("div");
    bar.className = "load-bar";
    const fill = document.createElement("div");
    fill.className = "load-fill";
    const share = max ? Math.min(1, (node.running_requests || 0) / max) : 0;
    fill.style.width = Math.round(share * 100) + "%";
    bar.appendChild(fill);
    return bar;
  }

  function layerText(node) {
    return node.start_layer != null && node.end_layer != null
      ? "layers [" + node.start_layer + ", " + node.end_layer + ")" : "no layers yet";
  }

  function downloadText(node) {
    const d = node.download;
    if (!d || !d.total_bytes) return "";
    const pct = Math.floor(100 * d.done_bytes / d.total_bytes);
    return "downloading " + pct + "% of " + (d.total_bytes / 1e6).toFixed(0) + " MB · " +
      (d.bytes_per_s / 1e6).toFixed(1) + " MB/s · ETA " + Math.round(d.eta_s) + " s";
  }

  function renderJoin() {
    const s = state.status || {};
    const command = state.joinCommand || s.node_join_command || "…";
    $("join-command").textContent = command;
    $("token-hidden").hidden = !command.includes("<token>");
    $("join-model").textContent = s.model_name || "the cluster";
    const notice = $("need-more");
    const nodes = s.node_list || [];
    if (s.need_more_nodes) {
      const want = s.init_nodes_num ? " (" + nodes.length + " of " + s.init_nodes_num + " joined)" : "";
      notice.textContent = "More nodes or memory are needed before the model can be served" + want +
        "." + (s.reason ? " " + s.reason : "");
      notice.hidden = false;
    } else if (s.status && s.status !== "available") {
      notice.textContent = "Status: " + s.status + "…";
      notice.hidden = false;
    } else notice.hidden = true;
    const cards = $("node-cards");
    cards.replaceChildren();
    if (!nodes.length) cards.appendChild(text("p", "No node has joined yet.", "muted"));
    for (const node of nodes) {
      const card = document.createElement("div");
      card.className = "card node-card";
      card.dataset.nodeId = node.node_id;
      card.appendChild(text("div", node.device_name || node.device || "node", "card-title"));
      card.appendChild(text("div", node.node_id, "muted small"));
      card.appendChild(text("div", (node.device || "?") + " · " + fmtGB(node.memory_gb)));
      card.appendChild(text("div", layerText(node)));
      if (downloadText(node)) card.appendChild(text("div", downloadText(node), "small"));
      card.appendChild(text("div", (node.status || "") + " · " + loadText(node), "small"));
      card.appendChild(loadBar(node));
      cards.appendChild(card);
    }
    $("go-chat").hidden = s.status !== "available";
  }

  async function copyCommand() {
    const command = $("join-command").textContent;
    const button = $("copy-command");
    try {
      await navigator.clipboard.writeText(command);
    } catch (_) {
      // no clipboard API (plain http on another host): select the text instead
      const range = document.createRange();
      range.selectNodeContents($("join-command"));
      const sel = window.getSelection();
      sel.removeAllRanges();
      sel.addRange(range);
      try { document.execCommand("copy"); } catch (_) { /* selected; the user copies */ }
    }
    button.textContent = "Copied";
    setTimeout(() => { button.textContent = "Copy"; }, 1500);
  }

  // ---------------------------------------------------------------- side panel

  function renderPanel() {
    const s = state.status || {};
    $("panel-model").textContent = s.model_name
      ? s.model_name + " · " + (s.status || "") : "no model yet";
    const box = $("pipelines");
    box.replaceChildren();
    const byId = {};
    for (const n of s.node_list || []) byId[n.node_id] = n;
    const pipelines = s.pipelines || [];
    if (!pipelines.length) box.appendChild(text("p", "No pipeline yet.", "muted"));
    pipelines.forEach((ids, k) => {
      const p = document.createElement("div");
      p.className = "pipeline";
      p.appendChild(text("div", "Pipeline " + (k + 1), "card-title"));
      const slowest = slowestStage(ids.map((id) => byId[id] || {}));
      ids.forEach((id, i) => {
        const n = byId[id] || { node_id: id };
        const row = document.createElement("div");
        row.className = "pipeline-node" + (i === slowest ? " slowest" : "");
        row.dataset.nodeId = id;
        row.appendChild(text("div", (n.device_name || n.device || id), "small strong"));
        row.appendChild(text("div", layerText(n) + " · " + loadText(n), "small"));
        const speed = typeof n.ms_per_token === "number"
          ? n.ms_per_token.toFixed(1) + " ms/token" + (i === slowest ? " · slowest" : "") : "";
        if (speed) row.appendChild(text("div", speed, "small stage-speed"));
        row.appendChild(loadBar(n));
        p.appendChild(row);
      });
      box.appendChild(p);
    });
  }

  // the stage with the most compute per token (from the requests' traces), in a pipeline of
  // two or more stages; -1 when none is known
  function slowestStage(nodes) {
    let slowest = -1;
    nodes.forEach((n, i) => {
      if (typeof n.ms_per_token !== "number") return;
      if (slowest < 0 || n.ms_per_token > nodes[slowest].ms_per_token) slowest = i;
    });
    return nodes.length > 1 ? slowest : -1;
  }

  // ---------------------------------------------------------------- chat

  function addUserMessage(content) {
    const div = text("div", content, "msg user");
    $("messages").appendChild(div);
    div.scrollIntoView({ block: "end" });
  }

  function newAssistantBubble() {
    const wrap = document.createElement("div");
    wrap.className = "msg assistant";
    wrap.dataset.state = "waiting";
    const details = document.createElement("details");
    details.className = "thinking";
    details.hidden = true;
    details.open = true;
    details.appendChild(text("summary", "Thinking…"));
    const thinkBody = text("div", "", "thinking-body");
    details.appendChild(thinkBody);
    const body = document.createElement("div");
    body.className = "content";
    body.appendChild(text("span", "…", "muted"));
    const metrics = text("div", "", "metrics");
    wrap.append(details, body, metrics);
    $("messages").appendChild(wrap);
    wrap.scrollIntoView({ block: "end" });
    return { wrap, details, thinkBody, body, metrics };
  }

  function setBusy(busy) {
    $("send").hidden = busy;
    $("stop").hidden = !busy;
    $("prompt").disabled = false;
  }

  function friendlyError(status, message) {
    if (status === 429) return "The cluster is busy; try again in a moment. (" + message + ")";
    if (status === 503) return "The cluster is not ready: " + message;
    if (status === 401) return "The API key is missing or wrong: " + message;
    return "Error " + (status || "") + ": " + message;
  }

  function askForKey(reason) {
    $("key-reason").textContent = reason || "This server requires an API key.";
    $("key-input").value = "";
    const dialog = $("key-dialog");
    if (typeof dialog.showModal === "function") dialog.showModal();
    else dialog.setAttribute("open", "");
    $("key-input").focus();
  }

  async function send(content) {
    if (state.controller) return;
    addUserMessage(content);
    state.messages.push({ role: "user", content });
    await runRequest();
  }

  async function runRequest() {
    const ui = newAssistantBubble();
    const controller = new AbortController();
    state.controller = controller;
    setBusy(true);
    let answer = "";
    let thinking = "";
    let serverMetrics = null;
    let usage = null;
    let firstAt = null;
    let finish = null;
    let scheduled = false;
    let collapsed = false;
    let thoughtFor = null;
    const started = performance.now();

    const paint = () => {
      scheduled = false;
      if (thinking) {
        ui.details.hidden = false;
        ui.thinkBody.textContent = thinking;
      }
      if (answer) {
        ui.body.replaceChildren(window.ParallaxMarkdown.render(answer));
        if (thinking && !collapsed) {
          collapsed = true;
          thoughtFor = performance.now() - started;
          ui.details.open = false; // the answer started: fold the reasoning away
          ui.details.querySelector("summary").textContent =
            "Thinking (" + (thoughtFor / 1000).toFixed(1) + " s)";
        }
      }
      ui.wrap.scrollIntoView({ block: "end" });
    };
    const schedule = () => { if (!scheduled) { scheduled = true; requestAnimationFrame(paint); } };
    const fail = (message) => {
      ui.wrap.dataset.state = "error";
      ui.body.replaceChildren(text("div", message, "error"));
    };

    try {
      const resp = await fetch("v1/chat/completions", {
        method: "POST",
        headers: apiHeaders({ "Content-Type": "application/json", Accept: "text/event-stream" }),
        body: JSON.stringify({
          messages: state.messages, stream: true, stream_options: { include_usage: true },
        }),
        signal: controller.signal,
      });
      if (!resp.ok) {
        const message = await errorMessage(resp);
        fail(friendlyError(resp.status, message));
        if (resp.status === 401) {
          state.pendingRetry = ui.wrap;
          askForKey("The server needs an API key (" + message + ").");
        }
        return;
      }
      ui.wrap.dataset.state = "streaming";
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      let done = false;
      while (!done) {
        const { value, done: ended } = await reader.read();
        if (ended) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          const data = block.split("\n").filter((l) => l.startsWith("data:"))
            .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
          if (!data) continue;
          if (data.trim() === "[DONE]") { done = true; break; }
          let chunk;
          try { chunk = JSON.parse(data); } catch (_) { continue; }
          if (chunk.object === "error") {
            fail(friendlyError(chunk.code, chunk.message || "error"));
            done = true;
            break;
          }
          if (chunk.usage) usage = chunk.usage;
          if (chunk.metrics) serverMetrics = chunk.metrics;
          for (const choice of chunk.choices || []) {
            const delta = choice.delta || {};
            if (delta.reasoning_content) thinking += delta.reasoning_content;
            if (delta.content) answer += delta.content;
            if ((delta.reasoning_content || delta.content) && firstAt === null) {
              firstAt = performance.now();
            }
            if (choice.finish_reason) finish = choice.finish_reason;
          }
          schedule();
        }
      }
      if (ui.wrap.dataset.state !== "error") ui.wrap.dataset.state = "done";
    } catch (err) {
      if (err && err.name === "AbortError") {
        ui.wrap.dataset.state = "stopped";
      } else {
        fail("Could not reach the server: " + (err && err.message ? err.message : err));
      }
    } finally {
      state.controller = null;
      setBusy(false);
      paint();
      if (ui.wrap.dataset.state !== "error") {
        if (!answer && !thinking) ui.body.replaceChildren(text("span", "(no answer)", "muted"));
        if (thinking && !collapsed) {
          collapsed = true;
          thoughtFor = thoughtFor || performance.now() - started;
          ui.details.open = false;
          ui.details.querySelector("summary").textContent =
            "Thinking (" + (thoughtFor / 1000).toFixed(1) + " s)";
        }
        const parts = [];
        const ttft = serverMetrics && serverMetrics.ttft_ms != null
          ? serverMetrics.ttft_ms : firstAt !== null ? firstAt - started : null;
        if (ttft != null) parts.push("TTFT " + Math.round(ttft) + " ms");
        let tps = serverMetrics && serverMetrics.tps != null ? serverMetrics.tps : null;
        if (tps == null && usage && usage.completion_tokens > 1 && firstAt !== null) {
          tps = (usage.completion_tokens - 1) / ((performance.now() - firstAt) / 1000);
        }
        if (tps != null) parts.push(tps.toFixed(1) + " tok/s");
        if (usage && usage.completion_tokens != null) parts.push(usage.completion_tokens + " tokens");
        if (ui.wrap.dataset.state === "stopped") parts.push("stopped");
        else if (finish && finish !== "stop") parts.push("finish: " + finish);
        ui.metrics.textContent = parts.join(" · ");
        if (answer) state.messages.push({ role: "assistant", content: answer });
      }
    }
  }

  function clearChat() {
    if (state.controller) state.controller.abort();
    state.messages = [];
    $("messages").replaceChildren();
  }

  // ---------------------------------------------------------------- wiring

  function init() {
    for (const name of ["setup", "join", "chat"]) {
      $("tab-" + name).addEventListener("click", () => showPage(name, true));
    }
    $("setup-form").addEventListener("submit", submitSetup);
    $("copy-command").addEventListener("click", copyCommand);
    $("go-chat").addEventListener("click", () => showPage("chat", true));
    $("chat-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const content = $("prompt").value.trim();
      if (!content || state.controller) return;
      $("prompt").value = "";
      send(content);
    });
    $("prompt").addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
        ev.preventDefault();
        $("chat-form").requestSubmit();
      }
    });
    $("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
    $("clear").addEventListener("click", clearChat);
    $("toggle-panel").addEventListener("click", () => {
      document.body.classList.toggle("panel-open");
    });
    // on a phone the panel is a drawer over the composer: a tap on it closes it
    $("side-panel").addEventListener("click", () => document.body.classList.remove("panel-open"));
    $("key-form").addEventListener("submit", () => {
      const key = $("key-input").value.trim();
      if (!key) return;
      sessionStorage.setItem(KEY_STORAGE, key);
      const failed = state.pendingRetry;
      state.pendingRetry = null;
      if (failed && !state.controller) { failed.remove(); runRequest(); }
      if (state.page === "join") loadJoinCommand();  // the key may reveal the join token
    });
    $("key-cancel").addEventListener("click", () => {
      state.pendingRetry = null;
      $("key-dialog").close();
    });
    connectStatus();
  }

  init();
})();
