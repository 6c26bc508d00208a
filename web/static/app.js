// Progress polling and client-side table sorting. No inline scripts: the CSP forbids them.
"use strict";

const POLL_MS = 2000;

function sizeBar(container, p) {
  const total = p.total || 0;
  const pct = total ? Math.floor(((p.done + p.failed) * 100) / total) : 100;
  const bar = container.querySelector("[data-progress-bar]");
  if (!bar) return;
  bar.setAttribute("aria-valuenow", String(pct));
  bar.querySelector('[data-seg="done"]').style.width = (total ? (p.done * 100) / total : 0) + "%";
  bar.querySelector('[data-seg="failed"]').style.width = (total ? (p.failed * 100) / total : 0) + "%";
  const text = container.querySelector("[data-progress-text]");
  if (text) text.textContent = `${pct}% · ${p.done} done · ${p.failed} failed · ${p.total} total`;
}

function initialSizes() {
  document.querySelectorAll(".seg[data-w]").forEach((seg) => { seg.style.width = seg.dataset.w + "%"; });
}

async function fetchJson(url) {
  const resp = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
  if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
  return resp.json();
}

function showRetraining(box, run) {
  if (!box) return;
  if (run) {
    box.textContent = `Retraining: epoch ${run.epoch} of ${run.epochs_total}`;
    box.hidden = false;
    box.dataset.active = "true";
  } else {
    box.hidden = true;
    box.textContent = "";
    box.dataset.active = "false";
  }
}

// Dashboard: one request for every unfinished batch (plus the retraining run in progress, if any);
// stop when no batch is left running and no retraining runs.
function pollDashboard(table, retrainBox) {
  const pending = () =>
    table ? Array.from(table.querySelectorAll('tr[data-batch-id][data-finished="false"]')) : [];
  const retraining = () => retrainBox && retrainBox.dataset.active === "true";
  const busy = () => pending().length > 0 || retraining();
  const tick = async () => {
    const rows = pending();
    if (!rows.length && !retraining()) return;
    const ids = rows.map((r) => r.dataset.batchId).join(",");
    const base = retrainBox ? retrainBox.dataset.progressUrl : table.dataset.progressUrl;
    const sep = base.includes("?") ? "&" : "?";
    try {
      const data = await fetchJson(`${base}${sep}ids=${ids}`);
      rows.forEach((row) => {
        const p = data[row.dataset.batchId];
        if (!p) return;
        sizeBar(row, p);
        if (p.finished) row.dataset.finished = "true";
      });
      if (retrainBox && "retraining" in data) showRetraining(retrainBox, data.retraining);
    } catch (err) {
      console.warn("progress poll failed", err);
    }
    if (busy()) setTimeout(tick, POLL_MS);
  };
  if (busy()) setTimeout(tick, POLL_MS);
}

// Forms with data-confirm (promote, retrain, re-screen) ask before they are sent.
function confirmForms() {
  document.querySelectorAll("form[data-confirm]").forEach((form) => {
    form.addEventListener("submit", (ev) => {
      if (!window.confirm(form.dataset.confirm)) ev.preventDefault();
    });
  });
}

// Report: poll the batch; reload once it has finished so the rows show the predictions.
function pollReport(box) {
  if (box.dataset.finished === "true") return;
  const tick = async () => {
    try {
      const p = await fetchJson(box.dataset.progressUrl);
      sizeBar(box, p);
      if (p.finished) { window.location.reload(); return; }
    } catch (err) {
      console.warn("progress poll failed", err);
    }
    setTimeout(tick, POLL_MS);
  };
  setTimeout(tick, POLL_MS);
}

function sortable(table) {
  const headers = Array.from(table.querySelectorAll("thead th"));
  headers.forEach((th, col) => {
    if (!th.dataset.sort) return;
    th.addEventListener("click", () => {
      const asc = th.getAttribute("aria-sort") !== "ascending";
      headers.forEach((h) => h.removeAttribute("aria-sort"));
      th.setAttribute("aria-sort", asc ? "ascending" : "descending");
      const key = (tr) => {
        const td = tr.children[col];
        if (th.dataset.sort === "num") return parseFloat(td.dataset.value ?? td.textContent) || 0;
        return td.textContent.trim().toLowerCase();
      };
      const body = table.tBodies[0];
      const rows = Array.from(body.rows);
      rows.sort((a, b) => {
        const ka = key(a), kb = key(b);
        return (ka < kb ? -1 : ka > kb ? 1 : 0) * (asc ? 1 : -1);
      });
      rows.forEach((r) => body.appendChild(r));
    });
  });
}

document.addEventListener("DOMContentLoaded", () => {
  initialSizes();
  const dash = document.getElementById("batches");
  const retrainBox = document.getElementById("retraining");
  if (dash || retrainBox) pollDashboard(dash, retrainBox);
  confirmForms();
  const report = document.getElementById("report-progress");
  if (report) pollReport(report);
  document.querySelectorAll("table.sortable").forEach(sortable);
});
