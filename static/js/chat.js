// Streaming chat over the portal's proxy. Model text is only ever inserted as textContent while streaming; the
// server returns the finished reply as sanitised HTML (Markdown through nh3). Tool calls a model makes are shown,
// as text, and kept; nothing here runs them or answers them.
(function () {
  "use strict";
  var form = document.getElementById("chat-form");
  if (!form) return;
  var list = document.getElementById("messages");
  var input = document.getElementById("id_message");
  var send = document.getElementById("send"), stop = document.getElementById("stop");
  var regenerate = document.getElementById("regenerate"), edit = document.getElementById("edit");
  var csrf = form.querySelector("input[name=csrfmiddlewaretoken]").value;
  var notice = document.getElementById("chat-notice");
  var controller = null;
  var MAX_TOOL_CALLS = 64;  // as many as the server keeps (jobs/use/chat.py)

  function storedToolCalls(li) {
    try {
      var calls = JSON.parse(li.dataset.toolCalls || "[]");
      return Array.isArray(calls) ? calls : [];
    } catch (e) { return []; }
  }

  function history() {
    var out = [];
    var system = document.getElementById("id_system_prompt").value.trim();
    if (system) out.push({ role: "system", content: system });
    // The list's own items only: a list inside a reply (Markdown) is not more messages.
    list.querySelectorAll(":scope > li").forEach(function (li) {
      var role = li.className.indexOf("msg-user") >= 0 ? "user" : "assistant";
      var message = { role: role, content: li.dataset.raw || li.querySelector(".body").textContent };
      var calls = role === "assistant" ? storedToolCalls(li) : [];
      // A reply that called tools goes back in OpenAI's shape, content null when it had no text (as the server sent
      // it), so that the conversation stays one the server takes; no tool results follow, since none were run.
      if (calls.length) { message.tool_calls = calls; message.content = message.content || null; }
      out.push(message);
    });
    return out;
  }

  // Streamed tool calls come in pieces by index (the id and name first, the arguments a few characters at a time);
  // strings are appended as the openai library gathers them.
  function gather(calls, pieces) {
    if (!Array.isArray(pieces)) return;
    pieces.forEach(function (piece) {
      var i = piece && piece.index;
      if (!Number.isInteger(i) || i < 0 || i >= MAX_TOOL_CALLS) return;
      var call = calls[i] || (calls[i] = { id: "", type: "function", function: { name: "", arguments: "" } });
      var fn = piece.function || {};
      if (typeof piece.id === "string") call.id += piece.id;
      if (typeof fn.name === "string") call.function.name += fn.name;
      if (typeof fn.arguments === "string") call.function.arguments += fn.arguments;
    });
  }

  function pretty(text) {
    try { return JSON.stringify(JSON.parse(text), null, 2); } catch (e) { return text; }
  }

  // Each call a collapsed block under the reply, as the page shows a saved one. Blocks are updated in place, so one
  // opened while the arguments stream stays open, and filled with textContent only: a model's output is hostile.
  function showToolCalls(li, calls) {
    calls = calls.filter(Boolean);  // indexes a stream skipped
    var box = li.querySelector(".tool-calls");
    if (!calls.length) { if (box) box.remove(); return; }
    if (!box) { box = document.createElement("div"); box.className = "tool-calls"; li.querySelector(".body").after(box); }
    calls.forEach(function (call, n) {
      var block = box.children[n];
      if (!block) {
        block = document.createElement("details"); block.className = "tool-call";
        block.appendChild(document.createElement("summary")); block.appendChild(document.createElement("pre"));
        box.appendChild(block);
      }
      block.querySelector("summary").textContent = "Tool call: " + (call.function.name || "(no name)");
      block.querySelector("pre").textContent = pretty(call.function.arguments);
    });
    while (box.children.length > calls.length) box.lastChild.remove();
  }

  // A Copy button on each code block of a finished reply (the page without JavaScript simply has none).
  function copyButtons(root) {
    root.querySelectorAll(".md pre").forEach(function (pre) {
      if (pre.querySelector(".copy")) return;
      var button = document.createElement("button");
      button.type = "button"; button.className = "copy secondary small"; button.textContent = "Copy";
      button.setAttribute("aria-label", "Copy this code");
      button.addEventListener("click", function () {
        var code = pre.querySelector("code") || pre;
        var done = function (label) { button.textContent = label; setTimeout(function () { button.textContent = "Copy"; }, 1500); };
        if (navigator.clipboard && window.isSecureContext) {
          navigator.clipboard.writeText(code.textContent).then(function () { done("Copied"); }, function () { done("Copy failed"); });
        } else {
          var range = document.createRange(); range.selectNodeContents(code);
          var selection = window.getSelection(); selection.removeAllRanges(); selection.addRange(range);
          done(document.execCommand("copy") ? "Copied" : "Press Ctrl+C");
        }
      });
      pre.appendChild(button);
    });
  }

  function bubble(role, text) {
    var li = document.createElement("li");
    li.className = "msg-" + role;
    var who = document.createElement("div"); who.className = "who"; who.textContent = role === "user" ? "You" : "Model";
    var body = document.createElement("div"); body.className = "body md"; body.textContent = text;
    li.appendChild(who); li.appendChild(body); li.dataset.raw = text;
    list.appendChild(li);
    return li;
  }

  function busy(on) {
    send.disabled = on; stop.hidden = !on;
    regenerate.hidden = on || !list.querySelector("li.msg-assistant");
    edit.hidden = on || !list.querySelector("li.msg-user");
  }

  async function ask(userText) {
    var messages = history();
    if (userText) { messages.push({ role: "user", content: userText }); bubble("user", userText); }
    var reply = bubble("assistant", "");
    var body = reply.querySelector(".body");
    var text = "", calls = [], started = performance.now(), first = null, usage = null;
    controller = new AbortController();
    notice.hidden = true;
    busy(true);
    try {
      var response = await fetch(form.dataset.api, {
        method: "POST", signal: controller.signal,
        // The conversation: a service's route sends each of its turns to the same replica (its prompt cache).
        headers: { "Content-Type": "application/json", "X-CSRFToken": csrf, "X-Conversation": form.dataset.conversation },
        body: JSON.stringify({
          model: form.dataset.model, messages: messages, stream: true, stream_options: { include_usage: true },
          temperature: parseFloat(document.getElementById("id_temperature").value),
          top_p: parseFloat(document.getElementById("id_top_p").value),
          max_tokens: parseInt(document.getElementById("id_max_tokens").value, 10),
        }),
      });
      var wait = response.status === 503 ? parseInt(response.headers.get("Retry-After") || "", 10) : NaN;
      if (wait > 0) { starting(userText, reply, wait); return; }
      if (!response.ok) { var err = await response.json(); throw new Error(err.error ? err.error.message : response.statusText); }
      var reader = response.body.getReader(), decoder = new TextDecoder(), buffer = "";
      for (;;) {
        var chunk = await reader.read();
        if (chunk.done) break;
        buffer += decoder.decode(chunk.value, { stream: true });
        var lines = buffer.split("\n"); buffer = lines.pop();
        lines.forEach(function (line) {
          if (line.indexOf("data: ") !== 0 || line === "data: [DONE]") return;
          var event = JSON.parse(line.slice(6));
          if (event.usage) usage = event.usage;
          var delta = event.choices && event.choices[0] && event.choices[0].delta;
          if (delta && delta.content) {
            if (first === null) first = performance.now();
            text += delta.content; body.textContent = text;
          }
          if (delta && delta.tool_calls) {
            if (first === null) first = performance.now();
            gather(calls, delta.tool_calls); showToolCalls(reply, calls);
          }
        });
      }
    } catch (e) {
      if (e.name !== "AbortError") { body.textContent = text + "\n\n(" + e.message + ")"; }
    }
    var ended = performance.now();
    var stats = { ttft_ms: first === null ? null : Math.round(first - started) };
    if (usage) { stats.prompt_tokens = usage.prompt_tokens; stats.completion_tokens = usage.completion_tokens; }
    if (usage && first !== null && ended > first) stats.tokens_per_s = usage.completion_tokens / ((ended - first) / 1000);
    calls = calls.filter(Boolean);
    reply.dataset.raw = text;
    if (calls.length) reply.dataset.toolCalls = JSON.stringify(calls);
    var saved = await fetch(form.dataset.save, {
      method: "POST", headers: { "Content-Type": "application/json", "X-CSRFToken": csrf },
      body: JSON.stringify({ user: userText || "", assistant: text, stats: stats, tool_calls: calls,
                             system_prompt: document.getElementById("id_system_prompt").value }),
    });
    if (saved.ok) {
      var data = await saved.json();
      reply.dataset.id = data.id;
      body.innerHTML = data.html;  // sanitised on the server
      // The calls as kept, so that what goes back to the model is what a reload of the page would send.
      calls = Array.isArray(data.tool_calls) ? data.tool_calls : [];
      if (calls.length) reply.dataset.toolCalls = JSON.stringify(calls); else delete reply.dataset.toolCalls;
      showToolCalls(reply, calls);
      copyButtons(reply);
      var line = document.createElement("div"); line.className = "stats small muted";
      line.textContent = (stats.ttft_ms !== null ? "first token " + stats.ttft_ms + " ms · " : "") +
        (stats.tokens_per_s ? stats.tokens_per_s.toFixed(1) + " tokens/s · " : "") + (stats.completion_tokens || 0) + " tokens";
      reply.appendChild(line);
    }
    controller = null;
    busy(false);
  }

  // A service with no replica ready yet (503 with Retry-After): nothing was asked, so nothing is kept; the question
  // goes back into the box and the page says when to send it again.
  function starting(userText, reply, wait) {
    reply.remove();
    if (userText) { list.lastElementChild.remove(); input.value = userText; }
    notice.textContent = "The model is starting: try again in about " + wait + " s.";
    notice.hidden = false;
    controller = null;
    busy(false);
  }

  async function forgetFrom(li) {
    if (!li || !li.dataset.id) { if (li) li.remove(); return; }
    var data = new FormData(); data.append("from", li.dataset.id);
    await fetch(form.dataset.truncate, { method: "POST", headers: { "X-CSRFToken": csrf }, body: data });
    var node = li; while (node) { var next = node.nextElementSibling; node.remove(); node = next; }
  }

  form.addEventListener("submit", function (e) {
    e.preventDefault();
    var text = input.value.trim();
    if (!text || controller) return;
    input.value = "";
    ask(text);
  });
  input.addEventListener("keydown", function (e) {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); form.requestSubmit(); }
  });
  stop.addEventListener("click", function () { if (controller) controller.abort(); });
  regenerate.addEventListener("click", async function () {
    var last = list.querySelector("li.msg-assistant:last-of-type");
    await forgetFrom(last);
    ask(null);
  });
  edit.addEventListener("click", async function () {
    var users = list.querySelectorAll("li.msg-user"), last = users[users.length - 1];
    if (!last) return;
    input.value = last.dataset.raw || last.querySelector(".body").textContent;
    await forgetFrom(last);
    input.focus();
    busy(false);
  });
  copyButtons(list);
  busy(false);
})();
