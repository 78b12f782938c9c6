/* sqldb's WAL upkeep (libcommon/sqldb.c): under steady writes with a
 * reader always at work, as in parleyd under load, the log is copied back
 * and started again, so its file stays bounded; and the process's last
 * close leaves no log behind. Sizes, not timings, are asserted. */
#include "common.h"
#include "sqldb.h"

#include <check.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define WAL_ROW_BYTES (256 << 10)
#define WAL_ROWS_PER_TX 4             /* 1 MiB per transaction */
#define WAL_TXS 200                   /* 200 MiB written in all */
#define WAL_MAX_BYTES (64LL << 20)    /* PASSIVE checkpoints alone: 94-98 MiB */

static char wal_dir[] = "/tmp/parley-wal-test.XXXXXX";
static atomic_int wal_stop;

static long long wal_file_bytes(void)
{
    char path[256];
    struct stat sb;
    snprintf(path, sizeof(path), "%s/parley.db-wal", wal_dir);
    return stat(path, &sb) == 0 ? (long long)sb.st_size : -1;
}

/* Short read transactions back to back, as the bus consumers run them. */
static void *wal_reader(void *arg)
{
    (void)arg;
    sqldb d;
    char err[256];
    ck_assert_int_eq(sqldb_open(&d, err, sizeof(err)), PX_OK);
    while (!atomic_load(&wal_stop)) {
        sqlite3_exec(d.db, "BEGIN; SELECT count(*) FROM w; COMMIT;", NULL, NULL, NULL);
        sched_yield();
    }
    sqldb_close(&d);
    return NULL;
}

static void wal_write_tx(sqldb *d, const void *blob)
{
    char err[256];
    ck_assert_int_eq(sqldb_begin(d, err, sizeof(err)), PX_OK);
    sqlite3_stmt *s = sqldb_stmt(d, "INSERT INTO w (v) VALUES (?)", err, sizeof(err));
    ck_assert_ptr_nonnull(s);
    int rc = PX_OK;
    for (int i = 0; i < WAL_ROWS_PER_TX && rc == PX_OK; i++) {
        sqlite3_bind_blob(s, 1, blob, WAL_ROW_BYTES, SQLITE_STATIC);
        rc = sqlite3_step(s) == SQLITE_DONE ? PX_OK : PX_ERROR;
        sqldb_done(s);
    }
    ck_assert_int_eq(sqldb_end(d, rc, err, sizeof(err)), PX_OK);
    /* Old rows go, so the database itself stays small too. */
    ck_assert_int_eq(sqldb_begin(d, err, sizeof(err)), PX_OK);
    sqlite3_exec(d->db, "DELETE FROM w WHERE id < (SELECT max(id) - 8 FROM w)", NULL, NULL, NULL);
    ck_assert_int_eq(sqldb_end(d, PX_OK, err, sizeof(err)), PX_OK);
}

START_TEST(wal_stays_bounded_under_readers)
{
    sqldb d;
    char err[256];
    ck_assert_int_eq(sqldb_open(&d, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(sqlite3_exec(d.db, "CREATE TABLE IF NOT EXISTS w (id INTEGER PRIMARY KEY,"
                                  " v BLOB)", NULL, NULL, NULL), SQLITE_OK);
    pthread_t rd;
    atomic_store(&wal_stop, 0);
    ck_assert_int_eq(pthread_create(&rd, NULL, wal_reader, NULL), 0);
    void *blob = px_calloc(1, WAL_ROW_BYTES);
    long long most = 0;
    for (int t = 0; t < WAL_TXS; t++) {
        memset(blob, t & 0xff, WAL_ROW_BYTES);
        wal_write_tx(&d, blob);
        most = PX_MAX(most, wal_file_bytes());
        /* The checkpointer runs beside the writers; a writer that never
         * pauses on 2 shared cores would measure the scheduler instead. */
        usleep(5000);
    }
    atomic_store(&wal_stop, 1);
    pthread_join(rd, NULL);
    free(blob);
    printf("report: wal: %d MiB written beside a reader, log file at most %lld MiB "
           "(bound %lld MiB)\n", WAL_TXS * WAL_ROWS_PER_TX * (WAL_ROW_BYTES >> 10) >> 10,
           most >> 20, WAL_MAX_BYTES >> 20);
    ck_assert_int_gt(most, 0);
    ck_assert_int_lt(most, WAL_MAX_BYTES);
    sqldb_close(&d);
    ck_assert_int_eq(wal_file_bytes(), -1);
}
END_TEST

/* One service's last close racing another's first open of the same file
 * (parleyd's services start and stop on threads of their own): each
 * thread opens and closes WAL_CYCLES times, so the process's checkpointer
 * stops and starts over and over. The unref used to join and close the
 * checkpointer a concurrent ref had just started (a hang, or a checkpoint
 * on a NULL handle under ASan); every cycle must come back. */
#define WAL_CYCLES 300

static void *wal_cycler(void *arg)
{
    sqldb d;
    char err[256];
    for (int i = 0; i < WAL_CYCLES; i++) {
        if (sqldb_open(&d, err, sizeof(err)) != PX_OK)
            return arg;
        sqlite3_exec(d.db, "INSERT INTO w (v) VALUES (x'00')", NULL, NULL, NULL);
        sqldb_close(&d);
    }
    return NULL;
}

START_TEST(open_and_close_race_safely)
{
    static int tag;
    pthread_t th[3];
    void *failed[3];
    for (int i = 0; i < 3; i++)
        ck_assert_int_eq(pthread_create(&th[i], NULL, wal_cycler, &tag), 0);
    for (int i = 0; i < 3; i++)
        pthread_join(th[i], &failed[i]);
    for (int i = 0; i < 3; i++)
        ck_assert_msg(failed[i] == NULL, "an open failed in cycler %d", i);
    printf("report: wal: 3 threads opened and closed the file %d times each\n", WAL_CYCLES);
}
END_TEST

int main(void)
{
    if (mkdtemp(wal_dir) == NULL) {
        perror("mkdtemp");
        return EXIT_FAILURE;
    }
    setenv("PARLEY_DATA_DIR", wal_dir, 1);
    Suite *s = suite_create("wal_sqlite");
    TCase *tc = tcase_create("wal");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, wal_stays_bounded_under_readers);
    tcase_add_test(tc, open_and_close_race_safely);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_set_fork_status(sr, CK_NOFORK);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", wal_dir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", wal_dir);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
