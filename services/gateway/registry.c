/* Owns the map user -> connection ids of this gateway, and each user's
 * command rate buckets (per user, not per connection, so that opening more
 * connections buys no more burst). Sharded by a string hash so the delivery
 * thread and the workers rarely contend; a user's entry is removed with its
 * last connection, so memory follows live users. */
#include "common.h"
#include "gateway.h"

#include <stdlib.h>
#include <string.h>

#define REG_SHARDS 64
#define REG_BUCKETS 4096  /* per shard; chains stay short up to ~1M users */

typedef struct reg_entry {
    struct reg_entry *next;
    uint64_t *ids;
    uint32_t n, cap;
    int64_t refill_ms;             /* tokens are counted up to this time */
    float tokens[GW_RATE_N];
    char user[];
} reg_entry;

typedef struct reg_shard {
    pthread_mutex_t mu;
    reg_entry *buckets[REG_BUCKETS];
} reg_shard;

struct registry {
    double rate[GW_RATE_N], burst[GW_RATE_N];
    reg_shard shards[REG_SHARDS];
};

static uint64_t registry_hash(const char *s)
{
    uint64_t h = 1469598103934665603ULL; /* FNV-1a */
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ULL;
    return h;
}

static reg_shard *registry_shard(registry *r, const char *user)
{
    return &r->shards[registry_hash(user) % REG_SHARDS];
}

/* The link that points at user's entry (or where it would go); the shard's
 * lock must be held. */
static reg_entry **registry_slot(reg_shard *sh, const char *user)
{
    reg_entry **pp = &sh->buckets[(registry_hash(user) / REG_SHARDS) % REG_BUCKETS];
    while (*pp != NULL && strcmp((*pp)->user, user) != 0)
        pp = &(*pp)->next;
    return pp;
}

registry *registry_new(const double rate[GW_RATE_N], const double burst[GW_RATE_N])
{
    registry *r = px_calloc(1, sizeof(*r));
    memcpy(r->rate, rate, sizeof(r->rate));
    memcpy(r->burst, burst, sizeof(r->burst));
    for (size_t i = 0; i < REG_SHARDS; i++)
        pthread_mutex_init(&r->shards[i].mu, NULL);
    return r;
}

void registry_free(registry *r)
{
    if (r == NULL)
        return;
    for (size_t i = 0; i < REG_SHARDS; i++) {
        for (size_t j = 0; j < REG_BUCKETS; j++) {
            reg_entry *e = r->shards[i].buckets[j];
            while (e != NULL) {
                reg_entry *next = e->next;
                free(e->ids);
                free(e);
                e = next;
            }
        }
        pthread_mutex_destroy(&r->shards[i].mu);
    }
    free(r);
}

void registry_add(registry *r, const char *user, uint64_t conn_id)
{
    reg_shard *sh = registry_shard(r, user);
    pthread_mutex_lock(&sh->mu);
    reg_entry **pp = registry_slot(sh, user);
    if (*pp == NULL) {
        size_t n = strlen(user);
        reg_entry *e = px_calloc(1, sizeof(*e) + n + 1);
        memcpy(e->user, user, n + 1);
        e->refill_ms = px_mono_ms();
        for (size_t k = 0; k < GW_RATE_N; k++)
            e->tokens[k] = (float)r->burst[k];
        *pp = e;
    }
    reg_entry *e = *pp;
    if (e->n == e->cap) {
        e->cap = e->cap ? e->cap * 2 : 2;
        e->ids = px_realloc(e->ids, e->cap * sizeof(*e->ids));
    }
    e->ids[e->n++] = conn_id;
    pthread_mutex_unlock(&sh->mu);
}

void registry_remove(registry *r, const char *user, uint64_t conn_id)
{
    reg_shard *sh = registry_shard(r, user);
    pthread_mutex_lock(&sh->mu);
    reg_entry **pp = registry_slot(sh, user);
    reg_entry *e = *pp;
    for (uint32_t i = 0; e != NULL && i < e->n; i++) {
        if (e->ids[i] != conn_id)
            continue;
        e->ids[i] = e->ids[--e->n];
        if (e->n == 0) {
            *pp = e->next;
            free(e->ids);
            free(e);
        }
        break;
    }
    pthread_mutex_unlock(&sh->mu);
}

size_t registry_get(registry *r, const char *user, uint64_t *ids, size_t max)
{
    reg_shard *sh = registry_shard(r, user);
    pthread_mutex_lock(&sh->mu);
    reg_entry *e = *registry_slot(sh, user);
    size_t n = 0;
    for (; e != NULL && n < e->n && n < max; n++)
        ids[n] = e->ids[n];
    pthread_mutex_unlock(&sh->mu);
    return n;
}

size_t registry_count(registry *r, const char *user)
{
    reg_shard *sh = registry_shard(r, user);
    pthread_mutex_lock(&sh->mu);
    reg_entry *e = *registry_slot(sh, user);
    size_t n = e != NULL ? e->n : 0;
    pthread_mutex_unlock(&sh->mu);
    return n;
}

int registry_take(registry *r, const char *user, enum gw_rate kind)
{
    reg_shard *sh = registry_shard(r, user);
    int ok = 1;
    pthread_mutex_lock(&sh->mu);
    reg_entry *e = *registry_slot(sh, user);
    if (e != NULL) {
        int64_t now = px_mono_ms();
        double dt = (double)(now - e->refill_ms) / 1000.0;
        for (size_t k = 0; k < GW_RATE_N; k++)
            e->tokens[k] = (float)PX_MIN((double)e->tokens[k] + dt * r->rate[k], r->burst[k]);
        e->refill_ms = now;
        ok = e->tokens[kind] >= 1.0f;
        if (ok)
            e->tokens[kind] -= 1.0f;
    }
    pthread_mutex_unlock(&sh->mu);
    return ok;
}
