/* parley-bench: a load generator for Parley's WebSocket gateways that anyone
 * can rerun (bench/run.sh drives it). Timings are reported, never asserted.
 *
 * Scenarios; each prints one JSON object on stdout and a human line on stderr:
 *   idle  --conns connections spread over --procs processes (one 127.0.0.x
 *         source address each) and over --url / --url2; each waits for
 *         `synced`. Reports the connect rate and, given --gw-pids, each
 *         gateway's VmRSS growth per connection.
 *   rate  --pairs (sender, receiver) pairs, receivers on --url, senders on
 *         --url2 (so every message crosses gateways), --rate messages/s in
 *         total for --duration s. The body carries the CLOCK_MONOTONIC send
 *         time (one machine, one clock); receivers ack in batches. Reports
 *         delivered/s, send-to-receive latency percentiles, `sent` answers
 *         and messages still missing after --grace s.
 *   latency  a rate run at a low fixed --rate (100/s unless given): nothing
 *         queues, so its p50 is the floor, what a message takes through an
 *         idle system (reported as scenario "latency"; min is the fastest).
 *   sync  --pending messages to an offline user, then the time from its
 *         connect to `synced` and to the last pending message.
 *   max   a ladder of short rate runs (fresh users each): from --rate it
 *         doubles while p99 stays under --max-p99 ms (halves while it does
 *         not), then bisects --steps times between the best rate that held
 *         and the first that did not. Reports that rate and its p99.
 *   group --members users online (one creates the group with the others),
 *         the creator sends --msgs messages at --rate per second; reports
 *         send-to-receive percentiles over every member's copy. With
 *         --devices D each member is online on D devices (tokens with
 *         `dev` d0..): every device gets every copy, the sender's other
 *         devices its own (issue 17). Also reports the same copies timed
 *         at the socket (latency_at_socket_ms: the kernel's receive stamp),
 *         without the time this process takes to reach each socket.
 *   chaos a rate run whose clients behave as the web client does under
 *         faults (tests/chaos/): a connection that dies is reconnected with
 *         backoff (alternating --url / --url2, as a load balancer would
 *         move it), unanswered sends are resent with the same id after
 *         each `synced` and every 5 s, receivers `read` (which acks) every
 *         message. SIGUSR1 to the parent marks a fault's start, SIGUSR2 its
 *         end; the report counts distinct sends answered `sent`, received,
 *         lost (answered, never received), duplicates on the wire,
 *         `delivered` and `read` receipts against the messages received,
 *         the longest a message waited past the fault (deliveries resumed)
 *         and p99 inside the window (fault start to its end + --window s)
 *         and outside it. With --groups G, also G groups of 4 (two pairs:
 *         two receivers, two senders, so over both gateways), whose two
 *         senders send --group-rate group messages/s between them, resent
 *         as 1:1 sends are; each copy (every member but the sender) is
 *         counted as 1:1 messages are: copies of sends answered `sent`
 *         and never received are lost, copies received again duplicates.
 *
 * --proto xmpp runs rate, latency, max and idle against an XMPP server
 * over WebSocket instead (RFC 7395; bench/run.sh's peer, ejabberd): each
 * connection logs in with SASL ANONYMOUS and binds a resource (its
 * `synced`), senders address their receiver's bound JID, bodies and
 * latency are the same. XMPP has no `sent` answer and no acks, so those
 * are not counted there. Only the few stanzas the driver sends and reads
 * are recognised, by a scan of each frame (one stanza per frame, RFC 7395).
 *
 * Each process runs one epoll loop over all its sockets with a small
 * hand-written RFC 6455 client side (handshake, unmasked server frames,
 * masked client frames). libcommon's client is blocking and keeps a JSON
 * backlog per connection: right for tests, too heavy for 10k sockets in one
 * process. Hosts in URLs are IPv4 literals (it is a loopback benchmark). */
#include "auth.h"
#include "common.h"
#include "ids.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define BENCH_MAX_PROCS    32
#define BENCH_PER_PROC_MAX 10000      /* sockets per process: the fd limit is 20k */
#define BENCH_MAX_FRAME    (1u << 20) /* ceiling on one server message */
#define BENCH_MAX_WBUF     (8u << 20) /* ceiling on one connection's unsent bytes */
#define BENCH_RBUF         16384
#define BENCH_ACK_BATCH    200        /* ids per ack command */
#define BENCH_ACK_TICK_NS  20000000LL /* batched acks leave at least this often */
#define BENCH_CTL          UINT64_MAX /* epoll tag of the parent's command pipe */
#define BENCH_LOG_FAILS    5          /* failure reasons printed per process */
#define BENCH_SYNC_WAIT_S  60         /* sync: the timed connection gives up after this */
#define BENCH_RESEND_NS    5000000000LL /* chaos: an unanswered send is resent after this */
#define BENCH_BACKOFF_MS   100        /* chaos: first reconnect delay, doubled per failure */
#define BENCH_BACKOFF_MAX_MS 2000
#define BENCH_GROUP_MEMBERS 4         /* chaos: a group is two pairs (receivers, senders) */

/* ---- latency histogram -------------------------------------------------- */

/* Log-linear buckets (HDR-style): exact below 128 ns, then 64 sub-buckets
 * per power of two, so any value is known to within 1.6%. */
#define BENCH_HIST_SUB_BITS 6
#define BENCH_HIST_SUB      (1 << BENCH_HIST_SUB_BITS)
#define BENCH_HIST_N        ((64 - BENCH_HIST_SUB_BITS + 1) * BENCH_HIST_SUB)

typedef struct bench_hist {
    uint64_t n[BENCH_HIST_N];
    uint64_t count, max, sum;
} bench_hist;

static size_t bench_hist_index(uint64_t v)
{
    if (v < 2 * BENCH_HIST_SUB)
        return (size_t)v;
    int e = 63 - __builtin_clzll(v);
    int shift = e - BENCH_HIST_SUB_BITS;
    return (size_t)(e - BENCH_HIST_SUB_BITS + 1) * BENCH_HIST_SUB +
           (size_t)((v >> shift) - BENCH_HIST_SUB);
}

/* The middle of bucket i. */
static uint64_t bench_hist_value(size_t i)
{
    if (i < 2 * BENCH_HIST_SUB)
        return i;
    int e = (int)(i / BENCH_HIST_SUB) - 1 + BENCH_HIST_SUB_BITS;
    uint64_t sub = i % BENCH_HIST_SUB + BENCH_HIST_SUB;
    int shift = e - BENCH_HIST_SUB_BITS;
    return (sub << shift) + ((1ull << shift) >> 1);
}

static void bench_hist_add(bench_hist *h, int64_t v)
{
    uint64_t u = v < 0 ? 0 : (uint64_t)v;
    h->n[bench_hist_index(u)]++;
    h->count++;
    h->sum += u;
    if (u > h->max)
        h->max = u;
}

static void bench_hist_merge(bench_hist *to, const bench_hist *from)
{
    for (size_t i = 0; i < BENCH_HIST_N; i++)
        to->n[i] += from->n[i];
    to->count += from->count;
    to->sum += from->sum;
    to->max = PX_MAX(to->max, from->max);
}

/* Value at quantile q [0..1], in ns: the smallest value's bucket for 0,
 * the exact max for 1. */
static uint64_t bench_hist_q(const bench_hist *h, double q)
{
    if (h->count == 0)
        return 0;
    if (q >= 1.0)
        return h->max;
    uint64_t want = PX_MAX((uint64_t)ceil(q * (double)h->count), 1), seen = 0;
    for (size_t i = 0; i < BENCH_HIST_N; i++) {
        seen += h->n[i];
        if (seen >= want)
            return PX_MIN(bench_hist_value(i), h->max);
    }
    return h->max;
}

static double bench_ms(uint64_t ns)
{
    return (double)ns / 1e6;
}

/* {"p50":..,"p90":..,"p99":..,"p999":..,"max":..,"mean":..,"count":..} in ms. */
static json_t *bench_hist_json(const bench_hist *h)
{
    return json_pack("{s:f, s:f, s:f, s:f, s:f, s:f, s:f, s:I}", "min",
                     bench_ms(bench_hist_q(h, 0.0)),
                     "p50", bench_ms(bench_hist_q(h, 0.50)), "p90", bench_ms(bench_hist_q(h, 0.90)),
                     "p99", bench_ms(bench_hist_q(h, 0.99)), "p999", bench_ms(bench_hist_q(h, 0.999)),
                     "max", bench_ms(h->max),
                     "mean", h->count ? bench_ms(h->sum / h->count) : 0.0,
                     "count", (json_int_t)h->count);
}

/* ---- options -------------------------------------------------------------- */

typedef struct bench_addr {
    struct sockaddr_in sa;
    char host[64];
    int port;
} bench_addr;

struct bench_proto;

typedef struct bench_opts {
    const char *scenario;
    const struct bench_proto *proto;
    const char *domain;  /* xmpp: the server's host name (the `to` of <open/>) */
    bench_addr gw[2];
    int ngw;
    int conns, procs, pairs, duration_s, grace_s, hold_s, settle_s, connect_timeout_s;
    int inflight, body_bytes, pending, src_base;
    int upgrade_only;  /* idle: count a connection at its 101, not its `synced` */
    int idle, idle_procs; /* rate: connections held (synced) around the run, their processes */
    int msgs, members, steps; /* group: messages and members; max: bisection steps */
    int devices;       /* group: devices (connections with their own `dev`) per member */
    int chaos;         /* chaos: reconnect, resend, read, fault window */
    int window_s;      /* chaos: the fault window lasts this long past the fault's end */
    int quick;         /* chaos: wait for the messages only, not for receipts; no resync */
    int groups;        /* chaos: groups of BENCH_GROUP_MEMBERS (two pairs) */
    double rate, max_p99_ms, group_rate;
    const char *secret;
    pid_t gw_pids[2];
    int ngw_pids;
    FILE *slow;        /* --slow-log: each message slower than slow_ms, line-buffered */
    double slow_ms;
    char prefix[40];  /* makes this run's user ids (and so msg_ids) unique */
} bench_opts;

/* ---- per-process state ------------------------------------------------------ */

enum bench_state { BC_IDLE, BC_CONNECTING, BC_UPGRADING, BC_OPEN, BC_DEAD };

typedef struct bench_conn {
    int fd;
    uint8_t state, gw, synced, no_ack;
    uint8_t dev;            /* group with --devices: the token's device d<dev>, 0: none */
    uint8_t tries;          /* chaos: reconnects failed in a row (the backoff) */
    int64_t retry_at;       /* chaos: when a dead connection connects again, 0: never */
    char role;              /* user id letter: i idle, r receiver, s sender, p pending */
    uint32_t user;          /* user number within the role */
    int64_t t_start, t_synced, t_last;
    int64_t t_socket;       /* group: the kernel's receive stamp of the bytes last read (mono ns) */
    uint8_t *rbuf, *wbuf;
    size_t rlen, rcap, wlen, wcap;
    char *ack;              /* `{"type":"ack","ids":["a","b"` being built */
    char *jid;              /* xmpp: the full JID the server bound */
    size_t acklen, ackcap;
    uint32_t nack, msgs, msgs_at_sync;
} bench_conn;

/* What a process reports to the parent; merged field by field. */
typedef struct bench_stats {
    uint64_t conns, opened, synced, failed, closed, synced_gw[2];
    uint64_t sends, sent_ok, errors, rate_limited, msgs, received, dups, acks;
    int64_t t_go, t_ready, t_first, t_last, t_send_end;
    bench_hist lat;          /* send -> receive */
    bench_hist lat_socket;   /* send -> the receiving socket's kernel stamp (group) */
    bench_hist conn_lat;     /* connect() -> synced */
    /* chaos: distinct sequence numbers, not events */
    uint64_t answered, lost, unanswered_received, resends, reconnects, rcpt[2], rcpt_dups;
    uint64_t rcpt_resync;    /* receipts that came only with a final reconnect of every sender */
    int64_t stall;           /* longest a message waited past the fault (ns) */
    bench_hist lat_in, lat_out; /* send -> receive inside / outside the fault window */
    /* chaos --groups: group sends (distinct), answered; copies (one per
     * member but the sender) received, received again, lost; as above */
    uint64_t gsends, ganswered, gcopies, gdups, glost;
    int64_t gstall;
    bench_hist glat_in, glat_out;
} bench_stats;

/* chaos: what each sequence number went through, and msg_id -> seq for
 * receipts (they name the msg_id only). */
typedef struct bench_chaos_id {
    char id[ID_BUF];
    uint32_t seq;
} bench_chaos_id;

typedef struct bench_chaos {
    uint64_t total;
    uint32_t np;              /* pairs in this process: seq s goes from sender s % np */
    char (*names)[96];        /* receiver names, by pair */
    int64_t *t_first, *t_try; /* per seq: first send, last (re)send (ns) */
    uint8_t *answered, *rcpt[2]; /* bits per seq: `sent`, delivered / read receipt */
    bench_chaos_id *ids;
    size_t idmask;
    int64_t t_fault, t_fault_end, last_scan;
    /* --groups: this process's groups (group g: pairs 2g and 2g+1); group
     * seq s goes to group s % ng from its sender (s / ng) % 2 */
    uint32_t ng, ng_joined;
    uint64_t gtotal;
    char (*gid)[96];
    uint8_t *gjoined;         /* per group: bit m once member m's join was answered */
    int64_t *gt_first, *gt_try;
    uint8_t *ganswered, *gseen; /* bits per group seq; per (group seq, member) */
} bench_chaos;

typedef struct bench_proc {
    const bench_opts *o;
    int ep, ctl_fd;          /* ctl_fd: parent's commands, -1 when alone */
    char cmd;                /* last command byte read, 0 if none */
    struct sockaddr_in src;
    bench_conn *c;
    uint32_t n, next, inflight, fails_logged;
    bench_stats st;
    uint8_t *seen;           /* rate/sync: one bit per sequence number */
    uint64_t nseq;
    uint32_t fanout;         /* group: seen bits per (seq, member), this many members */
    char group[96];          /* group: the id the `group` answer named */
    uint32_t joined;         /* group: members whose group_join was answered */
    uint64_t group_events;   /* group: group_events received, all members */
    uint32_t mask_state;
    int64_t last_ack_tick;
    bench_chaos *chaos;      /* chaos scenario only */
    int64_t realtime_ahead;  /* CLOCK_REALTIME - CLOCK_MONOTONIC, ns: for socket stamps */
} bench_proc;

/* What differs between the servers the load runs against: the upgrade, the
 * login after it, reading a frame and writing a message. The loops, the
 * schedule and the statistics are shared. */
typedef struct bench_proto {
    const char *name, *path;     /* path: the WebSocket upgrade's */
    /* The upgrade request's own header lines ("\r\n" after each) into out. */
    int (*header)(bench_proc *p, bench_conn *c, char *out, size_t outlen);
    void (*opened)(bench_proc *p, bench_conn *c);  /* after the 101 */
    void (*on_text)(bench_proc *p, bench_conn *c, const char *s, size_t len);
    /* Writes one message; field is "to" (1:1) or "group" (Parley only). */
    void (*message)(bench_proc *p, bench_conn *c, const char *field, const char *to, uint64_t seq,
                    const char *body);
    /* What a sender names as the destination of receiver c, once c is synced. */
    void (*address)(const bench_proc *p, const bench_conn *c, char *out, size_t outlen);
    int answers_sends;           /* every send gets a `sent` or an error */
} bench_proto;

static int64_t bench_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void bench_conn_fail(bench_proc *p, bench_conn *c, const char *why)
{
    if (c->state == BC_DEAD || c->state == BC_IDLE)
        return;
    if (!c->synced) {
        p->inflight--;
        p->st.failed++;
    } else {
        p->st.closed++;
    }
    if (p->fails_logged++ < BENCH_LOG_FAILS)
        fprintf(stderr, "parley-bench[%d]: %c%u: %s\n", (int)getpid(), c->role, c->user, why);
    close(c->fd);
    free(c->rbuf);
    free(c->wbuf);
    free(c->ack);
    free(c->jid);
    c->rbuf = c->wbuf = NULL;
    c->ack = c->jid = NULL;
    c->rlen = c->rcap = c->wlen = c->wcap = c->acklen = c->ackcap = 0;
    c->nack = 0;
    c->fd = -1;
    c->state = BC_DEAD;
    if (p->chaos != NULL) { /* reconnect, with jittered backoff */
        int64_t ms = PX_MIN((int64_t)BENCH_BACKOFF_MS << PX_MIN(c->tries, 8), BENCH_BACKOFF_MAX_MS);
        p->mask_state = p->mask_state * 1103515245u + 12345u;
        c->retry_at = bench_now() + (ms / 2 + (int64_t)(p->mask_state >> 8) % ms) * 1000000LL;
        c->tries++;
    }
}

/* Forgets a connection on purpose (not a failure), so its slot can connect again. */
static void bench_conn_drop(bench_proc *p, bench_conn *c)
{
    if (c->state != BC_DEAD && c->state != BC_IDLE) {
        if (!c->synced)
            p->inflight--;
        close(c->fd);
    }
    free(c->rbuf);
    free(c->wbuf);
    free(c->ack);
    free(c->jid);
    char role = c->role;
    uint32_t user = c->user;
    uint8_t gw = c->gw, no_ack = c->no_ack, tries = c->tries;
    memset(c, 0, sizeof(*c));
    c->fd = -1;
    c->role = role;
    c->user = user;
    c->gw = gw;
    c->no_ack = no_ack;
    c->tries = tries;
}

static void bench_user_name(const bench_proc *p, const bench_conn *c, char *out, size_t outlen)
{
    snprintf(out, outlen, "%s%c%u", p->o->prefix, c->role, c->user);
}

/* ---- output side ----------------------------------------------------------- */

static void bench_epoll_mod(bench_proc *p, bench_conn *c, uint32_t events)
{
    struct epoll_event ev = { .events = events, .data.u64 = (uint64_t)(c - p->c) };
    epoll_ctl(p->ep, EPOLL_CTL_MOD, c->fd, &ev);
}

static int bench_buf_append(uint8_t **buf, size_t *len, size_t *cap, const void *data, size_t n)
{
    if (*len + n > BENCH_MAX_WBUF)
        return PX_ERROR;
    if (*len + n > *cap) {
        size_t ncap = PX_MAX(*cap * 2, *len + n);
        *buf = px_realloc(*buf, PX_MAX(ncap, (size_t)4096));
        *cap = PX_MAX(ncap, (size_t)4096);
    }
    memcpy(*buf + *len, data, n);
    *len += n;
    return PX_OK;
}

/* Writes what the kernel takes now and keeps the rest for EPOLLOUT. */
static void bench_conn_write(bench_proc *p, bench_conn *c, const void *data, size_t len)
{
    size_t off = 0;
    if (c->wlen == 0) {
        ssize_t w = send(c->fd, data, len, MSG_NOSIGNAL);
        if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
            bench_conn_fail(p, c, strerror(errno));
            return;
        }
        off = w > 0 ? (size_t)w : 0;
        if (off == len)
            return;
    }
    int was_empty = c->wlen == 0;
    if (bench_buf_append(&c->wbuf, &c->wlen, &c->wcap, (const uint8_t *)data + off,
                         len - off) != PX_OK) {
        bench_conn_fail(p, c, "write buffer ceiling reached (gateway not reading)");
        return;
    }
    if (was_empty)
        bench_epoll_mod(p, c, EPOLLIN | EPOLLOUT);
}

static void bench_conn_flush(bench_proc *p, bench_conn *c)
{
    while (c->wlen > 0) {
        ssize_t w = send(c->fd, c->wbuf, c->wlen, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                bench_conn_fail(p, c, strerror(errno));
            return;
        }
        memmove(c->wbuf, c->wbuf + w, c->wlen - (size_t)w);
        c->wlen -= (size_t)w;
    }
    bench_epoll_mod(p, c, EPOLLIN);
}

/* Client frames must be masked (RFC 6455 5.3); the key only has to vary. */
static void bench_conn_frame(bench_proc *p, bench_conn *c, int opcode, const void *data,
                             size_t len)
{
    uint8_t stackbuf[1024], *f = len + 14 <= sizeof(stackbuf) ? stackbuf : px_malloc(len + 14);
    size_t h = 0;
    f[h++] = (uint8_t)(0x80 | opcode);
    if (len < 126) {
        f[h++] = (uint8_t)(0x80 | len);
    } else if (len < 65536) {
        f[h++] = 0x80 | 126;
        f[h++] = (uint8_t)(len >> 8);
        f[h++] = (uint8_t)len;
    } else {
        f[h++] = 0x80 | 127;
        for (int i = 7; i >= 0; i--)
            f[h++] = (uint8_t)((uint64_t)len >> (8 * i));
    }
    p->mask_state = p->mask_state * 1103515245u + 12345u;
    uint8_t key[4];
    memcpy(key, &p->mask_state, 4);
    memcpy(f + h, key, 4);
    h += 4;
    const uint8_t *s = data;
    for (size_t i = 0; i < len; i++)
        f[h + i] = s[i] ^ key[i & 3];
    bench_conn_write(p, c, f, h + len);
    if (f != stackbuf)
        free(f);
}

static void bench_conn_text(bench_proc *p, bench_conn *c, const char *s, size_t len)
{
    bench_conn_frame(p, c, 0x1, s, len);
}

static void bench_ack_flush(bench_proc *p, bench_conn *c)
{
    if (c->nack == 0 || c->state != BC_OPEN)
        return;
    bench_buf_append((uint8_t **)&c->ack, &c->acklen, &c->ackcap, "]}", 2);
    bench_conn_text(p, c, c->ack, c->acklen);
    p->st.acks += c->nack;
    c->acklen = 0;
    c->nack = 0;
}

static void bench_ack_add(bench_proc *p, bench_conn *c, const char *id)
{
    /* chaos: receivers read what they get (which acks it), so both receipts come */
    const char *head = p->chaos != NULL && c->role == 'r' ? "{\"type\":\"read\",\"ids\":["
                                                          : "{\"type\":\"ack\",\"ids\":[";
    char item[96];
    int n = snprintf(item, sizeof(item), "%s\"%s\"", c->nack ? "," : "", id);
    if (n <= 0 || (size_t)n >= sizeof(item))
        return;
    if (c->nack == 0)
        bench_buf_append((uint8_t **)&c->ack, &c->acklen, &c->ackcap, head, strlen(head));
    bench_buf_append((uint8_t **)&c->ack, &c->acklen, &c->ackcap, item, (size_t)n);
    if (++c->nack >= BENCH_ACK_BATCH)
        bench_ack_flush(p, c);
}

/* ---- connecting ----------------------------------------------------------- */

static void bench_conn_start(bench_proc *p, bench_conn *c)
{
    const bench_addr *a = &p->o->gw[c->gw];
    int one = 1;
    c->t_start = bench_now();
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    c->state = BC_CONNECTING;
    p->inflight++;
    if (c->fd < 0) {
        c->fd = open("/dev/null", O_RDONLY); /* keeps bench_conn_fail's close harmless */
        bench_conn_fail(p, c, strerror(errno));
        return;
    }
    /* Ports are then chosen per (source, destination) at connect time, so one
     * source address is not limited to one set of ~28k ports across both
     * gateways. */
    setsockopt(c->fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one));
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    /* Group: every copy is also timed at the socket (bench_conn_recv). */
    if (p->fanout != 0)
        setsockopt(c->fd, SOL_SOCKET, SO_TIMESTAMPNS, &one, sizeof(one));
    struct epoll_event ev = { .events = EPOLLIN | EPOLLOUT, .data.u64 = (uint64_t)(c - p->c) };
    if (bind(c->fd, (const struct sockaddr *)&p->src, sizeof(p->src)) != 0 ||
        (connect(c->fd, (const struct sockaddr *)&a->sa, sizeof(a->sa)) != 0 &&
         errno != EINPROGRESS) ||
        epoll_ctl(p->ep, EPOLL_CTL_ADD, c->fd, &ev) != 0) {
        bench_conn_fail(p, c, strerror(errno));
        return;
    }
}

static void bench_conn_connected(bench_proc *p, bench_conn *c)
{
    int soerr = 0;
    socklen_t sl = sizeof(soerr);
    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) != 0 || soerr != 0) {
        bench_conn_fail(p, c, soerr ? strerror(soerr) : "connect failed");
        return;
    }
    char head[AUTH_TOKEN_MAX + 64], req[AUTH_TOKEN_MAX + 512];
    if (p->o->proto->header(p, c, head, sizeof(head)) != PX_OK) {
        bench_conn_fail(p, c, "no upgrade header (token signing failed)");
        return;
    }
    const bench_addr *a = &p->o->gw[c->gw];
    int n = snprintf(req, sizeof(req),
                     "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     "Sec-WebSocket-Version: 13\r\n%s\r\n",
                     p->o->proto->path, a->host, a->port, head);
    c->state = BC_UPGRADING;
    bench_epoll_mod(p, c, EPOLLIN);
    bench_conn_write(p, c, req, (size_t)n);
}

/* The 101 is all that is checked: the accept key is the gateway's tests' job. */
static int bench_conn_upgrade(bench_proc *p, bench_conn *c, size_t *used)
{
    uint8_t *end = memmem(c->rbuf, c->rlen, "\r\n\r\n", 4);
    if (end == NULL) {
        *used = 0;
        return c->rlen > 8192 ? PX_ERROR : PX_AGAIN;
    }
    if (c->rlen < 12 || memcmp(c->rbuf, "HTTP/1.1 101", 12) != 0) {
        char why[64];
        snprintf(why, sizeof(why), "upgrade refused: %.20s", (const char *)c->rbuf);
        for (char *q = why; *q; q++)
            if (*q == '\r' || *q == '\n')
                *q = ' ';
        bench_conn_fail(p, c, why);
        return PX_DECLINED;
    }
    *used = (size_t)(end + 4 - c->rbuf);
    c->state = BC_OPEN;
    p->st.opened++;
    return PX_OK;
}

static void bench_on_synced(bench_proc *p, bench_conn *c);

/* ---- chaos: the client's side of faults -------------------------------------- */

static void bench_send_cmd(bench_proc *p, bench_conn *s, const char *field, const char *to,
                           uint64_t seq, int64_t t_sent);

static int bench_bit(const uint8_t *bits, uint64_t i)
{
    return bits[i >> 3] >> (i & 7) & 1;
}

/* Sets bit i; returns what it was. */
static int bench_bit_set(uint8_t *bits, uint64_t i)
{
    int old = bench_bit(bits, i);
    bits[i >> 3] |= (uint8_t)(1u << (i & 7));
    return old;
}

static bench_chaos_id *bench_chaos_slot(bench_chaos *ch, const char *id)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (const char *q = id; *q; q++)
        h = (h ^ (uint8_t)*q) * 1099511628211ull;
    size_t i = (size_t)h & ch->idmask;
    while (ch->ids[i].id[0] != '\0' && strcmp(ch->ids[i].id, id) != 0)
        i = (i + 1) & ch->idmask;
    return &ch->ids[i];
}

static void bench_chaos_groups_init(bench_chaos *ch, uint32_t ng, uint64_t gtotal)
{
    ch->ng = ng;
    ch->gtotal = ng > 0 ? gtotal : 0;
    ch->gid = px_calloc(ng + 1, sizeof(*ch->gid));
    ch->gjoined = px_calloc(ng + 1, 1);
    ch->gt_first = px_calloc(ch->gtotal + 1, sizeof(*ch->gt_first));
    ch->gt_try = px_calloc(ch->gtotal + 1, sizeof(*ch->gt_try));
    ch->ganswered = px_calloc(ch->gtotal / 8 + 1, 1);
    ch->gseen = px_calloc(ch->gtotal * BENCH_GROUP_MEMBERS / 8 + 1, 1);
}

static void bench_chaos_init(bench_proc *p, uint64_t total, uint32_t np, char (*names)[96],
                             uint32_t ng, uint64_t gtotal)
{
    bench_chaos *ch = px_calloc(1, sizeof(*ch));
    bench_chaos_groups_init(ch, ng, gtotal);
    ch->total = total;
    ch->np = np;
    ch->names = names;
    ch->t_first = px_calloc(total + 1, sizeof(*ch->t_first));
    ch->t_try = px_calloc(total + 1, sizeof(*ch->t_try));
    ch->answered = px_calloc(total / 8 + 1, 1);
    ch->rcpt[0] = px_calloc(total / 8 + 1, 1);
    ch->rcpt[1] = px_calloc(total / 8 + 1, 1);
    size_t cap = 1024;
    while (cap < 2 * total)
        cap <<= 1;
    ch->ids = px_calloc(cap, sizeof(*ch->ids));
    ch->idmask = cap - 1;
    p->chaos = ch;
}

/* The first send of seq: its time (the body keeps it through resends) and
 * the msg_id its receipts will name. */
static void bench_chaos_first(bench_proc *p, const bench_conn *s, uint64_t seq, int64_t t)
{
    bench_chaos *ch = p->chaos;
    if (seq >= ch->total)
        return;
    ch->t_first[seq] = ch->t_try[seq] = t;
    char sender[96], cid[32], msg_id[ID_BUF];
    bench_user_name(p, s, sender, sizeof(sender));
    snprintf(cid, sizeof(cid), "m%" PRIu64, seq);
    id_for_send(sender, cid, msg_id);
    bench_chaos_id *e = bench_chaos_slot(ch, msg_id);
    memcpy(e->id, msg_id, ID_BUF);
    e->seq = (uint32_t)seq;
}

/* Sends again, with the same id, what pair i's sender sent and got no
 * `sent` for: all of it (after a reconnect) or what waited 5 s. */
static void bench_chaos_resend(bench_proc *p, uint32_t i, int stale_only)
{
    bench_chaos *ch = p->chaos;
    bench_conn *s = &p->c[ch->np + i];
    int64_t now = bench_now();
    for (uint64_t seq = i; seq < PX_MIN(p->st.sends, ch->total) && s->state == BC_OPEN;
         seq += ch->np) {
        if (bench_bit(ch->answered, seq) || (stale_only && now - ch->t_try[seq] < BENCH_RESEND_NS))
            continue;
        ch->t_try[seq] = now;
        p->st.resends++;
        bench_send_cmd(p, s, "to", ch->names[i], seq, ch->t_first[seq]);
    }
    /* Group seqs s with s % ng == i / 2 and (s / ng) % 2 == i % 2 are this sender's. */
    for (uint64_t seq = i / 2 + (uint64_t)ch->ng * (i % 2);
         i < 2 * ch->ng && seq < PX_MIN(p->st.gsends, ch->gtotal) && s->state == BC_OPEN;
         seq += 2 * (uint64_t)ch->ng) {
        if (bench_bit(ch->ganswered, seq) ||
            (stale_only && now - ch->gt_try[seq] < BENCH_RESEND_NS))
            continue;
        ch->gt_try[seq] = now;
        p->st.resends++;
        bench_send_cmd(p, s, "group", ch->gid[i / 2], seq, ch->gt_first[seq]);
    }
}

static void bench_chaos_synced(bench_proc *p, bench_conn *c)
{
    c->tries = 0;
    uint32_t i = (uint32_t)(c - p->c);
    if (c->role == 's' && p->st.t_go != 0 && i >= p->chaos->np)
        bench_chaos_resend(p, i - p->chaos->np, 0);
}

static void bench_conn_start(bench_proc *p, bench_conn *c);
static void bench_proc_step(bench_proc *p, int timeout_ms);

/* Dead connections whose backoff ran out connect again, to the other
 * gateway (a load balancer moves a client whose gateway died); every
 * second, sends unanswered for 5 s go again. */
static void bench_chaos_tick(bench_proc *p)
{
    bench_chaos *ch = p->chaos;
    int64_t now = bench_now();
    if (now - ch->last_scan < 20000000LL)
        return;
    int resend = now / 1000000000LL != ch->last_scan / 1000000000LL;
    ch->last_scan = now;
    for (uint32_t i = 0; i < p->n; i++) {
        bench_conn *c = &p->c[i];
        if (c->state == BC_DEAD && c->retry_at != 0 && c->retry_at <= now) {
            bench_conn_drop(p, c);
            c->gw = (uint8_t)((c->gw + 1) % (uint32_t)p->o->ngw);
            p->st.reconnects++;
            bench_conn_start(p, c);
        } else if (resend && i >= ch->np && c->synced && p->st.t_go != 0) {
            bench_chaos_resend(p, i - ch->np, 1);
        }
    }
}

static void bench_chaos_sent(bench_proc *p, const char *ref)
{
    bench_chaos *ch = p->chaos;
    if (ref == NULL || (ref[0] != 'm' && ref[0] != 'g'))
        return;
    uint64_t seq = strtoull(ref + 1, NULL, 10);
    if (ref[0] == 'm' && seq < PX_MIN(p->st.sends, ch->total) && !bench_bit_set(ch->answered, seq))
        p->st.answered++;
    if (ref[0] == 'g' && seq < PX_MIN(p->st.gsends, ch->gtotal) &&
        !bench_bit_set(ch->ganswered, seq))
        p->st.ganswered++;
}

static void bench_chaos_receipt(bench_proc *p, const char *msg_id, const char *status)
{
    int k = strcmp(status, "delivered") == 0 ? 0 : strcmp(status, "read") == 0 ? 1 : -1;
    if (k < 0 || msg_id == NULL || strlen(msg_id) != ID_LEN)
        return;
    bench_chaos_id *e = bench_chaos_slot(p->chaos, msg_id);
    if (e->id[0] == '\0')
        return;
    if (bench_bit_set(p->chaos->rcpt[k], e->seq))
        p->st.rcpt_dups++;
    else
        p->st.rcpt[k]++;
}

/* A first receive of a message (or group copy) sent at t: inside the
 * fault window if it arrived after the fault started and was sent before
 * the window closed. */
static void bench_chaos_timed(bench_proc *p, int64_t now, int64_t t, bench_hist *in_h,
                              bench_hist *out_h, int64_t *stall)
{
    bench_chaos *ch = p->chaos;
    int in = ch->t_fault != 0 && now > ch->t_fault &&
             (ch->t_fault_end == 0 || t < ch->t_fault_end + (int64_t)p->o->window_s * 1000000000LL);
    bench_hist_add(in ? in_h : out_h, now - t);
    if (in)
        *stall = PX_MAX(*stall, now - PX_MAX(t, ch->t_fault));
}

static void bench_chaos_received(bench_proc *p, int64_t now, int64_t t)
{
    bench_chaos_timed(p, now, t, &p->st.lat_in, &p->st.lat_out, &p->st.stall);
}

/* Every send answered and received, every group send answered and its
 * copies received, and (unless --quick) both receipts of every message. */
static int bench_chaos_done(const bench_proc *p)
{
    const bench_stats *st = &p->st;
    return st->answered == st->sends && st->received == st->sends &&
           st->ganswered == st->gsends &&
           st->gcopies == (BENCH_GROUP_MEMBERS - 1) * st->gsends &&
           (p->o->quick || (st->rcpt[0] == st->received && st->rcpt[1] == st->received));
}

/* Receipts still missing after the grace: stored for a sender whose
 * connection the live push missed (a stale route), pending behind an ack
 * message-store dropped (ackwait.c: the event stays stored and is pushed
 * again at the receiver's next sync, whose ack makes the receipt), or
 * never made? Every client, receivers and senders, connects once more and
 * syncs, as clients coming back would; what comes then was pending, not
 * lost (a message pushed again counts as a duplicate). */
static void bench_chaos_resync(bench_proc *p)
{
    bench_chaos *ch = p->chaos;
    if (p->o->quick || (p->st.rcpt[0] == p->st.received && p->st.rcpt[1] == p->st.received))
        return;
    uint64_t before = p->st.rcpt[0] + p->st.rcpt[1];
    for (uint32_t i = 0; i < 2 * ch->np; i++) {
        bench_conn_drop(p, &p->c[i]);
        bench_conn_start(p, &p->c[i]);
    }
    int64_t end = bench_now() + 20 * 1000000000LL;
    while (bench_now() < end && !bench_chaos_done(p))
        bench_proc_step(p, 10);
    p->st.rcpt_resync = p->st.rcpt[0] + p->st.rcpt[1] - before;
}

static void bench_chaos_finish(bench_proc *p)
{
    bench_chaos *ch = p->chaos;
    for (uint64_t seq = 0; seq < PX_MIN(p->st.sends, ch->total); seq++) {
        int a = bench_bit(ch->answered, seq), r = bench_bit(p->seen, seq);
        p->st.lost += a && !r;
        p->st.unanswered_received += !a && r;
    }
    for (uint64_t seq = 0; seq < PX_MIN(p->st.gsends, ch->gtotal); seq++) {
        uint32_t sender = 2 + (uint32_t)(seq / ch->ng % 2);
        for (uint32_t m = 0; m < BENCH_GROUP_MEMBERS && bench_bit(ch->ganswered, seq); m++)
            p->st.glost += m != sender && !bench_bit(ch->gseen, seq * BENCH_GROUP_MEMBERS + m);
    }
    free(ch->gid);
    free(ch->gjoined);
    free(ch->gt_first);
    free(ch->gt_try);
    free(ch->ganswered);
    free(ch->gseen);
    free(ch->t_first);
    free(ch->t_try);
    free(ch->answered);
    free(ch->rcpt[0]);
    free(ch->rcpt[1]);
    free(ch->ids);
    free(ch);
    p->chaos = NULL;
}

/* ---- chaos --groups: members over both gateways ------------------------------ */

/* Group g is pairs 2g and 2g+1: members 0 and 1 their receivers (on
 * --url), 2 and 3 their senders (on --url2), who send its messages. */
static bench_conn *bench_group_member(bench_proc *p, uint32_t g, uint32_t m)
{
    uint32_t pair = 2 * g + m % 2;
    return &p->c[m < 2 ? pair : p->chaos->np + pair];
}

/* The member c is of group *g, or -1 when it is in none. */
static int bench_group_of(const bench_proc *p, const bench_conn *c, uint32_t *g)
{
    uint32_t i = (uint32_t)(c - p->c), np = p->chaos->np, pair = i < np ? i : i - np;
    if (pair >= 2 * p->chaos->ng)
        return -1;
    *g = pair / 2;
    return (int)((i < np ? 0 : 2) + pair % 2);
}

/* Command ids: c<g> for a create, j<g> for a join. */
static void bench_group_cmd(bench_proc *p, bench_conn *c, const char *type, char letter,
                            uint32_t g, const char *rest)
{
    char cmd[1024];
    int n = snprintf(cmd, sizeof(cmd), "{\"type\":\"%s\",\"id\":\"%c%u\",%s}", type, letter,
                     g, rest);
    if (n > 0 && (size_t)n < sizeof(cmd))
        bench_conn_text(p, c, cmd, (size_t)n);
}

/* Joins of group g's members (all but the creator, member 2) not answered yet. */
static void bench_chaos_group_joins(bench_proc *p, uint32_t g)
{
    char rest[160];
    snprintf(rest, sizeof(rest), "\"group\":\"%s\"", p->chaos->gid[g]);
    for (uint32_t m = 0; m < BENCH_GROUP_MEMBERS; m++)
        if (m != 2 && !(p->chaos->gjoined[g] >> m & 1))
            bench_group_cmd(p, bench_group_member(p, g, m), "group_join", 'j', g, rest);
}

/* Member 2 creates each group, inviting the other three, who join once
 * its id is known (bench_chaos_group_answer); what is not answered (a
 * connection lost meanwhile, a slow system) is asked again every 3 s (a
 * join is idempotent; a second create makes a group nobody uses). Returns
 * once every join was answered (membership is durable then), or at the
 * deadline. */
static int bench_chaos_groups_setup(bench_proc *p, int64_t deadline)
{
    bench_chaos *ch = p->chaos;
    for (int64_t next = 0; ch->ng_joined < (BENCH_GROUP_MEMBERS - 1) * ch->ng &&
                           bench_now() < deadline;) {
        if (bench_now() >= next) {
            next = bench_now() + 3000000000LL;
            for (uint32_t g = 0; g < ch->ng; g++) {
                char names[3][96], rest[512];
                if (ch->gid[g][0] != '\0') {
                    bench_chaos_group_joins(p, g);
                    continue;
                }
                for (uint32_t m = 0, k = 0; m < BENCH_GROUP_MEMBERS; m++)
                    if (m != 2)
                        bench_user_name(p, bench_group_member(p, g, m), names[k++],
                                        sizeof(names[0]));
                snprintf(rest, sizeof(rest),
                         "\"name\":\"chaos\",\"members\":[\"%s\",\"%s\",\"%s\"]", names[0],
                         names[1], names[2]);
                bench_group_cmd(p, bench_group_member(p, g, 2), "group_create", 'c', g, rest);
            }
        }
        bench_proc_step(p, 10);
    }
    if (ch->ng_joined == (BENCH_GROUP_MEMBERS - 1) * ch->ng)
        return PX_OK;
    fprintf(stderr, "parley-bench[%d]: groups: %u of %u joins answered\n", (int)getpid(),
            ch->ng_joined, (BENCH_GROUP_MEMBERS - 1) * ch->ng);
    return PX_ERROR;
}

/* The `group` answer to a create ("c<g>": the id, then the joins) or to a
 * join ("j<g>") by c. */
static void bench_chaos_group_answer(bench_proc *p, const bench_conn *c, json_t *j)
{
    bench_chaos *ch = p->chaos;
    const char *ref = json_string_value(json_object_get(j, "ref"));
    const char *id = json_string_value(json_object_get(json_object_get(j, "group"), "id"));
    if (ref == NULL || id == NULL || (ref[0] != 'c' && ref[0] != 'j'))
        return;
    uint32_t g = (uint32_t)strtoul(ref + 1, NULL, 10);
    if (g >= ch->ng)
        return;
    uint32_t cg;
    int m = bench_group_of(p, c, &cg);
    if (ref[0] == 'j' && m >= 0 && cg == g && strcmp(id, ch->gid[g]) == 0 &&
        !(ch->gjoined[g] >> m & 1)) {
        ch->gjoined[g] |= (uint8_t)(1u << m);
        ch->ng_joined++;
    }
    if (ref[0] != 'c' || ch->gid[g][0] != '\0')
        return;
    snprintf(ch->gid[g], sizeof(ch->gid[g]), "%s", id);
    bench_chaos_group_joins(p, g);
}

/* A group copy: body "<group seq> <send ns> ...", one bit per (seq, member). */
static void bench_chaos_group_message(bench_proc *p, bench_conn *c, const char *body)
{
    bench_chaos *ch = p->chaos;
    uint32_t g;
    int m = bench_group_of(p, c, &g);
    char *end;
    uint64_t seq = strtoull(body, &end, 10);
    int64_t t = strtoll(end, NULL, 10), now = bench_now();
    if (m < 0 || seq >= ch->gtotal)
        return;
    if (bench_bit_set(ch->gseen, seq * BENCH_GROUP_MEMBERS + (uint64_t)m)) {
        p->st.gdups++;
        return;
    }
    p->st.gcopies++;
    bench_chaos_timed(p, now, t, &p->st.glat_in, &p->st.glat_out, &p->st.gstall);
}

/* Sends the group messages due by now: seq s to group s % ng from its
 * sender (s / ng) % 2. */
static void bench_chaos_group_pump(bench_proc *p, double rate, int64_t t0)
{
    bench_chaos *ch = p->chaos;
    double due_f = (double)(bench_now() - t0) * rate / 1e9;
    uint64_t due = PX_MIN((uint64_t)due_f, ch->gtotal);
    while (p->st.gsends < due) {
        uint64_t seq = p->st.gsends++;
        uint32_t g = (uint32_t)(seq % ch->ng);
        int64_t t = bench_now();
        ch->gt_first[seq] = ch->gt_try[seq] = t;
        bench_send_cmd(p, bench_group_member(p, g, 2 + (uint32_t)(seq / ch->ng % 2)), "group",
                       ch->gid[g], seq, t);
    }
}

/* ---- receiving ------------------------------------------------------------- */

static void bench_on_synced(bench_proc *p, bench_conn *c)
{
    if (c->synced)
        return;
    c->synced = 1;
    c->t_synced = bench_now();
    c->msgs_at_sync = c->msgs;
    p->inflight--;
    p->st.synced++;
    p->st.synced_gw[c->gw]++;
    bench_hist_add(&p->st.conn_lat, c->t_synced - c->t_start);
    if (p->chaos != NULL)
        bench_chaos_synced(p, c);
}

/* Bodies are "<seq> <send ns> xxx...": seq indexes this process's seen bits. */
static void bench_on_message(bench_proc *p, bench_conn *c, const char *id, const char *body)
{
    int64_t now = bench_now();
    c->msgs++;
    c->t_last = now;
    p->st.msgs++;
    char *end;
    unsigned long long seq = strtoull(body, &end, 10);
    long long t = strtoll(end, NULL, 10);
    if (p->fanout != 0) /* every member's device gets every seq once */
        seq = seq * p->fanout + (uint64_t)(c - p->c);
    if (p->seen != NULL && seq < p->nseq) {
        if (p->seen[seq >> 3] & (1u << (seq & 7))) {
            p->st.dups++;
        } else {
            p->seen[seq >> 3] |= (uint8_t)(1u << (seq & 7));
            p->st.received++;
            bench_hist_add(&p->st.lat, now - t);
            if (p->chaos != NULL)
                bench_chaos_received(p, now, t);
            if (p->o->slow != NULL && now - t >= (int64_t)(p->o->slow_ms * 1e6))
                fprintf(p->o->slow, "%lld %lld %u\n", (long long)((t + p->realtime_ahead) / 1000000),
                        (long long)((now - t) / 1000000), (unsigned)(c - p->c));
            if (c->t_socket != 0)
                bench_hist_add(&p->st.lat_socket, c->t_socket - t);
            if (p->st.t_first == 0)
                p->st.t_first = now;
            p->st.t_last = now;
        }
    }
    if (!c->no_ack && id != NULL)
        bench_ack_add(p, c, id);
}

static void bench_on_error(bench_proc *p, bench_conn *c, json_t *j)
{
    const char *code = json_string_value(json_object_get(j, "code"));
    p->st.errors++;
    if (code != NULL && strcmp(code, "rate_limited") == 0)
        p->st.rate_limited++;
    else if (p->fails_logged++ < BENCH_LOG_FAILS)
        fprintf(stderr, "parley-bench[%d]: %c%u: error %s: %s\n", (int)getpid(), c->role,
                c->user, code ? code : "?",
                json_string_value(json_object_get(j, "message")) ?: "");
}

static void bench_on_text(bench_proc *p, bench_conn *c, const char *s, size_t len)
{
    json_t *j = json_loadb(s, len, 0, NULL);
    const char *type = json_string_value(json_object_get(j, "type"));
    if (type == NULL)
        ;
    else if (strcmp(type, "message") == 0 && p->chaos != NULL && json_object_get(j, "group")) {
        bench_chaos_group_message(p, c, json_string_value(json_object_get(j, "body")) ?: "");
        if (!c->no_ack && json_is_string(json_object_get(j, "id")))
            bench_ack_add(p, c, json_string_value(json_object_get(j, "id")));
    } else if (strcmp(type, "message") == 0)
        bench_on_message(p, c, json_string_value(json_object_get(j, "id")),
                         json_string_value(json_object_get(j, "body")) ?: "");
    else if (strcmp(type, "receipt") == 0 && !c->no_ack && json_is_string(json_object_get(j, "id"))) {
        /* As a real client does: an unacked receipt stays in the server's
         * inbox for 30 days, and the bench would measure a growing backlog. */
        bench_ack_add(p, c, json_string_value(json_object_get(j, "id")));
        if (p->chaos != NULL)
            bench_chaos_receipt(p, json_string_value(json_object_get(j, "msg_id")),
                                json_string_value(json_object_get(j, "status")) ?: "");
    } else if (strcmp(type, "sent") == 0) {
        p->st.sent_ok++;
        if (p->chaos != NULL)
            bench_chaos_sent(p, json_string_value(json_object_get(j, "ref")));
    }
    else if (strcmp(type, "synced") == 0)
        bench_on_synced(p, c);
    else if (strcmp(type, "error") == 0)
        bench_on_error(p, c, j);
    else if (strcmp(type, "group") == 0 && p->chaos != NULL) {
        bench_chaos_group_answer(p, c, j);
    } else if (strcmp(type, "group_event") == 0 && p->chaos != NULL) {
        /* acked alone: a receiver's ack batch is a `read` of message ids */
        char ack[160];
        int n = snprintf(ack, sizeof(ack), "{\"type\":\"ack\",\"ids\":[\"%s\"]}",
                         json_string_value(json_object_get(j, "id")) ?: "");
        if (n > 0 && (size_t)n < sizeof(ack) && json_is_string(json_object_get(j, "id")))
            bench_conn_text(p, c, ack, (size_t)n);
    } else if (strcmp(type, "group") == 0) {
        snprintf(p->group, sizeof(p->group), "%s",
                 json_string_value(json_object_get(json_object_get(j, "group"), "id")) ?: "");
        p->joined += c != &p->c[0]; /* the others' answers are to their joins */
    } else if (strcmp(type, "group_event") == 0)
        p->group_events++;
    json_decref(j);
}

static void bench_on_frame(bench_proc *p, bench_conn *c, int op, const uint8_t *pl, size_t len)
{
    switch (op) {
    case 0x1:
        p->o->proto->on_text(p, c, (const char *)pl, len);
        break;
    case 0x9:
        bench_conn_frame(p, c, 0xA, pl, len); /* the gateway closes clients that never pong */
        break;
    case 0x8: {
        char why[48];
        snprintf(why, sizeof(why), "closed by server (%d)", len >= 2 ? pl[0] << 8 | pl[1] : 1005);
        bench_conn_fail(p, c, why);
        break;
    }
    default:
        break;
    }
}

/* Consumes whole frames from rbuf; *used says how many bytes. */
static int bench_parse_frames(bench_proc *p, bench_conn *c, size_t *used)
{
    size_t off = 0;
    while (c->state == BC_OPEN && c->rlen - off >= 2) {
        const uint8_t *b = c->rbuf + off;
        size_t avail = c->rlen - off, h = 2;
        uint64_t len = b[1] & 0x7f;
        if (len == 126) {
            if (avail < 4)
                break;
            len = (uint64_t)b[2] << 8 | b[3];
            h = 4;
        } else if (len == 127) {
            if (avail < 10)
                break;
            len = 0;
            for (int i = 0; i < 8; i++)
                len = len << 8 | b[2 + i];
            h = 10;
        }
        if ((b[1] & 0x80) || len > BENCH_MAX_FRAME || !(b[0] & 0x80)) {
            bench_conn_fail(p, c, "masked, fragmented or oversized server frame");
            return PX_ERROR;
        }
        if (avail < h + len)
            break;
        bench_on_frame(p, c, b[0] & 0x0f, b + h, (size_t)len);
        off += h + (size_t)len;
    }
    *used = off;
    return c->state == BC_OPEN ? PX_OK : PX_ERROR;
}

static int bench_conn_consume(bench_proc *p, bench_conn *c)
{
    size_t used = 0;
    if (c->state == BC_UPGRADING) {
        int rc = bench_conn_upgrade(p, c, &used);
        if (rc == PX_ERROR)
            bench_conn_fail(p, c, "no HTTP answer head");
        if (rc != PX_OK)
            return rc == PX_AGAIN ? PX_OK : PX_ERROR;
        memmove(c->rbuf, c->rbuf + used, c->rlen - used);
        c->rlen -= used;
        p->o->proto->opened(p, c);
        if (c->state != BC_OPEN)
            return PX_ERROR;
        /* Measures the gateway alone: the later `synced` depends on
         * message-store and the database. */
        if (p->o->upgrade_only)
            bench_on_synced(p, c);
    }
    if (bench_parse_frames(p, c, &used) != PX_OK)
        return PX_ERROR;
    memmove(c->rbuf, c->rbuf + used, c->rlen - used);
    c->rlen -= used;
    return PX_OK;
}

/* recv, noting the kernel's receive stamp when the socket asked for one
 * (SO_TIMESTAMPNS: the latest stamp of the bytes read). One load process
 * reads hundreds of sockets per group copy in turn, so the time it takes
 * to reach a socket is its own, not the server's: a copy's latency at the
 * socket leaves that out. */
static ssize_t bench_conn_recv(bench_proc *p, bench_conn *c)
{
    struct iovec iov = { c->rbuf + c->rlen, c->rcap - c->rlen };
    union {
        char buf[CMSG_SPACE(sizeof(struct timespec))];
        struct cmsghdr align;
    } ctl;
    struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf,
                         .msg_controllen = sizeof(ctl.buf) };
    ssize_t r = recvmsg(c->fd, &mh, 0);
    for (struct cmsghdr *cm = r > 0 ? CMSG_FIRSTHDR(&mh) : NULL; cm != NULL;
         cm = CMSG_NXTHDR(&mh, cm))
        if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_TIMESTAMPNS) {
            struct timespec ts;
            memcpy(&ts, CMSG_DATA(cm), sizeof(ts));
            c->t_socket = (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec - p->realtime_ahead;
        }
    return r;
}

static void bench_conn_readable(bench_proc *p, bench_conn *c)
{
    for (;;) {
        if (c->rcap - c->rlen < BENCH_RBUF / 2) {
            c->rcap = PX_MAX(c->rcap * 2, (size_t)BENCH_RBUF);
            c->rbuf = px_realloc(c->rbuf, c->rcap);
        }
        ssize_t r = bench_conn_recv(p, c);
        if (r == 0 || (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
            bench_conn_fail(p, c, r == 0 ? "connection closed by server" : strerror(errno));
            return;
        }
        if (r < 0)
            break;
        c->rlen += (size_t)r;
        if (bench_conn_consume(p, c) != PX_OK)
            return;
    }
    /* Idle sockets keep no buffer: 10k of them would otherwise hold 160 MB. */
    if (c->rlen == 0) {
        free(c->rbuf);
        c->rbuf = NULL;
        c->rcap = 0;
    }
}

static void bench_conn_event(bench_proc *p, bench_conn *c, uint32_t events)
{
    if (c->state == BC_CONNECTING) {
        bench_conn_connected(p, c);
        return;
    }
    if ((events & EPOLLOUT) && c->state != BC_DEAD)
        bench_conn_flush(p, c);
    if ((events & (EPOLLIN | EPOLLHUP | EPOLLERR)) && c->state != BC_DEAD)
        bench_conn_readable(p, c);
}

/* ---- the loop --------------------------------------------------------------- */

static void bench_proc_init(bench_proc *p, const bench_opts *o, uint32_t n, int ctl_fd, int src)
{
    memset(p, 0, sizeof(*p));
    p->o = o;
    p->ep = epoll_create1(EPOLL_CLOEXEC);
    struct timespec rt;
    clock_gettime(CLOCK_REALTIME, &rt);
    p->realtime_ahead = (int64_t)rt.tv_sec * 1000000000LL + rt.tv_nsec - bench_now();
    p->ctl_fd = ctl_fd;
    p->n = n;
    p->c = px_calloc(n, sizeof(*p->c));
    for (uint32_t i = 0; i < n; i++)
        p->c[i].fd = -1;
    p->src.sin_family = AF_INET;
    p->src.sin_addr.s_addr = htonl(0x7f000000u | (uint32_t)src);
    p->mask_state = (uint32_t)getpid() * 2654435761u;
    if (ctl_fd >= 0) {
        struct epoll_event ev = { .events = EPOLLIN, .data.u64 = BENCH_CTL };
        epoll_ctl(p->ep, EPOLL_CTL_ADD, ctl_fd, &ev);
    }
}

static void bench_proc_ctl(bench_proc *p)
{
    char b;
    ssize_t r = read(p->ctl_fd, &b, 1);
    if (r == 1 && (b == 'F' || b == 'E')) { /* chaos: a fault starts, ends */
        if (p->chaos != NULL && b == 'F' && p->chaos->t_fault == 0)
            p->chaos->t_fault = bench_now();
        else if (p->chaos != NULL && b == 'E')
            p->chaos->t_fault_end = bench_now();
        return;
    }
    p->cmd = r == 1 ? b : 'Q'; /* a parent gone means quit */
    if (r <= 0) {
        epoll_ctl(p->ep, EPOLL_CTL_DEL, p->ctl_fd, NULL);
        p->ctl_fd = -1;
    }
}

static void bench_proc_acks(bench_proc *p, int64_t now)
{
    if (now - p->last_ack_tick < BENCH_ACK_TICK_NS)
        return;
    p->last_ack_tick = now;
    for (uint32_t i = 0; i < p->n; i++)
        if (p->c[i].nack > 0)
            bench_ack_flush(p, &p->c[i]);
}

static void bench_proc_step(bench_proc *p, int timeout_ms)
{
    struct epoll_event ev[512];
    int k = epoll_wait(p->ep, ev, (int)PX_ARRAY_LEN(ev), timeout_ms);
    for (int i = 0; i < k; i++) {
        if (ev[i].data.u64 == BENCH_CTL)
            bench_proc_ctl(p);
        else
            bench_conn_event(p, &p->c[ev[i].data.u64], ev[i].events);
    }
    bench_proc_acks(p, bench_now());
    if (p->chaos != NULL)
        bench_chaos_tick(p);
}

/* Connects slots [first, end), at most o->inflight unsynced at once so the
 * gateway's accept queue is not overrun; returns when every one is synced or
 * dead, or at the deadline. */
static void bench_proc_connect(bench_proc *p, uint32_t first, uint32_t end, int64_t deadline)
{
    uint32_t next = first;
    for (;;) {
        while (next < end && p->inflight < (uint32_t)p->o->inflight)
            bench_conn_start(p, &p->c[next++]);
        if (next == end && p->inflight == 0)
            break;
        if (bench_now() > deadline) {
            fprintf(stderr, "parley-bench[%d]: connect deadline: %u not synced\n",
                    (int)getpid(), p->inflight + (end - next));
            break;
        }
        bench_proc_step(p, 10);
    }
}

static void bench_proc_wait_cmd(bench_proc *p)
{
    p->cmd = 0;
    while (p->cmd == 0)
        bench_proc_step(p, 100);
}

/* ---- sending ---------------------------------------------------------------- */

/* field is "to" (1:1) or "group"; the body carries seq and t_sent. */
static void bench_send_cmd(bench_proc *p, bench_conn *s, const char *field, const char *to,
                           uint64_t seq, int64_t t_sent)
{
    char body[4096];
    int n = snprintf(body, sizeof(body), "%" PRIu64 " %" PRId64 " ", seq, t_sent);
    int want = PX_MIN(p->o->body_bytes, (int)sizeof(body) - 1);
    if (n < want) {
        memset(body + n, 'x', (size_t)(want - n));
        n = want;
    }
    body[n] = '\0';
    if (s->state == BC_OPEN)
        p->o->proto->message(p, s, field, to, seq, body);
}

static void bench_send_to(bench_proc *p, bench_conn *s, const char *field, const char *to,
                          uint64_t seq)
{
    int64_t t = bench_now();
    p->st.sends++;
    if (p->chaos != NULL)
        bench_chaos_first(p, s, seq, t);
    bench_send_cmd(p, s, field, to, seq, t);
}

static void bench_send(bench_proc *p, bench_conn *s, const char *to, uint64_t seq)
{
    bench_send_to(p, s, "to", to, seq);
}

/* ---- the protocols ------------------------------------------------------------ */

/* Parley: a signed token at the upgrade, JSON commands (bench_on_text reads). */
static int bench_parley_header(bench_proc *p, bench_conn *c, char *out, size_t outlen)
{
    char user[96], token[AUTH_TOKEN_MAX], dev[8];
    bench_user_name(p, c, user, sizeof(user));
    int64_t now_s = (int64_t)time(NULL);
    snprintf(dev, sizeof(dev), "d%u", c->dev);
    if (auth_sign_device(p->o->secret, user, p->o->devices > 1 ? dev : NULL, now_s,
                         now_s + 86400, token, sizeof(token)) != PX_OK)
        return PX_ERROR;
    int n = snprintf(out, outlen, "Authorization: Bearer %s\r\n", token);
    return n > 0 && (size_t)n < outlen ? PX_OK : PX_ERROR;
}

static void bench_parley_opened(bench_proc *p, bench_conn *c)
{
    (void)p, (void)c; /* the gateway speaks first (`synced`) */
}

static void bench_parley_message(bench_proc *p, bench_conn *c, const char *field, const char *to,
                                 uint64_t seq, const char *body)
{
    char cmd[4400];
    /* ids m<seq> (1:1) and g<seq> (group): chaos tells their `sent` apart */
    int len = snprintf(cmd, sizeof(cmd), "{\"type\":\"send\",\"id\":\"%c%" PRIu64 "\",\"%s\":\"%s\","
                       "\"body\":\"%s\"}", field[0] == 'g' ? 'g' : 'm', seq, field, to, body);
    bench_conn_text(p, c, cmd, (size_t)PX_MIN(len, (int)sizeof(cmd) - 1));
}

static const bench_proto bench_parley = {
    .name = "parley", .path = "/v1/ws", .header = bench_parley_header,
    .opened = bench_parley_opened, .on_text = bench_on_text, .message = bench_parley_message,
    .address = bench_user_name, .answers_sends = 1,
};

/* XMPP over WebSocket (RFC 7395): one stanza per frame. The server's
 * stanzas are recognised by their start and a few substrings, enough for
 * the login and the messages this driver itself sends. */
static int bench_xml_is(const char *s, size_t len, const char *start)
{
    size_t n = strlen(start);
    return len >= n && memcmp(s, start, n) == 0;
}

static int bench_xml_has(const char *s, size_t len, const char *what)
{
    return memmem(s, len, what, strlen(what)) != NULL;
}

/* The text of the first <tag>..</tag> in s into out ("" when there is none). */
static void bench_xml_text(const char *s, size_t len, const char *tag, char *out, size_t outlen)
{
    char open[32], close[32];
    int no = snprintf(open, sizeof(open), "<%s>", tag), nc = snprintf(close, sizeof(close), "</%s>", tag);
    const char *a = memmem(s, len, open, (size_t)no), *b = NULL;
    if (a != NULL) {
        a += no;
        b = memmem(a, len - (size_t)(a - s), close, (size_t)nc);
    }
    snprintf(out, outlen, "%.*s", b ? (int)(b - a) : 0, b ? a : "");
}

static void bench_xmpp_str(bench_proc *p, bench_conn *c, const char *st)
{
    bench_conn_text(p, c, st, strlen(st));
}

static int bench_xmpp_header(bench_proc *p, bench_conn *c, char *out, size_t outlen)
{
    (void)p, (void)c;
    snprintf(out, outlen, "Sec-WebSocket-Protocol: xmpp\r\n");
    return PX_OK;
}

/* Opens the stream, after the upgrade and again after the SASL success. */
static void bench_xmpp_opened(bench_proc *p, bench_conn *c)
{
    char st[256];
    snprintf(st, sizeof(st), "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='%s' version='1.0'/>",
             p->o->domain);
    bench_xmpp_str(p, c, st);
}

static void bench_xmpp_refused(bench_proc *p, bench_conn *c, const char *s, size_t len)
{
    char why[96];
    snprintf(why, sizeof(why), "refused: %.*s", (int)PX_MIN(len, (size_t)80), s);
    bench_conn_fail(p, c, why);
}

static void bench_xmpp_features(bench_proc *p, bench_conn *c, const char *s, size_t len)
{
    if (bench_xml_has(s, len, "urn:ietf:params:xml:ns:xmpp-bind"))
        bench_xmpp_str(p, c, "<iq xmlns='jabber:client' type='set' id='bind'>"
                       "<bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>");
    else if (bench_xml_has(s, len, ">ANONYMOUS<"))
        bench_xmpp_str(p, c, "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='ANONYMOUS'/>");
    else
        bench_xmpp_refused(p, c, s, len);
}

static void bench_xmpp_on_text(bench_proc *p, bench_conn *c, const char *s, size_t len)
{
    char text[4096];
    if (bench_xml_is(s, len, "<message")) {
        if (bench_xml_has(s, len, "type='error'") || bench_xml_has(s, len, "type=\"error\"")) {
            p->st.errors++; /* a bounce: its body is ours, but it never reached the receiver */
            return;
        }
        bench_xml_text(s, len, "body", text, sizeof(text));
        bench_on_message(p, c, NULL, text);
    } else if (bench_xml_is(s, len, "<stream:features")) {
        bench_xmpp_features(p, c, s, len);
    } else if (bench_xml_is(s, len, "<success")) {
        bench_xmpp_opened(p, c); /* the stream restarts after SASL */
    } else if (bench_xml_is(s, len, "<iq") && bench_xml_has(s, len, "<jid>")) {
        bench_xml_text(s, len, "jid", text, sizeof(text));
        free(c->jid);
        c->jid = px_strdup(text);
        bench_on_synced(p, c);
    } else if (!bench_xml_is(s, len, "<open")) {
        bench_xmpp_refused(p, c, s, len); /* <failure>, <close/>, <stream:error>, an iq error */
    }
}

static void bench_xmpp_message(bench_proc *p, bench_conn *c, const char *field, const char *to,
                               uint64_t seq, const char *body)
{
    (void)field;
    char st[4400];
    int len = snprintf(st, sizeof(st), "<message xmlns='jabber:client' type='chat' to='%s' "
                       "id='m%" PRIu64 "'><body>%s</body></message>", to, seq, body);
    bench_conn_text(p, c, st, (size_t)PX_MIN(len, (int)sizeof(st) - 1));
}

/* The full JID the receiver bound: anonymous logins get a random one. */
static void bench_xmpp_address(const bench_proc *p, const bench_conn *c, char *out, size_t outlen)
{
    if (c->jid != NULL)
        snprintf(out, outlen, "%s", c->jid);
    else
        snprintf(out, outlen, "nobody@%s", p->o->domain); /* its messages bounce */
}

static const bench_proto bench_xmpp = {
    .name = "xmpp", .path = "/ws", .header = bench_xmpp_header, .opened = bench_xmpp_opened,
    .on_text = bench_xmpp_on_text, .message = bench_xmpp_message, .address = bench_xmpp_address,
    .answers_sends = 0,
};

static void bench_seen_alloc(bench_proc *p, uint64_t nseq)
{
    free(p->seen);
    p->nseq = nseq;
    p->seen = px_calloc(nseq / 8 + 1, 1);
}

/* ---- reports between processes ------------------------------------------------ */

static int bench_write_all(int fd, const void *buf, size_t len)
{
    const uint8_t *b = buf;
    while (len > 0) {
        ssize_t w = write(fd, b, len);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return PX_ERROR;
        b += w;
        len -= (size_t)w;
    }
    return PX_OK;
}

static int bench_read_all(int fd, void *buf, size_t len)
{
    uint8_t *b = buf;
    while (len > 0) {
        ssize_t r = read(fd, b, len);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return PX_ERROR;
        b += r;
        len -= (size_t)r;
    }
    return PX_OK;
}

static void bench_stats_merge(bench_stats *to, const bench_stats *s)
{
    to->conns += s->conns;
    to->opened += s->opened;
    to->synced += s->synced;
    to->failed += s->failed;
    to->closed += s->closed;
    to->synced_gw[0] += s->synced_gw[0];
    to->synced_gw[1] += s->synced_gw[1];
    to->sends += s->sends;
    to->sent_ok += s->sent_ok;
    to->errors += s->errors;
    to->rate_limited += s->rate_limited;
    to->msgs += s->msgs;
    to->received += s->received;
    to->dups += s->dups;
    to->acks += s->acks;
    to->t_ready = PX_MAX(to->t_ready, s->t_ready);
    to->t_go = to->t_go && s->t_go ? PX_MIN(to->t_go, s->t_go) : PX_MAX(to->t_go, s->t_go);
    to->t_first = to->t_first && s->t_first ? PX_MIN(to->t_first, s->t_first)
                                            : PX_MAX(to->t_first, s->t_first);
    to->t_last = PX_MAX(to->t_last, s->t_last);
    to->t_send_end = PX_MAX(to->t_send_end, s->t_send_end);
    bench_hist_merge(&to->lat, &s->lat);
    bench_hist_merge(&to->conn_lat, &s->conn_lat);
    to->answered += s->answered;
    to->lost += s->lost;
    to->unanswered_received += s->unanswered_received;
    to->resends += s->resends;
    to->reconnects += s->reconnects;
    to->rcpt[0] += s->rcpt[0];
    to->rcpt[1] += s->rcpt[1];
    to->rcpt_dups += s->rcpt_dups;
    to->rcpt_resync += s->rcpt_resync;
    to->stall = PX_MAX(to->stall, s->stall);
    bench_hist_merge(&to->lat_in, &s->lat_in);
    bench_hist_merge(&to->lat_out, &s->lat_out);
    to->gsends += s->gsends;
    to->ganswered += s->ganswered;
    to->gcopies += s->gcopies;
    to->gdups += s->gdups;
    to->glost += s->glost;
    to->gstall = PX_MAX(to->gstall, s->gstall);
    bench_hist_merge(&to->glat_in, &s->glat_in);
    bench_hist_merge(&to->glat_out, &s->glat_out);
}

typedef void (*bench_child_fn)(bench_proc *p, int k, int out_fd);

typedef struct bench_kids {
    int n;
    pid_t pid[BENCH_MAX_PROCS];
    int ctl[BENCH_MAX_PROCS], rep[BENCH_MAX_PROCS];
} bench_kids;

/* Forks o->procs children, each with its own epoll loop and source address
 * 127.0.0.(src_base + k); a child reads command bytes and writes bench_stats. */
static int bench_fork(const bench_opts *o, bench_child_fn fn, uint32_t (*share)(const bench_opts *, int),
                      bench_kids *kids)
{
    memset(kids, 0, sizeof(*kids));
    for (int k = 0; k < o->procs; k++) {
        int ctl[2], rep[2];
        if (pipe2(ctl, O_CLOEXEC) != 0 || pipe2(rep, O_CLOEXEC) != 0)
            return PX_ERROR;
        pid_t pid = fork();
        if (pid < 0)
            return PX_ERROR;
        if (pid == 0) {
            close(ctl[1]);
            close(rep[0]);
            for (int j = 0; j < k; j++) {
                close(kids->ctl[j]);
                close(kids->rep[j]);
            }
            static bench_proc p;
            bench_proc_init(&p, o, share(o, k), ctl[0], o->src_base + k);
            fn(&p, k, rep[1]);
            _exit(0);
        }
        close(ctl[0]);
        close(rep[1]);
        kids->pid[k] = pid;
        kids->ctl[k] = ctl[1];
        kids->rep[k] = rep[0];
        kids->n++;
    }
    return PX_OK;
}

/* One bench_stats from every child, merged into *all. */
static int bench_gather(bench_kids *kids, bench_stats *all)
{
    static bench_stats s;
    memset(all, 0, sizeof(*all));
    for (int k = 0; k < kids->n; k++) {
        if (bench_read_all(kids->rep[k], &s, sizeof(s)) != PX_OK) {
            fprintf(stderr, "parley-bench: process %d died without a report\n", (int)kids->pid[k]);
            return PX_ERROR;
        }
        bench_stats_merge(all, &s);
    }
    return PX_OK;
}

static void bench_tell(bench_kids *kids, char cmd)
{
    for (int k = 0; k < kids->n; k++)
        if (bench_write_all(kids->ctl[k], &cmd, 1) != PX_OK)
            fprintf(stderr, "parley-bench: process %d is gone\n", (int)kids->pid[k]);
}

static void bench_reap(bench_kids *kids)
{
    for (int k = 0; k < kids->n; k++) {
        close(kids->ctl[k]);
        close(kids->rep[k]);
        waitpid(kids->pid[k], NULL, 0);
    }
}

static long bench_rss_kb(pid_t pid)
{
    char path[64], line[256];
    long kb = -1;
    snprintf(path, sizeof(path), "/proc/%d/status", (int)pid);
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return -1;
    while (fgets(line, sizeof(line), f) != NULL)
        if (sscanf(line, "VmRSS: %ld kB", &kb) == 1)
            break;
    fclose(f);
    return kb;
}

static void bench_emit(json_t *j, const char *human)
{
    char *s = json_dumps(j, JSON_COMPACT);
    printf("%s\n", s);
    fflush(stdout);
    fprintf(stderr, "%s\n", human);
    free(s);
    json_decref(j);
}

/* ---- idle ------------------------------------------------------------------ */

static uint32_t bench_idle_share(const bench_opts *o, int k)
{
    return (uint32_t)(o->conns / o->procs + (k < o->conns % o->procs));
}

static void bench_idle_child(bench_proc *p, int k, int out_fd)
{
    uint32_t first = 0;
    for (int j = 0; j < k; j++)
        first += bench_idle_share(p->o, j);
    for (uint32_t i = 0; i < p->n; i++) {
        p->c[i].role = 'i';
        p->c[i].user = first + i;
        p->c[i].gw = (uint8_t)((first + i) % (uint32_t)p->o->ngw);
    }
    p->st.conns = p->n;
    bench_proc_connect(p, 0, p->n, bench_now() + (int64_t)p->o->connect_timeout_s * 1000000000LL);
    p->st.t_ready = bench_now();
    bench_write_all(out_fd, &p->st, sizeof(p->st));
    while (p->cmd != 'Q')
        bench_proc_wait_cmd(p); /* holding: pings are answered meanwhile */
    /* Counted again so connections the gateway dropped while held show up. */
    bench_write_all(out_fd, &p->st, sizeof(p->st));
}

static void bench_idle_gw_json(const bench_opts *o, json_t *out, const bench_stats *st,
                               const long *before, const long *after)
{
    json_t *gws = json_array();
    for (int g = 0; g < o->ngw_pids; g++) {
        uint64_t conns = st->synced_gw[g];
        double per = conns ? (double)(after[g] - before[g]) * 1024.0 / (double)conns : 0;
        json_array_append_new(gws, json_pack("{s:i, s:I, s:I, s:I, s:f}", "pid", (int)o->gw_pids[g],
                                             "conns", (json_int_t)conns, "rss_before_kb",
                                             (json_int_t)before[g], "rss_after_kb",
                                             (json_int_t)after[g], "bytes_per_conn", per));
    }
    json_object_set_new(out, "gateways", gws);
}

static int bench_idle(const bench_opts *o)
{
    long before[2] = { 0, 0 }, after[2] = { 0, 0 };
    for (int g = 0; g < o->ngw_pids; g++)
        before[g] = bench_rss_kb(o->gw_pids[g]);
    static bench_stats ready, held;
    bench_kids kids;
    int64_t t0 = bench_now();
    if (bench_fork(o, bench_idle_child, bench_idle_share, &kids) != PX_OK ||
        bench_gather(&kids, &ready) != PX_OK)
        return PX_ERROR;
    double secs = (double)(ready.t_ready - t0) / 1e9;
    fprintf(stderr, "parley-bench: idle: %" PRIu64 "/%d synced in %.1f s; holding %d s\n",
            ready.synced, o->conns, secs, o->hold_s);
    sleep((unsigned)o->hold_s);
    for (int g = 0; g < o->ngw_pids; g++)
        after[g] = bench_rss_kb(o->gw_pids[g]);
    bench_tell(&kids, 'Q');
    int rc = bench_gather(&kids, &held);
    bench_reap(&kids);
    if (rc != PX_OK)
        return PX_ERROR;
    json_t *j = json_pack("{s:s, s:i, s:i, s:I, s:I, s:I, s:I, s:f, s:f, s:o}", "scenario", "idle",
                          "conns", o->conns, "procs", o->procs, "opened", (json_int_t)ready.opened,
                          "synced", (json_int_t)ready.synced, "failed", (json_int_t)ready.failed,
                          "dropped_while_held", (json_int_t)held.closed, "connect_s", secs,
                          "conns_per_s", secs > 0 ? (double)ready.synced / secs : 0.0,
                          "connect_to_ready_ms", bench_hist_json(&ready.conn_lat));
    json_object_set_new(j, "hold_s", json_integer(o->hold_s));
    json_object_set_new(j, "counted_at", json_string(o->upgrade_only ? "upgrade" : "synced"));
    bench_idle_gw_json(o, j, &ready, before, after);
    char human[512];
    int off = snprintf(human, sizeof(human), "idle: %" PRIu64 " %s (%" PRIu64 " failed) at %.0f conn/s,"
                       " connect->ready p99 %.1f ms, %" PRIu64 " dropped while held",
                       ready.synced, o->upgrade_only ? "upgraded" : "synced", ready.failed, secs > 0 ? (double)ready.synced / secs : 0.0,
                       bench_ms(bench_hist_q(&ready.conn_lat, 0.99)), held.closed);
    for (int g = 0; g < o->ngw_pids && off < (int)sizeof(human); g++)
        off += snprintf(human + off, sizeof(human) - (size_t)off, "; gw pid %d +%ld kB = %.0f B/conn",
                        (int)o->gw_pids[g], after[g] - before[g],
                        ready.synced_gw[g] ? (double)(after[g] - before[g]) * 1024.0 /
                                                 (double)ready.synced_gw[g] : 0.0);
    bench_emit(j, human);
    return ready.failed == 0 && held.closed == 0 ? PX_OK : PX_ERROR;
}

/* ---- rate ------------------------------------------------------------------ */

static uint32_t bench_rate_npairs(const bench_opts *o, int k)
{
    return (uint32_t)(o->pairs / o->procs + (k < o->pairs % o->procs));
}

static uint32_t bench_chaos_ngroups(const bench_opts *o, int k)
{
    return (uint32_t)(o->groups / o->procs + (k < o->groups % o->procs));
}

static uint32_t bench_rate_share(const bench_opts *o, int k)
{
    return 2 * bench_rate_npairs(o, k);
}

/* Sends what the schedule says is due by now: a fixed rate, not a closed
 * loop, so a slow server shows up as latency instead of a lower send rate. */
static void bench_rate_pump(bench_proc *p, uint32_t np, double rate, uint64_t total, int64_t t0,
                            char (*names)[96])
{
    double due_f = (double)(bench_now() - t0) * rate / 1e9;
    uint64_t due = PX_MIN((uint64_t)due_f, total);
    while (p->st.sends < due) {
        uint32_t i = (uint32_t)(p->st.sends % np);
        bench_send(p, &p->c[np + i], names[i], p->st.sends);
    }
}

static void bench_rate_child(bench_proc *p, int k, int out_fd)
{
    const bench_opts *o = p->o;
    uint32_t np = p->n / 2, first = 0;
    for (int j = 0; j < k; j++)
        first += bench_rate_npairs(o, j);
    char (*names)[96] = px_calloc(np, sizeof(*names));
    for (uint32_t i = 0; i < np; i++) {
        p->c[i] = (bench_conn){ .fd = -1, .role = 'r', .user = first + i, .gw = 0 };
        p->c[np + i] = (bench_conn){ .fd = -1, .role = 's', .user = first + i,
                                     .gw = (uint8_t)(o->ngw - 1) };
    }
    p->st.conns = p->n;
    double rate = o->rate / o->procs;
    uint64_t total = (uint64_t)(rate * o->duration_s);
    double grate = o->group_rate / o->procs;
    if (o->chaos) /* before connecting: a connection that fails then is retried too */
        bench_chaos_init(p, total, np, names, bench_chaos_ngroups(o, k),
                         (uint64_t)(grate * o->duration_s));
    int64_t deadline = bench_now() + (int64_t)o->connect_timeout_s * 1000000000LL;
    bench_proc_connect(p, 0, np, deadline);      /* receivers first: nothing waits in inboxes */
    bench_proc_connect(p, np, 2 * np, deadline);
    if (p->chaos != NULL && p->chaos->ng > 0) /* a group that failed shows as lost copies */
        bench_chaos_groups_setup(p, bench_now() + (int64_t)o->connect_timeout_s * 1000000000LL);
    for (uint32_t i = 0; i < np; i++)
        o->proto->address(p, &p->c[i], names[i], sizeof(names[i]));
    p->st.t_ready = bench_now();
    bench_write_all(out_fd, &p->st, sizeof(p->st));
    bench_proc_wait_cmd(p);
    bench_seen_alloc(p, total);
    if (o->chaos)
        memset(&p->st.conn_lat, 0, sizeof(p->st.conn_lat)); /* from here: reconnects only */
    int64_t t0 = p->st.t_go = bench_now(), end = t0 + (int64_t)o->duration_s * 1000000000LL;
    while (bench_now() < end && p->cmd != 'Q') {
        bench_rate_pump(p, np, rate, total, t0, names);
        if (p->chaos != NULL && p->chaos->ng > 0)
            bench_chaos_group_pump(p, grate, t0);
        bench_proc_step(p, 1);
    }
    p->st.t_send_end = bench_now();
    int64_t grace = p->st.t_send_end + (int64_t)o->grace_s * 1000000000LL;
    while (bench_now() < grace && (p->chaos != NULL ? !bench_chaos_done(p)
                                   : p->st.received < p->st.sends ||
                                     (o->proto->answers_sends &&
                                      p->st.sent_ok + p->st.errors < p->st.sends)))
        bench_proc_step(p, 10);
    for (uint32_t i = 0; i < np; i++)
        bench_ack_flush(p, &p->c[i]);
    for (int i = 0; i < 20; i++)
        bench_proc_step(p, 10); /* let the last acks leave */
    if (p->chaos != NULL) {
        bench_chaos_resync(p);
        bench_chaos_finish(p);
    }
    free(names);
    bench_write_all(out_fd, &p->st, sizeof(p->st));
}

/* chaos: the parent passes SIGUSR1 (a fault starts) and SIGUSR2 (it ended)
 * on to every child as 'F' and 'E'. */
static bench_kids *volatile bench_fault_kids;

static void bench_on_fault_signal(int sig)
{
    bench_kids *kids = bench_fault_kids;
    char cmd = sig == SIGUSR1 ? 'F' : 'E';
    for (int k = 0; kids != NULL && k < kids->n; k++)
        if (write(kids->ctl[k], &cmd, 1) != 1)
            continue; /* a child gone reports so itself */
}

/* One rate run: connects the pairs, sends for o->duration_s, waits out the
 * grace; *ready holds the connect stats, *st the run's. */
static int bench_rate_run(const bench_opts *o, bench_stats *ready, bench_stats *st)
{
    static bench_kids kids;
    if (bench_fork(o, bench_rate_child, bench_rate_share, &kids) != PX_OK ||
        bench_gather(&kids, ready) != PX_OK)
        return PX_ERROR;
    /* Presence registration travels through Kafka after `synced`; a lookup
     * before it lands would be cached as offline for PARLEY_PRESENCE_CACHE_MS. */
    sleep((unsigned)o->settle_s);
    bench_tell(&kids, 'G');
    if (o->chaos) {
        bench_fault_kids = &kids;
        fprintf(stderr, "parley-bench: go\n"); /* tests/chaos/ waits for it to start a fault */
    }
    int rc = bench_gather(&kids, st);
    bench_fault_kids = NULL;
    bench_reap(&kids);
    return rc;
}

static double bench_rate_delivered(const bench_stats *st)
{
    double recv_s = st->t_last > st->t_go ? (double)(st->t_last - st->t_go) / 1e9 : 0;
    return recv_s > 0 ? (double)st->received / recv_s : 0;
}

static json_t *bench_rate_json(const bench_opts *o, const bench_stats *ready, const bench_stats *st)
{
    double send_s = (double)(st->t_send_end - st->t_go) / 1e9;
    json_t *j = json_pack("{s:s, s:i, s:f, s:i, s:i, s:i, s:i, s:I, s:I, s:I, s:I, s:I, s:I, s:I,"
                          " s:f, s:f, s:o}",
                          "scenario", "rate", "pairs", o->pairs, "rate", o->rate, "duration_s",
                          o->duration_s, "procs", o->procs, "body_bytes", o->body_bytes,
                          "connect_failed", (int)ready->failed, "sends", (json_int_t)st->sends,
                          "sent_answers", (json_int_t)st->sent_ok, "errors", (json_int_t)st->errors,
                          "rate_limited", (json_int_t)st->rate_limited, "received",
                          (json_int_t)st->received, "not_received",
                          (json_int_t)(st->sends - st->received), "duplicates", (json_int_t)st->dups,
                          "send_rate", send_s > 0 ? (double)st->sends / send_s : 0.0,
                          "delivered_per_s", bench_rate_delivered(st), "latency_ms",
                          bench_hist_json(&st->lat));
    json_object_set_new(j, "acked", json_integer((json_int_t)st->acks));
    json_object_set_new(j, "grace_s", json_integer(o->grace_s));
    json_object_set_new(j, "proto", json_string(o->proto->name));
    if (!o->proto->answers_sends) /* XMPP has no `sent`: unknown, not none */
        json_object_set_new(j, "sent_answers", json_null());
    return j;
}

/* chaos: the rate report plus what the faults cost; fails if a message
 * answered `sent` (or a copy of a group message answered `sent`) never
 * arrived or a send was never answered (connections
 * that failed to connect were retried, so they do not fail it). */
static int bench_chaos_report(const bench_opts *o, json_t *j, const bench_stats *st)
{
    json_object_set_new(j, "chaos", json_pack(
        "{s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:o, s:o, s:o, s:o, s:i}",
        "answered", (json_int_t)st->answered, "lost", (json_int_t)st->lost,
        "unanswered_received", (json_int_t)st->unanswered_received,
        "resends", (json_int_t)st->resends, "reconnects", (json_int_t)st->reconnects,
        "receipts_expected", (json_int_t)(2 * st->received),
        "receipts_delivered", (json_int_t)st->rcpt[0], "receipts_read", (json_int_t)st->rcpt[1],
        "receipts_received", (json_int_t)(st->rcpt[0] + st->rcpt[1]),
        "receipt_duplicates", (json_int_t)st->rcpt_dups,
        "receipts_after_resync", (json_int_t)st->rcpt_resync,
        "resume_ms", st->lat_in.count ? json_real(bench_ms((uint64_t)st->stall)) : json_null(),
        "reconnect_to_synced_ms", bench_hist_json(&st->conn_lat),
        "latency_in_ms", bench_hist_json(&st->lat_in), "latency_out_ms",
        bench_hist_json(&st->lat_out), "window_s", o->window_s));
    json_object_set_new(json_object_get(j, "chaos"), "groups", json_pack(
        "{s:i, s:f, s:I, s:I, s:I, s:I, s:I, s:I, s:o, s:o, s:o}", "groups", o->groups,
        "rate", o->groups > 0 ? o->group_rate : 0.0, "sends", (json_int_t)st->gsends,
        "answered", (json_int_t)st->ganswered,
        "copies_expected", (json_int_t)((BENCH_GROUP_MEMBERS - 1) * st->ganswered),
        "copies_received", (json_int_t)st->gcopies, "lost", (json_int_t)st->glost,
        "duplicates", (json_int_t)st->gdups,
        "resume_ms", st->glat_in.count ? json_real(bench_ms((uint64_t)st->gstall)) : json_null(),
        "latency_in_ms", bench_hist_json(&st->glat_in), "latency_out_ms",
        bench_hist_json(&st->glat_out)));
    char human[768];
    snprintf(human, sizeof(human),
             "chaos %.0f/s x %d s, %d pairs: %" PRIu64 " sends, %" PRIu64 " answered, %" PRIu64
             " received, %" PRIu64 " lost, %" PRIu64 " dup, receipts %" PRIu64 "/%" PRIu64
             ", %" PRIu64 " reconnects, %" PRIu64 " resends, resumed %.2f s, p99 in %.0f ms"
             " out %.0f ms; %d groups: %" PRIu64 " sends, %" PRIu64 " answered, %" PRIu64 " of %"
             PRIu64 " copies, %" PRIu64 " lost, %" PRIu64 " dup, resumed %.2f s", o->rate,
             o->duration_s, o->pairs, st->sends, st->answered,
             st->received, st->lost, st->dups, st->rcpt[0] + st->rcpt[1], 2 * st->received,
             st->reconnects, st->resends, bench_ms((uint64_t)st->stall) / 1e3,
             bench_ms(bench_hist_q(&st->lat_in, .99)), bench_ms(bench_hist_q(&st->lat_out, .99)),
             o->groups, st->gsends, st->ganswered, st->gcopies,
             (BENCH_GROUP_MEMBERS - 1) * st->ganswered, st->glost, st->gdups,
             bench_ms((uint64_t)st->gstall) / 1e3);
    bench_emit(j, human);
    return st->lost == 0 && st->answered == st->sends && st->glost == 0 &&
                   st->ganswered == st->gsends ? PX_OK : PX_ERROR;
}

/* rate --idle N: N more connections (users of role i, alternating over
 * the gateways) on --idle-procs processes whose source addresses follow
 * the rate processes', each waiting for `synced`, then held through the run
 * (pings answered): the rate at the scale of connected clients the targets
 * name, instead of beside 200 connections only. */
static int bench_idle_connect(const bench_opts *o, bench_kids *kids, bench_stats *ready,
                              double *secs)
{
    static bench_opts io;
    io = *o;
    io.conns = o->idle;
    io.procs = o->idle_procs;
    io.src_base = o->src_base + o->procs;
    io.upgrade_only = 0;
    int64_t t0 = bench_now();
    if (bench_fork(&io, bench_idle_child, bench_idle_share, kids) != PX_OK ||
        bench_gather(kids, ready) != PX_OK)
        return PX_ERROR;
    *secs = (double)(ready->t_ready - t0) / 1e9;
    fprintf(stderr, "parley-bench: %" PRIu64 "/%d idle connections synced in %.1f s (%" PRIu64
            " failed)\n", ready->synced, o->idle, *secs, ready->failed);
    return PX_OK;
}

/* rate, and latency: the same run at a low fixed rate (100/s unless
 * --rate says otherwise), where nothing queues, so its p50 is the floor:
 * the time a message takes through an idle system. */
static int bench_rate(const bench_opts *o, const char *scenario)
{
    static bench_stats ready, st, idle_ready, idle_held;
    static bench_kids idle_kids;
    double idle_s = 0;
    if (o->idle > 0 && bench_idle_connect(o, &idle_kids, &idle_ready, &idle_s) != PX_OK)
        return PX_ERROR;
    int rc = bench_rate_run(o, &ready, &st);
    if (o->idle > 0) {
        bench_tell(&idle_kids, 'Q');
        if (bench_gather(&idle_kids, &idle_held) != PX_OK)
            rc = PX_ERROR;
        bench_reap(&idle_kids);
    }
    if (rc != PX_OK)
        return PX_ERROR;
    uint64_t missing = st.sends - st.received;
    char human[512];
    snprintf(human, sizeof(human),
             "%s %.0f/s x %d s, %d pairs: %" PRIu64 " sent, %" PRIu64 " `sent`, %" PRIu64
             " received (%" PRIu64 " missing, %" PRIu64 " dup), %.0f delivered/s, latency ms "
             "min %.2f p50 %.2f p90 %.2f p99 %.2f p99.9 %.2f max %.2f",
             scenario, o->rate, o->duration_s, o->pairs, st.sends, st.sent_ok, st.received,
             missing, st.dups, bench_rate_delivered(&st), bench_ms(bench_hist_q(&st.lat, 0)),
             bench_ms(bench_hist_q(&st.lat, .5)), bench_ms(bench_hist_q(&st.lat, .9)),
             bench_ms(bench_hist_q(&st.lat, .99)), bench_ms(bench_hist_q(&st.lat, .999)),
             bench_ms(st.lat.max));
    json_t *j = bench_rate_json(o, &ready, &st);
    json_object_set_new(j, "scenario", json_string(scenario));
    if (o->chaos)
        return bench_chaos_report(o, j, &st);
    if (o->idle > 0) {
        json_object_set_new(j, "idle", json_pack("{s:i, s:I, s:I, s:I, s:f}", "conns", o->idle,
                                                 "synced", (json_int_t)idle_ready.synced,
                                                 "failed", (json_int_t)idle_ready.failed,
                                                 "dropped_while_held", (json_int_t)idle_held.closed,
                                                 "connect_s", idle_s));
        size_t off = strlen(human);
        snprintf(human + off, sizeof(human) - off, "; beside %" PRIu64 " idle synced connections"
                 " (%" PRIu64 " dropped)", idle_ready.synced, idle_held.closed);
    }
    bench_emit(j, human);
    return missing == 0 && ready.failed == 0 && idle_ready.failed == 0 && idle_held.closed == 0
               ? PX_OK : PX_ERROR;
}

/* ---- max ------------------------------------------------------------------- */

/* p99 over every send in ms, a message never received counting as slower
 * than any that was: infinite when more than 1% never arrived. */
static double bench_max_p99(const bench_stats *st)
{
    if (st->sends == 0 || (double)st->received < 0.99 * (double)st->sends)
        return INFINITY;
    return bench_ms(bench_hist_q(&st->lat, 0.99 * (double)st->sends / (double)st->received));
}

/* One ladder step at `rate` with users of its own; appends it to steps. */
static double bench_max_step(const bench_opts *o, double rate, int k, json_t *steps)
{
    static bench_stats ready, st;
    bench_opts so = *o;
    so.rate = rate;
    snprintf(so.prefix, sizeof(so.prefix), "%.28s%d-", o->prefix, k);
    if (bench_rate_run(&so, &ready, &st) != PX_OK)
        return INFINITY;
    double p99 = bench_max_p99(&st);
    json_t *j = bench_rate_json(&so, &ready, &st);
    json_object_set_new(j, "p99_ms_all_sends", isinf(p99) ? json_null() : json_real(p99));
    json_array_append_new(steps, j);
    fprintf(stderr, "parley-bench: max: %.0f/s -> p99 %.2f ms (%" PRIu64 " of %" PRIu64
            " received)\n", rate, p99, st.received, st.sends);
    return p99;
}

static int bench_max(const bench_opts *o)
{
    json_t *steps = json_array();
    double good = 0, good_p99 = -1, bad = 0, rate = o->rate;
    int k = 0;
    /* The ladder: double while it holds, halve (4 times at most) while it fails. */
    for (; k < 12; k++) {
        double p99 = bench_max_step(o, rate, k, steps);
        if (p99 < o->max_p99_ms) {
            good = rate;
            good_p99 = p99;
            if (bad > 0)
                break;
            rate *= 2;
        } else {
            bad = rate;
            if (good > 0 || rate / 2 < PX_MAX(1, o->rate / 16))
                break;
            rate /= 2;
        }
    }
    for (int i = 0; i < o->steps && good > 0 && bad > 0; i++) {
        double mid = round((good + bad) / 2);
        double p99 = bench_max_step(o, mid, ++k, steps);
        if (p99 < o->max_p99_ms) {
            good = mid;
            good_p99 = p99;
        } else {
            bad = mid;
        }
    }
    json_t *j = json_pack("{s:s, s:f, s:f, s:i, s:i, s:o}", "scenario", "max", "max_p99_ms",
                          o->max_p99_ms, "rate", good, "pairs", o->pairs, "step_s", o->duration_s,
                          "steps", steps);
    json_object_set_new(j, "p99_ms", good > 0 ? json_real(good_p99) : json_null());
    json_object_set_new(j, "first_failing_rate", bad > 0 ? json_real(bad) : json_null());
    char human[256];
    snprintf(human, sizeof(human), "max: %.0f/s with p99 %.2f ms (< %.0f ms); %.0f/s did not hold",
             good, good_p99, o->max_p99_ms, bad);
    bench_emit(j, human);
    return good > 0 ? PX_OK : PX_ERROR;
}

/* ---- group ----------------------------------------------------------------- */

/* The creator (member 0) asks for a group of everyone, which invites them;
 * waits for its id, then for every member to have joined and for every
 * event that made to be delivered, so the measured sends do not queue
 * behind them: `created` (1) and `invited` (to all n), then the k-th join
 * goes to the creator and the k joined so far, (n-1)(n+2)/2 in all (33,152
 * events for 256 members). */
static int bench_group_create(bench_proc *p, int64_t deadline)
{
    /* Member i's devices are connections i*d .. i*d+d-1; device 0 acts. */
    uint32_t d = (uint32_t)p->o->devices, members = p->n / d;
    size_t cap = 64 + (size_t)members * 100, len = 0;
    char *cmd = px_malloc(cap);
    len += (size_t)snprintf(cmd, cap, "{\"type\":\"group_create\",\"id\":\"gc\",\"name\":\"bench\","
                            "\"members\":[");
    for (uint32_t i = 1; i < members; i++) {
        char name[96];
        bench_user_name(p, &p->c[i * d], name, sizeof(name));
        len += (size_t)snprintf(cmd + len, cap - len, "%s\"%s\"", i > 1 ? "," : "", name);
    }
    len += (size_t)snprintf(cmd + len, cap - len, "]}");
    bench_conn_text(p, &p->c[0], cmd, len);
    free(cmd);
    while (p->group[0] == '\0' && p->c[0].state == BC_OPEN && bench_now() < deadline)
        bench_proc_step(p, 10);
    if (p->group[0] == '\0')
        return PX_ERROR;
    char join[160];
    int jl = snprintf(join, sizeof(join), "{\"type\":\"group_join\",\"id\":\"gj\",\"group\":\"%s\"}",
                      p->group);
    for (uint32_t i = 1; i < members; i++)
        bench_conn_text(p, &p->c[i * d], join, (size_t)jl);
    /* Every device of a member gets each of its group events. */
    uint64_t n = members, events = (1 + n + (n - 1) * (n + 2) / 2) * d;
    while ((p->joined < members - 1 || p->group_events < events) && bench_now() < deadline)
        bench_proc_step(p, 10);
    return p->joined == members - 1 && p->group_events == events ? PX_OK : PX_ERROR;
}

/* The copies of the group sends: every device of every other member, and
 * the sender's other devices. */
static uint64_t bench_group_want(const bench_proc *p)
{
    return (uint64_t)p->o->msgs * (p->n - 1);
}

/* Sends o->msgs at o->rate from the creator, then waits for every copy. */
static void bench_group_send(bench_proc *p)
{
    const bench_opts *o = p->o;
    uint64_t want = bench_group_want(p);
    int64_t t0 = p->st.t_go = bench_now();
    while (p->st.sends < (uint64_t)o->msgs) {
        if ((double)(bench_now() - t0) * o->rate / 1e9 >= (double)p->st.sends)
            bench_send_to(p, &p->c[0], "group", p->group, p->st.sends);
        bench_proc_step(p, 1);
    }
    p->st.t_send_end = bench_now();
    int64_t grace = p->st.t_send_end + (int64_t)o->grace_s * 1000000000LL;
    while (bench_now() < grace && p->st.received < want)
        bench_proc_step(p, 10);
    for (uint32_t i = 0; i < p->n; i++)
        bench_ack_flush(p, &p->c[i]);
    for (int i = 0; i < 20; i++)
        bench_proc_step(p, 10); /* let the last acks leave */
}

static int bench_group(const bench_opts *o)
{
    static bench_proc p;
    uint32_t d = (uint32_t)o->devices;
    bench_proc_init(&p, o, (uint32_t)o->members * d, -1, o->src_base);
    for (uint32_t i = 0; i < p.n; i++)
        p.c[i] = (bench_conn){ .fd = -1, .role = 'm', .user = i / d, .dev = (uint8_t)(i % d),
                               .gw = (uint8_t)(i % (uint32_t)o->ngw) };
    p.fanout = p.n;
    bench_seen_alloc(&p, (uint64_t)o->msgs * p.n);
    int64_t deadline = bench_now() + (int64_t)o->connect_timeout_s * 1000000000LL;
    bench_proc_connect(&p, 0, p.n, deadline);
    if (p.st.synced < p.n || bench_group_create(&p, deadline) != PX_OK) {
        fprintf(stderr, "parley-bench: group: %" PRIu64 " of %u synced, group %s, %u joined, "
                "%" PRIu64 " group events\n", p.st.synced, p.n, p.group[0] ? p.group : "not created",
                p.joined, p.group_events);
        return PX_ERROR;
    }
    sleep((unsigned)o->settle_s); /* as for rate: presence learns of everyone first */
    bench_group_send(&p);
    uint64_t want = bench_group_want(&p);
    json_t *j = json_pack("{s:s, s:i, s:i, s:f, s:I, s:I, s:I, s:I, s:o}", "scenario", "group",
                          "members", o->members, "msgs", o->msgs, "rate", o->rate,
                          "sent_answers", (json_int_t)p.st.sent_ok, "copies_expected",
                          (json_int_t)want, "copies_received", (json_int_t)p.st.received,
                          "errors", (json_int_t)p.st.errors, "latency_ms", bench_hist_json(&p.st.lat));
    json_object_set_new(j, "latency_at_socket_ms", bench_hist_json(&p.st.lat_socket));
    json_object_set_new(j, "grace_s", json_integer(o->grace_s));
    json_object_set_new(j, "devices", json_integer(o->devices));
    char human[256];
    snprintf(human, sizeof(human), "group: %d members x %d devices, %d msgs: %" PRIu64 " of %" PRIu64
             " copies, latency ms p50 %.2f p99 %.2f max %.2f (at the socket: p50 %.2f p99 %.2f)",
             o->members, o->devices, o->msgs, p.st.received, want,
             bench_ms(bench_hist_q(&p.st.lat, .5)), bench_ms(bench_hist_q(&p.st.lat, .99)),
             bench_ms(p.st.lat.max), bench_ms(bench_hist_q(&p.st.lat_socket, .5)),
             bench_ms(bench_hist_q(&p.st.lat_socket, .99)));
    bench_emit(j, human);
    return p.st.received == want ? PX_OK : PX_ERROR;
}

/* ---- sync ------------------------------------------------------------------ */

/* Sends o->pending messages to the offline user from enough senders that no
 * one passes the gateway's per-connection burst; waits for every `sent`. */
static int bench_sync_fill(bench_proc *p, uint32_t ns, const char *to)
{
    const bench_opts *o = p->o;
    int64_t deadline = bench_now() + (int64_t)o->connect_timeout_s * 1000000000LL;
    bench_proc_connect(p, 0, ns, deadline);
    if (p->st.synced < ns)
        return PX_ERROR;
    for (uint64_t seq = 0; seq < (uint64_t)o->pending; seq++) {
        bench_send(p, &p->c[seq % ns], to, seq);
        if (seq % 256 == 0)
            bench_proc_step(p, 0); /* keep reading `sent`s so neither side stalls */
    }
    deadline = bench_now() + 120 * 1000000000LL;
    while (p->st.sent_ok + p->st.errors < p->st.sends && bench_now() < deadline)
        bench_proc_step(p, 10);
    return p->st.sent_ok == (uint64_t)o->pending ? PX_OK : PX_ERROR;
}

/* Connects the pending user's slot and runs until `synced` and `want`
 * messages, or the deadline. */
static void bench_sync_connect(bench_proc *p, bench_conn *x, uint32_t want, int64_t deadline)
{
    bench_conn_drop(p, x);
    bench_conn_start(p, x);
    while (x->state != BC_DEAD && (!x->synced || x->msgs < want) && bench_now() < deadline)
        bench_proc_step(p, 1);
}

static int bench_sync(const bench_opts *o)
{
    static bench_proc p;
    uint32_t ns = (uint32_t)PX_MAX(1, (o->pending + 499) / 500);
    bench_proc_init(&p, o, ns + 1, -1, o->src_base);
    for (uint32_t i = 0; i < ns; i++)
        p.c[i] = (bench_conn){ .fd = -1, .role = 'q', .user = i, .gw = (uint8_t)(o->ngw - 1) };
    bench_conn *x = &p.c[ns];
    *x = (bench_conn){ .fd = -1, .role = 'p', .user = 0, .gw = 0 };
    char to[96];
    bench_user_name(&p, x, to, sizeof(to));
    int64_t t_fill = bench_now();
    if (bench_sync_fill(&p, ns, to) != PX_OK) {
        fprintf(stderr, "parley-bench: sync: only %" PRIu64 " of %d sends answered `sent`\n",
                p.st.sent_ok, o->pending);
        return PX_ERROR;
    }
    double fill_s = (double)(bench_now() - t_fill) / 1e9;
    /* Probe without acking until the store holds every message, so the timed
     * connection measures the sync, not message-store catching up. */
    int probes = 0;
    int64_t t_store = bench_now(), deadline = t_store + (int64_t)o->grace_s * 1000000000LL;
    x->no_ack = 1;
    do {
        probes++;
        bench_sync_connect(&p, x, (uint32_t)o->pending, bench_now() + 10 * 1000000000LL);
        if (x->msgs_at_sync >= (uint32_t)o->pending)
            break;
        sleep(1);
    } while (bench_now() < deadline);
    double store_s = (double)(bench_now() - t_store) / 1e9;
    bench_conn_drop(&p, x);
    x->no_ack = 0;
    bench_seen_alloc(&p, (uint64_t)o->pending);
    p.st.received = 0;
    int64_t t0 = bench_now();
    bench_sync_connect(&p, x, (uint32_t)o->pending, t0 + BENCH_SYNC_WAIT_S * 1000000000LL);
    double sync_ms = x->synced ? bench_ms((uint64_t)(x->t_synced - t0)) : -1;
    double all_ms = p.st.received >= (uint64_t)o->pending ? bench_ms((uint64_t)(p.st.t_last - t0)) : -1;
    bench_ack_flush(&p, x);
    for (int i = 0; i < 50; i++)
        bench_proc_step(&p, 10);
    json_t *j = json_pack("{s:s, s:i, s:i, s:f, s:f, s:i, s:I, s:I, s:f, s:f, s:f, s:i}",
                          "scenario", "sync", "pending", o->pending, "senders", (int)ns,
                          "fill_s", fill_s, "store_catch_up_s", store_s, "probes", probes,
                          "received", (json_int_t)p.st.received, "before_synced",
                          (json_int_t)x->msgs_at_sync, "connect_to_synced_ms", sync_ms,
                          "connect_to_all_ms", all_ms, "msgs_per_s",
                          all_ms > 0 ? (double)o->pending / (all_ms / 1e3) : 0.0,
                          "gave_up_after_s", BENCH_SYNC_WAIT_S);
    char human[256];
    snprintf(human, sizeof(human), "sync: %d pending; connect->synced %.0f ms, all %" PRIu64
             " in %.0f ms (%u before synced)", o->pending, sync_ms, p.st.received, all_ms,
             x->msgs_at_sync);
    bench_emit(j, human);
    return all_ms >= 0 ? PX_OK : PX_ERROR;
}

/* ---- main ------------------------------------------------------------------ */

static int bench_parse_url(const char *url, bench_addr *a)
{
    const char *s = strncmp(url, "ws://", 5) == 0 ? url + 5 : url;
    const char *colon = strchr(s, ':');
    if (colon == NULL || (size_t)(colon - s) >= sizeof(a->host))
        return PX_ERROR;
    snprintf(a->host, sizeof(a->host), "%.*s", (int)(colon - s), s);
    a->port = atoi(colon + 1);
    memset(&a->sa, 0, sizeof(a->sa));
    a->sa.sin_family = AF_INET;
    a->sa.sin_port = htons((uint16_t)a->port);
    if (a->port <= 0 || a->port > 65535 || inet_pton(AF_INET, a->host, &a->sa.sin_addr) != 1)
        return PX_ERROR;
    return PX_OK;
}

static void bench_usage(void)
{
    fprintf(stderr,
            "usage: parley-bench idle|rate|latency|sync|max|group|chaos [options]\n"
            "  --url ws://IP:PORT      gateway 1 (receivers; idle: even connections)\n"
            "  --url2 ws://IP:PORT     gateway 2 (senders; idle: odd connections)\n"
            "  --secret S              HS256 secret (default $PARLEY_JWT_SECRET)\n"
            "  --gw-pids PID[,PID]     gateways whose VmRSS idle reports (same order as urls)\n"
            "  --conns N (10000)  --procs P (2)  --hold S (5)  --inflight N per process (200)\n"
            "  --pairs M (100)  --rate R msgs/s (1000)  --duration S (20)  --grace S (10)\n"
            "  --settle S (3)  --body-bytes B (100)  --pending N (10000)  --src-base B (10)\n"
            "  --connect-timeout S (120)  --max-p99 MS (100)  --steps N (3)\n"
            "  --members N (256)  --msgs N (30): group; --rate is then its send rate\n"
            "  --devices D (1): group: each member online on D devices\n"
            "  --upgrade-only          idle: count connections at the 101, not at `synced`\n"
            "  --idle N (0)  --idle-procs P (2): rate: N more connections, synced before the\n"
            "                          run and held through it, on P processes of their own\n"
            "  --window S (10)         chaos: the fault window lasts S past the fault's end\n"
            "  --quick                 chaos: wait for the messages only (receipts counted as they come)\n"
            "  --groups G (0)  --group-rate R (10): chaos: G groups of 4 (two pairs), R group msgs/s\n"
            "  --slow-log FILE  --slow-ms MS (100): each message received MS or later after\n"
            "                          its send, as `<send time, Unix ms> <latency ms> <connection>`\n"
            "  --proto parley|xmpp     xmpp: rate, latency, max, idle against an XMPP server's\n"
            "                          WebSocket (/ws), SASL ANONYMOUS; --domain D (localhost)\n");
}

static int bench_parse_pids(const char *s, bench_opts *o)
{
    char *end;
    o->ngw_pids = 0;
    while (*s && o->ngw_pids < 2) {
        o->gw_pids[o->ngw_pids++] = (pid_t)strtol(s, &end, 10);
        if (end == s)
            return PX_ERROR;
        s = *end == ',' ? end + 1 : end;
    }
    return PX_OK;
}

static int bench_parse(int argc, char **argv, bench_opts *o)
{
    static const struct option opts[] = {
        { "url", 1, 0, 'u' }, { "url2", 1, 0, 'U' }, { "secret", 1, 0, 'S' },
        { "gw-pids", 1, 0, 'G' }, { "conns", 1, 0, 'n' }, { "procs", 1, 0, 'P' },
        { "hold", 1, 0, 'h' }, { "inflight", 1, 0, 'i' }, { "pairs", 1, 0, 'm' },
        { "rate", 1, 0, 'r' }, { "duration", 1, 0, 'd' }, { "grace", 1, 0, 'g' },
        { "settle", 1, 0, 's' }, { "body-bytes", 1, 0, 'b' }, { "pending", 1, 0, 'p' },
        { "src-base", 1, 0, 'B' }, { "connect-timeout", 1, 0, 'T' },
        { "upgrade-only", 0, 0, 'O' }, { "max-p99", 1, 0, 'X' }, { "steps", 1, 0, 'N' },
        { "members", 1, 0, 'M' }, { "msgs", 1, 0, 'K' }, { "devices", 1, 0, 'D' },
        { "idle", 1, 0, 'I' }, { "idle-procs", 1, 0, 'J' }, { "window", 1, 0, 'W' }, { "quick", 0, 0, 'Q' },
        { "groups", 1, 0, 'y' }, { "group-rate", 1, 0, 'Y' }, { "proto", 1, 0, 'x' }, { "domain", 1, 0, 'o' },
        { "slow-log", 1, 0, 'L' }, { "slow-ms", 1, 0, 'l' },
        { 0, 0, 0, 0 }
    };
    *o = (bench_opts){ .conns = 10000, .procs = 2, .pairs = 100, .duration_s = 20, .grace_s = 10,
                       .hold_s = 5, .settle_s = 3, .connect_timeout_s = 120, .inflight = 200,
                       .body_bytes = 100, .pending = 10000, .src_base = 10, .rate = 1000,
                       .max_p99_ms = 100, .steps = 3, .members = 256, .msgs = 30, .devices = 1,
                       .window_s = 10, .idle_procs = 2, .group_rate = 10, .proto = &bench_parley,
                       .domain = "localhost", .slow_ms = 100,
                       .secret = getenv("PARLEY_JWT_SECRET") };
    const char *url = "ws://127.0.0.1:8080", *url2 = NULL;
    int ch, rate_set = 0;
    while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (ch) {
        case 'u': url = optarg; break;
        case 'U': url2 = optarg; break;
        case 'S': o->secret = optarg; break;
        case 'G': if (bench_parse_pids(optarg, o) != PX_OK) return PX_ERROR; break;
        case 'n': o->conns = atoi(optarg); break;
        case 'P': o->procs = atoi(optarg); break;
        case 'h': o->hold_s = atoi(optarg); break;
        case 'i': o->inflight = atoi(optarg); break;
        case 'm': o->pairs = atoi(optarg); break;
        case 'r': o->rate = atof(optarg); rate_set = 1; break;
        case 'd': o->duration_s = atoi(optarg); break;
        case 'g': o->grace_s = atoi(optarg); break;
        case 's': o->settle_s = atoi(optarg); break;
        case 'b': o->body_bytes = atoi(optarg); break;
        case 'p': o->pending = atoi(optarg); break;
        case 'B': o->src_base = atoi(optarg); break;
        case 'T': o->connect_timeout_s = atoi(optarg); break;
        case 'O': o->upgrade_only = 1; break;
        case 'X': o->max_p99_ms = atof(optarg); break;
        case 'N': o->steps = atoi(optarg); break;
        case 'M': o->members = atoi(optarg); break;
        case 'D': o->devices = atoi(optarg); break;
        case 'K': o->msgs = atoi(optarg); break;
        case 'W': o->window_s = atoi(optarg); break;
        case 'I': o->idle = atoi(optarg); break;
        case 'J': o->idle_procs = atoi(optarg); break;
        case 'Q': o->quick = 1; break;
        case 'y': o->groups = atoi(optarg); break;
        case 'Y': o->group_rate = atof(optarg); break;
        case 'x':
            if (strcmp(optarg, "xmpp") != 0 && strcmp(optarg, "parley") != 0)
                return PX_ERROR;
            o->proto = strcmp(optarg, "xmpp") == 0 ? &bench_xmpp : &bench_parley;
            break;
        case 'o': o->domain = optarg; break;
        case 'l': o->slow_ms = atof(optarg); break;
        case 'L':
            if ((o->slow = fopen(optarg, "a")) == NULL)
                return PX_ERROR;
            setvbuf(o->slow, NULL, _IOLBF, 0); /* whole lines, shared by the forked processes */
            break;
        default: return PX_ERROR;
        }
    }
    if (optind != argc - 1 || (o->secret == NULL && o->proto == &bench_parley))
        return PX_ERROR;
    o->scenario = argv[optind];
    /* Groups, pending messages and the fault client are Parley's, not the peer's. */
    if (o->proto == &bench_xmpp && (strcmp(o->scenario, "group") == 0 ||
                                    strcmp(o->scenario, "sync") == 0 ||
                                    strcmp(o->scenario, "chaos") == 0))
        return PX_ERROR;
    if (strcmp(o->scenario, "latency") == 0 && !rate_set)
        o->rate = 100;
    o->chaos = strcmp(o->scenario, "chaos") == 0;
    o->ngw = url2 ? 2 : 1;
    if (bench_parse_url(url, &o->gw[0]) != PX_OK || (url2 && bench_parse_url(url2, &o->gw[1]) != PX_OK))
        return PX_ERROR;
    if (o->members < 2 || o->devices < 1 || o->devices > 16 ||
        (long)o->members * o->devices > BENCH_PER_PROC_MAX || o->msgs < 1 || o->steps < 0)
        return PX_ERROR;
    /* chaos: each process's groups are two of its pairs each */
    if (o->groups < 0 || o->group_rate <= 0 || (o->groups > 0 && !o->chaos) ||
        (o->procs >= 1 && 2 * ((o->groups + o->procs - 1) / o->procs) > o->pairs / o->procs))
        return PX_ERROR;
    if (o->procs < 1 || o->procs > BENCH_MAX_PROCS || o->inflight < 1 || o->rate <= 0 ||
        o->pairs < o->procs || o->src_base < 1 || o->src_base + o->procs > 254)
        return PX_ERROR;
    if (o->idle < 0 || (o->idle > 0 && (o->idle_procs < 1 || o->idle_procs > BENCH_MAX_PROCS ||
                                         o->idle < o->idle_procs ||
                                         o->src_base + o->procs + o->idle_procs > 254 ||
                                         (o->idle + o->idle_procs - 1) / o->idle_procs >
                                             BENCH_PER_PROC_MAX)))
        return PX_ERROR;
    if (strcmp(o->scenario, "idle") == 0 && (o->conns < o->procs ||
                                             (o->conns + o->procs - 1) / o->procs > BENCH_PER_PROC_MAX))
        return PX_ERROR;
    snprintf(o->prefix, sizeof(o->prefix), "b%lx%x-", (long)time(NULL), (unsigned)getpid());
    return PX_OK;
}

/* Each process may need up to 10k sockets: take the hard file limit. */
static void bench_raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

int main(int argc, char **argv)
{
    static bench_opts o;
    if (bench_parse(argc, argv, &o) != PX_OK) {
        bench_usage();
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    bench_raise_nofile();
    int rc;
    if (strcmp(o.scenario, "idle") == 0)
        rc = bench_idle(&o);
    else if (strcmp(o.scenario, "rate") == 0 || strcmp(o.scenario, "latency") == 0)
        rc = bench_rate(&o, o.scenario);
    else if (strcmp(o.scenario, "chaos") == 0) {
        struct sigaction sa = { .sa_handler = bench_on_fault_signal, .sa_flags = SA_RESTART };
        sigaction(SIGUSR1, &sa, NULL);
        sigaction(SIGUSR2, &sa, NULL);
        rc = bench_rate(&o, o.scenario);
    }
    else if (strcmp(o.scenario, "sync") == 0)
        rc = bench_sync(&o);
    else if (strcmp(o.scenario, "max") == 0)
        rc = bench_max(&o);
    else if (strcmp(o.scenario, "group") == 0)
        rc = bench_group(&o);
    else {
        bench_usage();
        return 2;
    }
    return rc == PX_OK ? 0 : 1;
}
