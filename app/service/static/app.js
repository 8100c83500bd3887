// The try-it page: send the chosen photo to POST /search, show what comes back. No framework, no build step.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const form = $("form"), drop = $("drop"), fileInput = $("file"), kInput = $("k"), again = $("again");
  const statusEl = $("status"), errorEl = $("error"), output = $("output"), preview = $("preview");
  const STAGES = ["decode", "embed", "route", "search", "group", "total"];
  let current = null;
  let previewUrl = null;

  function el(tag, props, children) {
    const node = document.createElement(tag);
    Object.assign(node, props || {});
    (children || []).forEach((c) => node.append(c));
    return node;
  }

  function showError(message) {
    errorEl.textContent = message;
    errorEl.classList.add("show");
  }

  function clearError() {
    errorEl.textContent = "";
    errorEl.classList.remove("show");
  }

  function choose(file) {
    if (!file) return;
    current = file;
    again.disabled = false;
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(file);
    preview.hidden = true; // shown once decoded (the load listener below)
    preview.src = previewUrl;
    search();
  }

  async function search() {
    if (!current) return;
    clearError();
    const k = Math.min(50, Math.max(1, parseInt(kInput.value, 10) || 5));
    kInput.value = String(k);
    statusEl.textContent = "Searching…";
    const body = new FormData();
    body.append("image", current, current.name || "photo");
    let response;
    try {
      response = await fetch("/search?k=" + k, { method: "POST", body: body });
    } catch (err) {
      statusEl.textContent = "";
      showError("The service could not be reached. Check your connection and try again.");
      return;
    }
    let data = null;
    try {
      data = await response.json();
    } catch (err) {
      data = null;
    }
    statusEl.textContent = "";
    if (!response.ok || !data) {
      const detail = data && data.error ? data.error.message : "unexpected answer (HTTP " + response.status + ")";
      const code = data && data.error ? " [" + data.error.code + "]" : "";
      output.hidden = true;
      showError("This photo could not be searched: " + detail + code);
      return;
    }
    render(data);
  }

  function render(data) {
    const list = $("results");
    list.replaceChildren();
    if (!data.match || data.results.length === 0) {
      statusEl.textContent = "No catalogue product is close enough to this photo.";
    } else {
      statusEl.textContent = data.results.length + " products, best first.";
    }
    data.results.forEach((r, i) => {
      const pic = r.image_url
        ? el("img", { src: r.image_url, alt: r.title || r.sku, loading: "lazy" })
        : el("div", { className: "noimg", textContent: "no image" });
      const card = el("li", { tabIndex: 0, className: "result" }, [
        pic,
        el("div", { className: "body" }, [
          el("div", { className: "rank", textContent: "#" + (i + 1) }),
          el("div", { className: "title", textContent: r.title || r.sku }),
          el("div", { className: "meta sku", textContent: "SKU " + r.sku }),
          el("div", { className: "meta", textContent: r.category }),
          el("div", { className: "meta score", textContent: "score " + r.score.toFixed(3) }),
        ]),
      ]);
      card.dataset.sku = r.sku;
      card.setAttribute("aria-label", "#" + (i + 1) + " " + (r.title || r.sku) + ", " + r.category + ", score " + r.score.toFixed(3));
      list.append(card);
    });

    const routing = $("routing");
    routing.replaceChildren();
    const added = data.routing.added || [];
    data.routing.probed.concat(added).forEach((p, i) => {
      const bar = el("div", { className: "bar" });
      bar.style.width = Math.round(p.probability * 100) + "%";
      const name = i < data.routing.probed.length ? p.category : p.category + " (added to fill the list)";
      routing.append(el("tr", {}, [
        el("td", { textContent: name }),
        el("td", { className: "num", textContent: (p.probability * 100).toFixed(1) + " %" }),
        el("td", {}, [bar]),
      ]));
    });
    $("routing-note").textContent = data.routing.forced
      ? "Category chosen by the request."
      : data.routing.probed.length + " categories searched" +
        (added.length ? ", and " + added.length + " more to find enough products." : ".");

    const timings = $("timings");
    timings.replaceChildren();
    STAGES.forEach((s) => {
      timings.append(el("tr", {}, [
        el("td", { textContent: s }),
        el("td", { className: "num", textContent: data.timings_ms[s].toFixed(1) }),
      ]));
    });
    $("version").textContent = "Model " + data.model.name + " " + data.model.version + ", index " + data.index_version;
    output.hidden = false;
  }

  // The photo is shown only once the browser could decode it: a file it cannot show (not an image, corrupt, a
  // format it lacks) would otherwise leave a broken-image icon beside the error message.
  preview.addEventListener("load", () => { preview.hidden = false; });
  preview.addEventListener("error", () => { preview.hidden = true; });
  fileInput.addEventListener("change", () => choose(fileInput.files[0]));
  form.addEventListener("submit", (e) => { e.preventDefault(); search(); });
  kInput.addEventListener("change", () => { if (current) search(); });
  // The label opens the picker on click; the keyboard reaches the focusable file input inside it, and Enter or
  // Space open the picker there. preventDefault first: the browser's own activation plus click() would open it
  // twice, and the second request is dropped, sometimes the first (seen as a flaky browser test).
  fileInput.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); fileInput.click(); }
  });
  ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); }));
  ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, () => drop.classList.remove("over")));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    if (e.dataTransfer && e.dataTransfer.files.length) choose(e.dataTransfer.files[0]);
  });
})();
