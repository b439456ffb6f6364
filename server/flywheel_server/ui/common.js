// Shared by the labeling page and the dashboard: the key, JSON calls, a small Markdown renderer.
"use strict";

const Flywheel = (() => {
  const KEY = "flywheel-credential";
  const credential = () => sessionStorage.getItem(KEY) || "";
  const setCredential = (value) => sessionStorage.setItem(KEY, value);

  // With auth on the credential is a key; with auth off, a name sent as the labeler.
  function headers() {
    const h = { "content-type": "application/json" };
    if (credential()) h.authorization = `Bearer ${credential()}`;
    return h;
  }

  async function call(method, path, body) {
    const response = await fetch(`../v1/${path}`, {
      method, headers: headers(), body: body === undefined ? undefined : JSON.stringify(body),
    });
    const data = await response.json().catch(() => ({}));
    if (!response.ok) {
      const message = (data.error && data.error.message) || response.statusText;
      const error = new Error(message);
      error.status = response.status;
      throw error;
    }
    return data;
  }

  const escape = (text) => text.replace(/[&<>"']/g, (c) => (
    { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));

  // Headings, lists, emphasis, code and paragraphs: enough for guidelines, nothing fetched.
  function markdown(source) {
    const inline = (s) => escape(s)
      .replace(/`([^`]+)`/g, "<code>$1</code>")
      .replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>")
      .replace(/\*([^*]+)\*/g, "<em>$1</em>");
    const out = [];
    let list = null;
    for (const line of source.split("\n")) {
      const heading = line.match(/^(#{1,4})\s+(.*)$/);
      const item = line.match(/^\s*[-*]\s+(.*)$/);
      if (!item && list) { out.push(`</${list}>`); list = null; }
      if (heading) out.push(`<h${heading[1].length + 2}>${inline(heading[2])}</h${heading[1].length + 2}>`);
      else if (item) { if (!list) { list = "ul"; out.push("<ul>"); } out.push(`<li>${inline(item[1])}</li>`); }
      else if (line.trim()) out.push(`<p>${inline(line)}</p>`);
    }
    if (list) out.push(`</${list}>`);
    return out.join("\n");
  }

  return { call, credential, setCredential, markdown, escape };
})();
