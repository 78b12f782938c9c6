/* Owns the life of one consumed batch of parley.groups: decoding and
 * validating each GroupCommand (the bad ones become dead letters),
 * applying the batch as a whole (apply.c), committing it once every effect
 * is durable, and retrying it with backoff otherwise. A retry starts over
 * from the stored group state, which apply.c writes only after the
 * batch's effects are confirmed, so a retry yields the same records. */
#include "common.h"
#include "fanout.h"
#include "ids.h"
#include "log.h"
#include "protocol.h"
#include "utf8.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BATCH_QUEUE_WAIT_MS 5000

/* A stale report (outliving a flush timeout) only costs one needless retry. */
void batch_on_delivery(void *opaque, int status, const char *err, int32_t partition,
                       int64_t offset)
{
    fanout *f = opaque;
    if (status == PX_OK || f == NULL)
        return;
    f->dr_failures++;
    metric_add(f->m.produce_failures, 1);
    log_warn("produce failed", "{s:s}", "error", err ? err : "");
}

int batch_produce(fanout *f, const char *topic, const char *key, size_t key_len,
                  const void *value, size_t len, char *err, size_t errlen)
{
    return bus_produce_wait(f->svc.b, topic, key, key_len, value, len, f, BATCH_QUEUE_WAIT_MS, err,
                            errlen);
}

/* ---- decoding ---- */

static void batch_dead(fanout_rec *r, const char *why)
{
    r->kind = REC_DEAD;
    snprintf(r->reason, sizeof(r->reason), "GroupCommand: %s", why);
}

/* Strings the store would refuse on every retry (wedging the partition)
 * are caught here instead. */
static int batch_id_ok(const char *s)
{
    size_t n = strlen(s);
    return n > 0 && n <= FANOUT_ID_MAX && utf8_valid((const unsigned char *)s, n);
}

static int batch_members_ok(const Parley__GroupCommand *x)
{
    if (x->n_members > PROTO_MAX_MEMBERS)
        return 0;
    for (size_t i = 0; i < x->n_members; i++)
        if (!id_valid_user(x->members[i]))
            return 0;
    return 1;
}

static int batch_name_ok(const char *s)
{
    size_t n = strlen(s);
    return n > 0 && utf8_valid((const unsigned char *)s, n);
}

static void batch_validate(fanout_rec *r)
{
    const Parley__GroupCommand *x = r->x;
    /* Typing may come without a client id: nothing answers it. */
    int typing = x->type == PARLEY__GROUP_COMMAND__TYPE__TYPE_TYPING;
    if (x->version != FANOUT_RECORD_VERSION)
        batch_dead(r, "unknown version");
    else if (x->type < PARLEY__GROUP_COMMAND__TYPE__TYPE_CREATE ||
             x->type > PARLEY__GROUP_COMMAND__TYPE__TYPE_TYPING)
        batch_dead(r, "unknown type");
    else if (!id_valid_user(x->group))
        batch_dead(r, "bad group id");
    else if (!bus_key_is(r->m, x->group))
        batch_dead(r, "key is not the group"); /* order per group needs one partition */
    else if (!id_valid_user(x->user) || !id_valid_user(x->gateway))
        batch_dead(r, "bad user or gateway");
    else if ((!id_valid_client(x->ref) && !(typing && x->ref[0] == '\0')) ||
             !batch_id_ok(x->cmd_id))
        batch_dead(r, "bad ref or cmd_id");
    else if (!batch_members_ok(x))
        batch_dead(r, "bad members");
    else if (x->type == PARLEY__GROUP_COMMAND__TYPE__TYPE_CREATE && !batch_name_ok(x->name))
        batch_dead(r, "bad name");
    else if (x->type == PARLEY__GROUP_COMMAND__TYPE__TYPE_SEND &&
             (!batch_id_ok(x->msg_id) || x->event_json.len == 0 ||
              !utf8_valid(x->event_json.data, x->event_json.len)))
        batch_dead(r, "bad message");
    else if (typing && (x->event_json.len == 0 ||
                        !utf8_valid(x->event_json.data, x->event_json.len)))
        batch_dead(r, "bad typing event");
    else
        r->kind = REC_CMD;
}

static void batch_decode(fanout *f, const bus_msg *m, fanout_rec *r)
{
    memset(r, 0, sizeof(*r));
    r->m = m;
    r->x = parley__group_command__unpack(NULL, m->len, m->value);
    if (strcmp(m->topic, f->topic_groups) != 0)
        batch_dead(r, "unexpected topic");
    else if (r->x == NULL)
        batch_dead(r, "not a protobuf");
    else
        batch_validate(r);
    if (r->kind == REC_CMD && r->x->ts_ms <= 0)
        r->x->ts_ms = m->ts_ms; /* a producer that left it out: the bus time */
    if (r->kind == REC_DEAD) {
        metric_add(f->m.dead, 1);
        log_warn("dead letter", "{s:s, s:s, s:i, s:I}", "reason", r->reason, "topic", m->topic,
                 "partition", (int)m->partition, "offset", (json_int_t)m->offset);
    }
}

/* ---- running ---- */

typedef struct batch_job {
    fanout *f;
    fanout_rec *recs;
    size_t n;
} batch_job;

static int batch_attempt(void *arg, char *err, size_t errlen)
{
    batch_job *j = arg;
    return apply_batch(j->f, j->recs, j->n, err, errlen);
}

void batch_process(fanout *f, bus_msg *msgs, size_t n)
{
    fanout_rec *recs = px_calloc(n, sizeof(*recs));
    for (size_t i = 0; i < n; i++)
        batch_decode(f, &msgs[i], &recs[i]);
    batch_job j = { f, recs, n };
    service_retry_batch(&f->svc, msgs, n, f->m.retries, batch_attempt, &j);
    bus_release(f->svc.b, msgs, n);
    for (size_t i = 0; i < n; i++)
        if (recs[i].x != NULL)
            parley__group_command__free_unpacked(recs[i].x, NULL);
    free(recs);
}
