/* httprange: the one-range forms served, the rest answered whole, the
 * unsatisfiable refused; fuzz/fuzz_range.c's findings kept here. */
#include "check_main.h"
#include "common.h"
#include "httprange.h"

START_TEST(one_range_forms)
{
    static const struct {
        const char *h;
        uint64_t size;
        int rc;
        uint64_t start, len;
    } cases[] = {
        { "bytes=0-99", 1000, PX_OK, 0, 100 },
        { "bytes=500-", 1000, PX_OK, 500, 500 },
        { "bytes=-100", 1000, PX_OK, 900, 100 },
        { "bytes=-5000", 1000, PX_OK, 0, 1000 },
        { "bytes=990-5000", 1000, PX_OK, 990, 10 },
        { "bytes=1000-", 1000, PX_DECLINED, 0, 0 },
        { "bytes=-0", 1000, PX_DECLINED, 0, 0 },
        /* fuzz_range: a suffix of an empty file was "served" as 0 bytes
         * at 0 (Content-Range "bytes 0--1/0"); it is unsatisfiable. */
        { "bytes=-100", 0, PX_DECLINED, 0, 0 },
        { "bytes=0-", 0, PX_DECLINED, 0, 0 },
        { "bytes=0-1,5-6", 1000, PX_AGAIN, 0, 0 },
        { "items=0-1", 1000, PX_AGAIN, 0, 0 },
        { "bytes=9-3", 1000, PX_AGAIN, 0, 0 },
        { NULL, 1000, PX_AGAIN, 0, 0 },
    };
    for (size_t i = 0; i < PX_ARRAY_LEN(cases); i++) {
        uint64_t start = 0, len = 0;
        int rc = httprange_parse(cases[i].h, cases[i].size, &start, &len);
        ck_assert_msg(rc == cases[i].rc, "%s of %llu: %d", cases[i].h ? cases[i].h : "(none)",
                      (unsigned long long)cases[i].size, rc);
        if (rc == PX_OK) {
            ck_assert_uint_eq(start, cases[i].start);
            ck_assert_uint_eq(len, cases[i].len);
        }
    }
}
END_TEST

static Suite *httprange_suite(void)
{
    Suite *s = suite_create("httprange");
    TCase *tc = tcase_create("parse");
    tcase_add_test(tc, one_range_forms);
    suite_add_tcase(s, tc);
    return s;
}

PX_CHECK_MAIN(httprange_suite)
