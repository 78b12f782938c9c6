/* Owns the device commands a connection sends (issue 17): `devices` lists
 * the user's linked devices, `device_unlink` unlinks another of them. Both
 * ride the user's inbox partition (InboxRecord.device_cmd), so an unlink
 * takes effect at one point of the user's order: events consumed after it
 * never wait for the device, and the events before it that only the device
 * still needed are deleted here. Its connections are told to close (4001)
 * through every gateway the registry names for the user; its tokens are
 * refused at the upgrade from then on (store_device_touch). Every step is
 * idempotent, and the answer gates the command's commit, so a crash
 * repeats the command, never loses it.
 *
 * An ack applied on the acker thread while an unlink runs may still count
 * the unlinked device, as may one decided by another process's kept list
 * (devcache.c) until it expires; the event then stays until the retention
 * sweep (a wasted record, never a lost one). */
#include "common.h"
#include "log.h"
#include "msgstore.h"
#include "protocol.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DEVCMD_SCAN_PAGE 2000   /* events read per pass of an unlink's cleanup */
#define DEVCMD_MAX_GWS 16       /* gateways told to close the device's connections */

/* Answers the requesting connection with json (taken over and freed). */
static int devcmd_answer(msgstore *ms, size_t idx, const Parley__DeviceCommand *x, char *json,
                         size_t len, char *err, size_t errlen)
{
    char gw[1][65];
    deliv d;
    deliv_init(&d);
    snprintf(gw[0], sizeof(gw[0]), "%s", x->gateway);
    deliv_add(&d, json, len, 1, NULL, -1);
    free(json);
    int rc = deliv_send(ms, &d, (const char (*)[65])gw, 1, x->user, x->conn,
                        batch_tag_for(ms, idx), err, errlen);
    deliv_reset(&d);
    return rc;
}

static int devcmd_error(msgstore *ms, size_t idx, const Parley__DeviceCommand *x,
                        enum proto_code code, const char *msg, char *err, size_t errlen)
{
    size_t len;
    char *json = proto_render_error(x->ref, code, msg, &len);
    return devcmd_answer(ms, idx, x, json, len, err, errlen);
}

/* ---- list ---- */

typedef struct devcmd_list {
    proto_device d[DEVICES_MAX];
    char id[DEVICES_MAX][65];
    size_t n;
} devcmd_list;

static int devcmd_list_add(void *arg, const store_device *sd)
{
    devcmd_list *l = arg;
    if (sd->unlinked || l->n == DEVICES_MAX)
        return PX_OK;
    snprintf(l->id[l->n], sizeof(l->id[0]), "%s", sd->dev);
    l->d[l->n] = (proto_device){ .id = l->id[l->n], .first_seen = sd->first_ms,
                                 .last_seen = sd->last_ms };
    l->n++;
    return PX_OK;
}

static int devcmd_list_serve(msgstore *ms, size_t idx, const Parley__DeviceCommand *x,
                             char *err, size_t errlen)
{
    devcmd_list *l = px_calloc(1, sizeof(*l));
    char online[DEVICES_MAX][65];
    size_t non = 0;
    int rc = store_device_list(ms->svc.st, x->user, devcmd_list_add, l, err, errlen);
    if (rc == PX_OK)
        rc = store_presence_devices(ms->svc.st, x->user, online, DEVICES_MAX, &non, err, errlen);
    for (size_t i = 0; rc == PX_OK && i < l->n; i++) {
        l->d[i].current = strcmp(l->id[i], devices_name(x->from_device)) == 0;
        for (size_t k = 0; k < non; k++)
            l->d[i].online |= strcmp(online[k], l->id[i]) == 0;
    }
    if (rc == PX_OK) {
        size_t len;
        char *json = proto_render_devices(x->ref, l->d, l->n, &len);
        rc = devcmd_answer(ms, idx, x, json, len, err, errlen);
    }
    free(l);
    return rc;
}

/* ---- unlink ---- */

/* One page of the user's inbox: the events no remaining device needs. */
typedef struct devcmd_gc {
    const devices_list *l;
    store_key *keys, *marked;
    size_t nkeys, nmarked, seen;
    int64_t last_seq;
} devcmd_gc;

static int devcmd_gc_event(void *arg, const store_event *ev)
{
    devcmd_gc *c = arg;
    c->seen++;
    c->last_seq = ev->seq;
    if (!devices_covered(c->l, ev->seq, ev->acked, ev->nacked, NULL, 0))
        return PX_OK;
    store_key k = { px_strdup(ev->user), px_strdup(ev->id) };
    c->keys[c->nkeys++] = k;
    if (ev->nacked > 0)
        c->marked[c->nmarked++] = k;
    return PX_OK;
}

static void devcmd_gc_reset(devcmd_gc *c)
{
    for (size_t i = 0; i < c->nkeys; i++) {
        free((char *)c->keys[i].user);
        free((char *)c->keys[i].id);
    }
    c->nkeys = c->nmarked = c->seen = 0;
}

/* Deletes the user's events that every remaining device has acked (those
 * that waited only for the unlinked one), a page at a time. */
static int devcmd_drop_unneeded(msgstore *ms, const char *user, int64_t *dropped, char *err,
                                size_t errlen)
{
    devices_list *l = px_calloc(1, sizeof(*l));
    devcmd_gc c = { .l = l, .keys = px_malloc(DEVCMD_SCAN_PAGE * sizeof(store_key)),
                    .marked = px_malloc(DEVCMD_SCAN_PAGE * sizeof(store_key)), .last_seq = -1 };
    l->user = user;
    int rc = devices_load(ms, l, 1, err, errlen);
    *dropped = 0;
    while (rc == PX_OK) {
        rc = store_inbox_scan(ms->svc.st, user, NULL, c.last_seq, DEVCMD_SCAN_PAGE,
                              devcmd_gc_event, &c, err, errlen);
        if (rc == PX_OK && c.nkeys > 0)
            rc = store_inbox_delete(ms->svc.st, c.keys, c.nkeys, NULL, err, errlen);
        if (rc == PX_OK && c.nmarked > 0)
            rc = store_inbox_unmark(ms->svc.st, c.marked, c.nmarked, err, errlen);
        *dropped += (int64_t)c.nkeys;
        size_t seen = c.seen;
        devcmd_gc_reset(&c);
        if (seen < DEVCMD_SCAN_PAGE)
            break;
    }
    devcmd_gc_reset(&c);
    free(c.keys);
    free(c.marked);
    free(l);
    return rc;
}

/* Best effort: the registry's gateways of the user and the route cache's
 * (which holds the gateway of every sync consumed here, before the
 * registry, lagging under load, names it); a gateway neither knows keeps
 * the connection until it reconnects, which is then refused. */
static void devcmd_close_connections(msgstore *ms, const Parley__DeviceCommand *x)
{
    char gws[DEVCMD_MAX_GWS][65], err[PX_ERRLEN] = "";
    size_t n = 0;
    deliv d;
    deliv_init(&d);
    d.close_device = x->device;
    int rc = route_all_gateways(ms, x->user, gws, DEVCMD_MAX_GWS, &n, err, sizeof(err));
    if ((rc != PX_OK && n == 0) ||
        deliv_send(ms, &d, (const char (*)[65])gws, n, x->user, 0, batch_tag_best_effort(ms), err,
                   sizeof(err)) != PX_OK)
        log_warn("unlinked device's connections not told to close", "{s:s, s:s, s:s}", "user",
                 x->user, "device", x->device, "error", err);
}

static int devcmd_unlink_serve(msgstore *ms, size_t idx, const Parley__DeviceCommand *x,
                               char *err, size_t errlen)
{
    if (strcmp(x->device, devices_name(x->from_device)) == 0)
        return devcmd_error(ms, idx, x, PROTO_BAD_REQUEST,
                            "a device cannot unlink itself: unlink it from another device", err,
                            errlen);
    int rc = store_device_unlink(ms->svc.st, x->user, x->device, err, errlen);
    if (rc == PX_OK) {
        devcache_forget(ms->devcache, x->user);
        synckept_forget(ms->kept, x->user);
    }
    if (rc == PX_DECLINED)
        return devcmd_error(ms, idx, x, PROTO_NOT_FOUND, "no such device", err, errlen);
    int64_t dropped = 0;
    if (rc == PX_OK)
        rc = devcmd_drop_unneeded(ms, x->user, &dropped, err, errlen);
    if (rc != PX_OK)
        return rc;
    devcmd_close_connections(ms, x);
    log_info("device unlinked", "{s:s, s:s, s:I}", "user", x->user, "device", x->device,
             "events_dropped", (json_int_t)dropped);
    size_t len;
    char *json = proto_render_device_unlinked(x->ref, x->device, &len);
    return devcmd_answer(ms, idx, x, json, len, err, errlen);
}

int devcmd_serve(msgstore *ms, size_t idx, const Parley__DeviceCommand *x, char *err,
                 size_t errlen)
{
    if (x->type == PARLEY__DEVICE_COMMAND__TYPE__TYPE_LIST)
        return devcmd_list_serve(ms, idx, x, err, errlen);
    return devcmd_unlink_serve(ms, idx, x, err, errlen);
}
