// The room in three.js: the floor, the other members' avatars (head, hands, name, speaking
// ring) sampled from the SDK's interpolation buffer, the shared models with their node
// visibility, clipping plane and annotations, and this member's own viewpoint (a rig the
// desktop controls and WebXR move).
import * as THREE from "three";
import { GLTFLoader } from "three/examples/jsm/loaders/GLTFLoader.js";

const AVATAR_COLORS = [0x2b7bb9, 0xc0392b, 0x27ae60, 0x8e44ad, 0xd35400, 0x16a085, 0x7f8c8d, 0xb7950b];
const ANNOTATION_COLOR = 0xffb000;

/** A text label as a sprite (names, pin texts, measurements). */
export function makeLabel(text, { size = 0.09, color = "#ffffff", background = "rgba(16,40,63,0.85)" } = {}) {
  const canvas = document.createElement("canvas");
  const ctx = canvas.getContext("2d");
  const font = "600 40px system-ui, sans-serif";
  ctx.font = font;
  const width = Math.ceil(ctx.measureText(text).width) + 32;
  canvas.width = width;
  canvas.height = 60;
  ctx.font = font;
  ctx.fillStyle = background;
  ctx.fillRect(0, 0, width, 60);
  ctx.fillStyle = color;
  ctx.textBaseline = "middle";
  ctx.fillText(text, 16, 31);
  const texture = new THREE.CanvasTexture(canvas);
  texture.colorSpace = THREE.SRGBColorSpace;
  const sprite = new THREE.Sprite(new THREE.SpriteMaterial({ map: texture, depthTest: false, transparent: true }));
  sprite.scale.set((size * width) / 60, size, 1);
  sprite.renderOrder = 10;
  sprite.userData.text = text;
  return sprite;
}

function disposeTree(root) {
  root.traverse((o) => {
    o.geometry?.dispose?.();
    const mats = Array.isArray(o.material) ? o.material : o.material ? [o.material] : [];
    for (const m of mats) {
      m.map?.dispose?.();
      m.dispose?.();
    }
  });
}

const setPose = (obj, pose) => {
  obj.position.set(pose.position[0], pose.position[1], pose.position[2]);
  obj.quaternion.set(pose.rotation[0], pose.rotation[1], pose.rotation[2], pose.rotation[3]);
};

/** One member's avatar: head (with a visor showing where it looks), two hands, a name label
 * and a ring that lights up while the member speaks. */
class Avatar {
  constructor(id, name) {
    const color = AVATAR_COLORS[id % AVATAR_COLORS.length];
    const skin = new THREE.MeshStandardMaterial({ color, roughness: 0.6 });
    this.id = id;
    this.group = new THREE.Group();
    this.group.name = `avatar-${id}`;
    this.head = new THREE.Group();
    const skull = new THREE.Mesh(new THREE.SphereGeometry(0.11, 24, 16), skin);
    const visor = new THREE.Mesh(new THREE.BoxGeometry(0.16, 0.05, 0.04), new THREE.MeshStandardMaterial({ color: 0x111111 }));
    visor.position.set(0, 0.01, -0.1); // -Z is forward
    this.ring = new THREE.Mesh(new THREE.TorusGeometry(0.16, 0.012, 8, 32), new THREE.MeshBasicMaterial({ color: 0x3ddc84 }));
    this.ring.rotation.x = Math.PI / 2;
    this.ring.visible = false;
    this.head.add(skull, visor, this.ring);
    this.hands = [0, 1].map(() => {
      const hand = new THREE.Mesh(new THREE.SphereGeometry(0.045, 16, 12), skin);
      hand.visible = false;
      return hand;
    });
    this.label = null;
    this.name = null;
    this.setName(name);
    this.group.add(this.head, ...this.hands);
  }

  setName(name) {
    const text = name ?? `Member ${this.id}`;
    if (text === this.name) return;
    this.name = text;
    if (this.label) {
      this.group.remove(this.label);
      disposeTree(this.label);
    }
    this.label = makeLabel(text);
    this.group.add(this.label);
  }

  update(sample) {
    const [head, left, right] = sample.poses;
    this.head.visible = Boolean(head);
    if (head) {
      setPose(this.head, head);
      this.label.position.set(head.position[0], head.position[1] + 0.25, head.position[2]);
    }
    this.label.visible = Boolean(head);
    [left, right].forEach((p, k) => {
      this.hands[k].visible = Boolean(p);
      if (p) setPose(this.hands[k], p);
    });
    this.ring.visible = sample.speaking;
    this.speaking = sample.speaking;
  }

  dispose() {
    disposeTree(this.group);
  }
}

/** A shared model in the scene: its loaded glTF (or a placeholder box while it loads), its
 * annotations as children, node visibility and clipping applied from the object's view. */
class SharedModel {
  constructor(id, obj) {
    this.id = id;
    this.asset = obj.asset;
    this.group = new THREE.Group();
    this.group.name = `object-${id}`;
    this.group.userData.objectId = id;
    this.content = new THREE.Group();
    this.annotations = new THREE.Group();
    this.group.add(this.content, this.annotations);
    this.placeholder = new THREE.Mesh(new THREE.BoxGeometry(0.2, 0.2, 0.2), new THREE.MeshBasicMaterial({ color: 0x8899aa, wireframe: true }));
    this.content.add(this.placeholder);
    this.loaded = false;
    this.failed = null;
    this.nodeNames = [];
    this.materials = [];
    this.selected = false;
    this.box = new THREE.BoxHelper(this.placeholder, 0xffbf47);
    this.box.visible = false;
    this.annotationsSeq = -1;
  }

  setModel(root) {
    this.content.remove(this.placeholder);
    disposeTree(this.placeholder);
    const model = root.clone(true);
    // Each instance gets its own materials: its clipping plane is its own.
    const names = new Set();
    model.traverse((o) => {
      if (o.name) names.add(o.name);
      if (o.isMesh) {
        o.material = Array.isArray(o.material) ? o.material.map((m) => m.clone()) : o.material.clone();
        for (const m of Array.isArray(o.material) ? o.material : [o.material]) {
          m.side = THREE.DoubleSide; // a clipped model shows its inside
          this.materials.push(m);
        }
      }
    });
    this.nodeNames = [...names].sort();
    this.model = model;
    this.content.add(model);
    this.loaded = true;
  }

  applyView(obj) {
    if (this.model) {
      this.model.traverse((o) => {
        if (o.name && obj.nodes.has(o.name)) o.visible = Boolean(obj.nodes.get(o.name));
      });
    }
  }
}

/** The room: renderer, camera rig, avatars and models. */
export class RoomScene {
  constructor(canvas, client) {
    this.canvas = canvas;
    this.client = client;
    this.renderer = new THREE.WebGLRenderer({ canvas, antialias: true, preserveDrawingBuffer: true });
    this.renderer.setPixelRatio(Math.min(window.devicePixelRatio || 1, 2));
    this.renderer.localClippingEnabled = true;
    this.renderer.xr.enabled = true;
    this.scene = new THREE.Scene();
    this.scene.background = new THREE.Color(0x22303d);
    this.rig = new THREE.Group(); // this member's place in the room (moved by the desktop controls)
    this.camera = new THREE.PerspectiveCamera(70, 1, 0.02, 100);
    this.camera.position.set(0, 1.6, 0);
    this.rig.add(this.camera);
    this.scene.add(this.rig);
    this.scene.add(new THREE.HemisphereLight(0xffffff, 0x445566, 1.6));
    const sun = new THREE.DirectionalLight(0xffffff, 1.6);
    sun.position.set(2, 4, 3);
    this.scene.add(sun);
    const floor = new THREE.Mesh(new THREE.CircleGeometry(8, 64), new THREE.MeshStandardMaterial({ color: 0x3a4b5c, roughness: 0.9 }));
    floor.rotation.x = -Math.PI / 2;
    this.scene.add(floor, new THREE.GridHelper(16, 16, 0x6f8496, 0x4a5d6f));
    this.avatars = new Map(); // member id -> Avatar
    this.models = new Map(); // object id -> SharedModel
    this.assetCache = new Map(); // sha256 -> Promise<Object3D>
    this.loader = new GLTFLoader();
    this.selected = null;
    this.raycaster = new THREE.Raycaster();
    this.draft = null; // annotation points being placed: {objectId, kind, points, line}
    this.onModelsChanged = () => {};
    this.resize();
    new ResizeObserver(() => this.resize()).observe(canvas.parentElement);
  }

  resize() {
    if (this.renderer.xr.isPresenting) return;
    const el = this.canvas.parentElement;
    const w = Math.max(1, el.clientWidth);
    const h = Math.max(1, el.clientHeight);
    this.renderer.setSize(w, h, false);
    this.camera.aspect = w / h;
    this.camera.updateProjectionMatrix();
  }

  /** The world pose of this member's head: {position, rotation} (arrays). */
  headPose() {
    const cam = this.renderer.xr.isPresenting ? this.renderer.xr.getCamera() : this.camera;
    cam.updateMatrixWorld(true);
    const p = new THREE.Vector3();
    const q = new THREE.Quaternion();
    cam.matrixWorld.decompose(p, q, new THREE.Vector3());
    return { position: p.toArray(), rotation: q.toArray() };
  }

  // ----------------------------------------------------------------- avatars

  updateAvatars() {
    const c = this.client;
    const samples = c.sample();
    for (const [id, s] of samples) {
      if (id === c.memberId) continue; // our own avatar is where the camera is
      let a = this.avatars.get(id);
      if (a === undefined) {
        a = new Avatar(id, s.name);
        this.avatars.set(id, a);
        this.scene.add(a.group);
      }
      a.setName(s.name);
      a.update(s);
    }
    for (const [id, a] of this.avatars) {
      if (!samples.has(id) || id === c.memberId) {
        this.scene.remove(a.group);
        a.dispose();
        this.avatars.delete(id);
      }
    }
  }

  // ----------------------------------------------------------------- models

  loadAsset(sha256) {
    let p = this.assetCache.get(sha256);
    if (p === undefined) {
      p = this.client.downloadAsset(sha256).then((bytes) => {
        const buf = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
        return this.loader.parseAsync(buf, "").then((gltf) => gltf.scene);
      });
      p.catch(() => this.assetCache.delete(sha256)); // a later object may try again
      this.assetCache.set(sha256, p);
    }
    return p;
  }

  /** Bring the scene's models in line with the client's objects (added, removed, renewed). */
  syncModels() {
    const objects = this.client.objects;
    let changed = false;
    for (const [id, obj] of objects) {
      let m = this.models.get(id);
      if (m !== undefined && m.asset !== obj.asset) {
        this.#dropModel(id);
        m = undefined;
      }
      if (m === undefined) {
        m = new SharedModel(id, obj);
        this.models.set(id, m);
        this.scene.add(m.group, m.box);
        changed = true;
        this.loadAsset(obj.asset).then(
          (root) => {
            if (this.models.get(id) !== m) return;
            m.setModel(root);
            m.applyView(obj);
            m.annotationsSeq = -1;
            this.onModelsChanged();
          },
          (err) => {
            m.failed = String(err?.message ?? err);
            this.onModelsChanged();
          },
        );
      }
    }
    for (const id of [...this.models.keys()]) {
      if (!objects.has(id)) {
        this.#dropModel(id);
        changed = true;
      }
    }
    if (changed) this.onModelsChanged();
  }

  #dropModel(id) {
    const m = this.models.get(id);
    this.scene.remove(m.group, m.box);
    disposeTree(m.group);
    this.models.delete(id);
    if (this.selected === id) this.selected = null;
  }

  updateModels() {
    const c = this.client;
    for (const [id, m] of this.models) {
      const obj = c.objects.get(id);
      const t = obj && c.sampleObject(id);
      if (!t) continue;
      m.group.position.fromArray(t.position);
      m.group.quaternion.fromArray(t.rotation);
      m.group.scale.setScalar(t.scale);
      m.group.updateMatrixWorld(true);
      m.applyView(obj);
      this.#applyPlane(m, obj.plane);
      m.box.visible = this.selected === id;
      if (m.box.visible) m.box.setFromObject(m.content);
    }
  }

  // The object's clipping plane [nx, ny, nz, d] is in its local frame: in the world it moves
  // with the object.
  #applyPlane(m, plane) {
    const planes = plane && plane.length === 4 ? [this.#worldPlane(m, plane)] : [];
    for (const mat of m.materials) {
      mat.clippingPlanes = planes;
    }
  }

  #worldPlane(m, plane) {
    const local = new THREE.Plane(new THREE.Vector3(plane[0], plane[1], plane[2]).normalize(), plane[3]);
    return local.applyMatrix4(m.group.matrixWorld);
  }

  // ----------------------------------------------------------------- annotations

  /** Rebuild the annotation meshes of every model whose annotations changed. */
  syncAnnotations() {
    for (const [id, m] of this.models) {
      const obj = this.client.objects.get(id);
      if (!obj) continue;
      const seq = [...obj.annotations.values()].reduce((s, a) => s + a.seq + a.id, obj.annotations.size);
      if (seq === m.annotationsSeq) continue;
      m.annotationsSeq = seq;
      for (const child of [...m.annotations.children]) {
        m.annotations.remove(child);
        disposeTree(child);
      }
      for (const a of obj.annotations.values()) m.annotations.add(this.annotationMesh(a, m));
    }
  }

  annotationMesh(a, m) {
    const group = new THREE.Group();
    group.name = `annotation-${a.id}`;
    const color = a.color ? new THREE.Color(a.color) : new THREE.Color(ANNOTATION_COLOR);
    const pts = a.points.map((p) => new THREE.Vector3(p[0], p[1], p[2]));
    // Sizes are in the object's frame: divide by its scale so pins stay a readable size.
    const s = 1 / Math.max(1e-3, m.group.scale.x || 1);
    if (a.kind === "pin") {
      const head = new THREE.Mesh(new THREE.SphereGeometry(0.012 * s, 12, 8), new THREE.MeshBasicMaterial({ color }));
      head.position.copy(pts[0]);
      group.add(head);
      if (a.text) {
        const label = makeLabel(a.text, { size: 0.045 });
        label.scale.multiplyScalar(s);
        label.position.copy(pts[0]).add(new THREE.Vector3(0, 0.05 * s, 0));
        group.add(label);
      }
    } else {
      const line = new THREE.Line(new THREE.BufferGeometry().setFromPoints(pts), new THREE.LineBasicMaterial({ color, depthTest: false }));
      line.renderOrder = 5;
      group.add(line);
      if (a.kind === "measure" && pts.length === 2) {
        const metres = pts[0].distanceTo(pts[1]) * (m.group.scale.x || 1);
        const label = makeLabel(`${(metres * 100).toFixed(1)} cm`, { size: 0.045 });
        label.scale.multiplyScalar(s);
        label.position.copy(pts[0]).lerp(pts[1], 0.5).add(new THREE.Vector3(0, 0.03 * s, 0));
        group.add(label);
        for (const p of pts) {
          const end = new THREE.Mesh(new THREE.SphereGeometry(0.006 * s, 8, 6), new THREE.MeshBasicMaterial({ color }));
          end.position.copy(p);
          group.add(end);
        }
      }
    }
    return group;
  }

  /** Show the points of an annotation being drawn (local to its object). */
  showDraft(objectId, points) {
    if (this.draft) {
      this.draft.parent?.remove(this.draft);
      disposeTree(this.draft);
      this.draft = null;
    }
    const m = this.models.get(objectId);
    if (!m || points.length === 0) return;
    const group = new THREE.Group();
    for (const p of points) {
      const dot = new THREE.Mesh(new THREE.SphereGeometry(0.008 / (m.group.scale.x || 1), 8, 6), new THREE.MeshBasicMaterial({ color: 0x00e0ff }));
      dot.position.fromArray(p);
      group.add(dot);
    }
    if (points.length > 1) {
      group.add(new THREE.Line(new THREE.BufferGeometry().setFromPoints(points.map((p) => new THREE.Vector3(...p))), new THREE.LineBasicMaterial({ color: 0x00e0ff })));
    }
    m.group.add(group);
    this.draft = group;
  }

  // ----------------------------------------------------------------- picking

  /** The first model hit by a ray: {objectId, point (world), local (object frame)} or null. */
  pickRay(origin, direction) {
    this.raycaster.set(origin, direction);
    const targets = [...this.models.values()].map((m) => m.content);
    const hits = this.raycaster.intersectObjects(targets, true);
    for (const hit of hits) {
      let o = hit.object;
      while (o && o.userData.objectId === undefined) o = o.parent;
      if (!o) continue;
      const m = this.models.get(o.userData.objectId);
      const local = m.group.worldToLocal(hit.point.clone());
      return { objectId: m.id, point: hit.point.clone(), local: local.toArray() };
    }
    return null;
  }

  /** Pick at normalised device coordinates (x, y in -1..1) of the desktop camera. */
  pickScreen(x, y) {
    this.raycaster.setFromCamera(new THREE.Vector2(x, y), this.camera);
    return this.pickRay(this.raycaster.ray.origin.clone(), this.raycaster.ray.direction.clone());
  }

  /** The model nearest to a world point within `radius` metres of its bounds, or null. */
  nearestModel(point, radius = 0.15) {
    let best = null;
    let bestD = radius;
    for (const m of this.models.values()) {
      const box = new THREE.Box3().setFromObject(m.content);
      if (box.isEmpty()) continue;
      const d = box.distanceToPoint(point);
      if (d <= bestD) {
        best = m.id;
        bestD = d;
      }
    }
    return best;
  }

  render() {
    this.renderer.render(this.scene, this.camera);
  }

  /** What the scene draws, for tests and tools: avatars and models in world coordinates. */
  describe() {
    const avatars = {};
    for (const [id, a] of this.avatars) {
      avatars[id] = {
        name: a.name,
        speaking: Boolean(a.speaking),
        head: a.head.visible ? { position: a.head.position.toArray(), rotation: a.head.quaternion.toArray() } : null,
        hands: a.hands.map((h) => (h.visible ? h.position.toArray() : null)),
      };
    }
    const models = {};
    for (const [id, m] of this.models) {
      models[id] = {
        loaded: m.loaded,
        failed: m.failed,
        position: m.group.position.toArray(),
        rotation: m.group.quaternion.toArray(),
        scale: m.group.scale.x,
        nodes: m.nodeNames,
        hiddenNodes: m.model ? m.nodeNames.filter((n) => m.model.getObjectByName(n)?.visible === false) : [],
        clipped: m.materials.some((mat) => mat.clippingPlanes?.length > 0),
        annotations: m.annotations.children.length,
      };
    }
    return { avatars, models, head: this.headPose() };
  }
}
