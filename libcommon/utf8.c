/* Owns UTF-8 validation for text frames (close 1007 on failure; wslay
 * checks framing only, not the text inside) and counting characters. */
#include "utf8.h"

/* Length of the sequence starting with lead byte b, or 0 if b cannot lead. */
static int utf8_seq_len(unsigned char b)
{
    if (b < 0x80) return 1;
    if (b >= 0xC2 && b <= 0xDF) return 2;
    if (b >= 0xE0 && b <= 0xEF) return 3;
    if (b >= 0xF0 && b <= 0xF4) return 4;
    return 0;
}

int utf8_valid(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned char b = s[i];
        int len = utf8_seq_len(b);
        if (len == 0 || i + (size_t)len > n)
            return 0;
        for (int k = 1; k < len; k++)
            if ((s[i + k] & 0xC0) != 0x80)
                return 0;
        unsigned char b1 = len > 1 ? s[i + 1] : 0;
        if ((b == 0xE0 && b1 < 0xA0) ||   /* overlong 3-byte */
            (b == 0xED && b1 > 0x9F) ||   /* surrogates */
            (b == 0xF0 && b1 < 0x90) ||   /* overlong 4-byte */
            (b == 0xF4 && b1 > 0x8F))     /* above U+10FFFF */
            return 0;
        i += (size_t)len;
    }
    return 1;
}

size_t utf8_chars(const unsigned char *s, size_t n)
{
    size_t chars = 0;
    for (size_t i = 0; i < n; i++)
        chars += (s[i] & 0xC0) != 0x80; /* every byte but a continuation starts one */
    return chars;
}
