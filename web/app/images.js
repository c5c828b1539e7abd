// The case images panel of the clinic app: the room's image series (uploaded over HTTP, from
// this page too), one shared image viewer at a time (a panel of the room, protocol/images.py)
// with its plane, image, window and zoom shared with everyone, the others' pointers on it,
// measurements (distances, angles and regions of interest, drawn where they lie), and the
// panel's link to a model of the room (a point clicked on the model shows the images there).
// Everything a mouse does has a key: with the image focused, arrows or Page Up/Down scroll,
// Home/End go to the first/last image, A/C/S pick the plane, W cycles the window presets, + and
// - zoom, M, N and R start a distance, an angle or a region, Shift+arrows move the measuring
// cross, Enter places a point at it, F closes a region, Backspace takes a point back.
import { PLANES } from "../sdk/index.js";
import { POINTS_PER_MEASURE, angleArc, centroid, describeMeasurement, imageToPatient, measurementLabel, onImage, patientToImage } from "./geometry.js";

export { imageToPatient, patientToImage };

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
/** How each kind of measurement is drawn and made: colour, button, key, and what is said. */
const TOOLS = {
  distance: { color: "#7bd389", button: "measure-start", key: "m", what: "a distance", start: "click the first point" },
  angle: { color: "#4cc3ff", button: "measure-angle", key: "n", what: "an angle", start: "click three points, the vertex second" },
  roi: { color: "#ff6b9a", button: "measure-roi", key: "r", what: "a region", start: "click its corners, then its first point again or press F to close it" },
};
const DRAFT_COLOR = "#ffbf47";
/** Why a series upload was refused, by the server's code (its own message follows). */
const UPLOAD_REFUSALS = {
  not_dicom: "A file is not DICOM, or the zip holds none.",
  no_pixel_data: "A file has no image (its Pixel Data or another part of the Image Pixel module is missing).",
  mixed_series: "The files belong to more than one series, or two images are at one position.",
  unsupported_transfer_syntax: "A file is compressed in a way the server does not read.",
  unsupported_image: "The images are not ones the viewer shows (colour, multi-frame, uneven or sheared slices, or undecodable pixels).",
  identifiable_data: "This room does not take identifiable images: the series carries identifying data in the attributes below.",
  oversized: "The series is too large for the server.",
  forbidden: "Your role may not upload images.",
  room_full: "The room holds its maximum number of series.",
};
const POINTER_INTERVAL_MS = 66; // the room hears a pointer at most once per tick anyway
const CACHE_IMAGES = 96;
const CLOSE_PX = 8; // a click this near (CSS pixels) the first corner closes a region

const cap = (s) => s[0].toUpperCase() + s.slice(1);

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
    this.tool = null; // "distance", "angle" or "roi" while measuring
    this.draft = []; // the measurement's points so far (patient mm)
    this.drawn = []; // the measurements drawn on the image shown: {id, kind, points (canvas), label}
    this.arrivals = new Map(); // measurement id -> functions called when it arrives
    this.upload = null; // the series upload: {files, name, state, code, attributes, sent, total}
    this.linkShown = undefined; // the linked model last announced (undefined: not yet seen)
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
      this.linkShown = undefined;
      this.shownSeries = undefined;
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
    // Only the newest listing asked for is shown (an older answer may arrive after it).
    const n = (this.listings = (this.listings ?? 0) + 1);
    if (!c || !this.app.ownRoom()) {
      this.series = [];
      this.#renderSeries();
      return;
    }
    try {
      const list = await c.listSeries();
      if (c !== this.client || n !== this.listings) return;
      this.series = list;
    } catch (err) {
      if (n !== this.listings) return;
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
        const before = this.shownSeries;
        if (this.panelId === null) this.#pickPanel();
        const p = this.panel;
        if (p !== null && ev.panelId === this.panelId) {
          const who = ev.by === null || ev.by === undefined ? "Someone" : this.app.nameOf(ev.by);
          let said = null;
          if (fresh && ev.by !== c.memberId) said = () => `${who} opened ${this.nameOfSeries(p.series)} in the image panel.`;
          else if (!fresh && before !== undefined && before !== p.series && ev.by !== c.memberId) said = () => `${who} showed ${this.nameOfSeries(p.series)} in the image panel.`;
          // A series uploaded since our list was read: read it again (and name it once known).
          // (Once per series: a series the room no longer lists is not asked for at every scroll.)
          let ready = Promise.resolve();
          if (!this.series.some((s) => s.sha256 === p.series) && this.askedFor !== p.series) {
            this.askedFor = p.series;
            ready = this.refreshSeries();
          }
          if (said) ready.then(() => this.app.announce(said()));
          this.#announceLink(p, who, ev.by === c.memberId);
        }
        this.shownSeries = p?.series;
        this.render();
        break;
      }
      case "object_added":
      case "object_removed":
      case "objects_synced":
        this.#renderLink();
        break;
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
        for (const fn of this.arrivals.get(ev.measurementId) ?? []) fn();
        this.arrivals.delete(ev.measurementId);
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
    $("series-add").hidden = !ownRoom || !this.app.grants().has("upload_assets");
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
      this.drawn = [];
      this.canvas.dataset.drawn = "";
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
    for (const [kind, t] of Object.entries(TOOLS)) {
      $(t.button).disabled = !d || !this.app.grants().has("annotate");
      $(t.button).setAttribute("aria-pressed", String(this.tool === kind));
    }
    $("measure-finish").hidden = this.tool !== "roi";
    $("measure-finish").disabled = this.draft.length < POINTS_PER_MEASURE.roi[0];
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
      this.canvas.setAttribute("aria-label", `${caption}. ${this.tool ? `Measuring ${TOOLS[this.tool].what}.` : ""}`);
    }
    this.#renderLink();
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
    // Measurements of this series that lie in this image (within half a slice spacing).
    this.drawn = [];
    for (const m of c.panels.measurements.values()) {
      if (m.series !== v.series || !TOOLS[m.kind]) continue;
      const pts = onImage(d, v.plane, m.points, index);
      if (pts === null) continue;
      const at = pts.map((p) => this.#toCanvas(p.col, p.row));
      const text = measurementLabel(m);
      this.#drawMeasurement(g, m.kind, at, text, unit);
      this.drawn.push({ id: m.id, kind: m.kind, points: at, label: text });
    }
    this.canvas.dataset.drawn = this.drawn.map((m) => `${m.kind}:${m.id}`).join(" ");
    // The measurement being made, to the mouse or the cross.
    if (this.draft.length) {
      const at = this.draft.map((p) => this.#toCanvas(...imageColRow(d, v.plane, p)));
      const end = this.cursorPoint();
      const path = end ? [...at, this.#toCanvas(end.col, end.row)] : at;
      for (let i = 1; i < path.length; i++) line(g, path[i - 1], path[i], DRAFT_COLOR, unit);
      if (this.tool === "roi" && path.length >= 3) line(g, path[path.length - 1], path[0], DRAFT_COLOR, unit, [4 * unit, 4 * unit]);
      for (const p of at) dotAt(g, p, DRAFT_COLOR, 3 * unit);
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

  /** Draw one measurement at canvas points `at`: a distance's line, an angle's arms with an
   * arc at the vertex (the second point), a region's closed outline; each with its label. */
  #drawMeasurement(g, kind, at, text, unit) {
    const color = TOOLS[kind].color;
    if (kind === "distance") {
      const [a, b] = at;
      line(g, a, b, color, unit);
      label(g, text, (a[0] + b[0]) / 2 + 6 * unit, (a[1] + b[1]) / 2 - 4 * unit, color);
    } else if (kind === "angle") {
      const [a, vtx, c] = at;
      line(g, a, vtx, color, unit);
      line(g, vtx, c, color, unit);
      const arm = Math.min(Math.hypot(a[0] - vtx[0], a[1] - vtx[1]), Math.hypot(c[0] - vtx[0], c[1] - vtx[1]));
      const r = Math.max(6 * unit, Math.min(24 * unit, arm * 0.4));
      const arc = angleArc(a, vtx, c);
      g.strokeStyle = color;
      g.lineWidth = 2 * unit;
      g.beginPath();
      g.arc(vtx[0], vtx[1], r, arc.start, arc.end, arc.anticlockwise);
      g.stroke();
      dotAt(g, vtx, color, 3 * unit);
      // The label beyond the arc on the bisector, centred there.
      const w = g.measureText(text).width;
      const lx = vtx[0] + Math.cos(arc.mid) * (r + 10 * unit);
      const ly = vtx[1] + Math.sin(arc.mid) * (r + 10 * unit);
      label(g, text, lx - (Math.cos(arc.mid) < 0 ? w : 0), ly + (Math.sin(arc.mid) > 0 ? 13 * unit : 0), color);
    } else {
      g.beginPath();
      g.moveTo(...at[0]);
      for (const p of at.slice(1)) g.lineTo(...p);
      g.closePath();
      g.fillStyle = "rgba(255, 107, 154, 0.18)";
      g.fill();
      g.strokeStyle = "#000";
      g.lineWidth = 4 * unit;
      g.stroke();
      g.strokeStyle = color;
      g.lineWidth = 2 * unit;
      g.stroke();
      const [cx] = centroid(at);
      const top = Math.min(...at.map((p) => p[1]));
      const w = g.measureText(text).width;
      label(g, text, cx - w / 2, top - 4 * unit, color);
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

  /** Start measuring `kind` (distance, angle, roi); the same kind again, or Escape, cancels. */
  startMeasuring(kind = "distance") {
    if (!this.layout) return;
    const was = this.tool;
    this.tool = this.tool === kind ? null : kind;
    this.draft = [];
    const d = this.layout.d.planes[this.layout.plane];
    this.cursor = this.tool ? (was ? this.cursor : { col: (d.cols - 1) / 2, row: (d.rows - 1) / 2 }) : null;
    const t = TOOLS[this.tool];
    this.app.announce(t ? `Measuring ${t.what}: ${t.start}, or move the cross with Shift and the arrow keys and press Enter.` : "Measuring cancelled.");
    this.render();
  }

  /** Place the next point of the measurement at image coordinates `at` ({col, row}); the last
   * point needed sends it. */
  async placeMeasurePoint(at) {
    const v = this.view();
    if (!this.tool || !v || !this.layout || !at) return;
    const kind = this.tool;
    const [, most] = POINTS_PER_MEASURE[kind];
    const p = imageToPatient(this.layout.d, this.layout.plane, at.col, at.row, this.layout.index);
    const last = this.draft[this.draft.length - 1];
    if (last && Math.hypot(...p.map((x, k) => x - last[k])) < 1e-9) return; // a double click's second click
    if (kind === "roi" && this.draft.length >= POINTS_PER_MEASURE.roi[0] && this.#nearFirst(at)) return this.finishRegion();
    this.draft.push(p);
    const n = this.draft.length;
    if (n < most) {
      if (kind === "distance") this.app.announce("First point placed. Place the second point.");
      else if (kind === "angle") this.app.announce(n === 1 ? "First point placed. Place the vertex." : "Vertex placed. Place the last point.");
      else this.app.announce(`Corner ${n} of the region placed.${n >= 3 ? " Press F or click the first corner to close it." : ""}`);
      this.render();
      return;
    }
    await this.#submit(kind);
  }

  /** Close the region being drawn and measure it (three corners at least). */
  async finishRegion() {
    if (this.tool !== "roi") return;
    if (this.draft.length < POINTS_PER_MEASURE.roi[0]) {
      this.app.announce("A region needs three corners at least.");
      return;
    }
    await this.#submit("roi");
  }

  /** Take back the last point placed. */
  undoPoint() {
    if (!this.tool || this.draft.length === 0) return;
    this.draft.pop();
    this.app.announce(this.draft.length ? `Point taken back: ${this.draft.length} placed.` : "Point taken back: none placed.");
    this.render();
  }

  #nearFirst(at) {
    const rect = this.canvas.getBoundingClientRect();
    const css = rect.width > 0 ? rect.width / this.layout.size : 1;
    const first = this.#toCanvas(...imageColRow(this.layout.d, this.layout.plane, this.draft[0]));
    const here = this.#toCanvas(at.col, at.row);
    return Math.hypot(first[0] - here[0], first[1] - here[1]) * css <= CLOSE_PX;
  }

  async #submit(kind) {
    const v = this.view();
    const points = this.draft.slice(0, POINTS_PER_MEASURE[kind][1]);
    this.draft = [];
    this.tool = null;
    this.cursor = null;
    this.render();
    let id;
    try {
      id = await this.client.measure(v.series, kind, points);
    } catch (err) {
      this.app.alertText(`The measurement was not stored: ${err.message}`);
      return;
    }
    // The server computed the value (and a region's statistics): say it once it is here.
    const m = await this.#arrived(id);
    if (m) this.app.announce(`${describeMeasurement(m).replace(/:/u, " measured:")}.`);
  }

  // The measurement `id` once it is in the room's list (null if it is not within 10 s).
  #arrived(id) {
    const now = this.client.panels.measurements.get(id);
    if (now) return Promise.resolve(now);
    return new Promise((resolve) => {
      const timer = setTimeout(() => resolve(null), 10000);
      const fns = this.arrivals.get(id) ?? [];
      fns.push(() => {
        clearTimeout(timer);
        resolve(this.client?.panels.measurements.get(id) ?? null);
      });
      this.arrivals.set(id, fns);
    });
  }

  // ----------------------------------------------------------------- uploading a series

  /** Upload a DICOM series from files the member chose (a .zip, or .dcm files), optionally
   * asking the server to de-identify it; it then shows in the shared panel. */
  async uploadFiles(files, { deidentify = false } = {}) {
    const c = this.client;
    if (!c || files.length === 0) return;
    const typed = $("series-name").value.trim();
    const first = files[0].name.replace(/\.(zip|dcm)$/iu, "");
    const name = (typed || (files.length === 1 ? first : `${first} and ${files.length - 1} more`) || "series").replace(/[\x00-\x1f\x7f/\\]/gu, " ").slice(0, 128);
    const total = files.reduce((s, f) => s + f.size, 0);
    this.upload = { files, name, state: "sending", code: null, attributes: [], sent: 0, total, deidentify };
    this.#renderUpload();
    const what = `${files.length} file${files.length === 1 ? "" : "s"}, ${megabytes(total)}`;
    this.#uploadStatus(`Uploading ${name} (${what})${deidentify ? ", to be de-identified" : ""}…`, true);
    let listing;
    try {
      listing = await c.uploadSeries(files, {
        name,
        deidentify,
        onProgress: (sent, of) => {
          if (this.upload?.files !== files) return;
          this.upload.sent = sent;
          this.upload.total = of ?? total;
          if (sent >= this.upload.total && this.upload.state === "sending") {
            this.upload.state = "checking";
            this.#uploadStatus("Sent. The server is reading the series…", true);
          }
          this.#renderUpload();
        },
      });
    } catch (err) {
      if (this.upload?.files !== files) return;
      // De-identifying does not help a second time, nor pixels with burned-in annotations.
      const again = err.code === "identifiable_data" && (deidentify || (err.attributes ?? []).includes("BurnedInAnnotation"));
      this.upload = { ...this.upload, state: "refused", code: err.code ?? "http_error", attributes: err.attributes ?? [], message: err.message, again };
      this.#renderUpload();
      // The alert (read at once) has the server's words; the box below the input says what it
      // means and what can be done.
      this.#uploadStatus(`${name} was refused.`, false);
      this.app.alertText(`The series was not uploaded: ${err.message}`);
      return;
    }
    this.upload = { ...this.upload, state: "done", sha256: listing.sha256 };
    $("series-upload").value = "";
    this.#renderUpload();
    this.app.alertText("");
    this.#uploadStatus(`Uploaded ${listing.name}: ${listing.instances} images${listing.deidentified ? ", de-identified" : ""}.`, true);
    await this.refreshSeries();
    $("series-select").value = listing.sha256;
    await this.showSeries(listing.sha256);
  }

  /** Show series `sha` to everyone: in the open panel, or in a new one. */
  async showSeries(sha) {
    if (!this.app.grants().has("manipulate_objects")) return;
    if (this.panelId === null) return this.openSelected();
    try {
      await this.client.setImageView(this.panelId, { series: sha });
      this.app.announce(`${this.nameOfSeries(sha)} is shown to everyone in the room.`);
    } catch (err) {
      this.app.alertText(`The series was not shown: ${err.message}`);
    }
  }

  #uploadStatus(text, say) {
    $("series-upload-status").textContent = text;
    if (say) this.app.announce(text);
  }

  #renderUpload() {
    const u = this.upload;
    const bar = $("series-progress");
    bar.hidden = !u || (u.state !== "sending" && u.state !== "checking");
    if (u && !bar.hidden) {
      if (u.state === "checking") bar.removeAttribute("value"); // the server's part: no measure
      else bar.value = u.total ? Math.min(1, u.sent / u.total) : 0;
      bar.setAttribute("aria-valuetext", u.state === "checking" ? "The server is reading the series" : `${Math.round((100 * u.sent) / (u.total || 1))} % sent`);
    }
    const box = $("series-refusal");
    box.hidden = !u || u.state !== "refused";
    box.dataset.code = u?.state === "refused" ? u.code : "";
    if (box.hidden) return;
    const extra = u.again ? " It cannot be de-identified here (a burned-in annotation, for one, stays in the pixels)." : "";
    $("series-refusal-text").textContent = `${UPLOAD_REFUSALS[u.code] ?? `The upload failed: ${u.message}`}${extra}`;
    $("series-attributes").replaceChildren(
      ...u.attributes.map((k) => {
        const li = document.createElement("li");
        li.textContent = k;
        return li;
      }),
    );
    $("series-attributes").hidden = u.attributes.length === 0;
    $("series-deidentify").hidden = u.code !== "identifiable_data" || u.again;
  }

  // ----------------------------------------------------------------- the linked model

  /** The series' frame of reference as listed (de-identified series list their new one, which
   * the room accepts as it does the original). */
  #frameOf(sha) {
    return this.#descriptor(sha)?.frame_of_reference ?? this.series.find((s) => s.sha256 === sha)?.frame_of_reference ?? "";
  }

  #modelName(id) {
    const o = this.client?.objects.get(id);
    return o ? (o.name ?? `model ${id}`) : `model ${id}`;
  }

  #renderLink() {
    const c = this.client;
    const p = this.panel;
    if (!c || p === null) return;
    const sel = $("panel-model");
    const linked = p.objectId ?? null;
    const options = [new Option("Not linked", "")];
    for (const o of c.objects.values()) options.push(new Option(o.name ?? `Model ${o.id}`, String(o.id)));
    const keep = document.activeElement === sel || this.linkChoice !== undefined ? sel.value : String(linked ?? "");
    const sig = options.map((o) => `${o.value}:${o.text}`).join("|");
    if (sel.dataset.sig !== sig) {
      sel.replaceChildren(...options);
      sel.dataset.sig = sig;
    }
    sel.value = options.some((o) => o.value === keep) ? keep : String(linked ?? "");
    const frame = this.#frameOf(p.series);
    const may = this.app.grants().has("manipulate_objects");
    const chosen = sel.value === "" ? null : Number(sel.value);
    sel.disabled = !may || !frame;
    $("panel-link").disabled = !may || !frame || chosen === linked;
    $("panel-link").textContent = chosen === null && linked !== null ? "Unlink" : "Link";
    $("images").dataset.linked = String(linked ?? "");
    let note;
    if (!frame) note = "This series has no frame of reference: no model can be linked to it.";
    else if (linked !== null) note = `Linked to ${this.#modelName(linked)}: click a point on the model in the 3D view (or aim the centre cross at it and press Enter) to show the images there.`;
    else if (c.objects.size === 0) note = "No model in the room to link.";
    else note = "Link a model made from this series (in its frame of reference) to find its points in the images.";
    if ($("panel-link-note").textContent !== note) $("panel-link-note").textContent = note;
  }

  #announceLink(p, who, mine) {
    const linked = p.objectId ?? null;
    if (this.linkShown !== undefined && this.linkShown !== linked && !mine) {
      this.app.announce(linked === null ? `${who} unlinked the images from the model.` : `${who} linked the images to ${this.#modelName(linked)}.`);
    }
    this.linkShown = linked;
  }

  /** Link the panel to the model chosen in the list (or unlink it). */
  async linkSelected() {
    const p = this.panel;
    if (p === null) return;
    const v = $("panel-model").value;
    const objectId = v === "" ? null : Number(v);
    try {
      await this.client.linkPanel(p.id, objectId, objectId === null ? null : this.#frameOf(p.series));
      this.linkChoice = undefined;
      this.linkShown = objectId;
      this.app.announce(objectId === null ? "The images are no longer linked to a model." : `The images are linked to ${this.#modelName(objectId)}. Click a point on it to show the images there.`);
    } catch (err) {
      this.app.alertText(`The images were not linked: ${err.message}`);
    }
    this.render();
  }

  /** A point picked on model `objectId` (its local frame, metres): when the panel is linked
   * to that model, the images move to it for everyone. True when it was the linked model. */
  locateAt(objectId, local) {
    const p = this.panel;
    if (p === null || p.objectId !== objectId) return false;
    if (!this.app.grants().has("manipulate_objects")) {
      this.app.announce("Your role follows the shared images; it cannot move them.");
      return true;
    }
    this.client
      .locate(p.id, local)
      .then((slices) => {
        const plane = this.view()?.plane ?? "axial";
        const count = this.#descriptor(p.series)?.planes[plane].count;
        const k = PLANES.indexOf(plane);
        this.local = null;
        this.app.announce(`The images show the point on ${this.#modelName(objectId)}: ${plane} image ${slices[k] + 1}${count ? ` of ${count}` : ""}.`);
        this.render();
      })
      .catch((err) => this.app.alertText(`The images did not move to the point: ${err.message}`));
    return true;
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
    canvas.addEventListener("dblclick", () => {
      if (this.tool === "roi") this.finishRegion();
    });
    $("series-upload").addEventListener("change", (e) => this.uploadFiles([...e.target.files]));
    $("series-deidentify").addEventListener("click", () => {
      if (this.upload?.files) this.uploadFiles(this.upload.files, { deidentify: true });
    });
    $("panel-model").addEventListener("change", () => {
      this.linkChoice = $("panel-model").value;
      this.#renderLink();
    });
    $("panel-link").addEventListener("click", () => this.linkSelected());
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
    for (const [kind, t] of Object.entries(TOOLS)) {
      $(t.button).addEventListener("click", () => {
        this.startMeasuring(kind);
        canvas.focus();
      });
    }
    $("measure-finish").addEventListener("click", () => {
      this.finishRegion();
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
    else if (Object.values(TOOLS).some((t) => t.key === key.toLowerCase())) this.startMeasuring(Object.keys(TOOLS).find((k) => TOOLS[k].key === key.toLowerCase()));
    else if (key === "Enter" && this.tool) this.placeMeasurePoint(this.cursor);
    else if ((key === "f" || key === "F") && this.tool === "roi") this.finishRegion();
    else if (key === "Backspace" && this.tool) this.undoPoint();
    else if (key === "Escape" && this.tool) this.startMeasuring(this.tool);
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
      measurements: c ? [...c.panels.measurements.values()].map((m) => ({ id: m.id, kind: m.kind, value: m.value, author: m.author, points: m.points, mean: m.mean ?? null, sd: m.sd ?? null, units: m.units ?? null })) : [],
      tool: this.tool,
      draft: this.draft.map((p) => [...p]),
      drawn: this.drawn.map((m) => ({ id: m.id, kind: m.kind, points: m.points.map((p) => [...p]), label: m.label })),
      linked: this.panel?.objectId ?? null,
      upload: this.upload && { name: this.upload.name, state: this.upload.state, code: this.upload.code, attributes: [...this.upload.attributes], sent: this.upload.sent, total: this.upload.total, sha256: this.upload.sha256 ?? null },
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

function line(g, a, b, color, unit, dash = []) {
  g.setLineDash(dash);
  g.strokeStyle = "#000";
  g.lineWidth = 4 * unit;
  g.beginPath();
  g.moveTo(...a);
  g.lineTo(...b);
  g.stroke();
  g.strokeStyle = color;
  g.lineWidth = 2 * unit;
  g.stroke();
  g.setLineDash([]);
}

function megabytes(n) {
  return n < 1e6 ? `${Math.max(1, Math.round(n / 1e3))} kB` : `${(n / 1e6).toFixed(1)} MB`;
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
