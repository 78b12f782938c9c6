/* ackwait: the acks that wait for their events (services/message-store/
 * ackwait.c), used by two threads: the acker adds and notes reads while
 * the late thread takes copies of the due entries, applies them and
 * settles them by key. Entries added, merged or sorted meanwhile settle
 * right; a late entry wakes the late thread; a stop's forget between a
 * take and its settle is harmless. */
#include "check_main.h"
#include "common.h"
#include "../../services/message-store/msgstore.h"

#include <pthread.h>
#include <stdio.h>
#include <string.h>

static msgstore_metrics metrics;

static void metrics_init(void)
{
    metrics.ack_waits = metrics_counter("test_ack_waits", "t");
    metrics.ack_waits_found = metrics_counter("test_ack_waits_found", "t");
    metrics.ack_waits_expired = metrics_counter("test_ack_waits_expired", "t");
    metrics.ack_waits_full = metrics_counter("test_ack_waits_full", "t");
    metrics.acks_late = metrics_counter("test_acks_late", "t");
    metrics.ack_commits_held = metrics_gauge("test_ack_commits_held", "t");
}

static ackwait *new_waits(void)
{
    return ackwait_new(&metrics, "acks");
}

static void add_late(ackwait *w, const char *user, const char *id)
{
    ck_assert_int_eq(ackwait_add(w, user, id, "phone", 0, px_now_ms(), 0, 1, 1), PX_OK);
}

/* Every entry, as (user/id) joined by spaces, in order. */
static void entries(ackwait *w, char *out, size_t cap)
{
    size_t n;
    ackwait_entry *t = ackwait_take(w, INT64_MAX, SIZE_MAX, &n);
    out[0] = '\0';
    for (size_t i = 0; i < n; i++)
        snprintf(out + strlen(out), cap - strlen(out), "%s%s/%s%s", i ? " " : "", t[i].user,
                 t[i].id, t[i].read ? "(read)" : "");
    ackwait_taken_free(t, n);
}

START_TEST(taken_entries_settle_by_key_after_adds_sorted_before_them)
{
    ackwait *w = new_waits();
    add_late(w, "carol", "m1");
    add_late(w, "dave", "m2");
    size_t n;
    ackwait_entry *t = ackwait_take(w, px_mono_ms(), 10, &n);
    ck_assert_uint_eq(n, 2);
    ck_assert_str_eq(t[0].user, "carol");
    /* The acker goes on meanwhile: these sort before both taken ones. */
    add_late(w, "alice", "m3");
    add_late(w, "bob", "m4");
    int found[2] = { 1, 0 }; /* carol's applied, dave's event not stored yet */
    ackwait_settle(w, t, n, found, px_mono_ms());
    char got[256];
    entries(w, got, sizeof(got));
    ck_assert_str_eq(got, "alice/m3 bob/m4 dave/m2");
    ck_assert(ackwait_was_applied(w, "carol", "m1"));
    ck_assert(!ackwait_was_applied(w, "dave", "m2"));
    /* dave's waits its backoff: not due now. */
    t = ackwait_take(w, px_mono_ms(), 10, &n);
    for (size_t i = 0; i < n; i++)
        ck_assert_str_ne(t[i].user, "dave");
    ackwait_taken_free(t, n);
    ackwait_free(w);
}
END_TEST

START_TEST(an_entry_added_again_meanwhile_settles_with_its_original)
{
    ackwait *w = new_waits();
    add_late(w, "bob", "m1");
    size_t n;
    ackwait_entry *t = ackwait_take(w, px_mono_ms(), 10, &n);
    ck_assert_uint_eq(n, 1);
    add_late(w, "bob", "m1"); /* the same ack consumed again */
    ck_assert_int_eq(ackwait_note_read(w, "bob", "m1", px_now_ms()), 1);
    int found[1] = { 0 };
    ackwait_settle(w, t, n, found, px_mono_ms());
    char got[256];
    entries(w, got, sizeof(got));
    /* One entry, still waiting, and the read noted meanwhile kept: the
     * copy taken before the read did not overwrite it. */
    ck_assert_str_eq(got, "bob/m1(read)");
    t = ackwait_take(w, px_mono_ms(), 10, &n);
    ackwait_taken_free(t, n);
    ck_assert_uint_eq(n, 0);
    ackwait_free(w);
}
END_TEST

START_TEST(a_forget_between_take_and_settle_is_harmless)
{
    ackwait *w = new_waits();
    add_late(w, "bob", "m1");
    size_t n;
    ackwait_entry *t = ackwait_take(w, px_mono_ms(), 10, &n);
    ackwait_forget(w); /* a clean stop handed it over */
    int found[1] = { 1 };
    ackwait_settle(w, t, n, found, px_mono_ms());
    char got[64];
    entries(w, got, sizeof(got));
    ck_assert_str_eq(got, "");
    ackwait_free(w);
}
END_TEST

typedef struct waiter {
    ackwait *w;
    int returned;
} waiter;

static void *wait_thread(void *arg)
{
    waiter *x = arg;
    ackwait_wait_due(x->w, 60000);
    __atomic_store_n(&x->returned, 1, __ATOMIC_SEQ_CST);
    return NULL;
}

START_TEST(a_late_entry_wakes_the_late_thread)
{
    ackwait *w = new_waits();
    waiter x = { .w = w };
    pthread_t th;
    ck_assert_int_eq(pthread_create(&th, NULL, wait_thread, &x), 0);
    /* Whether it waits already or not yet, the entry is there when it
     * looks: it never sleeps the 60 s. */
    add_late(w, "bob", "m1");
    pthread_join(th, NULL);
    ck_assert(x.returned);
    ackwait_free(w);
}
END_TEST

#define STRESS_ACKS 4000

static void *late_thread(void *arg)
{
    ackwait *w = arg;
    size_t settled = 0;
    while (settled < STRESS_ACKS) {
        ackwait_wait_due(w, 50);
        size_t n;
        ackwait_entry *t = ackwait_take(w, px_mono_ms(), 100, &n);
        int *found = px_calloc(n + 1, sizeof(*found));
        for (size_t i = 0; i < n; i++)
            found[i] = 1;
        settled += n;
        ackwait_settle(w, t, n, found, px_mono_ms());
        free(found);
    }
    return NULL;
}

START_TEST(two_threads_settle_every_ack)
{
    ackwait *w = new_waits();
    pthread_t th;
    ck_assert_int_eq(pthread_create(&th, NULL, late_thread, w), 0);
    char user[32], id[32];
    for (int i = 0; i < STRESS_ACKS; i++) {
        snprintf(user, sizeof(user), "u%d", (i * 7919) % 97);
        snprintf(id, sizeof(id), "m%d", i);
        add_late(w, user, id);
        if (i % 10 == 0)
            ackwait_note_read(w, user, id, px_now_ms());
    }
    pthread_join(th, NULL);
    char got[64];
    entries(w, got, sizeof(got));
    ck_assert_str_eq(got, "");
    ck_assert(ackwait_was_applied(w, "u0", "m0"));
    ackwait_free(w);
}
END_TEST

static Suite *ackwait_suite(void)
{
    metrics_init();
    Suite *s = suite_create("ackwait");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, taken_entries_settle_by_key_after_adds_sorted_before_them);
    tcase_add_test(tc, an_entry_added_again_meanwhile_settles_with_its_original);
    tcase_add_test(tc, a_forget_between_take_and_settle_is_harmless);
    tcase_add_test(tc, a_late_entry_wakes_the_late_thread);
    tcase_add_test(tc, two_threads_settle_every_ack);
    tcase_set_timeout(tc, 60);
    suite_add_tcase(s, tc);
    return s;
}

PX_CHECK_MAIN(ackwait_suite)
