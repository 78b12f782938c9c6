/* Owns the memory of recently noted keys (recent.h): an array of hashes in
 * buckets of RECENT_WAYS, each bucket kept newest first. */
#include "recent.h"
#include "common.h"

#include <stdlib.h>
#include <string.h>

struct recent {
    uint64_t *slot;   /* 0: empty */
    uint64_t mask;    /* buckets - 1 */
};

recent *recent_new(unsigned bits)
{
    recent *r = px_calloc(1, sizeof(*r));
    if (bits < 2)
        bits = 2;
    if (bits > 30)
        bits = 30;
    r->slot = px_calloc((size_t)1 << bits, sizeof(*r->slot));
    r->mask = ((uint64_t)1 << bits) / RECENT_WAYS - 1;
    return r;
}

void recent_free(recent *r)
{
    if (r == NULL)
        return;
    free(r->slot);
    free(r);
}

uint64_t recent_key(const char *a, const char *b)
{
    uint64_t h = b != NULL ? px_hash_pair(a, b) : px_hash(a);
    return h + (h == 0);
}

static uint64_t *recent_bucket(const recent *r, uint64_t k)
{
    /* The low bits pick the bucket: FNV's are well mixed by its multiply. */
    return r->slot + (k & r->mask) * RECENT_WAYS;
}

int recent_note(recent *r, uint64_t k)
{
    uint64_t *b = recent_bucket(r, k);
    size_t i = 0;
    while (i < RECENT_WAYS - 1 && b[i] != k)
        i++;
    int was = b[i] == k;
    memmove(b + 1, b, i * sizeof(*b));
    b[0] = k;
    return !was;
}

int recent_has(const recent *r, uint64_t k)
{
    const uint64_t *b = recent_bucket(r, k);
    for (size_t i = 0; i < RECENT_WAYS; i++)
        if (b[i] == k)
            return 1;
    return 0;
}
