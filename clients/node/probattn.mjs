// Label texts with a probattn bundle from Node.js: the bundle's portable tokenizer in
// tokenizers.js (@huggingface/tokenizers) and its ONNX model in onnxruntime-node.
//
//   import { loadBundle } from "./probattn.mjs";
//   const model = await loadBundle("path/to/bundle");            // fp32, int32 ids
//   const results = await model.classify(["a gripping, funny film"]);
//   // [{ label: "fresh", probabilities: { fresh: 0.93, rotten: 0.07 } }]
//
// What a client must do to get the ids probattn's Python side gets:
// * check every file against manifest.json (schema_version 2: `contents` holds each file's
//   SHA-256, and the artifact, tokenizer and tokenizer.config entries the same hashes);
// * read tokenizer_config.json too: tokenizers.js takes unk_token from it for a word-level
//   model (without it unknown words come out undefined, which an Int32Array turns into the
//   pad id 0);
// * truncate itself: neither tokenizers.js nor transformers.js applies the truncation
//   stored in tokenizer.json; keep the first model_max_length ids;
// * pad with 0 ([PAD]) on the right, to the longest text of the batch (the model masks pads);
// * send int32 ids to model_<precision>.onnx. transformers.js returns int64 ids: send those
//   to the int64 twin model_<precision>_int64.onnx, or convert with
//   Int32Array.from(ids.data, Number) for the int32 file.
import crypto from "node:crypto";
import fs from "node:fs";
import path from "node:path";

import { Tokenizer } from "@huggingface/tokenizers";
import * as ort from "onnxruntime-node";

export const INPUT = "token_ids";
export const PROBABILITIES = "probabilities";
export const PAD_ID = 0;
const MANIFEST = "manifest.json";
// manifest.json schema 2 (probattn's export/bundle.py): `contents` maps every file of the
// bundle to its SHA-256, and each artifact / tokenizer / tokenizer.config entry carries
// the same hash. This client reads exactly that version.
export const SCHEMA_VERSION = 2;
const TOKENIZER_CONFIG = "tokenizer_config.json";
const MAX_MANIFEST_BYTES = 16 << 20;
const HEX64 = /^[0-9a-f]{64}$/;

export class BundleError extends Error {}

function sha256(bytes) {
  return crypto.createHash("sha256").update(bytes).digest("hex");
}

/** A plain relative path of the manifest: no absolute path, `..`, `.`, empty part, NUL or backslash. */
function checkRelPath(rel, what) {
  if (typeof rel !== "string" || rel === "" || rel.startsWith("/") || rel.includes("\\") || rel.includes("\0")
      || rel.split("/").some((p) => p === "" || p === "." || p === "..")) {
    throw new BundleError(`${MANIFEST}: ${what} path ${JSON.stringify(rel)} is not a plain relative path inside the bundle`);
  }
  return rel;
}

/** The bytes of one regular file of the bundle, opened without following a symbolic link
 *  anywhere inside the bundle (no FIFO or device opened either). */
function readBundleFile(dir, rel, maxBytes = Infinity) {
  const parts = rel.split("/");
  let cur = path.resolve(dir);
  for (const [i, part] of parts.entries()) {
    cur = path.join(cur, part);
    let st;
    try { st = fs.lstatSync(cur); } catch (e) {
      if (e.code === "ENOENT" || e.code === "ENOTDIR") throw new BundleError(`${rel} is listed in ${MANIFEST} but missing`);
      throw e;
    }
    if (st.isSymbolicLink()) throw new BundleError(`${rel} in the bundle is a symbolic link; refusing it`);
    if (i < parts.length - 1 ? !st.isDirectory() : !st.isFile()) {
      throw new BundleError(`${rel} in the bundle is not a regular file; refusing it`);
    }
  }
  const fd = fs.openSync(cur, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW | fs.constants.O_NONBLOCK);
  try {
    const st = fs.fstatSync(fd);
    if (!st.isFile()) throw new BundleError(`${rel} in the bundle is not a regular file; refusing it`);
    if (st.size > maxBytes) throw new BundleError(`${rel} is ${st.size} bytes; at most ${maxBytes} are read`);
    return fs.readFileSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/** The bytes of the file a manifest entry ({path, sha256}) names, returned only after their
 *  SHA-256 matched both the entry and the manifest's `contents`. */
export function readVerified(dir, manifest, entry) {
  const rel = checkRelPath(entry?.path, "file");
  const listed = manifest.contents[rel];
  if (listed === undefined) throw new BundleError(`${rel} is not listed in the contents of ${MANIFEST}; refusing to read it`);
  if (entry.sha256 !== listed) {
    throw new BundleError(`${MANIFEST} gives ${rel} two hashes (its entry and contents); they must agree`);
  }
  const bytes = readBundleFile(dir, rel);
  if (sha256(bytes) !== listed) throw new BundleError(`${rel} does not match its manifest hash (it was modified or damaged)`);
  return bytes;
}

/** The manifest, checked for what this client reads. */
export function readManifest(dir) {
  const file = path.join(dir, MANIFEST);
  if (!fs.existsSync(file)) throw new BundleError(`${dir} is not a probattn bundle: no ${MANIFEST}`);
  let manifest;
  try {
    manifest = JSON.parse(readBundleFile(dir, MANIFEST, MAX_MANIFEST_BYTES).toString("utf8"));
  } catch (e) {
    if (e instanceof BundleError) throw e;
    throw new BundleError(`${MANIFEST} is not valid JSON (${String(e.message).split("\n")[0]})`);
  }
  if (manifest === null || typeof manifest !== "object" || Array.isArray(manifest)) {
    throw new BundleError(`${MANIFEST} must hold a JSON object`);
  }
  const version = manifest.schema_version;
  if (!Number.isInteger(version)) {
    throw new BundleError(`${MANIFEST} has no integer schema_version (${JSON.stringify(version) ?? "missing"}); this client reads schema_version ${SCHEMA_VERSION}`);
  }
  if (version !== SCHEMA_VERSION) {
    const why = version < SCHEMA_VERSION ? "export the bundle again with this probattn" : "use a newer client";
    throw new BundleError(`${MANIFEST} has schema_version ${version}; this client reads schema_version ${SCHEMA_VERSION} only: ${why}`);
  }
  const contents = manifest.contents;
  if (contents === null || typeof contents !== "object" || Array.isArray(contents) || Object.keys(contents).length === 0
      || !Object.values(contents).every((v) => typeof v === "string" && HEX64.test(v))) {
    throw new BundleError(`${MANIFEST}: 'contents' must map the bundle's files to their SHA-256 (64 hex digits)`);
  }
  const labels = manifest.labels;
  if (!Array.isArray(labels) || labels.length < 2 || !labels.every((l) => typeof l === "string")
      || !Array.isArray(manifest.artifacts)) {
    throw new BundleError(`${MANIFEST}: 'labels' (at least 2 names) and 'artifacts' (a list) are required`);
  }
  const tok = manifest.tokenizer || {};
  if (tok.kind !== "portable" || !tok.config) {
    throw new BundleError(`the bundle's tokenizer is kind '${tok.kind ?? "unknown (an older bundle)"}'; ` +
      "JavaScript gives the same ids as Python only for the portable tokenizer: train and export again with this probattn");
  }
  if (tok.config.path !== TOKENIZER_CONFIG) {
    throw new BundleError(`${MANIFEST}: tokenizer.config must name ${TOKENIZER_CONFIG}; found ${JSON.stringify(tok.config.path)}`);
  }
  for (const [what, entry] of [["tokenizer", tok], ["tokenizer.config", tok.config]]) {
    checkRelPath(entry.path, what);
    if (typeof entry.sha256 !== "string" || !HEX64.test(entry.sha256)) {
      throw new BundleError(`${MANIFEST}: ${what} needs a sha256 (64 hex digits)`);
    }
  }
  return manifest;
}

/** The manifest entry of the ONNX file of `precision` taking `inputDtype` ids. */
export function onnxEntry(manifest, precision = "fp32", inputDtype = "int32") {
  const entry = manifest.artifacts.find((a) => a.format === "onnx" && a.precision === precision
    && (a.input_dtype ?? "int32") === inputDtype);
  if (!entry) {
    const have = manifest.artifacts.filter((a) => a.format === "onnx").map((a) => `${a.precision}/${a.input_dtype ?? "int32"}`);
    throw new BundleError(`the bundle has no onnx ${precision} artifact with ${inputDtype} input; it has ${have.join(", ") || "none"}`);
  }
  return entry;
}

/** tokenizers.js from the bundle's tokenizer.json + tokenizer_config.json, with the
 *  truncation length the config gives. */
export function loadTokenizer(dir, manifest) {
  const json = JSON.parse(readVerified(dir, manifest, manifest.tokenizer).toString("utf8"));
  const config = JSON.parse(readVerified(dir, manifest, manifest.tokenizer.config).toString("utf8"));
  if (config.unk_token !== "[UNK]" || !Number.isInteger(config.model_max_length)) {
    throw new BundleError("tokenizer_config.json must set unk_token [UNK] and an integer model_max_length");
  }
  return { tokenizer: new Tokenizer(json, config), maxLength: config.model_max_length, config };
}

/** Ids for each text: encoded, then cut at maxLength (the libraries do not truncate). */
export function encodeTexts(tokenizer, texts, maxLength) {
  return texts.map((t) => tokenizer.encode(t).ids.slice(0, maxLength));
}

/** Id rows -> an int32 [batch, longest] tensor, right-padded with 0. */
export function padRows(rows, dtype = "int32") {
  const width = Math.max(1, ...rows.map((r) => r.length));
  if (dtype === "int64") {
    const data = new BigInt64Array(rows.length * width);
    rows.forEach((r, i) => r.forEach((id, j) => { data[i * width + j] = BigInt(id); }));
    return new ort.Tensor("int64", data, [rows.length, width]);
  }
  const data = new Int32Array(rows.length * width); // zero-filled: the pad id
  rows.forEach((r, i) => data.set(r, i * width));
  return new ort.Tensor("int32", data, [rows.length, width]);
}

/** A session on the bundle's ONNX file (one thread: deterministic and light), made from the
 *  very bytes whose hash was checked (the file is not opened a second time). */
export async function loadSession(dir, manifest, precision = "fp32", inputDtype = "int32") {
  const bytes = readVerified(dir, manifest, onnxEntry(manifest, precision, inputDtype));
  return ort.InferenceSession.create(bytes, { executionProviders: ["cpu"], intraOpNumThreads: 1, interOpNumThreads: 1 });
}

export async function loadBundle(dir, { precision = "fp32" } = {}) {
  const manifest = readManifest(dir);
  const { tokenizer, maxLength } = loadTokenizer(dir, manifest);
  const session = await loadSession(dir, manifest, precision, "int32");
  const labels = manifest.labels;
  return {
    manifest, tokenizer, session, labels, maxLength,
    encode: (texts) => encodeTexts(tokenizer, texts, maxLength),
    /** probabilities as a Float32Array [batch * classes] for id rows */
    async probabilities(rows) {
      const out = await session.run({ [INPUT]: padRows(rows) }, [PROBABILITIES]);
      return out[PROBABILITIES].data;
    },
    async classify(texts) {
      const p = await this.probabilities(this.encode(texts));
      const k = labels.length;
      return texts.map((_, i) => {
        const row = Array.from(p.subarray(i * k, (i + 1) * k));
        const best = row.indexOf(Math.max(...row));
        return { label: labels[best], probabilities: Object.fromEntries(labels.map((l, j) => [l, row[j]])) };
      });
    },
  };
}
