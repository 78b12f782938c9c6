/* What store_mongo*.c share (not part of store.h): the store handle and its
 * pooled connections, argument checks, bulk inserts that absorb duplicate
 * keys, and queries run side by side on the pool (sm_each, store_mongo.c).
 * Internal names carry the sm_ (store_mongo) prefix. */
#ifndef PARLEY_STORE_MONGO_INT_H
#define PARLEY_STORE_MONGO_INT_H

#include "store.h"
#include "common.h"

#include <mongoc/mongoc.h>
#include <pthread.h>

#include <stdbool.h>
#include <stdint.h>

#define SM_MAX_BATCH STORE_MAX_BATCH
#define SM_SELECT_MS 3000       /* serverSelectionTimeoutMS unless the URI says */
/* socketTimeoutMS unless the URI says (mongoc's own is 300 s): a server
 * that hangs (stopped, network black hole) turns every call into an error
 * the caller's batch retries after this long, not after 5 minutes. Long
 * enough for the longest legitimate round trip: the retention sweeps'
 * unbounded delete_many and 10,000-document bulk puts under a majority,
 * journaled write concern take seconds on FerretDB over PostgreSQL. */
#define SM_SOCKET_MS 30000
/* Bound on a ping (/readyz, store_open's readiness loop): socket, connect
 * and server selection timeouts of the ping's own pool, under the 2 s a
 * probe commonly waits, so a hung server answers "not ready" quickly
 * instead of holding the HTTP thread for SM_SOCKET_MS. */
#define SM_PING_MS 1500
#define SM_WTIMEOUT_MS 10000    /* majority write concern wait */
#define SM_RETRY_SLEEP_MS 200   /* between readiness pings in store_open */
#define SM_SCAN_BATCH 1000      /* cursor batch size: few round trips per sync */
#define SM_DUP_KEY 11000        /* server code for a unique index violation */
#define SM_MAX_GATEWAY 64       /* store_presence_lookup writes char[65] */
#define SM_CONCURRENCY 4        /* calls worth running side by side (pool clients) */
#define SM_MAX_PRESENCE 4096    /* ceiling on one user's connection records read */
#define SM_MAX_DB_NAME 63

/* Retention sweeps by day bucket (sm_sweep): the collections swept that
 * way and when each one's next whole-collection sweep is due. */
#define SM_SWEEP_COLLS 4
#define SM_DAY_MS 86400000LL
/* Whole days below the cutoff's day that each sweep deletes by bucket: a
 * record stamped more than this before the cutoff (a store written while
 * every sweeper was down that long) waits for the daily full sweep. */
#define SM_SWEEP_DAYS_BACK 45

struct store {
    mongoc_client_pool_t *pool;
    mongoc_client_pool_t *ping;   /* store_ping only: short timeouts, own connections */
    char *db;
    pthread_mutex_t sweep_mu;     /* guards full_due_ms */
    int64_t full_due_ms[SM_SWEEP_COLLS];
};

/* A pooled client and one of its collections, for the length of one call. */
typedef struct sm_conn {
    mongoc_client_t *c;
    mongoc_collection_t *coll;
} sm_conn;

/* One query of a set run by sm_each: a find (copies of the documents kept)
 * or a delete_many. */
typedef struct sm_op {
    bson_t filter;
    bson_t **docs;          /* find: copies of the documents found */
    size_t ndocs, cap;
    int64_t removed;        /* delete: documents removed */
    int rc;
    char err[PX_ERRLEN];
} sm_op;

/* The day bucket of a time (floor: times before 1970 are the tests' only). */
static inline int64_t sm_day(int64_t ts_ms)
{
    return ts_ms >= 0 ? ts_ms / SM_DAY_MS : -((-ts_ms + SM_DAY_MS - 1) / SM_DAY_MS);
}
void sm_append_ts(bson_t *doc, int64_t ts_ms);
int sm_fail(char *err, size_t errlen, const char *what, const bson_error_t *e);
void sm_conn_get(store *st, const char *coll, sm_conn *sc);
void sm_conn_put(store *st, sm_conn *sc);
int sm_text_ok(const char *s, size_t len);
int sm_str_ok(const char *s);
int sm_check_n(size_t n, const char *what, char *err, size_t errlen);
int sm_check_strs(const char *const *v, size_t n, const char *what,
                  char *err, size_t errlen);
void sm_append_str_array(bson_t *parent, const char *key, const char *const *v, size_t n);
int sm_iter_int64(const bson_iter_t *it, int64_t *out);
void sm_append_lt_date(bson_t *filter, const char *field, int64_t cutoff_ms);
mongoc_bulk_operation_t *sm_bulk_new(sm_conn *sc, bool ordered);
int sm_bulk_write_errors(const bson_t *reply, size_t n, int *inserted, size_t *dups,
                         const char *what, char *err, size_t errlen);
int sm_bulk_wc_errors(const bson_t *reply, const char *what, char *err, size_t errlen);
int sm_bulk_insert_run(mongoc_bulk_operation_t *bulk, size_t n, int *inserted,
                       const char *what, char *err, size_t errlen);
int sm_delete_many(sm_conn *sc, const bson_t *filter, int64_t *removed, const char *what,
                   char *err, size_t errlen);
int sm_each(store *st, const char *coll, sm_op *ops, size_t n, int del,
            const char *what, char *err, size_t errlen);
void sm_ops_free(sm_op *ops, size_t n);
sm_op *sm_ops_by(const char *key, const char *const *v, size_t n, size_t *nops);
sm_op *sm_ops_by_id(const char *const *v, size_t n, size_t *nops);
int sm_sweep(store *st, const char *coll, int64_t cutoff_ms, int64_t *removed,
             const char *what, char *err, size_t errlen);
int sm_count(store *st, const char *coll, const bson_t *filter, int64_t *count,
             const char *what, char *err, size_t errlen);
int sm_count_user(store *st, const char *coll, const char *user, int64_t *count,
                  const char *what, char *err, size_t errlen);

#endif
