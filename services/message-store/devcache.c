/* Owns the device lists the acker decides with (issue 17): which devices
 * of a user must ack an event before it is deleted. Reading them from the
 * store for every ack chunk cost one store call per user per chunk, so a
 * group message to members with three devices each cost up to three reads
 * per member (one per device's ack) instead of one.
 *
 * Why a kept list is safe. A list may only ever be too long (a device
 * unlinked since: the event is kept, a wasted record until the retention
 * sweep, as for an ack that races an unlink today), never too short (a
 * device missing from it: its event could be deleted before it acked:
 * lost). A device is missing from a kept list only if it was linked after
 * the list was read. A device is linked when its first SyncRequest is
 * served, on the user's inbox partition, in partition order, and the link
 * is in the store before any later record of that partition is pushed or
 * stored (batch.c drains the write-behind stage before a sync); its since
 * is that SyncRequest's offset. So if an event of seq s was already in the
 * store when the list was read, every device linked later has since > s
 * and needs no event up to s. A list is therefore kept with the highest
 * seq of its user that the acker had seen stored before reading it
 * (upto), and decides only for events up to upto; a newer event reads the
 * list again (once per user and message, whatever the number of devices:
 * the later devices' acks of it find it kept). This holds across
 * processes: it rests on the store and the partition order, not on
 * being told.
 *
 * The one link that breaks the rule is a user's first synced device, whose
 * since is -1 (everything pending). A list that names no synced device is
 * therefore never kept. A user never goes from some synced device to none
 * (a device cannot unlink itself, so the one that unlinks the last other
 * stays), so a kept list never precedes a first link.
 *
 * Unlinks and links made in this process forget the user's list at once;
 * an unlink made by another process is seen when the list expires
 * (DEVCACHE_TTL_MS) or is read again for a newer event. Meanwhile the list
 * is only too long: acks by the other devices mark events instead of
 * deleting them.
 *
 * Kept lists also grow with the user's partition (devcache_consumed). The
 * rule above made the acker read the devices of nearly every user again
 * for each new message (the acked event is always newer than the list),
 * which on FerretDB was about three reads per 1:1 message. But a device
 * can only be linked by the SyncRequest on its user's inbox partition,
 * and every SyncRequest forgets the user's list here (devices_link),
 * whether it links or finds the device linked already (by an owner of the
 * partition before a rebalance). So while this process's consumer keeps
 * its assignment, a list it holds for a user whose event it consumes now
 * misses no device that needs that event: upto moves to the event's seq.
 * Two races close it: a read that began before a forget of its user (or
 * before a reset) is not kept (the epoch token, taken before the read);
 * and a new assignment (bus_generation) drops every list, since another
 * process may have linked devices while it owned the partitions.
 *
 * Direct-mapped (a colliding user evicts), bounded, one lock: the acker
 * thread reads and keeps, the consume thread forgets. */
#include "common.h"
#include "msgstore.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define DEVCACHE_SLOTS (1u << 14) /* 128 KiB of pointers; an entry ~100 B per device */
#define DEVCACHE_TTL_MS 5000

/* A forget bumps its slot's epoch, a reset all of them: a read's token
 * (devcache_epoch) is stale once either moved. */
#define DEVCACHE_TOKEN(dc, slot) (((uint64_t)(dc)->resets << 32) | (dc)->epochs[slot])

typedef struct devcache_entry {
    int64_t upto;             /* decides for events with seq <= upto */
    int64_t expires_ms;       /* monotonic */
    char *user;               /* points after d */
    size_t n;
    devices_dev d[];
} devcache_entry;

struct devcache {
    pthread_mutex_t mu;
    metric *hits, *misses;
    uint32_t resets;          /* under mu, as is everything below */
    unsigned gen;             /* the consumer's assignment the lists belong to */
    int has_gen;
    uint32_t epochs[DEVCACHE_SLOTS];
    devcache_entry *slots[DEVCACHE_SLOTS];
};

devcache *devcache_new(const msgstore_metrics *m)
{
    devcache *dc = px_calloc(1, sizeof(*dc));
    pthread_mutex_init(&dc->mu, NULL);
    dc->hits = m->devcache_hits;
    dc->misses = m->devcache_misses;
    return dc;
}

void devcache_free(devcache *dc)
{
    if (dc == NULL)
        return;
    for (size_t i = 0; i < DEVCACHE_SLOTS; i++)
        free(dc->slots[i]);
    pthread_mutex_destroy(&dc->mu);
    free(dc);
}

static size_t devcache_index(const char *user)
{
    uint64_t h = 1469598103934665603ULL; /* FNV-1a */
    for (const char *s = user; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ULL;
    return h & (DEVCACHE_SLOTS - 1);
}

static devcache_entry **devcache_slot(devcache *dc, const char *user)
{
    return &dc->slots[devcache_index(user)];
}

uint64_t devcache_epoch(devcache *dc, const char *user)
{
    pthread_mutex_lock(&dc->mu);
    uint64_t t = DEVCACHE_TOKEN(dc, devcache_index(user));
    pthread_mutex_unlock(&dc->mu);
    return t;
}

int devcache_lookup(devcache *dc, const char *user, int64_t seq, const char *const *acked,
                    size_t nacked, const char *const *now, size_t nnow, int *gone)
{
    int decided = 0;
    pthread_mutex_lock(&dc->mu);
    const devcache_entry *e = *devcache_slot(dc, user);
    if (e != NULL && seq <= e->upto && px_mono_ms() < e->expires_ms &&
        strcmp(e->user, user) == 0) {
        *gone = devices_covered_by(e->d, e->n, seq, acked, nacked, now, nnow);
        decided = 1;
    }
    pthread_mutex_unlock(&dc->mu);
    return decided;
}

int devcache_covered(devcache *dc, const char *user, int64_t seq, const char *const *acked,
                     size_t nacked, const char *const *now, size_t nnow, int *gone)
{
    int decided = devcache_lookup(dc, user, seq, acked, nacked, now, nnow, gone);
    metric_add(decided ? dc->hits : dc->misses, 1);
    return decided;
}

/* 1 when l names a device that has had its first sync. */
static int devcache_has_synced(const devices_list *l)
{
    for (size_t i = 0; i < l->n; i++)
        if (l->d[i].since != STORE_DEVICE_UNSYNCED)
            return 1;
    return 0;
}

void devcache_put(devcache *dc, const devices_list *l, int64_t upto, uint64_t epoch)
{
    if (l->overflow || !devcache_has_synced(l))
        return;
    size_t ulen = strlen(l->user);
    devcache_entry *e = px_malloc(sizeof(*e) + l->n * sizeof(e->d[0]) + ulen + 1);
    e->upto = upto;
    e->expires_ms = px_mono_ms() + DEVCACHE_TTL_MS;
    e->n = l->n;
    memcpy(e->d, l->d, l->n * sizeof(e->d[0]));
    e->user = (char *)&e->d[e->n];
    memcpy(e->user, l->user, ulen + 1);
    size_t i = devcache_index(l->user);
    devcache_entry *old = e;
    pthread_mutex_lock(&dc->mu);
    if (DEVCACHE_TOKEN(dc, i) == epoch) { /* else a link may have landed during the read */
        old = dc->slots[i];
        dc->slots[i] = e;
    }
    pthread_mutex_unlock(&dc->mu);
    free(old);
}

void devcache_forget(devcache *dc, const char *user)
{
    devcache_entry *old = NULL;
    size_t i = devcache_index(user);
    pthread_mutex_lock(&dc->mu);
    dc->epochs[i]++;
    if (dc->slots[i] != NULL && strcmp(dc->slots[i]->user, user) == 0) {
        old = dc->slots[i];
        dc->slots[i] = NULL;
    }
    pthread_mutex_unlock(&dc->mu);
    free(old);
}

/* mu held: drops every list (a new assignment). */
static void devcache_reset(devcache *dc)
{
    dc->resets++;
    for (size_t i = 0; i < DEVCACHE_SLOTS; i++) {
        free(dc->slots[i]);
        dc->slots[i] = NULL;
    }
}

void devcache_consumed(devcache *dc, unsigned gen, const store_event *ev, size_t n)
{
    pthread_mutex_lock(&dc->mu);
    if (!dc->has_gen || dc->gen != gen) {
        devcache_reset(dc);
        dc->gen = gen;
        dc->has_gen = 1;
    }
    for (size_t k = 0; k < n; k++) {
        devcache_entry *e = *devcache_slot(dc, ev[k].user);
        if (e != NULL && e->upto < ev[k].seq && strcmp(e->user, ev[k].user) == 0)
            e->upto = ev[k].seq;
    }
    pthread_mutex_unlock(&dc->mu);
}
