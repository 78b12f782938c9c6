/* ids: uniqueness, time order, deterministic send ids, user id rules. */
#include "check_main.h"
#include "common.h"
#include "ids.h"

#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static int cmp_str(const void *a, const void *b)
{
    return strcmp((const char *)a, (const char *)b);
}

START_TEST(unique_and_ordered_in_process)
{
    enum { N = 20000 };
    char(*ids)[ID_BUF] = malloc(sizeof(*ids) * N);
    for (int i = 0; i < N; i++) {
        id_new(ids[i]);
        ck_assert_int_eq(strlen(ids[i]), ID_LEN);
        if (i > 0)
            ck_assert_int_lt(strcmp(ids[i - 1], ids[i]), 0);
    }
    free(ids);
}
END_TEST

START_TEST(unique_across_processes)
{
    enum { PROCS = 4, PER = 2000 };
    int fds[2];
    ck_assert_int_eq(pipe(fds), 0);
    for (int p = 0; p < PROCS; p++) {
        if (fork() == 0) {
            for (int i = 0; i < PER; i++) {
                char id[ID_BUF];
                id_new(id);
                if (write(fds[1], id, ID_BUF) != ID_BUF)
                    _exit(1);
            }
            _exit(0);
        }
    }
    close(fds[1]);
    char(*all)[ID_BUF] = malloc(sizeof(*all) * PROCS * PER);
    size_t n = 0;
    while (n < PROCS * PER && read(fds[0], all[n], ID_BUF) == ID_BUF)
        n++;
    for (int p = 0; p < PROCS; p++)
        wait(NULL);
    ck_assert_int_eq(n, PROCS * PER);
    qsort(all, n, ID_BUF, cmp_str);
    for (size_t i = 1; i < n; i++)
        ck_assert_int_ne(strcmp(all[i - 1], all[i]), 0);
    free(all);
}
END_TEST

START_TEST(time_prefix_orders_across_ms)
{
    char a[ID_BUF], b[ID_BUF];
    id_new(a);
    usleep(3000);
    id_new(b);
    ck_assert_int_lt(strncmp(a, b, 10), 0);
}
END_TEST

START_TEST(send_id_deterministic)
{
    char a[ID_BUF], b[ID_BUF], c[ID_BUF], d[ID_BUF];
    id_for_send("alice", "c1", a);
    id_for_send("alice", "c1", b);
    id_for_send("alice", "c2", c);
    id_for_send("alic", "ec1", d);
    ck_assert_str_eq(a, b);
    ck_assert_str_ne(a, c);
    ck_assert_str_ne(a, d);
    ck_assert_int_eq(strlen(a), ID_LEN);
}
END_TEST

START_TEST(receipt_id_deterministic)
{
    char a[ID_BUF], b[ID_BUF], c[ID_BUF], d[ID_BUF], e[ID_BUF];
    id_for_receipt("M1", "bob", "delivered", a);
    id_for_receipt("M1", "bob", "delivered", b);
    id_for_receipt("M1", "bob", "read", c);
    id_for_receipt("M1", "carol", "delivered", d);
    id_for_receipt("M1b", "ob", "delivered", e); /* field boundaries matter */
    ck_assert_str_eq(a, b);
    ck_assert_str_ne(a, c);
    ck_assert_str_ne(a, d);
    ck_assert_str_ne(a, e);
    ck_assert_int_eq(strlen(a), ID_LEN);
}
END_TEST

START_TEST(user_id_rules)
{
    ck_assert(id_valid_user("alice"));
    ck_assert(id_valid_user("A.b_c-9"));
    ck_assert(!id_valid_user(""));
    ck_assert(!id_valid_user("bob smith"));
    ck_assert(!id_valid_user("bob/1"));
    char long_id[66];
    memset(long_id, 'a', 65);
    long_id[65] = '\0';
    ck_assert(!id_valid_user(long_id));
    long_id[64] = '\0';
    ck_assert(id_valid_user(long_id));
    ck_assert(id_valid_client("c 1"));
    ck_assert(!id_valid_client("c\n1"));
}
END_TEST

/* Secret ids share no time prefix: two taken in a row differ from their
 * first characters on (time-ordered ids keep the first 6 for ~17 min). */
START_TEST(secret_ids_have_no_time_prefix)
{
    char a[ID_BUF], b[ID_BUF];
    int alike = 0;
    for (int i = 0; i < 8; i++) {
        id_secret(a);
        id_secret(b);
        ck_assert_int_eq(strlen(a), ID_LEN);
        alike += strncmp(a, b, 6) == 0;
    }
    ck_assert_int_eq(alike, 0);
}
END_TEST

static Suite *ids_suite(void)
{
    Suite *s = suite_create("ids");
    TCase *tc = tcase_create("ids");
    tcase_add_test(tc, unique_and_ordered_in_process);
    tcase_add_test(tc, unique_across_processes);
    tcase_add_test(tc, time_prefix_orders_across_ms);
    tcase_add_test(tc, send_id_deterministic);
    tcase_add_test(tc, receipt_id_deterministic);
    tcase_add_test(tc, user_id_rules);
    tcase_add_test(tc, secret_ids_have_no_time_prefix);
    suite_add_tcase(s, tc);
    return s;
}

PX_CHECK_MAIN(ids_suite)
