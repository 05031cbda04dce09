// sagaflow status page: confirmations, filters that apply on change, and a refresh that swaps in the
// server-rendered (and so escaped) #live block. Nothing here writes run data with innerHTML: the new
// block is parsed by DOMParser, which runs no script, and moved in as nodes.
"use strict";

// A confirmation says what will be sent: a form's data-confirm question, then the value of each field
// named in its data-confirm-fields (the gate's payload, the reason), as plain text in the dialog.
document.addEventListener("submit", function (event) {
  var form = event.target;
  var question = form.getAttribute && form.getAttribute("data-confirm");
  if (!question) { return; }
  var lines = [question];
  (form.getAttribute("data-confirm-fields") || "").split(/\s+/).forEach(function (name) {
    var field = name && form.elements[name];
    if (!field) { return; }
    var label = field.getAttribute("data-label") || name;
    var value = field.value.trim();
    lines.push("");
    lines.push(label + ": " + (value ? "\n" + value : (field.getAttribute("data-empty") || "(none)")));
  });
  if (!window.confirm(lines.join("\n"))) {
    event.preventDefault();
  }
});

document.addEventListener("change", function (event) {
  var el = event.target;
  if (el.tagName === "SELECT" && el.form && el.form.id === "filters") {
    el.form.submit();
  }
});

function pad(n) { return (n < 10 ? "0" : "") + n; }
function clock(date) { return pad(date.getHours()) + ":" + pad(date.getMinutes()) + ":" + pad(date.getSeconds()); }

(function refresh() {
  var live = document.getElementById("live");
  if (!live || !live.dataset.refresh) { return; }
  var seconds = Math.max(parseInt(live.dataset.refresh, 10) || 5, 1);
  var busy = false;
  var lastOk = new Date();
  var failingSince = null;

  function enabled() {
    var box = document.getElementById("autorefresh");
    return !document.hidden && (!box || box.checked) && !busy;
  }

  // A refresh that failed (server gone, an error status, no answer within a period) says so at once, above
  // the page, until one succeeds again: a stale page must not look live.
  function failed(why) {
    if (!failingSince) { failingSince = new Date(); }
    var notice = document.getElementById("stale-notice");
    if (!notice) {
      notice = document.createElement("p");
      notice.id = "stale-notice";
      notice.className = "stale";
      notice.setAttribute("role", "alert");
      var main = document.querySelector("main");
      main.insertBefore(notice, main.firstChild);
    }
    notice.textContent = "Updates failed since " + clock(failingSince) + " (" + why + "); what you see is from " +
      clock(lastOk) + " and may be out of date. Still trying every " + seconds + " s.";
    document.body.classList.add("is-stale");
  }

  function recovered() {
    failingSince = null;
    lastOk = new Date();
    var notice = document.getElementById("stale-notice");
    if (notice) { notice.remove(); }
    document.body.classList.remove("is-stale");
  }

  // A form being edited (focused, or holding text not sent yet) is never replaced: the fresh page gets the
  // operator's own form node back, caret and all.
  function editedForms(current) {
    var kept = [];
    current.querySelectorAll("form[data-keep][id]").forEach(function (form) {
      var edited = form.contains(document.activeElement);
      form.querySelectorAll("textarea, input[type=text], input[type=search], input:not([type])").forEach(function (field) {
        if (field.value !== field.defaultValue) { edited = true; }
      });
      if (edited) { kept.push(form); }
    });
    return kept;
  }

  function tick() {
    if (!enabled()) { return; }
    busy = true;
    var controller = window.AbortController ? new AbortController() : null;
    var timeout = controller ? window.setTimeout(function () { controller.abort(); }, seconds * 1000) : null;
    fetch(window.location.href, { credentials: "same-origin", headers: { "Accept": "text/html" },
                                  signal: controller ? controller.signal : undefined })
      .then(function (response) {
        if (!response.ok) { failed("the server answered " + response.status); return null; }
        return response.text();
      })
      .then(function (html) {
        if (html === null) { return; }
        var fresh = new DOMParser().parseFromString(html, "text/html").getElementById("live");
        var current = document.getElementById("live");
        if (!fresh || !current) { failed("the answer was not this page"); return; }
        recovered();
        var box = document.getElementById("autorefresh");
        var keep = box ? box.checked : true;
        var active = document.activeElement;
        var focused = active && active.name;
        var caret = active && typeof active.selectionStart === "number" ? [active.selectionStart, active.selectionEnd] : null;
        // What the operator is typing in the search fields (not submitted yet) survives the refresh.
        var typed = {};
        current.querySelectorAll("#filters input[type=search], #filters input[type=text]").forEach(function (input) {
          typed[input.name] = input.value;
        });
        var movedActive = false;
        editedForms(current).forEach(function (form) {
          var counterpart = fresh.querySelector("#" + CSS.escape(form.id));
          if (counterpart) {
            if (form.contains(active)) { movedActive = true; }
            counterpart.replaceWith(form);
          }
        });
        current.replaceWith(document.adoptNode(fresh));
        document.querySelectorAll("#filters input[type=search], #filters input[type=text]").forEach(function (input) {
          if (Object.prototype.hasOwnProperty.call(typed, input.name)) { input.value = typed[input.name]; }
        });
        var newBox = document.getElementById("autorefresh");
        if (newBox) { newBox.checked = keep; }
        if (movedActive && document.contains(active)) {
          active.focus();
          if (caret) { active.setSelectionRange(caret[0], caret[1]); }
        } else if (focused) {
          var again = document.querySelector("#live [name='" + focused.replace(/[^a-z_]/gi, "") + "']");
          if (again) { again.focus(); }
        }
        if (!fresh.dataset.refresh) { window.clearInterval(timer); }
      })
      .catch(function (error) {
        failed(error && error.name === "AbortError" ? "no answer within " + seconds + " s" : "the server is unreachable");
      })
      .then(function () { busy = false; if (timeout) { window.clearTimeout(timeout); } });
  }

  var timer = window.setInterval(tick, seconds * 1000);
})();
