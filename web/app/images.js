// The case images panel of the clinic app: the room's image series (uploaded over HTTP), one
// shared image viewer at a time (a panel of the room, protocol/images.py) with its plane,
// image, window and zoom shared with everyone, the others' pointers on it and distance
// measurements. Everything a mouse does has a key: with the image focused, arrows or Page
// Up/Down scroll, Home/End go to the first/last image, A/C/S pick the plane, W cycles the
// window presets, + and - zoom, M starts a distance measurement, Shift+arrows move the
// measuring cross and Enter places a point at it.
import { PLANES } from "../sdk/index.js";

const $ = (id) => document.getElementById(id);

/** Window presets [center, width] in Hounsfield units; "default" is the series' own. */
export const WINDOW_PRESETS = [
  ["default", "Series default", null],
  ["soft", "Soft tissue (40 / 400)", [40, 400]],
  ["lung", "Lung (-600 / 1500)", [-600, 1500]],
  ["bone", "Bone (400 / 1800)", [400, 1800]],
  ["brain", "Brain (40 / 80)", [40, 80]],
];
const PLANE_KEYS = { a: "axial", c: "coronal", s: "sagittal" };
const COLORS = ["#ffbf47", "#4cc3ff", "#ff6b9a", "#7bd389", "#c39bff", "#ff8c42"];
const POINTER_INTERVAL_MS = 66; // the room hears a pointer at most once per tick anyway
const CACHE_IMAGES = 96;

const sub = (a, b) => a.map((v, k) => v - b[k]);
const dot = (a, b) => a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
const cap = (s) => s[0].toUpperCase() + s.slice(1);

/** Image coordinates (col, row, index; pixel centres at whole numbers) of a patient point
 * (mm) in `plane` of a series descriptor: the plane's steps are orthogonal. */
export function patientToImage(d, plane, p) {
  const g = d.planes[plane];
  const v = sub(p, g.origin);
  return { col: dot(v, g.col_step) / dot(g.col_step, g.col_step), row: dot(v, g.row_step) / dot(g.row_step, g.row_step), index: dot(v, g.slice_step) / dot(g.slice_step, g.slice_step) };
}

/** The patient point (mm) of image coordinates of `plane`. */
export function imageToPatient(d, plane, col, row, index) {
  const g = d.planes[plane];
  return [0, 1, 2].map((k) => g.origin[k] + col * g.col_step[k] + row * g.row_step[k] + index * g.slice_step[k]);
}

export class ImageViewer {
  /** `app`: {announce(text), alertText(text), nameOf(memberId), grants() (a Set),
   * ownRoom() (true while the room the client is in answers its HTTP requests: its token's
   * room, or one it was moved into with an access credential)}. */
  constructor(app) {
    this.app = app;
    this.client = null;
    this.series = []; // the room's listings
    this.descriptors = new Map(); // sha256 -> descriptor (or a promise of one)
    this.images = new Map(); // image key -> ImageBitmap (insertion order: least recent first)
    this.loading = new Set();
    this.panelId = null;
    this.local = null; // our view while our changes are on their way: {plane, slices, window, zoom}
    this.queued = null; // the change to send next
    this.sending = false;
    this.shown = null; // what the canvas shows: {key, series, plane, index, window}
    this.tool = null; // "distance" while measuring
    this.draft = []; // the measurement's points so far (patient mm)
    this.cursor = null; // the keyboard's measuring cross {col, row}
    this.mouse = null; // the mouse over the image {col, row}
    this.lastPointer = 0;
    this.pointerTimer = null;
    this.pointerShown = false;
    this.layout = null; // how the image sits on the canvas
    this.canvas = $("image-canvas");
    this.ctx2d = this.canvas.getContext("2d");
    this.#wire();
  }

  // ----------------------------------------------------------------- state

  /** A new client (joined, moved, resumed): the room's series and panels are read again. */
  attach(client) {
    if (this.client !== client) {
      this.client = client;
      this.panelId = null;
      this.local = this.queued = null;
      this.draft = [];
      this.tool = null;
    }
    this.render();
    this.refreshSeries();
  }

  get panel() {
    return this.panelId === null ? null : (this.client?.panels.get(this.panelId) ?? null);
  }

  /** The view shown: ours while our changes travel, else the room's. */
  view() {
    const p = this.panel;
    if (p === null) return null;
    return { series: p.series, plane: p.plane, slices: p.slices, window: p.window, zoom: p.zoom, pan: p.pan, ...(this.local ?? {}) };
  }

  #descriptor(sha) {
    const d = this.descriptors.get(sha);
    if (d && !(d instanceof Promise)) return d;
    if (!d && this.app.ownRoom()) {
      const p = this.client
        .series(sha)
        .then((desc) => {
          this.descriptors.set(sha, desc);
          this.render();
          return desc;
        })
        .catch((err) => {
          this.descriptors.delete(sha);
          this.app.alertText(`The image series could not be read: ${err.message}`);
        });
      this.descriptors.set(sha, p);
    }
    return null;
  }

  /** The series descriptor if it has arrived (asked for when not). */
  descriptorOf(sha) {
    return this.#descriptor(sha);
  }

  /** An image (ImageBitmap) of the shared cache and its key; the bitmap is null until it has
   * been fetched (asked for now). */
  imageOf(series, plane, index, win) {
    const key = imageKey(series, plane, index, win);
    const bitmap = this.images.get(key);
    if (bitmap !== undefined) return { key, bitmap };
    this.#load(key, series, plane, index, win);
    return { key, bitmap: null };
  }

  async refreshSeries() {
    const c = this.client;
    if (!c || !this.app.ownRoom()) {
      this.series = [];
      this.#renderSeries();
      return;
    }
    try {
      const list = await c.listSeries();
      if (c !== this.client) return;
      this.series = list;
    } catch (err) {
      this.series = [];
      $("images-note").textContent = `The room's images could not be listed: ${err.message}`;
    }
    this.#renderSeries();
  }

  nameOfSeries(sha) {
    return this.series.find((s) => s.sha256 === sha)?.name ?? `series ${sha.slice(0, 8)}`;
  }

  // ----------------------------------------------------------------- events

  onEvent(ev) {
    const c = this.client;
    if (!c) return;
    switch (ev.type) {
      case "panel_changed": {
        if (ev.closed && ev.panelId === this.panelId) {
          this.panelId = null;
          this.local = this.queued = null;
          this.app.announce("The image panel was closed.");
        }
        if (!ev.closed && ev.panelId === this.panelId && !this.sending && this.queued === null) this.local = null;
        const fresh = this.panelId === null && !ev.closed && c.panels.synced;
        if (this.panelId === null) this.#pickPanel();
        if (fresh && this.panelId === ev.panelId) {
          const p = this.panel;
          if (!this.series.some((s) => s.sha256 === p.series)) this.refreshSeries();
          const who = ev.by === null || ev.by === undefined ? "Someone" : this.app.nameOf(ev.by);
          if (ev.by !== c.memberId) this.app.announce(`${who} opened ${this.nameOfSeries(p.series)} in the image panel.`);
        }
        this.render();
        break;
      }
      case "images_synced":
        this.#pickPanel();
        this.render();
        break;
      case "pointer_moved":
        if (ev.memberId !== c.memberId) this.#renderPointers();
        break;
      case "measurement_changed":
        this.#renderMeasurements();
        this.draw();
        break;
      default:
        break;
    }
  }

  #pickPanel() {
    const ids = [...(this.client?.panels.keys() ?? [])];
    this.panelId = ids.length ? Math.max(...ids) : null;
  }

  // ----------------------------------------------------------------- changing the view

  /** Change the shared view (merged into ours at once, sent one request at a time). */
  change(delta) {
    const v = this.view();
    if (v === null) return;
    if (!this.app.grants().has("manipulate_objects")) {
      this.app.announce("Your role follows the shared images; it cannot change them.");
      return;
    }
    this.local = { plane: v.plane, slices: v.slices, window: v.window, zoom: v.zoom, ...(this.local ?? {}), ...delta };
    this.queued = { ...(this.queued ?? {}), ...delta };
    this.render();
    this.#flush();
  }

  async #flush() {
    if (this.sending || this.queued === null || this.panelId === null) return;
    const change = this.queued;
    const panelId = this.panelId;
    this.queued = null;
    this.sending = true;
    try {
      await this.client.setImageView(panelId, change);
    } catch (err) {
      this.local = null;
      this.queued = null;
      this.app.alertText(`The images did not change: ${err.message}`);
    } finally {
      this.sending = false;
    }
    if (this.queued !== null) this.#flush();
    else this.render();
  }

  scroll(step) {
    const v = this.view();
    const d = v && this.#descriptor(v.series);
    if (!d) return;
    const k = PLANES.indexOf(v.plane);
    const count = d.planes[v.plane].count;
    const index = Math.min(count - 1, Math.max(0, v.slices[k] + step));
    if (index === v.slices[k]) return;
    const slices = [...v.slices];
    slices[k] = index;
    this.change({ slices });
  }

  goTo(index) {
    const v = this.view();
    const d = v && this.#descriptor(v.series);
    if (!d) return;
    this.scroll(index - v.slices[PLANES.indexOf(v.plane)]);
  }

  setPlane(plane) {
    const v = this.view();
    if (v && v.plane !== plane) this.change({ plane });
  }

  setPreset(name) {
    const v = this.view();
    const d = v && this.#descriptor(v.series);
    const preset = WINDOW_PRESETS.find(([n]) => n === name);
    if (!d || !preset) return;
    this.change({ window: preset[2] ?? d.window });
  }

  // ----------------------------------------------------------------- rendering

  render() {
    const c = this.client;
    const section = $("images");
    if (!c) return;
    // Rooms without image viewers (a waiting room) never send img_synced: no section there.
    section.hidden = !c.panels.synced;
    const ownRoom = this.app.ownRoom();
    const may = this.app.grants().has("manipulate_objects");
    const v = this.view();
    $("image-viewer").hidden = v === null;
    $("series-pick").hidden = !ownRoom;
    $("series-open").disabled = !may || !ownRoom || this.series.length === 0;
    $("panel-close").disabled = !may || v === null;
    let note = "";
    if (!ownRoom) note = "The images of this room open with a join link for it.";
    else if (v === null) note = this.series.length ? "No image panel is open. Pick a series and open it." : "The room has no image series yet.";
    else if (!may) note = "You follow the images the others show.";
    $("images-note").textContent = note;
    section.dataset.panel = String(this.panelId ?? "");
    if (v === null) {
      this.shown = null;
      this.#renderMeasurements();
      return;
    }
    for (const r of document.querySelectorAll('input[name="image-plane"]')) {
      r.checked = r.value === v.plane;
      r.disabled = !may;
    }
    const d = this.#descriptor(v.series);
    const slider = $("image-slice");
    slider.disabled = !may || !d;
    $("image-window").disabled = !may || !d;
    $("measure-start").disabled = !d || !this.app.grants().has("annotate");
    $("measure-start").setAttribute("aria-pressed", String(this.tool === "distance"));
    if (d) {
      const k = PLANES.indexOf(v.plane);
      const count = d.planes[v.plane].count;
      slider.max = String(count - 1);
      slider.value = String(v.slices[k]);
      slider.setAttribute("aria-valuetext", `Image ${v.slices[k] + 1} of ${count}`);
      const preset = WINDOW_PRESETS.find(([, , w]) => w && w[0] === v.window[0] && w[1] === v.window[1]);
      const isDefault = d.window && d.window[0] === v.window[0] && d.window[1] === v.window[1];
      $("image-window").value = preset ? preset[0] : isDefault ? "default" : "";
      const caption = `${this.nameOfSeries(v.series)}: ${cap(v.plane)} image ${v.slices[k] + 1} of ${count}, window ${fmt(v.window[1])} / level ${fmt(v.window[0])}${v.zoom !== 1 ? `, zoom ${fmt(v.zoom)}×` : ""}`;
      if ($("image-caption").textContent !== caption) $("image-caption").textContent = caption;
      this.canvas.setAttribute("aria-label", `${caption}. ${this.tool ? "Measuring a distance." : ""}`);
    }
    this.#renderMeasurements();
    this.#renderPointers();
    this.draw();
  }

  #renderSeries() {
    const sel = $("series-select");
    const current = sel.value;
    sel.replaceChildren(...this.series.map((s) => new Option(`${s.name} (${s.instances} images)`, s.sha256)));
    if (this.series.some((s) => s.sha256 === current)) sel.value = current;
    this.render();
  }

  #renderPointers() {
    const c = this.client;
    const names = [];
    for (const [member, { panelId }] of c.panels.pointers) {
      if (member !== c.memberId && panelId === this.panelId) names.push(this.app.nameOf(member));
    }
    const text = names.length ? `Pointing at the images: ${names.join(", ")}.` : "";
    if ($("image-pointers").textContent !== text) $("image-pointers").textContent = text;
    this.draw();
  }

  #renderMeasurements() {
    const c = this.client;
    const list = $("measure-list");
    const host = this.app.grants().has("moderate");
    const items = [];
    for (const m of c?.panels.measurements.values() ?? []) {
      const li = document.createElement("li");
      const what = describeMeasurement(m);
      li.innerHTML = `<span class="who"></span><span class="tags"></span>`;
      li.querySelector(".who").textContent = what;
      li.querySelector(".tags").textContent = `${this.nameOfSeries(m.series)} · by ${m.authorId === c.memberId ? "you" : m.author}`;
      li.dataset.measurementId = String(m.id);
      if (m.authorId === c.memberId || host) {
        const b = document.createElement("button");
        b.type = "button";
        b.textContent = "Delete";
        b.dataset.action = "measure-delete";
        b.dataset.key = String(m.id);
        b.setAttribute("aria-label", `Delete ${what}`);
        li.append(" ", b);
      }
      items.push(li);
    }
    const focused = list.contains(document.activeElement) ? document.activeElement.dataset.key : null;
    list.replaceChildren(...items);
    if (focused) (list.querySelector(`[data-key="${focused}"]`) ?? $("measure-title")).focus?.();
    $("measure-empty").hidden = items.length > 0;
  }

  /** Draw the image (fetched when not cached) and what lies on it. */
  draw() {
    const v = this.view();
    const canvas = this.canvas;
    if (v === null || canvas.offsetParent === null) return;
    const d = this.#descriptor(v.series);
    const size = Math.max(64, Math.round(canvas.clientWidth * (window.devicePixelRatio || 1)));
    if (canvas.width !== size) canvas.width = canvas.height = size;
    const g = this.ctx2d;
    if (!d) return;
    const k = PLANES.indexOf(v.plane);
    const index = v.slices[k];
    const key = imageKey(v.series, v.plane, index, v.window);
    let bitmap = this.images.get(key);
    if (bitmap === undefined) {
      this.#load(key, v.series, v.plane, index, v.window);
      // Keep the image shown until the new one arrives (no flash of black while scrolling).
      bitmap = this.shown?.bitmap ?? null;
    } else {
      this.images.delete(key); // most recently used last
      this.images.set(key, bitmap);
      this.shown = { key, series: v.series, plane: v.plane, index, window: [...v.window], bitmap };
    }
    const plane = d.planes[v.plane];
    const wMm = plane.cols * plane.col_spacing;
    const hMm = plane.rows * plane.row_spacing;
    const scale = (Math.min(size / wMm, size / hMm) * (v.zoom || 1)) / 1;
    const dw = wMm * scale;
    const dh = hMm * scale;
    const x0 = (size - dw) / 2 + (v.pan?.[0] ?? 0) * dw;
    const y0 = (size - dh) / 2 + (v.pan?.[1] ?? 0) * dh;
    this.layout = { x0, y0, px: plane.col_spacing * scale, py: plane.row_spacing * scale, plane: v.plane, index, d, size };
    g.fillStyle = "#000";
    g.fillRect(0, 0, size, size);
    if (bitmap) {
      g.imageSmoothingEnabled = true;
      g.drawImage(bitmap, x0, y0, dw, dh);
    }
    this.#drawOverlays(g, d, v, index);
  }

  async #load(key, series, plane, index, win) {
    if (this.loading.has(key) || !this.app.ownRoom()) return;
    this.loading.add(key);
    try {
      const { bytes } = await this.client.fetchSlice(series, plane, index, win);
      const bitmap = await createImageBitmap(new Blob([bytes], { type: "image/png" }));
      this.images.set(key, bitmap);
      while (this.images.size > CACHE_IMAGES) {
        const [oldest, old] = this.images.entries().next().value;
        this.images.delete(oldest);
        if (old !== this.shown?.bitmap) old.close?.();
      }
    } catch (err) {
      this.app.alertText(`An image could not be loaded: ${err.message}`);
      return;
    } finally {
      this.loading.delete(key);
    }
    this.draw();
  }

  // Canvas pixels of image coordinates, and back.
  #toCanvas(col, row) {
    const L = this.layout;
    return [L.x0 + (col + 0.5) * L.px, L.y0 + (row + 0.5) * L.py];
  }

  #toImage(x, y) {
    const L = this.layout;
    return { col: (x - L.x0) / L.px - 0.5, row: (y - L.y0) / L.py - 0.5 };
  }

  #drawOverlays(g, d, v, index) {
    const c = this.client;
    const size = this.layout.size;
    const unit = size / 400; // line widths and fonts scale with the canvas
    g.lineWidth = 2 * unit;
    g.font = `${Math.round(13 * unit)}px system-ui, sans-serif`;
    g.textBaseline = "bottom";
    // Measurements of this series that lie in this image (within half an image).
    for (const m of c.panels.measurements.values()) {
      if (m.series !== v.series || m.kind !== "distance") continue;
      const pts = m.points.map((p) => patientToImage(d, v.plane, p));
      if (!pts.every((p) => Math.abs(p.index - index) <= 0.5)) continue;
      const [a, b] = pts.map((p) => this.#toCanvas(p.col, p.row));
      line(g, a, b, "#7bd389", unit);
      label(g, `${m.value.toFixed(1)} mm`, (a[0] + b[0]) / 2 + 6 * unit, (a[1] + b[1]) / 2 - 4 * unit, "#7bd389");
    }
    // The measurement being made.
    if (this.draft.length) {
      const a = this.#toCanvas(...imageColRow(d, v.plane, this.draft[0]));
      const end = this.cursorPoint();
      const b = end ? this.#toCanvas(end.col, end.row) : a;
      line(g, a, b, "#ffbf47", unit);
      dotAt(g, a, "#ffbf47", 4 * unit);
    }
    // The keyboard's measuring cross.
    if (this.tool && this.cursor) {
      const [x, y] = this.#toCanvas(this.cursor.col, this.cursor.row);
      g.strokeStyle = "#ffbf47";
      g.beginPath();
      g.moveTo(x - 8 * unit, y);
      g.lineTo(x + 8 * unit, y);
      g.moveTo(x, y - 8 * unit);
      g.lineTo(x, y + 8 * unit);
      g.stroke();
    }
    // Others' pointers on this panel, on this image or next to it.
    for (const [member, { panelId, point }] of c.panels.pointers) {
      if (member === c.memberId || panelId !== this.panelId) continue;
      const p = patientToImage(d, v.plane, point);
      if (Math.abs(p.index - index) > 1) continue;
      const color = COLORS[member % COLORS.length];
      const at = this.#toCanvas(p.col, p.row);
      dotAt(g, at, color, 5 * unit);
      label(g, this.app.nameOf(member), at[0] + 8 * unit, at[1] - 4 * unit, color);
    }
  }

  /** Where a measurement point would go: the mouse while it is over the image, else the
   * keyboard's cross. */
  cursorPoint() {
    return this.mouse ?? this.cursor;
  }

  // ----------------------------------------------------------------- pointing and measuring

  #sendPointer(force = false) {
    const c = this.client;
    const at = this.cursorPoint();
    if (!c || c.state !== "joined" || this.panelId === null || !this.layout) return;
    const now = performance.now();
    if (!force && now - this.lastPointer < POINTER_INTERVAL_MS) {
      // The last move of a burst still goes out, at the end of the interval.
      this.pointerTimer ??= setTimeout(() => {
        this.pointerTimer = null;
        this.#sendPointer(true);
      }, POINTER_INTERVAL_MS - (now - this.lastPointer));
      return;
    }
    clearTimeout(this.pointerTimer);
    this.pointerTimer = null;
    this.lastPointer = now;
    try {
      if (at === null) {
        if (this.pointerShown) c.point(this.panelId, null);
        this.pointerShown = false;
      } else {
        c.point(this.panelId, imageToPatient(this.layout.d, this.layout.plane, at.col, at.row, this.layout.index));
        this.pointerShown = true;
      }
    } catch {
      // not connected this moment: the next move sends it
    }
  }

  startMeasuring() {
    if (!this.layout) return;
    this.tool = this.tool ? null : "distance";
    this.draft = [];
    const d = this.layout.d.planes[this.layout.plane];
    this.cursor = this.tool ? { col: (d.cols - 1) / 2, row: (d.rows - 1) / 2 } : null;
    this.app.announce(this.tool ? "Measuring a distance: click the first point, or move the cross with Shift and the arrow keys and press Enter." : "Measuring cancelled.");
    this.render();
  }

  async placeMeasurePoint(at) {
    const v = this.view();
    if (!this.tool || !v || !this.layout || !at) return;
    const p = imageToPatient(this.layout.d, this.layout.plane, at.col, at.row, this.layout.index);
    this.draft.push(p);
    if (this.draft.length < 2) {
      this.app.announce("First point placed. Place the second point.");
      this.draw();
      return;
    }
    const points = this.draft.slice(0, 2);
    this.draft = [];
    this.tool = null;
    this.cursor = null;
    this.render();
    try {
      await this.client.measure(v.series, "distance", points);
      const mm = Math.hypot(...sub(points[1], points[0]));
      this.app.announce(`Distance measured: ${mm.toFixed(1)} mm.`);
    } catch (err) {
      this.app.alertText(`The measurement was not stored: ${err.message}`);
    }
  }

  // ----------------------------------------------------------------- wiring

  #wire() {
    const canvas = this.canvas;
    canvas.addEventListener("wheel", (e) => {
      if (this.view() === null) return;
      e.preventDefault();
      this.scroll(e.deltaY > 0 ? -1 : 1);
    });
    canvas.addEventListener("keydown", (e) => this.#key(e));
    canvas.addEventListener("pointermove", (e) => {
      if (!this.layout) return;
      const r = canvas.getBoundingClientRect();
      const s = this.layout.size / r.width;
      this.mouse = this.#toImage((e.clientX - r.left) * s, (e.clientY - r.top) * s);
      this.#sendPointer();
      if (this.draft.length) this.draw();
    });
    canvas.addEventListener("pointerleave", () => {
      this.mouse = null;
      this.#sendPointer(true);
      if (this.draft.length) this.draw();
    });
    canvas.addEventListener("click", () => {
      if (this.tool) this.placeMeasurePoint(this.mouse);
    });
    $("series-open").addEventListener("click", () => this.openSelected());
    $("series-refresh").addEventListener("click", async () => {
      await this.refreshSeries();
      this.app.announce(`${this.series.length} image series in the room.`);
    });
    $("panel-close").addEventListener("click", async () => {
      if (this.panelId === null) return;
      try {
        await this.client.closePanel(this.panelId);
      } catch (err) {
        this.app.alertText(`The image panel was not closed: ${err.message}`);
      }
    });
    for (const r of document.querySelectorAll('input[name="image-plane"]')) {
      r.addEventListener("change", () => r.checked && this.setPlane(r.value));
    }
    $("image-slice").addEventListener("input", (e) => this.goTo(Number(e.target.value)));
    $("image-window").addEventListener("change", (e) => this.setPreset(e.target.value));
    $("measure-start").addEventListener("click", () => {
      this.startMeasuring();
      canvas.focus();
    });
    $("measure-list").addEventListener("click", async (e) => {
      const b = e.target.closest("button[data-action='measure-delete']");
      if (!b) return;
      try {
        await this.client.deleteMeasurement(Number(b.dataset.key));
        this.app.announce("Measurement deleted.");
      } catch (err) {
        this.app.alertText(`The measurement was not deleted: ${err.message}`);
      }
    });
    window.addEventListener("resize", () => this.draw());
  }

  #key(e) {
    const v = this.view();
    if (v === null || e.altKey || e.ctrlKey || e.metaKey) return;
    const key = e.key;
    let handled = true;
    if (e.shiftKey && this.tool && key.startsWith("Arrow")) {
      const [dc, dr] = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] }[key];
      this.cursor = { col: this.cursor.col + 2 * dc, row: this.cursor.row + 2 * dr };
      this.mouse = null;
      this.#sendPointer(true);
      this.draw();
    } else if (key === "ArrowUp" || key === "PageUp" || key === "ArrowRight") this.scroll(1);
    else if (key === "ArrowDown" || key === "PageDown" || key === "ArrowLeft") this.scroll(-1);
    else if (key === "Home") this.goTo(0);
    else if (key === "End") this.goTo(65535);
    else if (PLANE_KEYS[key.toLowerCase()]) this.setPlane(PLANE_KEYS[key.toLowerCase()]);
    else if (key === "w" || key === "W") {
      const i = WINDOW_PRESETS.findIndex(([n]) => n === $("image-window").value);
      const next = WINDOW_PRESETS[(i + 1) % WINDOW_PRESETS.length];
      this.setPreset(next[0]);
      this.app.announce(`Window: ${next[1]}.`);
    } else if (key === "+" || key === "=") this.change({ zoom: Math.min(20, Math.round(v.zoom * 1.25 * 100) / 100) });
    else if (key === "-") this.change({ zoom: Math.max(0.1, Math.round((v.zoom / 1.25) * 100) / 100) });
    else if (key === "m" || key === "M") this.startMeasuring();
    else if (key === "Enter" && this.tool) this.placeMeasurePoint(this.cursor);
    else if (key === "Escape" && this.tool) this.startMeasuring();
    else handled = false;
    if (handled) {
      e.preventDefault();
      e.stopPropagation();
    }
  }

  async openSelected() {
    const sha = $("series-select").value;
    if (!sha) return;
    try {
      const panelId = await this.client.openPanel(sha, { position: [0, 1.5, -1.2], width: 0.6 });
      this.panelId = panelId;
      this.local = null;
      this.app.announce(`${this.nameOfSeries(sha)} is open for everyone in the room.`);
      this.render();
      this.canvas.focus();
    } catch (err) {
      this.app.alertText(`The series was not opened: ${err.message}`);
    }
  }

  /** The viewer's state for tools and tests. */
  describe() {
    const v = this.view();
    const c = this.client;
    return {
      panelId: this.panelId,
      view: v && { series: v.series, plane: v.plane, slices: [...v.slices], window: [...v.window], zoom: v.zoom },
      shown: this.shown && { key: this.shown.key, series: this.shown.series, plane: this.shown.plane, index: this.shown.index, window: this.shown.window },
      series: this.series.map((s) => ({ sha256: s.sha256, name: s.name })),
      pointers: c ? [...c.panels.pointers].filter(([m, p]) => m !== c.memberId && p.panelId === this.panelId).map(([m, p]) => ({ memberId: m, point: p.point })) : [],
      measurements: c ? [...c.panels.measurements.values()].map((m) => ({ id: m.id, kind: m.kind, value: m.value, author: m.author, points: m.points })) : [],
      tool: this.tool,
      layout: this.layout && { x0: this.layout.x0, y0: this.layout.y0, px: this.layout.px, py: this.layout.py, size: this.layout.size },
    };
  }
}

function imageKey(series, plane, index, win) {
  return `${series}/${plane}/${index}/${win[0]},${win[1]}`;
}

function fmt(x) {
  return Number.isInteger(x) ? String(x) : x.toFixed(1);
}

function imageColRow(d, plane, p) {
  const q = patientToImage(d, plane, p);
  return [q.col, q.row];
}

function line(g, a, b, color, unit) {
  g.strokeStyle = "#000";
  g.lineWidth = 4 * unit;
  g.beginPath();
  g.moveTo(...a);
  g.lineTo(...b);
  g.stroke();
  g.strokeStyle = color;
  g.lineWidth = 2 * unit;
  g.stroke();
}

function dotAt(g, [x, y], color, r) {
  g.fillStyle = color;
  g.strokeStyle = "#000";
  g.beginPath();
  g.arc(x, y, r, 0, 2 * Math.PI);
  g.fill();
  g.stroke();
}

function label(g, text, x, y, color) {
  g.lineWidth = 3;
  g.strokeStyle = "#000";
  g.strokeText(text, x, y);
  g.fillStyle = color;
  g.fillText(text, x, y);
}

function describeMeasurement(m) {
  const lab = m.label ? ` "${m.label}"` : "";
  if (m.kind === "distance") return `Distance${lab}: ${m.value.toFixed(1)} mm`;
  if (m.kind === "angle") return `Angle${lab}: ${m.value.toFixed(1)}°`;
  const stats = m.mean !== null && m.mean !== undefined ? `, mean ${m.mean.toFixed(1)} ± ${(m.sd ?? 0).toFixed(1)} ${m.units ?? ""}` : "";
  return `Region${lab}: ${m.value.toFixed(1)} mm²${stats}`;
}
