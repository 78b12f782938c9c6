/* libFuzzer target: a client's token through auth_verify, with an HS256
 * secret and the keys of fuzz/jwt.jwks.json (RS256, ES256, EdDSA), so every
 * algorithm's path is reachable; the seeds (fuzz/corpus/jwt) are tokens
 * signed with those keys, valid at FUZZ_NOW. */
#include "auth.h"
#include "common.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FUZZ_NOW 1800000000

static auth *fuzz_auth;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    char err[PX_ERRLEN];
    const char *keys = getenv("PARLEY_FUZZ_JWKS") ? getenv("PARLEY_FUZZ_JWKS")
                                                   : "fuzz/jwt.jwks.json";
    auth_opts o = { "test-secret", keys, "https://idp.example.test/", "parley", 60,
                    30 * 86400 };
    fuzz_auth = auth_new(&o, err, sizeof(err));
    if (fuzz_auth == NULL) {
        fprintf(stderr, "fuzz_jwt: %s (run from the repository root)\n", err);
        exit(1);
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n)
{
    char tok[AUTH_TOKEN_MAX + 2], user[65], err[PX_ERRLEN];
    if (n > AUTH_TOKEN_MAX + 1)
        n = AUTH_TOKEN_MAX + 1; /* longer is refused unread: keep the edge */
    memcpy(tok, data, n);
    tok[n] = '\0';
    auth_verify(fuzz_auth, tok, FUZZ_NOW, user, err, sizeof(err));
    return 0;
}
