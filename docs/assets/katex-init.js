// Render the site's equations with the vendored KaTeX (docs/assets/katex): nothing is fetched from a CDN.
//  * Markdown pages: pymdownx.arithmatex (generic: true) emits <span class="arithmatex">\(...\)</span>
//    and <div class="arithmatex">\[...\]</div>.
//  * Tutorial notebooks (mkdocs-jupyter): markdown cells keep $...$ and $$...$$ as text.
(function () {
  "use strict";
  var NOTEBOOK_DELIMITERS = [
    { left: "$$", right: "$$", display: true },
    { left: "\\[", right: "\\]", display: true },
    { left: "\\(", right: "\\)", display: false },
    { left: "$", right: "$", display: false },
  ];

  function renderArithmatex(el) {
    var tex = el.textContent.trim();
    var display = el.tagName !== "SPAN";
    if (tex.slice(0, 2) === "\\(" && tex.slice(-2) === "\\)") {
      display = false;
    } else if (tex.slice(0, 2) === "\\[" && tex.slice(-2) === "\\]") {
      display = true;
    } else {
      return;
    }
    katex.render(tex.slice(2, -2), el, { displayMode: display, throwOnError: false });
  }

  function render() {
    if (typeof katex === "undefined") return;
    document.querySelectorAll(".arithmatex").forEach(renderArithmatex);
    if (typeof renderMathInElement === "undefined") return;
    document.querySelectorAll(".jupyter-wrapper .jp-RenderedMarkdown").forEach(function (el) {
      renderMathInElement(el, { delimiters: NOTEBOOK_DELIMITERS, throwOnError: false });
    });
  }

  // mkdocs-material's instant navigation swaps pages without a reload; document$ emits on every page.
  if (typeof document$ !== "undefined" && document$.subscribe) {
    document$.subscribe(render);
  } else if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", render);
  } else {
    render();
  }
})();
