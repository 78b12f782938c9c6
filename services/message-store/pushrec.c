/* Owns the push records (issue 18): for each message or group event stored
 * for a user, a PushRecord on parley.push keyed by the user, from which the
 * push service wakes that user's devices that have no live connection.
 * message-store does not decide which devices are offline: a device's
 * connection can come or go between the store and the call, so the push
 * service looks at the registry when it calls, once per burst, where the
 * answer is freshest and costs one read per burst instead of one per event.
 * Produced only when PARLEY_PUSH_URL is set, after the store stage (off the
 * live path), and the batch's offsets wait for the bus to hold them
 * (writer.c, batch.c), so a crash repeats them, never loses them. Events
 * from one of the user's own devices (own messages, read state), receipts
 * and typing wake nobody. */
#include "common.h"
#include "log.h"
#include "msgstore.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#define PUSHREC_PREVIEW_CHARS 100

/* The first PUSHREC_PREVIEW_CHARS characters of body (valid UTF-8: the
 * gateway checked it), cut on a character boundary. */
static size_t pushrec_preview_len(const char *body)
{
    size_t chars = 0, i = 0;
    for (; body[i] != '\0'; i++)
        if (((unsigned char)body[i] & 0xC0) != 0x80 && chars++ == PUSHREC_PREVIEW_CHARS)
            break;
    return i;
}

static int pushrec_wanted(const Parley__InboxRecord *x)
{
    return x->sync == NULL && x->device_cmd == NULL && x->origin_device[0] == '\0' &&
           (x->kind == PARLEY__EVENT_KIND__EVENT_KIND_MESSAGE ||
            x->kind == PARLEY__EVENT_KIND__EVENT_KIND_GROUP_EVENT);
}

static int pushrec_one(msgstore *ms, const Parley__InboxRecord *x, void *tag, char *err,
                       size_t errlen)
{
    json_t *ev = json_loadb((const char *)x->event_json.data, x->event_json.len, 0, NULL);
    const char *from = json_string_value(json_object_get(ev, "from"));
    const char *actor = json_string_value(json_object_get(ev, "actor"));
    const char *group = json_string_value(json_object_get(ev, "group"));
    const char *body = json_string_value(json_object_get(ev, "body"));
    char *preview = NULL;
    if (ms->svc.cfg.push_preview && body != NULL)
        preview = strndup(body, pushrec_preview_len(body));
    Parley__PushRecord p = PARLEY__PUSH_RECORD__INIT;
    p.version = MSGSTORE_RECORD_VERSION;
    p.user = x->user;
    p.kind = x->kind;
    p.sender = (char *)(from != NULL ? from : actor != NULL ? actor : x->sender);
    p.group = (char *)(group != NULL ? group : "");
    p.id = x->id;
    p.ts_ms = x->ts_ms;
    p.preview = preview != NULL ? preview : "";
    size_t len = parley__push_record__get_packed_size(&p);
    uint8_t *buf = px_malloc(len);
    parley__push_record__pack(&p, buf);
    int rc = batch_produce(ms, ms->topic_push, x->user, strlen(x->user), buf, len, tag, err,
                           errlen);
    free(buf);
    free(preview);
    json_decref(ev);
    return rc;
}

int pushrec_emit(msgstore *ms, const msgstore_rec *recs, size_t n, void *tag, char *err,
                 size_t errlen)
{
    if (ms->svc.cfg.push_url == NULL)
        return PX_OK;
    for (size_t i = 0; i < n; i++) {
        if (recs[i].kind != REC_INBOX || !pushrec_wanted(recs[i].u.inbox))
            continue;
        if (pushrec_one(ms, recs[i].u.inbox, tag, err, errlen) != PX_OK)
            return PX_ERROR;
        metric_add(ms->m.push_records, 1);
    }
    return PX_OK;
}
