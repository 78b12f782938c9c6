/* The store contract (store.h), one suite for every implementation:
 * duplicate absorption, bulk insert/scan/ack round trips, ack isolation
 * between users, sweeps, seen dedupe, presence, receipt tracking
 * (put/get/delete/sweep), the read half of an ack and media (chunks,
 * commit dedupe, access, sweep). test_store_mongo.c runs it against a real
 * MongoDB-wire server, test_store_sqlite.c against parleyd's SQLite file.
 * Each test opens its own store in the forked child (mongoc's pool threads
 * do not survive fork). */
#include "store_contract.h"
#include "common.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static store *st;

static void open_store(void)
{
    char err[PX_ERRLEN] = "";

    st = store_contract_open(err, sizeof(err));
    ck_assert_msg(st != NULL, "store_open: %s", err);
}

static void close_store(void)
{
    store_close(st);
    st = NULL;
}

static int64_t count_of(const char *user)
{
    char err[PX_ERRLEN] = "";
    int64_t c = -1;

    ck_assert_msg(store_inbox_count(st, user, &c, err, sizeof(err)) == PX_OK, "count: %s", err);
    return c;
}

/* Storage for generated events: the strings store_event points to. */
typedef struct tev {
    char id[32];
    char sender[32];
    char json[160];
} tev;

static void make_event(store_event *ev, tev *t, const char *user, int i, int64_t seq, int64_t ts)
{
    snprintf(t->id, sizeof(t->id), "m%05d", i);
    snprintf(t->sender, sizeof(t->sender), "s%d", i % 7);
    /* Non-ASCII, escapes and varying lengths, to catch any re-encoding. */
    snprintf(t->json, sizeof(t->json),
             "{\"type\":\"message\",\"id\":\"%s\",\"body\":\"h\\u00e9llo \\\"%d\\\" \xc3\xa9%.*s\"}",
             t->id, i, i % 40, "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx");
    *ev = (store_event){ .user = user, .id = t->id, .seq = seq, .ts_ms = ts,
                         .kind = (i % 2 == 0) ? STORE_MESSAGE : STORE_RECEIPT,
                         .sender = (i % 2 == 0) ? t->sender : NULL,
                         .json = t->json, .json_len = strlen(t->json) };
}

/* Collects what a scan or ack callback sees. */
typedef struct seen_log {
    size_t n, stop_after;
    int64_t seq[2000];
    char id[2000][32];
    int kind[2000];
    char sender[2000][32];
    int bad_json;             /* events whose json differs from expected */
    const tev *expect;        /* when set: json must match expect[index from id] */
} seen_log;

static int log_cb(void *arg, const store_event *ev)
{
    seen_log *l = arg;

    ck_assert_uint_lt(l->n, 2000);
    l->seq[l->n] = ev->seq;
    snprintf(l->id[l->n], sizeof(l->id[0]), "%s", ev->id);
    l->kind[l->n] = ev->kind;
    snprintf(l->sender[l->n], sizeof(l->sender[0]), "%s", ev->sender ? ev->sender : "");
    if (l->expect != NULL) {
        const tev *t = &l->expect[atoi(ev->id + 1)];
        if (ev->json_len != strlen(t->json) || memcmp(ev->json, t->json, ev->json_len) != 0)
            l->bad_json++;
    }
    l->n++;
    return (l->stop_after != 0 && l->n >= l->stop_after) ? PX_DECLINED : PX_OK;
}

static void put_ok(const store_event *ev, size_t n, int *inserted)
{
    char err[PX_ERRLEN] = "";

    ck_assert_msg(store_inbox_put(st, ev, n, inserted, err, sizeof(err)) == PX_OK, "put: %s", err);
}

/* (a) The unique (user, id) index absorbs redeliveries, alone and mixed into
 * a batch of new records, and inserted[] says which is which. */
START_TEST(dup_insert_absorbed)
{
    store_event ev[4];
    tev t[4];
    int ins[4] = { -1, -1, -1, -1 };
    int64_t now = px_now_ms();

    make_event(&ev[0], &t[0], "u_a", 0, 1, now);
    put_ok(ev, 1, ins);
    ck_assert_int_eq(ins[0], 1);
    ins[0] = -1;
    put_ok(ev, 1, ins);
    ck_assert_int_eq(ins[0], 0);
    ck_assert_int_eq(count_of("u_a"), 1);

    /* A new one, a dup of the stored one, another new one, and a dup of an
     * earlier item of the same batch. */
    make_event(&ev[0], &t[0], "u_a", 1, 2, now);
    make_event(&ev[1], &t[1], "u_a", 0, 1, now);
    make_event(&ev[2], &t[2], "u_a", 2, 3, now);
    make_event(&ev[3], &t[3], "u_a", 1, 2, now);
    memset(ins, 0xff, sizeof(ins));
    put_ok(ev, 4, ins);
    ck_assert_int_eq(ins[0], 1);
    ck_assert_int_eq(ins[1], 0);
    ck_assert_int_eq(ins[2], 1);
    ck_assert_int_eq(ins[3], 0);
    ck_assert_int_eq(count_of("u_a"), 3);

    /* The same id for another user is a different record. */
    make_event(&ev[0], &t[0], "u_a2", 0, 1, now);
    put_ok(ev, 1, ins);
    ck_assert_int_eq(ins[0], 1);
    ck_assert_int_eq(count_of("u_a"), 3);
    ck_assert_int_eq(count_of("u_a2"), 1);
}
END_TEST

static double rate(size_t n, int64_t ms)
{
    return ms > 0 ? (double)n * 1000.0 / (double)ms : (double)n * 1000.0;
}

/* An ack as message-store makes it: read the user's named events, then
 * delete them; the delete must remove exactly what the read reported. */
static int ack(const char *user, const char *const *ids, size_t n, seen_log *l, char *err,
               size_t errlen)
{
    store_key keys[2000];
    int64_t removed = -1;
    ck_assert_uint_le(n, 2000);
    for (size_t i = 0; i < n; i++)
        keys[i] = (store_key){ user, ids[i] };
    size_t before = l->n;
    if (store_inbox_get(st, keys, n, log_cb, l, err, errlen) != PX_OK ||
        store_inbox_delete(st, keys, n, &removed, err, errlen) != PX_OK)
        return PX_ERROR;
    ck_assert_int_eq(removed, (int64_t)(l->n - before));
    return PX_OK;
}

/* (b) 1000 events in one put come back from scan in seq order with their
 * exact bytes; acking half calls back exactly those with kind/sender and
 * deletes exactly those; after_seq and limit page correctly. */
START_TEST(bulk_roundtrip)
{
    enum { N = 1000 };
    static store_event ev[N];
    static tev t[N];
    static int ins[N];
    static seen_log l;
    const char *ids[N / 2];
    char err[PX_ERRLEN] = "";
    int64_t now = px_now_ms(), t0;

    /* Put in reverse seq order so a scan in insertion order would fail. */
    for (int i = 0; i < N; i++)
        make_event(&ev[i], &t[i], "u_b", i, 10000 - 2 * (int64_t)i, now);
    t0 = px_mono_ms();
    put_ok(ev, N, ins);
    printf("report: bulk put %d docs in one call: %lld ms (%.0f docs/s)\n", N,
           (long long)(px_mono_ms() - t0), rate(N, px_mono_ms() - t0));
    for (int i = 0; i < N; i++)
        ck_assert_int_eq(ins[i], 1);
    ck_assert_int_eq(count_of("u_b"), N);

    memset(&l, 0, sizeof(l));
    l.expect = t;
    ck_assert_int_eq(store_inbox_scan(st, "u_b", NULL, 0, 5000, log_cb, &l, err, sizeof(err)), PX_OK);
    ck_assert_uint_eq(l.n, N);
    ck_assert_int_eq(l.bad_json, 0);
    for (int i = 0; i < N; i++) {
        ck_assert_int_eq(l.seq[i], 10000 - 2 * (int64_t)(N - 1) + 2 * i);
        ck_assert_str_eq(l.id[i], t[N - 1 - i].id);
    }

    /* Ack the even-numbered events: the messages, which carry a sender. */
    for (int i = 0; i < N / 2; i++)
        ids[i] = t[2 * i].id;
    memset(&l, 0, sizeof(l));
    t0 = px_mono_ms();
    ck_assert_msg(ack("u_b", ids, N / 2, &l, err, sizeof(err)) == PX_OK,
                  "ack: %s", err);
    printf("report: ack (read + delete) of %d named docs: %lld ms (%.0f docs/s)\n", N / 2,
           (long long)(px_mono_ms() - t0), rate(N / 2, px_mono_ms() - t0));
    ck_assert_uint_eq(l.n, N / 2);
    for (size_t k = 0; k < l.n; k++) {
        int i = atoi(l.id[k] + 1);
        ck_assert_int_eq(i % 2, 0);
        ck_assert_int_eq(l.kind[k], STORE_MESSAGE);
        ck_assert_str_eq(l.sender[k], t[i].sender);
        ck_assert_int_eq(l.seq[k], ev[i].seq);
    }
    ck_assert_int_eq(count_of("u_b"), N / 2);

    /* Acking again deletes and reports nothing. */
    memset(&l, 0, sizeof(l));
    ck_assert_int_eq(ack("u_b", ids, N / 2, &l, err, sizeof(err)), PX_OK);
    ck_assert_uint_eq(l.n, 0);
    ck_assert_int_eq(count_of("u_b"), N / 2);

    /* What remains are the odd ones (receipts, no sender), seq 8002, 8006,
     * ...; after_seq 8003 with limit 10 gives the next ten. */
    memset(&l, 0, sizeof(l));
    ck_assert_int_eq(store_inbox_scan(st, "u_b", NULL, 8003, 10, log_cb, &l, err, sizeof(err)), PX_OK);
    ck_assert_uint_eq(l.n, 10);
    for (int k = 0; k < 10; k++) {
        ck_assert_int_eq(l.seq[k], 8006 + 4 * k);
        ck_assert_int_eq(l.kind[k], STORE_RECEIPT);
        ck_assert_str_eq(l.sender[k], "");
    }

    /* A callback's non-OK stops the scan and is returned. */
    memset(&l, 0, sizeof(l));
    l.stop_after = 3;
    ck_assert_int_eq(store_inbox_scan(st, "u_b", NULL, 0, 100, log_cb, &l, err, sizeof(err)),
                     PX_DECLINED);
    ck_assert_uint_eq(l.n, 3);
}
END_TEST

/* (c) An ack names the acker: ids held by another user are untouched. */
START_TEST(ack_other_user_deletes_nothing)
{
    store_event ev[3];
    tev t[3];
    static seen_log l;
    const char *ids[2];
    char err[PX_ERRLEN] = "";
    int64_t now = px_now_ms();

    make_event(&ev[0], &t[0], "alice", 1, 1, now);
    make_event(&ev[1], &t[1], "alice", 2, 2, now);
    put_ok(ev, 2, NULL);
    ids[0] = t[0].id;
    ids[1] = t[1].id;

    memset(&l, 0, sizeof(l));
    ck_assert_int_eq(ack("bob", ids, 2, &l, err, sizeof(err)), PX_OK);
    ck_assert_uint_eq(l.n, 0);
    ck_assert_int_eq(count_of("alice"), 2);

    /* bob holding the same id as alice acks only his own copy. */
    make_event(&ev[2], &t[2], "bob", 1, 1, now);
    put_ok(&ev[2], 1, NULL);
    ck_assert_int_eq(ack("bob", ids, 2, &l, err, sizeof(err)), PX_OK);
    ck_assert_uint_eq(l.n, 1);
    ck_assert_str_eq(l.id[0], t[0].id);
    ck_assert_int_eq(count_of("bob"), 0);
    ck_assert_int_eq(count_of("alice"), 2);
}
END_TEST

/* (d) Sweep removes exactly the records accepted before the cutoff. Other
 * tests write ts = now, so ancient timestamps keep this test's set apart. */
START_TEST(inbox_sweep_cutoff)
{
    store_event ev[4];
    tev t[4];
    static seen_log l;
    char err[PX_ERRLEN] = "";
    int64_t removed = -1;

    make_event(&ev[0], &t[0], "u_d", 0, 1, 1000);
    make_event(&ev[1], &t[1], "u_d", 1, 2, 2000);
    make_event(&ev[2], &t[2], "u_d", 2, 3, 2499);
    make_event(&ev[3], &t[3], "u_d", 3, 4, 2500);
    put_ok(ev, 4, NULL);
    ck_assert_int_eq(store_inbox_sweep(st, 2500, &removed, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(removed, 3);
    ck_assert_int_eq(count_of("u_d"), 1);
    memset(&l, 0, sizeof(l));
    ck_assert_int_eq(store_inbox_scan(st, "u_d", NULL, 0, 10, log_cb, &l, err, sizeof(err)), PX_OK);
    ck_assert_uint_eq(l.n, 1);
    ck_assert_str_eq(l.id[0], t[3].id);
    ck_assert_int_eq(store_inbox_sweep(st, 2500, &removed, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(removed, 0);
}
END_TEST

static void claim_is(const char *const *keys, const char *const *tags, size_t n, int64_t ts,
                     const int *want)
{
    char err[PX_ERRLEN] = "";
    int fresh[64];

    ck_assert_uint_le(n, 64);
    memset(fresh, 0xff, sizeof(fresh));
    ck_assert_msg(store_seen_claim(st, keys, tags, n, ts, fresh, err, sizeof(err)) == PX_OK,
                  "%s", err);
    for (size_t i = 0; i < n; i++)
        ck_assert_msg(fresh[i] == want[i], "key %s tag %s: fresh %d, want %d", keys[i], tags[i],
                      fresh[i], want[i]);
}

/* (d) seen: a free key is claimed, the same record (tag) claiming again is
 * still fresh (a redelivery), another record is not (a resend); a claim
 * keeps its first time, and the sweep forgets only old claims. */
START_TEST(seen_claim_sweep)
{
    const char *k3[] = { "bob/k1", "bob/k2", "bob/k3" };
    const char *t3[] = { "0/1", "0/2", "0/3" };
    const char *other3[] = { "0/7", "0/8", "0/9" };
    const char *kmix[] = { "bob/k1", "bob/k4", "bob/k2" };
    const char *tmix[] = { "0/1", "0/4", "0/9" };
    char err[PX_ERRLEN] = "";
    int64_t removed = -1;

    claim_is(k3, t3, 3, 1000, (int[]){ 1, 1, 1 });
    claim_is(k3, t3, 3, 5000, (int[]){ 1, 1, 1 });
    claim_is(k3, other3, 3, 5000, (int[]){ 0, 0, 0 });
    claim_is(kmix, tmix, 3, 6000, (int[]){ 1, 1, 0 });
    /* k1-k3 keep their first claim (1000); k4 (6000) stays. */
    ck_assert_int_eq(store_seen_sweep(st, 2000, &removed, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(removed, 3);
    claim_is(k3, other3, 3, 7000, (int[]){ 1, 1, 1 });
    claim_is(kmix, other3, 3, 7000, (int[]){ 1, 0, 0 });

    /* A batch larger than one round of lookups would suggest. */
    enum { BIG = 48 };
    static char names[BIG][16], first[BIG][16], second[BIG][16];
    const char *big[BIG], *even[BIG / 2], *even_tags[BIG / 2], *tags[BIG];
    int want[BIG];
    for (int i = 0; i < BIG; i++) {
        snprintf(names[i], sizeof(names[i]), "carol/b%d", i);
        snprintf(first[i], sizeof(first[i]), "1/%d", i);
        snprintf(second[i], sizeof(second[i]), "2/%d", i);
        big[i] = names[i];
        tags[i] = second[i];
        want[i] = i % 2 != 0;
        if (i % 2 == 0) {
            even[i / 2] = names[i];
            even_tags[i / 2] = first[i];
        }
    }
    int all[BIG / 2];
    for (int i = 0; i < BIG / 2; i++)
        all[i] = 1;
    claim_is(even, even_tags, BIG / 2, 9000, all);
    claim_is(big, tags, BIG, 9000, want);
}
END_TEST

/* Bounds and argument checks answer before any round trip. */
START_TEST(batch_limits)
{
    static store_event ev[10001];
    static const char *keys[10001];
    char err[PX_ERRLEN] = "";
    int fresh[1];

    ck_assert_int_eq(store_inbox_put(st, ev, 10001, NULL, err, sizeof(err)), PX_ERROR);
    ck_assert_ptr_nonnull(strstr(err, "exceeds the limit"));
    ck_assert_int_eq(store_seen_claim(st, keys, keys, 10001, 1, fresh, err, sizeof(err)),
                     PX_ERROR);
    ck_assert_int_eq(store_inbox_put(st, ev, 0, NULL, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(store_seen_claim(st, keys, keys, 0, 1, fresh, err, sizeof(err)), PX_OK);
    ev[0] = (store_event){ .user = "u_l", .id = "x", .kind = 9, .json = "{}", .json_len = 2 };
    ck_assert_int_eq(store_inbox_put(st, ev, 1, NULL, err, sizeof(err)), PX_ERROR);
    ck_assert_ptr_nonnull(strstr(err, "bad kind"));
    /* Invalid UTF-8 is refused by the driver, not stored. */
    ev[0] = (store_event){ .user = "u_l", .id = "x", .kind = STORE_MESSAGE, .json = "\xff\xfe",
                           .json_len = 2 };
    ck_assert_int_eq(store_inbox_put(st, ev, 1, NULL, err, sizeof(err)), PX_ERROR);
    ck_assert_int_eq(count_of("u_l"), 0);
    ck_assert_int_eq(store_ping(st, err, sizeof(err)), PX_OK);
}
END_TEST


static size_t lookup(const char *user, int64_t alive_after, char (*gws)[65])
{
    char err[PX_ERRLEN] = "";
    size_t n = 99;

    ck_assert_msg(store_presence_lookup(st, user, alive_after, gws, 4, &n, err, sizeof(err)) ==
                      PX_OK, "lookup: %s", err);
    return n;
}

static void apply(const store_presence *ops, size_t n)
{
    char err[PX_ERRLEN] = "";

    ck_assert_msg(store_presence_apply(st, ops, n, err, sizeof(err)) == PX_OK, "apply: %s", err);
}

static void beat(const char *gw, int64_t epoch, int64_t ts, int reset)
{
    char err[PX_ERRLEN] = "";

    ck_assert_msg(store_gateway_beat(st, gw, epoch, ts, reset, err, sizeof(err)) == PX_OK,
                  "beat: %s", err);
}

static int64_t conns_of(const char *user)
{
    char err[PX_ERRLEN] = "";
    int64_t c = -1;

    ck_assert_msg(store_presence_count(st, user, &c, err, sizeof(err)) == PX_OK, "count: %s",
                  err);
    return c;
}

#define CONNECT(u, g, e, c) { .user = u, .gateway = g, .epoch = e, .delta = 1, .conn = c }
#define DISCONNECT(u, g, e, c) { .user = u, .gateway = g, .epoch = e, .delta = -1, .conn = c }

/* Presence: one record per connection, so a batch applied again (a
 * redelivery) leaves the registry exact; epochs replace, stale beats and
 * disconnects are ignored, expiry removes dead gateways' records. */
START_TEST(presence_connections_and_epochs)
{
    char gws[4][65];
    char err[PX_ERRLEN] = "";
    int64_t removed = -1;
    const store_presence opened[] = { CONNECT("p1", "gw1", 10, 1), CONNECT("p1", "gw1", 10, 2),
                                      CONNECT("p1", "gw2", 20, 3) };
    const store_presence closed[] = { DISCONNECT("p1", "gw1", 10, 1) };

    beat("gw1", 10, 5000, 1);
    beat("gw2", 20, 5000, 1);
    apply(opened, 3);
    ck_assert_int_eq(conns_of("p1"), 3);
    ck_assert_uint_eq(lookup("p1", 4000, gws), 2); /* distinct gateways */
    ck_assert_uint_eq(lookup("p1", 6000, gws), 0); /* no recent beat */
    ck_assert_uint_eq(lookup("p1", 0, gws), 2);    /* beats unchecked */

    /* Redelivered: the same batch again, then the next one twice. */
    apply(opened, 3);
    ck_assert_int_eq(conns_of("p1"), 3);
    apply(closed, 1);
    apply(closed, 1);
    ck_assert_int_eq(conns_of("p1"), 2);

    /* Closing the last gw1 connection removes gw1, however often it is
     * applied, and a replay of the whole history changes nothing. */
    apply((store_presence[]){ DISCONNECT("p1", "gw1", 10, 2), DISCONNECT("p1", "gw1", 10, 2) },
          2);
    ck_assert_uint_eq(lookup("p1", 4000, gws), 1);
    ck_assert_str_eq(gws[0], "gw2");
    apply((store_presence[]){ CONNECT("p1", "gw1", 10, 1), CONNECT("p1", "gw1", 10, 2),
                              CONNECT("p1", "gw2", 20, 3), DISCONNECT("p1", "gw1", 10, 1),
                              DISCONNECT("p1", "gw1", 10, 2) }, 5);
    ck_assert_int_eq(conns_of("p1"), 1);
    ck_assert_uint_eq(lookup("p1", 4000, gws), 1);

    /* A connection that opened and closed within one batch leaves nothing,
     * in whichever order the batch names them. */
    apply((store_presence[]){ DISCONNECT("p4", "gw1", 10, 5), CONNECT("p4", "gw1", 10, 5),
                              CONNECT("p4", "gw1", 10, 6), DISCONNECT("p4", "gw1", 10, 6) }, 4);
    ck_assert_int_eq(conns_of("p4"), 0);

    /* gw2 restarts (epoch 21) without resetting: its old record is dead
     * until a connect of the new epoch replaces it; an old-epoch disconnect
     * of another connection leaves the new one. */
    beat("gw2", 21, 6000, 0);
    ck_assert_uint_eq(lookup("p1", 4000, gws), 0);
    apply((store_presence[]){ CONNECT("p1", "gw2", 21, 3), DISCONNECT("p1", "gw2", 20, 4) }, 2);
    ck_assert_uint_eq(lookup("p1", 4000, gws), 1);
    ck_assert_str_eq(gws[0], "gw2");
    ck_assert_int_eq(conns_of("p1"), 1);

    /* A zombie beat from epoch 20 does not move gw2 back. */
    beat("gw2", 20, 7000, 0);
    ck_assert_uint_eq(lookup("p1", 4000, gws), 1);

    /* A reset beat drops older-epoch records of that gateway. */
    apply((store_presence[]){ CONNECT("p2", "gw1", 10, 7) }, 1);
    beat("gw1", 11, 8000, 1);
    ck_assert_uint_eq(lookup("p2", 0, gws), 0);
    ck_assert_int_eq(conns_of("p2"), 0);

    /* gw2 stops beating: expire removes its records, not gw1's. */
    apply((store_presence[]){ CONNECT("p3", "gw1", 11, 8) }, 1);
    ck_assert_int_eq(store_presence_expire(st, 7500, &removed, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(removed, 1);
    ck_assert_uint_eq(lookup("p1", 0, gws), 0);
    ck_assert_int_eq(conns_of("p1"), 0);
    ck_assert_uint_eq(lookup("p3", 0, gws), 1);
    ck_assert_str_eq(gws[0], "gw1");
}
END_TEST

/* Collects what store_track_get returns: "reader/msg_id=sender[/group]". */
typedef struct track_log {
    size_t n;
    char rec[16][160];
} track_log;

static int track_cb(void *arg, const store_track *t)
{
    track_log *l = arg;

    ck_assert_uint_lt(l->n, 16);
    snprintf(l->rec[l->n++], sizeof(l->rec[0]), "%s/%s=%s%s%s", t->reader, t->msg_id, t->sender,
             t->group ? "/" : "", t->group ? t->group : "");
    return PX_OK;
}

static int track_has(const track_log *l, const char *rec)
{
    for (size_t i = 0; i < l->n; i++)
        if (strcmp(l->rec[i], rec) == 0)
            return 1;
    return 0;
}

/* Tracking: a repeat put is absorbed (the first sender stays), get finds
 * exactly the named (reader, msg_id) pairs (not the same msg_id of another
 * reader), delete removes only the named pairs and counts them. */
START_TEST(track_put_get_delete)
{
    int64_t now = px_now_ms();
    const store_track t[] = {
        { "t_bob", "M1", "t_alice", NULL, now },
        { "t_bob", "M2", "t_alice", NULL, now },
        { "t_carol", "M1", "t_alice", "g_1", now },
    };
    const store_track again[] = { { "t_bob", "M1", "t_mallory", NULL, now }, t[1] };
    const store_track keys[] = {
        { "t_bob", "M1", NULL, NULL, 0 }, { "t_bob", "M3", NULL, NULL, 0 },
        { "t_dave", "M1", NULL, NULL, 0 }, { "t_carol", "M1", NULL, NULL, 0 },
        { "t_bob", "M1", NULL, NULL, 0 },
    };
    static track_log l;
    char err[PX_ERRLEN] = "";
    int64_t removed = -1;

    ck_assert_msg(store_track_put(st, t, 3, err, sizeof(err)) == PX_OK, "put: %s", err);
    ck_assert_msg(store_track_put(st, again, 2, err, sizeof(err)) == PX_OK, "re-put: %s", err);
    memset(&l, 0, sizeof(l));
    ck_assert_msg(store_track_get(st, keys, 5, track_cb, &l, err, sizeof(err)) == PX_OK, "%s", err);
    ck_assert_uint_eq(l.n, 2);
    ck_assert(track_has(&l, "t_bob/M1=t_alice"));
    ck_assert(track_has(&l, "t_carol/M1=t_alice/g_1"));

    ck_assert_int_eq(store_track_delete(st, keys, 4, &removed, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(removed, 2);
    ck_assert_int_eq(store_track_delete(st, keys, 4, &removed, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(removed, 0);
    memset(&l, 0, sizeof(l));
    const store_track all[] = { t[0], t[1], t[2] };
    ck_assert_int_eq(store_track_get(st, all, 3, track_cb, &l, err, sizeof(err)), PX_OK);
    ck_assert_uint_eq(l.n, 1);
    ck_assert(track_has(&l, "t_bob/M2=t_alice"));
}
END_TEST

/* Tracking expiry: the sweep removes exactly the records tracked before the
 * cutoff (ancient timestamps keep this test's set apart from the others). */
START_TEST(track_sweep_cutoff)
{
    const store_track t[] = {
        { "ts_bob", "M1", "ts_alice", NULL, 1000 },
        { "ts_bob", "M2", "ts_alice", NULL, 2499 },
        { "ts_bob", "M3", "ts_alice", NULL, 2500 },
    };
    static track_log l;
    char err[PX_ERRLEN] = "";
    int64_t removed = -1;

    ck_assert_int_eq(store_track_put(st, t, 3, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(store_track_sweep(st, 2500, &removed, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(removed, 2);
    memset(&l, 0, sizeof(l));
    ck_assert_int_eq(store_track_get(st, t, 3, track_cb, &l, err, sizeof(err)), PX_OK);
    ck_assert_uint_eq(l.n, 1);
    ck_assert(track_has(&l, "ts_bob/M3=ts_alice"));
    ck_assert_int_eq(store_track_sweep(st, 2500, &removed, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(removed, 0);
}
END_TEST

/* Tracking refuses what would make its keys ambiguous or its records
 * useless, before any round trip. */
START_TEST(track_bad_input)
{
    const store_track slash[] = { { "a/b", "M1", "s", NULL, 1 } };
    const store_track nosender[] = { { "bob", "M1", NULL, NULL, 1 } };
    const store_track noid[] = { { "bob", "", "s", NULL, 1 } };
    char err[PX_ERRLEN] = "";

    ck_assert_int_eq(store_track_put(st, slash, 1, err, sizeof(err)), PX_ERROR);
    ck_assert_int_eq(store_track_put(st, nosender, 1, err, sizeof(err)), PX_ERROR);
    ck_assert_int_eq(store_track_get(st, noid, 1, track_cb, NULL, err, sizeof(err)), PX_ERROR);
    ck_assert_int_eq(store_track_delete(st, slash, 1, NULL, err, sizeof(err)), PX_ERROR);
}
END_TEST

/* The two halves of an ack, for several users in one call: get visits
 * exactly the named (user, id) events and deletes nothing; delete removes
 * exactly those. */
START_TEST(inbox_get_reads_without_deleting)
{
    store_event ev[4];
    tev t[4];
    static seen_log l;
    char err[PX_ERRLEN] = "";
    int64_t now = px_now_ms();

    make_event(&ev[0], &t[0], "g_alice", 1, 10, now);
    make_event(&ev[1], &t[1], "g_alice", 2, 5, now);
    make_event(&ev[2], &t[2], "g_alice", 3, 7, now);
    make_event(&ev[3], &t[3], "g_bob", 4, 1, now);
    put_ok(ev, 4, NULL);
    /* Two users in one call; bob's id under alice's name and an absent id
     * match nothing. */
    store_key keys[] = { { "g_alice", t[0].id }, { "g_bob", t[3].id }, { "g_alice", t[1].id },
                         { "g_alice", t[3].id }, { "g_alice", "absent" } };
    memset(&l, 0, sizeof(l));
    ck_assert_int_eq(store_inbox_get(st, keys, 5, log_cb, &l, err, sizeof(err)), PX_OK);
    ck_assert_uint_eq(l.n, 3);
    int seen[4] = { 0 };
    for (size_t k = 0; k < l.n; k++) {
        int i = 0;
        while (i < 4 && strcmp(l.id[k], t[i].id) != 0)
            i++;
        ck_assert_msg(i == 0 || i == 1 || i == 3, "unexpected event %s", l.id[k]);
        seen[i]++;
        ck_assert_int_eq(l.kind[k], ev[i].kind);
        ck_assert_int_eq(l.seq[k], ev[i].seq);
    }
    ck_assert_int_eq(seen[0] * seen[1] * seen[3], 1);
    ck_assert_int_eq(count_of("g_alice"), 3);
    ck_assert_int_eq(count_of("g_bob"), 1);

    /* Deleting by the same keys removes exactly those three. */
    int64_t removed = -1;
    ck_assert_int_eq(store_inbox_delete(st, keys, 5, &removed, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(removed, 3);
    ck_assert_int_eq(count_of("g_alice"), 1);
    ck_assert_int_eq(count_of("g_bob"), 0);
}
END_TEST


/* ---- media ---- */

static void fill(unsigned char *b, size_t n, unsigned seed)
{
    for (size_t i = 0; i < n; i++)
        b[i] = (unsigned char)((i * 131 + seed * 7 + (i >> 9)) & 0xff);
}

static void put_chunks(const char *upload, int nchunks, size_t last, int64_t ts)
{
    static unsigned char buf[STORE_MEDIA_CHUNK];
    char err[PX_ERRLEN] = "";

    for (int i = 0; i < nchunks; i++) {
        size_t len = i == nchunks - 1 ? last : STORE_MEDIA_CHUNK;
        fill(buf, len, (unsigned)i);
        ck_assert_msg(store_chunk_put(st, upload, i, buf, len, ts, err, sizeof(err)) == PX_OK,
                      "chunk put: %s", err);
    }
}

static int64_t chunks_of(const char *upload)
{
    char err[PX_ERRLEN] = "";
    int64_t c = -1;

    ck_assert_msg(store_chunk_count(st, upload, &c, err, sizeof(err)) == PX_OK, "count: %s", err);
    return c;
}

static store_media media_rec(const char *id, const char *upload, char hexdigit, int64_t size,
                             int64_t ts)
{
    store_media m;

    memset(&m, 0, sizeof(m));
    snprintf(m.id, sizeof(m.id), "%s", id);
    snprintf(m.upload, sizeof(m.upload), "%s", upload);
    memset(m.sha256, hexdigit, 64);
    snprintf(m.content_type, sizeof(m.content_type), "image/png");
    m.size = size;
    m.ts_ms = ts;
    return m;
}

/* Reads chunks from from_n on; returns how many came, checking each
 * against fill() and the expected sizes. */
static int read_chunks(const char *upload, int64_t from_n, int nchunks, size_t last)
{
    static unsigned char want[STORE_MEDIA_CHUNK], got[STORE_MEDIA_CHUNK];
    char err[PX_ERRLEN] = "";
    int64_t n;
    size_t len;
    int count = 0, rc;
    store_chunk_reader *rd = store_chunk_open(st, upload, from_n, err, sizeof(err));

    ck_assert_msg(rd != NULL, "chunk open: %s", err);
    while ((rc = store_chunk_next(rd, &n, got, sizeof(got), &len, err, sizeof(err))) == PX_OK) {
        size_t wl = n == nchunks - 1 ? last : STORE_MEDIA_CHUNK;
        ck_assert_int_eq(n, from_n + count);
        ck_assert_uint_eq(len, wl);
        fill(want, wl, (unsigned)n);
        ck_assert(memcmp(want, got, len) == 0);
        count++;
    }
    ck_assert_msg(rc == PX_DECLINED, "chunk next: %s", err);
    store_chunk_close(rd);
    return count;
}

/* Chunks come back byte for byte and in order, from any chunk on; a
 * repeated put is absorbed; drop removes exactly one upload's chunks. */
START_TEST(media_chunks_roundtrip)
{
    static unsigned char got[1];
    char err[PX_ERRLEN] = "";
    int64_t removed = -1;

    put_chunks("up_a", 3, 1000, 5000);
    put_chunks("up_a", 3, 1000, 5000); /* a retried upload step */
    put_chunks("up_b", 1, 10, 5000);
    ck_assert_int_eq(chunks_of("up_a"), 3);
    ck_assert_int_eq(read_chunks("up_a", 0, 3, 1000), 3);
    ck_assert_int_eq(read_chunks("up_a", 1, 3, 1000), 2);
    ck_assert_int_eq(read_chunks("up_a", 3, 3, 1000), 0);
    ck_assert_int_eq(read_chunks("up_b", 0, 1, 10), 1);
    ck_assert_int_eq(store_chunk_drop(st, "up_a", &removed, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(removed, 3);
    ck_assert_int_eq(chunks_of("up_a"), 0);
    ck_assert_int_eq(chunks_of("up_b"), 1);
    /* Bad input is refused before any round trip. */
    ck_assert_int_eq(store_chunk_put(st, "a/b", 0, got, 1, 1, err, sizeof(err)), PX_ERROR);
    ck_assert_int_eq(store_chunk_put(st, "up_c", 0, got, STORE_MEDIA_CHUNK + 1, 1, err,
                                     sizeof(err)), PX_ERROR);
}
END_TEST

/* The first commit of a sha256 creates the record; a second upload of the
 * same bytes gets a record of its own over the stored bytes (its id, its
 * type, its grants: nothing of the first); access is exactly the grants. */
START_TEST(media_commit_dedupe_and_access)
{
    char err[PX_ERRLEN] = "";
    store_media m1 = media_rec("med1", "up_m1", 'a', 300000, 7000), m2, got;
    const char *bob[] = { "bob", "carol", "bob" };
    int created = -1;

    put_chunks("up_m1", 2, 300000 - STORE_MEDIA_CHUNK, 7000);
    ck_assert_int_eq(store_media_commit(st, &m1, "alice", &created, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(created, 1);
    m2 = media_rec("med2", "up_m2", 'a', 300000, 8000);
    snprintf(m2.content_type, sizeof(m2.content_type), "text/plain");
    ck_assert_int_eq(store_media_commit(st, &m2, "dave", &created, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(created, 0);
    ck_assert_str_eq(m2.id, "med2");
    ck_assert_str_eq(m2.upload, "up_m1");
    ck_assert_str_eq(m2.content_type, "text/plain");
    ck_assert_int_eq(store_media_get(st, "med1", &got, err, sizeof(err)), PX_OK);
    ck_assert_str_eq(got.content_type, "image/png");
    ck_assert_int_eq(got.size, 300000);
    ck_assert_int_eq(got.ts_ms, 8000);         /* the bytes' ts moved up */
    ck_assert_int_eq(store_media_get(st, "med2", &got, err, sizeof(err)), PX_OK);
    ck_assert_str_eq(got.id, "med2");
    ck_assert_str_eq(got.content_type, "text/plain");
    ck_assert_str_eq(got.upload, "up_m1");
    ck_assert_int_eq(got.size, 300000);
    ck_assert_int_eq(got.ts_ms, 8000);
    ck_assert_int_eq(store_media_access(st, "med1", "alice", err, sizeof(err)), PX_OK);
    ck_assert_int_eq(store_media_access(st, "med1", "dave", err, sizeof(err)), PX_DECLINED);
    ck_assert_int_eq(store_media_access(st, "med2", "dave", err, sizeof(err)), PX_OK);
    ck_assert_int_eq(store_media_access(st, "med2", "alice", err, sizeof(err)), PX_DECLINED);
    /* A grant of the alias keeps the bytes too. */
    const char *erin[] = { "erin" };
    ck_assert_int_eq(store_media_grant(st, "med2", erin, 1, 8500, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(store_media_access(st, "med2", "erin", err, sizeof(err)), PX_OK);
    ck_assert_int_eq(store_media_get(st, "med1", &got, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(got.ts_ms, 8500);
    ck_assert_int_eq(store_media_access(st, "med1", "bob", err, sizeof(err)), PX_DECLINED);
    ck_assert_int_eq(store_media_grant(st, "med1", bob, 3, 9000, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(store_media_grant(st, "med1", bob, 1, 9000, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(store_media_access(st, "med1", "bob", err, sizeof(err)), PX_OK);
    ck_assert_int_eq(store_media_access(st, "med1", "carol", err, sizeof(err)), PX_OK);
    ck_assert_int_eq(store_media_get(st, "med1", &got, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(got.ts_ms, 9000);
    /* Granting unknown media is refused: nothing to grant. */
    ck_assert_int_eq(store_media_grant(st, "nope", bob, 1, 9000, err, sizeof(err)), PX_DECLINED);
    ck_assert_int_eq(store_media_access(st, "nope", "bob", err, sizeof(err)), PX_DECLINED);
}
END_TEST

/* The sweep removes media (record, chunks, grants) and aliases untouched
 * since the cutoff, and uncommitted uploads older than the orphan cutoff;
 * it keeps everything newer, and the bytes of a recently granted alias. */
START_TEST(media_sweep_old_and_orphans)
{
    char err[PX_ERRLEN] = "";
    store_media old = media_rec("sw_old", "up_sw_old", 'b', 10, 1000);
    store_media kept = media_rec("sw_new", "up_sw_new", 'c', 10, 1000);
    const char *bob[] = { "bob" };
    int64_t nm = -1, no = -1;
    int created;

    put_chunks("up_sw_old", 1, 10, 1000);
    put_chunks("up_sw_new", 1, 10, 1000);
    put_chunks("up_orphan_old", 2, 10, 1000);
    put_chunks("up_orphan_new", 2, 10, 3000);
    ck_assert_int_eq(store_media_commit(st, &old, "alice", &created, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(store_media_commit(st, &kept, "alice", &created, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(store_media_grant(st, "sw_new", bob, 1, 2600, err, sizeof(err)), PX_OK);
    store_media alias = media_rec("sw_alias", "up_sw_alias", 'c', 10, 1000);
    store_media d = media_rec("sw_d", "up_sw_d", 'd', 10, 1000);
    store_media d2 = media_rec("sw_d2", "up_sw_d2", 'd', 10, 1000);
    put_chunks("up_sw_d", 1, 10, 1000);
    ck_assert_int_eq(store_media_commit(st, &alias, "erin", &created, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(store_media_commit(st, &d, "alice", &created, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(store_media_commit(st, &d2, "erin", &created, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(store_media_grant(st, "sw_d2", bob, 1, 2600, err, sizeof(err)), PX_OK);
    /* Writing chunk 0 again re-creates sw_new's upload record, as a crash
     * between commit and the record's delete would leave it: the sweep
     * must see the upload is committed and keep its chunks. */
    put_chunks("up_sw_new", 1, 10, 1000);
    ck_assert_int_eq(store_media_sweep(st, 2500, 2500, &nm, &no, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(nm, 2);                     /* sw_old, sw_alias */
    ck_assert_int_eq(no, 1);
    ck_assert_int_eq(store_media_get(st, "sw_alias", &alias, err, sizeof(err)), PX_DECLINED);
    ck_assert_int_eq(store_media_access(st, "sw_alias", "erin", err, sizeof(err)), PX_DECLINED);
    ck_assert_int_eq(store_media_get(st, "sw_d2", &d2, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(store_media_get(st, "sw_d", &d, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(chunks_of("up_sw_d"), 1);   /* its alias was granted recently */
    ck_assert_int_eq(store_media_get(st, "sw_old", &old, err, sizeof(err)), PX_DECLINED);
    ck_assert_int_eq(store_media_access(st, "sw_old", "alice", err, sizeof(err)), PX_DECLINED);
    ck_assert_int_eq(chunks_of("up_sw_old"), 0);
    ck_assert_int_eq(chunks_of("up_orphan_old"), 0);
    ck_assert_int_eq(chunks_of("up_sw_new"), 1);    /* committed, granted recently */
    ck_assert_int_eq(chunks_of("up_orphan_new"), 2); /* maybe still uploading */
    ck_assert_int_eq(store_media_access(st, "sw_new", "bob", err, sizeof(err)), PX_OK);
    ck_assert_int_eq(store_media_sweep(st, 2500, 2500, &nm, &no, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(nm + no, 0);
}
END_TEST

/* Chunk throughput on this server, as a report line (speed is measured,
 * not asserted: bench/ owns it); the chunks read back are checked. */
START_TEST(media_chunk_rate)
{
    const int n = 32;
    int64_t t0 = px_mono_ms();

    put_chunks("up_rate", n, STORE_MEDIA_CHUNK, 5000);
    int64_t t1 = px_mono_ms();
    ck_assert_int_eq(read_chunks("up_rate", 0, n, STORE_MEDIA_CHUNK), n);
    int64_t t2 = px_mono_ms();
    double mb = n * (double)STORE_MEDIA_CHUNK / 1048576.0;
    printf("report: chunk put %.1f MB/s, read %.1f MB/s (%d x %d KiB)\n",
           mb * 1000.0 / (double)PX_MAX(t1 - t0, 1), mb * 1000.0 / (double)PX_MAX(t2 - t1, 1), n,
           STORE_MEDIA_CHUNK / 1024);
}
END_TEST

/* Ack marks per device (issue 17): a scan for a device skips what it
 * marked, a plain scan sees everything, get reads the marks back, a repeat
 * mark is absorbed, unmark drops every device's marks of an event. */
typedef struct acked_log {
    char id[8][32];
    char acked[8][64];        /* the devices, sorted, joined by ',' */
    size_t n;
} acked_log;

static int acked_cb(void *arg, const store_event *ev)
{
    acked_log *l = arg;
    ck_assert_uint_lt(l->n, 8);
    const char *d[STORE_ACKED_MAX];
    memcpy(d, ev->acked, ev->nacked * sizeof(d[0]));
    for (size_t i = 1; i < ev->nacked; i++) /* a few: insertion sort */
        for (size_t j = i; j > 0 && strcmp(d[j - 1], d[j]) > 0; j--) {
            const char *x = d[j];
            d[j] = d[j - 1];
            d[j - 1] = x;
        }
    snprintf(l->id[l->n], sizeof(l->id[0]), "%s", ev->id);
    l->acked[l->n][0] = '\0';
    for (size_t i = 0; i < ev->nacked; i++) {
        size_t len = strlen(l->acked[l->n]);
        snprintf(l->acked[l->n] + len, sizeof(l->acked[0]) - len, "%s%s", i ? "," : "", d[i]);
    }
    l->n++;
    return PX_OK;
}

static const char *acked_of(const acked_log *l, const char *id)
{
    for (size_t i = 0; i < l->n; i++)
        if (strcmp(l->id[i], id) == 0)
            return l->acked[i];
    return NULL;
}

START_TEST(inbox_marks_per_device)
{
    store_event ev[3];
    tev t[3];
    static seen_log l;
    acked_log al;
    char err[PX_ERRLEN] = "";
    store_key keys[3];

    for (int i = 0; i < 3; i++) {
        make_event(&ev[i], &t[i], "u_m", i, 10 + i, 5000 + i);
        keys[i] = (store_key){ "u_m", t[i].id };
    }
    put_ok(ev, 3, NULL);
    ck_assert_msg(store_inbox_mark(st, ev, 2, "phone", err, sizeof(err)) == PX_OK, "mark: %s",
                  err);
    ck_assert_int_eq(store_inbox_mark(st, ev, 1, "phone", err, sizeof(err)), PX_OK);
    memset(&l, 0, sizeof(l));
    ck_assert_int_eq(store_inbox_scan(st, "u_m", "phone", 0, 10, log_cb, &l, err, sizeof(err)),
                     PX_OK);
    ck_assert_uint_eq(l.n, 1);
    ck_assert_str_eq(l.id[0], t[2].id);
    memset(&l, 0, sizeof(l));
    ck_assert_int_eq(store_inbox_scan(st, "u_m", "laptop", 0, 10, log_cb, &l, err, sizeof(err)),
                     PX_OK);
    ck_assert_uint_eq(l.n, 3);
    /* The limit counts what the device is given, not what it skipped. */
    memset(&l, 0, sizeof(l));
    ck_assert_int_eq(store_inbox_scan(st, "u_m", "phone", 0, 1, log_cb, &l, err, sizeof(err)),
                     PX_OK);
    ck_assert_uint_eq(l.n, 1);
    ck_assert_str_eq(l.id[0], t[2].id);
    memset(&l, 0, sizeof(l));
    ck_assert_int_eq(store_inbox_scan(st, "u_m", NULL, 0, 10, log_cb, &l, err, sizeof(err)),
                     PX_OK);
    ck_assert_uint_eq(l.n, 3);

    ck_assert_int_eq(store_inbox_mark(st, ev, 1, "laptop", err, sizeof(err)), PX_OK);
    memset(&al, 0, sizeof(al));
    ck_assert_int_eq(store_inbox_get(st, keys, 3, acked_cb, &al, err, sizeof(err)), PX_OK);
    ck_assert_uint_eq(al.n, 3);
    ck_assert_str_eq(acked_of(&al, t[0].id), "laptop,phone");
    ck_assert_str_eq(acked_of(&al, t[1].id), "phone");
    ck_assert_str_eq(acked_of(&al, t[2].id), "");

    ck_assert_int_eq(store_inbox_delete(st, keys, 1, NULL, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(store_inbox_unmark(st, keys, 2, err, sizeof(err)), PX_OK);
    memset(&al, 0, sizeof(al));
    ck_assert_int_eq(store_inbox_get(st, keys, 3, acked_cb, &al, err, sizeof(err)), PX_OK);
    ck_assert_uint_eq(al.n, 2);
    ck_assert_str_eq(acked_of(&al, t[1].id), "");
    memset(&l, 0, sizeof(l));
    ck_assert_int_eq(store_inbox_scan(st, "u_m", "phone", 0, 10, log_cb, &l, err, sizeof(err)),
                     PX_OK);
    ck_assert_uint_eq(l.n, 2);
}
END_TEST

typedef struct dev_log {
    char dev[8][16];
    int64_t first[8], last[8], since[8], gone[8];
    size_t n;
} dev_log;

static int dev_cb(void *arg, const store_device *d)
{
    dev_log *l = arg;
    ck_assert_uint_lt(l->n, 8);
    snprintf(l->dev[l->n], sizeof(l->dev[0]), "%s", d->dev);
    l->first[l->n] = d->first_ms;
    l->last[l->n] = d->last_ms;
    l->since[l->n] = d->since;
    l->gone[l->n] = d->push_gone_ms;
    l->n++;
    return PX_OK;
}

static size_t dev_find(const dev_log *l, const char *dev)
{
    for (size_t i = 0; i < l->n; i++)
        if (strcmp(l->dev[i], dev) == 0)
            return i;
    ck_abort_msg("device %s not listed", dev);
    return 0;
}

static int touch(const char *dev, int64_t now, long max)
{
    char err[PX_ERRLEN] = "";
    int status = -1;
    ck_assert_msg(store_device_touch(st, "u_v", dev, now, max, &status, err, sizeof(err)) ==
                      PX_OK, "touch: %s", err);
    return status;
}

/* Devices (issue 17): registered up to the limit, a known one always
 * comes back, first and last seen kept, since moves down once. */
/* The registry keeps each connection's device: the distinct devices of a
 * user's connection records, none for connections that named none. */
START_TEST(presence_devices)
{
    char devs[4][65], err[PX_ERRLEN] = "";
    size_t n = 9;
    store_presence ops[] = {
        { .user = "pd", .gateway = "gw1", .epoch = 1, .delta = 1, .conn = 1, .device = "a" },
        { .user = "pd", .gateway = "gw1", .epoch = 1, .delta = 1, .conn = 2, .device = "a" },
        { .user = "pd", .gateway = "gw2", .epoch = 1, .delta = 1, .conn = 3, .device = "b" },
        { .user = "pd", .gateway = "gw2", .epoch = 1, .delta = 1, .conn = 4 },
    };
    apply(ops, 4);
    ck_assert_int_eq(store_presence_devices(st, "pd", devs, 4, &n, err, sizeof(err)), PX_OK);
    ck_assert_uint_eq(n, 2);
    ck_assert(strcmp(devs[0], devs[1]) != 0);
    ck_assert(strcmp(devs[0], "a") == 0 || strcmp(devs[0], "b") == 0);
    store_presence off = { .user = "pd", .gateway = "gw2", .epoch = 1, .delta = -1, .conn = 3 };
    apply(&off, 1);
    ck_assert_int_eq(store_presence_devices(st, "pd", devs, 4, &n, err, sizeof(err)), PX_OK);
    ck_assert_uint_eq(n, 1);
    ck_assert_str_eq(devs[0], "a");
}
END_TEST

/* Contacts (issue 18): one record per unordered pair, repeats (in either
 * order) absorbed; a user is its own contact, a stranger is none. */
START_TEST(contacts_pairs)
{
    char err[PX_ERRLEN] = "";
    const store_pair p[] = { { "ca", "cb" }, { "cb", "ca" }, { "cc", "ca" } };
    ck_assert_msg(store_contacts_put(st, p, 3, err, sizeof(err)) == PX_OK, "put: %s", err);
    ck_assert_msg(store_contacts_put(st, p, 2, err, sizeof(err)) == PX_OK, "repeat: %s", err);
    const char *others[] = { "cb", "cc", "cd", "ca" };
    int is[4] = { 9, 9, 9, 9 };
    ck_assert_msg(store_contacts_check(st, "ca", others, 4, is, err, sizeof(err)) == PX_OK,
                  "check: %s", err);
    ck_assert_int_eq(is[0], 1);
    ck_assert_int_eq(is[1], 1);
    ck_assert_int_eq(is[2], 0);
    ck_assert_int_eq(is[3], 1);
    const char *from_b[] = { "cc", "ca" };
    ck_assert_int_eq(store_contacts_check(st, "cb", from_b, 2, is, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(is[0], 0);
    ck_assert_int_eq(is[1], 1);
    const store_pair self = { "ca", "ca" };
    ck_assert_int_ne(store_contacts_put(st, &self, 1, err, sizeof(err)), PX_OK);
}
END_TEST

/* Presence state (issue 18): online while a connection record is left,
 * last seen only moves up, the hide setting is kept beside it. */
START_TEST(presence_state_and_last_seen)
{
    char err[PX_ERRLEN] = "";
    const char *users[] = { "ps1", "ps2", "ps3" };
    store_user_presence s[3];
    /* Its own connection id: (gw1, 1, 1) is presence_devices' user's. */
    apply((store_presence[]){ { .user = "ps1", .gateway = "gw1", .epoch = 1, .delta = 1,
                                .conn = 71 } }, 1);
    ck_assert_msg(store_last_seen_put(st, users + 1, 1, 5000, err, sizeof(err)) == PX_OK,
                  "last seen: %s", err);
    ck_assert_int_eq(store_last_seen_put(st, users + 1, 1, 4000, err, sizeof(err)), PX_OK);
    ck_assert_msg(store_presence_hide(st, "ps2", 1, err, sizeof(err)) == PX_OK, "hide: %s", err);
    ck_assert_msg(store_presence_state(st, users, 3, s, err, sizeof(err)) == PX_OK, "state: %s",
                  err);
    ck_assert_int_eq(s[0].online, 1);
    ck_assert_int_eq(s[0].last_seen, 0);
    ck_assert_int_eq(s[1].online, 0);
    ck_assert_int_eq(s[1].last_seen, 5000);
    ck_assert_int_eq(s[1].hide_last_seen, 1);
    ck_assert_int_eq(s[2].online, 0);
    ck_assert_int_eq(s[2].last_seen, 0);
    ck_assert_int_eq(s[2].hide_last_seen, 0);
    ck_assert_int_eq(store_last_seen_put(st, users + 1, 1, 6000, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(store_presence_hide(st, "ps2", 0, err, sizeof(err)), PX_OK);
    apply((store_presence[]){ { .user = "ps1", .gateway = "gw1", .epoch = 1, .delta = -1,
                                .conn = 71 } }, 1);
    ck_assert_int_eq(store_presence_state(st, users, 2, s, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(s[0].online, 0);
    ck_assert_int_eq(s[1].last_seen, 6000);
    ck_assert_int_eq(s[1].hide_last_seen, 0);
}
END_TEST

/* The gateways that beat at or after a time (times past any other test's
 * beats, which share the store). */
START_TEST(gateway_list_alive)
{
    char err[PX_ERRLEN] = "", gws[4][65];
    size_t n = 9;
    const int64_t t = 5000000000000LL;
    ck_assert_int_eq(store_gateway_beat(st, "gl1", 1, t, 0, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(store_gateway_beat(st, "gl2", 1, t + 2000, 0, err, sizeof(err)), PX_OK);
    ck_assert_msg(store_gateway_list(st, t + 1000, gws, 4, &n, err, sizeof(err)) == PX_OK,
                  "list: %s", err);
    ck_assert_uint_eq(n, 1);
    ck_assert_str_eq(gws[0], "gl2");
    ck_assert_int_eq(store_gateway_list(st, t, gws, 4, &n, err, sizeof(err)), PX_OK);
    ck_assert_uint_eq(n, 2);
}
END_TEST

START_TEST(devices_limit_and_link)
{
    char err[PX_ERRLEN] = "";
    dev_log l;

    ck_assert_int_eq(touch("a", 1000, 2), STORE_DEVICE_OK);
    ck_assert_int_eq(touch("b", 1100, 2), STORE_DEVICE_OK);
    ck_assert_int_eq(touch("c", 1200, 2), STORE_DEVICE_FULL);
    ck_assert_int_eq(touch("a", 1300, 2), STORE_DEVICE_OK);
    memset(&l, 0, sizeof(l));
    ck_assert_int_eq(store_device_list(st, "u_v", dev_cb, &l, err, sizeof(err)), PX_OK);
    ck_assert_uint_eq(l.n, 2);
    size_t a = dev_find(&l, "a"), b = dev_find(&l, "b");
    ck_assert_int_eq(l.first[a], 1000);
    ck_assert_int_eq(l.last[a], 1300);
    ck_assert_int_eq(l.since[a], STORE_DEVICE_UNSYNCED);
    ck_assert_int_eq(store_device_link(st, "u_v", "a", -1, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(store_device_link(st, "u_v", "a", 50, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(store_device_link(st, "u_v", "b", 70, err, sizeof(err)), PX_OK);
    memset(&l, 0, sizeof(l));
    ck_assert_int_eq(store_device_list(st, "u_v", dev_cb, &l, err, sizeof(err)), PX_OK);
    a = dev_find(&l, "a");
    b = dev_find(&l, "b");
    ck_assert_int_eq(l.since[a], -1);
    ck_assert_int_eq(l.since[b], 70);
    ck_assert_int_eq(touch("c", 1400, 3), STORE_DEVICE_OK);
    /* Unlinked: refused from then on, its place free again. */
    ck_assert_int_eq(store_device_unlink(st, "u_v", "b", err, sizeof(err)), PX_OK);
    ck_assert_int_eq(store_device_unlink(st, "u_v", "b", err, sizeof(err)), PX_OK);
    ck_assert_int_eq(store_device_unlink(st, "u_v", "zz", err, sizeof(err)), PX_DECLINED);
    ck_assert_int_eq(touch("b", 1500, 3), STORE_DEVICE_UNLINKED);
    ck_assert_int_eq(touch("d", 1600, 3), STORE_DEVICE_OK);
    ck_assert_int_eq(touch("e", 1700, 3), STORE_DEVICE_FULL);
}
END_TEST

/* A new device registered by several connections at once (a client that
 * reconnects while its first attempt is still being registered): every
 * touch succeeds and one record results. Over MongoDB the losers' upsert
 * inserts hit the winner's _id (E11000) and, unretried, answered the
 * client 503. */
#define RACE_THREADS 6
#define RACE_ROUNDS 12

typedef struct race_arg {
    char user[32];
    pthread_barrier_t *go;
    int rc, status;
} race_arg;

static void *race_touch(void *p)
{
    race_arg *a = p;
    char err[PX_ERRLEN] = "";
    pthread_barrier_wait(a->go);
    a->rc = store_device_touch(st, a->user, "d1", 5000, 10, &a->status, err, sizeof(err));
    if (a->rc != PX_OK)
        fprintf(stderr, "device touch: %s\n", err);
    return NULL;
}

START_TEST(device_touch_concurrent)
{
    char err[PX_ERRLEN] = "";
    for (int r = 0; r < RACE_ROUNDS; r++) {
        pthread_t t[RACE_THREADS];
        race_arg a[RACE_THREADS];
        pthread_barrier_t go;
        pthread_barrier_init(&go, NULL, RACE_THREADS);
        for (int i = 0; i < RACE_THREADS; i++) {
            a[i] = (race_arg){ .go = &go };
            snprintf(a[i].user, sizeof(a[i].user), "u_race%d", r);
            ck_assert_int_eq(pthread_create(&t[i], NULL, race_touch, &a[i]), 0);
        }
        for (int i = 0; i < RACE_THREADS; i++) {
            pthread_join(t[i], NULL);
            ck_assert_int_eq(a[i].rc, PX_OK);
            ck_assert_int_eq(a[i].status, STORE_DEVICE_OK);
        }
        pthread_barrier_destroy(&go);
        dev_log l;
        memset(&l, 0, sizeof(l));
        ck_assert_int_eq(store_device_list(st, a[0].user, dev_cb, &l, err, sizeof(err)), PX_OK);
        ck_assert_uint_eq(l.n, 1);
    }
}
END_TEST

/* Push (issue 18): a device's latest 410 is kept and read back with it,
 * never moves back, and survives its next touch (the push service compares
 * it with last); an unknown device is left alone. */
START_TEST(device_push_gone)
{
    char err[PX_ERRLEN] = "";
    dev_log l = { 0 };
    int status = -1;

    ck_assert_int_eq(store_device_touch(st, "u_pg", "a", 1000, 4, &status, err, sizeof(err)),
                     PX_OK);
    ck_assert_int_eq(store_device_list(st, "u_pg", dev_cb, &l, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(l.gone[dev_find(&l, "a")], 0);
    ck_assert_int_eq(store_device_push_gone(st, "u_pg", "a", 2000, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(store_device_push_gone(st, "u_pg", "a", 1500, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(store_device_push_gone(st, "u_pg", "zz", 1500, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(store_device_touch(st, "u_pg", "a", 3000, 4, &status, err, sizeof(err)),
                     PX_OK);
    memset(&l, 0, sizeof(l));
    ck_assert_int_eq(store_device_list(st, "u_pg", dev_cb, &l, err, sizeof(err)), PX_OK);
    ck_assert_uint_eq(l.n, 1);
    ck_assert_int_eq(l.gone[0], 2000);
    ck_assert_int_eq(l.last[0], 3000);
}
END_TEST

Suite *store_contract_suite(const char *name)
{
    Suite *s = suite_create(name);
    TCase *tc = tcase_create("contract");

    tcase_add_checked_fixture(tc, open_store, close_store);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, dup_insert_absorbed);
    tcase_add_test(tc, bulk_roundtrip);
    tcase_add_test(tc, ack_other_user_deletes_nothing);
    tcase_add_test(tc, inbox_sweep_cutoff);
    tcase_add_test(tc, seen_claim_sweep);
    tcase_add_test(tc, batch_limits);
    tcase_add_test(tc, presence_connections_and_epochs);
    tcase_add_test(tc, track_put_get_delete);
    tcase_add_test(tc, track_sweep_cutoff);
    tcase_add_test(tc, track_bad_input);
    tcase_add_test(tc, inbox_get_reads_without_deleting);
    tcase_add_test(tc, media_chunks_roundtrip);
    tcase_add_test(tc, media_commit_dedupe_and_access);
    tcase_add_test(tc, media_sweep_old_and_orphans);
    tcase_add_test(tc, media_chunk_rate);
    tcase_add_test(tc, inbox_marks_per_device);
    tcase_add_test(tc, devices_limit_and_link);
    tcase_add_test(tc, device_touch_concurrent);
    tcase_add_test(tc, device_push_gone);
    tcase_add_test(tc, presence_devices);
    tcase_add_test(tc, contacts_pairs);
    tcase_add_test(tc, presence_state_and_last_seen);
    tcase_add_test(tc, gateway_list_alive);
    suite_add_tcase(s, tc);
    return s;
}
