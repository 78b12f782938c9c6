/* recent (libcommon/recent.c): what a memory of recently noted keys holds,
 * what it forgets (the oldest of a full bucket, nothing else), and that
 * keys noted together in numbers near its size are all still held. */
#include "check_main.h"
#include "common.h"
#include "recent.h"

#include <stdio.h>

START_TEST(noted_keys_are_held_and_others_are_not)
{
    recent *r = recent_new(10);
    uint64_t a = recent_key("alice", "m1"), b = recent_key("alice", "m2");
    ck_assert_uint_ne(a, b);
    ck_assert_uint_ne(recent_key("ab", "c"), recent_key("a", "bc")); /* a NUL between */
    ck_assert_uint_ne(recent_key("alice", NULL), 0);
    ck_assert_int_eq(recent_has(r, a), 0);
    ck_assert_int_eq(recent_note(r, a), 1);
    ck_assert_int_eq(recent_note(r, a), 0);
    ck_assert_int_eq(recent_has(r, a), 1);
    ck_assert_int_eq(recent_has(r, b), 0);
    recent_free(r);
}
END_TEST

/* Keys of one bucket (the low bits pick it): the fifth noted forgets the
 * oldest, and noting a held key again makes it the newest. */
START_TEST(a_full_bucket_forgets_its_oldest)
{
    recent *r = recent_new(4); /* 16 slots: 4 buckets */
    uint64_t k[RECENT_WAYS + 1];
    for (size_t i = 0; i <= RECENT_WAYS; i++)
        k[i] = ((uint64_t)(i + 1) << 8) | 1; /* all in bucket 1 */
    for (size_t i = 0; i < RECENT_WAYS; i++)
        ck_assert_int_eq(recent_note(r, k[i]), 1);
    ck_assert_int_eq(recent_note(r, k[0]), 0); /* k[0] newest now, k[1] oldest */
    ck_assert_int_eq(recent_note(r, k[RECENT_WAYS]), 1);
    ck_assert_int_eq(recent_has(r, k[1]), 0);
    ck_assert_int_eq(recent_has(r, k[0]), 1);
    for (size_t i = 2; i <= RECENT_WAYS; i++)
        ck_assert_int_eq(recent_has(r, k[i]), 1);
    recent_note(r, ((uint64_t)9 << 8) | 2); /* another bucket forgets nothing here */
    ck_assert_int_eq(recent_has(r, k[0]), 1);
    recent_free(r);
}
END_TEST

/* What ackwait and the receipt service rely on: a burst of keys a fortieth
 * of the memory's size is held whole (a direct-mapped table of the same
 * size lost ~17 of 1,500). */
START_TEST(a_burst_of_keys_is_held_whole)
{
    recent *r = recent_new(16);
    char id[32];
    for (int i = 0; i < 1500; i++) {
        snprintf(id, sizeof(id), "m%d", i);
        recent_note(r, recent_key("bob", id));
    }
    int held = 0;
    for (int i = 0; i < 1500; i++) {
        snprintf(id, sizeof(id), "m%d", i);
        held += recent_has(r, recent_key("bob", id));
    }
    ck_assert_int_eq(held, 1500);
    recent_free(r);
}
END_TEST

static Suite *recent_suite(void)
{
    Suite *s = suite_create("recent");
    TCase *tc = tcase_create("recent");
    tcase_add_test(tc, noted_keys_are_held_and_others_are_not);
    tcase_add_test(tc, a_full_bucket_forgets_its_oldest);
    tcase_add_test(tc, a_burst_of_keys_is_held_whole);
    suite_add_tcase(s, tc);
    return s;
}

PX_CHECK_MAIN(recent_suite)
