/* Owns "where is this user connected": a per-process cache in front of the
 * presence registry (store_presence_lookup), and pushing freshly consumed
 * events to those gateways (before they are stored: inbox.c). The cache
 * may be stale for up to its TTL: that can only delay an event until the
 * user's next sync (the inbox keeps it until acked), never lose it. It is
 * also what closes the connect race: a SyncRequest notes its gateway here
 * before the registry write lands, so an event consumed right after the
 * sync scan is still pushed live. An expired entry is still used for the
 * push and refreshed right after it (route_refresh), so the live path asks
 * the registry only for a user the cache has never seen.
 *
 * The cache is direct-mapped (one entry per hash slot, a colliding user
 * evicts): bounded memory, O(1), and a miss costs only one lookup. Offline
 * users are cached too (zero gateways), which saves most lookups. Main
 * thread only, no lock.
 *
 * An online entry lives longer (PARLEY_PRESENCE_ONLINE_CACHE_MS, 30 s)
 * than an offline one (PARLEY_PRESENCE_CACHE_MS, 2 s): every connection
 * sends its SyncRequest on the user's inbox partition, which this process
 * consumes before any later event of the user and notes here, so an
 * online entry can only be stale by a gateway the user left (a wasted
 * push), never miss one it joined. The refreshes were one FerretDB call
 * per user every 2 s, about as much store time as the acks at 100/s. An
 * offline entry stays short: it is what a note evicted by a colliding user
 * and a lagging registry would leave behind. A new assignment of the
 * inbox consumer (bus_generation) drops every entry, since the user may
 * have synced while another process owned the partition. */
#include "common.h"
#include "log.h"
#include "msgstore.h"

#include <jansson.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#define ROUTE_SLOTS (1u << 17)   /* 1 MiB of pointers; entries ~100 B each */
#define ROUTE_MAX_GWS 16         /* gateways of one user we push to */
#define ROUTE_NOTE_MIN_MS 1000   /* a sync's note outlives even a tiny TTL */
/* How long a sync's gateway is kept in the user's entry although the
 * registry does not name it yet: presence consumes the connect on its own
 * topic and lags under load (seconds), and a refresh that read the lagging
 * registry used to overwrite the note with "offline", so members who had
 * just synced missed live group messages until they reconnected. A wrong
 * note costs only wasted pushes (the events are stored). */
#define ROUTE_NOTE_GRACE_MS 30000

typedef struct route_entry {
    int64_t expires_ms;          /* monotonic */
    int64_t note_until_ms;       /* note is kept until then, or until the registry names it */
    char note[65];               /* the gateway of the user's latest sync, or "" */
    int refreshing;              /* a registry lookup of the user is under way */
    int partial;                 /* gws come from notes only: the registry not asked yet */
    size_t n;
    char *user;                  /* points after gws */
    char gws[][65];
} route_entry;

struct route_cache {
    unsigned gen;                /* the assignment the entries belong to */
    int has_gen;
    route_entry *slots[ROUTE_SLOTS];
};

route_cache *route_cache_new(void)
{
    return px_calloc(1, sizeof(route_cache));
}

static void route_cache_clear(route_cache *rc)
{
    for (size_t i = 0; i < ROUTE_SLOTS; i++) {
        free(rc->slots[i]);
        rc->slots[i] = NULL;
    }
}

void route_cache_free(route_cache *rc)
{
    if (rc == NULL)
        return;
    route_cache_clear(rc);
    free(rc);
}

/* Drops every entry when the consumer's assignment moved on. */
static void route_assignment(msgstore *ms)
{
    unsigned gen = bus_generation(ms->svc.b);
    if (ms->cache->has_gen && ms->cache->gen == gen)
        return;
    route_cache_clear(ms->cache);
    ms->cache->gen = gen;
    ms->cache->has_gen = 1;
}

/* When an entry of n gateways read at now expires. */
static int64_t route_expiry(const msgstore *ms, size_t n, int64_t now)
{
    const config *c = &ms->svc.cfg;
    return now + (n > 0 ? PX_MAX(c->presence_online_ttl_ms, c->presence_ttl_ms)
                        : c->presence_ttl_ms);
}

static route_entry **route_slot(route_cache *rc, const char *user)
{
    uint64_t h = 1469598103934665603ULL; /* FNV-1a */
    for (const char *s = user; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ULL;
    return &rc->slots[h & (ROUTE_SLOTS - 1)];
}

static int route_has(const char (*gws)[65], size_t n, const char *gateway)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(gws[i], gateway) == 0)
            return 1;
    return 0;
}

/* Replaces user's entry. With a note (route_note_gateway: gws already
 * hold it) the note is kept for its grace. Without one, gws are the
 * registry's answer, and the replaced entry's note carries over while in
 * its grace and missing from them (added to gws); once the registry names
 * the gateway, the note is done. A partial entry's gateways (notes of
 * syncs consumed here) all carry over into the registry's answer, which
 * may lag behind them. */
static void route_put_noted(route_cache *rc, const char *user, const char (*in)[65], size_t n,
                            int64_t expires_ms, const char *note, int64_t note_until_ms,
                            int partial)
{
    size_t ulen = strlen(user);
    route_entry **slot = route_slot(rc, user);
    const route_entry *old = *slot;
    int from_registry = note == NULL;
    int same = old != NULL && strcmp(old->user, user) == 0;
    char gws[ROUTE_MAX_GWS][65];
    size_t nin = n;
    memcpy(gws, in, n * sizeof(gws[0]));
    for (size_t i = 0; from_registry && same && old->partial && i < old->n; i++)
        if (!route_has((const char (*)[65])gws, n, old->gws[i]) && n < ROUTE_MAX_GWS)
            memcpy(gws[n++], old->gws[i], sizeof(gws[0]));
    if (from_registry && same && old->note[0] != '\0') {
        note = old->note;
        note_until_ms = old->note_until_ms;
    }
    /* Only the registry's own answer ends a note, not a partial entry's
     * carried gateways. */
    int keep = note != NULL && note_until_ms > px_mono_ms() &&
               !(from_registry && route_has(in, nin, note));
    size_t extra = keep && !route_has((const char (*)[65])gws, n, note) && n < ROUTE_MAX_GWS;
    route_entry *e = px_malloc(sizeof(*e) + (n + extra) * sizeof(e->gws[0]) + ulen + 1);
    e->expires_ms = expires_ms;
    e->refreshing = 0;
    e->partial = partial;
    e->note_until_ms = keep ? note_until_ms : 0;
    snprintf(e->note, sizeof(e->note), "%s", keep ? note : "");
    e->n = n + extra;
    memcpy(e->gws, gws, n * sizeof(e->gws[0]));
    if (extra)
        memcpy(e->gws[n], e->note, sizeof(e->gws[0]));
    e->user = (char *)&e->gws[e->n];
    memcpy(e->user, user, ulen + 1);
    free(*slot);
    *slot = e;
}

static void route_put(route_cache *rc, const char *user, const char (*gws)[65], size_t n,
                      int64_t expires_ms)
{
    route_put_noted(rc, user, gws, n, expires_ms, NULL, 0, 0);
}

/* The cached entry of user, fresh or expired, or NULL. */
static const route_entry *route_find(route_cache *rc, const char *user)
{
    const route_entry *e = *route_slot(rc, user);
    return e != NULL && strcmp(e->user, user) == 0 ? e : NULL;
}

/* Asks the registry; PX_ERROR leaves *n = 0 (the caller treats the user as
 * offline for now, which delays at most until the next sync). Beats are not
 * checked here: presence expires a silent gateway's records once it is sure
 * (caught up on its topic), while a beat check here, against the wall clock,
 * read a presence service that lags as "every gateway is dead". A push to a
 * gateway that did die is only wasted: the event waits in the inbox. */
static int route_lookup(msgstore *ms, const char *user, char (*gws)[65], size_t *n)
{
    char err[PX_ERRLEN] = "";
    int64_t t0 = service_clock_us();
    *n = 0;
    int rc = store_presence_lookup(ms->svc.st, user, 0, gws, ROUTE_MAX_GWS, n, err, sizeof(err));
    service_observe(ms->m.lat_lookup, t0);
    if (rc != PX_OK) {
        *n = 0;
        metric_add(ms->m.lookup_failures, 1);
        log_warn("presence lookup failed", "{s:s, s:s}", "user", user, "error", err);
    }
    return rc;
}

/* The user's gateways, from the cache or the registry (then cached). An
 * expired entry is used as it is, *stale set: the caller pushes at once
 * and asks the registry after (route_live). */
static size_t route_gateways(msgstore *ms, const char *user, char (*gws)[65], int *stale)
{
    int64_t now = px_mono_ms();
    const route_entry *e = route_find(ms->cache, user);
    *stale = 0;
    if (e != NULL) {
        metric_add(ms->m.cache_hits, 1);
        memcpy(gws, e->gws, e->n * sizeof(e->gws[0]));
        *stale = e->expires_ms <= now;
        return e->n;
    }
    metric_add(ms->m.cache_misses, 1);
    size_t n = 0;
    if (route_lookup(ms, user, gws, &n) == PX_OK && ms->svc.cfg.presence_ttl_ms > 0)
        route_put(ms->cache, user, (const char (*)[65])gws, n, route_expiry(ms, n, now));
    return n;
}

void route_note_gateway(msgstore *ms, const char *user, const char *gateway, int alone)
{
    char gws[ROUTE_MAX_GWS][65];
    size_t n = 0;
    int64_t now = px_mono_ms();
    route_assignment(ms);
    const route_entry *e = route_find(ms->cache, user);
    int fresh = e != NULL && e->expires_ms > now;
    /* An expired entry's gateways are kept for a user with other devices
     * (the stale path checks them); a user alone has no other gateway to
     * reach but this one's other connections, which a fresh entry holds. */
    if (e != NULL && (fresh || !alone)) {
        n = e->n;
        memcpy(gws, e->gws, n * sizeof(gws[0]));
    }
    size_t i = 0;
    while (i < n && strcmp(gws[i], gateway) != 0)
        i++;
    if (i == n) {
        if (n == ROUTE_MAX_GWS)
            n--; /* the newest connection wins the last place */
        snprintf(gws[n++], sizeof(gws[0]), "%s", gateway);
    }
    /* Without a fresh entry the user's other gateways (phone + web on two
     * gateways) are not known for sure: the entry stays expired, so the
     * next push reaches the gateways it holds at once and asks the
     * registry after it (the stale path of route_live), which pushes to
     * any other gateway it names. Asking here, on the consume thread, held
     * every record behind a wave of connects: 256 group members' syncs cost
     * 512 lookups of ~57 ms each on a loaded FerretDB, and the group's
     * copies waited ~10 s. A user alone (one synced device: most users)
     * needs no lookup at all, and with it none came in the first second of
     * a run either: 200 new users' lookups of ~50 ms each made that
     * second's messages late on the stack. */
    int partial = (e == NULL || e->partial) && !alone;
    int64_t expires = fresh || alone ? PX_MAX(route_expiry(ms, n, now), now + ROUTE_NOTE_MIN_MS)
                                     : now;
    route_put_noted(ms->cache, user, (const char (*)[65])gws, n, expires, gateway,
                    now + ROUTE_NOTE_GRACE_MS, partial && !fresh);
}

int route_all_gateways(msgstore *ms, const char *user, char (*gws)[65], size_t max, size_t *n,
                       char *err, size_t errlen)
{
    int rc = store_presence_lookup(ms->svc.st, user, 0, gws, max, n, err, errlen);
    if (rc != PX_OK)
        *n = 0;
    route_assignment(ms);
    const route_entry *e = route_find(ms->cache, user);
    for (size_t i = 0; e != NULL && i < e->n && *n < max; i++)
        if (!route_has((const char (*)[65])gws, *n, e->gws[i]))
            memcpy(gws[(*n)++], e->gws[i], sizeof(gws[0]));
    return rc;
}

/* ---- live routing ---- */

typedef struct route_ref {
    const char *user;
    size_t i;
} route_ref;

static int route_ref_cmp(const void *a, const void *b)
{
    const route_ref *x = a, *y = b;
    int c = strcmp(x->user, y->user);
    if (c != 0)
        return c;
    return x->i < y->i ? -1 : x->i > y->i;
}

/* Pushes one user's events (refs, in offset order) to ngws gateways in as
 * few Deliveries as the ceilings allow. */
static void route_user(msgstore *ms, const store_event *ev, const route_ref *refs, size_t n,
                       const char (*gws)[65], size_t ngws)
{
    const char *user = refs[0].user;
    if (ngws == 0) {
        metric_add(ms->m.offline, (int64_t)n);
        return;
    }
    deliv d;
    deliv_init(&d);
    for (size_t k = 0; k <= n; k++) {
        int last = k == n;
        size_t len = last ? 0 : ev[refs[k].i].json_len;
        if (d.n > 0 && (last || deliv_full(&d, len))) {
            char err[PX_ERRLEN] = "";
            if (deliv_send(ms, &d, gws, ngws, user, 0, batch_tag_best_effort(ms), err,
                           sizeof(err)) != PX_OK)
                log_warn("live delivery not produced; it waits for the next sync",
                         "{s:s, s:s, s:I}", "user", user, "error", err, "events", (json_int_t)d.n);
            deliv_reset(&d);
        }
        if (!last)
            deliv_add(&d, ev[refs[k].i].json, len, 0, ev[refs[k].i].origin,
                      ev[refs[k].i].seq);
    }
}

/* Registry lookups of many users, side by side when the store serves calls
 * in parallel: each lookup is a collection scan on FerretDB (2-9 ms under
 * load), and one after another they were the largest cost of storing a
 * run (1.7 ms per message at 1,000/s). One after another otherwise
 * (parleyd: 0.02 ms lookups, where threads would cost more than they
 * save). route_lookup_run only asks (any thread); route_lookup_keep puts
 * the answers into the cache (main thread). */
typedef struct route_miss {
    const char *user;
    char gws[ROUTE_MAX_GWS][65];
    size_t n;
    int rc;
} route_miss;

typedef struct route_prefetch {
    msgstore *ms;
    route_miss *miss;
} route_prefetch;

static void route_prefetch_one(void *arg, size_t i)
{
    route_prefetch *p = arg;
    route_miss *m = &p->miss[i];
    m->rc = route_lookup(p->ms, m->user, m->gws, &m->n);
}

static void route_lookup_run(msgstore *ms, route_miss *miss, size_t nm)
{
    route_prefetch p = { ms, miss };
    size_t threads = store_concurrency(ms->svc.st);
    if (nm >= 2 && threads >= 2)
        px_parallel(nm, threads, route_prefetch_one, &p);
    else
        for (size_t i = 0; i < nm; i++)
            route_prefetch_one(&p, i);
}

static void route_lookup_keep(msgstore *ms, const route_miss *miss, size_t nm)
{
    metric_add(ms->m.cache_misses, (int64_t)nm);
    int64_t now = px_mono_ms();
    for (size_t i = 0; i < nm; i++) {
        route_entry *e = *route_slot(ms->cache, miss[i].user);
        if (miss[i].rc == PX_OK && ms->svc.cfg.presence_ttl_ms > 0)
            route_put(ms->cache, miss[i].user, (const char (*)[65])miss[i].gws, miss[i].n,
                      route_expiry(ms, miss[i].n, now));
        else if (e != NULL && strcmp(e->user, miss[i].user) == 0)
            e->refreshing = 0; /* the next push of the user asks again */
    }
}

/* The users of a run that the cache does not know at all, looked up side
 * by side before anything is pushed (route_user then finds them and counts
 * a hit: the metric shows each as one miss and one hit). */
static void route_prefetch_misses(msgstore *ms, const route_ref *refs, size_t n)
{
    if (ms->svc.cfg.presence_ttl_ms <= 0 || store_concurrency(ms->svc.st) < 2)
        return;
    route_miss *miss = px_malloc(n * sizeof(*miss));
    size_t nm = 0;
    for (size_t a = 0; a < n; a++)
        if ((a == 0 || strcmp(refs[a].user, refs[a - 1].user) != 0) &&
            route_find(ms->cache, refs[a].user) == NULL)
            miss[nm++] = (route_miss){ .user = refs[a].user };
    if (nm >= 2) {
        route_lookup_run(ms, miss, nm);
        route_lookup_keep(ms, miss, nm);
    }
    free(miss);
}

/* A user pushed to from an expired entry: its refs and the gateways used.
 * follow: another run's lookup of the user was under way, so this run
 * compares with the cache once that one has ended (runs end in order)
 * instead of asking the registry again: with the write-behind pipeline
 * (writer.c) many runs are pushed before the first one ends, and each
 * would have looked the same user up. */
typedef struct route_stale {
    size_t a, b;
    route_miss old;
    int follow;
} route_stale;

/* 1 if a lookup of user is under way; else marks one as started. */
static int route_refreshing(route_cache *rc, const char *user)
{
    route_entry *e = *route_slot(rc, user);
    if (e == NULL || strcmp(e->user, user) != 0)
        return 0;
    int was = e->refreshing;
    e->refreshing = 1;
    return was;
}

/* Stale-while-revalidate: the users pushed to from expired entries are
 * looked up after their pushes left, beside the run's store calls (on a
 * thread of their own when the store serves calls in parallel), and a
 * gateway the registry names that the old entry did not gets the same
 * events when the run ends. So an expired entry costs a live event no
 * registry round trip, and is never worse than waiting for the lookup: a
 * user who moved is reached within the run, one who left only costs a
 * wasted push (the event is stored). */
struct route_refresh {
    msgstore *ms;
    const store_event *ev;
    route_ref *refs;
    route_stale *st;
    route_miss *now;           /* the lookups: the users not following */
    size_t ns, nlook;
    pthread_t th;
    int threaded;
    atomic_int done;           /* threaded: the lookups have ended */
};

static void *route_refresh_main(void *arg)
{
    route_refresh *r = arg;
    route_lookup_run(r->ms, r->now, r->nlook);
    atomic_store(&r->done, 1);
    return NULL;
}

int route_refresh_ready(const route_refresh *r)
{
    return r == NULL || !r->threaded || atomic_load(&r->done);
}

static void route_refresh_start(route_refresh *r)
{
    r->now = px_malloc(r->ns * sizeof(*r->now));
    r->nlook = 0;
    for (size_t k = 0; k < r->ns; k++)
        if (!r->st[k].follow)
            r->now[r->nlook++] = (route_miss){ .user = r->st[k].old.user };
    r->threaded = r->nlook > 0 && store_concurrency(r->ms->svc.st) >= 2 &&
                  pthread_create(&r->th, NULL, route_refresh_main, r) == 0;
}

/* What a following user's gateways are now: the cache, which the lookup
 * it followed has refreshed (or left as it was, if that lookup failed). */
static void route_follow(msgstore *ms, route_miss *now)
{
    const route_entry *e = route_find(ms->cache, now->user);
    now->rc = e != NULL ? PX_OK : PX_ERROR;
    now->n = e != NULL ? e->n : 0;
    if (e != NULL)
        memcpy(now->gws, e->gws, e->n * sizeof(e->gws[0]));
}

void route_refresh_end(route_refresh *r)
{
    if (r == NULL)
        return;
    msgstore *ms = r->ms;
    if (r->threaded)
        pthread_join(r->th, NULL);
    else
        route_lookup_run(ms, r->now, r->nlook);
    route_lookup_keep(ms, r->now, r->nlook);
    size_t look = 0;
    for (size_t k = 0; k < r->ns; k++) {
        const route_miss *old = &r->st[k].old;
        route_miss followed = { .user = old->user };
        const route_miss *now = &followed;
        if (r->st[k].follow)
            route_follow(ms, &followed);
        else
            now = &r->now[look++];
        char add[ROUTE_MAX_GWS][65];
        size_t nadd = 0;
        for (size_t g = 0; now->rc == PX_OK && g < now->n; g++) {
            size_t o = 0;
            while (o < old->n && strcmp(old->gws[o], now->gws[g]) != 0)
                o++;
            if (o == old->n)
                memcpy(add[nadd++], now->gws[g], sizeof(add[0]));
        }
        if (nadd > 0)
            route_user(ms, r->ev, r->refs + r->st[k].a, r->st[k].b - r->st[k].a,
                       (const char (*)[65])add, nadd);
    }
    free(r->now);
    free(r->st);
    free(r->refs);
    free(r);
}

route_refresh *route_live(msgstore *ms, const store_event *ev, size_t n)
{
    route_assignment(ms);
    if (n == 0)
        return NULL;
    route_ref *refs = px_malloc(n * sizeof(*refs));
    for (size_t i = 0; i < n; i++)
        refs[i] = (route_ref){ .user = ev[i].user, .i = i };
    /* Group by user; the index tie-break keeps each user's batch order,
     * which is offset order. */
    qsort(refs, n, sizeof(*refs), route_ref_cmp);
    route_prefetch_misses(ms, refs, n);
    route_stale *st = NULL;
    size_t ns = 0, a = 0;
    while (a < n) {
        size_t b = a + 1;
        while (b < n && strcmp(refs[b].user, refs[a].user) == 0)
            b++;
        route_miss used = { .user = refs[a].user };
        int stale;
        used.n = route_gateways(ms, used.user, used.gws, &stale);
        route_user(ms, ev, refs + a, b - a, (const char (*)[65])used.gws, used.n);
        if (stale) {
            if (st == NULL)
                st = px_malloc(n * sizeof(*st));
            st[ns++] = (route_stale){ .a = a, .b = b, .old = used,
                                      .follow = route_refreshing(ms->cache, used.user) };
        }
        a = b;
    }
    if (ns == 0) {
        free(refs);
        return NULL;
    }
    route_refresh *r = px_malloc(sizeof(*r));
    *r = (route_refresh){ .ms = ms, .ev = ev, .refs = refs, .st = st, .ns = ns };
    route_refresh_start(r);
    return r;
}
