// MathJax 3 for pymdownx.arithmatex (generic mode): typeset only what arithmatex marked.
// The MathJax files themselves are served from the site (tools/mkdocs_hooks.py), not a CDN.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
  },
};
