#!/usr/bin/env python3
"""tests/k8s/client.py: the client `make test-k8s` talks to the gateway
Service with (Python's standard library only: nothing to install in the
cluster's network namespace). Owns a minimal WebSocket client (RFC 6455,
client side: masked text frames, pings answered), HS256 tokens, and two
scenarios:

  client.py check HOST PORT SECRET TAG
      1:1 alice -> bob with the `delivered` and `read` receipts back to
      alice, then a group (create, invite, join) whose message reaches both
      other members. Users are suffixed with TAG, so reruns never meet old
      state. Exit 0 when every step was seen. Each answer may take 90 s:
      right after an install a pod is Ready before its Kafka consumer
      group has its partitions, and on a loaded 2-core box that took
      more than 30 s.
  client.py soak HOST PORT SECRET TAG STOPFILE
      alice sends one message every 100 ms to bob until STOPFILE exists,
      each resent with the same id until answered `sent` (connections that
      drop are reopened); bob, reconnecting likewise, acks what he gets.
      Then waits for bob to hold every message answered `sent` and prints
      the counts. Exit 0 only if none was lost: the rolling-upgrade check.
PARLEY_JWT_ISSUER and PARLEY_JWT_AUDIENCE, when set, go in the tokens.
"""
import base64
import hashlib
import hmac
import json
import os
import socket
import struct
import sys
import threading
import time

PENDING = ("message", "receipt", "group_event", "read_state")
DEBUG = os.environ.get("PARLEY_K8S_CLIENT_DEBUG") == "1"   # every event to stderr


def token(user, secret, ttl=3600):
    def b64(raw):
        return base64.urlsafe_b64encode(raw).rstrip(b"=")
    now = int(time.time())
    claims = {"sub": user, "iat": now, "exp": now + ttl}
    # A gateway configured with an issuer and audience wants them in every token.
    for claim, env in (("iss", "PARLEY_JWT_ISSUER"), ("aud", "PARLEY_JWT_AUDIENCE")):
        if os.environ.get(env):
            claims[claim] = os.environ[env]
    head = b64(b'{"alg":"HS256","typ":"JWT"}')
    body = b64(json.dumps(claims).encode())
    sig = b64(hmac.new(secret.encode(), head + b"." + body, hashlib.sha256).digest())
    return (head + b"." + body + b"." + sig).decode()


class Conn:
    """One WebSocket connection as `user`; events with an id are acked."""

    def __init__(self, host, port, secret, user):
        self.user = user
        self.sock = socket.create_connection((host, int(port)), 10)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((
            f"GET /v1/ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {token(user, secret)}\r\n\r\n").encode())
        self.buf = b""
        self.deadline = time.monotonic() + 10
        while b"\r\n\r\n" not in self.buf:
            self._read()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(head.split(b"\r\n")[0].decode(errors="replace"))
        self.parts = b""
        self.kept = []

    def _read(self):
        # One deadline for the whole recv(), whatever pings come meanwhile.
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout()
        self.sock.settimeout(left)
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed by the server")
        self.buf += data

    def _frame(self, opcode, payload):
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        self.sock.settimeout(10)
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def send(self, obj):
        self._frame(1, json.dumps(obj).encode())

    def _next_frame(self):
        while True:
            if len(self.buf) >= 2:
                b0, b1 = self.buf[0], self.buf[1]
                n, at = b1 & 0x7F, 2
                if n == 126 and len(self.buf) >= 4:
                    n, at = struct.unpack("!H", self.buf[2:4])[0], 4
                elif n == 127 and len(self.buf) >= 10:
                    n, at = struct.unpack("!Q", self.buf[2:10])[0], 10
                if n < 126 or at > 2:
                    if len(self.buf) >= at + n:
                        payload, self.buf = self.buf[at:at + n], self.buf[at + n:]
                        return b0 & 0x80, b0 & 0x0F, payload
            self._read()

    def recv(self, timeout):
        """The next event, or None after timeout seconds without one."""
        self.deadline = time.monotonic() + timeout
        try:
            while True:
                fin, opcode, payload = self._next_frame()
                if opcode == 9:
                    self._frame(10, payload)
                elif opcode == 8:
                    code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                    raise ConnectionError(f"closed by the server ({code})")
                elif opcode in (0, 1):
                    self.parts += payload
                    if fin:
                        event, self.parts = json.loads(self.parts), b""
                        if DEBUG:
                            print(f"  {self.user} <- {json.dumps(event)}", file=sys.stderr, flush=True)
                        if event.get("type") in PENDING and "id" in event:
                            self.send({"type": "ack", "ids": [event["id"]]})
                        return event
        except socket.timeout:
            return None

    def wait(self, what, pred, timeout=90):
        """The first event, already received or to come, that pred accepts.
        Events come in any order (a receipt may overtake the `synced` of
        the sender's own connection), so the others are kept for later."""
        for event in self.kept:
            if pred(event):
                self.kept.remove(event)
                return event
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            event = self.recv(deadline - time.monotonic())
            if event is None:
                break
            if event.get("type") == "error":
                raise AssertionError(f"{self.user}: error while waiting for {what}: {event}")
            if pred(event):
                return event
            self.kept.append(event)
        raise AssertionError(f"{self.user}: no {what} within {timeout} s")

    def close(self):
        self.sock.close()


STARTED = time.monotonic()


def ok(what):
    print(f"ok   {what} ({time.monotonic() - STARTED:.1f} s)", flush=True)


def check(host, port, secret, tag):
    a, b, c = (Conn(host, port, secret, f"{u}-{tag}") for u in ("alice", "bob", "carol"))
    for conn in (a, b, c):
        conn.wait("synced", lambda e: e["type"] == "synced")

    a.send({"type": "send", "id": "m1", "to": b.user, "body": f"hello {tag}"})
    msg_id = a.wait("sent", lambda e: e["type"] == "sent" and e["ref"] == "m1")["msg_id"]
    b.wait("the message", lambda e: e["type"] == "message" and e["id"] == msg_id
           and e["from"] == a.user and e["body"] == f"hello {tag}")
    ok("1:1: alice -> bob through the gateway Service")
    a.wait("delivered", lambda e: e["type"] == "receipt" and e["msg_id"] == msg_id
           and e["status"] == "delivered" and e["by"] == b.user)
    b.send({"type": "read", "ids": [msg_id]})
    a.wait("read", lambda e: e["type"] == "receipt" and e["msg_id"] == msg_id
           and e["status"] == "read")
    ok("receipts: alice got delivered, then read")

    a.send({"type": "group_create", "id": "g1", "name": f"k8s {tag}", "members": [b.user, c.user]})
    group = a.wait("group", lambda e: e["type"] == "group" and e["ref"] == "g1")["group"]["id"]
    for conn in (b, c):
        conn.wait("invited", lambda e: e["type"] == "group_event" and e["group"] == group)
        conn.send({"type": "group_join", "id": "j1", "group": group})
        conn.wait("joined", lambda e: e["type"] == "group" and e["ref"] == "j1")
    a.send({"type": "send", "id": "m2", "group": group, "body": f"to the group {tag}"})
    gmsg = a.wait("sent", lambda e: e["type"] == "sent" and e["ref"] == "m2")["msg_id"]
    for conn in (b, c):
        conn.wait("the group message", lambda e: e["type"] == "message" and e["id"] == gmsg
                  and e.get("group") == group)
    ok("group: created, both invitees joined, a message reached both")
    for conn in (a, b, c):
        conn.close()


class Soak:
    """alice sends until told to stop; bob collects; both reconnect."""

    def __init__(self, host, port, secret, tag):
        self.addr = (host, port, secret)
        self.alice, self.bob = f"alice-soak-{tag}", f"bob-soak-{tag}"
        self.sent, self.got = set(), set()
        self.reconnects = {"alice": 0, "bob": 0}
        self.done = threading.Event()
        self.deadline = 0.0
        self.lock = threading.Lock()

    def connect(self, user, give_up):
        """A new connection, retried every 200 ms; None once give_up() says so."""
        while not give_up():
            try:
                return Conn(*self.addr, user)
            except (OSError, ConnectionError):
                time.sleep(0.2)
        return None

    def too_late(self):
        return self.done.is_set() and time.monotonic() > self.deadline

    def all_in(self):
        with self.lock:
            return self.got >= self.sent

    def receive(self):
        conn = self.connect(self.bob, self.too_late)
        while conn and not (self.done.is_set() and self.all_in()) and not self.too_late():
            try:
                event = conn.recv(1)
            except (OSError, ConnectionError):
                conn.close()
                self.reconnects["bob"] += 1
                conn = self.connect(self.bob, self.too_late)
                continue
            if event and event["type"] == "message":
                with self.lock:
                    self.got.add(event["id"])
        if conn:
            conn.close()

    def send_until(self, stopfile):
        stop = lambda: os.path.exists(stopfile)
        conn, seq = self.connect(self.alice, stop), 0
        while conn and not stop():
            ref = f"s{seq}"
            while conn and not stop():   # resend with the same id until answered
                try:
                    conn.send({"type": "send", "id": ref, "to": self.bob, "body": ref})
                    deadline = time.monotonic() + 5
                    event = None
                    while time.monotonic() < deadline:
                        event = conn.recv(deadline - time.monotonic())
                        if event is None or event.get("ref") == ref:
                            break
                    if event and event["type"] == "sent":
                        with self.lock:
                            self.sent.add(event["msg_id"])
                        if seq == 0:
                            print("soak: first sent", flush=True)
                        break
                except (OSError, ConnectionError):
                    conn.close()
                    self.reconnects["alice"] += 1
                    conn = self.connect(self.alice, stop)
                time.sleep(0.2)
            seq += 1
            time.sleep(0.1)
        if conn:
            conn.close()


def soak(host, port, secret, tag, stopfile):
    s = Soak(host, port, secret, tag)
    receiver = threading.Thread(target=s.receive, daemon=True)
    receiver.start()
    s.send_until(stopfile)
    # Every message answered `sent` must reach bob within 2 minutes.
    s.deadline = time.monotonic() + 120
    s.done.set()
    receiver.join(130)
    with s.lock:
        lost = len(s.sent - s.got)
        print(f"soak: {len(s.sent)} sent, {len(s.sent & s.got)} received, {lost} lost; "
              f"reconnects: alice {s.reconnects['alice']}, bob {s.reconnects['bob']}", flush=True)
    return 0 if s.sent and not lost else 1


def main(argv):
    try:
        if len(argv) == 6 and argv[1] == "check":
            check(*argv[2:])
            return 0
        if len(argv) == 7 and argv[1] == "soak":
            return soak(*argv[2:])
    except (AssertionError, OSError, ConnectionError) as err:
        print(f"FAIL {err}", flush=True)
        return 1
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
