/* parleyd's SQLite files under PARLEY_DATA_DIR: parley.db (the store),
 * bus.db (the in-process bus, whose connection is its only writer, so it
 * keeps its page cache and never queues behind a store transaction),
 * seen.db and track.db (the store's 30-day dedupe claims and the receipt
 * service's tracking: inserts at random keys that held parley.db's write
 * lock more than anything else, each in a transaction of its own anyway);
 * opening them, moving
 * tables an older layout kept in parley.db, and a cache of prepared
 * statements, so a hot path compiles its SQL once per connection, not once
 * per call. */
#ifndef PARLEY_SQLDB_H
#define PARLEY_SQLDB_H

#include <sqlite3.h>
#include <stddef.h>

#define SQLDB_MAX_STMTS 48

enum sqldb_which { SQLDB_MAIN, SQLDB_BUS, SQLDB_SEEN, SQLDB_TRACK };

typedef struct sqldb {
    sqlite3 *db;
    struct sqldb_file *f;  /* the file's write lock and checkpointer */
    struct { const char *sql; sqlite3_stmt *s; } stmts[SQLDB_MAX_STMTS];
    size_t nstmts;
    int ckpt_ref;      /* holds a reference on the process checkpointer */
} sqldb;

/* Opens (creating) the file in WAL mode with synchronous=NORMAL and a busy
 * timeout; its commits leave checkpoints to the process checkpointer.
 * PX_OK, or PX_ERROR with err. */
int sqldb_open(sqldb *d, char *err, size_t errlen);
/* The same for either file (sqldb_open is SQLDB_MAIN). */
int sqldb_open_file(sqldb *d, enum sqldb_which w, char *err, size_t errlen);

/* PARLEY_DATA_DIR/parley.db (or the named file) into path. */
void sqldb_path(char *path, size_t len);
void sqldb_file_path(enum sqldb_which w, char *path, size_t len);

/* For a file split out of parley.db: when parley.db still holds tables[0],
 * copies tables[] (same columns, same order) into d's file, unless d's
 * tables[0] has rows already, in one transaction of d's; then drops them
 * from parley.db in one of its own. A crash in between leaves copies that
 * the next call drops; calls racing from several connections copy once.
 * PX_OK (also when there is nothing to move), or PX_ERROR with err. */
int sqldb_move_from_main(sqldb *d, const char *const *tables, size_t n, char *err,
                         size_t errlen);

/* Finalizes the cached statements and closes the connection. */
void sqldb_close(sqldb *d);

/* The prepared statement for sql, which must be a string literal (the
 * cache is keyed by its address). NULL with err on a bad statement or a
 * full cache. The caller holds whatever lock guards d and calls
 * sqldb_done after use. */
sqlite3_stmt *sqldb_stmt(sqldb *d, const char *sql, char *err, size_t errlen);

/* Write transactions of every connection of the process to one file take
 * that file's lock first: the services' stores write the same file, and a
 * writer that met SQLITE_BUSY would sleep in SQLite's busy handler
 * (milliseconds) instead of queueing here (microseconds). sqldb_begin: lock, BEGIN IMMEDIATE; PX_OK,
 * or PX_ERROR with err and nothing held. sqldb_end: COMMIT when rc is PX_OK
 * (else ROLLBACK), unlock; returns rc, or PX_ERROR if the commit failed. */
int sqldb_begin(sqldb *d, char *err, size_t errlen);
int sqldb_end(sqldb *d, int rc, char *err, size_t errlen);

/* A read transaction that writes at most this connection's TEMP tables (a
 * key set to join against): no process write lock and, in WAL, no wait
 * behind writers. Same contract as sqldb_begin/sqldb_end otherwise. */
int sqldb_begin_read(sqldb *d, char *err, size_t errlen);
int sqldb_end_read(sqldb *d, int rc, char *err, size_t errlen);

/* Resets s and clears its bindings for the next user (NULL is ignored). */
void sqldb_done(sqlite3_stmt *s);

#endif
