// Pure geometry of the case images view: patient coordinates (DICOM LPS, mm) to and from image
// coordinates of a plane, which measurements lie on the image shown, and the 2D shapes drawn
// for them (an angle's arc, a region's outline and label place). No DOM: Node tests these.

const sub = (a, b) => a.map((v, k) => v - b[k]);
const dot = (a, b) => a[0] * b[0] + a[1] * b[1] + a[2] * b[2];

/** Points each measurement kind takes, as protocol/images.py's POINTS_PER_MEASURE: [fewest,
 * most]. A region of interest is a polygon in one image. */
export const POINTS_PER_MEASURE = Object.freeze({ distance: [2, 2], angle: [3, 3], roi: [3, 64] });

/** Image coordinates (col, row, index; pixel centres at whole numbers) of a patient point
 * (mm) in `plane` of a series descriptor: the plane's steps are orthogonal. */
export function patientToImage(d, plane, p) {
  const g = d.planes[plane];
  const v = sub(p, g.origin);
  return {
    col: dot(v, g.col_step) / dot(g.col_step, g.col_step),
    row: dot(v, g.row_step) / dot(g.row_step, g.row_step),
    index: dot(v, g.slice_step) / dot(g.slice_step, g.slice_step),
  };
}

/** The patient point (mm) of image coordinates of `plane`. */
export function imageToPatient(d, plane, col, row, index) {
  const g = d.planes[plane];
  return [0, 1, 2].map((k) => g.origin[k] + col * g.col_step[k] + row * g.row_step[k] + index * g.slice_step[k]);
}

// Rounding of patient coordinates sent and stored (floats through msgpack) must not push a
// point lying exactly half a slice away off the image.
const SLACK = 1e-6;

/** The image coordinates ({col, row} each) of `points` (patient mm) when every one lies on
 * image `index` of `plane` or within half a slice spacing of it; else null (the measurement
 * is not drawn on this image). */
export function onImage(d, plane, points, index) {
  const out = [];
  for (const p of points) {
    const q = patientToImage(d, plane, p);
    if (!(Math.abs(q.index - index) <= 0.5 + SLACK)) return null;
    out.push({ col: q.col, row: q.row });
  }
  return out;
}

/** The angle (degrees, 0-180) at `vertex` between the arms to `a` and `c`: 3D points (the
 * server's definition) or 2D ones; null when an arm has no length. */
export function angleDegrees(a, vertex, c) {
  const u = a.map((v, k) => v - vertex[k]);
  const w = c.map((v, k) => v - vertex[k]);
  const nu = Math.hypot(...u);
  const nw = Math.hypot(...w);
  if (nu === 0 || nw === 0) return null;
  const cos = u.reduce((s, v, k) => s + v * w[k], 0) / (nu * nw);
  return (Math.acos(Math.max(-1, Math.min(1, cos))) * 180) / Math.PI;
}

/** The arc marking an angle drawn on a canvas (y down) at `vertex` between the arms to `a`
 * and `c` (2D points [x, y]): `start` and `end` angles (radians) for CanvasRenderingContext2D.arc
 * with `anticlockwise`, the shorter way round, and `mid`, the direction of the bisector (where
 * the label goes). */
export function angleArc(a, vertex, c) {
  const start = Math.atan2(a[1] - vertex[1], a[0] - vertex[0]);
  const to = Math.atan2(c[1] - vertex[1], c[0] - vertex[0]);
  let sweep = to - start;
  while (sweep > Math.PI) sweep -= 2 * Math.PI;
  while (sweep <= -Math.PI) sweep += 2 * Math.PI;
  return { start, end: start + sweep, anticlockwise: sweep < 0, mid: start + sweep / 2 };
}

/** The area of a simple polygon of 2D points (the shoelace formula; either winding). */
export function polygonArea(points) {
  let s = 0;
  for (let i = 0; i < points.length; i++) {
    const [x0, y0] = points[i];
    const [x1, y1] = points[(i + 1) % points.length];
    s += x0 * y1 - x1 * y0;
  }
  return Math.abs(s) / 2;
}

/** Where a polygon's label goes: the mean of its vertices (2D). */
export function centroid(points) {
  const n = points.length;
  return [points.reduce((s, p) => s + p[0], 0) / n, points.reduce((s, p) => s + p[1], 0) / n];
}

/** The text drawn and listed for a measurement ({kind, value, label, mean, sd, units}). */
export function describeMeasurement(m) {
  const lab = m.label ? ` "${m.label}"` : "";
  if (m.kind === "distance") return `Distance${lab}: ${m.value.toFixed(1)} mm`;
  if (m.kind === "angle") return `Angle${lab}: ${m.value.toFixed(1)}°`;
  return `Region${lab}: ${m.value.toFixed(1)} mm²${regionStats(m)}`;
}

/** A region's statistics as text: ", mean 40.0 ± 2.5 HU" (empty without them). */
export function regionStats(m) {
  if (m.mean === null || m.mean === undefined) return "";
  return `, mean ${m.mean.toFixed(1)} ± ${(m.sd ?? 0).toFixed(1)}${m.units ? ` ${m.units}` : ""}`;
}

/** The short label drawn next to a measurement on the image. */
export function measurementLabel(m) {
  if (m.kind === "distance") return `${m.value.toFixed(1)} mm`;
  if (m.kind === "angle") return `${m.value.toFixed(1)}°`;
  const units = m.units ? ` ${m.units}` : "";
  const stats = m.mean === null || m.mean === undefined ? "" : `${m.mean.toFixed(1)} ± ${(m.sd ?? 0).toFixed(1)}${units}, `;
  return `${stats}${m.value.toFixed(1)} mm²`;
}
