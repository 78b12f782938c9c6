/* store_sqlite (parleyd's store) against the store contract
 * (store_contract.c), in a data folder of its own, removed at the end; and
 * the migration of a data folder written by an earlier build. */
#include "common.h"
#include "store.h"
#include "store_contract.h"

#include <check.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

store *store_contract_open(char *err, size_t errlen)
{
    return store_open("sqlite", "parley", err, errlen);
}

/* The first column of the first row of sql on the data folder's file, or -1. */
static long long sql_count(const char *dir, const char *file, const char *sql)
{
    char path[128];
    sqlite3 *db = NULL;
    sqlite3_stmt *s = NULL;
    long long n = -1;
    snprintf(path, sizeof(path), "%s/%s", dir, file);
    if (sqlite3_open(path, &db) == SQLITE_OK &&
        sqlite3_prepare_v2(db, sql, -1, &s, NULL) == SQLITE_OK && sqlite3_step(s) == SQLITE_ROW)
        n = sqlite3_column_int64(s, 0);
    sqlite3_finalize(s);
    sqlite3_close(db);
    return n;
}

static int count_track(void *arg, const store_track *t)
{
    (*(int *)arg) += strcmp(t->sender, "s-old") == 0;
    return PX_OK;
}

/* A data folder from before seen claims (453f65d): its seen table, in
 * parley.db, has no tag column (the other tables are made as they are
 * missing). Opened by this build, the column is added and the claims move
 * to seen.db, the receipt tracking to track.db; keys marked back then read
 * as held by another record, so still duplicates; new keys are claimed as
 * usual; the tracking is found where it moved. */
START_TEST(claims_and_tracking_of_an_old_data_folder_move_out)
{
    char dir[] = "/tmp/parley-store-old.XXXXXX", path[128], err[PX_ERRLEN] = "";
    ck_assert_ptr_nonnull(mkdtemp(dir));
    snprintf(path, sizeof(path), "%s/parley.db", dir);
    sqlite3 *db = NULL;
    ck_assert_int_eq(sqlite3_open(path, &db), SQLITE_OK);
    ck_assert_int_eq(sqlite3_exec(db, "CREATE TABLE seen (key TEXT PRIMARY KEY, ts INTEGER) "
                                  "WITHOUT ROWID; CREATE INDEX seen_ts ON seen (ts);"
                                  "INSERT INTO seen VALUES ('k-old', 1000);"
                                  "CREATE TABLE track (reader TEXT NOT NULL, msg_id TEXT NOT NULL,"
                                  " sender TEXT, grp TEXT, ts INTEGER, PRIMARY KEY (reader, msg_id))"
                                  " WITHOUT ROWID; CREATE INDEX track_ts ON track (ts);"
                                  "INSERT INTO track VALUES ('r-old', 'm-old', 's-old', NULL, 1000);",
                                  NULL, NULL, NULL),
                     SQLITE_OK);
    sqlite3_close(db);
    setenv("PARLEY_DATA_DIR", dir, 1);
    for (int round = 0; round < 2; round++) { /* the second open finds it migrated */
        store *st = store_open("sqlite", "parley", err, sizeof(err));
        ck_assert_msg(st != NULL, "open #%d: %s", round + 1, err);
        const char *keys[] = { "k-old", "k-new", "k-new" }, *tags[] = { "t1", "t1", "t2" };
        int fresh[3] = { -1, -1, -1 };
        ck_assert_msg(store_seen_claim(st, keys, tags, 3, 2000, fresh, err, sizeof(err)) == PX_OK,
                      "claim: %s", err);
        ck_assert_int_eq(fresh[0], 0); /* marked by the old build: a duplicate */
        ck_assert_int_eq(fresh[1], 1); /* claimed by t1 (again in round 2: a redelivery) */
        ck_assert_int_eq(fresh[2], 0); /* a resend under another tag */
        store_track key = { .reader = "r-old", .msg_id = "m-old" };
        int found = 0;
        ck_assert_msg(store_track_get(st, &key, 1, count_track, &found, err, sizeof(err)) ==
                      PX_OK, "track get: %s", err);
        ck_assert_int_eq(found, 1);
        store_close(st);
        ck_assert_int_eq(sql_count(dir, "parley.db", "SELECT count(*) FROM sqlite_master"
                                   " WHERE name = 'seen'"), 0);
        ck_assert_int_eq(sql_count(dir, "seen.db", "SELECT count(*) FROM seen"), 2);
        ck_assert_int_eq(sql_count(dir, "parley.db", "SELECT count(*) FROM sqlite_master"
                                   " WHERE name = 'track'"), 0);
        ck_assert_int_eq(sql_count(dir, "track.db", "SELECT count(*) FROM track"), 1);
    }
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    ck_assert_int_eq(system(cmd), 0);
}
END_TEST

enum { RACE_OPENERS = 6, RACE_ROUNDS = 20 };

static void *race_open(void *arg)
{
    char err[PX_ERRLEN] = "";
    store *st = store_open("sqlite", "parley", err, sizeof(err));
    if (st == NULL)
        fprintf(stderr, "race open: %s\n", err);
    store_close(st);
    return st != NULL ? arg : NULL;
}

/* parleyd opens a store per service at once, each on its own thread: on
 * an older folder they all find the tables to move, and every open must
 * succeed, whoever moves them. Empty tables are the hard case: a copy of
 * one leaves no rows by which a later opener could tell it was done. */
START_TEST(stores_opened_at_once_move_old_tables_once)
{
    char dir[] = "/tmp/parley-store-race.XXXXXX", path[128], cmd[128];
    ck_assert_ptr_nonnull(mkdtemp(dir));
    snprintf(path, sizeof(path), "%s/parley.db", dir);
    snprintf(cmd, sizeof(cmd), "rm -f '%s'/*", dir);
    setenv("PARLEY_DATA_DIR", dir, 1);
    for (int round = 0; round < RACE_ROUNDS; round++) {
        ck_assert_int_eq(system(cmd), 0);
        sqlite3 *db = NULL;
        ck_assert_int_eq(sqlite3_open(path, &db), SQLITE_OK);
        ck_assert_int_eq(sqlite3_exec(db, "PRAGMA journal_mode=WAL;"
                                      "CREATE TABLE seen (key TEXT PRIMARY KEY, ts INTEGER,"
                                      " tag TEXT) WITHOUT ROWID;"
                                      "CREATE TABLE track (reader TEXT NOT NULL, msg_id TEXT"
                                      " NOT NULL, sender TEXT, grp TEXT, ts INTEGER,"
                                      " PRIMARY KEY (reader, msg_id)) WITHOUT ROWID;"
                                      "INSERT INTO track VALUES ('r', 'm', 's', NULL, 1);",
                                      NULL, NULL, NULL), SQLITE_OK);
        sqlite3_close(db);
        pthread_t th[RACE_OPENERS];
        int ok = 0;
        for (int i = 0; i < RACE_OPENERS; i++)
            ck_assert_int_eq(pthread_create(&th[i], NULL, race_open, &ok), 0);
        int opened = 0;
        for (int i = 0; i < RACE_OPENERS; i++) {
            void *r = NULL;
            pthread_join(th[i], &r);
            opened += r != NULL;
        }
        ck_assert_msg(opened == RACE_OPENERS, "round %d: %d of %d opens failed", round,
                      RACE_OPENERS - opened, RACE_OPENERS);
        ck_assert_int_eq(sql_count(dir, "parley.db", "SELECT count(*) FROM sqlite_master"
                                   " WHERE name IN ('seen', 'track')"), 0);
        ck_assert_int_eq(sql_count(dir, "track.db", "SELECT count(*) FROM track"), 1);
        ck_assert_int_eq(sql_count(dir, "seen.db", "SELECT count(*) FROM seen"), 0);
    }
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    ck_assert_int_eq(system(cmd), 0);
}
END_TEST

int main(void)
{
    char dir[] = "/tmp/parley-store-test.XXXXXX";
    if (mkdtemp(dir) == NULL) {
        perror("mkdtemp");
        return EXIT_FAILURE;
    }
    setenv("PARLEY_DATA_DIR", dir, 1);
    Suite *s = store_contract_suite("store_sqlite");
    TCase *tc = tcase_create("migration");
    tcase_add_test(tc, claims_and_tracking_of_an_old_data_folder_move_out);
    tcase_add_test(tc, stores_opened_at_once_move_old_tables_once);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", dir);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
