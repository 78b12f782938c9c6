/* Owns acks: an AckRecord deletes the named events from the acker's own
 * inbox (the store matches on (user, id), so an ack can never touch another
 * user's events), and each deleted event passes through msgstore_on_acked,
 * the boundary where delivered/read facts for parley.receipts will be made. */
#include "common.h"
#include "msgstore.h"
#include "utf8.h"

#include <stdlib.h>
#include <string.h>

#define ACK_CHUNK 1000   /* ids per store call (PROTO_MAX_IDS per command) */
#define ACK_ID_MAX 255   /* as for inbox event ids */

typedef struct ack_ctx {
    msgstore *ms;
    const char *user;
    int read;
    size_t deleted;
} ack_ctx;

static int ack_on_deleted(void *arg, const store_event *ev)
{
    ack_ctx *c = arg;
    c->deleted++;
    msgstore_on_acked(c->ms, c->user, ev, c->read);
    return PX_OK;
}

/* Only ids that could name a stored event go to the store: an empty or
 * non-UTF-8 id matches nothing anyway, and the store would refuse the whole
 * call for it on every retry. Appends to ids; returns the new count. */
static size_t ack_usable_ids(const Parley__AckRecord *r, const char **ids, size_t n)
{
    for (size_t i = 0; i < r->n_ids; i++) {
        size_t len = strlen(r->ids[i]);
        if (len > 0 && len <= ACK_ID_MAX && utf8_valid((const unsigned char *)r->ids[i], len))
            ids[n++] = r->ids[i];
    }
    return n;
}

static int ack_same(const Parley__AckRecord *a, const Parley__AckRecord *b)
{
    return strcmp(a->user, b->user) == 0 && (a->read != 0) == (b->read != 0);
}

/* Deletes the ids of one (user, read) group in chunks of ACK_CHUNK. */
static int ack_group(msgstore *ms, ack_ctx *c, const char **ids, size_t n, char *err,
                     size_t errlen)
{
    for (size_t off = 0; off < n; off += ACK_CHUNK) {
        size_t k = PX_MIN((size_t)ACK_CHUNK, n - off);
        int64_t t0 = msgstore_clock_us();
        int rc = store_inbox_ack(ms->st, c->user, ids + off, k, ack_on_deleted, c, err, errlen);
        msgstore_observe(ms->m.lat_ack, t0);
        if (rc != PX_OK)
            return rc;
    }
    return PX_OK;
}

/* A run of consecutive AckRecords is applied as one store call per
 * (user, read): clients ack one event at a time, and the store's cost is
 * per call, not per id. A `read` deletes too: it implies the message was
 * received. Deleting is idempotent, so a retried run is harmless. The store
 * reports an event before deleting it, so an event can be reported twice
 * (a retry after a failed delete) but is never deleted unreported. */
int ack_apply_run(msgstore *ms, msgstore_rec *recs, size_t n, char *err, size_t errlen)
{
    int rc = PX_OK;
    size_t total = 0;
    for (size_t i = 0; i < n; i++)
        total += recs[i].u.ack->n_ids;
    const char **ids = px_calloc(total, sizeof(*ids));
    char *done = px_calloc(n, 1);
    for (size_t i = 0; i < n && rc == PX_OK; i++) {
        if (done[i])
            continue;
        const Parley__AckRecord *r = recs[i].u.ack;
        ack_ctx c = { .ms = ms, .user = r->user, .read = r->read != 0 };
        size_t k = 0;
        for (size_t j = i; j < n; j++)
            if (!done[j] && ack_same(r, recs[j].u.ack)) {
                k = ack_usable_ids(recs[j].u.ack, ids, k);
                done[j] = 1;
                metric_add(ms->m.acks, 1);
            }
        rc = ack_group(ms, &c, ids, k, err, errlen);
        metric_add(ms->m.acked_events, (int64_t)c.deleted);
    }
    free(done);
    free(ids);
    return rc;
}

/* Today: metrics only. Next (receipts issue): for ev->kind == STORE_MESSAGE
 * with ev->sender set, produce a delivered (read: read) fact keyed by the
 * sender to parley.receipts, gating the AckRecord's commit like a sync
 * delivery does (batch_tag_for). */
void msgstore_on_acked(msgstore *ms, const char *user, const store_event *ev, int read)
{
    if (ev->kind == STORE_MESSAGE && ev->sender != NULL)
        metric_add(ms->m.acked_messages, 1);
}
