// Keyboard shortcuts for the labelling page (no inline scripts: the CSP forbids them).
(function () {
  "use strict";
  var form = document.getElementById("answer");
  if (!form) return;
  var qtype = form.dataset.qtype;
  var k = parseInt(form.dataset.k, 10);
  var sent = false;

  function submitWith(name, value) {
    if (sent) return;
    sent = true;  // one submission per page; the idempotency key makes a resend harmless anyway
    if (name) {
      var input = document.createElement("input");
      input.type = "hidden"; input.name = name; input.value = value;
      form.appendChild(input);
    }
    form.submit();
  }

  var ranking = [];
  function showRanking() {
    var field = document.getElementById("ranking");
    field.value = ranking.join(",");
    document.getElementById("ranking-view").textContent =
      ranking.length ? ranking.map(function (p) { return "#" + (p + 1); }).join(" > ") : "none yet";
    for (var i = 0; i < k; i++) {
      var pos = ranking.indexOf(i);
      document.getElementById("badge-" + i).textContent = pos >= 0 ? "rank " + (pos + 1) : "";
    }
    document.getElementById("rank-submit").disabled = ranking.length !== k;
  }
  if (qtype === "ranking") {
    document.getElementById("rank-undo").addEventListener("click", function () { ranking.pop(); showRanking(); });
    document.querySelectorAll(".response").forEach(function (el) {
      el.addEventListener("click", function () {
        var p = parseInt(el.dataset.pos, 10);
        if (ranking.indexOf(p) < 0) { ranking.push(p); showRanking(); }
      });
    });
  }

  function nextUnanswered() {
    for (var i = 0; i < k; i++) {
      if (!form.querySelector('input[name="t' + i + '"]:checked')) return i;
    }
    return -1;
  }

  document.addEventListener("keydown", function (e) {
    var tag = (e.target && e.target.tagName) || "";
    var typing = tag === "TEXTAREA" || tag === "INPUT" || tag === "SELECT";
    if (typing) {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); submitWith(null); }
      return;
    }
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    var key = e.key.toLowerCase();
    if (key === "s" && document.getElementById("skip")) { e.preventDefault(); submitWith("action", "skip"); return; }
    if (qtype === "pairwise") {
      var map = { "1": "left", "arrowleft": "left", "2": "right", "arrowright": "right", "t": "tie", "b": "both_bad" };
      if (map[key]) { e.preventDefault(); submitWith("choice", map[key]); }
    } else if (qtype === "ranking") {
      var n = parseInt(key, 10);
      if (n >= 1 && n <= k && ranking.indexOf(n - 1) < 0) { ranking.push(n - 1); showRanking(); }
      else if (key === "backspace") { e.preventDefault(); ranking.pop(); showRanking(); }
      else if (key === "enter" && ranking.length === k) { e.preventDefault(); submitWith(null); }
    } else if (qtype === "thumbs") {
      var i = nextUnanswered();
      if ((key === "u" || key === "d") && i >= 0) {
        form.querySelector('input[name="t' + i + '"][value="' + (key === "u" ? "up" : "down") + '"]').checked = true;
      } else if (key === "enter" && nextUnanswered() < 0) { e.preventDefault(); submitWith(null); }
    } else if (qtype === "rating" && key === "enter") {
      if (form.checkValidity()) { e.preventDefault(); submitWith(null); }
    }
  });
})();
