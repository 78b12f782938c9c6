/* Owns the acker's memory of the events this process stored lately: what
 * an ack needs of its event (seq, kind, sender, group) without reading it
 * back. On FerretDB the acker's store calls cost per user in an ack chunk:
 * a read of the events, a read of their marks, a delete, three queries per
 * user, which made the acker the store's largest client (most of
 * FerretDB's and PostgreSQL's CPU at 1,000 messages/s, all of it in a
 * 256-member group's acks). An event remembered here and decided by a kept
 * device list (devcache.c) needs only the delete.
 *
 * Why it is safe. An event is remembered once its inbox put is durable
 * (inbox.c, after putgate_stored), so it is in the store from then until
 * something deletes it; only an ack (or the retention sweep) does. An ack
 * applied from memory therefore either deletes the event, or finds it
 * deleted already by an earlier ack of it (here or in another process
 * after a rebalance), when its delete is a no-op and its receipt fact a
 * repeat, which the receipt ids make harmless downstream (as after a
 * crash). Marks need no read when the kept list says every device that
 * needs the event acks it in this chunk: no mark could keep it then. A
 * mark left on an event deleted this way (a device since unlinked, or the
 * sending device's own mark) stays until the retention sweep takes it.
 *
 * A hash table with chains (an ack needs every event of its user found
 * here to skip the read, so a lossy table would miss nearly every user),
 * bounded: at most STORED_MAX entries of at most ~700 bytes, the oldest
 * leaving first, and none older than STORED_TTL_MS. One lock: the writer
 * thread adds, the acker thread reads and forgets. */
#include "common.h"
#include "msgstore.h"

#include <jansson.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define STORED_BUCKETS (1u << 15)
#define STORED_MAX 32768
#define STORED_TTL_MS 60000 /* acks come within seconds; later ones read the store */
#define STORED_GROUP_MAX 255

typedef struct stored_entry {
    struct stored_entry *hnext;        /* its bucket's chain */
    struct stored_entry *older, *newer; /* the age list */
    uint64_t h;
    int64_t expires_ms;   /* monotonic */
    int64_t seq;
    int kind;
    char *user, *id, *sender, *group; /* point into text; sender, group may be NULL */
    char text[];
} stored_entry;

struct stored_mem {
    pthread_mutex_t mu;
    size_t n;
    stored_entry *oldest, *newest;
    stored_entry *bucket[STORED_BUCKETS];
};

stored_mem *stored_new(void)
{
    stored_mem *s = px_calloc(1, sizeof(*s));
    pthread_mutex_init(&s->mu, NULL);
    return s;
}

void stored_free(stored_mem *s)
{
    if (s == NULL)
        return;
    while (s->oldest != NULL) {
        stored_entry *e = s->oldest;
        s->oldest = e->newer;
        free(e);
    }
    pthread_mutex_destroy(&s->mu);
    free(s);
}

char *stored_group_of(const store_event *ev)
{
    char *group = NULL;
    if (memmem(ev->json, ev->json_len, "\"group\"", 7) == NULL)
        return NULL;
    json_t *o = json_loadb(ev->json, ev->json_len, 0, NULL);
    const char *g = json_string_value(json_object_get(o, "group"));
    if (g != NULL && g[0] != '\0' && strlen(g) <= STORED_GROUP_MAX)
        group = px_strdup(g);
    json_decref(o);
    return group;
}

/* Appends s (or nothing, for NULL) at *at; returns where it went. */
static char *stored_put_str(char **at, const char *s)
{
    if (s == NULL)
        return NULL;
    size_t len = strlen(s) + 1;
    char *p = memcpy(*at, s, len);
    *at += len;
    return p;
}

static stored_entry *stored_entry_new(const store_event *ev, int64_t now)
{
    char *group = ev->kind == STORE_MESSAGE ? stored_group_of(ev) : NULL;
    const char *sender = ev->kind == STORE_MESSAGE ? ev->sender : NULL;
    size_t len = strlen(ev->user) + strlen(ev->id) + 2 + (sender ? strlen(sender) + 1 : 0) +
                 (group ? strlen(group) + 1 : 0);
    stored_entry *e = px_malloc(sizeof(*e) + len);
    char *at = e->text;
    *e = (stored_entry){ .h = px_hash_pair(ev->user, ev->id), .expires_ms = now + STORED_TTL_MS,
                         .seq = ev->seq, .kind = ev->kind };
    e->user = stored_put_str(&at, ev->user);
    e->id = stored_put_str(&at, ev->id);
    e->sender = stored_put_str(&at, sender);
    e->group = stored_put_str(&at, group);
    free(group);
    return e;
}

/* mu held: e leaves its chain and the age list (the caller frees it). */
static void stored_unlink(stored_mem *s, stored_entry *e)
{
    stored_entry **p = &s->bucket[e->h & (STORED_BUCKETS - 1)];
    while (*p != e)
        p = &(*p)->hnext;
    *p = e->hnext;
    if (e->older != NULL)
        e->older->newer = e->newer;
    else
        s->oldest = e->newer;
    if (e->newer != NULL)
        e->newer->older = e->older;
    else
        s->newest = e->older;
    s->n--;
}

/* mu held: the entry of (user, id), or NULL. */
static stored_entry *stored_at(stored_mem *s, const char *user, const char *id, uint64_t h)
{
    for (stored_entry *e = s->bucket[h & (STORED_BUCKETS - 1)]; e != NULL; e = e->hnext)
        if (e->h == h && strcmp(e->id, id) == 0 && strcmp(e->user, user) == 0)
            return e;
    return NULL;
}

/* mu held: drops what is past its time or over the ceiling, oldest first;
 * returns the entries to free (chained through hnext). */
static stored_entry *stored_expire(stored_mem *s, int64_t now)
{
    stored_entry *gone = NULL;
    while (s->oldest != NULL && (s->n > STORED_MAX || now >= s->oldest->expires_ms)) {
        stored_entry *e = s->oldest;
        stored_unlink(s, e);
        e->hnext = gone;
        gone = e;
    }
    return gone;
}

static void stored_free_chain(stored_entry *e)
{
    while (e != NULL) {
        stored_entry *next = e->hnext;
        free(e);
        e = next;
    }
}

void stored_add(stored_mem *s, const store_event *ev, size_t n)
{
    int64_t now = px_mono_ms();
    for (size_t i = 0; i < n; i++) {
        stored_entry *e = stored_entry_new(&ev[i], now), *old;
        pthread_mutex_lock(&s->mu);
        old = stored_at(s, e->user, e->id, e->h); /* a repeat: the newer one stays */
        if (old != NULL)
            stored_unlink(s, old);
        stored_entry **b = &s->bucket[e->h & (STORED_BUCKETS - 1)];
        e->hnext = *b;
        *b = e;
        e->older = s->newest;
        e->newer = NULL;
        if (s->newest != NULL)
            s->newest->newer = e;
        else
            s->oldest = e;
        s->newest = e;
        s->n++;
        stored_entry *gone = stored_expire(s, now);
        pthread_mutex_unlock(&s->mu);
        free(old);
        stored_free_chain(gone);
    }
}

int stored_get(stored_mem *s, const char *user, const char *id, stored_event *out)
{
    uint64_t h = px_hash_pair(user, id);
    pthread_mutex_lock(&s->mu);
    const stored_entry *e = stored_at(s, user, id, h);
    if (e != NULL && px_mono_ms() >= e->expires_ms)
        e = NULL;
    if (e != NULL)
        *out = (stored_event){ .seq = e->seq, .kind = e->kind,
                               .sender = e->sender ? px_strdup(e->sender) : NULL,
                               .group = e->group ? px_strdup(e->group) : NULL };
    pthread_mutex_unlock(&s->mu);
    return e != NULL;
}

void stored_event_clear(stored_event *e)
{
    free(e->sender);
    free(e->group);
    e->sender = e->group = NULL;
}

void stored_forget(stored_mem *s, const store_key *keys, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        uint64_t h = px_hash_pair(keys[i].user, keys[i].id);
        pthread_mutex_lock(&s->mu);
        stored_entry *e = stored_at(s, keys[i].user, keys[i].id, h);
        if (e != NULL)
            stored_unlink(s, e);
        pthread_mutex_unlock(&s->mu);
        free(e);
    }
}
