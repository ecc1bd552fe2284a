// centerid's page, the shared part: DOM helpers and talking to the service (its errors, curl lines, raw JSON).
"use strict";

export const KEY_STORE = "centerid.apiKey";
const BASE = new URL(".", window.location.href); // the service root, also behind a path prefix

// -- small DOM helpers ------------------------------------------------------------------------------------
export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "text") node.textContent = value;
    else if (name === "class") node.className = value;
    else if (name === "style") Object.assign(node.style, value);
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

export const fmt = (value) => (typeof value === "number" ? value.toFixed(3) : String(value));
export const clamp01 = (value) => Math.min(1, Math.max(0, value));

// -- talking to the service -------------------------------------------------------------------------------
export function apiKey() {
  return window.sessionStorage.getItem(KEY_STORE) || "";
}

export async function call(method, path, body) {
  const headers = { Accept: "application/json" };
  if (apiKey()) headers["X-API-Key"] = apiKey();
  let response;
  try {
    response = await fetch(new URL(path, BASE), { method, headers, body });
  } catch (error) {
    return { status: 0, ok: false, json: null, text: `the service did not answer: ${error.message}` };
  }
  const text = await response.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch (_) {
    json = null;
  }
  return { status: response.status, ok: response.ok, json, text };
}

/** The service's own words for a failure: its error envelope, else the status line. */
export function errorText(result) {
  const error = result.json && result.json.error;
  if (error && error.code) return `${error.code}: ${error.message}`;
  if (result.status === 0) return result.text;
  return `HTTP ${result.status}: ${result.text.slice(0, 300) || "no body"}`;
}

export function shellQuote(text) {
  return /^[A-Za-z0-9_@%+=:,./-]+$/.test(text) ? text : `'${text.replace(/'/g, "'\\''")}'`;
}

/** The same request as a curl line (the key as a variable: it is never printed). */
export function curlLine(method, path, fields = []) {
  const parts = ["curl -s"];
  if (method !== "GET" && method !== "POST") parts.push(`-X ${method}`);
  if (apiKey()) parts.push('-H "X-API-Key: $CENTERID_KEY"');
  for (const [name, value] of fields) {
    if (value instanceof File) parts.push(`-F ${shellQuote(`${name}=@${value.name || "image.png"}`)}`);
    else if (/^[@<]/.test(value)) parts.push(`--form-string ${shellQuote(`${name}=${value}`)}`);
    else parts.push(`-F ${shellQuote(`${name}=${value}`)}`);
  }
  if (method === "DELETE") parts.push("-w '%{http_code}\\n'");
  parts.push(shellQuote(new URL(path, BASE).href));
  return parts.join(" ");
}

/** Run a request and show, under the action: what it means (render), the error, the curl line, the JSON. */
export async function exchange(target, method, path, fields, render) {
  const body = fields.length ? new FormData() : undefined;
  for (const [name, value] of fields) body.append(name, value);
  target.replaceChildren(el("p", { class: "hint", text: "working…" }));
  const result = await call(method, path, body);
  const shown = [];
  if (result.ok) shown.push(render(result));
  else shown.push(el("p", { class: "error", role: "alert", text: errorText(result) }));
  shown.push(
    el("details", { class: "curl", open: "" }, el("summary", { text: "curl" }), el("pre", { text: curlLine(method, path, fields) })),
    el(
      "details",
      { class: "raw" },
      el("summary", { text: `raw JSON (HTTP ${result.status})` }),
      el("pre", { text: result.json ? JSON.stringify(result.json, null, 2) : result.text || "(no body)" }),
    ),
  );
  target.replaceChildren(...shown);
  return result;
}

export function describe(value) {
  if (value === null || value === undefined) return "—";
  if (typeof value !== "object") return fmt(value);
  return Object.entries(value)
    .map(([name, item]) => `${name}: ${typeof item === "object" && item !== null ? JSON.stringify(item) : fmt(item)}`)
    .join(", ");
}

