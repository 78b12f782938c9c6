/* log: the counted summaries (log_tally_add) that stand in for one line
 * per event an attacker can trigger at will. stderr goes to a file read
 * back by the test (fork mode: each test has its own). */
#include "check_main.h"
#include "log.h"

#include <stdio.h>
#include <string.h>
#include <unistd.h>

/* Points stderr at a fresh temporary file; returns it for reading back. */
static FILE *log_capture(void)
{
    FILE *f = tmpfile();
    ck_assert_ptr_nonnull(f);
    ck_assert_int_ge(dup2(fileno(f), STDERR_FILENO), 0);
    log_init("test", "info");
    return f;
}

static int log_lines(FILE *f, const char *needle, char *last, size_t lastlen)
{
    char line[1024];
    int n = 0;
    fflush(stderr);
    rewind(f);
    while (fgets(line, sizeof(line), f) != NULL)
        if (strstr(line, needle) != NULL) {
            n++;
            snprintf(last, lastlen, "%s", line);
        }
    return n;
}

START_TEST(a_flood_makes_one_line)
{
    static log_tally t = LOG_TALLY_INIT("things refused");
    FILE *f = log_capture();
    for (int i = 0; i < 100000; i++)
        log_tally_add(&t, "who");
    char last[1024] = "";
    ck_assert_int_eq(log_lines(f, "things refused", last, sizeof(last)), 1);
    ck_assert_ptr_nonnull(strstr(last, "\"count\":1,")); /* the first one at once */
    ck_assert_ptr_nonnull(strstr(last, "\"last\":\"who\""));
}
END_TEST

/* The next line, once the interval passed, carries the count in between. */
START_TEST(the_next_line_counts_what_was_held)
{
    static log_tally t = LOG_TALLY_INIT("things refused");
    FILE *f = log_capture();
    for (int i = 0; i < 500; i++)
        log_tally_add(&t, "a");
    t.last_ms -= LOG_TALLY_MS; /* as if the interval had passed */
    log_tally_add(&t, "b");
    char last[1024] = "";
    ck_assert_int_eq(log_lines(f, "things refused", last, sizeof(last)), 2);
    ck_assert_ptr_nonnull(strstr(last, "\"count\":500,"));
    ck_assert_ptr_nonnull(strstr(last, "\"last\":\"b\""));
}
END_TEST

static Suite *log_suite(void)
{
    Suite *s = suite_create("log");
    TCase *tc = tcase_create("tally");
    tcase_add_test(tc, a_flood_makes_one_line);
    tcase_add_test(tc, the_next_line_counts_what_was_held);
    suite_add_tcase(s, tc);
    return s;
}

PX_CHECK_MAIN(log_suite)
