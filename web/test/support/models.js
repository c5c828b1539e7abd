// A tiny binary glTF built in code (tests/models.py's triangle): one triangle mesh used by
// named nodes.
export function triangleGlb(nodes = ["skin", "vessels"]) {
  const pos = new Float32Array([0, 0, 0, 0.1, 0, 0, 0, 0.1, 0]);
  const idx = new Uint16Array([0, 1, 2, 0]); // 3 indices and 2 bytes of padding
  const blob = new Uint8Array(44);
  blob.set(new Uint8Array(pos.buffer), 0);
  blob.set(new Uint8Array(idx.buffer), 36);
  const doc = {
    asset: { version: "2.0", generator: "medverse tests" },
    scene: 0,
    scenes: [{ nodes: nodes.map((_, i) => i) }],
    nodes: nodes.map((name) => ({ name, mesh: 0 })),
    meshes: [{ primitives: [{ attributes: { POSITION: 0 }, indices: 1 }] }],
    buffers: [{ byteLength: blob.length }],
    bufferViews: [
      { buffer: 0, byteOffset: 0, byteLength: 36 },
      { buffer: 0, byteOffset: 36, byteLength: 6 },
    ],
    accessors: [
      { bufferView: 0, componentType: 5126, count: 3, type: "VEC3", min: [0, 0, 0], max: [0.1, 0.1, 0] },
      { bufferView: 1, componentType: 5123, count: 3, type: "SCALAR" },
    ],
  };
  let js = new TextEncoder().encode(JSON.stringify(doc));
  const padded = new Uint8Array(js.length + ((4 - (js.length % 4)) % 4)).fill(0x20);
  padded.set(js);
  js = padded;
  const total = 12 + 8 + js.length + 8 + blob.length;
  const out = new Uint8Array(total);
  const d = new DataView(out.buffer);
  out.set(new TextEncoder().encode("glTF"), 0);
  d.setUint32(4, 2, true);
  d.setUint32(8, total, true);
  d.setUint32(12, js.length, true);
  d.setUint32(16, 0x4e4f534a, true);
  out.set(js, 20);
  d.setUint32(20 + js.length, blob.length, true);
  d.setUint32(24 + js.length, 0x004e4942, true);
  out.set(blob, 28 + js.length);
  return out;
}
