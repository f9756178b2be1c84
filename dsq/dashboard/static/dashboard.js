// dsq dashboard: draws the curves from the JSON each page carries, and keeps the queue's progress live.
"use strict";

const COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                 "#bcbd22", "#17becf"];
const DASHES = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot"];

// plotly reads a few HTML tags in text: a label is shown as written, never as markup
function plain(text) {
  return String(text).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
}

function fade(colour, alpha) {
  const n = parseInt(colour.slice(1), 16);
  return `rgba(${n >> 16}, ${(n >> 8) & 255}, ${n & 255}, ${alpha})`;
}

function drawPlot(element) {
  const data = JSON.parse(document.getElementById(element.dataset.source).textContent);
  const methods = [...new Set(data.traces.map(t => t.method))];
  const sigmas = [...new Set(data.traces.filter(t => t.sigma != null).map(t => t.sigma))].sort((a, b) => a - b);
  const traces = [];
  for (const t of data.traces) {
    const colour = COLOURS[methods.indexOf(t.method) % COLOURS.length];
    if (t.kind === "band") {
      traces.push({x: t.x, y: t.low, mode: "lines", line: {width: 0, shape: "hv", color: colour},
                   hoverinfo: "skip", showlegend: false});
      traces.push({x: t.x, y: t.high, mode: "lines", fill: "tonexty", fillcolor: fade(colour, 0.15),
                   line: {width: 0, shape: "hv", color: colour}, hoverinfo: "skip", showlegend: false});
    } else if (t.kind === "curve") {
      const dash = t.sigma == null ? "solid" : DASHES[sigmas.indexOf(t.sigma) % DASHES.length];
      traces.push({x: t.x, y: t.y, name: plain(t.label), mode: "lines", line: {shape: "hv", color: colour, dash: dash,
                   width: 1.5}, hovertemplate: "r %{x:.3f}: %{y:.3f}<extra>" + plain(t.label) + "</extra>"});
    } else if (t.kind === "envelope") {
      traces.push({x: t.x, y: t.y, name: plain(t.label), mode: "lines", opacity: 0.35,
                   line: {shape: "hv", color: colour, width: 6}});
    } else if (t.kind === "point") {
      const bar = t.low ? {type: "data", symmetric: false, array: [t.high[0] - t.y[0]],
                           arrayminus: [t.y[0] - t.low[0]]} : undefined;
      traces.push({x: t.x, y: t.y, name: plain(t.label), mode: "markers", error_y: bar,
                   marker: {symbol: "diamond", size: 10, color: colour}});
    }
  }
  const layout = {margin: {t: 20, r: 10}, height: 420, hovermode: "closest",
                  xaxis: {title: {text: "radius (" + element.dataset.norm + ")"}, range: [0, data.end]},
                  yaxis: {title: {text: "certified accuracy"}, range: [0, 1.02]},
                  legend: {orientation: "v", x: 1.02, y: 1}};
  Plotly.newPlot(element, traces, layout, {displaylogo: false, responsive: true});
}

// an image's sequential test: its lower bound after each look, and the level p0 it had to reach
function drawTrace(element) {
  const data = JSON.parse(document.getElementById(element.dataset.source).textContent);
  const end = data.n.length ? data.n[data.n.length - 1] : 1;
  const traces = [{x: data.n, y: data.p_lower, name: "p̲A", mode: "lines+markers", marker: {size: 4},
                   line: {color: COLOURS[0]}, hovertemplate: "n %{x}: %{y:.4f}<extra></extra>"}];
  if (data.p0 != null) {
    traces.push({x: [0, end], y: [data.p0, data.p0], name: "p0 = Φ(r/σ)", mode: "lines",
                 line: {dash: "dash", color: COLOURS[3]}, hovertemplate: "p0 %{y:.4f}<extra></extra>"});
  }
  const layout = {margin: {t: 20, r: 10}, height: 320, hovermode: "closest",
                  xaxis: {title: {text: "estimation samples n"}, rangemode: "tozero"},
                  yaxis: {title: {text: "p̲A (lower bound on pA)"}, range: [0, 1.02]}};
  Plotly.newPlot(element, traces, layout, {displaylogo: false, responsive: true});
}

function poll(url, seconds) {
  async function once() {
    try {
      const answer = await fetch(url, {credentials: "same-origin"});
      if (answer.ok) {
        for (const job of await answer.json()) {
          const status = document.querySelector(`[data-status-of="${job.id}"]`);
          const progress = document.querySelector(`[data-progress-of="${job.id}"]`);
          if (status) status.textContent = job.status;
          if (progress) progress.textContent = job.progress;
        }
        document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
      }
    } catch (error) {
      document.getElementById("updated").textContent = "not updated: the dashboard does not answer";
    }
  }
  setInterval(once, seconds * 1000);
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll(".plot[data-source]").forEach(e => e.dataset.kind === "trace" ? drawTrace(e) : drawPlot(e));
  const live = document.body.dataset.poll;
  if (live) poll(live, Number(document.body.dataset.every || 2));
});
