// The search page: upload an image or pick a gallery item; POST /search; show the top-k cards.
"use strict";
const $ = (id) => document.getElementById(id);
let health = null;

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function element(tag, attrs = {}, text = null) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== null) node.textContent = text;
  return node;
}

function showQuery(src, caption) {  // src null: nothing the browser can draw (the server will say why)
  $("query-image").hidden = src === null;
  if (src !== null) $("query-image").src = src;
  $("query-caption").textContent = caption;
  $("query").hidden = false;
}

function renderHits(result) {
  const list = $("hits");
  list.replaceChildren();
  $("empty").hidden = true;
  $("results-title").textContent = `Top ${result.hits.length} of ${health ? health.count : "?"} gallery items`;
  for (const hit of result.hits) {
    const mark = hit.match === null ? "" : hit.match ? "match" : "no-match";
    const card = element("li", { class: `hit ${mark}`, "data-id": hit.id });
    card.append(element("img", { src: `/items/${encodeURIComponent(hit.id)}/image`, alt: `gallery item ${hit.id}` }));
    const meta = element("div", { class: "meta" });
    meta.append(element("span", { class: "rank" }, `#${hit.rank}`));
    meta.append(element("span", { class: "label" }, hit.label === null ? "no label" : `label ${hit.label}`));
    meta.append(element("span", { class: "distance" }, `${health ? health.distance : "distance"} ${hit.distance.toFixed(4)}`));
    if (mark) {
      const relation = hit.match ? "≤" : ">";
      meta.append(element("span", { class: "mark", title: `distance ${relation} threshold ${health.threshold.toFixed(4)}` },
                          hit.match ? "✓ match" : "✗ no match"));
    }
    card.append(meta);
    list.append(card);
  }
}

async function search(body) {
  $("error").hidden = true;
  try {
    const response = await fetch("/search", body);
    const result = await response.json();
    if (!response.ok) {
      $("hits").replaceChildren();
      $("results-title").textContent = "Results";
      showError(`${response.status}: ${result.detail}`);
      return;
    }
    renderHits(result);
  } catch (err) {
    showError(`the server did not answer: ${err}`);
  }
}

function k() { return $("k").value || String(health ? health.k_default : 8); }

function searchUpload(file) {
  document.querySelectorAll(".picks button").forEach((b) => b.classList.remove("chosen"));
  showQuery(file.type.startsWith("image/") ? URL.createObjectURL(file) : null, `upload: ${file.name}`);
  const form = new FormData();
  form.append("file", file);
  form.append("k", k());
  return search({ method: "POST", body: form });
}

function searchItem(item, button) {
  document.querySelectorAll(".picks button").forEach((b) => b.classList.remove("chosen"));
  button.classList.add("chosen");
  showQuery(`/items/${encodeURIComponent(item.id)}/image`,
            `gallery item ${item.id}` + (item.label === null ? "" : `, label ${item.label}`));
  return search({ method: "POST", headers: { "Content-Type": "application/json" },
                  body: JSON.stringify({ id: item.id, k: Number(k()) }) });
}

async function start() {
  try {
    health = await (await fetch("/health")).json();
    const threshold = health.threshold === null ? "no threshold" : `match threshold ${health.threshold.toFixed(4)}`;
    $("status").textContent = `${health.count} gallery items · ${health.embedding_size}-d ${health.distance} · ${threshold}`;
    $("k").value = health.k_default;
    $("k").max = health.k_max;
    const items = await (await fetch("/items?limit=10")).json();
    for (const item of items) {
      const button = element("button", { type: "button", title: `item ${item.id}`, "data-id": item.id });
      button.append(element("img", { src: `/items/${encodeURIComponent(item.id)}/image`, alt: `item ${item.id}` }));
      button.addEventListener("click", () => searchItem(item, button));
      $("picks").append(button);
    }
  } catch (err) {
    showError(`the server did not answer: ${err}`);
  }
  $("file").addEventListener("change", (event) => {
    if (event.target.files.length) searchUpload(event.target.files[0]);
  });
}

start();
