/* Owns the rest of a sync's scan: the events one store read found past the
 * page it served, kept for the connection's next SyncRequest (issue 14).
 *
 * Why: FerretDB cannot push a sort or a `seq > x` filter down to
 * PostgreSQL, so every page's scan decoded, filtered and sorted the user's
 * whole inbox; a 10k backlog in pages of ~1,700 events paid six such scans
 * (1-1.5 s each on a busy FerretDB) for one reconnect. Now one scan reads
 * the whole backlog (up to a ceiling) and the next pages come from here.
 *
 * Why a kept rest stays right: seq is the inbox record's bus offset, this
 * process consumes the user's partition in order and stores it in order
 * (writer.c drains before a sync), so every event stored after the scan has
 * a larger seq than any the scan saw; nothing but this process writes the
 * user's inbox while it owns the partition. The rest is therefore exactly
 * the inbox between the page and the scan's last event, and only whether
 * the inbox ends there can change: a per-user write version
 * (synckept_wrote) says so, and a rest whose version moved is served and
 * then followed by a scan from its last event. Deletes meanwhile (acks, the
 * retention sweep) at worst serve an event twice, which clients dedupe by
 * id as for any redelivery. A rebalance may have let another process write
 * the inbox, so a rest from an older assignment (bus_generation) is dropped,
 * as is every rest of a user on a device command (an unlink's cleanup). */
#include "common.h"
#include "msgstore.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#define KEPT_VERSIONS 4096           /* write versions, by hash of user */
#define KEPT_MAX 256                 /* rests kept at once */
#define KEPT_BYTES (64 << 20)        /* their memory together (SYNC_EV_COST) */
#define KEPT_IDLE_MS 30000           /* a rest nobody asked for since is dropped */

struct synckept {
    pthread_mutex_t mu;
    sync_rest *r[KEPT_MAX];          /* unordered; NULL slots are free */
    size_t bytes;
    _Atomic uint32_t version[KEPT_VERSIONS];
    metric *gauge;
};

static size_t kept_slot(const char *user)
{
    uint32_t h = 2166136261u; /* FNV-1a */
    for (const unsigned char *p = (const unsigned char *)user; *p; p++)
        h = (h ^ *p) * 16777619u;
    return h % KEPT_VERSIONS;
}

synckept *synckept_new(metric *bytes_gauge)
{
    synckept *k = px_calloc(1, sizeof(*k));
    pthread_mutex_init(&k->mu, NULL);
    k->gauge = bytes_gauge;
    return k;
}

void sync_rest_free(sync_rest *r)
{
    if (r == NULL)
        return;
    for (size_t i = r->head; i < r->n; i++)
        free(r->ev[i].json);
    free(r->ev);
    free(r->user);
    free(r->dev);
    free(r);
}

/* Under mu. */
static void kept_drop(synckept *k, size_t i)
{
    k->bytes -= k->r[i]->bytes;
    sync_rest_free(k->r[i]);
    k->r[i] = NULL;
}

void synckept_free(synckept *k)
{
    if (k == NULL)
        return;
    for (size_t i = 0; i < KEPT_MAX; i++)
        if (k->r[i] != NULL)
            kept_drop(k, i);
    pthread_mutex_destroy(&k->mu);
    free(k);
}

uint32_t synckept_version(synckept *k, const char *user)
{
    return atomic_load(&k->version[kept_slot(user)]);
}

void synckept_wrote(synckept *k, const char *user)
{
    atomic_fetch_add(&k->version[kept_slot(user)], 1);
}

static int kept_is(const sync_rest *r, const char *user, const char *dev)
{
    return strcmp(r->user, user) == 0 && strcmp(r->dev, dev) == 0;
}

sync_rest *synckept_take(synckept *k, const char *user, const char *dev, int64_t after,
                         unsigned gen)
{
    sync_rest *got = NULL;
    int64_t now = px_mono_ms();
    pthread_mutex_lock(&k->mu);
    for (size_t i = 0; i < KEPT_MAX; i++) {
        sync_rest *r = k->r[i];
        if (r == NULL || !kept_is(r, user, dev))
            continue;
        /* One rest per connection's device: any other start (a reconnect
         * from its own position) or an older assignment ends it. */
        if (r->after == after && r->gen == gen && now - r->used_ms < KEPT_IDLE_MS) {
            k->bytes -= r->bytes;
            got = r;
            k->r[i] = NULL;
        } else {
            kept_drop(k, i);
        }
    }
    metric_set(k->gauge, (int64_t)k->bytes);
    pthread_mutex_unlock(&k->mu);
    return got;
}

void synckept_put(synckept *k, sync_rest *r)
{
    if (r == NULL)
        return;
    if (r->head == r->n || r->bytes > KEPT_BYTES) {
        sync_rest_free(r);
        return;
    }
    int64_t now = px_mono_ms();
    r->used_ms = now;
    pthread_mutex_lock(&k->mu);
    /* Room: drop what idled out, then the least lately used, until it
     * fits beside the others. */
    size_t free_slot = KEPT_MAX;
    for (size_t i = 0; i < KEPT_MAX; i++) {
        if (k->r[i] != NULL && now - k->r[i]->used_ms >= KEPT_IDLE_MS)
            kept_drop(k, i);
        if (k->r[i] == NULL && free_slot == KEPT_MAX)
            free_slot = i;
    }
    while (free_slot == KEPT_MAX || k->bytes + r->bytes > KEPT_BYTES) {
        size_t old = KEPT_MAX;
        for (size_t i = 0; i < KEPT_MAX; i++)
            if (k->r[i] != NULL && (old == KEPT_MAX || k->r[i]->used_ms < k->r[old]->used_ms))
                old = i;
        kept_drop(k, old);
        if (free_slot == KEPT_MAX)
            free_slot = old;
    }
    k->r[free_slot] = r;
    k->bytes += r->bytes;
    metric_set(k->gauge, (int64_t)k->bytes);
    pthread_mutex_unlock(&k->mu);
}

void synckept_forget(synckept *k, const char *user)
{
    pthread_mutex_lock(&k->mu);
    for (size_t i = 0; i < KEPT_MAX; i++)
        if (k->r[i] != NULL && strcmp(k->r[i]->user, user) == 0)
            kept_drop(k, i);
    metric_set(k->gauge, (int64_t)k->bytes);
    pthread_mutex_unlock(&k->mu);
}
