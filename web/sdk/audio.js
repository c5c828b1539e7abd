// Spatial audio in the browser: the member's one WebRTC connection to the server, as
// client_sdk/audio.py has it in Python. The microphone goes up (when the member may publish);
// the mix the server made for this member comes down as one stereo track, already spatialized
// (the page plays it as it is, without panning of its own).
//
//   const client = await connect({ url, room, token });
//   const audio = new AudioClient(client);
//   const mix = await audio.start();            // a MediaStream: play it in an <audio> element
//   audio.on("speaking", ({ members }) => ...); // who is talking now, loudest first
//   await audio.mute(true);                     // self mute (a host's mute is the server's)
//   audio.close();
//
// Signaling is the room connection's audio_offer / audio_answer (protocol/SPEC.md "Spatial
// audio"): the offer carries every ICE candidate (no trickle) and the server answers with its
// own. No STUN or TURN server is asked unless `iceServers` names one. After a reconnect as a new
// member, or a move to another room, it offers again by itself.

import { RequestError } from "./client.js";
import { ErrorCode } from "./errors.js";

/** The server refused an audio call (`code`: an ErrorCode string). */
export class AudioError extends RequestError {
  constructor(code, message) {
    super(code, message);
    this.name = "AudioError";
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Pairs of a flat list: [a, b, c, d] -> [[a, b], [c, d]]. */
function pairs(flat) {
  const out = [];
  for (let i = 0; i + 1 < flat.length; i += 2) out.push([flat[i], flat[i + 1]]);
  return out;
}

/** The room's audio rules as an `audio_rules` message gives them to this member. */
export function rulesOf(m) {
  return {
    zones: new Map(pairs(m.zones)), // member id -> zone
    broadcast: new Map(pairs(m.broadcast).map(([id, g]) => [id, g / 100])), // id -> gain
    whispers: new Map(pairs(m.whispers)), // speaker id -> target id
    selfMuted: new Set(m.self_muted),
    ignored: new Set(m.ignored),
  };
}

/** Ask to receive the mix in stereo: Chromium decodes Opus as mono unless its own (local)
 * description says `stereo=1`. Adds it to every Opus format line of `sdp` that lacks it. */
export function wantStereo(sdp) {
  const opus = new Set();
  for (const m of sdp.matchAll(/^a=rtpmap:(\d+) opus\/48000\/2\r?$/gimu)) opus.add(m[1]);
  return sdp.replace(/^a=fmtp:(\d+) ([^\r\n]*)/gmu, (line, pt, params) =>
    opus.has(pt) && !/(^|;)\s*stereo=/u.test(params) ? `a=fmtp:${pt} ${params};stereo=1` : line,
  );
}

/** A member's audio: one RTCPeerConnection to the server (see the module comment).
 *
 * Options: `RTCPeerConnection` (default the global one), `mediaDevices` (default
 * navigator.mediaDevices), `iceServers` (default none: host candidates only), `timeout`
 * (seconds for gathering and for the server's answer, default 10), `audio` (getUserMedia's
 * audio constraints). */
export class AudioClient {
  constructor(client, options = {}) {
    this.client = client;
    this.RTCPeerConnection = options.RTCPeerConnection ?? globalThis.RTCPeerConnection;
    this.mediaDevices = options.mediaDevices ?? globalThis.navigator?.mediaDevices ?? null;
    this.iceServers = options.iceServers ?? [];
    this.timeout = options.timeout ?? 10;
    this.constraints = options.audio ?? { echoCancellation: true, noiseSuppression: true, autoGainControl: true };
    if (typeof this.RTCPeerConnection !== "function") throw new TypeError("no RTCPeerConnection: pass one as an option");
    /** The connection, the received mix, the published microphone track (or null). */
    this.pc = null;
    this.mix = null;
    this.track = null;
    /** Whether we publish, and the self mute as last acknowledged. */
    this.publishing = false;
    this.muted = false;
    /** Who is talking now (member ids, loudest first) and the routing rules. */
    this.speaking = [];
    this.rules = rulesOf({ zones: [], broadcast: [], whispers: [], self_muted: [], ignored: [] });
    this._listeners = new Map();
    this._answer = null; // {resolve, reject} while an offer waits
    this._want = null; // what start() was last asked for, to renegotiate after a reconnect
    this._ownTrack = false; // the microphone is ours to stop
    this._starting = null;
    this._off = [
      client.on("audio_answer", (m) => this._answer?.resolve(m)),
      client.on("audio_rules", (m) => {
        this.rules = rulesOf(m);
        this.#emit({ type: "rules", rules: this.rules });
      }),
      client.on("audio_speaking", (m) => {
        this.speaking = [...m.members];
        this.#emit({ type: "speaking", members: this.speaking });
      }),
      // Errors name no request: one arriving while an offer waits refuses it (as in Python).
      client.on("error", (ev) => this._answer?.reject(new AudioError(ev.code, ev.message))),
      client.on("resumed", (ev) => {
        // A new member after a reconnect: the server dropped our connection, so offer again.
        if (!ev.sameMember && this._want !== null) this.#restart();
      }),
      // Moved to another room (a clinic's transfer): the old room's mix ends with the move,
      // and the new room mixes us once we offer there.
      client.on("moved", () => {
        if (this._want !== null) this.#stop();
      }),
      client.on("arrived", () => {
        if (this._want !== null) this.#restart();
      }),
      client.on("closed", () => this.close()),
    ];
  }

  /** Call `fn` with each event of `type`: speaking ({members}), rules ({rules}), state
   * ({state}: the connection's state), ended (the connection failed or closed). Returns a
   * function that removes it. */
  on(type, fn) {
    if (!this._listeners.has(type)) this._listeners.set(type, new Set());
    this._listeners.get(type).add(fn);
    return () => this._listeners.get(type)?.delete(fn);
  }

  #emit(ev) {
    for (const fn of this._listeners.get(ev.type) ?? []) {
      try {
        fn(ev);
      } catch (err) {
        queueMicrotask(() => {
          throw err;
        });
      }
    }
  }

  /** Whether member `id` is talking now. */
  isSpeaking(id) {
    return this.speaking.includes(id);
  }

  /** Whether this member may publish as far as the client knows (its grants, when a host has
   * changed them; otherwise it tries and the server decides). */
  get mayPublish() {
    const g = this.client.grants;
    return g === null || g === undefined || g.has("publish_audio");
  }

  /** Connect audio and resolve with the mix (a MediaStream). `microphone`: true (ask for one;
   * fails without), "auto" (the default: publish a microphone when there is one and the member
   * may, else only listen), false (only listen), or a MediaStreamTrack to publish. Rejects with
   * AudioError when the server refuses. */
  async start({ microphone = "auto" } = {}) {
    this.#stop();
    this._want = { microphone };
    const run = this.#start(microphone);
    this._starting = run;
    try {
      return await run;
    } finally {
      if (this._starting === run) this._starting = null;
    }
  }

  async #start(microphone) {
    let track = null;
    let own = false;
    if (typeof microphone === "object" && microphone !== null) {
      track = microphone;
    } else if (microphone === true || (microphone === "auto" && this.mayPublish)) {
      try {
        if (this.mediaDevices === null) throw new Error("no mediaDevices here");
        const stream = await this.mediaDevices.getUserMedia({ audio: this.constraints });
        track = stream.getAudioTracks()[0] ?? null;
        own = true;
      } catch (err) {
        if (microphone === true) throw err;
      }
    }
    try {
      return await this.#negotiate(track, own);
    } catch (err) {
      // "auto": a member the server will not let publish still listens.
      if (microphone === "auto" && track !== null && err instanceof AudioError && err.code === ErrorCode.FORBIDDEN) {
        return this.#negotiate(null, false);
      }
      throw err;
    }
  }

  async #negotiate(track, own) {
    this.#stop();
    const pc = new this.RTCPeerConnection({ iceServers: this.iceServers });
    this.pc = pc;
    this.track = track;
    this._ownTrack = own;
    this.publishing = track !== null;
    if (track !== null) track.enabled = !this.muted;
    const got = new Promise((resolve) => {
      pc.ontrack = (ev) => {
        if (ev.track.kind === "audio") resolve(ev.streams?.[0] ?? new MediaStream([ev.track]));
      };
    });
    pc.onconnectionstatechange = () => {
      if (this.pc !== pc) return;
      this.#emit({ type: "state", state: pc.connectionState });
      if (pc.connectionState === "failed" || pc.connectionState === "closed") this.#emit({ type: "ended", state: pc.connectionState });
    };
    if (track !== null) pc.addTransceiver(track, { direction: "sendrecv" });
    else pc.addTransceiver("audio", { direction: "recvonly" });
    try {
      const offer = await pc.createOffer();
      await pc.setLocalDescription({ type: "offer", sdp: wantStereo(offer.sdp) });
      await this.#gathered(pc);
      if (this.pc !== pc) throw new Error("audio closed");
      const answered = new Promise((resolve, reject) => {
        this._answer = { resolve, reject };
      });
      this.client.send({ t: "audio_offer", sdp: pc.localDescription.sdp, publish: track !== null });
      const answer = await Promise.race([answered, sleep(this.timeout * 1000).then(() => Promise.reject(new Error("no audio answer in time")))]);
      if (this.pc !== pc) throw new Error("audio closed");
      await pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
      const mix = await Promise.race([got, sleep(this.timeout * 1000).then(() => Promise.reject(new Error("no audio track in time")))]);
      this.mix = mix;
      return mix;
    } catch (err) {
      if (this.pc === pc) this.#stop();
      throw err;
    } finally {
      this._answer = null;
    }
  }

  // Every candidate is in the offer (the server takes no trickled ones): wait for gathering.
  async #gathered(pc) {
    if (pc.iceGatheringState === "complete") return;
    const deadline = Date.now() + this.timeout * 1000;
    while (pc.iceGatheringState !== "complete") {
      if (Date.now() > deadline) throw new Error("ICE gathering did not complete in time");
      await new Promise((resolve) => {
        const t = setTimeout(resolve, 50);
        pc.onicegatheringstatechange = () => {
          clearTimeout(t);
          resolve();
        };
      });
    }
  }

  async #restart() {
    const want = this._want;
    try {
      await this.start(want);
    } catch (err) {
      this.#emit({ type: "ended", state: "failed", error: err });
    }
  }

  /** Self mute or unmute: the server stops (or starts again) mixing us, and the microphone
   * sends silence meanwhile. Resolves once the server applied it; rejects with AudioError. A
   * host's server mute is separate: unmuting does not undo it. */
  async mute(muted = true) {
    await this.#request((req) => ({ t: "audio_mute", muted, req }));
    this.muted = muted;
    if (this.track !== null) this.track.enabled = !muted;
  }

  /** Host: put a member in a zone (members of a zone hear only each other); 0 takes it out. */
  setZone(memberId, zone) {
    return this.#request((req) => ({ t: "audio_zone", member_id: memberId, zone, req }));
  }

  /** Host: make a member heard by everyone at `gain` (1 = the reference level), or stop. */
  broadcast(memberId, on = true, gain = 1) {
    return this.#request((req) => ({ t: "audio_broadcast", member_id: memberId, on, gain: Math.round(gain * 100), req }));
  }

  /** Whisper to one member (only they hear us), or stop (null). */
  whisper(target) {
    return this.#request((req) => ({ t: "audio_whisper", target, req }));
  }

  /** Stop hearing, and being heard by, a member (or undo it). */
  ignore(memberId, ignore = true) {
    return this.#request((req) => ({ t: "audio_ignore", member_id: memberId, ignore, req }));
  }

  async #request(make) {
    try {
      return await this.client.request(make);
    } catch (err) {
      if (err instanceof RequestError) throw new AudioError(err.code, err.message.replace(/^[a-z_]+: /u, ""));
      throw err;
    }
  }

  // Close the connection and stop our own microphone (the room connection stays).
  #stop() {
    const pc = this.pc;
    this.pc = null;
    this.mix = null;
    this._answer?.reject(new Error("audio closed"));
    this._answer = null;
    if (this._ownTrack) this.track?.stop();
    this.track = null;
    this._ownTrack = false;
    this.publishing = false;
    if (pc !== null) {
      pc.ontrack = null;
      pc.onconnectionstatechange = null;
      pc.onicegatheringstatechange = null;
      pc.close();
    }
  }

  /** Stop audio: close the connection and our microphone; the room connection stays. */
  close() {
    this._want = null;
    this.#stop();
  }

  /** Stop audio and stop following the client's messages. */
  dispose() {
    this.close();
    for (const off of this._off) off();
    this._off = [];
  }
}
