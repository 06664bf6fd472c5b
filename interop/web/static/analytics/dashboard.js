// Provincial analytics dashboard: filters -> JSON views -> Chart.js charts and tables.
// Each chart canvas gets data-points (how many values it draws) so tests can see it rendered.
(function () {
  "use strict";
  const L = window.LABELS;
  const charts = {};
  const colours = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];
  const $ = (id) => document.getElementById(id);

  function params() {
    const p = new URLSearchParams();
    for (const name of ["start", "end", "district", "facility", "modality", "finding"]) {
      const v = $("f-" + name).value;
      if (v) p.set(name, v);
    }
    return p;
  }
  async function get(path) {
    const r = await fetch(path + "?" + params().toString());
    if (!r.ok) throw new Error(path + ": HTTP " + r.status);
    return r.json();
  }
  function draw(id, config, points) {
    if (charts[id]) charts[id].destroy();
    // The chart fills its box (.chart sets the height), whatever the card's width.
    config.options = Object.assign({ animation: false, responsive: true, maintainAspectRatio: false }, config.options || {});
    charts[id] = new Chart($(id), config);
    $(id).dataset.points = String(points);
  }
  function table(id, columns, rows) {
    const el = $(id);
    el.innerHTML = "";
    const head = el.createTHead().insertRow();
    for (const [, title] of columns) { const th = document.createElement("th"); th.scope = "col"; th.textContent = title; head.appendChild(th); }
    const body = el.createTBody();
    if (!rows.length) { const td = body.insertRow().insertCell(); td.colSpan = columns.length; td.textContent = L.no_data; }
    for (const row of rows) {
      const tr = body.insertRow();
      for (const [key] of columns) { tr.insertCell().textContent = row[key] === null || row[key] === undefined ? "–" : row[key]; }
    }
    el.dataset.rows = String(rows.length);
  }
  function fill(select, values) {
    for (const v of values) {
      const o = document.createElement("option");
      if (typeof v === "object") { o.value = v.code; o.textContent = v.label; } else { o.value = v; o.textContent = v; }
      select.appendChild(o);
    }
  }

  async function trend() {
    const [weekly, fc] = await Promise.all([get("api/findings_weekly"), get("api/forecast")]);
    const codes = [...new Set(fc.forecasts.map((f) => f.code))];
    const weeks = [...new Set(weekly.rows.filter((r) => r.level === "province").map((r) => r.week))].sort();
    const future = [...new Set(fc.forecasts.flatMap((f) => f.forecast.map((p) => p.week)))].sort();
    const labels = weeks.concat(future.filter((w) => !weeks.includes(w)));
    const datasets = [];
    let points = 0;
    codes.forEach((code, i) => {
      const rows = weekly.rows.filter((r) => r.level === "province" && r.code === code);
      const byWeek = Object.fromEntries(rows.map((r) => [r.week, r.positives]));
      const name = (rows[0] || fc.forecasts.find((f) => f.code === code)).label;
      const observed = labels.map((w) => (w in byWeek ? byWeek[w] : (weeks.includes(w) ? 0 : null)));
      points += observed.filter((v) => v !== null).length;
      datasets.push({ label: name + " — " + L.province_total, data: observed, borderColor: colours[i], tension: 0.2, pointRadius: 0 });
      // The forecast of the province is the sum of its districts' forecasts (bands added as well: conservative).
      const sum = (key) => labels.map((w) => {
        const pts = fc.forecasts.filter((f) => f.code === code).map((f) => f.forecast.find((p) => p.week === w)).filter(Boolean);
        return pts.length ? pts.reduce((a, p) => a + p[key], 0) : null;
      });
      const mean = sum("mean"), lower = sum("lower"), upper = sum("upper");
      points += mean.filter((v) => v !== null).length;
      datasets.push({ label: name + " — " + L.interval, data: upper, borderColor: "transparent", backgroundColor: colours[i] + "33", pointRadius: 0, fill: "+1" });
      datasets.push({ label: name + " — " + L.interval + " ", data: lower, borderColor: "transparent", pointRadius: 0, fill: false });
      datasets.push({ label: name + " — " + L.forecast, data: mean, borderColor: colours[i], borderDash: [6, 4], pointRadius: 0 });
    });
    draw("chart-trend", { type: "line", data: { labels, datasets },
      options: { plugins: { legend: { labels: { filter: (item) => !item.text.endsWith(" ") } } } } }, points);
    // One line per series, folded away under the one-sentence summary.
    const list = $("forecast-method");
    list.innerHTML = "";
    for (const f of fc.forecasts) {
      const bt = f.backtest ? `${L.backtest}: MAE ${f.backtest.mae}` + (f.backtest.mape !== null ? `, MAPE ${f.backtest.mape}%` : "") + ` (${f.backtest.weeks} ${L.weeks_held_back})` : "";
      list.appendChild(document.createElement("li")).textContent = `${f.label} · ${f.district}: ${f.method}. ${bt}`;
    }
    $("forecast-method").dataset.series = String(fc.forecasts.length);
  }
  async function districts() {
    const d = await get("api/districts");
    // With a finding chosen the rate is of that finding, over the studies the AI read for it.
    const finding = $("f-finding");
    const rate = finding.value ? finding.options[finding.selectedIndex].textContent + " " + L.finding_per_1000 : L.positives_per_1000;
    // Not-analysable studies (the AI refused the images) are counted apart, outside every rate.
    table("table-districts", [["district", L.district], ["studies", L.studies], ["not_analysable", L.not_analysable],
      ["critical", L.critical],
      ["positive_findings", L.positives], ["positives_per_1000_studies", rate],
      ["critical_per_1000_studies", L.critical_per_1000]], d.rows);
  }
  async function turnaround() {
    const d = await get("api/turnaround");
    const weeks = [...new Set(d.rows.map((r) => r.week))].sort();
    const avg = (key) => weeks.map((w) => {
      const rs = d.rows.filter((r) => r.week === w && r[key] !== null);
      const n = rs.reduce((a, r) => a + r.studies, 0);
      return n ? Math.round(rs.reduce((a, r) => a + r[key] * r.studies, 0) / n) : null;
    });
    const datasets = [];
    ["order_to_ai", "ai_to_reviewed", "reviewed_to_delivered"].forEach((k, i) => {
      datasets.push({ label: L[k] + " p50", data: avg(k + "_p50"), borderColor: colours[i], pointRadius: 0 });
      datasets.push({ label: L[k] + " p90", data: avg(k + "_p90"), borderColor: colours[i], borderDash: [4, 3], pointRadius: 0 });
    });
    draw("chart-turnaround", { type: "line", data: { labels: weeks, datasets } }, d.rows.length);
  }
  async function workload() {
    const d = await get("api/workload");
    const days = [...new Set(d.rows.map((r) => r.day))].sort();
    const facilities = [...new Set(d.rows.map((r) => r.facility))].sort();
    const datasets = facilities.map((f, i) => ({ label: f, backgroundColor: colours[i % colours.length],
      data: days.map((day) => d.rows.filter((r) => r.day === day && r.facility === f).reduce((a, r) => a + r.studies, 0)) }));
    draw("chart-workload", { type: "bar", data: { labels: days, datasets },
      options: { scales: { x: { stacked: true }, y: { stacked: true } } } }, d.rows.length);
  }
  async function agreement() {
    const d = await get("api/agreement");
    const versions = [...new Set(d.rows.map((r) => r.model_name + " " + r.model_version))].sort();
    const findings = [...new Set(d.rows.map((r) => r.label))].sort();
    const datasets = versions.map((v, i) => ({ label: L.sensitivity + " — " + v, backgroundColor: colours[i % colours.length],
      data: findings.map((f) => { const r = d.rows.find((x) => x.label === f && x.model_name + " " + x.model_version === v); return r ? r.sensitivity : null; }) }));
    draw("chart-agreement", { type: "bar", data: { labels: findings, datasets }, options: { scales: { y: { min: 0, max: 1 } } } }, d.rows.length);
    table("table-agreement", [["label", L.finding], ["model_version", L.model], ["reviewed", L.reviewed],
      ["agreement", L.agreement_rate], ["sensitivity", L.sensitivity], ["ppv", L.ppv]], d.rows);
  }
  async function tables() {
    const [b, c] = await Promise.all([get("api/backlog"), get("api/critical")]);
    table("table-backlog", [["reviewer_group", L.group], ["waiting", L.waiting], ["oldest_hours", L.oldest_hours], ["critical", L.critical]], b.rows);
    table("table-critical", [["week", L.week], ["facility", L.facility], ["critical_studies", L.critical], ["acknowledged", L.acknowledged],
      ["ack_minutes_p50", L.ack_p50], ["transfers_recommended", L.transfers_recommended], ["transfers_done", L.transfers_done]], c.rows);
  }
  function exports() {
    const q = params().toString();
    $("export-districts").href = "export/districts.csv?" + q;
    $("export-findings").href = "export/findings_weekly.csv?" + q;
  }
  async function refresh() {
    document.body.dataset.loading = "1";
    exports();
    await Promise.all([trend(), districts(), turnaround(), workload(), agreement(), tables()]);
    document.body.dataset.loading = "0";
    document.body.dataset.rendered = String(Number(document.body.dataset.rendered) + 1);
  }
  async function init() {
    const o = await (await fetch("api/options")).json();
    fill($("f-district"), o.districts); fill($("f-facility"), o.facilities);
    fill($("f-modality"), o.modalities); fill($("f-finding"), o.findings);
    const url = new URLSearchParams(location.search);
    if (o.last_day) {
      const end = new Date(o.last_day);
      const start = new Date(end.getTime() - 26 * 7 * 86400000);
      $("f-end").value = url.get("end") || o.last_day;
      $("f-start").value = url.get("start") || start.toISOString().slice(0, 10);
    }
    for (const name of ["district", "facility", "modality", "finding"]) { if (url.get(name)) $("f-" + name).value = url.get(name); }
    $("filters").addEventListener("submit", (e) => { e.preventDefault(); refresh().catch(fail); });
    for (const s of document.querySelectorAll("#filters select")) s.addEventListener("change", () => refresh().catch(fail));
    await refresh();
  }
  function fail(err) { document.body.dataset.error = String(err); console.error(err); }
  init().catch(fail);
})();
