/* base64url without padding (RFC 4648 section 5), as JOSE spells bytes. */
#ifndef PARLEY_B64URL_H
#define PARLEY_B64URL_H

#include <stddef.h>
#include <stdint.h>

/* Writes the encoding of n bytes and a NUL into out, which must hold
 * (n * 4 + 2) / 3 + 1 bytes; returns the length written. */
size_t b64url_encode(const uint8_t *in, size_t n, char *out);

/* Decodes n characters into out, which must hold n * 3 / 4 + 1 bytes.
 * Returns the byte count, or -1 on a character outside the alphabet (a
 * NUL or '=' included), an impossible length, or a last character whose
 * unused low bits are not zero (one byte string has one spelling). */
long b64url_decode(const char *in, size_t n, uint8_t *out);

#endif
