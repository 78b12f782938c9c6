/* libFuzzer target: a Range header (after an 8-byte representation size)
 * through httprange_parse, checking what its callers rely on: an accepted
 * range is non-empty and inside the representation. */
#include "common.h"
#include "httprange.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n)
{
    uint64_t size = 0, start, len;
    if (n < sizeof(size))
        return 0;
    memcpy(&size, data, sizeof(size));
    size %= 1ull << 40; /* media sizes: far below 2^64 */
    char *h = px_strndup((const char *)data + sizeof(size), n - sizeof(size));
    if (httprange_parse(h, size, &start, &len) == PX_OK &&
        (len == 0 || start >= size || len > size - start)) {
        fprintf(stderr, "Range \"%s\" of %llu bytes: start %llu len %llu\n", h,
                (unsigned long long)size, (unsigned long long)start, (unsigned long long)len);
        abort();
    }
    free(h);
    return 0;
}
