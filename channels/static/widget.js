/* The web chat widget: <script src="https://<gateway>/webchat/<name>/widget.js" async></script>
   on a page of an allowed origin adds a launcher button that opens the chat in a frame.
   Served by the gateway with the endpoint's settings filled in; no build step. */
(function () {
  "use strict";
  var CONFIG = /*WEBCHAT_CONFIG*/null;
  var script = document.currentScript;
  if (!CONFIG || !script || !script.src) return;
  var base = new URL(script.src, location.href).origin;
  if (location.origin !== base && CONFIG.allowedOrigins.indexOf(location.origin) < 0) {
    // The gateway refuses to be framed here anyway (Content-Security-Policy frame-ancestors).
    if (window.console) console.warn("chat widget: " + location.origin + " is not in webchat.allowed_origins; not shown");
    return;
  }
  var pageUrl = base + CONFIG.pagePath + "?embed=1";
  var loaded = (window.__chatGatewayWidgets = window.__chatGatewayWidgets || {});
  if (loaded[pageUrl]) return;  // the script tag is on the page twice
  loaded[pageUrl] = true;

  var CSS =
    ":host { all: initial; }" +
    ".launcher { position: fixed; right: 20px; bottom: 20px; z-index: 2147483000; display: flex; align-items: center; gap: 8px;" +
    " border: 0; border-radius: 999px; padding: 14px 20px; cursor: pointer; background: #2e6be6; color: #fff;" +
    " font: 600 16px/1 system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif; box-shadow: 0 6px 20px rgba(20, 30, 50, .25); }" +
    ".launcher:hover { background: #2559c4; }" +
    ".launcher:focus-visible { outline: 3px solid #9db9f3; outline-offset: 2px; }" +
    ".launcher svg { width: 20px; height: 20px; fill: currentColor; }" +
    ".panel { position: fixed; right: 20px; bottom: 88px; z-index: 2147483000; width: 400px;" +
    " height: min(640px, calc(100vh - 108px)); height: min(640px, calc(100dvh - 108px));" +
    " border-radius: 14px; overflow: hidden; background: #fff; box-shadow: 0 8px 32px rgba(20, 30, 50, .28); }" +
    ".panel[hidden] { display: none; }" +
    "iframe { display: block; width: 100%; height: 100%; border: 0; }" +
    "@media (max-width: 480px) {" +
    " .panel { right: 0; bottom: 0; width: 100%; height: 100vh; height: 100dvh; border-radius: 0; }" +
    " .open .launcher { display: none; } }";
  var BUBBLE = '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M4 3h16a2 2 0 0 1 2 2v11a2 2 0 0 1-2 2H9l-5 4v-4a2 2 0 0 1-2-2V5a2 2 0 0 1 2-2z"/></svg>';

  function mount() {
    var host = document.createElement("div");
    host.setAttribute("data-chat-gateway-widget", CONFIG.pagePath);
    var root = host.attachShadow ? host.attachShadow({ mode: "open" }) : host;
    var style = document.createElement("style");
    style.textContent = CSS;
    var wrap = document.createElement("div");
    var panel = document.createElement("div");
    panel.className = "panel";
    panel.id = "chat-panel";
    panel.hidden = true;
    var button = document.createElement("button");
    button.type = "button";
    button.className = "launcher";
    button.setAttribute("aria-controls", "chat-panel");
    var label = document.createElement("span");
    button.innerHTML = BUBBLE;
    button.appendChild(label);
    wrap.appendChild(panel);
    wrap.appendChild(button);
    root.appendChild(style);
    root.appendChild(wrap);
    document.body.appendChild(host);

    var frame = null;
    function show(open) {
      panel.hidden = !open;
      wrap.className = open ? "open" : "";
      button.setAttribute("aria-expanded", open ? "true" : "false");
      label.textContent = open ? CONFIG.strings.close_chat : CONFIG.strings.open_chat;
      if (open && !frame) {
        frame = document.createElement("iframe");
        frame.src = pageUrl;
        frame.title = CONFIG.title;
        panel.appendChild(frame);
      }
      if (open) frame.focus();
      else button.focus();
    }
    button.addEventListener("click", function () { show(panel.hidden); });
    window.addEventListener("message", function (ev) {
      if (ev.origin === base && ev.data && ev.data.type === "webchat:close" && !panel.hidden) show(false);
    });
    panel.hidden = true;
    wrap.className = "";
    button.setAttribute("aria-expanded", "false");
    label.textContent = CONFIG.strings.open_chat;
  }

  if (document.body) mount();
  else document.addEventListener("DOMContentLoaded", mount);
})();
