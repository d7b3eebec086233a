/* A Worker for pages opened from disk.
 *
 * Chromium refuses `new Worker(...)` on file:// pages, and mkdocs-material's search runs in a
 * worker. Its offline plugin fetches a shim from a CDN unless a polyfill whose name contains
 * "iframe-worker" is listed (mkdocs.yml: extra.polyfills); this one is written for this site and
 * needs no network. The worker's script runs in a hidden srcdoc iframe, which shares the page's
 * origin: the page hands it messages as "message" events, and its postMessage hands results back.
 * importScripts returns a promise (the search worker awaits it; it is called only for non-English
 * stemmers). Served over http(s), the browser's own Worker is left alone.
 */
(function () {
  if (location.protocol !== "file:") return;

  class FileWorker extends EventTarget {
    constructor(url) {
      super();
      this.onmessage = null;
      this._pending = [];
      this._frame = document.createElement("iframe");
      this._frame.hidden = true;
      this._frame.setAttribute("aria-hidden", "true");
      const src = new URL(url, location.href).href;
      const id = "fileWorker" + Math.random().toString(36).slice(2);
      window[id] = this;
      this._frame.srcdoc =
        "<!doctype html><script>" +
        "var host = parent." + id + ";" +
        "window.postMessage = function (data) { host._fromWorker(data); };" +
        "window.importScripts = function () { var urls = Array.prototype.slice.call(arguments);" +
        "  return urls.reduce(function (p, u) { return p.then(function () { return new Promise(function (ok, fail) {" +
        "    var s = document.createElement('script'); s.src = new URL(u, " + JSON.stringify(src) + ").href;" +
        "    s.onload = ok; s.onerror = fail; document.head.appendChild(s); }); }); }, Promise.resolve()); };" +
        "</script><script src=" + JSON.stringify(src) + " onload='host._ready()'></script>";
      document.body.appendChild(this._frame);
    }
    _ready() {
      this._loaded = true;
      for (const data of this._pending.splice(0)) this.postMessage(data);
    }
    _fromWorker(data) {
      setTimeout(() => {
        const event = new MessageEvent("message", { data });
        if (typeof this.onmessage === "function") this.onmessage(event);
        this.dispatchEvent(event);
      });
    }
    postMessage(data) {
      if (!this._loaded) { this._pending.push(data); return; }
      const win = this._frame.contentWindow;
      win.dispatchEvent(new win.MessageEvent("message", { data }));
    }
    terminate() { this._frame.remove(); }
  }

  window.Worker = FileWorker;
})();
