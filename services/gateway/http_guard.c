/* Owns the gateway's defence against slow request heads (slowloris):
 * libmicrohttpd's timeout counts silence only, so a client sending one
 * header byte every few seconds would hold a connection forever, and a
 * hundred of them would fill the connection limit (health probes and new
 * upgrades included). Every connection still sending its request head is
 * listed here with a deadline (PARLEY_HTTP_HEAD_TIMEOUT_S) and counted
 * under its source address (PARLEY_HTTP_PER_ADDRESS). A sweeper thread
 * shuts down the late ones and a connection over its address's count is
 * shut down at once; "shut down" is shutdown(2) on MHD's socket, after
 * which MHD reads EOF and closes and frees the connection itself (we never
 * close its fd). A connection leaves the list when its head is complete:
 * established WebSockets are capped per user instead (PARLEY_USER_CONNS),
 * since many honest users can share one address behind a NAT. */
#include "common.h"
#include "gateway.h"
#include "log.h"

#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define GUARD_BUCKETS 1024

/* One connection of MHD's (its socket_context) from accept to close. */
typedef struct guard_conn {
    struct guard_conn *prev, *next; /* in the pending list while listed */
    int listed;
    int fd;
    uint32_t addr;                  /* IPv4 source, network order; 0: other */
    int64_t deadline_ms;
} guard_conn;

/* Connections with an unfinished head from one source address. */
typedef struct guard_addr {
    struct guard_addr *next;
    uint32_t addr;
    uint32_t n;
} guard_addr;

struct http_guard {
    gw *g;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_t th;
    int stop;
    guard_conn *head, *tail;        /* oldest deadline first */
    guard_addr *buckets[GUARD_BUCKETS];
    metric *timed_out, *over_address;
};

static log_tally guard_timeout_tally = LOG_TALLY_INIT("request heads too slow: connections dropped");
static log_tally guard_address_tally = LOG_TALLY_INIT("too many unfinished request heads from one address: connections refused");

static guard_addr **guard_addr_slot(http_guard *hg, uint32_t addr)
{
    guard_addr **pp = &hg->buckets[(addr * 2654435761u) % GUARD_BUCKETS];
    while (*pp != NULL && (*pp)->addr != addr)
        pp = &(*pp)->next;
    return pp;
}

/* Lists gc with a fresh deadline; returns its address's new count. */
static uint32_t guard_list(http_guard *hg, guard_conn *gc)
{
    gc->deadline_ms = px_mono_ms() + hg->g->cfg.http_head_timeout_s * 1000;
    gc->prev = hg->tail;
    gc->next = NULL;
    if (hg->tail != NULL)
        hg->tail->next = gc;
    else
        hg->head = gc;
    hg->tail = gc;
    gc->listed = 1;
    guard_addr **pp = guard_addr_slot(hg, gc->addr);
    if (*pp == NULL)
        *pp = px_calloc(1, sizeof(**pp));
    (*pp)->addr = gc->addr;
    return ++(*pp)->n;
}

static void guard_unlist(http_guard *hg, guard_conn *gc)
{
    if (!gc->listed)
        return;
    if (gc->prev != NULL)
        gc->prev->next = gc->next;
    else
        hg->head = gc->next;
    if (gc->next != NULL)
        gc->next->prev = gc->prev;
    else
        hg->tail = gc->prev;
    gc->listed = 0;
    guard_addr **pp = guard_addr_slot(hg, gc->addr);
    guard_addr *a = *pp;
    if (a != NULL && --a->n == 0) {
        *pp = a->next;
        free(a);
    }
}

static void guard_detail(const guard_conn *gc, char *out, size_t outlen)
{
    uint32_t a = ntohl(gc->addr);
    snprintf(out, outlen, "%u.%u.%u.%u", a >> 24, (a >> 16) & 255, (a >> 8) & 255, a & 255);
}

static guard_conn *guard_of(struct MHD_Connection *mc)
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(mc, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
    return ci != NULL ? ci->socket_context : NULL;
}

void http_guard_notify(void *cls, struct MHD_Connection *mc, void **socket_context,
                       enum MHD_ConnectionNotificationCode code)
{
    http_guard *hg = cls;
    guard_conn *gc = *socket_context;
    if (code == MHD_CONNECTION_NOTIFY_CLOSED) {
        if (gc == NULL)
            return;
        pthread_mutex_lock(&hg->mu);
        guard_unlist(hg, gc);
        pthread_mutex_unlock(&hg->mu);
        free(gc);
        *socket_context = NULL;
        return;
    }
    gc = px_calloc(1, sizeof(*gc));
    const union MHD_ConnectionInfo *fd = MHD_get_connection_info(mc, MHD_CONNECTION_INFO_CONNECTION_FD);
    const union MHD_ConnectionInfo *sa = MHD_get_connection_info(mc, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    gc->fd = fd != NULL ? fd->connect_fd : -1;
    if (sa != NULL && sa->client_addr != NULL && sa->client_addr->sa_family == AF_INET)
        gc->addr = ((const struct sockaddr_in *)sa->client_addr)->sin_addr.s_addr;
    *socket_context = gc;
    pthread_mutex_lock(&hg->mu);
    if (guard_list(hg, gc) > (uint32_t)hg->g->cfg.http_per_address && gc->fd >= 0) {
        char who[32];
        guard_detail(gc, who, sizeof(who));
        metric_add(hg->over_address, 1);
        log_tally_add(&guard_address_tally, who);
        shutdown(gc->fd, SHUT_RDWR);
    }
    pthread_mutex_unlock(&hg->mu);
}

void http_guard_head_done(http_guard *hg, struct MHD_Connection *mc)
{
    guard_conn *gc = guard_of(mc);
    if (gc == NULL)
        return;
    pthread_mutex_lock(&hg->mu);
    guard_unlist(hg, gc);
    pthread_mutex_unlock(&hg->mu);
}

void http_guard_rearm(http_guard *hg, struct MHD_Connection *mc)
{
    guard_conn *gc = guard_of(mc);
    if (gc == NULL)
        return;
    pthread_mutex_lock(&hg->mu);
    if (!gc->listed)
        guard_list(hg, gc);
    pthread_mutex_unlock(&hg->mu);
}

/* Shuts down the connections past their deadline, under the lock: a
 * listed connection's fd is still MHD's (MHD tells us of the close, which
 * unlists it, before it closes the fd). */
static void guard_sweep(http_guard *hg)
{
    int64_t now = px_mono_ms();
    while (hg->head != NULL && hg->head->deadline_ms <= now) {
        guard_conn *gc = hg->head;
        char who[32];
        guard_detail(gc, who, sizeof(who));
        metric_add(hg->timed_out, 1);
        log_tally_add(&guard_timeout_tally, who);
        if (gc->fd >= 0)
            shutdown(gc->fd, SHUT_RDWR);
        guard_unlist(hg, gc);
    }
}

static void *guard_main(void *arg)
{
    http_guard *hg = arg;
    px_thread_name("gw-http-guard");
    pthread_mutex_lock(&hg->mu);
    while (!hg->stop) {
        guard_sweep(hg);
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        ts.tv_sec += 1;
        pthread_cond_timedwait(&hg->cv, &hg->mu, &ts);
    }
    pthread_mutex_unlock(&hg->mu);
    return NULL;
}

http_guard *http_guard_new(gw *g, char *err, size_t errlen)
{
    http_guard *hg = px_calloc(1, sizeof(*hg));
    hg->g = g;
    pthread_mutex_init(&hg->mu, NULL);
    px_cond_init_mono(&hg->cv);
    hg->timed_out = metrics_counter("parley_gateway_http_refused_total{reason=\"head_timeout\"}",
                                    "HTTP connections dropped or refused by the head guard, by reason");
    hg->over_address = metrics_counter("parley_gateway_http_refused_total{reason=\"per_address\"}",
                                       "HTTP connections dropped or refused by the head guard, by reason");
    if (pthread_create(&hg->th, NULL, guard_main, hg) != 0) {
        px_err(err, errlen, "http guard: thread create failed");
        pthread_cond_destroy(&hg->cv);
        pthread_mutex_destroy(&hg->mu);
        free(hg);
        return NULL;
    }
    return hg;
}

/* Call after MHD stopped: every connection has been told closed. */
void http_guard_free(http_guard *hg)
{
    if (hg == NULL)
        return;
    pthread_mutex_lock(&hg->mu);
    hg->stop = 1;
    pthread_cond_signal(&hg->cv);
    pthread_mutex_unlock(&hg->mu);
    pthread_join(hg->th, NULL);
    for (size_t i = 0; i < GUARD_BUCKETS; i++)
        while (hg->buckets[i] != NULL) {
            guard_addr *next = hg->buckets[i]->next;
            free(hg->buckets[i]);
            hg->buckets[i] = next;
        }
    pthread_cond_destroy(&hg->cv);
    pthread_mutex_destroy(&hg->mu);
    free(hg);
}
