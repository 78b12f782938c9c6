/* UTF-8 validation (RFC 3629: no overlongs, no surrogates, <= U+10FFFF)
 * and counting. */
#ifndef PARLEY_UTF8_H
#define PARLEY_UTF8_H

#include <stddef.h>

int utf8_valid(const unsigned char *s, size_t n);
/* Characters (code points) in n bytes of valid UTF-8. */
size_t utf8_chars(const unsigned char *s, size_t n);

#endif
