/* devcache: the device lists the acker decides with
 * (services/message-store/devcache.c): a list decides only for events up
 * to the seq it was kept for, grows as the consume thread pushes its
 * user's events under one assignment, is dropped by a new assignment, and
 * a read that a forget (a link, a sync) overtook is never kept. */
#include "check_main.h"
#include "common.h"
#include "metrics.h"
#include "../../services/message-store/msgstore.h"

#include <string.h>

static msgstore_metrics metrics;

/* A cache under the consumer's first assignment (gen 1). */
static devcache *assigned(void)
{
    if (metrics.devcache_hits == NULL) {
        metrics.devcache_hits = metrics_counter("test_devcache_hits_total", "hits");
        metrics.devcache_misses = metrics_counter("test_devcache_misses_total", "misses");
    }
    devcache *dc = devcache_new(&metrics);
    devcache_consumed(dc, 1, NULL, 0);
    return dc;
}

/* bob's phone (synced, since 10) and laptop (synced, since 50). */
static devices_list bob_list(void)
{
    devices_list l = { .user = "bob", .n = 2 };
    snprintf(l.d[0].dev, sizeof(l.d[0].dev), "phone");
    l.d[0].since = 10;
    snprintf(l.d[1].dev, sizeof(l.d[1].dev), "laptop");
    l.d[1].since = 50;
    return l;
}

/* -1: the kept list may not decide for seq; else 1 if the phone's ack
 * alone covers it (the laptop needs only events past 50). */
static int decide(devcache *dc, int64_t seq)
{
    const char *now[] = { "phone" };
    int gone = -1;
    if (!devcache_covered(dc, "bob", seq, NULL, 0, now, 1, &gone))
        return -1;
    return gone;
}

static store_event ev_of(const char *user, int64_t seq)
{
    return (store_event){ .user = user, .id = "m", .seq = seq };
}

/* Keeps bob's list as read after his event of seq 40, from a read that
 * began at epoch. */
static void keep_bob(devcache *dc, uint64_t epoch)
{
    devices_list l = bob_list();
    devcache_put(dc, &l, 40, epoch);
}

START_TEST(a_list_decides_up_to_its_seq_and_grows_with_the_partition)
{
    devcache *dc = assigned();
    keep_bob(dc, devcache_epoch(dc, "bob"));
    ck_assert_int_eq(decide(dc, 30), 1);
    ck_assert_int_eq(decide(dc, 41), -1); /* newer than the list */
    store_event ev[2] = { ev_of("bob", 60), ev_of("carol", 70) };
    devcache_consumed(dc, 1, ev, 2);
    ck_assert_int_eq(decide(dc, 60), 0); /* decided now: the laptop needs it */
    ck_assert_int_eq(decide(dc, 61), -1);
    devcache_free(dc);
}
END_TEST

START_TEST(a_new_assignment_drops_every_list)
{
    devcache *dc = assigned();
    keep_bob(dc, devcache_epoch(dc, "bob"));
    store_event ev = ev_of("bob", 60);
    devcache_consumed(dc, 2, &ev, 1);
    ck_assert_int_eq(decide(dc, 30), -1);
    devcache_free(dc);
}
END_TEST

START_TEST(a_read_overtaken_by_a_forget_or_an_assignment_is_not_kept)
{
    devcache *dc = assigned();
    uint64_t before = devcache_epoch(dc, "bob");
    devcache_forget(dc, "bob"); /* a sync of bob's while the list was read */
    keep_bob(dc, before);
    ck_assert_int_eq(decide(dc, 30), -1);
    /* Another user's forget leaves bob's read alone. */
    before = devcache_epoch(dc, "bob");
    devcache_forget(dc, "carol");
    keep_bob(dc, before);
    ck_assert_int_eq(decide(dc, 30), 1);
    before = devcache_epoch(dc, "bob");
    devcache_consumed(dc, 2, NULL, 0); /* a rebalance during the read */
    keep_bob(dc, before);
    ck_assert_int_eq(decide(dc, 30), -1);
    devcache_free(dc);
}
END_TEST

START_TEST(a_list_without_a_synced_device_is_never_kept)
{
    devcache *dc = assigned();
    devices_list l = bob_list();
    l.d[0].since = l.d[1].since = STORE_DEVICE_UNSYNCED;
    devcache_put(dc, &l, 40, devcache_epoch(dc, "bob"));
    ck_assert_int_eq(decide(dc, 30), -1);
    devcache_free(dc);
}
END_TEST

static Suite *devcache_suite(void)
{
    Suite *s = suite_create("devcache");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, a_list_decides_up_to_its_seq_and_grows_with_the_partition);
    tcase_add_test(tc, a_new_assignment_drops_every_list);
    tcase_add_test(tc, a_read_overtaken_by_a_forget_or_an_assignment_is_not_kept);
    tcase_add_test(tc, a_list_without_a_synced_device_is_never_kept);
    suite_add_tcase(s, tc);
    return s;
}

PX_CHECK_MAIN(devcache_suite)
