/* group-fanout: groups of up to 256 members. Consumes parley.groups (keyed
 * by group id) in the consumer group <prefix>group-fanout, keeps each
 * group's name, members and admins in the store, checks membership, writes
 * one InboxRecord per member onto parley.inbox (a group message's copies
 * and every member's group_events) and answers the requesting connection
 * with a Delivery onto parley.gw.<gateway>. This file owns what is
 * group-fanout's own in its life (service.c runs it): its topics and
 * metrics; batch.c and apply.c handle the records. */
#include "common.h"
#include "fanout.h"
#include "service.h"

static void main_metrics(fanout *f)
{
    static const double b[] = { 0.25, 0.5, 1, 2, 5, 10, 25, 50, 100, 250, 1000, 5000 };
    static const double sizes[] = { 1, 2, 5, 10, 25, 50, 100, 150, 200, 256 };
    fanout_metrics *m = &f->m;
    m->commands = metrics_counter("parley_fanout_commands_total",
                                  "Group commands applied (create, add, join, remove, leave, info)");
    m->sends = metrics_counter("parley_fanout_sends_total", "Group messages fanned out");
    m->refused = metrics_counter("parley_fanout_refused_total",
                                 "Commands and sends answered with an error");
    m->events = metrics_counter("parley_fanout_group_events_total",
                                "group_event inbox records produced");
    m->inbox = metrics_counter("parley_fanout_message_copies_total",
                               "Message inbox records produced (one per member)");
    m->skipped = metrics_counter("parley_fanout_skipped_total",
                                 "Redelivered commands already applied");
    m->dead = metrics_counter("parley_fanout_dead_letters_total",
                              "Records sent to the dead-letter topic");
    m->retries = metrics_counter("parley_fanout_batch_retries_total",
                                 "Batch attempts that failed and were retried");
    m->produce_failures = metrics_counter("parley_fanout_produce_failures_total",
                                          "Produced records the bus did not acknowledge");
    m->fanout_size = metrics_histogram("parley_fanout_size", "Members a group message went to",
                                       sizes, PX_ARRAY_LEN(sizes));
    m->fanout_ms = metrics_histogram("parley_fanout_latency_ms",
                                     "From the gateway accepting a group message to all its "
                                     "copies in Kafka, ms", b, PX_ARRAY_LEN(b));
    m->lat_get = metrics_histogram("parley_fanout_store_ms{op=\"group_get\"}",
                                   "Store call latency, ms", b, PX_ARRAY_LEN(b));
    m->lat_put = metrics_histogram("parley_fanout_store_ms{op=\"group_put\"}",
                                   "Store call latency, ms", b, PX_ARRAY_LEN(b));
}

static void main_setup(void *arg)
{
    fanout *f = arg;
    f->topic_groups = service_topic(&f->svc, "groups", SERVICE_SUBSCRIBE);
    f->topic_inbox = service_topic(&f->svc, "inbox", SERVICE_ENSURE);
    f->topic_dead = service_topic(&f->svc, "dead", SERVICE_ENSURE);
    main_metrics(f);
}

static void main_process(void *arg, bus_msg *msgs, size_t n)
{
    batch_process(arg, msgs, n);
}

int main(void)
{
    static const service_def def = {
        .name = "group-fanout", .group = FANOUT_GROUP, .batch = FANOUT_BATCH,
        .consume_wait_ms = FANOUT_CONSUME_WAIT_MS, .dr_cb = batch_on_delivery,
        .setup = main_setup, .process = main_process,
    };
    static fanout f;
    return service_run(&f.svc, &def, &f);
}
