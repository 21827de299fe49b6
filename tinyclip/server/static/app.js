// The page of `tinyclip serve`. Everything shown is built with textContent and attributes, never
// innerHTML: queries, labels and file names are the user's data, not markup.
"use strict";

const $ = (id) => document.getElementById(id);
let chosen = null;        // the image last chosen or dropped (a File), for search and classify

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function busy(message) {
  $("error").hidden = true;
  $("status").textContent = message;
  for (const b of document.querySelectorAll("form button")) b.disabled = true;
}

function idle(message = "") {
  $("status").textContent = message;
  for (const b of document.querySelectorAll("form button")) b.disabled = false;
}

async function call(url, options = {}) {
  const response = await fetch(url, options);
  let body = null;
  try { body = await response.json(); } catch (e) { /* not JSON: reported below */ }
  if (!response.ok) {
    throw new Error(body && body.error ? body.error : `the server answered ${response.status}`);
  }
  return body;
}

function element(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

function showResults(title, results) {
  const list = $("results");
  list.replaceChildren();
  $("results-title").textContent = title;
  for (const r of results) {
    const item = element("li", "result");
    item.dataset.id = String(r.id);
    const button = element("button");
    button.type = "button";
    button.title = "More like this";
    const img = element("img");
    img.src = r.thumbnail;
    img.alt = r.path;
    button.append(img);
    button.addEventListener("click", () => moreLike(r));
    item.append(button, element("span", "score", r.score.toFixed(4)), element("span", "path", r.path));
    list.append(item);
  }
  list.dataset.renders = String(Number(list.dataset.renders) + 1);
}

async function run(message, work) {
  busy(message);
  const started = performance.now();
  try {
    await work();
    idle(`${Math.round(performance.now() - started)} ms`);
  } catch (e) {
    idle();
    showError(e.message);
  }
}

function howMany() { return $("top").value; }

function searchText(text) {
  return run("searching ...", async () => {
    const body = await call("/api/search?" + new URLSearchParams({ q: text, k: howMany() }));
    showResults(`Best matches for “${body.query.text}”`, body.results);
  });
}

function moreLike(result) {
  return run("searching ...", async () => {
    const body = await call("/api/search?" + new URLSearchParams({ like: String(result.id), k: howMany() }));
    showResults(`More like ${body.query.path}`, body.results);
  });
}

function searchImage(file) {
  chosen = file;
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  return run("searching by image ...", async () => {
    const body = await call("/api/search?" + new URLSearchParams({ k: howMany() }),
      { method: "POST", body: file, headers: { "Content-Type": file.type || "application/octet-stream" } });
    showResults(`Best matches for ${file.name || "the image"}`, body.results);
  });
}

function classify(labels) {
  if (!chosen) { showError("Choose or drop an image first, then classify it."); return; }
  const form = new FormData();
  form.append("image", chosen);
  for (const label of labels) form.append("labels", label);
  return run("classifying ...", async () => {
    const body = await call("/api/classify", { method: "POST", body: form });
    const list = $("class-list");
    list.replaceChildren();
    for (const c of body.labels) {
      const item = element("li");
      const bar = element("span", "bar");
      bar.style.width = `${Math.max(1, Math.round(c.probability * 200))}px`;
      item.append(bar, element("span", "label", c.label), element("span", "probability",
        ` ${(100 * c.probability).toFixed(1)}%`));
      list.append(item);
    }
    $("classes").hidden = false;
  });
}

document.addEventListener("DOMContentLoaded", () => {
  call("/api/info").then((info) => {
    $("info").textContent = `${info.count.toLocaleString()} images · ${info.kind === "ivf-flat" ? "approximate" : "exact"} search · ${info.model}`;
  }, (e) => showError(e.message));

  $("text-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("query").value.trim();
    if (text) searchText(text);
  });
  $("file").addEventListener("change", () => {
    const file = $("file").files[0];
    if (file) searchImage(file);
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) searchImage(file);
  });
  $("classify-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const labels = $("labels").value.split(",").map((s) => s.trim()).filter((s) => s);
    if (labels.length === 0) { showError("Type the labels to choose from, separated by commas."); return; }
    classify(labels);
  });
});
