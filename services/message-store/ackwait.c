/* Owns the acks that found nothing yet. An ack names an event its client
 * received, which message-store pushes before it stores it; the putgate
 * (putgate.c) covers a put under way in this process, but with several
 * message-store processes the ack may be consumed here while another
 * process is still storing the event (the ack and inbox consumer groups
 * assign partitions independently), or while a takeover is under way (the
 * new owner of a dead process's inbox partitions stores their uncommitted
 * records again, a session timeout later). Such an ack is kept here and
 * tried again (ack.c, on the acker thread) with backoff until the event
 * appears or ACKWAIT_MS has passed; a `read` of an id waiting here marks
 * the waiting ack read, so its fact becomes READ when the event appears.
 * A `read` alone waits too (its ack may have waited in a process that
 * died, or in another one before a rebalance), unless this acker applied
 * an ack of that id lately: the usual read after the ack deleted the
 * event, which must not cost a wait. That memory (applied, recent.h: a
 * direct-mapped one lost ids applied together, and in test_writebehind's
 * late acks a read took 2 of 1,500 then waited 30 s with their commits
 * held) only errs by forgetting, which makes a wait for nothing.
 * Each retry of a waiting read that finds nothing claims it again (ack.c),
 * for the case another process acked it meanwhile.
 *
 * It also keeps late acks (ack.c: ack_late): acks of events already
 * stored or being stored, due at once, so the acker applies them between
 * batches, ACK_CHUNK at a time (ackwait_due's slices), instead of holding
 * up the acks behind them; their commits are held the same way.
 *
 * Two threads use it: the acker adds, notes reads and commits; the late
 * thread (acker.c) takes the due entries, applies them and settles them.
 * On FerretDB a late chunk costs a delete per user, a second or more for
 * a thousand acks; on the acker's own thread it held up every fresh ack
 * behind it past the write-behind hold, so their events were written too
 * and acked the store's way, which kept it there (bench at 1,000/s: 16,225
 * of ~10,300 events stored instead of ~1,000; acks 1-3 s old). So one lock
 * guards it all, and what ackwait_take hands out are copies: the acker may
 * add and sort meanwhile, and ackwait_settle finds each again by its key.
 *
 * Bounded: at most ACKWAIT_MAX entries (an ack past it is refused and
 * counted, and behaves as before: the event comes again at the next sync
 * and is acked then; a late ack past it is applied in its batch), each kept
 * until ACKWAIT_MS after the ack was made.
 * Kept sorted by (user, id, dev) without repeats, the order ack.c works in.
 *
 * Also owns the acks partitions' commit points (ackwait_commit): a
 * partition's commit stays at the oldest AckRecord whose ack still waits
 * here, so a crash (kill -9) consumes it again and whoever owns the
 * partition next applies it or lets it wait, instead of forgetting it. A
 * forgotten `ack` only meant a redelivery at the next sync; a forgotten
 * `read` was lost once that redelivery was acked (the client does not read
 * it again). The hold lasts at most ACKWAIT_MS and costs, after a crash,
 * that partition's later acks once more (idempotent). A clean stop hands
 * what waits over instead (acker.c) and lets the commits go. */
#include "common.h"
#include "log.h"
#include "msgstore.h"

#include <jansson.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct ackwait {
    pthread_mutex_t mu;    /* guards everything below */
    pthread_cond_t due_cv; /* a late entry was added, or ackwait_wake */
    ackwait_entry *e;      /* sorted and unique unless dirty */
    size_t n;
    recent *applied;       /* (user, id) of the acks applied lately */
    int dirty;             /* entries appended since the last sort */
    int left;              /* entries left since the last ackwait_recommit */
    int woken;             /* ackwait_wake: ackwait_wait_due returns at once */
    const msgstore_metrics *m;
    const char *topic;     /* the acks topic */
    int64_t *next;         /* per partition: the offset after the last record applied, or -1 */
    int64_t *commit;       /* ackwait_recommit's scratch: what each may commit */
    bus_msg *pos;          /* the same as records for bus_commit */
    size_t nparts;         /* partitions seen: [0, nparts) */
    size_t from;           /* where ackwait_take's next slice starts */
    size_t expired, full;  /* acks dropped since the last ackwait_report */
    int64_t reported_ms;   /* monotonic time of the last report */
};

ackwait *ackwait_new(const msgstore_metrics *m, const char *topic)
{
    ackwait *w = px_calloc(1, sizeof(*w));
    pthread_mutex_init(&w->mu, NULL);
    px_cond_init_mono(&w->due_cv);
    w->e = px_calloc(ACKWAIT_MAX, sizeof(*w->e));
    w->applied = recent_new(ACKWAIT_APPLIED_BITS);
    w->next = px_calloc(ACKWAIT_PARTS_MAX, sizeof(*w->next));
    w->commit = px_calloc(ACKWAIT_PARTS_MAX, sizeof(*w->commit));
    w->pos = px_calloc(ACKWAIT_PARTS_MAX, sizeof(*w->pos));
    w->m = m;
    w->topic = topic;
    return w;
}

void ackwait_free(ackwait *w)
{
    if (w == NULL)
        return;
    for (size_t i = 0; i < w->n; i++)
        free(w->e[i].user);
    free(w->e);
    recent_free(w->applied);
    free(w->next);
    free(w->commit);
    free(w->pos);
    pthread_cond_destroy(&w->due_cv);
    pthread_mutex_destroy(&w->mu);
    free(w);
}

void ackwait_applied(ackwait *w, const char *user, const char *id)
{
    pthread_mutex_lock(&w->mu);
    recent_note(w->applied, recent_key(user, id));
    pthread_mutex_unlock(&w->mu);
}

int ackwait_was_applied(ackwait *w, const char *user, const char *id)
{
    pthread_mutex_lock(&w->mu);
    int was = recent_has(w->applied, recent_key(user, id));
    pthread_mutex_unlock(&w->mu);
    return was;
}

static int ackwait_event_cmp(const ackwait_entry *x, const char *user, const char *id)
{
    int c = strcmp(x->user, user);
    return c != 0 ? c : strcmp(x->id, id);
}

static int ackwait_cmp(const void *a, const void *b)
{
    const ackwait_entry *x = a, *y = b;
    int c = ackwait_event_cmp(x, y->user, y->id);
    return c != 0 ? c : strcmp(x->dev, y->dev);
}

/* mu held. Sorts and merges repeats (the same ack consumed again, or sent
 * twice): the earliest deadline, schedule and record stay, read and the
 * latest time win. */
static void ackwait_sort(ackwait *w)
{
    if (!w->dirty || w->n == 0)
        return;
    w->dirty = 0;
    qsort(w->e, w->n, sizeof(*w->e), ackwait_cmp);
    size_t k = 1;
    for (size_t i = 1; i < w->n; i++) {
        ackwait_entry *last = &w->e[k - 1], *x = &w->e[i];
        if (ackwait_cmp(last, x) != 0) {
            w->e[k++] = *x;
            continue;
        }
        last->read |= x->read;
        last->ts_ms = PX_MAX(last->ts_ms, x->ts_ms);
        last->until_ms = PX_MIN(last->until_ms, x->until_ms);
        last->next_ms = PX_MIN(last->next_ms, x->next_ms);
        last->off = PX_MIN(last->off, x->off);
        free(x->user);
    }
    w->n = k;
}

/* mu held. */
static int ackwait_add_locked(ackwait *w, const char *user, const char *id, const char *dev,
                              int read, int64_t ts_ms, int32_t part, int64_t off, int late)
{
    if (w->n == ACKWAIT_MAX) {
        ackwait_sort(w); /* repeats may free room */
        if (w->n == ACKWAIT_MAX && late)
            return PX_AGAIN; /* applied at once instead: nothing dropped */
        if (w->n == ACKWAIT_MAX) {
            metric_add(w->m->ack_waits_full, 1);
            w->full++;
            return PX_AGAIN;
        }
    }
    /* The wait counts from the ack (ts_ms, on the gateway's clock), not from
     * when it was consumed: an ack handed over at a stop (acker.c) keeps
     * its deadline, so one that can never be applied does not go round
     * for good. An ack from the future (clock skew) gets the whole wait. */
    int64_t left = ACKWAIT_MS - PX_MAX(px_now_ms() - ts_ms, (int64_t)0);
    if (left <= 0) {
        metric_add(w->m->ack_waits_expired, 1);
        w->expired++;
        return PX_OK;
    }
    size_t lu = strlen(user) + 1, li = strlen(id) + 1, ld = strlen(dev) + 1;
    char *s = px_malloc(lu + li + ld);
    memcpy(s, user, lu);
    memcpy(s + lu, id, li);
    memcpy(s + lu + li, dev, ld);
    int64_t now = px_mono_ms();
    /* A late ack not found at once (its store round still under way) is
     * tried again ACKWAIT_FIRST_MS later, as a wait is: settle doubles. */
    w->e[w->n++] = (ackwait_entry){ .user = s, .id = s + lu, .dev = s + lu + li, .read = read,
                                    .ts_ms = ts_ms, .until_ms = now + left,
                                    .next_ms = late ? now : now + ACKWAIT_FIRST_MS,
                                    .backoff_ms = late ? ACKWAIT_FIRST_MS / 2 : ACKWAIT_FIRST_MS,
                                    .part = part,
                                    .off = off };
    w->dirty = 1;
    metric_add(late ? w->m->acks_late : w->m->ack_waits, 1);
    if (late)
        pthread_cond_signal(&w->due_cv);
    return PX_OK;
}

int ackwait_add(ackwait *w, const char *user, const char *id, const char *dev, int read,
                int64_t ts_ms, int32_t part, int64_t off, int late)
{
    pthread_mutex_lock(&w->mu);
    int rc = ackwait_add_locked(w, user, id, dev, read, ts_ms, part, off, late);
    pthread_mutex_unlock(&w->mu);
    return rc;
}

/* mu held, sorted: the index of the first entry not below (user, id, dev). */
static size_t ackwait_find(const ackwait *w, const char *user, const char *id, const char *dev)
{
    ackwait_entry probe = { .user = (char *)user, .id = (char *)id, .dev = (char *)dev };
    size_t lo = 0, hi = w->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (ackwait_cmp(&w->e[mid], &probe) < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

int ackwait_note_read(ackwait *w, const char *user, const char *id, int64_t ts_ms)
{
    pthread_mutex_lock(&w->mu);
    ackwait_sort(w);
    int hit = 0;
    /* The first entry of (user, id): dev "" sorts before any device name. */
    for (size_t i = ackwait_find(w, user, id, "");
         i < w->n && ackwait_event_cmp(&w->e[i], user, id) == 0; i++) {
        w->e[i].read = 1;
        w->e[i].ts_ms = PX_MAX(w->e[i].ts_ms, ts_ms);
        hit = 1;
    }
    pthread_mutex_unlock(&w->mu);
    return hit;
}

void ackwait_report(ackwait *w, int64_t now_ms)
{
    pthread_mutex_lock(&w->mu);
    if (w->expired + w->full == 0 || now_ms - w->reported_ms < ACKWAIT_REPORT_MS) {
        pthread_mutex_unlock(&w->mu);
        return;
    }
    log_warn("acks dropped without their events; those events stay stored and come again "
             "at the receiver's next sync",
             "{s:I, s:I}", "expired", (json_int_t)w->expired, "full", (json_int_t)w->full);
    w->expired = w->full = 0;
    w->reported_ms = now_ms;
    pthread_mutex_unlock(&w->mu);
}

ackwait_entry *ackwait_take(ackwait *w, int64_t now_ms, size_t max, size_t *n)
{
    pthread_mutex_lock(&w->mu);
    ackwait_sort(w);
    ackwait_entry *t = px_malloc((PX_MIN(max, w->n) + 1) * sizeof(*t));
    size_t k = 0;
    /* Not round the end: a slice stays in sort order, as ack.c needs. */
    size_t i = max < w->n && w->from < w->n ? w->from : 0;
    for (; i < w->n && k < max; i++) {
        if (w->e[i].next_ms > now_ms)
            continue;
        t[k] = w->e[i];
        size_t lu = strlen(t[k].user) + 1, li = strlen(t[k].id) + 1;
        size_t ld = strlen(t[k].dev) + 1;
        t[k].user = px_malloc(lu + li + ld);
        memcpy(t[k].user, w->e[i].user, lu);
        t[k].id = memcpy(t[k].user + lu, w->e[i].id, li);
        t[k].dev = memcpy(t[k].user + lu + li, w->e[i].dev, ld);
        k++;
    }
    w->from = i < w->n ? i - k : 0; /* settle removes the found ones before it */
    pthread_mutex_unlock(&w->mu);
    *n = k;
    return t;
}

void ackwait_taken_free(ackwait_entry *t, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(t[i].user);
    free(t);
}

void ackwait_settle(ackwait *w, ackwait_entry *t, size_t n, const int *found, int64_t now_ms)
{
    pthread_mutex_lock(&w->mu);
    ackwait_sort(w);
    char *leave = px_calloc(w->n + 1, 1); /* marked first: the search needs every key */
    size_t gone = 0;
    for (size_t i = 0; i < n; i++) {
        /* Gone meanwhile (forgotten at a stop): nothing to settle. */
        size_t j = ackwait_find(w, t[i].user, t[i].id, t[i].dev);
        if (j == w->n || ackwait_cmp(&w->e[j], &t[i]) != 0 || leave[j])
            continue;
        ackwait_entry *x = &w->e[j];
        if (found[i])
            recent_note(w->applied, recent_key(x->user, x->id));
        if (found[i] || now_ms >= x->until_ms) {
            metric_add(found[i] ? w->m->ack_waits_found : w->m->ack_waits_expired, 1);
            w->expired += !found[i];
            leave[j] = 1;
            gone++;
            continue;
        }
        x->backoff_ms = PX_MIN(2 * x->backoff_ms, ACKWAIT_MAX_BACKOFF_MS);
        x->next_ms = PX_MIN(now_ms + x->backoff_ms, x->until_ms);
    }
    if (gone > 0) {
        size_t k = 0;
        for (size_t i = 0; i < w->n; i++) {
            if (leave[i])
                free(w->e[i].user);
            else
                w->e[k++] = w->e[i];
        }
        w->n = k;
        w->left = 1;
    }
    free(leave);
    pthread_mutex_unlock(&w->mu);
    ackwait_taken_free(t, n);
}

void ackwait_wait_due(ackwait *w, int64_t max_ms)
{
    pthread_mutex_lock(&w->mu);
    int64_t now = px_mono_ms(), until = now + max_ms;
    for (size_t i = 0; i < w->n; i++)
        until = PX_MIN(until, w->e[i].next_ms);
    if (!w->woken && until > now) {
        struct timespec ts;
        px_mono_deadline(&ts, until - now);
        pthread_cond_timedwait(&w->due_cv, &w->mu, &ts);
    }
    w->woken = 0;
    pthread_mutex_unlock(&w->mu);
}

void ackwait_wake(ackwait *w)
{
    pthread_mutex_lock(&w->mu);
    w->woken = 1;
    pthread_cond_signal(&w->due_cv);
    pthread_mutex_unlock(&w->mu);
}

void ackwait_forget(ackwait *w)
{
    pthread_mutex_lock(&w->mu);
    for (size_t i = 0; i < w->n; i++)
        free(w->e[i].user);
    w->left |= w->n > 0;
    w->n = 0;
    w->dirty = 0;
    pthread_mutex_unlock(&w->mu);
}

/* ---- the acks partitions' commit points ---- */

/* mu held. */
static void ackwait_recommit_locked(ackwait *w, bus *b)
{
    w->left = 0;
    memcpy(w->commit, w->next, w->nparts * sizeof(*w->commit));
    for (size_t i = 0; i < w->n; i++) {
        const ackwait_entry *x = &w->e[i];
        if (x->part >= 0 && (size_t)x->part < w->nparts && x->off < w->commit[x->part])
            w->commit[x->part] = x->off;
    }
    size_t k = 0, held = 0;
    for (size_t p = 0; p < w->nparts; p++) {
        if (w->next[p] < 0)
            continue; /* nothing applied there yet */
        held += w->commit[p] < w->next[p];
        /* bus_commit commits the offset after the record named. */
        w->pos[k++] = (bus_msg){ .topic = w->topic, .partition = (int32_t)p,
                                 .offset = w->commit[p] - 1 };
    }
    /* A partition moved to another member refuses the store: its next
     * owner starts at what was committed, the oldest waiting record. */
    bus_commit(b, w->pos, k);
    metric_set(w->m->ack_commits_held, (int64_t)held);
}

void ackwait_recommit(ackwait *w, bus *b)
{
    pthread_mutex_lock(&w->mu);
    if (w->left)
        ackwait_recommit_locked(w, b);
    pthread_mutex_unlock(&w->mu);
}

void ackwait_commit(ackwait *w, bus *b, const bus_msg *m, size_t n)
{
    pthread_mutex_lock(&w->mu);
    for (size_t i = 0; i < n; i++) {
        int32_t p = m[i].partition;
        if (p < 0 || p >= ACKWAIT_PARTS_MAX) {
            bus_commit(b, &m[i], 1); /* no room to hold it: as before */
            continue;
        }
        for (; w->nparts <= (size_t)p; w->nparts++)
            w->next[w->nparts] = -1;
        /* The last one applied, not the highest: a partition that came back
         * after another member had it restarts lower. */
        w->next[p] = m[i].offset + 1;
    }
    ackwait_recommit_locked(w, b);
    pthread_mutex_unlock(&w->mu);
}
