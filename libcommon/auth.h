/* HS256 JWT verification (and signing, for parleyctl, dev tokens and tests). */
#ifndef PARLEY_AUTH_H
#define PARLEY_AUTH_H

#include <stddef.h>
#include <stdint.h>

#define AUTH_TOKEN_MAX 2048  /* longer tokens are refused unread */
#define AUTH_LEEWAY_S 60     /* clock skew allowed for nbf and iat */

/* Verifies token against secret at time now_s (seconds). On PX_OK, user
 * receives the `sub` claim (a valid user id, at most 64 chars). Refuses:
 * malformed, non-canonical base64url (a character whose unused low bits
 * are not zero: one signature must have one spelling), alg other than
 * HS256 (alg none included), bad signature, missing/expired exp, exp more
 * than max_ttl_s ahead of now, nbf or iat later than now (give or take
 * AUTH_LEEWAY_S), nbf or iat not numbers, missing/invalid sub. err says
 * which. */
int auth_verify(const char *secret, const char *token, int64_t now_s, int64_t max_ttl_s,
                char user[65], char *err, size_t errlen);

/* Writes a token for user expiring at exp_s into out. PX_ERROR if it does
 * not fit or user is invalid. */
int auth_sign(const char *secret, const char *user, int64_t iat_s, int64_t exp_s,
              char *out, size_t outlen);

#endif
