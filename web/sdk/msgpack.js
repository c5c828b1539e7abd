// msgpack for control frames, written for what the protocol needs rather than taken from npm:
//
// - decoding keeps integers and floats apart (a float decodes to an `F64`), because an integer
//   field never accepts a float, even an integral one (protocol/messages.py), and a generic
//   decoder returns the JavaScript number 1 for both 0x01 and 0xcb 3ff0000000000000;
// - encoding writes a float field as float64 even when its value is integral (Python writes
//   0.0 as 0xcb 0000000000000000, a generic encoder as 0x00), so frames are the same bytes as the
//   Python implementation's;
// - the limits are those of the Python decoder's msgpack.unpackb call: nesting (1024), array
//   length, map size, string length, bin and ext payloads refused, map keys strings (or bin),
//   trailing bytes refused.
// Integers beyond 2^53 - 1 decode to BigInt. Maps decode to Map objects (insertion order, the
// last of duplicate keys wins, as in Python).

/** A float on the wire. `encode` writes it as float64; `decode` returns floats wrapped in it. */
export class F64 {
  constructor(value) {
    this.value = value;
  }
}

/** A bin map key (the Python decoder accepts bytes keys); never equal to a string key. */
export class BinKey {
  constructor(bytes) {
    this.bytes = bytes;
  }
}

/** Raised by `unpack` on bad input (the caller turns it into a `malformed` ProtocolError). */
export class MsgpackError extends Error {}

/** An ext value of empty payload (what the Python decoder allows with max_ext_len=0). */
export class ExtType {
  constructor(type, data) {
    this.type = type;
    this.data = data;
  }
}

const utf8 = new TextDecoder("utf-8", { fatal: true });
const utf8enc = new TextEncoder();

/**
 * Decode one msgpack value that must fill `bytes` exactly.
 * Options: maxArrayLen, maxMapLen, maxStrLen (bytes), maxBinLen, maxExtLen, maxDepth.
 */
export function unpack(bytes, opts = {}) {
  const r = new Reader(bytes, opts);
  const value = r.value(0);
  if (r.pos !== bytes.length) throw new MsgpackError("extra data");
  return value;
}

class Reader {
  constructor(bytes, opts) {
    this.b = bytes;
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    this.pos = 0;
    this.maxArrayLen = opts.maxArrayLen ?? 1024;
    this.maxMapLen = opts.maxMapLen ?? 64;
    this.maxStrLen = opts.maxStrLen ?? 1 << 24;
    this.maxBinLen = opts.maxBinLen ?? 0;
    this.maxExtLen = opts.maxExtLen ?? 0;
    this.maxDepth = opts.maxDepth ?? 1024;
  }

  need(n) {
    if (this.pos + n > this.b.length) throw new MsgpackError("truncated");
  }

  u8() {
    this.need(1);
    return this.b[this.pos++];
  }

  u16() {
    this.need(2);
    const v = this.view.getUint16(this.pos);
    this.pos += 2;
    return v;
  }

  u32() {
    this.need(4);
    const v = this.view.getUint32(this.pos);
    this.pos += 4;
    return v;
  }

  value(depth) {
    const t = this.u8();
    if (t <= 0x7f) return t;
    if (t >= 0xe0) return t - 0x100;
    if (t >= 0xa0 && t <= 0xbf) return this.str(t & 0x1f);
    if (t >= 0x90 && t <= 0x9f) return this.array(t & 0x0f, depth);
    if (t >= 0x80 && t <= 0x8f) return this.map(t & 0x0f, depth);
    const v = this.view;
    switch (t) {
      case 0xc0:
        return null;
      case 0xc2:
        return false;
      case 0xc3:
        return true;
      case 0xc4:
        return this.bin(this.u8());
      case 0xc5:
        return this.bin(this.u16());
      case 0xc6:
        return this.bin(this.u32());
      case 0xc7:
        return this.ext(this.u8());
      case 0xc8:
        return this.ext(this.u16());
      case 0xc9:
        return this.ext(this.u32());
      case 0xca: {
        this.need(4);
        const f = v.getFloat32(this.pos);
        this.pos += 4;
        return new F64(f);
      }
      case 0xcb: {
        this.need(8);
        const f = v.getFloat64(this.pos);
        this.pos += 8;
        return new F64(f);
      }
      case 0xcc:
        return this.u8();
      case 0xcd:
        return this.u16();
      case 0xce:
        return this.u32();
      case 0xcf: {
        this.need(8);
        const n = v.getBigUint64(this.pos);
        this.pos += 8;
        return n <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(n) : n;
      }
      case 0xd0: {
        this.need(1);
        return v.getInt8(this.pos++);
      }
      case 0xd1: {
        this.need(2);
        const n = v.getInt16(this.pos);
        this.pos += 2;
        return n;
      }
      case 0xd2: {
        this.need(4);
        const n = v.getInt32(this.pos);
        this.pos += 4;
        return n;
      }
      case 0xd3: {
        this.need(8);
        const n = v.getBigInt64(this.pos);
        this.pos += 8;
        const safe = BigInt(Number.MAX_SAFE_INTEGER);
        return n <= safe && n >= -safe ? Number(n) : n;
      }
      case 0xd4:
        return this.ext(1);
      case 0xd5:
        return this.ext(2);
      case 0xd6:
        return this.ext(4);
      case 0xd7:
        return this.ext(8);
      case 0xd8:
        return this.ext(16);
      case 0xd9:
        return this.str(this.u8());
      case 0xda:
        return this.str(this.u16());
      case 0xdb:
        return this.str(this.u32());
      case 0xdc:
        return this.array(this.u16(), depth);
      case 0xdd:
        return this.array(this.u32(), depth);
      case 0xde:
        return this.map(this.u16(), depth);
      case 0xdf:
        return this.map(this.u32(), depth);
      default: // 0xc1: never used
        throw new MsgpackError(`bad type byte 0x${t.toString(16)}`);
    }
  }

  str(n) {
    if (n > this.maxStrLen) throw new MsgpackError("string too long");
    this.need(n);
    const s = this.b.subarray(this.pos, this.pos + n);
    this.pos += n;
    try {
      return utf8.decode(s);
    } catch {
      throw new MsgpackError("string is not UTF-8");
    }
  }

  bin(n) {
    if (n > this.maxBinLen) throw new MsgpackError("bin too long");
    this.need(n);
    const out = this.b.slice(this.pos, this.pos + n);
    this.pos += n;
    return out;
  }

  ext(n) {
    if (n > this.maxExtLen) throw new MsgpackError("ext too long");
    this.need(1 + n);
    const type = this.view.getInt8(this.pos);
    const data = this.b.slice(this.pos + 1, this.pos + 1 + n);
    this.pos += 1 + n;
    return new ExtType(type, data);
  }

  array(n, depth) {
    if (n > this.maxArrayLen) throw new MsgpackError("array too long");
    if (depth >= this.maxDepth) throw new MsgpackError("nested too deep");
    const out = new Array(n);
    for (let i = 0; i < n; i++) out[i] = this.value(depth + 1);
    return out;
  }

  map(n, depth) {
    if (n > this.maxMapLen) throw new MsgpackError("map too large");
    if (depth >= this.maxDepth) throw new MsgpackError("nested too deep");
    const out = new Map();
    for (let i = 0; i < n; i++) {
      let k = this.value(depth + 1);
      if (k instanceof Uint8Array) k = binKey(out, k);
      else if (typeof k !== "string") throw new MsgpackError("map keys must be strings");
      out.set(k, this.value(depth + 1));
    }
    return out;
  }
}

// Equal bin keys are one key (a Python dict's bytes keys); keep the first key object.
function binKey(map, bytes) {
  for (const k of map.keys()) {
    if (k instanceof BinKey && k.bytes.length === bytes.length && k.bytes.every((x, i) => x === bytes[i])) {
      return k;
    }
  }
  return new BinKey(bytes);
}

/**
 * Encode a value: null/undefined as nil, booleans, numbers (integral ones as the smallest
 * integer format, others as float64), `F64` as float64, BigInt as an integer, strings, arrays,
 * Map and plain objects as maps (in their order). Returns a Uint8Array.
 */
export function pack(value, prefix) {
  const w = new Writer();
  if (prefix !== undefined) w.byte(prefix);
  w.value(value);
  return w.finish();
}

class Writer {
  constructor() {
    this.buf = new Uint8Array(256);
    this.view = new DataView(this.buf.buffer);
    this.pos = 0;
  }

  room(n) {
    if (this.pos + n <= this.buf.length) return;
    let size = this.buf.length * 2;
    while (size < this.pos + n) size *= 2;
    const next = new Uint8Array(size);
    next.set(this.buf.subarray(0, this.pos));
    this.buf = next;
    this.view = new DataView(next.buffer);
  }

  byte(b) {
    this.room(1);
    this.buf[this.pos++] = b;
  }

  // A length: the fix format (`fix`, lengths below `fixMax`) or the 8/16/32-bit one.
  head(n, fix, fixMax, c8, c16, c32) {
    this.room(5);
    if (fix !== undefined && n < fixMax) {
      this.buf[this.pos++] = fix | n;
    } else if (c8 !== undefined && n < 0x100) {
      this.buf[this.pos++] = c8;
      this.buf[this.pos++] = n;
    } else if (n < 0x10000) {
      this.buf[this.pos++] = c16;
      this.view.setUint16(this.pos, n);
      this.pos += 2;
    } else {
      this.buf[this.pos++] = c32;
      this.view.setUint32(this.pos, n);
      this.pos += 4;
    }
  }

  value(v) {
    if (v === null || v === undefined) return this.byte(0xc0);
    if (v === false) return this.byte(0xc2);
    if (v === true) return this.byte(0xc3);
    if (typeof v === "number") {
      if (Number.isInteger(v) && Math.abs(v) <= Number.MAX_SAFE_INTEGER) return this.int(v);
      return this.float(v);
    }
    if (v instanceof F64) return this.float(v.value);
    if (typeof v === "bigint") return this.bigint(v);
    if (typeof v === "string") return this.str(v);
    if (Array.isArray(v)) {
      this.head(v.length, 0x90, 16, undefined, 0xdc, 0xdd);
      for (const x of v) this.value(x);
      return;
    }
    if (v instanceof Uint8Array) {
      this.head(v.length, undefined, 0, 0xc4, 0xc5, 0xc6);
      this.room(v.length);
      this.buf.set(v, this.pos);
      this.pos += v.length;
      return;
    }
    const entries = v instanceof Map ? [...v] : Object.entries(v);
    this.head(entries.length, 0x80, 16, undefined, 0xde, 0xdf);
    for (const [k, x] of entries) {
      this.value(k);
      this.value(x);
    }
  }

  float(f) {
    this.room(9);
    this.buf[this.pos++] = 0xcb;
    this.view.setFloat64(this.pos, f);
    this.pos += 8;
  }

  int(n) {
    this.room(9);
    const b = this.buf;
    const d = this.view;
    if (n >= 0) {
      if (n < 0x80) b[this.pos++] = n;
      else if (n < 0x100) {
        b[this.pos++] = 0xcc;
        b[this.pos++] = n;
      } else if (n < 0x10000) {
        b[this.pos++] = 0xcd;
        d.setUint16(this.pos, n);
        this.pos += 2;
      } else if (n < 0x100000000) {
        b[this.pos++] = 0xce;
        d.setUint32(this.pos, n);
        this.pos += 4;
      } else {
        b[this.pos++] = 0xcf;
        d.setBigUint64(this.pos, BigInt(n));
        this.pos += 8;
      }
    } else if (n >= -32) {
      b[this.pos++] = n + 0x100;
    } else if (n >= -0x80) {
      b[this.pos++] = 0xd0;
      d.setInt8(this.pos++, n);
    } else if (n >= -0x8000) {
      b[this.pos++] = 0xd1;
      d.setInt16(this.pos, n);
      this.pos += 2;
    } else if (n >= -0x80000000) {
      b[this.pos++] = 0xd2;
      d.setInt32(this.pos, n);
      this.pos += 4;
    } else {
      b[this.pos++] = 0xd3;
      d.setBigInt64(this.pos, BigInt(n));
      this.pos += 8;
    }
  }

  bigint(n) {
    if (n >= -(2n ** 63n) && n < 2n ** 64n) {
      const safe = BigInt(Number.MAX_SAFE_INTEGER);
      if (n <= safe && n >= -safe) return this.int(Number(n));
      this.room(9);
      this.buf[this.pos++] = n >= 0n ? 0xcf : 0xd3;
      if (n >= 0n) this.view.setBigUint64(this.pos, n);
      else this.view.setBigInt64(this.pos, n);
      this.pos += 8;
      return;
    }
    throw new RangeError("integer out of msgpack range");
  }

  str(s) {
    const bytes = utf8enc.encode(s);
    const n = bytes.length;
    this.head(n, 0xa0, 32, 0xd9, 0xda, 0xdb);
    this.room(n);
    this.buf.set(bytes, this.pos);
    this.pos += n;
  }

  finish() {
    return this.buf.slice(0, this.pos);
  }
}
