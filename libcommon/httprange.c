/* Owns Range header parsing for downloads: one range only, anything else
 * is answered with the whole representation, as RFC 9110 allows. */
#include "httprange.h"
#include "common.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

int httprange_parse(const char *h, uint64_t size, uint64_t *start, uint64_t *len)
{
    char *end;
    unsigned long long a, b;
    if (h == NULL || strncmp(h, "bytes=", 6) != 0 || strchr(h, ',') != NULL)
        return PX_AGAIN;
    h += 6;
    if (*h == '-') {
        b = strtoull(h + 1, &end, 10);
        if (end == h + 1 || *end != '\0' || b == 0 || size == 0)
            return PX_DECLINED; /* no suffix of nothing (RFC 9110 14.1.1) */
        *len = PX_MIN(b, size);
        *start = size - *len;
        return PX_OK;
    }
    errno = 0;
    a = strtoull(h, &end, 10);
    if (end == h || *end != '-' || errno != 0)
        return PX_AGAIN;
    if (a >= size)
        return PX_DECLINED;
    b = size - 1;
    if (end[1] != '\0') {
        char *e2;
        b = strtoull(end + 1, &e2, 10);
        if (*e2 != '\0' || b < a)
            return PX_AGAIN;
        b = PX_MIN(b, size - 1);
    }
    *start = a;
    *len = b - a + 1;
    return PX_OK;
}
