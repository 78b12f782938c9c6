/* Owns applying one consumed batch of parley.presence to the registry:
 * decoding and validating (bad records become dead letters), grouping
 * consecutive connect/disconnects into one store_presence_apply, gateway
 * beats and resets in between, presence subscriptions and settings
 * (notify.c), committing what succeeded and retrying the rest.
 *
 * Retries restart at the first record not yet applied. Replaying an
 * applied prefix would be harmless as well: the registry holds one record
 * per connection, so a connect or disconnect applied twice (a retry after a
 * bulk that failed halfway, a batch redelivered after a crash) leaves the
 * same state as once. */
#include "common.h"
#include "ids.h"
#include "log.h"
#include "presence.h"
#include "parley.pb-c.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BATCH_FLUSH_MS 10000
#define BATCH_QUEUE_WAIT_MS 5000

/* REC_NOTIFY: a presence_sub or a settings change (notify.c). */
enum batch_kind { REC_OP, REC_BEAT, REC_NOTIFY, REC_DEAD };

typedef struct batch_rec {
    enum batch_kind kind;
    const bus_msg *m;
    Parley__PresenceRecord *x;
    store_presence op;        /* REC_OP */
    int reset;                /* REC_BEAT */
    int64_t ts_ms;            /* REC_BEAT */
    char reason[128];         /* REC_DEAD */
} batch_rec;

void batch_init(presence *p)
{
    for (size_t i = 0; i < PRESENCE_BATCH; i++)
        p->tags[i] = (presence_tag){ .p = p, .idx = i };
}

/* A stale report (outliving a flush timeout) may name a record of a later
 * batch; that costs one needless retry, nothing else. */
void batch_on_delivery(void *opaque, int status, const char *err, int32_t partition,
                       int64_t offset)
{
    presence_tag *t = opaque;
    if (status == PX_OK || t == NULL)
        return;
    metric_add(t->p->m.produce_failures, 1);
    if (t->idx < t->p->failed_at)
        t->p->failed_at = t->idx;
    log_warn("dead letter not produced", "{s:s}", "error", err ? err : "");
}

/* ---- decoding ---- */

static void batch_dead(batch_rec *r, const char *why)
{
    r->kind = REC_DEAD;
    snprintf(r->reason, sizeof(r->reason), "PresenceRecord: %s", why);
}

static void batch_classify(batch_rec *r)
{
    const Parley__PresenceRecord *x = r->x;
    switch (x->type) {
    case PARLEY__PRESENCE_RECORD__TYPE__TYPE_CONNECT:
    case PARLEY__PRESENCE_RECORD__TYPE__TYPE_DISCONNECT:
        /* Order per user matters (connect before its disconnect), and only
         * the key puts them in one partition. */
        if (!id_valid_user(x->user)) {
            batch_dead(r, "bad user");
        } else if (!bus_key_is(r->m, x->user)) {
            batch_dead(r, "key is not the user");
        } else {
            r->kind = REC_OP;
            r->op = (store_presence){ .user = x->user, .gateway = x->gateway, .epoch = x->epoch,
                                      .delta = x->type == PARLEY__PRESENCE_RECORD__TYPE__TYPE_CONNECT
                                                   ? 1 : -1,
                                      .conn = x->conn,
                                      .device = x->device[0] != '\0' ? x->device : NULL };
        }
        break;
    case PARLEY__PRESENCE_RECORD__TYPE__TYPE_HEARTBEAT:
    case PARLEY__PRESENCE_RECORD__TYPE__TYPE_RESET:
        r->kind = REC_BEAT;
        r->reset = x->type == PARLEY__PRESENCE_RECORD__TYPE__TYPE_RESET;
        /* The gateway's own clock says when it was alive; the bus timestamp
         * is the fallback for a producer that left it out. */
        r->ts_ms = x->ts_ms > 0 ? x->ts_ms : r->m->ts_ms;
        break;
    case PARLEY__PRESENCE_RECORD__TYPE__TYPE_SUBSCRIBE:
    case PARLEY__PRESENCE_RECORD__TYPE__TYPE_SETTINGS:
        if (!id_valid_user(x->user) || !bus_key_is(r->m, x->user))
            batch_dead(r, "bad user or key");
        else if (x->n_users > PRESENCE_SUB_MAX)
            batch_dead(r, "too many users");
        else
            r->kind = REC_NOTIFY;
        for (size_t i = 0; r->kind == REC_NOTIFY && i < x->n_users; i++)
            if (!id_valid_user(x->users[i]))
                batch_dead(r, "bad user to watch");
        break;
    default:
        batch_dead(r, "unknown type");
        break;
    }
}

static void batch_decode(presence *p, const bus_msg *m, batch_rec *r)
{
    memset(r, 0, sizeof(*r));
    r->m = m;
    r->x = parley__presence_record__unpack(NULL, m->len, m->value);
    if (strcmp(m->topic, p->topic_presence) != 0)
        batch_dead(r, "unexpected topic");
    else if (r->x == NULL)
        batch_dead(r, "not a protobuf");
    else if (r->x->version != PRESENCE_RECORD_VERSION)
        batch_dead(r, "unknown version");
    else if (!id_valid_user(r->x->gateway)) /* same alphabet as user ids */
        batch_dead(r, "bad gateway id");
    else if (r->x->epoch <= 0)
        batch_dead(r, "missing epoch");
    else
        batch_classify(r);
    if (r->kind == REC_DEAD) {
        metric_add(p->m.dead, 1);
        log_warn("dead letter", "{s:s, s:s, s:i, s:I}", "reason", r->reason, "topic", m->topic,
                 "partition", (int)m->partition, "offset", (json_int_t)m->offset);
    }
}

/* ---- applying ---- */

static int batch_send_dead(presence *p, size_t idx, const batch_rec *r, char *err, size_t errlen)
{
    const bus_msg *m = r->m;
    if (idx < p->first_durable)
        p->first_durable = idx;
    return bus_produce_wait(p->svc.b, p->topic_dead, m->key, m->key_len, m->value, m->len,
                            &p->tags[idx], BATCH_QUEUE_WAIT_MS, err, errlen);
}

static int batch_apply_ops(presence *p, const batch_rec *recs, size_t n, char *err, size_t errlen)
{
    store_presence *ops = px_malloc(n * sizeof(*ops));
    size_t connects = 0;
    for (size_t i = 0; i < n; i++) {
        ops[i] = recs[i].op;
        connects += ops[i].delta > 0;
    }
    int64_t t0 = service_clock_us();
    int rc = store_presence_apply(p->svc.st, ops, n, err, errlen);
    service_observe(p->m.lat_apply, t0);
    if (rc == PX_OK) {
        metric_add(p->m.connects, (int64_t)connects);
        metric_add(p->m.disconnects, (int64_t)(n - connects));
        for (size_t i = 0; i < n; i++)
            notify_touch(p, ops[i].user, 0);
    }
    free(ops);
    return rc;
}

static int batch_apply_beat(presence *p, const batch_rec *r, char *err, size_t errlen)
{
    int64_t t0 = service_clock_us();
    int rc = store_gateway_beat(p->svc.st, r->x->gateway, r->x->epoch, r->ts_ms, r->reset, err,
                                errlen);
    service_observe(p->m.lat_beat, t0);
    if (rc == PX_OK)
        metric_add(r->reset ? p->m.resets : p->m.beats, 1);
    if (rc == PX_OK && r->reset)
        log_info("gateway reset", "{s:s, s:I}", "gateway", r->x->gateway, "epoch",
                 (json_int_t)r->x->epoch);
    return rc;
}

/* Runs recs[from..n) in order; returns the index of the first record whose
 * step failed (n when all succeeded). */
static size_t batch_attempt(presence *p, const batch_rec *recs, size_t from, size_t n,
                            char *err, size_t errlen)
{
    size_t i = from;
    while (i < n) {
        size_t j = i + 1;
        int rc;
        if (recs[i].kind == REC_OP) {
            while (j < n && recs[j].kind == REC_OP)
                j++;
            rc = batch_apply_ops(p, recs + i, j - i, err, errlen);
        } else if (recs[i].kind == REC_BEAT) {
            rc = batch_apply_beat(p, &recs[i], err, errlen);
        } else if (recs[i].kind == REC_NOTIFY) {
            rc = recs[i].x->type == PARLEY__PRESENCE_RECORD__TYPE__TYPE_SUBSCRIBE
                     ? notify_subscribe(p, recs[i].x, err, errlen)
                     : notify_settings(p, recs[i].x, err, errlen);
        } else {
            rc = batch_send_dead(p, i, &recs[i], err, errlen);
        }
        if (rc != PX_OK)
            break;
        i = j;
    }
    return i;
}

/* Dead letters are committed only once the bus holds them. */
static size_t batch_settle(presence *p, size_t upto, char *err, size_t errlen)
{
    if (p->first_durable < upto && bus_flush(p->svc.b, BATCH_FLUSH_MS) != PX_OK) {
        px_err(err, errlen, "dead letters not acknowledged within %d ms", BATCH_FLUSH_MS);
        if (p->first_durable < p->failed_at)
            p->failed_at = p->first_durable;
    }
    if (p->failed_at < upto) {
        if (err[0] == '\0')
            px_err(err, errlen, "a dead letter was not accepted by the bus");
        upto = p->failed_at;
    }
    return upto;
}

void batch_process(presence *p, bus_msg *msgs, size_t n)
{
    batch_rec *recs = px_calloc(n, sizeof(*recs));
    for (size_t i = 0; i < n; i++)
        batch_decode(p, &msgs[i], &recs[i]);

    size_t done = 0;
    int64_t backoff = SERVICE_BACKOFF_MIN_MS;
    while (done < n) {
        char err[PX_ERRLEN] = "";
        p->first_durable = SIZE_MAX;
        p->failed_at = SIZE_MAX;
        size_t upto = batch_attempt(p, recs, done, n, err, sizeof(err));
        upto = batch_settle(p, upto, err, sizeof(err));
        if (upto > done) {
            bus_commit(p->svc.b, msgs + done, upto - done);
            done = upto;
            backoff = SERVICE_BACKOFF_MIN_MS;
        }
        if (done == n)
            break;
        const bus_msg *m = &msgs[done];
        metric_add(p->m.retries, 1);
        log_warn("store failed; retrying", "{s:s, s:i, s:I, s:I, s:I}", "error", err,
                 "partition", (int)m->partition, "offset", (json_int_t)m->offset, "pending",
                 (json_int_t)(n - done), "backoff_ms", (json_int_t)backoff);
        service_sleep(&p->svc, backoff);
        if (p->svc.stop) {
            log_warn("stopping with uncommitted records; they will be consumed again",
                     "{s:I}", "records", (json_int_t)(n - done));
            break;
        }
        backoff = PX_MIN(backoff * 2, SERVICE_BACKOFF_MAX_MS);
    }
    bus_release(p->svc.b, msgs, n);
    for (size_t i = 0; i < n; i++)
        if (recs[i].x != NULL)
            parley__presence_record__free_unpacked(recs[i].x, NULL);
    free(recs);
}
