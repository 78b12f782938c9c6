/* utf8: valid text passes, every class of invalid sequence fails. */
#include "check_main.h"
#include "utf8.h"

#include <string.h>

static int valid(const char *s)
{
    return utf8_valid((const unsigned char *)s, strlen(s));
}

START_TEST(valid_text)
{
    ck_assert(valid(""));
    ck_assert(valid("hello"));
    ck_assert(valid("h\xc3\xa9llo"));             /* é */
    ck_assert(valid("\xe2\x82\xac"));             /* € */
    ck_assert(valid("\xf0\x9f\x98\x80"));         /* emoji */
    ck_assert(valid("\xf4\x8f\xbf\xbf"));         /* U+10FFFF */
}
END_TEST

START_TEST(invalid_text)
{
    ck_assert(!valid("\xff"));
    ck_assert(!valid("\xc3"));                    /* truncated */
    ck_assert(!valid("\xc0\xaf"));                /* overlong */
    ck_assert(!valid("\xe0\x80\xaf"));            /* overlong */
    ck_assert(!valid("\xed\xa0\x80"));            /* surrogate */
    ck_assert(!valid("\xf4\x90\x80\x80"));        /* > U+10FFFF */
    ck_assert(!valid("a\x80" "b"));               /* lone continuation */
    ck_assert(!valid("\xe2\x82"));                /* truncated at end */
}
END_TEST

START_TEST(counts_characters)
{
    ck_assert_uint_eq(utf8_chars((const unsigned char *)"", 0), 0);
    ck_assert_uint_eq(utf8_chars((const unsigned char *)"abc", 3), 3);
    ck_assert_uint_eq(utf8_chars((const unsigned char *)"\xc3\xa9t\xc3\xa9", 5), 3); /* été */
    ck_assert_uint_eq(utf8_chars((const unsigned char *)"\xf0\x9f\x98\x80\xe2\x82\xac", 7), 2);
}
END_TEST

static Suite *utf8_suite(void)
{
    Suite *s = suite_create("utf8");
    TCase *tc = tcase_create("utf8");
    tcase_add_test(tc, valid_text);
    tcase_add_test(tc, invalid_text);
    tcase_add_test(tc, counts_characters);
    suite_add_tcase(s, tc);
    return s;
}

PX_CHECK_MAIN(utf8_suite)
