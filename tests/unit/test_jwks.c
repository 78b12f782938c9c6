/* auth with a JWKS file: RS256, ES256 and EdDSA tokens made by another
 * implementation (tests/unit/jwt_fixtures.py: PyJWT and cryptography, fresh
 * keys each run) are accepted, every kind of wrong token is refused for the
 * right reason, and a rewritten file rotates the keys without a restart. */
#include "check_main.h"
#include "auth.h"
#include "common.h"
#include "jwks.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define ISSUER "https://idp.example.test/"
#define AUDIENCE "parley"
#define SECRET "test-secret"

static const int64_t now = 1800000000;
static const int64_t TTL = 30 * 86400;
static char dir[] = "/tmp/parley-test-jwks.XXXXXX";
static pid_t parent;

static void cleanup(void)
{
    char cmd[128];
    if (getpid() != parent) /* check's forked tests exit too */
        return;
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", dir);
}

/* Runs the fixture maker once, before the tests fork. */
static void make_fixtures(void)
{
    const char *py = getenv("PARLEY_PYTHON") ? getenv("PARLEY_PYTHON") : "/usr/bin/python3";
    char cmd[512];
    parent = getpid();
    if (mkdtemp(dir) == NULL) {
        perror("mkdtemp");
        exit(1);
    }
    atexit(cleanup);
    snprintf(cmd, sizeof(cmd), "%s tests/unit/jwt_fixtures.py %s %lld", py, dir, (long long)now);
    if (system(cmd) != 0) {
        fprintf(stderr, "%s failed: it needs Debian's python3-jwt (deploy/local/deps.sh)\n", cmd);
        exit(1);
    }
}

static void path(char *out, size_t n, const char *name)
{
    snprintf(out, n, "%s/%s", dir, name);
}

/* Replaces the live key file the way Kubernetes and careful tools do: a new
 * file renamed over the old. */
static void install_keys(const char *from_name, const char *text)
{
    char live[256], tmp[256], cmd[600];
    path(live, sizeof(live), "live.json");
    path(tmp, sizeof(tmp), "live.json.tmp");
    if (from_name != NULL) {
        snprintf(cmd, sizeof(cmd), "cp %s/%s %s", dir, from_name, tmp);
        ck_assert_int_eq(system(cmd), 0);
    } else {
        FILE *f = fopen(tmp, "w");
        ck_assert_ptr_nonnull(f);
        fputs(text, f);
        fclose(f);
    }
    ck_assert_int_eq(rename(tmp, live), 0);
}

static auth *live_auth(void)
{
    char live[256], err[PX_ERRLEN] = "";
    path(live, sizeof(live), "live.json");
    auth_opts o = { SECRET, live, ISSUER, AUDIENCE, AUTH_LEEWAY_S, TTL };
    auth *a = auth_new(&o, err, sizeof(err));
    ck_assert_msg(a != NULL, "auth_new: %s", err);
    return a;
}

/* Checks every fixture token meant for keyset against a; returns how many. */
static int check_tokens(auth *a, int keyset)
{
    char tsv[256], line[4096], user[65], err[PX_ERRLEN];
    int checked = 0;
    path(tsv, sizeof(tsv), "tokens.tsv");
    FILE *f = fopen(tsv, "r");
    ck_assert_ptr_nonnull(f);
    while (fgets(line, sizeof(line), f) != NULL) {
        line[strcspn(line, "\n")] = '\0';
        char *name = strtok(line, "\t"), *ks = strtok(NULL, "\t");
        char *want = strtok(NULL, "\t"), *tok = strtok(NULL, "\t");
        ck_assert_ptr_nonnull(tok);
        if (atoi(ks) != keyset)
            continue;
        err[0] = '\0';
        int rc = auth_verify(a, tok, now, user, err, sizeof(err));
        if (strcmp(want, "ok") == 0) {
            ck_assert_msg(rc == PX_OK, "%s: refused: %s", name, err);
            ck_assert_str_eq(user, "alice");
        } else {
            ck_assert_msg(rc == PX_ERROR, "%s: accepted", name);
            ck_assert_msg(strstr(err, want) != NULL, "%s: refused for \"%s\", not \"%s\"", name,
                          err, want);
        }
        checked++;
    }
    fclose(f);
    return checked;
}

START_TEST(independent_tokens_checked)
{
    install_keys("jwks-1.json", NULL);
    auth *a = live_auth();
    ck_assert_int_ge(check_tokens(a, 1), 20);
    auth_free(a);
}
END_TEST

START_TEST(rewritten_file_rotates_keys_without_restart)
{
    install_keys("jwks-1.json", NULL);
    auth *a = live_auth();
    check_tokens(a, 1); /* new_kid_before_rotation is refused */
    install_keys("jwks-2.json", NULL);
    ck_assert_int_eq(check_tokens(a, 2), 2);
    /* A rewrite that does not parse keeps the keys in force. */
    install_keys(NULL, "{\"keys\": [");
    ck_assert_int_eq(check_tokens(a, 2), 2);
    auth_free(a);
}
END_TEST

START_TEST(each_key_needs_its_setting)
{
    char jwks1[256], line[4096], tsv[256], user[65], err[PX_ERRLEN];
    path(jwks1, sizeof(jwks1), "jwks-1.json");
    path(tsv, sizeof(tsv), "tokens.tsv");
    auth_opts hs_only = { SECRET, NULL, NULL, NULL, AUTH_LEEWAY_S, TTL };
    auth_opts jwks_only = { NULL, jwks1, NULL, NULL, AUTH_LEEWAY_S, TTL };
    auth *hs = auth_new(&hs_only, err, sizeof(err)), *pk = auth_new(&jwks_only, err, sizeof(err));
    ck_assert_ptr_nonnull(hs);
    ck_assert_ptr_nonnull(pk);
    FILE *f = fopen(tsv, "r");
    ck_assert_ptr_nonnull(f);
    while (fgets(line, sizeof(line), f) != NULL) {
        line[strcspn(line, "\n")] = '\0';
        char *name = strtok(line, "\t");
        strtok(NULL, "\t");
        strtok(NULL, "\t");
        char *tok = strtok(NULL, "\t");
        if (strcmp(name, "rs256") == 0) {
            ck_assert_int_eq(auth_verify(pk, tok, now, user, err, sizeof(err)), PX_OK);
            ck_assert_int_eq(auth_verify(hs, tok, now, user, err, sizeof(err)), PX_ERROR);
            ck_assert_ptr_nonnull(strstr(err, "no PARLEY_JWT_JWKS_FILE"));
        } else if (strcmp(name, "hs256") == 0) {
            ck_assert_int_eq(auth_verify(hs, tok, now, user, err, sizeof(err)), PX_OK);
            ck_assert_int_eq(auth_verify(pk, tok, now, user, err, sizeof(err)), PX_ERROR);
            ck_assert_ptr_nonnull(strstr(err, "no PARLEY_JWT_SECRET"));
        }
    }
    fclose(f);
    auth_free(hs);
    auth_free(pk);
    auth_opts none = { NULL, NULL, NULL, NULL, AUTH_LEEWAY_S, TTL };
    ck_assert_ptr_null(auth_new(&none, err, sizeof(err)));
}
END_TEST

START_TEST(bad_key_files_refused_at_start)
{
    char weak[256], err[PX_ERRLEN];
    path(weak, sizeof(weak), "jwks-weak.json");
    auth_opts o = { NULL, weak, NULL, NULL, AUTH_LEEWAY_S, TTL };
    ck_assert_ptr_null(auth_new(&o, err, sizeof(err)));
    ck_assert_msg(strstr(err, "1024 bits") != NULL, "%s", err);
    o.jwks_file = "/nonexistent/jwks.json";
    ck_assert_ptr_null(auth_new(&o, err, sizeof(err)));
}
END_TEST

START_TEST(malformed_sets_refused)
{
    static const struct { const char *doc, *why; } bad[] = {
        { "not json", "keys" },
        { "{\"keys\": {}}", "keys" },
        { "{\"keys\": []}", "no RS256" },
        { "{\"keys\": [{\"kty\": \"OKP\", \"crv\": \"X25519\", \"x\": \"AA\"}]}", "no RS256" },
        { "{\"keys\": [7]}", "not an object" },
        { "{\"keys\": [{\"kty\": \"OKP\", \"crv\": \"Ed25519\", \"x\": \"AAAA\"}]}", "Ed25519" },
        { "{\"keys\": [{\"kty\": \"EC\", \"crv\": \"P-256\", \"x\": \"AA\", \"y\": \"AA\"}]}",
          "not on P-256" },
        { "{\"keys\": [{\"kty\": \"EC\", \"crv\": \"P-256\", \"y\": \"AA\", \"x\": "
          "\"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\"}]}", "longer than 32" },
        { "{\"keys\": [{\"kty\": \"RSA\", \"n\": \"AQAB\"}]}", "RSA" },
        { "{\"keys\": [{\"kty\": \"OKP\", \"crv\": \"Ed25519\", \"kid\": 3,"
          " \"x\": \"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo\"}]}", "kid" },
        { "{\"keys\": [{\"kty\": \"OKP\", \"crv\": \"Ed25519\", \"kid\": \"a\","
          " \"x\": \"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo\"},"
          " {\"kty\": \"OKP\", \"crv\": \"Ed25519\", \"kid\": \"a\","
          " \"x\": \"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo\"}]}", "twice" },
    };
    char err[PX_ERRLEN];
    for (size_t i = 0; i < PX_ARRAY_LEN(bad); i++) {
        jwks *ks = (jwks *)1;
        err[0] = '\0';
        ck_assert_int_eq(jwks_parse(bad[i].doc, strlen(bad[i].doc), &ks, err, sizeof(err)),
                         PX_ERROR);
        ck_assert_ptr_null(ks);
        ck_assert_msg(strstr(err, bad[i].why) != NULL, "%s: %s", bad[i].doc, err);
    }
}
END_TEST

static Suite *jwks_suite(void)
{
    make_fixtures();
    Suite *s = suite_create("jwks");
    TCase *tc = tcase_create("jwks");
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, independent_tokens_checked);
    tcase_add_test(tc, rewritten_file_rotates_keys_without_restart);
    tcase_add_test(tc, each_key_needs_its_setting);
    tcase_add_test(tc, bad_key_files_refused_at_start);
    tcase_add_test(tc, malformed_sets_refused);
    suite_add_tcase(s, tc);
    return s;
}

PX_CHECK_MAIN(jwks_suite)
