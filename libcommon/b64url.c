/* Owns base64url: strict decoding, so that a signature or key has exactly
 * one spelling and malformed input never reaches a parser. */
#include "b64url.h"

#include <string.h>

static const char b64url_alphabet[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

size_t b64url_encode(const uint8_t *in, size_t n, char *out)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16;
        if (i + 1 < n) v |= (uint32_t)in[i + 1] << 8;
        if (i + 2 < n) v |= in[i + 2];
        out[o++] = b64url_alphabet[(v >> 18) & 63];
        out[o++] = b64url_alphabet[(v >> 12) & 63];
        if (i + 1 < n) out[o++] = b64url_alphabet[(v >> 6) & 63];
        if (i + 2 < n) out[o++] = b64url_alphabet[v & 63];
    }
    out[o] = '\0';
    return o;
}

long b64url_decode(const char *in, size_t n, uint8_t *out)
{
    if (n % 4 == 1)
        return -1;
    size_t o = 0;
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < n; i++) {
        const char *p = memchr(b64url_alphabet, in[i], 64);
        if (p == NULL || in[i] == '\0')
            return -1;
        acc = (acc << 6) | (uint32_t)(p - b64url_alphabet);
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[o++] = (uint8_t)(acc >> bits);
        }
    }
    if ((acc & ((1u << bits) - 1)) != 0)
        return -1;
    return (long)o;
}
