// The clinic's transfer controls, for members who may move others (a host, a receptionist or
// the transfer grant): call the next patient in from the waiting room, send a member back to
// it, or move a member to another room of the clinic.

const $ = (id) => document.getElementById(id);
const ROOM_NAME = /^[A-Za-z0-9_.-]{1,64}$/u; // protocol/messages.py ROOM_NAME_RE

export class ClinicControls {
  /** `app`: {announce(text), alertText(text), nameOf(memberId), grants() (a Set)}. */
  constructor(app) {
    this.app = app;
    this.client = null;
    this.busy = false;
    $("clinic-call").addEventListener("click", () => this.#run("call"));
    $("clinic-back").addEventListener("click", () => this.#run("back"));
    $("clinic-move-form").addEventListener("submit", (e) => {
      e.preventDefault();
      this.#run("move");
    });
  }

  /** Whether this member may move others. */
  get allowed() {
    const g = this.app.grants();
    return g.has("moderate") || g.has("transfer");
  }

  attach(client) {
    this.client = client;
    this.render();
  }

  onEvent(ev) {
    if (["joined", "left", "arrived", "grants", "resumed"].includes(ev.type)) this.render();
    if (ev.type === "move_declined") {
      // The member we moved did not agree to the room's terms (consent_declined).
      const where = ev.back ? `is back in room ${ev.back}` : "has left";
      this.app.alertText(`${ev.name} did not agree to room ${ev.room}'s terms and ${where}.`);
    }
  }

  render() {
    const c = this.client;
    $("clinic").hidden = !c || !this.allowed;
    if (!c || !this.allowed) return;
    const sel = $("clinic-member");
    const current = sel.value;
    const others = [...c.members].filter(([id]) => id !== c.memberId);
    sel.replaceChildren(...others.map(([id, name]) => new Option(name, String(id))));
    if (others.some(([id]) => String(id) === current)) sel.value = current;
    const none = others.length === 0;
    $("clinic-member-empty").hidden = !none;
    for (const id of ["clinic-back", "clinic-move", "clinic-member", "clinic-room"]) $(id).disabled = none || this.busy;
    $("clinic-call").disabled = this.busy;
  }

  async #run(what) {
    const c = this.client;
    if (!c || this.busy) return;
    const id = Number($("clinic-member").value);
    const name = this.app.nameOf(id);
    const room = $("clinic-room").value.trim();
    if ((what === "back" || what === "move") && !id) return this.app.announce("Choose a member first.");
    if (what === "move" && !ROOM_NAME.test(room)) {
      this.app.alertText("Type the name of the room to move to (letters, digits, - _ .).");
      $("clinic-room").focus();
      return;
    }
    this.busy = true;
    this.render();
    try {
      if (what === "call") {
        this.app.announce("Calling the next patient.");
        await c.callNext();
        this.app.announce("The next patient is on the way in.");
      } else if (what === "back") {
        await c.sendBack(id, "sent back to the waiting room");
        this.app.announce(`${name} is back in the waiting room.`);
      } else {
        await c.transfer(id, room);
        this.app.announce(`${name} was moved to room ${room}.`);
        $("clinic-room").value = "";
      }
    } catch (err) {
      // The server's reasons are written for people ("nobody is waiting"): shown as they are.
      this.app.alertText(`That did not work: ${String(err.message).replace(/^[a-z_]+: /u, "")}.`);
    } finally {
      this.busy = false;
      this.render();
    }
  }
}
