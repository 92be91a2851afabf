// Loaded with the page's CSP nonce: gives that nonce to the <style>
// elements xterm.js creates, so the CSP needs no 'unsafe-inline' for
// styles.  A classic script: document.currentScript is only set for those.
(function () {
  const nonce = document.currentScript && document.currentScript.nonce;
  if (!nonce) return;
  const create = Document.prototype.createElement;
  Document.prototype.createElement = function (name, options) {
    const el = create.call(this, name, options);
    if (String(name).toLowerCase() === 'style') el.nonce = nonce;
    return el;
  };
})();
