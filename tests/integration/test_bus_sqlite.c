/* bus_sqlite (parleyd's in-process bus) on a real data folder (its log's
 * segment files and bus.db): delivery reports only for durable records,
 * per-key order, redelivery of what was not committed after a restart (and
 * none of what was), one member per group, the consume eventfd and
 * bus_wakeup; a caught-up consumer served from memory, volatile topics,
 * transient records, kill -9 in the middle of group commits, a log whose
 * last write was cut short, an older parleyd's tables moved, and retention
 * keeping what a group has not committed. Each test has its own data
 * folder; the log is inspected with buslog_scan. */
#include "bus.h"
#include "bus_sqlite.h"
#include "buslog.h"
#include "common.h"

#include <signal.h>
#include <stdint.h>
#include <sqlite3.h>
#include <sys/wait.h>

#include <check.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char test_dir[64];

static void fresh_dir(void)
{
    snprintf(test_dir, sizeof(test_dir), "/tmp/parley-bus-test.XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(test_dir));
    setenv("PARLEY_DATA_DIR", test_dir, 1);
}

static void remove_dir(void)
{
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", test_dir);
    ck_assert_int_eq(system(cmd), 0);
}

typedef struct reports {
    int ok, failed;
    int64_t next_off[4];   /* the least offset the next report may carry */
} reports;

static void on_dr(void *opaque, int status, const char *err, int32_t partition, int64_t offset)
{
    reports *r = opaque;
    if (status != PX_OK) {
        r->failed++;
        return;
    }
    ck_assert_int_ge(offset, r->next_off[partition]); /* offsets grow per partition */
    r->next_off[partition] = offset + 1;
    r->ok++;
}

static bus *open_bus(const char *group)
{
    char err[PX_ERRLEN] = "";
    bus_conf c = { .client_id = "t", .group = group, .partitions = 4, .dr_cb = on_dr };
    bus *b = bus_new(&c, err, sizeof(err));
    ck_assert_msg(b != NULL, "bus_new: %s", err);
    return b;
}

static void produce_n(bus *b, reports *r, const char *topic, int n)
{
    char err[PX_ERRLEN] = "", key[16], val[32];
    for (int i = 0; i < n; i++) {
        snprintf(key, sizeof(key), "u%d", i % 5);
        snprintf(val, sizeof(val), "%d", i);
        ck_assert_int_eq(bus_produce(b, topic, key, strlen(key), val, strlen(val), r, err,
                                     sizeof(err)), PX_OK);
    }
    ck_assert_int_eq(bus_flush(b, 10000), PX_OK);
}

/* Reads up to want records (or until 2 s of silence); checks that the
 * values of each key arrive in increasing order; commits the first
 * commit_n. Returns the count. */
static int consume_all(bus *b, int want, int commit_n)
{
    static bus_msg m[64];
    char err[PX_ERRLEN] = "";
    int got = 0, last[5] = { -1, -1, -1, -1, -1 };
    while (got < want) {
        int n = bus_consume(b, m, 64, 2000, err, sizeof(err));
        ck_assert_msg(n >= 0, "consume: %s", err);
        if (n == 0)
            break;
        for (int i = 0; i < n; i++) {
            int k = atoi((const char *)m[i].key + 1), v = atoi((const char *)m[i].value);
            ck_assert_int_gt(v, last[k]);
            last[k] = v;
            if (got + i < commit_n)
                ck_assert_int_eq(bus_commit(b, &m[i], 1), PX_OK);
        }
        got += n;
        bus_release(b, m, (size_t)n);
    }
    return got;
}

START_TEST(reports_order_and_redelivery_after_restart)
{
    const char *topics[] = { "t.inbox" };
    char err[PX_ERRLEN] = "";
    static reports r;
    fresh_dir();
    bus *p = open_bus(NULL);
    ck_assert_int_eq(bus_ensure_topics(p, topics, 1, 1000, err, sizeof(err)), PX_OK);
    produce_n(p, &r, "t.inbox", 500);
    ck_assert_int_eq(r.ok, 500);
    ck_assert_int_eq(r.failed, 0);
    bus *c = open_bus("g1");
    ck_assert_int_eq(bus_subscribe(c, topics, 1, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(consume_all(c, 500, 200), 500);
    bus_destroy(c);
    bus_destroy(p); /* the last bus: the hub and its file close */

    /* A new "process": what was committed stays consumed, the rest comes
     * again; offsets continue where they were. */
    memset(&r, 0, sizeof(r));
    p = open_bus(NULL);
    c = open_bus("g1");
    ck_assert_int_eq(bus_subscribe(c, topics, 1, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(consume_all(c, 1000, 0), 300);
    produce_n(p, &r, "t.inbox", 10);
    /* 10 new records: offsets from 0 again would sum to at most 10. */
    ck_assert_int_gt(r.next_off[0] + r.next_off[1] + r.next_off[2] + r.next_off[3], 10);
    bus_destroy(c);
    bus_destroy(p);
    remove_dir();
}
END_TEST

START_TEST(second_member_of_a_group_is_refused)
{
    char err[PX_ERRLEN] = "";
    fresh_dir();
    bus *a = open_bus("solo");
    bus_conf c = { .client_id = "t", .group = "solo", .partitions = 4 };
    ck_assert_ptr_null(bus_new(&c, err, sizeof(err)));
    ck_assert_ptr_nonnull(strstr(err, "already has a member"));
    bus_destroy(a);
    remove_dir();
}
END_TEST

static void *wake_later(void *arg)
{
    usleep(200 * 1000);
    bus_wakeup(arg);
    return NULL;
}

START_TEST(consume_fd_and_wakeup)
{
    const char *topics[] = { "t.fd" };
    char err[PX_ERRLEN] = "";
    static reports r;
    static bus_msg m[8];
    fresh_dir();
    bus *c = open_bus("gfd");
    ck_assert_int_eq(bus_subscribe(c, topics, 1, err, sizeof(err)), PX_OK);
    pthread_t th;
    pthread_create(&th, NULL, wake_later, c);
    /* Its own timeout is past the test's limit (60 s): only the wakeup,
     * whether it comes before or during the wait, can end this call. */
    ck_assert_int_eq(bus_consume(c, m, 8, 600000, err, sizeof(err)), 0);
    pthread_join(th, NULL);

    bus *p = open_bus(NULL);
    produce_n(p, &r, "t.fd", 3);
    struct pollfd pfd = { .fd = bus_consume_fd(c), .events = POLLIN };
    ck_assert_int_eq(poll(&pfd, 1, 5000), 1);
    ck_assert_int_eq(consume_all(c, 3, 3), 3);
    bus_destroy(p);
    bus_destroy(c);
    remove_dir();
}
END_TEST


/* Runs sql on a file of the data folder through a connection of its own;
 * returns the first column of the first row (0 if none). */
static long sql_on(const char *file, const char *sql)
{
    char path[128];
    sqlite3 *db = NULL;
    sqlite3_stmt *s = NULL;
    snprintf(path, sizeof(path), "%s/%s", test_dir, file);
    ck_assert_int_eq(sqlite3_open(path, &db), SQLITE_OK);
    sqlite3_busy_timeout(db, 10000);
    ck_assert_int_eq(sqlite3_prepare_v2(db, sql, -1, &s, NULL), SQLITE_OK);
    int rc = sqlite3_step(s);
    ck_assert(rc == SQLITE_ROW || rc == SQLITE_DONE);
    long v = rc == SQLITE_ROW ? (long)sqlite3_column_int64(s, 0) : 0;
    sqlite3_finalize(s);
    sqlite3_close(db);
    return v;
}

/* The records in the log's files (segments not yet deleted included) of
 * topic whose value (a number) want accepts (NULL: all): how many, the
 * first and last segment holding one, and the nth one's segment and frame
 * end, when there is one. */
typedef struct log_query {
    const char *topic;
    int (*want)(long v);
    long n, nth;
    uint32_t seg_lo, seg_hi, nth_seg;
    uint64_t nth_end;
} log_query;

static int log_count_one(void *arg, const char *topic, const buslog_rec *r)
{
    log_query *q = arg;
    char v[32];
    size_t n = PX_MIN(r->len, sizeof(v) - 1);
    memcpy(v, r->value, n);
    v[n] = '\0';
    if (strcmp(topic, q->topic) != 0 || (q->want != NULL && !q->want(atol(v))))
        return 0;
    q->seg_lo = q->n == 0 ? r->seg : PX_MIN(q->seg_lo, r->seg);
    q->seg_hi = PX_MAX(q->seg_hi, r->seg);
    if (++q->n == q->nth) {
        q->nth_seg = r->seg;
        q->nth_end = r->end;
    }
    return 0;
}

static long logged_where(const char *topic, int (*want)(long v), log_query *q)
{
    char dir[128], err[PX_ERRLEN] = "";
    *q = (log_query){ .topic = topic, .want = want, .nth = q->nth };
    snprintf(dir, sizeof(dir), "%s/bus-log", test_dir);
    ck_assert_msg(buslog_scan(dir, log_count_one, q, err, sizeof(err)) == PX_OK, "scan: %s", err);
    return q->n;
}

static long logged(const char *topic)
{
    log_query q = { 0 };
    return logged_where(topic, NULL, &q);
}

static int not_multiple_of_3(long v)
{
    return v % 3 != 0;
}

static int below_10000(long v)
{
    return v < 10000;
}

/* Records are in the log when reported, and a consumer that was caught up
 * gets them from memory: cutting the log after the tenth behind the bus's
 * back changes nothing for it. A consumer that is behind (a new process)
 * reads the log. */
START_TEST(caught_up_consumer_gets_records_without_a_read_back)
{
    const char *topics[] = { "t.mem" };
    char err[PX_ERRLEN] = "";
    static reports r;
    fresh_dir();
    bus *c = open_bus("gmem");
    ck_assert_int_eq(bus_subscribe(c, topics, 1, err, sizeof(err)), PX_OK);
    bus *p = open_bus(NULL);
    produce_n(p, &r, "t.mem", 200);
    ck_assert_int_eq(r.ok, 200);
    log_query q = { .nth = 10 };
    ck_assert_int_eq(logged_where("t.mem", NULL, &q), 200);
    char dir[128], seg[160];
    snprintf(dir, sizeof(dir), "%s/bus-log", test_dir);
    buslog_seg_path(dir, q.nth_seg, seg, sizeof(seg));
    ck_assert_int_eq(truncate(seg, (off_t)q.nth_end), 0);
    ck_assert_int_eq(consume_all(c, 200, 0), 200);
    bus_destroy(c);
    bus_destroy(p);

    c = open_bus("gmem");
    ck_assert_int_eq(bus_subscribe(c, topics, 1, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(logged("t.mem"), 10);
    ck_assert_int_eq(consume_all(c, 200, 0), 10);
    bus_destroy(c);
    remove_dir();
}
END_TEST

/* A volatile topic: reported at once, never in the log, consumed from
 * memory in order, forgotten by the next process; other topics unchanged. */
START_TEST(volatile_topic_skips_the_log)
{
    const char *topics[] = { "v.gw.1" };
    char err[PX_ERRLEN] = "";
    static reports r, rd;
    fresh_dir();
    ck_assert_int_eq(bus_sqlite_volatile("v.gw.", err, sizeof(err)), PX_OK);
    bus *c = open_bus("gvol");
    ck_assert_int_eq(bus_sqlite_volatile("x.", err, sizeof(err)), PX_ERROR);
    ck_assert_int_eq(bus_subscribe(c, topics, 1, err, sizeof(err)), PX_OK);
    bus *p = open_bus(NULL);
    produce_n(p, &r, "v.gw.1", 300);
    produce_n(p, &rd, "t.durable", 5);
    ck_assert_int_eq(r.ok + rd.ok, 305);
    ck_assert_int_eq(logged("v.gw.1"), 0);
    ck_assert_int_eq(logged("t.durable"), 5);
    ck_assert_int_eq(consume_all(c, 300, 300), 300);
    produce_n(p, &r, "v.gw.1", 7); /* left unconsumed: gone with the process */
    bus_destroy(c);
    bus_destroy(p);

    c = open_bus("gvol");
    ck_assert_int_eq(bus_subscribe(c, topics, 1, err, sizeof(err)), PX_OK);
    static bus_msg m[8];
    ck_assert_int_eq(bus_consume(c, m, 8, 300, err, sizeof(err)), 0);
    bus_destroy(c);
    remove_dir();
}
END_TEST

/* Transient records (bus_produce_transient, parleyd's acks) among
 * durable ones of the same partitions: reported and consumed in order as
 * any other, never logged, so a process after a restart reads only the
 * durable ones, past the gaps, also a gap at the log's end. */
START_TEST(transient_records_are_ordered_but_never_logged)
{
    const char *topics[] = { "t.acks" };
    char err[PX_ERRLEN] = "", key[16], val[32];
    static reports r;
    fresh_dir();
    bus *c = open_bus("gtr");
    ck_assert_int_eq(bus_subscribe(c, topics, 1, err, sizeof(err)), PX_OK);
    bus *p = open_bus(NULL);
    for (int i = 0; i < 305; i++) { /* every third durable, the last five transient */
        snprintf(key, sizeof(key), "u%d", i % 5);
        snprintf(val, sizeof(val), "%d", i);
        int transient = i % 3 != 0 || i >= 300;
        ck_assert_int_eq((transient ? bus_produce_transient : bus_produce)(
                             p, "t.acks", key, strlen(key), val, strlen(val), &r, err,
                             sizeof(err)), PX_OK);
    }
    ck_assert_int_eq(bus_flush(p, 10000), PX_OK);
    ck_assert_int_eq(r.ok, 305);
    log_query q = { 0 };
    ck_assert_int_eq(logged("t.acks"), 100);
    ck_assert_int_eq(logged_where("t.acks", not_multiple_of_3, &q), 0);
    ck_assert_int_eq(consume_all(c, 305, 0), 305);
    bus_destroy(c);
    bus_destroy(p);

    c = open_bus("gtr");
    ck_assert_int_eq(bus_subscribe(c, topics, 1, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(consume_all(c, 100, 100), 100);
    p = open_bus(NULL);
    produce_n(p, &r, "t.acks", 5); /* past the gap at the end of each partition */
    ck_assert_int_eq(consume_all(c, 5, 5), 5);
    bus_destroy(p);
    bus_destroy(c);
    remove_dir();
}
END_TEST

/* kill -9 while the writer commits group after group: every record
 * reported PX_OK before the kill is in the log for the next process. The
 * child produces as fast as it can and writes each reported value to a
 * pipe. */
#define CRASH_VALUES (1 << 22)
static int crash_fd = -1;

static void on_crash_dr(void *opaque, int status, const char *err, int32_t partition,
                        int64_t offset)
{
    int v = (int)(intptr_t)opaque;
    if (status == PX_OK && write(crash_fd, &v, sizeof(v)) != sizeof(v))
        _exit(3);
}

static void produce_until_killed(void)
{
    char err[PX_ERRLEN] = "", key[16], val[16];
    bus_conf conf = { .client_id = "t", .partitions = 4, .dr_cb = on_crash_dr };
    bus *b = bus_new(&conf, err, sizeof(err));
    if (b == NULL)
        _exit(2);
    for (int i = 0; i < CRASH_VALUES; i++) {
        snprintf(key, sizeof(key), "u%d", i % 5);
        snprintf(val, sizeof(val), "%d", i);
        while (bus_produce(b, "t.crash", key, strlen(key), val, strlen(val), (void *)(intptr_t)i,
                           err, sizeof(err)) == PX_AGAIN)
            bus_poll(b, 1);
        bus_poll(b, 0);
    }
    _exit(4);
}

START_TEST(crash_mid_group_commit_loses_nothing_reported)
{
    const char *topics[] = { "t.crash" };
    static unsigned char reported[CRASH_VALUES], logged[CRASH_VALUES];
    static bus_msg m[256];
    char err[PX_ERRLEN] = "";
    int fds[2], v, nreported = 0, status;
    fresh_dir();
    ck_assert_int_eq(pipe(fds), 0);
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        close(fds[0]);
        crash_fd = fds[1];
        produce_until_killed();
    }
    close(fds[1]);
    for (int killed = 0; read(fds[0], &v, sizeof(v)) == sizeof(v);) {
        ck_assert(v >= 0 && v < CRASH_VALUES);
        reported[v] = 1;
        if (++nreported == 20000 && !killed) /* commits now run back to back */
            killed = kill(pid, SIGKILL) == 0;
    }
    close(fds[0]);
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    ck_assert(WIFSIGNALED(status));

    bus *c = open_bus("gcrash");
    ck_assert_int_eq(bus_subscribe(c, topics, 1, err, sizeof(err)), PX_OK);
    int n;
    while ((n = bus_consume(c, m, 256, 2000, err, sizeof(err))) > 0) {
        for (int i = 0; i < n; i++)
            logged[atoi(m[i].value)] = 1;
        bus_release(c, m, (size_t)n);
    }
    ck_assert_int_eq(n, 0);
    int lost = -1;
    for (int i = 0; i < CRASH_VALUES && lost < 0; i++)
        lost = reported[i] && !logged[i] ? i : -1;
    ck_assert_msg(lost < 0, "record %d was reported, then lost", lost);
    bus_destroy(c);
    remove_dir();
}
END_TEST

/* kill -9 in the middle of a write leaves part of a frame at the log's
 * end: the next process cuts it away, reads every whole record, and its
 * own records follow the cut (a third process reads them too). */
START_TEST(a_cut_short_write_is_cut_away)
{
    const char *topics[] = { "t.torn" };
    char err[PX_ERRLEN] = "", dir[128], seg[160];
    static reports r;
    fresh_dir();
    bus *p = open_bus(NULL);
    produce_n(p, &r, "t.torn", 50);
    bus_destroy(p);
    log_query q = { .nth = 50 };
    ck_assert_int_eq(logged_where("t.torn", NULL, &q), 50);
    snprintf(dir, sizeof(dir), "%s/bus-log", test_dir);
    buslog_seg_path(dir, q.nth_seg, seg, sizeof(seg));
    FILE *f = fopen(seg, "ab");
    ck_assert_ptr_nonnull(f);
    ck_assert_int_eq(fwrite("\x40\0\0\0\x12\x34\x56\x78partial", 1, 15, f), 15);
    fclose(f);

    bus *c = open_bus("gtorn");
    ck_assert_int_eq(bus_subscribe(c, topics, 1, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(consume_all(c, 100, 50), 50);
    p = open_bus(NULL);
    memset(&r, 0, sizeof(r));
    produce_n(p, &r, "t.torn", 5);
    ck_assert_int_eq(consume_all(c, 5, 0), 5);
    bus_destroy(p);
    bus_destroy(c);
    ck_assert_int_eq(logged("t.torn"), 55);
    c = open_bus("gtorn");
    ck_assert_int_eq(bus_subscribe(c, topics, 1, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(consume_all(c, 100, 0), 5);
    bus_destroy(c);
    remove_dir();
}
END_TEST

/* A data folder of an older parleyd keeps the bus's tables in parley.db:
 * the first open moves them to bus.db and the records on into the log (the
 * committed offset and the next offset hold), and drops them from
 * parley.db. */
START_TEST(bus_tables_move_out_of_the_store_file)
{
    const char *topics[] = { "t.old" };
    char err[PX_ERRLEN] = "";
    static reports r;
    fresh_dir();
    sql_on("parley.db", "CREATE TABLE bus_parts (topic TEXT NOT NULL, part INTEGER NOT NULL,"
           " next INTEGER NOT NULL, PRIMARY KEY (topic, part)) WITHOUT ROWID");
    sql_on("parley.db", "CREATE TABLE bus_log (topic TEXT NOT NULL, part INTEGER NOT NULL,"
           " off INTEGER NOT NULL, ts INTEGER NOT NULL, key BLOB, value BLOB,"
           " PRIMARY KEY (topic, part, off)) WITHOUT ROWID");
    sql_on("parley.db", "CREATE TABLE bus_offsets (grp TEXT NOT NULL, topic TEXT NOT NULL,"
           " part INTEGER NOT NULL, off INTEGER NOT NULL, PRIMARY KEY (grp, topic, part))"
           " WITHOUT ROWID");
    /* "u0" is in partition 2 of 4 (murmur2, as Kafka). */
    sql_on("parley.db", "INSERT INTO bus_parts VALUES ('t.old',0,0),('t.old',1,0),"
           "('t.old',2,3),('t.old',3,0)");
    sql_on("parley.db", "INSERT INTO bus_log VALUES ('t.old',2,0,1,'u0','0'),"
           "('t.old',2,1,1,'u0','1'),('t.old',2,2,1,'u0','2')");
    sql_on("parley.db", "INSERT INTO bus_offsets VALUES ('gold','t.old',2,1)");
    bus *c = open_bus("gold");
    ck_assert_int_eq(bus_subscribe(c, topics, 1, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(consume_all(c, 2, 0), 2);
    ck_assert_int_eq(sql_on("parley.db", "SELECT count(*) FROM sqlite_master"
                            " WHERE name LIKE 'bus_%'"), 0);
    ck_assert_int_eq(sql_on("bus.db", "SELECT count(*) FROM bus_log"), 0);
    ck_assert_int_eq(logged("t.old"), 3);
    bus_destroy(c);
    bus *p = open_bus(NULL);
    const char key[] = "u0";
    ck_assert_int_eq(bus_produce(p, "t.old", key, 2, "3", 1, &r, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(bus_flush(p, 10000), PX_OK);
    ck_assert_int_eq(r.next_off[2], 4);
    bus_destroy(p);
    remove_dir();
}
END_TEST

/* Retention: the log loses what every group committed past, and only
 * that, a segment at a time (4 KiB here, or one group commit when that is
 * more). g1 commits everything, g2 the records valued below 10000: once
 * every segment before the boundary is gone (only the segment holding the
 * boundary keeps some of them), the other 10000 must all be there, and a
 * new process of g2 reads them all, across segments. */
START_TEST(retention_deletes_only_what_every_group_committed)
{
    const char *topics[] = { "t.ret" };
    static bus_msg m[64];
    char err[PX_ERRLEN] = "";
    static reports r;
    fresh_dir();
    setenv("PARLEY_BUS_SEGMENT_BYTES", "4096", 1);
    bus *g1 = open_bus("g1"), *g2 = open_bus("g2");
    ck_assert_int_eq(bus_subscribe(g1, topics, 1, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(bus_subscribe(g2, topics, 1, err, sizeof(err)), PX_OK);
    bus *p = open_bus(NULL);
    produce_n(p, &r, "t.ret", 20000);
    ck_assert_int_eq(consume_all(g1, 20000, 20000), 20000);
    for (int got = 0; got < 20000;) {
        int n = bus_consume(g2, m, 64, 2000, err, sizeof(err));
        ck_assert_msg(n > 0, "consume: %s", err);
        for (int i = 0; i < n; i++)
            if (atoi((const char *)m[i].value) < 10000)
                ck_assert_int_eq(bus_commit(g2, &m[i], 1), PX_OK);
        got += n;
        bus_release(g2, m, (size_t)n);
    }
    log_query q = { 0 };
    long left = -1;
    for (int i = 0; i < 300 && (left = logged_where("t.ret", below_10000, &q)) > 0 &&
         q.seg_lo != q.seg_hi; i++)
        usleep(100 * 1000);
    ck_assert_msg(left == 0 || q.seg_lo == q.seg_hi, "%ld committed records left in segments"
                  " %u..%u", left, q.seg_lo, q.seg_hi);
    ck_assert_int_lt(left, 10000);
    ck_assert_int_eq(logged("t.ret") - left, 10000);
    bus_destroy(p);
    bus_destroy(g2);
    bus_destroy(g1);
    g2 = open_bus("g2");
    ck_assert_int_eq(bus_subscribe(g2, topics, 1, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(consume_all(g2, 20000, 0), 10000);
    bus_destroy(g2);
    unsetenv("PARLEY_BUS_SEGMENT_BYTES");
    remove_dir();
}
END_TEST

int main(void)
{
    Suite *s = suite_create("bus_sqlite");
    TCase *tc = tcase_create("bus");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, reports_order_and_redelivery_after_restart);
    tcase_add_test(tc, second_member_of_a_group_is_refused);
    tcase_add_test(tc, consume_fd_and_wakeup);
    tcase_add_test(tc, caught_up_consumer_gets_records_without_a_read_back);
    tcase_add_test(tc, volatile_topic_skips_the_log);
    tcase_add_test(tc, transient_records_are_ordered_but_never_logged);
    tcase_add_test(tc, crash_mid_group_commit_loses_nothing_reported);
    tcase_add_test(tc, a_cut_short_write_is_cut_away);
    tcase_add_test(tc, bus_tables_move_out_of_the_store_file);
    tcase_add_test(tc, retention_deletes_only_what_every_group_committed);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
