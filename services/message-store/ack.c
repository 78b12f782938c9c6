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
 * call for it on every retry. */
static size_t ack_usable_ids(const Parley__AckRecord *r, const char **ids)
{
    size_t n = 0;
    for (size_t i = 0; i < r->n_ids; i++) {
        size_t len = strlen(r->ids[i]);
        if (len > 0 && len <= ACK_ID_MAX && utf8_valid((const unsigned char *)r->ids[i], len))
            ids[n++] = r->ids[i];
    }
    return n;
}

/* A `read` deletes too: it implies the message was received. Deleting is
 * idempotent, so a retried AckRecord is harmless. The store reports an
 * event before deleting it, so an event can be reported twice (a retry
 * after a failed delete) but is never deleted unreported. */
int ack_apply(msgstore *ms, const Parley__AckRecord *r, char *err, size_t errlen)
{
    int rc = PX_OK;
    ack_ctx c = { .ms = ms, .user = r->user, .read = r->read != 0 };
    const char **ids = px_calloc(r->n_ids, sizeof(*ids));
    size_t n = ack_usable_ids(r, ids);
    for (size_t off = 0; off < n; off += ACK_CHUNK) {
        size_t k = PX_MIN((size_t)ACK_CHUNK, n - off);
        int64_t t0 = msgstore_clock_us();
        rc = store_inbox_ack(ms->st, r->user, ids + off, k, ack_on_deleted, &c, err, errlen);
        msgstore_observe(ms->m.lat_ack, t0);
        if (rc != PX_OK)
            goto out;
    }
    metric_add(ms->m.acks, 1);
    metric_add(ms->m.acked_events, (int64_t)c.deleted);
out:
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
