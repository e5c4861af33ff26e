// deetune web UI, one for the agent and the fleet server: polls /api/topology and draws it with
// cytoscape, hosts and IDCs as groups; RED over time (/api/series) with uPlot; both from /static/vendor/.
// Everything that comes from the network is put in the page as text (textContent), never as HTML.
(function () {
  "use strict";

  const POLL_MS = 3000;
  const TOKEN_KEY = "deetune.token";
  const WINDOWS = ["5m", "15m", "1h", "6h", "24h"];

  const $ = (id) => document.getElementById(id);
  const graphEl = $("graph");
  const statusEl = $("status");
  const detailsEl = $("details");
  const nodeListEl = $("node-list");
  const hostListEl = $("host-list");
  const serviceInput = $("service-filter");
  const windowSelect = $("window-filter");

  const state = {
    token: null,
    service: "",
    window: "15m",
    data: null,        // last /api/topology answer
    hosts: [],         // [{name, idc, labels, reporting, …}]: the answer's, else /api/hosts (an agent)
    charts: [],        // uPlot instances in the details panel
    chartKey: "",      // what the charts show (a change fetches again)
    cy: null,
    shape: "",         // node and edge ids of what is drawn: a change re-runs the layout
    selected: null,    // {kind: "node"|"edge", id}
    known: new Set(),  // every service name seen, for the filter's suggestions
    seq: 0,
    timer: null,
  };

  // ---- token: from ?token= once, then kept for the tab (and removed from the address bar) ----

  function readToken() {
    const url = new URL(window.location.href);
    let token = url.searchParams.get("token");
    if (token) {
      try { window.sessionStorage.setItem(TOKEN_KEY, token); } catch (e) { /* storage disabled */ }
      url.searchParams.delete("token");
      window.history.replaceState(null, "", url.pathname + url.search + url.hash);
    } else {
      try { token = window.sessionStorage.getItem(TOKEN_KEY); } catch (e) { token = null; }
    }
    return token || null;
  }

  // ---- formatting ----

  function fmtRate(perSecond) {
    if (perSecond >= 100) return perSecond.toFixed(0);
    if (perSecond >= 1) return perSecond.toFixed(1);
    if (perSecond === 0) return "0";
    return perSecond.toFixed(2);
  }

  function fmtNs(ns) {
    if (ns === null || ns === undefined) return "–";
    if (ns < 1e3) return ns + " ns";
    if (ns < 1e6) return (ns / 1e3).toFixed(ns < 1e4 ? 1 : 0) + " µs";
    if (ns < 1e9) return (ns / 1e6).toFixed(ns < 1e7 ? 1 : 0) + " ms";
    return (ns / 1e9).toFixed(2) + " s";
  }

  function fmtBytes(n) {
    if (n === null || n === undefined) return "–";
    if (n < 1024) return n + " B";
    const units = ["KiB", "MiB", "GiB", "TiB"];
    let value = n / 1024, i = 0;
    while (value >= 1024 && i < units.length - 1) { value /= 1024; i += 1; }
    return value.toFixed(1) + " " + units[i];
  }

  function fmtTime(ns) {
    if (ns === null || ns === undefined) return "–";
    return new Date(ns / 1e6).toLocaleString();
  }

  function errorPct(edge) {
    return edge.requests ? (100 * edge.errors) / edge.requests : 0;
  }

  function rate(edge) {
    const seconds = state.data ? (state.data.until - state.data.since) / 1e9 : 0;
    return seconds > 0 ? edge.requests / seconds : 0;
  }

  function edgeId(edge) {
    return edge.client + " → " + edge.server + " " + edge.protocol + ":" + edge.port;
  }

  function instanceText(instance) {
    if (typeof instance === "string") return instance;
    const parts = [instance.id || instance.host + ":" + instance.pid];
    if (Array.isArray(instance.pids) && instance.pids.length) parts.push("pid " + instance.pids.join(", "));
    if (instance.reporting === false) parts.push("not reporting");
    if (instance.comm) parts.push(instance.comm);
    if (instance.container_name) parts.push("container " + instance.container_name);
    if (instance.pod) parts.push("pod " + (instance.namespace ? instance.namespace + "/" : "") + instance.pod);
    return parts.join(" · ");
  }

  // ---- DOM helpers ----

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "text") node.textContent = value;
      else if (key === "class") { if (value) node.className = value; }
      else node.setAttribute(key, value);
    }
    for (const child of children || []) node.appendChild(child);
    return node;
  }

  function table(rows) {
    return el("table", {}, rows.map(([label, value, cls]) =>
      el("tr", {}, [el("th", { text: label }), el("td", { text: String(value), class: cls || "" })])));
  }

  function setStatus(text, isError) {
    statusEl.textContent = text;
    statusEl.classList.toggle("error", Boolean(isError));
  }

  // ---- graph ----

  const CY_STYLE = [
    {
      selector: "node",
      style: {
        "shape": "round-rectangle",
        "width": 46,
        "height": 46,
        "background-color": "#2563eb",
        "border-width": 2,
        "border-color": "#1e40af",
        "label": "data(name)",
        "color": "#1d2430",
        "font-size": 12,
        "text-valign": "bottom",
        "text-halign": "center",
        "text-margin-y": 6,
        "text-background-color": "#f6f7f9",
        "text-background-opacity": 0.9,
        "text-background-padding": 2,
      },
    },
    {
      selector: "node[?external]",
      style: {
        "shape": "ellipse",
        "background-color": "#ffffff",
        "border-color": "#9aa4b2",
        "border-style": "dashed",
        "color": "#667085",
        "font-style": "italic",
      },
    },
    {
      selector: "edge",
      style: {
        "curve-style": "bezier",
        "width": "data(width)",
        "line-color": "data(color)",
        "target-arrow-color": "data(color)",
        "target-arrow-shape": "triangle",
        "arrow-scale": 1.1,
        "label": "data(label)",
        "font-size": 10,
        "color": "#344054",
        "text-wrap": "wrap",
        "text-background-color": "#ffffff",
        "text-background-opacity": 0.9,
        "text-background-padding": 2,
        "text-border-width": 1,
        "text-border-color": "#d0d5dd",
        "text-border-opacity": 1,
      },
    },
    {
      selector: "node.group",
      style: {
        "shape": "round-rectangle",
        "background-color": "#eef2f7",
        "background-opacity": 0.6,
        "border-width": 1,
        "border-color": "#98a2b3",
        "border-style": "solid",
        "label": "data(name)",
        "text-valign": "top",
        "text-halign": "center",
        "text-margin-y": -4,
        "font-size": 11,
        "color": "#475467",
        "padding": 14,
      },
    },
    { selector: "node.idc", style: { "background-color": "#fdf6e3", "border-color": "#d4a72c", "border-style": "dashed", "font-weight": "bold" } },
    { selector: "node.host.down", style: { "background-color": "#fde8e8", "border-color": "#dc2626", "color": "#b42318" } },
    { selector: "edge.cross-idc", style: { "line-style": "dashed" } },
    { selector: "node:selected", style: { "border-width": 4, "border-color": "#f59e0b" } },
    { selector: "edge:selected", style: { "line-color": "#f59e0b", "target-arrow-color": "#f59e0b", "width": 4 } },
  ];

  function edgeLabel(edge) {
    if (!edge.requests) {
      // No decoded request (plain TCP, or nothing but connections): show the connections.
      const failed = edge.connections_failed ? " · " + edge.connections_failed + " failed" : "";
      return edge.protocol + ":" + edge.port + "\n" + edge.connections_opened + " conn" + failed;
    }
    const pct = errorPct(edge);
    return fmtRate(rate(edge)) + " req/s\n" + (pct ? pct.toFixed(1) : "0") + "% err · p99 " + fmtNs(edge.latency_p99_ns);
  }

  function edgeColor(edge) {
    let pct = errorPct(edge);
    if (!edge.requests) {
      const tries = edge.connections_opened + edge.connections_failed;
      pct = tries ? (100 * (edge.connections_failed + edge.resets)) / tries : 0;
    }
    return pct >= 5 ? "#dc2626" : pct > 0 ? "#f97316" : "#98a2b3";
  }

  function edgeElement(edge) {
    return {
      group: "edges",
      data: {
        id: edgeId(edge),
        source: edge.client,
        target: edge.server,
        label: edgeLabel(edge),
        width: Math.min(8, 1.5 + Math.log10(1 + rate(edge)) * 2),
        color: edgeColor(edge),
        edge: edge,
      },
      classes: edge.cross_idc ? "cross-idc" : "",
    };
  }

  function nodeHosts(node) {
    if (Array.isArray(node.hosts)) return node.hosts;
    const hosts = new Set();
    for (const instance of node.instances || []) if (instance && instance.host) hosts.add(instance.host);
    return Array.from(hosts);
  }

  function hostIdc(name) {
    const host = state.hosts.find((h) => h.name === name);
    return host ? host.idc || null : null;
  }

  // A service on one host sits in that host's box; on several hosts of one IDC, in the IDC's box.
  function nodeParent(node) {
    if (node.external) return undefined;
    const hosts = nodeHosts(node);
    if (hosts.length === 1) return "host:" + hosts[0];
    const idcs = new Set(hosts.map(hostIdc));
    if (hosts.length > 1 && idcs.size === 1 && !idcs.has(null)) return "idc:" + Array.from(idcs)[0];
    return undefined;
  }

  function nodeElement(node) {
    return { group: "nodes", data: { id: node.name, name: node.name, external: Boolean(node.external), node: node,
                                     parent: nodeParent(node) } };
  }

  function groupElements() {
    const groups = [];
    const idcs = new Set();
    for (const host of state.hosts) {
      if (host.idc) idcs.add(host.idc);
      groups.push({ group: "nodes", classes: "group host" + (host.reporting === false ? " down" : ""),
                    data: { id: "host:" + host.name, name: host.name + (host.reporting === false ? " (not reporting)" : ""),
                            parent: host.idc ? "idc:" + host.idc : undefined, host: host } });
    }
    for (const idc of idcs) {
      groups.push({ group: "nodes", classes: "group idc", data: { id: "idc:" + idc, name: "IDC " + idc, idc: idc } });
    }
    return groups;
  }

  // Hosts side by side as columns, grouped by IDC; each host's services stacked in its box;
  // services of several hosts of one IDC under their IDC's hosts; the rest (external endpoints,
  // services across IDCs) in a row above.
  function groupedPositions(cy) {
    const COLUMN = 190, ROW = 110, GAP = 70;
    const positions = {};
    const byName = (a, b) => a.id().localeCompare(b.id());
    const childrenOf = (id) => cy.nodes().filter((n) => n.data("parent") === id && !n.isParent()).sort(byName);
    const idcs = Array.from(new Set(state.hosts.map((h) => h.idc || ""))).sort();
    let x = 0;
    let deepest = 0;
    for (const idc of idcs) {
      const hosts = state.hosts.filter((h) => (h.idc || "") === idc).map((h) => h.name).sort();
      const first = x;
      let rows = 1;
      for (const host of hosts) {
        const children = childrenOf("host:" + host);
        children.forEach((node, i) => { positions[node.id()] = { x: x, y: i * ROW }; });
        if (!children.length) positions["host:" + host] = { x: x, y: 0 };
        rows = Math.max(rows, children.length);
        x += COLUMN;
      }
      if (idc) {
        const shared = childrenOf("idc:" + idc);
        const middle = (first + x - COLUMN) / 2;
        shared.forEach((node, i) => { positions[node.id()] = { x: middle + (i - (shared.length - 1) / 2) * COLUMN * 0.8,
                                                               y: (rows + 0.6) * ROW }; });
        if (shared.length) rows += 1.6;
      }
      deepest = Math.max(deepest, rows);
      x += GAP;
    }
    const loose = cy.nodes().filter((n) => !n.isParent() && !n.data("parent")).sort(byName);
    const width = Math.max(x - GAP - COLUMN, 0);
    loose.forEach((node, i) => {
      const spread = loose.length > 1 ? (i / (loose.length - 1)) * width : width / 2;
      positions[node.id()] = { x: spread, y: -1.8 * ROW };
    });
    return positions;
  }

  function ensureCy() {
    if (state.cy || typeof window.cytoscape !== "function") return state.cy;
    state.cy = window.cytoscape({
      container: graphEl,
      style: CY_STYLE,
      minZoom: 0.2,
      maxZoom: 3,
    });
    state.cy.on("tap", "node", (evt) => {
      const id = evt.target.id();
      if (id.startsWith("host:")) select({ kind: "host", id: id });
      else if (!id.startsWith("idc:")) select({ kind: "node", id: id });
    });
    state.cy.on("tap", "edge", (evt) => select({ kind: "edge", id: evt.target.id() }));
    state.cy.on("tap", (evt) => { if (evt.target === state.cy) select(null); });
    return state.cy;
  }

  function drawGraph(data) {
    const cy = ensureCy();
    if (!cy) return;
    const nodes = data.nodes.map(nodeElement);
    // An edge whose end is missing from nodes would make cytoscape throw: add the end.
    const names = new Set(data.nodes.map((n) => n.name));
    for (const edge of data.edges) {
      for (const name of [edge.client, edge.server]) {
        if (!names.has(name)) { names.add(name); nodes.push(nodeElement({ name: name, instances: [], external: true })); }
      }
    }
    const edges = data.edges.map(edgeElement);
    const groups = groupElements();
    const all = groups.concat(nodes);
    const shape = all.map((n) => n.data.id + "<" + (n.data.parent || "") + (n.classes || "")).sort().join("\n") +
      "\n\n" + edges.map((e) => e.data.id).sort().join("\n");
    if (shape !== state.shape) {
      state.shape = shape;
      cy.elements().remove();
      cy.add(all.concat(edges));
      if (groups.length) {
        cy.layout({ name: "preset", positions: groupedPositions(cy), padding: 40, animate: false }).run();
      } else {
        const roots = cy.nodes().filter((n) => n.indegree(false) === 0);
        cy.layout({
          name: "breadthfirst",
          directed: true,
          roots: roots.length ? roots : undefined,
          padding: 40,
          spacingFactor: 1.3,
          animate: false,
        }).run();
      }
      cy.fit(undefined, 40);
    } else {
      cy.batch(() => {
        for (const item of all.concat(edges)) cy.getElementById(item.data.id).data(item.data);
      });
    }
    if (state.selected) {
      const selected = cy.getElementById(state.selected.id);
      if (selected.nonempty()) { cy.elements().unselect(); selected.select(); }
    }
  }

  // ---- lists and details ----

  function renderNodeList(data) {
    const edgesBy = new Map();
    for (const edge of data.edges) {
      for (const name of [edge.client, edge.server]) edgesBy.set(name, (edgesBy.get(name) || 0) + 1);
    }
    const items = data.nodes.slice().sort((a, b) => a.name.localeCompare(b.name)).map((node) => {
      const count = Array.isArray(node.instances) ? node.instances.length : 0;
      const li = el("li", { "data-name": node.name, class: node.external ? "external" : "" }, [
        el("span", { class: "name", text: node.name }),
        el("span", { class: "meta", text: node.external ? "external" : count + (count === 1 ? " instance" : " instances") }),
      ]);
      if (state.selected && state.selected.kind === "node" && state.selected.id === node.name) li.classList.add("selected");
      li.addEventListener("click", () => select({ kind: "node", id: node.name }));
      return li;
    });
    nodeListEl.replaceChildren(...items);
    $("node-count").textContent = "(" + data.nodes.length + ")";
    graphEl.dataset.nodeCount = String(data.nodes.length);
    graphEl.dataset.edgeCount = String(data.edges.length);
    graphEl.dataset.hostCount = String(state.hosts.length);
    graphEl.dataset.idcCount = String(new Set(state.hosts.map((h) => h.idc).filter(Boolean)).size);
    graphEl.dataset.loaded = "true";

    let empty = graphEl.querySelector(".empty");
    if (!data.nodes.length) {
      if (!empty) { empty = el("div", { class: "empty" }); graphEl.appendChild(empty); }
      empty.textContent = "No traffic seen in this time window.";
    } else if (empty) {
      empty.remove();
    }
  }

  function renderHostList() {
    const items = state.hosts.map((host) => {
      const meta = [host.idc ? "IDC " + host.idc : null, host.reporting === false ? "not reporting" : "reporting"]
        .filter(Boolean).join(" · ");
      const li = el("li", { "data-host": host.name, class: host.reporting === false ? "down" : "" }, [
        el("span", { class: "name", text: host.name }),
        el("span", { class: "meta", text: meta }),
      ]);
      li.addEventListener("click", () => select({ kind: "host", id: "host:" + host.name }));
      return li;
    });
    hostListEl.replaceChildren(...items);
    $("host-count").textContent = "(" + state.hosts.length + ")";
  }

  function renderSuggestions(data) {
    for (const node of data.nodes) state.known.add(node.name);
    const options = Array.from(state.known).sort().map((name) => el("option", { value: name }));
    $("service-options").replaceChildren(...options);
  }

  function nodeDetails(name) {
    const data = state.data;
    const node = data.nodes.find((n) => n.name === name) || { name: name, instances: [], external: true };
    const incoming = data.edges.filter((e) => e.server === name);
    const outgoing = data.edges.filter((e) => e.client === name);
    const sum = (edges, key) => edges.reduce((total, e) => total + (e[key] || 0), 0);
    const instances = Array.isArray(node.instances) ? node.instances : [];
    const children = [
      el("h2", { text: "Service" }),
      el("h3", {}, [
        document.createTextNode(node.name),
        el("span", { class: node.external ? "tag external" : "tag", text: node.external ? "external" : "service" }),
      ]),
      table([
        ["requests in", sum(incoming, "requests") + " (" + sum(incoming, "errors") + " errors)"],
        ["requests out", sum(outgoing, "requests") + " (" + sum(outgoing, "errors") + " errors)"],
        ["callers", incoming.length ? incoming.map((e) => e.client).join(", ") : "–"],
        ["calls", outgoing.length ? outgoing.map((e) => e.server).join(", ") : "–"],
      ]),
      el("h2", { text: "Instances (" + instances.length + ")" }),
    ];
    if (instances.length) {
      children.push(el("ul", { id: "instance-list" }, instances.map((i) => el("li", { text: instanceText(i) }))));
    } else {
      children.push(el("p", { class: "hint", text: node.external ? "Not on a watched host." : "None in this window." }));
    }
    children.push(...chartSection("Served over time", { service: node.name }));
    return children;
  }

  function hostDetails(id) {
    const name = id.slice("host:".length);
    const host = state.hosts.find((h) => h.name === name);
    if (!host) return null;
    const labels = Object.entries(host.labels || {}).map(([k, v]) => k + "=" + v).join(", ");
    const services = state.data.nodes.filter((n) => nodeHosts(n).includes(name)).map((n) => n.name);
    return [
      el("h2", { text: "Host" }),
      el("h3", { text: host.name }),
      table([
        ["reporting", host.reporting === false ? "no" : "yes", host.reporting === false ? "bad" : ""],
        ["last report", host.last_seen ? fmtTime(host.last_seen) : "–"],
        ["IDC", host.idc || "–"],
        ["labels", labels || "–"],
        ["addresses", (host.addresses || []).join(", ") || "–"],
        ["services", services.join(", ") || "–"],
      ]),
    ];
  }

  // ---- charts (uPlot) ----

  function destroyCharts() {
    for (const chart of state.charts) chart.destroy();
    state.charts = [];
  }

  function chartSection(title, params) {
    const box = el("div", { class: "charts", "data-series": new URLSearchParams(params).toString() });
    loadCharts(box, params);
    return [el("h2", { text: title }), box];
  }

  async function loadCharts(box, params) {
    const query = new URLSearchParams(Object.assign({ window: state.window }, params));
    const answer = await getJson("/api/series?" + query.toString());
    if (!answer.ok) {
      box.replaceChildren(el("p", { class: "hint bad", text: "charts: " + answer.error }));
      return;
    }
    const points = answer.body.points;
    const step = answer.body.step / 1e9;
    const t = points.map((p) => p.t / 1e9);
    box.dataset.points = String(points.length);
    if (typeof window.uPlot !== "function") {
      box.replaceChildren(el("p", { class: "hint", text: "chart library missing (run `make ui`)" }));
      return;
    }
    const width = Math.max(240, (box.clientWidth || 300) - 4);
    const traffic = [t, points.map((p) => p.requests / step), points.map((p) => p.errors / step)];
    const latency = [t, points.map((p) => (p.latency_p50_ns === null ? null : p.latency_p50_ns / 1e6)),
                     points.map((p) => (p.latency_p99_ns === null ? null : p.latency_p99_ns / 1e6))];
    const rate = (u, values) => values.map((v) => (v === null ? "" : fmtRate(v)));
    box.replaceChildren();
    state.charts.push(new window.uPlot({
      width: width, height: 120, legend: { show: true },
      series: [{}, { label: "req/s", stroke: "#2563eb", width: 1.5 }, { label: "err/s", stroke: "#dc2626", width: 1.5 }],
      axes: [{}, { size: 44, values: rate }],
    }, traffic, box));
    state.charts.push(new window.uPlot({
      width: width, height: 120, legend: { show: true },
      series: [{}, { label: "p50 ms", stroke: "#16a34a", width: 1.5, spanGaps: true },
               { label: "p99 ms", stroke: "#f97316", width: 1.5, spanGaps: true }],
      axes: [{}, { size: 44 }],
    }, latency, box));
  }

  // ---- an edge's recent errors (from whichever host saw them) ----

  async function loadErrors(box, edge) {
    const query = new URLSearchParams({ service: edge.server, limit: "1000" });
    const answer = await getJson("/api/exchanges?" + query.toString());
    if (!answer.ok) {
      box.replaceChildren(el("p", { class: "hint bad", text: "errors: " + answer.error }));
      return;
    }
    const errors = answer.body.exchanges.filter((x) => x.error && x.client === edge.client && x.server === edge.server);
    box.dataset.errors = String(errors.length);
    if (!errors.length) {
      box.replaceChildren(el("p", { class: "hint", text: "No recent errors kept." }));
      return;
    }
    box.replaceChildren(el("ul", { class: "errors" }, errors.slice(0, 20).map((x) => el("li", {
      text: [fmtTime(x.ts), x.host ? "@" + x.host : null, x.method, x.target, String(x.status),
             x.error_message].filter((v) => v !== null && v !== undefined && v !== "").join(" · "),
    }))));
  }

  function edgeDetails(id) {
    const edge = state.data.edges.find((e) => edgeId(e) === id);
    if (!edge) return null;
    const pct = errorPct(edge);
    return [
      el("h2", { text: "Edge" }),
      el("h3", { text: edge.client + " → " + edge.server }),
      table([
        ["protocol", edge.protocol + " :" + edge.port],
        ["requests", edge.requests],
        ["rate", fmtRate(rate(edge)) + " req/s"],
        ["errors", edge.errors + " (" + pct.toFixed(1) + "%)", edge.errors ? "bad" : ""],
        ["latency p50", fmtNs(edge.latency_p50_ns)],
        ["latency p90", fmtNs(edge.latency_p90_ns)],
        ["latency p99", fmtNs(edge.latency_p99_ns)],
        ["latency avg", fmtNs(edge.latency_avg_ns)],
        ["bytes sent", fmtBytes(edge.bytes_sent)],
        ["bytes received", fmtBytes(edge.bytes_received)],
        ["connections", edge.connections_opened + " opened, " + edge.connections_failed + " failed",
          edge.connections_failed ? "bad" : ""],
        ["retransmits", edge.retransmits === null ? "–" : edge.retransmits],
        ["resets", edge.resets === null ? "–" : edge.resets, edge.resets ? "bad" : ""],
      ]),
    ].concat(fleetEdgeDetails(edge), [
      el("h2", { text: "Recent errors" }),
      (() => { const box = el("div", { id: "edge-errors" }); loadErrors(box, edge); return box; })(),
    ], chartSection("Over time", { client: edge.client, server: edge.server, protocol: edge.protocol,
                                   port: String(edge.port) }));
  }

  function fleetEdgeDetails(edge) {
    if (!edge.client_hosts) return [];
    const rows = [
      ["client hosts", edge.client_hosts.join(", ") || "–"],
      ["server hosts", edge.server_hosts.join(", ") || "–"],
      ["IDCs", (edge.idcs || []).map((p) => (p.client || "?") + " → " + (p.server || "?")).join(", ") || "–",
        edge.cross_idc ? "bad" : ""],
    ];
    if (edge.joined) {
      const server = edge.server_side;
      rows.push(["server-side p50 / p99", fmtNs(server.latency_p50_ns) + " / " + fmtNs(server.latency_p99_ns)]);
      rows.push(["network + queueing (avg)", fmtNs(edge.network_latency_avg_ns)]);
      rows.push(["server-side requests", server.requests + " (" + server.errors + " errors)" + (server.shared ? " shared" : "")]);
    }
    return [el("h2", { text: edge.cross_idc ? "Across hosts (cross-IDC)" : "Across hosts" }), table(rows)];
  }

  function renderDetails() {
    // Kept while the same thing stays selected: the charts and errors load once per selection.
    const key = state.selected ? state.selected.kind + ":" + state.selected.id + ":" + state.window : "";
    if (key && key === state.chartKey && detailsEl.childElementCount) return;
    state.chartKey = key;
    destroyCharts();
    let children = null;
    if (state.selected && state.data) {
      const kind = state.selected.kind;
      children = kind === "node" ? nodeDetails(state.selected.id)
        : kind === "host" ? hostDetails(state.selected.id) : edgeDetails(state.selected.id);
    }
    if (!children) {
      children = [el("h2", { text: "Details" }), el("p", { class: "hint", text: "Click a service or an edge." })];
    }
    detailsEl.replaceChildren(...children);
  }

  function select(selection) {
    state.selected = selection;
    if (state.cy) {
      state.cy.elements().unselect();
      if (selection) state.cy.getElementById(selection.id).select();
    }
    for (const li of nodeListEl.children) {
      li.classList.toggle("selected", Boolean(selection && selection.kind === "node" && li.dataset.name === selection.id));
    }
    renderDetails();
  }

  // ---- polling ----

  function query() {
    const params = new URLSearchParams({ window: state.window });
    if (state.service) params.set("service", state.service);
    return params;
  }

  async function getJson(path) {
    const headers = { Accept: "application/json" };
    if (state.token) headers.Authorization = "Bearer " + state.token;
    try {
      const response = await fetch(path, { headers: headers, cache: "no-store" });
      let body = null;
      try { body = await response.json(); } catch (e) { body = null; }
      if (!response.ok) {
        const message = body && body.error ? body.error : response.status + " " + response.statusText;
        return { ok: false, status: response.status, error: message };
      }
      return { ok: true, body: body };
    } catch (e) {
      return { ok: false, status: 0, error: e.message };
    }
  }

  async function refresh() {
    clearTimeout(state.timer);
    const seq = ++state.seq;
    try {
      const answer = await getJson("/api/topology?" + query().toString());
      let hosts = null;
      if (answer.ok && !Array.isArray(answer.body.hosts)) {
        const own = await getJson("/api/hosts?window=" + state.window);  // an agent: itself
        hosts = own.ok ? own.body.hosts : [];
      }
      if (seq !== state.seq) return;
      if (!answer.ok && answer.status === 0) throw new Error(answer.error);
      if (!answer.ok) {
        const hint = answer.status === 401 ? " — open the page as /?token=…" : "";
        setStatus("error: " + answer.error + hint, true);
      } else {
        const body = answer.body;
        state.data = body;
        state.hosts = hosts || body.hosts;
        renderHostList();
        renderNodeList(body);
        renderSuggestions(body);
        drawGraph(body);
        renderDetails();
        const edges = body.edges.length;
        setStatus(body.nodes.length + " services, " + edges + (edges === 1 ? " edge" : " edges") +
          " · updated " + new Date().toLocaleTimeString(), false);
        if (typeof window.cytoscape !== "function") setStatus("graph library missing (run `make ui`); list only", true);
      }
    } catch (e) {
      if (seq === state.seq) setStatus("agent unreachable: " + e.message, true);
    }
    if (seq === state.seq) state.timer = setTimeout(refresh, POLL_MS);
  }

  function syncAddress() {
    const params = query();
    if (state.window === "15m") params.delete("window");
    const search = params.toString();
    window.history.replaceState(null, "", window.location.pathname + (search ? "?" + search : ""));
  }

  function applyFilters() {
    state.service = serviceInput.value.trim();
    state.window = windowSelect.value;
    state.shape = "";  // new data: lay out again
    state.chartKey = "";
    syncAddress();
    refresh();
  }

  function init() {
    state.token = readToken();
    const params = new URLSearchParams(window.location.search);
    state.service = (params.get("service") || "").trim();
    state.window = WINDOWS.includes(params.get("window")) ? params.get("window") : "15m";
    // ?select=NAME opens a service's details, ?select=CLIENT → SERVER PROTO:PORT an edge's (links,
    // screenshots); it is not kept in the address.
    const selected = params.get("select");
    if (selected) state.selected = { kind: selected.includes(" → ") ? "edge" : "node", id: selected };
    serviceInput.value = state.service;
    windowSelect.value = state.window;
    serviceInput.addEventListener("change", applyFilters);
    windowSelect.addEventListener("change", applyFilters);
    $("clear-filter").addEventListener("click", () => { serviceInput.value = ""; applyFilters(); });
    $("filters").addEventListener("submit", (evt) => { evt.preventDefault(); applyFilters(); });
    window.addEventListener("resize", () => { if (state.cy) state.cy.resize(); });
    refresh();
  }

  init();
})();
