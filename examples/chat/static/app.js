// The chat page: plain ES modules, no build step. Polls the API every second for new messages.
const $ = (id) => document.getElementById(id);
let me = null;
let current = null; // {kind: "dm"|"room", id, title}

async function api(method, path, body) {
  const response = await fetch(path, {
    method, credentials: "same-origin",
    headers: body ? {"content-type": "application/json"} : {},
    body: body ? JSON.stringify(body) : undefined,
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.detail || `${response.status} ${response.statusText}`);
  return data;
}

function formData(form) { return Object.fromEntries(new FormData(form).entries()); }

function show(loggedIn) {
  $("auth").hidden = loggedIn;
  $("chat").hidden = !loggedIn;
  $("logout").hidden = !loggedIn;
  $("me").textContent = loggedIn ? `${me.name} (#${me.id})` : "";
}

function el(tag, {dataset = {}, ...props} = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  Object.assign(node.dataset, dataset); // dataset itself is read-only: copy its entries
  for (const child of children) node.append(child);
  return node;
}

function time(at) { return new Date(at * 1000).toLocaleTimeString(); }

async function start() {
  try { me = await api("GET", "/api/me"); show(true); await refreshAll(); }
  catch { show(false); }
}

$("signup-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = formData(event.target);
  try {
    await api("POST", "/api/signup", form);
    me = await api("POST", "/api/login", {email: form.email, password: form.password});
    $("auth-error").textContent = "";
    show(true); await refreshAll();
  } catch (error) { $("auth-error").textContent = error.message; }
});

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  try {
    me = await api("POST", "/api/login", formData(event.target));
    $("auth-error").textContent = "";
    show(true); await refreshAll();
  } catch (error) { $("auth-error").textContent = error.message; }
});

$("logout").addEventListener("click", async () => {
  await api("POST", "/api/logout"); me = null; current = null; show(false);
});

$("user-search").addEventListener("input", async (event) => {
  const users = await api("GET", `/api/users?q=${encodeURIComponent(event.target.value)}`);
  $("user-results").replaceChildren(...users.map((u) => el("li", {},
    el("button", {className: "link", textContent: u.name, dataset: {userId: u.id},
                  onclick: () => open({kind: "dm", id: u.id, title: u.name})}))));
});

$("new-room-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  try {
    const room = await api("POST", "/api/rooms", formData(event.target));
    event.target.reset();
    await refreshRooms();
    open({kind: "room", id: room.id, title: room.name});
  } catch (error) { $("chat-error").textContent = error.message; }
});

$("send-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = $("send-text").value;
  const path = current.kind === "dm" ? `/api/dm/${current.id}` : `/api/rooms/${current.id}/messages`;
  try {
    await api("POST", path, {text});
    $("send-text").value = "";
    $("chat-error").textContent = "";
    await refreshMessages();
  } catch (error) { $("chat-error").textContent = error.message; }
});

async function open(conversation) {
  current = conversation;
  $("conv-title").textContent = conversation.kind === "dm" ? `Direct messages with ${conversation.title}`
                                                           : `Room ${conversation.title}`;
  $("send-form").hidden = false;
  $("chat-error").textContent = "";
  if (conversation.kind === "room") {
    try { await api("POST", `/api/rooms/${conversation.id}/join`); } catch (error) {
      $("chat-error").textContent = error.message;
    }
  }
  await refreshMessages();
}

async function refreshMessages() {
  if (!current) return;
  const path = current.kind === "dm" ? `/api/dm/${current.id}` : `/api/rooms/${current.id}/messages`;
  const messages = (await api("GET", path)).reverse();
  $("messages").replaceChildren(...messages.map((m) => el("li", {className: m.author_id === me.id ? "mine message" : "message"},
    el("span", {className: "author", textContent: m.author}), el("span", {className: "text", textContent: m.text}),
    el("span", {className: "muted", textContent: ` ${time(m.at)}`}))));
}

async function refreshFeed() {
  const items = await api("GET", "/api/feed?limit=30");
  $("feed").replaceChildren(...items.map((item) => el("li", {className: "feed-item"},
    el("div", {className: "muted", textContent: `${item.kind === "dm" ? "DM" : "#" + item.room} · ${time(item.at)}`}),
    el("span", {className: "author", textContent: item.from}), el("span", {className: "text", textContent: item.text}))));
}

async function refreshRooms() {
  const rooms = await api("GET", "/api/rooms");
  $("rooms").replaceChildren(...rooms.map((r) => el("li", {},
    el("button", {className: "link", textContent: r.name, dataset: {roomId: r.id},
                  onclick: () => open({kind: "room", id: r.id, title: r.name})}))));
}

async function refreshConversations() {
  const conversations = await api("GET", "/api/conversations");
  $("conversations").replaceChildren(...conversations.map((c) => el("li", {textContent: `${c.kind}: ${c.title}`})));
}

async function refreshAll() {
  await Promise.all([refreshRooms(), refreshFeed(), refreshConversations(), refreshMessages()]);
}

setInterval(async () => {
  if (!me) return;
  try { await Promise.all([refreshMessages(), refreshFeed(), refreshConversations()]); } catch { /* next tick */ }
}, 1000);

start();
