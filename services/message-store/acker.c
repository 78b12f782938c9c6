/* Owns the ack consumer: parley.acks on a thread of its own, so a slow run
 * of acks never holds up storing and pushing new messages, reading the
 * partitions the inbox consumer holds (bus_conf.follow; its group,
 * parley-message-store-acks, keeps only the offsets). On FerretDB every
 * acking user costs a find and a delete that each scan the inbox
 * (milliseconds apiece); behind the one consume loop they delayed every
 * delivery queued after them (a 256-member group's acks held its fan-out
 * for seconds). An ack names an event its client received, which was
 * pushed before it was stored: ack.c settles it from the write-behind gate
 * (putgate.c) while it is held (or, when another device still needs it,
 * waits there for its store round); an ack of an event already stored, or
 * still being stored here or by another process, waits in ackwait.c and
 * is applied by the acker's late thread (ack_retry_due), or handed over
 * on parley.acks when the acker stops. The late thread keeps the store's
 * way of acking (a delete per user, seconds a chunk on FerretDB) off the
 * acker's, whose fresh acks then still find their events held and settle
 * them from memory (ackwait.c says what it cost before). The acker and
 * its late thread are each a msgstore that shares the store, the gate, the
 * configuration and the metrics and has its own bus (the late one only
 * produces), stop flag and batch bookkeeping, so batch.c and ack.c run
 * unchanged on them. */
#include "common.h"
#include "log.h"
#include "msgstore.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define ACKER_GROUP_SUFFIX "-acks"
#define ACKER_HANDOVER_MS 5000 /* a clean stop's wait until Kafka holds the hand-over */
#define ACKER_LATE_IDLE_MS 100 /* the late thread's longest sleep with nothing due */

/* A clean stop (SIGTERM: a rolling upgrade) hands the acks waiting for
 * their events (ackwait.c) over: they go back onto parley.acks, one
 * AckRecord each, confirmed before the group is left, so whoever owns the
 * partition next applies them (or lets them wait there), and their
 * records' commits, held while they waited, may go. A crash leaves the
 * commits held instead: the records themselves are consumed again. */
static void acker_handover(msgstore *a)
{
    size_t n, failed = 0;
    ackwait_entry *e = ackwait_take(a->waits, INT64_MAX, SIZE_MAX, &n);
    for (size_t i = 0; i < n; i++) {
        Parley__AckRecord r = PARLEY__ACK_RECORD__INIT;
        r.version = MSGSTORE_RECORD_VERSION;
        r.user = e[i].user;
        r.n_ids = 1;
        r.ids = &e[i].id; /* read only: packed, not changed */
        r.read = e[i].read != 0;
        r.ts_ms = e[i].ts_ms;
        r.device = e[i].dev;
        size_t len = parley__ack_record__get_packed_size(&r);
        uint8_t *buf = px_malloc(len);
        parley__ack_record__pack(&r, buf);
        char err[PX_ERRLEN];
        failed += batch_produce(a, a->topic_acks, r.user, strlen(r.user), buf, len,
                                batch_tag_best_effort(a), err, sizeof(err)) != PX_OK;
        free(buf);
    }
    if (n > 0 && bus_flush(a->svc.b, ACKER_HANDOVER_MS) != PX_OK)
        failed = n;
    if (n > 0)
        log_info("acks still waiting for their events handed over on parley.acks",
                 "{s:I, s:I}", "acks", (json_int_t)n, "failed", (json_int_t)failed);
    /* Handed over: the records they came from may commit. Else their
     * commits stay held and the next owner consumes them again. */
    if (failed == 0) {
        ackwait_forget(a->waits);
        ackwait_recommit(a->waits, a->svc.b);
    }
    ackwait_taken_free(e, n);
}

/* Applies the waiting acks as they come due, until its stop flag. */
static void *acker_late_main(void *arg)
{
    msgstore *l = arg;
    px_thread_name("ms-late");
    while (!l->svc.stop) {
        ackwait_wait_due(l->waits, ACKER_LATE_IDLE_MS);
        if (!l->svc.stop)
            ack_retry_due(l);
        bus_poll(l->svc.b, 0);
    }
    return NULL;
}

/* Stops the late thread (after its chunk in hand) and frees its msgstore. */
static void acker_late_stop(msgstore *a)
{
    msgstore *l = a->late;
    if (l == NULL)
        return;
    l->svc.stop = 1;
    ackwait_wake(a->waits);
    pthread_join(a->late_th, NULL);
    bus_destroy(l->svc.b);
    free(l->pack);
    free(l);
    a->late = NULL;
}

/* Runs until acker_stop; a stop signal ends the main loop, whose drain
 * calls acker_stop, so the ack consumer stops right after it. */
static void *acker_main(void *arg)
{
    msgstore *a = arg;
    bus_msg *msgs = px_calloc(MSGSTORE_ACK_BATCH, sizeof(*msgs));
    px_thread_name("ms-acker");
    char err[PX_ERRLEN];
    metric *age = bus_age_histogram("message-store-acks");
    while (!a->svc.stop) {
        int n = bus_consume(a->svc.b, msgs, MSGSTORE_ACK_BATCH, MSGSTORE_CONSUME_WAIT_MS, err,
                            sizeof(err));
        if (n < 0) {
            /* A fatal error of this bus (its producer's, most likely: the
             * main loop's bus is another) ends the process: main_tick. */
            log_error("ack consumer failed", "{s:s}", "error", err);
            a->svc.failed = 1;
            break;
        }
        bus_observe_age(age, msgs, (size_t)n);
        if (n > 0)
            batch_process(a, msgs, (size_t)n);
        ackwait_recommit(a->waits, a->svc.b); /* what the late thread settled */
        bus_poll(a->svc.b, 0);
    }
    acker_late_stop(a);
    acker_handover(a);
    free(msgs);
    return NULL;
}

/* A msgstore for one of the acker's threads: ms's store, caches,
 * configuration, metrics and topics, the acker's waits, a bus of its own
 * (bc: its dr_cb is set here). NULL with err set when the bus fails. */
static msgstore *acker_ctx_new(const msgstore *ms, ackwait *waits, bus_conf *bc, char *err,
                               size_t errlen)
{
    msgstore *a = px_calloc(1, sizeof(*a));
    a->svc.cfg = ms->svc.cfg;
    a->svc.st = ms->svc.st;
    a->gate = ms->gate;
    a->devcache = ms->devcache;
    a->stored = ms->stored;
    a->m = ms->m;
    a->waits = waits;
    a->topic_inbox = ms->topic_inbox;
    a->topic_acks = ms->topic_acks;
    a->topic_receipts = ms->topic_receipts;
    a->topic_dead = ms->topic_dead;
    batch_init(a);
    bc->dr_cb = batch_on_delivery;
    a->svc.b = bus_new(bc, err, errlen);
    if (a->svc.b == NULL) {
        free(a);
        return NULL;
    }
    return a;
}

/* The late thread, on a producer of its own: its facts' flushes and
 * delivery reports are its own, never the acker's. */
static int acker_late_start(msgstore *a, char *err, size_t errlen)
{
    char host[64] = "local", client[128];
    gethostname(host, sizeof(host) - 1);
    snprintf(client, sizeof(client), "message-store-late-%s", host);
    bus_conf bc = { .brokers = a->svc.cfg.kafka_brokers, .client_id = client,
                    .partitions = (int)a->svc.cfg.partitions };
    msgstore *l = acker_ctx_new(a, a->waits, &bc, err, errlen);
    if (l == NULL)
        return PX_ERROR;
    int e = pthread_create(&a->late_th, NULL, acker_late_main, l);
    if (e != 0) {
        bus_destroy(l->svc.b);
        free(l);
        return px_err(err, errlen, "late ack thread: %s", strerror(e));
    }
    a->late = l;
    return PX_OK;
}

int acker_start(msgstore *ms, char *err, size_t errlen)
{
    char host[64] = "local", client[128], group[160];
    const config *cfg = &ms->svc.cfg;
    gethostname(host, sizeof(host) - 1);
    snprintf(group, sizeof(group), "%s%s%s", cfg->topic_prefix, MSGSTORE_GROUP,
             ACKER_GROUP_SUFFIX);
    snprintf(client, sizeof(client), "message-store-acks-%s", host);
    /* Following the inbox consumer: the acks of a user are read beside its
     * inbox, where the events they name were pushed and are held (putgate)
     * or remembered (stored.c), whatever the number of replicas. */
    bus_conf bc = { .brokers = cfg->kafka_brokers, .client_id = client, .group = group,
                    .partitions = (int)cfg->partitions, .follow = ms->svc.b };
    ackwait *waits = ackwait_new(&ms->m, ms->topic_acks);
    msgstore *a = acker_ctx_new(ms, waits, &bc, err, errlen);
    const char *mine[] = { ms->topic_acks };
    int rc = a != NULL ? bus_subscribe(a->svc.b, mine, 1, err, errlen) : PX_ERROR;
    if (rc == PX_OK)
        rc = acker_late_start(a, err, errlen);
    int e = rc == PX_OK ? pthread_create(&ms->acker_th, NULL, acker_main, a) : 0;
    if (rc != PX_OK || e != 0) {
        if (e != 0)
            px_err(err, errlen, "ack consumer thread: %s", strerror(e));
        if (a != NULL) {
            acker_late_stop(a);
            bus_destroy(a->svc.b);
            free(a);
        }
        ackwait_free(waits);
        return PX_ERROR;
    }
    ms->acker = a;
    return PX_OK;
}

int acker_failed(const msgstore *ms)
{
    return ms->acker != NULL && ms->acker->svc.failed;
}

void acker_stop(msgstore *ms)
{
    msgstore *a = ms->acker;
    if (a == NULL)
        return;
    a->svc.stop = 1;
    bus_wakeup(a->svc.b);
    pthread_join(ms->acker_th, NULL);
    bus_destroy(a->svc.b); /* commits what was marked, leaves the group */
    free(a->pack);
    ackwait_free(a->waits); /* handed over, or their records' commits held */
    free(a);
    ms->acker = NULL;
}
