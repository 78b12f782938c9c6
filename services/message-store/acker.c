/* Owns the ack consumer: parley.acks on a consumer group and a thread of
 * their own, so a slow run of acks never holds up storing and pushing new
 * messages. On FerretDB every acking user costs a find and a delete that
 * each scan the inbox (milliseconds apiece); behind the one consume loop
 * they delayed every delivery queued after them (a 256-member group's
 * acks held its fan-out for seconds). An ack names an event its client
 * received, which was pushed before it was stored: ack.c waits on the
 * write-behind gate (putgate.c) until what was pushed is in the store. The
 * acker is a second msgstore that shares the store, the gate, the
 * configuration and the metrics and has its own bus, stop flag and batch
 * bookkeeping, so batch.c and ack.c run unchanged on it. */
#include "common.h"
#include "log.h"
#include "msgstore.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define ACKER_GROUP_SUFFIX "-acks"

/* Runs until acker_stop; a stop signal ends the main loop, whose drain
 * calls acker_stop, so the ack consumer stops right after it. */
static void *acker_main(void *arg)
{
    msgstore *a = arg;
    bus_msg *msgs = px_calloc(MSGSTORE_BATCH, sizeof(*msgs));
    char err[PX_ERRLEN];
    while (!a->svc.stop) {
        int n = bus_consume(a->svc.b, msgs, MSGSTORE_BATCH, MSGSTORE_CONSUME_WAIT_MS, err,
                            sizeof(err));
        if (n < 0) {
            /* The main loop's consumer fails the same way and ends the
             * process; this one only says so. */
            log_error("ack consumer failed", "{s:s}", "error", err);
            break;
        }
        if (n > 0)
            batch_process(a, msgs, (size_t)n);
        ack_retry_due(a);
        bus_poll(a->svc.b, 0);
    }
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
    a->m = ms->m;
    a->waits = ackwait_new(&a->m);
    a->topic_inbox = ms->topic_inbox;
    a->topic_acks = ms->topic_acks;
    a->topic_receipts = ms->topic_receipts;
    a->topic_dead = ms->topic_dead;
    batch_init(a);
    bus_conf bc = { .brokers = cfg->kafka_brokers, .client_id = client, .group = group,
                    .partitions = (int)cfg->partitions, .dr_cb = batch_on_delivery };
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
    ackwait_free(a->waits); /* their records are committed: they come again at the next sync */
    free(a);
    ms->acker = NULL;
}
