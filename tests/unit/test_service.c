/* service: what its start-up log says of the store (the MongoDB store's
 * store_where, credentials redacted) and the topic list a service builds
 * (service_run itself is exercised by every e2e test, through the four
 * consumer services). */
#include "check_main.h"
#include "service.h"

#include <string.h>

static const char *redact(const char *uri)
{
    static char out[256];
    store_where(uri, "d", out, sizeof(out));
    return out;
}

START_TEST(redact_userinfo)
{
    ck_assert_str_eq(redact("mongodb://user:secret@db:27017/parley"),
                     "mongodb://***@db:27017/parley db d");
    ck_assert_str_eq(redact("mongodb://user:secret@a,b/?authSource=admin"),
                     "mongodb://***@a,b/?authSource=admin db d");
    ck_assert_str_eq(redact("mongodb://user@db"), "mongodb://***@db db d");
}
END_TEST

START_TEST(redact_keeps_the_rest)
{
    ck_assert_str_eq(redact("mongodb://db:27017/parley"), "mongodb://db:27017/parley db d");
    /* An @ after the host is not userinfo. */
    ck_assert_str_eq(redact("mongodb://db/parley?tag=a@b"), "mongodb://db/parley?tag=a@b db d");
    ck_assert_str_eq(redact("not a uri @ all"), "not a uri @ all db d");
    ck_assert_str_eq(redact(""), " db d");
}
END_TEST

START_TEST(redact_truncates)
{
    char out[12];
    store_where("mongodb://u:p@longhost/", "d", out, sizeof(out));
    ck_assert_str_eq(out, "mongodb://*");
}
END_TEST

START_TEST(topics_in_order)
{
    static service s;
    s.cfg.topic_prefix = "t.";
    const char *inbox = service_topic(&s, "inbox", SERVICE_SUBSCRIBE);
    const char *dead = service_topic(&s, "dead", SERVICE_ENSURE);
    const char *acks = service_topic(&s, "acks", SERVICE_SUBSCRIBE);
    ck_assert_str_eq(inbox, "t.inbox");
    ck_assert_str_eq(dead, "t.dead");
    ck_assert_uint_eq(s.ntopics, 3);
    ck_assert(s.topics[0] == inbox && s.topics[1] == dead && s.topics[2] == acks);
    ck_assert_uint_eq(s.nsubscribed, 2);
    ck_assert(s.subscribed[0] == inbox && s.subscribed[1] == acks);
}
END_TEST

static Suite *service_suite(void)
{
    Suite *s = suite_create("service");
    TCase *tc = tcase_create("service");
    tcase_add_test(tc, redact_userinfo);
    tcase_add_test(tc, redact_keeps_the_rest);
    tcase_add_test(tc, redact_truncates);
    tcase_add_test(tc, topics_in_order);
    suite_add_tcase(s, tc);
    return s;
}

PX_CHECK_MAIN(service_suite)
