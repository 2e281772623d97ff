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

  // --- the merge form ------------------------------------------------------------------------------------------
  function initMergeForm(form) {
    var adapter = $("adapter"), revision = $("adapter_revision"), base = $("base"), target = $("target");
    var status = $("adapter-status");
    var auto = { base: base.value === "", target: target.value === "" };
    base.addEventListener("input", function () { auto.base = base.value === ""; });
    target.addEventListener("input", function () { auto.target = target.value === ""; });
    var timer = null, seq = 0;

    function lookup() {
      var value = adapter.value.trim();
      if (!/^[^\/\s]+\/[^\/\s]+$/.test(value)) { status.textContent = ""; return; }
      var mine = ++seq;
      status.textContent = "Reading " + value + "/adapter_config.json…";
      var url = form.dataset.infoUrl + "?adapter=" + encodeURIComponent(value) +
                "&revision=" + encodeURIComponent(revision.value.trim());
      fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
        .then(function (r) { return r.json().then(function (body) { return { ok: r.ok, body: body }; }); })
        .then(function (res) {
          if (mine !== seq) return;
          if (!res.ok) { status.textContent = (res.body.error && res.body.error.message) || "cannot read this adapter"; return; }
          var info = res.body;
          status.textContent = "LoRA adapter (r=" + info.r + ") at " + info.sha.slice(0, 12) +
                               (info.base ? ", base " + info.base : ", no base named in its config");
          if (auto.base && info.base) base.value = info.base;
          if (auto.target) target.value = info.target;
        })
        .catch(function () { if (mine === seq) status.textContent = ""; });
    }

    function schedule() { clearTimeout(timer); timer = setTimeout(lookup, 350); }
    adapter.addEventListener("input", schedule);
    adapter.addEventListener("change", lookup);
    revision.addEventListener("change", lookup);
    if (adapter.value && (auto.base || auto.target)) lookup();
  }

  // --- the job page --------------------------------------------------------------------------------------------
  var TERMINAL = { succeeded: 1, failed: 1, cancelled: 1, skipped: 1 };

  function initJobPage(root) {
    var url = root.dataset.liveUrl;
    var lastLog = parseInt(root.dataset.lastLog || "0", 10);
    var lastSample = 0;
    var samples = [];

    function setText(id, text) { var el = $(id); if (el && el.textContent !== text) el.textContent = text; }

    function render(data) {
      var job = data.job, p = job.progress;
      var pct = job.status === "succeeded" ? 100 :
                p.bytes_total ? 100 * p.bytes_done / p.bytes_total : (p.total ? 100 * p.done / p.total : 0);
      pct = Math.round(pct * 10) / 10;
      $("progress").value = pct;
      setText("pct", pct + "%");
      setText("tensors", p.done + " / " + p.total);
      setText("bytes", formatBytes(p.bytes_done) + " / " + formatBytes(p.bytes_total));
      setText("phase", job.phase || "waiting");
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
        if (job.result.commit) $("result-commit-link").href = job.result.url + "/commit/" + job.result.commit;
      }
      if (job.adapter_sha) setText("adapter-sha", job.adapter_sha.slice(0, 12));
      var s = job.stats;
      setText("stat-seconds", s.seconds === null ? "–" : s.seconds.toFixed(1));
      setText("stat-rss", s.peak_rss_bytes ? formatBytes(s.peak_rss_bytes) : "–");
      setText("stat-vram", s.peak_vram_bytes ? formatBytes(s.peak_vram_bytes) : "–");
      setText("stat-read", s.bytes_read ? formatBytes(s.bytes_read) : "–");
      setText("stat-written", s.bytes_written ? formatBytes(s.bytes_written) : "–");
      $("cancel-form").hidden = !!TERMINAL[job.status];
      $("retry-form").hidden = !data.retryable;
      appendLogs(data.logs);
      if (data.samples.length) {
        samples = samples.concat(data.samples);
        lastSample = data.samples[data.samples.length - 1].id;
        drawChart();
      }
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

    function drawChart() {
      var W = 600, H = 220, top = 20, bottom = 10;
      var tMax = Math.max(1, samples[samples.length - 1].t);
      var yMax = 1;
      samples.forEach(function (s) { yMax = Math.max(yMax, s.rss, s.vram); });
      yMax *= 1.1;
      var drawn = samples.length === 1 ? [{ t: 0, rss: samples[0].rss, vram: samples[0].vram }, samples[0]] : samples;
      function pts(key) {
        return drawn.map(function (s) {
          var x = (s.t / tMax) * W, y = H - bottom - (s[key] / yMax) * (H - top - bottom);
          return x.toFixed(1) + "," + y.toFixed(1);
        }).join(" ");
      }
      $("rss-line").setAttribute("points", pts("rss"));
      $("vram-line").setAttribute("points", samples.some(function (s) { return s.vram > 0; }) ? pts("vram") : "");
      setText("chart-max", formatBytes(Math.round(yMax)));
      setText("chart-time", formatSeconds(tMax));
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
    var form = $("merge-form");
    if (form) initMergeForm(form);
    var job = $("job");
    if (job) initJobPage(job);
  });
})();
