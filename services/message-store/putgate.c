/* Owns the write-behind gate between the inbox consumer and the acker,
 * and the events held in it. The inbox consumer pushes a run of records to
 * their gateways before it stores them (inbox.c), so a client can ack an
 * event whose inbox put is still under way; the acker, on a thread and
 * consumer group of its own, would then find nothing to delete and make no
 * receipt fact, and the put landing after it would bring the event back at
 * the next sync. The gate counts runs: `pushed` when a run goes out,
 * `durable` when its store effects are. An ack was consumed after its
 * event was pushed, so once `durable` reaches the `pushed` seen when the
 * ack run starts, every event it can name is in the store; with a hold, an
 * ack waits only for the runs of the events it names that are on their
 * way to the store (each held event knows its run). Runs are stored in
 * order on one thread, so one pair of counters says it all. Both msgstores
 * of a process share one gate. It only covers puts of this process: the
 * acker reads the partitions the inbox consumer holds (acker.c), but while
 * partitions move an ack may be consumed by another process's acker, or
 * during a takeover before the new owner has stored the dead one's
 * uncommitted records again. Such an ack finds nothing here; ack.c then
 * keeps it in the acker's wait list (ackwait.c) and tries again with
 * backoff for up to 30 s, which makes its fact and deletes the event once
 * the other process has stored it.
 *
 * The held events: every event pushed and not yet stored is listed here
 * (borrowed from its run, from before its push until the run ends), so the
 * acker can tell an ack of an event still on its way to the store from one
 * of a stored event, and settle the first kind without the store: once its
 * receipt fact is durable, the event is marked settled and the writer
 * leaves it out of the inbox put (written and deleted again a moment later
 * otherwise: half the pages parleyd wrote per message under the store's
 * write lock). The writer takes each event (pending -> storing) at the
 * start of its round under the same lock, so an event is either settled or
 * stored, never both. With PARLEY_MSGSTORE_HOLD_MS the writer lets a round
 * wait that long, so most acks arrive first; a gate waiter hurries it. */
#include "common.h"
#include "msgstore.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* The pipeline holds at most PARLEY_MSGSTORE_PIPELINE (65,536) events:
 * chains of one on average when it is full (512 KiB of heads per process). */
#define PUTGATE_BUCKETS 65536

typedef struct putgate_held {
    struct putgate_held *next;
    const store_event *ev;      /* borrowed from its run (inbox.c) */
    uint64_t run;               /* putgate_pushed's number of its run */
    enum putgate_state state;
} putgate_held;

struct putgate {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    uint64_t pushed, durable;
    putgate_held *bucket[PUTGATE_BUCKETS];
    void (*hurry)(void *);      /* tells the writer a gate waiter waits */
    void *hurry_arg;
};

putgate *putgate_new(void)
{
    putgate *g = px_calloc(1, sizeof(*g));
    pthread_mutex_init(&g->mu, NULL);
    px_cond_init_mono(&g->cv);
    return g;
}

void putgate_free(putgate *g)
{
    if (g == NULL)
        return;
    for (size_t b = 0; b < PUTGATE_BUCKETS; b++)
        while (g->bucket[b] != NULL) {
            putgate_held *h = g->bucket[b];
            g->bucket[b] = h->next;
            free(h);
        }
    pthread_cond_destroy(&g->cv);
    pthread_mutex_destroy(&g->mu);
    free(g);
}

uint64_t putgate_pushed(putgate *g)
{
    pthread_mutex_lock(&g->mu);
    uint64_t run = ++g->pushed;
    pthread_mutex_unlock(&g->mu);
    return run;
}

void putgate_durable(putgate *g, uint64_t run)
{
    pthread_mutex_lock(&g->mu);
    if (run > g->durable) {
        g->durable = run;
        pthread_cond_broadcast(&g->cv);
    }
    pthread_mutex_unlock(&g->mu);
}

int putgate_wait(putgate *g, uint64_t run, int hurry, int64_t timeout_ms)
{
    struct timespec until;
    px_mono_deadline(&until, timeout_ms);
    int rc = PX_OK;
    pthread_mutex_lock(&g->mu);
    uint64_t want = run != 0 ? run : g->pushed;
    while (g->durable < want && rc == PX_OK) {
        /* Again after each round: a run pushed before the wait may have
         * been queued for the writer only after the round it hurried. */
        if (hurry && g->hurry != NULL)
            g->hurry(g->hurry_arg);
        if (pthread_cond_timedwait(&g->cv, &g->mu, &until) == ETIMEDOUT)
            rc = PX_AGAIN;
    }
    pthread_mutex_unlock(&g->mu);
    return rc;
}

void putgate_on_wait(putgate *g, void (*hurry)(void *), void *arg)
{
    pthread_mutex_lock(&g->mu);
    g->hurry = hurry;
    g->hurry_arg = arg;
    pthread_mutex_unlock(&g->mu);
}

static size_t putgate_bucket(const char *user, const char *id)
{
    return (size_t)(px_hash_pair(user, id) & (PUTGATE_BUCKETS - 1));
}

static int putgate_is(const putgate_held *h, const char *user, const char *id)
{
    return strcmp(h->ev->id, id) == 0 && strcmp(h->ev->user, user) == 0;
}

void putgate_hold(putgate *g, uint64_t run, const store_event *ev, size_t n)
{
    pthread_mutex_lock(&g->mu);
    for (size_t i = 0; i < n; i++) {
        putgate_held *h = px_malloc(sizeof(*h));
        size_t b = putgate_bucket(ev[i].user, ev[i].id);
        *h = (putgate_held){ .next = g->bucket[b], .ev = &ev[i], .run = run,
                             .state = PUTGATE_PENDING };
        g->bucket[b] = h;
    }
    pthread_mutex_unlock(&g->mu);
}

void putgate_release(putgate *g, const store_event *ev, size_t n)
{
    pthread_mutex_lock(&g->mu);
    for (size_t i = 0; i < n; i++)
        for (putgate_held **p = &g->bucket[putgate_bucket(ev[i].user, ev[i].id)]; *p != NULL;
             p = &(*p)->next)
            if ((*p)->ev == &ev[i]) {
                putgate_held *h = *p;
                *p = h->next;
                free(h);
                break;
            }
    pthread_mutex_unlock(&g->mu);
}

/* Every entry of the event (a resend pushed again names it twice): what
 * from.. becomes to, and whether one of them was settled. */
static int putgate_move(putgate *g, const char *user, const char *id, enum putgate_state from,
                        enum putgate_state to)
{
    int settled = 0;
    for (putgate_held *h = g->bucket[putgate_bucket(user, id)]; h != NULL; h = h->next)
        if (putgate_is(h, user, id)) {
            settled |= h->state == PUTGATE_SETTLED;
            if (h->state == from)
                h->state = to;
        }
    return settled;
}

void putgate_take(putgate *g, const store_event *ev, size_t n, int *settled)
{
    pthread_mutex_lock(&g->mu);
    for (size_t i = 0; i < n; i++)
        settled[i] = putgate_move(g, ev[i].user, ev[i].id, PUTGATE_PENDING, PUTGATE_STORING);
    pthread_mutex_unlock(&g->mu);
}

void putgate_stored(putgate *g, const store_event *ev, size_t n)
{
    pthread_mutex_lock(&g->mu);
    for (size_t i = 0; i < n; i++)
        putgate_move(g, ev[i].user, ev[i].id, PUTGATE_STORING, PUTGATE_STORED);
    pthread_mutex_unlock(&g->mu);
}

enum putgate_state putgate_find(putgate *g, const char *user, const char *id, uint64_t *run,
                                void (*cb)(void *, const store_event *), void *arg)
{
    enum putgate_state st = PUTGATE_NONE;
    pthread_mutex_lock(&g->mu);
    for (putgate_held *h = g->bucket[putgate_bucket(user, id)]; h != NULL; h = h->next)
        if (putgate_is(h, user, id)) {
            st = h->state;
            *run = h->run;
            if (st == PUTGATE_PENDING && cb != NULL)
                cb(arg, h->ev);
            break;
        }
    pthread_mutex_unlock(&g->mu);
    return st;
}

int putgate_settle(putgate *g, const char *user, const char *id)
{
    pthread_mutex_lock(&g->mu);
    int pending = 0;
    for (putgate_held *h = g->bucket[putgate_bucket(user, id)]; h != NULL; h = h->next)
        if (putgate_is(h, user, id) && h->state == PUTGATE_PENDING)
            pending = 1;
    if (pending)
        putgate_move(g, user, id, PUTGATE_PENDING, PUTGATE_SETTLED);
    pthread_mutex_unlock(&g->mu);
    return pending;
}
