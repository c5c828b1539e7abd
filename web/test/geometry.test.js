// The case images view's pure geometry (web/app/geometry.js): patient and image coordinates,
// which measurements lie on the image shown, an angle's arc, a region's area and the texts.
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  POINTS_PER_MEASURE,
  angleArc,
  angleDegrees,
  centroid,
  describeMeasurement,
  imageToPatient,
  measurementLabel,
  onImage,
  patientToImage,
  polygonArea,
} from "../app/geometry.js";

// A descriptor as the server writes one for benchmarks/dicomgen.synthetic_ct(64, 64, 24):
// 0.7 mm pixels, 2.5 mm slices going up from z = 0; coronal and sagittal images put the
// highest slice on the top row.
const X0 = -(63 * 0.7) / 2;
const D = {
  planes: {
    axial: { count: 24, rows: 64, cols: 64, origin: [X0, X0, 0], col_step: [0.7, 0, 0], row_step: [0, 0.7, 0], slice_step: [0, 0, 2.5] },
    coronal: { count: 64, rows: 24, cols: 64, origin: [X0, X0, 57.5], col_step: [0.7, 0, 0], row_step: [0, 0, -2.5], slice_step: [0, 0.7, 0] },
    sagittal: { count: 64, rows: 24, cols: 64, origin: [X0, X0, 57.5], col_step: [0, 0.7, 0], row_step: [0, 0, -2.5], slice_step: [0.7, 0, 0] },
  },
};
const close = (a, b, eps = 1e-9) => assert.ok(Math.abs(a - b) <= eps, `${a} != ${b}`);

test("geometry: image coordinates and patient points map to each other in every plane", () => {
  for (const plane of ["axial", "coronal", "sagittal"]) {
    for (const [col, row, index] of [
      [0, 0, 0],
      [12.25, 7.5, 3],
      [63, 23, 20],
    ]) {
      const p = imageToPatient(D, plane, col, row, index);
      const q = patientToImage(D, plane, p);
      close(q.col, col);
      close(q.row, row);
      close(q.index, index);
    }
  }
  // Axial image 4 is 10 mm up; the coronal image's top row is the highest slice.
  assert.deepEqual(imageToPatient(D, "axial", 0, 0, 4), [X0, X0, 10]);
  close(patientToImage(D, "coronal", [0, 0, 57.5]).row, 0);
  close(patientToImage(D, "coronal", [0, 0, 0]).row, 23);
});

test("geometry: a measurement is on the image shown when every point lies within half a slice", () => {
  const at = (col, row, index) => imageToPatient(D, "axial", col, row, index);
  const angle = [at(10, 10, 5), at(20, 20, 5.5), at(30, 10, 4.5)];
  const drawn = onImage(D, "axial", angle, 5);
  assert.deepEqual(
    drawn.map((p) => [Math.round(p.col), Math.round(p.row)]),
    [
      [10, 10],
      [20, 20],
      [30, 10],
    ],
  );
  // Half a slice spacing and a little more: not on image 5, nor on the next ones.
  assert.equal(onImage(D, "axial", [at(10, 10, 5), at(20, 20, 5.51)], 5), null);
  assert.equal(onImage(D, "axial", angle, 6), null);
  assert.equal(onImage(D, "axial", angle, 4), null);
  // An axial region is not drawn on a coronal image through it: its corners are at several
  // coronal indices; a coronal one is, on its own image only.
  const roi = [at(10, 10, 5), at(30, 10, 5), at(30, 30, 5), at(10, 30, 5)];
  for (let j = 0; j < 64; j++) assert.equal(onImage(D, "coronal", roi, j), null);
  const cor = [0, 1, 2].map((k) => imageToPatient(D, "coronal", 10 + 10 * k, 5 + k, 40));
  assert.ok(onImage(D, "coronal", cor, 40));
  assert.equal(onImage(D, "coronal", cor, 41), null);
  // Float rounding of a point exactly half a slice away keeps it on the image.
  assert.ok(onImage(D, "axial", [[0, 0, 12.5 + 1.25 + 1e-12]], 5));
});

test("geometry: angles in degrees, 2D and 3D, and none with a zero-length arm", () => {
  close(angleDegrees([10, 0, 0], [0, 0, 0], [0, 0, 7]), 90);
  close(angleDegrees([1, 0], [0, 0], [-3, 0]), 180);
  close(angleDegrees([1, 1, 0], [0, 0, 0], [1, 0, 0]), 45, 1e-12);
  close(angleDegrees([2, 0], [0, 0], [5, 0]), 0);
  assert.equal(angleDegrees([0, 0, 0], [0, 0, 0], [1, 0, 0]), null);
});

test("geometry: an angle's arc goes the shorter way round, its label on the bisector", () => {
  // Canvas y points down: from +x to +y is clockwise on screen (anticlockwise false).
  let arc = angleArc([10, 0], [0, 0], [0, 10]);
  close(arc.start, 0);
  close(arc.end, Math.PI / 2);
  assert.equal(arc.anticlockwise, false);
  close(arc.mid, Math.PI / 4);
  arc = angleArc([0, 10], [0, 0], [10, 0]);
  close(arc.start, Math.PI / 2);
  close(arc.end, 0);
  assert.equal(arc.anticlockwise, true);
  // Across the ±π seam: a narrow angle opening to the left stays narrow.
  arc = angleArc([-10, 1], [0, 0], [-10, -1]);
  close(Math.abs(arc.end - arc.start), 2 * Math.atan2(1, 10), 1e-12);
  close(Math.abs(Math.cos(arc.mid) + 1), 0, 1e-12); // the bisector points along -x
  // The arc's sweep equals the angle between the arms, whatever the vertex's place.
  const a = [13, 4];
  const v = [5, 9];
  const c = [2, -3];
  arc = angleArc(a, v, c);
  close((Math.abs(arc.end - arc.start) * 180) / Math.PI, angleDegrees(a, v, c), 1e-9);
});

test("geometry: a region's area (either winding) and its label's place", () => {
  const square = [
    [0, 0],
    [10, 0],
    [10, 10],
    [0, 10],
  ];
  assert.equal(polygonArea(square), 100);
  assert.equal(polygonArea([...square].reverse()), 100);
  assert.equal(
    polygonArea([
      [0, 0],
      [4, 0],
      [0, 3],
    ]),
    6,
  );
  assert.deepEqual(centroid(square), [5, 5]);
  assert.deepEqual(POINTS_PER_MEASURE.roi, [3, 64]);
  assert.deepEqual(POINTS_PER_MEASURE.angle, [3, 3]);
});

test("geometry: the texts of each kind, a region's with its mean and SD in its units", () => {
  assert.equal(describeMeasurement({ kind: "distance", value: 7 }), "Distance: 7.0 mm");
  assert.equal(describeMeasurement({ kind: "angle", value: 89.96, label: "knee" }), 'Angle "knee": 90.0°');
  const roi = { kind: "roi", value: 49, mean: 40, sd: 2.54, units: "HU" };
  assert.equal(describeMeasurement(roi), "Region: 49.0 mm², mean 40.0 ± 2.5 HU");
  assert.equal(measurementLabel(roi), "40.0 ± 2.5 HU, 49.0 mm²");
  assert.equal(measurementLabel({ kind: "angle", value: 45 }), "45.0°");
  assert.equal(measurementLabel({ kind: "roi", value: 12, mean: null }), "12.0 mm²");
  assert.equal(describeMeasurement({ kind: "roi", value: 12, mean: 3, sd: null, units: null }), "Region: 12.0 mm², mean 3.0 ± 0.0");
});
