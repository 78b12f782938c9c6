/* Owns one upgraded WebSocket connection: its wslay context, the bytes MHD
 * read past the handshake, the frame rules of PROTOCOL.md (1003 binary,
 * 1007 invalid UTF-8, 1009 too big), the send-queue ceiling, ping and idle
 * timers. Runs only on its worker's thread.
 *
 * The wslay context is 8.8 KiB of fixed buffers, more than the whole
 * per-connection budget, and an idle connection needs none of it: it is
 * made on the first byte in or out and freed ("parked") once the
 * connection has been quiet for PARLEY_WS_PARK_MS with no frame part-read
 * or part-written. Part-read is known by counting: every byte handed to
 * wslay belongs to a frame whose header and payload lengths its frame
 * callbacks report, so when the bytes handed in equal the bytes of the
 * frames ended, wslay holds none of the next frame.
 *
 * Writes: wslay's send callback only appends to the connection's output
 * buffer (made on demand, freed once drained); ws_conn_write sends it, so
 * all frames queued in one reactor turn leave in one send() instead of two
 * per frame (wslay hands over header and payload separately). */
#include "common.h"
#include "gateway.h"
#include "log.h"
#include "utf8.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <microhttpd.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <wslay/wslay.h>

#define CONN_CLOSE_GRACE_MS 2000 /* wait this long for the peer's close */
/* Bytes read from one socket per reactor turn: the socket is level
 * triggered, so what is left is read on the next turn, after every other
 * ready connection of the worker had its turn (a flooding client must not
 * starve its neighbours). 64 KiB is a few hundred small commands. */
#define CONN_READ_BUDGET (64u * 1024)
/* What a queued message costs beyond its payload (wslay's message struct
 * and malloc's overhead): a pong to an empty ping is 0 payload bytes but
 * not free, so the send-queue ceiling counts messages too, past the first
 * CONN_MSG_FREE (two sync pages of events: a sync written slowly must not
 * meet the ceiling for its message count; a pong flood runs far past it). */
#define CONN_MSG_COST 64
#define CONN_MSG_FREE 4096
#define CONN_OBUF_MIN 1024       /* output buffer: first size, doubling */
#define CONN_OBUF_MAX (64 << 10) /* ... up to this; wslay waits beyond it */

struct conn {
    gw *g;
    worker *w;
    uint64_t id;
    int fd, epfd;
    uint32_t mask;                   /* events registered with epoll */
    struct MHD_UpgradeResponseHandle *urh;
    wslay_event_context_ptr ctx;     /* NULL while parked */
    uint64_t in_bytes, framed_bytes; /* handed to wslay / in frames ended */
    uint64_t frame_bytes;            /* header + payload of the current frame */
    uint32_t turn_read;              /* bytes read this turn (CONN_READ_BUDGET) */
    int frag_open;                   /* a fragmented data message is unfinished */
    uint32_t frags;                  /* frames of the current data message */
    int parked;                      /* its context was freed at least once */
    int64_t last_io_ms;
    char *obuf;                      /* framed bytes not yet sent: [ooff, olen) */
    size_t ooff, olen, ocap;
    char *extra;                     /* MHD's extra_in, fed to wslay first */
    size_t extra_len, extra_off;
    int64_t last_recv_ms, last_ping_ms, close_deadline_ms;
    int dead, dirty, synced;
    int lingering;                   /* close sent, write side shut: draining */
    int held_overflow;               /* held events dropped: the sync has them */
    int64_t sync_from;               /* > 0: the next sync page, not asked yet */
    mail *held, *held_tail;          /* live events waiting for the sync */
    size_t held_bytes;
    char user[65];
    char dev[65];                /* the token's device */
};

static ssize_t ws_recv_cb(wslay_event_context_ptr ctx, uint8_t *buf, size_t len,
                          int flags, void *user_data)
{
    conn *c = user_data;
    if (c->extra_off < c->extra_len) {
        size_t n = PX_MIN(len, c->extra_len - c->extra_off);
        memcpy(buf, c->extra + c->extra_off, n);
        c->extra_off += n;
        if (c->extra_off == c->extra_len) {
            free(c->extra);
            c->extra = NULL;
            c->extra_len = c->extra_off = 0;
        }
        c->last_recv_ms = px_mono_ms();
        c->in_bytes += n;
        return (ssize_t)n;
    }
    if (c->turn_read >= CONN_READ_BUDGET) {
        wslay_event_set_error(ctx, WSLAY_ERR_WOULDBLOCK);
        return -1;
    }
    ssize_t r;
    len = PX_MIN(len, (size_t)(CONN_READ_BUDGET - c->turn_read));
    while ((r = recv(c->fd, buf, len, 0)) < 0 && errno == EINTR)
        ;
    if (r > 0) {
        c->last_recv_ms = px_mono_ms();
        c->in_bytes += (uint64_t)r;
        c->turn_read += (uint32_t)r;
        return r;
    }
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
        wslay_event_set_error(ctx, WSLAY_ERR_WOULDBLOCK);
    else
        wslay_event_set_error(ctx, WSLAY_ERR_CALLBACK_FAILURE);
    return -1;
}

/* Takes what fits of wslay's bytes into the output buffer; when it is
 * full, wslay keeps the rest until ws_conn_write has sent some. */
static ssize_t ws_send_cb(wslay_event_context_ptr ctx, const uint8_t *data, size_t len,
                          int flags, void *user_data)
{
    conn *c = user_data;
    if (c->ooff > 0 && c->olen == c->ocap) {
        memmove(c->obuf, c->obuf + c->ooff, c->olen - c->ooff);
        c->olen -= c->ooff;
        c->ooff = 0;
    }
    if (c->olen + len > c->ocap && c->ocap < CONN_OBUF_MAX) {
        size_t cap = c->ocap ? c->ocap : CONN_OBUF_MIN;
        while (cap < c->olen + len && cap < CONN_OBUF_MAX)
            cap *= 2;
        c->obuf = px_realloc(c->obuf, cap);
        c->ocap = cap;
    }
    size_t n = PX_MIN(len, c->ocap - c->olen);
    if (n == 0) {
        wslay_event_set_error(ctx, WSLAY_ERR_WOULDBLOCK);
        return -1;
    }
    memcpy(c->obuf + c->olen, data, n);
    c->olen += n;
    return (ssize_t)n;
}

static int ws_conn_has_output(const conn *c)
{
    return c->olen > c->ooff || (c->ctx != NULL && wslay_event_want_write(c->ctx));
}

/* Frames what wslay has queued into the output buffer and sends it, one
 * send() per buffer-full, until both are empty or the socket is full.
 * PX_ERROR when the connection broke. */
static int ws_conn_write(conn *c)
{
    while (ws_conn_has_output(c)) {
        if (c->ctx != NULL && wslay_event_want_write(c->ctx) && wslay_event_send(c->ctx) != 0)
            return PX_ERROR;
        if (c->olen == c->ooff)
            break; /* wslay wants to write but produced nothing: write disabled */
        ssize_t r;
        while ((r = send(c->fd, c->obuf + c->ooff, c->olen - c->ooff, MSG_NOSIGNAL)) < 0 &&
               errno == EINTR)
            ;
        if (r < 0)
            return errno == EAGAIN || errno == EWOULDBLOCK ? PX_OK : PX_ERROR;
        c->last_io_ms = px_mono_ms();
        c->ooff += (size_t)r;
        if (c->ooff < c->olen)
            return PX_OK; /* the socket is full: EPOLLOUT brings us back */
        c->ooff = c->olen = 0;
    }
    free(c->obuf); /* drained: an idle connection holds no buffer */
    c->obuf = NULL;
    c->ocap = 0;
    return PX_OK;
}

/* Client frames are masked (wslay refuses others): 2 bytes, the extended
 * length, the 4-byte key. A count that disagrees with the wire (say a
 * non-minimal length) only keeps the connection from parking. */
static void ws_on_frame_start(wslay_event_context_ptr ctx,
                              const struct wslay_event_on_frame_recv_start_arg *arg,
                              void *user_data)
{
    conn *c = user_data;
    uint64_t len = arg->payload_length;
    c->frame_bytes = 2 + (len < 126 ? 0 : len <= 0xffff ? 2 : 8) + 4 + len;
    if (arg->opcode == WSLAY_TEXT_FRAME || arg->opcode == WSLAY_BINARY_FRAME ||
        arg->opcode == WSLAY_CONTINUATION_FRAME)
        c->frag_open = !arg->fin;
    /* wslay keeps each fragment as a chunk of its own (~90 bytes for one
     * byte of payload): the frame count bounds that overhead as
     * PARLEY_MAX_FRAME_BYTES bounds the payload. */
    if (arg->opcode > WSLAY_BINARY_FRAME)
        return; /* control frames may come between fragments */
    c->frags = arg->opcode == WSLAY_CONTINUATION_FRAME ? c->frags + 1 : 1;
    if (c->frags > (uint32_t)c->g->cfg.max_fragments && c->close_deadline_ms == 0) {
        metric_add(c->g->m.frag_closed, 1);
        ws_conn_close(c, WSLAY_CODE_MESSAGE_TOO_BIG, "too many fragments");
        wslay_event_shutdown_read(ctx);
    }
}

static void ws_on_frame_end(wslay_event_context_ptr ctx, void *user_data)
{
    conn *c = user_data;
    c->framed_bytes += c->frame_bytes;
    c->frame_bytes = 0;
}

static void ws_on_msg(wslay_event_context_ptr ctx, const struct wslay_event_on_msg_recv_arg *arg,
                      void *user_data)
{
    conn *c = user_data;
    if (arg->opcode == WSLAY_BINARY_FRAME) {
        ws_conn_close(c, WSLAY_CODE_UNSUPPORTED_DATA, "binary frames are not supported");
        return;
    }
    if (arg->opcode != WSLAY_TEXT_FRAME)
        return; /* ping answered and close handled by wslay; pong only counts as life */
    metric_add(c->g->m.frames_in, 1);
    if (!utf8_valid(arg->msg, arg->msg_length)) {
        ws_conn_close(c, WSLAY_CODE_INVALID_FRAME_PAYLOAD_DATA, "invalid UTF-8");
        return;
    }
    commands_handle(c->g, c, (const char *)arg->msg, arg->msg_length);
}

conn *ws_conn_new(gw *g, int fd, struct MHD_UpgradeResponseHandle *urh, const char *user,
                  const char *dev, const char *extra_in, size_t extra_len)
{
    conn *c = px_calloc(1, sizeof(*c));
    c->g = g;
    c->fd = fd;
    c->epfd = -1;
    c->urh = urh;
    snprintf(c->user, sizeof(c->user), "%s", user);
    snprintf(c->dev, sizeof(c->dev), "%s", dev);
    if (extra_len > 0) {
        c->extra = px_malloc(extra_len);
        memcpy(c->extra, extra_in, extra_len);
        c->extra_len = extra_len;
    }
    c->last_recv_ms = c->last_ping_ms = c->last_io_ms = px_mono_ms();
    return c;
}

/* The context for this connection, made if parked; NULL (connection
 * killed) when memory is short. */
static wslay_event_context_ptr ws_ctx(conn *c)
{
    static const struct wslay_event_callbacks cbs = {
        .recv_callback = ws_recv_cb,
        .send_callback = ws_send_cb,
        .on_frame_recv_start_callback = ws_on_frame_start,
        .on_frame_recv_end_callback = ws_on_frame_end,
        .on_msg_recv_callback = ws_on_msg,
    };
    if (c->ctx != NULL)
        return c->ctx;
    if (wslay_event_context_server_init(&c->ctx, &cbs, c) != 0) {
        c->ctx = NULL;
        c->dead = 1;
        log_warn("wslay context: out of memory", "{s:s}", "user", c->user);
        return NULL;
    }
    wslay_event_config_set_max_recv_msg_length(c->ctx, (uint64_t)c->g->cfg.max_frame_bytes);
    c->in_bytes = c->framed_bytes = c->frame_bytes = 0;
    c->frag_open = 0;
    if (c->parked)
        metric_add(c->g->m.unparked, 1);
    return c->ctx;
}

int ws_conn_attach(conn *c, worker *w, uint64_t id, int epfd, char *err, size_t errlen)
{
    c->w = w;
    c->id = id;
    struct epoll_event ev = { .events = EPOLLIN, .data.ptr = c };
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0)
        return px_err(err, errlen, "epoll_ctl add: %s", strerror(errno));
    c->epfd = epfd;
    c->mask = EPOLLIN;
    return PX_OK;
}

static int ws_conn_over_ceiling(conn *c);

static void ws_conn_kill(conn *c, const char *why)
{
    if (!c->dead)
        log_debug("connection closed", "{s:s, s:s}", "user", c->user, "why", why);
    c->dead = 1;
}

/* Reads and drops what the peer still sends after our close, until it
 * closes too (or the close grace ends, ws_conn_tick). */
static void ws_conn_drain(conn *c)
{
    char buf[4096];
    ssize_t r;
    uint32_t budget = CONN_READ_BUDGET;
    while (budget > 0) {
        while ((r = recv(c->fd, buf, sizeof(buf), 0)) < 0 && errno == EINTR)
            ;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        if (r <= 0) {
            ws_conn_kill(c, "closed");
            return;
        }
        budget = (uint32_t)r >= budget ? 0 : budget - (uint32_t)r;
    }
}

void ws_conn_on_io(conn *c, uint32_t events)
{
    if (c->dead)
        return;
    if (events & (EPOLLERR | EPOLLHUP)) {
        ws_conn_kill(c, "socket error or hangup");
        return;
    }
    if (c->lingering) {
        ws_conn_drain(c);
        return;
    }
    c->last_io_ms = px_mono_ms();
    c->turn_read = 0;
    if ((events & EPOLLIN) && ws_ctx(c) != NULL && wslay_event_want_read(c->ctx) &&
        wslay_event_recv(c->ctx) != 0) {
        ws_conn_kill(c, "read failed or protocol error");
        return;
    }
    /* wslay answers pings by itself: a client that pings and never reads
     * fills the queue as surely as one that never reads its messages. */
    if (ws_conn_over_ceiling(c))
        return;
    if ((events & EPOLLOUT) && ws_conn_write(c) != PX_OK)
        ws_conn_kill(c, "write failed");
}

/* Bytes the send queue holds, control frames (pongs, pings) included. */
static size_t ws_conn_queued(conn *c)
{
    size_t n = c->ctx != NULL ? wslay_event_get_queued_msg_count(c->ctx) : 0;
    return (c->ctx != NULL ? wslay_event_get_queued_msg_length(c->ctx) : 0) +
           (n > CONN_MSG_FREE ? (n - CONN_MSG_FREE) * CONN_MSG_COST : 0) + c->olen - c->ooff;
}

/* Past PARLEY_SEND_QUEUE_BYTES the client stopped reading (a sync comes
 * in pages far below the ceiling): accept nothing more for it (wslay
 * queues no pongs once a close is queued) and close with 1013 behind what
 * is queued, as any close: the close grace bounds how long that is held
 * (a peer that never reads is dropped then). Dropping the socket at once
 * lost the close frame whenever the socket was full, and closing it with
 * the peer's frames unread answered them with a reset that could overtake
 * the close frame. 1 if it started the close now. */
static int ws_conn_over_ceiling(conn *c)
{
    if (c->close_deadline_ms != 0 || c->ctx == NULL ||
        ws_conn_queued(c) <= (size_t)c->g->cfg.send_queue_bytes)
        return 0;
    metric_add(c->g->m.slow_closed, 1);
    log_debug("closing", "{s:s, s:s}", "user", c->user, "why", "send queue over its ceiling");
    ws_conn_close(c, 1013, "send queue full");
    if (ws_conn_write(c) != PX_OK)
        ws_conn_kill(c, "write failed");
    return 1;
}

void ws_conn_queue_text(conn *c, const char *s, size_t len)
{
    if (c->dead || c->close_deadline_ms != 0 || ws_ctx(c) == NULL)
        return;
    struct wslay_event_msg msg = { WSLAY_TEXT_FRAME, (const uint8_t *)s, len };
    int rc = wslay_event_queue_msg(c->ctx, &msg);
    if (rc == WSLAY_ERR_NO_MORE_MSG) {
        /* wslay queued a close of its own (a frame over the limit, a
         * protocol error, the peer's close): the connection is closing and
         * the message goes nowhere. Killing it here closed the socket with
         * the peer's frame unread, and the reset could overtake the close
         * frame (the client saw no 1009: test_messaging, 1 run in ~15). */
        if (c->close_deadline_ms == 0)
            c->close_deadline_ms = px_mono_ms() + CONN_CLOSE_GRACE_MS;
        return;
    }
    if (rc != 0) {
        ws_conn_kill(c, "queue failed");
        return;
    }
    ws_conn_over_ceiling(c);
}

void ws_conn_queue_event(conn *c, const mail *m)
{
    if (m->seq >= 0 && dedupe_seen(worker_dedupe(c->w), c->id, m->seq)) {
        metric_add(c->g->m.dups_dropped, 1);
        return;
    }
    ws_conn_queue_text(c, m->data, m->len);
}

void ws_conn_close(conn *c, uint16_t code, const char *reason)
{
    if (c->dead || c->close_deadline_ms != 0 || ws_ctx(c) == NULL)
        return;
    wslay_event_queue_close(c->ctx, code, (const uint8_t *)reason, strlen(reason));
    c->close_deadline_ms = px_mono_ms() + CONN_CLOSE_GRACE_MS;
}

static void ws_conn_free_held(conn *c);

void ws_conn_hold(conn *c, mail *m)
{
    if (c->held_overflow) {
        free(m);
        return;
    }
    m->next = NULL;
    if (c->held_tail != NULL)
        c->held_tail->next = m;
    else
        c->held = m;
    c->held_tail = m;
    c->held_bytes += m->len;
    if (c->held_bytes > (size_t)c->g->cfg.send_queue_bytes) {
        /* Dropping is safe: a live push reaches us before "synced" only if
         * message-store stored its event before the sync's last scan (both
         * go to this gateway's topic keyed by the user, in the order
         * message-store made them), so a page of this sync carries it. */
        metric_add(c->g->m.held_dropped, 1);
        ws_conn_free_held(c);
        c->held_overflow = 1;
    }
}

static void ws_conn_free_held(conn *c)
{
    while (c->held != NULL) {
        mail *next = c->held->next;
        free(c->held);
        c->held = next;
    }
    c->held_tail = NULL;
    c->held_bytes = 0;
}

void ws_conn_synced(conn *c)
{
    static const char synced[] = "{\"type\":\"synced\"}";
    if (c->synced)
        return;
    c->synced = 1;
    ws_conn_queue_text(c, synced, sizeof(synced) - 1);
    /* Held events up to the ceiling, on top of a last page still queued
     * (a quarter of the ceiling plus up to 512 KiB), passed the ceiling and
     * closed a client that was reading (1013): drop them instead, for the
     * reason ws_conn_hold gives (this sync's pages carried each of them). */
    if (ws_conn_queued(c) + c->held_bytes > (size_t)c->g->cfg.send_queue_bytes) {
        metric_add(c->g->m.held_dropped, 1);
        ws_conn_free_held(c);
        return;
    }
    /* Those a page carried are dropped here (ws_conn_queue_event). */
    for (mail *m = c->held; m != NULL; m = m->next)
        ws_conn_queue_event(c, m);
    ws_conn_free_held(c);
}

void ws_conn_sync_more(conn *c, int64_t from_seq)
{
    if (!c->synced)
        c->sync_from = from_seq;
}

/* A page is written down to a quarter of the queue: the next one fits. */
static void ws_conn_sync_pump(conn *c)
{
    if (c->sync_from <= 0 || c->close_deadline_ms != 0 ||
        ws_conn_queued(c) > (size_t)c->g->cfg.send_queue_bytes / 4)
        return;
    int64_t from = c->sync_from;
    c->sync_from = 0;
    commands_sync(c->g, c, from);
}

int ws_conn_is_synced(const conn *c)
{
    return c->synced;
}

int ws_conn_flush(conn *c)
{
    if (c->dead)
        return PX_ERROR;
    if (ws_conn_write(c) != PX_OK) {
        ws_conn_kill(c, "write failed");
        return PX_ERROR;
    }
    ws_conn_sync_pump(c);
    if (c->dead)
        return PX_ERROR;
    int rd = c->ctx == NULL || wslay_event_want_read(c->ctx);
    int wr = ws_conn_has_output(c);
    if (!rd && !wr && !c->lingering) {
        /* Closing a socket with unread bytes (the rest of an oversized
         * frame, say) makes the kernel send a reset, which can overtake
         * the close frame just written: the client then saw no 1009 or
         * 1007. So shut the write side and drain until the peer closes. */
        c->lingering = 1;
        shutdown(c->fd, SHUT_WR);
        if (c->close_deadline_ms == 0)
            c->close_deadline_ms = px_mono_ms() + CONN_CLOSE_GRACE_MS;
    }
    rd |= c->lingering;
    uint32_t mask = (rd ? EPOLLIN : 0) | (wr ? EPOLLOUT : 0);
    if (mask != c->mask) {
        struct epoll_event ev = { .events = mask, .data.ptr = c };
        if (epoll_ctl(c->epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0) {
            ws_conn_kill(c, "epoll_ctl failed");
            return PX_ERROR;
        }
        c->mask = mask;
    }
    return PX_OK;
}

void ws_conn_tick(conn *c, int64_t now)
{
    if (c->dead)
        return;
    if (c->close_deadline_ms != 0 && now >= c->close_deadline_ms) {
        ws_conn_kill(c, "peer did not complete the close");
        return;
    }
    if (now - c->last_recv_ms >= c->g->cfg.idle_ms) {
        ws_conn_close(c, WSLAY_CODE_GOING_AWAY, "idle");
        return;
    }
    if (now - c->last_ping_ms >= c->g->cfg.ping_ms && ws_ctx(c) != NULL) {
        struct wslay_event_msg ping = { WSLAY_PING, NULL, 0 };
        wslay_event_queue_msg(c->ctx, &ping);
        c->last_ping_ms = now;
    }
}

int ws_conn_park(conn *c, int64_t now)
{
    if (c->ctx == NULL || c->dead || c->close_deadline_ms != 0 || c->extra != NULL ||
        c->olen > c->ooff ||
        now - c->last_io_ms < c->g->cfg.ws_park_ms)
        return 0;
    if (c->in_bytes != c->framed_bytes || c->frag_open) {
        /* A fresh context would take the rest for garbage. Counted, so a
         * test tells a refused park from one never tried. */
        metric_add(c->g->m.park_deferred, 1);
        return 0;
    }
    if (!wslay_event_get_read_enabled(c->ctx) || !wslay_event_get_write_enabled(c->ctx) ||
        wslay_event_want_write(c->ctx) || wslay_event_get_queued_msg_count(c->ctx) != 0)
        return 0;
    wslay_event_context_free(c->ctx);
    c->ctx = NULL;
    c->parked = 1;
    metric_add(c->g->m.parked, 1);
    return 1;
}

int ws_conn_dead(const conn *c)
{
    return c->dead;
}

int ws_conn_set_dirty(conn *c, int on)
{
    int was = c->dirty;
    c->dirty = on;
    return was;
}

uint64_t ws_conn_id(const conn *c)
{
    return c->id;
}

const char *ws_conn_user(const conn *c)
{
    return c->user;
}

const char *ws_conn_device(const conn *c)
{
    return c->dev;
}

void ws_conn_free(conn *c)
{
    if (c == NULL)
        return;
    if (c->epfd >= 0)
        epoll_ctl(c->epfd, EPOLL_CTL_DEL, c->fd, NULL);
    if (c->ctx != NULL)
        wslay_event_context_free(c->ctx);
    /* MHD owns the socket: it closes it; we must not. */
    MHD_upgrade_action(c->urh, MHD_UPGRADE_ACTION_CLOSE);
    ws_conn_free_held(c);
    free(c->obuf);
    free(c->extra);
    free(c);
}
