/* Owns serving a SyncRequest: a connection opened, so push the user's whole
 * inbox to that one connection in seq order, then tell it "synced". The scan
 * sees a stable inbox: this process owns the user's partition of every
 * user-keyed topic, and nothing else writes the user's inbox meanwhile
 * (only the retention sweep deletes, which is harmless).
 *
 * Every Delivery of a sync gates the commit of the SyncRequest: if one is
 * not acknowledged by the bus, the whole sync runs again (the client dedupes
 * events by id; the gateway should forward only the first "synced" of a
 * connection). */
#include "common.h"
#include "log.h"
#include "msgstore.h"

#include <jansson.h>
#include <stdio.h>
#include <string.h>

#define SYNC_PAGE 1000

typedef struct sync_ctx {
    msgstore *ms;
    const Parley__SyncRequest *r;
    void *tag;                 /* gates the SyncRequest's commit */
    deliv d;
    int64_t after_seq;         /* last seq seen */
    size_t visited;            /* events in the current page */
    size_t events, deliveries;
    char err[PX_ERRLEN];       /* a produce error from inside the scan */
} sync_ctx;

static int sync_flush(sync_ctx *c, int synced)
{
    const Parley__SyncRequest *r = c->r;
    char gw[1][65];
    snprintf(gw[0], sizeof(gw[0]), "%s", r->gateway);
    int rc = deliv_send(c->ms, &c->d, (const char (*)[65])gw, 1, r->user, r->conn, synced,
                        c->tag, c->err, sizeof(c->err));
    c->events += c->d.n;
    c->deliveries++;
    deliv_reset(&c->d);
    return rc;
}

static int sync_on_event(void *arg, const store_event *ev)
{
    sync_ctx *c = arg;
    c->visited++;
    c->after_seq = ev->seq;
    /* Flush before adding, never after: the last Delivery must be the one
     * that carries synced=true. */
    if (deliv_full(&c->d, ev->json_len) && sync_flush(c, 0) != PX_OK)
        return PX_ERROR;
    deliv_add(&c->d, ev->json, ev->json_len, 1);
    return PX_OK;
}

int sync_serve(msgstore *ms, size_t idx, const Parley__SyncRequest *r, char *err, size_t errlen)
{
    int rc = PX_ERROR;
    sync_ctx c;
    memset(&c, 0, sizeof(c));
    c.ms = ms;
    c.r = r;
    c.tag = batch_tag_for(ms, idx);
    c.after_seq = -1; /* seq is a bus offset, >= 0 */
    int64_t started = px_mono_ms();

    route_note_gateway(ms, r->user, r->gateway);
    do {
        /* A large backlog takes many pages; a stopping process hands the
         * request (uncommitted) to the next owner instead of finishing it. */
        if (*ms->stop) {
            px_err(err, errlen, "stopping");
            goto out;
        }
        c.visited = 0;
        int64_t t0 = msgstore_clock_us();
        int src = store_inbox_scan(ms->st, r->user, c.after_seq, SYNC_PAGE, sync_on_event, &c,
                                   err, errlen);
        msgstore_observe(ms->m.lat_scan, t0);
        if (src != PX_OK) {
            if (c.err[0] != '\0')
                px_err(err, errlen, "sync delivery: %s", c.err);
            goto out;
        }
    } while (c.visited == SYNC_PAGE);
    if (sync_flush(&c, 1) != PX_OK) {
        px_err(err, errlen, "sync delivery: %s", c.err);
        goto out;
    }
    metric_add(ms->m.syncs, 1);
    metric_add(ms->m.sync_events, (int64_t)c.events);
    log_debug("synced", "{s:s, s:s, s:I, s:I, s:I, s:I}", "user", r->user, "gateway", r->gateway,
              "conn", (json_int_t)r->conn, "events", (json_int_t)c.events, "deliveries",
              (json_int_t)c.deliveries, "took_ms", (json_int_t)(px_mono_ms() - started));
    rc = PX_OK;
out:
    deliv_reset(&c.d);
    return rc;
}
