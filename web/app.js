// Owns the client's behaviour: sign-in, handling server events (dedupe by
// event id, ack once applied, saved and shown; `read` while a chat is open
// and visible), the outbox of sends, group commands, media upload and
// display, forwarding, and wiring the page's controls.
import { Connection, ServerError, devToken, fetchMedia, newCommandId, tokenClaims, uploadMedia } from './net.js';
import { Store, deviceId, forgetDevice, loadSession, saveSession } from './store.js';
import {
  $, convTitle, el, focusConv, renderConvList, renderDevices, renderGroupPanel, renderMessages, sizeText,
} from './ui.js';

const USER_RE = /^[A-Za-z0-9._-]{1,64}$/;
const IDS_PER_COMMAND = 1000; // the server's cap on `ack` / `read` ids
const RETRY_SEND_MS = 2000;
const TYPING_EVERY_MS = 3000; // `composing` at most this often while typing
const CLOSE_UNLINKED = 4001; // PROTOCOL.md: this device was unlinked
const CHANGE_BATCH_MS = 15;
// Worth resending with the same id (the server dedupes it); anything else
// is final for that message.
const RETRYABLE = new Set(['disconnected', 'timeout', 'rate_limited', 'unavailable']);
// Below style.css's breakpoint one pane shows at a time: the list, or the
// open chat with a back control.
const narrow = window.matchMedia('(max-width: 700px)');

let session = null; // {user, token, dev}
let store = null;
let conn = null;
let current = null; // key of the open conversation
let acks = [];
let inFlight = new Set(); // command ids of sends awaiting their answer
let changeQueued = false;
let scrollNext = false;
let focusChat = false;
let pendingFile = null;
let forwarding = null;
const mediaUrls = new Map(); // media id -> Promise of an object URL
const groupInfoAsked = new Set();
// Who is typing where: conversation key -> Map(user -> until ms). Never
// saved: typing lives only as long as its ttl_ms.
const typingIn = new Map();
let typingSentAt = 0;
// Presence of the people this user has 1:1 chats with: user -> the last
// `presence` event. Never saved: it is asked for again on every connection.
const presenceOf = new Map();
let presenceAsked = ''; // the users of this connection's presence_sub, joined
const PRESENCE_SUB_MAX = 256;
let typingTimer = null;

// ---- errors ---------------------------------------------------------------

function errorText(e) {
  if (e instanceof ServerError) return `${e.code}: ${e.message}`;
  return e && e.message ? e.message : String(e);
}

function showError(text) {
  $('error-text').textContent = text;
  $('error').hidden = false;
}

// ---- sign-in --------------------------------------------------------------

async function signIn(user, token) {
  if (token) {
    const claims = tokenClaims(token);
    return { user: claims.user, token, dev: false };
  }
  if (!USER_RE.test(user)) throw new Error('A user name is 1-64 letters, digits, ".", "_" or "-".');
  try {
    return { user, token: await devToken(user, deviceId()), dev: true };
  } catch (e) {
    if (e.status === 404) throw new Error('This server issues no dev tokens (PARLEY_DEV is off): paste a token.');
    throw e;
  }
}

function showSignIn(message) {
  $('app').hidden = true;
  $('signin').hidden = false;
  if (message) showError(message);
  $('signin-user').focus();
}

function startSession(s) {
  session = s;
  saveSession(s);
  $('signin').hidden = true;
  $('me').textContent = s.user;
  const wsUrl = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/v1/ws`;
  conn = new Connection({ url: wsUrl, token: s.token, onEvent, onState });
  holdWindow(false);
}

// ---- one window per user ---------------------------------------------------
// Two windows of one user in one browser would overwrite each other's saved
// state, so only the window holding a Web Lock runs; another shows "open in
// another window" with a "Use here" button that makes the holder let go, as
// WhatsApp Web does. (No Web Locks, as on a plain-http LAN address: no guard.)

const windowChannel = 'BroadcastChannel' in window ? new BroadcastChannel('parley.windows') : null;
let releaseWindow = null; // set while this window holds the lock

function lockName() {
  return `parley.window.${session.user}`;
}

function runHere() {
  store = new Store(session.user); // what the other window saved last
  $('elsewhere').hidden = true;
  $('app').hidden = false;
  conn.start();
  changed();
  return new Promise((release) => { releaseWindow = release; });
}

function showElsewhere() {
  $('app').hidden = true;
  $('elsewhere').hidden = false;
}

function holdWindow(takeOver) {
  if (!navigator.locks) {
    runHere();
    return;
  }
  if (takeOver) windowChannel?.postMessage({ yield: session.user });
  const opts = takeOver ? {} : { ifAvailable: true };
  navigator.locks.request(lockName(), opts, (lock) => (lock ? runHere() : showElsewhere()));
}

windowChannel?.addEventListener('message', (e) => {
  if (!releaseWindow || !session || e.data?.yield !== session.user) return;
  conn.stop();
  store.save();
  releaseWindow();
  releaseWindow = null;
  showElsewhere();
});

function signOut() {
  conn.stop();
  store.clear();
  saveSession(null);
  location.reload();
}

// A token about to expire is renewed (dev mode) before the next connect;
// a pasted one cannot be, so the user is asked for a new one.
async function renewToken() {
  const exp = tokenClaims(session.token).exp;
  if (!exp || exp * 1000 - Date.now() > 60000) return;
  if (!session.dev) {
    conn.stop();
    saveSession(null);
    showSignIn('Your token has expired: sign in again.');
    return;
  }
  try {
    session.token = await devToken(session.user, deviceId());
    conn.token = session.token;
    saveSession(session);
  } catch (e) {
    showError(`Could not renew the token: ${errorText(e)}`);
  }
}

// ---- connection and events ------------------------------------------------

function onState(state, detail) {
  const label = {
    connecting: 'connecting…',
    syncing: 'syncing…',
    online: 'online',
    offline: `offline, retrying in ${Math.ceil((detail?.delay || 0) / 1000)} s`,
  }[state];
  $('conn-state').textContent = label;
  $('conn-state').dataset.state = state;
  if (state !== 'online') { // a new connection watches no one yet
    presenceAsked = '';
    presenceRetries = new Map();
  }
  if (state === 'syncing') flushOutbox();
  if (state === 'online') {
    askPresence();
    askMissingGroupInfo();
    readIfVisible();
  }
  if (state === 'offline' && detail?.code === CLOSE_UNLINKED) {
    // Unlinked from another device: this id is refused from now on.
    conn.stop();
    saveSession(null);
    forgetDevice();
    showSignIn('This device was unlinked from another of your devices: sign in again.');
    return;
  }
  if (state === 'offline') renewToken();
}

function onEvent(ev) {
  switch (ev.type) {
    case 'typing':
      noteTyping(ev);
      break;
    case 'presence':
      notePresence(ev);
      break;
    case 'message':
      typingIn.get(ev.group ? `g:${ev.group}` : `u:${ev.from}`)?.delete(ev.from);
      if (store.firstSight(ev.id)) {
        // From this user: sent from another of its devices.
        const c = ev.from === store.user ? store.addOwn(ev) : store.addIncoming(ev);
        if (c.kind === 'group' && !c.name) askGroupInfo(c.group);
      }
      acks.push(ev.id);
      break;
    case 'read_state':
      if (store.firstSight(ev.id)) store.applyReadState(ev.ids || []);
      acks.push(ev.id);
      break;
    case 'receipt':
      if (store.firstSight(ev.id)) store.applyReceipt(ev);
      acks.push(ev.id);
      break;
    case 'group_event':
      if (store.firstSight(ev.id)) {
        const c = store.applyGroupEvent(ev);
        if (!c.name && !c.left) askGroupInfo(c.group);
      }
      acks.push(ev.id);
      break;
    case 'error':
      showError(`Server error ${ev.code}: ${ev.message}`);
      break;
    default:
      break;
  }
  changed();
}

// Coalesces the work after any change: save, draw, then ack what was
// drawn (so an event is acked only once it is kept and shown), then report
// reads of the open chat. A timer rather than a microtask, so that a
// backlog arriving as many frames is saved and drawn once per batch.
function changed() {
  if (changeQueued) return;
  changeQueued = true;
  setTimeout(() => {
    changeQueued = false;
    if (navigator.locks && !releaseWindow) return; // another window owns the state
    store.save();
    render();
    askPresence();
    flushAcks();
    readIfVisible();
  }, CHANGE_BATCH_MS);
}

function flushAcks() {
  // Unsent acks are simply dropped: the server pushes those events again on
  // the next connection, dedupe absorbs them, and they are acked then.
  while (acks.length > 0) {
    const ids = acks.splice(0, IDS_PER_COMMAND);
    if (!conn.post({ type: 'ack', ids })) acks = [];
  }
}

function readIfVisible() {
  if (!current || document.visibilityState !== 'visible' || !conn.open) return;
  const c = store.conv(current);
  const hadUnread = c.unread > 0;
  const ids = store.takeUnread(c);
  for (let i = 0; i < ids.length; i += IDS_PER_COMMAND) conn.post({ type: 'read', ids: ids.slice(i, i + IDS_PER_COMMAND) });
  if (ids.length > 0 || hadUnread) changed();
}

// ---- presence -------------------------------------------------------------

// Watches the peers of the 1:1 chats (the most recent PRESENCE_SUB_MAX),
// asking again only when that list changes: the server answers each with
// its state now and then every change. Only contacts are told the truth,
// and a chat becomes a contact once a message has gone either way, so a
// peer counts as changed when the chat first has one (a message from them,
// or a delivered tick), and a peer with messages that still looks never
// seen (its record may be a moment behind the message) is asked for again
// a little later, a few times.
const PRESENCE_RETRY_MS = 2000;
const PRESENCE_RETRIES = 5;
let presenceRetries = new Map(); // peer -> re-asks on this connection
let presenceRetryTimer = null;

function exchanged(c) {
  return c.msgs.some((m) => !m.mine || m.status === 'delivered' || m.status === 'read');
}

function askPresence() {
  if (!conn.open) return;
  const dms = store.convList().filter((c) => c.kind === 'dm' && c.peer !== session.user)
    .slice(0, PRESENCE_SUB_MAX);
  const key = dms.map((c) => `${c.peer}${exchanged(c) ? '+' : ''}`).join(',');
  if (key === presenceAsked) return;
  const users = dms.map((c) => c.peer);
  if (conn.post({ type: 'presence_sub', id: newCommandId('ps'), users })) presenceAsked = key;
}

function notePresence(ev) {
  presenceOf.set(ev.user, ev);
  const c = store.conv(`u:${ev.user}`);
  const never = !ev.online && !ev.last_seen;
  const tries = presenceRetries.get(ev.user) || 0;
  if (!never || !c || !exchanged(c) || tries >= PRESENCE_RETRIES || presenceRetryTimer) return;
  presenceRetries.set(ev.user, tries + 1);
  presenceRetryTimer = setTimeout(() => {
    presenceRetryTimer = null;
    presenceAsked = '';
    askPresence();
  }, PRESENCE_RETRY_MS);
}

// "online", "last seen today at 14:05", "last seen 2 Dec at 09:30", or ''
// (never seen, hidden, or not known yet).
function presenceText(user) {
  const p = presenceOf.get(user);
  if (!p) return '';
  if (p.online) return 'online';
  if (!p.last_seen) return '';
  const d = new Date(p.last_seen);
  const time = d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  const today = d.toDateString() === new Date().toDateString();
  return today ? `last seen today at ${time}`
    : `last seen ${d.toLocaleDateString([], { day: 'numeric', month: 'short' })} at ${time}`;
}

// ---- typing ---------------------------------------------------------------

function noteTyping(ev) {
  const key = ev.group ? `g:${ev.group}` : `u:${ev.from}`;
  if (!typingIn.has(key)) typingIn.set(key, new Map());
  const who = typingIn.get(key);
  const now = Date.now();
  for (const [u, until] of who) if (until <= now) who.delete(u); // lapsed: never grows
  if (ev.state === 'composing') who.set(ev.from, now + (ev.ttl_ms || 6000));
  else who.delete(ev.from);
  clearTimeout(typingTimer);
  typingTimer = setTimeout(changed, (ev.ttl_ms || 6000) + 50); // redraw when it lapses
}

// "bob is typing…" for the open chat, or '' (lapsed entries are dropped).
function typingText(key) {
  const now = Date.now();
  const who = [...(typingIn.get(key) || [])].filter(([u, until]) => until > now && u !== session.user).map(([u]) => u);
  if (who.length === 0) return '';
  return key.startsWith('u:') ? 'typing…' : `${who.join(', ')} ${who.length > 1 ? 'are' : 'is'} typing…`;
}

// While the user types: `composing` at most every TYPING_EVERY_MS;
// `paused` when the field empties or the message goes.
function sendTyping(composing) {
  const c = current && store.conv(current);
  if (!c || c.left || c.invited || !conn.open) return;
  const now = Date.now();
  if (composing && now - typingSentAt < TYPING_EVERY_MS) return;
  if (!composing && typingSentAt === 0) return;
  typingSentAt = composing ? now : 0;
  const where = c.kind === 'group' ? { group: c.group } : { to: c.peer };
  conn.post({ type: 'typing', ...where, state: composing ? 'composing' : 'paused' });
}

// ---- sending --------------------------------------------------------------

function sendMessage(c, content) {
  store.addOutgoing(c, content, newCommandId());
  scrollNext = true;
  changed();
  flushOutbox();
}

function flushOutbox() {
  for (const { key, cmd } of store.outbox()) {
    if (inFlight.has(cmd.id) || !conn.open) continue;
    inFlight.add(cmd.id);
    conn.request(cmd).then(
      (ev) => store.markSent(key, cmd.id, ev.msg_id, ev.ts),
      (e) => {
        if (RETRYABLE.has(e.code)) {
          setTimeout(flushOutbox, RETRY_SEND_MS);
          return;
        }
        store.markFailed(key, cmd.id, errorText(e));
        showError(`Message not sent: ${errorText(e)}`);
      },
    ).finally(() => {
      inFlight.delete(cmd.id);
      changed();
    });
  }
}

// ---- groups ---------------------------------------------------------------

// ---- linked devices -------------------------------------------------------

async function showDevices() {
  try {
    const ev = await conn.request({ type: 'devices', id: newCommandId('d') });
    renderDevices($('devices-list'), ev.devices || [], unlinkDevice);
  } catch (e) {
    showError(`Could not list the devices: ${errorText(e)}`);
  }
}

// The hide-last-seen setting (the server's; another device may change it):
// read when the panel opens, set when the box is ticked. Only the answer to
// the latest request sets the box: the opening read, answered after a quick
// tick, would untick it until the tick's own answer came (CI caught it).
let presenceSettingSeq = 0;
async function presenceSetting(hide) {
  const cmd = { type: 'presence_settings', id: newCommandId('h') };
  if (hide !== undefined) cmd.hide_last_seen = hide;
  const seq = ++presenceSettingSeq;
  try {
    const ev = await conn.request(cmd);
    if (seq === presenceSettingSeq) $('hide-last-seen').checked = ev.hide_last_seen === true;
  } catch (e) {
    showError(`Could not ${hide === undefined ? 'read' : 'change'} the last seen setting: ${errorText(e)}`);
  }
}

async function unlinkDevice(id) {
  try {
    await conn.request({ type: 'device_unlink', id: newCommandId('d'), device: id });
  } catch (e) {
    showError(`Could not unlink ${id}: ${errorText(e)}`);
  }
  showDevices();
}

async function groupCommand(cmd) {
  try {
    const ev = await conn.request({ ...cmd, id: newCommandId('g') });
    const c = store.setGroup(ev.group);
    changed();
    return c;
  } catch (e) {
    showError(`Group ${cmd.type.replace('group_', '')} failed: ${errorText(e)}`);
    return null;
  }
}

function askGroupInfo(group) {
  if (groupInfoAsked.has(group) || !conn.open) return;
  groupInfoAsked.add(group);
  conn.request({ type: 'group_info', id: newCommandId('g'), group }).then(
    (ev) => {
      store.setGroup(ev.group);
      changed();
    },
    (e) => {
      groupInfoAsked.delete(group);
      if (e.code === 'forbidden' || e.code === 'not_found') store.ensureConv(`g:${group}`).left = true;
      changed();
    },
  );
}

function askMissingGroupInfo() {
  for (const c of store.convList()) if (c.kind === 'group' && !c.left) askGroupInfo(c.group);
}

function parseMembers(text) {
  return text.split(/[\s,]+/).filter(Boolean);
}

// ---- media ----------------------------------------------------------------

function mediaUrl(id) {
  let p = mediaUrls.get(id);
  if (!p) {
    p = fetchMedia(session.token, id).then((blob) => URL.createObjectURL(blob));
    p.catch(() => mediaUrls.delete(id)); // retried at the next draw
    mediaUrls.set(id, p);
  }
  return p;
}

function mediaView(m) {
  const image = (m.content_type || '').startsWith('image/');
  const box = el('div', { class: 'media', 'data-media': m.id }, image ? 'loading image…' : '');
  mediaUrl(m.id).then(
    (url) => box.replaceChildren(image
      ? el('img', { src: url, alt: `image, ${sizeText(m.size)}` })
      : el('a', { href: url, download: `parley-${m.id}` }, `File: ${m.content_type}, ${sizeText(m.size)}`)),
    (e) => box.replaceChildren(el('span', { class: 'media-error' }, `media unavailable (${errorText(e)})`)),
  );
  return box;
}

function showPreview(file) {
  pendingFile = file;
  const image = file.type.startsWith('image/');
  const url = URL.createObjectURL(file);
  $('preview-media').replaceChildren(image
    ? el('img', { src: url, alt: 'preview' })
    : el('span', {}, `File: ${file.name} (${sizeText(file.size)})`));
  $('preview').hidden = false;
  $('preview-caption').focus();
}

function closePreview() {
  pendingFile = null;
  $('preview').hidden = true;
  $('preview-caption').value = '';
  $('file').value = '';
}

async function sendPreview() {
  const file = pendingFile;
  const c = store.conv(current);
  const caption = $('preview-caption').value.trim();
  closePreview();
  try {
    const up = await uploadMedia(session.token, file);
    mediaUrls.set(up.media_id, Promise.resolve(URL.createObjectURL(file)));
    const media = { id: up.media_id, content_type: up.content_type, size: up.size, sha256: up.sha256 };
    const image = file.type.startsWith('image/');
    sendMessage(c, { body: caption || (image ? '' : file.name), media });
  } catch (e) {
    if (e.status === 404) showError('This server does not take media uploads yet (POST /v1/media answered 404).');
    else showError(`Upload failed: ${errorText(e)}`);
  }
}

// ---- forwarding -----------------------------------------------------------

function openForward(m) {
  forwarding = m;
  $('forward-list').replaceChildren(
    ...store.convList().filter((c) => !c.left && !c.invited).map((c) =>
      el('li', {}, el('button', { type: 'button', 'data-key': c.key, onclick: () => forwardTo(c.key) }, convTitle(c)))),
  );
  $('forward-user').value = '';
  $('forward-dlg').showModal();
}

function forwardTo(key) {
  const m = forwarding;
  $('forward-dlg').close();
  if (!m) return;
  forwarding = null;
  sendMessage(store.ensureConv(key), { body: m.body, media: m.media, forwarded: true });
  openConv(key);
}

// ---- drawing --------------------------------------------------------------

function openConv(key) {
  current = key;
  scrollNext = true;
  $('group-panel').hidden = true;
  closePreview();
  changed();
  focusChat = narrow.matches; // the list that had focus is hidden now
}

// Back to the list (narrow screens): nothing is open, so nothing more is
// marked read, and focus returns to the conversation left.
function closeConv() {
  const left = current;
  current = null;
  closePreview();
  render();
  if (left) focusConv($('convs'), left);
}

function render() {
  const convs = store.convList();
  renderConvList($('convs'), convs, current, openConv);
  const unread = convs.reduce((n, c) => n + c.unread, 0);
  document.title = unread > 0 ? `(${unread}) Parley · ${session.user}` : `Parley · ${session.user}`;
  const c = current ? store.conv(current) : null;
  $('app').dataset.pane = c ? 'chat' : 'list';
  $('chat-empty').hidden = !!c;
  $('chat-open').hidden = !c;
  if (!c) return;
  $('chat-title').textContent = convTitle(c);
  $('chat-sub').textContent = typingText(c.key) || (c.kind === 'dm' ? presenceText(c.peer)
    : c.left ? 'You are not a member of this group'
    : c.invited ? 'You are invited: join to see its messages' : c.members.join(', '));
  $('group-join').hidden = !c.invited;
  $('group-toggle').hidden = c.kind !== 'group' || c.left;
  $('group-add').hidden = !c.admins.includes(session.user);
  $('composer').hidden = c.left || c.invited;
  if (c.kind === 'group') renderGroupPanel($('group-members'), c, session.user, (u) => groupCommand({ type: 'group_remove', group: c.group, members: [u] }));
  renderMessages($('msgs'), c, { mediaView, onForward: openForward, scroll: scrollNext });
  scrollNext = false;
  if (focusChat) $('chat-title').focus();
  focusChat = false;
}

// ---- controls -------------------------------------------------------------

function on(id, event, fn) {
  $(id).addEventListener(event, fn);
}

function wire() {
  on('error-close', 'click', () => { $('error').hidden = true; });
  on('signin-form', 'submit', async (e) => {
    e.preventDefault();
    try {
      startSession(await signIn($('signin-user').value.trim(), $('signin-token').value.trim()));
      $('error').hidden = true;
    } catch (err) {
      showError(errorText(err));
    }
  });
  on('signout', 'click', signOut);
  on('hide-last-seen', 'change', () => presenceSetting($('hide-last-seen').checked));
  on('devices-toggle', 'click', () => {
    $('devices-panel').hidden = !$('devices-panel').hidden;
    if (!$('devices-panel').hidden) {
      showDevices();
      presenceSetting();
    }
  });
  on('use-here', 'click', () => holdWindow(true));
  on('new-chat', 'submit', (e) => {
    e.preventDefault();
    const user = $('new-chat-user').value.trim();
    if (!USER_RE.test(user)) return showError(`"${user}" is not a user name`);
    $('new-chat-user').value = '';
    store.ensureConv(`u:${user}`);
    return openConv(`u:${user}`);
  });
  on('composer', 'submit', (e) => {
    e.preventDefault();
    const body = $('text').value;
    if (!body.trim() || !current) return;
    $('text').value = '';
    sendTyping(false);
    sendMessage(store.conv(current), { body });
  });
  on('text', 'input', () => sendTyping($('text').value.trim() !== ''));
  on('text', 'blur', () => sendTyping(false));
  on('back', 'click', closeConv);
  on('chat', 'keydown', (e) => {
    if (e.key === 'Escape' && narrow.matches && current && !$('preview').contains(e.target)) closeConv();
  });
  on('file', 'change', () => $('file').files[0] && showPreview($('file').files[0]));
  on('preview-send', 'click', sendPreview);
  on('preview-cancel', 'click', closePreview);
  on('forward-user', 'keydown', (e) => {
    if (e.key !== 'Enter') return;
    e.preventDefault(); // not the dialog's own submit, which would only close it
    $('forward-user-go').click();
  });
  on('forward-user-go', 'click', () => {
    const user = $('forward-user').value.trim();
    if (USER_RE.test(user)) forwardTo(`u:${user}`);
  });
  on('new-group', 'click', () => $('group-dlg').showModal());
  on('group-form', 'submit', async (e) => {
    if (e.submitter?.value !== 'create') return;
    const name = $('group-name').value.trim();
    const c = await groupCommand({ type: 'group_create', name, members: parseMembers($('group-members-input').value) });
    $('group-name').value = '';
    $('group-members-input').value = '';
    if (c) openConv(c.key);
  });
  on('group-toggle', 'click', () => { $('group-panel').hidden = !$('group-panel').hidden; });
  on('group-add', 'submit', (e) => {
    e.preventDefault();
    const members = parseMembers($('group-add-user').value);
    $('group-add-user').value = '';
    if (members.length > 0) groupCommand({ type: 'group_add', group: store.conv(current).group, members });
  });
  on('group-leave', 'click', () => groupCommand({ type: 'group_leave', group: store.conv(current).group }));
  on('group-join', 'click', () => groupCommand({ type: 'group_join', group: store.conv(current).group }));
  document.addEventListener('visibilitychange', readIfVisible);
  window.addEventListener('online', () => conn && conn.retryNow());
}

wire();
const saved = loadSession();
if (saved) startSession(saved);
else showSignIn();
