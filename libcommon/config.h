/* Configuration from PARLEY_* environment variables: one table, defaults,
 * range checks and a clear error naming the variable for a bad value. */
#ifndef PARLEY_CONFIG_H
#define PARLEY_CONFIG_H

#include <stddef.h>

typedef struct config {
    const char *listen;          /* PARLEY_LISTEN host:port */
    const char *kafka_brokers;   /* PARLEY_KAFKA_BROKERS */
    const char *mongo_uri;       /* PARLEY_MONGO_URI */
    const char *mongo_db;        /* PARLEY_MONGO_DB */
    const char *jwt_secret;      /* PARLEY_JWT_SECRET: HS256 key, or NULL */
    const char *jwt_jwks_file;   /* PARLEY_JWT_JWKS_FILE: RS256/ES256/EdDSA keys,
                                    re-read when it changes; or NULL */
    const char *jwt_issuer;      /* PARLEY_JWT_ISSUER: required iss, or NULL */
    const char *jwt_audience;    /* PARLEY_JWT_AUDIENCE: required aud, or NULL */
    const char *gateway_id;      /* PARLEY_GATEWAY_ID: stable, e.g. pod ordinal */
    const char *topic_prefix;    /* PARLEY_TOPIC_PREFIX, default "parley." */
    const char *log_level;       /* PARLEY_LOG_LEVEL debug|info|warn|error */
    const char *allowed_origins; /* PARLEY_ALLOWED_ORIGINS: comma list, or NULL: any */
    const char *metrics_listen;  /* PARLEY_METRICS_LISTEN: the gateway's /metrics
                                    there instead of the client port; NULL: there */
    long max_frame_bytes;        /* PARLEY_MAX_FRAME_BYTES */
    long max_body_bytes;         /* PARLEY_MAX_BODY_BYTES */
    long max_media_bytes;        /* PARLEY_MAX_MEDIA_BYTES */
    long jwt_leeway_s;           /* PARLEY_JWT_LEEWAY_S: clock skew allowed for
                                    exp, nbf and iat */
    long token_max_ttl_s;        /* PARLEY_TOKEN_MAX_TTL_S: a token whose exp is
                                    further ahead is refused */
    long media_user_slots;       /* PARLEY_MEDIA_USER_SLOTS: uploads, and downloads,
                                    one user may run at once per gateway */
    long media_min_rate;         /* PARLEY_MEDIA_MIN_RATE: bytes/s an upload must
                                    average after its first 10 s (0: off) */
    long max_fragments;          /* PARLEY_MAX_FRAGMENTS frames per message */
    long max_conns;              /* PARLEY_MAX_CONNS per gateway */
    long send_queue_bytes;       /* PARLEY_SEND_QUEUE_BYTES per connection */
    long retention_days;         /* PARLEY_RETENTION_DAYS */
    long presence_ttl_ms;        /* PARLEY_PRESENCE_CACHE_MS lookup cache TTL */
    long presence_online_ttl_ms; /* PARLEY_PRESENCE_ONLINE_CACHE_MS: the same, user online */
    long heartbeat_ms;           /* PARLEY_HEARTBEAT_MS gateway liveness beat */
    long ping_ms;                /* PARLEY_PING_MS server ping interval */
    long idle_ms;                /* PARLEY_IDLE_MS close after this silence */
    long workers;                /* PARLEY_WORKERS gateway epoll threads */
    long partitions;             /* PARLEY_PARTITIONS for user-keyed topics */
    long sweep_ms;               /* PARLEY_SWEEP_MS retention sweep period */
    long msgstore_hold_ms;       /* PARLEY_MSGSTORE_HOLD_MS: pushed events wait this
                                    long for their store round, so an ack can
                                    settle them before it (300) */
    long msgstore_pipeline;      /* PARLEY_MSGSTORE_PIPELINE: records pushed and
                                    not yet stored, at most (8192; parleyd
                                    65536) */
    long send_rate;              /* PARLEY_SEND_RATE sends/s per user */
    long send_burst;             /* PARLEY_SEND_BURST sends above the rate */
    long cmd_rate;               /* PARLEY_CMD_RATE: acks, reads, group commands,
                                    pings per second per user, each kind its own */
    long cmd_burst;              /* PARLEY_CMD_BURST: each of those above the rate */
    long user_conns;             /* PARLEY_USER_CONNS per user per gateway */
    long presence_sub_max;       /* PARLEY_PRESENCE_SUB_MAX users one connection
                                    watches (<= PROTO_MAX_IDS) */
    long max_devices;            /* PARLEY_MAX_DEVICES linked per user (<= 16,
                                    STORE_ACKED_MAX) */
    long http_head_timeout_s;    /* PARLEY_HTTP_HEAD_TIMEOUT_S: a request head not
                                    complete this long after connect is dropped */
    long http_per_address;       /* PARLEY_HTTP_PER_ADDRESS: connections from one
                                    source address still sending their head (a
                                    burst of honest handshakes counts too) */
    long http_timeout_s;         /* PARLEY_HTTP_TIMEOUT_S: an HTTP request (e.g. an
                                    upload) silent this long is dropped */
    long ws_park_ms;             /* PARLEY_WS_PARK_MS: a connection quiet this
                                    long gives back its WebSocket context */
    /* Push notifications for offline devices (issue 18, services/push/):
     * message-store produces push records only when push_url is set. */
    const char *push_url;        /* PARLEY_PUSH_URL: the webhook, or NULL: off */
    const char *push_secret;     /* PARLEY_PUSH_SECRET: the signature's HMAC key */
    long push_coalesce_ms;       /* PARLEY_PUSH_COALESCE_MS: a burst to one user
                                    within this is one call per device */
    long push_retry_s;           /* PARLEY_PUSH_RETRY_S: failed calls are retried
                                    until the burst is this old, then dropped */
    long push_timeout_ms;        /* PARLEY_PUSH_TIMEOUT_MS: one call's limit */
    long push_concurrency;       /* PARLEY_PUSH_CONCURRENCY: calls in flight */
    int push_preview;            /* PARLEY_PUSH_PREVIEW=1: the body's start is
                                    in the payload (off: no message text) */
    int dev;                     /* PARLEY_DEV=1 enables dev token endpoint */
    int listen_shared;           /* PARLEY_LISTEN_SHARED=1: gateways may share
                                    PARLEY_LISTEN (SO_REUSEPORT); else a port
                                    in use is an error at start */
} config;

/* Fills cfg from the environment. The strings point into the environment
 * (or static defaults) and live as long as the process. Returns PX_OK, or
 * PX_ERROR with err naming the variable and the accepted range. */
int config_load(config *cfg, char *err, size_t errlen);

/* Single-variable readers, used by config_load and by tools. */
const char *config_str(const char *name, const char *def);
int config_long(const char *name, long def, long min, long max, long *out,
                char *err, size_t errlen);
int config_bool(const char *name, int def, int *out, char *err, size_t errlen);

#endif
