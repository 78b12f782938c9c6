/* group-fanout: groups of up to 256 members. Consumes parley.groups (keyed
 * by group id) in the consumer group <prefix>group-fanout, keeps each
 * group's name, members and admins in the store, checks membership, writes
 * one InboxRecord per member onto parley.inbox (a group message's copies
 * and every member's group_events) and answers the requesting connection
 * with a Delivery onto parley.gw.<gateway>. This file owns configuration,
 * the consume loop and the ordered shutdown; batch.c and apply.c handle the
 * records. */
#include "admin_http.h"
#include "common.h"
#include "config.h"
#include "lifecycle.h"
#include "log.h"
#include "fanout.h"

#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t main_stop;

/* Runs on the lifecycle thread: the consumer may be inside a blocking
 * poll, which the wake-up interrupts. The flag comes last: once it is set
 * the main thread may destroy the bus, so the wake-up must be done. */
static void main_on_stop(void *arg)
{
    fanout *f = arg;
    if (f->b != NULL)
        bus_wakeup(f->b);
    main_stop = 1;
}

int64_t fanout_clock_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

void fanout_observe(metric *m, int64_t t0_us)
{
    metric_observe(m, (double)(fanout_clock_us() - t0_us) / 1000.0);
}

static void main_metrics(fanout *f)
{
    static const double b[] = { 0.25, 0.5, 1, 2, 5, 10, 25, 50, 100, 250, 1000, 5000 };
    static const double sizes[] = { 1, 2, 5, 10, 25, 50, 100, 150, 200, 256 };
    fanout_metrics *m = &f->m;
    m->commands = metrics_counter("parley_fanout_commands_total",
                                  "Group commands applied (create, add, remove, leave, info)");
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

static int main_setup(fanout *f, char *err, size_t errlen)
{
    if (config_load(&f->cfg, err, errlen) != PX_OK)
        return PX_ERROR;
    if (admin_check_listen(admin_listen_config(), err, errlen) != PX_OK)
        return PX_ERROR;
    log_init("group-fanout", f->cfg.log_level);
    const char *p = f->cfg.topic_prefix;
    snprintf(f->topic_groups, sizeof(f->topic_groups), "%sgroups", p);
    snprintf(f->topic_inbox, sizeof(f->topic_inbox), "%sinbox", p);
    snprintf(f->topic_dead, sizeof(f->topic_dead), "%sdead", p);
    f->stop = &main_stop;
    main_metrics(f);
    return PX_OK;
}

/* /readyz, on the admin thread: st is thread-safe and outlives the admin
 * daemon (main_shutdown stops admin before closing the store). */
static int main_ready(void *arg, char *err, size_t errlen)
{
    fanout *f = arg;
    if (atomic_load(&f->draining))
        return px_err(err, errlen, "draining");
    return store_ping(f->st, err, errlen);
}

static int main_start(fanout *f, char *err, size_t errlen)
{
    char host[64] = "local", client[128], group[128];
    gethostname(host, sizeof(host) - 1);
    /* The group carries the topic prefix so stacks sharing a broker under
     * different prefixes never rebalance each other. */
    snprintf(group, sizeof(group), "%s%s", f->cfg.topic_prefix, FANOUT_GROUP);
    snprintf(client, sizeof(client), "group-fanout-%s", host);
    f->st = store_open(f->cfg.mongo_uri, f->cfg.mongo_db, err, errlen);
    if (f->st == NULL)
        return PX_ERROR;
    bus_conf bc = { .brokers = f->cfg.kafka_brokers, .client_id = client,
                    .group = group, .partitions = (int)f->cfg.partitions,
                    .dr_cb = batch_on_delivery };
    f->b = bus_new(&bc, err, errlen);
    if (f->b == NULL)
        return PX_ERROR;
    const char *all[] = { f->topic_groups, f->topic_inbox, f->topic_dead };
    if (bus_ensure_topics(f->b, all, PX_ARRAY_LEN(all), 15000, err, errlen) != PX_OK)
        return PX_ERROR;
    const char *mine[] = { f->topic_groups };
    if (bus_subscribe(f->b, mine, PX_ARRAY_LEN(mine), err, errlen) != PX_OK)
        return PX_ERROR;
    f->admin = admin_start(admin_listen_config(), main_ready, f, err, errlen);
    return f->admin != NULL ? PX_OK : PX_ERROR;
}

/* The URI may carry credentials: log it without its userinfo. */
static void main_redact(const char *uri, char *out, size_t outlen)
{
    const char *scheme = strstr(uri, "://");
    const char *at = scheme ? strchr(scheme + 3, '@') : NULL;
    const char *slash = scheme ? strchr(scheme + 3, '/') : NULL;
    if (at != NULL && (slash == NULL || at < slash))
        snprintf(out, outlen, "%.*s***%s", (int)(scheme + 3 - uri), uri, at);
    else
        snprintf(out, outlen, "%s", uri);
}

static void main_log_started(const fanout *f)
{
    char mongo[512];
    main_redact(f->cfg.mongo_uri, mongo, sizeof(mongo));
    log_info("started", "{s:s, s:s, s:s, s:s, s:s, s:s, s:I, s:I}", "group",
             FANOUT_GROUP, "kafka", f->cfg.kafka_brokers, "mongo", mongo, "mongo_db",
             f->cfg.mongo_db, "topic_prefix", f->cfg.topic_prefix, "admin",
             admin_listen_config(), "admin_port", (json_int_t)admin_port(f->admin),
             "partitions", (json_int_t)f->cfg.partitions);
}

/* Returns 0 on a signal, 1 when the consumer failed fatally. */
static int main_loop(fanout *f, bus_msg *msgs)
{
    char err[PX_ERRLEN];
    while (!main_stop) {
        int n = bus_consume(f->b, msgs, FANOUT_BATCH, FANOUT_CONSUME_WAIT_MS, err,
                            sizeof(err));
        if (n < 0) {
            log_error("consumer failed", "{s:s}", "error", err);
            return 1;
        }
        if (n > 0)
            batch_process(f, msgs, (size_t)n);
        bus_poll(f->b, 0);
    }
    return 0;
}

/* Reverse of start: bus_destroy commits what was marked and leaves the
 * group; admin stops before the store closes (its /readyz pings the store). */
static void main_shutdown(fanout *f)
{
    atomic_store(&f->draining, 1);
    if (f->b != NULL)
        bus_destroy(f->b);
    admin_stop(f->admin);
    if (f->st != NULL)
        store_close(f->st);
}

int main(void)
{
    static fanout f;
    static bus_msg msgs[FANOUT_BATCH];
    char err[PX_ERRLEN] = "";
    if (lifecycle_init(main_on_stop, &f) != PX_OK)
        return 1;
    if (main_setup(&f, err, sizeof(err)) != PX_OK) {
        log_init("group-fanout", "info");
        log_error("bad configuration", "{s:s}", "error", err);
        return 2;
    }
    int rc = 0;
    if (main_start(&f, err, sizeof(err)) != PX_OK) {
        log_error("start failed", "{s:s}", "error", err);
        rc = 1;
        goto out;
    }
    main_log_started(&f);
    rc = main_loop(&f, msgs);
    log_info("stopping", "{s:s}", "reason", rc == 0 ? "signal" : "consumer error");
out:
    main_shutdown(&f);
    log_info("stopped", "{s:i}", "exit", rc);
    return rc;
}
