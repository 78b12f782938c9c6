/* The bus over Apache Kafka (librdkafka). Owns the producer handle (always)
 * and the consumer handle (when a group is configured), their settings, and
 * the translation of librdkafka errors into PX_* at this boundary.
 *
 * Durability contract: the producer is idempotent with acks=all, so a
 * delivery report of success means the record is on every in-sync replica,
 * once. The consumer never stores an offset by itself
 * (enable.auto.offset.store=false): bus_commit stores offset+1 only after
 * the caller's effects are durable, and the periodic auto-commit (and the
 * commit on close or revoke) only ever commits what was stored.
 *
 * Two producers when the caller names a bulk topic (bus_conf.bulk_topic):
 * librdkafka lingers per handle and sends one produce request per
 * partition, so the live path (a message, its Delivery) keeps a 1 ms
 * linger while the bulk topic (the gateway's acks, which no message waits
 * for) waits PARLEY_KAFKA_BULK_LINGER_MS on a handle of its own, long
 * enough for a partition's acks to share requests. Both are idempotent with acks=all; a topic
 * always goes through the same handle, so its order per partition holds.
 *
 * A producer that librdkafka failed for good (a fatal error: 2.0.2's
 * idempotent producer after a partition leader's kill -9, "sequence
 * desynchronization", in one chaos run in two) is made again in place
 * (bus_heal): its records still queued or in flight get failed reports,
 * which their callers handle as any failed produce (a client resends, a
 * batch is retried; consumers dedupe by id), instead of the whole process
 * exiting with every connection of a gateway.
 *
 * A follower (bus_conf.follow) is a consumer assigned by hand: when its
 * leader's group hands the leader partitions, the leader publishes their
 * numbers (under lead_mu) and the follower, at its next bus_consume,
 * commits what it stored and assigns itself its own topics' same numbers.
 * Two groups each joined by every process would assign independently
 * (range sorts members by their random ids), so a user's acks were read
 * in another process than its inbox half the time with two replicas. The
 * follower's group only keeps offsets (Kafka accepts commits of a group
 * without members). While a partition moves, the old and the new holder
 * may both read it for up to one consume wait; what both apply is
 * idempotent, and a commit that goes back only means a redelivery.
 *
 * Also owns the eventfd behind bus_consume_fd and its wake-up protocol
 * (bus_consume_drain / bus_consume_signal). */
#include "bus.h"
#include "common.h"
#include "config.h"
#include "log.h"

#include <errno.h>
#include <jansson.h>
#include <pthread.h>
#include <librdkafka/rdkafka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdatomic.h>
#include <strings.h>
#include <sys/eventfd.h>
#include <unistd.h>

/* Producers made again in one process's life (bus_heal); past it the bus
 * fails for good (bus_failed) and its process is restarted. */
#define BUS_MAX_HEALS 8

struct bus {
    /* The producers are swapped by bus_heal while other threads produce, so
     * they are atomic; a replaced handle is only retired (purged, never
     * destroyed before bus_destroy), so a producer that loaded it a moment
     * before the swap still calls a live handle, which refuses at once. No
     * lock on the produce path: a lock there either starves the swap or
     * deadlocks a report callback that produces. */
    rd_kafka_t *_Atomic rk;      /* producer */
    rd_kafka_t *_Atomic rk_bulk; /* producer of bulk_topic, or NULL */
    pthread_mutex_t heal_mu;     /* one bus_heal at a time; guards retired */
    rd_kafka_t *retired[BUS_MAX_HEALS];
    int nretired;
    char *bulk_topic;
    char bulk_linger[24];    /* rk_bulk's linger.ms */
    bus_conf conf;           /* to make a producer again; strings owned */
    rd_kafka_t *rkc;         /* consumer, or NULL */
    rd_kafka_queue_t *cq;    /* consumer queue */
    int efd;                 /* eventfd signalled when cq has events, or -1 */
    atomic_int assigned;     /* partitions of the last assignment (bus_assigned) */
    atomic_uint generation;  /* assignments and revokes so far (bus_generation) */
    int session_ms;          /* the consumer's session.timeout.ms */
    /* As a leader: the partition numbers its group gave it, once each. */
    pthread_mutex_t lead_mu;
    int32_t *lead;           /* under lead_mu */
    int nlead;
    unsigned lead_epoch;     /* under lead_mu: moves at every change */
    /* As a follower (conf.follow): its leader, its topics, and the leader's
     * epoch it holds (consume thread only). */
    bus *leader;
    char **ftopics;
    size_t nftopics;
    unsigned followed;
};

static int bus_set(rd_kafka_conf_t *conf, const char *k, const char *v, char *err, size_t errlen)
{
    char e[256];
    if (rd_kafka_conf_set(conf, k, v, e, sizeof(e)) != RD_KAFKA_CONF_OK)
        return px_err(err, errlen, "kafka setting %s=%s: %s", k, v, e);
    return PX_OK;
}

static int bus_set_all(rd_kafka_conf_t *conf, const char *const kv[][2], size_t n,
                       char *err, size_t errlen)
{
    for (size_t i = 0; i < n; i++)
        if (bus_set(conf, kv[i][0], kv[i][1], err, errlen) != PX_OK)
            return PX_ERROR;
    return PX_OK;
}

/* Operator overrides, applied after Parley's own settings: env names a
 * comma-separated list of librdkafka key=value pairs (e.g.
 * PARLEY_KAFKA_PRODUCER_CONFIG="linger.ms=5,compression.codec=lz4"), so a
 * deployment tunes the client without a rebuild. A bad pair fails start. */
static int bus_set_env(rd_kafka_conf_t *conf, const char *env, char *err, size_t errlen)
{
    const char *list = config_str(env, "");
    if (strlen(list) >= 1024)
        return px_err(err, errlen, "%s: longer than 1023 bytes", env);
    char buf[1024];
    snprintf(buf, sizeof(buf), "%s", list);
    char *save = NULL;
    for (char *kv = strtok_r(buf, ",", &save); kv != NULL; kv = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(kv, '=');
        if (eq == NULL || eq == kv)
            return px_err(err, errlen, "%s: \"%s\" is not key=value", env, kv);
        *eq = '\0';
        if (bus_set(conf, kv, eq + 1, err, errlen) != PX_OK)
            return PX_ERROR;
    }
    return PX_OK;
}

static void bus_on_dr(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
    bus *b = opaque;
    if (b->conf.dr_cb == NULL)
        return;
    /* rd_kafka_err2str, not rd_kafka_message_errstr: the latter returns the
     * payload when there is one (a consumer error's text), which for a
     * produced record is its value, not NUL-terminated: an e2e test with
     * Kafka stopped saw ASan catch the overflow in the gateway's log line. */
    b->conf.dr_cb(m->_private, m->err ? PX_ERROR : PX_OK,
                  m->err ? rd_kafka_err2str(m->err) : NULL, m->partition, m->offset);
}

static void bus_on_error(rd_kafka_t *rk, int code, const char *reason, void *opaque)
{
    char fatal[256];
    if (code == RD_KAFKA_RESP_ERR__FATAL &&
        rd_kafka_fatal_error(rk, fatal, sizeof(fatal)) != RD_KAFKA_RESP_ERR_NO_ERROR) {
        log_error("kafka fatal error", "{s:s}", "error", fatal);
        return;
    }
    /* Transient (broker down, all brokers down): librdkafka retries. */
    log_warn("kafka error", "{s:s, s:s}", "code", rd_kafka_err2name(code), "reason", reason);
}

/* Publishes the partition numbers of parts (NULL: none) to followers. */
static void bus_lead(bus *b, const rd_kafka_topic_partition_list_t *parts)
{
    pthread_mutex_lock(&b->lead_mu);
    b->nlead = 0;
    if (parts != NULL)
        b->lead = px_realloc(b->lead, (size_t)PX_MAX(1, parts->cnt) * sizeof(*b->lead));
    for (int i = 0; parts != NULL && i < parts->cnt; i++) {
        int seen = 0;
        for (int j = 0; j < b->nlead && !seen; j++)
            seen = b->lead[j] == parts->elems[i].partition;
        if (!seen)
            b->lead[b->nlead++] = parts->elems[i].partition;
    }
    b->lead_epoch++;
    pthread_mutex_unlock(&b->lead_mu);
}

/* A follower takes up what its leader holds now, if that changed: what it
 * stored is committed first, so the next holder of a partition it gives
 * up starts right after its last applied record. */
static void bus_follow(bus *b)
{
    bus *l = b->leader;
    pthread_mutex_lock(&l->lead_mu);
    if (l->lead_epoch == b->followed) {
        pthread_mutex_unlock(&l->lead_mu);
        return;
    }
    b->followed = l->lead_epoch;
    rd_kafka_topic_partition_list_t *parts =
        rd_kafka_topic_partition_list_new((int)b->nftopics * PX_MAX(1, l->nlead));
    for (size_t t = 0; t < b->nftopics; t++)
        for (int i = 0; i < l->nlead; i++)
            rd_kafka_topic_partition_list_add(parts, b->ftopics[t], l->lead[i]);
    pthread_mutex_unlock(&l->lead_mu);
    rd_kafka_resp_err_t e = rd_kafka_commit(b->rkc, NULL, 0);
    if (e != RD_KAFKA_RESP_ERR_NO_ERROR && e != RD_KAFKA_RESP_ERR__NO_OFFSET)
        log_warn("commit before following the leader failed", "{s:s}", "error",
                 rd_kafka_err2str(e));
    e = rd_kafka_assign(b->rkc, parts);
    atomic_store(&b->assigned, e == RD_KAFKA_RESP_ERR_NO_ERROR ? parts->cnt : 0);
    atomic_fetch_add(&b->generation, 1);
    log_info("partitions assigned as the leader's", "{s:i, s:s}", "count", parts->cnt, "result",
             rd_kafka_err2name(e));
    rd_kafka_topic_partition_list_destroy(parts);
}

/* On revoke, commit what was stored before the partitions move, so the new
 * owner starts right after our last durable effect, not at an older
 * auto-commit. */
static void bus_on_rebalance(rd_kafka_t *rk, rd_kafka_resp_err_t err,
                             rd_kafka_topic_partition_list_t *parts, void *opaque)
{
    rd_kafka_resp_err_t e;
    bus *b = opaque;
    atomic_fetch_add(&b->generation, 1);
    if (err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS) {
        e = rd_kafka_assign(rk, parts);
        atomic_store(&b->assigned, e == RD_KAFKA_RESP_ERR_NO_ERROR ? parts->cnt : 0);
        bus_lead(b, e == RD_KAFKA_RESP_ERR_NO_ERROR ? parts : NULL);
        log_info("partitions assigned", "{s:i, s:s}", "count", parts->cnt, "result",
                 rd_kafka_err2name(e));
        return;
    }
    /* Revoked, or a rebalance error: either way we own nothing after this.
     * A lost assignment (our session expired) already belongs to another
     * member, and the coordinator refuses commits of the old generation. */
    if (!rd_kafka_assignment_lost(rk)) {
        e = rd_kafka_commit(rk, NULL, 0);
        if (e != RD_KAFKA_RESP_ERR_NO_ERROR && e != RD_KAFKA_RESP_ERR__NO_OFFSET)
            log_warn("commit on revoke failed", "{s:s}", "error", rd_kafka_err2str(e));
    }
    rd_kafka_assign(rk, NULL);
    atomic_store(&b->assigned, 0);
    bus_lead(b, NULL);
    log_info("partitions revoked", "{s:i, s:s}", "count", parts->cnt, "reason",
             rd_kafka_err2name(err));
}

/* librdkafka's own log lines join ours as JSON instead of its stderr text. */
static void bus_on_log(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
    enum log_level lv = level <= 3 ? LOG_ERROR : level == 4 ? LOG_WARN
                        : level <= 6 ? LOG_INFO : LOG_DEBUG;
    log_write(lv, "librdkafka", "{s:s, s:s, s:s}", "facility", fac, "client",
              rd_kafka_name(rk), "detail", buf);
}

/* The requests this client sent to the brokers and what they carried, as
 * librdkafka counts them since the handle began, every
 * statistics.interval.ms (0, the default, emits nothing; set it through
 * PARLEY_KAFKA_PRODUCER_CONFIG / PARLEY_KAFKA_CONSUMER_CONFIG). Summed
 * over a deployment's clients, the change in tx (every request), produce
 * or fetch over a steady run divided by the messages sent is the broker
 * requests per message (docs/benchmarks.md). */
static json_int_t bus_stats_reqs(json_t *j, const char *type)
{
    json_int_t n = 0;
    const char *name;
    json_t *br;
    json_object_foreach(json_object_get(j, "brokers"), name, br)
        n += json_integer_value(json_object_get(json_object_get(br, "req"), type));
    return n;
}

static int bus_on_stats(rd_kafka_t *rk, char *json, size_t len, void *opaque)
{
    json_t *j = json_loadb(json, len, 0, NULL);
    if (j != NULL) {
        log_info("kafka stats", "{s:s, s:s, s:I, s:I, s:I, s:I, s:I, s:I}", "client",
                 rd_kafka_name(rk), "type", json_string_value(json_object_get(j, "type")) ?: "",
                 "tx", (json_int_t)json_integer_value(json_object_get(j, "tx")), "rx",
                 (json_int_t)json_integer_value(json_object_get(j, "rx")), "txmsgs",
                 (json_int_t)json_integer_value(json_object_get(j, "txmsgs")), "rxmsgs",
                 (json_int_t)json_integer_value(json_object_get(j, "rxmsgs")), "produce",
                 bus_stats_reqs(j, "Produce"), "fetch", bus_stats_reqs(j, "Fetch"));
        json_decref(j);
    }
    return 0; /* librdkafka frees json */
}

/* The password in file path (a mounted Secret: never the environment, which
 * leaks into process listings and crash reports), without its line end. */
static int bus_read_secret(const char *path, char *out, size_t outlen, char *err, size_t errlen)
{
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return px_err(err, errlen, "PARLEY_KAFKA_SASL_PASSWORD_FILE: cannot open %s: %m", path);
    size_t n = fread(out, 1, outlen - 1, f);
    int full = n == outlen - 1 && fgetc(f) != EOF;
    fclose(f);
    out[n] = '\0';
    out[strcspn(out, "\r\n")] = '\0';
    if (full || out[0] == '\0')
        return px_err(err, errlen, "PARLEY_KAFKA_SASL_PASSWORD_FILE: %s is empty or over %zu bytes",
                      path, outlen - 2);
    return PX_OK;
}

/* TLS and SASL to the brokers (docs/operations.md, "Kafka security"): each
 * variable sets one librdkafka property; SASL needs a mechanism, a user
 * and a password file. librdkafka checks the certificate's host name
 * (ssl.endpoint.identification.algorithm=https is its default). */
static int bus_set_security(rd_kafka_conf_t *conf, char *err, size_t errlen)
{
    static const char *const map[][2] = {
        { "PARLEY_KAFKA_SECURITY_PROTOCOL", "security.protocol" },
        { "PARLEY_KAFKA_SASL_MECHANISM", "sasl.mechanisms" },
        { "PARLEY_KAFKA_SASL_USERNAME", "sasl.username" },
        { "PARLEY_KAFKA_SSL_CA_FILE", "ssl.ca.location" },
        { "PARLEY_KAFKA_SSL_CERT_FILE", "ssl.certificate.location" },
        { "PARLEY_KAFKA_SSL_KEY_FILE", "ssl.key.location" },
    };
    for (size_t i = 0; i < PX_ARRAY_LEN(map); i++) {
        const char *v = config_str(map[i][0], NULL);
        if (v != NULL && bus_set(conf, map[i][1], v, err, errlen) != PX_OK)
            return px_err(err, errlen, "%s=\"%s\" refused by librdkafka (%s)", map[i][0], v,
                          map[i][1]);
    }
    const char *proto = config_str("PARLEY_KAFKA_SECURITY_PROTOCOL", "plaintext");
    const char *pwfile = config_str("PARLEY_KAFKA_SASL_PASSWORD_FILE", NULL);
    if (strncasecmp(proto, "sasl_", 5) != 0)
        return PX_OK;
    if (config_str("PARLEY_KAFKA_SASL_MECHANISM", NULL) == NULL ||
        config_str("PARLEY_KAFKA_SASL_USERNAME", NULL) == NULL || pwfile == NULL)
        return px_err(err, errlen, "PARLEY_KAFKA_SECURITY_PROTOCOL=%s needs "
                      "PARLEY_KAFKA_SASL_MECHANISM, _USERNAME and _PASSWORD_FILE", proto);
    char pw[1024], e[256];
    int rc = bus_read_secret(pwfile, pw, sizeof(pw), err, errlen);
    if (rc == PX_OK && rd_kafka_conf_set(conf, "sasl.password", pw, e, sizeof(e)) !=
                           RD_KAFKA_CONF_OK)
        rc = px_err(err, errlen, "kafka setting sasl.password: %s", e); /* e names no value */
    explicit_bzero(pw, sizeof(pw));
    return rc;
}

static rd_kafka_conf_t *bus_common_conf(const bus_conf *c, bus *b, char *err, size_t errlen)
{
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    const char *const kv[][2] = {
        { "bootstrap.servers", c->brokers },
        { "client.id", c->client_id ? c->client_id : "parley" },
        { "socket.nagle.disable", "true" },
        { "log.connection.close", "false" },
        /* A topic created a moment before subscribing can be missing from
         * the first metadata answer; librdkafka looks again only at this
         * interval (5 min by default), and until then the group gets no
         * partitions of it (seen: message-store without acks and sync). */
        { "topic.metadata.refresh.interval.ms", "5000" },
    };
    if (bus_set_all(conf, kv, PX_ARRAY_LEN(kv), err, errlen) != PX_OK ||
        bus_set_security(conf, err, errlen) != PX_OK) {
        rd_kafka_conf_destroy(conf);
        return NULL;
    }
    rd_kafka_conf_set_opaque(conf, b);
    rd_kafka_conf_set_error_cb(conf, bus_on_error);
    rd_kafka_conf_set_log_cb(conf, bus_on_log);
    rd_kafka_conf_set_stats_cb(conf, bus_on_stats);
    return conf;
}

/* linger NULL: the live-path producer; else the bulk one, lingering that
 * many ms (after the operator's overrides, which would otherwise set both). */
static rd_kafka_t *bus_new_producer(bus *b, const bus_conf *c, const char *linger, char *err,
                                    size_t errlen)
{
    rd_kafka_conf_t *conf = bus_common_conf(c, b, err, errlen);
    if (conf == NULL)
        return NULL;
    /* Latency over throughput: librdkafka 2.0.2 defaults to linger 5 ms and
     * Nagle on; idempotence is off by default there. Not linger 0: requests
     * go per partition, so 1 ms rarely lets records share one, but at 0
     * test_bus_kafka failed 3 of 5 runs on a loaded box (a consumer short
     * of 2 of 400 flushed records for 30 s; a delivery report without its
     * offset, a retried duplicate) and passed every run at 1. */
    const char *const kv[][2] = {
        { "enable.idempotence", "true" },
        { "acks", "all" },
        { "linger.ms", "1" },
        { "queue.buffering.max.messages", "200000" },
        { "partitioner", "murmur2_random" },
        { "message.timeout.ms", "30000" },
    };
    if (bus_set_all(conf, kv, PX_ARRAY_LEN(kv), err, errlen) != PX_OK ||
        bus_set_env(conf, "PARLEY_KAFKA_PRODUCER_CONFIG", err, errlen) != PX_OK ||
        (linger != NULL && bus_set(conf, "linger.ms", linger, err, errlen) != PX_OK)) {
        rd_kafka_conf_destroy(conf);
        return NULL;
    }
    rd_kafka_conf_set_dr_msg_cb(conf, bus_on_dr);
    char e[512];
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, e, sizeof(e)); /* owns conf */
    if (rk == NULL) {
        rd_kafka_conf_destroy(conf);
        px_err(err, errlen, "kafka producer: %s", e);
    }
    return rk;
}

/* The bulk producer, when the caller names a bulk topic and
 * PARLEY_KAFKA_BULK_LINGER_MS (20) is above 0. */
static int bus_new_bulk(bus *b, const bus_conf *c, char *err, size_t errlen)
{
    long ms;
    if (config_long("PARLEY_KAFKA_BULK_LINGER_MS", 20, 0, 1000, &ms, err, errlen) != PX_OK)
        return PX_ERROR;
    if (c->bulk_topic == NULL || ms == 0)
        return PX_OK;
    snprintf(b->bulk_linger, sizeof(b->bulk_linger), "%ld", ms);
    b->rk_bulk = bus_new_producer(b, c, b->bulk_linger, err, errlen);
    b->bulk_topic = b->rk_bulk != NULL ? px_strdup(c->bulk_topic) : NULL;
    return b->rk_bulk != NULL ? PX_OK : PX_ERROR;
}

static int bus_new_consumer(bus *b, const bus_conf *c, char *err, size_t errlen)
{
    rd_kafka_conf_t *conf = bus_common_conf(c, b, err, errlen);
    if (conf == NULL)
        return PX_ERROR;
    const char *const kv[][2] = {
        { "group.id", c->group },
        { "enable.auto.commit", "true" },
        { "auto.commit.interval.ms", "1000" },
        { "enable.auto.offset.store", "false" },
        { "auto.offset.reset", "earliest" },
        /* The broker should answer a waiting fetch as soon as a record
         * lands (fetch.min.bytes is 1), so this would bound only idle
         * polling: at 10 ms six idle services kept the broker at 40-70% of
         * a core; at 100 ms the stack's 11 consumers sent ~110 empty
         * fetches a second (5-7% of a core); at 500 ms ~22 (3%). But at
         * 500 ms about every other stack run at 1,000/s stalled once for
         * 500-700 ms: every message sent in the stall arrived within the
         * same 60 ms at its end, as when a waiting fetch is not woken by
         * the append and runs out its wait (not GC: Kafka's pauses were
         * 13-31 ms and none fell there; not PostgreSQL: no statement over
         * 80 ms then). With 100 ms such a stall ends sooner
         * (docs/benchmarks.md, "The stack's p99 bursts"). */
        { "fetch.wait.max.ms", "100" },
        { "fetch.error.backoff.ms", "50" },
        /* How long a killed member's partitions wait before the group
         * gives them to a survivor (a kill -9 sends no LeaveGroup): the
         * least a broker accepts by default (group.min.session.timeout.ms,
         * 6000). Heartbeats, from librdkafka's own thread, come 6 times
         * per session, so a busy box must stall that thread 5 s to expire
         * a live member (docs/high-availability.md: 10 s before). */
        { "session.timeout.ms", "6000" },
        { "heartbeat.interval.ms", "1000" },
        /* Co-partitioned topics must be assigned alike: partition p of
         * each user-keyed topic a group reads to the same member. */
        { "partition.assignment.strategy", "range" },
        { "max.poll.interval.ms", "600000" },
    };
    if (bus_set_all(conf, kv, PX_ARRAY_LEN(kv), err, errlen) != PX_OK ||
        bus_set_env(conf, "PARLEY_KAFKA_CONSUMER_CONFIG", err, errlen) != PX_OK) {
        rd_kafka_conf_destroy(conf);
        return PX_ERROR;
    }
    rd_kafka_conf_set_rebalance_cb(conf, bus_on_rebalance);
    char e[512], v[32];
    size_t vlen = sizeof(v);
    b->session_ms = rd_kafka_conf_get(conf, "session.timeout.ms", v, &vlen) == RD_KAFKA_CONF_OK
                        ? atoi(v) : 10000;
    b->rkc = rd_kafka_new(RD_KAFKA_CONSUMER, conf, e, sizeof(e));
    if (b->rkc == NULL) {
        rd_kafka_conf_destroy(conf);
        return px_err(err, errlen, "kafka consumer: %s", e);
    }
    rd_kafka_poll_set_consumer(b->rkc);
    b->cq = rd_kafka_queue_get_consumer(b->rkc);
    return PX_OK;
}

void bus_where(const char *brokers, char *out, size_t outlen)
{
    snprintf(out, outlen, "kafka %s", brokers);
}

bus *bus_new(const bus_conf *c, char *err, size_t errlen)
{
    bus *b = px_calloc(1, sizeof(*b));
    pthread_mutex_init(&b->heal_mu, NULL);
    pthread_mutex_init(&b->lead_mu, NULL);
    b->leader = c->group != NULL ? c->follow : NULL;
    b->efd = -1;
    b->conf = (bus_conf){ .brokers = px_strdup(c->brokers ? c->brokers : ""),
                          .client_id = c->client_id ? px_strdup(c->client_id) : NULL,
                          .partitions = c->partitions > 0 ? c->partitions : 1,
                          .dr_cb = c->dr_cb };
    if (c->brokers == NULL || *c->brokers == '\0') {
        px_err(err, errlen, "no Kafka brokers configured");
        goto fail;
    }
    b->rk = bus_new_producer(b, c, NULL, err, errlen);
    if (b->rk == NULL || bus_new_bulk(b, c, err, errlen) != PX_OK)
        goto fail;
    if (c->group != NULL && bus_new_consumer(b, c, err, errlen) != PX_OK)
        goto fail;
    return b;
fail:
    bus_destroy(b);
    return NULL;
}

/* A request-level failure (timeout, no broker) comes as an event error with
 * no per-topic results: it must not read as "every topic created". */
static int bus_topic_results(rd_kafka_event_t *ev, char *err, size_t errlen)
{
    const rd_kafka_CreateTopics_result_t *res = rd_kafka_event_CreateTopics_result(ev);
    if (res == NULL || rd_kafka_event_error(ev) != RD_KAFKA_RESP_ERR_NO_ERROR)
        return px_err(err, errlen, "create topics: %s", rd_kafka_event_error_string(ev));
    size_t n;
    const rd_kafka_topic_result_t **tr = rd_kafka_CreateTopics_result_topics(res, &n);
    for (size_t i = 0; i < n; i++) {
        rd_kafka_resp_err_t e = rd_kafka_topic_result_error(tr[i]);
        if (e != RD_KAFKA_RESP_ERR_NO_ERROR && e != RD_KAFKA_RESP_ERR_TOPIC_ALREADY_EXISTS)
            return px_err(err, errlen, "create topic %s: %s", rd_kafka_topic_result_name(tr[i]),
                          rd_kafka_topic_result_error_string(tr[i]));
    }
    return PX_OK;
}

/* Production clusters set PARLEY_KAFKA_REPLICATION (e.g. 3); the local
 * single broker cannot hold more than one replica. */
static int bus_replication(char *err, size_t errlen)
{
    const char *rf = getenv("PARLEY_KAFKA_REPLICATION");
    if (rf == NULL || *rf == '\0')
        return 1;
    char *end;
    long v = strtol(rf, &end, 10);
    if (*end != '\0' || v < 1 || v > 32767)
        return px_err(err, errlen, "PARLEY_KAFKA_REPLICATION=%s: not a replica count", rf);
    return (int)v;
}

/* Both timeouts are timeout_ms: the broker stops waiting for the creation
 * after it (operation timeout) and librdkafka answers by then (request
 * timeout, else socket.timeout.ms = 60 s), so the result event is due
 * within our wait and nothing is left pending on the queue. */
static rd_kafka_AdminOptions_t *bus_admin_options(bus *b, int timeout_ms)
{
    char e[256];
    rd_kafka_AdminOptions_t *opts =
        rd_kafka_AdminOptions_new(b->rk, RD_KAFKA_ADMIN_OP_CREATETOPICS);
    if (rd_kafka_AdminOptions_set_request_timeout(opts, timeout_ms, e, sizeof(e)) ||
        rd_kafka_AdminOptions_set_operation_timeout(opts, timeout_ms, e, sizeof(e)))
        log_warn("create topics: timeout not set", "{s:s}", "error", e);
    return opts;
}

/* 1 once a broker's metadata shows topic with every partition led. */
static int bus_topic_visible(bus *b, const char *topic)
{
    rd_kafka_topic_t *rkt = rd_kafka_topic_new(b->rk, topic, NULL);
    const struct rd_kafka_metadata *md = NULL;
    int ok = rkt != NULL && rd_kafka_metadata(b->rk, 0, rkt, &md, 2000) == RD_KAFKA_RESP_ERR_NO_ERROR &&
             md->topic_cnt == 1 && md->topics[0].err == RD_KAFKA_RESP_ERR_NO_ERROR &&
             md->topics[0].partition_cnt > 0;
    for (int i = 0; ok && i < md->topics[0].partition_cnt; i++)
        ok = md->topics[0].partitions[i].err == RD_KAFKA_RESP_ERR_NO_ERROR &&
             md->topics[0].partitions[i].leader >= 0;
    if (md != NULL)
        rd_kafka_metadata_destroy(md);
    if (rkt != NULL)
        rd_kafka_topic_destroy(rkt);
    return ok;
}

/* A topic just created is known to the controller first and to the brokers
 * a moment later: a consumer that joins its group meanwhile can be given
 * no partitions of it, and librdkafka (2.0) did not always join again when
 * they appeared (a gateway of the chaos runs on a loaded HA stack held 0
 * partitions of its delivery topic for minutes: its clients never got
 * `synced`). So creating waits until each topic is seen led. */
static int bus_wait_visible(bus *b, const char *const *topics, size_t n, int timeout_ms,
                            char *err, size_t errlen)
{
    int64_t deadline = px_mono_ms() + timeout_ms;
    for (size_t i = 0; i < n; i++) {
        while (!bus_topic_visible(b, topics[i])) {
            if (px_mono_ms() > deadline)
                return px_err(err, errlen, "topic %s: not in the brokers' metadata after %d ms",
                              topics[i], timeout_ms);
            usleep(100 * 1000);
        }
    }
    return PX_OK;
}

int bus_ensure_topics(bus *b, const char *const *topics, size_t n, int timeout_ms,
                      char *err, size_t errlen)
{
    int replication = bus_replication(err, errlen);
    if (replication == PX_ERROR)
        return PX_ERROR;
    if (n == 0)
        return PX_OK;
    int rc = PX_ERROR;
    rd_kafka_NewTopic_t **nt = px_calloc(n, sizeof(*nt));
    rd_kafka_queue_t *q = rd_kafka_queue_new(b->rk);
    rd_kafka_event_t *ev = NULL;
    char e[256];
    for (size_t i = 0; i < n; i++) {
        nt[i] = rd_kafka_NewTopic_new(topics[i], b->conf.partitions, replication, e, sizeof(e));
        if (nt[i] == NULL) {
            px_err(err, errlen, "topic %s: %s", topics[i], e);
            goto out;
        }
    }
    rd_kafka_AdminOptions_t *opts = bus_admin_options(b, timeout_ms);
    rd_kafka_CreateTopics(b->rk, nt, n, opts, q);
    rd_kafka_AdminOptions_destroy(opts);
    ev = rd_kafka_queue_poll(q, timeout_ms + 1000); /* margin over the request timeout */
    if (ev == NULL) {
        px_err(err, errlen, "create topics: no answer from Kafka in %d ms", timeout_ms);
        goto out;
    }
    rc = bus_topic_results(ev, err, errlen);
    if (rc == PX_OK)
        rc = bus_wait_visible(b, topics, n, timeout_ms, err, errlen);
out:
    if (ev != NULL)
        rd_kafka_event_destroy(ev);
    for (size_t i = 0; i < n; i++)
        if (nt[i] != NULL)
            rd_kafka_NewTopic_destroy(nt[i]);
    free(nt);
    rd_kafka_queue_destroy(q);
    return rc;
}

static int bus_produce_result(rd_kafka_t *rk, rd_kafka_resp_err_t e, const char *topic,
                              char *err, size_t errlen);

int bus_produce(bus *b, const char *topic, const char *key, size_t key_len,
                const void *value, size_t len, void *opaque, char *err, size_t errlen)
{
    rd_kafka_t *rk =
        b->bulk_topic != NULL && strcmp(topic, b->bulk_topic) == 0 ? b->rk_bulk : b->rk;
    rd_kafka_resp_err_t e = rd_kafka_producev(
        rk, RD_KAFKA_V_TOPIC(topic), RD_KAFKA_V_KEY(key, key_len),
        RD_KAFKA_V_VALUE((void *)value, len), RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
        RD_KAFKA_V_OPAQUE(opaque), RD_KAFKA_V_END);
    return bus_produce_result(rk, e, topic, err, errlen);
}

/* Kafka keeps every record: nothing to save by losing one. */
int bus_produce_transient(bus *b, const char *topic, const char *key, size_t key_len,
                          const void *value, size_t len, void *opaque, char *err, size_t errlen)
{
    return bus_produce(b, topic, key, key_len, value, len, opaque, err, errlen);
}

static int bus_produce_result(rd_kafka_t *rk, rd_kafka_resp_err_t e, const char *topic,
                              char *err, size_t errlen)
{
    if (e == RD_KAFKA_RESP_ERR_NO_ERROR)
        return PX_OK;
    if (e == RD_KAFKA_RESP_ERR__QUEUE_FULL) {
        px_err(err, errlen, "local produce queue full");
        return PX_AGAIN;
    }
    /* A fatal error is permanent for this handle (bus_heal replaces it):
     * say which. */
    char fatal[256];
    if (e == RD_KAFKA_RESP_ERR__FATAL &&
        rd_kafka_fatal_error(rk, fatal, sizeof(fatal)) != RD_KAFKA_RESP_ERR_NO_ERROR)
        return px_err(err, errlen, "produce to %s: fatal: %s", topic, fatal);
    return px_err(err, errlen, "produce to %s: %s", topic, rd_kafka_err2str(e));
}

/* 1 with the handle's fatal error in err, 0 when it has none. */
static int bus_fatal(rd_kafka_t *rk, char *err, size_t errlen)
{
    return rk != NULL && rd_kafka_fatal_error(rk, err, errlen) != RD_KAFKA_RESP_ERR_NO_ERROR;
}

int bus_failed(bus *b)
{
    char e[256];
    if (bus_fatal(b->rkc, e, sizeof(e)))
        return 1;
    pthread_mutex_lock(&b->heal_mu);
    int spent = b->nretired == BUS_MAX_HEALS;
    pthread_mutex_unlock(&b->heal_mu);
    return spent && (bus_fatal(b->rk, e, sizeof(e)) || bus_fatal(b->rk_bulk, e, sizeof(e)));
}

int bus_test_fail(bus *b)
{
    return rd_kafka_test_fatal_error(b->rk, RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
                                     "bus_test_fail") == RD_KAFKA_RESP_ERR_NO_ERROR
               ? PX_OK
               : PX_ERROR;
}

/* Fails what the dead handle still holds (queued and in flight) and serves
 * those reports; the handle itself lives on until bus_destroy (see the
 * struct). */
static void bus_retire(rd_kafka_t *rk)
{
    rd_kafka_purge(rk, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
    int64_t deadline = px_mono_ms() + 5000;
    while (rd_kafka_outq_len(rk) > 0 && px_mono_ms() < deadline)
        rd_kafka_poll(rk, 100);
    if (rd_kafka_outq_len(rk) > 0)
        log_warn("kafka producer retired with reports never served", "{s:i}", "records",
                 rd_kafka_outq_len(rk));
}

/* Replaces each producer that failed for good with a new one (see the top
 * of this file), at most BUS_MAX_HEALS times. Only inside bus_poll and
 * bus_flush: the dead handle's reports must be served on the thread that
 * serves reports. Cheap when none failed: one atomic read per handle. */
static void bus_heal(bus *b)
{
    char fatal[256], err[PX_ERRLEN];
    rd_kafka_t *_Atomic *slot[] = { &b->rk, &b->rk_bulk };
    for (size_t i = 0; i < PX_ARRAY_LEN(slot); i++) {
        if (!bus_fatal(*slot[i], fatal, sizeof(fatal)))
            continue;
        pthread_mutex_lock(&b->heal_mu);
        rd_kafka_t *dead = *slot[i], *fresh = NULL;
        if (bus_fatal(dead, fatal, sizeof(fatal)) && b->nretired < BUS_MAX_HEALS) {
            fresh = bus_new_producer(b, &b->conf, i == 0 ? NULL : b->bulk_linger, err,
                                     sizeof(err));
            if (fresh == NULL)
                log_error("kafka producer not made again", "{s:s}", "error", err);
        }
        int made = 0;
        if (fresh != NULL) {
            *slot[i] = fresh;
            b->retired[b->nretired++] = dead;
            made = b->nretired;
        }
        pthread_mutex_unlock(&b->heal_mu);
        if (fresh == NULL)
            continue;
        log_warn("kafka producer failed for good and was made again; its pending records "
                 "get failed reports", "{s:s, s:i, s:i}", "error", fatal, "pending",
                 rd_kafka_outq_len(dead), "made_again", made);
        bus_retire(dead); /* unlocked: its report callbacks may call into the bus */
    }
}

int bus_assigned(bus *b)
{
    return atomic_load(&b->assigned);
}

unsigned bus_generation(bus *b)
{
    return atomic_load(&b->generation);
}

int bus_session_ms(bus *b)
{
    return b->session_ms;
}

/* From the next offset this consumer reads in each partition (its
 * position, else the group's committed offset, else the earliest, as
 * auto.offset.reset says) to the partition's end as the leader says now:
 * a cached watermark would hide records that a leader out of reach holds. */
int bus_lags(bus *b, bus_lag *out, size_t max, int timeout_ms, char *err, size_t errlen)
{
    rd_kafka_topic_partition_list_t *parts = NULL, *pos = NULL;
    if (b->rkc == NULL)
        return px_err(err, errlen, "bus has no consumer group");
    rd_kafka_resp_err_t e = rd_kafka_assignment(b->rkc, &parts);
    if (e == RD_KAFKA_RESP_ERR_NO_ERROR && parts->cnt > 0) {
        pos = rd_kafka_topic_partition_list_copy(parts);
        e = rd_kafka_committed(b->rkc, parts, timeout_ms);
    }
    if (e == RD_KAFKA_RESP_ERR_NO_ERROR && pos != NULL)
        e = rd_kafka_position(b->rkc, pos);
    size_t n = 0;
    for (int i = 0; e == RD_KAFKA_RESP_ERR_NO_ERROR && pos != NULL && i < parts->cnt && n < max;
         i++) {
        const rd_kafka_topic_partition_t *c = &parts->elems[i], *p = &pos->elems[i];
        int64_t lo = 0, hi = 0, next = p->offset >= 0 ? p->offset : c->offset;
        int known = rd_kafka_query_watermark_offsets(b->rkc, c->topic, c->partition, &lo, &hi,
                                                     timeout_ms) == RD_KAFKA_RESP_ERR_NO_ERROR;
        if (next < 0)
            next = lo;
        out[n] = (bus_lag){ .partition = c->partition, .records = known ? PX_MAX(0, hi - next) : -1 };
        snprintf(out[n++].topic, sizeof(out[0].topic), "%s", c->topic);
    }
    if (parts != NULL)
        rd_kafka_topic_partition_list_destroy(parts);
    if (pos != NULL)
        rd_kafka_topic_partition_list_destroy(pos);
    if (e != RD_KAFKA_RESP_ERR_NO_ERROR)
        return px_err(err, errlen, "consumer lag: %s", rd_kafka_err2str(e));
    return (int)n;
}

/* The bulk producer's reports are served too, at most timeout_ms late:
 * nothing waits on them but the records' own bookkeeping. */
void bus_poll(bus *b, int timeout_ms)
{
    bus_heal(b);
    rd_kafka_poll(b->rk, timeout_ms);
    if (b->rk_bulk != NULL)
        rd_kafka_poll(b->rk_bulk, 0);
}

/* rd_kafka_flush sends at once whatever lingers (librdkafka >= 1.8). */
int bus_flush(bus *b, int timeout_ms)
{
    int64_t deadline = px_mono_ms() + timeout_ms;
    bus_heal(b);
    if (rd_kafka_flush(b->rk, timeout_ms) != RD_KAFKA_RESP_ERR_NO_ERROR ||
        (b->rk_bulk != NULL &&
         rd_kafka_flush(b->rk_bulk, (int)PX_MAX(0, deadline - px_mono_ms())) !=
             RD_KAFKA_RESP_ERR_NO_ERROR))
        return PX_AGAIN;
    return PX_OK;
}

int bus_subscribe(bus *b, const char *const *topics, size_t n, char *err, size_t errlen)
{
    if (b->rkc == NULL)
        return px_err(err, errlen, "bus has no consumer group");
    if (b->leader != NULL) { /* bus_follow assigns them */
        b->ftopics = px_realloc(b->ftopics, (b->nftopics + n) * sizeof(*b->ftopics));
        for (size_t i = 0; i < n; i++)
            b->ftopics[b->nftopics++] = px_strdup(topics[i]);
        return PX_OK;
    }
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new((int)n);
    for (size_t i = 0; i < n; i++)
        rd_kafka_topic_partition_list_add(l, topics[i], RD_KAFKA_PARTITION_UA);
    rd_kafka_resp_err_t e = rd_kafka_subscribe(b->rkc, l);
    rd_kafka_topic_partition_list_destroy(l);
    if (e != RD_KAFKA_RESP_ERR_NO_ERROR)
        return px_err(err, errlen, "subscribe: %s", rd_kafka_err2str(e));
    return PX_OK;
}

int bus_resubscribe(bus *b, char *err, size_t errlen)
{
    rd_kafka_topic_partition_list_t *l = NULL;
    if (b->rkc == NULL)
        return px_err(err, errlen, "bus has no consumer group");
    if (b->leader != NULL)
        return PX_OK; /* no membership of its own */
    rd_kafka_resp_err_t e = rd_kafka_subscription(b->rkc, &l);
    /* librdkafka leaves the group and joins again on a subscribe, even
     * with the same topics. */
    if (e == RD_KAFKA_RESP_ERR_NO_ERROR)
        e = rd_kafka_subscribe(b->rkc, l);
    if (l != NULL)
        rd_kafka_topic_partition_list_destroy(l);
    if (e != RD_KAFKA_RESP_ERR_NO_ERROR)
        return px_err(err, errlen, "resubscribe: %s", rd_kafka_err2str(e));
    return PX_OK;
}

/* Transient consumer errors (partition EOF, broker transport) are skipped;
 * only fatal ones end consumption. */
static int bus_consumer_error(bus *b, const rd_kafka_message_t *m, char *err, size_t errlen)
{
    if (m->err == RD_KAFKA_RESP_ERR__PARTITION_EOF)
        return PX_OK;
    char fatal[256];
    if (m->err == RD_KAFKA_RESP_ERR__FATAL &&
        rd_kafka_fatal_error(b->rkc, fatal, sizeof(fatal)) != RD_KAFKA_RESP_ERR_NO_ERROR)
        return px_err(err, errlen, "kafka consumer fatal: %s", fatal);
    log_warn("kafka consumer error", "{s:s}", "error", rd_kafka_message_errstr(m));
    return PX_OK;
}

static void bus_msg_fill(bus_msg *out, rd_kafka_message_t *m)
{
    *out = (bus_msg){
        .topic = rd_kafka_topic_name(m->rkt), .partition = m->partition,
        .offset = m->offset, .key = m->key, .key_len = m->key_len,
        .value = m->payload, .len = m->len,
        .ts_ms = rd_kafka_message_timestamp(m, NULL), .impl = m,
    };
}

/* The eventfd protocol. librdkafka 2.0.2 writes the fd once per
 * "non-polling period": the first enqueue after a poll of the queue writes
 * it, later ones do not until the queue is polled again. Hence:
 * - drain before polling: a record enqueued after our last poll wrote the
 *   fd, and that write must survive (draining after the polls could swallow
 *   it, and the record would wait for some later record to wake anyone);
 * - after polling, when records remain because we stopped at max, signal
 *   the fd ourselves: no enqueue will, and the reactor would stall. */
static void bus_consume_drain(bus *b)
{
    uint64_t v;
    if (b->efd >= 0 && read(b->efd, &v, sizeof(v)) < 0 && errno != EAGAIN)
        log_warn("bus eventfd read failed", "{s:s}", "error", strerror(errno));
}

static void bus_consume_signal(bus *b)
{
    uint64_t one = 1;
    if (b->efd >= 0 && rd_kafka_queue_length(b->cq) > 0 &&
        write(b->efd, &one, sizeof(one)) < 0 && errno != EAGAIN)
        log_warn("bus eventfd write failed", "{s:s}", "error", strerror(errno));
}

/* A loop of rd_kafka_consumer_poll, not rd_kafka_consume_batch_queue: the
 * 2.0.x batch API may lose or misroute records when a rebalance runs during
 * the call (upstream 2.0.0 "Known Issues", fixed in 2.1.0), while a single
 * poll serves the rebalance callback between records. Only the first poll
 * waits. Callbacks are served inside a poll without ending it, so a NULL
 * means timeout or bus_wakeup (rd_kafka_queue_yield): either ends the call. */
int bus_consume(bus *b, bus_msg *out, size_t max, int timeout_ms, char *err, size_t errlen)
{
    if (b->rkc == NULL)
        return px_err(err, errlen, "bus has no consumer group");
    if (b->leader != NULL)
        bus_follow(b);
    bus_consume_drain(b);
    size_t n = 0;
    int64_t end = px_mono_ms() + timeout_ms;
    while (n < max) {
        int wait = n > 0 ? 0 : (int)PX_MAX(0, end - px_mono_ms());
        rd_kafka_message_t *m = rd_kafka_consumer_poll(b->rkc, wait);
        if (m == NULL)
            break;
        if (m->err == RD_KAFKA_RESP_ERR_NO_ERROR) {
            bus_msg_fill(&out[n++], m);
            continue;
        }
        int rc = bus_consumer_error(b, m, err, errlen);
        rd_kafka_message_destroy(m);
        if (rc != PX_OK) {
            bus_release(b, out, n);
            return PX_ERROR;
        }
    }
    bus_consume_signal(b);
    return (int)n;
}

/* Stores, per partition, the offset after the highest record given. */
int bus_commit(bus *b, const bus_msg *m, size_t n)
{
    if (b->rkc == NULL || n == 0)
        return PX_OK;
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new((int)n);
    for (size_t i = 0; i < n; i++) {
        rd_kafka_topic_partition_t *p =
            rd_kafka_topic_partition_list_find(l, m[i].topic, m[i].partition);
        if (p == NULL)
            p = rd_kafka_topic_partition_list_add(l, m[i].topic, m[i].partition);
        if (m[i].offset + 1 > p->offset)
            p->offset = m[i].offset + 1;
    }
    rd_kafka_resp_err_t e = rd_kafka_offsets_store(b->rkc, l);
    rd_kafka_topic_partition_list_destroy(l);
    /* A partition revoked meanwhile refuses the store: its new owner will
     * consume those records again, which the idempotent effects absorb. */
    if (e != RD_KAFKA_RESP_ERR_NO_ERROR) {
        log_debug("offset store refused", "{s:s}", "error", rd_kafka_err2str(e));
        return PX_DECLINED;
    }
    return PX_OK;
}

void bus_release(bus *b, bus_msg *m, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        rd_kafka_message_destroy(m[i].impl);
        m[i].impl = NULL;
    }
}

/* For a level-triggered reactor: when the fd is readable, call
 * bus_consume. bus_consume itself drains the eventfd (the reader need not
 * read it) and leaves it readable while records remain, so a partial take
 * never strands records. Rebalances arrive through the same queue and only
 * bus_consume serves them; and librdkafka leaves the group when bus_consume
 * is not called for max.poll.interval.ms, so a quiet reactor still calls it
 * on a timer. */
int bus_consume_fd(bus *b)
{
    if (b->cq == NULL)
        return -1;
    if (b->efd < 0) {
        b->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (b->efd < 0)
            return -1;
        /* An eventfd only accepts 8-byte writes: a shorter payload would
         * fail with EINVAL and never wake anyone. */
        static const uint64_t one = 1;
        rd_kafka_queue_io_event_enable(b->cq, b->efd, &one, sizeof(one));
    }
    return b->efd;
}

void bus_wakeup(bus *b)
{
    if (b != NULL && b->cq != NULL)
        rd_kafka_queue_yield(b->cq);
}

void bus_destroy(bus *b)
{
    if (b == NULL)
        return;
    if (b->rkc != NULL) {
        /* A follower's last stored offsets: its close leaves no group. */
        rd_kafka_resp_err_t e = b->leader != NULL ? rd_kafka_commit(b->rkc, NULL, 0)
                                                  : RD_KAFKA_RESP_ERR_NO_ERROR;
        if (e != RD_KAFKA_RESP_ERR_NO_ERROR && e != RD_KAFKA_RESP_ERR__NO_OFFSET)
            log_warn("kafka commit at close", "{s:s}", "error", rd_kafka_err2str(e));
        e = rd_kafka_consumer_close(b->rkc);
        if (e != RD_KAFKA_RESP_ERR_NO_ERROR)
            log_warn("kafka consumer close", "{s:s}", "error", rd_kafka_err2str(e));
        if (b->cq != NULL)
            rd_kafka_queue_destroy(b->cq);
        rd_kafka_destroy(b->rkc);
    }
    rd_kafka_t *producers[] = { b->rk, b->rk_bulk };
    for (size_t i = 0; i < PX_ARRAY_LEN(producers); i++) {
        if (producers[i] == NULL)
            continue;
        if (rd_kafka_flush(producers[i], 5000) != RD_KAFKA_RESP_ERR_NO_ERROR)
            log_warn("kafka producer: records still unacknowledged after 5 s",
                     "{s:s, s:i}", "client", rd_kafka_name(producers[i]), "queued",
                     rd_kafka_outq_len(producers[i]));
        rd_kafka_destroy(producers[i]);
    }
    for (int i = 0; i < b->nretired; i++)
        rd_kafka_destroy(b->retired[i]);
    for (size_t i = 0; i < b->nftopics; i++)
        free(b->ftopics[i]);
    free(b->ftopics);
    free(b->lead);
    pthread_mutex_destroy(&b->lead_mu);
    free(b->bulk_topic);
    free((char *)b->conf.brokers);
    free((char *)b->conf.client_id);
    pthread_mutex_destroy(&b->heal_mu);
    if (b->efd >= 0)
        close(b->efd);
    free(b);
}
