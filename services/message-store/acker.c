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
 * is applied between batches (ack_retry_due), or handed over on
 * parley.acks when the acker stops. The acker is a second msgstore that
 * shares the store, the gate, the configuration and the metrics and has
 * its own bus, stop flag and batch bookkeeping, so batch.c and ack.c run
 * unchanged on it. */
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

/* A clean stop (SIGTERM: a rolling upgrade) hands the acks waiting for
 * their events (ackwait.c) over: they go back onto parley.acks, one
 * AckRecord each, confirmed before the group is left, so whoever owns the
 * partition next applies them (or lets them wait there), and their
 * records' commits, held while they waited, may go. A crash leaves the
 * commits held instead: the records themselves are consumed again. */
static void acker_handover(msgstore *a)
{
    size_t n, failed = 0;
    const ackwait_entry *const *e = ackwait_due(a->waits, INT64_MAX, SIZE_MAX, &n);
    for (size_t i = 0; i < n; i++) {
        Parley__AckRecord r = PARLEY__ACK_RECORD__INIT;
        r.version = MSGSTORE_RECORD_VERSION;
        r.user = e[i]->user;
        r.n_ids = 1;
        r.ids = (char **)&e[i]->id; /* read only: packed, not changed */
        r.read = e[i]->read != 0;
        r.ts_ms = e[i]->ts_ms;
        r.device = e[i]->dev;
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
        ack_retry_due(a);
        bus_poll(a->svc.b, 0);
    }
    acker_handover(a);
    free(msgs);
    return NULL;
}

int acker_start(msgstore *ms, char *err, size_t errlen)
{
    char host[64] = "local", client[128], group[160];
    const config *cfg = &ms->svc.cfg;
    gethostname(host, sizeof(host) - 1);
    snprintf(group, sizeof(group), "%s%s%s", cfg->topic_prefix, MSGSTORE_GROUP,
             ACKER_GROUP_SUFFIX);
    snprintf(client, sizeof(client), "message-store-acks-%s", host);
    msgstore *a = px_calloc(1, sizeof(*a));
    a->svc.cfg = *cfg;
    a->svc.st = ms->svc.st;
    a->gate = ms->gate;
    a->devcache = ms->devcache;
    a->stored = ms->stored;
    a->m = ms->m;
    a->waits = ackwait_new(&a->m, ms->topic_acks);
    a->topic_inbox = ms->topic_inbox;
    a->topic_acks = ms->topic_acks;
    a->topic_receipts = ms->topic_receipts;
    a->topic_dead = ms->topic_dead;
    batch_init(a);
    /* Following the inbox consumer: the acks of a user are read beside its
     * inbox, where the events they name were pushed and are held (putgate)
     * or remembered (stored.c), whatever the number of replicas. */
    bus_conf bc = { .brokers = cfg->kafka_brokers, .client_id = client, .group = group,
                    .partitions = (int)cfg->partitions, .dr_cb = batch_on_delivery,
                    .follow = ms->svc.b };
    a->svc.b = bus_new(&bc, err, errlen);
    const char *mine[] = { a->topic_acks };
    int rc = a->svc.b != NULL ? bus_subscribe(a->svc.b, mine, 1, err, errlen) : PX_ERROR;
    int e = rc == PX_OK ? pthread_create(&ms->acker_th, NULL, acker_main, a) : 0;
    if (rc != PX_OK || e != 0) {
        if (e != 0)
            px_err(err, errlen, "ack consumer thread: %s", strerror(e));
        if (a->svc.b != NULL)
            bus_destroy(a->svc.b);
        ackwait_free(a->waits);
        free(a);
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
