/* Owns parleyd's database connections' setup and their statement caches. */
#include "sqldb.h"
#include "common.h"
#include "config.h"

#include <pthread.h>
#include <stdio.h>
#include <string.h>

static pthread_mutex_t sqldb_write_mu = PTHREAD_MUTEX_INITIALIZER;

int sqldb_open(sqldb *d, char *err, size_t errlen)
{
    char path[4096];
    memset(d, 0, sizeof(*d));
    snprintf(path, sizeof(path), "%s/parley.db", config_str("PARLEY_DATA_DIR", "data"));
    int rc = sqlite3_open_v2(path, &d->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE |
                             SQLITE_OPEN_FULLMUTEX, NULL);
    char *msg = NULL;
    if (rc == SQLITE_OK) {
        sqlite3_busy_timeout(d->db, 10000);
        /* Under the process's write lock: switching a new file to WAL while
         * another connection of this process does the same answered
         * "database is locked" at once (the busy handler is not asked),
         * which stopped parleyd on about one fresh start in three. */
        pthread_mutex_lock(&sqldb_write_mu);
        rc = sqlite3_exec(d->db, "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;", NULL,
                          NULL, &msg);
        pthread_mutex_unlock(&sqldb_write_mu);
    }
    if (rc == SQLITE_OK)
        return PX_OK;
    px_err(err, errlen, "sqlite %s: %s", path, msg ? msg : d->db ? sqlite3_errmsg(d->db) : "no memory");
    sqlite3_free(msg);
    sqlite3_close(d->db);
    d->db = NULL;
    return PX_ERROR;
}

void sqldb_close(sqldb *d)
{
    for (size_t i = 0; i < d->nstmts; i++)
        sqlite3_finalize(d->stmts[i].s);
    d->nstmts = 0;
    sqlite3_close(d->db);
    d->db = NULL;
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

int sqldb_begin(sqldb *d, char *err, size_t errlen)
{
    pthread_mutex_lock(&sqldb_write_mu);
    if (sqlite3_exec(d->db, "BEGIN IMMEDIATE", NULL, NULL, NULL) == SQLITE_OK)
        return PX_OK;
    px_err(err, errlen, "sqlite begin: %s", sqlite3_errmsg(d->db));
    pthread_mutex_unlock(&sqldb_write_mu);
    return PX_ERROR;
}

int sqldb_end(sqldb *d, int rc, char *err, size_t errlen)
{
    if (rc == PX_OK && sqlite3_exec(d->db, "COMMIT", NULL, NULL, NULL) != SQLITE_OK)
        rc = px_err(err, errlen, "sqlite commit: %s", sqlite3_errmsg(d->db));
    if (rc != PX_OK)
        sqlite3_exec(d->db, "ROLLBACK", NULL, NULL, NULL);
    pthread_mutex_unlock(&sqldb_write_mu);
    return rc;
}
