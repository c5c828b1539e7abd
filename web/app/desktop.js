// Desktop mode: keyboard and mouse move this member's viewpoint (a rig with yaw and a camera
// with pitch), pick models and place annotation points. Every mouse action has a key.
import * as THREE from "three";

const MOVE_SPEED = 1.5; // metres per second
const TURN_SPEED = Math.PI / 2; // radians per second
const PITCH_LIMIT = Math.PI * 0.45;

export class DesktopControls {
  /** `actions`: {grab(), rotateHeld(sign), nextModel(), placePoint(hit), pick(hit), cancel(), strokeDrag(hit)} */
  constructor(canvas, scene, actions) {
    this.canvas = canvas;
    this.scene = scene;
    this.actions = actions;
    this.keys = new Set();
    this.yaw = 0;
    this.pitch = 0;
    this.drag = null;
    this.heldDistance = 1.2;
    canvas.addEventListener("keydown", (e) => this.#keydown(e));
    canvas.addEventListener("keyup", (e) => this.keys.delete(e.code));
    canvas.addEventListener("blur", () => this.keys.clear());
    canvas.addEventListener("pointerdown", (e) => this.#down(e));
    canvas.addEventListener("pointermove", (e) => this.#move(e));
    canvas.addEventListener("pointerup", (e) => this.#up(e));
    canvas.addEventListener("pointercancel", () => (this.drag = null));
    canvas.addEventListener("wheel", (e) => {
      e.preventDefault();
      this.heldDistance = Math.min(4, Math.max(0.3, this.heldDistance + Math.sign(e.deltaY) * 0.1));
    }, { passive: false });
  }

  #keydown(e) {
    if (e.altKey || e.ctrlKey || e.metaKey) return;
    const handled = ["KeyW", "KeyA", "KeyS", "KeyD", "KeyR", "KeyF", "ArrowUp", "ArrowDown", "ArrowLeft", "ArrowRight"];
    if (handled.includes(e.code)) {
      this.keys.add(e.code);
      e.preventDefault();
      return;
    }
    if (e.code === "KeyG") this.actions.grab();
    else if (e.code === "BracketLeft") this.actions.rotateHeld(-1);
    else if (e.code === "BracketRight") this.actions.rotateHeld(1);
    else if (e.code === "KeyN") this.actions.nextModel();
    else if (e.code === "Enter" || e.code === "NumpadEnter") this.actions.placePoint(this.scene.pickScreen(0, 0));
    else if (e.code === "Escape") this.actions.cancel();
    else return;
    e.preventDefault();
  }

  #ndc(e) {
    const r = this.canvas.getBoundingClientRect();
    return [((e.clientX - r.left) / r.width) * 2 - 1, -((e.clientY - r.top) / r.height) * 2 + 1];
  }

  #down(e) {
    this.canvas.focus();
    this.drag = { x: e.clientX, y: e.clientY, moved: false, stroke: this.actions.strokeActive() };
    this.canvas.setPointerCapture?.(e.pointerId);
  }

  #move(e) {
    const d = this.drag;
    if (d === null) return;
    const dx = e.clientX - d.x;
    const dy = e.clientY - d.y;
    if (!d.moved && Math.hypot(dx, dy) < 4) return;
    d.moved = true;
    if (d.stroke) {
      const [x, y] = this.#ndc(e);
      this.actions.strokeDrag(this.scene.pickScreen(x, y));
      return;
    }
    this.yaw -= dx * 0.005;
    this.pitch = Math.max(-PITCH_LIMIT, Math.min(PITCH_LIMIT, this.pitch - dy * 0.005));
    d.x = e.clientX;
    d.y = e.clientY;
  }

  #up(e) {
    const d = this.drag;
    this.drag = null;
    if (d === null || d.moved) return;
    const [x, y] = this.#ndc(e);
    const hit = this.scene.pickScreen(x, y);
    this.actions.pick(hit);
  }

  /** Move the rig by the keys held for `dt` seconds. */
  update(dt) {
    const k = this.keys;
    const forward = (k.has("KeyW") || k.has("ArrowUp") ? 1 : 0) - (k.has("KeyS") || k.has("ArrowDown") ? 1 : 0);
    const strafe = (k.has("KeyD") ? 1 : 0) - (k.has("KeyA") ? 1 : 0);
    const turn = (k.has("ArrowLeft") ? 1 : 0) - (k.has("ArrowRight") ? 1 : 0);
    const look = (k.has("KeyR") ? 1 : 0) - (k.has("KeyF") ? 1 : 0);
    this.yaw += turn * TURN_SPEED * dt;
    this.pitch = Math.max(-PITCH_LIMIT, Math.min(PITCH_LIMIT, this.pitch + look * TURN_SPEED * 0.6 * dt));
    const rig = this.scene.rig;
    const dir = new THREE.Vector3(-Math.sin(this.yaw), 0, -Math.cos(this.yaw));
    const right = new THREE.Vector3(Math.cos(this.yaw), 0, -Math.sin(this.yaw));
    rig.position.addScaledVector(dir, forward * MOVE_SPEED * dt).addScaledVector(right, strafe * MOVE_SPEED * dt);
    rig.rotation.set(0, this.yaw, 0);
    this.scene.camera.rotation.set(this.pitch, 0, 0);
  }

  /** Put the viewpoint somewhere: position of the rig's floor point and a yaw (radians). */
  place(x, z, yaw = 0, pitch = 0) {
    this.scene.rig.position.set(x, 0, z);
    this.scene.rig.rotation.set(0, yaw, 0);
    this.scene.camera.rotation.set(pitch, 0, 0);
    this.yaw = yaw;
    this.pitch = pitch;
  }

  /** Where a held model goes: in front of the camera at the held distance. */
  heldTarget() {
    const cam = this.scene.camera;
    cam.updateMatrixWorld(true);
    const p = new THREE.Vector3();
    const q = new THREE.Quaternion();
    cam.matrixWorld.decompose(p, q, new THREE.Vector3());
    return p.add(new THREE.Vector3(0, 0, -1).applyQuaternion(q).multiplyScalar(this.heldDistance));
  }
}
