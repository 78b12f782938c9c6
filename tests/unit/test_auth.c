/* auth: HS256 tokens accepted and every kind of bad token refused. */
#include "check_main.h"
#include "auth.h"
#include "common.h"

#include <string.h>

static const char *secret = "test-secret";
static const int64_t now = 1800000000;

START_TEST(valid_token)
{
    char tok[AUTH_TOKEN_MAX], user[65], err[PX_ERRLEN];
    ck_assert_int_eq(auth_sign(secret, "alice", now, now + 60, tok, sizeof(tok)), PX_OK);
    ck_assert_int_eq(auth_verify(secret, tok, now, user, err, sizeof(err)), PX_OK);
    ck_assert_str_eq(user, "alice");
}
END_TEST

START_TEST(expired_token)
{
    char tok[AUTH_TOKEN_MAX], user[65], err[PX_ERRLEN];
    auth_sign(secret, "alice", now - 120, now - 60, tok, sizeof(tok));
    ck_assert_int_eq(auth_verify(secret, tok, now, user, err, sizeof(err)), PX_ERROR);
    ck_assert_ptr_nonnull(strstr(err, "expired"));
}
END_TEST

START_TEST(alg_none_refused)
{
    /* {"alg":"none","typ":"JWT"} . {"sub":"alice","exp":9999999999} . (empty) */
    const char *tok = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0."
                      "eyJzdWIiOiJhbGljZSIsImV4cCI6OTk5OTk5OTk5OX0.";
    char user[65], err[PX_ERRLEN];
    ck_assert_int_eq(auth_verify(secret, tok, now, user, err, sizeof(err)), PX_ERROR);
    ck_assert_ptr_nonnull(strstr(err, "HS256"));
}
END_TEST

START_TEST(bad_signature_refused)
{
    char tok[AUTH_TOKEN_MAX], user[65], err[PX_ERRLEN];
    auth_sign("other-secret", "alice", now, now + 60, tok, sizeof(tok));
    ck_assert_int_eq(auth_verify(secret, tok, now, user, err, sizeof(err)), PX_ERROR);
    ck_assert_ptr_nonnull(strstr(err, "signature"));
    /* A changed claim with the old signature fails too. */
    auth_sign(secret, "alice", now, now + 60, tok, sizeof(tok));
    char *dot = strchr(tok, '.');
    dot[3] = dot[3] == 'A' ? 'B' : 'A';
    ck_assert_int_eq(auth_verify(secret, tok, now, user, err, sizeof(err)), PX_ERROR);
}
END_TEST

START_TEST(malformed_refused)
{
    const char *bad[] = { "", "abc", "a.b", "a.b.c.d", "!!!.###.$$$",
                          "eyJhbGciOiJIUzI1NiJ9.bm90IGpzb24.c2ln" };
    char user[65], err[PX_ERRLEN];
    for (size_t i = 0; i < PX_ARRAY_LEN(bad); i++)
        ck_assert_int_eq(auth_verify(secret, bad[i], now, user, err, sizeof(err)), PX_ERROR);
    char huge[AUTH_TOKEN_MAX + 10];
    memset(huge, 'a', sizeof(huge) - 1);
    huge[sizeof(huge) - 1] = '\0';
    ck_assert_int_eq(auth_verify(secret, huge, now, user, err, sizeof(err)), PX_ERROR);
}
END_TEST

START_TEST(bad_subject_refused)
{
    char tok[AUTH_TOKEN_MAX];
    ck_assert_int_eq(auth_sign(secret, "bad user", now, now + 60, tok, sizeof(tok)), PX_ERROR);
    ck_assert_int_eq(auth_sign(NULL, "alice", now, now + 60, tok, sizeof(tok)), PX_ERROR);
}
END_TEST

static Suite *auth_suite(void)
{
    Suite *s = suite_create("auth");
    TCase *tc = tcase_create("jwt");
    tcase_add_test(tc, valid_token);
    tcase_add_test(tc, expired_token);
    tcase_add_test(tc, alg_none_refused);
    tcase_add_test(tc, bad_signature_refused);
    tcase_add_test(tc, malformed_refused);
    tcase_add_test(tc, bad_subject_refused);
    suite_add_tcase(s, tc);
    return s;
}

PX_CHECK_MAIN(auth_suite)
