/* The gateway: terminates client WebSockets, turns commands into Kafka
 * records, and pushes the deliveries of its own topic to the connections it
 * holds. Start-up order: config, bus, workers, Kafka threads, then HTTP;
 * shutdown reverses it so nothing accepted is dropped on the floor. */
#include "common.h"
#include "config.h"
#include "gateway.h"
#include "lifecycle.h"
#include "log.h"

#include <signal.h>
#include <sys/resource.h>
#include <stdio.h>
#include <stdlib.h>
#include <errno.h>
#include <string.h>
#include <unistd.h>

static void main_metrics(gw *g)
{
    static const double ms_buckets[] = { 1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 5000 };
    g->m.conns = metrics_gauge("parley_gateway_connections", "Open WebSocket connections");
    g->m.accepted = metrics_counter("parley_gateway_connections_accepted_total", "WebSocket upgrades accepted");
    g->m.refused_auth = metrics_counter("parley_gateway_auth_refused_total", "Upgrades refused with 401");
    g->m.closed = metrics_counter("parley_gateway_connections_closed_total", "WebSocket connections closed");
    g->m.slow_closed = metrics_counter("parley_gateway_slow_client_closed_total", "Connections closed for a full send queue");
    g->m.dups_dropped = metrics_counter("parley_gateway_duplicates_dropped_total", "Inbox events not written to a connection because it had them already (a held live push its sync carried, a push repeated after a message-store takeover)");
    g->m.held_dropped = metrics_counter("parley_gateway_sync_held_overflow_total", "Syncs whose held live pushes passed the ceiling and were left to the sync");
    g->m.parked = metrics_counter("parley_gateway_ws_parked_total", "WebSocket contexts freed on quiet connections");
    g->m.unparked = metrics_counter("parley_gateway_ws_unparked_total", "WebSocket contexts made again for parked connections");
    g->m.park_deferred = metrics_counter("parley_gateway_ws_park_deferred_total", "Quiet connections left unparked: a frame or a fragmented message was cut");
    for (size_t k = 0; k < GW_RATE_N; k++) {
        char name[96];
        snprintf(name, sizeof(name), "parley_gateway_rate_limited_total{kind=\"%s\"}",
                 gw_rate_names[k]);
        g->m.rate_limited[k] = metrics_counter(name, "Commands refused with rate_limited, by kind");
    }
    g->m.user_conns_refused = metrics_counter("parley_gateway_user_conns_refused_total", "Upgrades refused with 429: the user holds PARLEY_USER_CONNS connections here");
    g->m.devices_refused = metrics_counter("parley_gateway_devices_refused_total", "Upgrades refused with 403: a new device past PARLEY_MAX_DEVICES, or an unlinked device");
    g->m.frag_closed = metrics_counter("parley_gateway_fragments_closed_total", "Connections closed 1009: a message in more than PARLEY_MAX_FRAGMENTS frames");
    g->m.max_conns = metrics_gauge("parley_gateway_max_connections", "PARLEY_MAX_CONNS in force (lowered to fit RLIMIT_NOFILE)");
    g->m.frames_in = metrics_counter("parley_gateway_frames_received_total", "Text frames received");
    g->m.sent_ok = metrics_counter("parley_gateway_sends_stored_total", "Sends acknowledged by Kafka");
    g->m.sent_fail = metrics_counter("parley_gateway_sends_failed_total", "Sends Kafka did not accept");
    g->m.delivered = metrics_counter("parley_gateway_events_pushed_total", "Events pushed to connections");
    g->m.dropped = metrics_counter("parley_gateway_events_dropped_total", "Events for connections already gone");
    g->m.errors = metrics_counter("parley_gateway_command_errors_total", "Commands answered with an error");
    g->m.media_stored = metrics_counter("parley_gateway_media_bytes_stored_total", "Media bytes stored (new content)");
    g->m.media_deduped = metrics_counter("parley_gateway_media_bytes_deduplicated_total", "Media bytes uploaded but already stored");
    g->m.media_uploads = metrics_counter("parley_gateway_media_uploads_total", "Media uploads committed");
    g->m.media_downloads = metrics_counter("parley_gateway_media_downloads_total", "Media downloads started");
    g->m.media_bytes_out = metrics_counter("parley_gateway_media_bytes_served_total", "Media bytes sent to downloaders");
    g->m.media_refused = metrics_counter("parley_gateway_media_too_large_total", "Uploads refused with 413");
    g->m.send_latency = metrics_histogram("parley_gateway_send_ack_ms", "Send to Kafka acknowledgement, ms",
                                          ms_buckets, PX_ARRAY_LEN(ms_buckets));
}

/* Every connection is a socket; MHD, epoll, eventfds, Kafka, the store
 * (and parleyd's other services) need more besides. */
#define MAIN_FD_RESERVE 256

/* At the file-descriptor limit accept() fails over and over (MHD then spins
 * and logs each failure): make PARLEY_MAX_CONNS fit RLIMIT_NOFILE, raising
 * the soft limit as far as the hard one allows, else lowering the cap. */
static int main_fd_limit(gw *g, char *err, size_t errlen)
{
    struct rlimit rl;
    rlim_t need = (rlim_t)g->cfg.max_conns + MAIN_FD_RESERVE;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
        return px_err(err, errlen, "getrlimit(RLIMIT_NOFILE): %s", strerror(errno));
    if (rl.rlim_cur < need && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = PX_MIN(need, rl.rlim_max);
        if (setrlimit(RLIMIT_NOFILE, &rl) != 0)
            getrlimit(RLIMIT_NOFILE, &rl);
    }
    if (rl.rlim_cur < need) {
        if (rl.rlim_cur < 2 * MAIN_FD_RESERVE)
            return px_err(err, errlen, "RLIMIT_NOFILE is %ld: too few files for any connection "
                          "(PARLEY_MAX_CONNS=%ld needs %ld)", (long)rl.rlim_cur,
                          g->cfg.max_conns, (long)need);
        /* Only a cap someone asked for is worth a warning: the default is
         * lowered on every box with the common 20,000-file limit. */
        log_write(getenv("PARLEY_MAX_CONNS") != NULL ? LOG_WARN : LOG_INFO,
                  "PARLEY_MAX_CONNS lowered to fit RLIMIT_NOFILE", "{s:i, s:i, s:i}",
                  "max_conns", (int)g->cfg.max_conns, "nofile", (int)rl.rlim_cur, "lowered_to",
                  (int)(rl.rlim_cur - MAIN_FD_RESERVE));
        g->cfg.max_conns = (long)(rl.rlim_cur - MAIN_FD_RESERVE);
    }
    metric_set(g->m.max_conns, g->cfg.max_conns);
    return PX_OK;
}

static int main_setup(gw *g, char *err, size_t errlen)
{
    if (config_load(&g->cfg, err, errlen) != PX_OK)
        return PX_ERROR;
    log_init("gateway", g->cfg.log_level);
    g->secret = g->cfg.jwt_secret;
    if (g->secret == NULL && g->cfg.dev) {
        g->secret = "parley-dev-secret";
        log_warn("PARLEY_DEV=1 and no PARLEY_JWT_SECRET: using the public dev secret", NULL);
    }
    if (g->secret == NULL && g->cfg.jwt_jwks_file == NULL)
        return px_err(err, errlen,
                      "PARLEY_JWT_SECRET or PARLEY_JWT_JWKS_FILE is required (or PARLEY_DEV=1)");
    auth_opts ao = { g->secret, g->cfg.jwt_jwks_file, g->cfg.jwt_issuer, g->cfg.jwt_audience,
                     g->cfg.jwt_leeway_s, g->cfg.token_max_ttl_s };
    if ((g->auth = auth_new(&ao, err, errlen)) == NULL)
        return PX_ERROR;
    if (g->cfg.metrics_listen != NULL &&
        admin_check_listen(g->cfg.metrics_listen, err, errlen) != PX_OK)
        return PX_ERROR;
    g->epoch = px_now_ms();
    const char *p = g->cfg.topic_prefix;
    snprintf(g->topic_inbox, sizeof(g->topic_inbox), "%sinbox", p);
    snprintf(g->topic_acks, sizeof(g->topic_acks), "%sacks", p);
    snprintf(g->topic_presence, sizeof(g->topic_presence), "%spresence", p);
    snprintf(g->topic_groups, sizeof(g->topic_groups), "%sgroups", p);
    snprintf(g->topic_deliver, sizeof(g->topic_deliver), "%sgw.%s", p, g->cfg.gateway_id);
    g->listen_fd = -1;
    main_metrics(g);
    return main_fd_limit(g, err, errlen);
}

static int main_start(gw *g, char *err, size_t errlen)
{
    char group[128], client[128];
    snprintf(group, sizeof(group), "%sgateway-%s", g->cfg.topic_prefix, g->cfg.gateway_id);
    snprintf(client, sizeof(client), "gateway-%s", g->cfg.gateway_id);
    if (http_bind(g, err, errlen) != PX_OK)
        return PX_ERROR;
    /* /metrics (with /healthz, /readyz) on an address of its own, off the
     * public port, when asked for. */
    if (g->cfg.metrics_listen != NULL &&
        (g->metrics = admin_start(g->cfg.metrics_listen, http_readiness, g, err, errlen)) == NULL)
        return px_err(err, errlen, "PARLEY_METRICS_LISTEN=%s: cannot listen there (in use?)",
                      g->cfg.metrics_listen);
    bus_conf bc = { .brokers = g->cfg.kafka_brokers, .client_id = client, .group = group,
                    .partitions = (int)g->cfg.partitions, .dr_cb = commands_on_delivery,
                    .bulk_topic = g->topic_acks };
    g->b = bus_new(&bc, err, errlen);
    if (g->b == NULL)
        return PX_ERROR;
    const char *topics[] = { g->topic_inbox, g->topic_acks, g->topic_presence,
                             g->topic_groups, g->topic_deliver };
    if (bus_ensure_topics(g->b, topics, PX_ARRAY_LEN(topics), 15000, err, errlen) != PX_OK)
        return PX_ERROR;
    if (media_start(g, err, errlen) != PX_OK)
        return PX_ERROR;
    double rate[GW_RATE_N], burst[GW_RATE_N];
    for (size_t k = 0; k < GW_RATE_N; k++) {
        rate[k] = (double)(k == GW_RATE_SEND ? g->cfg.send_rate : g->cfg.cmd_rate);
        burst[k] = (double)(k == GW_RATE_SEND ? g->cfg.send_burst : g->cfg.cmd_burst);
    }
    g->reg = registry_new(rate, burst);
    g->watch = watch_new();
    g->nworkers = (size_t)g->cfg.workers;
    g->workers = px_calloc(g->nworkers, sizeof(*g->workers));
    for (size_t i = 0; i < g->nworkers; i++) {
        g->workers[i] = worker_new(g, (int)i, err, errlen);
        if (g->workers[i] == NULL || worker_start(g->workers[i]) != PX_OK)
            return PX_ERROR;
    }
    if (deliver_start(g, err, errlen) != PX_OK)
        return PX_ERROR;
    return http_start(g, err, errlen);
}

static void main_shutdown(gw *g)
{
    http_quiesce(g);
    for (size_t i = 0; g->workers != NULL && i < g->nworkers; i++)
        if (g->workers[i] != NULL)
            worker_stop(g->workers[i]);
    http_stop(g);
    admin_stop(g->metrics);
    g->stopping = 1;
    media_stop(g);
    deliver_stop(g);
    if (g->b != NULL)
        bus_destroy(g->b);
    for (size_t i = 0; g->workers != NULL && i < g->nworkers; i++)
        worker_free(g->workers[i]);
    free(g->workers);
    registry_free(g->reg);
    watch_free(g->watch);
    auth_free(g->auth);
}

int main(void)
{
    static gw g;
    char err[PX_ERRLEN];
    if (lifecycle_init(NULL, NULL) != PX_OK)
        return 1;
    if (main_setup(&g, err, sizeof(err)) != PX_OK) {
        log_init("gateway", "info");
        log_error("bad configuration", "{s:s}", "error", err);
        return 2;
    }
    int rc = 0;
    if (main_start(&g, err, sizeof(err)) != PX_OK) {
        log_error("start failed", "{s:s}", "error", err);
        rc = 1;
        goto out;
    }
    char bus_at[512], store_at[600];
    bus_where(g.cfg.kafka_brokers, bus_at, sizeof(bus_at));
    store_where(g.cfg.mongo_uri, g.cfg.mongo_db, store_at, sizeof(store_at));
    log_info("started", "{s:s, s:b, s:s, s:s, s:s, s:i}", "listen", g.cfg.listen,
             "listen_shared", g.cfg.listen_shared, "gateway_id", g.cfg.gateway_id, "bus",
             bus_at, "store", store_at, "workers", (int)g.cfg.workers);
    int sig = lifecycle_wait();
    log_info("stopping", "{s:i}", "signal", sig);
    rc = g.failed ? 1 : 0;
out:
    main_shutdown(&g);
    log_info("stopped", NULL);
    return rc;
}
