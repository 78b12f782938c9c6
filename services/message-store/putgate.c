/* Owns the write-behind gate between the inbox consumer and the acker.
 * The inbox consumer pushes a run of records to their gateways before it
 * stores them (inbox.c), so a client can ack an event whose inbox put is
 * still under way; the acker, on a thread and consumer group of its own,
 * would then find nothing to delete and make no receipt fact, and the put
 * landing after it would bring the event back at the next sync. The gate
 * counts runs: `pushed` when a run goes out, `durable` when its store
 * effects are. An ack was consumed after its event was pushed, so once
 * `durable` reaches the `pushed` seen when the ack run starts, every event
 * it can name is in the store. Runs are stored in order on one thread, so
 * one pair of counters says it all. Both msgstores of a process share one
 * gate. It only covers puts of this process: with several message-store
 * processes an ack may be consumed by another process's acker (the two
 * groups assign partitions on their own), or during a takeover before the
 * new owner has stored the dead one's uncommitted records again. Such an
 * ack finds nothing here; ack.c then keeps it in the acker's wait list
 * (ackwait.c) and tries again with backoff for up to 30 s, which makes its
 * fact and deletes the event once the other process has stored it. */
#include "common.h"
#include "msgstore.h"

#include <errno.h>
#include <stdlib.h>
#include <time.h>

struct putgate {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    uint64_t pushed, durable;
};

putgate *putgate_new(void)
{
    putgate *g = px_calloc(1, sizeof(*g));
    pthread_mutex_init(&g->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&g->cv, &ca);
    pthread_condattr_destroy(&ca);
    return g;
}

void putgate_free(putgate *g)
{
    if (g == NULL)
        return;
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

int putgate_wait(putgate *g, int64_t timeout_ms)
{
    struct timespec until;
    px_mono_deadline(&until, timeout_ms);
    int rc = PX_OK;
    pthread_mutex_lock(&g->mu);
    uint64_t want = g->pushed;
    while (g->durable < want && rc == PX_OK)
        if (pthread_cond_timedwait(&g->cv, &g->mu, &until) == ETIMEDOUT)
            rc = PX_AGAIN;
    pthread_mutex_unlock(&g->mu);
    return rc;
}
