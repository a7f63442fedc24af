// The captioning page: each chosen or dropped file is sent on its own to POST /api/caption (the server
// batches concurrent requests together), and gets a card with its caption, beams and class.
"use strict";

const dropZone = document.getElementById("drop-zone");
const fileInput = document.getElementById("file-input");
const results = document.getElementById("results");
const template = document.getElementById("card-template");

async function showModel() {
  const info = document.getElementById("model-info");
  try {
    const response = await fetch("/api/health");
    const health = await response.json();
    const classifier = health.classifier ? ", with a classifier" : "";
    info.textContent = `${health.decoder} decoder on ${health.encoder}, ${health.vocabulary_size} words, ` +
      `beam ${health.beam}${classifier}; up to ${health.max_upload_mb} MB per upload`;
  } catch (error) {
    info.textContent = "the server does not answer";
  }
}

function showPreview(card, file) {
  const img = card.querySelector("img");
  const url = URL.createObjectURL(file);
  img.alt = file.name;
  img.onload = () => URL.revokeObjectURL(url);
  img.onerror = () => {
    URL.revokeObjectURL(url);
    const placeholder = document.createElement("div");
    placeholder.className = "no-preview";
    placeholder.textContent = "no preview";
    img.replaceWith(placeholder);
  };
  img.src = url;
}

function showCaption(card, result) {
  card.classList.remove("pending");
  card.querySelector(".status").textContent = "";
  card.querySelector(".caption").textContent = result.caption || "(empty caption)";
  if (result.class) {
    const percent = (100 * result.class.probability).toFixed(1);
    card.querySelector(".class").textContent = `class: ${result.class.label} (${percent}%)`;
  }
  const beams = card.querySelector(".beams");
  for (const beam of result.beams) {
    const item = document.createElement("li");
    item.textContent = beam.caption || "(empty)";
    const logProb = document.createElement("span");
    logProb.className = "log-prob";
    logProb.textContent = `log p = ${beam.log_prob.toFixed(3)}`;
    item.append(logProb);
    beams.append(item);
  }
  const t = result.timing_ms;
  card.querySelector(".timing").textContent =
    `${t.total} ms in all (encode ${t.encode} ms, beam search ${t.beam_search} ms, batch of ${result.batch_size})`;
}

function showError(card, message) {
  card.classList.remove("pending");
  card.classList.add("error");
  card.querySelector(".status").textContent = `Cannot caption this file. ${message}`;
}

async function caption(file) {
  const card = template.content.firstElementChild.cloneNode(true);
  card.querySelector(".file-name").textContent = file.name;
  results.prepend(card);
  showPreview(card, file);
  const form = new FormData();
  form.append("files", file, file.name);
  let response;
  try {
    response = await fetch("/api/caption", { method: "POST", body: form });
  } catch (error) {
    showError(card, "The upload failed (the server closed the connection; is the file too large?).");
    return;
  }
  let body = null;
  try {
    body = await response.json();
  } catch (error) {
    // not JSON: reported below with the status code
  }
  const result = body && body.results ? body.results[0] : null;
  if (response.ok && result && !result.error) {
    showCaption(card, result);
  } else if (result && result.error) {
    showError(card, result.error);
  } else {
    showError(card, body && body.detail ? body.detail : `The server answered ${response.status}.`);
  }
}

function captionAll(files) {
  for (const file of files) {
    caption(file);
  }
}

fileInput.addEventListener("change", () => {
  captionAll(fileInput.files);
  fileInput.value = "";
});
for (const name of ["dragenter", "dragover"]) {
  dropZone.addEventListener(name, (event) => {
    event.preventDefault();
    dropZone.classList.add("dragging");
  });
}
for (const name of ["dragleave", "drop"]) {
  dropZone.addEventListener(name, () => dropZone.classList.remove("dragging"));
}
dropZone.addEventListener("drop", (event) => {
  event.preventDefault();
  captionAll(event.dataTransfer.files);
});

showModel();
