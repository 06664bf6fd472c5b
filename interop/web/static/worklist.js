// The worklist's little script (the signer is the logged-in person): keep Sign for
// unchanged AI results (changes go through "Edit & sign"), say when the image cannot load, and the
// keyboard shortcuts the study page documents (S sign, Shift+S sign and next, N next, B back).
(function () {
  "use strict";
  function guardSign() {
    var form = document.getElementById("review-form");
    var sign = document.getElementById("sign");
    if (!form || !sign || sign.disabled) { return; }
    var conclusion = document.getElementById("conclusion");
    var hint = document.getElementById("changed-hint");
    var edit = document.getElementById("edit");
    function changed() {
      var radios = form.querySelectorAll('input[type="radio"]:checked');
      for (var i = 0; i < radios.length; i++) {
        if ((radios[i].value === "present") !== (radios[i].dataset.ai === "1")) { return true; }
      }
      return conclusion.value.replace(/\r\n/g, "\n").trim() !== conclusion.dataset.original.trim();
    }
    var signNext = document.getElementById("sign-next");
    function update() {
      var c = changed();
      sign.disabled = c;
      if (signNext) { signNext.disabled = c; }
      hint.hidden = !c;
      edit.classList.toggle("primary", c);
    }
    form.addEventListener("change", update);
    form.addEventListener("input", update);
    update();
  }

  function imageErrors() {
    var img = document.getElementById("study-image");
    var message = document.getElementById("image-error");
    if (!img || !message) { return; }
    function failed() { img.hidden = true; message.hidden = false; }
    img.addEventListener("error", failed);
    if (img.complete && img.naturalWidth === 0 && img.currentSrc) { failed(); }
  }

  function shortcuts() {
    var main = document.querySelector("main.study");
    if (!main) { return; }
    document.addEventListener("keydown", function (event) {
      var target = event.target;
      var typing = target && (target.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName));
      if (typing || event.ctrlKey || event.altKey || event.metaKey || event.repeat) { return; }
      var key = event.key.toLowerCase();
      var button = null;
      if (key === "s") { button = document.getElementById(event.shiftKey ? "sign-next" : "sign"); }
      if (button && !button.disabled) { event.preventDefault(); button.click(); return; }
      if (key === "n" && main.dataset.next) { event.preventDefault(); window.location.assign(main.dataset.next); }
      if (key === "b" && main.dataset.back) { event.preventDefault(); window.location.assign(main.dataset.back); }
    });
  }

  document.addEventListener("DOMContentLoaded", function () { guardSign(); imageErrors(); shortcuts(); });
})();
