// The try-it page: send the chosen photo (or a box drawn on it) to POST /search, show what comes back. No framework,
// no build step.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const form = $("form"), drop = $("drop"), fileInput = $("file"), kInput = $("k"), again = $("again");
  const statusEl = $("status"), errorEl = $("error"), output = $("output"), preview = $("preview");
  const region = $("region"), stage = $("stage"), boxEl = $("box"), clearBox = $("clear-box");
  const boxStatus = $("box-status");
  const STAGES = ["decode", "embed", "route", "search", "group", "total"];
  // Keyboard steps and the smallest box they make, in fractions of the photo's sides; a drag shorter than
  // MIN_DRAG_PX either way is a click, not a box.
  const STEP = 0.05, MIN_SIDE = 0.05, MIN_DRAG_PX = 8;
  const MOVES = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };
  let current = null;
  let previewUrl = null;
  // The box to search: {x1, y1, x2, y2} in fractions of the photo as the browser shows it (EXIF-oriented, as the
  // service reads bbox_units=fraction), x2 and y2 exclusive; null for the whole photo.
  let box = null;
  let drag = null; // a pointer drawing a box: its id, where it went down, the box before it
  let searchSeq = 0; // answers can come back out of order: only the newest search's is shown

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
    setBox(null); // a box belongs to the photo it was drawn on
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(file);
    preview.hidden = true; // shown once decoded (the load listener below)
    region.hidden = true;
    preview.src = previewUrl;
    search();
  }

  function clamp(v, lo, hi) {
    return Math.min(hi, Math.max(lo, v));
  }

  function percent(f) {
    return Math.round(f * 100) + "%";
  }

  function extent(b) {
    return percent(b.x1) + " to " + percent(b.x2) + " across, " + percent(b.y1) + " to " + percent(b.y2) + " down";
  }

  function describe(b) {
    return b ? "Box from " + extent(b) + "." : "No box: the whole photo is searched.";
  }

  // Positions in percent of the stage, which is the photo as shown: the box follows the photo when it is resized.
  function drawBox(b) {
    boxEl.hidden = !b;
    if (!b) return;
    boxEl.style.left = b.x1 * 100 + "%";
    boxEl.style.top = b.y1 * 100 + "%";
    boxEl.style.width = (b.x2 - b.x1) * 100 + "%";
    boxEl.style.height = (b.y2 - b.y1) * 100 + "%";
  }

  function setBox(b, note) {
    box = b;
    drawBox(b);
    clearBox.disabled = !b;
    boxStatus.textContent = describe(b) + (note ? " " + note : "");
  }

  function clearTheBox() {
    if (!box) return;
    setBox(null);
    search();
  }

  // 4 decimals: ten times finer than a screen pixel of the photo as shown (at most 1100 px wide here).
  function boxQuery(b) {
    if (!b) return "";
    return "&bbox=" + [b.x1, b.y1, b.x2, b.y2].map((v) => v.toFixed(4)).join(",") + "&bbox_units=fraction";
  }

  async function search() {
    if (!current) return;
    const seq = ++searchSeq;
    const sent = box;
    clearError();
    const k = Math.min(50, Math.max(1, parseInt(kInput.value, 10) || 5));
    kInput.value = String(k);
    statusEl.textContent = "Searching…";
    const body = new FormData();
    body.append("image", current, current.name || "photo");
    let response;
    try {
      response = await fetch("/search?k=" + k + boxQuery(sent), { method: "POST", body: body });
    } catch (err) {
      if (seq !== searchSeq) return;
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
    if (seq !== searchSeq) return; // a newer search is under way: its answer is the one to show
    statusEl.textContent = "";
    if (!response.ok || !data) {
      const detail = data && data.error ? data.error.message : "unexpected answer (HTTP " + response.status + ")";
      const code = data && data.error ? " [" + data.error.code + "]" : "";
      output.hidden = true;
      showError("This photo could not be searched: " + detail + code);
      return;
    }
    render(data, sent);
  }

  function render(data, sent) {
    $("searched").textContent = sent ? "For the box you drew (" + extent(sent) + ")." : "For the whole photo.";
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
  preview.addEventListener("load", () => { preview.hidden = false; region.hidden = false; });
  preview.addEventListener("error", () => { preview.hidden = true; region.hidden = true; });

  // Drawing a box: pointer events, so the mouse, a finger and a pen alike (touch-action: none on the stage keeps
  // a drag on the photo from scrolling the page). The search runs when the pointer is lifted.
  function pointAt(e) {
    const r = preview.getBoundingClientRect();
    return { x: clamp((e.clientX - r.left) / r.width, 0, 1), y: clamp((e.clientY - r.top) / r.height, 0, 1), r: r };
  }

  function spanned(a, b) {
    return { x1: Math.min(a.x, b.x), y1: Math.min(a.y, b.y), x2: Math.max(a.x, b.x), y2: Math.max(a.y, b.y) };
  }

  stage.addEventListener("pointerdown", (e) => {
    if (!e.isPrimary || e.button !== 0 || preview.hidden) return;
    e.preventDefault(); // no text selection or native image drag
    stage.focus({ preventScroll: true }); // the keyboard can then adjust what the pointer drew
    stage.setPointerCapture(e.pointerId); // the drag goes on outside the photo, clamped to its edges
    const p = pointAt(e);
    drag = { id: e.pointerId, x: p.x, y: p.y, before: box };
  });
  stage.addEventListener("pointermove", (e) => {
    if (drag && e.pointerId === drag.id) drawBox(spanned(drag, pointAt(e)));
  });
  stage.addEventListener("pointerup", (e) => {
    if (!drag || e.pointerId !== drag.id) return;
    const p = pointAt(e), b = spanned(drag, p), before = drag.before;
    drag = null;
    if ((b.x2 - b.x1) * p.r.width < MIN_DRAG_PX || (b.y2 - b.y1) * p.r.height < MIN_DRAG_PX) {
      drawBox(before); // a click: the box stays as it was
      return;
    }
    setBox(b, "Searching it.");
    search();
  });
  stage.addEventListener("pointercancel", (e) => {
    if (drag && e.pointerId === drag.id) { drawBox(drag.before); drag = null; }
  });

  // The keyboard: the first arrow draws a box in the middle, arrows move it, Shift+arrows move its right or bottom
  // edge, Enter (or Space) searches it, Escape or Delete clears it. Each change is announced (#box-status).
  stage.addEventListener("keydown", (e) => {
    if (preview.hidden || drag || e.altKey || e.ctrlKey || e.metaKey) return;
    const move = MOVES[e.key];
    if (move) {
      e.preventDefault(); // arrows would scroll the page
      if (!box) {
        setBox({ x1: 0.25, y1: 0.25, x2: 0.75, y2: 0.75 }, "Enter searches it.");
        return;
      }
      const dx = move[0] * STEP, dy = move[1] * STEP;
      let b;
      if (e.shiftKey) {
        b = {
          x1: box.x1, y1: box.y1,
          x2: clamp(box.x2 + dx, Math.min(1, box.x1 + MIN_SIDE), 1),
          y2: clamp(box.y2 + dy, Math.min(1, box.y1 + MIN_SIDE), 1),
        };
      } else {
        const w = box.x2 - box.x1, h = box.y2 - box.y1;
        const x1 = clamp(box.x1 + dx, 0, 1 - w), y1 = clamp(box.y1 + dy, 0, 1 - h);
        b = { x1: x1, y1: y1, x2: Math.min(1, x1 + w), y2: Math.min(1, y1 + h) };
      }
      setBox(b, "Enter searches it.");
    } else if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      if (box) boxStatus.textContent = describe(box) + " Searching it.";
      search();
    } else if ((e.key === "Escape" || e.key === "Delete" || e.key === "Backspace") && box) {
      e.preventDefault();
      clearTheBox();
    }
  });
  clearBox.addEventListener("click", () => {
    clearTheBox();
    stage.focus(); // the button is now disabled: keep the keyboard on the photo rather than lose it
  });
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
