/* Owns which devices of a user a burst wakes: the user's linked devices
 * (the device records, issue 17) that have no connection record in the
 * presence registry when the burst ends, and whose last 410 from the
 * webhook (kept in the device record, store_device_push_gone) is not newer
 * than their last connection. Read when the burst calls, not when the
 * events were stored, so a device that connected meanwhile (it syncs) is
 * not woken, and one that left is. */
#include "common.h"
#include "log.h"
#include "push.h"

#include <string.h>

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
 * connection (a 410 older than that connection no longer holds). */
static int target_add(void *arg, const store_device *d)
{
    target_list *l = arg;
    if (d->unlinked || l->n == l->max)
        return PX_OK;
    if (target_is_online(l, d->dev)) {
        metric_add(l->p->m.skipped_online, 1);
        return PX_OK;
    }
    if (d->push_gone_ms > 0 && d->push_gone_ms >= d->last_ms) {
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

/* A failed write costs one more call at the next burst, answered 410
 * again, which writes it again. */
void target_gone(push *p, const char *user, const char *dev)
{
    char err[PX_ERRLEN] = "";
    if (store_device_push_gone(p->svc.st, user, dev, px_now_ms(), err, sizeof(err)) != PX_OK) {
        log_warn("device gone, but not recorded", "{s:s, s:s, s:s}", "user", user, "device",
                 dev, "error", err);
        return;
    }
    log_info("device gone: no pushes until it connects again", "{s:s, s:s}", "user", user,
             "device", dev);
}
