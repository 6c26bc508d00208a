// Progress polling, local times, the study viewer. No inline scripts: the CSP forbids them.
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
  document.querySelectorAll(".seg[data-w], .fill[data-w]").forEach((seg) => { seg.style.width = seg.dataset.w + "%"; });
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

// Times are printed in UTC by the server; show them in the reader's zone, with the zone's name.
function localTimes() {
  const fmt = new Intl.DateTimeFormat(undefined, {
    year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit", timeZoneName: "short",
  });
  document.querySelectorAll("time[datetime]").forEach((el) => {
    const d = new Date(el.getAttribute("datetime"));
    if (!Number.isNaN(d.getTime())) {
      el.title = el.textContent;
      el.textContent = fmt.format(d);
    }
  });
}

// Study page: window/level on a canvas copy of the pixels, zoom, the heat-map overlay, keyboard shortcuts.
function studyViewer(viewer) {
  const canvas = document.getElementById("image-canvas");
  const frame = document.getElementById("frame");
  const overlay = document.getElementById("heat-overlay");
  const toggle = document.getElementById("heat-toggle");
  const opacity = document.getElementById("heat-opacity");
  const width = document.getElementById("win-width");
  const level = document.getElementById("win-level");
  const zoom = document.getElementById("zoom");
  const stateText = document.getElementById("heat-state");
  let original = null;

  const applyWindow = () => {
    if (!original) return;
    const ctx = canvas.getContext("2d");
    const out = ctx.createImageData(original.width, original.height);
    const w = Number(width.value), l = Number(level.value);
    const lo = l - w / 2;
    const lut = new Uint8ClampedArray(256);
    for (let v = 0; v < 256; v++) lut[v] = Math.round(((v - lo) / w) * 255);
    const src = original.data, dst = out.data;
    for (let i = 0; i < src.length; i += 4) {
      const g = lut[src[i]];
      dst[i] = g; dst[i + 1] = g; dst[i + 2] = g; dst[i + 3] = 255;
    }
    ctx.putImageData(out, 0, 0);
  };
  const applyZoom = () => { frame.style.width = Number(zoom.value) * 100 + "%"; };
  const applyHeat = () => {
    if (!overlay) return;
    overlay.hidden = !(toggle && toggle.checked);
    overlay.style.opacity = String(Number(opacity.value) / 100);
    viewer.dataset.heatVisible = overlay.hidden ? "false" : "true";
  };
  if (canvas) {
    const img = new Image();
    img.onload = () => {
      canvas.width = img.naturalWidth;
      canvas.height = img.naturalHeight;
      const ctx = canvas.getContext("2d");
      ctx.drawImage(img, 0, 0);
      original = ctx.getImageData(0, 0, canvas.width, canvas.height);
      applyWindow();
      viewer.dataset.loaded = "true";
    };
    img.src = canvas.dataset.src;
    [width, level].forEach((el) => el.addEventListener("input", applyWindow));
    zoom.addEventListener("input", applyZoom);
    document.getElementById("reset-view").addEventListener("click", () => {
      width.value = 255; level.value = 128; zoom.value = 1;
      applyWindow(); applyZoom();
    });
  }
  if (toggle) toggle.addEventListener("change", applyHeat);
  if (opacity) opacity.addEventListener("input", applyHeat);
  applyHeat();

  // A pending heat map is polled until the worker has stored it.
  if (viewer.dataset.heatState === "pending" && overlay) {
    const poll = async () => {
      const resp = await fetch(viewer.dataset.heatmapUrl, { method: "HEAD", credentials: "same-origin" });
      if (resp.ok) {
        overlay.src = viewer.dataset.heatmapUrl;
        toggle.disabled = false;
        viewer.dataset.heatState = "ready";
        if (stateText) stateText.textContent = "";
        return;
      }
      setTimeout(poll, POLL_MS);
    };
    setTimeout(poll, POLL_MS);
  }

  const labels = document.getElementById("review-label");
  document.addEventListener("keydown", (ev) => {
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const tag = (ev.target.tagName || "").toLowerCase();
    if (["input", "textarea", "select"].includes(tag) && ev.target.type !== "range" && ev.target.type !== "checkbox") return;
    const go = (url) => { if (url) window.location.href = url; };
    switch (ev.key) {
      case "ArrowRight": case "j": case "J": go(viewer.dataset.nextUrl); break;
      case "ArrowLeft": case "k": case "K": go(viewer.dataset.prevUrl); break;
      case "h": case "H":
        if (toggle && !toggle.disabled) { toggle.checked = !toggle.checked; applyHeat(); }
        break;
      case "+": case "=": if (zoom) { zoom.value = Math.min(4, Number(zoom.value) + 0.25); applyZoom(); } break;
      case "-": if (zoom) { zoom.value = Math.max(1, Number(zoom.value) - 0.25); applyZoom(); } break;
      case "0": if (zoom) { document.getElementById("reset-view").click(); } break;
      case "1": case "2": case "3":
        if (labels) { labels.selectedIndex = Number(ev.key) - 1; labels.focus(); }
        break;
      default: return;
    }
    ev.preventDefault();
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
  localTimes();
  const viewer = document.getElementById("viewer");
  if (viewer) studyViewer(viewer);
});
