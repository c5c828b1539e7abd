// The room's image panels in the 3D view (and in VR): each panel a flat image where it was
// placed, its width as set, its height from the series' geometry, showing the image of the
// panel's shared view (the one this member is changing, while its changes travel).
import * as THREE from "three";

import { PLANES } from "../sdk/index.js";

// The texture's size: images are drawn scaled into it, the panel's shape gives the aspect.
const TEXTURE_PX = 512;

export class ImagePanels3D {
  /** `scene`: the THREE.Scene; `viewer`: the ImageViewer whose image cache is shared. */
  constructor(scene, viewer) {
    this.scene = scene;
    this.viewer = viewer;
    this.meshes = new Map(); // panel id -> {mesh, canvas, texture, key}
  }

  /** Follow the client's panels (each frame: cheap when nothing changed). */
  sync(client) {
    const seen = new Set();
    for (const p of client?.panels.values() ?? []) {
      seen.add(p.id);
      const m = this.meshes.get(p.id) ?? this.#add(p.id);
      const view = p.id === this.viewer.panelId ? (this.viewer.view() ?? p) : p;
      m.mesh.position.set(p.position[0], p.position[1], p.position[2]);
      m.mesh.quaternion.set(p.rotation[0], p.rotation[1], p.rotation[2], p.rotation[3]);
      const g = this.viewer.descriptorOf(view.series)?.planes[view.plane];
      const aspect = g ? (g.rows * g.row_spacing) / (g.cols * g.col_spacing) : 1;
      m.mesh.scale.set(p.width, p.width * aspect, 1);
      const k = PLANES.indexOf(view.plane);
      const { key, bitmap } = this.viewer.imageOf(view.series, view.plane, view.slices[k], view.window);
      if (bitmap !== null && key !== m.key) {
        m.canvas.getContext("2d").drawImage(bitmap, 0, 0, TEXTURE_PX, TEXTURE_PX);
        m.texture.needsUpdate = true;
        m.key = key;
      }
    }
    for (const [id, m] of this.meshes) {
      if (seen.has(id)) continue;
      this.scene.remove(m.mesh);
      m.mesh.geometry.dispose();
      m.mesh.material.dispose();
      m.texture.dispose();
      this.meshes.delete(id);
    }
  }

  #add(id) {
    const canvas = document.createElement("canvas");
    canvas.width = canvas.height = TEXTURE_PX;
    const g = canvas.getContext("2d");
    g.fillStyle = "#000";
    g.fillRect(0, 0, TEXTURE_PX, TEXTURE_PX);
    const texture = new THREE.CanvasTexture(canvas);
    texture.colorSpace = THREE.SRGBColorSpace;
    const mesh = new THREE.Mesh(new THREE.PlaneGeometry(1, 1), new THREE.MeshBasicMaterial({ map: texture, side: THREE.DoubleSide }));
    mesh.name = `image-panel-${id}`;
    this.scene.add(mesh);
    const m = { mesh, canvas, texture, key: null };
    this.meshes.set(id, m);
    return m;
  }

  /** What is drawn: panel id -> {key (the image shown), position, width, height}. */
  describe() {
    const out = {};
    for (const [id, m] of this.meshes) out[id] = { key: m.key, position: m.mesh.position.toArray(), width: m.mesh.scale.x, height: m.mesh.scale.y };
    return out;
  }
}
