// edgepipe dashboard: sign in from a #token=... fragment, then poll for new reports and
// swap in the server-rendered content. No libraries, no build step.
(function () {
  "use strict";
  var body = document.body;
  var m = /(?:^#|&)token=([^&]+)/.exec(location.hash || "");
  if (m) {
    var token = decodeURIComponent(m[1]);
    history.replaceState(null, "", location.pathname + location.search);
    fetch("/login", {method: "POST", credentials: "same-origin",
                     headers: {"Content-Type": "application/json"},
                     body: JSON.stringify({token: token})})
      .then(function (r) {
        if (r.ok) { location.reload(); }
        else { setStatus("the token in the address was refused"); }
      });
    return;
  }
  if (body.getAttribute("data-live") !== "1") { return; }
  var poll = parseInt(body.getAttribute("data-poll"), 10) || 2000;
  var rev = null, busy = false;

  function setStatus(text) {
    var el = document.getElementById("status");
    if (el) { el.textContent = text; }
  }

  function refresh() {
    return fetch("/dashboard/content" + location.search, {credentials: "same-origin"})
      .then(function (r) { if (!r.ok) { throw new Error("HTTP " + r.status); } return r.text(); })
      .then(function (html) {
        var main = document.getElementById("content");
        main.innerHTML = html;
        main.classList.remove("flash");
        void main.offsetWidth;  // restart the highlight animation
        main.classList.add("flash");
      });
  }

  function tick() {
    if (busy) { return; }
    busy = true;
    fetch("/dashboard/rev", {credentials: "same-origin"})
      .then(function (r) { if (!r.ok) { throw new Error("HTTP " + r.status); } return r.json(); })
      .then(function (d) {
        var changed = rev !== null && d.rev !== rev;
        rev = d.rev;
        setStatus("live: " + d.count + " reports stored, checked " + new Date().toLocaleTimeString());
        return changed ? refresh() : null;
      })
      .catch(function (e) { setStatus("live updates paused: " + e.message); })
      .then(function () { busy = false; });
  }
  tick();
  setInterval(tick, poll);
})();
