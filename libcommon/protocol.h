/* The client protocol codec (PROTOCOL.md): parses and validates commands,
 * renders events. Sans-I/O: bytes in, structs and bytes out. */
#ifndef PARLEY_PROTOCOL_H
#define PARLEY_PROTOCOL_H

#include <stddef.h>
#include <stdint.h>

#define PROTO_MAX_IDS 1000      /* ids in one ack/read */
#define PROTO_MAX_MEMBERS 256   /* members in one group command */
#define PROTO_MAX_NAME 100      /* group name, characters */
/* The shape of any command (an object of strings, booleans and lists of
 * strings), checked before the JSON is parsed: jansson would otherwise
 * build a tree of up to 2,048 levels, or a hash of thousands of keys, for
 * one frame. */
#define PROTO_MAX_DEPTH 4       /* nested objects and lists (and in the error text) */
#define PROTO_MAX_KEYS 32       /* keys in the whole frame (and in the error text) */

enum proto_type {
    PROTO_SEND = 1, PROTO_ACK, PROTO_READ, PROTO_PING,
    PROTO_GROUP_CREATE, PROTO_GROUP_ADD, PROTO_GROUP_REMOVE,
    PROTO_GROUP_LEAVE, PROTO_GROUP_INFO, PROTO_GROUP_JOIN, PROTO_TYPING,
    PROTO_DEVICES, PROTO_DEVICE_UNLINK, PROTO_PRESENCE_SUB, PROTO_PRESENCE_SETTINGS
};

/* Error codes of PROTOCOL.md; proto_code_name() gives the wire string. */
enum proto_code {
    PROTO_BAD_REQUEST = 1, PROTO_UNAUTHORIZED, PROTO_FORBIDDEN, PROTO_NOT_FOUND,
    PROTO_TOO_LARGE, PROTO_RATE_LIMITED, PROTO_GROUP_FULL, PROTO_UNAVAILABLE,
    PROTO_INTERNAL
};

typedef struct proto_cmd {
    enum proto_type type;
    char id[65];              /* client id; "" when absent or unusable */
    const char *to;           /* send: user, or NULL */
    const char *group;        /* send/group_*: group id, or NULL */
    const char *body;         /* send: UTF-8 body or NULL */
    size_t body_len;
    const char *media;        /* send: media id or NULL */
    int forwarded;
    const char *name;         /* group_create */
    const char *device;       /* device_unlink: the device id */
    size_t nids;
    size_t nmembers;
    int composing;            /* typing: 1 composing, 0 paused */
    int hide_last_seen;       /* presence_settings: 1, 0, or -1 (absent: read it) */
    void *root;               /* owns every string of the command (a json_t) */
    /* Last: proto_parse zeroes what comes before them (10 KiB of slots it
     * would otherwise clear for every command); only [0, n) are set. */
    const char *ids[PROTO_MAX_IDS];          /* ack/read: event ids; presence_sub: user ids */
    const char *members[PROTO_MAX_MEMBERS];  /* group_create/add/remove */
} proto_cmd;

typedef struct proto_limits {
    size_t max_body_bytes;
    size_t max_presence_sub;  /* users in one presence_sub (<= PROTO_MAX_IDS; 0: that) */
} proto_limits;

/* Parses one text frame. PX_OK: cmd filled, free with proto_cmd_free.
 * PX_DECLINED: *code and msg say why; cmd->id holds the client id if one
 * could be read (for the error's ref); nothing to free. */
int proto_parse(const char *buf, size_t len, const proto_limits *lim,
                proto_cmd *cmd, enum proto_code *code, char *msg, size_t msglen);
void proto_cmd_free(proto_cmd *cmd);

const char *proto_code_name(enum proto_code code);

/* Renderers return a malloc'd NUL-terminated JSON text; *len gets its size. */
char *proto_render_error(const char *ref, enum proto_code code, const char *msg, size_t *len);
char *proto_render_sent(const char *ref, const char *msg_id, int64_t ts, size_t *len);
char *proto_render_pong(const char *ref, size_t *len);
char *proto_render_synced(size_t *len);

typedef struct proto_message {
    const char *id, *from, *to, *group, *body;
    const char *media_json;   /* rendered media object, or NULL */
    int forwarded;
    int64_t ts;
} proto_message;
char *proto_render_message(const proto_message *m, size_t *len);

/* The answer to a group command:
 * {"type":"group","ref","group":{"id","name","members","admins","invited"}}. */
typedef struct proto_group {
    const char *id, *name;
    const char *const *members;
    size_t nmembers;
    const char *const *admins;
    size_t nadmins;
    const char *const *invited;
    size_t ninvited;
} proto_group;
char *proto_render_group(const char *ref, const proto_group *g, size_t *len);

/* {"type":"group_event","id","group","event","actor","members","ts"};
 * event is "created", "invited", "joined", "declined", "removed" or "left". */
typedef struct proto_group_event {
    const char *id, *group, *event, *actor;
    const char *const *members;
    size_t nmembers;
    int64_t ts;
} proto_group_event;
char *proto_render_group_event(const proto_group_event *e, size_t *len);

/* {"type":"receipt","id","msg_id","status","by","ts"} plus "group" when
 * group is non-NULL and non-empty. status is "delivered" or "read". */
typedef struct proto_receipt {
    const char *id, *msg_id, *status, *by, *group;
    int64_t ts;
} proto_receipt;
char *proto_render_receipt(const proto_receipt *r, size_t *len);

/* How long a client shows "typing..." after a `typing` event unless another
 * comes (the event says so in ttl_ms): a lost `paused` costs only this. */
#define PROTO_TYPING_TTL_MS 6000

/* {"type":"typing","from","to" or "group","state","ttl_ms","ts"}: from is
 * typing (state "composing") or stopped ("paused") in the 1:1 chat with to,
 * or in group. */
char *proto_render_typing(const char *from, const char *to, const char *group, int composing,
                          int64_t ts, size_t *len);

/* {"type":"devices","ref","devices":[{"id","first_seen","last_seen",
 * "online","current"}]}: the user's linked devices (issue 17). */
typedef struct proto_device {
    const char *id;
    int64_t first_seen, last_seen;   /* ms */
    int online, current;
} proto_device;
char *proto_render_devices(const char *ref, const proto_device *d, size_t n, size_t *len);
/* {"type":"device_unlinked","ref","device"} */
char *proto_render_device_unlinked(const char *ref, const char *device, size_t *len);

/* {"type":"presence","user","online","last_seen"} (issue 18): last_seen
 * in ms, 0 when unknown or hidden. */
char *proto_render_presence(const char *user, int online, int64_t last_seen, size_t *len);
/* {"type":"presence_settings","ref","hide_last_seen"} */
char *proto_render_presence_settings(const char *ref, int hide_last_seen, size_t *len);

/* {"type":"read_state","id","ids":[...],"ts"}: the user read ids on another
 * of its devices (issue 17). */
char *proto_render_read_state(const char *id, const char *const *ids, size_t n, int64_t ts,
                              size_t *len);

#endif
