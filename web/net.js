// Owns the client's traffic with the gateway: the WebSocket (commands with
// answers matched by ref, events, reconnect with backoff, a liveness ping)
// and the HTTP calls (dev token, media upload and download).

const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 30000;
const PING_EVERY_MS = 25000;
const PONG_WAIT_MS = 10000;
const ANSWER_WAIT_MS = 30000;

// An error the server answered (an `error` event or an HTTP error body).
export class ServerError extends Error {
  constructor(code, message, status) {
    super(message || code);
    this.code = code;
    this.status = status;
  }
}

async function httpError(res) {
  let code = `http_${res.status}`;
  let message = `HTTP ${res.status}`;
  try {
    const o = await res.json();
    code = o.code || code;
    message = o.message || message;
  } catch {
    // not JSON: keep the status line
  }
  return new ServerError(code, message, res.status);
}

// POST /v1/dev/token (dev mode only; 404 elsewhere), for user's device.
export async function devToken(user, device) {
  const res = await fetch('/v1/dev/token', {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ user, device }),
  });
  if (!res.ok) throw await httpError(res);
  return (await res.json()).token;
}

// POST /v1/media: uploads a File/Blob, answers {media_id, size, sha256, content_type}.
export async function uploadMedia(token, blob) {
  const res = await fetch('/v1/media', {
    method: 'POST',
    headers: {
      Authorization: `Bearer ${token}`,
      'Content-Type': blob.type || 'application/octet-stream',
    },
    body: blob,
  });
  if (!res.ok) throw await httpError(res);
  return res.json();
}

// GET /v1/media/<id> with the token (an <img src> cannot send it): a Blob.
export async function fetchMedia(token, id) {
  const res = await fetch(`/v1/media/${encodeURIComponent(id)}`, {
    headers: { Authorization: `Bearer ${token}` },
  });
  if (!res.ok) throw await httpError(res);
  return res.blob();
}

// The user id (`sub`) and expiry (`exp`, seconds) a JWT claims, unverified:
// only to label the session and to notice expiry before the server does.
export function tokenClaims(token) {
  const part = String(token).split('.')[1];
  if (!part) throw new Error('not a token (expected header.payload.signature)');
  const json = atob(part.replace(/-/g, '+').replace(/_/g, '/'));
  const claims = JSON.parse(json);
  if (typeof claims.sub !== 'string') throw new Error('the token names no user (sub)');
  return { user: claims.sub, exp: Number(claims.exp) || 0 };
}

let idSeq = 0;
// A command id unique across reloads (the server dedupes sends by it).
export function newCommandId(prefix = 'c') {
  idSeq += 1;
  const rnd = Math.random().toString(36).slice(2, 8);
  return `${prefix}${Date.now().toString(36)}${rnd}${idSeq}`;
}

// One logical connection that keeps itself open until stop().
// Callbacks: onEvent(ev) for every event that is not an answer,
// onState(state, detail) with 'connecting' | 'syncing' | 'online' | 'offline'.
export class Connection {
  constructor({ url, token, onEvent, onState }) {
    this.url = url;
    this.token = token;
    this.onEvent = onEvent;
    this.onState = onState;
    this.ws = null;
    this.pending = new Map(); // ref -> {resolve, reject, timer}
    this.attempt = 0;
    this.stopped = false;
    this.retryTimer = null;
    this.pingTimer = null;
    this.pongTimer = null;
    this.open = false;
  }

  start() {
    this.stopped = false;
    this.connect();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.retryTimer);
    this.teardown();
    if (this.ws) this.ws.close(1000, 'bye');
    this.ws = null;
  }

  // Skips the remaining backoff (the browser came back online).
  retryNow() {
    if (this.stopped || this.open || !this.retryTimer) return;
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    this.connect();
  }

  connect() {
    this.retryTimer = null;
    if (this.stopped) return;
    this.onState('connecting');
    // The token rides as a subprotocol, not in the URL, where proxies log it.
    const ws = new WebSocket(this.url, ['parley.v1', `bearer.${this.token}`]);
    this.ws = ws;
    ws.onopen = () => {
      this.open = true;
      this.onState('syncing');
      this.schedulePing();
    };
    ws.onmessage = (m) => this.receive(m.data);
    ws.onclose = (e) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.teardown();
      if (!this.stopped) this.retryLater(e);
    };
  }

  retryLater(closeEvent) {
    const cap = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** this.attempt);
    const delay = Math.round(cap / 2 + (Math.random() * cap) / 2);
    this.attempt += 1;
    // Armed before onState, which may stop() this connection for good.
    this.retryTimer = setTimeout(() => this.connect(), delay);
    this.onState('offline', { delay, code: closeEvent.code, reason: closeEvent.reason });
  }

  // Fails every command still waiting: its answer can no longer come on
  // this socket (the caller resends what must survive, with the same id).
  teardown() {
    this.open = false;
    clearTimeout(this.pingTimer);
    clearTimeout(this.pongTimer);
    for (const p of this.pending.values()) {
      clearTimeout(p.timer);
      p.reject(new ServerError('disconnected', 'connection lost before the answer'));
    }
    this.pending.clear();
  }

  receive(text) {
    let ev;
    try {
      ev = JSON.parse(text);
    } catch {
      return;
    }
    clearTimeout(this.pongTimer);
    this.schedulePing();
    if (ev.type === 'synced') {
      this.attempt = 0;
      this.onState('online');
    }
    const waiter = ev.ref !== undefined ? this.pending.get(ev.ref) : undefined;
    if (waiter) {
      this.pending.delete(ev.ref);
      clearTimeout(waiter.timer);
      if (ev.type === 'error') waiter.reject(new ServerError(ev.code, ev.message));
      else waiter.resolve(ev);
      return;
    }
    if (ev.type !== 'pong') this.onEvent(ev);
  }

  // Closes a connection that stays silent after our ping: a dead network
  // path is otherwise only noticed by the server.
  schedulePing() {
    clearTimeout(this.pingTimer);
    this.pingTimer = setTimeout(() => {
      this.post({ type: 'ping', id: newCommandId('p') });
      this.pongTimer = setTimeout(() => this.ws && this.ws.close(4000, 'no pong'), PONG_WAIT_MS);
    }, PING_EVERY_MS);
  }

  // Sends a command without an answer (ack, read). False when not open.
  post(cmd) {
    if (!this.open || !this.ws) return false;
    this.ws.send(JSON.stringify(cmd));
    return true;
  }

  // Sends a command with an id; resolves with its answer, rejects with a
  // ServerError (the server's `error`, or 'disconnected' / 'timeout').
  request(cmd) {
    return new Promise((resolve, reject) => {
      if (!this.post(cmd)) {
        reject(new ServerError('disconnected', 'not connected'));
        return;
      }
      const timer = setTimeout(() => {
        this.pending.delete(cmd.id);
        reject(new ServerError('timeout', `no answer to ${cmd.type} in ${ANSWER_WAIT_MS / 1000} s`));
      }, ANSWER_WAIT_MS);
      this.pending.set(cmd.id, { resolve, reject, timer });
    });
  }
}
