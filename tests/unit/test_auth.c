/* auth: HS256 tokens accepted and every kind of bad token refused (the
 * asymmetric algorithms and the JWKS file: test_jwks.c). */
#include "check_main.h"
#include "auth.h"
#include "common.h"

#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <stdio.h>
#include <string.h>

static const char *secret = "test-secret";
static const int64_t now = 1800000000;
static const int64_t TTL = 30 * 86400;
static auth *hs; /* HS256 with secret, made before the tests fork */

START_TEST(valid_token)
{
    char tok[AUTH_TOKEN_MAX], user[65], err[PX_ERRLEN];
    ck_assert_int_eq(auth_sign(secret, "alice", now, now + 60, tok, sizeof(tok)), PX_OK);
    ck_assert_int_eq(auth_verify(hs, tok, now, user, err, sizeof(err)), PX_OK);
    ck_assert_str_eq(user, "alice");
}
END_TEST

START_TEST(expired_token)
{
    char tok[AUTH_TOKEN_MAX], user[65], err[PX_ERRLEN];
    auth_sign(secret, "alice", now - 120, now - 60, tok, sizeof(tok));
    ck_assert_int_eq(auth_verify(hs, tok, now, user, err, sizeof(err)), PX_ERROR);
    ck_assert_ptr_nonnull(strstr(err, "expired"));
}
END_TEST

START_TEST(alg_none_refused)
{
    /* {"alg":"none","typ":"JWT"} . {"sub":"alice","exp":9999999999} . (empty) */
    const char *tok = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0."
                      "eyJzdWIiOiJhbGljZSIsImV4cCI6OTk5OTk5OTk5OX0.";
    char user[65], err[PX_ERRLEN];
    ck_assert_int_eq(auth_verify(hs, tok, now, user, err, sizeof(err)), PX_ERROR);
    ck_assert_ptr_nonnull(strstr(err, "HS256"));
}
END_TEST

START_TEST(bad_signature_refused)
{
    char tok[AUTH_TOKEN_MAX], user[65], err[PX_ERRLEN];
    auth_sign("other-secret", "alice", now, now + 60, tok, sizeof(tok));
    ck_assert_int_eq(auth_verify(hs, tok, now, user, err, sizeof(err)), PX_ERROR);
    ck_assert_ptr_nonnull(strstr(err, "signature"));
    /* A changed claim with the old signature fails too. */
    auth_sign(secret, "alice", now, now + 60, tok, sizeof(tok));
    char *dot = strchr(tok, '.');
    dot[3] = dot[3] == 'A' ? 'B' : 'A';
    ck_assert_int_eq(auth_verify(hs, tok, now, user, err, sizeof(err)), PX_ERROR);
}
END_TEST

START_TEST(malformed_refused)
{
    const char *bad[] = { "", "abc", "a.b", "a.b.c.d", "!!!.###.$$$",
                          "eyJhbGciOiJIUzI1NiJ9.bm90IGpzb24.c2ln" };
    char user[65], err[PX_ERRLEN];
    for (size_t i = 0; i < PX_ARRAY_LEN(bad); i++)
        ck_assert_int_eq(auth_verify(hs, bad[i], now, user, err, sizeof(err)), PX_ERROR);
    char huge[AUTH_TOKEN_MAX + 10];
    memset(huge, 'a', sizeof(huge) - 1);
    huge[sizeof(huge) - 1] = '\0';
    ck_assert_int_eq(auth_verify(hs, huge, now, user, err, sizeof(err)), PX_ERROR);
}
END_TEST

START_TEST(bad_subject_refused)
{
    char tok[AUTH_TOKEN_MAX];
    ck_assert_int_eq(auth_sign(secret, "bad user", now, now + 60, tok, sizeof(tok)), PX_ERROR);
    ck_assert_int_eq(auth_sign(NULL, "alice", now, now + 60, tok, sizeof(tok)), PX_ERROR);
}
END_TEST

/* base64url without padding, as JWT wants it (OpenSSL's encoder, mapped). */
static void b64url(const void *in, size_t n, char *out)
{
    int len = EVP_EncodeBlock((unsigned char *)out, in, (int)n);
    for (int i = 0; i < len; i++)
        out[i] = out[i] == '+' ? '-' : out[i] == '/' ? '_' : out[i];
    while (len > 0 && out[len - 1] == '=')
        len--;
    out[len] = '\0';
}

/* An HS256 token over any claims (auth_sign writes only sub, iat, exp). */
static void sign_claims(const char *claims, char *out)
{
    static const char hdr[] = "{\"alg\":\"HS256\",\"typ\":\"JWT\"}";
    unsigned char mac[32];
    unsigned int maclen = 32;
    char h[128], c[512], m[64];
    b64url(hdr, sizeof(hdr) - 1, h);
    b64url(claims, strlen(claims), c);
    sprintf(out, "%s.%s", h, c);
    HMAC(EVP_sha256(), secret, (int)strlen(secret), (unsigned char *)out, strlen(out), mac, &maclen);
    b64url(mac, 32, m);
    strcat(out, ".");
    strcat(out, m);
}

START_TEST(exp_beyond_the_max_lifetime_refused)
{
    char tok[AUTH_TOKEN_MAX], user[65], err[PX_ERRLEN];
    ck_assert_int_eq(auth_sign(secret, "alice", now, now + TTL, tok, sizeof(tok)), PX_OK);
    ck_assert_int_eq(auth_verify(hs, tok, now, user, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(auth_sign(secret, "alice", now, now + TTL + 1, tok, sizeof(tok)), PX_OK);
    ck_assert_int_eq(auth_verify(hs, tok, now, user, err, sizeof(err)), PX_ERROR);
    sign_claims("{\"sub\":\"alice\",\"exp\":1e300}", tok);
    ck_assert_int_eq(auth_verify(hs, tok, now, user, err, sizeof(err)), PX_ERROR);
}
END_TEST

START_TEST(nbf_and_iat_are_honoured)
{
    char tok[AUTH_TOKEN_MAX], claims[160], user[65], err[PX_ERRLEN];
    static const struct { const char *name; long long at; int ok; } cases[] = {
        { "nbf", now - 10, 1 }, { "nbf", now + AUTH_LEEWAY_S, 1 },
        { "nbf", now + AUTH_LEEWAY_S + 1, 0 }, { "iat", now + 3600, 0 }, { "iat", now - 3600, 1 },
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        snprintf(claims, sizeof(claims), "{\"sub\":\"alice\",\"exp\":%lld,\"%s\":%lld}",
                 (long long)now + 60, cases[i].name, cases[i].at);
        sign_claims(claims, tok);
        ck_assert_msg(auth_verify(hs, tok, now, user, err, sizeof(err)) ==
                          (cases[i].ok ? PX_OK : PX_ERROR),
                      "%s=%lld: %s", cases[i].name, cases[i].at, err);
    }
    sign_claims("{\"sub\":\"alice\",\"exp\":1800000060,\"nbf\":\"soon\"}", tok);
    ck_assert_int_eq(auth_verify(hs, tok, now, user, err, sizeof(err)), PX_ERROR);
}
END_TEST

/* 32 signature bytes are 43 characters, whose last carries 2 unused bits:
 * setting one spells the same bytes another way, and must not verify. */
START_TEST(non_canonical_signature_refused)
{
    static const char alphabet[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    char tok[AUTH_TOKEN_MAX], user[65], err[PX_ERRLEN];
    ck_assert_int_eq(auth_sign(secret, "alice", now, now + 60, tok, sizeof(tok)), PX_OK);
    size_t last = strlen(tok) - 1;
    size_t v = (size_t)(strchr(alphabet, tok[last]) - alphabet);
    ck_assert_uint_eq(v & 3, 0);
    tok[last] = alphabet[v | 1];
    ck_assert_int_eq(auth_verify(hs, tok, now, user, err, sizeof(err)), PX_ERROR);
}
END_TEST

/* A device claim comes back as it was signed; without one the token is the
 * default device; one outside the user id charset is refused. */
START_TEST(device_claim)
{
    char tok[AUTH_TOKEN_MAX], user[65], dev[65], err[PX_ERRLEN];
    ck_assert_int_eq(auth_sign_device(secret, "alice", "phone-1", now, now + 60, tok,
                                      sizeof(tok)), PX_OK);
    ck_assert_int_eq(auth_verify_device(hs, tok, now, user, dev, err, sizeof(err)), PX_OK);
    ck_assert_str_eq(dev, "phone-1");
    ck_assert_int_eq(auth_sign(secret, "alice", now, now + 60, tok, sizeof(tok)), PX_OK);
    ck_assert_int_eq(auth_verify_device(hs, tok, now, user, dev, err, sizeof(err)), PX_OK);
    ck_assert_str_eq(dev, AUTH_DEFAULT_DEVICE);
    ck_assert_int_eq(auth_sign_device(secret, "alice", "a/b", now, now + 60, tok, sizeof(tok)),
                     PX_ERROR);
    sign_claims("{\"sub\":\"alice\",\"exp\":1800000060,\"dev\":\"a b\"}", tok);
    ck_assert_int_eq(auth_verify_device(hs, tok, now, user, dev, err, sizeof(err)), PX_ERROR);
    sign_claims("{\"sub\":\"alice\",\"exp\":1800000060,\"dev\":7}", tok);
    ck_assert_int_eq(auth_verify_device(hs, tok, now, user, dev, err, sizeof(err)), PX_ERROR);
}
END_TEST

static Suite *auth_suite(void)
{
    auth_opts o = { .secret = secret, .leeway_s = AUTH_LEEWAY_S, .max_ttl_s = TTL };
    hs = auth_new(&o, NULL, 0);
    Suite *s = suite_create("auth");
    TCase *tc = tcase_create("jwt");
    tcase_add_test(tc, valid_token);
    tcase_add_test(tc, expired_token);
    tcase_add_test(tc, alg_none_refused);
    tcase_add_test(tc, bad_signature_refused);
    tcase_add_test(tc, malformed_refused);
    tcase_add_test(tc, bad_subject_refused);
    tcase_add_test(tc, exp_beyond_the_max_lifetime_refused);
    tcase_add_test(tc, nbf_and_iat_are_honoured);
    tcase_add_test(tc, non_canonical_signature_refused);
    tcase_add_test(tc, device_claim);
    suite_add_tcase(s, tc);
    return s;
}

PX_CHECK_MAIN(auth_suite)
