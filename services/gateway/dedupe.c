/* Owns a worker's memory of the inbox events it wrote to its connections
 * lately, as (connection id, seq) pairs, so that one connection gets one
 * event once wherever the gateway can know it: a live push held during a
 * sync that a page of the sync also carried, or pushes repeated by a
 * message-store replica that took a partition over after a crash or a
 * rebalance (it pushes again what the previous owner pushed but did not
 * commit).
 *
 * Direct-mapped and fixed in size: a pair pushed out by a colliding one
 * only lets a later copy through (clients still dedupe by id), and a pair
 * is never taken for another, since the whole pair is kept. 2^15 slots of
 * 16 bytes, 512 KiB per worker, touched as they fill. One worker's thread
 * only. */
#include "common.h"
#include "gateway.h"

#include <stdlib.h>

#define DEDUPE_BITS 15
#define DEDUPE_SLOTS (1u << DEDUPE_BITS)

typedef struct dedupe_slot {
    uint64_t conn;
    uint64_t seq1; /* seq + 1: 0 marks an empty slot */
} dedupe_slot;

struct dedupe {
    dedupe_slot *slots;
};

dedupe *dedupe_new(void)
{
    dedupe *d = px_calloc(1, sizeof(*d));
    d->slots = px_calloc(DEDUPE_SLOTS, sizeof(*d->slots));
    return d;
}

void dedupe_free(dedupe *d)
{
    if (d == NULL)
        return;
    free(d->slots);
    free(d);
}

/* splitmix64's finaliser: consecutive seqs of one connection spread. */
static uint32_t dedupe_slot_of(uint64_t conn_id, uint64_t seq1)
{
    uint64_t x = conn_id * 0x9e3779b97f4a7c15ull ^ seq1;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    x ^= x >> 31;
    return (uint32_t)(x >> (64 - DEDUPE_BITS));
}

int dedupe_seen(dedupe *d, uint64_t conn_id, int64_t seq)
{
    uint64_t seq1 = (uint64_t)seq + 1;
    dedupe_slot *s = &d->slots[dedupe_slot_of(conn_id, seq1)];
    if (s->conn == conn_id && s->seq1 == seq1)
        return 1;
    s->conn = conn_id;
    s->seq1 = seq1;
    return 0;
}
