/* Multi-device delivery end to end (issue 17): a token's `dev` claim names
 * the connection's device; every device of a user gets every event and
 * keeps it pending until that device acks it; a device linked later gets
 * nothing older than its link; at most PARLEY_MAX_DEVICES per user; the
 * sender gets one `delivered` receipt per message whatever the number of
 * devices; kill -9 of message-store between two devices' acks loses
 * nothing. Runs against the services and against parleyd. */
#include "auth.h"
#include "e2e.h"
#include "store.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

/* Connects (user, dev), reads its backlog and closes: the ids it held. */
static json_t *dev_backlog(const char *user, const char *dev, enum e2e_svc gw)
{
    client *cl = e2e_connect_device(user, dev, gw);
    json_t *ids = e2e_backlog_ids(cl);
    client_close(cl, 1000);
    return ids;
}

/* How many of ids (all of the backlog when n is 0) (user, dev) still gets. */
static size_t backlog_holds(const char *user, const char *dev, enum e2e_svc gw,
                            const char *const *ids, size_t n)
{
    json_t *got = dev_backlog(user, dev, gw);
    size_t held = n == 0 ? json_array_size(got) : 0;
    for (size_t i = 0; i < n; i++)
        held += e2e_has_id(got, ids[i]);
    json_decref(got);
    return held;
}

/* An ack is applied after its receipt leaves and after the acker's later
 * acks are read (message-store's writer deletes the device's marks in
 * batches), so a sync right after an ack may still hold the id once more
 * (at least once on the wire). What must hold is that acked ids stop
 * coming: reconnects until (user, dev) gets none of ids (nothing at all
 * when n is 0), failing after 30 s; the syncs that still held one are a
 * report line. */
static void backlog_drops(const char *user, const char *dev, enum e2e_svc gw,
                          const char *const *ids, size_t n)
{
    int64_t end = px_mono_ms() + 30000;
    size_t held;
    int syncs = 0;
    while ((held = backlog_holds(user, dev, gw, ids, n)) > 0 && px_mono_ms() < end)
        syncs++;
    ck_assert_msg(held == 0, "%s/%s got %zu acked events again for 30 s", user, dev, held);
    if (syncs > 0)
        fprintf(stderr, "report: %s: %d sync(s) held an acked id once more\n", dev, syncs);
}

/* A first connection of (user, dev) that reads its (empty or not) backlog
 * and leaves: the device is linked from here on. */
static void dev_link(const char *user, const char *dev, enum e2e_svc gw)
{
    json_decref(dev_backlog(user, dev, gw));
}

static int message_with_id(const json_t *m, void *arg)
{
    return strcmp(e2e_str(m, "type"), "message") == 0 && strcmp(e2e_str(m, "id"), arg) == 0;
}

static void wait_message(client *cl, const char *mid)
{
    json_t *m = NULL;
    ck_assert_msg(client_next(cl, message_with_id, (void *)mid, E2E_WAIT_MS, &m) == PX_OK,
                  "message %s not received: %s", mid, client_errstr(cl));
    json_decref(m);
}

static int is_receipt(const json_t *m, void *arg)
{
    return strcmp(e2e_str(m, "type"), "receipt") == 0;
}

/* A delivered receipt for the msg_id arg. */
static int is_delivered_of(const json_t *m, void *arg)
{
    return is_receipt(m, NULL) && strcmp(e2e_str(m, "msg_id"), arg) == 0 &&
           strcmp(e2e_str(m, "status"), "delivered") == 0;
}

/* Reads the sender's receipts (acking each) until one for sentinel with
 * status sentinel_status; counts those for mid (or mid2, may be NULL) of
 * status on the way. */
static int receipts_before2(client *a, const char *mid, const char *mid2, const char *status,
                            const char *sentinel, const char *sentinel_status)
{
    int n = 0;
    for (;;) {
        json_t *r = NULL;
        ck_assert_msg(client_next(a, is_receipt, NULL, E2E_WAIT_MS, &r) == PX_OK,
                      "no %s receipt for the sentinel: %s", sentinel_status, client_errstr(a));
        e2e_ack(a, e2e_str(r, "id"));
        int done = strcmp(e2e_str(r, "msg_id"), sentinel) == 0 &&
                   strcmp(e2e_str(r, "status"), sentinel_status) == 0;
        const char *m = e2e_str(r, "msg_id");
        n += (strcmp(m, mid) == 0 || (mid2 != NULL && strcmp(m, mid2) == 0)) &&
             strcmp(e2e_str(r, "status"), status) == 0;
        json_decref(r);
        if (done)
            return n;
    }
}

static int receipts_before(client *a, const char *mid, const char *status, const char *sentinel,
                           const char *sentinel_status)
{
    return receipts_before2(a, mid, NULL, status, sentinel, sentinel_status);
}

/* owner's phone (connected, synced, on gw1) and laptop (linked, offline),
 * and other connected on agw: the start of the tests of two devices. */
static void phone_laptop_alice(const char *owner, const char *other, enum e2e_svc agw,
                               client **phone, client **a)
{
    *phone = e2e_connect_device(owner, "phone", E2E_GW1);
    json_decref(e2e_wait_type(*phone, "synced"));
    dev_link(owner, "laptop", E2E_GW2);
    *a = e2e_connect(other, agw);
    json_decref(e2e_wait_type(*a, "synced"));
}

/* Bob's phone and laptop are linked; the laptop is offline while the
 * phone gets and acks two messages. The laptop still gets both on its next
 * connection, the phone gets neither again, and alice gets one delivered
 * receipt per message, when the phone acked, none when the laptop does. */
START_TEST(offline_device_keeps_what_the_other_acked)
{
    char alice[65], bob[65], m1[64], m2[64], sentinel[64];
    e2e_user("alice", alice);
    e2e_user("bob", bob);
    client *phone, *a;
    phone_laptop_alice(bob, alice, E2E_GW1, &phone, &a);
    e2e_send(a, "c1", bob, "one", m1);
    e2e_send(a, "c2", bob, "two", m2);
    wait_message(phone, m1);
    wait_message(phone, m2);
    e2e_ack(phone, m1);
    e2e_ack(phone, m2);
    /* m2's receipt follows m1's (one reader, in order). */
    ck_assert_int_eq(receipts_before(a, m1, "delivered", m2, "delivered"), 1);
    client_close(phone, 1000);

    backlog_drops(bob, "phone", E2E_GW2, (const char *const[]){ m1, m2 }, 2);
    client *laptop = e2e_connect_device(bob, "laptop", E2E_GW1);
    json_t *ids = e2e_backlog_ids(laptop);
    ck_assert_msg(e2e_has_id(ids, m1) && e2e_has_id(ids, m2),
                  "the laptop lost what the phone acked: %s",
                  json_dumps(ids, 0));
    json_decref(ids);
    e2e_ack(laptop, m1);
    e2e_ack(laptop, m2);
    /* A sentinel acked by the laptop after those acks: its receipt comes
     * after any receipt they could have made. */
    e2e_send(a, "c3", bob, "sentinel", sentinel);
    wait_message(laptop, sentinel);
    e2e_ack(laptop, sentinel);
    ck_assert_int_eq(receipts_before2(a, m1, m2, "delivered", sentinel, "delivered"), 0);
    client_close(laptop, 1000);
    backlog_drops(bob, "laptop", E2E_GW2, NULL, 0);
    client_close(a, 1000);
}
END_TEST

/* An ack of a stored event is applied late, between the acker's batches
 * (ack.c: ack_late), after acks consumed later may have been: waits until
 * one more such ack was applied than before (*found: the count then). */
static void late_ack_applied(long long *found)
{
    const char *name = "parley_msgstore_ack_waits_total{result=\"found\"}";
    int64_t end = px_mono_ms() + E2E_WAIT_MS;
    long long v;
    while ((v = e2e_metric(E2E_STORE, name)) <= *found && px_mono_ms() < end)
        usleep(20 * 1000);
    ck_assert_msg(v > *found, "the ack was not applied (%lld late acks found)", v);
    *found = v;
}

/* Three devices; each acks in turn. The event stays for those that have
 * not acked, and is gone for all once the third did. One delivered
 * receipt in all. */
START_TEST(three_devices_each_ack_their_own)
{
    static const char *const devs[3] = { "phone", "tablet", "web" };
    char alice[65], bob[65], mid[64], sentinel[64];
    e2e_user("alice", alice);
    e2e_user("bob", bob);
    for (int i = 0; i < 3; i++)
        dev_link(bob, devs[i], i % 2 ? E2E_GW2 : E2E_GW1);
    client *a = e2e_connect(alice, E2E_GW1);
    json_decref(e2e_wait_type(a, "synced"));
    e2e_send(a, "c1", bob, "to every device", mid);
    long long found = e2e_metric(E2E_STORE, "parley_msgstore_ack_waits_total{result=\"found\"}");
    for (int i = 0; i < 3; i++) {
        for (int j = i; j < 3; j++) {
            json_t *ids = dev_backlog(bob, devs[j], E2E_GW2);
            ck_assert_msg(e2e_has_id(ids, mid), "%s lost it after %d acks", devs[j], i);
            json_decref(ids);
        }
        client *cl = e2e_connect_device(bob, devs[i], E2E_GW1);
        json_decref(e2e_backlog_ids(cl));
        e2e_ack(cl, mid);
        /* The event is stored (the syncs above ended its hold): its ack is
         * late. Once it is applied, its fact (if any) is in parley.receipts
         * before the sentinel's, whose receipt then comes after it. */
        late_ack_applied(&found);
        char cid[8];
        snprintf(cid, sizeof(cid), "s%d", i);
        e2e_send(a, cid, bob, "sentinel", sentinel);
        wait_message(cl, sentinel);
        e2e_ack(cl, sentinel);
        client_close(cl, 1000);
        int d = receipts_before(a, mid, "delivered", sentinel, "delivered");
        ck_assert_msg(d == (i == 0), "%d delivered receipts after the ack of %s", d, devs[i]);
        for (int j = 0; j <= i; j++)
            backlog_drops(bob, devs[j], E2E_GW1, (const char *const[]){ mid }, 1);
    }
    client_close(a, 1000);
}
END_TEST

/* A user's first device gets what was sent before it (store-and-forward);
 * a device linked after a message was sent does not get it, and gets what
 * comes after its link. */
START_TEST(device_linked_later_gets_nothing_older)
{
    char alice[65], bob[65], m1[64], m2[64];
    e2e_user("alice", alice);
    e2e_user("bob", bob);
    client *a = e2e_connect(alice, E2E_GW1);
    json_decref(e2e_wait_type(a, "synced"));
    e2e_send(a, "c1", bob, "before any device", m1);
    json_t *ids = dev_backlog(bob, "phone", E2E_GW2);
    ck_assert_msg(e2e_has_id(ids, m1), "the first device missed what was pending");
    json_decref(ids);
    ids = dev_backlog(bob, "laptop", E2E_GW1);
    ck_assert_msg(!e2e_has_id(ids, m1), "a device linked later got an older message");
    json_decref(ids);
    e2e_send(a, "c2", bob, "after the link", m2);
    ids = dev_backlog(bob, "laptop", E2E_GW2);
    ck_assert_msg(e2e_has_id(ids, m2) && !e2e_has_id(ids, m1), "laptop backlog %s", json_dumps(ids, 0));
    json_decref(ids);
    ids = dev_backlog(bob, "phone", E2E_GW1);
    ck_assert_msg(e2e_has_id(ids, m1) && e2e_has_id(ids, m2), "phone backlog %s", json_dumps(ids, 0));
    json_decref(ids);
    client_close(a, 1000);
}
END_TEST

/* PARLEY_MAX_DEVICES (5 by default) linked devices, the default device
 * (no claim) among them; a sixth is refused with 403 at the upgrade; the
 * linked ones still connect. */
START_TEST(device_limit_refuses_the_sixth)
{
    char bob[65];
    e2e_user("bob", bob);
    client *def = e2e_connect(bob, E2E_GW1);
    json_decref(e2e_wait_type(def, "synced"));
    char dev[16];
    for (int i = 1; i < 5; i++) {
        snprintf(dev, sizeof(dev), "d%d", i);
        dev_link(bob, dev, i % 2 ? E2E_GW2 : E2E_GW1);
    }
    int status = 0;
    client *sixth = e2e_try_device(bob, "d5", E2E_GW2, &status);
    ck_assert_msg(sixth == NULL && status == 403, "sixth device: HTTP %d", status);
    sixth = e2e_try_device(bob, "d5", E2E_GW1, &status);
    ck_assert_msg(sixth == NULL && status == 403, "sixth device on gw1: HTTP %d", status);
    dev_link(bob, "d4", E2E_GW1);
    client_close(def, 1000);
    def = e2e_connect(bob, E2E_GW2);
    json_decref(e2e_wait_type(def, "synced"));
    client_close(def, 1000);
}
END_TEST

static void group_send(client *a, const char *cid, const char *gid, char mid[64])
{
    json_t *s = e2e_cmd(a, json_pack("{s:s, s:s, s:s, s:s}", "type", "send", "id", cid, "group",
                                     gid, "body", "to the group"));
    ck_assert_msg(strcmp(e2e_str(s, "type"), "sent") == 0, "group send: %s", json_dumps(s, 0));
    snprintf(mid, 64, "%s", e2e_str(s, "msg_id"));
    json_decref(s);
}

/* A group message reaches each of a member's devices, stays for the one
 * that has not acked it, and the sender gets one delivered receipt per
 * member. */
START_TEST(group_message_reaches_every_device)
{
    char alice[65], bob[65], carol[65], gid[80], mid[64], sentinel[64];
    e2e_user("alice", alice);
    e2e_user("bob", bob);
    e2e_user("carol", carol);
    client *phone = e2e_connect_device(bob, "phone", E2E_GW1);
    client *laptop = e2e_connect_device(bob, "laptop", E2E_GW2);
    client *c = e2e_connect(carol, E2E_GW1);
    json_decref(e2e_wait_type(phone, "synced"));
    json_decref(e2e_wait_type(laptop, "synced"));
    json_decref(e2e_wait_type(c, "synced"));
    client *a = e2e_connect(alice, E2E_GW2);
    json_decref(e2e_wait_type(a, "synced"));
    json_t *g = e2e_cmd(a, json_pack("{s:s, s:s, s:s, s:[s, s]}", "type", "group_create", "id",
                                     "g1", "name", "trio", "members", bob, carol));
    snprintf(gid, sizeof(gid), "%s", e2e_str(json_object_get(g, "group"), "id"));
    json_decref(g);
    e2e_join(phone, gid);
    e2e_join(c, gid);
    group_send(a, "m1", gid, mid);
    wait_message(phone, mid);
    wait_message(laptop, mid);
    wait_message(c, mid);
    e2e_ack(phone, mid);
    e2e_ack(c, mid);
    client_free(laptop);
    group_send(a, "m2", gid, sentinel);
    wait_message(phone, sentinel);
    wait_message(c, sentinel);
    e2e_ack(phone, sentinel);
    e2e_ack(c, sentinel);
    int d = receipts_before(a, mid, "delivered", sentinel, "delivered");
    d += receipts_before(a, mid, "delivered", sentinel, "delivered");
    /* Two readers' receipts keep no order between them, and an ack that
     * overtook its event's put is applied on a retry (ackwait.c), after
     * a later one: a missing one may still come. */
    json_t *r = NULL;
    while (d < 2 && client_next(a, is_delivered_of, mid, E2E_WAIT_MS, &r) == PX_OK) {
        d++;
        json_decref(r);
    }
    ck_assert_msg(d == 2, "%d delivered receipts for 2 members", d);
    json_t *ids = dev_backlog(bob, "laptop", E2E_GW1);
    ck_assert_msg(e2e_has_id(ids, mid) && e2e_has_id(ids, sentinel), "laptop lost the group messages");
    json_decref(ids);
    client_close(phone, 1000);
    backlog_drops(bob, "phone", E2E_GW2, (const char *const[]){ mid }, 1);
    client_close(c, 1000);
    client_close(a, 1000);
}
END_TEST

enum { KILL_N = 100 };

/* The phone acks every message; message-store is killed -9 while those
 * acks are applied (parleyd: the whole process); the laptop still gets
 * every message, then acks them, and afterwards neither device gets any
 * of them again. Alice gets a delivered receipt for every message. */
START_TEST(kill9_store_between_two_devices_acks)
{
    static char mid[KILL_N][64];
    char alice[65], bob[65], cid[16];
    e2e_user("alice", alice);
    e2e_user("bob", bob);
    client *phone, *a;
    phone_laptop_alice(bob, alice, E2E_GW2, &phone, &a);
    for (int i = 0; i < KILL_N; i++) {
        snprintf(cid, sizeof(cid), "k%d", i);
        e2e_send(a, cid, bob, "kill test", mid[i]);
    }
    for (int i = 0; i < KILL_N; i++)
        wait_message(phone, mid[i]);
    for (int i = 0; i < KILL_N; i++)
        e2e_ack(phone, mid[i]);
    usleep(50 * 1000);
    e2e_kill9(E2E_STORE);
    ck_assert_int_eq(e2e_restart(E2E_STORE), 0);
    client_free(phone);
    client_free(a);
    /* The phone repeats its acks, as a client whose connection died does. */
    phone = e2e_connect_device(bob, "phone", E2E_GW1);
    json_decref(e2e_backlog_ids(phone));
    for (int i = 0; i < KILL_N; i++)
        e2e_ack(phone, mid[i]);
    client *laptop = e2e_connect_device(bob, "laptop", E2E_GW2);
    json_t *ids = e2e_backlog_ids(laptop);
    int missing = 0;
    for (int i = 0; i < KILL_N; i++)
        missing += !e2e_has_id(ids, mid[i]);
    json_decref(ids);
    ck_assert_msg(missing == 0, "the laptop lost %d of %d messages", missing, KILL_N);
    for (int i = 0; i < KILL_N; i++)
        e2e_ack(laptop, mid[i]);
    /* Both devices' acks are applied once a sentinel acked by both is. */
    char sentinel[64];
    a = e2e_connect(alice, E2E_GW2);
    e2e_send(a, "sentinel", bob, "sentinel", sentinel);
    wait_message(laptop, sentinel);
    wait_message(phone, sentinel);
    e2e_ack(laptop, sentinel);
    e2e_ack(phone, sentinel);
    client_close(laptop, 1000);
    client_close(phone, 1000);
    /* Every message has its delivered receipt (repeats share an id). */
    static int delivered[KILL_N];
    int got = 0;
    int64_t deadline = px_mono_ms() + 60000;
    while (got < KILL_N && px_mono_ms() < deadline) {
        json_t *r = NULL;
        if (client_next(a, is_receipt, NULL, 1000, &r) != PX_OK)
            continue;
        for (int i = 0; i < KILL_N; i++)
            if (strcmp(e2e_str(r, "msg_id"), mid[i]) == 0 && !delivered[i]) {
                delivered[i] = 1;
                got++;
            }
        e2e_ack(a, e2e_str(r, "id"));
        json_decref(r);
    }
    ck_assert_msg(got == KILL_N, "%d of %d delivered receipts", got, KILL_N);
    /* The receipts came from the phone's acks; the laptop's are applied
     * some time later (its sentinel ack names nothing the test can see). */
    const char *acked[KILL_N];
    for (int i = 0; i < KILL_N; i++)
        acked[i] = mid[i];
    backlog_drops(bob, "phone", E2E_GW1, acked, KILL_N);
    backlog_drops(bob, "laptop", E2E_GW1, acked, KILL_N);
    client_close(a, 1000);
}
END_TEST

static int type_with_id(const json_t *m, const char *type, const char *id)
{
    return strcmp(e2e_str(m, "type"), type) == 0 && strcmp(e2e_str(m, "id"), id) == 0;
}

/* Reads cl until a message with id sentinel; 1 if an event of type with
 * id came before it. */
static int seen_before(client *cl, const char *type, const char *id, const char *sentinel)
{
    int seen = 0;
    for (;;) {
        json_t *m = client_recv_json(cl, E2E_WAIT_MS);
        ck_assert_msg(m != NULL, "no sentinel %s: %s", sentinel, client_errstr(cl));
        seen |= type_with_id(m, type, id);
        int done = type_with_id(m, "message", sentinel);
        json_decref(m);
        if (done)
            return seen;
    }
}

/* What alice sends from her phone reaches her laptop as a `message` (from
 * alice, to bob), live and, when the laptop was offline, on its next
 * connection; the phone itself gets only `sent`. The receipts reach both
 * of alice's devices. */
START_TEST(own_messages_reach_the_other_devices)
{
    char alice[65], bob[65], m1[64], m2[64], s1[64];
    e2e_user("alice", alice);
    e2e_user("bob", bob);
    client *phone, *b;
    phone_laptop_alice(alice, bob, E2E_GW2, &phone, &b); /* alice's devices, bob on gw2 */
    client *laptop = e2e_connect_device(alice, "laptop", E2E_GW2);
    json_decref(e2e_wait_type(laptop, "synced"));
    e2e_send(phone, "c1", bob, "from the phone", m1);
    json_t *m = NULL;
    ck_assert_msg(client_next(laptop, message_with_id, m1, E2E_WAIT_MS, &m) == PX_OK,
                  "the laptop did not get alice's own message: %s", client_errstr(laptop));
    ck_assert_str_eq(e2e_str(m, "from"), alice);
    ck_assert_str_eq(e2e_str(m, "to"), bob);
    json_decref(m);
    e2e_ack(laptop, m1);
    wait_message(b, m1);
    e2e_ack(b, m1);
    /* Both of alice's devices get bob's delivered receipt. */
    json_t *r1 = e2e_wait_type(phone, "receipt"), *r2 = e2e_wait_type(laptop, "receipt");
    ck_assert_str_eq(e2e_str(r1, "msg_id"), m1);
    ck_assert_str_eq(e2e_str(r2, "msg_id"), m1);
    json_decref(r1);
    json_decref(r2);
    /* The phone got no copy of m1: bob's answer comes after it would. */
    e2e_send(b, "s1", alice, "answer", s1);
    ck_assert_msg(!seen_before(phone, "message", m1, s1), "the sending phone got its own copy");

    client_close(laptop, 1000);
    e2e_send(phone, "c2", bob, "laptop offline", m2);
    json_t *ids = dev_backlog(alice, "laptop", E2E_GW1);
    ck_assert_msg(e2e_has_id(ids, m2), "laptop backlog %s", json_dumps(ids, 0));
    json_decref(ids);
    backlog_drops(alice, "laptop", E2E_GW1, (const char *const[]){ m1 }, 1);
    client_close(phone, 1000);
    ids = dev_backlog(alice, "phone", E2E_GW2);
    ck_assert_msg(!e2e_has_id(ids, m2), "the phone got its own message in its sync");
    json_decref(ids);
    client_close(b, 1000);
}
END_TEST

static int64_t inbox_count(const char *user)
{
    char err[PX_ERRLEN] = "";
    int64_t n = -1;
    store *st = store_open(getenv("PARLEY_MONGO_URI"), getenv("PARLEY_MONGO_DB"), err,
                           sizeof(err));
    ck_assert_msg(st != NULL, "store_open: %s", err);
    ck_assert_msg(store_inbox_count(st, user, &n, err, sizeof(err)) == PX_OK, "count: %s", err);
    store_close(st);
    return n;
}

typedef struct mark_probe {
    const char *dev;
    int marked;
} mark_probe;

static int mark_seen(void *arg, const store_event *ev)
{
    mark_probe *p = arg;
    for (size_t i = 0; i < ev->nacked; i++)
        p->marked |= strcmp(ev->acked[i], p->dev) == 0;
    return PX_OK;
}

/* Waits (bounded) until dev's ack of (user, id) is stored: the acks are
 * applied on a thread of their own, beside the inbox's. */
static void wait_marked(const char *user, const char *id, const char *dev)
{
    char err[PX_ERRLEN] = "";
    store *st = store_open(getenv("PARLEY_MONGO_URI"), getenv("PARLEY_MONGO_DB"), err,
                           sizeof(err));
    ck_assert_msg(st != NULL, "store_open: %s", err);
    store_key k = { user, id };
    mark_probe p = { dev, 0 };
    for (int64_t end = px_mono_ms() + 30000; !p.marked && px_mono_ms() < end;) {
        ck_assert_msg(store_inbox_get(st, &k, 1, mark_seen, &p, err, sizeof(err)) == PX_OK,
                      "get: %s", err);
        if (!p.marked)
            usleep(100 * 1000);
    }
    store_close(st);
    ck_assert_msg(p.marked, "%s's ack of %s never stored", dev, id);
}

/* A user with one device stores no copy of what it sends (nobody would
 * ever ack it): after bob's answer, alice's inbox holds only that. */
START_TEST(single_device_sender_stores_no_copy)
{
    char alice[65], bob[65], m1[64], s1[64];
    e2e_user("alice", alice);
    e2e_user("bob", bob);
    client *a = e2e_connect(alice, E2E_GW1);
    client *b = e2e_connect(bob, E2E_GW2);
    json_decref(e2e_wait_type(a, "synced"));
    json_decref(e2e_wait_type(b, "synced"));
    e2e_send(a, "c1", bob, "hi", m1);
    wait_message(b, m1);
    e2e_send(b, "s1", alice, "answer", s1);
    wait_message(a, s1);
    /* s1 is pushed before it is stored; a copy of m1 would be stored
     * before it (alice's inbox partition, in order). */
    int64_t n = 0;
    for (int64_t end = px_mono_ms() + 15000; n == 0 && px_mono_ms() < end; usleep(50 * 1000))
        n = inbox_count(alice);
    ck_assert_int_eq(n, 1);
    client_close(a, 1000);
    client_close(b, 1000);
}
END_TEST

/* A group message alice sends from her phone reaches her laptop too. */
START_TEST(own_group_message_reaches_the_other_devices)
{
    char alice[65], bob[65], gid[80], mid[64];
    e2e_user("alice", alice);
    e2e_user("bob", bob);
    client *phone = e2e_connect_device(alice, "phone", E2E_GW1);
    client *laptop = e2e_connect_device(alice, "laptop", E2E_GW2);
    client *b = e2e_connect(bob, E2E_GW2);
    json_decref(e2e_wait_type(phone, "synced"));
    json_decref(e2e_wait_type(laptop, "synced"));
    json_decref(e2e_wait_type(b, "synced"));
    json_t *g = e2e_cmd(phone, json_pack("{s:s, s:s, s:s, s:[s]}", "type", "group_create", "id",
                                         "g1", "name", "pair", "members", bob));
    snprintf(gid, sizeof(gid), "%s", e2e_str(json_object_get(g, "group"), "id"));
    json_decref(g);
    e2e_join(b, gid);
    group_send(phone, "m1", gid, mid);
    wait_message(b, mid);
    json_t *m = NULL;
    ck_assert_msg(client_next(laptop, message_with_id, mid, E2E_WAIT_MS, &m) == PX_OK,
                  "the laptop did not get alice's group message: %s", client_errstr(laptop));
    ck_assert_str_eq(e2e_str(m, "group"), gid);
    json_decref(m);
    client_close(phone, 1000);
    client_close(laptop, 1000);
    client_close(b, 1000);
}
END_TEST

static int read_state_of(const json_t *m, void *arg)
{
    if (strcmp(e2e_str(m, "type"), "read_state") != 0)
        return 0;
    const json_t *ids = json_object_get(m, "ids");
    return e2e_has_id(ids, arg);
}

/* owner's phone and laptop both connected, other connected, and one
 * message other -> owner (mid) that both devices got. */
static void both_devices_get_one(const char *owner, const char *other, client **phone,
                                 client **laptop, client **a, char mid[64])
{
    phone_laptop_alice(owner, other, E2E_GW1, phone, a);
    *laptop = e2e_connect_device(owner, "laptop", E2E_GW2);
    json_decref(e2e_wait_type(*laptop, "synced"));
    e2e_send(*a, "c1", owner, "to both devices", mid);
    wait_message(*phone, mid);
    wait_message(*laptop, mid);
}

/* bob reads on his phone: his laptop is told (read_state naming the id),
 * live and, when offline, on its next connection; the phone is not. */
START_TEST(read_state_reaches_the_other_devices)
{
    char alice[65], bob[65], m1[64], m2[64], s1[64];
    e2e_user("alice", alice);
    e2e_user("bob", bob);
    client *phone, *laptop, *a;
    both_devices_get_one(bob, alice, &phone, &laptop, &a, m1);
    json_t *o = json_pack("{s:s, s:[s]}", "type", "read", "ids", m1);
    ck_assert_int_eq(client_send_json(phone, o), 0);
    json_decref(o);
    json_t *rs = NULL;
    ck_assert_msg(client_next(laptop, read_state_of, m1, E2E_WAIT_MS, &rs) == PX_OK,
                  "no read_state on the laptop: %s", client_errstr(laptop));
    ck_assert(strncmp(e2e_str(rs, "id"), "rs_", 3) == 0);
    e2e_ack(laptop, e2e_str(rs, "id"));
    json_decref(rs);
    e2e_send(a, "s1", bob, "sentinel", s1);
    int phone_told = 0;
    for (;;) {
        json_t *m = client_recv_json(phone, E2E_WAIT_MS);
        ck_assert_msg(m != NULL, "no sentinel: %s", client_errstr(phone));
        phone_told |= read_state_of(m, m1);
        int done = type_with_id(m, "message", s1);
        json_decref(m);
        if (done)
            break;
    }
    ck_assert_msg(!phone_told, "the reading phone got its own read_state");

    client_close(laptop, 1000);
    e2e_send(a, "c2", bob, "read me too", m2);
    wait_message(phone, m2);
    o = json_pack("{s:s, s:[s]}", "type", "read", "ids", m2);
    ck_assert_int_eq(client_send_json(phone, o), 0);
    json_decref(o);
    int told = 0;
    for (int64_t end = px_mono_ms() + 30000; !told && px_mono_ms() < end;) {
        laptop = e2e_connect_device(bob, "laptop", E2E_GW1);
        for (;;) {
            json_t *m = client_recv_json(laptop, E2E_WAIT_MS);
            ck_assert_msg(m != NULL, "no synced: %s", client_errstr(laptop));
            told |= read_state_of(m, m2);
            int done = strcmp(e2e_str(m, "type"), "synced") == 0;
            json_decref(m);
            if (done)
                break;
        }
        client_close(laptop, 1000);
    }
    ck_assert_msg(told, "the offline laptop was not told of the read");
    client_close(phone, 1000);
    client_close(a, 1000);
}
END_TEST

/* `devices` lists the linked devices with first and last seen, which are
 * online (a connection) and which is the asking one. */
START_TEST(devices_lists_linked_devices)
{
    char alice[65], bob[65];
    e2e_user("alice", alice);
    e2e_user("bob", bob);
    client *phone, *a;
    phone_laptop_alice(bob, alice, E2E_GW1, &phone, &a);
    /* Online comes from the presence registry, which lags the connections
     * a little: ask until it shows the phone's and not the laptop's. */
    int online_ok = 0;
    char id[16];
    for (int k = 0; !online_ok && k < 150; k++) {
        snprintf(id, sizeof(id), "d%d", k);
        json_t *r = e2e_cmd(phone, json_pack("{s:s, s:s}", "type", "devices", "id", id));
        ck_assert_msg(strcmp(e2e_str(r, "type"), "devices") == 0, "devices: %s",
                      json_dumps(r, 0));
        json_t *list = json_object_get(r, "devices");
        ck_assert_uint_eq(json_array_size(list), 2);
        size_t i;
        json_t *d;
        online_ok = 1;
        json_array_foreach(list, i, d) {
            int is_phone = strcmp(e2e_str(d, "id"), "phone") == 0;
            ck_assert(is_phone || strcmp(e2e_str(d, "id"), "laptop") == 0);
            ck_assert(json_integer_value(json_object_get(d, "first_seen")) > 0);
            ck_assert(json_integer_value(json_object_get(d, "last_seen")) >=
                      json_integer_value(json_object_get(d, "first_seen")));
            ck_assert_int_eq(json_is_true(json_object_get(d, "current")), is_phone);
            online_ok &= json_is_true(json_object_get(d, "online")) == is_phone;
        }
        json_decref(r);
        if (!online_ok)
            usleep(200 * 1000);
    }
    ck_assert_msg(online_ok, "online never showed the phone only");
    client_close(phone, 1000);
    client_close(a, 1000);
}
END_TEST

/* The HTTP status of GET /v1/media/<unknown id> with a token of (user, dev). */
static int media_status(const char *user, const char *dev, enum e2e_svc gw)
{
    char tok[AUTH_TOKEN_MAX], req[AUTH_TOKEN_MAX + 256], resp[256] = "";
    int64_t now = px_now_ms() / 1000;
    ck_assert_int_eq(auth_sign_device(e2e_secret(), user, dev, now - 10, now + 3600, tok,
                                      sizeof(tok)), PX_OK);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)e2e_port(gw)),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    ck_assert_int_eq(connect(fd, (struct sockaddr *)&a, sizeof(a)), 0);
    int n = snprintf(req, sizeof(req), "GET /v1/media/nosuchmedia HTTP/1.1\r\nHost: x\r\n"
                     "Connection: close\r\nAuthorization: Bearer %s\r\n\r\n", tok);
    ck_assert_int_eq(send(fd, req, (size_t)n, MSG_NOSIGNAL), n);
    ssize_t got = recv(fd, resp, sizeof(resp) - 1, MSG_WAITALL);
    close(fd);
    int status = 0;
    ck_assert_msg(got > 12 && sscanf(resp, "HTTP/1.1 %d", &status) == 1, "no HTTP answer");
    return status;
}

/* The phone unlinks the laptop while it is connected: the laptop is closed
 * with 4001, its token refused (403) from then on, the message only it
 * still needed is deleted, and its place counts no longer. A device
 * cannot unlink itself; an unknown device is not_found. */
START_TEST(unlink_while_connected)
{
    char alice[65], bob[65], m1[64];
    e2e_user("alice", alice);
    e2e_user("bob", bob);
    client *phone, *laptop, *a;
    both_devices_get_one(bob, alice, &phone, &laptop, &a, m1);
    e2e_ack(phone, m1);
    /* An ack applied while an unlink runs may still count the unlinked
     * device (PROTOCOL.md): this test is about the unlink, so the ack is in
     * first. */
    wait_marked(bob, m1, "phone");
    e2e_expect_type(e2e_cmd(phone, json_pack("{s:s, s:s, s:s}", "type", "device_unlink", "id",
                                             "u0", "device", "phone")),
                    "error", "bad_request");
    e2e_expect_type(e2e_cmd(phone, json_pack("{s:s, s:s, s:s}", "type", "device_unlink", "id",
                                             "u1", "device", "tablet")),
                    "error", "not_found");
    json_t *r = e2e_cmd(phone, json_pack("{s:s, s:s, s:s}", "type", "device_unlink", "id", "u2",
                                         "device", "laptop"));
    ck_assert_msg(strcmp(e2e_str(r, "type"), "device_unlinked") == 0 &&
                      strcmp(e2e_str(r, "device"), "laptop") == 0, "unlink: %s", json_dumps(r, 0));
    json_decref(r);
    int code = 0;
    ck_assert_msg(e2e_wait_end(laptop, E2E_WAIT_MS, &code) && code == 4001,
                  "the laptop was not closed with 4001 (code %d)", code);
    client_free(laptop);
    int status = 0;
    ck_assert_ptr_null(e2e_try_device(bob, "laptop", E2E_GW1, &status));
    ck_assert_int_eq(status, 403);
    /* Media too: the laptop's token is refused, the phone's is not (an
     * unknown media id: 404). */
    ck_assert_int_eq(media_status(bob, "laptop", E2E_GW2), 401);
    ck_assert_int_eq(media_status(bob, "phone", E2E_GW2), 404);
    /* The phone had acked m1: nothing of bob's is left (the unlink's
     * cleanup ran before its answer). */
    ck_assert_int_eq(inbox_count(bob), 0);
    /* Four more devices fit (the laptop's place is free again). */
    char dev[16];
    for (int i = 0; i < 4; i++) {
        snprintf(dev, sizeof(dev), "n%d", i);
        dev_link(bob, dev, E2E_GW2);
    }
    client_close(phone, 1000);
    client_close(a, 1000);
}
END_TEST

/* Polls (bounded) until user's inbox holds nothing: 1, or 0 at the
 * deadline (an event some device list still waits for). */
static int inbox_empties(const char *user)
{
    for (int64_t end = px_mono_ms() + 15000; px_mono_ms() < end; usleep(100 * 1000))
        if (inbox_count(user) == 0)
            return 1;
    return 0;
}

/* message-store keeps the device lists its acks decide with (devcache.c).
 * A list kept from the phone's ack of m1 must not decide for m2, sent
 * after the laptop's link: it does not name the laptop, and the phone's
 * ack of m2 would delete what the laptop still needs. The laptop gets m2
 * live, leaves without acking, and must find it on its next connection. */
START_TEST(device_linked_while_a_list_is_kept)
{
    char alice[65], bob[65], m1[64], m2[64];
    e2e_user("alice", alice);
    e2e_user("bob", bob);
    client *phone = e2e_connect_device(bob, "phone", E2E_GW1);
    json_decref(e2e_wait_type(phone, "synced"));
    client *a = e2e_connect(alice, E2E_GW2);
    json_decref(e2e_wait_type(a, "synced"));
    e2e_send(a, "c1", bob, "before the laptop", m1);
    wait_message(phone, m1);
    e2e_ack(phone, m1);
    ck_assert_int_eq(receipts_before(a, m1, "delivered", m1, "delivered"), 1);

    client *laptop = e2e_connect_device(bob, "laptop", E2E_GW2);
    json_t *ids = e2e_backlog_ids(laptop);
    ck_assert_msg(!e2e_has_id(ids, m1), "the laptop got what was acked before its link");
    json_decref(ids);
    e2e_send(a, "c2", bob, "after the laptop", m2);
    wait_message(laptop, m2);
    wait_message(phone, m2);
    e2e_ack(phone, m2);
    ck_assert_int_eq(receipts_before(a, m2, "delivered", m2, "delivered"), 1);
    client_close(laptop, 1000);

    ids = dev_backlog(bob, "laptop", E2E_GW1);
    ck_assert_msg(e2e_has_id(ids, m2), "the laptop lost m2 to the phone's ack: %s", json_dumps(ids, 0));
    json_decref(ids);
    client_close(phone, 1000);
    client_close(a, 1000);
}
END_TEST

/* A list kept from the phone's ack names the laptop; the phone unlinks the
 * laptop; the tablet's ack then completes m1, which must be deleted, not
 * kept waiting for the unlinked laptop. */
START_TEST(unlink_while_a_list_is_kept)
{
    char alice[65], bob[65], m1[64];
    e2e_user("alice", alice);
    e2e_user("bob", bob);
    client *phone, *a;
    phone_laptop_alice(bob, alice, E2E_GW1, &phone, &a);
    client *tablet = e2e_connect_device(bob, "tablet", E2E_GW2);
    json_decref(e2e_wait_type(tablet, "synced"));
    e2e_send(a, "c1", bob, "to three devices", m1);
    wait_message(phone, m1);
    wait_message(tablet, m1);
    e2e_ack(phone, m1);
    wait_marked(bob, m1, "phone");
    json_t *r = e2e_cmd(phone, json_pack("{s:s, s:s, s:s}", "type", "device_unlink", "id", "u1",
                                         "device", "laptop"));
    ck_assert_msg(strcmp(e2e_str(r, "type"), "device_unlinked") == 0, "unlink: %s",
                  json_dumps(r, 0));
    json_decref(r);
    ck_assert_int_eq(inbox_count(bob), 1); /* the tablet still needs m1 */
    e2e_ack(tablet, m1);
    ck_assert_msg(inbox_empties(bob), "m1 kept for the unlinked laptop after every other ack");
    client_close(tablet, 1000);
    client_close(phone, 1000);
    client_close(a, 1000);
}
END_TEST

/* parleyctl token --device mints a token of that device: connected with
 * it, `devices` names it as the current one. */
START_TEST(parleyctl_mints_device_tokens)
{
    char bob[65], cmd[512], tok[AUTH_TOKEN_MAX], err[256];
    e2e_user("bob", bob);
    const char *build = getenv("PARLEY_BUILD");
    snprintf(cmd, sizeof(cmd), "PARLEY_JWT_SECRET='%s' %s/bin/parleyctl token %s --device tab-7",
             e2e_secret(), build != NULL ? build : "build/san", bob);
    FILE *p = popen(cmd, "r");
    ck_assert_ptr_nonnull(p);
    ck_assert_ptr_nonnull(fgets(tok, sizeof(tok), p));
    ck_assert_int_eq(pclose(p), 0);
    tok[strcspn(tok, "\n")] = '\0';
    int status = 0;
    client *cl = client_connect("127.0.0.1", e2e_port(E2E_GW1), tok, NULL, 5000, &status, err,
                                sizeof(err));
    ck_assert_msg(cl != NULL, "connect with parleyctl's token: HTTP %d %s", status, err);
    json_decref(e2e_wait_type(cl, "synced"));
    json_t *r = e2e_cmd(cl, json_pack("{s:s, s:s}", "type", "devices", "id", "d"));
    json_t *d = json_array_get(json_object_get(r, "devices"), 0);
    ck_assert_msg(d != NULL && strcmp(e2e_str(d, "id"), "tab-7") == 0 &&
                      json_is_true(json_object_get(d, "current")), "devices: %s",
                  json_dumps(r, 0));
    json_decref(r);
    client_close(cl, 1000);
}
END_TEST

/* An unlink closes the device's connection although the presence
 * registry does not name its gateway yet (presence stopped from before
 * the laptop connects: a registry lagging under load): message-store's
 * route cache holds the gateway of the laptop's sync, consumed before the
 * unlink on the same partition. Microservices only: parleyd's presence
 * cannot lag on its own. */
START_TEST(unlink_closes_a_connection_the_registry_does_not_name_yet)
{
    char bob[65];
    pid_t presence = e2e_pid(E2E_PRESENCE);
    if (presence == e2e_pid(E2E_GW1))
        return;
    e2e_user("bob", bob);
    client *phone = e2e_connect_device(bob, "phone", E2E_GW1);
    json_decref(e2e_backlog_ids(phone));
    ck_assert_int_eq(kill(presence, SIGSTOP), 0);
    client *laptop = e2e_connect_device(bob, "laptop", E2E_GW2);
    json_decref(e2e_backlog_ids(laptop));
    json_t *r = e2e_cmd(phone, json_pack("{s:s, s:s, s:s}", "type", "device_unlink", "id", "u",
                                         "device", "laptop"));
    ck_assert_msg(strcmp(e2e_str(r, "type"), "device_unlinked") == 0, "unlink: %s",
                  json_dumps(r, 0));
    json_decref(r);
    int code = 0, ended = e2e_wait_end(laptop, E2E_WAIT_MS, &code);
    ck_assert_int_eq(kill(presence, SIGCONT), 0);
    ck_assert_msg(ended && code == 4001, "the laptop was not closed with 4001 (code %d)", code);
    client_free(laptop);
    client_close(phone, 1000);
}
END_TEST

/* 1 if cl receives the message mid within E2E_WAIT_MS (no assertion, so a
 * stopped process can be resumed before the test fails). */
static int got_message(client *cl, const char *mid)
{
    json_t *m = NULL;
    int ok = client_next(cl, message_with_id, (void *)mid, E2E_WAIT_MS, &m) == PX_OK;
    json_decref(m);
    return ok;
}

/* A device whose connection outlives a message-store restart is still
 * reached live, and so is the device that connects again while the
 * presence registry lags. carol's phone and laptop are synced on gateway
 * 1; message-store is killed and started again; with presence stopped
 * (the registry knows the phone, not the laptop's new connection), only
 * the laptop connects again, on gateway 2. Its sync names gateway 2, and
 * carol has another synced device, so the route is partial: the first
 * push goes to gateway 2 at once and the registry is asked after it,
 * which names gateway 1 (the phone) but not gateway 2; the second message
 * must still reach both (the registry's answer joins the sync's gateway,
 * it does not replace it). Fails if a sync's gateway were taken as the
 * user's only one (the phone waits for its next sync), or if the
 * registry's answer replaced it (the laptop misses the second message).
 * Microservices only: parleyd cannot restart its message-store alone. */
START_TEST(a_device_connected_through_a_store_restart_gets_live_messages)
{
    const char *lookups = "parley_msgstore_store_ms_count{op=\"presence_lookup\"}";
    char alice[65], carol[65], m1[64], m2[64];
    pid_t presence = e2e_pid(E2E_PRESENCE);
    if (e2e_pid(E2E_STORE) == e2e_pid(E2E_GW1))
        return;
    e2e_user("alice", alice);
    e2e_user("carol", carol);
    client *phone = e2e_connect_device(carol, "phone", E2E_GW1);
    json_decref(e2e_backlog_ids(phone));
    client *laptop = e2e_connect_device(carol, "laptop", E2E_GW1);
    json_decref(e2e_backlog_ids(laptop));
    client *a = e2e_connect(alice, E2E_GW1);
    json_decref(e2e_wait_type(a, "synced"));
    /* The syncs' offsets committed (auto-commit each second), so the
     * restart does not serve the phone's sync again (which would note
     * gateway 1 as well). */
    usleep(2500 * 1000);
    e2e_kill9(E2E_STORE);
    ck_assert_int_eq(e2e_restart(E2E_STORE), 0);
    client_free(laptop);
    ck_assert_int_eq(kill(presence, SIGSTOP), 0);
    laptop = e2e_connect_device(carol, "laptop", E2E_GW2);
    json_decref(e2e_backlog_ids(laptop));
    long long before = e2e_metric(E2E_STORE, lookups);
    e2e_send(a, "c1", carol, "after the restart", m1);
    int laptop1 = got_message(laptop, m1), phone1 = got_message(phone, m1);
    int64_t end = px_mono_ms() + E2E_WAIT_MS;
    while (e2e_metric(E2E_STORE, lookups) == before && px_mono_ms() < end)
        usleep(20 * 1000);
    long long after = e2e_metric(E2E_STORE, lookups);
    e2e_send(a, "c2", carol, "after the lookup", m2);
    int laptop2 = got_message(laptop, m2), phone2 = got_message(phone, m2);
    ck_assert_int_eq(kill(presence, SIGCONT), 0);
    ck_assert_int_ge(before, 0);
    ck_assert_msg(laptop1 && phone1, "first message: laptop %d, phone %d", laptop1, phone1);
    ck_assert_int_gt(after, before);
    ck_assert_msg(laptop2 && phone2, "second message: laptop %d, phone %d", laptop2, phone2);
    client_close(a, 1000);
    client_close(laptop, 1000);
    client_close(phone, 1000);
}
END_TEST

/* Waits for a `delivered` receipt of each of mids[0..n) on a, leaving
 * them unacked (an ack would be applied too, and counted). */
static void delivered_all(client *a, const char *const *mids, size_t n)
{
    size_t got = 0;
    while (got < n) {
        json_t *r = NULL;
        ck_assert_msg(client_next(a, is_receipt, NULL, E2E_WAIT_MS, &r) == PX_OK,
                      "%zu of %zu delivered receipts: %s", got, n, client_errstr(a));
        for (size_t i = 0; i < n; i++)
            got += strcmp(e2e_str(r, "msg_id"), mids[i]) == 0 &&
                   strcmp(e2e_str(r, "status"), "delivered") == 0;
        json_decref(r);
    }
}

/* Acked events applied without a store read: from memory, or settled
 * before their store round (which waits PARLEY_MSGSTORE_HOLD_MS), whichever
 * came first. */
static long long no_read_acks(const char *mem, const char *settled)
{
    long long a = e2e_metric(E2E_STORE, mem), b = e2e_metric(E2E_STORE, settled);
    ck_assert_msg(a >= 0 && b >= 0, "no %s or %s", mem, settled);
    return a + b;
}

/* The count once it reaches want (a settled event is counted by the store
 * round it skipped, which may come after its receipt), or after 5 s. */
static long long no_read_acks_at(const char *mem, const char *settled, long long want)
{
    long long n = no_read_acks(mem, settled);
    for (int64_t end = px_mono_ms() + 5000; n < want && px_mono_ms() < end; usleep(50 * 1000))
        n = no_read_acks(mem, settled);
    return n;
}

/* An ack of an event this message-store stored lately is applied from its
 * memory (stored.c): no read of the event or its marks, only the delete.
 * bob alone (m1, m2) is the usual case: both from memory, both deleted,
 * one `delivered` each. What another device needs goes the store's way:
 * the phone's ack of m (the laptop still needs it: a mark), and the
 * laptop's too (only the store knows the phone's mark), which deletes m. */
START_TEST(acks_of_events_stored_here_are_applied_from_memory)
{
    static const char *const mem = "parley_msgstore_acked_from_memory_total";
    static const char *const settled = "parley_msgstore_settled_events_total";
    char alice[65], bob[65], carol[65], m1[64], m2[64], m[64];
    e2e_user("alice", alice);
    e2e_user("bob", bob);
    e2e_user("carol", carol);
    client *a = e2e_connect(alice, E2E_GW2);
    json_decref(e2e_wait_type(a, "synced"));
    client *b = e2e_connect(bob, E2E_GW1);
    json_decref(e2e_wait_type(b, "synced"));
    long long k0 = no_read_acks(mem, settled);
    e2e_send(a, "c1", bob, "one", m1);
    e2e_send(a, "c2", bob, "two", m2);
    wait_message(b, m1);
    wait_message(b, m2);
    e2e_ack(b, m1);
    e2e_ack(b, m2);
    delivered_all(a, (const char *[]){ m1, m2 }, 2);
    ck_assert_msg(inbox_empties(bob), "bob's acked events were not deleted");
    ck_assert_int_eq(no_read_acks_at(mem, settled, k0 + 2), k0 + 2);

    client *phone = e2e_connect_device(carol, "phone", E2E_GW1);
    json_decref(e2e_wait_type(phone, "synced"));
    client *laptop = e2e_connect_device(carol, "laptop", E2E_GW2);
    json_decref(e2e_wait_type(laptop, "synced"));
    e2e_send(a, "c3", carol, "three", m);
    wait_message(phone, m);
    wait_message(laptop, m);
    e2e_ack(phone, m);
    wait_marked(carol, m, "phone");
    ck_assert_int_eq(no_read_acks(mem, settled), k0 + 2);
    ck_assert_int_eq(inbox_count(carol), 1);
    e2e_ack(laptop, m);
    ck_assert_msg(inbox_empties(carol), "m was not deleted after both devices acked");
    delivered_all(a, (const char *[]){ m }, 1);
    ck_assert_int_eq(no_read_acks(mem, settled), k0 + 2);
    client_close(phone, 1000);
    client_close(laptop, 1000);
    client_close(b, 1000);
    client_close(a, 1000);
}
END_TEST

static Suite *devices_suite(void)
{
    Suite *s = suite_create("e2e-devices");
    TCase *tc = tcase_create("devices");
    tcase_set_timeout(tc, 240);
    tcase_add_test(tc, offline_device_keeps_what_the_other_acked);
    tcase_add_test(tc, three_devices_each_ack_their_own);
    tcase_add_test(tc, device_linked_later_gets_nothing_older);
    tcase_add_test(tc, device_limit_refuses_the_sixth);
    tcase_add_test(tc, group_message_reaches_every_device);
    tcase_add_test(tc, own_messages_reach_the_other_devices);
    tcase_add_test(tc, single_device_sender_stores_no_copy);
    tcase_add_test(tc, own_group_message_reaches_the_other_devices);
    tcase_add_test(tc, read_state_reaches_the_other_devices);
    tcase_add_test(tc, devices_lists_linked_devices);
    tcase_add_test(tc, unlink_while_connected);
    tcase_add_test(tc, unlink_closes_a_connection_the_registry_does_not_name_yet);
    tcase_add_test(tc, device_linked_while_a_list_is_kept);
    tcase_add_test(tc, unlink_while_a_list_is_kept);
    tcase_add_test(tc, parleyctl_mints_device_tokens);
    tcase_add_test(tc, kill9_store_between_two_devices_acks);
    tcase_add_test(tc, a_device_connected_through_a_store_restart_gets_live_messages);
    tcase_add_test(tc, acks_of_events_stored_here_are_applied_from_memory);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return e2e_main(devices_suite());
}
