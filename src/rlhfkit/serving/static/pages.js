"use strict";
// What the chat and arena pages share. Everything shown comes from users or the models: it is
// set with textContent, never as HTML.

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

// One streamed chat completion (server-sent events); onText(textSoFar) is called as pieces
// arrive. Resolves to {id, text}.
async function streamChat(body, extraHeaders, onText) {
  const r = await fetch("/v1/chat/completions", {method: "POST",
    headers: Object.assign({"Content-Type": "application/json"}, extraHeaders || {}),
    body: JSON.stringify(Object.assign({}, body, {stream: true}))});
  if (!r.ok) throw new Error((await r.json()).error.message);
  const reader = r.body.getReader(), dec = new TextDecoder();
  let buf = "", id = null, text = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buf += dec.decode(value, {stream: true});
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const line = buf.slice(0, cut); buf = buf.slice(cut + 2);
      if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
      const ev = JSON.parse(line.slice(6));
      if (ev.error) throw new Error(ev.error.message);
      id = id || ev.id;
      for (const c of ev.choices || []) {
        if (c.delta && c.delta.content) { text += c.delta.content; if (onText) onText(text); }
      }
    }
  }
  return {id: id, text: text};
}

// Enter in the text box sends (Shift+Enter starts a new line) and Escape leaves it; every other
// key press outside a text field and without a modifier goes to onKey(event).
function bindKeys(input, send, onKey) {
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); }
    else if (e.key === "Escape") { input.blur(); }
  });
  document.addEventListener("keydown", (e) => {
    const t = e.target;
    if (t && (t.tagName === "TEXTAREA" || t.tagName === "INPUT") || e.ctrlKey || e.metaKey || e.altKey) return;
    onKey(e);
  });
}
