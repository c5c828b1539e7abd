// The medverse JavaScript SDK: the wire protocol of protocol/SPEC.md as plain ES modules.
export * from "./errors.js";
export * from "./quant.js";
export * from "./messages.js";
export * from "./snapshot.js";
export * from "./connection.js";
export * from "./client.js";
export * from "./audio.js";
export * from "./images.js";
