/* Owns one epoll reactor thread: its connections (a slot table), its
 * mailbox (an eventfd plus a locked list) and its once-a-second timer.
 * Connections die only here, after the event that killed them has been
 * handled (mark, list, reap), never inside a wslay callback. */
#include "common.h"
#include "gateway.h"
#include "log.h"

#include <errno.h>
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#define WORKER_MAIL_CEILING (64u << 20) /* bytes queued to one worker */
#define WORKER_EVENTS 256
#define WORKER_SLOT_BITS 24

struct worker {
    gw *g;
    size_t parked;             /* contexts freed since the last trim */
    int idx;
    pthread_t th;
    int epfd, evfd;
    volatile int stop;
    pthread_mutex_t mu;
    pthread_cond_t room;
    mail *head, *tail;
    size_t mail_bytes;
    conn **slots;
    uint32_t *gens;
    uint32_t nslots, cap;
    uint32_t *free_slots;
    uint32_t nfree;
    uint32_t gen;
    dedupe *dedupe;             /* inbox events written lately, per connection */
    conn **dirty;               /* written to since the last flush */
    size_t ndirty, dirty_cap;
};

dedupe *worker_dedupe(worker *w)
{
    return w->dedupe;
}

mail *mail_new(enum mail_kind kind, uint64_t conn_id, const void *data, size_t len)
{
    return mail_new_skip(kind, conn_id, data, len, NULL);
}

mail *mail_new_skip(enum mail_kind kind, uint64_t conn_id, const void *data, size_t len,
                    const char *skip)
{
    size_t slen = skip != NULL ? strlen(skip) : 0;
    mail *m = px_malloc(sizeof(*m) + len + 1 + (slen > 0 ? slen + 1 : 0));
    m->next = NULL;
    m->kind = kind;
    m->conn_id = conn_id;
    m->c = NULL;
    m->from_seq = 0;
    m->seq = -1;
    m->len = len;
    if (len > 0)
        memcpy(m->data, data, len);
    m->data[len] = '\0';
    m->skip = NULL;
    if (slen > 0) {
        memcpy(m->data + len + 1, skip, slen + 1);
        m->skip = m->data + len + 1;
    }
    return m;
}

worker *worker_new(gw *g, int idx, char *err, size_t errlen)
{
    worker *w = px_calloc(1, sizeof(*w));
    w->g = g;
    w->idx = idx;
    w->cap = (uint32_t)PX_MIN(g->cfg.max_conns, (1L << WORKER_SLOT_BITS) - 1);
    w->slots = px_calloc(w->cap, sizeof(*w->slots));
    w->gens = px_calloc(w->cap, sizeof(*w->gens));
    w->free_slots = px_calloc(w->cap, sizeof(*w->free_slots));
    w->dedupe = dedupe_new();
    w->gen = (uint32_t)g->epoch;
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->room, NULL);
    w->epfd = epoll_create1(EPOLL_CLOEXEC);
    w->evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    struct epoll_event ev = { .events = EPOLLIN, .data.ptr = NULL };
    if (w->epfd < 0 || w->evfd < 0 || epoll_ctl(w->epfd, EPOLL_CTL_ADD, w->evfd, &ev) < 0) {
        px_err(err, errlen, "worker %d: epoll/eventfd: %s", idx, strerror(errno));
        worker_free(w);
        return NULL;
    }
    return w;
}

void worker_post(worker *w, mail *m)
{
    m->next = NULL;
    worker_post_chain(w, m);
}

/* One lock and one eventfd write for the whole chain: the delivery thread
 * hands over a consumed batch at once. */
void worker_post_chain(worker *w, mail *head)
{
    if (head == NULL)
        return;
    mail *tail = head;
    size_t bytes = 0;
    for (mail *m = head; m != NULL; tail = m, m = m->next)
        bytes += sizeof(*m) + m->len;
    pthread_mutex_lock(&w->mu);
    while (w->mail_bytes > WORKER_MAIL_CEILING && !w->stop)
        pthread_cond_wait(&w->room, &w->mu);
    /* A mailbox that was not empty has a wake-up pending: the worker reads
     * the eventfd before it takes the list, so it takes this chain too. */
    int was_empty = w->head == NULL;
    if (w->tail != NULL)
        w->tail->next = head;
    else
        w->head = head;
    w->tail = tail;
    w->mail_bytes += bytes;
    pthread_mutex_unlock(&w->mu);
    uint64_t one = 1;
    if (was_empty && write(w->evfd, &one, sizeof(one)) < 0 && errno != EAGAIN)
        log_error("worker eventfd write failed", "{s:s}", "error", strerror(errno));
}

static conn *worker_find(worker *w, uint64_t id)
{
    uint32_t slot = (uint32_t)(id & ((1u << WORKER_SLOT_BITS) - 1));
    uint32_t gen = (uint32_t)(id >> WORKER_SLOT_BITS);
    if (slot >= w->nslots || w->slots[slot] == NULL || w->gens[slot] != gen)
        return NULL;
    return w->slots[slot];
}

static void worker_mark_dirty(worker *w, conn *c)
{
    if (ws_conn_set_dirty(c, 1))
        return;
    if (w->ndirty == w->dirty_cap) {
        w->dirty_cap = w->dirty_cap ? w->dirty_cap * 2 : 64;
        w->dirty = px_realloc(w->dirty, w->dirty_cap * sizeof(*w->dirty));
    }
    w->dirty[w->ndirty++] = c;
}

static void worker_adopt(worker *w, conn *c)
{
    char err[PX_ERRLEN];
    uint32_t slot;
    if (w->nfree > 0)
        slot = w->free_slots[--w->nfree];
    else if (w->nslots < w->cap)
        slot = w->nslots++;
    else {
        log_warn("connection refused: worker full", "{s:i}", "worker", w->idx);
        ws_conn_free(c);
        return;
    }
    uint32_t gen = ++w->gen;
    uint64_t id = ((uint64_t)w->idx << 56) | ((uint64_t)gen << WORKER_SLOT_BITS) | slot;
    if (ws_conn_attach(c, w, id, w->epfd, err, sizeof(err)) != PX_OK) {
        log_warn("connection attach failed", "{s:s}", "error", err);
        w->free_slots[w->nfree++] = slot;
        ws_conn_free(c);
        return;
    }
    w->slots[slot] = c;
    w->gens[slot] = gen;
    registry_add(w->g->reg, ws_conn_user(c), id);
    metric_add(w->g->m.conns, 1);
    commands_connected(w->g, c);
    worker_mark_dirty(w, c); /* extra_in may already hold frames */
    ws_conn_on_io(c, EPOLLIN);
}

static void worker_reap(worker *w, conn *c)
{
    uint64_t id = ws_conn_id(c);
    uint32_t slot = (uint32_t)(id & ((1u << WORKER_SLOT_BITS) - 1));
    registry_remove(w->g->reg, ws_conn_user(c), id);
    commands_disconnected(w->g, c);
    metric_add(w->g->m.conns, -1);
    metric_add(w->g->m.closed, 1);
    w->slots[slot] = NULL;
    w->free_slots[w->nfree++] = slot;
    ws_conn_free(c);
}

/* Returns 1 if the connection kept m (a held live event). */
static int worker_deliver(worker *w, mail *m)
{
    conn *c = worker_find(w, m->conn_id);
    if (c == NULL || ws_conn_dead(c)) {
        metric_add(w->g->m.dropped, 1);
        return 0;
    }
    worker_mark_dirty(w, c);
    if (m->kind == MAIL_SYNCED) {
        ws_conn_synced(c);
        return 0;
    }
    if (m->kind == MAIL_SYNC_MORE) {
        ws_conn_sync_more(c, m->from_seq);
        return 0;
    }
    if (m->kind == MAIL_UNLINKED) {
        if (strcmp(m->data, ws_conn_device(c)) == 0)
            ws_conn_close(c, WS_CLOSE_UNLINKED, "device unlinked");
        return 0;
    }
    if (m->skip != NULL && strcmp(m->skip, ws_conn_device(c)) == 0)
        return 0; /* it came from this device */
    metric_add(w->g->m.delivered, 1);
    if (m->kind == MAIL_LIVE && !ws_conn_is_synced(c)) {
        ws_conn_hold(c, m);
        return 1;
    }
    ws_conn_queue_event(c, m);
    return 0;
}

static void worker_drain_mail(worker *w)
{
    uint64_t n;
    if (read(w->evfd, &n, sizeof(n)) < 0 && errno != EAGAIN)
        log_error("worker eventfd read failed", "{s:s}", "error", strerror(errno));
    pthread_mutex_lock(&w->mu);
    mail *m = w->head;
    w->head = w->tail = NULL;
    w->mail_bytes = 0;
    pthread_cond_broadcast(&w->room);
    pthread_mutex_unlock(&w->mu);
    while (m != NULL) {
        mail *next = m->next;
        int kept = 0;
        if (m->kind == MAIL_CONN)
            worker_adopt(w, m->c);
        else
            kept = worker_deliver(w, m);
        if (!kept)
            free(m);
        m = next;
    }
}

/* Under AddressSanitizer malloc is ASan's, and glibc's malloc_trim walks
 * an arena nobody set up (it crashed parleyd's e2e run): skip it there. */
static void worker_trim(void)
{
#ifndef __SANITIZE_ADDRESS__
    malloc_trim(0);
#endif
}

/* Flushes connections touched in this iteration, then reaps those that
 * died: one send per connection per loop however many events it got, and
 * every way to die (I/O, queue ceiling, timers) goes through this list. */
static void worker_before_sleep(worker *w, int ticked)
{
    int64_t now = px_mono_ms();
    for (size_t i = 0; i < w->ndirty; i++) {
        conn *c = w->dirty[i];
        ws_conn_set_dirty(c, 0);
        if (!ws_conn_dead(c) && ws_conn_flush(c) == PX_OK)
            w->parked += (size_t)ws_conn_park(c, now);
        if (ws_conn_dead(c))
            worker_reap(w, c);
    }
    w->ndirty = 0;
    /* Freed contexts sit in malloc's free lists until trimmed; once a
     * second is enough to hand a quiet crowd's memory back to the OS. */
    if (ticked && w->parked > 0) {
        worker_trim();
        w->parked = 0;
    }
}

static void worker_tick(worker *w)
{
    int64_t now = px_mono_ms();
    for (uint32_t s = 0; s < w->nslots; s++)
        if (w->slots[s] != NULL && !ws_conn_dead(w->slots[s])) {
            ws_conn_tick(w->slots[s], now);
            worker_mark_dirty(w, w->slots[s]);
        }
}

static void *worker_main(void *arg)
{
    worker *w = arg;
    px_thread_name("gw-worker-%d", w->idx);
    struct epoll_event evs[WORKER_EVENTS];
    int64_t next_tick = px_mono_ms() + 1000;
    while (!w->stop) {
        int64_t wait = next_tick - px_mono_ms();
        int n = epoll_wait(w->epfd, evs, WORKER_EVENTS, wait < 0 ? 0 : (int)wait);
        if (n < 0 && errno != EINTR) {
            log_error("epoll_wait failed", "{s:s}", "error", strerror(errno));
            break;
        }
        for (int i = 0; i < n; i++) {
            if (evs[i].data.ptr == NULL) {
                worker_drain_mail(w);
                continue;
            }
            conn *c = evs[i].data.ptr;
            ws_conn_on_io(c, evs[i].events);
            worker_mark_dirty(w, c);
        }
        int ticked = px_mono_ms() >= next_tick;
        if (ticked) {
            worker_tick(w);
            next_tick = px_mono_ms() + 1000;
        }
        worker_before_sleep(w, ticked);
    }
    /* Shutdown: tell every client we are going away, then release. */
    worker_drain_mail(w);
    for (uint32_t s = 0; s < w->nslots; s++)
        if (w->slots[s] != NULL) {
            ws_conn_close(w->slots[s], 1001, "server shutting down");
            ws_conn_flush(w->slots[s]);
            worker_reap(w, w->slots[s]);
        }
    return NULL;
}

int worker_start(worker *w)
{
    return pthread_create(&w->th, NULL, worker_main, w) == 0 ? PX_OK : PX_ERROR;
}

void worker_stop(worker *w)
{
    pthread_mutex_lock(&w->mu);
    w->stop = 1;
    pthread_cond_broadcast(&w->room);
    pthread_mutex_unlock(&w->mu);
    uint64_t one = 1;
    if (write(w->evfd, &one, sizeof(one)) < 0)
        log_error("worker stop: eventfd write failed", "{s:s}", "error", strerror(errno));
    pthread_join(w->th, NULL);
}

void worker_free(worker *w)
{
    if (w == NULL)
        return;
    mail *m = w->head;
    while (m != NULL) {
        mail *next = m->next;
        if (m->kind == MAIL_CONN)
            ws_conn_free(m->c);
        free(m);
        m = next;
    }
    if (w->epfd >= 0)
        close(w->epfd);
    if (w->evfd >= 0)
        close(w->evfd);
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->room);
    free(w->slots);
    free(w->gens);
    free(w->free_slots);
    free(w->dirty);
    dedupe_free(w->dedupe);
    free(w);
}
