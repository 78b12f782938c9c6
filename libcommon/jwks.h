/* JSON Web Key Sets (RFC 7517): the public keys of an identity provider,
 * parsed into OpenSSL keys, and JWS signature checks against them. */
#ifndef PARLEY_JWKS_H
#define PARLEY_JWKS_H

#include <stddef.h>
#include <stdint.h>

#define JWKS_FILE_MAX (1 << 20) /* a larger file is refused unread */
#define JWKS_KEYS_MAX 64

typedef struct jwks jwks;

/* Parses a JWKS document ({"keys":[...]}). Kept: RSA keys (n, e; 2048 bits
 * at least) for RS256, EC P-256 keys (x, y) for ES256, OKP Ed25519 keys (x)
 * for EdDSA. Skipped: keys whose "use" is not "sig", whose "alg" names
 * another algorithm, and other key types and curves (symmetric "oct" keys
 * included: an HMAC secret never comes from a JWKS). A kept type whose
 * members are malformed, a duplicate kid, or a set with no key kept is an
 * error: a typo must not silently drop a key. On PX_OK *out holds one
 * reference. */
int jwks_parse(const char *text, size_t n, jwks **out, char *err, size_t errlen);

/* jwks_parse on a file's content (at most JWKS_FILE_MAX bytes). */
int jwks_load_file(const char *path, jwks **out, char *err, size_t errlen);

/* Reference counting (thread-safe): a set is immutable once parsed, so a
 * reader keeps the set it took while a rotation swaps in the next. */
jwks *jwks_ref(jwks *ks);
void jwks_unref(jwks *ks);
size_t jwks_count(const jwks *ks);

/* Checks sig over data with the key for alg ("RS256", "ES256" or "EdDSA";
 * ES256 signatures are JWS's 64-byte r||s) named kid, or, when kid is NULL,
 * the set's only key for alg. PX_OK: it verifies. PX_DECLINED: no such key
 * (or kid NULL and several keys for alg). PX_ERROR: it does not verify. */
int jwks_verify(const jwks *ks, const char *kid, const char *alg, const uint8_t *data,
                size_t n, const uint8_t *sig, size_t siglen, char *err, size_t errlen);

#endif
