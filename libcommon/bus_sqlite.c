/* The in-process bus of parleyd (bus.h): a durable log with Kafka's
 * semantics. Every bus_new of the process shares one hub: the record log
 * (buslog.c, PARLEY_DATA_DIR/bus-log/), one SQLite connection for the
 * topics' partition counts and the groups' committed offsets
 * (PARLEY_DATA_DIR/bus.db, WAL), the topics and their partitions, a bounded
 * produce queue and a writer thread.
 *
 * Produce assigns the offset at once (per-partition order is produce order)
 * and queues the record; the writer appends everything queued to the log in
 * one write (group commit: producers that arrive while a write runs join
 * the next one) and only after it posts their delivery reports, so a
 * report of PX_OK means the record survives kill -9 (the page cache holds
 * it; only an OS crash or power loss can take the last writes, as with
 * Kafka's page cache and with SQLite's WAL at synchronous=NORMAL).
 *
 * A record made durable also stays in memory, in its partition's ring, for
 * the groups subscribed to that topic: a consumer that is caught up takes
 * it from there (a reference, no copy, no read back); one that is behind
 * the ring (after a restart, or when the rings outgrew BUS_MEM_BYTES) reads
 * the log. The ring keeps a record until every subscribed group's position
 * is past it. Their group's committed offsets (bus_commit) are written by
 * the writer too, in a SQLite transaction of the same turn, and a restarted
 * consumer resumes from them: a crash means redelivery, never loss. Once a
 * second the writer reads the least committed offset of each partition and
 * the log deletes the segments holding only records below them.
 *
 * A partition's next offset after a restart is past what the log holds and
 * past every group's committed offset; a clean stop also saves it.
 *
 * Volatile topics (bus_sqlite.h: parleyd's deliveries to its own gateway,
 * which die with the process anyway) skip the log: a record is in its ring
 * and reported at once, and consumers' commits are not written. A
 * transient record (bus_produce_transient: parleyd's plain acks) goes
 * through the writer like any other but is not logged: a reader behind
 * the ring finds a gap there.
 *
 * A group has one member in one process (parleyd runs one instance of each
 * service): a second member is refused with a clear error. */
#include "bus.h"
#include "bus_sqlite.h"
#include "buslog.h"
#include "common.h"
#include "config.h"
#include "log.h"
#include "sqldb.h"

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#define BUS_MAX_TOPICS 64
#define BUS_MAX_PARTS 1024
#define BUS_MAX_GROUPS 64
#define BUS_MAX_DIRTY 2048
#define BUS_MAX_GROUP_NAME 160
#define BUS_QUEUE_RECORDS 65536        /* produce queue ceiling: PX_AGAIN past it */
#define BUS_QUEUE_BYTES (64 << 20)     /* also the ceiling of unconsumed volatile records */
#define BUS_MEM_BYTES (32 << 20)       /* durable records kept in rings for consumers */
#define BUS_WRITE_BATCH 4096           /* records per transaction */
#define BUS_RETAIN_MS 1000             /* how often the committed offsets are read again */
#define BUS_SEGMENT_BYTES (64 << 20)   /* PARLEY_BUS_SEGMENT_BYTES: the log's segments */

typedef struct bus_hub bus_hub;
typedef struct bus_rec bus_rec;

/* The records of one partition held in memory: offsets [lo, lo + n), the
 * oldest at slot[head]; cap is 0 or a power of two. */
typedef struct bus_ring {
    int64_t lo;
    size_t n, cap, head, bytes;
    bus_rec **slot;
} bus_ring;

/* A group reading a topic: its position in partition p is b->pos[base + p]. */
typedef struct bus_sub {
    bus *b;
    size_t base;
} bus_sub;

typedef struct bus_topic {
    char *name;
    int nparts;
    int vol;             /* volatile: no log, records only in the rings */
    int touched;         /* bus_post: has new records, its readers are woken */
    int64_t *next;       /* next offset to assign, per partition */
    int64_t *durable;    /* offsets below this are visible to consumers */
    bus_ring *ring;      /* per partition */
    int64_t *keep;       /* writer only: every group committed past this (retention) */
    int logid;           /* dbmu: its id in the log, -1 until it has one */
    int persisted;       /* dbmu: its bus_parts rows are written */
    bus_sub subs[BUS_MAX_GROUPS];
    size_t nsubs;
} bus_topic;

/* A record from bus_produce to its last user. refs (under mu) counts the
 * delivery report not yet served, the ring holding it and every consumer
 * holding it (bus_msg.impl); records read back from the log have only the
 * consumer's. */
struct bus_rec {
    bus_rec *next;       /* the produce queue, then the producer's reports */
    bus *b;
    bus_topic *t;
    int32_t part;
    int64_t off;
    int64_t ts_ms;
    void *opaque;
    int status;
    int refs;
    int transient;       /* bus_produce_transient: ordered, never logged */
    size_t key_len, len;
    char data[];         /* key, NUL, value, NUL */
};

/* A committed offset not yet written; a copy of the group's name, so a
 * member may go while the writer still holds its last commits. */
typedef struct bus_dirty {
    char group[BUS_MAX_GROUP_NAME];
    bus_topic *t;
    int32_t part;
    int64_t off;
} bus_dirty;

/* A consumer's position in one partition (written under mu: the rings'
 * trimming reads every group's). */
typedef struct bus_pos {
    bus_topic *t;
    int32_t part;
    int64_t pos;
} bus_pos;

struct bus {
    bus_hub *h;
    char *group;
    bus_dr_cb dr_cb;
    int partitions;
    int efd;
    int fd_used;              /* bus_consume_fd was called: keep efd current */
    pthread_cond_t cv;        /* (h->mu) its reports, its topics' records, wake-ups */
    int woken;
    size_t inflight;          /* produced, report not yet served */
    bus_rec *dr_head, *dr_tail;
    bus_pos *pos;
    size_t npos, next_pos;    /* next_pos: round-robin start of bus_consume */
    char err[PX_ERRLEN];      /* a delivery failure's reason, for the report */
};

struct bus_hub {
    pthread_mutex_t mu;       /* in-memory state below */
    pthread_mutex_t dbmu;     /* db; never taken while holding mu */
    pthread_cond_t cv_work;   /* writer: records or commits to write */
    pthread_cond_t cv_done;   /* each post (written) */
    sqldb d;                  /* under dbmu: partition counts, committed offsets */
    buslog *log;              /* under dbmu: the records */
    int refs;
    int stop;
    pthread_t writer;
    bus_topic topics[BUS_MAX_TOPICS];
    size_t ntopics;
    bus *groups[BUS_MAX_GROUPS];
    size_t ngroups;
    bus_rec *q_head, *q_tail;
    size_t q_records, q_bytes;
    size_t mem_bytes;         /* durable records in rings */
    size_t vol_bytes;         /* volatile records in rings */
    bus_dirty dirty[BUS_MAX_DIRTY];
    size_t ndirty;
    uint64_t written;         /* posts done: writer transactions, volatile records */
};

static pthread_mutex_t bus_hub_mu = PTHREAD_MUTEX_INITIALIZER;
static bus_hub *bus_the_hub;
static char bus_vol_prefix[128]; /* under bus_hub_mu until the hub opens */

static int bus_sql_err(sqlite3 *db, const char *what, char *err, size_t errlen)
{
    return px_err(err, errlen, "sqlite bus %s: %s", what, sqlite3_errmsg(db));
}

static int bus_exec(sqlite3 *db, const char *sql, char *err, size_t errlen)
{
    char *msg = NULL;
    if (sqlite3_exec(db, sql, NULL, NULL, &msg) == SQLITE_OK)
        return PX_OK;
    px_err(err, errlen, "sqlite bus: %s: %s", sql, msg ? msg : "?");
    sqlite3_free(msg);
    return PX_ERROR;
}

/* Kafka's default partitioner (murmur2, positive, modulo), so a key lands
 * in the same partition number in both modes. */
static uint32_t bus_murmur2(const unsigned char *d, size_t len)
{
    const uint32_t m = 0x5bd1e995, seed = 0x9747b28c;
    uint32_t h = seed ^ (uint32_t)len;
    size_t i = 0;
    for (; i + 4 <= len; i += 4) {
        uint32_t k = (uint32_t)d[i] | (uint32_t)d[i + 1] << 8 | (uint32_t)d[i + 2] << 16 |
                     (uint32_t)d[i + 3] << 24;
        k *= m;
        k ^= k >> 24;
        k *= m;
        h *= m;
        h ^= k;
    }
    switch (len - i) {
    case 3: h ^= (uint32_t)d[i + 2] << 16; /* fall through */
    case 2: h ^= (uint32_t)d[i + 1] << 8;  /* fall through */
    case 1: h ^= d[i]; h *= m;
    }
    h ^= h >> 13;
    h *= m;
    h ^= h >> 15;
    return h;
}

static int32_t bus_partition(const char *key, size_t key_len, int nparts)
{
    if (key == NULL || key_len == 0)
        return 0;
    return (int32_t)((bus_murmur2((const unsigned char *)key, key_len) & 0x7fffffff) %
                     (uint32_t)nparts);
}

/* ---- records and rings (mu held) ---- */

static bus_rec *bus_rec_new(const char *key, size_t key_len, const void *value, size_t len)
{
    bus_rec *r = px_malloc(sizeof(*r) + key_len + len + 2);
    if (key_len > 0)
        memcpy(r->data, key, key_len);
    r->data[key_len] = '\0';
    if (len > 0)
        memcpy(r->data + key_len + 1, value, len);
    r->data[key_len + 1 + len] = '\0';
    r->next = NULL;
    r->b = NULL;
    r->opaque = NULL;
    r->status = PX_OK;
    r->refs = 1;
    r->key_len = key_len;
    r->len = len;
    return r;
}

static void bus_rec_unref(bus_rec *r)
{
    if (--r->refs == 0)
        free(r);
}

static size_t bus_rec_size(const bus_rec *r)
{
    return sizeof(*r) + r->key_len + r->len;
}

static size_t *bus_ring_account(bus_hub *h, const bus_topic *t)
{
    return t->vol ? &h->vol_bytes : &h->mem_bytes;
}

static void bus_ring_pop(bus_hub *h, bus_topic *t, bus_ring *rg)
{
    bus_rec *r = rg->slot[rg->head];
    rg->head = (rg->head + 1) & (rg->cap - 1);
    rg->n--;
    rg->lo++;
    rg->bytes -= bus_rec_size(r);
    *bus_ring_account(h, t) -= bus_rec_size(r);
    bus_rec_unref(r);
}

static void bus_ring_clear(bus_hub *h, bus_topic *t, bus_ring *rg)
{
    while (rg->n > 0)
        bus_ring_pop(h, t, rg);
}

/* Durable records beyond the budget: the largest ring goes (its
 * consumers, being behind, read the log). */
static void bus_ring_budget(bus_hub *h)
{
    while (h->mem_bytes > BUS_MEM_BYTES) {
        bus_topic *bt = NULL;
        bus_ring *big = NULL;
        for (size_t i = 0; i < h->ntopics; i++)
            for (int p = 0; p < h->topics[i].nparts && !h->topics[i].vol; p++)
                if (big == NULL || h->topics[i].ring[p].bytes > big->bytes) {
                    bt = &h->topics[i];
                    big = &bt->ring[p];
                }
        bus_ring_clear(h, bt, big);
    }
}

/* Appends r (the next offset of its partition, else the ring starts over
 * at r) and takes a reference. */
static void bus_ring_push(bus_hub *h, bus_rec *r)
{
    bus_topic *t = r->t;
    bus_ring *rg = &t->ring[r->part];
    if (rg->n > 0 && r->off != rg->lo + (int64_t)rg->n)
        bus_ring_clear(h, t, rg);
    if (rg->n == 0)
        rg->lo = r->off;
    if (rg->n == rg->cap) {
        size_t cap = rg->cap ? rg->cap * 2 : 16;
        bus_rec **slot = px_malloc(cap * sizeof(*slot));
        for (size_t i = 0; i < rg->n; i++)
            slot[i] = rg->slot[(rg->head + i) & (rg->cap - 1)];
        free(rg->slot);
        rg->slot = slot;
        rg->cap = cap;
        rg->head = 0;
    }
    rg->slot[(rg->head + rg->n) & (rg->cap - 1)] = r;
    rg->n++;
    r->refs++;
    rg->bytes += bus_rec_size(r);
    *bus_ring_account(h, t) += bus_rec_size(r);
    if (!t->vol)
        bus_ring_budget(h);
}

/* Drops what every subscribed group has read (everything if none is). */
static void bus_ring_trim(bus_hub *h, bus_topic *t, int32_t part)
{
    bus_ring *rg = &t->ring[part];
    int64_t min = rg->lo + (int64_t)rg->n;
    for (size_t i = 0; i < t->nsubs; i++)
        min = PX_MIN(min, t->subs[i].b->pos[t->subs[i].base + (size_t)part].pos);
    while (rg->n > 0 && rg->lo < min)
        bus_ring_pop(h, t, rg);
}

/* ---- topics (mu held) ---- */

static bus_topic *bus_topic_find(bus_hub *h, const char *name)
{
    for (size_t i = 0; i < h->ntopics; i++)
        if (strcmp(h->topics[i].name, name) == 0)
            return &h->topics[i];
    return NULL;
}

static int bus_is_volatile(const char *name)
{
    size_t n = strlen(bus_vol_prefix);
    return n > 0 && strncmp(name, bus_vol_prefix, n) == 0;
}

static bus_topic *bus_topic_add(bus_hub *h, const char *name, int nparts)
{
    if (h->ntopics == BUS_MAX_TOPICS || nparts < 1 || nparts > BUS_MAX_PARTS)
        return NULL;
    bus_topic *t = &h->topics[h->ntopics++];
    t->name = px_strdup(name);
    t->nparts = nparts;
    t->vol = bus_is_volatile(name);
    t->next = px_calloc((size_t)nparts, sizeof(*t->next));
    t->durable = px_calloc((size_t)nparts, sizeof(*t->durable));
    t->ring = px_calloc((size_t)nparts, sizeof(*t->ring));
    t->keep = px_calloc((size_t)nparts, sizeof(*t->keep));
    t->logid = -1;
    return t;
}

/* ---- opening the hub ---- */

/* bus_log held the records before they had a log of their own (buslog.c):
 * only read now, to move an older parleyd's records into the log. */
static const char bus_schema[] =
    "CREATE TABLE IF NOT EXISTS bus_parts (topic TEXT NOT NULL, part INTEGER NOT NULL,"
    " next INTEGER NOT NULL, PRIMARY KEY (topic, part)) WITHOUT ROWID;"
    "CREATE TABLE IF NOT EXISTS bus_log (topic TEXT NOT NULL, part INTEGER NOT NULL,"
    " off INTEGER NOT NULL, ts INTEGER NOT NULL, key BLOB, value BLOB,"
    " PRIMARY KEY (topic, part, off)) WITHOUT ROWID;"
    "CREATE TABLE IF NOT EXISTS bus_offsets (grp TEXT NOT NULL, topic TEXT NOT NULL,"
    " part INTEGER NOT NULL, off INTEGER NOT NULL, PRIMARY KEY (grp, topic, part))"
    " WITHOUT ROWID;";

/* What an older parleyd logged for topics now volatile is of no use to
 * this process (a lost delivery is served again by the sync). */
static int bus_hub_forget_volatile(bus_hub *h, char *err, size_t errlen)
{
    static const char *const sql[] = {
        "DELETE FROM bus_log WHERE substr(topic, 1, length(?1)) = ?1",
        "DELETE FROM bus_parts WHERE substr(topic, 1, length(?1)) = ?1",
        "DELETE FROM bus_offsets WHERE substr(topic, 1, length(?1)) = ?1",
    };
    if (bus_vol_prefix[0] == '\0')
        return PX_OK;
    if (sqldb_begin(&h->d, err, errlen) != PX_OK)
        return PX_ERROR;
    int rc = PX_OK;
    for (size_t i = 0; i < PX_ARRAY_LEN(sql) && rc == PX_OK; i++) {
        sqlite3_stmt *s = NULL;
        if (sqlite3_prepare_v2(h->d.db, sql[i], -1, &s, NULL) != SQLITE_OK) {
            rc = bus_sql_err(h->d.db, "forget volatile", err, errlen);
            break;
        }
        sqlite3_bind_text(s, 1, bus_vol_prefix, -1, SQLITE_STATIC);
        if (sqlite3_step(s) != SQLITE_DONE)
            rc = bus_sql_err(h->d.db, "forget volatile", err, errlen);
        sqlite3_finalize(s);
    }
    return sqldb_end(&h->d, rc, err, errlen);
}

/* dbmu held (or the hub not shared yet): t's id in the log. */
static int bus_logid(bus_hub *h, bus_topic *t)
{
    if (t->logid < 0)
        t->logid = buslog_topic(h->log, t->name);
    return t->logid;
}

/* Opening: a topic as the last process left it, or NULL when there are too
 * many. */
static bus_topic *bus_hub_topic(bus_hub *h, const char *name, int nparts)
{
    bus_topic *t = bus_topic_find(h, name);
    if (t == NULL && (t = bus_topic_add(h, name, BUS_MAX_PARTS)) != NULL)
        t->nparts = 0;
    if (t != NULL)
        t->nparts = PX_MAX(t->nparts, PX_MIN(nparts, BUS_MAX_PARTS));
    return t;
}

static void bus_hub_log_topic(void *arg, const char *name, int nparts)
{
    bus_hub *h = arg;
    bus_topic *t = bus_hub_topic(h, name, nparts);
    if (t != NULL && t->vol)
        buslog_forget(h->log, bus_logid(h, t));
}

/* Records an older parleyd kept in bus_log move to the log, then leave the
 * table. Moved twice (a crash between the two steps), a record replaces
 * itself in the log's index. */
static int bus_hub_move_rows(bus_hub *h, char *err, size_t errlen)
{
    sqlite3_stmt *s = sqldb_stmt(&h->d, "SELECT topic, part, off, ts, key, value FROM bus_log"
                                 " ORDER BY topic, part, off", err, errlen);
    if (s == NULL)
        return PX_ERROR;
    int rc = SQLITE_DONE, moved = 0, failed = 0;
    while (!failed && (rc = sqlite3_step(s)) == SQLITE_ROW) {
        int part = sqlite3_column_int(s, 1);
        bus_topic *t = bus_hub_topic(h, (const char *)sqlite3_column_text(s, 0), part + 1);
        buslog_rec r = { .topic = t != NULL ? bus_logid(h, t) : -1, .part = part,
                         .off = sqlite3_column_int64(s, 2), .ts_ms = sqlite3_column_int64(s, 3),
                         .key = sqlite3_column_blob(s, 4),
                         .key_len = (size_t)sqlite3_column_bytes(s, 4),
                         .value = sqlite3_column_blob(s, 5),
                         .len = (size_t)sqlite3_column_bytes(s, 5) };
        failed = buslog_append(h->log, &r, 1, err, errlen) != PX_OK;
        moved++;
    }
    sqldb_done(s);
    if (failed)
        return PX_ERROR;
    if (rc != SQLITE_DONE)
        return bus_sql_err(h->d.db, "move", err, errlen);
    if (moved == 0)
        return PX_OK;
    log_info("bus: records moved from bus.db to the log", "{s:i}", "records", moved);
    if (sqldb_begin(&h->d, err, errlen) != PX_OK)
        return PX_ERROR;
    return sqldb_end(&h->d, bus_exec(h->d.db, "DELETE FROM bus_log", err, errlen), err, errlen);
}

/* Each partition's next offset: past what bus_parts says (an older
 * parleyd wrote it), what the log holds, and what any group committed (the
 * transient records at a partition's end are in none of those but the
 * last). */
static int bus_hub_next(bus_hub *h, char *err, size_t errlen)
{
    sqlite3_stmt *s = sqldb_stmt(&h->d, "SELECT topic, part, MAX(off) FROM bus_offsets"
                                 " GROUP BY topic, part", err, errlen);
    if (s == NULL)
        return PX_ERROR;
    int rc;
    while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
        bus_topic *t = bus_topic_find(h, (const char *)sqlite3_column_text(s, 0));
        int part = sqlite3_column_int(s, 1);
        if (t != NULL && part >= 0 && part < t->nparts)
            t->next[part] = PX_MAX(t->next[part], sqlite3_column_int64(s, 2));
    }
    sqldb_done(s);
    if (rc != SQLITE_DONE)
        return bus_sql_err(h->d.db, "load offsets", err, errlen);
    for (size_t i = 0; i < h->ntopics; i++) {
        bus_topic *t = &h->topics[i];
        for (int p = 0; p < t->nparts; p++) {
            if (t->logid >= 0)
                t->next[p] = PX_MAX(t->next[p], buslog_end(h->log, t->logid, p));
            t->durable[p] = t->next[p];
        }
    }
    return PX_OK;
}

static int bus_hub_load(bus_hub *h, char *err, size_t errlen)
{
    sqlite3_stmt *s = NULL;
    if (bus_hub_forget_volatile(h, err, errlen) != PX_OK)
        return PX_ERROR;
    if ((s = sqldb_stmt(&h->d, "SELECT topic, part, next FROM bus_parts ORDER BY topic, part",
                        err, errlen)) == NULL)
        return PX_ERROR;
    int rc;
    while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
        int part = sqlite3_column_int(s, 1);
        bus_topic *t = part >= 0 && part < BUS_MAX_PARTS ?
            bus_hub_topic(h, (const char *)sqlite3_column_text(s, 0), part + 1) : NULL;
        if (t == NULL) {
            sqldb_done(s);
            return px_err(err, errlen, "sqlite bus: bad partition table");
        }
        t->next[part] = sqlite3_column_int64(s, 2);
        t->persisted = 1;
    }
    sqldb_done(s);
    if (rc != SQLITE_DONE)
        return bus_sql_err(h->d.db, "load", err, errlen);
    buslog_each_topic(h->log, bus_hub_log_topic, h);
    for (size_t i = 0; i < h->ntopics; i++)
        bus_logid(h, &h->topics[i]);
    if (bus_hub_move_rows(h, err, errlen) != PX_OK)
        return PX_ERROR;
    return bus_hub_next(h, err, errlen);
}

static void *bus_writer_main(void *arg);

static void bus_hub_free(bus_hub *h)
{
    for (size_t i = 0; i < h->ntopics; i++) {
        bus_topic *t = &h->topics[i];
        for (int p = 0; p < t->nparts; p++) {
            bus_ring_clear(h, t, &t->ring[p]);
            free(t->ring[p].slot);
        }
        free(t->name);
        free(t->next);
        free(t->durable);
        free(t->ring);
        free(t->keep);
    }
    sqldb_close(&h->d);
    buslog_close(h->log);
    pthread_mutex_destroy(&h->mu);
    pthread_mutex_destroy(&h->dbmu);
    pthread_cond_destroy(&h->cv_work);
    pthread_cond_destroy(&h->cv_done);
    free(h);
}

static const char *const bus_tables[] = { "bus_parts", "bus_log", "bus_offsets" };

static int bus_log_open(bus_hub *h, char *err, size_t errlen)
{
    long seg_bytes;
    char dir[PATH_MAX];
    if (config_long("PARLEY_BUS_SEGMENT_BYTES", BUS_SEGMENT_BYTES, 4096, 1L << 31, &seg_bytes,
                    err, errlen) != PX_OK)
        return PX_ERROR;
    snprintf(dir, sizeof(dir), "%s/bus-log", config_str("PARLEY_DATA_DIR", "data"));
    return buslog_open(&h->log, dir, (uint64_t)seg_bytes, err, errlen);
}

static bus_hub *bus_hub_open(char *err, size_t errlen)
{
    bus_hub *h = px_calloc(1, sizeof(*h));
    pthread_mutex_init(&h->mu, NULL);
    pthread_mutex_init(&h->dbmu, NULL);
    pthread_cond_init(&h->cv_work, NULL);
    pthread_cond_init(&h->cv_done, NULL);
    if (bus_log_open(h, err, errlen) != PX_OK ||
        sqldb_open_file(&h->d, SQLDB_BUS, err, errlen) != PX_OK ||
        bus_exec(h->d.db, bus_schema, err, errlen) != PX_OK ||
        /* Before bus.db, the bus's tables lived in parley.db. */
        sqldb_move_from_main(&h->d, bus_tables, PX_ARRAY_LEN(bus_tables), err, errlen) != PX_OK ||
        bus_hub_load(h, err, errlen) != PX_OK)
        goto fail;
    if (pthread_create(&h->writer, NULL, bus_writer_main, h) != 0) {
        px_err(err, errlen, "sqlite bus: cannot start the writer thread");
        goto fail;
    }
    return h;
fail:
    bus_hub_free(h);
    return NULL;
}

static bus_hub *bus_hub_ref(char *err, size_t errlen)
{
    pthread_mutex_lock(&bus_hub_mu);
    if (bus_the_hub == NULL)
        bus_the_hub = bus_hub_open(err, errlen);
    bus_hub *h = bus_the_hub;
    if (h != NULL)
        h->refs++;
    pthread_mutex_unlock(&bus_hub_mu);
    return h;
}

/* The last reference stops the writer, which drains what is queued first. */
static void bus_hub_unref(bus_hub *h)
{
    pthread_mutex_lock(&bus_hub_mu);
    int last = --h->refs == 0;
    if (last)
        bus_the_hub = NULL;
    pthread_mutex_unlock(&bus_hub_mu);
    if (!last)
        return;
    pthread_mutex_lock(&h->mu);
    h->stop = 1;
    pthread_cond_broadcast(&h->cv_work);
    pthread_mutex_unlock(&h->mu);
    pthread_join(h->writer, NULL);
    bus_hub_free(h);
}

/* ---- the writer ---- */

/* dbmu held, in a transaction: the rows of t's partitions in bus_parts, so
 * that a restart finds the topic as it was even if nothing was logged. */
static int bus_persist_rows(bus_hub *h, const bus_topic *t, char *err, size_t errlen)
{
    sqlite3_stmt *s = sqldb_stmt(&h->d, "INSERT OR IGNORE INTO bus_parts VALUES (?, ?, 0)", err,
                                 errlen);
    int rc = s != NULL ? PX_OK : PX_ERROR;
    for (int p = 0; p < t->nparts && rc == PX_OK; p++) {
        sqlite3_reset(s);
        sqlite3_bind_text(s, 1, t->name, -1, SQLITE_STATIC);
        sqlite3_bind_int(s, 2, p);
        rc = sqlite3_step(s) == SQLITE_DONE ? PX_OK : bus_sql_err(h->d.db, "topic", err, errlen);
    }
    sqldb_done(s);
    return rc;
}

static int bus_write_commits(bus_hub *h, const bus_dirty *d, size_t n, char *err, size_t errlen)
{
    sqlite3_stmt *s = NULL;
    if ((s = sqldb_stmt(&h->d, "INSERT INTO bus_offsets VALUES (?,?,?,?) ON CONFLICT DO"
                           " UPDATE SET off = MAX(off, excluded.off)", err, errlen)) == NULL)
        return PX_ERROR;
    int rc = PX_OK;
    for (size_t i = 0; i < n && rc == PX_OK; i++) {
        sqlite3_reset(s);
        sqlite3_bind_text(s, 1, d[i].group, -1, SQLITE_STATIC);
        sqlite3_bind_text(s, 2, d[i].t->name, -1, SQLITE_STATIC);
        sqlite3_bind_int(s, 3, d[i].part);
        sqlite3_bind_int64(s, 4, d[i].off);
        if (sqlite3_step(s) != SQLITE_DONE)
            rc = bus_sql_err(h->d.db, "commit offsets", err, errlen);
    }
    sqldb_done(s);
    return rc;
}

/* The writer's own state: when the committed offsets were last read for
 * retention, and room for one transaction's records in the log's form. */
typedef struct bus_wstate {
    int64_t last_scan;
    buslog_rec *recs;    /* BUS_WRITE_BATCH */
} bus_wstate;

/* dbmu held, in a transaction: each durable partition's least committed
 * offset over every group that ever committed on it. */
static void bus_retain_scan(bus_hub *h)
{
    sqlite3_stmt *min = sqldb_stmt(&h->d, "SELECT topic, part, MIN(off) FROM bus_offsets"
                                   " GROUP BY topic, part", NULL, 0);
    while (min != NULL && sqlite3_step(min) == SQLITE_ROW) {
        int part = sqlite3_column_int(min, 1);
        pthread_mutex_lock(&h->mu);
        bus_topic *t = bus_topic_find(h, (const char *)sqlite3_column_text(min, 0));
        pthread_mutex_unlock(&h->mu);
        if (t != NULL && !t->vol && part >= 0 && part < t->nparts)
            t->keep[part] = sqlite3_column_int64(min, 2);
    }
    sqldb_done(min);
}

/* dbmu held: the log forgets what every group committed past and deletes
 * the segments holding nothing else. */
static void bus_retain(bus_hub *h, size_t ntopics)
{
    for (size_t i = 0; i < ntopics; i++) {
        bus_topic *t = &h->topics[i];
        for (int p = 0; p < t->nparts && !t->vol && t->logid >= 0; p++)
            buslog_trim(h->log, t->logid, p, t->keep[p]);
    }
    buslog_retain(h->log);
}

/* dbmu held: the durable records of a transaction in one append. */
static int bus_log_records(bus_hub *h, bus_wstate *ws, bus_rec *recs, char *err, size_t errlen)
{
    size_t n = 0;
    for (bus_rec *r = recs; r != NULL; r = r->next) {
        if (r->transient)
            continue;
        ws->recs[n++] = (buslog_rec){ .topic = bus_logid(h, r->t), .part = r->part,
                                      .off = r->off, .ts_ms = r->ts_ms, .key = r->data,
                                      .key_len = r->key_len, .value = r->data + r->key_len + 1,
                                      .len = r->len };
    }
    return buslog_append(h->log, ws->recs, n, err, errlen);
}

/* One turn: new topics' partition rows, the committed offsets and (once a
 * second) the offsets retention needs, in a SQLite transaction when there
 * are any; then the records in one append to the log; then retention. */
static int bus_write(bus_hub *h, bus_wstate *ws, bus_rec *recs, const bus_dirty *d, size_t nd,
                     size_t ntopics, char *err, size_t errlen)
{
    pthread_mutex_lock(&h->dbmu);
    int due = px_mono_ms() - ws->last_scan >= BUS_RETAIN_MS, fresh = 0, rc = PX_OK;
    for (bus_rec *r = recs; r != NULL; r = r->next)
        fresh |= !r->t->persisted;
    if (nd > 0 || due || fresh) {
        if ((rc = sqldb_begin(&h->d, err, errlen)) == PX_OK) {
            for (bus_rec *r = recs; r != NULL && rc == PX_OK; r = r->next)
                if (!r->t->persisted && (rc = bus_persist_rows(h, r->t, err, errlen)) == PX_OK)
                    r->t->persisted = -1; /* written once this commits */
            if (rc == PX_OK)
                rc = bus_write_commits(h, d, nd, err, errlen);
            if (rc == PX_OK && due)
                bus_retain_scan(h);
            rc = sqldb_end(&h->d, rc, err, errlen);
        }
        for (bus_rec *r = recs; r != NULL; r = r->next)
            if (r->t->persisted < 0)
                r->t->persisted = rc == PX_OK;
    }
    if (rc == PX_OK)
        rc = bus_log_records(h, ws, recs, err, errlen);
    if (due) {
        bus_retain(h, ntopics);
        ws->last_scan = px_mono_ms();
    }
    pthread_mutex_unlock(&h->dbmu);
    return rc;
}

static void bus_signal(int efd)
{
    uint64_t one = 1;
    if (efd >= 0 && write(efd, &one, sizeof(one)) < 0 && errno != EAGAIN)
        return;
}

/* mu held: r's report goes to its producer (or r goes, when its producer
 * was destroyed before the report). */
static void bus_report(bus_rec *r, int status, const char *err)
{
    bus *b = r->b;
    r->next = NULL;
    r->status = status;
    if (b == NULL) {
        bus_rec_unref(r);
        return;
    }
    if (status != PX_OK)
        snprintf(b->err, sizeof(b->err), "%s", err);
    if (b->dr_tail != NULL)
        b->dr_tail->next = r;
    else
        b->dr_head = r;
    b->dr_tail = r;
    pthread_cond_signal(&b->cv);
}

/* mu held: the groups reading t look again (only they: waking every
 * thread of the process on each post cost more than the posts). */
static void bus_wake_readers(bus_topic *t)
{
    for (size_t i = 0; i < t->nsubs; i++) {
        bus *b = t->subs[i].b;
        pthread_cond_signal(&b->cv);
        if (b->fd_used)
            bus_signal(b->efd);
    }
}

/* mu held: one more post (what bus_consume and bus_detach watch). */
static void bus_wake(bus_hub *h)
{
    h->written++;
    pthread_cond_broadcast(&h->cv_done);
}

/* mu held: a durable record is visible to its consumers (from its ring
 * when some group reads the topic). */
static void bus_visible(bus_hub *h, bus_rec *r)
{
    r->t->durable[r->part] = PX_MAX(r->t->durable[r->part], r->off + 1);
    if (r->t->nsubs > 0)
        bus_ring_push(h, r);
}

/* mu held: after a transaction, its records' reports and visibility. */
static void bus_post(bus_hub *h, bus_rec *recs, int status, const char *err)
{
    for (bus_rec *r = recs; r != NULL; r = r->next)
        if (status == PX_OK)
            r->t->touched = 1;
    for (bus_rec *r = recs, *nx; r != NULL; r = nx) {
        nx = r->next;
        if (r->t->touched) {
            r->t->touched = 0;
            bus_wake_readers(r->t);
        }
        if (status == PX_OK)
            bus_visible(h, r);
        bus_report(r, status, err);
    }
    bus_wake(h);
}

/* An absolute CLOCK_REALTIME deadline (what pthread_cond_timedwait takes)
 * for a monotonic end time. */
static void bus_deadline(struct timespec *ts, int64_t end_mono_ms)
{
    int64_t left = end_mono_ms - px_mono_ms();
    clock_gettime(CLOCK_REALTIME, ts);
    if (left < 0)
        left = 0;
    ts->tv_sec += left / 1000;
    ts->tv_nsec += (left % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

/* mu held: takes up to BUS_WRITE_BATCH queued records. */
static bus_rec *bus_take(bus_hub *h)
{
    bus_rec *head = h->q_head, *last = NULL;
    size_t n = 0;
    for (bus_rec *r = head; r != NULL && n < BUS_WRITE_BATCH; r = r->next, n++) {
        last = r;
        h->q_bytes -= r->key_len + r->len;
    }
    if (last == NULL)
        return NULL;
    h->q_head = last->next;
    if (h->q_head == NULL)
        h->q_tail = NULL;
    last->next = NULL;
    h->q_records -= n;
    return head;
}

/* A clean stop: each partition's next offset, so that the next process
 * goes on from there even past transient records no group committed (after
 * a crash it may give their offsets again, to records every group reads as
 * new: no group committed past them). */
static void bus_save_next(bus_hub *h)
{
    char err[PX_ERRLEN] = "";
    pthread_mutex_lock(&h->dbmu);
    sqlite3_stmt *s = NULL;
    int rc = sqldb_begin(&h->d, err, sizeof(err));
    if (rc == PX_OK && (s = sqldb_stmt(&h->d, "INSERT INTO bus_parts VALUES (?,?,?) ON CONFLICT"
                                       " DO UPDATE SET next = MAX(next, excluded.next)", err,
                                       sizeof(err))) == NULL)
        rc = sqldb_end(&h->d, PX_ERROR, err, sizeof(err));
    for (size_t i = 0; s != NULL && i < h->ntopics && rc == PX_OK; i++) {
        const bus_topic *t = &h->topics[i];
        for (int p = 0; p < t->nparts && !t->vol && rc == PX_OK; p++) {
            sqlite3_reset(s);
            sqlite3_bind_text(s, 1, t->name, -1, SQLITE_STATIC);
            sqlite3_bind_int(s, 2, p);
            pthread_mutex_lock(&h->mu);
            sqlite3_bind_int64(s, 3, t->next[p]);
            pthread_mutex_unlock(&h->mu);
            if (sqlite3_step(s) != SQLITE_DONE)
                rc = bus_sql_err(h->d.db, "next offsets", err, sizeof(err));
        }
    }
    if (s != NULL) {
        sqldb_done(s);
        rc = sqldb_end(&h->d, rc, err, sizeof(err));
    }
    pthread_mutex_unlock(&h->dbmu);
    if (rc != PX_OK)
        log_warn("bus: cannot save the next offsets", "{s:s}", "error", err);
}

/* Group commit: whatever was queued while the last transaction ran goes
 * into the next one. */
static void *bus_writer_main(void *arg)
{
    bus_hub *h = arg;
    bus_dirty *d = px_calloc(BUS_MAX_DIRTY, sizeof(*d));
    px_thread_name("bus-writer");
    bus_wstate ws = { .last_scan = px_mono_ms(),
                      .recs = px_calloc(BUS_WRITE_BATCH, sizeof(*ws.recs)) };
    pthread_mutex_lock(&h->mu);
    for (;;) {
        while (h->q_head == NULL && h->ndirty == 0 && !h->stop &&
               px_mono_ms() - ws.last_scan < BUS_RETAIN_MS) {
            struct timespec ts;
            bus_deadline(&ts, px_mono_ms() + 200);
            pthread_cond_timedwait(&h->cv_work, &h->mu, &ts);
        }
        if (h->q_head == NULL && h->ndirty == 0 && h->stop)
            break;
        bus_rec *recs = bus_take(h);
        size_t nd = h->ndirty;
        memcpy(d, h->dirty, nd * sizeof(*d));
        h->ndirty = 0;
        size_t ntopics = h->ntopics;
        pthread_mutex_unlock(&h->mu);
        char err[PX_ERRLEN] = "";
        int rc = bus_write(h, &ws, recs, d, nd, ntopics, err, sizeof(err));
        pthread_mutex_lock(&h->mu);
        bus_post(h, recs, rc, err);
    }
    pthread_mutex_unlock(&h->mu);
    bus_save_next(h);
    free(ws.recs);
    free(d);
    return NULL;
}

/* ---- the bus.h interface ---- */

void bus_where(const char *brokers, char *out, size_t outlen)
{
    char path[PATH_MAX];
    sqldb_file_path(SQLDB_BUS, path, sizeof(path));
    snprintf(out, outlen, "log %s/bus-log, offsets %s", config_str("PARLEY_DATA_DIR", "data"),
             path);
}

int bus_sqlite_volatile(const char *prefix, char *err, size_t errlen)
{
    pthread_mutex_lock(&bus_hub_mu);
    int open = bus_the_hub != NULL;
    if (!open)
        snprintf(bus_vol_prefix, sizeof(bus_vol_prefix), "%s", prefix);
    pthread_mutex_unlock(&bus_hub_mu);
    if (open)
        return px_err(err, errlen, "in-process bus: volatile topics are set before the first bus");
    if (strlen(prefix) >= sizeof(bus_vol_prefix))
        return px_err(err, errlen, "in-process bus: volatile prefix too long");
    return PX_OK;
}

bus *bus_new(const bus_conf *conf, char *err, size_t errlen)
{
    bus_hub *h = bus_hub_ref(err, errlen);
    if (h == NULL)
        return NULL;
    bus *b = px_calloc(1, sizeof(*b));
    b->h = h;
    pthread_cond_init(&b->cv, NULL);
    b->dr_cb = conf->dr_cb;
    b->partitions = conf->partitions > 0 ? conf->partitions : 1;
    b->efd = -1;
    if (conf->group == NULL)
        return b;
    if (strlen(conf->group) >= BUS_MAX_GROUP_NAME) {
        px_err(err, errlen, "in-process bus: group name too long: %s", conf->group);
        bus_destroy(b);
        return NULL;
    }
    b->group = px_strdup(conf->group);
    b->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    pthread_mutex_lock(&h->mu);
    int clash = 0;
    for (size_t i = 0; i < h->ngroups; i++)
        clash |= strcmp(h->groups[i]->group, b->group) == 0;
    int full = h->ngroups == BUS_MAX_GROUPS;
    if (!clash && !full)
        h->groups[h->ngroups++] = b;
    pthread_mutex_unlock(&h->mu);
    if (clash || full || b->efd < 0) {
        px_err(err, errlen, clash ? "in-process bus: group %s already has a member" :
               "in-process bus: too many consumer groups (or no eventfd) for %s", b->group);
        if (clash || full)
            b->group[0] = '\0'; /* not registered: bus_destroy must not remove it */
        bus_destroy(b);
        return NULL;
    }
    return b;
}

/* dbmu held: one bus_parts row per partition, in one transaction. */
static int bus_persist_topic(bus_hub *h, bus_topic *t, char *err, size_t errlen)
{
    if (sqldb_begin(&h->d, err, errlen) != PX_OK)
        return PX_ERROR;
    int rc = sqldb_end(&h->d, bus_persist_rows(h, t, err, errlen), err, errlen);
    t->persisted = rc == PX_OK;
    return rc;
}

int bus_ensure_topics(bus *b, const char *const *topics, size_t n, int timeout_ms,
                      char *err, size_t errlen)
{
    bus_hub *h = b->h;
    for (size_t i = 0; i < n; i++) {
        pthread_mutex_lock(&h->mu);
        bus_topic *t = bus_topic_find(h, topics[i]);
        int created = t == NULL;
        if (created)
            t = bus_topic_add(h, topics[i], b->partitions);
        pthread_mutex_unlock(&h->mu);
        if (t == NULL)
            return px_err(err, errlen, "in-process bus: cannot create topic %s", topics[i]);
        if (!created || t->vol)
            continue;
        /* Persist the partition count now: a restart must find the topic as
         * it was even if nothing was produced to it. */
        pthread_mutex_lock(&h->dbmu);
        int rc = bus_persist_topic(h, t, err, errlen);
        pthread_mutex_unlock(&h->dbmu);
        if (rc != PX_OK)
            return rc;
    }
    return PX_OK;
}

/* mu held: a volatile record is visible and reported at once. */
static void bus_produce_volatile(bus *b, bus_rec *r)
{
    bus_topic *t = r->t;
    t->durable[r->part] = r->off + 1;
    if (t->nsubs > 0)
        bus_ring_push(b->h, r);
    bus_report(r, PX_OK, NULL);
    b->inflight++;
    bus_wake_readers(t);
    bus_wake(b->h);
}

static int bus_produce_rec(bus *b, const char *topic, const char *key, size_t key_len,
                           const void *value, size_t len, void *opaque, int transient,
                           char *err, size_t errlen)
{
    bus_hub *h = b->h;
    if (len > BUS_QUEUE_BYTES / 4 || key_len > 4096)
        return px_err(err, errlen, "in-process bus: record too large (%zu bytes)", len);
    bus_rec *r = bus_rec_new(key, key_len, value, len);
    r->transient = transient;
    r->b = b;
    r->opaque = opaque;
    r->ts_ms = px_now_ms();
    pthread_mutex_lock(&h->mu);
    int rc = PX_OK;
    bus_topic *t = bus_topic_find(h, topic);
    if (t == NULL)
        t = bus_topic_add(h, topic, b->partitions);
    if (t == NULL) {
        rc = px_err(err, errlen, "in-process bus: cannot create topic %s", topic);
    } else if (t->vol ? h->vol_bytes + key_len + len > BUS_QUEUE_BYTES :
               h->q_records >= BUS_QUEUE_RECORDS || h->q_bytes + key_len + len > BUS_QUEUE_BYTES) {
        px_err(err, errlen, "in-process bus: produce queue full");
        rc = PX_AGAIN;
    }
    if (rc == PX_OK) {
        r->t = t;
        r->part = bus_partition(key, key_len, t->nparts);
        r->off = t->next[r->part]++;
    }
    if (rc == PX_OK && t->vol) {
        bus_produce_volatile(b, r);
    } else if (rc == PX_OK) {
        if (h->q_tail != NULL)
            h->q_tail->next = r;
        else
            h->q_head = r;
        h->q_tail = r;
        h->q_records++;
        h->q_bytes += key_len + len;
        b->inflight++;
        pthread_cond_signal(&h->cv_work);
    }
    pthread_mutex_unlock(&h->mu);
    if (rc != PX_OK)
        free(r);
    return rc;
}

int bus_produce(bus *b, const char *topic, const char *key, size_t key_len,
                const void *value, size_t len, void *opaque, char *err, size_t errlen)
{
    return bus_produce_rec(b, topic, key, key_len, value, len, opaque, 0, err, errlen);
}

/* Queued as any record (its offset, order and report come with the next
 * group commit) but never written: a consumer caught up takes it from the
 * ring, a process after a crash finds a gap where it was. */
int bus_produce_transient(bus *b, const char *topic, const char *key, size_t key_len,
                          const void *value, size_t len, void *opaque, char *err, size_t errlen)
{
    return bus_produce_rec(b, topic, key, key_len, value, len, opaque, 1, err, errlen);
}

/* Serves the delivery reports posted for b (outside mu: a callback may
 * produce). Returns how many. */
static size_t bus_serve(bus *b)
{
    bus_hub *h = b->h;
    pthread_mutex_lock(&h->mu);
    bus_rec *head = b->dr_head;
    b->dr_head = b->dr_tail = NULL;
    char err[PX_ERRLEN];
    snprintf(err, sizeof(err), "%s", b->err);
    pthread_mutex_unlock(&h->mu);
    size_t n = 0;
    for (bus_rec *r = head; r != NULL; r = r->next, n++)
        if (b->dr_cb != NULL)
            b->dr_cb(r->opaque, r->status, r->status == PX_OK ? NULL : err, r->part, r->off);
    if (n > 0) {
        pthread_mutex_lock(&h->mu);
        b->inflight -= n;
        for (bus_rec *r = head, *nx; r != NULL; r = nx) {
            nx = r->next;
            bus_rec_unref(r);
        }
        pthread_mutex_unlock(&h->mu);
    }
    return n;
}

/* Waits (mu held) until b has news (reports, records) or the deadline. */
static void bus_wait(bus *b, int64_t end)
{
    struct timespec ts;
    bus_deadline(&ts, end);
    pthread_cond_timedwait(&b->cv, &b->h->mu, &ts);
}

void bus_poll(bus *b, int timeout_ms)
{
    int64_t end = px_mono_ms() + timeout_ms;
    for (;;) {
        if (bus_serve(b) > 0 || px_mono_ms() >= end)
            return;
        pthread_mutex_lock(&b->h->mu);
        if (b->dr_head == NULL && !b->woken)
            bus_wait(b, end);
        pthread_mutex_unlock(&b->h->mu);
    }
}

int bus_flush(bus *b, int timeout_ms)
{
    int64_t end = px_mono_ms() + timeout_ms;
    for (;;) {
        bus_serve(b);
        pthread_mutex_lock(&b->h->mu);
        size_t left = b->inflight;
        if (left > 0 && b->dr_head == NULL && px_mono_ms() < end)
            bus_wait(b, end);
        pthread_mutex_unlock(&b->h->mu);
        if (left == 0)
            return PX_OK;
        if (px_mono_ms() >= end) {
            bus_serve(b);
            return b->inflight == 0 ? PX_OK : PX_AGAIN;
        }
    }
}

static int bus_load_pos(bus *b, bus_pos *p, char *err, size_t errlen)
{
    bus_hub *h = b->h;
    sqlite3_stmt *s = NULL;
    pthread_mutex_lock(&h->dbmu);
    int rc = PX_OK;
    if ((s = sqldb_stmt(&h->d, "SELECT off FROM bus_offsets WHERE grp=? AND topic=? AND part=?",
                        err, errlen)) == NULL) {
        rc = PX_ERROR;
    } else {
        sqlite3_bind_text(s, 1, b->group, -1, SQLITE_STATIC);
        sqlite3_bind_text(s, 2, p->t->name, -1, SQLITE_STATIC);
        sqlite3_bind_int(s, 3, p->part);
        p->pos = sqlite3_step(s) == SQLITE_ROW ? sqlite3_column_int64(s, 0) : 0;
    }
    sqldb_done(s);
    pthread_mutex_unlock(&h->dbmu);
    return rc;
}

/* mu held: queues a committed offset for the writer (max wins). */
static int bus_mark(bus *b, bus_topic *t, int32_t part, int64_t off)
{
    bus_hub *h = b->h;
    if (t->vol)
        return PX_OK;
    for (size_t i = 0; i < h->ndirty; i++) {
        bus_dirty *d = &h->dirty[i];
        if (d->t == t && d->part == part && strcmp(d->group, b->group) == 0) {
            d->off = PX_MAX(d->off, off);
            return PX_OK;
        }
    }
    if (h->ndirty == BUS_MAX_DIRTY)
        return PX_ERROR;
    bus_dirty *d = &h->dirty[h->ndirty++];
    snprintf(d->group, sizeof(d->group), "%s", b->group);
    d->t = t;
    d->part = part;
    d->off = off;
    pthread_cond_signal(&h->cv_work);
    return PX_OK;
}

/* Positions in t for b: the committed offsets (a volatile topic starts at
 * what its rings hold). The subscription itself is recorded as an offset,
 * so retention keeps what this group has not read even before its first
 * commit. Then b is one of t's readers, whose rings keep what it has not
 * read. */
static int bus_subscribe_topic(bus *b, bus_topic *t, char *err, size_t errlen)
{
    bus_hub *h = b->h;
    pthread_mutex_lock(&h->mu);
    size_t base = b->npos;
    int full = t->nsubs == BUS_MAX_GROUPS;
    if (!full) { /* under mu: the rings' trimming reads b->pos once b reads t */
        b->pos = px_realloc(b->pos, (b->npos + (size_t)t->nparts) * sizeof(*b->pos));
        for (int p = 0; p < t->nparts; p++) {
            const bus_ring *rg = &t->ring[p];
            b->pos[b->npos++] = (bus_pos){ t, p, rg->n > 0 ? rg->lo : t->durable[p] };
        }
    }
    pthread_mutex_unlock(&h->mu);
    if (full)
        return px_err(err, errlen, "in-process bus: too many groups read %s", t->name);
    for (int p = 0; p < t->nparts && !t->vol; p++) {
        bus_pos bp = { t, p, 0 };
        if (bus_load_pos(b, &bp, err, errlen) != PX_OK)
            return PX_ERROR;
        pthread_mutex_lock(&h->mu);
        b->pos[base + (size_t)p].pos = bp.pos;
        int rc = bus_mark(b, t, p, bp.pos);
        pthread_mutex_unlock(&h->mu);
        if (rc != PX_OK)
            return px_err(err, errlen, "in-process bus: too many partitions");
    }
    pthread_mutex_lock(&h->mu);
    t->subs[t->nsubs++] = (bus_sub){ b, base };
    pthread_mutex_unlock(&h->mu);
    return PX_OK;
}

/* Every partition of the topics is this member's (one member per group). */
int bus_subscribe(bus *b, const char *const *topics, size_t n, char *err, size_t errlen)
{
    if (b->group == NULL)
        return px_err(err, errlen, "in-process bus: subscribe without a group");
    bus_hub *h = b->h;
    if (bus_ensure_topics(b, topics, n, 0, err, errlen) != PX_OK)
        return PX_ERROR;
    for (size_t i = 0; i < n; i++) {
        pthread_mutex_lock(&h->mu);
        bus_topic *t = bus_topic_find(h, topics[i]);
        pthread_mutex_unlock(&h->mu);
        if (bus_subscribe_topic(b, t, err, errlen) != PX_OK)
            return PX_ERROR;
    }
    return PX_OK;
}

static bus_msg bus_msg_of(bus_rec *r)
{
    return (bus_msg){ .topic = r->t->name, .partition = r->part, .offset = r->off,
                      .key = r->data, .key_len = r->key_len, .value = r->data + r->key_len + 1,
                      .len = r->len, .ts_ms = r->ts_ms, .impl = r };
}

/* mu held: up to max records of p's partition from its ring, from p->pos
 * on (a volatile topic has nothing before its ring: what the ring dropped
 * while no group read it is skipped). */
static size_t bus_take_ring(bus_hub *h, bus_pos *p, bus_msg *out, size_t max)
{
    bus_ring *rg = &p->t->ring[p->part];
    if (p->t->vol)
        p->pos = PX_MAX(p->pos, rg->n > 0 ? rg->lo : p->t->durable[p->part]);
    size_t k = 0;
    for (; k < max && rg->n > 0 && p->pos >= rg->lo && p->pos < rg->lo + (int64_t)rg->n; k++) {
        bus_rec *r = rg->slot[(rg->head + (size_t)(p->pos - rg->lo)) & (rg->cap - 1)];
        r->refs++;
        out[k] = bus_msg_of(r);
        p->pos++;
    }
    if (k > 0)
        bus_ring_trim(h, p->t, p->part);
    return k;
}

typedef struct bus_reading {
    bus_pos *p;
    bus_msg *out;
    size_t n;
} bus_reading;

static int bus_read_one(void *arg, const char *topic, const buslog_rec *lr)
{
    bus_reading *rd = arg;
    bus_rec *r = bus_rec_new(lr->key, lr->key_len, lr->value, lr->len);
    r->t = rd->p->t;
    r->part = rd->p->part;
    r->off = lr->off;
    r->ts_ms = lr->ts_ms;
    rd->out[rd->n++] = bus_msg_of(r);
    return 0;
}

/* Reads up to max durable records of one partition from the log, from
 * p->pos on (a consumer behind its ring). */
static int bus_read(bus *b, bus_pos *p, int64_t durable, bus_msg *out, size_t max,
                    char *err, size_t errlen)
{
    bus_hub *h = b->h;
    bus_reading rd = { p, out, 0 };
    pthread_mutex_lock(&h->dbmu);
    int rc = p->t->logid < 0 ? 0 : buslog_read(h->log, p->t->logid, p->part, p->pos, durable,
                                                max, bus_read_one, &rd, err, errlen);
    pthread_mutex_unlock(&h->dbmu);
    if (rc < 0) {
        bus_release(b, out, rd.n);
        return PX_ERROR;
    }
    /* Nothing logged in [pos, durable): transient records, gone with the
     * process that made them or with the ring that held them; the ring may
     * still hold later ones. */
    int n = (int)rd.n;
    pthread_mutex_lock(&h->mu);
    const bus_ring *rg = &p->t->ring[p->part];
    int64_t gap_end = rg->n > 0 && rg->lo > p->pos && rg->lo < durable ? rg->lo : durable;
    p->pos = n > 0 ? out[n - 1].offset + 1 : gap_end;
    bus_ring_trim(h, p->t, p->part);
    pthread_mutex_unlock(&h->mu);
    return n;
}

/* One pass over the partitions, starting after where the last call ended
 * so that no partition starves the others: the ring when it holds the
 * position, else the log. */
static int bus_fetch(bus *b, bus_msg *out, size_t max, char *err, size_t errlen)
{
    bus_hub *h = b->h;
    size_t n = 0;
    for (size_t i = 0; i < b->npos && n < max; i++) {
        bus_pos *p = &b->pos[(b->next_pos + i) % b->npos];
        pthread_mutex_lock(&h->mu);
        int64_t durable = p->t->durable[p->part];
        size_t got = durable > p->pos ? bus_take_ring(h, p, out + n, max - n) : 0;
        pthread_mutex_unlock(&h->mu);
        if (got == 0 && durable > p->pos && !p->t->vol) {
            int r = bus_read(b, p, durable, out + n, max - n, err, errlen);
            if (r < 0) {
                bus_release(b, out, n);
                return PX_ERROR;
            }
            got = (size_t)r;
        }
        n += got;
    }
    if (b->npos > 0)
        b->next_pos = (b->next_pos + 1) % b->npos;
    return (int)n;
}

int bus_consume(bus *b, bus_msg *out, size_t max, int timeout_ms, char *err, size_t errlen)
{
    int64_t end = px_mono_ms() + timeout_ms;
    uint64_t drained;
    if (b->fd_used && read(b->efd, &drained, sizeof(drained)) < 0 && errno != EAGAIN)
        return px_err(err, errlen, "in-process bus: eventfd: %s", strerror(errno));
    for (;;) {
        pthread_mutex_lock(&b->h->mu);
        uint64_t seen = b->h->written;
        pthread_mutex_unlock(&b->h->mu);
        int n = bus_fetch(b, out, max, err, errlen);
        if (n != 0) {
            if ((size_t)n == max)
                bus_signal(b->fd_used ? b->efd : -1); /* more may remain: the reactor comes back */
            return n;
        }
        pthread_mutex_lock(&b->h->mu);
        int woken = b->woken;
        b->woken = 0;
        if (!woken && b->h->written == seen && px_mono_ms() < end)
            bus_wait(b, end);
        pthread_mutex_unlock(&b->h->mu);
        if (woken || px_mono_ms() >= end)
            return 0;
    }
}

int bus_commit(bus *b, const bus_msg *m, size_t n)
{
    bus_hub *h = b->h;
    int rc = PX_OK;
    pthread_mutex_lock(&h->mu);
    for (size_t i = 0; i < n && rc == PX_OK; i++) {
        bus_topic *t = bus_topic_find(h, m[i].topic);
        rc = t != NULL ? bus_mark(b, t, m[i].partition, m[i].offset + 1) : PX_ERROR;
    }
    pthread_mutex_unlock(&h->mu);
    return rc;
}

void bus_release(bus *b, bus_msg *m, size_t n)
{
    if (n == 0)
        return;
    pthread_mutex_lock(&b->h->mu);
    for (size_t i = 0; i < n; i++) {
        if (m[i].impl != NULL)
            bus_rec_unref(m[i].impl);
        m[i].impl = NULL;
    }
    pthread_mutex_unlock(&b->h->mu);
}

int bus_consume_fd(bus *b)
{
    pthread_mutex_lock(&b->h->mu);
    b->fd_used = b->efd >= 0;
    pthread_mutex_unlock(&b->h->mu);
    if (b->fd_used)
        bus_signal(b->efd); /* records may be waiting already */
    return b->efd;
}

int bus_failed(bus *b)
{
    return 0;
}

int bus_test_fail(bus *b)
{
    return PX_DECLINED;
}

unsigned bus_generation(bus *b)
{
    (void)b;
    return 0;
}

int bus_resubscribe(bus *b, char *err, size_t errlen)
{
    (void)b;
    (void)err;
    (void)errlen;
    return PX_OK;
}

/* One process holds every partition of the topics it subscribed to. */
int bus_assigned(bus *b)
{
    pthread_mutex_lock(&b->h->mu);
    int n = (int)b->npos; /* one position per subscribed partition */
    pthread_mutex_unlock(&b->h->mu);
    return n;
}

int bus_lags(bus *b, bus_lag *out, size_t max, int timeout_ms, char *err, size_t errlen)
{
    (void)timeout_ms, (void)err, (void)errlen;
    size_t n = 0;
    pthread_mutex_lock(&b->h->mu);
    for (; n < b->npos && n < max; n++) {
        const bus_pos *p = &b->pos[n];
        out[n] = (bus_lag){ .partition = p->part,
                            .records = PX_MAX(0, p->t->durable[p->part] - p->pos) };
        snprintf(out[n].topic, sizeof(out[n].topic), "%s", p->t->name);
    }
    pthread_mutex_unlock(&b->h->mu);
    return (int)n;
}

/* One member per group: nobody else could take a partition over. */
int bus_session_ms(bus *b)
{
    (void)b;
    return 0;
}

void bus_wakeup(bus *b)
{
    pthread_mutex_lock(&b->h->mu);
    b->woken = 1;
    pthread_cond_signal(&b->cv);
    pthread_mutex_unlock(&b->h->mu);
    bus_signal(b->efd);
}

/* mu held; after a flush that timed out: b's records still queued lose
 * their producer (the writer drops their reports), reports already posted
 * are dropped, and a batch the writer holds now is waited for (its next
 * post, at most one retention period away). */
static void bus_detach(bus_hub *h, bus *b)
{
    for (bus_rec *r = h->q_head; r != NULL; r = r->next)
        if (r->b == b)
            r->b = NULL;
    uint64_t w = h->written;
    while (h->written == w) {
        struct timespec ts;
        bus_deadline(&ts, px_mono_ms() + BUS_RETAIN_MS + 200);
        pthread_cond_timedwait(&h->cv_done, &h->mu, &ts);
    }
    for (bus_rec *r = b->dr_head, *nx; r != NULL; r = nx) {
        nx = r->next;
        bus_rec_unref(r);
    }
    b->dr_head = b->dr_tail = NULL;
}

/* mu held: b no longer reads any topic; the rings it held back let go. */
static void bus_unsubscribe(bus_hub *h, bus *b)
{
    for (size_t i = 0; i < h->ntopics; i++) {
        bus_topic *t = &h->topics[i];
        for (size_t k = 0; k < t->nsubs; k++) {
            if (t->subs[k].b != b)
                continue;
            t->subs[k] = t->subs[--t->nsubs];
            for (int p = 0; p < t->nparts; p++)
                bus_ring_trim(h, t, p);
            break;
        }
    }
}

/* Commits already queued are copies the writer writes before the hub
 * closes (the last bus_destroy drains them). */
void bus_destroy(bus *b)
{
    if (b == NULL)
        return;
    bus_hub *h = b->h;
    bus_flush(b, 5000);
    pthread_mutex_lock(&h->mu);
    for (size_t i = 0; i < h->ngroups; i++) {
        if (h->groups[i] != b)
            continue;
        h->groups[i] = h->groups[--h->ngroups];
        break;
    }
    bus_unsubscribe(h, b);
    if (b->inflight > 0)
        bus_detach(h, b);
    pthread_mutex_unlock(&h->mu);
    if (b->efd >= 0)
        close(b->efd);
    pthread_cond_destroy(&b->cv);
    free(b->group);
    free(b->pos);
    free(b);
    bus_hub_unref(h);
}
