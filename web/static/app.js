// lorafold pages: the merge form's adapter look-up and the live job page. No inline scripts (the CSP forbids them).
"use strict";

(function () {
  function $(id) { return document.getElementById(id); }

  function formatBytes(n) {
    if (n === null || n === undefined) return "–";
    var units = ["Bytes", "kB", "MB", "GB", "TB"];
    var i = 0;
    while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
    return (i === 0 ? String(n) : n.toFixed(1)) + " " + units[i];
  }

  function formatSeconds(s) {
    if (s === null || s === undefined) return "–";
    s = Math.round(s);
    if (s < 60) return s + " s";
    var m = Math.floor(s / 60);
    if (m < 60) return m + " min " + (s % 60) + " s";
    return Math.floor(m / 60) + " h " + (m % 60) + " min";
  }

  function formatSeconds1(s) {
    if (s === null || s === undefined) return "–";
    return s < 59.95 ? s.toFixed(1) + " s" : formatSeconds(s);
  }

  // --- the merge form ------------------------------------------------------------------------------------------
  // Each problem is shown once, under its field: the live checks replace the server's messages for a field rather
  // than repeating them in a second place.
  function setFieldError(name, message) {
    var input = $(name === "private" ? "private" : name);
    if (!input) input = $("adapter");
    var box = input.closest(".field") || input.parentNode;
    box.querySelectorAll(".field-error").forEach(function (p) { p.remove(); });
    if (!message) {
      box.classList.remove("has-error");
      input.removeAttribute("aria-invalid");
      return;
    }
    var p = document.createElement("p");
    p.className = "field-error";
    p.id = input.id + "-error";
    p.textContent = message;  // text, never HTML
    box.appendChild(p);
    box.classList.add("has-error");
    input.setAttribute("aria-invalid", "true");
    input.setAttribute("aria-describedby", p.id);
  }

  function clearFieldErrors(form) {
    form.querySelectorAll(".field-error").forEach(function (p) {
      var box = p.closest(".field");
      if (box) { box.classList.remove("has-error"); var i = box.querySelector("[aria-invalid]"); if (i) i.removeAttribute("aria-invalid"); }
      p.remove();
    });
  }

  function initMergeForm(form) {
    var adapter = $("adapter"), revision = $("adapter_revision"), base = $("base"), target = $("target");
    var priv = $("private"), status = $("adapter-status"), panel = $("preview");
    var auto = { base: base.value === "", target: target.value === "", private: $("private_auto").value === "1" };
    base.addEventListener("input", function () { auto.base = base.value === ""; });
    target.addEventListener("input", function () { auto.target = target.value === ""; });
    priv.addEventListener("change", function () {
      auto.private = false;
      $("private_auto").value = "0";  // the user chose: unticked now means public
      setText("private-hint", "");
    });
    var timer = null, seq = 0, ptimer = null, pseq = 0;
    var hadServerErrors = !!form.querySelector(".field-error");

    function setText(id, text) { var el = $(id); if (el) el.textContent = text; }

    function getJSON(url) {
      return fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
        .then(function (r) { return r.json().then(function (body) { return { ok: r.ok, body: body }; }); });
    }

    function lookup() {
      var value = adapter.value.trim();
      if (!/^[^\/\s]+\/[^\/\s]+$/.test(value)) { status.textContent = ""; return; }
      var mine = ++seq;
      status.textContent = "Reading " + value + "/adapter_config.json…";
      getJSON(form.dataset.infoUrl + "?adapter=" + encodeURIComponent(value) +
              "&revision=" + encodeURIComponent(revision.value.trim()))
        .then(function (res) {
          if (mine !== seq) return;
          if (!res.ok) {
            status.textContent = "";
            var e = res.body.error || {};
            setFieldError(e.field === "adapter_revision" ? "adapter_revision" : "adapter", e.message || "cannot read this adapter");
            return;
          }
          setFieldError("adapter", "");
          var info = res.body;
          status.textContent = "LoRA adapter (r=" + info.r + ") at " + info.sha.slice(0, 12) +
                               (info.base ? ", base " + info.base : ", no base named in its config");
          if (auto.base && info.base) base.value = info.base;
          if (auto.target) target.value = info.target;
          if (auto.private && info.private) {
            priv.checked = true;
            setText("private-hint", "Ticked because " + value + " is private; untick to publish publicly.");
          }
          schedulePreview();
        })
        .catch(function () { if (mine === seq) status.textContent = ""; });
    }

    function previewUrl() {
      var q = ["adapter", "adapter_revision", "base", "base_revision", "target", "dtype"].map(function (n) {
        return n + "=" + encodeURIComponent(($(n).value || "").trim());
      });
      q.push("private=" + (priv.checked ? "1" : ($("private_auto").value === "1" ? "" : "0")));
      q.push("overwrite=" + ($("overwrite").checked ? "1" : "0"));
      q.push("create_pr=" + ($("create_pr").checked ? "1" : "0"));
      q.push("from_quantized=" + encodeURIComponent($("from_quantized").value));
      q.push("keep_quantization=" + ($("keep_quantization").checked ? "1" : "0"));
      q.push("formats=" + encodeURIComponent(($("formats") || {}).value || "safetensors"));
      q.push("gguf_outtype=" + encodeURIComponent(($("gguf_outtype") || {}).value || "f16"));
      return form.dataset.previewUrl + "?" + q.join("&");
    }

    function preview() {
      if (!adapter.value.trim() || !target.value.trim()) return;
      var mine = ++pseq;
      panel.hidden = false;
      panel.classList.add("busy");
      setText("pv-state", "Checking against the Hub (headers and shapes)…");
      getJSON(previewUrl()).then(function (res) {
        if (mine !== pseq) return;
        panel.classList.remove("busy");
        clearFieldErrors(form);
        if (!res.ok || !res.body.ok) {
          (res.body.errors || [{ field: "adapter", message: (res.body.error && res.body.error.message) || "cannot check this request" }])
            .forEach(function (e) { setFieldError(e.field, e.message); });
          setText("pv-state", "Fix the fields marked above before queueing.");
          $("pv-facts").hidden = true;
          return;
        }
        var p = res.body.preview;
        setText("pv-state", p.shapes_checked ? "The base fits the adapter (every LoRA pair checked against its headers)."
                                              : "The base is readable; its shapes will be checked by the worker.");
        setText("pv-size", p.size_bytes ? formatBytes(p.size_bytes) + " in " + p.shards + (p.shards === 1 ? " file" : " files") : "–");
        setText("pv-tensors", p.tensors_changed !== null ? p.tensors_changed + " of " + p.tensors + " tensors change" : "–");
        setText("pv-time", p.estimate_seconds !== null ? "about " + formatSeconds1(p.estimate_seconds) + " of merging" : "no estimate yet (no finished jobs on this service)");
        setText("pv-queue", p.jobs_ahead ? p.jobs_ahead + (p.jobs_ahead === 1 ? " job" : " jobs") + " ahead" : "none ahead");
        setText("pv-private", p.private ? "private" : "public");
        setText("pv-card", p.card || "");
        setText("pv-quant", p.base_quantization || "");  // a quantized base: its original, dequantized or FP8 kept
        $("pv-quant").hidden = $("pv-quant-label").hidden = !p.base_quantization;
        setText("pv-gguf", p.gguf ? p.gguf.files.join(", ") + ", " + p.gguf.type + ", about " + formatBytes(p.gguf.size_bytes) : "");
        $("pv-gguf").hidden = $("pv-gguf-label").hidden = !p.gguf;  // GGUF asked: the files the worker will write
        $("pv-facts").hidden = false;
      }).catch(function () { if (mine === pseq) { panel.classList.remove("busy"); setText("pv-state", ""); } });
    }

    function schedulePreview() { clearTimeout(ptimer); ptimer = setTimeout(preview, 500); }
    function schedule() { clearTimeout(timer); timer = setTimeout(lookup, 350); }
    adapter.addEventListener("input", function () { setFieldError("adapter", ""); schedule(); });
    adapter.addEventListener("change", lookup);
    revision.addEventListener("change", lookup);
    ["base", "base_revision", "target", "dtype", "overwrite", "create_pr", "private", "from_quantized",
     "keep_quantization", "formats", "gguf_outtype"].forEach(function (n) {
      $(n).addEventListener("change", schedulePreview);
    });
    // After a refused submit the server's messages are already under their fields: do not say them twice.
    if (adapter.value && !hadServerErrors && (auto.base || auto.target)) lookup();

    var list = $("my-adapters");
    if (list && form.dataset.adaptersUrl) {
      getJSON(form.dataset.adaptersUrl).then(function (res) {
        if (!res.ok) return;
        (res.body.adapters || []).forEach(function (id) {
          var o = document.createElement("option");
          o.value = id;
          list.appendChild(o);
        });
      }).catch(function () {});
    }
  }

  // --- the merge page's recipe mode -----------------------------------------------------------------------------
  // The method picker shows the parameters that method takes; "Add an input" clones a row; "Check and preview"
  // asks the server for the whole check (the same as queueing does) and shows the normalised recipe, every input
  // with the commit it resolves to, and the card. Errors are one line each, in one list above the form.
  function initRecipeForm(form) {
    var method = $("method"), rows = $("recipe-rows"), add = $("add-row"), panel = $("preview");
    var MAX_ROWS = 16, pseq = 0;

    function setText(id, text) { var el = $(id); if (el) el.textContent = text; }

    function showMethod() {
      form.querySelectorAll("[data-methods]").forEach(function (el) {
        el.hidden = el.dataset.methods.split(" ").indexOf(method.value) < 0;
      });
    }

    function showErrors(errors) {
      var list = $("recipe-errors");
      while (list.firstChild) list.removeChild(list.firstChild);
      (errors || []).forEach(function (e) {
        var li = document.createElement("li");
        li.className = "error";
        li.textContent = e.message;  // text, never HTML
        list.appendChild(li);
      });
      list.hidden = !(errors && errors.length);
    }

    function addRow() {
      var body = rows.tBodies[0], last = body.rows[body.rows.length - 1];
      if (body.rows.length >= MAX_ROWS) return;
      var row = last.cloneNode(true), n = body.rows.length;
      row.querySelectorAll("input").forEach(function (input) {
        input.name = input.name.replace(/rows-\d+-/, "rows-" + n + "-");
        input.id = input.name;
        input.value = "";
        input.setAttribute("aria-label", input.getAttribute("aria-label").replace(/\d+$/, String(n + 1)));
      });
      body.appendChild(row);
      add.hidden = body.rows.length >= MAX_ROWS;
    }

    function preview(ev) {
      if (ev) ev.preventDefault();
      var mine = ++pseq;
      panel.hidden = false;
      panel.classList.add("busy");
      setText("pv-state", "Checking every input against the Hub (headers and shapes)…");
      $("pv-facts").hidden = true;
      var data = new URLSearchParams(new FormData(form));
      fetch(form.dataset.previewUrl, { method: "POST", body: data, credentials: "same-origin",
                                       headers: { "Accept": "application/json" } })
        .then(function (r) { return r.json(); })
        .then(function (body) {
          if (mine !== pseq) return;
          panel.classList.remove("busy");
          if (!body.ok) {
            showErrors(body.errors || [{ message: (body.error && body.error.message) || "cannot check this recipe" }]);
            setText("pv-state", "Fix the problems listed above before queueing.");
            return;
          }
          showErrors([]);
          var p = body.preview, list = $("pv-inputs");
          setText("pv-state", p.shapes_checked ? "Every input fits (tensors and shapes checked against their headers)."
                                                : "Every input is readable; some shapes will be checked by the worker.");
          while (list.firstChild) list.removeChild(list.firstChild);
          p.inputs.forEach(function (i) {
            var li = document.createElement("li");
            li.textContent = i.role + " " + i.repo + " at " + i.sha.slice(0, 12) + (i.private ? " (private)" : "");
            list.appendChild(li);
          });
          setText("pv-size", p.size_bytes ? formatBytes(p.size_bytes) + " in " + p.shards + (p.shards === 1 ? " file" : " files") : "–");
          setText("pv-queue", p.jobs_ahead ? p.jobs_ahead + (p.jobs_ahead === 1 ? " job" : " jobs") + " ahead" : "none ahead");
          setText("pv-private", p.private ? "private" : "public");
          setText("pv-recipe", p.recipe || "");
          setText("pv-card", p.card || "");
          $("pv-facts").hidden = false;
        })
        .catch(function () { if (mine === pseq) { panel.classList.remove("busy"); setText("pv-state", ""); } });
    }

    method.addEventListener("change", showMethod);
    add.hidden = false;
    add.addEventListener("click", addRow);
    $("preview-recipe").addEventListener("click", preview);
    $("private").addEventListener("change", function () { $("private_auto").value = "0"; });
    showMethod();
  }

  // --- confirmations and copy buttons (no inline scripts: the CSP forbids them) -------------------------------
  function initConfirmations() {
    document.querySelectorAll("form[data-confirm]").forEach(function (f) {
      f.addEventListener("submit", function (ev) {
        if (!window.confirm(f.dataset.confirm)) ev.preventDefault();
      });
    });
    document.querySelectorAll("button[data-copy]").forEach(function (b) {
      b.hidden = false;
      b.addEventListener("click", function () {
        var src = $(b.dataset.copy);
        var text = src ? src.textContent : "";
        var done = function () { var old = b.textContent; b.textContent = "Copied"; setTimeout(function () { b.textContent = old; }, 1500); };
        if (navigator.clipboard && window.isSecureContext) {
          navigator.clipboard.writeText(text).then(done, function () { selectText(src); });
        } else {
          selectText(src);
          try { if (document.execCommand("copy")) done(); } catch (e) { /* selected: the user copies */ }
        }
      });
    });
  }

  function selectText(el) {
    if (!el) return;
    var range = document.createRange();
    range.selectNodeContents(el);
    var sel = window.getSelection();
    sel.removeAllRanges();
    sel.addRange(range);
  }

  // --- the job page --------------------------------------------------------------------------------------------
  var TERMINAL = { succeeded: 1, failed: 1, cancelled: 1, skipped: 1 };

  function initJobPage(root) {
    var url = root.dataset.liveUrl;
    var lastLog = parseInt(root.dataset.lastLog || "0", 10);
    var lastSample = 0;
    var samples = [];
    var peakRss = 0;
    var jobSeconds = null;

    function setText(id, text) { var el = $(id); if (el && el.textContent !== text) el.textContent = text; }

    function render(data) {
      var job = data.job, p = job.progress;
      var pct = job.status === "succeeded" ? 100 :
                p.bytes_total ? 100 * p.bytes_done / p.bytes_total : (p.total ? 100 * p.done / p.total : 0);
      pct = Math.round(pct * 10) / 10;
      $("progress").value = pct;
      setText("pct", pct + "%");
      $("counts").hidden = !p.total;  // nothing planned yet (or it failed before): no "0 / 0" to read
      setText("tensors", p.done + " / " + p.total);
      setText("bytes", formatBytes(p.bytes_done) + " / " + formatBytes(p.bytes_total));
      setText("state", data.state);
      $("eta-block").hidden = job.status !== "running";
      setText("eta", formatSeconds(p.eta_seconds));
      setText("attempts", String(job.attempts));
      var status = $("status");
      status.textContent = job.status;
      status.className = "badge status-" + job.status;
      root.dataset.status = job.status;
      var err = $("error");
      err.hidden = !job.error;
      setText("error", job.error || "");
      if (job.result && job.result.url) {
        $("result").hidden = false;
        $("result-link").href = job.result.url;
        setText("result-link", job.result.repo || "");
        setText("result-commit", (job.result.commit || "").slice(0, 12));
        // the repo's commit page (result.url is the pull request's page when the merge was proposed as one)
        if (job.result.commit) $("result-commit-link").href = root.dataset.hubUrl + job.result.repo + "/commit/" + job.result.commit;
      }
      if (job.adapter_sha) setText("adapter-sha", job.adapter_sha.slice(0, 12));
      var gguf = $("job-gguf-files");
      if (gguf && job.gguf_files && job.gguf_files.length && !gguf.children.length) {  // published: name, type, size
        job.gguf_files.forEach(function (f) {
          var li = document.createElement("li"), code = document.createElement("code");
          code.textContent = f.name;
          li.appendChild(code);
          li.appendChild(document.createTextNode(" " + f.type + ", " + formatBytes(f.size)));
          gguf.appendChild(li);
        });
      }
      if (job.base_quantization) {  // the worker's word on a quantized base: original, dequantized or FP8 kept
        setText("base-quant", job.base_quantization);
        $("base-quant").hidden = $("base-quant-label").hidden = false;
      }
      var s = job.stats;
      setText("stat-rss", s.peak_rss_bytes ? formatBytes(s.peak_rss_bytes) : "–");
      setText("stat-vram", s.peak_vram_bytes ? formatBytes(s.peak_vram_bytes) : "–");
      if (s.peak_vram_bytes) { $("stat-vram").hidden = false; $("stat-vram-label").hidden = false; $("vram-key").hidden = false; }
      peakRss = s.peak_rss_bytes || 0;
      jobSeconds = s.seconds;
      renderTimes(data.times);
      setText("stat-read", s.bytes_read ? formatBytes(s.bytes_read) : "–");
      setText("stat-written", s.bytes_written ? formatBytes(s.bytes_written) : "–");
      $("cancel-form").hidden = !!TERMINAL[job.status];
      $("retry-form").hidden = !data.retry.offer;
      $("again-link").hidden = !(job.status === "failed" && !data.retry.offer);
      $("retry-note").hidden = !data.retry.note;
      setText("retry-note", data.retry.note);
      appendLogs(data.logs);
      if (data.samples.length) {
        samples = samples.concat(data.samples);
        lastSample = data.samples[data.samples.length - 1].id;
      }
      if (samples.length) drawChart(TERMINAL[job.status]);
      else if (TERMINAL[job.status]) {
        setText("chart-note", "the job ended before the first memory sample");
        $("memchart").setAttribute("hidden", "");  // an empty frame says nothing
      }
    }

    function renderTimes(times) {
      var dl = $("times");
      if (!dl || !times) return;
      var key = times.map(function (t) { return t.id + "=" + t.text; }).join("|");
      if (dl.dataset.key === key) return;
      dl.dataset.key = key;
      while (dl.firstChild) dl.removeChild(dl.firstChild);
      times.forEach(function (t) {
        var dt = document.createElement("dt"), dd = document.createElement("dd");
        dt.textContent = t.label;
        dd.id = t.id;
        if (t.iso) {
          var el = document.createElement("time");
          el.setAttribute("datetime", t.iso);
          el.textContent = t.text;
          dd.appendChild(el);
        } else {
          dd.textContent = t.text;
        }
        dl.appendChild(dt); dl.appendChild(dd);
      });
    }

    function appendLogs(lines) {
      if (!lines.length) return;
      var log = $("log");
      var stick = log.scrollTop + log.clientHeight >= log.scrollHeight - 8;
      lines.forEach(function (line) {
        if (line.id <= lastLog) return;
        var li = document.createElement("li");
        li.className = "lvl-" + line.level;
        var t = document.createElement("time");
        t.textContent = (line.at || "").slice(11, 19);
        li.appendChild(t);
        li.appendChild(document.createTextNode(" " + line.message));  // text, never HTML
        log.appendChild(li);
        lastLog = line.id;
      });
      while (log.children.length > 500) log.removeChild(log.firstChild);
      if (stick) log.scrollTop = log.scrollHeight;
    }

    // The chart starts at 0 bytes and 0 s, so a short job's few samples still read as "how much, and when".
    // Every sample is a dot (a 2 s job has two or three); the dashed line is the peak the worker measured,
    // which can fall between samples.
    function drawChart(finished) {
      var W = 600, H = 220, top = 20, bottom = 14;
      // the time axis spans the whole merge when it is known, so a short job's one or two samples sit where
      // they were taken within it rather than at the right edge
      var tMax = Math.max(samples[samples.length - 1].t, jobSeconds || 0);
      tMax = tMax > 0 ? tMax * 1.05 : 1;
      var top1 = 0;
      samples.forEach(function (s) { top1 = Math.max(top1, s.rss); });
      var peakShown = Math.max(peakRss, top1);  // the worker's peak is sampled more often than the chart
      var yMax = Math.max(peakShown, 1);
      samples.forEach(function (s) { yMax = Math.max(yMax, s.vram); });
      yMax *= 1.15;
      function X(t) { return (t / tMax) * W; }
      function Y(v) { return H - bottom - (v / yMax) * (H - top - bottom); }
      var hasVram = samples.some(function (s) { return s.vram > 0; });
      function pts(key) {
        return samples.map(function (s) { return X(s.t).toFixed(1) + "," + Y(s[key]).toFixed(1); }).join(" ");
      }
      $("rss-line").setAttribute("points", pts("rss"));
      $("vram-line").setAttribute("points", hasVram ? pts("vram") : "");
      if (hasVram) $("vram-key").hidden = false;
      var dots = $("dots");
      while (dots.firstChild) dots.removeChild(dots.firstChild);
      if (samples.length <= 60) {
        samples.forEach(function (s) {
          [["rss", "rss"]].concat(hasVram ? [["vram", "vram"]] : []).forEach(function (k) {
            // a zero-length stroke with round caps: a round dot even though the chart stretches horizontally
            var c = document.createElementNS("http://www.w3.org/2000/svg", "path");
            c.setAttribute("d", "M" + X(s.t).toFixed(1) + " " + Y(s[k[0]]).toFixed(1) + "h0.01");
            c.setAttribute("class", "dot " + k[1]);
            var title = document.createElementNS("http://www.w3.org/2000/svg", "title");
            title.textContent = formatSeconds1(s.t) + ": " + formatBytes(s[k[0]]);
            c.appendChild(title);
            dots.appendChild(c);
          });
        });
      }
      var peak = $("peak-line");
      peak.setAttribute("y1", Y(peakShown).toFixed(1)); peak.setAttribute("y2", Y(peakShown).toFixed(1));
      setText("chart-max", formatBytes(Math.round(yMax)));
      setText("chart-zero", "0");
      setText("chart-time", formatSeconds1(tMax));
      setText("chart-note", samples.length + (samples.length === 1 ? " sample" : " samples") +
              ", peak RSS " + formatBytes(peakShown) + (finished ? "" : " so far"));
      var grid = $("gridlines");
      if (!grid.childNodes.length) {
        for (var i = 1; i < 4; i++) {
          var line = document.createElementNS("http://www.w3.org/2000/svg", "line");
          var y = top + i * (H - top - bottom) / 4;
          line.setAttribute("x1", "0"); line.setAttribute("x2", String(W));
          line.setAttribute("y1", String(y)); line.setAttribute("y2", String(y));
          grid.appendChild(line);
        }
      }
    }

    var finishedPolls = 0;
    function poll() {
      fetch(url + "?after=" + lastLog + "&samples_after=" + lastSample,
            { credentials: "same-origin", headers: { "Accept": "application/json" } })
        .then(function (r) { if (!r.ok) throw new Error(String(r.status)); return r.json(); })
        .then(function (data) {
          render(data);
          if (TERMINAL[data.job.status]) finishedPolls++; else finishedPolls = 0;
          if (finishedPolls < 2) setTimeout(poll, 1000);
        })
        .catch(function () { setTimeout(poll, 3000); });
    }
    poll();
  }

  document.addEventListener("DOMContentLoaded", function () {
    initConfirmations();
    var form = $("merge-form");
    if (form) initMergeForm(form);
    var recipe = $("recipe-form");
    if (recipe) initRecipeForm(recipe);
    var job = $("job");
    if (job) initJobPage(job);
  });
})();
