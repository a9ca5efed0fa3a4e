// latentpacs viewer: studies list and study page over DICOMweb (PS3.18), no dependencies.
//
// Data comes only from fetch() calls with "Authorization: Bearer <token>" (an <img src>
// cannot send it): QIDO-RS for studies and instances, WADO-RS metadata (DICOM JSON,
// PS3.18 F.2) and frames (multipart/related; type="application/octet-stream", native
// little endian) for the pixels, rendered thumbnails (viewport=) shown from blob URLs,
// and /viewer/api/... for the tier and compression ratio. A 401 asks for a token (kept in
// sessionStorage, this tab only) and retries.
//
// Window/level is applied here, on the raw pixels of frame 1: stored value -> Modality LUT
// (Rescale Slope/Intercept, PS3.3 C.11.1) -> VOI window (Window Center/Width with VOI LUT
// Function, C.11.2.1.2; the image's own first window, or its value range when it has none)
// -> MONOCHROME1 inverted (C.7.6.3.1.2), through a lookup table over every possible cell
// value, so dragging the window redraws without a request. If the frame cannot be used
// (unusual pixel layout, or the server refuses), or "rendered by the server" is ticked,
// the page shows /rendered and asks for it again with window=center,width,function
// after each change.
"use strict";

(() => {
  const BASE = "/dicom-web";
  const TOKEN_KEY = "latentpacs.token";
  const PAGE = 25;
  const THUMB = 160;
  const EXPLICIT_LE = "1.2.840.10008.1.2.1";
  const JSON_DICOM = "application/dicom+json";
  const $ = (id) => document.getElementById(id);

  // ---------------------------------------------------------------- status line
  function status(text, isError) {
    const el = $("status");
    el.textContent = text || "";
    el.classList.toggle("error", !!isError);
  }

  // ---------------------------------------------------------------- token and requests
  class HttpError extends Error {
    constructor(status, text) {
      super(`${status}: ${text || "request failed"}`);
      this.status = status;
    }
  }

  let tokenPrompt = null;

  function token() { return sessionStorage.getItem(TOKEN_KEY); }

  function showWho() {
    $("who").textContent = token() ? "token set" : "";
    $("forget").hidden = !token();
  }

  function askToken(message) {
    if (tokenPrompt) return tokenPrompt;
    tokenPrompt = new Promise((resolve) => {
      const form = $("token-form");
      $("token-message").textContent = message;
      $("token-input").value = "";
      $("token-dialog").hidden = false;
      $("token-input").focus();
      const submitted = (event) => {
        event.preventDefault();
        const value = $("token-input").value.trim();
        if (!value) return;
        sessionStorage.setItem(TOKEN_KEY, value);
        form.removeEventListener("submit", submitted);
        $("token-dialog").hidden = true;
        tokenPrompt = null;
        showWho();
        resolve();
      };
      form.addEventListener("submit", submitted);
    });
    return tokenPrompt;
  }

  // GET path with the bearer token; a 401 asks for a (new) token and tries again.
  async function api(path, accept, signal) {
    for (;;) {
      const used = token();
      const headers = { Accept: accept };
      if (used) headers.Authorization = `Bearer ${used}`;
      const response = await fetch(path, { headers, signal, cache: "no-store", credentials: "same-origin" });
      if (response.status === 401) {
        if (used && token() === used) sessionStorage.removeItem(TOKEN_KEY);
        showWho();
        await askToken(used ? "That token was not accepted; enter another."
                            : "This node needs a bearer token to show its studies.");
        continue;
      }
      if (!response.ok) throw new HttpError(response.status, (await response.text()).trim());
      return response;
    }
  }

  async function apiJson(path, accept, signal) {
    const response = await api(path, accept, signal);
    if (response.status === 204) return [];
    const text = await response.text();
    return text ? JSON.parse(text) : [];
  }

  // ---------------------------------------------------------------- DICOM JSON (PS3.18 F.2)
  function values(ds, tag) {
    const element = ds && ds[tag];
    return element && Array.isArray(element.Value) ? element.Value : [];
  }
  function first(ds, tag) { const v = values(ds, tag); return v.length ? v[0] : undefined; }
  function text(ds, tag) { const v = first(ds, tag); return v === undefined || v === null ? "" : String(v); }
  function number(ds, tag, fallback) {
    const v = Number(first(ds, tag));
    return first(ds, tag) === undefined || !Number.isFinite(v) ? fallback : v;
  }
  function personName(ds, tag) {
    const v = first(ds, tag);
    const alphabetic = v && typeof v === "object" ? v.Alphabetic || "" : String(v || "");
    const [family = "", given = "", middle = ""] = alphabetic.split("^");
    return [family, [given, middle].filter(Boolean).join(" ")].filter(Boolean).join(", ");
  }
  function dicomDate(value) {
    return /^\d{8}$/.test(value) ? `${value.slice(0, 4)}-${value.slice(4, 6)}-${value.slice(6)}` : value;
  }

  const TAG = {
    StudyDate: "00080020", AccessionNumber: "00080050", StudyDescription: "00081030",
    PatientName: "00100010", PatientID: "00100020", StudyInstanceUID: "0020000D",
    SeriesInstanceUID: "0020000E", SOPInstanceUID: "00080018", SeriesNumber: "00200011",
    InstanceNumber: "00200013", NumberOfStudyRelatedInstances: "00201208",
    ImageLaterality: "00200062", ViewCodeSequence: "00540220", CodeMeaning: "00080104",
    SamplesPerPixel: "00280002", Photometric: "00280004", NumberOfFrames: "00280008",
    Rows: "00280010", Columns: "00280011", BitsAllocated: "00280100", BitsStored: "00280101",
    PixelRepresentation: "00280103", WindowCenter: "00281050", WindowWidth: "00281051",
    RescaleIntercept: "00281052", RescaleSlope: "00281053", VOILUTFunction: "00281056",
    LossyImageCompression: "00282110", LossyImageCompressionRatio: "00282112",
    LossyImageCompressionMethod: "00282114",
  };

  // ---------------------------------------------------------------- formatting
  function ratioText(ratio) {
    if (ratio === null || ratio === undefined || !Number.isFinite(Number(ratio))) return "";
    const r = Number(ratio);
    return `${r >= 100 ? Math.round(r).toLocaleString("en") : r.toFixed(r >= 10 ? 1 : 2)}:1`;
  }
  function isLossyTier(tier) { return tier !== "lossless"; }
  function tierChip(tier) {
    const chip = document.createElement("span");
    chip.className = `tier ${isLossyTier(tier) ? "lossy" : "lossless"}`;
    chip.textContent = tier;
    return chip;
  }

  // ---------------------------------------------------------------- router
  let leaving = null; // AbortController of the page being shown

  function route() {
    if (leaving) leaving.abort();
    leaving = new AbortController();
    const match = /^#\/studies\/([0-9.]{1,64})$/.exec(location.hash);
    const run = match ? showStudy(match[1], leaving.signal) : showStudies(leaving.signal);
    run.catch((error) => {
      if (error.name === "AbortError") return;
      status(error.message, true);
    });
  }

  // ---------------------------------------------------------------- studies list
  const list = { offset: 0, filter: {} };

  function qidoFilter() {
    const params = new URLSearchParams();
    for (const [key, value] of Object.entries(list.filter)) {
      if (!value) continue;
      const wild = key === "StudyDate" || /[*?]/.test(value) ? value : `${value}*`;
      params.set(key, wild);
    }
    return params;
  }

  async function showStudies(signal) {
    viewer.close();
    $("study-view").hidden = true;
    $("studies-view").hidden = false;
    $("crumb").textContent = "studies";
    $("studies").dataset.state = "loading";
    status("loading studies\u2026");
    const params = qidoFilter();
    params.set("limit", String(PAGE + 1));
    params.set("offset", String(list.offset));
    params.append("includefield", TAG.StudyDescription);
    params.append("includefield", TAG.NumberOfStudyRelatedInstances);
    const found = await apiJson(`${BASE}/studies?${params}`, JSON_DICOM, signal);
    const studies = found.slice(0, PAGE);
    const uids = studies.map((study) => text(study, TAG.StudyInstanceUID)).filter(Boolean);
    const summaries = new Map();
    if (uids.length) {
      const answer = await apiJson(`/viewer/api/studies?StudyInstanceUID=${uids.join(",")}`,
                                   "application/json", signal);
      for (const summary of answer.studies || []) summaries.set(summary.StudyInstanceUID, summary);
    }
    const body = $("studies").tBodies[0];
    body.replaceChildren();
    for (const study of studies) body.append(studyRow(study, summaries.get(text(study, TAG.StudyInstanceUID))));
    if (!studies.length) {
      const row = body.insertRow();
      const cell = row.insertCell();
      cell.colSpan = 7;
      cell.className = "empty";
      cell.textContent = list.offset ? "no more studies" : "no studies match";
    }
    $("prev").disabled = list.offset === 0;
    $("next").disabled = found.length <= PAGE;
    $("page-info").textContent = studies.length
      ? `${list.offset + 1}\u2013${list.offset + studies.length}` : "";
    $("studies").dataset.state = "ready";
    status("");
  }

  function studyRow(study, summary) {
    const uid = text(study, TAG.StudyInstanceUID);
    const row = document.createElement("tr");
    row.dataset.uid = uid;
    const cell = (content, className) => {
      const td = row.insertCell();
      if (className) td.className = className;
      if (content instanceof Node) td.append(content); else td.textContent = content;
      return td;
    };
    const link = document.createElement("a");
    link.href = `#/studies/${uid}`;
    link.className = "study-link";
    link.textContent = personName(study, TAG.PatientName) || "(no name)";
    cell(link);
    cell(text(study, TAG.PatientID));
    cell(dicomDate(text(study, TAG.StudyDate)));
    cell(text(study, TAG.StudyDescription));
    const count = first(study, TAG.NumberOfStudyRelatedInstances);
    cell(count === undefined ? (summary ? String(summary.instances) : "") : String(count), "num");
    const tiers = document.createElement("span");
    for (const tier of summary ? summary.tiers : []) tiers.append(tierChip(tier), " ");
    if (summary && summary.pending) tiers.append(`(${summary.pending} being coded)`);
    cell(tiers, "tiers");
    cell(summary ? ratioText(summary.ratio) : "", "num ratio");
    row.addEventListener("click", (event) => {
      if (event.target !== link) location.hash = link.getAttribute("href");
    });
    return row;
  }

  // ---------------------------------------------------------------- study page
  function instanceBase(study, series, sop) {
    return `${BASE}/studies/${study}/series/${series}/instances/${sop}`;
  }

  function sortInstances(instances) {
    return instances.slice().sort((a, b) =>
      number(a, TAG.SeriesNumber, 0) - number(b, TAG.SeriesNumber, 0)
      || number(a, TAG.InstanceNumber, 0) - number(b, TAG.InstanceNumber, 0));
  }

  function viewName(meta) {
    const laterality = text(meta, TAG.ImageLaterality);
    const view = values(meta, TAG.ViewCodeSequence)[0];
    const meaning = view ? text(view, TAG.CodeMeaning) : "";
    const short = { "cranio-caudal": "CC", "medio-lateral oblique": "MLO" }[meaning] || meaning;
    return [laterality, short].filter(Boolean).join(" ");
  }

  // The label of one image: lossy (Lossy Image Compression 01, PS3.3 C.7.6.1.1.5) or not.
  function compressionLabel(meta, summary) {
    const lossy = text(meta, TAG.LossyImageCompression) === "01";
    const tier = summary ? summary.tiers[0] : "";
    if (lossy) {
      const ratios = values(meta, TAG.LossyImageCompressionRatio).map((r) => ratioText(r)).filter(Boolean);
      const methods = values(meta, TAG.LossyImageCompressionMethod).map(String);
      const parts = ["LOSSY"];
      if (ratios.length) parts.push(ratios.join(" then "));
      if (methods.length) parts.push(methods.join(" + "));
      if (tier) parts.push(`tier ${tier}`);
      return { lossy: true, short: `lossy ${ratios.join(" ")}`.trim(), long: parts.join(" \u00b7 ") };
    }
    const parts = ["LOSSLESS \u00b7 original pixels"];
    if (tier) parts.push(`tier ${tier}`);
    if (summary && summary.ratio) parts.push(`archived at ${ratioText(summary.ratio)}`);
    return { lossy: false, short: "lossless", long: parts.join(" \u00b7 ") };
  }

  async function pool(items, width, work) {
    let next = 0;
    const workers = Array.from({ length: Math.min(width, items.length) }, async () => {
      while (next < items.length) {
        const item = items[next++];
        await work(item);
      }
    });
    await Promise.all(workers);
  }

  async function showStudy(uid, signal) {
    const started = performance.now();
    $("studies-view").hidden = true;
    $("study-view").hidden = false;
    viewer.close();
    $("thumbs").replaceChildren();
    $("crumb").textContent = "";
    status("loading study\u2026");
    const [studies, found, summary] = await Promise.all([
      apiJson(`${BASE}/studies?StudyInstanceUID=${uid}&includefield=${TAG.StudyDescription}`, JSON_DICOM, signal),
      apiJson(`${BASE}/studies/${uid}/instances?includefield=${TAG.SeriesInstanceUID}` +
              `&includefield=${TAG.SeriesNumber}`, JSON_DICOM, signal),
      apiJson(`/viewer/api/studies/${uid}/instances`, "application/json", signal),
    ]);
    const study = studies[0] || {};
    $("crumb").textContent = [personName(study, TAG.PatientName), text(study, TAG.PatientID),
      dicomDate(text(study, TAG.StudyDate)), text(study, TAG.StudyDescription)].filter(Boolean).join(" \u00b7 ");
    const byUid = new Map((summary.instances || []).map((s) => [s.SOPInstanceUID, s]));
    const instances = sortInstances(found);
    if (!instances.length) { status("this study has no instances", true); return; }
    const items = instances.map((instance) => {
      const sop = text(instance, TAG.SOPInstanceUID);
      const item = {
        base: instanceBase(uid, text(instance, TAG.SeriesInstanceUID), sop), sop,
        number: text(instance, TAG.InstanceNumber), summary: byUid.get(sop), meta: null, element: null,
      };
      item.element = thumbElement(item);
      $("thumbs").append(item.element);
      return item;
    });
    await select(items[0], signal, started);
    // Thumbnails after the first image: their decodes do not delay it.
    await pool(items, 2, async (item) => {
      try {
        if (!item.meta) item.meta = (await apiJson(`${item.base}/metadata`, JSON_DICOM, signal))[0] || {};
        labelThumb(item);
        const response = await api(`${item.base}/rendered?viewport=${THUMB},${THUMB}`, "image/png", signal);
        const url = URL.createObjectURL(await response.blob());
        viewer.blobs.push(url);
        item.element.querySelector("img").src = url;
      } catch (error) {
        if (error.name === "AbortError") throw error;
        item.element.querySelector(".badge").textContent = error.message;
      }
    });
  }

  function thumbElement(item) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "thumb";
    button.dataset.sop = item.sop;
    const frame = document.createElement("div");
    frame.className = "frame";
    const img = document.createElement("img");
    img.alt = `image ${item.number}`;
    frame.append(img);
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = `#${item.number}`;
    const badge = document.createElement("span");
    badge.className = "badge";
    button.append(frame, label, badge);
    button.addEventListener("click", () => {
      select(item, leaving.signal, performance.now()).catch((error) => {
        if (error.name !== "AbortError") status(error.message, true);
      });
    });
    return button;
  }

  function labelThumb(item) {
    const label = compressionLabel(item.meta, item.summary);
    item.element.querySelector(".label").textContent = [`#${item.number}`, viewName(item.meta)].filter(Boolean).join(" ");
    const badge = item.element.querySelector(".badge");
    badge.className = `badge ${label.lossy ? "lossy" : "lossless"}`;
    badge.textContent = label.short;
  }

  async function select(item, signal, started) {
    for (const el of document.querySelectorAll(".thumb")) el.classList.toggle("selected", el === item.element);
    status("loading image\u2026");
    if (!item.meta) item.meta = (await apiJson(`${item.base}/metadata`, JSON_DICOM, signal))[0] || {};
    labelThumb(item);
    const label = compressionLabel(item.meta, item.summary);
    const badge = $("badge");
    badge.className = `badge ${label.lossy ? "lossy" : "lossless"}`;
    badge.textContent = label.long;
    await viewer.open(item, signal);
    await viewer.painted();
    viewer.timing = { sop: item.sop, firstImageMs: Math.round(performance.now() - started), mode: viewer.mode };
    status("");
  }

  // ---------------------------------------------------------------- multipart (RFC 2387)
  function findBytes(haystack, needle, from, backwards) {
    const last = haystack.length - needle.length;
    const step = backwards ? -1 : 1;
    for (let i = backwards ? Math.min(from, last) : from; backwards ? i >= 0 : i <= last; i += step) {
      let j = 0;
      while (j < needle.length && haystack[i + j] === needle[j]) j++;
      if (j === needle.length) return i;
    }
    return -1;
  }

  // The first body part of a multipart/related answer: its headers and bytes.
  function firstPart(bytes, contentType) {
    const match = /boundary="?([^";]+)"?/i.exec(contentType);
    if (!match) throw new Error("multipart answer without a boundary");
    const encoder = new TextEncoder();
    const delimiter = encoder.encode(`--${match[1]}`);
    const open = findBytes(bytes, delimiter, 0, false);
    if (open < 0) throw new Error("multipart answer without its boundary");
    const headerEnd = findBytes(bytes, encoder.encode("\r\n\r\n"), open, false);
    if (headerEnd < 0) throw new Error("multipart part without headers");
    const headers = new TextDecoder().decode(bytes.subarray(open + delimiter.length, headerEnd));
    const start = headerEnd + 4;
    const close = findBytes(bytes, encoder.encode(`\r\n--${match[1]}`), bytes.length, true);
    const end = close >= start ? close : bytes.length;
    const type = (/^content-type:\s*(.+)$/im.exec(headers) || [, ""])[1].trim();
    return { type, body: bytes.subarray(start, end) };
  }

  // ---------------------------------------------------------------- the image
  // Raw pixels of frame 1 and what turns them into display values.
  function pixelModule(meta) {
    const bitsAllocated = number(meta, TAG.BitsAllocated, 16);
    const centers = values(meta, TAG.WindowCenter).map(Number);
    const widths = values(meta, TAG.WindowWidth).map(Number);
    const fn = (text(meta, TAG.VOILUTFunction) || "LINEAR").toUpperCase().replace("-", "_");
    const windowed = centers.length && widths.length && Number.isFinite(centers[0]) && Number.isFinite(widths[0])
      && widths[0] >= (fn === "LINEAR" ? 1 : Number.MIN_VALUE);
    return {
      rows: number(meta, TAG.Rows, 0), cols: number(meta, TAG.Columns, 0), bitsAllocated,
      bitsStored: number(meta, TAG.BitsStored, bitsAllocated),
      signed: number(meta, TAG.PixelRepresentation, 0) === 1,
      samples: number(meta, TAG.SamplesPerPixel, 1),
      photometric: text(meta, TAG.Photometric) || "MONOCHROME2",
      slope: number(meta, TAG.RescaleSlope, 1), intercept: number(meta, TAG.RescaleIntercept, 0),
      window: windowed ? { center: centers[0], width: widths[0],
                           fn: ["LINEAR", "LINEAR_EXACT", "SIGMOID"].includes(fn) ? fn : "LINEAR" } : null,
    };
  }

  function usable(px) {
    return px.rows > 0 && px.cols > 0 && px.samples === 1 && (px.bitsAllocated === 8 || px.bitsAllocated === 16)
      && px.bitsStored >= 1 && px.bitsStored <= px.bitsAllocated
      && (px.photometric === "MONOCHROME1" || px.photometric === "MONOCHROME2");
  }

  // The stored value (PS3.5 8.1.1: Bits Stored low bits, two's complement if signed) of a cell.
  function storedOf(px) {
    const mask = px.bitsStored >= 32 ? 0xffffffff : (1 << px.bitsStored) - 1;
    const sign = 1 << (px.bitsStored - 1);
    return (cell) => {
      const v = cell & mask;
      return px.signed && (v & sign) ? v - (mask + 1) : v;
    };
  }

  // PS3.3 C.11.2.1.2.1 (LINEAR), C.11.2.1.3.1 (LINEAR_EXACT), C.11.2.1.3.2 (SIGMOID), 0..255.
  function voi(x, w) {
    const c = w.center, width = w.width;
    if (w.fn === "SIGMOID") return 255 / (1 + Math.exp(-4 * (x - c) / width));
    if (w.fn === "LINEAR_EXACT") {
      if (x <= c - width / 2) return 0;
      if (x > c + width / 2) return 255;
      return ((x - c) / width + 0.5) * 255;
    }
    if (x <= c - 0.5 - (width - 1) / 2) return 0;
    if (x > c - 0.5 + (width - 1) / 2) return 255;
    return ((x - (c - 0.5)) / (width - 1) + 0.5) * 255;
  }

  const viewer = {
    canvas: null, ctx: null, source: null, px: null, cells: null, lut: null, range: null,
    window: null, view: { scale: 1, tx: 0, ty: 0 }, mode: null, item: null, blobs: [],
    timing: null, drawn: 0, pending: false, renderedTimer: 0, cursor: null, signal: null,
    waiters: [], shownWindow: null, renderedSequence: 0, renderMs: null,

    // Resolves once the current image is on the canvas (after a scheduled render, if any).
    painted() {
      if (this.canvas.dataset.state === "drawn" && !this.pending) return Promise.resolve();
      return new Promise((resolve) => this.waiters.push(resolve));
    },

    init() {
      this.canvas = $("view");
      this.ctx = this.canvas.getContext("2d");
      this.source = document.createElement("canvas");
      new ResizeObserver(() => this.resize()).observe($("canvas-box"));
      this.bindPointer();
      $("wc").addEventListener("change", () => this.fromInputs());
      $("ww").addEventListener("change", () => this.fromInputs());
      $("reset").addEventListener("click", () => this.reset());
      $("fit").addEventListener("click", () => this.fit());
      $("one").addEventListener("click", () => this.zoomTo(1));
      $("server-render").addEventListener("change", () => {
        if (!this.item) return;
        select(this.item, leaving.signal, performance.now()).catch((error) => {
          if (error.name !== "AbortError") status(error.message, true);
        });
      });
    },

    close() {
      this.px = this.cells = this.lut = this.item = this.mode = this.timing = this.shownWindow = null;
      this.canvas.dataset.state = "empty";
      for (const url of this.blobs) URL.revokeObjectURL(url);
      this.blobs = [];
      $("badge").textContent = "";
      $("badge").className = "badge";
      $("overlay").textContent = "";
      this.paint();
    },

    async open(item, signal) {
      this.canvas.dataset.state = "loading";
      this.item = item;
      this.signal = signal;
      const px = pixelModule(item.meta);
      this.px = px;
      this.cells = null;
      this.mode = "frames";
      if (usable(px) && !$("server-render").checked) {
        try {
          this.cells = await this.frame(item, px, signal);
        } catch (error) {
          if (error.name === "AbortError") throw error;
          console.warn("frames unusable, showing /rendered:", error.message);
        }
      }
      if (this.item !== item) return;
      if (this.cells) {
        this.range = this.valueRange();
        this.source.width = px.cols;
        this.source.height = px.rows;
        this.window = this.defaultWindow();
        this.fit(false);
        this.render();
      } else {
        this.mode = "rendered";
        this.window = px.window;
        await this.fetchRendered(signal);
        this.fit();
      }
      this.showWindow();
    },

    async frame(item, px, signal) {
      const response = await api(`${item.base}/frames/1`, 'multipart/related; type="application/octet-stream"', signal);
      const contentType = response.headers.get("Content-Type") || "";
      const bytes = new Uint8Array(await response.arrayBuffer());
      let part = { type: contentType, body: bytes };
      if (/^multipart\//i.test(contentType)) part = firstPart(bytes, contentType);
      const syntax = /transfer-syntax="?([0-9.]+)"?/i.exec(part.type);
      if (syntax && syntax[1] !== EXPLICIT_LE) throw new Error(`frame in transfer syntax ${syntax[1]}`);
      const size = px.rows * px.cols * (px.bitsAllocated / 8);
      if (part.body.length < size) throw new Error(`frame has ${part.body.length} bytes, ${size} expected`);
      const copy = part.body.slice(0, size); // aligned copy of the cells
      return px.bitsAllocated === 16 ? new Uint16Array(copy.buffer) : copy;
    },

    // Lowest and highest rescaled value in the image.
    valueRange() {
      const cells = this.cells, stored = storedOf(this.px);
      const seen = new Uint8Array(this.px.bitsAllocated === 16 ? 65536 : 256);
      for (let i = 0; i < cells.length; i++) seen[cells[i]] = 1;
      let low = Infinity, high = -Infinity;
      for (let cell = 0; cell < seen.length; cell++) {
        if (!seen[cell]) continue;
        const v = stored(cell) * this.px.slope + this.px.intercept;
        if (v < low) low = v;
        if (v > high) high = v;
      }
      return { low, high };
    },

    defaultWindow() {
      if (!this.px) return null;
      if (this.px.window) return { ...this.px.window };
      if (!this.range) return null;
      const width = Math.max(this.range.high - this.range.low, 1);
      return { center: this.range.low + width / 2, width, fn: "LINEAR_EXACT" };
    },

    // The image's own window (or none, for the server to choose), fitted to the view.
    reset() {
      if (!this.px) return;
      if (this.mode === "rendered") {
        this.window = this.px.window ? { ...this.px.window } : null;
        this.showWindow();
        this.scheduleRendered();
      } else {
        this.setWindow(this.defaultWindow());
      }
      this.fit();
    },

    setWindow(w) {
      if (!w || !Number.isFinite(w.center) || !Number.isFinite(w.width)) return;
      const least = w.fn === "LINEAR" ? 1 : 1e-6;
      this.window = { center: w.center, width: Math.max(w.width, least), fn: w.fn || "LINEAR" };
      this.showWindow();
      if (this.mode === "rendered") this.scheduleRendered(); else this.render();
    },

    fromInputs() {
      const center = Number($("wc").value), width = Number($("ww").value);
      if ($("wc").value === "" || $("ww").value === "" || !Number.isFinite(center) || !(width > 0)) return;
      this.setWindow({ center, width, fn: this.window ? this.window.fn : "LINEAR" });
    },

    showWindow() {
      const w = this.window;
      $("wc").value = w ? String(+w.center.toFixed(2)) : "";
      $("ww").value = w ? String(+w.width.toFixed(2)) : "";
      this.overlay();
    },

    // Windowed 8-bit image of the cells into the source canvas, via one lookup table.
    render() {
      if (!this.cells || this.pending) return;
      this.pending = true;
      requestAnimationFrame(() => {
        this.pending = false;
        if (!this.cells) return;
        const started = performance.now();
        const px = this.px, w = this.window, stored = storedOf(px);
        const invert = px.photometric === "MONOCHROME1";
        const size = px.bitsAllocated === 16 ? 65536 : 256;
        const lut = this.lut && this.lut.length === size ? this.lut : new Uint32Array(size);
        for (let cell = 0; cell < size; cell++) {
          let g = Math.round(voi(stored(cell) * px.slope + px.intercept, w));
          if (invert) g = 255 - g;
          lut[cell] = 0xff000000 | (g << 16) | (g << 8) | g;
        }
        this.lut = lut;
        const image = new ImageData(px.cols, px.rows);
        const out = new Uint32Array(image.data.buffer);
        const cells = this.cells;
        for (let i = 0; i < cells.length; i++) out[i] = lut[cells[i]];
        this.source.getContext("2d").putImageData(image, 0, 0);
        this.shownWindow = { ...w };
        this.paint();
        this.renderMs = performance.now() - started;
      });
    },

    scheduleRendered() {
      clearTimeout(this.renderedTimer);
      this.renderedTimer = setTimeout(() => {
        this.fetchRendered(this.signal).catch((error) => {
          if (error.name !== "AbortError") status(error.message, true);
        });
      }, 250);
    },

    async fetchRendered(signal) {
      const item = this.item;
      const sequence = ++this.renderedSequence;
      const w = this.window;
      const fn = w ? { LINEAR: "linear", LINEAR_EXACT: "linear-exact", SIGMOID: "sigmoid" }[w.fn] : "";
      const query = w ? `?window=${w.center},${w.width},${fn}` : "";
      const response = await api(`${item.base}/rendered${query}`, "image/png", signal);
      const bitmap = await createImageBitmap(await response.blob());
      if (this.item !== item || sequence !== this.renderedSequence) return; // a later one is coming
      this.source.width = bitmap.width;
      this.source.height = bitmap.height;
      this.source.getContext("2d").drawImage(bitmap, 0, 0);
      this.px = { ...this.px, rows: bitmap.height, cols: bitmap.width };
      this.shownWindow = w ? { ...w } : null;
      this.paint();
    },

    resize() {
      const box = $("canvas-box");
      const dpr = window.devicePixelRatio || 1;
      const width = Math.max(1, Math.round(box.clientWidth * dpr));
      const height = Math.max(1, Math.round(box.clientHeight * dpr));
      if (this.canvas.width === width && this.canvas.height === height) return;
      this.canvas.width = width;
      this.canvas.height = height;
      if (this.item && this.view.fitted) this.fit(); else this.paint();
    },

    fit(paint = true) {
      if (!this.px) return;
      const scale = Math.min(this.canvas.width / this.px.cols, this.canvas.height / this.px.rows);
      this.view = { scale, tx: (this.canvas.width - this.px.cols * scale) / 2,
                    ty: (this.canvas.height - this.px.rows * scale) / 2, fitted: true };
      if (paint) this.paint(); else this.overlay();
    },

    zoomTo(scale, x = this.canvas.width / 2, y = this.canvas.height / 2) {
      if (!this.px) return;
      const s = Math.min(Math.max(scale, 0.02), 40);
      const f = s / this.view.scale;
      this.view = { scale: s, tx: x - (x - this.view.tx) * f, ty: y - (y - this.view.ty) * f, fitted: false };
      this.paint();
    },

    paint() {
      const ctx = this.ctx;
      ctx.setTransform(1, 0, 0, 1, 0, 0);
      ctx.fillStyle = "#000";
      ctx.fillRect(0, 0, this.canvas.width, this.canvas.height);
      if (!this.px || (this.mode === "frames" && !this.cells) || !this.source.width) return;
      const v = this.view;
      ctx.imageSmoothingEnabled = v.scale < 1;
      ctx.imageSmoothingQuality = "high";
      ctx.setTransform(v.scale, 0, 0, v.scale, v.tx, v.ty);
      ctx.drawImage(this.source, 0, 0);
      ctx.setTransform(1, 0, 0, 1, 0, 0);
      this.drawn += 1;
      this.canvas.dataset.state = "drawn";
      this.canvas.dataset.draws = String(this.drawn);
      this.overlay();
      for (const resolve of this.waiters.splice(0)) resolve();
    },

    overlay() {
      if (!this.px) { $("overlay").textContent = ""; return; }
      const w = this.window;
      const lines = [`${this.px.cols} \u00d7 ${this.px.rows}  zoom ${Math.round(this.view.scale * 100)}%`];
      if (w) lines.push(`C ${+w.center.toFixed(1)}  W ${+w.width.toFixed(1)}  ${w.fn.toLowerCase()}`);
      if (this.cursor) lines.push(this.cursor);
      lines.push(this.mode === "rendered" ? "server-rendered" : `${this.px.photometric}`);
      $("overlay").textContent = lines.join("\n");
    },

    probe(event) {
      if (!this.cells) return;
      const rect = this.canvas.getBoundingClientRect();
      const dpr = this.canvas.width / rect.width;
      const x = Math.floor(((event.clientX - rect.left) * dpr - this.view.tx) / this.view.scale);
      const y = Math.floor(((event.clientY - rect.top) * dpr - this.view.ty) / this.view.scale);
      if (x < 0 || y < 0 || x >= this.px.cols || y >= this.px.rows) { this.cursor = null; }
      else {
        const v = storedOf(this.px)(this.cells[y * this.px.cols + x]) * this.px.slope + this.px.intercept;
        this.cursor = `(${x}, ${y}) = ${+v.toFixed(2)}`;
      }
      this.overlay();
    },

    bindPointer() {
      const canvas = this.canvas;
      let drag = null;
      canvas.addEventListener("contextmenu", (event) => event.preventDefault());
      canvas.addEventListener("pointerdown", (event) => {
        if (!this.px) return;
        const windowing = event.button === 2 || (event.button === 0 && event.shiftKey);
        if (event.button !== 0 && !windowing) return;
        drag = { windowing, x: event.clientX, y: event.clientY, view: { ...this.view },
                 window: this.window ? { ...this.window } : null };
        canvas.setPointerCapture(event.pointerId);
        canvas.classList.add(windowing ? "windowing" : "dragging");
        event.preventDefault();
      });
      canvas.addEventListener("pointermove", (event) => {
        this.probe(event);
        if (!drag) return;
        const dx = event.clientX - drag.x, dy = event.clientY - drag.y;
        if (drag.windowing) {
          if (!drag.window) return;
          const span = this.range ? Math.max(this.range.high - this.range.low, 1) : Math.max(drag.window.width, 256);
          const perPixel = span / 400;
          this.setWindow({ center: drag.window.center + dy * perPixel,
                           width: drag.window.width + dx * perPixel, fn: drag.window.fn });
        } else {
          const dpr = canvas.width / canvas.getBoundingClientRect().width;
          this.view = { ...drag.view, tx: drag.view.tx + dx * dpr, ty: drag.view.ty + dy * dpr, fitted: false };
          this.paint();
        }
      });
      const end = (event) => {
        if (!drag) return;
        drag = null;
        canvas.classList.remove("windowing", "dragging");
        if (canvas.hasPointerCapture(event.pointerId)) canvas.releasePointerCapture(event.pointerId);
      };
      canvas.addEventListener("pointerup", end);
      canvas.addEventListener("pointercancel", end);
      canvas.addEventListener("wheel", (event) => {
        if (!this.px) return;
        event.preventDefault();
        const rect = canvas.getBoundingClientRect();
        const dpr = canvas.width / rect.width;
        const delta = event.deltaMode === 1 ? event.deltaY * 40 : event.deltaY;
        this.zoomTo(this.view.scale * Math.exp(-delta * 0.0015),
                    (event.clientX - rect.left) * dpr, (event.clientY - rect.top) * dpr);
      }, { passive: false });
      canvas.addEventListener("dblclick", () => this.fit());
    },
  };

  // What the page shows, for scripts and tests (no patient data: geometry and window only).
  window.latentpacsViewer = {
    state() {
      return {
        mode: viewer.mode, sop: viewer.item ? viewer.item.sop : null,
        rows: viewer.px ? viewer.px.rows : 0, cols: viewer.px ? viewer.px.cols : 0,
        window: viewer.window, shown: viewer.shownWindow, view: { ...viewer.view }, draws: viewer.drawn,
        timing: viewer.timing, renderMs: viewer.renderMs,
        canvas: { width: viewer.canvas.width, height: viewer.canvas.height },
      };
    },
  };

  // ---------------------------------------------------------------- wiring
  document.addEventListener("DOMContentLoaded", () => {
    viewer.init();
    showWho();
    $("forget").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      showWho();
      route();
    });
    $("search").addEventListener("submit", (event) => {
      event.preventDefault();
      list.filter = { PatientName: $("q-name").value.trim(), PatientID: $("q-id").value.trim(),
                      StudyDate: $("q-date").value.trim() };
      list.offset = 0;
      if (location.hash && location.hash !== "#/") location.hash = "#/"; else route();
    });
    $("prev").addEventListener("click", () => { list.offset = Math.max(0, list.offset - PAGE); route(); });
    $("next").addEventListener("click", () => { list.offset += PAGE; route(); });
    window.addEventListener("hashchange", route);
    route();
  });
})();
