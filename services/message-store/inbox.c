/* Owns storing runs of InboxRecords with crash-safe dedupe, behind the
 * live push, in two stages. The push stage (inbox_push, consume thread):
 * push to the online recipients (route.c; registry lookups of expired
 * presence-cache entries start beside it). The store stage (inbox_store,
 * the writer thread of pipe.c, or inline in inbox_store_run): one seen
 * claim and one inbox put for the candidates of every run it is given.
 * The batch commits once both stages are done and the bus holds the
 * pushes. The push goes first because a recipient who is online needs
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
 * is a memory of the keys this process pushed lately (recent.h, 2^17
 * key hashes: about two minutes of traffic at 1,000/s): a key pushed lately is not pushed
 * again, whether the record is a resend or this run's retry after a failed
 * store step (its first push stands; if the bus lost it, the event is in
 * the inbox for the next sync, as for any best-effort push). A resend the
 * memory no longer holds (older than its reach, or first consumed by
 * another process) is pushed once more with the same msg_id, which clients
 * already drop by id (at-least-once on the wire); it is never stored or
 * synced again. Acks that overtake the put wait for it (putgate.c).
 *
 * A sender's own copy (origin_device, issue 17) is pushed like any event
 * (its Delivery names the origin, which the gateway skips), and only the
 * store stage reads the user's devices to drop the copies no other device
 * needs (devices_unneeded): a device read on the push path would put a
 * store round trip before every batch's push again. A wasted push costs
 * nothing: the gateway gives it to no one. The one difference it makes is
 * a device linking in the instant between a copy's consumption and its own
 * first sync: it may get that copy live, never from the store.
 *
 * The store stage also records who is in contact with whom (contacts.c),
 * which presence to contacts reads (issue 18).
 *
 * Typing events (EVENT_KIND_TYPING, issue 18) take the push stage only:
 * the store stage leaves them out, so they reach who is connected and no
 * sync ever brings them back. */
#include "common.h"
#include "msgstore.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* One run's push stage (inbox_push) and what its store stage needs: per
 * record its key and tag, the candidates (first of their key in the run)
 * and the events pushed. Freed by inbox_push_end. */
struct inbox_run {
    msgstore_rec *recs;
    char **keys;           /* "user/id" per record */
    char **tags;           /* "partition/offset" per record */
    size_t *cidx;          /* record index of each candidate (not dup) */
    int *skip;             /* store stage: record i is left out (devices_unneeded) */
    store_event *pev;      /* the events pushed, in batch order */
    size_t n, nc, np;
    putgate *gate;         /* holds pev from before the push to the run's end */
    uint64_t gate_run;     /* putgate number */
    route_refresh *refresh;
};

/* dup[i] = 1 when keys[i] came earlier in the list: the store would absorb
 * the second copy anyway, but one bulk claim must not name a key twice and
 * routing both would push the event twice. */
static void inbox_mark_dups(char *const *keys, size_t n, int *dup)
{
    size_t cap = 16;
    while (cap < 2 * n)
        cap *= 2;
    size_t *slots = px_calloc(cap, sizeof(*slots)); /* index + 1 */
    for (size_t i = 0; i < n; i++) {
        size_t s = px_hash(keys[i]) & (cap - 1);
        while (slots[s] != 0 && strcmp(keys[slots[s] - 1], keys[i]) != 0)
            s = (s + 1) & (cap - 1);
        dup[i] = slots[s] != 0;
        if (slots[s] == 0)
            slots[s] = i + 1;
    }
    free(slots);
}

static inbox_run *inbox_run_new(msgstore_rec *recs, size_t n)
{
    inbox_run *ir = px_calloc(1, sizeof(*ir));
    ir->recs = recs;
    ir->n = n;
    ir->keys = px_calloc(n, sizeof(*ir->keys));
    ir->tags = px_calloc(n, sizeof(*ir->tags));
    ir->cidx = px_calloc(n, sizeof(*ir->cidx));
    ir->skip = px_calloc(n, sizeof(*ir->skip));
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
    int *dup = px_calloc(n, sizeof(*dup));
    inbox_mark_dups(ir->keys, n, dup);
    for (size_t i = 0; i < n; i++)
        if (!dup[i])
            ir->cidx[ir->nc++] = i;
    free(dup);
    return ir;
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

inbox_run *inbox_push(msgstore *ms, msgstore_rec *recs, size_t n)
{
    inbox_run *ir = inbox_run_new(recs, n);
    /* Numbered before the push: an ack of any of these events is consumed
     * after it, and waits until this run is durable. */
    ir->gate_run = putgate_pushed(ms->gate);
    /* Typing ids are never resent: they stay out of the memory of recent
     * pushes, where a burst of them would evict the messages' keys. */
    for (size_t c = 0; c < ir->nc; c++) {
        const msgstore_rec *r = &recs[ir->cidx[c]];
        if (r->u.inbox->kind == PARLEY__EVENT_KIND__EVENT_KIND_TYPING ||
            recent_note(ms->recent, recent_key(ir->keys[ir->cidx[c]], NULL)))
            inbox_event(&ir->pev[ir->np++], r);
    }
    ir->gate = ms->gate;
    putgate_hold(ir->gate, ir->gate_run, ir->pev, ir->np);
    devcache_consumed(ms->devcache, bus_generation(ms->svc.b), ir->pev, ir->np);
    ir->refresh = route_live(ms, ir->pev, ir->np);
    return ir;
}

int inbox_push_ready(const inbox_run *ir)
{
    return ir == NULL || route_refresh_ready(ir->refresh);
}

void inbox_push_end(inbox_run *ir)
{
    if (ir == NULL)
        return;
    route_refresh_end(ir->refresh);
    putgate_release(ir->gate, ir->pev, ir->np);
    for (size_t i = 0; i < ir->n; i++) {
        free(ir->keys[i]);
        free(ir->tags[i]);
    }
    free(ir->keys);
    free(ir->tags);
    free(ir->cidx);
    free(ir->skip);
    free(ir->pev);
    free(ir);
}

/* The candidates of several runs as one list for one claim and one put. */
typedef struct inbox_all {
    char **keys;
    const char **tags;
    const msgstore_rec **recs;
    int *dup, *fresh, *inserted, *settled;
    const msgstore_rec **crecs;    /* not dup */
    int *unclaimed;                /* per crecs: fresh without a claim */
    const char **ckeys, **ctags;   /* the claim's: crecs but the unclaimed */
    store_event *fev;              /* fresh: claimed by these records, or unclaimed */
    store_event *put;              /* of them, those no ack settled */
    size_t n, nc, nq, nf, nput;
} inbox_all;

/* A receipt is not claimed. The claim keeps a resend from being stored or
 * pushed again for the retention period, and only a client resends: a
 * receipt's id names (message, reader, status), and the receipt service
 * makes it again only when it consumes its fact again (a crash or a
 * handover before its commit). That repeat is stored once more only if the
 * first was acked and deleted already, and reaches the client once more
 * with the same id, which clients drop. Each claim is a write at a random
 * place in the claims' table, inside the store's one write lock: half of
 * them were receipts' (docs/benchmarks.md, "Receipts are not claimed"). */
static int inbox_claimed(const msgstore_rec *r)
{
    return r->u.inbox->kind != PARLEY__EVENT_KIND__EVENT_KIND_RECEIPT;
}

static void inbox_all_init(inbox_all *a, inbox_run *const *runs, size_t nruns)
{
    size_t n = 0;
    for (size_t r = 0; r < nruns; r++)
        n += runs[r]->nc;
    memset(a, 0, sizeof(*a));
    a->keys = px_calloc(n + 1, sizeof(*a->keys));
    a->tags = px_calloc(n + 1, sizeof(*a->tags));
    a->recs = px_calloc(n + 1, sizeof(*a->recs));
    a->dup = px_calloc(n + 1, sizeof(*a->dup));
    a->fresh = px_calloc(n + 1, sizeof(*a->fresh));
    a->inserted = px_calloc(n + 1, sizeof(*a->inserted));
    a->settled = px_calloc(n + 1, sizeof(*a->settled));
    a->unclaimed = px_calloc(n + 1, sizeof(*a->unclaimed));
    a->ckeys = px_calloc(n + 1, sizeof(*a->ckeys));
    a->ctags = px_calloc(n + 1, sizeof(*a->ctags));
    a->crecs = px_calloc(n + 1, sizeof(*a->crecs));
    a->fev = px_calloc(n + 1, sizeof(*a->fev));
    a->put = px_calloc(n + 1, sizeof(*a->put));
    for (size_t r = 0; r < nruns; r++)
        for (size_t c = 0; c < runs[r]->nc; c++) {
            size_t i = runs[r]->cidx[c];
            if (runs[r]->skip[i])
                continue;
            a->keys[a->n] = runs[r]->keys[i];
            a->tags[a->n] = runs[r]->tags[i];
            a->recs[a->n++] = &runs[r]->recs[i];
        }
    /* A key in two runs (a resend consumed a moment later) is claimed once. */
    if (nruns > 1)
        inbox_mark_dups(a->keys, a->n, a->dup);
    for (size_t i = 0; i < a->n; i++) {
        if (a->dup[i])
            continue;
        a->unclaimed[a->nc] = !inbox_claimed(a->recs[i]);
        a->crecs[a->nc++] = a->recs[i];
        if (inbox_claimed(a->recs[i])) {
            a->ckeys[a->nq] = a->keys[i];
            a->ctags[a->nq++] = a->tags[i];
        }
    }
}

static void inbox_all_free(inbox_all *a)
{
    free(a->keys);
    free(a->tags);
    free(a->recs);
    free(a->dup);
    free(a->fresh);
    free(a->inserted);
    free(a->settled);
    free(a->unclaimed);
    free(a->ckeys);
    free(a->ctags);
    free(a->crecs);
    free(a->fev);
    free(a->put);
}

/* Sets the runs' skip marks with one devices read for all of them (a
 * writer round takes many small runs; a read per run made the round, and
 * with it every ack's wait on the putgate, grow with their number). */
static int inbox_skip_unneeded(msgstore *ms, inbox_run *const *runs, size_t nruns, char *err,
                               size_t errlen)
{
    size_t n = 0, origins = 0;
    for (size_t r = 0; r < nruns; r++) {
        memset(runs[r]->skip, 0, runs[r]->n * sizeof(*runs[r]->skip));
        for (size_t i = 0; i < runs[r]->n; i++)
            origins += runs[r]->recs[i].u.inbox->origin_device[0] != '\0';
        n += runs[r]->n;
    }
    if (origins == 0)
        return PX_OK;
    if (nruns == 1)
        return devices_unneeded(ms, runs[0]->recs, n, runs[0]->skip, err, errlen);
    msgstore_rec *all = px_malloc(n * sizeof(*all));
    int *skip = px_calloc(n, sizeof(*skip));
    size_t k = 0;
    for (size_t r = 0; r < nruns; r++) {
        memcpy(all + k, runs[r]->recs, runs[r]->n * sizeof(*all));
        k += runs[r]->n;
    }
    int rc = devices_unneeded(ms, all, n, skip, err, errlen);
    k = 0;
    for (size_t r = 0; r < nruns; r++) {
        memcpy(runs[r]->skip, skip + k, runs[r]->n * sizeof(*skip));
        k += runs[r]->n;
    }
    free(all);
    free(skip);
    return rc;
}

int inbox_store(msgstore *ms, inbox_run *const *runs, size_t nruns, char *err, size_t errlen)
{
    int rc = PX_ERROR;
    inbox_all a;
    if (inbox_skip_unneeded(ms, runs, nruns, err, errlen) != PX_OK)
        return PX_ERROR;
    /* Typing is for whoever is connected now: pushed, never stored. */
    for (size_t r = 0; r < nruns; r++)
        for (size_t i = 0; i < runs[r]->n; i++)
            runs[r]->skip[i] |= runs[r]->recs[i].u.inbox->kind ==
                                PARLEY__EVENT_KIND__EVENT_KIND_TYPING;
    inbox_all_init(&a, runs, nruns);
    size_t records = 0;
    for (size_t r = 0; r < nruns; r++)
        records += runs[r]->n;

    int64_t t0 = service_clock_us();
    if (a.nq > 0) {
        if (store_seen_claim(ms->svc.st, a.ckeys, a.ctags, a.nq, px_now_ms(), a.fresh, err,
                             errlen) != PX_OK)
            goto out;
        service_observe(ms->m.lat_seen_claim, t0);
        metric_add(ms->m.claims, (int64_t)a.nq);
    }
    for (size_t c = 0, q = 0; c < a.nc; c++)
        if (a.unclaimed[c] || a.fresh[q++])
            inbox_event(&a.fev[a.nf++], a.crecs[c]);
    /* What an ack settled while it was held has its receipt fact and is
     * delivered: it is not written (nor deleted a moment later). The rest
     * is the writer's from here on. */
    putgate_take(ms->gate, a.fev, a.nf, a.settled);
    size_t settled = 0;
    for (size_t i = 0; i < a.nf; i++) {
        if (a.settled[i])
            settled++;
        else
            a.put[a.nput++] = a.fev[i];
    }
    /* Before the put: a sync's kept rest must not end the backlog past it. */
    for (size_t i = 0; i < a.nput; i++)
        synckept_wrote(ms->kept, a.put[i].user);
    if (a.nput > 0) {
        t0 = service_clock_us();
        if (store_inbox_put(ms->svc.st, a.put, a.nput, a.inserted, err, errlen) != PX_OK)
            goto out;
        service_observe(ms->m.lat_put, t0);
    }
    if (contacts_record(ms, a.fev, a.nf, err, errlen) != PX_OK)
        goto out;
    /* Before the gate opens: an ack by another device must find the
     * origin's mark, or it would wait for the origin forever. */
    if (devices_mark_origins(ms, a.put, a.nput, err, errlen) != PX_OK)
        goto out;
    putgate_stored(ms->gate, a.put, a.nput);
    stored_add(ms->stored, a.put, a.nput);
    putgate_durable(ms->gate, runs[nruns - 1]->gate_run);
    size_t inserted = 0;
    for (size_t i = 0; i < a.nput; i++)
        inserted += a.inserted[i] != 0;
    metric_add(ms->m.stored, (int64_t)inserted);
    metric_add(ms->m.settled, (int64_t)settled);
    metric_add(ms->m.duplicates, (int64_t)(records - inserted - settled));
    rc = PX_OK;
out:
    inbox_all_free(&a);
    return rc;
}

int inbox_store_run(msgstore *ms, msgstore_rec *recs, size_t n, char *err, size_t errlen)
{
    inbox_run *ir = inbox_push(ms, recs, n);
    int rc = inbox_store(ms, &ir, 1, err, errlen);
    size_t np = ir->np;
    inbox_push_end(ir); /* a failed store step: the lookups still end */
    /* The pushes are in the bus before the batch commits, so a commit never
     * outruns a live delivery that a crash could still lose; by now they
     * have had the store's round trips to get there. */
    if (rc == PX_OK && np > 0 && bus_flush(ms->svc.b, 10000) != PX_OK)
        rc = px_err(err, errlen, "live deliveries not confirmed by the bus in 10 s");
    return rc;
}
