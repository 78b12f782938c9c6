/* Owns serving a SyncRequest: a connection opened (or wrote the previous
 * page), so push it the next page of what its device still needs (the
 * user's inbox past the device's link, minus what it acked) in seq order, then
 * tell it "synced" or where the next page starts. Pages keep a slow client
 * from costing the gateway more than a page: the gateway asks for the next
 * one only when the connection has written this one out, so a 10k backlog
 * never trips the send-queue ceiling (1013) the way one 3 MB push did.
 *
 * The scan sees a stable inbox: this process owns the user's partition of
 * every user-keyed topic, and nothing else writes the user's inbox
 * meanwhile (only the retention sweep deletes, which is harmless).
 *
 * Every Delivery of a page gates the commit of its SyncRequest: if one is
 * not acknowledged by the bus, the page is served again (the client dedupes
 * events by id; the gateway forwards only the first "synced" of a
 * connection). */
#include "common.h"
#include "log.h"
#include "msgstore.h"

#include <jansson.h>
#include <stdio.h>
#include <string.h>

/* A page costs one scan, and FerretDB sorts and filters a user's whole
 * inbox for each, so pages are as large as the gateway's 1 MiB send queue
 * allows: the next page is asked for at a quarter full, so at most
 * 256 KiB + a page are queued. */
#define SYNC_PAGE 2000              /* events per page */
#define SYNC_PAGE_BYTES (512 << 10) /* about this many event bytes per page */

typedef struct sync_ctx {
    msgstore *ms;
    const Parley__SyncRequest *r;
    void *tag;                 /* gates the SyncRequest's commit */
    deliv d;
    int64_t last_seq;          /* seq of the last event taken, -1: none */
    size_t bytes;              /* event bytes taken into this page */
    int full;                  /* the byte budget ended the page early */
    size_t events, deliveries;
    char err[PX_ERRLEN];       /* a produce error from inside the scan */
} sync_ctx;

static int sync_flush(sync_ctx *c)
{
    const Parley__SyncRequest *r = c->r;
    char gw[1][65];
    snprintf(gw[0], sizeof(gw[0]), "%s", r->gateway);
    int rc = deliv_send(c->ms, &c->d, (const char (*)[65])gw, 1, r->user, r->conn, c->tag,
                        c->err, sizeof(c->err));
    c->events += c->d.n;
    c->deliveries++;
    deliv_reset(&c->d);
    return rc;
}

static int sync_on_event(void *arg, const store_event *ev)
{
    sync_ctx *c = arg;
    /* The scan cannot be stopped early: events past the budget are left
     * for the next page (an oversized first event still goes alone). */
    if (c->full || (c->bytes > 0 && c->bytes + ev->json_len > SYNC_PAGE_BYTES)) {
        c->full = 1;
        return PX_OK;
    }
    c->last_seq = ev->seq;
    c->bytes += ev->json_len;
    /* Flush before adding, never after: the page's last Delivery must be
     * the one that says how the page ends. */
    if (deliv_full(&c->d, ev->json_len) && sync_flush(c) != PX_OK)
        return PX_ERROR;
    deliv_add(&c->d, ev->json, ev->json_len, 1, NULL);
    return PX_OK;
}

int sync_serve(msgstore *ms, size_t idx, int64_t offset, const Parley__SyncRequest *r,
               char *err, size_t errlen)
{
    int rc = PX_ERROR;
    sync_ctx c;
    memset(&c, 0, sizeof(c));
    c.ms = ms;
    c.r = r;
    c.tag = batch_tag_for(ms, idx);
    c.last_seq = -1;
    int64_t started = px_mono_ms();

    route_note_gateway(ms, r->user, r->gateway);
    const char *dev = devices_name(r->device);
    int64_t since;
    if (devices_link(ms, r->user, dev, offset, &since, err, errlen) != PX_OK)
        goto out;
    int64_t t0 = service_clock_us();
    /* seq is a bus offset (>= 0): from_seq 0 and "after -1" both start at
     * the oldest event; the device's since moves the start past what came
     * before its link. */
    if (store_inbox_scan(ms->svc.st, r->user, dev, PX_MAX(r->from_seq - 1, since), SYNC_PAGE,
                         sync_on_event, &c, err, errlen) != PX_OK) {
        if (c.err[0] != '\0')
            px_err(err, errlen, "sync delivery: %s", c.err);
        goto out;
    }
    service_observe(ms->m.lat_scan, t0);
    int more = c.full || c.events + c.d.n == SYNC_PAGE;
    if (more)
        c.d.more_from_seq = c.last_seq + 1;
    else
        c.d.synced = 1;
    if (sync_flush(&c) != PX_OK) {
        px_err(err, errlen, "sync delivery: %s", c.err);
        goto out;
    }
    if (!more)
        metric_add(ms->m.syncs, 1);
    metric_add(ms->m.sync_events, (int64_t)c.events);
    log_debug("sync page", "{s:s, s:s, s:I, s:I, s:I, s:I}", "user", r->user, "gateway",
              r->gateway, "conn", (json_int_t)r->conn, "from_seq", (json_int_t)r->from_seq,
              "events", (json_int_t)c.events, "took_ms", (json_int_t)(px_mono_ms() - started));
    rc = PX_OK;
out:
    deliv_reset(&c.d);
    return rc;
}
