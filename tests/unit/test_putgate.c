/* putgate: the write-behind gate and the events held in it
 * (services/message-store/putgate.c): an event is pending from its push,
 * then either settled by an ack or taken by a store round, never both; a
 * resend held twice is one event; the gate hurries the writer while an ack
 * waits. */
#include "check_main.h"
#include "common.h"
#include "../../services/message-store/msgstore.h"

#include <string.h>

static store_event ev_of(const char *user, const char *id, int64_t seq)
{
    return (store_event){ .user = user, .id = id, .seq = seq, .kind = STORE_MESSAGE,
                          .sender = "alice", .json = "{}", .json_len = 2 };
}

static void seq_of(void *arg, const store_event *ev)
{
    *(int64_t *)arg = ev->seq;
}

static enum putgate_state state(putgate *g, const char *user, const char *id)
{
    uint64_t run;
    return putgate_find(g, user, id, &run, NULL, NULL);
}

START_TEST(an_event_is_pending_then_taken_then_stored_then_gone)
{
    putgate *g = putgate_new();
    store_event ev[2] = { ev_of("bob", "m1", 7), ev_of("bob", "m2", 8) };
    int settled[2] = { -1, -1 };
    int64_t seq = -1;
    ck_assert_int_eq(state(g, "bob", "m1"), PUTGATE_NONE);
    uint64_t run = 0;
    putgate_hold(g, 3, ev, 2);
    ck_assert_int_eq(putgate_find(g, "bob", "m1", &run, seq_of, &seq), PUTGATE_PENDING);
    ck_assert_int_eq(seq, 7);
    ck_assert_int_eq(run, 3);
    ck_assert_int_eq(state(g, "carol", "m1"), PUTGATE_NONE); /* the key is (user, id) */
    putgate_take(g, ev, 2, settled);
    ck_assert(settled[0] == 0 && settled[1] == 0);
    ck_assert_int_eq(state(g, "bob", "m2"), PUTGATE_STORING);
    ck_assert_int_eq(putgate_settle(g, "bob", "m2"), 0); /* a round took it */
    putgate_stored(g, ev, 2);
    ck_assert_int_eq(state(g, "bob", "m2"), PUTGATE_STORED);
    putgate_release(g, ev, 2);
    ck_assert_int_eq(state(g, "bob", "m1"), PUTGATE_NONE);
    putgate_free(g);
}
END_TEST

START_TEST(a_settled_event_is_left_out_of_the_round)
{
    putgate *g = putgate_new();
    store_event ev[2] = { ev_of("bob", "m1", 7), ev_of("bob", "m2", 8) };
    int settled[2] = { -1, -1 };
    putgate_hold(g, 1, ev, 2);
    ck_assert_int_eq(putgate_settle(g, "bob", "m1"), 1);
    ck_assert_int_eq(putgate_settle(g, "bob", "m1"), 0); /* once */
    ck_assert_int_eq(state(g, "bob", "m1"), PUTGATE_SETTLED);
    /* The round names the events by (user, id) in copies of its own. */
    store_event round[2] = { ev_of("bob", "m1", 7), ev_of("bob", "m2", 8) };
    putgate_take(g, round, 2, settled);
    ck_assert(settled[0] == 1 && settled[1] == 0);
    putgate_stored(g, round, 2);
    ck_assert_int_eq(state(g, "bob", "m1"), PUTGATE_SETTLED); /* never stored */
    ck_assert_int_eq(state(g, "bob", "m2"), PUTGATE_STORED);
    putgate_release(g, ev, 2);
    putgate_free(g);
}
END_TEST

START_TEST(a_resend_held_twice_is_one_event)
{
    putgate *g = putgate_new();
    store_event first = ev_of("bob", "m1", 7), again = ev_of("bob", "m1", 9);
    int settled = -1;
    putgate_hold(g, 1, &first, 1);
    putgate_hold(g, 2, &again, 1);
    ck_assert_int_eq(putgate_settle(g, "bob", "m1"), 1);
    putgate_take(g, &again, 1, &settled);
    ck_assert_int_eq(settled, 1); /* neither copy is written */
    putgate_release(g, &first, 1);
    ck_assert_int_eq(state(g, "bob", "m1"), PUTGATE_SETTLED); /* the other run's */
    putgate_release(g, &again, 1);
    ck_assert_int_eq(state(g, "bob", "m1"), PUTGATE_NONE);
    putgate_free(g);
}
END_TEST

static void count_hurry(void *arg)
{
    (*(int *)arg)++;
}

START_TEST(a_waiting_ack_hurries_the_writer)
{
    putgate *g = putgate_new();
    int hurried = 0;
    putgate_on_wait(g, count_hurry, &hurried);
    ck_assert_int_eq(putgate_wait(g, 0, 1, 10), PX_OK); /* nothing pushed: no wait, no hurry */
    ck_assert_int_eq(hurried, 0);
    uint64_t run = putgate_pushed(g);
    ck_assert_int_eq(putgate_wait(g, 0, 1, 50), PX_AGAIN);
    ck_assert_int_ge(hurried, 1);
    putgate_durable(g, run);
    hurried = 0;
    ck_assert_int_eq(putgate_wait(g, 0, 1, 10), PX_OK);
    ck_assert_int_eq(hurried, 0);
    putgate_free(g);
}
END_TEST

/* With a hold an ack waits for the run of its own event only, and hurries
 * the writer only for an event still held: a round under way needs none,
 * and a hurry would end the hold of every later event too. */
START_TEST(an_ack_waits_for_its_own_run_only)
{
    putgate *g = putgate_new();
    int hurried = 0;
    putgate_on_wait(g, count_hurry, &hurried);
    uint64_t first = putgate_pushed(g), second = putgate_pushed(g);
    putgate_durable(g, first);
    ck_assert_int_eq(putgate_wait(g, first, 1, 10), PX_OK); /* the second does not matter */
    ck_assert_int_eq(hurried, 0);
    ck_assert_int_eq(putgate_wait(g, second, 0, 30), PX_AGAIN); /* taken by a round */
    ck_assert_int_eq(hurried, 0);
    ck_assert_int_eq(putgate_wait(g, second, 1, 30), PX_AGAIN); /* still held */
    ck_assert_int_ge(hurried, 1);
    putgate_durable(g, second);
    ck_assert_int_eq(putgate_wait(g, second, 1, 10), PX_OK);
    putgate_free(g);
}
END_TEST

static Suite *putgate_suite(void)
{
    Suite *s = suite_create("putgate");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, an_event_is_pending_then_taken_then_stored_then_gone);
    tcase_add_test(tc, a_settled_event_is_left_out_of_the_round);
    tcase_add_test(tc, a_resend_held_twice_is_one_event);
    tcase_add_test(tc, a_waiting_ack_hurries_the_writer);
    tcase_add_test(tc, an_ack_waits_for_its_own_run_only);
    suite_add_tcase(s, tc);
    return s;
}

PX_CHECK_MAIN(putgate_suite)
