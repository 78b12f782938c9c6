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

int devices_covered_by(const devices_dev *d, size_t n, int64_t seq, const char *const *acked,
                       size_t nacked, const char *const *now, size_t nnow)
{
    if (nacked == STORE_ACKED_MAX)
        return 0; /* not all known: keep the event (retention ends it) */
    for (size_t i = 0; i < n; i++)
        if (seq > d[i].since && !devices_has(acked, nacked, d[i].dev) &&
            !devices_has(now, nnow, d[i].dev))
            return 0;
    return 1;
}

int devices_covered(const devices_list *l, int64_t seq, const char *const *acked, size_t nacked,
                    const char *const *now, size_t nnow)
{
    return !l->overflow && devices_covered_by(l->d, l->n, seq, acked, nacked, now, nnow);
}

int devices_link(msgstore *ms, const char *user, const char *dev, int64_t offset,
                 int64_t *since, int *alone, char *err, size_t errlen)
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
    *alone = !others && !l.overflow; /* a list cut short may hide another device */
    if (*since != STORE_DEVICE_UNSYNCED) {
        /* Linked already, perhaps by the partition's owner before a
         * rebalance, after this process's acker read the list: kept lists
         * grow with the partition from here on (devcache_consumed). */
        devcache_forget(ms->devcache, user);
        return PX_OK;
    }
    /* Unknown here (registered by a gateway that has not written it yet,
     * or unlinked meanwhile) reads as unsynced: linking an unknown id
     * writes nothing, and the scan below finds nothing past INT64_MAX. */
    int64_t s = others ? offset : -1;
    if (store_device_link(ms->svc.st, user, dev, s, err, errlen) != PX_OK)
        return PX_ERROR;
    devcache_forget(ms->devcache, user);
    for (size_t i = 0; i < l.n; i++)
        if (strcmp(l.d[i].dev, dev) == 0)
            *since = s;
    if (*since != STORE_DEVICE_UNSYNCED)
        log_info("device linked", "{s:s, s:s, s:I}", "user", user, "device", dev, "since",
                 (json_int_t)s);
    return PX_OK;
}

/* ---- events that come from a device ---- */

static int devices_user_cmp(const void *a, const void *b)
{
    return strcmp(((const devices_list *)a)->user, ((const devices_list *)b)->user);
}

const devices_list *devices_find(const devices_list *l, size_t n, const char *user)
{
    devices_list probe = { .user = user };
    return n > 0 ? bsearch(&probe, l, n, sizeof(*l), devices_user_cmp) : NULL;
}

/* Only records with an origin cost a device read (one per distinct user
 * that no kept list decides for: devcache.c, the same question an ack
 * asks): everything else passes untouched, so the common path reads
 * nothing. */
int devices_unneeded(msgstore *ms, const msgstore_rec *recs, size_t n, int *skip, char *err,
                     size_t errlen)
{
    size_t nl = 0;
    int rc = PX_OK;
    int *open = px_calloc(n, sizeof(*open)); /* an origin record no kept list decided */
    size_t nopen = 0;
    for (size_t i = 0; i < n; i++) {
        const Parley__InboxRecord *x = recs[i].u.inbox;
        const char *origin = x->origin_device;
        if (origin[0] != '\0' && !devcache_covered(ms->devcache, x->user, recs[i].m->offset,
                                                    NULL, 0, &origin, 1, &skip[i]))
            nopen += open[i] = 1;
    }
    if (nopen == 0) {
        free(open);
        return PX_OK;
    }
    devices_list *l = px_calloc(nopen, sizeof(*l));
    uint64_t *epoch = px_malloc(nopen * sizeof(*epoch));
    for (size_t i = 0; i < n; i++) {
        const char *user = recs[i].u.inbox->user;
        size_t k = 0;
        while (open[i] && k < nl && strcmp(l[k].user, user) != 0)
            k++;
        if (open[i] && k == nl)
            l[nl++].user = user;
    }
    qsort(l, nl, sizeof(*l), devices_user_cmp);
    for (size_t k = 0; k < nl; k++)
        epoch[k] = devcache_epoch(ms->devcache, l[k].user);
    rc = devices_load(ms, l, nl, err, errlen);
    for (size_t i = 0; i < n && rc == PX_OK; i++) {
        if (!open[i])
            continue;
        const devices_list *u = devices_find(l, nl, recs[i].u.inbox->user);
        const char *origin = recs[i].u.inbox->origin_device;
        skip[i] = u != NULL && devices_covered(u, recs[i].m->offset, NULL, 0, &origin, 1);
    }
    /* Read after every one of these records was consumed: good for them. */
    for (size_t k = 0; k < nl && rc == PX_OK; k++) {
        int64_t upto = -1;
        for (size_t i = 0; i < n; i++)
            if (open[i] && strcmp(recs[i].u.inbox->user, l[k].user) == 0)
                upto = PX_MAX(upto, recs[i].m->offset);
        devcache_put(ms->devcache, &l[k], upto, epoch[k]);
    }
    free(epoch);
    free(l);
    free(open);
    return rc;
}

static int devices_origin_cmp(const void *a, const void *b)
{
    return strcmp(((const store_event *)a)->origin, ((const store_event *)b)->origin);
}

int devices_mark_origins(msgstore *ms, const store_event *ev, size_t n, char *err, size_t errlen)
{
    store_event *o = NULL;
    size_t no = 0;
    int rc = PX_OK;
    for (size_t i = 0; i < n; i++)
        if (ev[i].origin != NULL) {
            if (o == NULL)
                o = px_malloc(n * sizeof(*o));
            o[no++] = ev[i];
        }
    if (no == 0)
        return PX_OK;
    qsort(o, no, sizeof(*o), devices_origin_cmp);
    for (size_t a = 0; a < no && rc == PX_OK;) {
        size_t b = a;
        while (b < no && strcmp(o[b].origin, o[a].origin) == 0)
            b++;
        rc = store_inbox_mark(ms->svc.st, o + a, b - a, o[a].origin, err, errlen);
        a = b;
    }
    free(o);
    return rc;
}
