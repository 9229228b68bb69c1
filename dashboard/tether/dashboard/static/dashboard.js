// Tether dashboard: live updates (one EventSource per page) and plots (uPlot, shipped in /static/vendor).
"use strict";
(function () {
  const COLOURS = ["#0b5cad", "#c2410c", "#176b2c", "#7e22ce", "#a4161a", "#0f766e", "#4d7c0f", "#9d174d"];
  const plots = {};

  function readJSON(id) {
    const el = document.getElementById(id);
    if (!el) return null;
    try { return JSON.parse(el.textContent || "null"); } catch (e) { return null; }
  }

  function width(el) { return Math.max(320, Math.min(el.clientWidth || 900, 1300)); }

  function options(data, el, xTime, yLabel) {
    const series = [{ label: xTime ? "time" : "round" }];
    data.series.forEach(function (s, i) {
      const stage = s.stage == null ? i : s.stage;
      const colour = COLOURS[stage % COLOURS.length];
      series.push({
        label: s.label,
        stroke: s.kind === "threshold" ? "#6b7280" : colour,
        width: s.kind === "succeeded" ? 2 : 1.5,
        dash: s.kind === "succeeded" ? [6, 3] : (s.kind === "threshold" ? [2, 4] : undefined),
        spanGaps: true,
        points: { show: !xTime },
      });
    });
    return {
      width: width(el), height: 260, series: series,
      scales: { x: { time: xTime } },
      axes: [{ label: xTime ? "time" : "round" }, { label: yLabel }],
      legend: { live: true },
    };
  }

  function draw(name, id, data, xTime, yLabel) {
    const el = document.getElementById(id);
    if (!el || typeof uPlot === "undefined") return;
    if (!data || !data.x || data.x.length === 0 || data.series.length === 0) {
      if (plots[name]) { plots[name].destroy(); delete plots[name]; }
      el.replaceChildren();
      el.dataset.points = "0";
      return;
    }
    const rows = [data.x].concat(data.columns);
    const shape = data.series.map(function (s) { return s.label; }).join("|");
    if (plots[name] && plots[name].shape === shape) {
      plots[name].setData(rows);
    } else {
      if (plots[name]) plots[name].destroy();
      el.replaceChildren();
      plots[name] = new uPlot(options(data, el, xTime, yLabel), rows, el);
      plots[name].shape = shape;
    }
    el.dataset.points = String(data.x.length);
  }

  function apply(msg) {
    const fragments = msg.fragments || {};
    Object.keys(fragments).forEach(function (id) {
      const el = document.getElementById(id);
      if (el) el.innerHTML = fragments[id];  // server-rendered, autoescaped HTML
    });
    if ("plot" in msg) draw("coverage", "coverage-plot", msg.plot, true, "devices");
    if ("fplot" in msg) draw("federated", "federated-plot", msg.fplot, false, "metric");
    document.body.dataset.updates = String(Number(document.body.dataset.updates || "0") + 1);
  }

  document.addEventListener("DOMContentLoaded", function () {
    draw("coverage", "coverage-plot", readJSON("coverage-data"), true, "devices");
    draw("federated", "federated-plot", readJSON("federated-data"), false, "metric");
    const url = document.body.dataset.live;
    if (!url) return;
    const source = new EventSource(url);
    source.onmessage = function (event) { apply(JSON.parse(event.data)); };
    source.onerror = function () {
      const status = document.getElementById("live-status");
      if (status) status.textContent = "Reconnecting…";
    };
    window.addEventListener("resize", function () {
      Object.keys(plots).forEach(function (k) {
        const el = plots[k].root.parentElement;
        plots[k].setSize({ width: width(el), height: 260 });
      });
    });
  });
})();
