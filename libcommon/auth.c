/* Owns token checks. Only HS256 is accepted whatever the header says, so an
 * attacker cannot choose the algorithm; comparison is constant-time. */
#include "auth.h"
#include "common.h"
#include "ids.h"

#include <jansson.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <string.h>

static const char b64url[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

static size_t auth_b64_encode(const uint8_t *in, size_t n, char *out)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16;
        if (i + 1 < n) v |= (uint32_t)in[i + 1] << 8;
        if (i + 2 < n) v |= in[i + 2];
        out[o++] = b64url[(v >> 18) & 63];
        out[o++] = b64url[(v >> 12) & 63];
        if (i + 1 < n) out[o++] = b64url[(v >> 6) & 63];
        if (i + 2 < n) out[o++] = b64url[v & 63];
    }
    out[o] = '\0';
    return o;
}

/* Decodes unpadded base64url; returns the length or -1 on a bad character,
 * an impossible length or a non-canonical last character. out must hold
 * n * 3 / 4 + 1 bytes. */
static long auth_b64_decode(const char *in, size_t n, uint8_t *out)
{
    if (n % 4 == 1)
        return -1;
    size_t o = 0;
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < n; i++) {
        const char *p = memchr(b64url, in[i], 64);
        if (p == NULL || in[i] == '\0')
            return -1;
        acc = (acc << 6) | (uint32_t)(p - b64url);
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[o++] = (uint8_t)(acc >> bits);
        }
    }
    if ((acc & ((1u << bits) - 1)) != 0)
        return -1; /* non-canonical: the last character's unused bits are set */
    return (long)o;
}

static json_t *auth_json_part(const char *s, size_t n)
{
    uint8_t buf[AUTH_TOKEN_MAX];
    long len = auth_b64_decode(s, n, buf);
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
static int auth_not_after_now(json_t *claims, const char *name, int64_t now_s, char *err,
                              size_t errlen)
{
    json_t *v = json_object_get(claims, name);
    if (v == NULL)
        return PX_OK;
    if (!json_is_number(v))
        return px_err(err, errlen, "token %s is not a number", name);
    if (json_number_value(v) > (double)(now_s + AUTH_LEEWAY_S))
        return px_err(err, errlen, "token %s is in the future", name);
    return PX_OK;
}

static int auth_check_claims(json_t *claims, int64_t now_s, int64_t max_ttl_s, char user[65],
                             char *err, size_t errlen)
{
    json_t *sub = json_object_get(claims, "sub");
    json_t *exp = json_object_get(claims, "exp");
    if (!json_is_string(sub) || !id_valid_user(json_string_value(sub)))
        return px_err(err, errlen, "token sub is missing or not a valid user id");
    if (!json_is_number(exp))
        return px_err(err, errlen, "token exp is missing");
    if (json_number_value(exp) <= (double)now_s)
        return px_err(err, errlen, "token expired");
    if (json_number_value(exp) > (double)(now_s + max_ttl_s))
        return px_err(err, errlen, "token exp is more than PARLEY_TOKEN_MAX_TTL_S ahead");
    if (auth_not_after_now(claims, "nbf", now_s, err, errlen) != PX_OK ||
        auth_not_after_now(claims, "iat", now_s, err, errlen) != PX_OK)
        return PX_ERROR;
    snprintf(user, 65, "%s", json_string_value(sub));
    return PX_OK;
}

int auth_verify(const char *secret, const char *token, int64_t now_s, int64_t max_ttl_s,
                char user[65], char *err, size_t errlen)
{
    int rc = PX_ERROR;
    json_t *hdr = NULL, *claims = NULL;
    size_t n = strnlen(token, AUTH_TOKEN_MAX + 1);
    if (secret == NULL || *secret == '\0')
        return px_err(err, errlen, "no secret configured");
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
    const char *alg = json_string_value(json_object_get(hdr, "alg"));
    if (alg == NULL || strcmp(alg, "HS256") != 0) {
        px_err(err, errlen, "token alg must be HS256");
        goto out;
    }
    uint8_t mac[32], sig[AUTH_TOKEN_MAX];
    long siglen = auth_b64_decode(d2 + 1, n - (size_t)(d2 + 1 - token), sig);
    auth_hmac(secret, token, (size_t)(d2 - token), mac);
    if (siglen != 32 || CRYPTO_memcmp(mac, sig, 32) != 0) {
        px_err(err, errlen, "token signature does not match");
        goto out;
    }
    rc = auth_check_claims(claims, now_s, max_ttl_s, user, err, errlen);
out:
    json_decref(hdr);
    json_decref(claims);
    return rc;
}

int auth_sign(const char *secret, const char *user, int64_t iat_s, int64_t exp_s,
              char *out, size_t outlen)
{
    if (!id_valid_user(user) || secret == NULL)
        return PX_ERROR;
    static const char hdr[] = "{\"alg\":\"HS256\",\"typ\":\"JWT\"}";
    char claims[160], buf[512];
    int cl = snprintf(claims, sizeof(claims), "{\"sub\":\"%s\",\"iat\":%lld,\"exp\":%lld}",
                      user, (long long)iat_s, (long long)exp_s);
    if (cl < 0 || (size_t)cl >= sizeof(claims))
        return PX_ERROR;
    size_t o = auth_b64_encode((const uint8_t *)hdr, sizeof(hdr) - 1, buf);
    buf[o++] = '.';
    o += auth_b64_encode((const uint8_t *)claims, (size_t)cl, buf + o);
    uint8_t mac[32];
    auth_hmac(secret, buf, o, mac);
    buf[o++] = '.';
    o += auth_b64_encode(mac, 32, buf + o);
    if (o + 1 > outlen)
        return PX_ERROR;
    memcpy(out, buf, o + 1);
    return PX_OK;
}
