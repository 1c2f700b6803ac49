// The console's only script: select-all on the dead page, and the overview
// refreshing itself every sample interval. Everything works without it.
(function () {
  "use strict";
  var all = document.getElementById("select-all");
  if (all) {
    all.addEventListener("change", function () {
      document.querySelectorAll('#dead input[name="id"]').forEach(function (box) { box.checked = all.checked; });
    });
  }
  if (document.body.dataset.page === "overview") {
    window.setTimeout(function () { window.location.reload(); }, 10000);
  }
})();
