/* Owns token checks. The key decides the algorithm: HS256 only with the
 * configured secret, the others only with a JWKS key of their type, so an
 * attacker cannot choose how a token is checked; HMAC comparison is
 * constant-time. Owns the JWKS file's rotation too: the file is stat'ed
 * before each asymmetric check and re-read when it changed. */
#include "auth.h"
#include "b64url.h"
#include "common.h"
#include "ids.h"
#include "jwks.h"
#include "log.h"

#include <jansson.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

struct auth {
    char *secret, *jwks_file, *issuer, *audience;
    long leeway_s, max_ttl_s;
    pthread_mutex_t mu; /* guards keys and seen */
    jwks *keys;         /* the last set that parsed */
    struct stat seen;   /* the file as last read, parsed or not */
};

static char *auth_dup(const char *s)
{
    return s != NULL ? px_strdup(s) : NULL;
}

auth *auth_new(const auth_opts *o, char *err, size_t errlen)
{
    if ((o->secret == NULL || *o->secret == '\0') && o->jwks_file == NULL) {
        px_err(err, errlen, "no token key: set PARLEY_JWT_SECRET or PARLEY_JWT_JWKS_FILE");
        return NULL;
    }
    auth *a = px_calloc(1, sizeof(*a));
    a->secret = o->secret != NULL && *o->secret != '\0' ? px_strdup(o->secret) : NULL;
    a->jwks_file = auth_dup(o->jwks_file);
    a->issuer = auth_dup(o->issuer);
    a->audience = auth_dup(o->audience);
    a->leeway_s = o->leeway_s;
    a->max_ttl_s = o->max_ttl_s;
    pthread_mutex_init(&a->mu, NULL);
    if (a->jwks_file == NULL)
        return a;
    if (stat(a->jwks_file, &a->seen) != 0) {
        px_err(err, errlen, "PARLEY_JWT_JWKS_FILE: cannot stat %s: %m", a->jwks_file);
    } else if (jwks_load_file(a->jwks_file, &a->keys, err, errlen) == PX_OK) {
        return a;
    }
    auth_free(a);
    return NULL;
}

void auth_free(auth *a)
{
    if (a == NULL)
        return;
    jwks_unref(a->keys);
    pthread_mutex_destroy(&a->mu);
    free(a->secret);
    free(a->jwks_file);
    free(a->issuer);
    free(a->audience);
    free(a);
}

static int auth_file_changed(const struct stat *was, const struct stat *now)
{
    return was->st_ino != now->st_ino || was->st_dev != now->st_dev ||
           was->st_size != now->st_size || was->st_mtim.tv_sec != now->st_mtim.tv_sec ||
           was->st_mtim.tv_nsec != now->st_mtim.tv_nsec;
}

/* The current key set, re-read first if the file changed; the caller
 * unrefs it. A change that does not parse keeps the previous keys: a
 * half-written file must not lock every user out. */
static jwks *auth_keys(auth *a)
{
    struct stat st;
    pthread_mutex_lock(&a->mu);
    if (stat(a->jwks_file, &st) == 0 && auth_file_changed(&a->seen, &st)) {
        char err[PX_ERRLEN] = "";
        jwks *ks = NULL;
        a->seen = st;
        if (jwks_load_file(a->jwks_file, &ks, err, sizeof(err)) == PX_OK) {
            jwks_unref(a->keys);
            a->keys = ks;
            log_info("JWKS file re-read", "{s:s, s:i}", "file", a->jwks_file, "keys",
                     (int)jwks_count(ks));
        } else {
            log_warn("JWKS file changed but was refused: the previous keys stay",
                     "{s:s, s:s}", "file", a->jwks_file, "error", err);
        }
    }
    jwks *ks = jwks_ref(a->keys);
    pthread_mutex_unlock(&a->mu);
    return ks;
}

static json_t *auth_json_part(const char *s, size_t n)
{
    uint8_t buf[AUTH_TOKEN_MAX];
    long len = b64url_decode(s, n, buf);
    if (len < 0)
        return NULL;
    return json_loadb((const char *)buf, (size_t)len, JSON_REJECT_DUPLICATES, NULL);
}

static void auth_hmac(const char *secret, const char *data, size_t n, uint8_t mac[32])
{
    unsigned int maclen = 32;
    HMAC(EVP_sha256(), secret, (int)strlen(secret), (const unsigned char *)data, n, mac, &maclen);
}

/* An optional time claim: PX_OK when absent or not after now + leeway. */
static int auth_not_after_now(const auth *a, json_t *claims, const char *name, int64_t now_s,
                              char *err, size_t errlen)
{
    json_t *v = json_object_get(claims, name);
    if (v == NULL)
        return PX_OK;
    if (!json_is_number(v))
        return px_err(err, errlen, "token %s is not a number", name);
    if (json_number_value(v) > (double)(now_s + a->leeway_s))
        return px_err(err, errlen, "token %s is in the future", name);
    return PX_OK;
}

static int auth_audience_ok(const char *want, json_t *aud)
{
    if (json_is_string(aud))
        return strcmp(json_string_value(aud), want) == 0;
    size_t i;
    json_t *v;
    json_array_foreach(aud, i, v)
        if (json_is_string(v) && strcmp(json_string_value(v), want) == 0)
            return 1;
    return 0;
}

static int auth_check_claims(const auth *a, json_t *claims, int64_t now_s, char user[65],
                             char dev[65], char *err, size_t errlen)
{
    json_t *sub = json_object_get(claims, "sub");
    json_t *exp = json_object_get(claims, "exp");
    json_t *d = json_object_get(claims, "dev");
    const char *iss = json_string_value(json_object_get(claims, "iss"));
    if (!json_is_string(sub) || !id_valid_user(json_string_value(sub)))
        return px_err(err, errlen, "token sub is missing or not a valid user id");
    if (d != NULL && (!json_is_string(d) || !id_valid_user(json_string_value(d))))
        return px_err(err, errlen, "token dev is not a valid device id");
    if (!json_is_number(exp))
        return px_err(err, errlen, "token exp is missing");
    if (json_number_value(exp) + (double)a->leeway_s <= (double)now_s)
        return px_err(err, errlen, "token expired");
    if (json_number_value(exp) > (double)(now_s + a->max_ttl_s))
        return px_err(err, errlen, "token exp is more than PARLEY_TOKEN_MAX_TTL_S ahead");
    if (auth_not_after_now(a, claims, "nbf", now_s, err, errlen) != PX_OK ||
        auth_not_after_now(a, claims, "iat", now_s, err, errlen) != PX_OK)
        return PX_ERROR;
    if (a->issuer != NULL && (iss == NULL || strcmp(iss, a->issuer) != 0))
        return px_err(err, errlen, "token iss is not PARLEY_JWT_ISSUER");
    if (a->audience != NULL && !auth_audience_ok(a->audience, json_object_get(claims, "aud")))
        return px_err(err, errlen, "token aud does not hold PARLEY_JWT_AUDIENCE");
    snprintf(user, 65, "%s", json_string_value(sub));
    if (dev != NULL)
        snprintf(dev, 65, "%s", d != NULL ? json_string_value(d) : AUTH_DEFAULT_DEVICE);
    return PX_OK;
}

/* The signature check for the header's alg over data (header.claims). */
static int auth_check_signature(auth *a, json_t *hdr, const char *data, size_t n,
                                const uint8_t *sig, long siglen, char *err, size_t errlen)
{
    const char *alg = json_string_value(json_object_get(hdr, "alg"));
    json_t *kidv = json_object_get(hdr, "kid");
    if (json_object_get(hdr, "crit") != NULL)
        return px_err(err, errlen, "token has a crit header (no extension is understood)");
    if (alg == NULL)
        return px_err(err, errlen, "token alg is missing");
    if (kidv != NULL && !json_is_string(kidv))
        return px_err(err, errlen, "token kid is not a string");
    if (strcmp(alg, "HS256") == 0) {
        uint8_t mac[32];
        if (a->secret == NULL)
            return px_err(err, errlen, "token alg HS256 but no PARLEY_JWT_SECRET is set");
        auth_hmac(a->secret, data, n, mac);
        if (siglen != 32 || CRYPTO_memcmp(mac, sig, 32) != 0)
            return px_err(err, errlen, "token signature does not match");
        return PX_OK;
    }
    if (strcmp(alg, "RS256") != 0 && strcmp(alg, "ES256") != 0 && strcmp(alg, "EdDSA") != 0)
        return px_err(err, errlen, "token alg must be HS256, RS256, ES256 or EdDSA");
    if (a->jwks_file == NULL)
        return px_err(err, errlen, "token alg %s but no PARLEY_JWT_JWKS_FILE is set", alg);
    if (siglen < 0)
        return px_err(err, errlen, "token signature does not match");
    jwks *ks = auth_keys(a);
    int rc = jwks_verify(ks, json_string_value(kidv), alg, (const uint8_t *)data, n, sig,
                         (size_t)siglen, err, errlen);
    jwks_unref(ks);
    return rc == PX_OK ? PX_OK : PX_ERROR;
}

int auth_verify(auth *a, const char *token, int64_t now_s, char user[65], char *err,
                size_t errlen)
{
    return auth_verify_device(a, token, now_s, user, NULL, err, errlen);
}

int auth_verify_device(auth *a, const char *token, int64_t now_s, char user[65], char dev[65],
                       char *err, size_t errlen)
{
    int rc = PX_ERROR;
    json_t *hdr = NULL, *claims = NULL;
    size_t n = strnlen(token, AUTH_TOKEN_MAX + 1);
    if (n == 0 || n > AUTH_TOKEN_MAX)
        return px_err(err, errlen, "token empty or longer than %d bytes", AUTH_TOKEN_MAX);
    const char *d1 = memchr(token, '.', n);
    const char *d2 = d1 ? memchr(d1 + 1, '.', n - (size_t)(d1 + 1 - token)) : NULL;
    if (d1 == NULL || d2 == NULL || memchr(d2 + 1, '.', n - (size_t)(d2 + 1 - token))) {
        px_err(err, errlen, "token is not three dot-separated parts");
        goto out;
    }
    hdr = auth_json_part(token, (size_t)(d1 - token));
    claims = auth_json_part(d1 + 1, (size_t)(d2 - d1 - 1));
    if (!json_is_object(hdr) || !json_is_object(claims)) {
        px_err(err, errlen, "token header or claims are not base64url JSON objects");
        goto out;
    }
    uint8_t sig[AUTH_TOKEN_MAX];
    long siglen = b64url_decode(d2 + 1, n - (size_t)(d2 + 1 - token), sig);
    if (auth_check_signature(a, hdr, token, (size_t)(d2 - token), sig, siglen, err, errlen) !=
        PX_OK)
        goto out;
    rc = auth_check_claims(a, claims, now_s, user, dev, err, errlen);
out:
    json_decref(hdr);
    json_decref(claims);
    return rc;
}

int auth_sign(const char *secret, const char *user, int64_t iat_s, int64_t exp_s,
              char *out, size_t outlen)
{
    return auth_sign_device(secret, user, NULL, iat_s, exp_s, out, outlen);
}

int auth_sign_device(const char *secret, const char *user, const char *dev, int64_t iat_s,
                     int64_t exp_s, char *out, size_t outlen)
{
    if (!id_valid_user(user) || (dev != NULL && !id_valid_user(dev)) || secret == NULL)
        return PX_ERROR;
    static const char hdr[] = "{\"alg\":\"HS256\",\"typ\":\"JWT\"}";
    char claims[256], buf[640];
    int cl = dev == NULL
                 ? snprintf(claims, sizeof(claims), "{\"sub\":\"%s\",\"iat\":%lld,\"exp\":%lld}",
                            user, (long long)iat_s, (long long)exp_s)
                 : snprintf(claims, sizeof(claims),
                            "{\"sub\":\"%s\",\"dev\":\"%s\",\"iat\":%lld,\"exp\":%lld}", user,
                            dev, (long long)iat_s, (long long)exp_s);
    if (cl < 0 || (size_t)cl >= sizeof(claims))
        return PX_ERROR;
    size_t o = b64url_encode((const uint8_t *)hdr, sizeof(hdr) - 1, buf);
    buf[o++] = '.';
    o += b64url_encode((const uint8_t *)claims, (size_t)cl, buf + o);
    uint8_t mac[32];
    auth_hmac(secret, buf, o, mac);
    buf[o++] = '.';
    o += b64url_encode(mac, 32, buf + o);
    if (o + 1 > outlen)
        return PX_ERROR;
    memcpy(out, buf, o + 1);
    return PX_OK;
}
