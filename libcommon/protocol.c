/* Owns the mapping between PROTOCOL.md and C. Validation is complete here so
 * services act only on well-formed commands; jansson does the JSON (it also
 * rejects invalid UTF-8 and NUL inside strings by default). */
#include "protocol.h"
#include "common.h"
#include "ids.h"
#include "utf8.h"

#include <jansson.h>
#include <stddef.h>
#include <string.h>

static const char *const proto_codes[] = {
    [PROTO_BAD_REQUEST] = "bad_request", [PROTO_UNAUTHORIZED] = "unauthorized",
    [PROTO_FORBIDDEN] = "forbidden", [PROTO_NOT_FOUND] = "not_found",
    [PROTO_TOO_LARGE] = "too_large", [PROTO_RATE_LIMITED] = "rate_limited",
    [PROTO_GROUP_FULL] = "group_full", [PROTO_UNAVAILABLE] = "unavailable",
    [PROTO_INTERNAL] = "internal",
};

static const struct { const char *name; enum proto_type type; } proto_types[] = {
    { "send", PROTO_SEND }, { "ack", PROTO_ACK }, { "read", PROTO_READ },
    { "ping", PROTO_PING }, { "group_create", PROTO_GROUP_CREATE },
    { "group_add", PROTO_GROUP_ADD }, { "group_remove", PROTO_GROUP_REMOVE },
    { "group_leave", PROTO_GROUP_LEAVE }, { "group_info", PROTO_GROUP_INFO },
    { "group_join", PROTO_GROUP_JOIN }, { "typing", PROTO_TYPING },
    { "devices", PROTO_DEVICES }, { "device_unlink", PROTO_DEVICE_UNLINK },
    { "presence_sub", PROTO_PRESENCE_SUB }, { "presence_settings", PROTO_PRESENCE_SETTINGS },
};

const char *proto_code_name(enum proto_code code)
{
    if ((size_t)code >= PX_ARRAY_LEN(proto_codes) || proto_codes[code] == NULL)
        return "internal";
    return proto_codes[code];
}

static int proto_fail(enum proto_code *code, enum proto_code c, char *msg, size_t msglen,
                      const char *text)
{
    *code = c;
    snprintf(msg, msglen, "%s", text);
    return PX_DECLINED;
}

/* Optional string field: absent is fine, present must be a string. */
static int proto_opt_str(json_t *o, const char *key, const char **out)
{
    json_t *v = json_object_get(o, key);
    *out = NULL;
    if (v == NULL || json_is_null(v))
        return PX_OK;
    if (!json_is_string(v))
        return PX_ERROR;
    *out = json_string_value(v);
    return PX_OK;
}

static int proto_str_array(json_t *o, const char *key, const char **out, size_t max,
                           size_t *n, int users)
{
    json_t *a = json_object_get(o, key);
    if (!json_is_array(a) || json_array_size(a) == 0 || json_array_size(a) > max)
        return PX_ERROR;
    size_t i;
    json_t *v;
    json_array_foreach(a, i, v) {
        const char *s = json_string_value(v);
        if (s == NULL || (users ? !id_valid_user(s) : !id_valid_client(s)))
            return PX_ERROR;
        out[i] = s;
    }
    *n = json_array_size(a);
    return PX_OK;
}

static int proto_parse_send(json_t *o, const proto_limits *lim, proto_cmd *c,
                            enum proto_code *code, char *msg, size_t msglen)
{
    json_t *fw = json_object_get(o, "forwarded");
    if (proto_opt_str(o, "to", &c->to) || proto_opt_str(o, "group", &c->group) ||
        proto_opt_str(o, "body", &c->body) || proto_opt_str(o, "media", &c->media) ||
        (fw != NULL && !json_is_boolean(fw)))
        return proto_fail(code, PROTO_BAD_REQUEST, msg, msglen,
                          "to, group, body, media must be strings, forwarded a boolean");
    c->forwarded = json_is_true(fw);
    if ((c->to == NULL) == (c->group == NULL))
        return proto_fail(code, PROTO_BAD_REQUEST, msg, msglen, "send needs exactly one of to or group");
    if (c->to != NULL && !id_valid_user(c->to))
        return proto_fail(code, PROTO_BAD_REQUEST, msg, msglen, "to is not a valid user id");
    if (c->group != NULL && !id_valid_user(c->group))
        return proto_fail(code, PROTO_BAD_REQUEST, msg, msglen, "group is not a valid group id");
    if (c->body == NULL && c->media == NULL)
        return proto_fail(code, PROTO_BAD_REQUEST, msg, msglen, "send needs body or media");
    if (c->media != NULL && !id_valid_user(c->media))
        return proto_fail(code, PROTO_BAD_REQUEST, msg, msglen, "media is not a valid media id");
    if (c->body != NULL) {
        c->body_len = json_string_length(json_object_get(o, "body"));
        if (c->body_len > lim->max_body_bytes)
            return proto_fail(code, PROTO_TOO_LARGE, msg, msglen, "body exceeds PARLEY_MAX_BODY_BYTES");
    }
    return PX_OK;
}

/* {"type":"typing","to"|"group","state":"composing"|"paused"}; no id needed. */
static int proto_parse_typing(json_t *o, proto_cmd *c, enum proto_code *code, char *msg,
                              size_t msglen)
{
    const char *state;
    if (proto_opt_str(o, "to", &c->to) || proto_opt_str(o, "group", &c->group) ||
        (c->to == NULL) == (c->group == NULL) || (c->to != NULL && !id_valid_user(c->to)) ||
        (c->group != NULL && !id_valid_user(c->group)))
        return proto_fail(code, PROTO_BAD_REQUEST, msg, msglen,
                          "typing needs exactly one of to (a user id) or group (a group id)");
    if (proto_opt_str(o, "state", &state) || state == NULL ||
        (strcmp(state, "composing") != 0 && strcmp(state, "paused") != 0))
        return proto_fail(code, PROTO_BAD_REQUEST, msg, msglen,
                          "state must be composing or paused");
    c->composing = strcmp(state, "composing") == 0;
    return PX_OK;
}

/* {"type":"presence_sub","id","users":[...]}: 0 to max_presence_sub user
 * ids (none: watch no one); past the cap too_large, as PROTOCOL.md says. */
static int proto_parse_presence_sub(json_t *o, const proto_limits *lim, proto_cmd *c,
                                    enum proto_code *code, char *msg, size_t msglen)
{
    size_t max = lim->max_presence_sub > 0 && lim->max_presence_sub < PROTO_MAX_IDS
                     ? lim->max_presence_sub : PROTO_MAX_IDS;
    json_t *a = json_object_get(o, "users");
    if (json_is_array(a) && json_array_size(a) > max) {
        char text[96];
        snprintf(text, sizeof(text), "more than PARLEY_PRESENCE_SUB_MAX (%zu) users", max);
        return proto_fail(code, PROTO_TOO_LARGE, msg, msglen, text);
    }
    if (json_is_array(a) && json_array_size(a) == 0)
        return PX_OK;
    if (proto_str_array(o, "users", c->ids, max, &c->nids, 1) != PX_OK)
        return proto_fail(code, PROTO_BAD_REQUEST, msg, msglen, "users must be a list of user ids");
    return PX_OK;
}

static int proto_parse_group(json_t *o, proto_cmd *c, enum proto_code *code,
                             char *msg, size_t msglen)
{
    if (c->type == PROTO_GROUP_CREATE) {
        json_t *name = json_object_get(o, "name");
        /* Characters, not bytes: jansson's strings are valid UTF-8. */
        size_t n = json_is_string(name) ? utf8_chars((const unsigned char *)json_string_value(name),
                                                     json_string_length(name)) : 0;
        if (n < 1 || n > PROTO_MAX_NAME)
            return proto_fail(code, PROTO_BAD_REQUEST, msg, msglen, "name must be 1-100 characters");
        c->name = json_string_value(name);
    } else {
        if (proto_opt_str(o, "group", &c->group) || c->group == NULL || !id_valid_user(c->group))
            return proto_fail(code, PROTO_BAD_REQUEST, msg, msglen, "group must be a group id");
    }
    int wants_members = c->type == PROTO_GROUP_CREATE || c->type == PROTO_GROUP_ADD ||
                        c->type == PROTO_GROUP_REMOVE;
    if (!wants_members)
        return PX_OK;
    if (json_array_size(json_object_get(o, "members")) > PROTO_MAX_MEMBERS)
        return proto_fail(code, PROTO_GROUP_FULL, msg, msglen, "more than 256 members");
    /* group_create may name no one but the creator: an empty list is fine. */
    json_t *m = json_object_get(o, "members");
    if (c->type == PROTO_GROUP_CREATE && json_is_array(m) && json_array_size(m) == 0)
        return PX_OK;
    if (proto_str_array(o, "members", c->members, PROTO_MAX_MEMBERS, &c->nmembers, 1))
        return proto_fail(code, PROTO_BAD_REQUEST, msg, msglen, "members must be a list of user ids");
    return PX_OK;
}

static int proto_parse_type(json_t *o, proto_cmd *c, enum proto_code *code,
                            char *msg, size_t msglen)
{
    const char *t = json_string_value(json_object_get(o, "type"));
    if (t == NULL)
        return proto_fail(code, PROTO_BAD_REQUEST, msg, msglen, "type is missing");
    for (size_t i = 0; i < PX_ARRAY_LEN(proto_types); i++)
        if (strcmp(t, proto_types[i].name) == 0) {
            c->type = proto_types[i].type;
            return PX_OK;
        }
    return proto_fail(code, PROTO_BAD_REQUEST, msg, msglen, "unknown type");
}

/* Reads the client id first so even a later failure can carry a ref. */
static int proto_parse_id(json_t *o, proto_cmd *c, enum proto_code *code,
                          char *msg, size_t msglen)
{
    json_t *id = json_object_get(o, "id");
    if (id != NULL && json_is_string(id) && id_valid_client(json_string_value(id)))
        snprintf(c->id, sizeof(c->id), "%s", json_string_value(id));
    int needs_id = c->type != PROTO_ACK && c->type != PROTO_READ && c->type != PROTO_TYPING;
    if (needs_id && c->id[0] == '\0')
        return proto_fail(code, PROTO_BAD_REQUEST, msg, msglen, "id must be a string of 1-64 printable characters");
    return PX_OK;
}

/* One pass over the text: a ':' outside a string ends a key, '{' and '['
 * open a level. Malformed text passes here and fails in the parser. */
static int proto_shape_ok(const char *buf, size_t len)
{
    int depth = 0, keys = 0, in_str = 0;
    for (size_t i = 0; i < len; i++) {
        char ch = buf[i];
        if (in_str) {
            if (ch == '\\')
                i++;
            else if (ch == '"')
                in_str = 0;
        } else if (ch == '"') {
            in_str = 1;
        } else if (ch == '{' || ch == '[') {
            if (++depth > PROTO_MAX_DEPTH)
                return 0;
        } else if (ch == '}' || ch == ']') {
            depth--;
        } else if (ch == ':' && ++keys > PROTO_MAX_KEYS) {
            return 0;
        }
    }
    return 1;
}

int proto_parse(const char *buf, size_t len, const proto_limits *lim,
                proto_cmd *c, enum proto_code *code, char *msg, size_t msglen)
{
    memset(c, 0, offsetof(proto_cmd, ids));
    if (!proto_shape_ok(buf, len))
        return proto_fail(code, PROTO_BAD_REQUEST, msg, msglen,
                          "a command nests at most 4 levels and holds at most 32 keys");
    json_error_t jerr;
    json_t *o = json_loadb(buf, len, JSON_REJECT_DUPLICATES, &jerr);
    int rc;
    if (!json_is_object(o)) {
        rc = proto_fail(code, PROTO_BAD_REQUEST, msg, msglen, "frame is not a JSON object");
        goto out;
    }
    /* The id is read before the type so an unknown type still gets a ref. */
    c->type = PROTO_SEND;
    proto_parse_id(o, c, code, msg, msglen);
    if ((rc = proto_parse_type(o, c, code, msg, msglen)) != PX_OK)
        goto out;
    if ((rc = proto_parse_id(o, c, code, msg, msglen)) != PX_OK)
        goto out;
    switch (c->type) {
    case PROTO_SEND:
        rc = proto_parse_send(o, lim, c, code, msg, msglen);
        break;
    case PROTO_ACK:
    case PROTO_READ:
        rc = proto_str_array(o, "ids", c->ids, PROTO_MAX_IDS, &c->nids, 0) == PX_OK
                 ? PX_OK
                 : proto_fail(code, PROTO_BAD_REQUEST, msg, msglen, "ids must be a list of 1-1000 event ids");
        break;
    case PROTO_PING:
    case PROTO_DEVICES:
        rc = PX_OK;
        break;
    case PROTO_TYPING:
        rc = proto_parse_typing(o, c, code, msg, msglen);
        break;
    case PROTO_PRESENCE_SUB:
        rc = proto_parse_presence_sub(o, lim, c, code, msg, msglen);
        break;
    case PROTO_PRESENCE_SETTINGS: {
        json_t *h = json_object_get(o, "hide_last_seen");
        c->hide_last_seen = h == NULL ? -1 : json_is_true(h);
        rc = h == NULL || json_is_boolean(h)
                 ? PX_OK
                 : proto_fail(code, PROTO_BAD_REQUEST, msg, msglen, "hide_last_seen must be a boolean");
        break;
    }
    case PROTO_DEVICE_UNLINK:
        c->device = json_string_value(json_object_get(o, "device"));
        rc = c->device != NULL && id_valid_user(c->device)
                 ? PX_OK
                 : proto_fail(code, PROTO_BAD_REQUEST, msg, msglen,
                              "device must be a device id (1-64 of [A-Za-z0-9._-])");
        break;
    default:
        rc = proto_parse_group(o, c, code, msg, msglen);
        break;
    }
out:
    if (rc == PX_OK) {
        c->root = o;
    } else {
        json_decref(o);
        c->root = NULL;
    }
    return rc;
}

void proto_cmd_free(proto_cmd *c)
{
    json_decref((json_t *)c->root);
    c->root = NULL;
}

static char *proto_dump(json_t *o, size_t *len)
{
    char *s = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    if (s == NULL)
        abort(); /* only on allocation failure */
    if (len != NULL)
        *len = strlen(s);
    return s;
}

char *proto_render_error(const char *ref, enum proto_code code, const char *text, size_t *len)
{
    json_t *o = json_pack("{s:s, s:s, s:s}", "type", "error", "code", proto_code_name(code),
                          "message", text);
    if (ref != NULL && *ref != '\0')
        json_object_set_new(o, "ref", json_string(ref));
    return proto_dump(o, len);
}

char *proto_render_sent(const char *ref, const char *msg_id, int64_t ts, size_t *len)
{
    return proto_dump(json_pack("{s:s, s:s, s:s, s:I}", "type", "sent", "ref", ref,
                                "msg_id", msg_id, "ts", (json_int_t)ts), len);
}

char *proto_render_pong(const char *ref, size_t *len)
{
    return proto_dump(json_pack("{s:s, s:s}", "type", "pong", "ref", ref), len);
}

char *proto_render_synced(size_t *len)
{
    return proto_dump(json_pack("{s:s}", "type", "synced"), len);
}

static json_t *proto_str_list(const char *const *v, size_t n)
{
    json_t *a = json_array();
    for (size_t i = 0; i < n; i++)
        json_array_append_new(a, json_string(v[i]));
    return a;
}

char *proto_render_presence(const char *user, int online, int64_t last_seen, size_t *len)
{
    return proto_dump(json_pack("{s:s, s:s, s:b, s:I}", "type", "presence", "user", user,
                                "online", online != 0, "last_seen", (json_int_t)last_seen),
                      len);
}

char *proto_render_presence_settings(const char *ref, int hide_last_seen, size_t *len)
{
    return proto_dump(json_pack("{s:s, s:s, s:b}", "type", "presence_settings", "ref", ref,
                                "hide_last_seen", hide_last_seen != 0),
                      len);
}

char *proto_render_typing(const char *from, const char *to, const char *group, int composing,
                          int64_t ts, size_t *len)
{
    json_t *o = json_pack("{s:s, s:s, s:s, s:i, s:I}", "type", "typing", "from", from, "state",
                          composing ? "composing" : "paused", "ttl_ms", PROTO_TYPING_TTL_MS,
                          "ts", (json_int_t)ts);
    json_object_set_new(o, group != NULL ? "group" : "to", json_string(group != NULL ? group : to));
    return proto_dump(o, len);
}

char *proto_render_group(const char *ref, const proto_group *g, size_t *len)
{
    json_t *o = json_pack("{s:s, s:s, s:o}", "type", "group", "ref", ref, "group",
                          json_pack("{s:s, s:s, s:o, s:o, s:o}", "id", g->id, "name", g->name,
                                    "members", proto_str_list(g->members, g->nmembers),
                                    "admins", proto_str_list(g->admins, g->nadmins),
                                    "invited", proto_str_list(g->invited, g->ninvited)));
    return proto_dump(o, len);
}

char *proto_render_group_event(const proto_group_event *e, size_t *len)
{
    json_t *o = json_pack("{s:s, s:s, s:s, s:s, s:s, s:o, s:I}", "type", "group_event", "id",
                          e->id, "group", e->group, "event", e->event, "actor", e->actor,
                          "members", proto_str_list(e->members, e->nmembers), "ts",
                          (json_int_t)e->ts);
    return proto_dump(o, len);
}

char *proto_render_message(const proto_message *m, size_t *len)
{
    json_t *o = json_pack("{s:s, s:s, s:s}", "type", "message", "id", m->id, "from", m->from);
    if (m->to != NULL)
        json_object_set_new(o, "to", json_string(m->to));
    if (m->group != NULL)
        json_object_set_new(o, "group", json_string(m->group));
    if (m->body != NULL)
        json_object_set_new(o, "body", json_string(m->body));
    if (m->media_json != NULL)
        json_object_set_new(o, "media", json_loads(m->media_json, 0, NULL));
    if (m->forwarded)
        json_object_set_new(o, "forwarded", json_true());
    json_object_set_new(o, "ts", json_integer(m->ts));
    return proto_dump(o, len);
}

char *proto_render_devices(const char *ref, const proto_device *d, size_t n, size_t *len)
{
    json_t *a = json_array();
    for (size_t i = 0; i < n; i++)
        json_array_append_new(a, json_pack("{s:s, s:I, s:I, s:b, s:b}", "id", d[i].id,
                                           "first_seen", (json_int_t)d[i].first_seen,
                                           "last_seen", (json_int_t)d[i].last_seen, "online",
                                           d[i].online, "current", d[i].current));
    return proto_dump(json_pack("{s:s, s:s, s:o}", "type", "devices", "ref", ref, "devices", a),
                      len);
}

char *proto_render_device_unlinked(const char *ref, const char *device, size_t *len)
{
    return proto_dump(json_pack("{s:s, s:s, s:s}", "type", "device_unlinked", "ref", ref,
                                "device", device), len);
}

char *proto_render_read_state(const char *id, const char *const *ids, size_t n, int64_t ts,
                              size_t *len)
{
    json_t *a = json_array();
    for (size_t i = 0; i < n; i++)
        json_array_append_new(a, json_string(ids[i]));
    return proto_dump(json_pack("{s:s, s:s, s:o, s:I}", "type", "read_state", "id", id, "ids", a,
                                "ts", (json_int_t)ts), len);
}

char *proto_render_receipt(const proto_receipt *r, size_t *len)
{
    json_t *o = json_pack("{s:s, s:s, s:s, s:s, s:s}", "type", "receipt", "id", r->id, "msg_id",
                          r->msg_id, "status", r->status, "by", r->by);
    if (r->group != NULL && r->group[0] != '\0')
        json_object_set_new(o, "group", json_string(r->group));
    json_object_set_new(o, "ts", json_integer(r->ts));
    return proto_dump(o, len);
}
