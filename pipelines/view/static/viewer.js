// clipscope view: redraw the topic map of an image page while a text is typed (no build step, no libraries).
"use strict";

function debounce(fn, ms) {
  let timer = null;
  return (...args) => { clearTimeout(timer); timer = setTimeout(() => fn(...args), ms); };
}

function setupMap() {
  const form = document.getElementById("map-form");
  if (!form) return;
  const key = form.dataset.key;
  const text = document.getElementById("map-text");
  const contrast = document.getElementById("map-contrast");
  const which = document.getElementById("map-which");
  const img = document.getElementById("topic-map");
  const stats = document.getElementById("map-stats");

  function redraw() {
    const t = text.value.trim();
    const c = contrast.value.trim();
    if (!t) return;
    const query = new URLSearchParams({ key: key, text: t, contrast: c, map: which.value });
    fetch("/api/map?" + query.toString())
      .then((r) => r.json().then((body) => ({ ok: r.ok, body: body })))
      .then(({ ok, body }) => {
        if (!ok) { stats.textContent = body.error; stats.className = "stats error"; return; }
        stats.className = "stats";
        stats.textContent = `"${body.text}"${body.contrast ? ` − "${body.contrast}"` : ""}: ` +
          `min ${body.min.toFixed(4)}, max ${body.max.toFixed(4)} over a ${body.grid[0]}×${body.grid[1]} grid ` +
          `(${which.options[which.selectedIndex].text})`;
        img.onload = () => { img.dataset.text = body.text; img.dataset.contrast = body.contrast; };
        img.src = "/map.png?" + query.toString();
        const page = new URL(window.location.href);
        page.searchParams.set("text", t);
        if (c) page.searchParams.set("contrast", c); else page.searchParams.delete("contrast");
        page.searchParams.set("map", which.value);
        window.history.replaceState(null, "", page.toString());
        for (const [id, value] of [["nb-text", t], ["nb-contrast", c], ["nb-map", which.value]]) {
          const field = document.getElementById(id);
          if (field) field.value = value;  // the neighbours form keeps the map's texts
        }
      })
      .catch((err) => { stats.textContent = String(err); });
  }

  const later = debounce(redraw, 250);
  text.addEventListener("input", later);
  contrast.addEventListener("input", later);
  which.addEventListener("change", redraw);
  form.addEventListener("submit", (event) => { event.preventDefault(); redraw(); });
  if (text.value.trim()) redraw();
}

document.addEventListener("DOMContentLoaded", setupMap);
