/* Push notifications for offline devices end to end (issue 18): a webhook
 * receiver inside this test (libmicrohttpd on loopback) stands for the push
 * gateway, and checks every call's X-Parley-Signature against the body with
 * the shared secret. A burst of messages to an offline device makes one
 * call (with the burst's count, no message text); a connected device is
 * never called while its user's offline device is; a 500 is retried until
 * answered 2xx, a gateway that keeps failing only for a bounded time; a 410 stops the calls to that device, also across a
 * kill -9 of the push service, until it connects again; group events and
 * group messages name their group. Runs against the services and against
 * parleyd. */
#include "auth.h"
#include "e2e.h"
#include "store.h"

#include <microhttpd.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

#define RX_SECRET "e2e-push-secret"
#define RX_MAX 256
#define RX_BODY_MAX 4096
#define PUSH_WAIT_MS 30000
#define RECORDS "parley_push_records_total"
#define PENDING "parley_push_pending_bursts"

/* ---- the receiver ---- */

typedef struct rx_call {
    char user[65], device[65];
    json_t *body;           /* the payload */
    int sig_ok;             /* X-Parley-Signature matched */
    int answered;           /* the status the receiver gave */
    int64_t at_ms;          /* monotonic: when it arrived */
} rx_call;

/* Answers per device: the first `fail_n` calls get `fail_status`, then 200;
 * fail_n < 0: every call. */
typedef struct rx_rule {
    char device[140];       /* "user/dev" */
    int fail_status, fail_n;
    int retry_after_s;      /* > 0: a Retry-After header with the failures */
} rx_rule;

static struct {
    pthread_mutex_t mu;
    rx_call calls[RX_MAX];
    size_t n;
    rx_rule rules[16];
    size_t nrules;
    struct MHD_Daemon *d;
} rx = { .mu = PTHREAD_MUTEX_INITIALIZER };

typedef struct rx_req {
    char buf[RX_BODY_MAX];
    size_t len;
} rx_req;

static int rx_sig_ok(const char *header, const char *body, size_t len)
{
    unsigned char mac[EVP_MAX_MD_SIZE];
    unsigned int maclen = 0;
    char want[7 + 65] = "sha256=";
    HMAC(EVP_sha256(), RX_SECRET, (int)strlen(RX_SECRET), (const unsigned char *)body, len,
         mac, &maclen);
    for (unsigned int i = 0; i < maclen; i++)
        snprintf(want + 7 + 2 * i, 3, "%02x", mac[i]);
    return header != NULL && strcmp(header, want) == 0;
}

/* mu held: the status for the next call to user/dev, and the Retry-After
 * to send with it (0: none). */
static int rx_status(const char *user, const char *dev, int *retry_after_s)
{
    char key[140];
    snprintf(key, sizeof(key), "%s/%s", user, dev);
    for (size_t i = 0; i < rx.nrules; i++) {
        rx_rule *r = &rx.rules[i];
        if (strcmp(r->device, key) != 0 || r->fail_n == 0)
            continue;
        if (r->fail_n > 0)
            r->fail_n--;
        *retry_after_s = r->retry_after_s;
        return r->fail_status;
    }
    return 200;
}

static enum MHD_Result rx_handle(void *cls, struct MHD_Connection *conn, const char *url,
                                 const char *method, const char *version,
                                 const char *upload, size_t *upload_size, void **state)
{
    rx_req *q = *state;
    if (q == NULL) {
        *state = calloc(1, sizeof(rx_req));
        return MHD_YES;
    }
    if (*upload_size > 0) {
        size_t room = sizeof(q->buf) - 1 - q->len, n = PX_MIN(room, *upload_size);
        memcpy(q->buf + q->len, upload, n);
        q->len += n;
        *upload_size = 0;
        return MHD_YES;
    }
    json_t *body = json_loadb(q->buf, q->len, 0, NULL);
    const char *sig = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "X-Parley-Signature");
    pthread_mutex_lock(&rx.mu);
    int status = 400, retry_after_s = 0;
    if (body != NULL && rx.n < RX_MAX && strcmp(method, "POST") == 0) {
        rx_call *c = &rx.calls[rx.n++];
        snprintf(c->user, sizeof(c->user), "%s", e2e_str(body, "user"));
        snprintf(c->device, sizeof(c->device), "%s", e2e_str(body, "device"));
        c->body = body;
        c->sig_ok = rx_sig_ok(sig, q->buf, q->len);
        c->answered = status = rx_status(c->user, c->device, &retry_after_s);
        c->at_ms = px_mono_ms();
        body = NULL;
    }
    pthread_mutex_unlock(&rx.mu);
    json_decref(body);
    struct MHD_Response *r = MHD_create_response_from_buffer(0, "", MHD_RESPMEM_PERSISTENT);
    if (retry_after_s > 0) {
        char v[16];
        snprintf(v, sizeof(v), "%d", retry_after_s);
        MHD_add_response_header(r, "Retry-After", v);
    }
    enum MHD_Result ret = MHD_queue_response(conn, (unsigned)status, r);
    MHD_destroy_response(r);
    return ret;
}

static void rx_done(void *cls, struct MHD_Connection *conn, void **state,
                    enum MHD_RequestTerminationCode why)
{
    free(*state);
    *state = NULL;
}

static int rx_port(void)
{
    const char *base = getenv("PARLEY_E2E_PORT");
    return (base != NULL ? atoi(base) : 18080) + 8;
}

static void rx_start(void)
{
    rx.d = MHD_start_daemon(MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL, (uint16_t)rx_port(),
                            NULL, NULL, rx_handle, NULL, MHD_OPTION_NOTIFY_COMPLETED, rx_done,
                            NULL, MHD_OPTION_END);
    if (rx.d == NULL) {
        fprintf(stderr, "test_push: the receiver could not listen on %d\n", rx_port());
        exit(EXIT_FAILURE);
    }
}

static void rx_stop(void)
{
    MHD_stop_daemon(rx.d);
    for (size_t i = 0; i < rx.n; i++)
        json_decref(rx.calls[i].body);
}

static void rx_rule_add(const char *user, const char *dev, int status, int n, int retry_after_s)
{
    pthread_mutex_lock(&rx.mu);
    rx_rule *r = &rx.rules[rx.nrules++];
    snprintf(r->device, sizeof(r->device), "%s/%s", user, dev);
    r->fail_status = status;
    r->fail_n = n;
    r->retry_after_s = retry_after_s;
    pthread_mutex_unlock(&rx.mu);
}

/* The calls so far for user (dev NULL: any device); the i-th one's copy
 * into *out (body: a new reference) when i < the count. */
static size_t rx_calls(const char *user, const char *dev, size_t i, rx_call *out)
{
    size_t k = 0;
    pthread_mutex_lock(&rx.mu);
    for (size_t j = 0; j < rx.n; j++) {
        const rx_call *c = &rx.calls[j];
        if (strcmp(c->user, user) != 0 || (dev != NULL && strcmp(c->device, dev) != 0))
            continue;
        if (k++ == i && out != NULL) {
            *out = *c;
            json_incref(out->body);
        }
    }
    pthread_mutex_unlock(&rx.mu);
    return k;
}

static void rx_wait(const char *user, const char *dev, size_t n)
{
    int64_t end = px_mono_ms() + PUSH_WAIT_MS;
    while (rx_calls(user, dev, 0, NULL) < n && px_mono_ms() < end)
        usleep(20 * 1000);
    ck_assert_msg(rx_calls(user, dev, 0, NULL) >= n, "%s/%s: %zu calls, want %zu", user,
                  dev ? dev : "*", rx_calls(user, dev, 0, NULL), n);
}

/* Waits for a call to user/dev whose payload has key = value; returns it
 * (the caller frees c->body). */
static void rx_wait_match(const char *user, const char *dev, const char *key, const char *value,
                          rx_call *c)
{
    int64_t end = px_mono_ms() + 2 * PUSH_WAIT_MS;
    size_t next = 0;
    memset(c, 0, sizeof(*c));
    while (px_mono_ms() < end) {
        if (rx_calls(user, dev, next, c) <= next) {
            usleep(20 * 1000);
            continue;
        }
        next++;
        if (strcmp(e2e_str(c->body, key), value) == 0)
            return;
        json_decref(c->body);
        c->body = NULL;
    }
    ck_abort_msg("%s/%s: no call with %s %s", user, dev, key, value);
}

/* ---- Parley side ---- */

/* Connected as (user, dev) and synced. */
static client *dev_connect(const char *user, const char *dev, enum e2e_svc gw)
{
    client *cl = e2e_connect_device(user, dev, gw);
    json_decref(e2e_wait_type(cl, "synced"));
    return cl;
}

static store *push_store(void)
{
    char err[PX_ERRLEN] = "";
    store *st = store_open(getenv("PARLEY_MONGO_URI"), getenv("PARLEY_MONGO_DB"), err,
                           sizeof(err));
    ck_assert_msg(st != NULL, "store: %s", err);
    return st;
}

/* Waits until user has n connection records in the registry (so a burst
 * that ends now sees what the test arranged). */
static void registry_wait(const char *user, int64_t n)
{
    store *st = push_store();
    int64_t end = px_mono_ms() + PUSH_WAIT_MS, got = -1;
    char err[PX_ERRLEN] = "";
    while (px_mono_ms() < end) {
        ck_assert_msg(store_presence_count(st, user, &got, err, sizeof(err)) == PX_OK, "%s",
                      err);
        if (got == n)
            break;
        usleep(50 * 1000);
    }
    store_close(st);
    ck_assert_msg(got == n, "%s: %lld connection records, want %lld", user, (long long)got,
                  (long long)n);
}

/* A device of user that exists (linked at its first connection) and is
 * offline now. */
static void dev_register_offline(const char *user, const char *dev)
{
    client_free(dev_connect(user, dev, E2E_GW1));
    registry_wait(user, 0);
}

/* Waits until the push service consumed at least `records` records since
 * `base` and has no burst left open: everything it will call for them has
 * been called. */
static void push_settled(long long base, long long records)
{
    int64_t end = px_mono_ms() + PUSH_WAIT_MS;
    long long got = -1, pending = -1;
    while (px_mono_ms() < end) {
        got = e2e_metric(E2E_PUSH, RECORDS) - base;
        pending = e2e_metric(E2E_PUSH, PENDING);
        if (got >= records && pending == 0)
            return;
        usleep(50 * 1000);
    }
    ck_abort_msg("push not settled: %lld of %lld records, %lld bursts open", got, records,
                 pending);
}

static void send_n(client *a, const char *to, int n, const char *tag)
{
    char cid[64], body[64], mid[64];
    for (int i = 0; i < n; i++) {
        snprintf(cid, sizeof(cid), "%s-%d", tag, i);
        snprintf(body, sizeof(body), "secret text %s %d", tag, i);
        e2e_send(a, cid, to, body, mid);
    }
}

START_TEST(a_burst_to_an_offline_device_is_one_signed_call)
{
    char alice[65], bob[65];
    e2e_user("pa", alice);
    e2e_user("pb", bob);
    dev_register_offline(bob, "phone");
    long long base = e2e_metric(E2E_PUSH, RECORDS);
    client *a = dev_connect(alice, "web", E2E_GW1);
    send_n(a, bob, 5, "burst");
    rx_wait(bob, "phone", 1);
    push_settled(base, 5);
    ck_assert_uint_eq(rx_calls(bob, NULL, 0, NULL), 1);
    rx_call c;
    rx_calls(bob, "phone", 0, &c);
    ck_assert_msg(c.sig_ok, "bad signature on %s", json_dumps(c.body, 0));
    ck_assert_str_eq(e2e_str(c.body, "kind"), "message");
    ck_assert_str_eq(e2e_str(c.body, "sender"), alice);
    ck_assert_int_eq(json_integer_value(json_object_get(c.body, "count")), 5);
    ck_assert_ptr_null(json_object_get(c.body, "preview"));
    ck_assert_ptr_null(json_object_get(c.body, "body"));
    char *text = json_dumps(c.body, 0);
    ck_assert_msg(strstr(text, "secret text") == NULL, "message text in the payload: %s", text);
    free(text);
    json_decref(c.body);
    client_free(a);
}
END_TEST

START_TEST(a_connected_device_is_not_called_its_offline_sibling_is)
{
    char alice[65], bob[65];
    e2e_user("pa", alice);
    e2e_user("pb", bob);
    dev_register_offline(bob, "phone");
    client *web = dev_connect(bob, "web", E2E_GW2);
    registry_wait(bob, 1);
    long long base = e2e_metric(E2E_PUSH, RECORDS);
    client *a = dev_connect(alice, "web", E2E_GW1);
    send_n(a, bob, 2, "online");
    json_decref(e2e_wait_type(web, "message"));
    rx_wait(bob, "phone", 1);
    push_settled(base, 2);
    ck_assert_uint_eq(rx_calls(bob, "web", 0, NULL), 0);
    ck_assert_uint_eq(rx_calls(bob, NULL, 0, NULL), 1);
    client_free(a);
    client_free(web);
}
END_TEST

START_TEST(a_500_is_retried_until_answered)
{
    char alice[65], carol[65];
    e2e_user("pa", alice);
    e2e_user("pc", carol);
    dev_register_offline(carol, "phone");
    rx_rule_add(carol, "phone", 500, 2, 0);
    long long retried = e2e_metric(E2E_PUSH, "parley_push_retried_total");
    long long sent = e2e_metric(E2E_PUSH, "parley_push_sent_total");
    client *a = dev_connect(alice, "web", E2E_GW1);
    send_n(a, carol, 1, "retry");
    rx_wait(carol, "phone", 3);
    rx_call c[3];
    for (size_t i = 0; i < 3; i++) {
        rx_calls(carol, "phone", i, &c[i]);
        ck_assert(c[i].sig_ok);
        ck_assert_int_eq(c[i].answered, i < 2 ? 500 : 200);
    }
    ck_assert(json_equal(c[0].body, c[2].body));
    for (size_t i = 0; i < 3; i++)
        json_decref(c[i].body);
    /* The counters move once the service has read the answer. */
    int64_t end = px_mono_ms() + PUSH_WAIT_MS;
    while (e2e_metric(E2E_PUSH, "parley_push_sent_total") == sent && px_mono_ms() < end)
        usleep(20 * 1000);
    ck_assert_int_ge(e2e_metric(E2E_PUSH, "parley_push_retried_total") - retried, 2);
    ck_assert_int_eq(e2e_metric(E2E_PUSH, "parley_push_sent_total") - sent, 1);
    client_free(a);
}
END_TEST

/* dave's tablet answers 200 and stands as the sentinel: a call to it with
 * a message's id means the burst holding that message has been decided
 * for every device. The 410 is kept in the store: a kill -9 of the push
 * service (parleyd: of parleyd) forgets nothing. */
START_TEST(a_410_stops_pushes_until_the_device_connects_again)
{
    char alice[65], dave[65], mid[64];
    e2e_user("pa", alice);
    e2e_user("pd", dave);
    dev_register_offline(dave, "phone");
    dev_register_offline(dave, "tablet");
    rx_rule_add(dave, "phone", 410, -1, 0);
    client *a = dev_connect(alice, "web", E2E_GW1);
    e2e_send(a, "gone1", dave, "gone 1", mid);
    rx_wait(dave, "phone", 1);
    rx_wait(dave, "tablet", 1);
    push_settled(e2e_metric(E2E_PUSH, RECORDS), 0);
    client_free(a);
    e2e_kill9(E2E_PUSH);
    ck_assert_int_eq(e2e_restart(E2E_PUSH), 0);
    /* Gone: a later message calls the tablet only. */
    a = dev_connect(alice, "web", E2E_GW1);
    e2e_send(a, "gone2", dave, "gone 2", mid);
    rx_call c;
    rx_wait_match(dave, "tablet", "id", mid, &c);
    json_decref(c.body);
    push_settled(e2e_metric(E2E_PUSH, RECORDS), 0);
    ck_assert_uint_eq(rx_calls(dave, "phone", 0, NULL), 1);
    /* It connects again: pushes resume. */
    dev_register_offline(dave, "phone");
    e2e_send(a, "gone3", dave, "gone 3", mid);
    rx_wait(dave, "phone", 2);
    client_free(a);
}
END_TEST

/* Group events (an invitation) and group messages wake too, and say which
 * group. A device that got an event live and left before its burst ended
 * may be woken for it (docs/operations.md): calls are matched by what they
 * carry, not counted. */
START_TEST(group_events_and_messages_name_the_group)
{
    char alice[65], erin[65], gid[65], ref[16] = "gm1";
    e2e_user("pa", alice);
    e2e_user("pe", erin);
    dev_register_offline(erin, "phone");
    client *a = dev_connect(alice, "web", E2E_GW1);
    json_t *g = e2e_cmd(a, json_pack("{s:s, s:s, s:s, s:[s]}", "type", "group_create", "id",
                                     "g1", "name", "pushers", "members", erin));
    snprintf(gid, sizeof(gid), "%s", e2e_str(json_object_get(g, "group"), "id"));
    json_decref(g);
    rx_call c;
    rx_wait_match(erin, "phone", "kind", "group_event", &c);
    ck_assert_str_eq(e2e_str(c.body, "group"), gid);
    ck_assert_str_eq(e2e_str(c.body, "sender"), alice);
    ck_assert(c.sig_ok);
    json_decref(c.body);
    client *e = dev_connect(erin, "phone", E2E_GW2);
    e2e_join(e, gid);
    client_free(e);
    registry_wait(erin, 0);
    json_t *r = e2e_cmd(a, json_pack("{s:s, s:s, s:s, s:s}", "type", "send", "id", ref, "group",
                                     gid, "body", "to the group"));
    ck_assert_str_eq(e2e_str(r, "type"), "sent");
    char mid[64];
    snprintf(mid, sizeof(mid), "%s", e2e_str(r, "msg_id"));
    json_decref(r);
    rx_wait_match(erin, "phone", "id", mid, &c);
    ck_assert_str_eq(e2e_str(c.body, "kind"), "message");
    ck_assert_str_eq(e2e_str(c.body, "group"), gid);
    ck_assert_str_eq(e2e_str(c.body, "sender"), alice);
    json_decref(c.body);
    client_free(a);
}
END_TEST

/* A device whose gateway keeps failing is retried until the burst is
 * PARLEY_PUSH_RETRY_S old, then dropped: once, and the burst ends (its
 * records are committed; without the bound it would never settle). */
START_TEST(failures_are_retried_for_a_bounded_time_then_dropped)
{
    char alice[65], frank[65];
    e2e_user("pa", alice);
    e2e_user("pf", frank);
    dev_register_offline(frank, "phone");
    rx_rule_add(frank, "phone", 503, -1, 0);
    long long dropped = e2e_metric(E2E_PUSH, "parley_push_dropped_total");
    long long base = e2e_metric(E2E_PUSH, RECORDS);
    client *a = dev_connect(alice, "web", E2E_GW1);
    send_n(a, frank, 1, "drop");
    rx_wait(frank, "phone", 2);
    int64_t end = px_mono_ms() + 2 * PUSH_WAIT_MS;
    while (e2e_metric(E2E_PUSH, "parley_push_dropped_total") == dropped && px_mono_ms() < end)
        usleep(50 * 1000);
    ck_assert_int_eq(e2e_metric(E2E_PUSH, "parley_push_dropped_total") - dropped, 1);
    push_settled(base, 1);
    ck_assert_uint_ge(rx_calls(frank, "phone", 0, NULL), 2);
    client_free(a);
}
END_TEST

/* A 429 or 503 with Retry-After is not called again sooner than that
 * (a lower bound: a slow box can only make the wait longer). */
START_TEST(retry_after_is_waited_out)
{
    char alice[65], gina[65];
    e2e_user("pa", alice);
    e2e_user("pg", gina);
    dev_register_offline(gina, "phone");
    rx_rule_add(gina, "phone", 429, 1, 3);
    client *a = dev_connect(alice, "web", E2E_GW1);
    send_n(a, gina, 1, "later");
    rx_wait(gina, "phone", 2);
    rx_call c[2];
    for (size_t i = 0; i < 2; i++) {
        rx_calls(gina, "phone", i, &c[i]);
        json_decref(c[i].body);
    }
    ck_assert_int_eq(c[0].answered, 429);
    ck_assert_int_eq(c[1].answered, 200);
    ck_assert_msg(c[1].at_ms - c[0].at_ms >= 2900, "called again %lld ms after Retry-After: 3",
                  (long long)(c[1].at_ms - c[0].at_ms));
    client_free(a);
}
END_TEST

static Suite *push_suite(void)
{
    Suite *s = suite_create("e2e-push");
    TCase *tc = tcase_create("push");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, a_burst_to_an_offline_device_is_one_signed_call);
    tcase_add_test(tc, a_connected_device_is_not_called_its_offline_sibling_is);
    tcase_add_test(tc, a_500_is_retried_until_answered);
    tcase_add_test(tc, a_410_stops_pushes_until_the_device_connects_again);
    tcase_add_test(tc, group_events_and_messages_name_the_group);
    tcase_add_test(tc, failures_are_retried_for_a_bounded_time_then_dropped);
    tcase_add_test(tc, retry_after_is_waited_out);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    char url[64];
    snprintf(url, sizeof(url), "http://127.0.0.1:%d/push", rx_port());
    setenv("PARLEY_PUSH_URL", url, 1);
    setenv("PARLEY_PUSH_SECRET", RX_SECRET, 1);
    /* Long enough that a burst sent on a busy box stays one burst. */
    setenv("PARLEY_PUSH_COALESCE_MS", "2000", 1);
    /* Long enough for the retry case's third call on a busy box, short
     * enough for the bounded-retry case. */
    setenv("PARLEY_PUSH_RETRY_S", "15", 1);
    rx_start();
    int rc = e2e_main(push_suite());
    rx_stop();
    return rc;
}
