/* presence's expiry of silent gateways (services/presence/main.c,
 * main_expire), run for real: the service's unchanged main, linked in as
 * presence_main exactly as parleyd links it, on a thread of this process
 * over the SQLite bus and store in a data folder of its own. The test plays
 * the gateways (it produces their PresenceRecords onto parley.presence) and
 * reads the registry back as message-store routes (store_presence_lookup
 * with beats unchecked). Each test is a process of its own (check's fork
 * mode): presence_main keeps its state in statics and runs once.
 *
 * Time is never asserted. Outside a backlog, "still routable" is required
 * only of a lookup that ended before the gateway's last beat presence is
 * known to have applied plus ten intervals: presence computes its cutoff
 * from the same wall clock, so a slow machine can make a check vacuous,
 * never false. While presence works through a backlog it is required of
 * every lookup: that nothing expires then is the rule under test. A run in
 * which a kind of check never ran (a machine too slow for the intervals)
 * proved nothing and fails, saying so. */
#include "bus.h"
#include "common.h"
#include "lifecycle.h"
#include "store.h"
#include "parley.pb-c.h"

#include <check.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

int presence_main(void);

/* The rule under test, written out rather than taken from presence.h: a
 * test that read PRESENCE_EXPIRE_BEATS would follow it wherever it moved. */
#define TP_EXPIRE_BEATS 10
#define TP_TOPIC "parley.presence"
#define TP_POLL_US (10 * 1000)
#define TP_DEADLINE_MS 120000

static char tp_dir[64];
static pthread_t tp_th;
static int tp_rc = -1;
static int64_t tp_epoch;          /* every test gateway's boot epoch */
static int tp_dr_failed;

static void tp_on_dr(void *opaque, int status, const char *err, int32_t partition,
                     int64_t offset)
{
    if (status != PX_OK)
        tp_dr_failed++;
}

static void *tp_presence_thread(void *arg)
{
    tp_rc = presence_main();
    return NULL;
}

/* The process, the data folder and presence's configuration; returns the
 * producer the test speaks through (its topics created first, with one
 * partition, so that presence reads every record in produce order: a
 * backlog is then exactly what was produced before it). */
static bus *tp_begin(long hb_ms, store **st)
{
    char err[PX_ERRLEN] = "", hb[32];
    /* First, before any thread: SIGTERM stops presence through its own
     * signal path and must never reach this thread. */
    ck_assert_int_eq(lifecycle_init(NULL, NULL), PX_OK);
    snprintf(tp_dir, sizeof(tp_dir), "/tmp/parley-presence-test.XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(tp_dir));
    snprintf(hb, sizeof(hb), "%ld", hb_ms);
    setenv("PARLEY_DATA_DIR", tp_dir, 1);
    setenv("PARLEY_HEARTBEAT_MS", hb, 1);
    setenv("PARLEY_PARTITIONS", "1", 1);
    setenv("PARLEY_ADMIN_LISTEN", "off", 1);
    tp_epoch = px_now_ms();

    bus_conf c = { .client_id = "test-gateways", .partitions = 1, .dr_cb = tp_on_dr };
    bus *b = bus_new(&c, err, sizeof(err));
    ck_assert_msg(b != NULL, "bus_new: %s", err);
    const char *topics[] = { TP_TOPIC, "parley.dead" };
    ck_assert_msg(bus_ensure_topics(b, topics, 2, 5000, err, sizeof(err)) == PX_OK,
                  "ensure topics: %s", err);
    *st = store_open("sqlite", "parley", err, sizeof(err));
    ck_assert_msg(*st != NULL, "store_open: %s", err);
    return b;
}

static void tp_start_presence(void)
{
    ck_assert_int_eq(pthread_create(&tp_th, NULL, tp_presence_thread, NULL), 0);
}

static void tp_end(bus *b, store *st)
{
    char cmd[128];
    kill(getpid(), SIGTERM);
    pthread_join(tp_th, NULL);
    ck_assert_int_eq(tp_rc, 0);
    ck_assert_int_eq(bus_flush(b, 10000), PX_OK);
    ck_assert_int_eq(tp_dr_failed, 0);
    bus_destroy(b);
    store_close(st);
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tp_dir);
    ck_assert_int_eq(system(cmd), 0);
}

/* What a gateway produces (services/gateway/commands.c, commands_presence):
 * connects and disconnects keyed by the user, beats by the gateway. Queued
 * only; bus_flush or bus_poll serve the reports. */
static void tp_send(bus *b, Parley__PresenceRecord__Type type, const char *user,
                    const char *gw, int64_t ts_ms)
{
    char err[PX_ERRLEN] = "";
    uint8_t buf[256];
    Parley__PresenceRecord rec = PARLEY__PRESENCE_RECORD__INIT;
    rec.version = 1;
    rec.type = type;
    rec.user = (char *)(user != NULL ? user : "");
    rec.gateway = (char *)gw;
    rec.epoch = tp_epoch;
    rec.ts_ms = ts_ms;
    size_t len = parley__presence_record__get_packed_size(&rec);
    ck_assert_uint_le(len, sizeof(buf));
    parley__presence_record__pack(&rec, buf);
    const char *key = user != NULL ? user : gw;
    ck_assert_msg(bus_produce_wait(b, TP_TOPIC, key, strlen(key), buf, len, NULL, 10000, err,
                                   sizeof(err)) == PX_OK, "produce: %s", err);
}

static void tp_connect(bus *b, const char *user, const char *gw)
{
    tp_send(b, PARLEY__PRESENCE_RECORD__TYPE__TYPE_CONNECT, user, gw, px_now_ms());
}

static void tp_beat(bus *b, const char *gw, int64_t ts_ms)
{
    tp_send(b, PARLEY__PRESENCE_RECORD__TYPE__TYPE_HEARTBEAT, NULL, gw, ts_ms);
}

/* 1 if the registry routes user to gw. alive_after_ms > 0 also requires
 * gw's applied beat to be at or after it: then presence has applied that
 * beat (a beat's time only moves forward) and user's record still exists. */
static int tp_routed(store *st, const char *user, const char *gw, int64_t alive_after_ms)
{
    char err[PX_ERRLEN] = "", gws[8][65];
    size_t n = 0;
    ck_assert_msg(store_presence_lookup(st, user, alive_after_ms, gws, 8, &n, err,
                                        sizeof(err)) == PX_OK, "lookup: %s", err);
    for (size_t i = 0; i < n; i++)
        if (strcmp(gws[i], gw) == 0)
            return 1;
    return 0;
}

static int tp_wait_routed(store *st, const char *user, const char *gw, int64_t alive_after_ms)
{
    int64_t end = px_mono_ms() + TP_DEADLINE_MS;
    while (px_mono_ms() < end) {
        if (tp_routed(st, user, gw, alive_after_ms))
            return 1;
        usleep(TP_POLL_US);
    }
    return 0;
}

static double tp_beats(int64_t ms, long hb_ms)
{
    return (double)ms / (double)hb_ms;
}

/* Two gateways beat together once; then gw-late beats only every 7
 * intervals (6 beats missed each time, fewer than 10) and gw-silent never
 * again. ann (on gw-late) stays routable throughout, over more than 20
 * intervals; bob (on gw-silent) stays routable for the first 10 intervals
 * after its gateway's last beat and is dropped after them. */
#define T1_HB_MS 200
#define T1_LATE_GAP 7
#define T1_RUN_BEATS 24

START_TEST(expired_after_ten_silent_beats_never_fewer)
{
    const long hb = T1_HB_MS, limit = TP_EXPIRE_BEATS * T1_HB_MS;
    store *st;
    bus *b = tp_begin(hb, &st);
    tp_start_presence();
    /* Presence is up and applying before the clock of the test starts. */
    tp_connect(b, "probe", "gw-probe");
    ck_assert_int_eq(bus_flush(b, 10000), PX_OK);
    ck_assert_msg(tp_wait_routed(st, "probe", "gw-probe", 0), "presence applied nothing");

    int64_t t0 = px_now_ms();
    tp_connect(b, "ann", "gw-late");
    tp_connect(b, "bob", "gw-silent");
    tp_beat(b, "gw-silent", t0);
    tp_beat(b, "gw-late", t0);
    ck_assert_int_eq(bus_flush(b, 10000), PX_OK);
    /* One partition: gw-late's beat applied means everything before it is. */
    ck_assert_msg(tp_wait_routed(st, "ann", "gw-late", t0), "the first beats were not applied");

    int64_t applied = t0;          /* gw-late's last beat known applied */
    int64_t pending = 0;           /* gw-late's last beat sent, not yet seen applied */
    int64_t next_beat = t0 + T1_LATE_GAP * hb, bob_gone = 0;
    int ann_checks = 0, bob_checks = 0;
    int64_t deadline = px_mono_ms() + TP_DEADLINE_MS;
    for (;;) {
        int64_t now = px_now_ms();
        if (now >= next_beat) {
            tp_beat(b, "gw-late", now);
            ck_assert_int_eq(bus_flush(b, 10000), PX_OK);
            pending = now;
            next_beat = now + T1_LATE_GAP * hb;
        }
        if (pending > 0 && tp_routed(st, "ann", "gw-late", pending)) {
            applied = pending;
            pending = 0;
        }
        int ann = tp_routed(st, "ann", "gw-late", 0);
        int bob = tp_routed(st, "bob", "gw-silent", 0);
        int64_t done = px_now_ms();
        if (done < applied + limit) {
            ck_assert_msg(ann, "ann was dropped %.1f intervals after gw-late's last applied "
                          "beat; gw-late beats every %d intervals", tp_beats(done - applied, hb),
                          T1_LATE_GAP);
            ann_checks++;
        }
        if (done < t0 + limit) {
            ck_assert_msg(bob, "bob was dropped %.1f intervals after gw-silent's last beat, "
                          "before %d", tp_beats(done - t0, hb), TP_EXPIRE_BEATS);
            bob_checks++;
        } else if (!bob && bob_gone == 0) {
            bob_gone = done;
        }
        if (bob_gone > 0 && now >= t0 + T1_RUN_BEATS * hb)
            break;
        ck_assert_msg(px_mono_ms() < deadline, "bob was never dropped (%.0f intervals)",
                      tp_beats(now - t0, hb));
        usleep(TP_POLL_US);
    }
    ck_assert_msg(bob_checks > 0 && ann_checks > 0, "vacuous run: %d checks of bob before his "
                  "10 intervals, %d of ann (too slow a machine for %ld ms intervals?)",
                  bob_checks, ann_checks, hb);
    printf("report: presence expiry: bob dropped after %.1f silent intervals (%d checks "
           "before 10); ann kept over %d intervals of beats %d apart (%d checks)\n",
           tp_beats(bob_gone - t0, hb), bob_checks, T1_RUN_BEATS, T1_LATE_GAP, ann_checks);
    fflush(stdout);
    tp_end(b, st);
}
END_TEST

#define T2_HB_MS 250
#define T2_DOWN_BEATS 12   /* presence starts this many intervals late */
#define T2_CHEW_BEATS 16   /* intervals of work, estimated (5-10 measured) */
#define T2_AFTER_BEATS 6   /* checks kept up after presence caught up */
#define T2_OTHER_GWS 8

/* The backlog is sized from what a record presence applies alone costs
 * here (a beat is one store transaction), so that working through it spans
 * several expiry periods on this machine, sanitizers or not: a backlog
 * read within one period would let even a presence without the caught-up
 * rule pass. The estimate runs high (presence needed about half of it). */
static long tp_backlog_records(store *st, long hb_ms)
{
    char err[PX_ERRLEN] = "";
    const int n = 500;
    struct timespec a, z;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int i = 0; i < n; i++)
        ck_assert_msg(store_gateway_beat(st, "gw-calibrate", 1, i + 1, 0, err, sizeof(err)) ==
                      PX_OK, "beat: %s", err);
    clock_gettime(CLOCK_MONOTONIC, &z);
    int64_t us = ((int64_t)(z.tv_sec - a.tv_sec) * 1000000 + (z.tv_nsec - a.tv_nsec) / 1000) / n;
    long records = T2_CHEW_BEATS * hb_ms * 1000 / PX_MAX(us, 1);
    return PX_MIN(PX_MAX(records, 8192), 200000);
}

/* cat is connected through gw-live, which beats every interval from start
 * to end. Presence starts T2_DOWN_BEATS intervals late and finds, in
 * order: cat's connect and gw-live's beat (already older than 10
 * intervals once applied), eve's connect (on gw-marker, which never beats
 * and so is never expired: eve routable tells that this head is applied),
 * other gateways' beats enough to keep it busy for several intervals, then
 * gw-live's later beats. While it works through that, cat must stay
 * routable: it has not read gw-live's beats yet, it must not take their
 * absence for silence. */
START_TEST(no_expiry_while_behind_on_the_topic)
{
    const long hb = T2_HB_MS, limit = TP_EXPIRE_BEATS * T2_HB_MS;
    store *st;
    bus *b = tp_begin(hb, &st);
    long backlog = tp_backlog_records(st, hb);

    int64_t t0 = px_now_ms();
    tp_connect(b, "cat", "gw-live");
    tp_beat(b, "gw-live", t0);
    tp_connect(b, "eve", "gw-marker");
    for (long i = 0; i < backlog; i++) {
        char gw[32];
        snprintf(gw, sizeof(gw), "gw-other-%ld", i % T2_OTHER_GWS);
        tp_beat(b, gw, t0);
    }
    ck_assert_int_eq(bus_flush(b, 60000), PX_OK);
    int64_t last = t0, next_beat = t0 + hb;
    while (px_now_ms() < t0 + T2_DOWN_BEATS * hb) {
        if (px_now_ms() >= next_beat) {
            last = px_now_ms();
            tp_beat(b, "gw-live", last);
            next_beat = last + hb;
        }
        bus_poll(b, 0);
        usleep(TP_POLL_US);
    }

    int64_t started = px_now_ms();
    tp_start_presence();
    int64_t head = 0;              /* when eve was first routable */
    int64_t caught = 0;            /* when a beat sent after the start was seen applied */
    int64_t applied = 0;           /* gw-live's last beat known applied, once caught */
    int checks = 0, behind_checks = 0;
    int64_t deadline = px_mono_ms() + TP_DEADLINE_MS;
    for (;;) {
        int64_t now = px_now_ms();
        if (now >= next_beat) {
            last = now;
            tp_beat(b, "gw-live", last);
            next_beat = last + hb;
        }
        bus_poll(b, 0);
        if (tp_routed(st, "cat", "gw-live", last > started ? last : started + 1)) {
            applied = last;
            if (caught == 0)
                caught = px_now_ms();
        }
        int eve = tp_routed(st, "eve", "gw-marker", 0);
        int cat = tp_routed(st, "cat", "gw-live", 0);
        int64_t done = px_now_ms();
        if (eve && head == 0)
            head = done;
        if (head > 0 && caught == 0) {
            ck_assert_msg(cat, "cat was dropped while presence was behind on its topic: "
                          "gw-live's applied beat was %.1f intervals old, its later beats "
                          "not read yet", tp_beats(done - t0, hb));
            behind_checks++;
        } else if (caught > 0 && done < applied + limit) {
            ck_assert_msg(cat, "cat was dropped after presence caught up, %.1f intervals "
                          "after gw-live's last applied beat", tp_beats(done - applied, hb));
            checks++;
        }
        if (caught > 0 && now >= caught + T2_AFTER_BEATS * hb)
            break;
        ck_assert_msg(px_mono_ms() < deadline, "presence never caught up (head %s)",
                      head > 0 ? "applied" : "not applied");
        usleep(TP_POLL_US);
    }
    ck_assert_msg(head > 0, "eve was never routable: presence skipped its backlog's head");
    ck_assert_msg(behind_checks > 0, "vacuous run: presence went through its backlog of %ld "
                  "between two lookups, nothing was checked while it was behind", backlog + 3);
    printf("report: presence behind: worked %.1f intervals through a backlog of %ld records "
           "while gw-live's applied beat was %.1f-%.1f intervals old, cat kept (%d checks "
           "behind, %d after)\n", tp_beats(caught - head, hb), backlog + 3,
           tp_beats(head - t0, hb), tp_beats(caught - t0, hb), behind_checks, checks);
    fflush(stdout);
    tp_end(b, st);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("presence_sqlite");
    TCase *tc = tcase_create("expiry");
    tcase_set_timeout(tc, 180);
    tcase_add_test(tc, expired_after_ten_silent_beats_never_fewer);
    tcase_add_test(tc, no_expiry_while_behind_on_the_topic);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
