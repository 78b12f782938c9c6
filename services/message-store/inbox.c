/* Owns storing runs of InboxRecords with crash-safe dedupe. Steps: seen
 * claim, inbox put, live push (confirmed by the bus before the batch
 * commits). The claim names the record by its bus position, so a crash
 * anywhere after it brings the same record back still fresh, and its put
 * (idempotent) and push are done again; a resend of the same id is another
 * record and is dropped. The claims outlive the inbox copy (kept for the
 * retention period), which is what absorbs a resend after the recipient
 * already acked and deleted the first copy. One round trip (the claim)
 * replaces the filter-before and mark-after pair this used to make. */
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
    size_t n, nc, nf;
} inbox_run;

static uint64_t inbox_hash(const char *s)
{
    uint64_t h = 1469598103934665603ULL; /* FNV-1a */
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ULL;
    return h;
}

/* Marks keys repeated within the run: the store would absorb the second
 * copy anyway, but routing both would push the event twice. */
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

static void inbox_run_init(inbox_run *ir, const msgstore_rec *recs, size_t n)
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
        if (!ir->dup[i]) {
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
}

static void inbox_pick_fresh(inbox_run *ir, const msgstore_rec *recs)
{
    for (size_t c = 0; c < ir->nc; c++)
        if (ir->fresh[c])
            inbox_event(&ir->fev[ir->nf++], &recs[ir->cidx[c]]);
}

int inbox_store_run(msgstore *ms, msgstore_rec *recs, size_t n, char *err, size_t errlen)
{
    int rc = PX_ERROR;
    inbox_run ir = { 0 };
    inbox_run_init(&ir, recs, n);

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

    /* A put that reports a duplicate of a fresh claim is this record's own
     * earlier, unfinished attempt: push it anyway; clients dedupe. */
    size_t inserted = 0;
    for (size_t i = 0; i < ir.nf; i++)
        inserted += ir.inserted[i] != 0;
    metric_add(ms->m.stored, (int64_t)inserted);
    metric_add(ms->m.duplicates, (int64_t)(n - inserted));
    route_live(ms, ir.fev, ir.nf);

    /* The pushes are in the bus before the batch commits: a crash before
     * that brings the records back, still fresh, and pushes them again. */
    if (ir.nf > 0 && bus_flush(ms->svc.b, 10000) != PX_OK) {
        px_err(err, errlen, "live deliveries not confirmed by the bus in 10 s");
        goto out;
    }
    rc = PX_OK;
out:
    inbox_run_free(&ir);
    return rc;
}
