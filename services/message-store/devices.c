/* Owns which of a user's devices need which events. An event is stored
 * once per user (the inbox does not grow with devices: a group message to
 * 256 members is 256 puts however many devices they have) together with
 * the devices that acked it; a device needs the events whose seq is above
 * its since (store.h). since is set when message-store serves the device's
 * first sync, in the order of the user's inbox partition: the user's first
 * device gets since -1 (everything pending, so a user's first connection
 * still finds what was sent while it had none, and data from before devices
 * keeps flowing), a later device the offset of its SyncRequest, so it gets
 * nothing older than its link. Deciding where a device joins in partition
 * order, not by clock, is what makes "nothing older" exact: every event
 * consumed after the SyncRequest has a higher seq. */
#include "auth.h"
#include "common.h"
#include "log.h"
#include "msgstore.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

/* The device of a record from a gateway older than devices. */
const char *devices_name(const char *dev)
{
    return dev != NULL && dev[0] != '\0' ? dev : AUTH_DEFAULT_DEVICE;
}

static int devices_add(void *arg, const store_device *d)
{
    devices_list *l = arg;
    if (d->unlinked)
        return PX_OK;
    if (l->n == DEVICES_MAX) {
        l->overflow = 1;
        return PX_OK;
    }
    snprintf(l->d[l->n].dev, sizeof(l->d[0].dev), "%s", d->dev);
    l->d[l->n++].since = d->since;
    return PX_OK;
}

static void devices_load_one(void *arg, size_t i)
{
    devices_list *l = (devices_list *)arg + i;
    l->n = 0;
    l->overflow = 0;
    l->rc = store_device_list(l->ms->svc.st, l->user, devices_add, l, l->err, sizeof(l->err));
}

int devices_load(msgstore *ms, devices_list *lists, size_t n, char *err, size_t errlen)
{
    for (size_t i = 0; i < n; i++)
        lists[i].ms = ms;
    size_t threads = store_concurrency(ms->svc.st);
    if (n >= 2 && threads >= 2)
        px_parallel(n, threads, devices_load_one, lists);
    else
        for (size_t i = 0; i < n; i++)
            devices_load_one(lists, i);
    for (size_t i = 0; i < n; i++)
        if (lists[i].rc != PX_OK)
            return px_err(err, errlen, "devices of %s: %s", lists[i].user, lists[i].err);
    return PX_OK;
}

static int devices_has(const char *const *v, size_t n, const char *dev)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(v[i], dev) == 0)
            return 1;
    return 0;
}

int devices_covered(const devices_list *l, int64_t seq, const char *const *acked, size_t nacked,
                    const char *const *now, size_t nnow)
{
    if (l->overflow || nacked == STORE_ACKED_MAX)
        return 0; /* not all known: keep the event (retention ends it) */
    for (size_t i = 0; i < l->n; i++)
        if (seq > l->d[i].since && !devices_has(acked, nacked, l->d[i].dev) &&
            !devices_has(now, nnow, l->d[i].dev))
            return 0;
    return 1;
}

int devices_link(msgstore *ms, const char *user, const char *dev, int64_t offset,
                 int64_t *since, char *err, size_t errlen)
{
    devices_list l = { .user = user };
    if (devices_load(ms, &l, 1, err, errlen) != PX_OK)
        return PX_ERROR;
    *since = STORE_DEVICE_UNSYNCED;
    int others = 0;
    for (size_t i = 0; i < l.n; i++) {
        if (strcmp(l.d[i].dev, dev) == 0)
            *since = l.d[i].since;
        else if (l.d[i].since != STORE_DEVICE_UNSYNCED)
            others = 1;
    }
    if (*since != STORE_DEVICE_UNSYNCED)
        return PX_OK;
    /* Unknown here (registered by a gateway that has not written it yet,
     * or unlinked meanwhile) reads as unsynced: linking an unknown id
     * writes nothing, and the scan below finds nothing past INT64_MAX. */
    int64_t s = others ? offset : -1;
    if (store_device_link(ms->svc.st, user, dev, s, err, errlen) != PX_OK)
        return PX_ERROR;
    for (size_t i = 0; i < l.n; i++)
        if (strcmp(l.d[i].dev, dev) == 0)
            *since = s;
    if (*since != STORE_DEVICE_UNSYNCED)
        log_info("device linked", "{s:s, s:s, s:I}", "user", user, "device", dev, "since",
                 (json_int_t)s);
    return PX_OK;
}
