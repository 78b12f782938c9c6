/* store_mongo against a real MongoDB-wire server (FerretDB on the local
 * stack): the store contract (store_contract.c, shared with
 * test_store_sqlite.c) plus what only a server has (an unreachable one
 * fails in bounded time).
 *
 * PARLEY_MONGO_URI names the server (default: the local stack's FerretDB).
 * Every run uses its own database, dropped at the end. Each test opens its
 * own store in the forked child (mongoc's pool threads do not survive fork). */
#include "common.h"
#include "store.h"
#include "store_contract.h"

#include <check.h>
#include <mongoc/mongoc.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define DEFAULT_URI "mongodb://127.0.0.1:27018/?retryWrites=false"

static const char *test_uri;
static char test_db[64];

store *store_contract_open(char *err, size_t errlen)
{
    return store_open(test_uri, test_db, err, errlen);
}

/* Nothing listens on port 1: open fails with a clear error (in bounded
 * time: a hang would be caught by the test's limit, 30 s). */
START_TEST(open_unreachable_fails)
{
    char err[PX_ERRLEN] = "";
    store *bad = store_open("mongodb://127.0.0.1:1/?serverSelectionTimeoutMS=500", test_db,
                            err, sizeof(err));

    ck_assert_ptr_null(bad);
    ck_assert_msg(strstr(err, "unreachable") != NULL, "err: %s", err);
    ck_assert_ptr_null(store_open("http://x", test_db, err, sizeof(err)));
    ck_assert_ptr_null(store_open(test_uri, "bad.name", err, sizeof(err)));
}
END_TEST

static Suite *store_mongo_suite(void)
{
    Suite *s = store_contract_suite("store_mongo");
    TCase *tc = tcase_create("open");
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, open_unreachable_fails);
    suite_add_tcase(s, tc);
    return s;
}

/* Test databases must not pile up on a shared server. */
static void drop_test_db(void)
{
    bson_error_t error;
    mongoc_client_t *c;
    mongoc_database_t *db;

    mongoc_init();
    /* FerretDB lacks endSessions; libmongoc's warning about it is noise here. */
    mongoc_log_set_handler(NULL, NULL);
    c = mongoc_client_new(test_uri);
    if (c == NULL)
        return;
    db = mongoc_client_get_database(c, test_db);
    if (!mongoc_database_drop(db, &error))
        fprintf(stderr, "drop %s: %s\n", test_db, error.message);
    mongoc_database_destroy(db);
    mongoc_client_destroy(c);
    mongoc_cleanup();
}

int main(void)
{
    SRunner *sr;
    int failed;

    test_uri = getenv("PARLEY_MONGO_URI");
    if (test_uri == NULL || *test_uri == '\0')
        test_uri = DEFAULT_URI;
    snprintf(test_db, sizeof(test_db), "parley_test_%ld_%lld", (long)getpid(),
             (long long)px_now_ms());
    /* One clear line instead of every test timing out when nothing listens.
     * The probe's pool is destroyed before check forks the tests. */
    {
        char err[PX_ERRLEN] = "";
        store *probe = store_open(test_uri, test_db, err, sizeof(err));
        if (probe == NULL) {
            fprintf(stderr, "test_store_mongo: no server at PARLEY_MONGO_URI=%s (%s); "
                    "start one with: make stack-start\n", test_uri, err);
            return EXIT_FAILURE;
        }
        store_close(probe);
    }
    sr = srunner_create(store_mongo_suite());
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    drop_test_db();
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
