/* JWT verification: HS256 with a shared secret, RS256 / ES256 / EdDSA
 * against a JWKS file that is re-read when it changes; and HS256 signing,
 * for parleyctl, dev tokens and tests. */
#ifndef PARLEY_AUTH_H
#define PARLEY_AUTH_H

#include <stddef.h>
#include <stdint.h>

#define AUTH_TOKEN_MAX 2048  /* longer tokens are refused unread */
#define AUTH_LEEWAY_S 60     /* default clock skew allowed for exp, nbf and iat */
/* The device of a token without a `dev` claim: every client that predates
 * devices is this one device of its user. */
#define AUTH_DEFAULT_DEVICE "default"

typedef struct auth auth;

typedef struct auth_opts {
    const char *secret;    /* HS256 shared secret, or NULL: HS256 refused */
    const char *jwks_file; /* JWKS path, or NULL: RS256/ES256/EdDSA refused */
    const char *issuer;    /* when set, iss must equal it */
    const char *audience;  /* when set, aud (a string or an array) must hold it */
    long leeway_s;         /* clock skew allowed for exp, nbf and iat */
    long max_ttl_s;        /* exp further than this ahead of now is refused */
} auth_opts;

/* Copies o's strings. With a jwks_file, reads it now: a file that is
 * missing or does not parse is an error here (at start), while later a
 * change that does not parse keeps the previous keys (logged). Needs a
 * secret or a jwks_file. */
auth *auth_new(const auth_opts *o, char *err, size_t errlen);
void auth_free(auth *a);

/* Verifies token at time now_s (seconds). Thread-safe. On PX_OK, user
 * receives the `sub` claim (a valid user id, at most 64 chars). Refuses:
 * malformed, non-canonical base64url (one signature must have one
 * spelling), a crit header, alg other than HS256/RS256/ES256/EdDSA (none
 * included), an alg whose key is not configured (HS256 without a secret,
 * the others without a JWKS key of that type: the key fixes the alg, so an
 * RSA public key is never an HMAC secret), a kid naming no key, a bad
 * signature, a missing exp or one past (exp + leeway <= now), exp more
 * than max_ttl_s ahead, nbf or iat after now + leeway or not numbers,
 * iss / aud other than configured, a missing or invalid sub. err says
 * which. Before each asymmetric check the JWKS file is stat'ed and re-read
 * if it changed. */
int auth_verify(auth *a, const char *token, int64_t now_s, char user[65], char *err,
                size_t errlen);
/* The same, and the optional `dev` claim (issue 17): refused when it is not
 * a valid id (the user id charset); dev receives it, or AUTH_DEFAULT_DEVICE
 * for a token without one. */
int auth_verify_device(auth *a, const char *token, int64_t now_s, char user[65], char dev[65],
                       char *err, size_t errlen);

/* Writes an HS256 token for user expiring at exp_s into out. PX_ERROR if
 * it does not fit or user is invalid. */
int auth_sign(const char *secret, const char *user, int64_t iat_s, int64_t exp_s,
              char *out, size_t outlen);
/* The same with a `dev` claim (dev NULL: none); PX_ERROR if dev is invalid. */
int auth_sign_device(const char *secret, const char *user, const char *dev, int64_t iat_s,
                     int64_t exp_s, char *out, size_t outlen);

#endif
