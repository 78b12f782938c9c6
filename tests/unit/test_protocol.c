/* protocol: every command parses, every malformed one gets the right code. */
#include "check_main.h"
#include "common.h"
#include "protocol.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const proto_limits lim = { .max_body_bytes = 16 };

static int parse(const char *s, proto_cmd *c, enum proto_code *code)
{
    char msg[128];
    return proto_parse(s, strlen(s), &lim, c, code, msg, sizeof(msg));
}

START_TEST(send_ok)
{
    proto_cmd c;
    enum proto_code code;
    ck_assert_int_eq(parse("{\"type\":\"send\",\"id\":\"c1\",\"to\":\"bob\",\"body\":\"hi\",\"from\":\"eve\"}",
                           &c, &code), PX_OK);
    ck_assert_int_eq(c.type, PROTO_SEND);
    ck_assert_str_eq(c.id, "c1");
    ck_assert_str_eq(c.to, "bob");
    ck_assert_str_eq(c.body, "hi");
    ck_assert_int_eq(c.body_len, 2);
    proto_cmd_free(&c);
}
END_TEST

START_TEST(ack_and_ping_ok)
{
    proto_cmd c;
    enum proto_code code;
    ck_assert_int_eq(parse("{\"type\":\"ack\",\"ids\":[\"a\",\"b\"]}", &c, &code), PX_OK);
    ck_assert_int_eq(c.nids, 2);
    ck_assert_str_eq(c.ids[1], "b");
    proto_cmd_free(&c);
    ck_assert_int_eq(parse("{\"type\":\"ping\",\"id\":\"p\"}", &c, &code), PX_OK);
    ck_assert_int_eq(c.type, PROTO_PING);
    proto_cmd_free(&c);
    /* typing needs no id */
    ck_assert_int_eq(parse("{\"type\":\"typing\",\"to\":\"bob\",\"state\":\"composing\"}", &c,
                           &code), PX_OK);
    ck_assert_int_eq(c.type, PROTO_TYPING);
    ck_assert_str_eq(c.to, "bob");
    ck_assert_int_eq(c.composing, 1);
    proto_cmd_free(&c);
    ck_assert_int_eq(parse("{\"type\":\"typing\",\"group\":\"g_1\",\"state\":\"paused\"}", &c,
                           &code), PX_OK);
    ck_assert_str_eq(c.group, "g_1");
    ck_assert_int_eq(c.composing, 0);
    proto_cmd_free(&c);
}
END_TEST

/* devices needs only an id; device_unlink a device id in the user id
 * charset. */
START_TEST(device_commands)
{
    proto_cmd c;
    enum proto_code code;
    ck_assert_int_eq(parse("{\"type\":\"devices\",\"id\":\"d\"}", &c, &code), PX_OK);
    ck_assert_int_eq(c.type, PROTO_DEVICES);
    proto_cmd_free(&c);
    ck_assert_int_eq(parse("{\"type\":\"device_unlink\",\"id\":\"u\",\"device\":\"web-1\"}",
                           &c, &code), PX_OK);
    ck_assert_int_eq(c.type, PROTO_DEVICE_UNLINK);
    ck_assert_str_eq(c.device, "web-1");
    proto_cmd_free(&c);
    ck_assert_int_eq(parse("{\"type\":\"device_unlink\",\"id\":\"u\",\"device\":\"a b\"}",
                           &c, &code), PX_DECLINED);
    ck_assert_int_eq(code, PROTO_BAD_REQUEST);
    ck_assert_int_eq(parse("{\"type\":\"device_unlink\",\"id\":\"u\"}", &c, &code),
                     PX_DECLINED);
    ck_assert_int_eq(parse("{\"type\":\"devices\"}", &c, &code), PX_DECLINED);
}
END_TEST

START_TEST(group_commands_ok)
{
    proto_cmd c;
    enum proto_code code;
    ck_assert_int_eq(parse("{\"type\":\"group_create\",\"id\":\"g\",\"name\":\"n\",\"members\":[\"bob\"]}",
                           &c, &code), PX_OK);
    ck_assert_int_eq(c.nmembers, 1);
    proto_cmd_free(&c);
    ck_assert_int_eq(parse("{\"type\":\"group_leave\",\"id\":\"g\",\"group\":\"g_1\"}", &c, &code), PX_OK);
    ck_assert_str_eq(c.group, "g_1");
    proto_cmd_free(&c);
    ck_assert_int_eq(parse("{\"type\":\"group_join\",\"id\":\"j\",\"group\":\"g_1\"}", &c, &code), PX_OK);
    ck_assert_int_eq(c.type, PROTO_GROUP_JOIN);
    ck_assert_str_eq(c.group, "g_1");
    proto_cmd_free(&c);
    ck_assert_int_eq(parse("{\"type\":\"group_join\",\"id\":\"j\"}", &c, &code), PX_DECLINED);
    ck_assert_int_eq(code, PROTO_BAD_REQUEST);
}
END_TEST

struct bad_case {
    const char *json;
    enum proto_code code;
    const char *ref;  /* expected id kept for the error's ref, "" for none */
};

START_TEST(bad_commands)
{
    static const struct bad_case cases[] = {
        { "not json", PROTO_BAD_REQUEST, "" },
        { "[1,2]", PROTO_BAD_REQUEST, "" },
        { "{\"id\":\"c1\"}", PROTO_BAD_REQUEST, "c1" },
        { "{\"type\":\"dance\",\"id\":\"c2\"}", PROTO_BAD_REQUEST, "c2" },
        { "{\"type\":\"send\",\"to\":\"bob\",\"body\":\"x\"}", PROTO_BAD_REQUEST, "" },
        { "{\"type\":\"send\",\"id\":\"c3\",\"body\":\"x\"}", PROTO_BAD_REQUEST, "c3" },
        { "{\"type\":\"send\",\"id\":\"c4\",\"to\":\"bob\",\"group\":\"g\",\"body\":\"x\"}", PROTO_BAD_REQUEST, "c4" },
        { "{\"type\":\"send\",\"id\":\"c5\",\"to\":\"bob\"}", PROTO_BAD_REQUEST, "c5" },
        { "{\"type\":\"send\",\"id\":\"c6\",\"to\":\"bad user\",\"body\":\"x\"}", PROTO_BAD_REQUEST, "c6" },
        { "{\"type\":\"send\",\"id\":\"c7\",\"to\":\"bob\",\"body\":\"01234567890123456\"}", PROTO_TOO_LARGE, "c7" },
        { "{\"type\":\"send\",\"id\":\"c8\",\"to\":\"bob\",\"body\":5}", PROTO_BAD_REQUEST, "c8" },
        { "{\"type\":\"send\",\"id\":\"c9\",\"to\":\"bob\",\"body\":\"x\",\"forwarded\":\"yes\"}", PROTO_BAD_REQUEST, "c9" },
        { "{\"type\":\"ack\",\"ids\":[]}", PROTO_BAD_REQUEST, "" },
        { "{\"type\":\"ack\",\"ids\":[1]}", PROTO_BAD_REQUEST, "" },
        { "{\"type\":\"ping\",\"id\":7}", PROTO_BAD_REQUEST, "" },
        { "{\"type\":\"group_create\",\"id\":\"g1\",\"name\":\"\",\"members\":[]}", PROTO_BAD_REQUEST, "g1" },
        { "{\"type\":\"group_add\",\"id\":\"g2\",\"members\":[\"bob\"]}", PROTO_BAD_REQUEST, "g2" },
        { "{\"type\":\"send\",\"id\":\"d1\",\"type\":\"ping\"}", PROTO_BAD_REQUEST, "" },
        { "{\"type\":\"send\",\"id\":\"c10\",\"to\":\"bob\",\"body\":\"a\\u0000b\"}", PROTO_BAD_REQUEST, "" },
        { "{\"type\":\"typing\",\"id\":\"t1\",\"to\":\"bob\"}", PROTO_BAD_REQUEST, "t1" },
        { "{\"type\":\"typing\",\"id\":\"t2\",\"to\":\"bob\",\"state\":\"yelling\"}", PROTO_BAD_REQUEST, "t2" },
        { "{\"type\":\"typing\",\"to\":\"bob\",\"group\":\"g\",\"state\":\"paused\"}", PROTO_BAD_REQUEST, "" },
        /* five levels: refused before parsing, so no ref */
        { "{\"type\":\"ping\",\"id\":\"s1\",\"x\":[[[[1]]]]}", PROTO_BAD_REQUEST, "" },
        { "{\"type\":\"presence_sub\",\"id\":\"s1\",\"users\":[\"bad id\"]}", PROTO_BAD_REQUEST, "s1" },
        { "{\"type\":\"presence_sub\",\"id\":\"s2\",\"users\":\"bob\"}", PROTO_BAD_REQUEST, "s2" },
        { "{\"type\":\"presence_sub\",\"users\":[\"bob\"]}", PROTO_BAD_REQUEST, "" },
        { "{\"type\":\"presence_settings\",\"id\":\"h1\",\"hide_last_seen\":1}", PROTO_BAD_REQUEST, "h1" },
    };
    for (size_t i = 0; i < PX_ARRAY_LEN(cases); i++) {
        proto_cmd c;
        enum proto_code code = 0;
        ck_assert_msg(parse(cases[i].json, &c, &code) == PX_DECLINED, "accepted: %s", cases[i].json);
        ck_assert_msg(code == cases[i].code, "code %d for %s", code, cases[i].json);
        ck_assert_msg(strcmp(c.id, cases[i].ref) == 0, "ref '%s' for %s", c.id, cases[i].json);
    }
}
END_TEST

/* PROTO_MAX_DEPTH levels and PROTO_MAX_KEYS keys pass (brackets and colons
 * inside strings count for nothing); one more of either is refused. */
START_TEST(command_shape_limits)
{
    char json[2048];
    proto_cmd c;
    enum proto_code code = 0;
    snprintf(json, sizeof(json), "{\"type\":\"ping\",\"id\":\"s2\",\"x\":[[[\"[[{:\"]]]}");
    ck_assert_int_eq(parse(json, &c, &code), PX_OK);
    proto_cmd_free(&c);
    for (int extra = 0; extra < 2; extra++) {
        size_t n = (size_t)snprintf(json, sizeof(json), "{\"type\":\"ping\",\"id\":\"s3\"");
        for (int k = 2; k < PROTO_MAX_KEYS + extra; k++)
            n += (size_t)snprintf(json + n, sizeof(json) - n, ",\"k%d\":\"a:b\\\"c:\"", k);
        snprintf(json + n, sizeof(json) - n, "}");
        code = 0;
        int rc = parse(json, &c, &code);
        if (extra == 0) {
            ck_assert_msg(rc == PX_OK, "%d keys refused", PROTO_MAX_KEYS);
            proto_cmd_free(&c);
        } else {
            ck_assert_msg(rc == PX_DECLINED && code == PROTO_BAD_REQUEST, "%d keys accepted",
                          PROTO_MAX_KEYS + 1);
        }
    }
}
END_TEST

/* presence_sub: 0 to max_presence_sub user ids; one more is too_large.
 * presence_settings: a boolean. */
START_TEST(presence_commands)
{
    proto_cmd c;
    enum proto_code code;
    const proto_limits small = { .max_body_bytes = 16, .max_presence_sub = 2 };
    char msg[128];
    const char *two = "{\"type\":\"presence_sub\",\"id\":\"s\",\"users\":[\"bob\",\"eve\"]}";
    ck_assert_int_eq(proto_parse(two, strlen(two), &small, &c, &code, msg, sizeof(msg)), PX_OK);
    ck_assert_int_eq(c.type, PROTO_PRESENCE_SUB);
    ck_assert_int_eq(c.nids, 2);
    ck_assert_str_eq(c.ids[1], "eve");
    proto_cmd_free(&c);
    const char *three = "{\"type\":\"presence_sub\",\"id\":\"s\",\"users\":[\"a\",\"b\",\"c\"]}";
    ck_assert_int_eq(proto_parse(three, strlen(three), &small, &c, &code, msg, sizeof(msg)),
                     PX_DECLINED);
    ck_assert_int_eq(code, PROTO_TOO_LARGE);
    ck_assert_str_eq(c.id, "s");
    ck_assert_int_eq(parse("{\"type\":\"presence_sub\",\"id\":\"s\",\"users\":[]}", &c, &code),
                     PX_OK);
    ck_assert_int_eq(c.nids, 0);
    proto_cmd_free(&c);
    ck_assert_int_eq(parse("{\"type\":\"presence_settings\",\"id\":\"h\",\"hide_last_seen\":true}",
                           &c, &code), PX_OK);
    ck_assert_int_eq(c.type, PROTO_PRESENCE_SETTINGS);
    ck_assert_int_eq(c.hide_last_seen, 1);
    proto_cmd_free(&c);
    ck_assert_int_eq(parse("{\"type\":\"presence_settings\",\"id\":\"h\"}", &c, &code), PX_OK);
    ck_assert_int_eq(c.hide_last_seen, -1);
    proto_cmd_free(&c);
    char *ev = proto_render_presence("bob", 1, 42, NULL);
    ck_assert_str_eq(ev, "{\"type\":\"presence\",\"user\":\"bob\",\"online\":true,\"last_seen\":42}");
    free(ev);
}
END_TEST

START_TEST(too_many_members_is_group_full)
{
    char *buf = malloc(8192);
    int n = sprintf(buf, "{\"type\":\"group_add\",\"id\":\"x\",\"group\":\"g_1\",\"members\":[");
    for (int i = 0; i < 257; i++)
        n += sprintf(buf + n, "%s\"u%d\"", i ? "," : "", i);
    strcpy(buf + n, "]}");
    proto_cmd c;
    enum proto_code code;
    ck_assert_int_eq(parse(buf, &c, &code), PX_DECLINED);
    ck_assert_int_eq(code, PROTO_GROUP_FULL);
    free(buf);
}
END_TEST

START_TEST(render_events)
{
    size_t len;
    char *s = proto_render_sent("c1", "M1", 42, &len);
    ck_assert_str_eq(s, "{\"type\":\"sent\",\"ref\":\"c1\",\"msg_id\":\"M1\",\"ts\":42}");
    ck_assert_int_eq(len, strlen(s));
    free(s);
    s = proto_render_error(NULL, PROTO_TOO_LARGE, "big", &len);
    ck_assert_str_eq(s, "{\"type\":\"error\",\"code\":\"too_large\",\"message\":\"big\"}");
    free(s);
    proto_message m = { .id = "M1", .from = "alice", .to = "bob", .body = "h\"i", .ts = 7 };
    s = proto_render_message(&m, &len);
    ck_assert_str_eq(s, "{\"type\":\"message\",\"id\":\"M1\",\"from\":\"alice\",\"to\":\"bob\","
                        "\"body\":\"h\\\"i\",\"ts\":7}");
    free(s);
    proto_receipt r = { .id = "R1", .msg_id = "M1", .status = "read", .by = "bob", .ts = 9 };
    s = proto_render_receipt(&r, &len);
    ck_assert_str_eq(s, "{\"type\":\"receipt\",\"id\":\"R1\",\"msg_id\":\"M1\","
                        "\"status\":\"read\",\"by\":\"bob\",\"ts\":9}");
    free(s);
    r.group = "g_1";
    s = proto_render_receipt(&r, &len);
    ck_assert(strstr(s, "\"group\":\"g_1\"") != NULL);
    free(s);
}
END_TEST

static Suite *protocol_suite(void)
{
    Suite *s = suite_create("protocol");
    TCase *tc = tcase_create("codec");
    tcase_add_test(tc, send_ok);
    tcase_add_test(tc, ack_and_ping_ok);
    tcase_add_test(tc, device_commands);
    tcase_add_test(tc, presence_commands);
    tcase_add_test(tc, group_commands_ok);
    tcase_add_test(tc, bad_commands);
    tcase_add_test(tc, command_shape_limits);
    tcase_add_test(tc, too_many_members_is_group_full);
    tcase_add_test(tc, render_events);
    suite_add_tcase(s, tc);
    return s;
}

PX_CHECK_MAIN(protocol_suite)
