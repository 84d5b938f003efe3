// infd view: pan and zoom over a canvas whose tiles the server renders on request.
// Canvas pixels are those of the finest level. The view is (ox, oy): the canvas point at the screen's
// top-left, and s: screen pixels per canvas pixel. Level L shows the canvas at 2^(L - maxLevel) of its size;
// the page requests the tiles of the finest level it needs for the screen (none outside the viewport), once
// the view has been still for a moment, over the level-0 tile (the whole canvas), which is always shown.
"use strict";
(function () {
  const stage = document.getElementById("stage");
  const SETTLE_MS = 120;
  let info = null, latent = 0, ox = 0, oy = 0, s = 1;
  let tiles = new Map();  // key -> {img, level, x, y, loaded}
  let timer = null, pending = 0;

  const $ = (id) => document.getElementById(id);
  const W = () => stage.clientWidth, H = () => stage.clientHeight;

  function levelSize(level) {
    const div = 2 ** (info.max_level - level);
    return [Math.ceil(info.canvas[0] / div), Math.ceil(info.canvas[1] / div)];  // [h, w]
  }
  function currentLevel() {
    const ideal = info.max_level + Math.log2(s);
    return Math.max(0, Math.min(info.max_level, Math.ceil(ideal - 1e-9)));
  }
  function viewport() {  // canvas pixels, clipped to the canvas
    const [ch, cw] = info.canvas;
    return {x0: Math.max(0, ox), y0: Math.max(0, oy), x1: Math.min(cw, ox + W() / s),
            y1: Math.min(ch, oy + H() / s)};
  }
  function visibleTiles(level) {
    const [hl, wl] = levelSize(level), fx = info.canvas[1] / wl, fy = info.canvas[0] / hl;
    const v = viewport(), t = info.tile, out = [];
    if (v.x1 <= v.x0 || v.y1 <= v.y0) return out;
    const xa = Math.floor(v.x0 / fx / t), xb = Math.min(Math.ceil(wl / t) - 1, Math.floor((v.x1 / fx - 1e-6) / t));
    const ya = Math.floor(v.y0 / fy / t), yb = Math.min(Math.ceil(hl / t) - 1, Math.floor((v.y1 / fy - 1e-6) / t));
    for (let y = ya; y <= yb; y++) for (let x = xa; x <= xb; x++) out.push([x, y]);
    return out;
  }
  function place(tile) {  // screen position of a tile from its level box
    const [hl, wl] = levelSize(tile.level), t = info.tile;
    const fx = info.canvas[1] / wl, fy = info.canvas[0] / hl;
    const left = tile.x * t * fx, top = tile.y * t * fy;
    const right = Math.min(wl, (tile.x + 1) * t) * fx, bottom = Math.min(hl, (tile.y + 1) * t) * fy;
    Object.assign(tile.img.style, {left: `${(left - ox) * s}px`, top: `${(top - oy) * s}px`,
                                   width: `${(right - left) * s}px`, height: `${(bottom - top) * s}px`,
                                   zIndex: String(tile.level)});
  }
  function request(level, x, y) {
    const key = `${latent}/${level}/${x}_${y}`;
    if (tiles.has(key)) return;
    const img = new Image();
    const tile = {img, level, x, y, loaded: false};
    pending++;
    img.onload = img.onerror = () => { if (!tile.loaded) { tile.loaded = true; pending--; } prune(); status(); };
    img.src = `tiles/${info.run}/${key}.png`;
    tiles.set(key, tile);
    place(tile);
    stage.appendChild(img);
  }
  function prune() {  // drop tiles of other latents and levels once the current level's are in
    const level = currentLevel();
    const want = new Set(visibleTiles(level).map(([x, y]) => `${latent}/${level}/${x}_${y}`));
    want.add(`${latent}/0/0_0`);
    const complete = [...want].every((k) => tiles.has(k) && tiles.get(k).loaded);
    for (const [key, tile] of tiles) {
      if (want.has(key) || (!complete && tile.loaded && key.startsWith(`${latent}/`))) continue;
      if (!tile.loaded) { tile.loaded = true; pending--; tile.img.src = ""; }
      tile.img.remove();
      tiles.delete(key);
    }
  }
  function fetchTiles() {
    timer = null;
    request(0, 0, 0);
    const level = currentLevel();
    for (const [x, y] of visibleTiles(level)) request(level, x, y);
    prune();
    status();
  }
  function redraw() {
    for (const tile of tiles.values()) place(tile);
    clearTimeout(timer);
    timer = setTimeout(fetchTiles, SETTLE_MS);
    status();
  }
  function clampView() {
    const [ch, cw] = info.canvas, fit = Math.min(W() / cw, H() / ch);
    s = Math.max(fit / 4, Math.min(4, s));
    const vw = W() / s, vh = H() / s;  // keep some of the canvas on screen
    ox = Math.max(-vw + 32 / s, Math.min(cw - 32 / s, ox));
    oy = Math.max(-vh + 32 / s, Math.min(ch - 32 / s, oy));
  }
  function zoomAt(sx, sy, factor) {  // keep the canvas point under screen (sx, sy) in place
    const cx = ox + sx / s, cy = oy + sy / s;
    s *= factor;
    clampView();
    ox = cx - sx / s; oy = cy - sy / s;
    clampView();
    redraw();
  }
  function panBy(dx, dy) { ox -= dx / s; oy -= dy / s; clampView(); redraw(); }
  function fit() {
    const [ch, cw] = info.canvas;
    s = Math.min(W() / cw, H() / ch) * 0.95;
    ox = (cw - W() / s) / 2; oy = (ch - H() / s) / 2;
    redraw();
  }
  function niceLength() {  // 1, 2 or 5 x 10^k canvas pixels, about 100 screen pixels long
    const raw = 100 / s, p = 10 ** Math.floor(Math.log10(raw));
    return [1, 2, 5, 10].map((m) => m * p).find((n) => n >= raw * 0.7) || raw;
  }
  function status() {
    if (!info) return;
    const [ch, cw] = info.canvas, level = currentLevel(), [hl, wl] = levelSize(level);
    $("zoom").textContent = `viewing at ${Math.round(cw * s)} x ${Math.round(ch * s)} of ${cw} x ${ch}` +
      ` (level ${level}/${info.max_level}: ${wl} x ${hl})`;
    const n = niceLength();
    $("scalelabel").textContent = `${n >= 1 ? Math.round(n) : n.toPrecision(2)} px of the ${cw} x ${ch} canvas`;
    $("scalebar").style.width = `${n * s}px`;
    const v = viewport();
    let k = Number($("factor").value) * s;  // output pixels per canvas pixel, within the server's bounds
    k = Math.min(k, Math.sqrt(info.max_download / Math.max(1, (v.x1 - v.x0) * (v.y1 - v.y0))), 16);
    const w = Math.max(1, Math.floor((v.x1 - v.x0) * k)), h = Math.max(1, Math.floor((v.y1 - v.y0) * k));
    const q = `latent=${latent}&x0=${Math.floor(v.x0)}&y0=${Math.floor(v.y0)}&x1=${Math.ceil(v.x1)}` +
      `&y1=${Math.ceil(v.y1)}&w=${w}&h=${h}`;
    $("download").href = `api/region?${q}`;
    $("download").textContent = `download the visible region at ${w} x ${h}`;
    $("status").textContent = pending ? `rendering ${pending} tile(s)` : "";
  }
  async function loadInfo(select) {
    info = await (await fetch("api/info")).json();
    const menu = $("latent");
    menu.innerHTML = "";
    for (const l of info.latents) menu.add(new Option(`${l.id}: ${l.label}`, String(l.id)));
    latent = select === undefined ? 0 : select;
    menu.value = String(latent);
    $("generate").classList.toggle("hidden", !info.generate);
    $("prompt").classList.toggle("hidden", !info.text);
  }
  async function draw() {
    $("draw").disabled = true;
    $("status").textContent = "sampling...";
    try {
      const res = await fetch("api/generate", {method: "POST", headers: {"Content-Type": "application/json"},
        body: JSON.stringify({prompt: $("prompt").value, seed: Number($("seed").value) || 0})});
      const body = await res.json();
      if (!res.ok) throw new Error(body.error);
      await loadInfo(body.id);
      redraw();
    } catch (err) { $("status").textContent = String(err); }
    $("draw").disabled = false;
  }

  // Mouse, touch and pen through pointer events; two pointers pinch.
  const pointers = new Map();
  let pinch = null;
  stage.addEventListener("pointerdown", (e) => {
    stage.setPointerCapture(e.pointerId);
    pointers.set(e.pointerId, [e.offsetX, e.offsetY]);
    stage.classList.add("dragging");
    stage.focus();
  });
  stage.addEventListener("pointermove", (e) => {
    if (!pointers.has(e.pointerId)) return;
    const [px, py] = pointers.get(e.pointerId);
    pointers.set(e.pointerId, [e.offsetX, e.offsetY]);
    if (pointers.size === 1) { panBy(e.offsetX - px, e.offsetY - py); return; }
    const [a, b] = [...pointers.values()];
    const d = Math.hypot(a[0] - b[0], a[1] - b[1]), mid = [(a[0] + b[0]) / 2, (a[1] + b[1]) / 2];
    if (pinch) zoomAt(mid[0], mid[1], d / pinch);
    pinch = d;
  });
  const release = (e) => {
    pointers.delete(e.pointerId);
    pinch = null;
    if (!pointers.size) stage.classList.remove("dragging");
  };
  stage.addEventListener("pointerup", release);
  stage.addEventListener("pointercancel", release);
  stage.addEventListener("wheel", (e) => {
    e.preventDefault();
    const r = stage.getBoundingClientRect();
    zoomAt(e.clientX - r.left, e.clientY - r.top, Math.exp(-e.deltaY * 0.002));
  }, {passive: false});
  stage.addEventListener("keydown", (e) => {
    const step = 100, keys = {"+": () => zoomAt(W() / 2, H() / 2, 1.5), "=": () => zoomAt(W() / 2, H() / 2, 1.5),
      "-": () => zoomAt(W() / 2, H() / 2, 1 / 1.5), "0": fit, ArrowLeft: () => panBy(step, 0),
      ArrowRight: () => panBy(-step, 0), ArrowUp: () => panBy(0, step), ArrowDown: () => panBy(0, -step)};
    if (keys[e.key]) { e.preventDefault(); keys[e.key](); }
  });
  window.addEventListener("resize", () => { if (info) { clampView(); redraw(); } });
  $("fit").addEventListener("click", fit);
  $("factor").addEventListener("change", status);
  $("draw").addEventListener("click", draw);
  $("latent").addEventListener("change", (e) => { latent = Number(e.target.value); redraw(); });

  // For scripts and tests: the view in canvas pixels, the current level, and whether tiles are still coming.
  window.viewer = {
    viewport: () => Object.assign(viewport(), {level: currentLevel(), scale: s, tile: info.tile}),
    settled: () => info !== null && timer === null && pending === 0,
    zoomAt, panBy, fit,
  };
  loadInfo().then(() => { fit(); stage.focus(); });
})();
