/* Owns the admin HTTP daemon: address parsing, the three probe/scrape
 * routes and the daemon's lifetime. Responses are tiny and computed on the
 * MHD thread; nothing here blocks except the service's ready callback. */
#include "admin_http.h"
#include "common.h"
#include "config.h"
#include "log.h"
#include "metrics.h"

#include <microhttpd.h>
#include <netdb.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#define ADMIN_CONN_LIMIT 64    /* probes and scrapes, never client traffic */
#define ADMIN_CONN_TIMEOUT_S 10

struct admin {
    struct MHD_Daemon *mhd;    /* NULL when disabled */
    admin_ready_cb ready;
    void *arg;
    unsigned port;
    struct sockaddr_storage addr;
};

const char *admin_listen_config(void)
{
    return config_str(ADMIN_LISTEN_ENV, ADMIN_LISTEN_DEFAULT);
}

/* "host:port", "[v6]:port" or ":port" into a socket address. */
static int admin_resolve(const char *listen, struct sockaddr_storage *ss, char *err, size_t errlen)
{
    const char *colon = strrchr(listen, ':');
    if (colon == NULL || colon[1] == '\0' || strspn(colon + 1, "0123456789") != strlen(colon + 1) ||
        strlen(colon + 1) > 5 || atoi(colon + 1) > 65535)
        return px_err(err, errlen, "%s=\"%s\" is not host:port", ADMIN_LISTEN_ENV, listen);
    char host[256];
    const char *h = listen;
    size_t hlen = (size_t)(colon - listen);
    if (hlen >= 2 && h[0] == '[' && h[hlen - 1] == ']') {
        h++;
        hlen -= 2;
    }
    if (hlen >= sizeof(host))
        return px_err(err, errlen, "%s=\"%s\": host too long", ADMIN_LISTEN_ENV, listen);
    snprintf(host, sizeof(host), "%.*s", (int)hlen, h);

    struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                              .ai_flags = AI_PASSIVE | AI_NUMERICSERV };
    struct addrinfo *res = NULL;
    int rc = getaddrinfo(hlen > 0 ? host : "0.0.0.0", colon + 1, &hints, &res);
    if (rc != 0)
        return px_err(err, errlen, "%s=\"%s\": %s", ADMIN_LISTEN_ENV, listen, gai_strerror(rc));
    memset(ss, 0, sizeof(*ss));
    memcpy(ss, res->ai_addr, PX_MIN((size_t)res->ai_addrlen, sizeof(*ss)));
    freeaddrinfo(res);
    return PX_OK;
}

static int admin_disabled(const char *listen)
{
    return strcmp(listen, "-") == 0 || strcmp(listen, "off") == 0;
}

int admin_check_listen(const char *listen, char *err, size_t errlen)
{
    struct sockaddr_storage ss;
    if (listen == NULL || admin_disabled(listen))
        return PX_OK;
    return admin_resolve(listen, &ss, err, errlen);
}

static enum MHD_Result admin_reply(struct MHD_Connection *mc, unsigned status, const char *type,
                                   char *body, size_t len, enum MHD_ResponseMemoryMode mode)
{
    struct MHD_Response *r = MHD_create_response_from_buffer(len, body, mode);
    if (r == NULL) {
        if (mode == MHD_RESPMEM_MUST_FREE)
            free(body);
        return MHD_NO;
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, type);
    MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
    if (status == MHD_HTTP_METHOD_NOT_ALLOWED)
        MHD_add_response_header(r, MHD_HTTP_HEADER_ALLOW, "GET, HEAD");
    enum MHD_Result ret = MHD_queue_response(mc, status, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result admin_text(struct MHD_Connection *mc, unsigned status, const char *text)
{
    return admin_reply(mc, status, "text/plain; charset=utf-8", (char *)text, strlen(text),
                       MHD_RESPMEM_PERSISTENT);
}

static enum MHD_Result admin_readyz(admin *a, struct MHD_Connection *mc)
{
    char why[PX_ERRLEN] = "not ready";
    if (a->ready == NULL || a->ready(a->arg, why, sizeof(why)) == PX_OK)
        return admin_text(mc, MHD_HTTP_OK, "ok\n");
    size_t n = strlen(why);
    char *body = px_malloc(n + 2);
    memcpy(body, why, n);
    body[n] = '\n';
    body[n + 1] = '\0';
    return admin_reply(mc, MHD_HTTP_SERVICE_UNAVAILABLE, "text/plain; charset=utf-8", body,
                       n + 1, MHD_RESPMEM_MUST_FREE);
}

static enum MHD_Result admin_metrics(struct MHD_Connection *mc)
{
    size_t len = 0;
    char *body = metrics_render(&len);
    return admin_reply(mc, MHD_HTTP_OK, "text/plain; version=0.0.4; charset=utf-8", body, len,
                       MHD_RESPMEM_MUST_FREE);
}

static enum MHD_Result admin_route(admin *a, struct MHD_Connection *mc, const char *url,
                                   const char *method)
{
    int known = strcmp(url, "/healthz") == 0 || strcmp(url, "/readyz") == 0 ||
                strcmp(url, "/metrics") == 0;
    if (!known)
        return admin_text(mc, MHD_HTTP_NOT_FOUND, "not found\n");
    if (strcmp(method, MHD_HTTP_METHOD_GET) != 0 && strcmp(method, MHD_HTTP_METHOD_HEAD) != 0)
        return admin_text(mc, MHD_HTTP_METHOD_NOT_ALLOWED, "method not allowed\n");
    if (strcmp(url, "/healthz") == 0)
        return admin_text(mc, MHD_HTTP_OK, "ok\n");
    if (strcmp(url, "/readyz") == 0)
        return admin_readyz(a, mc);
    return admin_metrics(mc);
}

static enum MHD_Result admin_access(void *cls, struct MHD_Connection *mc, const char *url,
                                    const char *method, const char *version,
                                    const char *upload_data, size_t *upload_data_size,
                                    void **con_cls)
{
    static int admin_seen;
    /* The first call only announces the request; answering then would leave
     * a request body (unexpected on these routes) unread on the socket. */
    if (*con_cls == NULL) {
        *con_cls = &admin_seen;
        return MHD_YES;
    }
    if (*upload_data_size != 0) {
        *upload_data_size = 0;
        return MHD_YES;
    }
    return admin_route(cls, mc, url, method);
}

static void admin_mhd_log(void *cls, const char *fmt, va_list ap)
{
    char line[512];
    vsnprintf(line, sizeof(line), fmt, ap);
    line[strcspn(line, "\n")] = '\0';
    log_warn("admin http", "{s:s}", "error", line);
}

admin *admin_start(const char *listen, admin_ready_cb ready, void *arg,
                   char *err, size_t errlen)
{
    int ok = 0;
    admin *a = px_calloc(1, sizeof(*a));
    a->ready = ready;
    a->arg = arg;
    if (listen == NULL)
        listen = admin_listen_config();
    if (admin_disabled(listen)) {
        ok = 1;
        goto out;
    }
    if (admin_resolve(listen, &a->addr, err, errlen) != PX_OK)
        goto out;
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL | MHD_USE_ERROR_LOG;
    if (a->addr.ss_family == AF_INET6)
        flags |= MHD_USE_IPv6;
    /* The logger must come first or MHD logs its own way until it sees it. */
    a->mhd = MHD_start_daemon(flags, 0, NULL, NULL, admin_access, a,
                              MHD_OPTION_EXTERNAL_LOGGER, admin_mhd_log, NULL,
                              MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&a->addr,
                              MHD_OPTION_CONNECTION_LIMIT, (unsigned)ADMIN_CONN_LIMIT,
                              MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)ADMIN_CONN_TIMEOUT_S,
                              MHD_OPTION_END);
    if (a->mhd == NULL) {
        px_err(err, errlen, "PARLEY_ADMIN_LISTEN=%s: admin HTTP could not listen (address "
               "in use?)", listen);
        goto out;
    }
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(a->mhd, MHD_DAEMON_INFO_BIND_PORT);
    a->port = di != NULL ? di->port : 0;
    ok = 1;
out:
    if (!ok) {
        free(a);
        a = NULL;
    }
    return a;
}

unsigned admin_port(const admin *a)
{
    return a != NULL ? a->port : 0;
}

void admin_stop(admin *a)
{
    if (a == NULL)
        return;
    if (a->mhd != NULL)
        MHD_stop_daemon(a->mhd);
    free(a);
}
