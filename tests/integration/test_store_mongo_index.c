/* The local stack answers store_mongo's hot-path queries from indexes:
 * with 5,000 documents in each collection those calls touch, a burst of
 * the store calls the services make per message, ack, receipt, presence
 * lookup, group send and media download adds not one sequential scan on
 * any of these collections (PostgreSQL's own per-table counters say, read
 * through FerretDB's metadata table, which maps a collection to its
 * table). deploy/local/ferretdb-pg.sql makes this hold; without it, or
 * with a query shape FerretDB cannot push down (an `_id $in`, an `$or`),
 * every such call is a scan of the whole collection.
 *
 * Prints the mean time per call (report: lines), the figure to compare
 * with and without the indexes. Runs against FerretDB over PostgreSQL
 * only (PARLEY_PG_PORT, default the MongoDB-wire port - 1000, as in
 * deploy/local/stack.sh); against another server it reports a skip. */
#include "common.h"
#include "store.h"

#include <check.h>
#include <mongoc/mongoc.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_URI "mongodb://127.0.0.1:27018/?retryWrites=false"
#define N_DOCS 5000      /* documents per collection: "more than a few thousand" */
#define N_USERS 100      /* inbox owners, N_DOCS / N_USERS events each */
#define N_CALLS 30       /* calls of each kind in the burst */
#define STATS_WAIT_MS 30000 /* a backend publishes its counters within 10 s of idling */
#define SETTLED_READS 23    /* 500 ms apart: unchanged for 11 s, past PGSTAT_IDLE_INTERVAL */
#define SETTLE_WAIT_MS 60000

static const char *test_uri;
static char test_db[64];
static int pg_port;

/* ---- PostgreSQL, through psql ----------------------------------------- */

/* Runs sql (one statement) in FerretDB's database; its unaligned output,
 * one row per line, fields split by '|', into out. */
static int pg_run(const char *sql, char *out, size_t cap)
{
    char path[] = "/tmp/parley-index-XXXXXX", cmd[256];
    int fd = mkstemp(path);
    size_t len = 0, got;
    FILE *p;

    if (fd < 0 || write(fd, sql, strlen(sql)) != (ssize_t)strlen(sql)) {
        if (fd >= 0)
            close(fd);
        return -1;
    }
    close(fd);
    /* A connect timeout: whatever else listens on the port must not hang us. */
    snprintf(cmd, sizeof(cmd), "timeout -k 5 60 psql 'host=127.0.0.1 port=%d user=postgres "
             "dbname=ferretdb connect_timeout=10' -qAtX -v ON_ERROR_STOP=1 -f %s 2>&1",
             pg_port, path);
    p = popen(cmd, "r");
    if (p != NULL)
        while (len + 1 < cap && (got = fread(out + len, 1, cap - 1 - len, p)) > 0)
            len += got;
    out[len] = '\0';
    int rc = p != NULL ? pclose(p) : -1;
    unlink(path);
    return rc;
}

typedef struct scans {
    char coll[32];
    long seq, idx;
} scans;

/* The scan counters of every collection of the test database. */
static size_t read_scans(scans *s, size_t max)
{
    char sql[512], out[4096];
    size_t n = 0;

    snprintf(sql, sizeof(sql),
             "SELECT m._jsonb->>'_id', t.seq_scan, coalesce(t.idx_scan, 0) "
             "FROM \"%s\"._ferretdb_database_metadata m JOIN pg_stat_user_tables t "
             "ON t.schemaname = '%s' AND t.relname = m._jsonb->>'table' ORDER BY 1",
             test_db, test_db);
    ck_assert_msg(pg_run(sql, out, sizeof(out)) == 0, "psql: %s", out);
    for (char *line = strtok(out, "\n"); line != NULL && n < max; line = strtok(NULL, "\n"))
        if (sscanf(line, "%31[^|]|%ld|%ld", s[n].coll, &s[n].seq, &s[n].idx) == 3)
            n++;
    return n;
}

static const scans *find_scans(const scans *s, size_t n, const char *coll)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(s[i].coll, coll) == 0)
            return &s[i];
    return NULL;
}

/* ---- the collections, filled ------------------------------------------ */

static store *st;
static char err[PX_ERRLEN];

#define OK(call) ck_assert_msg((call) == PX_OK, #call ": %s", err)

static void fill_inbox(int64_t now)
{
    static char ids[N_DOCS][16], users[N_USERS][16];
    static store_event ev[N_DOCS];
    static int inserted[N_DOCS];

    for (int u = 0; u < N_USERS; u++)
        snprintf(users[u], sizeof(users[u]), "u%d", u);
    for (int i = 0; i < N_DOCS; i++) {
        snprintf(ids[i], sizeof(ids[i]), "m%d", i);
        ev[i] = (store_event){ .user = users[i % N_USERS], .id = ids[i], .seq = i, .ts_ms = now,
                               .kind = STORE_MESSAGE, .sender = "s1", .json = "{}",
                               .json_len = 2 };
    }
    OK(store_inbox_put(st, ev, N_DOCS, inserted, err, sizeof(err)));
}

static void fill_seen_and_tracking(int64_t now)
{
    static char keys[N_DOCS][16], readers[N_DOCS][16], msgs[N_DOCS][16];
    static const char *kp[N_DOCS], *tags[N_DOCS];
    static store_track t[N_DOCS];
    static int fresh[N_DOCS];

    for (int i = 0; i < N_DOCS; i++) {
        snprintf(keys[i], sizeof(keys[i]), "k%d", i);
        snprintf(readers[i], sizeof(readers[i]), "r%d", i % N_USERS);
        snprintf(msgs[i], sizeof(msgs[i]), "m%d", i);
        kp[i] = keys[i];
        tags[i] = "t";
        t[i] = (store_track){ .reader = readers[i], .msg_id = msgs[i], .sender = "s1",
                              .ts_ms = now };
    }
    OK(store_seen_claim(st, kp, tags, N_DOCS, now, fresh, err, sizeof(err)));
    OK(store_track_put(st, t, N_DOCS, err, sizeof(err)));
}

/* Presence, groups and media through the driver: their store calls write
 * one document per round trip (or look each up first), which would make
 * the fill the slowest part of the test. The documents have the shapes
 * store_mongo.c writes. */
static void insert_raw(mongoc_database_t *db, const char *coll_name,
                       void (*make)(bson_t *doc, int i, int64_t now), int64_t now)
{
    mongoc_collection_t *coll = mongoc_database_get_collection(db, coll_name);
    mongoc_bulk_operation_t *bulk = mongoc_collection_create_bulk_operation_with_opts(coll, NULL);
    bson_error_t error;
    bson_t doc;

    for (int i = 0; i < N_DOCS; i++) {
        bson_init(&doc);
        make(&doc, i, now);
        ck_assert(mongoc_bulk_operation_insert_with_opts(bulk, &doc, NULL, &error));
        bson_destroy(&doc);
    }
    ck_assert_msg(mongoc_bulk_operation_execute(bulk, NULL, &error) != 0, "%s: %s", coll_name,
                  error.message);
    mongoc_bulk_operation_destroy(bulk);
    mongoc_collection_destroy(coll);
}

static void presence_doc(bson_t *doc, int i, int64_t now)
{
    char user[16], gw[16];

    (void)now;
    snprintf(user, sizeof(user), "p%d", i);
    snprintf(gw, sizeof(gw), "gw%d", i % 4);
    char id[48];

    snprintf(id, sizeof(id), "%s/1/%d", gw, i);
    BCON_APPEND(doc, "_id", BCON_UTF8(id), "user", BCON_UTF8(user), "gateway", BCON_UTF8(gw),
                "epoch", BCON_INT64(1), "conn", BCON_INT64(i));
}

static void group_doc(bson_t *doc, int i, int64_t now)
{
    char id[16];

    snprintf(id, sizeof(id), "g_%d", i);
    BCON_APPEND(doc, "_id", BCON_UTF8(id), "name", BCON_UTF8("n"), "creator", BCON_UTF8("u1"),
                "members", "[", BCON_UTF8("u1"), BCON_UTF8("u2"), "]",
                "admins", "[", BCON_UTF8("u1"), "]", "applied", BCON_INT64(0),
                "ts", BCON_DATE_TIME(now));
}

static void media_doc(bson_t *doc, int i, int64_t now)
{
    char id[16], sha[65], up[16];

    snprintf(id, sizeof(id), "md%d", i);
    snprintf(sha, sizeof(sha), "%064d", i);
    snprintf(up, sizeof(up), "up%d", i);
    BCON_APPEND(doc, "_id", BCON_UTF8(id), "sha256", BCON_UTF8(sha),
                "content_type", BCON_UTF8("image/png"), "upload", BCON_UTF8(up),
                "size", BCON_INT64(10), "ts", BCON_DATE_TIME(now));
}

/* Contact pairs "p<i>/p<i+1>" and last-seen records of p<i>. */
static void contact_doc(bson_t *doc, int i, int64_t now)
{
    char a[16], b[16], id[40];

    (void)now;
    snprintf(a, sizeof(a), "p%d", i);
    snprintf(b, sizeof(b), "p%d", i + 1);
    /* The store's pair id: the lower id first. */
    snprintf(id, sizeof(id), "%s/%s", strcmp(a, b) < 0 ? a : b, strcmp(a, b) < 0 ? b : a);
    BCON_APPEND(doc, "_id", BCON_UTF8(id));
}

static void user_doc(bson_t *doc, int i, int64_t now)
{
    char id[16];

    snprintf(id, sizeof(id), "p%d", i);
    BCON_APPEND(doc, "_id", BCON_UTF8(id), "last_seen", BCON_INT64(now), "hide",
                BCON_BOOL(false));
}

static void fill_raw(int64_t now)
{
    mongoc_client_t *c = mongoc_client_new(test_uri);
    mongoc_database_t *db = mongoc_client_get_database(c, test_db);

    insert_raw(db, "connections", presence_doc, now);
    insert_raw(db, "contacts", contact_doc, now);
    insert_raw(db, "presence_users", user_doc, now);
    insert_raw(db, "groups", group_doc, now);
    insert_raw(db, "media", media_doc, now);
    mongoc_database_destroy(db);
    mongoc_client_destroy(c);
}

/* media_access through the store: one grant of md0 to every user. */
static void fill_media_access(int64_t now)
{
    static char users[N_DOCS][16];
    static const char *up[N_DOCS];

    for (int i = 0; i < N_DOCS; i++) {
        snprintf(users[i], sizeof(users[i]), "a%d", i);
        up[i] = users[i];
    }
    OK(store_media_grant(st, "md0", up, N_DOCS, now, err, sizeof(err)));
}

/* ---- the burst ---------------------------------------------------------- */

/* One kind of store call: how often it ran, for how long, on which
 * collection. */
typedef struct kind {
    const char *name, *coll;
    int calls;
    int64_t us;
} kind;

static int count_event(void *arg, const store_event *ev)
{
    (void)ev;
    (*(int *)arg)++;
    return PX_OK;
}

static int count_track(void *arg, const store_track *t)
{
    (void)t;
    (*(int *)arg)++;
    return PX_OK;
}

static int count_group(void *arg, const store_group *g)
{
    (void)g;
    (*(int *)arg)++;
    return PX_OK;
}

static int64_t mono_us(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

#define TIMED(k, call)                                                                      \
    do {                                                                                    \
        int64_t t0_ = mono_us();                                                         \
        OK(call);                                                                           \
        (k)->us += mono_us() - t0_;                                                      \
        (k)->calls++;                                                                       \
    } while (0)

enum { K_SCAN, K_GET, K_DEL, K_COUNT, K_SEEN, K_TGET, K_TDEL, K_LOOKUP, K_APPLY, K_GROUP,
       K_GROUPS, K_MGET, K_MACCESS, K_MDUP, K_ISWEEP, K_SSWEEP, K_TSWEEP, K_CONTACTS, K_STATE, K_N };

static kind kinds[K_N] = {
    [K_SCAN] = { "inbox scan", "inbox", 0, 0 },
    [K_GET] = { "inbox get (ack)", "inbox", 0, 0 },
    [K_DEL] = { "inbox delete (ack)", "inbox", 0, 0 },
    [K_COUNT] = { "inbox count", "inbox", 0, 0 },
    [K_SEEN] = { "seen claim (resend)", "seen", 0, 0 },
    [K_TGET] = { "track get", "tracking", 0, 0 },
    [K_TDEL] = { "track delete", "tracking", 0, 0 },
    [K_LOOKUP] = { "presence lookup", "connections", 0, 0 },
    [K_APPLY] = { "presence apply", "connections", 0, 0 },
    [K_GROUP] = { "group get (1)", "groups", 0, 0 },
    [K_GROUPS] = { "group get (5)", "groups", 0, 0 },
    [K_MGET] = { "media get", "media", 0, 0 },
    [K_MACCESS] = { "media access", "media_access", 0, 0 },
    [K_MDUP] = { "media commit (dup)", "media", 0, 0 },
    [K_ISWEEP] = { "inbox sweep", "inbox", 0, 0 },
    [K_SSWEEP] = { "seen sweep", "seen", 0, 0 },
    [K_TSWEEP] = { "track sweep", "tracking", 0, 0 },
    [K_CONTACTS] = { "contacts check (5)", "contacts", 0, 0 },
    [K_STATE] = { "presence state (5)", "presence_users", 0, 0 },
};

static void burst_inbox(void)
{
    char user[16], ids[2][16];
    int seen = 0;

    for (int i = 0; i < N_CALLS; i++) {
        snprintf(user, sizeof(user), "u%d", i);
        TIMED(&kinds[K_SCAN], store_inbox_scan(st, user, NULL, 1000, 10, count_event, &seen, err,
                                               sizeof(err)));
        int64_t c = 0;
        TIMED(&kinds[K_COUNT], store_inbox_count(st, user, &c, err, sizeof(err)));
        ck_assert_int_eq(c, N_DOCS / N_USERS);
        /* An ack of two of the user's events: the read half, then the delete. */
        snprintf(ids[0], sizeof(ids[0]), "m%d", i);
        snprintf(ids[1], sizeof(ids[1]), "m%d", i + N_USERS);
        store_key keys[2] = { { user, ids[0] }, { user, ids[1] } };
        int got = 0;
        int64_t removed = 0;
        TIMED(&kinds[K_GET], store_inbox_get(st, keys, 2, count_event, &got, err, sizeof(err)));
        ck_assert_int_eq(got, 2);
        TIMED(&kinds[K_DEL], store_inbox_delete(st, keys, 2, &removed, err, sizeof(err)));
        ck_assert_int_eq(removed, 2);
    }
    ck_assert_int_eq(seen, N_CALLS * 10);
}

static void burst_seen_and_tracking(int64_t now)
{
    char key[16], reader[16], msg[16];

    for (int i = 0; i < N_CALLS; i++) {
        const char *kp = key, *tag = "t2";
        int fresh = 1, got = 0;
        int64_t removed = 0;
        snprintf(key, sizeof(key), "k%d", i);
        TIMED(&kinds[K_SEEN], store_seen_claim(st, &kp, &tag, 1, now, &fresh, err, sizeof(err)));
        ck_assert_int_eq(fresh, 0);
        snprintf(reader, sizeof(reader), "r%d", i % N_USERS);
        snprintf(msg, sizeof(msg), "m%d", i);
        store_track t[2] = { { .reader = reader, .msg_id = msg },
                             { .reader = "r0", .msg_id = "absent" } };
        TIMED(&kinds[K_TGET], store_track_get(st, t, 2, count_track, &got, err, sizeof(err)));
        ck_assert_int_eq(got, 1);
        TIMED(&kinds[K_TDEL], store_track_delete(st, t, 2, &removed, err, sizeof(err)));
        ck_assert_int_eq(removed, 1);
    }
}

/* The retention sweeps every message-store and receipt replica runs each
 * minute: with nothing old, they must cost index probes, not a read of
 * every record (a plain `ts < cutoff` did: FerretDB pushes no range down). */
static void burst_sweeps(int64_t now)
{
    int64_t cutoff = now - 30 * 86400000LL, removed = -1;

    TIMED(&kinds[K_ISWEEP], store_inbox_sweep(st, cutoff, &removed, err, sizeof(err)));
    ck_assert_int_eq(removed, 0);
    TIMED(&kinds[K_SSWEEP], store_seen_sweep(st, cutoff, &removed, err, sizeof(err)));
    ck_assert_int_eq(removed, 0);
    TIMED(&kinds[K_TSWEEP], store_track_sweep(st, cutoff, &removed, err, sizeof(err)));
    ck_assert_int_eq(removed, 0);
}

static void burst_presence(void)
{
    char user[16], gw[16];
    char gws[4][65];
    size_t n = 0;

    for (int i = 0; i < N_CALLS; i++) {
        snprintf(user, sizeof(user), "p%d", i);
        snprintf(gw, sizeof(gw), "gw%d", i % 4);
        TIMED(&kinds[K_LOOKUP], store_presence_lookup(st, user, 0, gws, 4, &n, err, sizeof(err)));
        ck_assert_int_eq(n, 1);
        /* A connection other than the filled one (conn i), opened and closed. */
        store_presence ops[2] = {
            { .user = user, .gateway = gw, .epoch = 1, .delta = +1, .conn = 1u << 20 },
            { .user = user, .gateway = gw, .epoch = 1, .delta = -1, .conn = 1u << 20 },
        };
        TIMED(&kinds[K_APPLY], store_presence_apply(st, ops, 2, err, sizeof(err)));
    }
    /* A watcher's subscription: which of five users are contacts of
     * p<i+1> (p<i> and p<i+2> are, p<i+1> is itself, the others not),
     * then their state. */
    for (int i = 0; i < N_CALLS; i++) {
        char others[5][16];
        const char *op[5];
        int is_contact[5];
        store_user_presence state[5];
        snprintf(user, sizeof(user), "p%d", i + 1);
        for (int j = 0; j < 5; j++) {
            snprintf(others[j], sizeof(others[j]), "p%d", i + j);
            op[j] = others[j];
        }
        TIMED(&kinds[K_CONTACTS],
              store_contacts_check(st, user, op, 5, is_contact, err, sizeof(err)));
        ck_assert(is_contact[0] && is_contact[1] && is_contact[2] && !is_contact[3] &&
                  !is_contact[4]);
        TIMED(&kinds[K_STATE], store_presence_state(st, op, 5, state, err, sizeof(err)));
        ck_assert(state[0].online && state[0].last_seen > 0);
    }
}

static void burst_groups_and_media(int64_t now)
{
    char ids[5][16], user[16];
    const char *ip[5];
    store_media m;

    for (int i = 0; i < N_CALLS; i++) {
        int got = 0;
        for (int j = 0; j < 5; j++) {
            snprintf(ids[j], sizeof(ids[j]), "g_%d", i * 5 + j);
            ip[j] = ids[j];
        }
        TIMED(&kinds[K_GROUP], store_group_get(st, ip, 1, count_group, &got, err, sizeof(err)));
        TIMED(&kinds[K_GROUPS], store_group_get(st, ip, 5, count_group, &got, err, sizeof(err)));
        ck_assert_int_eq(got, 6);

        snprintf(ids[0], sizeof(ids[0]), "md%d", i);
        TIMED(&kinds[K_MGET], store_media_get(st, ids[0], &m, err, sizeof(err)));
        snprintf(user, sizeof(user), "a%d", i);
        TIMED(&kinds[K_MACCESS], store_media_access(st, "md0", user, err, sizeof(err)));
        /* Bytes equal to md<i>'s uploaded again: the commit makes an alias
         * of md<i>, under its own id. */
        store_media dup = { .size = 10, .ts_ms = now };
        int created = 1;
        snprintf(dup.id, sizeof(dup.id), "mx%d", i);
        snprintf(dup.sha256, sizeof(dup.sha256), "%064d", i);
        snprintf(dup.upload, sizeof(dup.upload), "ux%d", i);
        snprintf(dup.content_type, sizeof(dup.content_type), "image/png");
        TIMED(&kinds[K_MDUP], store_media_commit(st, &dup, user, &created, err, sizeof(err)));
        ck_assert_int_eq(created, 0);
        ck_assert_str_ne(dup.id, ids[0]);
    }
}

/* ---- the test ----------------------------------------------------------- */

static int scans_equal(const scans *a, size_t na, const scans *b, size_t nb)
{
    if (na != nb)
        return 0;
    for (size_t i = 0; i < na; i++)
        if (strcmp(a[i].coll, b[i].coll) != 0 || a[i].seq != b[i].seq || a[i].idx != b[i].idx)
            return 0;
    return 1;
}

/* The counters once the fill's own scans are all published: a PostgreSQL
 * backend publishes its counters at most once a second while busy, and
 * once it idles only after PGSTAT_IDLE_INTERVAL (10 s), so a snapshot
 * taken soon after the fill missed some of FerretDB's pooled backends'
 * scans, which then counted as the burst's ("groups: 2" in about half of
 * the fresh-clone runs, quiet box or not). Settled = unchanged for longer
 * than that interval. */
static size_t scans_settled(scans *s, size_t max)
{
    scans prev[32];

    ck_assert(max <= 32);
    size_t n = read_scans(s, max), np = 0;
    int64_t deadline = px_mono_ms() + SETTLE_WAIT_MS;
    int same = 0;

    while (same < SETTLED_READS && px_mono_ms() < deadline) {
        memcpy(prev, s, n * sizeof(*s));
        np = n;
        usleep(500 * 1000);
        n = read_scans(s, max);
        same = scans_equal(prev, np, s, n) ? same + 1 : 0;
    }
    ck_assert_msg(same >= SETTLED_READS, "PostgreSQL's scan counters did not settle within "
                  "%d ms", SETTLE_WAIT_MS);
    return n;
}

/* Waits until every collection the burst used shows at least one scan per
 * call made on it, then returns the counters. */
static size_t scans_after(const scans *before, size_t nb, scans *after, size_t max)
{
    int64_t deadline = px_mono_ms() + STATS_WAIT_MS;
    size_t na;
    int short_of;

    do {
        na = read_scans(after, max);
        short_of = 0;
        for (int k = 0; k < K_N; k++) {
            const scans *b = find_scans(before, nb, kinds[k].coll);
            const scans *a = find_scans(after, na, kinds[k].coll);
            long need = 0;
            for (int j = 0; j < K_N; j++)
                need += strcmp(kinds[j].coll, kinds[k].coll) == 0 ? kinds[j].calls : 0;
            if (b == NULL || a == NULL || (a->seq - b->seq) + (a->idx - b->idx) < need)
                short_of = 1;
        }
        if (short_of)
            usleep(200 * 1000);
    } while (short_of && px_mono_ms() < deadline);
    ck_assert_msg(!short_of, "PostgreSQL's scan counters did not reach one scan per call "
                  "within %d ms", STATS_WAIT_MS);
    return na;
}

START_TEST(hot_paths_use_indexes)
{
    scans before[32], after[32];
    char sql[256], out[256];
    int64_t now = px_now_ms();

    st = store_open(test_uri, test_db, err, sizeof(err));
    ck_assert_msg(st != NULL, "store_open: %s", err);
    fill_inbox(now);
    fill_seen_and_tracking(now);
    fill_raw(now);
    fill_media_access(now);
    /* The planner's view of tables that have been running a while
     * (autovacuum's analyze), not of ones that were just filled. */
    snprintf(sql, sizeof(sql),
             "DO $$ DECLARE t text; BEGIN FOR t IN SELECT format('%%I.%%I', schemaname, relname) "
             "FROM pg_stat_user_tables WHERE schemaname = '%s' LOOP EXECUTE 'ANALYZE ' || t; "
             "END LOOP; END $$", test_db);
    ck_assert_msg(pg_run(sql, out, sizeof(out)) == 0, "analyze: %s", out);

    size_t nb = scans_settled(before, 32);
    burst_inbox();
    burst_seen_and_tracking(now);
    burst_presence();
    burst_groups_and_media(now);
    burst_sweeps(now);
    size_t na = scans_after(before, nb, after, 32);

    char seq_report[512] = "";
    size_t len = 0;
    for (size_t i = 0; i < na; i++) {
        const scans *b = find_scans(before, nb, after[i].coll);
        long seq = after[i].seq - (b != NULL ? b->seq : 0);
        if (seq > 0)
            len += (size_t)snprintf(seq_report + len, sizeof(seq_report) - len, " %s: %ld,",
                                    after[i].coll, seq);
    }
    printf("report: store calls on %d-document collections, mean ms per call:", N_DOCS);
    for (int k = 0; k < K_N; k++)
        printf("%s %s %.2f", k ? "," : "", kinds[k].name, (double)kinds[k].us / kinds[k].calls / 1000.0);
    printf("\n");
    fflush(stdout);
    for (int k = 0; k < K_N; k++) {
        const scans *b = find_scans(before, nb, kinds[k].coll);
        const scans *a = find_scans(after, na, kinds[k].coll);
        ck_assert_msg(a->seq == b->seq, "sequential scans during the burst (collection: "
                      "count):%s; is deploy/local/ferretdb-pg.sql applied, and does every "
                      "hot-path query keep an equality on an indexed field?", seq_report);
    }
    store_close(st);
}
END_TEST

/* ---- setup -------------------------------------------------------------- */

/* "ferretdbVersion" in buildInfo: the server is FerretDB. */
static int server_is_ferretdb(mongoc_client_t *c)
{
    bson_t *cmd = BCON_NEW("buildInfo", BCON_INT32(1));
    bson_t reply;
    bson_error_t error;
    int yes = mongoc_client_command_simple(c, "admin", cmd, NULL, &reply, &error) &&
              bson_has_field(&reply, "ferretdbVersion");

    bson_destroy(&reply);
    bson_destroy(cmd);
    return yes;
}

static int mongo_port(void)
{
    mongoc_uri_t *uri = mongoc_uri_new(test_uri);
    int port = 27018;

    if (uri != NULL && mongoc_uri_get_hosts(uri) != NULL)
        port = mongoc_uri_get_hosts(uri)->port;
    mongoc_uri_destroy(uri);
    return port;
}

int main(void)
{
    mongoc_client_t *c;
    bson_error_t error;
    const char *env;
    int ferret, failed;
    char out[256];

    test_uri = getenv("PARLEY_MONGO_URI");
    if (test_uri == NULL || *test_uri == '\0')
        test_uri = DEFAULT_URI;
    env = getenv("PARLEY_PG_PORT");
    pg_port = env != NULL && *env != '\0' ? atoi(env) : mongo_port() - 1000;
    snprintf(test_db, sizeof(test_db), "parley_index_%ld_%lld", (long)getpid(),
             (long long)px_now_ms());

    mongoc_init();
    mongoc_log_set_handler(NULL, NULL);
    c = mongoc_client_new(test_uri);
    ferret = c != NULL && server_is_ferretdb(c);
    if (c != NULL)
        mongoc_client_destroy(c);
    if (!ferret) {
        printf("report: skipped: the server at %s is not FerretDB\n", test_uri);
        return EXIT_SUCCESS;
    }
    if (pg_run("SELECT 1", out, sizeof(out)) != 0) {
        env = getenv("PARLEY_FERRETDB_BACKEND");
        if (env != NULL && strcmp(env, "sqlite") == 0) {
            printf("report: skipped: FerretDB over SQLite\n");
            return EXIT_SUCCESS;
        }
        fprintf(stderr, "test_store_mongo_index: no PostgreSQL under FerretDB at port %d "
                "(PARLEY_PG_PORT): %s\n", pg_port, out);
        return EXIT_FAILURE;
    }

    Suite *s = suite_create("store_mongo_index");
    TCase *tc = tcase_create("plans");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, hot_paths_use_indexes);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);

    c = mongoc_client_new(test_uri);
    mongoc_database_t *db = mongoc_client_get_database(c, test_db);
    if (!mongoc_database_drop(db, &error))
        fprintf(stderr, "drop %s: %s\n", test_db, error.message);
    mongoc_database_destroy(db);
    mongoc_client_destroy(c);
    mongoc_cleanup();
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
