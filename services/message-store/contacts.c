/* Owns the contacts record of presence to contacts (issue 18): which users
 * shared a 1:1 conversation or a group, so presence lets them (and only
 * them) watch each other. It is written from the store stage, beside the
 * inbox put of the events that show it (a message from another user; a
 * group's `joined` event, which every member gets with the joiner as
 * actor), never on the push path, so a message's way to its reader is
 * unchanged. A memory of the pairs recorded lately (a direct-mapped table
 * of pair hashes) keeps the usual case, the same two users talking on, to
 * no store call at all; a pair it forgot is written again, which the store
 * absorbs. A pair is recorded once its put succeeded, so a failed store
 * step retries it with the batch. */
#include "common.h"
#include "msgstore.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CONTACTS_SLOTS 65536   /* power of two */

struct contacts {
    pthread_mutex_t mu;
    uint64_t slot[CONTACTS_SLOTS];
};

contacts *contacts_new(void)
{
    contacts *c = px_calloc(1, sizeof(*c));
    pthread_mutex_init(&c->mu, NULL);
    return c;
}

void contacts_free(contacts *c)
{
    if (c == NULL)
        return;
    pthread_mutex_destroy(&c->mu);
    free(c);
}

/* A hash of the pair in a fixed order ("lower/higher", '/' being no user
 * id character), never 0 (an empty slot). */
static uint64_t contacts_hash(const char *a, const char *b)
{
    char pair[2 * 65 + 2];
    int lt = strcmp(a, b) < 0;
    snprintf(pair, sizeof(pair), "%s/%s", lt ? a : b, lt ? b : a);
    uint64_t h = px_hash(pair);
    return h != 0 ? h : 1;
}

/* The other user ev shows ev->user in contact with, or NULL. For a group
 * event, actor points into *root, which the caller frees. */
static const char *contacts_other(const store_event *ev, json_t **root)
{
    *root = NULL;
    if (ev->kind == STORE_MESSAGE)
        return ev->sender != NULL && ev->sender[0] != '\0' ? ev->sender : NULL;
    if (ev->kind != STORE_GROUP_EVENT)
        return NULL;
    *root = json_loadb(ev->json, ev->json_len, 0, NULL);
    const char *what = json_string_value(json_object_get(*root, "event"));
    if (what == NULL || strcmp(what, "joined") != 0)
        return NULL;
    return json_string_value(json_object_get(*root, "actor"));
}

/* A pair to write, by its hash. */
typedef struct contacts_item {
    uint64_t h;
    store_pair p;
} contacts_item;

static int contacts_item_cmp(const void *a, const void *b)
{
    uint64_t x = ((const contacts_item *)a)->h, y = ((const contacts_item *)b)->h;
    return (x > y) - (x < y);
}

/* Sorts it[0..n) by hash and keeps one of each: the messages of a pair new
 * to the memory usually come several to a round (a conversation's first
 * seconds), and each repeat in one put was a duplicate key the store had
 * to absorb (FerretDB logs each as an error). Returns the new count. */
static size_t contacts_unique(contacts_item *it, size_t n)
{
    if (n < 2)
        return n;
    qsort(it, n, sizeof(*it), contacts_item_cmp);
    size_t k = 1;
    for (size_t i = 1; i < n; i++)
        if (it[i].h != it[k - 1].h)
            it[k++] = it[i];
    return k;
}

int contacts_record(msgstore *ms, const store_event *ev, size_t n, char *err, size_t errlen)
{
    contacts *c = ms->contacts;
    contacts_item *it = px_malloc((n > 0 ? n : 1) * sizeof(*it));
    json_t **roots = px_calloc(n > 0 ? n : 1, sizeof(*roots));
    size_t np = 0;
    pthread_mutex_lock(&c->mu);
    for (size_t i = 0; i < n; i++) {
        const char *other = contacts_other(&ev[i], &roots[i]);
        if (other == NULL || strcmp(other, ev[i].user) == 0)
            continue;
        uint64_t h = contacts_hash(ev[i].user, other);
        if (c->slot[h & (CONTACTS_SLOTS - 1)] != h)
            it[np++] = (contacts_item){ h, { ev[i].user, other } };
    }
    pthread_mutex_unlock(&c->mu);
    np = contacts_unique(it, np);
    store_pair *pairs = px_malloc((np > 0 ? np : 1) * sizeof(*pairs));
    for (size_t i = 0; i < np; i++)
        pairs[i] = it[i].p;
    int rc = np > 0 ? store_contacts_put(ms->svc.st, pairs, np, err, errlen) : PX_OK;
    if (rc == PX_OK) {
        pthread_mutex_lock(&c->mu);
        for (size_t i = 0; i < np; i++)
            c->slot[it[i].h & (CONTACTS_SLOTS - 1)] = it[i].h;
        pthread_mutex_unlock(&c->mu);
        metric_add(ms->m.contact_pairs, (int64_t)np);
    }
    for (size_t i = 0; i < n; i++)
        json_decref(roots[i]);
    free(roots);
    free(pairs);
    free(it);
    return rc;
}
