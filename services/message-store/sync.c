/* Owns serving a SyncRequest: a connection opened (or wrote the previous
 * page), so push it the next page of what its device still needs (the
 * user's inbox past the device's link, minus what it acked) in seq order, then
 * tell it "synced" or where the next page starts. Pages keep a slow client
 * from costing the gateway more than a page: the gateway asks for the next
 * one only when the connection has written this one out, so a 10k backlog
 * never trips the send-queue ceiling (1013) the way one 3 MB push did.
 * One scan reads the page and what follows it (a rest, kept in
 * synckept.c for the next pages), because each scan costs the whole inbox.
 *
 * The scan sees a stable inbox: this process owns the user's partition of
 * every user-keyed topic, and nothing else writes the user's inbox
 * meanwhile (only the retention sweep deletes, which is harmless).
 *
 * Every Delivery of a page gates the commit of its SyncRequest: if one is
 * not acknowledged by the bus, the page is served again (the client dedupes
 * events by id; the gateway forwards only the first "synced" of a
 * connection).
 *
 * The SyncRequests of one batch are served together (issue 16): a
 * gateway's clients reconnect elsewhere all at once, and served one by one
 * each paid its device read, its link and its scan in turn (a few hundred
 * ms on a loaded FerretDB), so the last of 150 waited tens of seconds and
 * held its live events as long. Up to SYNC_GROUP of them, of distinct
 * users, read the store side by side when it serves calls in parallel
 * (store_concurrency); their pages are then produced in batch order from
 * the consume thread, which alone touches the bus and the batch's tags. */
#include "common.h"
#include "log.h"
#include "msgstore.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Pages are as large as the gateway's 1 MiB send queue allows: the next
 * page is asked for at a quarter full, so at most 256 KiB + a page are
 * queued. */
#define SYNC_PAGE 2000              /* events per page */
#define SYNC_PAGE_BYTES (512 << 10) /* about this many event bytes per page */

/* One scan reads up to this much past its page, kept for the next pages
 * (synckept.c): FerretDB decodes and sorts a user's whole inbox for every
 * scan however few events it returns, so a 10k backlog is one scan, not
 * six. A scan that reaches the ceiling stops there; the next page scans
 * again from the last event kept. */
#define SYNC_REST_EVENTS 20000
#define SYNC_REST_BYTES (4 << 20)

/* SyncRequests whose pages are read side by side: each holds up to a page
 * and a rest until it is produced, so this bounds that memory. */
#define SYNC_GROUP 16

/* One SyncRequest of the batch: read on any thread, produced on the
 * consume thread. */
typedef struct sync_job {
    msgstore *ms;
    size_t idx;                /* batch record; its produces gate its commit */
    int64_t offset;
    unsigned gen;              /* bus_generation when the batch was served */
    const Parley__SyncRequest *r;
    sync_ev *ev;               /* the page, in seq order */
    size_t n, cap;
    size_t bytes;              /* event bytes taken into this page */
    int closed;                /* the page is full: events go to the rest */
    sync_rest *rest;           /* what follows the page, kept for the next */
    size_t seen;               /* events the scan visited */
    int capped;                /* the rest's ceiling left the scan's tail out */
    int more;                  /* the backlog goes on past this page */
    int kept;                  /* the page started from a kept rest */
    int64_t after;             /* the page starts after this seq */
    int alone;                 /* the user has no other synced device */
    int rc;
    char err[PX_ERRLEN];
} sync_job;

static void sync_push(sync_ev **ev, size_t *n, size_t *cap, sync_ev e)
{
    if (*n == *cap) {
        *cap = *cap ? 2 * *cap : 64;
        *ev = px_realloc(*ev, *cap * sizeof(**ev));
    }
    (*ev)[(*n)++] = e;
}

/* 1 when an event of len bytes still fits the page (an oversized first
 * event goes alone). */
static int sync_fits(sync_job *j, size_t len)
{
    if (!j->closed && j->n < SYNC_PAGE && (j->bytes == 0 || j->bytes + len <= SYNC_PAGE_BYTES))
        return 1;
    j->closed = 1;
    return 0;
}

static int sync_on_event(void *arg, const store_event *ev)
{
    sync_job *j = arg;
    sync_rest *rest = j->rest;
    j->seen++;
    if (j->capped)
        return PX_OK; /* the scan cannot be stopped early */
    int page = sync_fits(j, ev->json_len);
    if (!page && (rest->n >= SYNC_REST_EVENTS ||
                  rest->bytes + SYNC_EV_COST(ev->json_len) > SYNC_REST_BYTES)) {
        j->capped = 1;
        return PX_OK;
    }
    sync_ev e = { .json = px_malloc(ev->json_len), .len = ev->json_len, .seq = ev->seq };
    memcpy(e.json, ev->json, ev->json_len);
    if (page) {
        sync_push(&j->ev, &j->n, &j->cap, e);
        j->bytes += e.len;
    } else {
        sync_push(&rest->ev, &rest->n, &rest->cap, e);
        rest->bytes += SYNC_EV_COST(e.len);
    }
    return PX_OK;
}

/* Moves the kept rest's events into the page while they fit. 1 when the
 * page is the backlog's end: the rest is served and the inbox got nothing
 * since its scan read to the end. Else j->after is where a scan would go
 * on. Takes r. */
static int sync_from_rest(sync_job *j, sync_rest *r)
{
    j->kept = 1;
    while (r->head < r->n && sync_fits(j, r->ev[r->head].len)) {
        sync_ev e = r->ev[r->head++];
        r->bytes -= SYNC_EV_COST(e.len);
        sync_push(&j->ev, &j->n, &j->cap, e);
        j->bytes += e.len;
    }
    if (r->head < r->n) {
        j->rest = r;
        j->more = 1;
        return 0;
    }
    int end = r->complete && synckept_version(j->ms->kept, r->user) == r->version;
    j->after = r->ev[r->n - 1].seq;
    sync_rest_free(r);
    j->more = !end;
    return end;
}

/* Reads the page (and a rest) from the store, after j->after. */
static void sync_scan(sync_job *j, const char *dev)
{
    const char *user = j->r->user;
    sync_rest *rest = px_calloc(1, sizeof(*rest));
    rest->user = px_strdup(user);
    rest->dev = px_strdup(dev);
    rest->gen = j->gen;
    rest->version = synckept_version(j->ms->kept, user);
    j->rest = rest;
    int64_t t0 = service_clock_us();
    size_t limit = SYNC_PAGE + SYNC_REST_EVENTS;
    j->rc = store_inbox_scan(j->ms->svc.st, user, dev, j->after, limit, sync_on_event, j, j->err,
                             sizeof(j->err));
    if (j->rc != PX_OK)
        return;
    service_observe(j->ms->m.lat_scan, t0);
    rest->complete = !j->capped && j->seen < limit;
    j->more = rest->n > 0 || !rest->complete;
}

/* Links the connection's device on its first sync (devices_link) and reads
 * its page: from the rest the previous page's scan kept when there is
 * one, else (and after it, when the inbox may go on) from the store. Any
 * thread (the store is thread-safe; so are devices_link's cache, the kept
 * rests and the metrics). */
static void sync_read(void *arg, size_t i)
{
    sync_job *j = (sync_job *)arg + i;
    const Parley__SyncRequest *r = j->r;
    const char *dev = devices_name(r->device);
    int64_t since;
    j->rc = devices_link(j->ms, r->user, dev, j->offset, &since, &j->alone, j->err,
                         sizeof(j->err));
    if (j->rc != PX_OK)
        return;
    /* seq is a bus offset (>= 0): from_seq 0 and "after -1" both start at
     * the oldest event; the device's since moves the start past what came
     * before its link. */
    j->after = PX_MAX(r->from_seq - 1, since);
    sync_rest *kept = synckept_take(j->ms->kept, r->user, dev, j->after, j->gen);
    if (kept != NULL && (sync_from_rest(j, kept) || j->closed))
        return;
    sync_scan(j, dev);
}

static int sync_flush(msgstore *ms, const sync_job *j, deliv *d, char *err, size_t errlen)
{
    char gw[1][65], why[PX_ERRLEN];
    snprintf(gw[0], sizeof(gw[0]), "%s", j->r->gateway);
    int rc = deliv_send(ms, d, (const char (*)[65])gw, 1, j->r->user, j->r->conn,
                        batch_tag_for(ms, j->idx), why, sizeof(why));
    deliv_reset(d);
    if (rc != PX_OK)
        px_err(err, errlen, "sync delivery: %s", why);
    return rc;
}

/* Produces the page read for j: consume thread. */
static int sync_send(msgstore *ms, sync_job *j, char *err, size_t errlen)
{
    deliv d;
    memset(&d, 0, sizeof(d));
    for (size_t k = 0; k < j->n; k++) {
        /* Flush before adding, never after: the page's last Delivery must
         * be the one that says how the page ends. */
        if (deliv_full(&d, j->ev[k].len) && sync_flush(ms, j, &d, err, errlen) != PX_OK)
            return PX_ERROR;
        deliv_add(&d, j->ev[k].json, j->ev[k].len, 0, NULL, j->ev[k].seq);
    }
    int64_t last = j->n > 0 ? j->ev[j->n - 1].seq : j->after;
    if (j->more)
        d.more_from_seq = last + 1;
    else
        d.synced = 1;
    if (sync_flush(ms, j, &d, err, errlen) != PX_OK)
        return PX_ERROR;
    if (!j->more)
        metric_add(ms->m.syncs, 1);
    metric_add(ms->m.sync_events, (int64_t)j->n);
    metric_add(j->kept ? ms->m.sync_pages_kept : ms->m.sync_pages_scan, 1);
    if (j->rest != NULL) {
        j->rest->after = last;
        synckept_put(ms->kept, j->rest); /* served: the next page starts after last */
        j->rest = NULL;
    }
    log_debug("sync page", "{s:s, s:s, s:I, s:I, s:I}", "user", j->r->user, "gateway",
              j->r->gateway, "conn", (json_int_t)j->r->conn, "from_seq",
              (json_int_t)j->r->from_seq, "events", (json_int_t)j->n);
    return PX_OK;
}

static void sync_job_free(sync_job *j)
{
    for (size_t k = 0; k < j->n; k++)
        free(j->ev[k].json);
    free(j->ev);
    sync_rest_free(j->rest);
}

/* How many of the n requests from idx[0] make one group: at most
 * SYNC_GROUP, of distinct users (two first syncs of one user read side by
 * side could both link a device as the user's first). */
static size_t sync_group_len(const msgstore_rec *recs, const size_t *idx, size_t n)
{
    size_t g = 0;
    for (; g < n && g < SYNC_GROUP; g++)
        for (size_t k = 0; k < g; k++)
            if (strcmp(recs[idx[k]].u.inbox->sync->user, recs[idx[g]].u.inbox->sync->user) == 0)
                return g;
    return g;
}

size_t sync_serve(msgstore *ms, const msgstore_rec *recs, const size_t *idx, size_t n, char *err,
                  size_t errlen)
{
    sync_job jobs[SYNC_GROUP];
    size_t done = 0;
    size_t threads = store_concurrency(ms->svc.st);
    unsigned gen = bus_generation(ms->svc.b);
    while (done < n) {
        size_t g = sync_group_len(recs, idx + done, n - done);
        memset(jobs, 0, sizeof(jobs));
        for (size_t k = 0; k < g; k++) {
            const msgstore_rec *r = &recs[idx[done + k]];
            jobs[k] = (sync_job){ .ms = ms, .idx = idx[done + k], .offset = r->m->offset,
                                  .gen = gen, .r = r->u.inbox->sync };
        }
        if (g >= 2 && threads >= 2)
            px_parallel(g, threads, sync_read, jobs);
        else
            for (size_t k = 0; k < g; k++)
                sync_read(jobs, k);
        /* Noted after the device lists are read (nothing of these users is
         * pushed in between: this is the consume thread). */
        for (size_t k = 0; k < g; k++)
            route_note_gateway(ms, jobs[k].r->user, jobs[k].r->gateway,
                               jobs[k].rc == PX_OK && jobs[k].alone);
        size_t ok = 0;
        while (ok < g && jobs[ok].rc == PX_OK && sync_send(ms, &jobs[ok], err, errlen) == PX_OK)
            ok++;
        if (ok < g && jobs[ok].rc != PX_OK)
            px_err(err, errlen, "%s", jobs[ok].err);
        for (size_t k = 0; k < g; k++)
            sync_job_free(&jobs[k]);
        done += ok;
        if (ok < g)
            break;
    }
    return done;
}
