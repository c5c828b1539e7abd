// WebXR immersive-vr: the headset's and controllers' poses go to the room every frame; squeeze
// grabs the model within reach of the hand and carries it, trigger pins an annotation where the
// controller's ray meets a model.
import * as THREE from "three";

/** Whether this page can offer immersive VR, and why not: {ok, reason}. */
export async function xrSupport() {
  if (!window.isSecureContext) {
    return { ok: false, reason: "VR needs a secure page (https, or http on this computer's own address): this page is not one, so the browser does not offer WebXR." };
  }
  if (!navigator.xr) return { ok: false, reason: "This browser has no WebXR: open the page in a headset's browser to use VR." };
  try {
    if (await navigator.xr.isSessionSupported("immersive-vr")) return { ok: true, reason: "" };
  } catch {
    // treated as unsupported
  }
  return { ok: false, reason: "No VR headset is available to this browser." };
}

const decompose = (obj) => {
  obj.updateMatrixWorld(true);
  const p = new THREE.Vector3();
  const q = new THREE.Quaternion();
  obj.matrixWorld.decompose(p, q, new THREE.Vector3());
  return { position: p.toArray(), rotation: q.toArray() };
};

export class XRMode {
  /** `actions`: {grabAt(handedness, gripObject) -> Promise, releaseHand(handedness), pinAt(ray), onEnd()} */
  constructor(scene, actions) {
    this.scene = scene;
    this.actions = actions;
    this.session = null;
    this.hands = new Map(); // handedness -> {grip, ray}
    const xr = scene.renderer.xr;
    for (const i of [0, 1]) {
      const grip = xr.getControllerGrip(i);
      const ray = xr.getController(i);
      const hand = { grip, ray, handedness: null, connected: false };
      scene.rig.add(grip, ray);
      const marker = new THREE.Mesh(new THREE.BoxGeometry(0.05, 0.03, 0.1), new THREE.MeshStandardMaterial({ color: 0xdddddd }));
      grip.add(marker);
      const line = new THREE.Line(new THREE.BufferGeometry().setFromPoints([new THREE.Vector3(), new THREE.Vector3(0, 0, -1)]), new THREE.LineBasicMaterial({ color: 0xffffff }));
      ray.add(line);
      ray.addEventListener("connected", (e) => {
        hand.handedness = e.data.handedness;
        hand.connected = true;
        this.hands.set(e.data.handedness, hand);
      });
      ray.addEventListener("disconnected", () => {
        hand.connected = false;
        if (hand.handedness) this.hands.delete(hand.handedness);
      });
      ray.addEventListener("squeezestart", () => hand.handedness && this.actions.grabAt(hand.handedness, grip));
      ray.addEventListener("squeezeend", () => hand.handedness && this.actions.releaseHand(hand.handedness));
      ray.addEventListener("selectstart", () => {
        const p = decompose(ray);
        const dir = new THREE.Vector3(0, 0, -1).applyQuaternion(new THREE.Quaternion().fromArray(p.rotation));
        this.actions.pinAt(new THREE.Vector3().fromArray(p.position), dir);
      });
    }
  }

  get presenting() {
    return this.scene.renderer.xr.isPresenting;
  }

  /** Start an immersive-vr session (from a click: browsers want a user gesture). */
  async enter() {
    const session = await navigator.xr.requestSession("immersive-vr", { optionalFeatures: ["local-floor", "bounded-floor"] });
    this.session = session;
    this.scene.renderer.xr.setReferenceSpaceType("local-floor");
    await this.scene.renderer.xr.setSession(session);
    session.addEventListener("end", () => {
      this.session = null;
      this.hands.clear();
      this.actions.onEnd();
    });
  }

  async exit() {
    await this.session?.end();
  }

  /** This frame's poses: head, left and right hand (null when a controller is not tracked). */
  poses() {
    const head = this.scene.headPose();
    const hand = (h) => {
      const c = this.hands.get(h);
      return c && c.connected && c.grip.visible !== false ? decompose(c.grip) : null;
    };
    return [head, hand("left"), hand("right")];
  }
}
