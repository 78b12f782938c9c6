// Owns turning state into DOM: the conversation list, a chat's messages
// with ticks, the group panel. All user text goes in through textContent
// (el() below), never as HTML.

export function el(tag, attrs = {}, ...children) {
  const n = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') n.className = v;
    else if (k.startsWith('on')) n.addEventListener(k.slice(2), v);
    else n.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    n.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return n;
}

export function $(id) {
  return document.getElementById(id);
}

function clock(ts) {
  const d = new Date(ts);
  return `${String(d.getHours()).padStart(2, '0')}:${String(d.getMinutes()).padStart(2, '0')}`;
}

export function sizeText(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

export function convTitle(c) {
  if (c.kind === 'dm') return c.peer;
  return c.name || `Group ${c.group.slice(0, 10)}…`;
}

function preview(m) {
  if (!m) return '';
  if (m.system) return systemText(m);
  const who = m.mine ? 'You: ' : '';
  if (m.body) return who + m.body;
  if (m.media) return `${who}${m.media.content_type.startsWith('image/') ? 'Photo' : 'File'}`;
  return who;
}

// Text only a screen reader reads (style.css hides it from view).
function spoken(text) {
  return el('span', { class: 'vh' }, text);
}

// Each conversation is a button inside its list item, so the list is
// reachable and opened from the keyboard and announced as a list.
export function renderConvList(ul, convs, currentKey, onOpen) {
  const focused = ul.contains(document.activeElement) ? document.activeElement.closest('.conv')?.dataset.key : null;
  ul.replaceChildren(
    ...convs.map((c) =>
      el(
        'li',
        { class: `conv${c.key === currentKey ? ' current' : ''}`, 'data-key': c.key },
        el('button', { type: 'button', class: 'conv-open', 'aria-current': c.key === currentKey ? 'true' : null, onclick: () => onOpen(c.key) },
          el('span', { class: 'conv-top' },
            el('span', { class: 'conv-name' }, convTitle(c)),
            c.unread > 0 ? [el('span', { class: 'unread' }, String(c.unread)), spoken(' unread')] : null),
          el('span', { class: 'conv-last' }, preview(c.msgs[c.msgs.length - 1]))),
      ),
    ),
  );
  if (focused) focusConv(ul, focused); // redrawing must not drop keyboard focus
}

export function focusConv(ul, key) {
  for (const li of ul.children) if (li.dataset.key === key) li.querySelector('button').focus();
}

function systemText(m) {
  const who = m.members.join(', ');
  switch (m.event) {
    case 'created': {
      const others = m.members.filter((u) => u !== m.actor);
      return others.length ? `${m.actor} created the group with ${others.join(', ')}` : `${m.actor} created the group`;
    }
    case 'added': return `${m.actor} added ${who}`;
    case 'invited': return `${m.actor} invited ${who}`;
    case 'joined': return `${who} joined`;
    case 'declined': return `${who} declined the invitation`;
    case 'removed': return `${m.actor} removed ${who}`;
    case 'left': return `${who} left`;
    default: return `${m.actor}: ${m.event}`;
  }
}

const TICKS = {
  pending: ['', 'Sending'], // a clock, drawn by style.css
  sent: ['✓', 'Sent'],
  delivered: ['✓✓', 'Delivered'],
  read: ['✓✓', 'Read'],
  failed: ['!', 'Not sent'],
};

function ticks(m) {
  const [mark, label] = TICKS[m.status] || TICKS.pending;
  return el('span', { class: `ticks ${m.status}`, 'data-status': m.status, title: m.error || label },
    el('span', { 'aria-hidden': 'true' }, mark), spoken(label));
}

// mediaView(media, mine) returns the element that shows an attachment.
function bubble(m, c, { mediaView, onForward }) {
  const group = c.kind === 'group';
  return el(
    'li',
    { class: `msg ${m.mine ? 'mine' : 'theirs'}`, 'data-id': m.id || '', 'data-cid': m.cid || '' },
    group && !m.mine ? el('div', { class: 'from' }, m.from) : null,
    m.forwarded ? el('div', { class: 'forwarded' }, '↪ Forwarded') : null,
    m.media ? mediaView(m.media) : null,
    m.body ? el('div', { class: 'body' }, m.body) : null,
    m.status === 'failed' ? el('div', { class: 'failed-why' }, `Not sent: ${m.error}`) : null,
    el('div', { class: 'meta' },
      m.id ? el('button', { type: 'button', class: 'fwd', title: 'Forward', 'aria-label': 'Forward', onclick: () => onForward(m) }, '↪') : null,
      el('span', { class: 'time' }, clock(m.ts)),
      m.mine ? ticks(m) : null),
  );
}

export function renderMessages(ol, c, handlers) {
  const atBottom = ol.scrollHeight - ol.scrollTop - ol.clientHeight < 40;
  const focused = ol.contains(document.activeElement) ? document.activeElement.closest('.msg')?.dataset.id : null;
  ol.replaceChildren(
    ...c.msgs.map((m) =>
      m.system
        ? el('li', { class: 'system', 'data-id': m.id }, systemText(m))
        : bubble(m, c, handlers)),
  );
  if (atBottom || handlers.scroll) ol.scrollTop = ol.scrollHeight;
  // A receipt redraws the chat: a keyboard user's Forward button keeps focus.
  if (focused) [...ol.children].find((li) => li.dataset.id === focused)?.querySelector('.fwd')?.focus();
}

// The linked devices (a `devices` answer): when each was last seen, which
// are online, and an Unlink button on every one but this.
export function renderDevices(ul, devices, onUnlink) {
  ul.replaceChildren(
    ...devices.map((d) =>
      el('li', { class: 'member device', 'data-device': d.id },
        el('span', {}, d.current ? `${d.id} (this device)` : d.id),
        el('span', { class: 'sub' }, d.online ? 'online' : `last seen ${new Date(d.last_seen).toLocaleString()}`),
        d.current ? null : el('button', { type: 'button', class: 'remove', onclick: () => onUnlink(d.id) }, 'Unlink'))),
  );
}

export function renderGroupPanel(ul, c, me, onRemove) {
  const admin = c.admins.includes(me);
  ul.replaceChildren(
    ...c.members.map((u) =>
      el('li', { class: 'member', 'data-user': u },
        el('span', {}, u === me ? `${u} (you)` : u),
        c.admins.includes(u) ? el('span', { class: 'admin' }, 'admin') : null,
        admin && u !== me ? el('button', { type: 'button', class: 'remove', onclick: () => onRemove(u) }, 'Remove') : null)),
  );
}
