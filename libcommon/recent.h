/* A fixed-size memory of keys noted lately (a "seen lately?" set), as
 * 64-bit hashes in buckets of RECENT_WAYS, newest first, the oldest of a
 * full bucket forgotten. Forgetting is the only way it errs in practice:
 * a caller must treat "not held" as "do the work" (a 64-bit collision that
 * made two keys one is left to chance, 2^-64 a pair). Buckets, not one slot
 * per hash: a direct-mapped table of 64k slots lost ~17 of 1,500 keys noted
 * together (ackwait.c's applied acks). Not thread-safe: one owner. */
#ifndef PARLEY_RECENT_H
#define PARLEY_RECENT_H

#include <stdint.h>

#define RECENT_WAYS 4

typedef struct recent recent;

/* 2^bits slots of 8 bytes (bits 2..30), allocated zeroed: the pages are
 * touched as they fill. */
recent *recent_new(unsigned bits);
void recent_free(recent *r);

/* The key of a string, or of a pair (a NUL between them) when b is not
 * NULL; never 0. */
uint64_t recent_key(const char *a, const char *b);

/* Notes k as the newest of its bucket; 1 if it was not held, 0 if it was. */
int recent_note(recent *r, uint64_t k);
/* 1 if k is held. */
int recent_has(const recent *r, uint64_t k);

#endif
