/* Owns which devices of a user a burst wakes: the user's linked devices
 * (the device records, issue 17) that have no connection record in the
 * presence registry when the burst ends, and that the webhook has not
 * answered 410 ("gone") for since their last connection. Read when the
 * burst calls, not when the events were stored, so a device that
 * connected meanwhile (it syncs) is not woken, and one that left is.
 *
 * The 410 marks live in this process only, by (user, device), compared
 * with the device's last connection: a device that connects again is
 * pushed again. A restart or a rebalance forgets them, which costs one
 * more call per gone device (answered 410 again), never a lost push. */
#include "common.h"
#include "log.h"
#include "push.h"

#include <stdlib.h>
#include <string.h>

#define TARGET_GONE_SLOTS 1024

typedef struct target_mark {
    struct target_mark *next;
    int64_t at_ms;             /* wall clock of the 410 */
    char key[];                /* "user/dev" */
} target_mark;

struct push_gone {
    target_mark *slots[TARGET_GONE_SLOTS];
};

static target_mark **target_slot(push_gone *g, const char *key)
{
    return &g->slots[px_hash(key) & (TARGET_GONE_SLOTS - 1)];
}

static target_mark *target_find(push_gone *g, const char *key)
{
    if (g == NULL)
        return NULL;
    for (target_mark *t = *target_slot(g, key); t != NULL; t = t->next)
        if (strcmp(t->key, key) == 0)
            return t;
    return NULL;
}

void target_gone(push *p, const char *user, const char *dev)
{
    char key[140];
    snprintf(key, sizeof(key), "%s/%s", user, dev);
    if (p->gone == NULL)
        p->gone = px_calloc(1, sizeof(*p->gone));
    target_mark *t = target_find(p->gone, key);
    if (t == NULL) {
        size_t len = strlen(key) + 1;
        t = px_malloc(sizeof(*t) + len);
        memcpy(t->key, key, len);
        target_mark **slot = target_slot(p->gone, key);
        t->next = *slot;
        *slot = t;
    }
    t->at_ms = px_now_ms();
    log_info("device gone: no pushes until it connects again", "{s:s, s:s}", "user", user,
             "device", dev);
}

void target_free(push *p)
{
    if (p->gone == NULL)
        return;
    for (size_t i = 0; i < TARGET_GONE_SLOTS; i++)
        while (p->gone->slots[i] != NULL) {
            target_mark *t = p->gone->slots[i];
            p->gone->slots[i] = t->next;
            free(t);
        }
    free(p->gone);
    p->gone = NULL;
}

typedef struct target_list {
    push *p;
    char (*devs)[65];
    size_t max, n;
    char online[PUSH_MAX_DEVICES][65];
    size_t nonline;
} target_list;

static int target_is_online(const target_list *l, const char *dev)
{
    for (size_t i = 0; i < l->nonline; i++)
        if (strcmp(l->online[i], dev) == 0)
            return 1;
    return 0;
}

/* A linked device is woken unless it is connected or gone since its last
 * connection (a mark older than that connection no longer holds). */
static int target_add(void *arg, const store_device *d)
{
    target_list *l = arg;
    if (d->unlinked || l->n == l->max)
        return PX_OK;
    if (target_is_online(l, d->dev)) {
        metric_add(l->p->m.skipped_online, 1);
        return PX_OK;
    }
    char key[140];
    snprintf(key, sizeof(key), "%s/%s", d->user, d->dev);
    const target_mark *t = target_find(l->p->gone, key);
    if (t != NULL && t->at_ms >= d->last_ms) {
        metric_add(l->p->m.skipped_gone, 1);
        return PX_OK;
    }
    snprintf(l->devs[l->n++], sizeof(l->devs[0]), "%s", d->dev);
    return PX_OK;
}

int target_devices(push *p, const char *user, char (*devs)[65], size_t max, size_t *n,
                   char *err, size_t errlen)
{
    target_list l = { .p = p, .devs = devs, .max = max };
    *n = 0;
    if (store_presence_devices(p->svc.st, user, l.online, PUSH_MAX_DEVICES, &l.nonline, err,
                               errlen) != PX_OK ||
        store_device_list(p->svc.st, user, target_add, &l, err, errlen) != PX_OK)
        return PX_ERROR;
    *n = l.n;
    return PX_OK;
}
