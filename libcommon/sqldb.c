/* Owns parleyd's database connections' setup, their statement caches, and
 * per file the process write lock and the WAL checkpointer thread. */
#include "sqldb.h"
#include "common.h"
#include "config.h"
#include "log.h"

#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* WAL frames (4 KiB pages) after which the checkpointer copies the log back
 * into the database. */
#define SQLDB_CKPT_FRAMES 8000
/* Past this many the checkpointer has fallen behind (a busy box starves
 * its thread: a 71 MiB log was seen at load 30), and the committing writer
 * runs the RESTART itself: slower commits until the log starts again,
 * rather than a log that grows without bound. */
#define SQLDB_CKPT_HARD_FRAMES (SQLDB_CKPT_FRAMES * 3 / 2)

/* One file's process-wide state: its write lock and its checkpointer.
 *
 * One checkpointer per file, alive while any connection to it is open. In
 * SQLite's default setup the commit that crosses the threshold runs the
 * checkpoint (copy plus fsync) itself, inside our write lock: the profile
 * of parleyd under load put 12% of all samples there, every writer waiting
 * behind it. Here a thread with its own connection copies the log first
 * with a PASSIVE checkpoint, which needs no lock, then takes the write lock
 * for a RESTART one that copies the few frames left and waits out the
 * (short) read transactions so the next commit starts the log again from
 * its beginning. PASSIVE alone never got that moment under steady load,
 * since some consumer is always reading: the WAL grew past 160 MB in a
 * 10 s run. */
struct sqldb_file {
    const char *name;
    pthread_mutex_t write_mu;
    /* Held across a whole ref or unref, so the checkpointer's start and its
     * stop (join, close) never interleave: a service closing its last
     * connection while another opens its first (parleyd's services start
     * and stop on their own threads) had the unref join the new thread and
     * close the new connection under it (an ASan crash in a checkpoint on a
     * NULL handle). The checkpointer itself never takes it. */
    pthread_mutex_t life_mu;
    pthread_mutex_t mu;       /* the checkpointer's fields below */
    pthread_cond_t cv;
    int refs, stop, wanted;
    pthread_t th;
    sqlite3 *db;
};

#define SQLDB_FILE_INIT(n) { n, PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, \
                             PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, \
                             NULL }
static struct sqldb_file sqldb_files[] = {
    [SQLDB_MAIN] = SQLDB_FILE_INIT("parley.db"),
    [SQLDB_BUS] = SQLDB_FILE_INIT("bus.db"),
    [SQLDB_SEEN] = SQLDB_FILE_INIT("seen.db"),
    [SQLDB_TRACK] = SQLDB_FILE_INIT("track.db"),
};

void sqldb_file_path(enum sqldb_which w, char *path, size_t len)
{
    snprintf(path, len, "%s/%s", config_str("PARLEY_DATA_DIR", "data"), sqldb_files[w].name);
}

void sqldb_path(char *path, size_t len)
{
    sqldb_file_path(SQLDB_MAIN, path, len);
}

static sqlite3 *sqldb_connect(const char *path)
{
    sqlite3 *db = NULL;
    if (sqlite3_open_v2(path, &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE |
                        SQLITE_OPEN_FULLMUTEX, NULL) == SQLITE_OK)
        sqlite3_busy_timeout(db, 10000);
    return db;
}

static int sqldb_wal_hook(void *arg, sqlite3 *db, const char *name, int frames)
{
    struct sqldb_file *f = arg;
    (void)name;
    /* The hook runs in the commit, inside our write lock, on the writer's
     * own connection, as SQLite's own autocheckpoint does. */
    if (frames >= SQLDB_CKPT_HARD_FRAMES) {
        int rc = sqlite3_wal_checkpoint_v2(db, NULL, SQLITE_CHECKPOINT_RESTART, NULL, NULL);
        if (rc != SQLITE_OK && rc != SQLITE_BUSY)
            log_warn("sqlite checkpoint failed", "{s:s}", "error", sqlite3_errmsg(db));
        return SQLITE_OK;
    }
    if (frames >= SQLDB_CKPT_FRAMES) {
        pthread_mutex_lock(&f->mu);
        f->wanted = 1;
        pthread_cond_signal(&f->cv);
        pthread_mutex_unlock(&f->mu);
    }
    return SQLITE_OK;
}

static void sqldb_checkpoint(struct sqldb_file *f)
{
    int rc = sqlite3_wal_checkpoint_v2(f->db, NULL, SQLITE_CHECKPOINT_PASSIVE, NULL, NULL);
    if (rc == SQLITE_OK) {
        pthread_mutex_lock(&f->write_mu);
        rc = sqlite3_wal_checkpoint_v2(f->db, NULL, SQLITE_CHECKPOINT_RESTART, NULL, NULL);
        pthread_mutex_unlock(&f->write_mu);
    }
    if (rc != SQLITE_OK && rc != SQLITE_BUSY)
        log_warn("sqlite checkpoint failed", "{s:s}", "error", sqlite3_errmsg(f->db));
}

static void *sqldb_ckpt_main(void *arg)
{
    struct sqldb_file *f = arg;
    px_thread_name("ckpt %s", f->name);
    pthread_mutex_lock(&f->mu);
    while (!f->stop) {
        if (!f->wanted) {
            struct timespec until;
            clock_gettime(CLOCK_REALTIME, &until);
            until.tv_sec += 1;
            pthread_cond_timedwait(&f->cv, &f->mu, &until);
            continue;
        }
        f->wanted = 0;
        pthread_mutex_unlock(&f->mu);
        sqldb_checkpoint(f);
        pthread_mutex_lock(&f->mu);
    }
    pthread_mutex_unlock(&f->mu);
    return NULL;
}

/* Called with a connection just opened: the first one starts the thread. */
static int sqldb_ckpt_ref(struct sqldb_file *f, const char *path)
{
    pthread_mutex_lock(&f->life_mu);
    pthread_mutex_lock(&f->mu);
    int rc = PX_OK;
    if (f->refs == 0) {
        f->db = sqldb_connect(path);
        f->stop = 0;
        /* A connection opens its file lazily; until it has, a checkpoint
         * on it sees no WAL and does nothing. */
        if (f->db == NULL ||
            sqlite3_exec(f->db, "PRAGMA journal_mode=WAL", NULL, NULL, NULL) != SQLITE_OK ||
            pthread_create(&f->th, NULL, sqldb_ckpt_main, f) != 0) {
            sqlite3_close(f->db);
            f->db = NULL;
            rc = PX_ERROR;
        }
    }
    if (rc == PX_OK)
        f->refs++;
    pthread_mutex_unlock(&f->mu);
    pthread_mutex_unlock(&f->life_mu);
    return rc;
}

static void sqldb_ckpt_unref(struct sqldb_file *f)
{
    pthread_mutex_lock(&f->life_mu);
    pthread_mutex_lock(&f->mu);
    if (--f->refs > 0) {
        pthread_mutex_unlock(&f->mu);
        pthread_mutex_unlock(&f->life_mu);
        return;
    }
    f->stop = 1;
    pthread_cond_signal(&f->cv);
    pthread_mutex_unlock(&f->mu);
    pthread_join(f->th, NULL);
    sqlite3_close(f->db);
    f->db = NULL;
    pthread_mutex_unlock(&f->life_mu);
}

int sqldb_open_file(sqldb *d, enum sqldb_which w, char *err, size_t errlen)
{
    char path[4096];
    struct sqldb_file *f = &sqldb_files[w];
    memset(d, 0, sizeof(*d));
    sqldb_file_path(w, path, sizeof(path));
    d->f = f;
    d->db = sqldb_connect(path);
    char *msg = NULL;
    int rc = d->db != NULL ? SQLITE_OK : SQLITE_NOMEM;
    if (rc == SQLITE_OK) {
        /* Under the file's write lock: switching a new file to WAL while
         * another connection of this process does the same answered
         * "database is locked" at once (the busy handler is not asked),
         * which stopped parleyd on about one fresh start in three. */
        pthread_mutex_lock(&f->write_mu);
        rc = sqlite3_exec(d->db, "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"
                          " PRAGMA temp_store=MEMORY;", NULL, NULL, &msg);
        pthread_mutex_unlock(&f->write_mu);
    }
    if (rc == SQLITE_OK && sqldb_ckpt_ref(f, path) == PX_OK) {
        sqlite3_wal_hook(d->db, sqldb_wal_hook, f);
        d->ckpt_ref = 1;
        return PX_OK;
    }
    px_err(err, errlen, "sqlite %s: %s", path,
           msg ? msg : d->db ? sqlite3_errmsg(d->db) : "no memory");
    sqlite3_free(msg);
    sqlite3_close(d->db);
    d->db = NULL;
    return PX_ERROR;
}

int sqldb_open(sqldb *d, char *err, size_t errlen)
{
    return sqldb_open_file(d, SQLDB_MAIN, err, errlen);
}

void sqldb_close(sqldb *d)
{
    for (size_t i = 0; i < d->nstmts; i++)
        sqlite3_finalize(d->stmts[i].s);
    d->nstmts = 0;
    sqlite3_close(d->db);
    d->db = NULL;
    if (d->ckpt_ref)
        sqldb_ckpt_unref(d->f);
    d->ckpt_ref = 0;
}

sqlite3_stmt *sqldb_stmt(sqldb *d, const char *sql, char *err, size_t errlen)
{
    for (size_t i = 0; i < d->nstmts; i++)
        if (d->stmts[i].sql == sql)
            return d->stmts[i].s;
    if (d->nstmts == SQLDB_MAX_STMTS) {
        px_err(err, errlen, "sqlite: statement cache full (%d)", SQLDB_MAX_STMTS);
        return NULL;
    }
    sqlite3_stmt *s = NULL;
    if (sqlite3_prepare_v3(d->db, sql, -1, SQLITE_PREPARE_PERSISTENT, &s, NULL) != SQLITE_OK) {
        px_err(err, errlen, "sqlite prepare: %s", sqlite3_errmsg(d->db));
        return NULL;
    }
    d->stmts[d->nstmts].sql = sql;
    d->stmts[d->nstmts++].s = s;
    return s;
}

void sqldb_done(sqlite3_stmt *s)
{
    if (s == NULL)
        return;
    sqlite3_reset(s);
    sqlite3_clear_bindings(s);
}

static int sqldb_begin_as(sqldb *d, const char *sql, pthread_mutex_t *mu, char *err,
                          size_t errlen)
{
    if (mu != NULL)
        pthread_mutex_lock(mu);
    if (sqlite3_exec(d->db, sql, NULL, NULL, NULL) == SQLITE_OK)
        return PX_OK;
    px_err(err, errlen, "sqlite begin: %s", sqlite3_errmsg(d->db));
    if (mu != NULL)
        pthread_mutex_unlock(mu);
    return PX_ERROR;
}

static int sqldb_end_as(sqldb *d, int rc, pthread_mutex_t *mu, char *err, size_t errlen)
{
    if (rc == PX_OK && sqlite3_exec(d->db, "COMMIT", NULL, NULL, NULL) != SQLITE_OK)
        rc = px_err(err, errlen, "sqlite commit: %s", sqlite3_errmsg(d->db));
    if (rc != PX_OK)
        sqlite3_exec(d->db, "ROLLBACK", NULL, NULL, NULL);
    if (mu != NULL)
        pthread_mutex_unlock(mu);
    return rc;
}

int sqldb_begin(sqldb *d, char *err, size_t errlen)
{
    return sqldb_begin_as(d, "BEGIN IMMEDIATE", &d->f->write_mu, err, errlen);
}

int sqldb_end(sqldb *d, int rc, char *err, size_t errlen)
{
    return sqldb_end_as(d, rc, &d->f->write_mu, err, errlen);
}

int sqldb_begin_read(sqldb *d, char *err, size_t errlen)
{
    return sqldb_begin_as(d, "BEGIN DEFERRED", NULL, err, errlen);
}

int sqldb_end_read(sqldb *d, int rc, char *err, size_t errlen)
{
    return sqldb_end_as(d, rc, NULL, err, errlen);
}

/* The first column of the first row of sql on db, or -1. */
static int64_t sqldb_count(sqlite3 *db, const char *sql)
{
    sqlite3_stmt *s = NULL;
    int64_t n = -1;
    if (sqlite3_prepare_v2(db, sql, -1, &s, NULL) == SQLITE_OK && sqlite3_step(s) == SQLITE_ROW)
        n = sqlite3_column_int64(s, 0);
    sqlite3_finalize(s);
    return n;
}

static int sqldb_exec(sqlite3 *db, const char *sql, const char *what, char *err, size_t errlen)
{
    if (sqlite3_exec(db, sql, NULL, NULL, NULL) == SQLITE_OK)
        return PX_OK;
    return px_err(err, errlen, "sqlite %s: %s", what, sqlite3_errmsg(db));
}

/* Copies tables[] from the attached "old" into d's file unless its
 * tables[0] has rows or old no longer has it. Both checks are inside the
 * transaction, which holds d's write lock and reads old from one snapshot:
 * of connections moving at once (parleyd opens a store per service at
 * once) the first copies, and a later one finds the rows, or finds the
 * tables dropped (an empty table copied leaves no rows to find). */
static int sqldb_copy_tables(sqldb *d, const char *const *tables, size_t n, char *err,
                             size_t errlen)
{
    char sql[192];
    if (sqldb_begin(d, err, errlen) != PX_OK)
        return PX_ERROR;
    snprintf(sql, sizeof(sql), "SELECT count(*) FROM old.sqlite_master WHERE name = '%s'",
             tables[0]);
    int64_t old = sqldb_count(d->db, sql);
    snprintf(sql, sizeof(sql), "SELECT count(*) FROM (SELECT 1 FROM main.%s LIMIT 1)",
             tables[0]);
    int rc = PX_OK;
    if (old == 1 && sqldb_count(d->db, sql) == 0) {
        for (size_t i = 0; i < n && rc == PX_OK; i++) {
            snprintf(sql, sizeof(sql), "INSERT INTO main.%s SELECT * FROM old.%s", tables[i],
                     tables[i]);
            rc = sqldb_exec(d->db, sql, "move", err, errlen);
        }
    }
    return sqldb_end(d, rc, err, errlen);
}

int sqldb_move_from_main(sqldb *d, const char *const *tables, size_t n, char *err,
                         size_t errlen)
{
    char path[PATH_MAX], sql[192];
    sqldb old;
    sqldb_path(path, sizeof(path));
    if (n == 0 || access(path, F_OK) != 0)
        return PX_OK;
    if (sqldb_open(&old, err, errlen) != PX_OK)
        return PX_ERROR;
    snprintf(sql, sizeof(sql), "SELECT count(*) FROM sqlite_master WHERE name = '%s'",
             tables[0]);
    int rc = PX_OK;
    if (sqldb_count(old.db, sql) != 1)
        goto out;
    sqlite3_stmt *s = NULL;
    rc = sqlite3_prepare_v2(d->db, "ATTACH ?1 AS old", -1, &s, NULL) == SQLITE_OK &&
         sqlite3_bind_text(s, 1, path, -1, SQLITE_STATIC) == SQLITE_OK &&
         sqlite3_step(s) == SQLITE_DONE ? PX_OK :
         px_err(err, errlen, "sqlite attach %s: %s", path, sqlite3_errmsg(d->db));
    sqlite3_finalize(s);
    if (rc != PX_OK)
        goto out;
    rc = sqldb_copy_tables(d, tables, n, err, errlen);
    sqldb_exec(d->db, "DETACH old", "detach", NULL, 0);
    if (rc != PX_OK || (rc = sqldb_begin(&old, err, errlen)) != PX_OK)
        goto out;
    for (size_t i = 0; i < n && rc == PX_OK; i++) {
        snprintf(sql, sizeof(sql), "DROP TABLE IF EXISTS %s", tables[i]);
        rc = sqldb_exec(old.db, sql, "drop", err, errlen);
    }
    rc = sqldb_end(&old, rc, err, errlen);
out:
    sqldb_close(&old);
    return rc;
}
