// centerid's page: plain DOM code, no framework, no build step. Every request goes to this service only.
"use strict";

import { KEY_STORE, apiKey, call, clamp01, describe, el, errorText, exchange, fmt } from "./api.js";

const $ = (selector) => document.querySelector(selector);

// -- status -------------------------------------------------------------------------------------------------
function thresholdItems(info) {
  const items = [];
  if (info.threshold) items.push(["verify / identify", info.threshold]);
  const more = info.thresholds;
  if (Array.isArray(more)) more.forEach((item, i) => items.push([item.name || item.kind || item.route || `#${i + 1}`, item]));
  else if (more && typeof more === "object") Object.entries(more).forEach(([name, item]) => items.push([name, item]));
  return items;
}

async function loadStatus() {
  const result = await call("GET", "info");
  const problem = $("#status-error");
  if (!result.ok) {
    problem.hidden = false;
    problem.textContent =
      errorText(result) + (result.status === 401 ? " — enter a key in the API key field above." : "");
    return;
  }
  problem.hidden = true;
  const info = result.json;
  const model = info.model || {};
  const input = model.input || {};
  const gallery = info.gallery || {};
  const size = input.height ? `${input.channels ?? "?"} × ${input.height} × ${input.width} (channels × height × width)` : describe(input);
  const facts = [
    ["model", `${model.name ?? "?"} (${model.arch ?? "?"}, ${model.feat_dim ?? "?"}-d, ${model.classes ?? "?"} training identities)`],
    ["input size", size],
    ["gallery", `${gallery.size ?? "?"} entries, ${gallery.identities ?? "?"} identities`],
    ["index", `${gallery.index ?? "?"} — ${gallery.search ?? ""}`],
    ["version", info.version ?? "?"],
  ];
  $("#status-list").replaceChildren(...facts.flatMap(([name, value]) => [el("dt", { text: name }), el("dd", { text: value })]));
  $("#thresholds").replaceChildren(
    ...thresholdItems(info).map(([name, item]) =>
      el("li", {}, el("strong", { text: `${name}: ` }), el("span", { class: "value", text: fmt(item.value ?? item.threshold ?? "—") }), ` — ${describe(item)}`),
    ),
  );
}

// -- identify ---------------------------------------------------------------------------------------------
/** Face boxes, whatever shape the answer gives them: [x1, y1, x2, y2] or {x, y, width, height}. */
function faceBoxes(json) {
  const faces = [].concat(json.faces || [], json.face || []);
  return faces
    .map((face) => face.box || face.bbox || face)
    .map((box) => {
      if (Array.isArray(box) && box.length >= 4) return { x: box[0], y: box[1], w: box[2] - box[0], h: box[3] - box[1] };
      if (box && typeof box.x === "number") return { x: box.x, y: box.y, w: box.width ?? box.w, h: box.height ?? box.h };
      if (box && typeof box.left === "number") return { x: box.left, y: box.top, w: box.right - box.left, h: box.bottom - box.top };
      return null;
    })
    .filter(Boolean);
}

function preview(file, boxes = []) {
  const image = el("img", { src: URL.createObjectURL(file), alt: `the uploaded image ${file.name}` });
  const frame = el("div", { class: "frame" }, image);
  image.addEventListener("load", () => {
    for (const box of boxes) {
      const { naturalWidth: width, naturalHeight: height } = image;
      frame.append(
        el("div", {
          class: "box",
          style: { left: `${(100 * box.x) / width}%`, top: `${(100 * box.y) / height}%`, width: `${(100 * box.w) / width}%`, height: `${(100 * box.h) / height}%` },
        }),
      );
    }
  });
  return frame;
}

function bar(similarity, threshold, label) {
  return el(
    "div",
    { class: "bar", role: "img", "aria-label": `${label}: similarity ${fmt(similarity)}, threshold ${fmt(threshold)}` },
    el("div", { class: similarity >= threshold ? "fill above" : "fill", style: { width: `${100 * clamp01(similarity)}%` } }),
    el("div", { class: "mark", title: `threshold ${fmt(threshold)}`, style: { left: `${100 * clamp01(threshold)}%` } }),
  );
}

function basisText(json) {
  return json.threshold_basis === undefined ? "" : ` (basis: ${describe(json.threshold_basis)})`;
}

function renderIdentify(file, json) {
  const best = json.matches && json.matches[0];
  const badge = json.identity
    ? el("p", { class: "verdict" }, el("span", { class: "badge known", text: json.identity }), ` best match, similarity ${fmt(best.similarity)}`)
    : el(
        "p",
        { class: "verdict" },
        el("span", { class: "badge unknown", text: "unknown" }),
        best ? ` best candidate ${best.label} at ${fmt(best.similarity)} is below the threshold` : " the gallery is empty",
      );
  const rows = (json.matches || []).map((match) =>
    el(
      "li",
      {},
      el("span", { class: "label", text: match.label }),
      bar(match.similarity, json.threshold, match.label),
      el("span", { class: "value", text: fmt(match.similarity) }),
    ),
  );
  return el(
    "div",
    { class: "answer" },
    preview(file, faceBoxes(json)),
    el(
      "div",
      {},
      badge,
      el("p", { class: "hint", text: `threshold ${fmt(json.threshold)}${basisText(json)}, mode ${json.mode}; the mark on each bar is the threshold` }),
      el("ol", { class: "matches" }, ...rows),
    ),
  );
}

function identifyFields() {
  const file = $("#identify-image").files[0];
  const fields = [["image", file]];
  if ($("#identify-k").value) fields.push(["k", $("#identify-k").value]);
  if ($("#identify-mode").value !== "gallery") fields.push(["mode", $("#identify-mode").value]);
  if ($("#identify-threshold").value) fields.push(["threshold", $("#identify-threshold").value]);
  return fields;
}

// -- verify -------------------------------------------------------------------------------------------------
function scale(similarity, threshold) {
  const at = (value) => `${(100 * (Math.max(-1, Math.min(1, value)) + 1)) / 2}%`;
  return el(
    "div",
    { class: "scale", role: "img", "aria-label": `similarity ${fmt(similarity)} on a scale from -1 to 1, threshold ${fmt(threshold)}` },
    el("div", { class: "threshold", style: { left: at(threshold) } }, el("span", { text: `threshold ${fmt(threshold)}` })),
    el("div", { class: "score", style: { left: at(similarity) } }, el("span", { text: fmt(similarity) })),
    el("span", { class: "tick", style: { left: "0%" }, text: "-1" }),
    el("span", { class: "tick", style: { left: "50%" }, text: "0" }),
    el("span", { class: "tick", style: { left: "100%" }, text: "1" }),
  );
}

function renderVerify(json) {
  const verdict = json.match
    ? el("span", { class: "badge known", text: json.label ? `match: ${json.label}` : "same person" })
    : el("span", { class: "badge unknown", text: json.label ? `not ${json.label}` : "different people" });
  return el(
    "div",
    {},
    el("p", { class: "verdict" }, verdict, ` similarity ${fmt(json.similarity)}, threshold ${fmt(json.threshold)}${basisText(json)}`),
    scale(json.similarity, json.threshold),
  );
}

function verifyFields() {
  const first = $("#verify-a").files[0];
  const second = $("#verify-b").files[0];
  const label = $("#verify-label").value.trim();
  if (label && !second) return [["image", first], ["label", label]];
  return [["image_a", first], ["image_b", second]].filter(([, value]) => value);
}

// -- gallery ------------------------------------------------------------------------------------------------
let galleryShown = 0;

async function loadGallery(append = false) {
  const offset = append ? galleryShown : 0;
  const result = await call("GET", `gallery?offset=${offset}&limit=100`);
  const body = $("#gallery-table tbody");
  if (!result.ok) {
    $("#gallery-summary").textContent = errorText(result);
    return;
  }
  const page = result.json;
  if (!append) body.replaceChildren();
  for (const identity of page.identities) body.append(identityRow(identity));
  galleryShown = offset + page.identities.length;
  $("#gallery-summary").textContent = `${page.total} identities enrolled`;
  $("#gallery-more").hidden = galleryShown >= page.total;
}

function identityRow(identity) {
  const label = identity.label;
  const row = el("tr", { "data-label": label });
  const show = el("button", { type: "button", class: "small", text: "entries", "aria-expanded": "false" });
  const remove = el("button", { type: "button", class: "small danger", text: "delete label", "aria-label": `delete ${label}` });
  show.addEventListener("click", () => toggleEntries(row, show, label));
  remove.addEventListener("click", () => deleteThing(`gallery/${encodeURIComponent(label)}`, `${label} and its ${identity.entries} entries`));
  row.append(el("td", { text: label }), el("td", { text: String(identity.entries) }), el("td", {}, show, " ", remove));
  return row;
}

async function toggleEntries(row, button, label) {
  const next = row.nextElementSibling;
  if (next && next.classList.contains("entries")) {
    next.remove();
    button.setAttribute("aria-expanded", "false");
    return;
  }
  const result = await call("GET", `gallery/${encodeURIComponent(label)}`);
  const cell = el("td", { colspan: "3" });
  if (!result.ok) cell.append(el("p", { class: "error", role: "alert", text: errorText(result) }));
  else
    cell.append(
      el(
        "ul",
        {},
        ...result.json.entries.map((entry) =>
          el(
            "li",
            {},
            `#${entry.id} · ${entry.created_at} · ${JSON.stringify(entry.metadata)} `,
            el("button", {
              type: "button",
              class: "small danger",
              text: "delete entry",
              "aria-label": `delete entry ${entry.id}`,
              onclick: () => deleteThing(`gallery/entries/${entry.id}`, `entry #${entry.id} of ${label}`),
            }),
          ),
        ),
      ),
    );
  row.after(el("tr", { class: "entries" }, cell));
  button.setAttribute("aria-expanded", "true");
}

async function deleteThing(path, what) {
  if (!window.confirm(`Delete ${what}?`)) return;
  await exchange($("#gallery-result"), "DELETE", path, [], () => el("p", { class: "ok", text: `deleted ${what}` }));
  await Promise.all([loadGallery(), loadStatus()]);
}

function enrollFields() {
  const fields = [["label", $("#enroll-label").value.trim()]];
  for (const file of $("#enroll-files").files) fields.push(["files", file]);
  if ($("#enroll-metadata").value.trim()) fields.push(["metadata", $("#enroll-metadata").value.trim()]);
  return fields;
}

function renderEnroll(json) {
  return el("p", { class: "ok", text: `enrolled ${json.entries.length} image(s) as ${json.label} (entries ${json.entries.map((e) => `#${e.id}`).join(", ")})` });
}

// -- files: drop zones and the camera -----------------------------------------------------------------------
function setFiles(input, files) {
  const transfer = new DataTransfer();
  for (const file of input.multiple ? files : [...files].slice(0, 1)) transfer.items.add(file);
  input.files = transfer.files;
}

function wireDropZones() {
  for (const zone of document.querySelectorAll(".drop")) {
    const input = document.getElementById(zone.dataset.for);
    zone.addEventListener("dragover", (event) => {
      event.preventDefault();
      zone.classList.add("over");
    });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.classList.remove("over");
      setFiles(input, event.dataTransfer.files);
    });
  }
}

function wireCamera() {
  if (!(window.isSecureContext && navigator.mediaDevices && navigator.mediaDevices.getUserMedia)) return;
  const video = $("#camera-video");
  let stream = null;
  const stop = () => {
    if (stream) stream.getTracks().forEach((track) => track.stop());
    stream = null;
    $("#camera").hidden = true;
  };
  $("#camera-start").hidden = false;
  $("#camera-start").addEventListener("click", async () => {
    try {
      stream = await navigator.mediaDevices.getUserMedia({ video: true });
    } catch (error) {
      $("#identify-result").replaceChildren(el("p", { class: "error", role: "alert", text: `camera: ${error.message}` }));
      return;
    }
    video.srcObject = stream;
    $("#camera").hidden = false;
  });
  $("#camera-stop").addEventListener("click", stop);
  $("#camera-snap").addEventListener("click", () => {
    const canvas = el("canvas");
    canvas.width = video.videoWidth;
    canvas.height = video.videoHeight;
    canvas.getContext("2d").drawImage(video, 0, 0);
    canvas.toBlob((blob) => {
      setFiles($("#identify-image"), [new File([blob], "camera.png", { type: "image/png" })]);
      stop();
    }, "image/png");
  });
}

// -- wiring ---------------------------------------------------------------------------------------------------
function onSubmit(selector, handler) {
  $(selector).addEventListener("submit", (event) => {
    event.preventDefault();
    handler();
  });
}

function start() {
  const keyInput = $("#api-key");
  keyInput.value = apiKey();
  keyInput.addEventListener("change", () => {
    if (keyInput.value) window.sessionStorage.setItem(KEY_STORE, keyInput.value);
    else window.sessionStorage.removeItem(KEY_STORE);
    loadStatus();
    loadGallery();
  });
  $("#key-form").addEventListener("submit", (event) => event.preventDefault());
  onSubmit("#identify-form", () => {
    const fields = identifyFields();
    exchange($("#identify-result"), "POST", "identify", fields, (result) => renderIdentify(fields[0][1], result.json));
  });
  onSubmit("#verify-form", () => exchange($("#verify-result"), "POST", "verify", verifyFields(), (result) => renderVerify(result.json)));
  onSubmit("#enroll-form", async () => {
    const result = await exchange($("#enroll-result"), "POST", "gallery", enrollFields(), (r) => renderEnroll(r.json));
    if (result.ok) await Promise.all([loadGallery(), loadStatus()]);
  });
  $("#status-refresh").addEventListener("click", loadStatus);
  $("#gallery-refresh").addEventListener("click", () => loadGallery());
  $("#gallery-more").addEventListener("click", () => loadGallery(true));
  wireDropZones();
  wireCamera();
  loadStatus();
  loadGallery();
}

document.addEventListener("DOMContentLoaded", start);
