/* The HTTP Range request header (RFC 9110 section 14), the one-range forms
 * media downloads serve. */
#ifndef PARLEY_HTTPRANGE_H
#define PARLEY_HTTPRANGE_H

#include <stdint.h>

/* One range "bytes=a-b", "bytes=a-" or "bytes=-n" of a representation of
 * size bytes. PX_OK: *start, *len set, len >= 1 and start + len <= size;
 * PX_DECLINED: unsatisfiable (416); PX_AGAIN: h is NULL or a form we do
 * not serve (several ranges, another unit), so the whole file goes out. */
int httprange_parse(const char *h, uint64_t size, uint64_t *start, uint64_t *len);

#endif
