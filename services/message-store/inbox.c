/* Owns storing runs of InboxRecords with crash-safe dedupe, behind the
 * live push. Steps: push to the online recipients (route.c), seen claim,
 * inbox put (registry lookups of expired presence-cache entries run beside
 * them), then wait until the bus holds the pushes; the batch commits
 * after. The push goes first because a recipient who is online needs
 * nothing from the store: the store is for what is not yet delivered, and
 * its round trips (a claim and a put, milliseconds each on FerretDB) no
 * longer sit between a message and its reader. A crash anywhere before the
 * commit brings the records back; the claim names each record by its bus
 * position, so a redelivered record is still fresh and its put (idempotent)
 * and push are done again (clients dedupe by id). A resend of the same id
 * is another record: its claim is refused and it is not stored again. The
 * claims outlive the inbox copy (kept for the retention period), which is
 * what absorbs a resend after the recipient already acked and deleted the
 * first copy.
 *
 * The push cannot wait for the claim, so what keeps a resend off the wire
 * is a memory of the keys this process pushed lately (inbox_recent: a
 * direct-mapped table of key hashes): a key pushed lately is not pushed
 * again, whether the record is a resend or this run's retry after a failed
 * store step (its first push stands; if the bus lost it, the event is in
 * the inbox for the next sync, as for any best-effort push). A resend the
 * memory no longer holds (older than its reach, or first consumed by
 * another process) is pushed once more with the same msg_id, which clients
 * already drop by id (at-least-once on the wire); it is never stored or
 * synced again. Acks that overtake the put wait for it (putgate.c). */
#include "common.h"
#include "msgstore.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Per-run scratch, sized by the run (at most MSGSTORE_BATCH records). */
typedef struct inbox_run {
    char **keys;           /* "user/id" per record */
    char **tags;           /* "partition/offset" per record */
    int *dup;              /* 1: same key earlier in this run */
    const char **ckeys;    /* keys of the candidates (not dup) */
    const char **ctags;    /* their tags */
    size_t *cidx;          /* record index of each candidate */
    int *fresh;            /* per candidate: its claim is this record's */
    store_event *fev;      /* the fresh events, in batch order */
    int *inserted;         /* per fresh event */
    store_event *pev;      /* the events to push, in batch order */
    size_t n, nc, nf, np;
} inbox_run;

/* ---- the memory of recent pushes ---- */

#define INBOX_RECENT_SLOTS (1u << 17)   /* 1 MiB; about a minute of traffic at 1k/s */

struct inbox_recent {
    uint64_t hash[INBOX_RECENT_SLOTS];  /* of "user/id"; 0: empty */
};

inbox_recent *inbox_recent_new(void)
{
    return px_calloc(1, sizeof(inbox_recent));
}

void inbox_recent_free(inbox_recent *r)
{
    free(r);
}

static uint64_t inbox_hash(const char *s)
{
    uint64_t h = 1469598103934665603ULL; /* FNV-1a */
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ULL;
    return h;
}

/* Marks keys repeated within the run: the store would absorb the second
 * copy anyway, but routing both would push the event twice. */
/* 1 when the record should be pushed: its key was not pushed lately (a
 * colliding key evicts, which can only let a resend through, never keep a
 * new record back). 0 for a resend or a retry of a pushed record. */
static int inbox_recent_note(inbox_recent *r, const char *key)
{
    uint64_t h = inbox_hash(key);
    h += h == 0;
    uint64_t *slot = &r->hash[h & (INBOX_RECENT_SLOTS - 1)];
    if (*slot == h)
        return 0;
    *slot = h;
    return 1;
}

static void inbox_mark_dups(inbox_run *ir)
{
    size_t cap = 16;
    while (cap < 2 * ir->n)
        cap *= 2;
    size_t *slots = px_calloc(cap, sizeof(*slots)); /* record index + 1 */
    for (size_t i = 0; i < ir->n; i++) {
        size_t s = inbox_hash(ir->keys[i]) & (cap - 1);
        while (slots[s] != 0 && strcmp(ir->keys[slots[s] - 1], ir->keys[i]) != 0)
            s = (s + 1) & (cap - 1);
        ir->dup[i] = slots[s] != 0;
        if (slots[s] == 0)
            slots[s] = i + 1;
    }
    free(slots);
}

/* skip[i]: record i is left out (devices_unneeded). */
static void inbox_run_init(inbox_run *ir, const msgstore_rec *recs, size_t n, const int *skip)
{
    ir->n = n;
    ir->keys = px_calloc(n, sizeof(*ir->keys));
    ir->dup = px_calloc(n, sizeof(*ir->dup));
    ir->tags = px_calloc(n, sizeof(*ir->tags));
    ir->ckeys = px_calloc(n, sizeof(*ir->ckeys));
    ir->ctags = px_calloc(n, sizeof(*ir->ctags));
    ir->cidx = px_calloc(n, sizeof(*ir->cidx));
    ir->fresh = px_calloc(n, sizeof(*ir->fresh));
    ir->fev = px_calloc(n, sizeof(*ir->fev));
    ir->inserted = px_calloc(n, sizeof(*ir->inserted));
    ir->pev = px_calloc(n, sizeof(*ir->pev));
    for (size_t i = 0; i < n; i++) {
        const Parley__InboxRecord *x = recs[i].u.inbox;
        size_t len = strlen(x->user) + 1 + strlen(x->id) + 1;
        ir->keys[i] = px_malloc(len);
        snprintf(ir->keys[i], len, "%s/%s", x->user, x->id);
        ir->tags[i] = px_malloc(32);
        snprintf(ir->tags[i], 32, "%d/%lld", (int)recs[i].m->partition,
                 (long long)recs[i].m->offset);
    }
    inbox_mark_dups(ir);
    for (size_t i = 0; i < n; i++)
        if (!ir->dup[i] && !skip[i]) {
            ir->ckeys[ir->nc] = ir->keys[i];
            ir->ctags[ir->nc] = ir->tags[i];
            ir->cidx[ir->nc++] = i;
        }
}

static void inbox_run_free(inbox_run *ir)
{
    for (size_t i = 0; i < ir->n; i++) {
        free(ir->keys[i]);
        free(ir->tags[i]);
    }
    free(ir->keys);
    free(ir->tags);
    free(ir->dup);
    free(ir->ckeys);
    free(ir->ctags);
    free(ir->cidx);
    free(ir->fresh);
    free(ir->fev);
    free(ir->inserted);
    free(ir->pev);
}

/* seq is the bus offset: all of one user's records come from one partition
 * of parley.inbox, so offsets order the user's inbox. */
static void inbox_event(store_event *ev, const msgstore_rec *r)
{
    const Parley__InboxRecord *x = r->u.inbox;
    ev->user = x->user;
    ev->id = x->id;
    ev->seq = r->m->offset;
    ev->ts_ms = x->ts_ms > 0 ? x->ts_ms : r->m->ts_ms;
    ev->kind = (int)x->kind; /* EventKind and store_kind share their numbers */
    ev->sender = x->sender[0] != '\0' ? x->sender : NULL;
    ev->json = (const char *)x->event_json.data;
    ev->json_len = x->event_json.len;
    ev->origin = x->origin_device[0] != '\0' ? x->origin_device : NULL;
}

static void inbox_pick_fresh(inbox_run *ir, const msgstore_rec *recs)
{
    for (size_t c = 0; c < ir->nc; c++)
        if (ir->fresh[c])
            inbox_event(&ir->fev[ir->nf++], &recs[ir->cidx[c]]);
}

/* The candidates this process has not pushed yet, in batch order. */
static void inbox_pick_push(msgstore *ms, inbox_run *ir, const msgstore_rec *recs)
{
    for (size_t c = 0; c < ir->nc; c++) {
        const msgstore_rec *r = &recs[ir->cidx[c]];
        if (inbox_recent_note(ms->recent, ir->ckeys[c]))
            inbox_event(&ir->pev[ir->np++], r);
    }
}

int inbox_store_run(msgstore *ms, msgstore_rec *recs, size_t n, char *err, size_t errlen)
{
    int rc = PX_ERROR;
    inbox_run ir = { 0 };
    route_refresh *refresh = NULL;
    int *skip = px_calloc(n, sizeof(*skip));
    if (devices_unneeded(ms, recs, n, skip, err, errlen) != PX_OK) {
        free(skip);
        return PX_ERROR;
    }
    inbox_run_init(&ir, recs, n, skip);
    free(skip);

    /* Numbered before the push: an ack of any of these events is consumed
     * after it, and waits until this run is durable. */
    uint64_t run = putgate_pushed(ms->gate);
    inbox_pick_push(ms, &ir, recs);
    refresh = route_live(ms, ir.pev, ir.np);

    int64_t t0 = service_clock_us();
    if (store_seen_claim(ms->svc.st, ir.ckeys, ir.ctags, ir.nc, px_now_ms(), ir.fresh, err,
                         errlen) != PX_OK)
        goto out;
    service_observe(ms->m.lat_seen_claim, t0);
    inbox_pick_fresh(&ir, recs);

    if (ir.nf > 0) {
        t0 = service_clock_us();
        if (store_inbox_put(ms->svc.st, ir.fev, ir.nf, ir.inserted, err, errlen) != PX_OK)
            goto out;
        service_observe(ms->m.lat_put, t0);
    }
    /* Before the gate opens: an ack by another device must find the
     * origin's mark, or it would wait for the origin forever. */
    if (devices_mark_origins(ms, ir.fev, ir.nf, err, errlen) != PX_OK)
        goto out;
    putgate_durable(ms->gate, run);
    route_refresh_end(refresh);
    refresh = NULL;

    size_t inserted = 0;
    for (size_t i = 0; i < ir.nf; i++)
        inserted += ir.inserted[i] != 0;
    metric_add(ms->m.stored, (int64_t)inserted);
    metric_add(ms->m.duplicates, (int64_t)(n - inserted));

    /* The pushes are in the bus before the batch commits, so a commit never
     * outruns a live delivery that a crash could still lose; by now they
     * have had the store's round trips to get there. */
    if (ir.np > 0 && bus_flush(ms->svc.b, 10000) != PX_OK) {
        px_err(err, errlen, "live deliveries not confirmed by the bus in 10 s");
        goto out;
    }
    rc = PX_OK;
out:
    route_refresh_end(refresh); /* a failed store step: the lookups still end */
    inbox_run_free(&ir);
    return rc;
}
