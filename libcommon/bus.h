/* The message bus the services are written against: keyed topics with
 * per-partition order, durable produce with delivery reports, and consumer
 * groups whose offsets advance only when the caller says its effects are
 * durable. Two implementations: bus_kafka.c (Apache Kafka via librdkafka)
 * and, for parleyd, an in-process one with the same semantics. Services see
 * only this header and PX_* codes, never librdkafka's. */
#ifndef PARLEY_BUS_H
#define PARLEY_BUS_H

#include "metrics.h"

#include <stddef.h>
#include <stdint.h>

typedef struct bus bus;

/* A consumed record. Pointers stay valid until bus_release() on it. */
typedef struct bus_msg {
    const char *topic;
    int32_t partition;
    int64_t offset;
    const char *key;
    size_t key_len;
    const void *value;
    size_t len;
    int64_t ts_ms;     /* producer timestamp */
    void *impl;        /* owned by the implementation */
} bus_msg;

/* Delivery report: called once per bus_produce() that returned PX_OK, from
 * inside bus_poll() on the polling thread. status is PX_OK when the record is
 * durable (acks=all), else PX_ERROR with err. opaque is bus_produce's. */
typedef void (*bus_dr_cb)(void *opaque, int status, const char *err,
                          int32_t partition, int64_t offset);

typedef struct bus_conf {
    const char *brokers;     /* "host:port,..." (Kafka); ignored in-process */
    const char *client_id;   /* for broker logs, e.g. "gateway-gw-0" */
    const char *group;       /* consumer group; NULL: producer only */
    int partitions;          /* partition count used by bus_ensure_topics */
    /* Kafka: a topic no message waits on, produced through a second producer
     * that lingers PARLEY_KAFKA_BULK_LINGER_MS (20; 0: none) to share
     * requests; NULL: every topic at 1 ms. Ignored in-process. */
    const char *bulk_topic;
    bus_dr_cb dr_cb;         /* may be NULL when nothing is produced */
    /* A consumer that holds what the group of `follow` (another bus of this
     * process, made and destroyed around this one) gives it: partition p of
     * each of this bus's topics while `follow` holds partition p of its own,
     * so a co-partitioned topic's records of a user reach the thread beside
     * the one reading the user's other records. Its group keeps only the
     * offsets (Kafka: partitions assigned by hand, never a member). NULL: a
     * member of its group as usual. In-process every partition is the
     * process's anyway: ignored. */
    struct bus *follow;
} bus_conf;

bus *bus_new(const bus_conf *conf, char *err, size_t errlen);

/* For the start-up log: where this implementation keeps records, given the
 * brokers setting (Kafka: the brokers; parleyd: its database file, the
 * brokers being ignored there). */
void bus_where(const char *brokers, char *out, size_t outlen);

/* Creates the topics that do not exist yet with conf->partitions partitions
 * (existing topics are left as they are). Blocks up to timeout_ms. */
int bus_ensure_topics(bus *b, const char *const *topics, size_t n, int timeout_ms,
                      char *err, size_t errlen);

/* Queues a record for topic, partitioned by key (same key, same partition,
 * in produce order). Copies key and value. PX_AGAIN when the local queue is
 * full (caller polls and retries or answers `unavailable`). */
int bus_produce(bus *b, const char *topic, const char *key, size_t key_len,
                const void *value, size_t len, void *opaque, char *err, size_t errlen);

/* bus_produce for a record whose loss the system repairs by itself (an
 * ack: its events are pushed again on the next connection and acked
 * again). Ordered, reported and consumed as any other record, and Kafka
 * keeps it as any other; the in-process bus does not write it to its log,
 * so it is gone if the process dies, or its consumer falls behind the
 * bus's memory, before it is consumed. */
int bus_produce_transient(bus *b, const char *topic, const char *key, size_t key_len,
                          const void *value, size_t len, void *opaque, char *err,
                          size_t errlen);

/* Serves delivery reports (and other events) for up to timeout_ms. */
void bus_poll(bus *b, int timeout_ms);

/* Waits until every queued record has a delivery report; PX_AGAIN on timeout. */
int bus_flush(bus *b, int timeout_ms);

/* Joins the consumer group on these topics (a follower, bus_conf.follow:
 * reads them from the partitions its leader holds, from its group's
 * committed offsets). */
int bus_subscribe(bus *b, const char *const *topics, size_t n, char *err, size_t errlen);

/* Leaves the consumer group and joins it again on the same topics, with a
 * fresh look at the brokers' metadata: for a member whose join found its
 * topic missing and that holds nothing since (librdkafka asks again only
 * for topics it holds partitions of; a gateway's own delivery topic on a
 * freshly started three-node cluster). Nothing to do in-process. */
int bus_resubscribe(bus *b, char *err, size_t errlen);

/* Fills up to max records, waiting at most timeout_ms for the first.
 * Returns the count (0 on timeout) or PX_ERROR on a fatal consumer error.
 * Each returned record must be passed to bus_release(). */
int bus_consume(bus *b, bus_msg *out, size_t max, int timeout_ms, char *err, size_t errlen);

/* Marks these records' effects durable: their partitions' committed offsets
 * may now move past them. Records not marked are consumed again after a
 * crash or a rebalance. */
int bus_commit(bus *b, const bus_msg *m, size_t n);

void bus_release(bus *b, bus_msg *m, size_t n);

/* An fd that becomes readable when bus_consume() has records (for epoll
 * reactors), or -1 if the implementation cannot provide one. */
int bus_consume_fd(bus *b);

/* Makes a bus_consume blocked in another thread return promptly (used on
 * shutdown). Thread-safe. */
void bus_wakeup(bus *b);

/* How many partitions the consumer group gave this bus at its last
 * assignment (0 before the first, and between a revoke and the next);
 * readiness checks of a consumer that must own partitions (a gateway's
 * own delivery topic) read it. Thread-safe. */
int bus_assigned(bus *b);

/* Moves on at every assignment and revoke of this consumer's partitions
 * (never in-process, where nobody else can take them): what was learned
 * of a partition's data under one generation may be stale in another
 * (another member may have written meanwhile). Thread-safe. */
unsigned bus_generation(bus *b);

/* 1 once the bus can never consume again: librdkafka raised a fatal error
 * on its consumer handle (permanent for the handle). bus_consume returns
 * PX_ERROR from then on: the owner must end the process (exit 1) so that
 * it is restarted, which redelivers what it had not committed. A producer
 * that fails so is made again in place instead, inside the next bus_poll or
 * bus_flush (the records it held get failed reports there); only the
 * ninth such failure in one process makes this 1. Thread-safe. The
 * in-process bus never fails so. */
int bus_failed(bus *b);

/* For tests: fails the bus's producer as a fatal librdkafka error does
 * (rd_kafka_test_fatal_error); the next bus_poll or bus_flush makes it
 * again. PX_DECLINED where there is no such error. */
int bus_test_fail(bus *b);

/* How far this consumer is behind in one partition assigned to it. */
typedef struct bus_lag {
    char topic[128];
    int32_t partition;
    int64_t records;   /* records past its position (or the group's committed
                        * offset when it has read nothing yet); -1: unknown */
} bus_lag;

/* The partitions assigned to this consumer (every partition of its topics
 * in-process), up to max of them in out, with the records each holds that
 * it has not consumed yet, asking the brokers (up to timeout_ms per call):
 * the count, or PX_ERROR. Not cheap (Kafka: a request per partition): for
 * periodic checks, not per batch. */
int bus_lags(bus *b, bus_lag *out, size_t max, int timeout_ms, char *err, size_t errlen);

/* How long a consumer that died without leaving keeps its partitions
 * (Kafka: session.timeout.ms; in-process: 0, nobody else could take them):
 * a record of those partitions may wait this long for a reader. */
int bus_session_ms(bus *b);

/* ---- bus_util.c: on top of the calls above, for either implementation ---- */

/* bus_produce that rides out a full local queue for up to wait_ms by
 * serving delivery reports (which make room); PX_ERROR after that. */
int bus_produce_wait(bus *b, const char *topic, const char *key, size_t key_len,
                     const void *value, size_t len, void *opaque, int wait_ms, char *err,
                     size_t errlen);

/* 1 if m's key is exactly the string s. */
/* The histogram parley_bus_record_age_ms{consumer="<consumer>"}, and
 * observing into it the age of each record just consumed (now minus its
 * bus timestamp, whole ms): how long the hop from the producer's produce
 * call to this consumer took, per topic a consumer reads. */
metric *bus_age_histogram(const char *consumer);
void bus_observe_age(metric *m, const bus_msg *msgs, size_t n);

int bus_key_is(const bus_msg *m, const char *s);

/* Leaves the group (committing what bus_commit marked), flushes the producer
 * for up to 5 s, frees everything. */
void bus_destroy(bus *b);

#endif
