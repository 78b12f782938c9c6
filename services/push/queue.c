/* Owns the consumed push records until their effects are over: each record
 * joins its user's burst (one collecting job per user: the first record
 * opens it, PARLEY_PUSH_COALESCE_MS later it closes and calls), and is held
 * in its partition's list in offset order. A partition's committed offset
 * moves past a record only when every record up to it belongs to a burst
 * that is over, so a burst still retrying holds back the commits of its
 * partition (not the consumption: later bursts go on), and a crash or a
 * rebalance calls again what was not over. A user has at most one burst
 * calling at a time; records meanwhile gather in the next one, which calls
 * when the first is over: one call per device per burst however many
 * messages, and none while the gateway is failing for that user. */
#include "common.h"
#include "ids.h"
#include "log.h"
#include "push.h"
#include "utf8.h"

#include <stdlib.h>
#include <string.h>

/* ---- users ---- */

static push_user **queue_slot(push *p, const char *user)
{
    return &p->users[px_hash(user) & (PUSH_USER_SLOTS - 1)];
}

static push_user *queue_user(push *p, const char *user)
{
    push_user **slot = queue_slot(p, user);
    for (push_user *u = *slot; u != NULL; u = u->next)
        if (strcmp(u->name, user) == 0)
            return u;
    push_user *u = px_calloc(1, sizeof(*u));
    snprintf(u->name, sizeof(u->name), "%s", user);
    u->next = *slot;
    *slot = u;
    return u;
}

static void queue_user_drop_if_idle(push *p, push_user *u)
{
    if (u->collecting != NULL || u->sending != NULL)
        return;
    for (push_user **pp = queue_slot(p, u->name); *pp != NULL; pp = &(*pp)->next)
        if (*pp == u) {
            *pp = u->next;
            free(u);
            return;
        }
}

/* ---- jobs ---- */

static void queue_job_unref(push_job *j)
{
    if (--j->refs > 0)
        return;
    for (size_t i = 0; i < j->ncalls; i++) {
        free(j->calls[i].body);
        curl_slist_free_all(j->calls[i].hdrs);
    }
    free(j->calls);
    parley__push_record__free_unpacked(j->last, NULL);
    free(j);
}

/* The user's collecting burst, opened when there is none. Takes r. */
static push_job *queue_join(push *p, Parley__PushRecord *r)
{
    push_user *u = queue_user(p, r->user);
    push_job *j = u->collecting;
    if (j == NULL) {
        j = px_calloc(1, sizeof(*j));
        j->u = u;
        j->refs = 1;
        j->first_ts_ms = r->ts_ms;
        j->due_ms = px_mono_ms() + p->svc.cfg.push_coalesce_ms;
        u->collecting = j;
        if (p->collect_tail != NULL)
            p->collect_tail->next = j;
        else
            p->collect_head = j;
        p->collect_tail = j;
        metric_add(p->m.pending, 1);
    }
    j->count++;
    if (r->ts_ms < j->first_ts_ms)
        j->first_ts_ms = r->ts_ms;
    if (j->last != NULL)
        parley__push_record__free_unpacked(j->last, NULL);
    j->last = r;
    j->refs++;
    return j;
}

/* ---- held records and commits ---- */

static void queue_hold(push *p, const bus_msg *m, push_job *j)
{
    if ((size_t)m->partition >= p->nparts) {
        size_t n = (size_t)m->partition + 1;
        p->parts = px_realloc(p->parts, n * sizeof(*p->parts));
        memset(p->parts + p->nparts, 0, (n - p->nparts) * sizeof(*p->parts));
        p->nparts = n;
    }
    push_part *pt = &p->parts[m->partition];
    if (pt->head > 0 && pt->head == pt->n)
        pt->head = pt->n = 0;
    if (pt->n == pt->cap) {
        if (pt->head > 0) {
            memmove(pt->v, pt->v + pt->head, (pt->n - pt->head) * sizeof(*pt->v));
            pt->n -= pt->head;
            pt->head = 0;
        }
        if (pt->n == pt->cap) {
            pt->cap = pt->cap ? 2 * pt->cap : 64;
            pt->v = px_realloc(pt->v, pt->cap * sizeof(*pt->v));
        }
    }
    pt->v[pt->n++] = (push_held){ .offset = m->offset, .job = j };
    p->held++;
}

/* Commits, per partition, the records up to the first whose burst is not
 * over. */
static void queue_commit(push *p)
{
    for (size_t k = 0; k < p->nparts; k++) {
        push_part *pt = &p->parts[k];
        int64_t last = -1;
        while (pt->head < pt->n) {
            push_held *h = &pt->v[pt->head];
            if (h->job != NULL && h->job->state != PUSH_DONE)
                break;
            if (h->job != NULL)
                queue_job_unref(h->job);
            last = h->offset;
            pt->head++;
            p->held--;
        }
        if (last >= 0) {
            bus_msg m = { .topic = p->topic_push, .partition = (int32_t)k, .offset = last };
            bus_commit(p->svc.b, &m, 1);
        }
    }
}

void queue_job_done(push *p, push_job *j)
{
    push_user *u = j->u;
    j->state = PUSH_DONE;
    if (u->sending == j)
        u->sending = NULL;
    metric_add(p->m.pending, -1);
    queue_job_unref(j);
    queue_user_drop_if_idle(p, u);
}

/* ---- consuming ---- */

/* Strings that go into the JSON payload (jansson refuses invalid UTF-8). */
static int queue_text_ok(const char *s, size_t max)
{
    size_t n = strlen(s);
    return n <= max && utf8_valid((const unsigned char *)s, n);
}

void queue_on_delivery(void *opaque, int status, const char *err, int32_t partition,
                       int64_t offset)
{
    push *p = opaque;
    if (status != PX_OK && p != NULL) {
        p->dr_failures++;
        log_warn("dead letter not produced", "{s:s}", "error", err ? err : "");
    }
}

/* The record as it came (key and value) onto the dead-letter topic, the
 * reason in the log (the bus has no headers), retried with backoff until
 * the bus holds it, as the other services do: 1 once it does, 0 when told
 * to stop first (the record is then not committed). */
static int queue_dead(push *p, const bus_msg *m, const char *why)
{
    int64_t backoff = SERVICE_BACKOFF_MIN_MS;
    metric_add(p->m.dead, 1);
    log_warn("dead letter", "{s:s, s:i, s:I}", "reason", why, "partition", (int)m->partition,
             "offset", (json_int_t)m->offset);
    while (!p->svc.stop) {
        char err[PX_ERRLEN] = "";
        p->dr_failures = 0;
        if (bus_produce_wait(p->svc.b, p->topic_dead, m->key, m->key_len, m->value, m->len, p,
                             5000, err, sizeof(err)) == PX_OK &&
            bus_flush(p->svc.b, 10000) == PX_OK && p->dr_failures == 0)
            return 1;
        log_warn("dead letter failed; retrying", "{s:s, s:I}", "error", err, "backoff_ms",
                 (json_int_t)backoff);
        service_sleep(&p->svc, backoff);
        backoff = PX_MIN(backoff * 2, SERVICE_BACKOFF_MAX_MS);
    }
    return 0;
}

/* The record decoded, or NULL with *why set. */
static Parley__PushRecord *queue_decode(const bus_msg *m, const char **why)
{
    Parley__PushRecord *r = parley__push_record__unpack(NULL, m->len, m->value);
    *why = NULL;
    if (r == NULL)
        *why = "PushRecord: not a protobuf";
    else if (r->version != PUSH_RECORD_VERSION)
        *why = "PushRecord: unknown version";
    else if (!id_valid_user(r->user) || !bus_key_is(m, r->user))
        *why = "PushRecord: bad user, or key is not the user";
    else if (r->kind != PARLEY__EVENT_KIND__EVENT_KIND_MESSAGE &&
             r->kind != PARLEY__EVENT_KIND__EVENT_KIND_GROUP_EVENT)
        *why = "PushRecord: kind is not a message or group event";
    else if (!queue_text_ok(r->sender, 64) || !queue_text_ok(r->group, 255) ||
             !queue_text_ok(r->id, 255) || !queue_text_ok(r->preview, 1024))
        *why = "PushRecord: a string too long or not UTF-8";
    if (*why == NULL) {
        if (r->ts_ms <= 0)
            r->ts_ms = m->ts_ms;
        return r;
    }
    if (r != NULL)
        parley__push_record__free_unpacked(r, NULL);
    return NULL;
}

void queue_add(push *p, bus_msg *msgs, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        const char *why;
        Parley__PushRecord *r = queue_decode(&msgs[i], &why);
        push_job *j = NULL;
        metric_add(p->m.records, 1);
        if (r == NULL && !queue_dead(p, &msgs[i], why))
            break; /* stopping: neither it nor what follows is committed */
        if (r != NULL && (p->svc.cfg.push_url == NULL || p->held >= PUSH_MAX_HELD)) {
            metric_add(p->m.dropped, 1); /* push is off here, or too much is held */
            parley__push_record__free_unpacked(r, NULL);
        } else if (r != NULL) {
            j = queue_join(p, r);
        }
        queue_hold(p, &msgs[i], j);
    }
    bus_release(p->svc.b, msgs, n);
    queue_commit(p);
}

/* A burst whose collecting time is over, and whose user has no burst
 * calling: its offline devices are called (none: it is over at once). A
 * store failure leaves it collecting a while longer. */
static void queue_fire(push *p, push_job *j)
{
    char devs[PUSH_MAX_DEVICES][65];
    size_t n = 0;
    char err[PX_ERRLEN] = "";
    if (target_devices(p, j->u->name, devs, PUSH_MAX_DEVICES, &n, err, sizeof(err)) != PX_OK) {
        log_warn("devices not read; the burst waits", "{s:s, s:s}", "user", j->u->name,
                 "error", err);
        j->due_ms = px_mono_ms() + PUSH_BACKOFF_MIN_MS;
        return;
    }
    j->u->collecting = NULL;
    j->u->sending = j;
    j->state = PUSH_SENDING;
    if (n == 0)
        queue_job_done(p, j);
    else
        call_start_job(p, j, devs, n);
}

void queue_tick(push *p)
{
    int64_t now = px_mono_ms();
    push_job **pp = &p->collect_head, *prev = NULL;
    while (*pp != NULL) {
        push_job *j = *pp;
        if (j->due_ms > now)
            break; /* due times grow along the list, but for a store retry: fine */
        if (j->u->sending != NULL) {
            prev = j;
            pp = &j->next;
            continue;
        }
        *pp = j->next;
        if (p->collect_tail == j)
            p->collect_tail = prev;
        j->next = NULL;
        queue_fire(p, j);
        if (j->state == PUSH_COLLECTING) { /* not fired: to the end of the list */
            if (p->collect_tail != NULL)
                p->collect_tail->next = j;
            else
                p->collect_head = j;
            p->collect_tail = j;
            if (*pp == j)
                break;
        }
    }
    call_run(p);
    queue_commit(p);
}

void queue_free(push *p)
{
    for (size_t k = 0; k < p->nparts; k++) {
        push_part *pt = &p->parts[k];
        for (size_t i = pt->head; i < pt->n; i++)
            if (pt->v[i].job != NULL)
                queue_job_unref(pt->v[i].job);
        free(pt->v);
    }
    free(p->parts);
    for (size_t i = 0; i < PUSH_USER_SLOTS; i++)
        while (p->users[i] != NULL) {
            push_user *u = p->users[i];
            p->users[i] = u->next;
            if (u->collecting != NULL)
                queue_job_unref(u->collecting);
            if (u->sending != NULL)
                queue_job_unref(u->sending);
            free(u);
        }
    free(p->waiting);
}
