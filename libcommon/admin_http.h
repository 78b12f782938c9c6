/* The admin HTTP endpoint every Parley service exposes for Kubernetes and
 * Prometheus: GET /healthz, GET /readyz, GET /metrics. A small
 * libmicrohttpd daemon on its own thread (internal polling, epoll), separate
 * from any client-facing listener so probes and scrapes never queue behind
 * client traffic. */
#ifndef PARLEY_ADMIN_HTTP_H
#define PARLEY_ADMIN_HTTP_H

#include <stddef.h>

#define ADMIN_LISTEN_ENV "PARLEY_ADMIN_LISTEN"
#define ADMIN_LISTEN_DEFAULT "0.0.0.0:9090"

typedef struct admin admin;

/* Readiness probe. Called on the admin thread, concurrently with the
 * service's own threads, so it must only use thread-safe calls (store_ping
 * is). PX_OK: ready. Anything else: not ready, with the reason in err. */
typedef int (*admin_ready_cb)(void *arg, char *err, size_t errlen);

/* The listen address configured in PARLEY_ADMIN_LISTEN, or the default. */
const char *admin_listen_config(void);

/* PX_OK when listen is an address admin_start could use, or "-"/"off";
 * else PX_ERROR naming PARLEY_ADMIN_LISTEN (for config-time checks, so a
 * bad value exits like any other bad setting). Does not bind. */
int admin_check_listen(const char *listen, char *err, size_t errlen);

/* Starts serving on listen ("host:port", "[v6addr]:port", ":port" for every
 * interface; port 0 picks a free port, see admin_port):
 *   GET /healthz  200 "ok"                   (the process answers)
 *   GET /readyz   200 "ok" when ready(arg) returns PX_OK, else 503 + reason;
 *                 200 when ready is NULL
 *   GET /metrics  metrics_render(), text/plain; version=0.0.4
 *   HEAD works like GET; another method on these paths is 405; any other
 *   path is 404.
 * listen "-" or "off" disables the endpoint: a handle is still returned (so
 * NULL always means an error) and admin_port() is 0.
 * Returns NULL with err on a bad address or a failed bind. */
admin *admin_start(const char *listen, admin_ready_cb ready, void *arg,
                   char *err, size_t errlen);

/* The bound TCP port, 0 when disabled. */
unsigned admin_port(const admin *a);

/* Stops the daemon (waits for requests in flight, hence for a running
 * ready callback) and frees a. After it returns, ready is never called
 * again. NULL is allowed. */
void admin_stop(admin *a);

#endif
