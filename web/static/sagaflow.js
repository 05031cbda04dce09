// sagaflow status page: confirmations, filters that apply on change, and a refresh that swaps in the
// server-rendered (and so escaped) #live block. Nothing here writes run data with innerHTML: the new
// block is parsed by DOMParser, which runs no script, and moved in as nodes.
"use strict";

document.addEventListener("submit", function (event) {
  var form = event.target;
  var question = form.getAttribute && form.getAttribute("data-confirm");
  if (question && !window.confirm(question)) {
    event.preventDefault();
  }
});

document.addEventListener("change", function (event) {
  var el = event.target;
  if (el.tagName === "SELECT" && el.form && el.form.id === "filters") {
    el.form.submit();
  }
});

(function refresh() {
  var live = document.getElementById("live");
  if (!live || !live.dataset.refresh) { return; }
  var seconds = Math.max(parseInt(live.dataset.refresh, 10) || 5, 1);
  var busy = false;

  function enabled() {
    var box = document.getElementById("autorefresh");
    return !document.hidden && (!box || box.checked) && !busy;
  }

  function tick() {
    if (!enabled()) { return; }
    busy = true;
    fetch(window.location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (response) { return response.ok ? response.text() : null; })
      .then(function (html) {
        if (html === null) { return; }
        var fresh = new DOMParser().parseFromString(html, "text/html").getElementById("live");
        var current = document.getElementById("live");
        if (!fresh || !current) { return; }
        var box = document.getElementById("autorefresh");
        var keep = box ? box.checked : true;
        var focused = document.activeElement && document.activeElement.name;
        // What the operator is typing in the search fields (not submitted yet) survives the refresh.
        var typed = {};
        current.querySelectorAll("#filters input[type=search], #filters input[type=text]").forEach(function (input) {
          typed[input.name] = input.value;
        });
        current.replaceWith(document.adoptNode(fresh));
        document.querySelectorAll("#filters input[type=search], #filters input[type=text]").forEach(function (input) {
          if (Object.prototype.hasOwnProperty.call(typed, input.name)) { input.value = typed[input.name]; }
        });
        var newBox = document.getElementById("autorefresh");
        if (newBox) { newBox.checked = keep; }
        if (focused) {
          var again = document.querySelector("#live [name='" + focused.replace(/[^a-z_]/gi, "") + "']");
          if (again) { again.focus(); }
        }
        if (!fresh.dataset.refresh) { window.clearInterval(timer); }
      })
      .catch(function () { /* the server is restarting: try again at the next tick */ })
      .then(function () { busy = false; });
  }

  var timer = window.setInterval(tick, seconds * 1000);
})();
