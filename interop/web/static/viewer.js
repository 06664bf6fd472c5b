// The study page's DICOM viewer: Cornerstone3D (static/vendor/cornerstone.min.js, built from npm by
// scripts/build_viewer.sh) reading the report's own study through the hub's read-only WADO-RS proxy
// (/worklist/<report>/dicom-web/...). Left drag: window/level; right drag: zoom; middle drag: pan;
// wheel or arrow keys: scroll the slices of a CT/MR series; W: reset. A mammography exam shows its
// four views side by side (RCC LCC RMLO LMLO), one tool group for all of them.
(function () {
  "use strict";
  var ENGINE = "hub-engine", GROUP = "hub-tools";

  function start(element) {
    var hub = window.hubCornerstone;
    var status = element.querySelector(".viewer-status");
    var panes = element.querySelector(".viewer-panes");
    function say(state, text) {
      element.dataset.state = state;
      if (status) { status.textContent = text || ""; status.hidden = !text; }
    }
    if (!hub) { say("failed", element.dataset.failed); return; }
    var cs = hub.core, T = hub.tools;
    var TOOLS = [T.WindowLevelTool, T.ZoomTool, T.PanTool, T.StackScrollMouseWheelTool];
    var engine = null, viewports = [];

    function imageId(base, item) {
      return "wadouri:" + location.origin + base + "/series/" + item.series + "/instances/" + item.uid;
    }
    function pane(id, label, count) {
      var box = document.createElement("div");
      box.className = "viewer-pane";
      var view = document.createElement("div");
      view.className = "viewer-element";
      view.id = id;
      view.oncontextmenu = function (e) { e.preventDefault(); };
      box.appendChild(view);
      var tag = document.createElement("span");
      tag.className = "viewer-label";
      tag.textContent = label || "";
      box.appendChild(tag);
      if (count > 1) {  // the slice shown, once it is drawn: "7 / 32"
        var where = document.createElement("span");
        where.className = "viewer-slice";
        box.appendChild(where);
        view.addEventListener(cs.Enums.Events.STACK_NEW_IMAGE, function (event) {
          var index = event.detail.imageIdIndex;
          view.dataset.slice = String(index);
          where.textContent = (index + 1) + " / " + count;
        });
      }
      panes.appendChild(box);
      return view;
    }
    function show(stacks) {  // stacks: [{label, ids}]
      if (engine) { engine.destroy(); T.ToolGroupManager.destroyToolGroup(GROUP); }
      panes.textContent = "";
      panes.className = "viewer-panes n" + stacks.length;
      engine = new cs.RenderingEngine(ENGINE);
      var inputs = stacks.map(function (s, i) {
        return { viewportId: "vp" + i, type: cs.Enums.ViewportType.STACK,
                 element: pane("viewer-vp" + i, s.label, s.ids.length) };
      });
      engine.setViewports(inputs);
      var group = T.ToolGroupManager.createToolGroup(GROUP);
      TOOLS.forEach(function (tool) { group.addTool(tool.toolName); });
      var buttons = T.Enums.MouseBindings;
      group.setToolActive(T.WindowLevelTool.toolName, { bindings: [{ mouseButton: buttons.Primary }] });
      group.setToolActive(T.ZoomTool.toolName, { bindings: [{ mouseButton: buttons.Secondary }] });
      group.setToolActive(T.PanTool.toolName, { bindings: [{ mouseButton: buttons.Auxiliary }] });
      group.setToolActive(T.StackScrollMouseWheelTool.toolName);
      viewports = inputs.map(function (input) { group.addViewport(input.viewportId, ENGINE); return engine.getViewport(input.viewportId); });
      return Promise.all(viewports.map(function (vp, i) {
        var ids = stacks[i].ids;
        return vp.setStack(ids, Math.floor(ids.length / 2)).then(function () { vp.render(); });
      }));
    }
    function reset() {
      viewports.forEach(function (vp) { vp.resetProperties(); vp.resetCamera(); vp.render(); });
    }
    function step(delta) {
      viewports.forEach(function (vp) {
        var n = vp.getImageIds().length, next = Math.max(0, Math.min(n - 1, vp.getCurrentImageIdIndex() + delta));
        if (n > 1) { vp.setImageIdIndex(next); }
      });
    }

    say("loading", element.dataset.loading);
    // gpuTier given: no benchmark download by detect-gpu (the hub's pages reach nothing outside it)
    cs.init({ gpuTier: { tier: 1 } }).then(function () {
      T.init();
      TOOLS.forEach(function (tool) { T.addTool(tool); });
      return fetch(element.dataset.layout, { credentials: "same-origin" });
    }).then(function (answer) {
      if (!answer.ok) { throw new Error("layout " + answer.status); }
      return answer.json();
    }).then(function (layout) {
      var choose = element.querySelector(".viewer-series");
      if (layout.views) {
        var names = ["RCC", "LCC", "RMLO", "LMLO"].filter(function (v) { return layout.views[v]; });
        return show(names.map(function (v) { return { label: v, ids: [imageId(layout.wado, layout.views[v])] }; }));
      }
      var series = layout.series.map(function (s) {
        return { label: [s.modality, s.description].filter(Boolean).join(" · ") + " (" + s.instances.length + ")",
                 ids: s.instances.map(function (i) { return imageId(layout.wado, i); }) };
      });
      if (choose && series.length > 1) {
        series.forEach(function (s, i) {
          var option = document.createElement("option");
          option.value = String(i);
          option.textContent = s.label;
          choose.appendChild(option);
        });
        choose.hidden = false;
        choose.addEventListener("change", function () {
          say("loading", element.dataset.loading);
          show([series[Number(choose.value)]]).then(function () { say("ready", ""); });
        });
      }
      return show([series[0]]);
    }).then(function () {
      say("ready", "");
      var resetButton = element.querySelector(".viewer-reset");
      if (resetButton) { resetButton.addEventListener("click", reset); }
      document.addEventListener("keydown", function (event) {
        var target = event.target;
        if (target && /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName)) { return; }
        if (event.ctrlKey || event.altKey || event.metaKey) { return; }
        if (event.key === "w" || event.key === "W") { reset(); }
        if (event.key === "ArrowUp") { event.preventDefault(); step(-1); }
        if (event.key === "ArrowDown") { event.preventDefault(); step(1); }
      });
    }).catch(function (error) {
      say("failed", element.dataset.failed);
      if (window.console) { console.error("viewer:", error); }
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var element = document.getElementById("dicom-viewer");
    if (element) { start(element); }
  });
})();
