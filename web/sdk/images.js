// Medical image series in the browser SDK, mirroring client_sdk/images.py: the room's series
// over HTTP (with the member's token, like assets), and the room's shared image viewers
// (`client.panels`) with their calls and events.
//
//   const listing = await client.uploadSeries(zipBytes, { name: "CT", deidentify: true });
//   const series = await client.series(listing.sha256);          // geometry and planes
//   const { bytes } = await client.fetchSlice(listing.sha256, "axial", 40, [40, 400]);
//   const panelId = await client.openPanel(listing.sha256, { position: [0, 1.5, -1] });
//   await client.setImageView(panelId, { slices: [41, 32, 32], window: [40, 400] });
//   const mid = await client.measure(listing.sha256, "distance", [p0, p1]);
//
// `client.panels` maps panel ids to panels ({id, series, position, rotation, width, plane,
// slices, window, zoom, pan, version, objectId, by}); `client.panels.measurements` and
// `client.panels.pointers` hold the rest. Events: panel_changed {panelId, closed, by},
// pointer_moved {memberId, panelId, point (null: hidden)}, measurement_changed
// {measurementId, deleted, seq}, images_synced {panels, measurements}. Each call resolves once
// the server has applied it and rejects with RequestError (its `code`) when refused.

// RequestError is used only inside calls, after both modules have loaded (client.js imports
// this one).
import { RequestError } from "./client.js";

/** The three planes a panel shows, in the order of a panel's `slices`. */
export const PLANES = Object.freeze(["axial", "coronal", "sagittal"]);

const IDENTITY = Object.freeze([0, 0, 0, 1]);

function vec(v, n, name) {
  if (!Array.isArray(v) || v.length !== n || !v.every(Number.isFinite)) {
    throw new TypeError(`${name} must be ${n} finite numbers`);
  }
  return v.map(Number);
}

/** The room's image panels (a Map panel id -> panel), with its measurements (id ->
 * measurement) and visible pointers (member id -> {panelId, point}). */
export class ImagePanels extends Map {
  constructor(client) {
    super();
    this._client = client;
    /** Measurements by id: {id, series, kind, points, value, author, authorId, time, seq,
     * label, mean, sd, min, max, pixels, units}. */
    this.measurements = new Map();
    /** Visible pointers: member id -> {panelId, point} (patient mm). */
    this.pointers = new Map();
    /** True once the room's panels and measurements have arrived on this connection. */
    this.synced = false;
    this._waiters = new Set(); // functions called on every panel change
  }

  /** Resolve once the room's panels and measurements have arrived (img_synced). */
  waitSynced(timeout = 5) {
    return this.#until(() => this.synced, timeout, "the room's panels did not arrive");
  }

  /** Resolve with the panel once its state is at least `version` (changes reach the room with
   * the tick after their acknowledgement). */
  waitVersion(panelId, version, timeout = 5) {
    return this.#until(
      () => (this.get(panelId)?.version ?? -1) >= version && this.get(panelId),
      timeout,
      `panel ${panelId} did not reach version ${version}`,
    );
  }

  #until(test, timeout, message) {
    const now = test();
    if (now) return Promise.resolve(now);
    return new Promise((resolve, reject) => {
      const check = () => {
        const v = test();
        if (!v) return;
        clearTimeout(timer);
        this._waiters.delete(check);
        resolve(v);
      };
      const timer = setTimeout(() => {
        this._waiters.delete(check);
        reject(new Error(message));
      }, timeout * 1000);
      this._waiters.add(check);
    });
  }

  #changed() {
    for (const fn of [...this._waiters]) fn();
  }

  // A fresh connection, a pause ended or another room: the server sends everything again.
  _renewed() {
    this.clear();
    this.measurements.clear();
    this.pointers.clear();
    this.synced = false;
  }

  _onMessage(m) {
    const c = this._client;
    switch (m.t) {
      case "img_panel": {
        const old = this.get(m.panel_id);
        if (old !== undefined && old.version > m.version) return; // older than the one we have
        this.set(m.panel_id, {
          id: m.panel_id,
          series: m.series,
          position: m.position,
          rotation: m.rotation,
          width: m.width,
          plane: m.plane,
          slices: m.slices,
          window: m.window,
          zoom: m.zoom,
          pan: m.pan,
          version: m.version,
          objectId: m.object_id,
          by: m.by,
        });
        this.#changed();
        c.emit({ type: "panel_changed", panelId: m.panel_id, closed: false, by: m.by });
        break;
      }
      case "img_closed":
        this.delete(m.panel_id);
        this.#changed();
        c.emit({ type: "panel_changed", panelId: m.panel_id, closed: true, by: m.by });
        break;
      case "img_pointers":
        for (const [member, panel, x, y, z] of m.pointers) {
          const point = panel === 0 ? null : [x, y, z];
          if (point === null) this.pointers.delete(member);
          else this.pointers.set(member, { panelId: panel, point });
          c.emit({ type: "pointer_moved", memberId: member, panelId: panel, point });
        }
        break;
      case "img_measurement":
        this.measurements.set(m.measurement_id, {
          id: m.measurement_id,
          series: m.series,
          kind: m.kind,
          points: m.points,
          value: m.value,
          author: m.author,
          authorId: m.author_id,
          time: m.time,
          seq: m.seq,
          label: m.label,
          mean: m.mean,
          sd: m.sd,
          min: m.min,
          max: m.max,
          pixels: m.pixels,
          units: m.units,
        });
        c.emit({ type: "measurement_changed", measurementId: m.measurement_id, deleted: false, seq: m.seq });
        break;
      case "img_measurement_deleted":
        this.measurements.delete(m.measurement_id);
        c.emit({ type: "measurement_changed", measurementId: m.measurement_id, deleted: true, seq: m.seq });
        break;
      case "img_synced":
        this.synced = true;
        this.#changed();
        c.emit({ type: "images_synced", panels: m.panels, measurements: m.measurements });
        break;
      default:
        break;
    }
  }
}

/** The image calls of MedverseClient (mixed into its prototype by client.js). */
export const IMAGE_METHODS = {
  // --------------------------------------------------------------- series over HTTP

  /** The URL of the room's series (one series with `sha256`, and a `suffix`). */
  seriesUrl(sha256 = null, suffix = "") {
    return this.roomUrl(`/series${sha256 ? `/${sha256}` : ""}${suffix}`);
  },

  /** The URL of one rendered image: `plane` (axial, coronal, sagittal), image `index`, and a
   * `window` [center, width] (default: the series' own). Fetch it with fetchSlice (it needs
   * the token). */
  sliceUrl(sha256, plane, index, window = null) {
    const q = window ? `?window=${encodeURIComponent(`${Number(window[0])},${Number(window[1])}`)}` : "";
    return this.seriesUrl(sha256, `/${plane}/${Math.trunc(index)}.png${q}`);
  },

  /** Upload a DICOM series; resolves with its listing ({sha256, name, instances, ...}).
   * `body`: a zip of its files or one file (Uint8Array, ArrayBuffer or Blob), or an array of
   * files (Blobs or Files: .dcm files, or zips), sent as multipart/form-data with one part
   * each. `deidentify`: strip the identifying data first (rooms that do not take
   * identifiable images refuse it otherwise, with RequestError `identifiable_data` whose
   * `attributes` name the attributes by keyword). `onProgress(sent, total)`: bytes sent so
   * far, where the platform reports them (a browser's XMLHttpRequest). */
  async uploadSeries(body, { name = "series", deidentify = false, onProgress = null } = {}) {
    const q = `?name=${encodeURIComponent(name)}&deidentify=${deidentify ? 1 : 0}`;
    const url = this.seriesUrl(null, q);
    let payload = body;
    const headers = {};
    if (Array.isArray(body)) {
      if (body.length === 0) throw new TypeError("no files to upload");
      payload = new FormData();
      body.forEach((file, i) => payload.append("file", file, file.name ?? `file${i}.dcm`));
    } else {
      headers["Content-Type"] = "application/zip";
    }
    if (typeof onProgress === "function" && typeof globalThis.XMLHttpRequest === "function") {
      return xhrJson(url, { ...headers, Authorization: this.httpToken ? `Bearer ${this.httpToken}` : undefined }, payload, onProgress);
    }
    const resp = await this.roomFetch(url, { method: "POST", headers, body: payload });
    return resp.json();
  },

  /** Every series of the room (their listings), oldest first. */
  async listSeries() {
    return (await (await this.roomFetch(this.seriesUrl())).json()).series;
  },

  /** The series descriptor: the listing plus `geometry`, `planes` (for each plane: count,
   * rows, cols, origin, row/col/slice steps in mm), `window` and `units`. */
  async series(sha256) {
    return (await this.roomFetch(this.seriesUrl(sha256))).json();
  },

  /** One rendered image: resolves with {bytes (PNG, a Uint8Array; null when `etag` still
   * holds), etag, blob()}. `window` is [center, width] or null for the series' default. */
  async fetchSlice(sha256, plane, index, window = null, { etag = null } = {}) {
    const headers = etag ? { "If-None-Match": etag } : {};
    const resp = await this.roomFetch(this.sliceUrl(sha256, plane, index, window), { headers });
    const tag = resp.headers.get("ETag") ?? "";
    if (resp.status === 304) return { bytes: null, etag: tag };
    return { bytes: new Uint8Array(await resp.arrayBuffer()), etag: tag };
  },

  /** Delete a series from the room (its uploader or a host). */
  async removeSeries(sha256) {
    await this.roomFetch(this.seriesUrl(sha256), { method: "DELETE" });
  },

  // --------------------------------------------------------------- viewers

  /** Place a panel showing `series` in the room; resolves with its id once stored. */
  async openPanel(series, { position = [0, 1.5, -1], rotation = IDENTITY, width = 0.6 } = {}) {
    const pos = vec(position, 3, "position");
    const rot = vec(rotation, 4, "rotation");
    const ack = await this.request((req) => ({ t: "img_open", req, series, position: pos, rotation: rot, width: Number(width) }));
    return ack.panel_id;
  },

  /** Take a panel out of the room. */
  async closePanel(panelId) {
    await this.request((req) => ({ t: "img_close", req, panel_id: panelId }));
  },

  /** Change a panel's shared viewer state (what is not given stays): series, plane, slices
   * [axial, coronal, sagittal], window [center, width], zoom, pan [x, y]. */
  async setImageView(panelId, { series = null, plane = null, slices = null, window = null, zoom = null, pan = null } = {}) {
    const msg = {
      t: "img_view",
      panel_id: panelId,
      series,
      plane,
      slices: slices === null ? null : vec(slices, 3, "slices").map(Math.trunc),
      window: window === null ? null : vec(window, 2, "window"),
      zoom,
      pan: pan === null ? null : vec(pan, 2, "pan"),
    };
    await this.request((req) => ({ ...msg, req }));
  },

  /** Move a panel in the room (and resize it with `width`). */
  async placePanel(panelId, position, { rotation = IDENTITY, width = null } = {}) {
    const pos = vec(position, 3, "position");
    const rot = vec(rotation, 4, "rotation");
    await this.request((req) => ({ t: "img_place", req, panel_id: panelId, position: pos, rotation: rot, width }));
  },

  /** Link a panel to a model object made in the series' frame of reference (null unlinks). */
  async linkPanel(panelId, objectId, frameOfReference = null) {
    await this.request((req) => ({ t: "img_link", req, panel_id: panelId, object_id: objectId, frame_of_reference: frameOfReference }));
  },

  /** Move the panel's images to `point` on its linked model (model frame, metres); resolves
   * with the panel's new image indices once the server has them. */
  async locate(panelId, point) {
    const pt = vec(point, 3, "point");
    const before = this.panels.get(panelId)?.version ?? -1;
    await this.request((req) => ({ t: "img_locate", req, panel_id: panelId, point: pt }));
    return (await this.panels.waitVersion(panelId, before + 1)).slices;
  },

  /** Show this member's pointer on a panel at `point` (patient mm); null hides it. Not
   * acknowledged: the newest reaches the room once per tick. */
  point(panelId, point) {
    const pt = point === null ? null : vec(point, 3, "point");
    this.send({ t: "img_pointer", panel_id: pt === null ? 0 : panelId, point: pt });
  },

  /** Measure (`distance`: 2 points, `angle`: 3, `roi`: 3-64 in one image) with points in
   * patient mm; resolves with the measurement id once stored (its values arrive in
   * `panels.measurements`). */
  async measure(series, kind, points, label = null) {
    const pts = points.map((p) => vec(p, 3, "point"));
    const ack = await this.request((req) => ({ t: "img_measure", req, series, kind, points: pts, label }));
    return ack.measurement_id;
  },

  /** Delete a measurement (its author or a host). */
  async deleteMeasurement(measurementId) {
    await this.request((req) => ({ t: "img_unmeasure", req, measurement_id: measurementId }));
  },
};

// A POST with upload progress (fetch reports none): resolves with the JSON answer, rejects
// with RequestError (the server's code, and `attributes` when it names any) as roomFetch does.
function xhrJson(url, headers, body, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new globalThis.XMLHttpRequest();
    xhr.open("POST", url);
    for (const [k, v] of Object.entries(headers)) if (v !== undefined) xhr.setRequestHeader(k, v);
    xhr.upload.onprogress = (e) => onProgress(e.loaded, e.lengthComputable ? e.total : null);
    xhr.onerror = () => reject(new RequestError("http_error", "the upload did not reach the server"));
    xhr.onload = () => {
      let doc = null;
      try {
        doc = JSON.parse(xhr.responseText);
      } catch {
        // not JSON: judged by the status alone
      }
      if (xhr.status < 400 && doc !== null) return resolve(doc);
      const err = doc?.error;
      const attributes = Array.isArray(err?.attributes) ? err.attributes.map(String) : null;
      reject(new RequestError(err ? String(err.code) : "http_error", err ? String(err.message) : `HTTP ${xhr.status}`, { attributes }));
    };
    xhr.send(body);
  });
}

/** Where a panel's image `index` of `plane` lies, and the patient point (mm) of a pixel
 * (column `col`, row `row`) of it, from the series descriptor's `planes`. */
export function pixelToPatient(descriptor, plane, index, col, row) {
  const p = descriptor.planes[plane];
  const at = (k) => p.origin[k] + col * p.col_step[k] + row * p.row_step[k] + index * p.slice_step[k];
  return [at(0), at(1), at(2)];
}
