/* synckept: the rests of sync scans kept for a connection's next page
 * (services/message-store/synckept.c): what is handed back and to whom,
 * what drops a rest (idling 30 s among it), and the ceilings on what is
 * kept. */
#include "check_main.h"
#include "common.h"
#include "../../services/message-store/msgstore.h"

#include <stdio.h>
#include <string.h>

/* A rest of n events of len bytes each, seqs after+1 .. after+n. */
static sync_rest *rest_of(const char *user, const char *dev, int64_t after, unsigned gen,
                          size_t n, size_t len)
{
    sync_rest *r = px_calloc(1, sizeof(*r));
    r->user = px_strdup(user);
    r->dev = px_strdup(dev);
    r->after = after;
    r->gen = gen;
    r->complete = 1;
    r->ev = px_calloc(n, sizeof(*r->ev));
    r->n = r->cap = n;
    for (size_t i = 0; i < n; i++) {
        r->ev[i] = (sync_ev){ .json = px_calloc(1, len), .len = len,
                              .seq = after + 1 + (int64_t)i };
        r->bytes += len;
    }
    return r;
}

/* Takes back the rest of (user, dev, after, gen), which must be kept. */
static sync_rest *take_kept(synckept *k, const char *user, const char *dev, int64_t after,
                            unsigned gen)
{
    sync_rest *r = synckept_take(k, user, dev, after, gen);
    ck_assert_msg(r != NULL, "no rest kept for %s/%s after %lld", user, dev, (long long)after);
    return r;
}

static metric *gauge(void)
{
    static metric *g;
    if (g == NULL)
        g = metrics_gauge("test_sync_kept_bytes", "test");
    return g;
}

START_TEST(taken_back_only_by_the_page_that_follows)
{
    synckept *k = synckept_new(gauge());
    synckept_put(k, rest_of("bob", "phone", 99, 1, 10, 100));
    ck_assert_int_eq(metric_value(gauge()), 1000);
    ck_assert_ptr_null(synckept_take(k, "bob", "laptop", 99, 1));
    ck_assert_ptr_null(synckept_take(k, "alice", "phone", 99, 1));
    sync_rest *r = take_kept(k, "bob", "phone", 99, 1);
    ck_assert_int_eq(r->n, 10);
    ck_assert_int_eq(r->ev[0].seq, 100);
    ck_assert_int_eq(metric_value(gauge()), 0);
    /* Taken out: nobody else gets it. */
    ck_assert_ptr_null(synckept_take(k, "bob", "phone", 99, 1));
    sync_rest_free(r);
    synckept_free(k);
}
END_TEST

/* A reconnect starts from its own position, and a rebalance may have let
 * another process write the inbox: either ends the rest for good. */
START_TEST(another_start_or_generation_drops_it)
{
    synckept *k = synckept_new(gauge());
    synckept_put(k, rest_of("bob", "phone", 99, 1, 10, 100));
    ck_assert_ptr_null(synckept_take(k, "bob", "phone", 50, 1));
    ck_assert_ptr_null(synckept_take(k, "bob", "phone", 99, 1));
    synckept_put(k, rest_of("bob", "phone", 99, 1, 10, 100));
    ck_assert_ptr_null(synckept_take(k, "bob", "phone", 99, 2));
    ck_assert_ptr_null(synckept_take(k, "bob", "phone", 99, 1));
    ck_assert_int_eq(metric_value(gauge()), 0);
    synckept_free(k);
}
END_TEST

START_TEST(a_device_command_forgets_the_users_rests)
{
    synckept *k = synckept_new(gauge());
    synckept_put(k, rest_of("bob", "phone", 99, 1, 4, 10));
    synckept_put(k, rest_of("bob", "laptop", 7, 1, 4, 10));
    synckept_put(k, rest_of("carol", "phone", 99, 1, 4, 10));
    synckept_forget(k, "bob");
    ck_assert_ptr_null(synckept_take(k, "bob", "phone", 99, 1));
    ck_assert_ptr_null(synckept_take(k, "bob", "laptop", 7, 1));
    sync_rest_free(take_kept(k, "carol", "phone", 99, 1));
    synckept_free(k);
}
END_TEST

START_TEST(a_write_moves_the_users_version)
{
    synckept *k = synckept_new(gauge());
    uint32_t v = synckept_version(k, "bob");
    synckept_wrote(k, "carol");
    /* Another user may share bob's slot; a write to bob always moves it. */
    synckept_wrote(k, "bob");
    ck_assert_uint_ne(synckept_version(k, "bob"), v);
    synckept_free(k);
}
END_TEST

/* 64 MiB of event bytes at most: the least lately kept go first, and a
 * rest larger than the whole ceiling is not kept at all. */
/* A rest nobody asked for in 30 s is of no use (its connection is gone or
 * stalled): the next take does not hand it back, the next put drops it.
 * Its clock is moved back by hand. */
START_TEST(a_rest_idle_for_30_s_is_dropped)
{
    synckept *k = synckept_new(gauge());
    sync_rest *bob = rest_of("bob", "phone", 9, 1, 1, 100);
    sync_rest *carol = rest_of("carol", "phone", 9, 1, 1, 200);
    sync_rest *dave = rest_of("dave", "phone", 9, 1, 1, 400);
    synckept_put(k, bob);
    synckept_put(k, carol);
    synckept_put(k, dave);
    ck_assert_int_eq(metric_value(gauge()), 700);
    bob->used_ms -= 30000;
    dave->used_ms -= 29000;
    ck_assert_ptr_null(synckept_take(k, "bob", "phone", 9, 1));
    ck_assert_int_eq(metric_value(gauge()), 600);
    sync_rest *r = take_kept(k, "dave", "phone", 9, 1);
    ck_assert_ptr_eq(r, dave);
    sync_rest_free(r);
    carol->used_ms -= 30000;
    synckept_put(k, rest_of("erin", "phone", 9, 1, 1, 800));
    ck_assert_int_eq(metric_value(gauge()), 800);
    ck_assert_ptr_null(synckept_take(k, "carol", "phone", 9, 1));
    sync_rest_free(take_kept(k, "erin", "phone", 9, 1));
    synckept_free(k);
}
END_TEST

START_TEST(bytes_past_the_ceiling_drop_the_oldest)
{
    enum { MIB = 1 << 20 };
    char user[32];
    synckept *k = synckept_new(gauge());
    for (int i = 0; i < 70; i++) {
        snprintf(user, sizeof(user), "u%d", i);
        synckept_put(k, rest_of(user, "d", 0, 1, 4, MIB / 4));
        ck_assert_int_le(metric_value(gauge()), 64 * MIB);
    }
    ck_assert_ptr_null(synckept_take(k, "u0", "d", 0, 1));
    ck_assert_ptr_null(synckept_take(k, "u5", "d", 0, 1));
    sync_rest_free(take_kept(k, "u69", "d", 0, 1));
    synckept_put(k, rest_of("big", "d", 0, 1, 65, MIB));
    ck_assert_ptr_null(synckept_take(k, "big", "d", 0, 1));
    synckept_free(k);
}
END_TEST

/* At most 256 rests, however small. */
START_TEST(rests_past_the_count_drop_the_oldest)
{
    char user[32];
    synckept *k = synckept_new(gauge());
    for (int i = 0; i < 300; i++) {
        snprintf(user, sizeof(user), "u%d", i);
        synckept_put(k, rest_of(user, "d", 0, 1, 1, 10));
    }
    ck_assert_int_eq(metric_value(gauge()), 256 * 10);
    ck_assert_ptr_null(synckept_take(k, "u0", "d", 0, 1));
    sync_rest_free(take_kept(k, "u299", "d", 0, 1));
    synckept_free(k);
}
END_TEST

static Suite *synckept_suite(void)
{
    Suite *s = suite_create("synckept");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, taken_back_only_by_the_page_that_follows);
    tcase_add_test(tc, another_start_or_generation_drops_it);
    tcase_add_test(tc, a_device_command_forgets_the_users_rests);
    tcase_add_test(tc, a_write_moves_the_users_version);
    tcase_add_test(tc, a_rest_idle_for_30_s_is_dropped);
    tcase_add_test(tc, bytes_past_the_ceiling_drop_the_oldest);
    tcase_add_test(tc, rests_past_the_count_drop_the_oldest);
    suite_add_tcase(s, tc);
    return s;
}

PX_CHECK_MAIN(synckept_suite)
