/* Owns JWKS parsing and asymmetric JWS checks, by hand over OpenSSL
 * (Debian 12's libjwt 1.10 reads no JWKS, and cjose 0.6 knows no Ed25519
 * keys). The algorithm a key serves is fixed by its type when the set is
 * parsed, and a token's alg must match it: a token cannot make an RSA key
 * act as an HMAC secret, nor pick an algorithm the key was not published
 * for. */
#include "jwks.h"
#include "b64url.h"
#include "common.h"

#include <jansson.h>
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define JWKS_MEMBER_MAX 1024 /* bytes of one decoded member: RSA 8192 bits */
#define JWKS_KID_MAX 256
#define JWKS_RSA_MIN_BITS 2048

/* What each supported key type verifies. */
static const struct jwks_kind {
    const char *alg, *kty, *crv;
} jwks_kinds[] = {
    { "RS256", "RSA", NULL },
    { "ES256", "EC", "P-256" },
    { "EdDSA", "OKP", "Ed25519" },
};

typedef struct jwks_key {
    char *kid;                   /* NULL when the key has none */
    const struct jwks_kind *kind;
    EVP_PKEY *pk;
} jwks_key;

struct jwks {
    atomic_int refs;
    size_t n;
    jwks_key keys[JWKS_KEYS_MAX];
};

/* A base64url member of exactly want bytes (any length up to the buffer
 * when want is 0); returns the length or -1. */
static long jwks_member(json_t *k, const char *name, size_t want, uint8_t out[JWKS_MEMBER_MAX])
{
    const char *s = json_string_value(json_object_get(k, name));
    if (s == NULL || strlen(s) > JWKS_MEMBER_MAX * 4 / 3)
        return -1;
    long n = b64url_decode(s, strlen(s), out);
    if (n <= 0 || (want != 0 && (size_t)n != want))
        return -1;
    return n;
}

static EVP_PKEY *jwks_fromdata(const char *type, OSSL_PARAM *params)
{
    EVP_PKEY *pk = NULL;
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_name(NULL, type, NULL);
    if (ctx != NULL && EVP_PKEY_fromdata_init(ctx) == 1)
        EVP_PKEY_fromdata(ctx, &pk, EVP_PKEY_PUBLIC_KEY, params);
    EVP_PKEY_CTX_free(ctx);
    return pk;
}

static EVP_PKEY *jwks_rsa(json_t *k, char *err, size_t errlen)
{
    uint8_t n[JWKS_MEMBER_MAX], e[JWKS_MEMBER_MAX];
    long nl = jwks_member(k, "n", 0, n), el = jwks_member(k, "e", 0, e);
    EVP_PKEY *pk = NULL;
    OSSL_PARAM *params = NULL;
    OSSL_PARAM_BLD *bld = OSSL_PARAM_BLD_new();
    BIGNUM *bn = nl > 0 ? BN_bin2bn(n, (int)nl, NULL) : NULL;
    BIGNUM *be = el > 0 ? BN_bin2bn(e, (int)el, NULL) : NULL;
    if (bld == NULL || bn == NULL || be == NULL ||
        OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_N, bn) != 1 ||
        OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_E, be) != 1 ||
        (params = OSSL_PARAM_BLD_to_param(bld)) == NULL ||
        (pk = jwks_fromdata("RSA", params)) == NULL) {
        px_err(err, errlen, "RSA n or e missing or not base64url");
        goto out;
    }
    if (EVP_PKEY_get_bits(pk) < JWKS_RSA_MIN_BITS) {
        px_err(err, errlen, "RSA key of %d bits (at least %d)", EVP_PKEY_get_bits(pk),
               JWKS_RSA_MIN_BITS);
        EVP_PKEY_free(pk);
        pk = NULL;
    }
out:
    OSSL_PARAM_free(params);
    OSSL_PARAM_BLD_free(bld);
    BN_free(bn);
    BN_free(be);
    return pk;
}

/* One P-256 coordinate into out, left-padded to 32 bytes. RFC 7518 6.2.1.2
 * wants the full length, but encoders that write coordinates as unsigned
 * integers drop leading zero bytes (PyJWT before 2.8: one key in 128, which
 * is how CI found it). Padding is unambiguous, and the point is still checked
 * against the curve. */
static int jwks_coordinate(json_t *k, const char *name, uint8_t out[32])
{
    uint8_t raw[JWKS_MEMBER_MAX];
    long n = jwks_member(k, name, 0, raw);
    if (n < 0 || n > 32)
        return -1;
    memset(out, 0, 32 - (size_t)n);
    memcpy(out + 32 - n, raw, (size_t)n);
    return 0;
}

static EVP_PKEY *jwks_ec(json_t *k, char *err, size_t errlen)
{
    uint8_t pub[65];
    pub[0] = 0x04; /* uncompressed point */
    if (jwks_coordinate(k, "x", pub + 1) < 0 || jwks_coordinate(k, "y", pub + 33) < 0) {
        px_err(err, errlen, "EC x or y missing or longer than 32 base64url bytes");
        return NULL;
    }
    char group[] = "P-256";
    OSSL_PARAM params[] = {
        OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, group, 0),
        OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_PUB_KEY, pub, sizeof(pub)),
        OSSL_PARAM_END,
    };
    EVP_PKEY *pk = jwks_fromdata("EC", params); /* refuses a point off the curve */
    if (pk == NULL)
        px_err(err, errlen, "EC point is not on P-256");
    return pk;
}

static EVP_PKEY *jwks_ed25519(json_t *k, char *err, size_t errlen)
{
    uint8_t x[JWKS_MEMBER_MAX];
    EVP_PKEY *pk = NULL;
    if (jwks_member(k, "x", 32, x) < 0 ||
        (pk = EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, NULL, x, 32)) == NULL)
        px_err(err, errlen, "Ed25519 x missing or not 32 base64url bytes");
    return pk;
}

/* The kind k is published for, or NULL when Parley does not verify it. */
static const struct jwks_kind *jwks_kind_of(json_t *k)
{
    const char *use = json_string_value(json_object_get(k, "use"));
    const char *alg = json_string_value(json_object_get(k, "alg"));
    const char *kty = json_string_value(json_object_get(k, "kty"));
    const char *crv = json_string_value(json_object_get(k, "crv"));
    if ((json_object_get(k, "use") != NULL && (use == NULL || strcmp(use, "sig") != 0)) ||
        kty == NULL)
        return NULL;
    for (size_t i = 0; i < PX_ARRAY_LEN(jwks_kinds); i++) {
        const struct jwks_kind *kd = &jwks_kinds[i];
        if (strcmp(kty, kd->kty) == 0 && (kd->crv == NULL || (crv && strcmp(crv, kd->crv) == 0)))
            return (alg == NULL || strcmp(alg, kd->alg) == 0) ? kd : NULL;
    }
    return NULL;
}

static int jwks_add(jwks *ks, json_t *k, size_t idx, char *err, size_t errlen)
{
    char why[PX_ERRLEN] = "";
    if (!json_is_object(k))
        return px_err(err, errlen, "JWKS key %zu is not an object", idx);
    const struct jwks_kind *kd = jwks_kind_of(k);
    if (kd == NULL)
        return PX_OK;
    json_t *kidv = json_object_get(k, "kid");
    const char *kid = json_string_value(kidv);
    if (kidv != NULL && (kid == NULL || strlen(kid) > JWKS_KID_MAX))
        return px_err(err, errlen, "JWKS key %zu: kid is not a string of at most %d bytes", idx,
                      JWKS_KID_MAX);
    for (size_t i = 0; i < ks->n; i++)
        if (kid != NULL && ks->keys[i].kid != NULL && strcmp(ks->keys[i].kid, kid) == 0)
            return px_err(err, errlen, "JWKS key %zu: kid \"%s\" appears twice", idx, kid);
    if (ks->n == JWKS_KEYS_MAX)
        return px_err(err, errlen, "JWKS has more than %d usable keys", JWKS_KEYS_MAX);
    EVP_PKEY *pk = kd->kty[0] == 'R' ? jwks_rsa(k, why, sizeof(why))
                   : kd->kty[0] == 'E' ? jwks_ec(k, why, sizeof(why))
                                       : jwks_ed25519(k, why, sizeof(why));
    if (pk == NULL)
        return px_err(err, errlen, "JWKS key %zu (kid %s): %s", idx, kid ? kid : "none", why);
    ks->keys[ks->n++] = (jwks_key){ kid ? px_strdup(kid) : NULL, kd, pk };
    return PX_OK;
}

int jwks_parse(const char *text, size_t n, jwks **out, char *err, size_t errlen)
{
    int rc = PX_ERROR;
    jwks *ks = px_calloc(1, sizeof(*ks));
    atomic_init(&ks->refs, 1);
    json_error_t jerr;
    json_t *doc = json_loadb(text, n, JSON_REJECT_DUPLICATES, &jerr);
    json_t *keys = json_object_get(doc, "keys");
    if (!json_is_array(keys)) {
        px_err(err, errlen, "JWKS is not an object with a \"keys\" array%s%s",
               doc ? "" : ": ", doc ? "" : jerr.text);
        goto out;
    }
    for (size_t i = 0; i < json_array_size(keys); i++)
        if (jwks_add(ks, json_array_get(keys, i), i, err, errlen) != PX_OK)
            goto out;
    if (ks->n == 0) {
        px_err(err, errlen, "JWKS has no RS256, ES256 or EdDSA signing key");
        goto out;
    }
    rc = PX_OK;
out:
    json_decref(doc);
    ERR_clear_error(); /* leave no OpenSSL errors for this thread's next TLS call */
    if (rc != PX_OK)
        jwks_unref(ks);
    *out = rc == PX_OK ? ks : NULL;
    return rc;
}

int jwks_load_file(const char *path, jwks **out, char *err, size_t errlen)
{
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        return px_err(err, errlen, "cannot open %s: %m", path);
    char *buf = px_malloc(JWKS_FILE_MAX + 1);
    size_t n = fread(buf, 1, JWKS_FILE_MAX + 1, f);
    int rc;
    if (ferror(f))
        rc = px_err(err, errlen, "cannot read %s", path);
    else if (n > JWKS_FILE_MAX)
        rc = px_err(err, errlen, "%s is over %d bytes", path, JWKS_FILE_MAX);
    else
        rc = jwks_parse(buf, n, out, err, errlen);
    free(buf);
    fclose(f);
    return rc;
}

jwks *jwks_ref(jwks *ks)
{
    if (ks != NULL)
        atomic_fetch_add(&ks->refs, 1);
    return ks;
}

void jwks_unref(jwks *ks)
{
    if (ks == NULL || atomic_fetch_sub(&ks->refs, 1) != 1)
        return;
    for (size_t i = 0; i < ks->n; i++) {
        free(ks->keys[i].kid);
        EVP_PKEY_free(ks->keys[i].pk);
    }
    free(ks);
}

size_t jwks_count(const jwks *ks)
{
    return ks->n;
}

static const jwks_key *jwks_find(const jwks *ks, const char *kid, const char *alg)
{
    const jwks_key *found = NULL;
    for (size_t i = 0; i < ks->n; i++) {
        const jwks_key *k = &ks->keys[i];
        if (strcmp(k->kind->alg, alg) != 0)
            continue;
        if (kid != NULL && k->kid != NULL && strcmp(k->kid, kid) == 0)
            return k;
        if (kid == NULL) {
            if (found != NULL)
                return NULL; /* ambiguous: a token must name its key */
            found = k;
        }
    }
    return found;
}

/* JWS carries ES256 as r||s; OpenSSL verifies DER. out holds 72 bytes. */
static int jwks_es256_der(const uint8_t *sig, size_t siglen, uint8_t *out, size_t *outlen)
{
    if (siglen != 64)
        return PX_ERROR;
    ECDSA_SIG *es = ECDSA_SIG_new();
    BIGNUM *r = BN_bin2bn(sig, 32, NULL), *s = BN_bin2bn(sig + 32, 32, NULL);
    int len = -1;
    if (es != NULL && r != NULL && s != NULL && ECDSA_SIG_set0(es, r, s) == 1) {
        r = s = NULL; /* owned by es now */
        if (i2d_ECDSA_SIG(es, NULL) <= 72)
            len = i2d_ECDSA_SIG(es, &out);
    }
    BN_free(r);
    BN_free(s);
    ECDSA_SIG_free(es);
    if (len <= 0)
        return PX_ERROR;
    *outlen = (size_t)len;
    return PX_OK;
}

int jwks_verify(const jwks *ks, const char *kid, const char *alg, const uint8_t *data,
                size_t n, const uint8_t *sig, size_t siglen, char *err, size_t errlen)
{
    const jwks_key *k = jwks_find(ks, kid, alg);
    if (k == NULL) {
        px_err(err, errlen, kid ? "token kid \"%s\" names no %s key in the JWKS"
                                : "token has no kid and the JWKS has not exactly one %s key",
               kid ? kid : alg, alg);
        return PX_DECLINED;
    }
    uint8_t der[72];
    size_t derlen = 0;
    if (strcmp(alg, "ES256") == 0) {
        if (jwks_es256_der(sig, siglen, der, &derlen) != PX_OK)
            return px_err(err, errlen, "token signature does not match");
        sig = der;
        siglen = derlen;
    }
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    const EVP_MD *hash = strcmp(alg, "EdDSA") == 0 ? NULL : EVP_sha256();
    int ok = md != NULL && EVP_DigestVerifyInit(md, NULL, hash, NULL, k->pk) == 1 &&
             EVP_DigestVerify(md, sig, siglen, data, n) == 1;
    EVP_MD_CTX_free(md);
    ERR_clear_error();
    return ok ? PX_OK : px_err(err, errlen, "token signature does not match");
}
