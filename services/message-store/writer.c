/* Owns the write-behind pipeline: batches of InboxRecords whose pushes
 * have left wait here for their store stage, which a writer thread of its
 * own runs, so consuming and pushing the next batch never waits for the
 * store. On FerretDB a seen claim and an inbox put cost tens of
 * milliseconds each under load; on the one consume thread they sat between
 * every consumed batch and the next one's push, and queued records waited
 * for them (p50 27 ms, p99 259 ms at 1,000/s on a quiet box).
 *
 * A batch goes through three steps, in consume order:
 *   pushed   (consume thread, writer_add: inbox_push, then queued);
 *   stored   (writer thread: one claim and one put for every batch queued
 *             since its last round, retried with backoff until durable);
 *   committed (consume thread, writer_reap: once stored, once its push
 *             records (pushrec.c, push notifications) are produced, and
 *             once the bus has reported every push and push record of it,
 *             in order, so the consumer offset never passes a record whose
 *             effects could still be lost: a crash anywhere is a
 *             redelivery).
 * The writer only calls the store (thread-safe); the route cache, the
 * recent-push memory, the bus and the batch's delivery-report count stay
 * on the consume thread. Batches that carry anything else (sync requests,
 * dead letters) wait until the pipeline is empty and then run the whole
 * batch path (batch.c), so a sync's scan sees every event consumed before
 * it. The pipeline holds at most PARLEY_MSGSTORE_PIPELINE records and
 * WRITER_MAX_BYTES of their keys and values: a store that falls behind (or
 * fails) stops consumption there, as before.
 *
 * With PARLEY_MSGSTORE_HOLD_MS the writer lets the oldest batch wait that
 * long before its round (the events are pushed already; only the store
 * and the commit wait), so an online recipient's ack usually comes first
 * and settles its event (putgate.c): it is then never written. The hold
 * ends early when anything waits for the store: an ack at the gate, a sync
 * or device command (writer_drain), a pipeline half full, a stop. So the
 * pipeline must hold a hold's worth: in parleyd at 20,000 messages/s
 * (40,000 events with their receipts), 8,192 records cut a 300 ms hold to
 * ~100 ms, half the events were stored before their acks came, and the
 * acks' deletes then pushed parleyd over the edge; parleyd's default is
 * 65,536 (docs/benchmarks.md). A round takes at most a store call's
 * worth. */
#include "common.h"
#include "log.h"
#include "msgstore.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define WRITER_MAX_BYTES (64 << 20)
/* A round takes batches up to one store call's worth. */
_Static_assert(MSGSTORE_BATCH <= STORE_MAX_BATCH, "a batch must fit one store call");
#define WRITER_WAIT_SLICE_MS 5
#define WRITER_STOP_STORE_MS 5000

typedef struct writer_batch {
    struct writer_batch *next;
    bus_msg *msgs;          /* a copy: the consume loop reuses its array */
    msgstore_rec *recs;     /* recs[i].m points into msgs */
    size_t n, bytes;        /* records, their keys' and values' bytes */
    inbox_run *run;         /* NULL once its push stage has ended */
    batch_tag tag;          /* its pushes: tag.pending counts their reports */
    batch_tag ptag;         /* its push records: produced once stored */
    int precs;              /* its push records are produced (none failed yet) */
    int stored;             /* under mu */
    int64_t added_ms;       /* monotonic: when it was queued */
} writer_batch;

struct writer {
    msgstore *ms;
    pthread_t th;
    pthread_mutex_t mu;
    pthread_cond_t work_cv;  /* the writer waits for batches (and backs off) */
    pthread_cond_t done_cv;  /* the consume thread waits for stored batches */
    writer_batch *head, *tail;
    writer_batch *next;      /* the first batch not stored yet, or NULL */
    size_t records, bytes;   /* in the pipeline */
    size_t max_records;      /* cfg.msgstore_pipeline */
    int64_t hold_ms;         /* cfg.msgstore_hold_ms */
    int hurry;               /* something waits for the store: no hold */
    int stop;
};

/* mu held. */
static void writer_wait(pthread_cond_t *cv, pthread_mutex_t *mu, int64_t ms)
{
    struct timespec until;
    px_mono_deadline(&until, ms);
    pthread_cond_timedwait(cv, mu, &until);
}

/* Stores first..last (every batch queued since the last round) with one
 * claim and one put, retrying until durable or told to stop. */
static int writer_store(writer *w, writer_batch *first, writer_batch *last)
{
    msgstore *ms = w->ms;
    size_t nr = 0;
    for (writer_batch *b = first;; b = b->next) {
        nr++;
        if (b == last)
            break;
    }
    inbox_run **runs = px_malloc(nr * sizeof(*runs));
    nr = 0;
    for (writer_batch *b = first;; b = b->next) {
        runs[nr++] = b->run;
        if (b == last)
            break;
    }
    int64_t backoff = SERVICE_BACKOFF_MIN_MS;
    int rc;
    char err[PX_ERRLEN] = "";
    while ((rc = inbox_store(ms, runs, nr, err, sizeof(err))) != PX_OK) {
        metric_add(ms->m.retries, 1);
        log_warn("store step failed; retrying", "{s:s, s:i, s:I, s:I}", "error", err,
                 "partition", (int)first->msgs[0].partition, "offset",
                 (json_int_t)first->msgs[0].offset, "backoff_ms", (json_int_t)backoff);
        /* The whole backoff: new batches and hurrying acks signal work_cv,
         * and under load they would turn the backoff into a spin. */
        int64_t until = px_mono_ms() + backoff;
        pthread_mutex_lock(&w->mu);
        while (!w->stop && px_mono_ms() < until)
            writer_wait(&w->work_cv, &w->mu, until - px_mono_ms());
        int stop = w->stop;
        pthread_mutex_unlock(&w->mu);
        if (stop)
            break;
        backoff = PX_MIN(backoff * 2, SERVICE_BACKOFF_MAX_MS);
        err[0] = '\0';
    }
    free(runs);
    return rc;
}

/* mu held: how long the next round may still wait (0: go now). */
static int64_t writer_hold_left(const writer *w)
{
    if (w->hold_ms == 0 || w->hurry || w->records >= w->max_records / 2 ||
        w->bytes >= WRITER_MAX_BYTES / 2)
        return 0;
    return PX_MAX(0, w->next->added_ms + w->hold_ms - px_mono_ms());
}

/* putgate's hook (under the gate's lock; the writer never takes the gate's
 * lock under mu), and the consume thread's own calls. */
static void writer_hurry(void *arg)
{
    writer *w = arg;
    pthread_mutex_lock(&w->mu);
    w->hurry = 1;
    pthread_cond_signal(&w->work_cv);
    pthread_mutex_unlock(&w->mu);
}

static void *writer_main(void *arg)
{
    writer *w = arg;
    px_thread_name("ms-writer");
    pthread_mutex_lock(&w->mu);
    while (!w->stop) {
        if (w->next == NULL) {
            pthread_cond_wait(&w->work_cv, &w->mu);
            continue;
        }
        int64_t left = writer_hold_left(w);
        if (left > 0) {
            writer_wait(&w->work_cv, &w->mu, left);
            continue;
        }
        w->hurry = 0;
        /* Batches before last are linked for good; only last->next moves. */
        writer_batch *first = w->next, *last = first;
        for (size_t n = first->n; last != w->tail && n + last->next->n <= STORE_MAX_BATCH;
             last = last->next)
            n += last->next->n;
        pthread_mutex_unlock(&w->mu);
        int rc = writer_store(w, first, last);
        pthread_mutex_lock(&w->mu);
        if (rc != PX_OK)
            break; /* stopping: the rest is consumed again */
        for (writer_batch *b = first;; b = b->next) {
            b->stored = 1;
            if (b == last)
                break;
        }
        w->next = last->next;
        pthread_cond_broadcast(&w->done_cv);
    }
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

int writer_start(msgstore *ms, char *err, size_t errlen)
{
    writer *w = px_calloc(1, sizeof(*w));
    w->ms = ms;
    pthread_mutex_init(&w->mu, NULL);
    px_cond_init_mono(&w->work_cv);
    px_cond_init_mono(&w->done_cv);
    w->hold_ms = ms->svc.cfg.msgstore_hold_ms;
    w->max_records = (size_t)ms->svc.cfg.msgstore_pipeline;
    int e = pthread_create(&w->th, NULL, writer_main, w);
    if (e != 0) {
        pthread_cond_destroy(&w->work_cv);
        pthread_cond_destroy(&w->done_cv);
        pthread_mutex_destroy(&w->mu);
        free(w);
        return px_err(err, errlen, "store writer thread: %s", strerror(e));
    }
    ms->writer = w;
    putgate_on_wait(ms->gate, writer_hurry, w);
    return PX_OK;
}

/* Ends the push stage (its registry refresh may push more, counted on the
 * batch's tag). Consume thread. */
static void writer_push_end(msgstore *ms, writer_batch *b)
{
    if (b->run == NULL)
        return;
    ms->live_tag = &b->tag;
    inbox_push_end(b->run);
    ms->live_tag = NULL;
    b->run = NULL;
}

static void writer_batch_free(msgstore *ms, writer_batch *b)
{
    writer_push_end(ms, b);
    batch_release(ms, b->msgs, b->recs, b->n);
    free(b->msgs);
    free(b);
}

/* 1 once the batch's push records are produced and reported, none
 * failed. Produces them on the first call, and again after a failure (the
 * push service coalesces the repeats). Call with no report pending. */
static int writer_push_records(msgstore *ms, writer_batch *b)
{
    if (!b->precs || b->ptag.failed > 0) {
        char err[PX_ERRLEN] = "";
        b->ptag.failed = 0;
        b->precs = pushrec_emit(ms, b->recs, b->n, &b->ptag, err, sizeof(err)) == PX_OK;
        if (!b->precs)
            log_warn("push records not produced; retrying", "{s:s}", "error", err);
    }
    return b->precs && b->ptag.pending == 0;
}

void writer_reap(msgstore *ms)
{
    writer *w = ms->writer;
    if (w == NULL)
        return;
    for (;;) {
        pthread_mutex_lock(&w->mu);
        writer_batch *b = w->head;
        int stored = b != NULL && b->stored;
        pthread_mutex_unlock(&w->mu);
        /* A stored batch whose registry lookups are still under way waits
         * for them here, not on this thread: joining them stopped
         * consumption for as long as a wave of new users' lookups took
         * (200 of them at a run's start, ~50 ms each on a loaded
         * FerretDB, four at a time: the first ~350 ms of every 1:1 run on
         * the stack were late). Its commit, and those behind it, wait. */
        if (!stored || !inbox_push_ready(b->run))
            return;
        writer_push_end(ms, b);
        /* Reports are served on this thread (bus_poll), so pending is ours. */
        if (b->tag.pending > 0 || b->ptag.pending > 0 || !writer_push_records(ms, b))
            return;
        bus_commit(ms->svc.b, b->msgs, b->n);
        pthread_mutex_lock(&w->mu);
        w->head = b->next;
        if (w->head == NULL)
            w->tail = NULL;
        w->records -= b->n;
        w->bytes -= b->bytes;
        pthread_mutex_unlock(&w->mu);
        writer_batch_free(ms, b);
    }
}

/* Waits (serving delivery reports) until the pipeline holds at most
 * max_records records and max_bytes; 0 if ms is told to stop first. */
static int writer_wait_below(msgstore *ms, size_t max_records, size_t max_bytes)
{
    writer *w = ms->writer;
    for (;;) {
        writer_reap(ms);
        pthread_mutex_lock(&w->mu);
        int below = w->records <= max_records && w->bytes <= max_bytes;
        if (!below) {
            w->hurry = 1;
            pthread_cond_signal(&w->work_cv);
        }
        if (!below && !ms->svc.stop)
            writer_wait(&w->done_cv, &w->mu, WRITER_WAIT_SLICE_MS);
        pthread_mutex_unlock(&w->mu);
        if (below)
            return 1;
        if (ms->svc.stop)
            return 0;
        bus_poll(ms->svc.b, 0);
    }
}

int writer_drain(msgstore *ms)
{
    return ms->writer == NULL || writer_wait_below(ms, 0, 0);
}

void writer_add(msgstore *ms, const bus_msg *msgs, msgstore_rec *recs, size_t n)
{
    writer *w = ms->writer;
    size_t bytes = 0;
    for (size_t i = 0; i < n; i++)
        bytes += msgs[i].key_len + msgs[i].len;
    /* On stop: queued all the same. A batch past a ceiling waits for an
     * empty pipeline. */
    writer_wait_below(ms, w->max_records - PX_MIN(n, w->max_records),
                      WRITER_MAX_BYTES - PX_MIN(bytes, WRITER_MAX_BYTES));
    writer_batch *b = px_calloc(1, sizeof(*b));
    b->msgs = px_malloc(n * sizeof(*b->msgs));
    memcpy(b->msgs, msgs, n * sizeof(*b->msgs));
    for (size_t i = 0; i < n; i++)
        recs[i].m = &b->msgs[i];
    b->recs = recs; /* ours now */
    b->n = n;
    b->bytes = bytes;
    b->added_ms = px_mono_ms();
    b->tag = (batch_tag){ .ms = ms, .idx = BATCH_BEST_EFFORT };
    b->ptag = (batch_tag){ .ms = ms, .idx = BATCH_BEST_EFFORT };
    b->precs = ms->svc.cfg.push_url == NULL; /* nothing to produce */
    ms->live_tag = &b->tag;
    b->run = inbox_push(ms, recs, n);
    ms->live_tag = NULL;
    pthread_mutex_lock(&w->mu);
    if (w->tail != NULL)
        w->tail->next = b;
    else
        w->head = b;
    w->tail = b;
    if (w->next == NULL)
        w->next = b;
    w->records += n;
    w->bytes += bytes;
    pthread_cond_signal(&w->work_cv);
    pthread_mutex_unlock(&w->mu);
}

void writer_stop(msgstore *ms)
{
    writer *w = ms->writer;
    if (w == NULL)
        return;
    pthread_mutex_lock(&w->mu);
    /* A clean stop stores what the hold kept back, so the next owner of
     * the partitions does not push it again. */
    w->hurry = 1;
    pthread_cond_signal(&w->work_cv);
    int64_t until = px_mono_ms() + WRITER_STOP_STORE_MS;
    while (w->next != NULL && w->hold_ms > 0 && px_mono_ms() < until)
        writer_wait(&w->done_cv, &w->mu, WRITER_WAIT_SLICE_MS);
    w->stop = 1;
    pthread_cond_broadcast(&w->work_cv);
    pthread_mutex_unlock(&w->mu);
    pthread_join(w->th, NULL);
    /* What was stored commits once its pushes are reported; the rest is
     * consumed again by whoever owns the partitions next. */
    bus_flush(ms->svc.b, 5000);
    writer_reap(ms);
    size_t left = 0;
    for (writer_batch *b = w->head; b != NULL; b = b->next) {
        left += b->n;
        writer_push_end(ms, b);
        batch_release(ms, b->msgs, b->recs, b->n);
        b->n = 0;
    }
    if (left > 0)
        log_warn("stopping with records not yet stored; they will be consumed again", "{s:I}",
                 "records", (json_int_t)left);
}

/* After the bus is destroyed: a push not reported by then (a flush that
 * timed out) could still have named its batch's tag until that point. */
void writer_free(msgstore *ms)
{
    writer *w = ms->writer;
    if (w == NULL)
        return;
    while (w->head != NULL) {
        writer_batch *b = w->head;
        w->head = b->next;
        free(b->msgs);
        free(b);
    }
    pthread_cond_destroy(&w->work_cv);
    pthread_cond_destroy(&w->done_cv);
    pthread_mutex_destroy(&w->mu);
    free(w);
    ms->writer = NULL;
}
