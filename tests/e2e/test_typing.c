/* Typing indicators end to end (issue 18): `typing` reaches the other side's
 * live connections on another gateway, in 1:1 chats and in groups (members
 * only: not the typist, not an invitee who has not joined, refused for a
 * non-member), carries its time-to-live, and is never stored: a recipient
 * who was offline finds nothing of it in the sync. */
#include "e2e.h"

#include <stdlib.h>

static void typing(client *cl, const char *field, const char *to, const char *state,
                   const char *id)
{
    json_t *o = json_pack("{s:s, s:s, s:s}", "type", "typing", field, to, "state", state);
    if (id != NULL)
        json_object_set_new(o, "id", json_string(id));
    ck_assert_int_eq(client_send_json(cl, o), 0);
    json_decref(o);
}

/* Reads cl until a message with body arrives; counts the typing events
 * seen on the way. */
static int typing_before(client *cl, const char *body)
{
    int n = 0;
    for (;;) {
        json_t *m = client_recv_json(cl, E2E_WAIT_MS);
        ck_assert_msg(m != NULL, "no message '%s': %s", body, client_errstr(cl));
        n += strcmp(e2e_str(m, "type"), "typing") == 0;
        int done = strcmp(e2e_str(m, "type"), "message") == 0 &&
                   strcmp(e2e_str(m, "body"), body) == 0;
        json_decref(m);
        if (done)
            return n;
    }
}

START_TEST(typing_reaches_the_other_side_live_and_is_never_stored)
{
    char alice[65], bob[65], mid[64];
    e2e_user("ta", alice);
    e2e_user("tb", bob);
    client *b = e2e_connect_synced(bob, E2E_GW2), *a = e2e_connect_synced(alice, E2E_GW1);
    typing(a, "to", bob, "composing", NULL);
    json_t *t = e2e_wait_type(b, "typing");
    ck_assert_str_eq(e2e_str(t, "from"), alice);
    ck_assert_str_eq(e2e_str(t, "to"), bob);
    ck_assert_str_eq(e2e_str(t, "state"), "composing");
    ck_assert_int_gt(json_integer_value(json_object_get(t, "ttl_ms")), 0);
    json_decref(t);
    typing(a, "to", bob, "paused", NULL);
    t = e2e_wait_type(b, "typing");
    ck_assert_str_eq(e2e_str(t, "state"), "paused");
    json_decref(t);

    /* bob offline: the typing goes nowhere and is not kept for later. */
    client_free(b);
    typing(a, "to", bob, "composing", NULL);
    e2e_send(a, "after", bob, "after typing", mid);
    b = e2e_connect(bob, E2E_GW2);
    ck_assert_int_eq(typing_before(b, "after typing"), 0);
    client_free(a);
    client_free(b);
}
END_TEST

START_TEST(typing_is_refused_when_malformed)
{
    char alice[65];
    e2e_user("tm", alice);
    client *a = e2e_connect_synced(alice, E2E_GW1);
    json_t *o = json_pack("{s:s, s:s, s:s, s:s}", "type", "typing", "id", "t1", "to", "bob",
                          "state", "shouting");
    e2e_expect_type(e2e_cmd(a, o), "error", "bad_request");
    o = json_pack("{s:s, s:s, s:s}", "type", "typing", "id", "t2", "state", "composing");
    e2e_expect_type(e2e_cmd(a, o), "error", "bad_request");
    client_free(a);
}
END_TEST

START_TEST(group_typing_reaches_members_only)
{
    char alice[65], bob[65], carol[65], dave[65], gid[65], mid[64];
    e2e_user("ga", alice);
    e2e_user("gb", bob);
    e2e_user("gc", carol);
    e2e_user("gd", dave);
    client *a = e2e_connect_synced(alice, E2E_GW1), *b = e2e_connect_synced(bob, E2E_GW2);
    client *c = e2e_connect_synced(carol, E2E_GW2), *d = e2e_connect_synced(dave, E2E_GW1);
    json_t *g = e2e_cmd(a, json_pack("{s:s, s:s, s:s, s:[s, s]}", "type", "group_create", "id",
                                     "g1", "name", "typists", "members", bob, carol));
    ck_assert_str_eq(e2e_str(g, "type"), "group");
    snprintf(gid, sizeof(gid), "%s", e2e_str(json_object_get(g, "group"), "id"));
    json_decref(g);
    e2e_join(b, gid); /* carol stays invited */

    typing(b, "group", gid, "composing", NULL);
    json_t *t = e2e_wait_type(a, "typing");
    ck_assert_str_eq(e2e_str(t, "from"), bob);
    ck_assert_str_eq(e2e_str(t, "group"), gid);
    json_decref(t);
    /* bob's message after his typing: once alice has it, group-fanout has
     * handled the typing, and any copy it made sits in its recipient's
     * inbox before the probes sent next. */
    json_t *s = e2e_cmd(b, json_pack("{s:s, s:s, s:s, s:s}", "type", "send", "id", "m1", "group",
                                     gid, "body", "after group typing"));
    ck_assert_str_eq(e2e_str(s, "type"), "sent");
    json_decref(s);
    ck_assert_int_eq(typing_before(a, "after group typing"), 0);
    /* Not to the typist; not to carol, invited only. dave, a stranger, is
     * refused. */
    e2e_send(a, "p1", bob, "probe", mid);
    e2e_send(a, "p2", carol, "probe", mid);
    ck_assert_int_eq(typing_before(b, "probe"), 0);
    ck_assert_int_eq(typing_before(c, "probe"), 0);
    typing(d, "group", gid, "composing", "d1");
    json_t *r = client_wait_ref(d, "d1", E2E_WAIT_MS);
    ck_assert_msg(r != NULL, "no answer to dave's typing: %s", client_errstr(d));
    e2e_expect_type(r, "error", "forbidden");
    client_free(a);
    client_free(b);
    client_free(c);
    client_free(d);
}
END_TEST

static Suite *typing_suite(void)
{
    Suite *s = suite_create("e2e-typing");
    TCase *tc = tcase_create("typing");
    tcase_set_timeout(tc, 90);
    tcase_add_test(tc, typing_reaches_the_other_side_live_and_is_never_stored);
    tcase_add_test(tc, typing_is_refused_when_malformed);
    tcase_add_test(tc, group_typing_reaches_members_only);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return e2e_main(typing_suite());
}
