// Shared by fourbit serve's pages: API calls that carry the server's API key when it wants one.
// The key is asked for once and kept in this browser's localStorage (never in a URL or cookie).
"use strict";

async function api(path, opts = {}, retried = false) {
  const headers = Object.assign({"Content-Type": "application/json"}, opts.headers || {});
  const key = localStorage.getItem("fourbit-api-key");
  if (key) headers["Authorization"] = "Bearer " + key;
  const r = await fetch(path, Object.assign({}, opts, {headers}));
  if (r.status === 401 && !retried) {
    const k = window.prompt("This server needs its API key:");
    if (k) {
      localStorage.setItem("fourbit-api-key", k.trim());
      return api(path, opts, true);
    }
  }
  return r;
}

async function errorText(r) {
  try {
    const j = await r.json();
    return (j.error && j.error.message) || (r.status + " " + r.statusText);
  } catch (e) {
    return r.status + " " + r.statusText;
  }
}

function randomId(bytes = 12) {  // crypto.randomUUID needs a secure context; getRandomValues does not
  const a = new Uint8Array(bytes);
  crypto.getRandomValues(a);
  return Array.from(a, b => b.toString(16).padStart(2, "0")).join("");
}
