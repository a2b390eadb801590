// The search page: POST /v1/search, render the ranked images. No framework, no build step;
// text goes in with textContent only (never as HTML).
"use strict";

const $ = (id) => document.getElementById(id);

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").classList.toggle("error", Boolean(isError));
}

function card(item) {
  const li = document.createElement("li");
  li.className = "card";
  li.dataset.imageId = String(item.image_id);
  if (item.image_url) {
    const img = document.createElement("img");
    img.src = item.image_url;
    img.alt = item.captions.length ? item.captions[0] : item.file_name || "image " + item.image_id;
    img.loading = "lazy";
    // Tiny thumbnails (the generated smoke data) are scaled up: keep their pixels sharp.
    img.addEventListener("load", () => img.classList.toggle("pixel", img.naturalWidth < 128));
    li.append(img);
  } else {
    const none = document.createElement("div");
    none.className = "no-image";
    none.textContent = "no thumbnail";
    li.append(none);
  }
  const body = document.createElement("div");
  body.className = "body";
  const meta = document.createElement("div");
  meta.className = "meta";
  const rank = document.createElement("span");
  rank.className = "rank";
  rank.textContent = "#" + item.rank;
  const score = document.createElement("span");
  score.className = "score";
  score.title = "sequence log-probability";
  score.textContent = item.score.toFixed(3);
  meta.append(rank, score);
  body.append(meta);
  if (item.captions.length) {
    const caption = document.createElement("p");
    caption.className = "caption";
    caption.textContent = item.captions[0];
    caption.title = item.captions.join("\n");
    body.append(caption);
  }
  const file = document.createElement("p");
  file.className = "file";
  file.textContent = item.file_name || "image " + item.image_id;
  body.append(file);
  li.append(body);
  return li;
}

async function search(query, k) {
  const button = $("search-button");
  button.disabled = true;
  setStatus("searching…");
  try {
    const response = await fetch("/v1/search", {
      method: "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify({queries: [query], k: k}),
    });
    const data = await response.json();
    if (!response.ok) {
      const e = data.error || {};
      setStatus((e.field ? e.field + ": " : "") + (e.message || response.statusText), true);
      return;
    }
    const items = data.results[0].items;
    $("results").replaceChildren(...items.map(card));
    setStatus(items.length + " results in " + data.took_ms.toFixed(1) + " ms");
  } catch (err) {
    setStatus("the server did not answer: " + err, true);
  } finally {
    button.disabled = false;
  }
}

async function init() {
  try {
    const info = await (await fetch("/v1/info")).json();
    $("k").max = String(info.max_k);
    $("k").value = String(info.default_k);
    $("query").maxLength = info.max_query_chars;
    $("index-info").textContent = info.num_images + " images indexed" +
        (info.thumbnails ? "" : " (this export has no thumbnails)");
  } catch (err) {
    setStatus("could not read /v1/info: " + err, true);
  }
  const params = new URLSearchParams(location.search);
  if (params.get("k")) $("k").value = params.get("k");
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const query = $("query").value;
    const k = Number($("k").value);
    history.replaceState(null, "", "?" + new URLSearchParams({q: query, k: String(k)}));
    search(query, k);
  });
  if (params.get("q")) {
    $("query").value = params.get("q");
    search(params.get("q"), Number($("k").value));
  }
}

init();
