/* Reads PARLEY_* variables; a value that does not parse or is out of range is
 * an error at start-up, never silently replaced by the default. */
#include "config.h"
#include "common.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

const char *config_str(const char *name, const char *def)
{
    const char *v = getenv(name);
    return (v != NULL && *v != '\0') ? v : def;
}

int config_long(const char *name, long def, long min, long max, long *out,
                char *err, size_t errlen)
{
    const char *v = getenv(name);
    if (v == NULL || *v == '\0') {
        *out = def;
        return PX_OK;
    }
    errno = 0;
    char *end = NULL;
    long n = strtol(v, &end, 10);
    if (errno != 0 || end == v || *end != '\0')
        return px_err(err, errlen, "%s=\"%s\" is not an integer", name, v);
    if (n < min || n > max)
        return px_err(err, errlen, "%s=%ld is out of range [%ld, %ld]", name, n, min, max);
    *out = n;
    return PX_OK;
}

int config_bool(const char *name, int def, int *out, char *err, size_t errlen)
{
    const char *v = getenv(name);
    if (v == NULL || *v == '\0') {
        *out = def;
        return PX_OK;
    }
    if (strcmp(v, "1") == 0 || strcmp(v, "true") == 0 || strcmp(v, "yes") == 0) {
        *out = 1;
        return PX_OK;
    }
    if (strcmp(v, "0") == 0 || strcmp(v, "false") == 0 || strcmp(v, "no") == 0) {
        *out = 0;
        return PX_OK;
    }
    return px_err(err, errlen, "%s=\"%s\" is not a boolean (1/0/true/false/yes/no)", name, v);
}

struct config_num {
    const char *name;
    long def, min, max;
    size_t off;
};

#define NUM(n, f, d, lo, hi) { n, d, lo, hi, offsetof(config, f) }
static const struct config_num config_nums[] = {
    NUM("PARLEY_MAX_FRAME_BYTES", max_frame_bytes, 131072, 1024, 16 << 20),
    NUM("PARLEY_MAX_BODY_BYTES", max_body_bytes, 65536, 1, 1 << 20),
    NUM("PARLEY_MAX_MEDIA_BYTES", max_media_bytes, 16L << 20, 1, 1L << 30),
    NUM("PARLEY_MAX_CONNS", max_conns, 20000, 1, 1000000),
    NUM("PARLEY_SEND_QUEUE_BYTES", send_queue_bytes, 1 << 20, 4096, 64 << 20),
    NUM("PARLEY_RETENTION_DAYS", retention_days, 30, 1, 3650),
    NUM("PARLEY_PRESENCE_CACHE_MS", presence_ttl_ms, 2000, 0, 600000),
    NUM("PARLEY_PRESENCE_ONLINE_CACHE_MS", presence_online_ttl_ms, 30000, 0, 600000),
    NUM("PARLEY_HEARTBEAT_MS", heartbeat_ms, 5000, 100, 600000),
    NUM("PARLEY_PING_MS", ping_ms, 30000, 100, 3600000),
    NUM("PARLEY_IDLE_MS", idle_ms, 90000, 200, 3600000),
    NUM("PARLEY_WORKERS", workers, 2, 1, 64),
    NUM("PARLEY_PARTITIONS", partitions, 8, 1, 1024),
    NUM("PARLEY_SWEEP_MS", sweep_ms, 60000, 100, 86400000),
    NUM("PARLEY_MSGSTORE_HOLD_MS", msgstore_hold_ms, 300, 0, 10000),
    NUM("PARLEY_MSGSTORE_PIPELINE", msgstore_pipeline, 8192, 512, 65536),
    NUM("PARLEY_SEND_RATE", send_rate, 200, 1, 1000000),
    NUM("PARLEY_SEND_BURST", send_burst, 1000, 1, 1000000),
    NUM("PARLEY_HTTP_TIMEOUT_S", http_timeout_s, 30, 1, 3600),
    NUM("PARLEY_WS_PARK_MS", ws_park_ms, 2000, 0, 3600000),
    NUM("PARLEY_JWT_LEEWAY_S", jwt_leeway_s, 60, 0, 600),
    NUM("PARLEY_TOKEN_MAX_TTL_S", token_max_ttl_s, 30L * 86400, 60, 10L * 366 * 86400),
    NUM("PARLEY_MEDIA_USER_SLOTS", media_user_slots, 4, 1, 1000000),
    NUM("PARLEY_MEDIA_MIN_RATE", media_min_rate, 1024, 0, 1L << 30),
    NUM("PARLEY_MAX_FRAGMENTS", max_fragments, 64, 1, 1000000),
    NUM("PARLEY_CMD_RATE", cmd_rate, 200, 1, 1000000),
    NUM("PARLEY_CMD_BURST", cmd_burst, 2000, 1, 1000000),
    NUM("PARLEY_USER_CONNS", user_conns, 16, 1, 1000000),
    NUM("PARLEY_PRESENCE_SUB_MAX", presence_sub_max, 256, 1, 1000),
    NUM("PARLEY_MAX_DEVICES", max_devices, 5, 1, 16),
    NUM("PARLEY_HTTP_HEAD_TIMEOUT_S", http_head_timeout_s, 10, 1, 3600),
    NUM("PARLEY_HTTP_PER_ADDRESS", http_per_address, 256, 1, 1000000),
    NUM("PARLEY_PUSH_COALESCE_MS", push_coalesce_ms, 1000, 0, 600000),
    NUM("PARLEY_PUSH_RETRY_S", push_retry_s, 600, 1, 7L * 86400),
    NUM("PARLEY_PUSH_TIMEOUT_MS", push_timeout_ms, 5000, 100, 120000),
    NUM("PARLEY_PUSH_CONCURRENCY", push_concurrency, 16, 1, 1024),
};
#undef NUM

int config_load(config *cfg, char *err, size_t errlen)
{
    memset(cfg, 0, sizeof(*cfg));
    cfg->listen = config_str("PARLEY_LISTEN", "0.0.0.0:8080");
    cfg->kafka_brokers = config_str("PARLEY_KAFKA_BROKERS", "127.0.0.1:19092");
    cfg->mongo_uri = config_str("PARLEY_MONGO_URI", "mongodb://127.0.0.1:27018/?retryWrites=false");
    cfg->mongo_db = config_str("PARLEY_MONGO_DB", "parley");
    cfg->jwt_secret = config_str("PARLEY_JWT_SECRET", NULL);
    cfg->jwt_jwks_file = config_str("PARLEY_JWT_JWKS_FILE", NULL);
    cfg->jwt_issuer = config_str("PARLEY_JWT_ISSUER", NULL);
    cfg->jwt_audience = config_str("PARLEY_JWT_AUDIENCE", NULL);
    cfg->gateway_id = config_str("PARLEY_GATEWAY_ID", "gw-0");
    cfg->topic_prefix = config_str("PARLEY_TOPIC_PREFIX", "parley.");
    cfg->log_level = config_str("PARLEY_LOG_LEVEL", "info");
    cfg->allowed_origins = config_str("PARLEY_ALLOWED_ORIGINS", NULL);
    cfg->metrics_listen = config_str("PARLEY_METRICS_LISTEN", NULL);
    cfg->push_url = config_str("PARLEY_PUSH_URL", NULL);
    cfg->push_secret = config_str("PARLEY_PUSH_SECRET", NULL);

    for (size_t i = 0; i < PX_ARRAY_LEN(config_nums); i++) {
        const struct config_num *n = &config_nums[i];
        long *dst = (long *)((char *)cfg + n->off);
        if (config_long(n->name, n->def, n->min, n->max, dst, err, errlen) != PX_OK)
            return PX_ERROR;
    }
    if (config_bool("PARLEY_DEV", 0, &cfg->dev, err, errlen) != PX_OK ||
        config_bool("PARLEY_LISTEN_SHARED", 0, &cfg->listen_shared, err, errlen) != PX_OK ||
        config_bool("PARLEY_PUSH_PREVIEW", 0, &cfg->push_preview, err, errlen) != PX_OK)
        return PX_ERROR;
    if (cfg->idle_ms <= cfg->ping_ms)
        return px_err(err, errlen, "PARLEY_IDLE_MS=%ld must exceed PARLEY_PING_MS=%ld",
                      cfg->idle_ms, cfg->ping_ms);
    if (strlen(cfg->gateway_id) > 64 || strspn(cfg->gateway_id,
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-") !=
            strlen(cfg->gateway_id))
        return px_err(err, errlen, "PARLEY_GATEWAY_ID=\"%s\" must be 1-64 of [A-Za-z0-9._-]",
                      cfg->gateway_id);
    return PX_OK;
}
