/* Owns what one batch of GroupCommands does: the group state machine
 * (create, add, remove, leave, info), membership checks, the fan-out of a
 * group message to every member but its sender, the group_events of every
 * change, and the answers to the requesting connections.
 *
 * Rules: the creator is the first admin; only admins add or remove; only
 * members send. Nobody becomes a member without saying so (issue 22: anyone
 * could put 255 strangers into a group): the users a create or an add
 * names are invited, and join with group_join or decline with group_leave;
 * an invited user may also ask for info, an admin may withdraw the
 * invitation with group_remove, and only members see the group's messages
 * and events (an invitee sees those about its own invitation). At most
 * STORE_GROUP_MAX members and invited together, and a command that would
 * pass it changes nothing (group_full). When the last
 * admin leaves or is removed, the longest-standing remaining member (the
 * first in join order) becomes admin, as WhatsApp does. A group whose last
 * member left is kept inert (no members) and answers not_found.
 *
 * Idempotence: a group's record carries `applied`, the offset of the last
 * command whose effects are durable. Effects go to Kafka first (inbox
 * records, then answers, each confirmed), the group record is written
 * after, and the batch is committed last. A crash before the group write
 * recomputes the same records from the same stored state (event ids derive
 * from the command's cmd_id, message copies keep the msg_id), and
 * message-store's (user, id) dedupe absorbs them; a crash after it finds
 * `applied` at or past those offsets and skips the commands. Records of a
 * group come from one partition, in order, to one instance, so "membership
 * as of the record" is the in-memory state when the record is reached. */
#include "common.h"
#include "fanout.h"
#include "log.h"
#include "protocol.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define APPLY_FLUSH_MS 10000
#define APPLY_VERSION 1

/* A group as this batch sees it: loaded from the store, then changed in
 * record order. */
typedef struct apply_group {
    char *id, *name, *creator;
    char *members[STORE_GROUP_MAX];
    size_t nmembers;
    char *admins[STORE_GROUP_MAX];
    size_t nadmins;
    char *invited[STORE_GROUP_MAX];
    size_t ninvited;
    int64_t applied, ts_ms;
    int exists, dirty;
    int64_t last_off;          /* offset of this batch's last record applied to it */
} apply_group;

/* An answer held until the batch's inbox records are confirmed. */
typedef struct apply_answer {
    char topic[160];
    char *key;
    uint8_t *buf;
    size_t len;
} apply_answer;

typedef struct apply_ctx {
    fanout *f;
    apply_group **groups;
    size_t ngroups;
    apply_answer *answers;
    size_t nanswers;
    int64_t *send_ts;          /* ts_ms of each send fanned out, for the latency */
    size_t nsends;
    char *err;
    size_t errlen;
} apply_ctx;

/* ---- group state ---- */

static apply_group *apply_find(apply_ctx *a, const char *id)
{
    for (size_t i = 0; i < a->ngroups; i++)
        if (strcmp(a->groups[i]->id, id) == 0)
            return a->groups[i];
    return NULL;
}

static apply_group *apply_add_group(apply_ctx *a, const char *id)
{
    apply_group *g = px_calloc(1, sizeof(*g));
    g->id = px_strdup(id);
    a->groups[a->ngroups++] = g;
    return g;
}

static void apply_group_free(apply_group *g)
{
    free(g->id);
    free(g->name);
    free(g->creator);
    for (size_t i = 0; i < g->nmembers; i++)
        free(g->members[i]);
    for (size_t i = 0; i < g->nadmins; i++)
        free(g->admins[i]);
    for (size_t i = 0; i < g->ninvited; i++)
        free(g->invited[i]);
    free(g);
}

static int apply_loaded(void *arg, const store_group *sg)
{
    apply_ctx *a = arg;
    apply_group *g = apply_find(a, sg->id);
    if (g == NULL || g->exists)
        return PX_OK;
    g->exists = 1;
    g->name = px_strdup(sg->name);
    g->creator = px_strdup(sg->creator);
    for (size_t i = 0; i < sg->nmembers && i < STORE_GROUP_MAX; i++)
        g->members[g->nmembers++] = px_strdup(sg->members[i]);
    for (size_t i = 0; i < sg->nadmins && i < STORE_GROUP_MAX; i++)
        g->admins[g->nadmins++] = px_strdup(sg->admins[i]);
    for (size_t i = 0; i < sg->ninvited && g->nmembers + i < STORE_GROUP_MAX; i++)
        g->invited[g->ninvited++] = px_strdup(sg->invited[i]);
    g->applied = sg->applied;
    g->ts_ms = sg->ts_ms;
    return PX_OK;
}

/* Reads every group the batch names, in one store call. */
static int apply_load(apply_ctx *a, const fanout_rec *recs, size_t n)
{
    const char **ids = px_calloc(n, sizeof(*ids));
    size_t nids = 0;
    for (size_t i = 0; i < n; i++) {
        if (recs[i].kind != REC_CMD || apply_find(a, recs[i].x->group) != NULL)
            continue;
        ids[nids++] = apply_add_group(a, recs[i].x->group)->id;
    }
    int64_t t0 = service_clock_us();
    int rc = store_group_get(a->f->svc.st, ids, nids, apply_loaded, a, a->err, a->errlen);
    service_observe(a->f->m.lat_get, t0);
    free(ids);
    return rc;
}

static int apply_index(char *const *v, size_t n, const char *s)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(v[i], s) == 0)
            return (int)i;
    return -1;
}

static int apply_is_member(const apply_group *g, const char *u)
{
    return apply_index(g->members, g->nmembers, u) >= 0;
}

static int apply_is_admin(const apply_group *g, const char *u)
{
    return apply_index(g->admins, g->nadmins, u) >= 0;
}

static int apply_is_invited(const apply_group *g, const char *u)
{
    return apply_index(g->invited, g->ninvited, u) >= 0;
}

/* Removes s from v keeping the order of the rest. */
static void apply_drop(char **v, size_t *n, const char *s)
{
    int i = apply_index(v, *n, s);
    if (i < 0)
        return;
    free(v[i]);
    memmove(&v[i], &v[i + 1], (*n - (size_t)i - 1) * sizeof(*v));
    (*n)--;
}

/* The last-admin rule: the longest-standing member takes over. */
static void apply_promote(apply_group *g)
{
    if (g->nadmins == 0 && g->nmembers > 0)
        g->admins[g->nadmins++] = px_strdup(g->members[0]);
}

/* ---- producing ---- */

/* origin (NULL: none): the sender's device, for the sender's own copy. */
static int apply_inbox(apply_ctx *a, Parley__EventKind kind, const char *user, const char *id,
                       const char *sender, int64_t ts, const char *json, size_t json_len,
                       const char *origin)
{
    Parley__InboxRecord rec = PARLEY__INBOX_RECORD__INIT;
    rec.version = APPLY_VERSION;
    rec.kind = kind;
    rec.user = (char *)user;
    rec.id = (char *)id;
    rec.sender = (char *)sender;
    rec.ts_ms = ts;
    rec.event_json = (ProtobufCBinaryData){ json_len, (uint8_t *)json };
    rec.origin_device = (char *)(origin != NULL ? origin : "");
    size_t len = parley__inbox_record__get_packed_size(&rec);
    uint8_t *buf = px_malloc(len);
    parley__inbox_record__pack(&rec, buf);
    int rc = batch_produce(a->f, a->f->topic_inbox, user, strlen(user), buf, len, a->err,
                           a->errlen);
    free(buf);
    return rc;
}

/* A group_event for each of recipients (the group's members at the time
 * of the change, and the users it is about who are not members). Its id is
 * idp + "_" + the command's id: a command making two events (a create
 * that invites) gives each its own prefix. */
static int apply_event(apply_ctx *a, const Parley__GroupCommand *x, const char *idp,
                       const char *event, char *const *recipients, size_t nrec,
                       char *const *members, size_t nmembers)
{
    char id[FANOUT_ID_MAX + 8];
    size_t len;
    snprintf(id, sizeof(id), "%s_%s", idp, x->cmd_id);
    proto_group_event e = { .id = id, .group = x->group, .event = event, .actor = x->user,
                            .members = (const char *const *)members, .nmembers = nmembers,
                            .ts = x->ts_ms };
    char *json = proto_render_group_event(&e, &len);
    int rc = PX_OK;
    for (size_t i = 0; i < nrec && rc == PX_OK; i++)
        rc = apply_inbox(a, PARLEY__EVENT_KIND__EVENT_KIND_GROUP_EVENT, recipients[i], id, "",
                         x->ts_ms, json, len, NULL);
    free(json);
    metric_add(a->f->m.events, (int64_t)nrec);
    return rc;
}

/* Holds json as the answer to the requesting connection; takes json. The
 * length is taken here because argument evaluation order would not
 * guarantee a renderer's out-length was set. */
static void apply_answer_json(apply_ctx *a, const Parley__GroupCommand *x, char *json)
{
    size_t len = strlen(json);
    Parley__Delivery d = PARLEY__DELIVERY__INIT;
    ProtobufCBinaryData ev = { len, (uint8_t *)json };
    d.version = APPLY_VERSION;
    d.user = x->user;
    d.conn = x->conn;
    d.events_json = &ev;
    d.n_events_json = 1;
    apply_answer *an = &a->answers[a->nanswers++];
    snprintf(an->topic, sizeof(an->topic), "%sgw.%s", a->f->svc.cfg.topic_prefix, x->gateway);
    an->key = px_strdup(x->user);
    an->len = parley__delivery__get_packed_size(&d);
    an->buf = px_malloc(an->len);
    parley__delivery__pack(&d, an->buf);
    free(json);
}

static void apply_refuse(apply_ctx *a, const Parley__GroupCommand *x, enum proto_code code,
                         const char *msg)
{
    metric_add(a->f->m.refused, 1);
    apply_answer_json(a, x, proto_render_error(x->ref, code, msg, NULL));
}

static void apply_answer_group(apply_ctx *a, const Parley__GroupCommand *x,
                               const apply_group *g)
{
    proto_group pg = { .id = g->id, .name = g->name,
                       .members = (const char *const *)g->members, .nmembers = g->nmembers,
                       .admins = (const char *const *)g->admins, .nadmins = g->nadmins,
                       .invited = (const char *const *)g->invited, .ninvited = g->ninvited };
    apply_answer_json(a, x, proto_render_group(x->ref, &pg, NULL));
}

/* ---- commands ---- */

/* Where a user stands in a group. */
enum apply_standing { APPLY_STRANGER, APPLY_INVITED, APPLY_MEMBER };

static enum apply_standing apply_standing_of(const apply_group *g, const char *u)
{
    return apply_is_member(g, u) ? APPLY_MEMBER
         : apply_is_invited(g, u) ? APPLY_INVITED : APPLY_STRANGER;
}

/* Collects the distinct names of the command that stand as want (a create's
 * requester is a stranger to its new group, but not one to invite). */
static size_t apply_pick(const Parley__GroupCommand *x, const apply_group *g,
                         enum apply_standing want, char **out)
{
    size_t n = 0;
    for (size_t i = 0; i < x->n_members; i++) {
        const char *u = x->members[i];
        if (apply_standing_of(g, u) != want || apply_index(out, n, u) >= 0 ||
            (want == APPLY_STRANGER && strcmp(u, x->user) == 0))
            continue;
        out[n++] = x->members[i];
    }
    return n;
}

/* Invites fresh (strangers to g) and tells the members and them. */
static int apply_invite(apply_ctx *a, const Parley__GroupCommand *x, apply_group *g,
                        const char *idp, char **fresh, size_t n)
{
    char *to[STORE_GROUP_MAX];
    size_t nto = 0;
    for (size_t i = 0; i < g->nmembers; i++)
        to[nto++] = g->members[i];
    for (size_t i = 0; i < n; i++) {
        g->invited[g->ninvited++] = px_strdup(fresh[i]);
        to[nto++] = fresh[i];
    }
    g->dirty = 1;
    return n == 0 ? PX_OK : apply_event(a, x, idp, "invited", to, nto, fresh, n);
}

static int apply_create(apply_ctx *a, const Parley__GroupCommand *x, apply_group *g)
{
    if (g->exists) {
        /* A retried create (same creator and client id) names this group. */
        if (apply_is_member(g, x->user))
            apply_answer_group(a, x, g);
        else
            apply_refuse(a, x, PROTO_FORBIDDEN, "group exists and you are not a member");
        return PX_OK;
    }
    char *fresh[PROTO_MAX_MEMBERS];
    size_t n = apply_pick(x, g, APPLY_STRANGER, fresh);
    if (n + 1 > STORE_GROUP_MAX) {
        apply_refuse(a, x, PROTO_GROUP_FULL, "a group has at most 256 members");
        return PX_OK;
    }
    g->exists = g->dirty = 1;
    g->name = px_strdup(x->name);
    g->creator = px_strdup(x->user);
    g->ts_ms = x->ts_ms;
    g->members[g->nmembers++] = px_strdup(x->user);
    g->admins[g->nadmins++] = px_strdup(x->user);
    int rc = apply_event(a, x, "ge", "created", g->members, g->nmembers, g->members,
                         g->nmembers);
    if (rc == PX_OK)
        rc = apply_invite(a, x, g, "gi", fresh, n);
    apply_answer_group(a, x, g);
    return rc;
}

static int apply_add(apply_ctx *a, const Parley__GroupCommand *x, apply_group *g)
{
    char *fresh[PROTO_MAX_MEMBERS];
    size_t n = apply_pick(x, g, APPLY_STRANGER, fresh);
    if (g->nmembers + g->ninvited + n > STORE_GROUP_MAX) {
        apply_refuse(a, x, PROTO_GROUP_FULL, "a group has at most 256 members");
        return PX_OK;
    }
    int rc = apply_invite(a, x, g, "ge", fresh, n);
    apply_answer_group(a, x, g);
    return rc;
}

/* An invited user becomes a member; a member's join is a retry. */
static int apply_join(apply_ctx *a, const Parley__GroupCommand *x, apply_group *g)
{
    int rc = PX_OK;
    if (!apply_is_member(g, x->user)) {
        apply_drop(g->invited, &g->ninvited, x->user);
        g->members[g->nmembers++] = px_strdup(x->user);
        g->dirty = 1;
        char *who[1] = { x->user };
        rc = apply_event(a, x, "ge", "joined", g->members, g->nmembers, who, 1);
    }
    apply_answer_group(a, x, g);
    return rc;
}

/* Removes who (members or invited) from g after telling every member and
 * the invited among who. */
static int apply_remove_users(apply_ctx *a, const Parley__GroupCommand *x, apply_group *g,
                              const char *event, char **who, size_t n)
{
    char *to[2 * STORE_GROUP_MAX];
    size_t nto = 0;
    for (size_t i = 0; i < g->nmembers; i++)
        to[nto++] = g->members[i];
    for (size_t i = 0; i < n; i++)
        if (apply_is_invited(g, who[i]))
            to[nto++] = who[i];
    int rc = apply_event(a, x, "ge", event, to, nto, who, n);
    for (size_t i = 0; i < n; i++) {
        apply_drop(g->admins, &g->nadmins, who[i]);
        apply_drop(g->members, &g->nmembers, who[i]);
        apply_drop(g->invited, &g->ninvited, who[i]);
    }
    apply_promote(g);
    g->dirty = 1;
    return rc;
}

static int apply_remove(apply_ctx *a, const Parley__GroupCommand *x, apply_group *g)
{
    char *gone[2 * PROTO_MAX_MEMBERS];
    size_t n = apply_pick(x, g, APPLY_MEMBER, gone);
    n += apply_pick(x, g, APPLY_INVITED, gone + n);
    int rc = PX_OK;
    if (n > 0)
        rc = apply_remove_users(a, x, g, "removed", gone, n);
    apply_answer_group(a, x, g);
    return rc;
}

/* A message naming media gives every member it is copied to access, before
 * any copy can reach them (the gateway checked that the sender may read
 * it). Idempotent, so a batch applied again repeats it harmlessly. Media
 * swept meanwhile (PX_DECLINED) still lets the message through: its
 * download then answers 404, as for any expired media. */
static int apply_grant_media(apply_ctx *a, const Parley__GroupCommand *x, const apply_group *g)
{
    const char *who[STORE_GROUP_MAX];
    size_t n = 0;
    if (x->media_id == NULL || x->media_id[0] == '\0')
        return PX_OK;
    for (size_t i = 0; i < g->nmembers; i++)
        if (strcmp(g->members[i], x->user) != 0)
            who[n++] = g->members[i];
    int rc = store_media_grant(a->f->svc.st, x->media_id, who, n, x->ts_ms, a->err, a->errlen);
    if (rc == PX_DECLINED)
        log_warn("group message names media that is gone", "{s:s, s:s}", "group", g->id,
                 "media", x->media_id);
    return rc == PX_DECLINED ? PX_OK : rc;
}

static int apply_send(apply_ctx *a, const Parley__GroupCommand *x, const apply_group *g)
{
    int rc = apply_grant_media(a, x, g);
    size_t copies = 0;
    for (size_t i = 0; i < g->nmembers && rc == PX_OK; i++) {
        if (strcmp(g->members[i], x->user) == 0)
            continue;
        rc = apply_inbox(a, PARLEY__EVENT_KIND__EVENT_KIND_MESSAGE, g->members[i], x->msg_id,
                         x->user, x->ts_ms, (const char *)x->event_json.data, x->event_json.len,
                         NULL);
        copies++;
    }
    /* The sender's other devices get it too (message-store drops the copy
     * when there is none); a gateway older than devices names none. */
    if (rc == PX_OK && x->device[0] != '\0')
        rc = apply_inbox(a, PARLEY__EVENT_KIND__EVENT_KIND_MESSAGE, x->user, x->msg_id, "",
                         x->ts_ms, (const char *)x->event_json.data, x->event_json.len,
                         x->device);
    metric_add(a->f->m.inbox, (int64_t)copies);
    metric_add(a->f->m.sends, 1);
    metric_observe(a->f->m.fanout_size, (double)copies);
    a->send_ts[a->nsends++] = x->ts_ms;
    apply_answer_json(a, x, proto_render_sent(x->ref, x->msg_id, x->ts_ms, NULL));
    return rc;
}

/* A member is typing: the event goes to the other members' live
 * connections only (message-store never stores EVENT_KIND_TYPING), and
 * nothing is answered. */
static int apply_typing(apply_ctx *a, const Parley__GroupCommand *x, const apply_group *g)
{
    char id[FANOUT_ID_MAX + 8];
    snprintf(id, sizeof(id), "ty_%s", x->cmd_id);
    int rc = PX_OK;
    for (size_t i = 0; i < g->nmembers && rc == PX_OK; i++)
        if (strcmp(g->members[i], x->user) != 0)
            rc = apply_inbox(a, PARLEY__EVENT_KIND__EVENT_KIND_TYPING, g->members[i], id, "",
                             x->ts_ms, (const char *)x->event_json.data, x->event_json.len,
                             NULL);
    return rc;
}

/* Checks who may do what, then applies one command to g. */
static int apply_one(apply_ctx *a, const Parley__GroupCommand *x, apply_group *g)
{
    Parley__GroupCommand__Type t = x->type;
    if (t == PARLEY__GROUP_COMMAND__TYPE__TYPE_CREATE)
        return apply_create(a, x, g);
    if (!g->exists || g->nmembers == 0) {
        apply_refuse(a, x, PROTO_NOT_FOUND, "no such group");
        return PX_OK;
    }
    enum apply_standing st = apply_standing_of(g, x->user);
    int needs_admin = t == PARLEY__GROUP_COMMAND__TYPE__TYPE_ADD ||
                      t == PARLEY__GROUP_COMMAND__TYPE__TYPE_REMOVE;
    int invitee_may = t == PARLEY__GROUP_COMMAND__TYPE__TYPE_JOIN ||
                      t == PARLEY__GROUP_COMMAND__TYPE__TYPE_LEAVE ||
                      t == PARLEY__GROUP_COMMAND__TYPE__TYPE_INFO;
    int ok = st == APPLY_MEMBER || (st == APPLY_INVITED && invitee_may);
    if (!ok || (needs_admin && !apply_is_admin(g, x->user))) {
        apply_refuse(a, x, PROTO_FORBIDDEN,
                     ok ? "only admins add or remove members"
                     : t == PARLEY__GROUP_COMMAND__TYPE__TYPE_JOIN ? "you are not invited to this group"
                     : "not a member of this group");
        return PX_OK;
    }
    if (t != PARLEY__GROUP_COMMAND__TYPE__TYPE_SEND)
        metric_add(a->f->m.commands, 1);
    switch (t) {
    case PARLEY__GROUP_COMMAND__TYPE__TYPE_ADD:
        return apply_add(a, x, g);
    case PARLEY__GROUP_COMMAND__TYPE__TYPE_REMOVE:
        return apply_remove(a, x, g);
    case PARLEY__GROUP_COMMAND__TYPE__TYPE_JOIN:
        return apply_join(a, x, g);
    case PARLEY__GROUP_COMMAND__TYPE__TYPE_LEAVE: {
        char *who[1] = { x->user };
        int rc = apply_remove_users(a, x, g, st == APPLY_MEMBER ? "left" : "declined", who, 1);
        apply_answer_group(a, x, g);
        return rc;
    }
    case PARLEY__GROUP_COMMAND__TYPE__TYPE_SEND:
        return apply_send(a, x, g);
    case PARLEY__GROUP_COMMAND__TYPE__TYPE_TYPING:
        return apply_typing(a, x, g);
    default:
        apply_answer_group(a, x, g);
        return PX_OK;
    }
}

/* ---- the batch ---- */

static int apply_dead(apply_ctx *a, const fanout_rec *r)
{
    const bus_msg *m = r->m;
    return batch_produce(a->f, a->f->topic_dead, m->key, m->key_len, m->value, m->len, a->err,
                         a->errlen);
}

/* Produces the effects of every record not yet applied, in record order. */
static int apply_records(apply_ctx *a, fanout_rec *recs, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        int rc;
        if (recs[i].kind == REC_DEAD) {
            rc = apply_dead(a, &recs[i]);
        } else {
            apply_group *g = apply_find(a, recs[i].x->group);
            int64_t off = recs[i].m->offset;
            if (g->exists && off <= g->applied) {
                metric_add(a->f->m.skipped, 1);
                continue;
            }
            rc = apply_one(a, recs[i].x, g);
            g->last_off = off;
        }
        if (rc != PX_OK)
            return rc;
    }
    return PX_OK;
}

static int apply_confirm(apply_ctx *a, const char *what)
{
    long failures = a->f->dr_failures;
    if (bus_flush(a->f->svc.b, APPLY_FLUSH_MS) != PX_OK)
        return px_err(a->err, a->errlen, "%s not confirmed by Kafka in %d ms", what,
                      APPLY_FLUSH_MS);
    if (a->f->dr_failures != failures)
        return px_err(a->err, a->errlen, "Kafka refused some %s", what);
    return PX_OK;
}

static int apply_send_answers(apply_ctx *a)
{
    for (size_t i = 0; i < a->nanswers; i++) {
        apply_answer *an = &a->answers[i];
        if (batch_produce(a->f, an->topic, an->key, strlen(an->key), an->buf, an->len, a->err,
                          a->errlen) != PX_OK)
            return PX_ERROR;
    }
    return apply_confirm(a, "answers");
}

static int apply_write(apply_ctx *a)
{
    store_group *sg = px_calloc(a->ngroups, sizeof(*sg));
    size_t n = 0;
    for (size_t i = 0; i < a->ngroups; i++) {
        apply_group *g = a->groups[i];
        if (!g->dirty)
            continue;
        sg[n++] = (store_group){ .id = g->id, .name = g->name, .creator = g->creator,
                                 .members = (const char *const *)g->members,
                                 .nmembers = g->nmembers,
                                 .admins = (const char *const *)g->admins,
                                 .nadmins = g->nadmins,
                                 .invited = (const char *const *)g->invited,
                                 .ninvited = g->ninvited, .applied = g->last_off,
                                 .ts_ms = g->ts_ms };
    }
    int64_t t0 = service_clock_us();
    int rc = store_group_put(a->f->svc.st, sg, n, a->err, a->errlen);
    service_observe(a->f->m.lat_put, t0);
    free(sg);
    return rc;
}

static void apply_free(apply_ctx *a)
{
    for (size_t i = 0; i < a->ngroups; i++)
        apply_group_free(a->groups[i]);
    for (size_t i = 0; i < a->nanswers; i++) {
        free(a->answers[i].key);
        free(a->answers[i].buf);
    }
    free(a->groups);
    free(a->answers);
    free(a->send_ts);
}

int apply_batch(fanout *f, fanout_rec *recs, size_t n, char *err, size_t errlen)
{
    apply_ctx a = { .f = f, .err = err, .errlen = errlen };
    a.groups = px_calloc(n, sizeof(*a.groups));
    a.answers = px_calloc(n, sizeof(*a.answers));
    a.send_ts = px_calloc(n, sizeof(*a.send_ts));
    int rc = apply_load(&a, recs, n);
    if (rc == PX_OK)
        rc = apply_records(&a, recs, n);
    if (rc == PX_OK)
        rc = apply_confirm(&a, "inbox records");
    if (rc == PX_OK) {
        int64_t now = px_now_ms();
        for (size_t i = 0; i < a.nsends; i++)
            metric_observe(f->m.fanout_ms, (double)(now - a.send_ts[i]));
        rc = apply_send_answers(&a);
    }
    if (rc == PX_OK)
        rc = apply_write(&a);
    apply_free(&a);
    return rc;
}
