/* bus_kafka against the real broker: keyed order, delivery reports, offsets
 * that advance only on bus_commit (a consumer killed before committing gets
 * its records again), and the consume fd. Topics are unique per run. */
#include "../unit/check_main.h"
#include "bus.h"
#include "common.h"

#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define PARTS 8

typedef struct dr_log {
    int ok, failed;
    int64_t last_offset[PARTS];
    int out_of_order;
} dr_log;

static dr_log drs;

static void on_dr(void *opaque, int status, const char *err, int32_t partition, int64_t offset)
{
    if (status != PX_OK || partition < 0 || partition >= PARTS) {
        drs.failed++;
        return;
    }
    drs.ok++;
    if (offset <= drs.last_offset[partition])
        drs.out_of_order++;
    drs.last_offset[partition] = offset;
}

static const char *brokers(void)
{
    const char *b = getenv("PARLEY_KAFKA_BROKERS");
    return b ? b : "127.0.0.1:19092";
}

static void topic_name(char *out, size_t n, const char *what)
{
    snprintf(out, n, "it.%s.%d.%lld", what, (int)getpid(), (long long)px_now_ms());
}

static bus *open_bus(const char *group)
{
    char err[PX_ERRLEN];
    bus_conf c = { .brokers = brokers(), .client_id = "it", .group = group,
                   .partitions = PARTS, .dr_cb = on_dr };
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

static void produce_n(bus *b, const char *topic, const char *key, int from, int n)
{
    char err[PX_ERRLEN], val[32];
    for (int i = from; i < from + n; i++) {
        int len = snprintf(val, sizeof(val), "%s:%d", key, i);
        ck_assert_int_eq(bus_produce(b, topic, key, strlen(key), val, (size_t)len, NULL, err,
                                     sizeof(err)), PX_OK);
    }
}

/* Consumes until want records arrived or timeout; calls fn per record. */
typedef void (*rec_fn)(const bus_msg *m, void *arg);
static int consume_until(bus *b, int want, int timeout_ms, int commit, rec_fn fn, void *arg)
{
    bus_msg msgs[256];
    char err[PX_ERRLEN];
    int got = 0;
    int64_t end = px_mono_ms() + timeout_ms;
    while (got < want && px_mono_ms() < end) {
        int n = bus_consume(b, msgs, 256, 200, err, sizeof(err));
        ck_assert_msg(n >= 0, "consume: %s", err);
        for (int i = 0; i < n; i++)
            fn(&msgs[i], arg);
        if (commit && n > 0)
            bus_commit(b, msgs, (size_t)n);
        bus_release(b, msgs, (size_t)n);
        got += n;
    }
    return got;
}

typedef struct key_track {
    int partition[3];
    int next[3];
    int bad;
} key_track;

static void track(const bus_msg *m, void *arg)
{
    key_track *t = arg;
    int k = ((const char *)m->key)[1] - '0'; /* keys "k0" "k1" "k2" */
    int seq = atoi(strchr((const char *)m->value, ':') + 1);
    if (t->partition[k] == -1)
        t->partition[k] = m->partition;
    if (t->partition[k] != m->partition || seq != t->next[k])
        t->bad++;
    t->next[k] = seq + 1;
}

START_TEST(same_key_one_partition_in_order)
{
    char topic[128], group[160];
    topic_name(topic, sizeof(topic), "order");
    snprintf(group, sizeof(group), "%s.g", topic);
    bus *p = open_bus(NULL);
    create_topic(p, topic);
    memset(&drs, 0, sizeof(drs));
    for (int i = 0; i < PARTS; i++)
        drs.last_offset[i] = -1;
    for (int round = 0; round < 100; round++)
        for (int k = 0; k < 3; k++) {
            char key[3] = { 'k', (char)('0' + k), 0 };
            produce_n(p, topic, key, round, 1);
        }
    ck_assert_int_eq(bus_flush(p, 10000), PX_OK);
    ck_assert_int_eq(drs.ok, 300);
    ck_assert_int_eq(drs.failed, 0);
    ck_assert_int_eq(drs.out_of_order, 0);

    bus *c = open_bus(group);
    const char *t[] = { topic };
    char err[PX_ERRLEN];
    ck_assert_int_eq(bus_subscribe(c, t, 1, err, sizeof(err)), PX_OK);
    key_track kt = { { -1, -1, -1 }, { 0, 0, 0 }, 0 };
    ck_assert_int_eq(consume_until(c, 300, 30000, 1, track, &kt), 300);
    ck_assert_int_eq(kt.bad, 0);
    for (int k = 0; k < 3; k++)
        ck_assert_int_eq(kt.next[k], 100);
    bus_destroy(c);
    bus_destroy(p);
}
END_TEST

typedef struct seen_set {
    int count[400];
} seen_set;

static void note(const bus_msg *m, void *arg)
{
    seen_set *s = arg;
    int seq = atoi(strchr((const char *)m->value, ':') + 1);
    if (seq >= 0 && seq < 400)
        s->count[seq]++;
}

/* Consumes everything, commits only records 0..199, then dies by SIGKILL
 * (no close, no final commit) after the periodic commit had time to run. */
static void child_consume_then_die(const char *topic, const char *group)
{
    bus *c = open_bus(group);
    const char *t[] = { topic };
    char err[PX_ERRLEN];
    if (bus_subscribe(c, t, 1, err, sizeof(err)) != PX_OK)
        _exit(3);
    bus_msg msgs[256];
    int got = 0;
    int64_t end = px_mono_ms() + 30000;
    while (got < 400 && px_mono_ms() < end) {
        int n = bus_consume(c, msgs, 256, 200, err, sizeof(err));
        for (int i = 0; i < n; i++) {
            int seq = atoi(strchr((const char *)msgs[i].value, ':') + 1);
            if (seq < 200)
                bus_commit(c, &msgs[i], 1);
        }
        bus_release(c, msgs, (size_t)(n > 0 ? n : 0));
        got += n > 0 ? n : 0;
    }
    sleep(3); /* auto-commit interval is 1 s: the stored offsets reach Kafka */
    kill(getpid(), SIGKILL);
}

START_TEST(uncommitted_records_come_again_after_a_crash)
{
    char topic[128], group[160];
    topic_name(topic, sizeof(topic), "crash");
    snprintf(group, sizeof(group), "%s.g", topic);
    bus *p = open_bus(NULL);
    create_topic(p, topic);
    /* One key: one partition, so "committed up to 199" is well defined. */
    produce_n(p, topic, "k0", 0, 400);
    ck_assert_int_eq(bus_flush(p, 10000), PX_OK);

    pid_t pid = fork();
    if (pid == 0)
        child_consume_then_die(topic, group);
    int st;
    waitpid(pid, &st, 0);
    ck_assert(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL);

    /* A new member of the same group starts after the last commit. */
    bus *c = open_bus(group);
    const char *t[] = { topic };
    char err[PX_ERRLEN];
    ck_assert_int_eq(bus_subscribe(c, t, 1, err, sizeof(err)), PX_OK);
    seen_set s;
    memset(&s, 0, sizeof(s));
    int got = consume_until(c, 200, 40000, 1, note, &s);
    ck_assert_int_eq(got, 200);
    for (int i = 0; i < 200; i++)
        ck_assert_msg(s.count[i] == 0, "committed record %d delivered again", i);
    for (int i = 200; i < 400; i++)
        ck_assert_msg(s.count[i] == 1, "uncommitted record %d seen %d times", i, s.count[i]);
    bus_destroy(c);
    bus_destroy(p);
}
END_TEST

START_TEST(consume_fd_signals_records)
{
    char topic[128], group[160];
    topic_name(topic, sizeof(topic), "fd");
    snprintf(group, sizeof(group), "%s.g", topic);
    bus *p = open_bus(NULL);
    create_topic(p, topic);
    bus *c = open_bus(group);
    const char *t[] = { topic };
    char err[PX_ERRLEN];
    ck_assert_int_eq(bus_subscribe(c, t, 1, err, sizeof(err)), PX_OK);
    int fd = bus_consume_fd(c);
    ck_assert_int_ge(fd, 0);
    produce_n(p, topic, "k0", 0, 1);
    ck_assert_int_eq(bus_flush(p, 10000), PX_OK);
    /* Join the group and fetch: drive the consumer until the record shows. */
    bus_msg m[4];
    int got = 0;
    int64_t end = px_mono_ms() + 30000;
    while (got == 0 && px_mono_ms() < end) {
        struct pollfd pfd = { .fd = fd, .events = POLLIN };
        if (poll(&pfd, 1, 500) > 0)
            ck_assert(pfd.revents & POLLIN);
        got = bus_consume(c, m, 4, 0, err, sizeof(err));
    }
    ck_assert_int_eq(got, 1);
    bus_release(c, m, 1);
    /* Once drained, the fd stays quiet until something new arrives. */
    struct pollfd pfd = { .fd = fd, .events = POLLIN };
    ck_assert_int_eq(poll(&pfd, 1, 300), 0);
    produce_n(p, topic, "k0", 1, 1);
    bus_flush(p, 10000);
    ck_assert_int_eq(poll(&pfd, 1, 10000), 1);
    bus_destroy(c);
    bus_destroy(p);
}
END_TEST

START_TEST(unreachable_broker_fails_delivery_reports)
{
    char err[PX_ERRLEN];
    memset(&drs, 0, sizeof(drs));
    bus_conf c = { .brokers = "127.0.0.1:1", .client_id = "it", .partitions = 1,
                   .dr_cb = on_dr };
    bus *b = bus_new(&c, err, sizeof(err));
    ck_assert_ptr_nonnull(b);
    /* Nothing can be acknowledged: the report must say so, never PX_OK. */
    ck_assert_int_eq(bus_produce(b, "it.none", "k", 1, "v", 1, NULL, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(bus_flush(b, 2000), PX_AGAIN);
    ck_assert_int_eq(drs.ok, 0);
    bus_destroy(b);
    ck_assert_int_eq(drs.ok, 0);
}
END_TEST

static Suite *bus_suite(void)
{
    Suite *s = suite_create("bus_kafka");
    TCase *tc = tcase_create("kafka");
    tcase_set_timeout(tc, 90);
    tcase_add_test(tc, same_key_one_partition_in_order);
    tcase_add_test(tc, uncommitted_records_come_again_after_a_crash);
    tcase_add_test(tc, consume_fd_signals_records);
    tcase_add_test(tc, unreachable_broker_fails_delivery_reports);
    suite_add_tcase(s, tc);
    return s;
}

PX_CHECK_MAIN(bus_suite)
