/* bus_kafka against the real broker (PARLEY_KAFKA_BROKERS, default
 * 127.0.0.1:19092): keyed order and Java-compatible partitioning, delivery
 * reports, offsets that advance only on bus_commit (a consumer killed before
 * committing gets its records again, a clean restart resumes right after the
 * last commit), the consume fd and bus_wakeup. Topics and groups are unique
 * per run, so reruns never see each other's records. */
#include "../unit/check_main.h"
#include "bus.h"
#include "common.h"

#include <librdkafka/rdkafka.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define PARTS 8
#define MAX_PARTS 16
#define NREC 400     /* records in the commit tests */

/* Delivery reports: totals for every test, per-record slots when the record
 * was produced with one as its opaque. */
typedef struct dr_slot {
    int reports, status;
    int32_t partition;
    int64_t offset;
} dr_slot;

typedef struct dr_log {
    int ok, failed;
    int64_t last_offset[MAX_PARTS];
    int out_of_order;
} dr_log;

static dr_log drs;

static void dr_reset(void)
{
    memset(&drs, 0, sizeof(drs));
    for (int i = 0; i < MAX_PARTS; i++)
        drs.last_offset[i] = -1;
}

static void on_dr(void *opaque, int status, const char *err, int32_t partition, int64_t offset)
{
    dr_slot *s = opaque;
    if (s != NULL)
        *s = (dr_slot){ s->reports + 1, status, partition, offset };
    if (status != PX_OK || partition < 0 || partition >= MAX_PARTS) {
        drs.failed++;
        return;
    }
    drs.ok++;
    if (offset <= drs.last_offset[partition])
        drs.out_of_order++;
    drs.last_offset[partition] = offset;
}

/* Kafka's partitioner (Java Utils.murmur2, positive, modulo the count):
 * librdkafka's murmur2_random must agree with it so that Java and C
 * producers put a user on the same partition. */
static uint32_t murmur2(const char *key, size_t len)
{
    const uint32_t m = 0x5bd1e995;
    uint32_t h = 0x9747b28c ^ (uint32_t)len;
    const unsigned char *p = (const unsigned char *)key;
    size_t i = 0;
    for (; i + 4 <= len; i += 4) {
        uint32_t k = p[i] | (uint32_t)p[i + 1] << 8 | (uint32_t)p[i + 2] << 16 |
                     (uint32_t)p[i + 3] << 24;
        k *= m;
        k ^= k >> 24;
        k *= m;
        h = h * m ^ k;
    }
    switch (len & 3) {
    case 3: h ^= (uint32_t)p[i + 2] << 16; /* fall through */
    case 2: h ^= (uint32_t)p[i + 1] << 8;  /* fall through */
    case 1: h ^= p[i]; h *= m;
    }
    h ^= h >> 13;
    h *= m;
    h ^= h >> 15;
    return h;
}

static int32_t java_partition(const char *key, int parts)
{
    return (int32_t)((murmur2(key, strlen(key)) & 0x7fffffff) % (uint32_t)parts);
}

static const char *brokers(void)
{
    const char *b = getenv("PARLEY_KAFKA_BROKERS");
    return b ? b : "127.0.0.1:19092";
}

static void unique_name(char *out, size_t n, const char *what)
{
    snprintf(out, n, "it.%s.%d.%lld", what, (int)getpid(), (long long)px_now_ms());
}

static bus *open_bus(const char *group, int partitions)
{
    char err[PX_ERRLEN];
    bus_conf c = { .brokers = brokers(), .client_id = "it", .group = group,
                   .partitions = partitions, .dr_cb = on_dr };
    bus *b = bus_new(&c, err, sizeof(err));
    ck_assert_msg(b != NULL, "bus_new: %s", err);
    return b;
}

static void create_topic(bus *b, const char *topic)
{
    char err[PX_ERRLEN];
    const char *t[] = { topic };
    ck_assert_msg(bus_ensure_topics(b, t, 1, 15000, err, sizeof(err)) == PX_OK, "%s", err);
}

static void subscribe(bus *b, const char *topic)
{
    char err[PX_ERRLEN];
    const char *t[] = { topic };
    ck_assert_msg(bus_subscribe(b, t, 1, err, sizeof(err)) == PX_OK, "subscribe: %s", err);
}

/* Values are "<key>:<seq>". */
static void produce_n(bus *b, const char *topic, const char *key, int from, int n)
{
    char err[PX_ERRLEN], val[48];
    for (int i = from; i < from + n; i++) {
        int len = snprintf(val, sizeof(val), "%s:%d", key, i);
        ck_assert_msg(bus_produce(b, topic, key, strlen(key), val, (size_t)len, NULL, err,
                                  sizeof(err)) == PX_OK, "produce: %s", err);
    }
}

static int value_seq(const bus_msg *m)
{
    const char *colon = memchr(m->value, ':', m->len);
    ck_assert_ptr_nonnull(colon);
    return atoi(colon + 1);
}

/* Which records a consumer marks durable. */
enum commit_what { COMMIT_NONE, COMMIT_ALL, COMMIT_FIRST_HALF };

static void commit_some(bus *b, const bus_msg *msgs, int n, enum commit_what what)
{
    for (int i = 0; i < n; i++)
        if (what == COMMIT_ALL || (what == COMMIT_FIRST_HALF && value_seq(&msgs[i]) < NREC / 2))
            bus_commit(b, &msgs[i], 1);
}

/* Consumes until want records arrived or timeout; calls fn per record. */
typedef void (*rec_fn)(const bus_msg *m, void *arg);
static int consume_until(bus *b, int want, int timeout_ms, enum commit_what what, rec_fn fn,
                         void *arg)
{
    bus_msg msgs[256];
    char err[PX_ERRLEN];
    int got = 0;
    int64_t end = px_mono_ms() + timeout_ms;
    while (got < want && px_mono_ms() < end) {
        int n = bus_consume(b, msgs, PX_ARRAY_LEN(msgs), 200, err, sizeof(err));
        ck_assert_msg(n >= 0, "consume: %s", err);
        for (int i = 0; i < n; i++)
            fn(&msgs[i], arg);
        commit_some(b, msgs, n, what);
        bus_release(b, msgs, (size_t)n);
        got += n;
    }
    return got;
}

static const char *const keys[] = { "user-alice", "user-bob", "user-carol" };

typedef struct key_track {
    int partition[3];
    int next[3];
    int bad;
} key_track;

static void track(const bus_msg *m, void *arg)
{
    key_track *t = arg;
    int k = 0;
    while (k < 3 && (m->key_len != strlen(keys[k]) || memcmp(m->key, keys[k], m->key_len) != 0))
        k++;
    ck_assert_int_lt(k, 3);
    int seq = value_seq(m);
    if (t->partition[k] == -1)
        t->partition[k] = m->partition;
    if (t->partition[k] != m->partition || seq != t->next[k])
        t->bad++;
    t->next[k] = seq + 1;
}

/* (a) 3 keys interleaved on an 8-partition topic: each key's records come
 * back from a single partition, the one Java's partitioner picks, in
 * produce order. */
START_TEST(same_key_one_partition_in_order)
{
    char topic[128], group[160];
    unique_name(topic, sizeof(topic), "order");
    snprintf(group, sizeof(group), "%s.g", topic);
    ck_assert_uint_eq(murmur2("kafka", 5), 0xd067cf64); /* librdkafka's test vector */
    bus *p = open_bus(NULL, PARTS);
    create_topic(p, topic);
    dr_reset();
    for (int round = 0; round < 100; round++)
        for (int k = 0; k < 3; k++)
            produce_n(p, topic, keys[k], round, 1);
    ck_assert_int_eq(bus_flush(p, 10000), PX_OK);
    ck_assert_int_eq(drs.ok, 300);
    ck_assert_int_eq(drs.failed, 0);

    bus *c = open_bus(group, PARTS);
    subscribe(c, topic);
    key_track kt = { { -1, -1, -1 }, { 0, 0, 0 }, 0 };
    ck_assert_int_eq(consume_until(c, 300, 30000, COMMIT_ALL, track, &kt), 300);
    ck_assert_int_eq(kt.bad, 0);
    for (int k = 0; k < 3; k++) {
        ck_assert_int_eq(kt.next[k], 100);
        ck_assert_int_eq(kt.partition[k], java_partition(keys[k], PARTS));
    }
    bus_destroy(c);
    bus_destroy(p);
}
END_TEST

/* Consumes until the bus holds want partitions or ms pass. */
static void await_assigned(bus *c, int want, int ms)
{
    char err[PX_ERRLEN];
    bus_msg m[4];
    int64_t end = px_mono_ms() + ms;
    while (bus_assigned(c) != want && px_mono_ms() < end) {
        int n = bus_consume(c, m, 4, 200, err, sizeof(err));
        ck_assert_msg(n >= 0, "consume: %s", err);
        bus_release(c, m, (size_t)n);
    }
}

/* A consumer joining right after bus_ensure_topics created its topic gets
 * every partition of it (creating waits until the brokers' metadata shows
 * the topic led), and bus_assigned says so; 0 before the first assignment.
 * A gateway's /readyz reads it (issue 16's chaos runs found a gateway
 * holding none of its fresh delivery topic). */
START_TEST(fresh_topic_fully_assigned)
{
    char topic[128], group[160];
    unique_name(topic, sizeof(topic), "assign");
    snprintf(group, sizeof(group), "%s.g", topic);
    bus *c = open_bus(group, PARTS);
    create_topic(c, topic);
    ck_assert_int_eq(bus_assigned(c), 0);
    subscribe(c, topic);
    await_assigned(c, PARTS, 30000);
    ck_assert_int_eq(bus_assigned(c), PARTS);
    bus_destroy(c);
}
END_TEST

/* A group whose join found its topic missing gets every partition once
 * the topic appears (librdkafka looks again for a subscribed topic it
 * does not know). A chaos run's fresh three-node cluster once left a
 * gateway holding none of its delivery topic for good although the topic
 * existed when it joined; for that case the gateway joins again itself
 * (resubscribe_joins_again, deliver.c). */
START_TEST(topic_created_after_an_empty_assignment_is_assigned)
{
    char topic[128], group[160];
    unique_name(topic, sizeof(topic), "late");
    snprintf(group, sizeof(group), "%s.g", topic);
    bus *c = open_bus(group, PARTS);
    subscribe(c, topic);
    await_assigned(c, -1, 3000); /* the join, which finds no topic */
    ck_assert_int_eq(bus_assigned(c), 0);
    bus *p = open_bus(NULL, PARTS);
    create_topic(p, topic);
    await_assigned(c, PARTS, 30000);
    ck_assert_int_eq(bus_assigned(c), PARTS);
    bus_destroy(p);
    bus_destroy(c);
}
END_TEST

/* bus_resubscribe leaves the group and joins it again: the member's
 * assignment is revoked (the generation moves) and given back whole. A
 * gateway holding none of its own topic does it (deliver.c). */
START_TEST(resubscribe_joins_again)
{
    char topic[128], group[160], err[PX_ERRLEN];
    unique_name(topic, sizeof(topic), "rejoin");
    snprintf(group, sizeof(group), "%s.g", topic);
    bus *c = open_bus(group, PARTS);
    create_topic(c, topic);
    subscribe(c, topic);
    await_assigned(c, PARTS, 30000);
    ck_assert_int_eq(bus_assigned(c), PARTS);
    unsigned gen = bus_generation(c);
    ck_assert_msg(bus_resubscribe(c, err, sizeof(err)) == PX_OK, "%s", err);
    bus_msg m[4];
    int64_t end = px_mono_ms() + 30000;
    while ((bus_generation(c) - gen < 2 || bus_assigned(c) != PARTS) && px_mono_ms() < end) {
        int n = bus_consume(c, m, 4, 200, err, sizeof(err));
        ck_assert_msg(n >= 0, "consume: %s", err);
        bus_release(c, m, (size_t)n);
    }
    ck_assert_uint_ge(bus_generation(c) - gen, 2); /* revoked, then assigned */
    ck_assert_int_eq(bus_assigned(c), PARTS);
    bus_destroy(c);
}
END_TEST

/* Lags of a partition list from a bus_lags answer, by partition. */
static void lags_of(bus *c, const char *topic, int64_t *rec, int parts)
{
    bus_lag lags[MAX_PARTS];
    char err[PX_ERRLEN] = "";
    int n = bus_lags(c, lags, MAX_PARTS, 10000, err, sizeof(err));
    ck_assert_msg(n == parts, "bus_lags: %d partitions (%s)", n, err);
    for (int i = 0; i < n; i++) {
        ck_assert_str_eq(lags[i].topic, topic);
        ck_assert(lags[i].partition >= 0 && lags[i].partition < parts);
        rec[lags[i].partition] = lags[i].records;
    }
}

/* bus_lags tells, per partition assigned, the records not consumed yet:
 * none on an empty topic, each partition's own count once records were
 * produced and none read (from the earliest: nothing committed), none
 * again once all were consumed. presence's expiry waits on it (issue 16:
 * one partition read up to now says nothing of another that lags). */
START_TEST(lags_per_partition)
{
    enum { LAG_PARTS = 2, N = 9 };
    char topic[128], group[160], err[PX_ERRLEN], key[16];
    unique_name(topic, sizeof(topic), "lag");
    snprintf(group, sizeof(group), "%s.g", topic);
    bus *c = open_bus(group, LAG_PARTS);
    create_topic(c, topic);
    ck_assert_int_eq(bus_lags(c, NULL, 0, 1000, err, sizeof(err)), 0); /* nothing assigned */
    subscribe(c, topic);
    bus_msg m[N];
    int64_t end = px_mono_ms() + 30000;
    while (bus_assigned(c) == 0 && px_mono_ms() < end) {
        int n = bus_consume(c, m, N, 200, err, sizeof(err));
        ck_assert_msg(n >= 0, "consume: %s", err);
        bus_release(c, m, (size_t)n);
    }
    int64_t rec[LAG_PARTS], want[LAG_PARTS] = { 0 };
    lags_of(c, topic, rec, LAG_PARTS);
    ck_assert(rec[0] == 0 && rec[1] == 0);
    for (int i = 0; i < N; i++) {
        snprintf(key, sizeof(key), "k%d", i);
        want[java_partition(key, LAG_PARTS)]++;
        ck_assert_int_eq(bus_produce(c, topic, key, strlen(key), "v", 1, NULL, err, sizeof(err)),
                         PX_OK);
    }
    ck_assert_int_eq(bus_flush(c, 10000), PX_OK);
    ck_assert_msg(want[0] > 0 && want[1] > 0, "keys on one partition only");
    lags_of(c, topic, rec, LAG_PARTS);
    ck_assert_int_eq(rec[0], want[0]);
    ck_assert_int_eq(rec[1], want[1]);
    int got = 0;
    end = px_mono_ms() + 30000;
    while (got < N && px_mono_ms() < end) {
        int n = bus_consume(c, m, N, 200, err, sizeof(err));
        ck_assert_msg(n >= 0, "consume: %s", err);
        got += n;
        bus_release(c, m, (size_t)n);
    }
    ck_assert_int_eq(got, N);
    lags_of(c, topic, rec, LAG_PARTS);
    ck_assert(rec[0] == 0 && rec[1] == 0);
    bus_destroy(c);
}
END_TEST

/* (b) One report per record, with the record's own opaque, PX_OK, on the
 * partition its key maps to, at the next offset of that partition. The
 * topic has 5 partitions (the broker's auto-create default is 8), so the
 * mapping also proves bus_ensure_topics created it with conf->partitions. */
START_TEST(delivery_reports_carry_opaque_partition_and_offset)
{
    enum { N = 200, DR_PARTS = 5, DR_KEYS = 7 };
    char topic[128];
    unique_name(topic, sizeof(topic), "dr");
    bus *p = open_bus(NULL, DR_PARTS);
    create_topic(p, topic);
    create_topic(p, topic); /* an existing topic is not an error */
    dr_reset();
    static dr_slot slot[N];
    memset(slot, 0, sizeof(slot));
    char err[PX_ERRLEN], key[16];
    for (int i = 0; i < N; i++) {
        snprintf(key, sizeof(key), "u%d", i % DR_KEYS);
        ck_assert_int_eq(bus_produce(p, topic, key, strlen(key), "v", 1, &slot[i], err,
                                     sizeof(err)), PX_OK);
    }
    ck_assert_int_eq(bus_flush(p, 10000), PX_OK);
    int64_t next[DR_PARTS] = { 0 }; /* a new topic's offsets start at 0 */
    for (int i = 0; i < N; i++) {
        snprintf(key, sizeof(key), "u%d", i % DR_KEYS);
        ck_assert_msg(slot[i].reports == 1, "record %d: %d reports", i, slot[i].reports);
        ck_assert_int_eq(slot[i].status, PX_OK);
        ck_assert_int_eq(slot[i].partition, java_partition(key, DR_PARTS));
        ck_assert_int_eq(slot[i].offset, next[slot[i].partition]++);
    }
    ck_assert_int_eq(drs.ok, N);
    ck_assert_int_eq(drs.out_of_order, 0);
    bus_destroy(p);
}
END_TEST

typedef struct seen_set {
    int count[NREC];
    int other;
} seen_set;

static void note(const bus_msg *m, void *arg)
{
    seen_set *s = arg;
    int seq = value_seq(m);
    if (seq >= 0 && seq < NREC)
        s->count[seq]++;
    else
        s->other++;
}

/* One key, so one partition and "committed up to NREC/2" is well defined. */
static void produce_commit_topic(const char *topic)
{
    bus *p = open_bus(NULL, PARTS);
    create_topic(p, topic);
    produce_n(p, topic, "k0", 0, NREC);
    ck_assert_int_eq(bus_flush(p, 10000), PX_OK);
    bus_destroy(p);
}

/* A new member of the group must get exactly the second half: the first
 * half was committed, the second never was. */
static void expect_second_half_only(const char *topic, const char *group)
{
    bus *c = open_bus(group, PARTS);
    subscribe(c, topic);
    seen_set s;
    memset(&s, 0, sizeof(s));
    int got = consume_until(c, NREC / 2, 40000, COMMIT_ALL, note, &s);
    /* Anything more would be a record committed but delivered again. */
    got += consume_until(c, 1, 500, COMMIT_ALL, note, &s);
    ck_assert_int_eq(s.other, 0);
    for (int i = 0; i < NREC / 2; i++)
        ck_assert_msg(s.count[i] == 0, "committed record %d delivered again", i);
    for (int i = NREC / 2; i < NREC; i++)
        ck_assert_msg(s.count[i] == 1, "uncommitted record %d seen %d times", i, s.count[i]);
    ck_assert_int_eq(got, NREC / 2);
    bus_destroy(c);
}

static void ignore(const bus_msg *m, void *arg)
{
}

/* The offsets group has committed on topic, summed over its partitions,
 * as the broker answers (-1 if it does not), asked by a handle of its own
 * that never joins the group. */
static int64_t committed_offsets(const char *topic, const char *group)
{
    char e[256];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    if (rd_kafka_conf_set(conf, "bootstrap.servers", brokers(), e, sizeof(e)) != RD_KAFKA_CONF_OK ||
        rd_kafka_conf_set(conf, "group.id", group, e, sizeof(e)) != RD_KAFKA_CONF_OK ||
        rd_kafka_conf_set(conf, "enable.auto.commit", "false", e, sizeof(e)) != RD_KAFKA_CONF_OK) {
        rd_kafka_conf_destroy(conf);
        return -1;
    }
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, e, sizeof(e));
    if (rk == NULL)
        return -1;
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(PARTS);
    for (int p = 0; p < PARTS; p++)
        rd_kafka_topic_partition_list_add(l, topic, p);
    int64_t sum = -1;
    if (rd_kafka_committed(rk, l, 10000) == RD_KAFKA_RESP_ERR_NO_ERROR)
        for (int i = sum = 0; i < l->cnt; i++)
            sum += PX_MAX(l->elems[i].offset, 0);
    rd_kafka_topic_partition_list_destroy(l);
    rd_kafka_destroy(rk);
    return sum;
}

/* Consumes everything, commits only the first half, waits until the
 * periodic auto-commit has brought that half to Kafka (asked, not slept
 * for), then dies by SIGKILL: no close, no final commit. */
static void child_consume_then_die(const char *topic, const char *group)
{
    bus *c = open_bus(group, PARTS);
    subscribe(c, topic);
    if (consume_until(c, NREC, 30000, COMMIT_FIRST_HALF, ignore, NULL) < NREC)
        _exit(3);
    int64_t end = px_mono_ms() + 30000;
    while (committed_offsets(topic, group) != NREC / 2)
        if (px_mono_ms() > end)
            _exit(4);
        else
            usleep(100 * 1000);
    kill(getpid(), SIGKILL);
}

/* (c) crash: the uncommitted half comes again, the committed half does not. */
START_TEST(uncommitted_records_come_again_after_a_crash)
{
    char topic[128], group[160];
    unique_name(topic, sizeof(topic), "crash");
    snprintf(group, sizeof(group), "%s.g", topic);
    /* The producer is gone before fork: the child starts with no
     * librdkafka threads and no locks held by them. */
    produce_commit_topic(topic);
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0)
        child_consume_then_die(topic, group);
    int st;
    ck_assert_int_eq(waitpid(pid, &st, 0), pid);
    ck_assert_msg(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL,
                  "child did not consume everything (exit 3) or its commit never reached "
                  "Kafka (exit 4): status %d", st);
    expect_second_half_only(topic, group);
}
END_TEST

/* (c) clean restart: bus_destroy right after the last bus_commit leaves the
 * group with what was marked committed, and nothing beyond it. */
START_TEST(clean_restart_resumes_after_last_commit)
{
    char topic[128], group[160];
    unique_name(topic, sizeof(topic), "restart");
    snprintf(group, sizeof(group), "%s.g", topic);
    produce_commit_topic(topic);
    bus *c = open_bus(group, PARTS);
    subscribe(c, topic);
    ck_assert_int_eq(consume_until(c, NREC, 30000, COMMIT_FIRST_HALF, ignore, NULL), NREC);
    bus_destroy(c);
    expect_second_half_only(topic, group);
}
END_TEST

static int readable(int fd, int timeout_ms)
{
    struct pollfd pfd = { .fd = fd, .events = POLLIN };
    int r = poll(&pfd, 1, timeout_ms);
    return r > 0 && (pfd.revents & POLLIN);
}

/* The first records group's member takes (at most 4), driven by the fd
 * alone: joining the group and fetching take several wake-ups (rebalance
 * events come through the same queue). */
static int fd_first_take(bus *c, int fd, bus_msg *m)
{
    char err[PX_ERRLEN];
    int got = 0;
    int64_t end = px_mono_ms() + 30000;
    while (got == 0 && px_mono_ms() < end)
        if (readable(fd, 1000))
            got = bus_consume(c, m, 4, 0, err, sizeof(err));
    ck_assert_int_ge(got, 0);
    bus_release(c, m, (size_t)got);
    return got;
}

/* (d) The fd wakes a reactor when records arrive, stays readable while
 * records remain after a partial bus_consume, and is quiet once drained. */
START_TEST(consume_fd_signals_records)
{
    char topic[128], group[160];
    unique_name(topic, sizeof(topic), "fd");
    snprintf(group, sizeof(group), "%s.g", topic);
    bus *p = open_bus(NULL, PARTS);
    create_topic(p, topic);
    bus *c = open_bus(group, PARTS);
    subscribe(c, topic);
    int fd = bus_consume_fd(c);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(bus_consume_fd(c), fd);
    produce_n(p, topic, "k0", 0, 1);
    ck_assert_int_eq(bus_flush(p, 10000), PX_OK);
    bus_msg m[4];
    char err[PX_ERRLEN];
    ck_assert_int_eq(fd_first_take(c, fd, m), 1);
    ck_assert_msg(!readable(fd, 300), "fd readable with nothing to consume");
    bus_destroy(c);

    /* More records than one bus_consume takes, all in the log before a
     * new member's first fetch, so they land in its queue at once: after
     * each partial take the fd must still say "more", or a reactor would
     * stall on them. */
    produce_n(p, topic, "k0", 1, 10);
    ck_assert_int_eq(bus_flush(p, 10000), PX_OK);
    snprintf(group, sizeof(group), "%s.g2", topic);
    c = open_bus(group, PARTS);
    subscribe(c, topic);
    fd = bus_consume_fd(c);
    int got = fd_first_take(c, fd, m);
    ck_assert_int_gt(got, 0);
    while (got < 11) {
        ck_assert_msg(readable(fd, 2000), "fd quiet with %d records left", 11 - got);
        int n = bus_consume(c, m, 4, 0, err, sizeof(err));
        ck_assert_int_ge(n, 0);
        bus_release(c, m, (size_t)n);
        got += n;
    }
    ck_assert_int_eq(got, 11);
    bus_destroy(c);
    bus_destroy(p);
}
END_TEST

typedef struct consume_arg {
    bus *b;
    int n;
} consume_arg;

/* Its own timeout is past the test's limit (90 s): only bus_wakeup can
 * end this call in time. */
static void *consume_long(void *arg)
{
    consume_arg *a = arg;
    bus_msg m[4];
    char err[PX_ERRLEN];
    a->n = bus_consume(a->b, m, 4, 600000, err, sizeof(err));
    if (a->n > 0)
        bus_release(a->b, m, (size_t)a->n);
    return NULL;
}

/* bus_wakeup ends a long bus_consume in another thread. */
START_TEST(wakeup_ends_a_blocked_consume)
{
    char topic[128], group[160];
    unique_name(topic, sizeof(topic), "wake");
    snprintf(group, sizeof(group), "%s.g", topic);
    bus *c = open_bus(group, PARTS);
    create_topic(c, topic);
    subscribe(c, topic);
    consume_arg a = { .b = c };
    pthread_t th;
    ck_assert_int_eq(pthread_create(&th, NULL, consume_long, &a), 0);
    /* Most likely inside the wait by now; a wakeup that comes before it
     * must end the call all the same (it is kept until the next poll). */
    usleep(500 * 1000);
    bus_wakeup(c);
    pthread_join(th, NULL);
    ck_assert_int_eq(a.n, 0);
    bus_destroy(c);
}
END_TEST

/* A fatal librdkafka error on the producer (2.0.2's idempotent producer out
 * of step with a broker after a leader's kill -9, in one chaos run in two)
 * is permanent for that handle: the bus makes a new producer at its next
 * poll instead of failing for good. Every record produced before gets a
 * report (none is left silent: its caller would wait forever), and every
 * record produced after is delivered and consumed. */
START_TEST(fatal_producer_error_makes_a_new_producer)
{
    char topic[128], group[160], err[PX_ERRLEN];
    unique_name(topic, sizeof(topic), "fatal");
    snprintf(group, sizeof(group), "%s.g", topic);
    bus *b = open_bus(group, PARTS);
    create_topic(b, topic);
    subscribe(b, topic);
    dr_reset();
    produce_n(b, topic, "k", 0, 20); /* queued or in flight when it fails */
    ck_assert_int_eq(bus_test_fail(b), PX_OK);
    ck_assert_int_eq(bus_produce(b, topic, "k", 1, "k:99", 4, NULL, err, sizeof(err)), PX_ERROR);
    ck_assert_msg(strstr(err, "fatal") != NULL, "produce error: %s", err);
    bus_poll(b, 0);
    ck_assert_int_eq(bus_failed(b), 0);
    produce_n(b, topic, "k", 20, 20);
    ck_assert_int_eq(bus_flush(b, 10000), PX_OK);
    ck_assert_int_eq(drs.ok + drs.failed, 40);
    ck_assert_int_ge(drs.ok, 20);
    seen_set seen = { 0 };
    consume_until(b, drs.ok, 30000, COMMIT_ALL, note, &seen);
    for (int i = 20; i < 40; i++)
        ck_assert_msg(seen.count[i] >= 1, "record %d, produced after the failure, not consumed", i);
    /* The ninth failure in one process is one too many: the bus fails for
     * good and its owner exits, to be restarted. */
    for (int i = 1; i < 8; i++) {
        ck_assert_int_eq(bus_test_fail(b), PX_OK);
        bus_poll(b, 0);
        ck_assert_int_eq(bus_failed(b), 0);
    }
    ck_assert_int_eq(bus_test_fail(b), PX_OK);
    bus_poll(b, 0);
    ck_assert_int_eq(bus_failed(b), 1);
    bus_destroy(b);
}
END_TEST

/* Nothing can be acknowledged without a broker: no report says PX_OK, the
 * flush times out with PX_AGAIN, topic creation fails (a hang would be
 * caught by the test's limit). */
START_TEST(unreachable_broker_fails_cleanly)
{
    char err[PX_ERRLEN];
    dr_reset();
    bus_conf c = { .brokers = "127.0.0.1:1", .client_id = "it", .partitions = 1,
                   .dr_cb = on_dr };
    bus *b = bus_new(&c, err, sizeof(err));
    ck_assert_ptr_nonnull(b);
    ck_assert_int_eq(bus_produce(b, "it.none", "k", 1, "v", 1, NULL, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(bus_flush(b, 1000), PX_AGAIN);
    const char *t[] = { "it.none" };
    ck_assert_int_eq(bus_ensure_topics(b, t, 1, 1000, err, sizeof(err)), PX_ERROR);
    ck_assert_int_eq(drs.ok, 0);
    bus_destroy(b);
    ck_assert_int_eq(drs.ok, 0);
}
END_TEST

/* Operator overrides reach librdkafka: a good pair is applied (a consumer
 * whose fetch.wait.max.ms came from the variable works end to end), a bad
 * key or a pair without '=' stops bus_new with the variable's name. */
static bus *bus_with_env(const char *env, const char *value, const char *group, char *err,
                         size_t errlen)
{
    setenv(env, value, 1);
    bus_conf c = { .brokers = brokers(), .client_id = "it", .group = group, .partitions = 1,
                   .dr_cb = on_dr };
    bus *b = bus_new(&c, err, errlen);
    unsetenv(env);
    return b;
}

START_TEST(config_overrides_apply_or_fail_start)
{
    char err[PX_ERRLEN] = "";
    ck_assert_ptr_null(bus_with_env("PARLEY_KAFKA_PRODUCER_CONFIG", "linger.ms=1,no.such.key=1",
                                    NULL, err, sizeof(err)));
    ck_assert_msg(strstr(err, "no.such.key") != NULL, "%s", err);
    ck_assert_ptr_null(bus_with_env("PARLEY_KAFKA_CONSUMER_CONFIG", "fetch.wait.max.ms",
                                    "it.cfg", err, sizeof(err)));
    ck_assert_msg(strstr(err, "PARLEY_KAFKA_CONSUMER_CONFIG") != NULL, "%s", err);

    char topic[96], group[96];
    unique_name(topic, sizeof(topic), "cfg");
    unique_name(group, sizeof(group), "cfg-g");
    bus *b = bus_with_env("PARLEY_KAFKA_CONSUMER_CONFIG", "fetch.wait.max.ms=20", group, err,
                          sizeof(err));
    ck_assert_msg(b != NULL, "bus_new: %s", err);
    bus *p = bus_with_env("PARLEY_KAFKA_PRODUCER_CONFIG", "linger.ms=5", NULL, err, sizeof(err));
    ck_assert_msg(p != NULL, "bus_new: %s", err);
    create_topic(p, topic);
    subscribe(b, topic);
    ck_assert_int_eq(bus_produce(p, topic, "k", 1, "v", 1, NULL, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(bus_flush(p, 10000), PX_OK);
    bus_msg m;
    int n = 0;
    for (int i = 0; i < 150 && n == 0; i++)
        n = bus_consume(b, &m, 1, 100, err, sizeof(err));
    ck_assert_int_eq(n, 1);
    ck_assert_int_eq((int)m.len, 1);
    bus_release(b, &m, 1);
    bus_destroy(p);
    bus_destroy(b);
}
END_TEST

/* A bulk topic goes through a producer of its own that lingers
 * PARLEY_KAFKA_BULK_LINGER_MS (here 1 s, so only a flush that covers it
 * can report in time): bus_flush sends and reports both producers'
 * records, each in its partition's order; a linger out of range stops
 * bus_new naming the variable. */
START_TEST(bulk_topic_flushed_and_reported)
{
    enum { N = 100, BULK_PARTS = 3 };
    char live[128], bulk[128], err[PX_ERRLEN] = "", key[16];
    unique_name(live, sizeof(live), "live");
    unique_name(bulk, sizeof(bulk), "bulk");
    bus_conf c = { .brokers = brokers(), .client_id = "it", .partitions = BULK_PARTS,
                   .dr_cb = on_dr, .bulk_topic = bulk };
    setenv("PARLEY_KAFKA_BULK_LINGER_MS", "5000", 1);
    ck_assert_ptr_null(bus_new(&c, err, sizeof(err)));
    ck_assert_msg(strstr(err, "PARLEY_KAFKA_BULK_LINGER_MS") != NULL, "%s", err);
    setenv("PARLEY_KAFKA_BULK_LINGER_MS", "1000", 1);
    bus *p = bus_new(&c, err, sizeof(err));
    unsetenv("PARLEY_KAFKA_BULK_LINGER_MS");
    ck_assert_msg(p != NULL, "bus_new: %s", err);
    create_topic(p, live);
    create_topic(p, bulk);
    static dr_slot slot[2 * N];
    memset(slot, 0, sizeof(slot));
    dr_reset();
    for (int i = 0; i < 2 * N; i++) {
        snprintf(key, sizeof(key), "u%d", i % 7);
        ck_assert_int_eq(bus_produce(p, i % 2 ? bulk : live, key, strlen(key), "v", 1, &slot[i],
                                     err, sizeof(err)), PX_OK);
    }
    ck_assert_int_eq(bus_flush(p, 10000), PX_OK);
    int64_t next[2][BULK_PARTS] = { { 0 } };
    for (int i = 0; i < 2 * N; i++) {
        ck_assert_msg(slot[i].reports == 1, "record %d (%s): %d reports", i,
                      i % 2 ? "bulk" : "live", slot[i].reports);
        ck_assert_int_eq(slot[i].status, PX_OK);
        ck_assert_int_eq(slot[i].offset, next[i % 2][slot[i].partition]++);
    }
    bus_destroy(p);
}
END_TEST

/* The security settings are checked at start and name the variable at
 * fault; the password comes from its file and is in no error. (Under make
 * test-tls every other test here runs over SASL_SSL.) */
static bus *bus_with_security(const char *const *kv, char *err, size_t errlen)
{
    static const char *const vars[] = {
        "PARLEY_KAFKA_SECURITY_PROTOCOL", "PARLEY_KAFKA_SASL_MECHANISM",
        "PARLEY_KAFKA_SASL_USERNAME", "PARLEY_KAFKA_SASL_PASSWORD_FILE",
        "PARLEY_KAFKA_SSL_CA_FILE", "PARLEY_KAFKA_SSL_CERT_FILE", "PARLEY_KAFKA_SSL_KEY_FILE",
    };
    for (size_t i = 0; i < PX_ARRAY_LEN(vars); i++)
        unsetenv(vars[i]); /* this test runs in a process of its own */
    for (; kv[0] != NULL; kv += 2)
        setenv(kv[0], kv[1], 1);
    bus_conf c = { .brokers = "127.0.0.1:1", .client_id = "it", .partitions = 1,
                   .dr_cb = on_dr };
    err[0] = '\0';
    return bus_new(&c, err, errlen);
}

START_TEST(security_settings_checked_at_start)
{
    char err[PX_ERRLEN], pw[] = "/tmp/parley-it-pw.XXXXXX";
    int fd = mkstemp(pw);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(write(fd, "s3cret-never-logged\n", 20), 20);
    close(fd);
#define P "PARLEY_KAFKA_SECURITY_PROTOCOL"
#define M "PARLEY_KAFKA_SASL_MECHANISM"
#define U "PARLEY_KAFKA_SASL_USERNAME", "parley"
#define F "PARLEY_KAFKA_SASL_PASSWORD_FILE"
    const struct { const char *kv[9]; const char *want; } bad[] = {
        { { P, "sasl_tls", NULL }, P },
        { { P, "sasl_ssl", M, "PLAIN", U, NULL }, "_PASSWORD_FILE" },
        { { P, "sasl_ssl", M, "PLAIN", U, F, "/nonexistent/pw", NULL }, "cannot open" },
        { { P, "sasl_plaintext", M, "NOPE", U, F, pw, NULL }, "NOPE" },
        { { P, "ssl", "PARLEY_KAFKA_SSL_CA_FILE", "/nonexistent/ca.pem", NULL }, "ssl.ca.location" },
    };
    for (size_t i = 0; i < PX_ARRAY_LEN(bad); i++) {
        bus *b = bus_with_security(bad[i].kv, err, sizeof(err));
        ck_assert_msg(b == NULL, "case %zu started", i);
        ck_assert_msg(strstr(err, bad[i].want) != NULL, "case %zu: %s", i, err);
        ck_assert_msg(strstr(err, "s3cret") == NULL, "case %zu: %s", i, err);
    }
    const char *const good[] = { P, "sasl_plaintext", M, "PLAIN", U, F, pw, NULL };
#undef P
#undef M
#undef U
#undef F
    bus *b = bus_with_security(good, err, sizeof(err));
    ck_assert_msg(b != NULL, "bus_new: %s", err);
    bus_destroy(b);
    unlink(pw);
}
END_TEST

/* The partitions of topic the group gave leader, as a bitmask. */
static unsigned held_mask(bus *leader, const char *topic)
{
    bus_lag lags[MAX_PARTS];
    char err[PX_ERRLEN] = "";
    int n = bus_lags(leader, lags, MAX_PARTS, 10000, err, sizeof(err));
    ck_assert_msg(n >= 0, "bus_lags: %s", err);
    unsigned mask = 0;
    for (int i = 0; i < n; i++)
        if (strcmp(lags[i].topic, topic) == 0)
            mask |= 1u << lags[i].partition;
    return mask;
}

static bus *open_follower(const char *group, bus *leader)
{
    char err[PX_ERRLEN];
    bus_conf c = { .brokers = brokers(), .client_id = "it-follower", .group = group,
                   .partitions = PARTS, .dr_cb = on_dr, .follow = leader };
    bus *b = bus_new(&c, err, sizeof(err));
    ck_assert_msg(b != NULL, "bus_new: %s", err);
    return b;
}

/* Consumes from f until want records or ms (serving the leaders' polls
 * too, which a group needs); ORs the partitions seen into *mask. */
static int follow_take(bus *f, bus *const *leaders, int nl, int want, int ms, unsigned *mask)
{
    char err[PX_ERRLEN];
    bus_msg m[64];
    int got = 0;
    int64_t end = px_mono_ms() + ms;
    while (got < want && px_mono_ms() < end) {
        for (int i = 0; i < nl; i++) {
            int n = bus_consume(leaders[i], m, PX_ARRAY_LEN(m), 20, err, sizeof(err));
            ck_assert_msg(n >= 0, "leader consume: %s", err);
            bus_release(leaders[i], m, (size_t)n);
        }
        int n = bus_consume(f, m, PX_ARRAY_LEN(m), 50, err, sizeof(err));
        ck_assert_msg(n >= 0, "follower consume: %s", err);
        for (int i = 0; i < n; i++)
            *mask |= 1u << m[i].partition;
        bus_commit(f, m, (size_t)n);
        bus_release(f, m, (size_t)n);
        got += n;
    }
    return got;
}

static void produce_keys(bus *b, const char *topic, int n)
{
    char key[16];
    for (int i = 0; i < n; i++) {
        snprintf(key, sizeof(key), "k%d", i);
        produce_n(b, topic, key, 0, 1);
    }
    ck_assert_int_eq(bus_flush(b, 10000), PX_OK);
}

/* A follower (bus_conf.follow: message-store's acker) reads exactly the
 * partition numbers its leader's group gave the leader, of a topic of its
 * own, and moves with them: two leaders in one group split the partitions
 * and each follower reads its leader's half of the other topic; when one
 * leader leaves, the other's follower takes every partition, from its
 * group's committed offsets (commits of a group without members). */
START_TEST(a_follower_reads_the_partitions_its_leader_holds)
{
    char lead_topic[128], topic[128], group[160], fgroup[160];
    unique_name(lead_topic, sizeof(lead_topic), "lead");
    unique_name(topic, sizeof(topic), "follow");
    snprintf(group, sizeof(group), "%s.g", lead_topic);
    snprintf(fgroup, sizeof(fgroup), "%s.g", topic);
    bus *l1 = open_bus(group, PARTS), *l2 = open_bus(group, PARTS);
    create_topic(l1, lead_topic);
    create_topic(l1, topic);
    subscribe(l1, lead_topic);
    subscribe(l2, lead_topic);
    bus *f1 = open_follower(fgroup, l1), *f2 = open_follower(fgroup, l2);
    subscribe(f1, topic);
    subscribe(f2, topic);
    bus *both[] = { l1, l2 };
    char err[PX_ERRLEN];
    bus_msg m[4];
    /* Both must hold a share: the first to join can hold all of them
     * until the second's join moves the group to its next generation. */
    int64_t end = px_mono_ms() + 30000;
    while ((bus_assigned(l1) == 0 || bus_assigned(l2) == 0 ||
            bus_assigned(l1) + bus_assigned(l2) != PARTS) &&
           px_mono_ms() < end)
        for (int i = 0; i < 2; i++) {
            int n = bus_consume(both[i], m, 4, 100, err, sizeof(err));
            ck_assert_msg(n >= 0, "consume: %s", err);
            bus_release(both[i], m, (size_t)n);
        }
    ck_assert_msg(bus_assigned(l1) > 0 && bus_assigned(l2) > 0, "leaders hold %d + %d",
                  bus_assigned(l1), bus_assigned(l2));
    unsigned h1 = held_mask(l1, lead_topic), h2 = held_mask(l2, lead_topic);
    ck_assert_int_eq(h1 & h2, 0);
    ck_assert_int_eq(h1 | h2, (1u << PARTS) - 1);

    enum { KEYS = 64 };
    int want1 = 0;
    unsigned keyed = 0; /* the partitions the keys fall in */
    for (int i = 0; i < KEYS; i++) {
        char key[16];
        snprintf(key, sizeof(key), "k%d", i);
        want1 += (h1 >> java_partition(key, PARTS)) & 1;
        keyed |= 1u << java_partition(key, PARTS);
    }
    produce_keys(l1, topic, KEYS);
    unsigned s1 = 0, s2 = 0;
    ck_assert_int_eq(follow_take(f1, both, 2, want1, 20000, &s1), want1);
    ck_assert_int_eq(follow_take(f2, both, 2, KEYS - want1, 20000, &s2), KEYS - want1);
    ck_assert_msg((s1 & ~h1) == 0 && (s2 & ~h2) == 0,
                  "followers read partitions %#x and %#x, their leaders hold %#x and %#x", s1,
                  s2, h1, h2);
    ck_assert(s1 != 0 && s2 != 0);

    /* The second leader leaves (its follower first, as acker_stop comes
     * before the inbox consumer's close): the first takes everything. */
    bus_destroy(f2);
    bus_destroy(l2);
    produce_keys(l1, topic, KEYS);
    unsigned s = 0;
    ck_assert_int_eq(follow_take(f1, both, 1, KEYS, 20000, &s), KEYS);
    ck_assert_int_eq(s, keyed);
    ck_assert_int_eq(follow_take(f1, both, 1, 1, 1000, &s), 0); /* none read twice */
    bus_destroy(f1);
    bus_destroy(l1);
    ck_assert_int_eq(committed_offsets(topic, fgroup), 2 * KEYS);
}
END_TEST

static Suite *bus_suite(void)
{
    Suite *s = suite_create("bus_kafka");
    TCase *tc = tcase_create("kafka");
    tcase_set_timeout(tc, 90);
    tcase_add_test(tc, same_key_one_partition_in_order);
    tcase_add_test(tc, fresh_topic_fully_assigned);
    tcase_add_test(tc, topic_created_after_an_empty_assignment_is_assigned);
    tcase_add_test(tc, resubscribe_joins_again);
    tcase_add_test(tc, lags_per_partition);
    tcase_add_test(tc, delivery_reports_carry_opaque_partition_and_offset);
    tcase_add_test(tc, uncommitted_records_come_again_after_a_crash);
    tcase_add_test(tc, clean_restart_resumes_after_last_commit);
    tcase_add_test(tc, consume_fd_signals_records);
    tcase_add_test(tc, wakeup_ends_a_blocked_consume);
    tcase_add_test(tc, fatal_producer_error_makes_a_new_producer);
    tcase_add_test(tc, unreachable_broker_fails_cleanly);
    tcase_add_test(tc, config_overrides_apply_or_fail_start);
    tcase_add_test(tc, bulk_topic_flushed_and_reported);
    tcase_add_test(tc, security_settings_checked_at_start);
    tcase_add_test(tc, a_follower_reads_the_partitions_its_leader_holds);
    suite_add_tcase(s, tc);
    return s;
}

PX_CHECK_MAIN(bus_suite)
