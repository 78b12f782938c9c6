// Owns the client's state and its persistence in localStorage: the session,
// conversations and their messages, the ids of events already applied (for
// dedupe across reloads), and the outbox of sends not yet answered `sent`.
// Every mutation of chat state goes through the functions here, so the
// rules (dedupe, ticks, unread counts) live in one place.

const SESSION_KEY = 'parley.session';
const DEVICE_KEY = 'parley.device';
const STATE_PREFIX = 'parley.state.';
const MAX_MSGS_PER_CONV = 300;
const MAX_SEEN_IDS = 5000;
const MAX_ORPHAN_MSGS = 500; // receipts kept for messages not (yet) known here

export function loadSession() {
  try {
    return JSON.parse(localStorage.getItem(SESSION_KEY)) || null;
  } catch {
    return null;
  }
}

export function saveSession(session) {
  if (session) localStorage.setItem(SESSION_KEY, JSON.stringify(session));
  else localStorage.removeItem(SESSION_KEY);
}

// This browser profile's device (the token's `dev` claim), made once: each
// profile is one device of its user, with its own pending events. Forgotten
// when the device is unlinked (its id is refused from then on).
export function deviceId() {
  let d = localStorage.getItem(DEVICE_KEY);
  if (!d) {
    const bytes = crypto.getRandomValues(new Uint8Array(6));
    d = `web-${Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('')}`;
    localStorage.setItem(DEVICE_KEY, d);
  }
  return d;
}

export function forgetDevice() {
  localStorage.removeItem(DEVICE_KEY);
}

function emptyState() {
  return { v: 1, convs: {}, seen: [], outbox: [], orphanReceipts: {} };
}

export class Store {
  constructor(user) {
    this.user = user;
    this.key = STATE_PREFIX + user;
    let s = null;
    try {
      s = JSON.parse(localStorage.getItem(this.key));
    } catch {
      s = null;
    }
    this.s = s && s.v === 1 ? s : emptyState();
    this.seen = new Set(this.s.seen);
  }

  save() {
    this.s.seen = [...this.seen].slice(-MAX_SEEN_IDS);
    if (this.seen.size > MAX_SEEN_IDS) this.seen = new Set(this.s.seen);
    localStorage.setItem(this.key, JSON.stringify(this.s));
  }

  clear() {
    localStorage.removeItem(this.key);
    this.s = emptyState();
    this.seen = new Set();
  }

  // True the first time an event id is seen; later copies are duplicates.
  firstSight(id) {
    if (this.seen.has(id)) return false;
    this.seen.add(id);
    return true;
  }

  conv(key) {
    return this.s.convs[key];
  }

  // The conversation for a key ('u:<user>' or 'g:<group id>'), made if new.
  ensureConv(key) {
    let c = this.s.convs[key];
    if (!c) {
      const group = key.startsWith('g:');
      c = {
        key,
        kind: group ? 'group' : 'dm',
        peer: group ? null : key.slice(2),
        group: group ? key.slice(2) : null,
        name: group ? null : key.slice(2),
        members: [],
        admins: [],
        invitees: [],
        invited: false, // this user is invited, not yet a member
        left: false,
        msgs: [],
        unread: 0,
        lastTs: Date.now(),
      };
      this.s.convs[key] = c;
    }
    return c;
  }

  convList() {
    return Object.values(this.s.convs).sort((a, b) => b.lastTs - a.lastTs);
  }

  push(c, msg) {
    c.msgs.push(msg);
    if (c.msgs.length > MAX_MSGS_PER_CONV) c.msgs.splice(0, c.msgs.length - MAX_MSGS_PER_CONV);
    c.lastTs = Math.max(c.lastTs, msg.ts || Date.now());
  }

  findMsg(msgId) {
    for (const c of Object.values(this.s.convs)) {
      const m = c.msgs.find((x) => x.id === msgId);
      if (m) return { c, m };
    }
    return null;
  }

  // An incoming `message` event. Returns the conversation it landed in.
  addIncoming(ev) {
    const c = this.ensureConv(ev.group ? `g:${ev.group}` : `u:${ev.from}`);
    this.push(c, {
      id: ev.id,
      from: ev.from,
      body: typeof ev.body === 'string' ? ev.body : '',
      media: ev.media || null,
      forwarded: ev.forwarded === true,
      ts: ev.ts || Date.now(),
      mine: false,
      readSent: false,
    });
    c.unread += 1;
    return c;
  }

  // A message this user sent from another of its devices: shown as its own,
  // sent, with the ticks its receipts bring. Returns its conversation.
  addOwn(ev) {
    const c = this.ensureConv(ev.group ? `g:${ev.group}` : `u:${ev.to}`);
    if (this.findMsg(ev.id)) return c; // sent from here (a note to oneself)
    this.push(c, {
      id: ev.id,
      cid: null,
      from: this.user,
      body: typeof ev.body === 'string' ? ev.body : '',
      media: ev.media || null,
      forwarded: ev.forwarded === true,
      ts: ev.ts || Date.now(),
      mine: true,
      status: 'sent',
      expect: c.kind === 'group' ? c.members.filter((u) => u !== this.user) : [c.peer],
      deliveredBy: [],
      readBy: [],
    });
    const early = this.s.orphanReceipts[ev.id] || [];
    delete this.s.orphanReceipts[ev.id];
    for (const r of early) this.applyReceipt(r);
    return c;
  }

  // A `read_state` event: these were read on another device, so they are
  // read here too (nothing is reported: that device did).
  applyReadState(ids) {
    for (const id of ids) {
      const hit = this.findMsg(id);
      if (!hit || hit.m.mine || hit.m.readSent) continue;
      hit.m.readSent = true;
      hit.c.unread = Math.max(0, hit.c.unread - 1);
    }
  }

  // A message this user is sending: shown at once with a pending tick and
  // kept in the outbox until the server answers `sent`.
  addOutgoing(c, { body, media, forwarded }, cid) {
    const msg = {
      id: null,
      cid,
      from: this.user,
      body: body || '',
      media: media || null,
      forwarded: !!forwarded,
      ts: Date.now(),
      mine: true,
      status: 'pending',
      expect: c.kind === 'group' ? c.members.filter((u) => u !== this.user) : [c.peer],
      deliveredBy: [],
      readBy: [],
    };
    this.push(c, msg);
    const cmd = { type: 'send', id: cid };
    if (c.kind === 'group') cmd.group = c.group;
    else cmd.to = c.peer;
    if (body) cmd.body = body;
    if (media) cmd.media = media.id;
    if (forwarded) cmd.forwarded = true;
    this.s.outbox.push({ key: c.key, cmd });
    return msg;
  }

  outbox() {
    return this.s.outbox;
  }

  byCid(key, cid) {
    const c = this.conv(key);
    return c ? c.msgs.find((m) => m.cid === cid) : undefined;
  }

  dropOutbox(cid) {
    this.s.outbox = this.s.outbox.filter((o) => o.cmd.id !== cid);
  }

  // The `sent` answer: the message has its server id and one tick; receipts
  // that overtook the answer (after a reload) are applied now.
  markSent(key, cid, msgId, ts) {
    this.dropOutbox(cid);
    const m = this.byCid(key, cid);
    if (!m) return;
    m.id = msgId;
    m.ts = ts || m.ts;
    if (m.status === 'pending') m.status = 'sent';
    const early = this.s.orphanReceipts[msgId] || [];
    delete this.s.orphanReceipts[msgId];
    for (const r of early) this.applyReceipt(r);
  }

  markFailed(key, cid, error) {
    this.dropOutbox(cid);
    const m = this.byCid(key, cid);
    if (!m) return;
    m.status = 'failed';
    m.error = error;
  }

  // A `receipt` event: delivered/read by one recipient. A 1:1 message takes
  // the status at once; a group message shows two ticks once every member
  // it was sent to has it, and blue ones once every one of them read it.
  applyReceipt(ev) {
    const hit = this.findMsg(ev.msg_id);
    if (!hit || !hit.m.mine) {
      this.keepOrphan(ev);
      return;
    }
    const m = hit.m;
    if (!m.deliveredBy.includes(ev.by)) m.deliveredBy.push(ev.by);
    if (ev.status === 'read' && !m.readBy.includes(ev.by)) m.readBy.push(ev.by);
    const all = (list) => m.expect.length > 0 && m.expect.every((u) => list.includes(u));
    if (all(m.readBy)) m.status = 'read';
    else if (all(m.deliveredBy)) m.status = 'delivered';
    else if (m.status === 'pending') m.status = 'sent';
  }

  // A receipt for a message this client does not know by id: one whose
  // `sent` answer has not come back yet (a resend after a reload), or one
  // sent from another device of this user. Bounded, oldest dropped first.
  keepOrphan(ev) {
    const orphans = this.s.orphanReceipts;
    const list = orphans[ev.msg_id] || [];
    list.push({ msg_id: ev.msg_id, status: ev.status, by: ev.by });
    orphans[ev.msg_id] = list.slice(-300);
    const ids = Object.keys(orphans);
    for (const id of ids.slice(0, Math.max(0, ids.length - MAX_ORPHAN_MSGS))) delete orphans[id];
  }

  // The ids of incoming messages in c not yet reported read; marks them.
  takeUnread(c) {
    const ids = [];
    for (const m of c.msgs) {
      if (!m.mine && m.id && !m.readSent) {
        m.readSent = true;
        ids.push(m.id);
      }
    }
    c.unread = 0;
    return ids;
  }

  // A group's current shape, from a `group` answer.
  setGroup(g) {
    const c = this.ensureConv(`g:${g.id}`);
    c.name = g.name;
    c.members = g.members || [];
    c.admins = g.admins || [];
    c.invitees = g.invited || [];
    c.invited = c.invitees.includes(this.user);
    c.left = !c.members.includes(this.user) && !c.invited;
    return c;
  }

  // A `group_event`: membership changes and a line in the chat. A create
  // or an add only invites; the invitee is a member once it joins.
  applyGroupEvent(ev) {
    const c = this.ensureConv(`g:${ev.group}`);
    const who = ev.members || [];
    const me = who.includes(this.user);
    const gone = ['removed', 'left', 'declined'].includes(ev.event);
    c.invitees ||= []; // saved before invitations existed
    if (ev.event === 'created') c.members = [...new Set([ev.actor, ...who])];
    if (ev.event === 'invited') c.invitees = [...new Set([...c.invitees, ...who])];
    if (ev.event === 'joined' || ev.event === 'added') c.members = [...new Set([...c.members, ...who])];
    if (ev.event === 'joined' || gone) c.invitees = c.invitees.filter((u) => !who.includes(u));
    if (gone) c.members = c.members.filter((u) => !who.includes(u));
    if (me && gone) [c.left, c.invited] = [true, false];
    if (me && ev.event === 'invited') [c.left, c.invited] = [false, true];
    if (me && ['created', 'added', 'joined'].includes(ev.event)) [c.left, c.invited] = [false, false];
    this.push(c, { id: ev.id, system: true, event: ev.event, actor: ev.actor, members: who, ts: ev.ts || Date.now() });
    return c;
  }
}
