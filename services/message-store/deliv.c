/* Owns the Delivery record: collecting event texts under the per-record
 * ceilings (DELIV_MAX_EVENTS, DELIV_MAX_BYTES), encoding once, and producing
 * to each gateway's topic <prefix>gw.<gateway id>, keyed by user so one
 * user's deliveries keep their order on the gateway side. */
#include "common.h"
#include "ids.h"
#include "msgstore.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int deliv_full(const deliv *d, size_t len)
{
    return d->n > 0 && (d->n == DELIV_MAX_EVENTS || d->bytes + len > DELIV_MAX_BYTES);
}

void deliv_add(deliv *d, const void *json, size_t len, int copy, const char *skip, int64_t seq)
{
    d->skip[d->n] = (char *)(skip != NULL ? skip : "");
    d->nskip += skip != NULL;
    d->seq[d->n] = seq;
    d->nseq += seq >= 0;
    uint8_t *data = (uint8_t *)json;
    if (copy) {
        data = px_malloc(len);
        memcpy(data, json, len);
    }
    d->ev[d->n].data = data;
    d->ev[d->n].len = len;
    d->owned[d->n] = copy ? data : NULL;
    d->n++;
    d->bytes += len;
}

/* Only the counters: the slots past n are never read (zeroing 8 KiB of
 * them for every pushed user showed in the profile). */
void deliv_init(deliv *d)
{
    d->n = 0;
    deliv_reset(d);
}

void deliv_reset(deliv *d)
{
    for (size_t i = 0; i < d->n; i++)
        free(d->owned[i]);
    d->n = 0;
    d->nskip = 0;
    d->nseq = 0;
    d->bytes = 0;
    d->synced = 0;
    d->more_from_seq = 0;
    d->close_device = NULL;
}

/* Encodes into ms->pack (grown as needed, reused across records). */
static size_t deliv_encode(msgstore *ms, const deliv *d, const char *user, uint64_t conn)
{
    Parley__Delivery msg = PARLEY__DELIVERY__INIT;
    msg.version = 1;
    msg.user = (char *)user;
    msg.conn = conn;
    msg.n_events_json = d->n;
    msg.events_json = (ProtobufCBinaryData *)d->ev;
    msg.synced = d->synced != 0;
    msg.more_from_seq = d->more_from_seq;
    msg.close_device = (char *)(d->close_device != NULL ? d->close_device : "");
    if (d->nskip > 0) {
        msg.n_skip_devices = d->n;
        msg.skip_devices = (char **)d->skip;
    }
    if (d->nseq == d->n) { /* all or none: the gateway reads them by index */
        msg.n_seqs = d->n;
        msg.seqs = (int64_t *)d->seq;
    }
    size_t len = parley__delivery__get_packed_size(&msg);
    if (len > ms->pack_cap) {
        ms->pack_cap = PX_MAX(len, 2 * ms->pack_cap);
        ms->pack = px_realloc(ms->pack, ms->pack_cap);
    }
    return parley__delivery__pack(&msg, ms->pack);
}

/* Every gateway is tried even after one fails: a user on two gateways
 * should not lose the live push on one because the other's topic is gone. */
int deliv_send(msgstore *ms, const deliv *d, const char (*gws)[65], size_t ngws,
               const char *user, uint64_t conn, void *opaque, char *err, size_t errlen)
{
    int rc = PX_OK;
    size_t len = deliv_encode(ms, d, user, conn);
    for (size_t i = 0; i < ngws; i++) {
        char topic[160];
        if (!id_valid_user(gws[i])) {
            rc = px_err(err, errlen, "gateway id \"%.64s\" is not a valid topic suffix", gws[i]);
            continue;
        }
        snprintf(topic, sizeof(topic), "%sgw.%s", ms->svc.cfg.topic_prefix, gws[i]);
        if (batch_produce(ms, topic, user, strlen(user), ms->pack, len, opaque, err, errlen) !=
            PX_OK) {
            rc = PX_ERROR;
            continue;
        }
        metric_add(ms->m.deliveries, 1);
    }
    return rc;
}
