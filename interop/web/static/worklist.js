// The worklist's little script (the signer is the logged-in person): keep Sign for
// unchanged AI results (changes go through "Edit & sign"), and say when the image cannot load.
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
    function update() {
      var c = changed();
      sign.disabled = c;
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

  document.addEventListener("DOMContentLoaded", function () {  guardSign(); imageErrors(); });
})();
