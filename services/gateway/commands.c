/* Owns what a client command turns into: validation through the protocol
 * codec, the bus records a command produces (inbox, acks, presence, and
 * sync requests on the inbox topic, presence subscriptions),
 * and the answer a client gets once Kafka has, or has not, accepted a send.
 * A send naming media is first checked by media.c, which then produces it
 * through commands_produce_send. */
#include "common.h"
#include "gateway.h"
#include "ids.h"
#include "log.h"
#include "parley.pb-c.h"
#include "protocol.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum dr_kind { DR_SEND = 1, DR_BEAT, DR_RECORD };

typedef struct dr_tag {
    enum dr_kind kind;
    gw *g;
} dr_tag;

/* A send waiting for its delivery report. Owned by the bus from produce to
 * the report, then freed by commands_on_delivery. */
typedef struct pending_send {
    dr_tag tag;
    uint64_t conn_id;
    int64_t t0_mono, ts;
    char ref[65];
    char msg_id[ID_BUF];
    int group;         /* group-fanout answers it: report only a refusal */
    int reports;       /* delivery reports still to come (a 1:1 send and its own copy) */
    int failed;        /* one of them failed */
    char err[PX_ERRLEN];
} pending_send;

static dr_tag commands_beat_tag, commands_record_tag;

const char *const gw_rate_names[GW_RATE_N] = { "send", "ack", "read", "group", "ping" };

/* One summary line per interval, whatever the flood. */
static log_tally commands_produce_tally = LOG_TALLY_INIT("produce refused");
static log_tally commands_limited_tally[GW_RATE_N] = {
    LOG_TALLY_INIT("sends refused: rate limited"), LOG_TALLY_INIT("acks refused: rate limited"),
    LOG_TALLY_INIT("reads refused: rate limited"),
    LOG_TALLY_INIT("group commands refused: rate limited"),
    LOG_TALLY_INIT("pings refused: rate limited"),
};

/* Queues a rendered event and frees it; the length is taken here because
 * argument evaluation order would not guarantee it was set. */
static void commands_reply(conn *c, char *json)
{
    ws_conn_queue_text(c, json, strlen(json));
    free(json);
}

static void commands_error(gw *g, conn *c, const char *ref, enum proto_code code,
                           const char *msg)
{
    metric_add(g->m.errors, 1);
    commands_reply(c, proto_render_error(ref, code, msg, NULL));
}

/* Packs a protobuf-c message into a heap buffer the caller frees. */
#define COMMANDS_PACK(type, rec, out_len)                              \
    ({                                                                 \
        size_t n_ = parley__##type##__get_packed_size(rec);            \
        uint8_t *buf_ = px_malloc(n_);                                 \
        parley__##type##__pack(rec, buf_);                             \
        *(out_len) = n_;                                               \
        buf_;                                                          \
    })

/* Takes buf. A transient record may be lost with the process (bus.h). */
static int commands_produce_as(gw *g, const char *topic, const char *key, uint8_t *buf,
                               size_t len, void *opaque, int transient)
{
    char err[PX_ERRLEN];
    int rc = (transient ? bus_produce_transient : bus_produce)(g->b, topic, key, strlen(key),
                                                                buf, len, opaque, err,
                                                                sizeof(err));
    if (rc != PX_OK) {
        char detail[PX_ERRLEN + 128];
        snprintf(detail, sizeof(detail), "%s: %s", topic, rc == PX_AGAIN ? "local queue full" : err);
        log_tally_add(&commands_produce_tally, detail);
    }
    free(buf);
    return rc;
}

static int commands_produce(gw *g, const char *topic, const char *key, uint8_t *buf,
                            size_t len, void *opaque)
{
    return commands_produce_as(g, topic, key, buf, len, opaque, 0);
}

static const Parley__GroupCommand__Type commands_group_types[] = {
    [PROTO_SEND] = PARLEY__GROUP_COMMAND__TYPE__TYPE_SEND,
    [PROTO_GROUP_CREATE] = PARLEY__GROUP_COMMAND__TYPE__TYPE_CREATE,
    [PROTO_GROUP_ADD] = PARLEY__GROUP_COMMAND__TYPE__TYPE_ADD,
    [PROTO_GROUP_REMOVE] = PARLEY__GROUP_COMMAND__TYPE__TYPE_REMOVE,
    [PROTO_GROUP_LEAVE] = PARLEY__GROUP_COMMAND__TYPE__TYPE_LEAVE,
    [PROTO_GROUP_INFO] = PARLEY__GROUP_COMMAND__TYPE__TYPE_INFO,
    [PROTO_GROUP_JOIN] = PARLEY__GROUP_COMMAND__TYPE__TYPE_JOIN,
    [PROTO_TYPING] = PARLEY__GROUP_COMMAND__TYPE__TYPE_TYPING,
};

/* Group commands and group sends go to parley.groups keyed by the group.
 * Only group-fanout knows the membership, so it answers the connection
 * (`group`, `sent` or the error) through this gateway's delivery topic;
 * here only a produce Kafka refused is answered (`unavailable`). The id of
 * a new group is a function of (creator, client id), like a msg_id, so a
 * retried group_create names the same group instead of making a second. */
static int commands_group(gw *g, const char *user, const char *dev, uint64_t conn_id,
                          const proto_cmd *cmd, const char *media_json)
{
    pending_send *p = px_calloc(1, sizeof(*p));
    p->tag = (dr_tag){ DR_SEND, g };
    p->group = 1;
    p->reports = 1;
    p->conn_id = conn_id;
    p->ts = px_now_ms();
    snprintf(p->ref, sizeof(p->ref), "%s", cmd->id);
    id_for_send(user, cmd->id, p->msg_id);

    char gid[ID_BUF + 2], cmd_id[ID_BUF];
    snprintf(gid, sizeof(gid), "%s", cmd->group != NULL ? cmd->group : "");
    if (cmd->type == PROTO_GROUP_CREATE)
        snprintf(gid, sizeof(gid), "g_%s", p->msg_id);
    id_new(cmd_id);
    char *json = NULL;
    size_t json_len = 0, len;
    Parley__GroupCommand rec = PARLEY__GROUP_COMMAND__INIT;
    rec.version = 1;
    rec.type = commands_group_types[cmd->type];
    rec.group = gid;
    rec.user = (char *)user;
    rec.gateway = (char *)g->cfg.gateway_id;
    rec.conn = p->conn_id;
    rec.ref = p->ref;
    rec.cmd_id = cmd_id;
    rec.name = (char *)(cmd->name != NULL ? cmd->name : "");
    rec.members = (char **)cmd->members;
    rec.n_members = cmd->nmembers;
    rec.ts_ms = p->ts;
    if (cmd->type == PROTO_SEND) {
        proto_message m = { .id = p->msg_id, .from = user, .group = gid, .body = cmd->body,
                            .media_json = media_json, .forwarded = cmd->forwarded,
                            .ts = p->ts };
        json = proto_render_message(&m, &json_len);
        rec.msg_id = p->msg_id;
        rec.event_json = (ProtobufCBinaryData){ json_len, (uint8_t *)json };
        rec.media_id = (char *)(media_json != NULL ? cmd->media : "");
        rec.device = (char *)dev;
    } else if (cmd->type == PROTO_TYPING) {
        json = proto_render_typing(user, NULL, gid, cmd->composing, p->ts, &json_len);
        rec.event_json = (ProtobufCBinaryData){ json_len, (uint8_t *)json };
    }
    uint8_t *buf = COMMANDS_PACK(group_command, &rec, &len);
    free(json);
    int rc = commands_produce(g, g->topic_groups, gid, buf, len, p);
    if (rc != PX_OK)
        free(p);
    return rc;
}

/* A 1:1 send is two records: the message for the recipient, and its copy
 * for the sender's other devices (origin_device: message-store drops it
 * when the sender has no other device, and never gives it to this one),
 * produced first. `sent` waits for both reports, so a message answered
 * `sent` is on every device of both users; a resend after a failure
 * produces both again, and the (user, id) dedupe absorbs what was there. */
static int commands_direct(gw *g, const char *user, const char *dev, uint64_t conn_id,
                           const proto_cmd *cmd, const char *media_json)
{
    pending_send *p = px_calloc(1, sizeof(*p));
    p->tag = (dr_tag){ DR_SEND, g };
    int own = strcmp(cmd->to, user) != 0; /* a note to self is the message itself */
    p->reports = 1 + own;
    p->conn_id = conn_id;
    p->t0_mono = px_mono_ms();
    p->ts = px_now_ms();
    snprintf(p->ref, sizeof(p->ref), "%s", cmd->id);
    id_for_send(user, cmd->id, p->msg_id);

    size_t json_len, len;
    proto_message m = { .id = p->msg_id, .from = user, .to = cmd->to, .body = cmd->body,
                        .media_json = media_json, .forwarded = cmd->forwarded, .ts = p->ts };
    char *json = proto_render_message(&m, &json_len);
    Parley__InboxRecord rec = PARLEY__INBOX_RECORD__INIT;
    rec.version = 1;
    rec.kind = PARLEY__EVENT_KIND__EVENT_KIND_MESSAGE;
    rec.user = (char *)cmd->to;
    rec.id = p->msg_id;
    rec.sender = (char *)user;
    rec.ts_ms = p->ts;
    rec.event_json = (ProtobufCBinaryData){ json_len, (uint8_t *)json };
    Parley__InboxRecord copy = rec;
    copy.user = (char *)user;
    copy.sender = "";          /* no receipts for one's own copy */
    copy.origin_device = (char *)dev;
    int rc = PX_OK;
    if (own) {
        uint8_t *obuf = COMMANDS_PACK(inbox_record, &copy, &len);
        rc = commands_produce(g, g->topic_inbox, user, obuf, len, p);
    }
    if (rc == PX_OK) {
        uint8_t *buf = COMMANDS_PACK(inbox_record, &rec, &len);
        rc = commands_produce(g, g->topic_inbox, cmd->to, buf, len, p);
        /* The copy's report is still to come and frees p; report this
         * refusal through it. */
        if (rc != PX_OK && own) {
            p->failed = 1;
            snprintf(p->err, sizeof(p->err), "recipient's record refused by the bus");
            p->reports--;
            rc = PX_OK;
        }
    }
    free(json);
    if (rc != PX_OK)
        free(p);
    return rc;
}

int commands_produce_send(gw *g, const char *user, const char *dev, uint64_t conn_id,
                          const proto_cmd *cmd, const char *media_json)
{
    if (cmd->group != NULL)
        return commands_group(g, user, dev, conn_id, cmd, media_json);
    return commands_direct(g, user, dev, conn_id, cmd, media_json);
}

/* A send naming media goes through media.c's checker thread first (access
 * and the media object need store reads, which must not stall this
 * reactor); it takes the command over and produces it from there. */
static void commands_send(gw *g, conn *c, proto_cmd *cmd)
{
    if (cmd->media != NULL) {
        if (media_send(g, ws_conn_user(c), ws_conn_device(c), ws_conn_id(c), cmd) != PX_OK)
            commands_error(g, c, cmd->id, PROTO_UNAVAILABLE, "media checks backlogged, retry");
        return;
    }
    if (commands_produce_send(g, ws_conn_user(c), ws_conn_device(c), ws_conn_id(c), cmd, NULL) !=
        PX_OK)
        commands_error(g, c, cmd->id, PROTO_UNAVAILABLE, "message bus unavailable, retry");
}

/* An event the gateway makes for user's inbox (not a message: no sender,
 * no receipts), best effort like the command behind it; origin (NULL:
 * none) is the device that does not get it. */
static void commands_inbox_event(gw *g, Parley__EventKind kind, const char *user, char *id,
                                 int64_t ts, char *json, size_t json_len, const char *origin)
{
    size_t len;
    Parley__InboxRecord rec = PARLEY__INBOX_RECORD__INIT;
    rec.version = 1;
    rec.kind = kind;
    rec.user = (char *)user;
    rec.id = id;
    rec.ts_ms = ts;
    rec.origin_device = (char *)(origin != NULL ? origin : "");
    rec.event_json = (ProtobufCBinaryData){ json_len, (uint8_t *)json };
    uint8_t *buf = COMMANDS_PACK(inbox_record, &rec, &len);
    commands_produce(g, g->topic_inbox, user, buf, len, &commands_record_tag);
}

/* A `read` also tells the user's other devices (so their unread counts
 * clear): a read_state event in the user's own inbox that this device
 * does not get (origin_device), dropped by message-store when the user
 * has no other device. Best effort, like the read itself. */
static void commands_read_state(gw *g, conn *c, const proto_cmd *cmd)
{
    char id[ID_BUF + 3] = "rs_";
    size_t json_len;
    id_new(id + 3);
    int64_t ts = px_now_ms();
    char *json = proto_render_read_state(id, (const char *const *)cmd->ids, cmd->nids, ts,
                                         &json_len);
    commands_inbox_event(g, PARLEY__EVENT_KIND__EVENT_KIND_READ_STATE, ws_conn_user(c), id, ts,
                         json, json_len, ws_conn_device(c));
    free(json);
}

/* Typing to a user: an event for the recipient's live connections, which
 * message-store pushes and never stores (EVENT_KIND_TYPING). To a group:
 * group-fanout checks membership and copies it to the other members.
 * Unanswered unless refused; it costs a send of the sender's rate. */
static void commands_typing(gw *g, conn *c, const proto_cmd *cmd)
{
    if (cmd->group != NULL) {
        if (commands_group(g, ws_conn_user(c), ws_conn_device(c), ws_conn_id(c), cmd, NULL) !=
            PX_OK)
            commands_error(g, c, cmd->id, PROTO_UNAVAILABLE, "message bus unavailable, retry");
        return;
    }
    char id[ID_BUF + 3] = "ty_";
    size_t json_len;
    id_new(id + 3);
    int64_t ts = px_now_ms();
    char *json = proto_render_typing(ws_conn_user(c), cmd->to, NULL, cmd->composing, ts,
                                     &json_len);
    commands_inbox_event(g, PARLEY__EVENT_KIND__EVENT_KIND_TYPING, cmd->to, id, ts, json,
                         json_len, NULL);
    free(json);
}

/* `devices` and `device_unlink` go to message-store on the user's inbox
 * partition, which answers the connection (an unlink takes effect at that
 * point of the inbox's order). A refused produce is answered here. */
static void commands_device(gw *g, conn *c, const proto_cmd *cmd)
{
    size_t len;
    Parley__DeviceCommand dc = PARLEY__DEVICE_COMMAND__INIT;
    dc.version = 1;
    dc.type = cmd->type == PROTO_DEVICES ? PARLEY__DEVICE_COMMAND__TYPE__TYPE_LIST
                                         : PARLEY__DEVICE_COMMAND__TYPE__TYPE_UNLINK;
    dc.user = (char *)ws_conn_user(c);
    dc.gateway = (char *)g->cfg.gateway_id;
    dc.conn = ws_conn_id(c);
    dc.ref = (char *)cmd->id;
    dc.device = (char *)(cmd->device != NULL ? cmd->device : "");
    dc.from_device = (char *)ws_conn_device(c);
    Parley__InboxRecord rec = PARLEY__INBOX_RECORD__INIT;
    rec.version = 1;
    rec.user = dc.user;
    rec.device_cmd = &dc;
    uint8_t *buf = COMMANDS_PACK(inbox_record, &rec, &len);
    if (commands_produce(g, g->topic_inbox, rec.user, buf, len, &commands_record_tag) != PX_OK)
        commands_error(g, c, cmd->id, PROTO_UNAVAILABLE, "message bus unavailable, retry");
}

/* presence_sub and presence_settings go to presence on the user's
 * partition of parley.presence, which answers the connection. A sub sets
 * the connection's watch list first, so no change that presence tells
 * after reading the answer's state can miss it (watch.c). */
static void commands_presence_cmd(gw *g, conn *c, const proto_cmd *cmd)
{
    size_t len;
    int sub = cmd->type == PROTO_PRESENCE_SUB;
    if (sub)
        watch_set(g->watch, ws_conn_id(c), cmd->ids, cmd->nids);
    Parley__PresenceRecord rec = PARLEY__PRESENCE_RECORD__INIT;
    rec.version = 1;
    rec.type = sub ? PARLEY__PRESENCE_RECORD__TYPE__TYPE_SUBSCRIBE
                   : PARLEY__PRESENCE_RECORD__TYPE__TYPE_SETTINGS;
    rec.user = (char *)ws_conn_user(c);
    rec.gateway = (char *)g->cfg.gateway_id;
    rec.epoch = g->epoch;
    rec.ts_ms = px_now_ms();
    rec.conn = ws_conn_id(c);
    rec.ref = (char *)cmd->id;
    rec.users = (char **)cmd->ids;
    rec.n_users = sub ? cmd->nids : 0;
    rec.hide_last_seen = cmd->hide_last_seen > 0;
    rec.query = !sub && cmd->hide_last_seen < 0;
    uint8_t *buf = COMMANDS_PACK(presence_record, &rec, &len);
    if (commands_produce(g, g->topic_presence, rec.user, buf, len, &commands_record_tag) != PX_OK)
        commands_error(g, c, cmd->id, PROTO_UNAVAILABLE, "message bus unavailable, retry");
}

static void commands_ack(gw *g, conn *c, const proto_cmd *cmd)
{
    size_t len;
    Parley__AckRecord rec = PARLEY__ACK_RECORD__INIT;
    rec.version = 1;
    rec.user = (char *)ws_conn_user(c);
    rec.device = (char *)ws_conn_device(c);
    rec.ids = (char **)cmd->ids;
    rec.n_ids = cmd->nids;
    rec.read = cmd->type == PROTO_READ;
    rec.ts_ms = px_now_ms();
    uint8_t *buf = COMMANDS_PACK(ack_record, &rec, &len);
    /* An ack has no answer; if it is lost the events come again on the next
     * connection and the client acks them again, so it is transient (parleyd
     * does not log it). A `read` of an event already acked is not sent
     * again: it stays durable. */
    commands_produce_as(g, g->topic_acks, rec.user, buf, len, &commands_record_tag,
                        cmd->type != PROTO_READ);
    if (cmd->type == PROTO_READ)
        commands_read_state(g, c, cmd);
}

static enum gw_rate commands_rate_kind(enum proto_type t)
{
    switch (t) {
    case PROTO_SEND:
    case PROTO_TYPING: /* a group's costs a fan-out, as a send does */
        return GW_RATE_SEND;
    case PROTO_ACK:
        return GW_RATE_ACK;
    case PROTO_READ:
        return GW_RATE_READ;
    case PROTO_PING:
        return GW_RATE_PING;
    default:
        return GW_RATE_GROUP;
    }
}

/* Every kind of command has a rate (registry_take); a refusal is answered
 * rate_limited (with the command's id when it has one), counted by kind
 * and logged as a counted summary. */
static int commands_admit(gw *g, conn *c, const proto_cmd *cmd)
{
    enum gw_rate k = commands_rate_kind(cmd->type);
    if (registry_take(g->reg, ws_conn_user(c), k))
        return 1;
    metric_add(g->m.rate_limited[k], 1);
    log_tally_add(&commands_limited_tally[k], ws_conn_user(c));
    commands_error(g, c, cmd->id, PROTO_RATE_LIMITED,
                   k == GW_RATE_SEND ? "over PARLEY_SEND_RATE, slow down"
                                     : "over PARLEY_CMD_RATE, slow down");
    return 0;
}

void commands_handle(gw *g, conn *c, const char *text, size_t len)
{
    proto_cmd cmd;
    enum proto_code code;
    char msg[160];
    proto_limits lim = { .max_body_bytes = (size_t)g->cfg.max_body_bytes,
                         .max_presence_sub = (size_t)g->cfg.presence_sub_max };
    if (proto_parse(text, len, &lim, &cmd, &code, msg, sizeof(msg)) != PX_OK) {
        commands_error(g, c, cmd.id, code, msg);
        return;
    }
    if (!commands_admit(g, c, &cmd)) {
        proto_cmd_free(&cmd);
        return;
    }
    switch (cmd.type) {
    case PROTO_SEND:
        commands_send(g, c, &cmd);
        break;
    case PROTO_ACK:
    case PROTO_READ:
        commands_ack(g, c, &cmd);
        break;
    case PROTO_PING:
        commands_reply(c, proto_render_pong(cmd.id, NULL));
        break;
    case PROTO_TYPING:
        commands_typing(g, c, &cmd);
        break;
    case PROTO_DEVICES:
    case PROTO_DEVICE_UNLINK:
        commands_device(g, c, &cmd);
        break;
    case PROTO_PRESENCE_SUB:
    case PROTO_PRESENCE_SETTINGS:
        commands_presence_cmd(g, c, &cmd);
        break;
    default:
        if (commands_group(g, ws_conn_user(c), ws_conn_device(c), ws_conn_id(c), &cmd, NULL) !=
            PX_OK)
            commands_error(g, c, cmd.id, PROTO_UNAVAILABLE, "message bus unavailable, retry");
        break;
    }
    proto_cmd_free(&cmd);
}

/* user and conn_id name the connection of a connect/disconnect; NULL and 0
 * for the gateway's own beat or reset. */
/* dev: a connect's device (NULL for the others). */
static int commands_presence(gw *g, const char *user, const char *dev, uint64_t conn_id,
                             Parley__PresenceRecord__Type type, dr_tag *tag)
{
    size_t len;
    Parley__PresenceRecord rec = PARLEY__PRESENCE_RECORD__INIT;
    rec.version = 1;
    rec.type = type;
    rec.user = (char *)(user ? user : "");
    rec.gateway = (char *)g->cfg.gateway_id;
    rec.epoch = g->epoch;
    rec.ts_ms = px_now_ms();
    rec.conn = conn_id;
    rec.device = (char *)(dev != NULL ? dev : "");
    uint8_t *buf = COMMANDS_PACK(presence_record, &rec, &len);
    const char *key = user ? user : g->cfg.gateway_id;
    return commands_produce(g, g->topic_presence, key, buf, len, tag);
}

void commands_sync(gw *g, conn *c, int64_t from_seq)
{
    size_t len;
    Parley__SyncRequest req = PARLEY__SYNC_REQUEST__INIT;
    req.version = 1;
    req.user = (char *)ws_conn_user(c);
    req.gateway = (char *)g->cfg.gateway_id;
    req.conn = ws_conn_id(c);
    req.from_seq = from_seq;
    req.device = (char *)ws_conn_device(c);
    /* On the user's inbox partition, behind every event already produced
     * there (proto/parley.proto, InboxRecord.sync). */
    Parley__InboxRecord rec = PARLEY__INBOX_RECORD__INIT;
    rec.version = 1;
    rec.user = req.user;
    rec.sync = &req;
    uint8_t *buf = COMMANDS_PACK(inbox_record, &rec, &len);
    if (commands_produce(g, g->topic_inbox, rec.user, buf, len, &commands_record_tag) != PX_OK)
        ws_conn_close(c, 1013, "try again later");
}

void commands_connected(gw *g, conn *c)
{
    commands_presence(g, ws_conn_user(c), ws_conn_device(c), ws_conn_id(c),
                      PARLEY__PRESENCE_RECORD__TYPE__TYPE_CONNECT, &commands_record_tag);
    commands_sync(g, c, 0);
    metric_add(g->m.accepted, 1);
}

void commands_disconnected(gw *g, conn *c)
{
    watch_drop(g->watch, ws_conn_id(c));
    commands_presence(g, ws_conn_user(c), NULL, ws_conn_id(c),
                      PARLEY__PRESENCE_RECORD__TYPE__TYPE_DISCONNECT,
                      &commands_record_tag);
}

int commands_heartbeat(gw *g, int reset)
{
    commands_beat_tag = (dr_tag){ DR_BEAT, g };
    commands_record_tag = (dr_tag){ DR_RECORD, g };
    return commands_presence(g, NULL, NULL, 0,
                             reset ? PARLEY__PRESENCE_RECORD__TYPE__TYPE_RESET
                                   : PARLEY__PRESENCE_RECORD__TYPE__TYPE_HEARTBEAT,
                             &commands_beat_tag);
}

/* Queues json (taken over and freed here) for connection conn_id through
 * its worker's mailbox: safe from any thread but that worker's own. */
static void commands_post(gw *g, uint64_t conn_id, char *json, size_t len)
{
    mail *m = mail_new(MAIL_EVENT, conn_id, json, len);
    free(json);
    worker_post(g->workers[CONN_WORKER(conn_id) % g->nworkers], m);
}

void commands_post_error(gw *g, uint64_t conn_id, const char *ref, enum proto_code code,
                         const char *msg)
{
    size_t len;
    metric_add(g->m.errors, 1);
    char *json = proto_render_error(ref, code, msg, &len); /* len is set here, not in the call */
    commands_post(g, conn_id, json, len);
}

/* Called once per delivery report of the send's records; answers after
 * the last: `sent` only when every one is in Kafka. */
static void commands_send_done(pending_send *p, int status, const char *err)
{
    gw *g = p->tag.g;
    size_t len;
    char *json;
    if (status != PX_OK && !p->failed) {
        p->failed = 1;
        snprintf(p->err, sizeof(p->err), "%s", err ? err : "");
    }
    if (--p->reports > 0)
        return;
    status = p->failed ? PX_ERROR : PX_OK;
    err = p->err;
    if (status == PX_OK && p->group) {
        free(p);
        return;
    }
    if (status == PX_OK) {
        json = proto_render_sent(p->ref, p->msg_id, p->ts, &len);
        metric_add(g->m.sent_ok, 1);
        metric_observe(g->m.send_latency, (double)(px_mono_ms() - p->t0_mono));
    } else {
        json = proto_render_error(p->ref, PROTO_UNAVAILABLE, "message was not stored, retry", &len);
        metric_add(g->m.sent_fail, 1);
        log_warn("send not stored", "{s:s, s:s}", "msg_id", p->msg_id, "error", err ? err : "");
    }
    commands_post(g, p->conn_id, json, len);
    free(p);
}

void commands_on_delivery(void *opaque, int status, const char *err,
                          int32_t partition, int64_t offset)
{
    dr_tag *tag = opaque;
    if (tag == NULL)
        return;
    switch (tag->kind) {
    case DR_SEND:
        commands_send_done((pending_send *)tag, status, err);
        break;
    case DR_BEAT:
        if (status == PX_OK)
            atomic_store(&tag->g->last_beat_ok, px_now_ms());
        else
            log_warn("heartbeat not stored", "{s:s}", "error", err ? err : "");
        break;
    case DR_RECORD:
        if (status != PX_OK)
            log_warn("record not stored", "{s:s}", "error", err ? err : "");
        break;
    }
}
