/* Owns presence watching on this gateway (issue 18): which connections
 * watch which users, and what each was last told, so a `presence` event
 * from the presence service reaches exactly the watchers of its user, in
 * order, once.
 *
 * A presence_sub sets the connection's watch list at once (watch_set),
 * every entry pending, and then asks presence for the state. Presence
 * answers with one event per user and the users the connection may watch
 * (contacts; the rest are dropped here, so a stranger's changes are never
 * passed on). An entry becomes ready with that answer; a change that
 * arrives while it is pending is kept (the newest) and follows the answer
 * if it is newer. Events carry the time presence read the state
 * (presence_ts), and an entry passes on only what is newer than what it
 * told, so an answer and a change that cross on their way never leave a
 * watcher with the older state. The delivery thread calls watch_answer
 * and watch_change; workers call watch_set and watch_drop: one lock. */
#include "common.h"
#include "gateway.h"

#include <stdlib.h>
#include <string.h>

#define WATCH_BUCKETS 4096

typedef struct watcher {
    struct watcher *next;       /* the user's other watchers */
    uint64_t conn;
    int ready;                  /* presence answered the sub */
    int64_t ts;                 /* presence_ts of the last event passed on */
    char *held;                 /* pending: the newest change, or NULL */
    size_t held_len;
    int64_t held_ts;
} watcher;

typedef struct watched {
    struct watched *next;
    watcher *ws;
    char user[];
} watched;

/* A connection's watch list, to drop it in one go. */
typedef struct wconn {
    struct wconn *next;
    uint64_t conn;
    size_t n;
    char **users;
} wconn;

struct watch {
    pthread_mutex_t mu;
    watched *users[WATCH_BUCKETS];
    wconn *conns[WATCH_BUCKETS];
};

watch *watch_new(void)
{
    watch *w = px_calloc(1, sizeof(*w));
    pthread_mutex_init(&w->mu, NULL);
    return w;
}

/* The link to user's entry (or where it goes); mu held. */
static watched **watch_user_slot(watch *w, const char *user)
{
    watched **pp = &w->users[px_hash(user) % WATCH_BUCKETS];
    while (*pp != NULL && strcmp((*pp)->user, user) != 0)
        pp = &(*pp)->next;
    return pp;
}

static wconn **watch_conn_slot(watch *w, uint64_t conn_id)
{
    wconn **pp = &w->conns[conn_id % WATCH_BUCKETS];
    while (*pp != NULL && (*pp)->conn != conn_id)
        pp = &(*pp)->next;
    return pp;
}

/* conn_id's watcher of user, or NULL; mu held. */
static watcher *watch_find(watch *w, const char *user, uint64_t conn_id)
{
    watched *e = *watch_user_slot(w, user);
    for (watcher *x = e != NULL ? e->ws : NULL; x != NULL; x = x->next)
        if (x->conn == conn_id)
            return x;
    return NULL;
}

/* Removes conn_id's watcher of user (and the user's entry with its last
 * watcher); mu held. */
static void watch_unlink(watch *w, const char *user, uint64_t conn_id)
{
    watched **pp = watch_user_slot(w, user), *e = *pp;
    if (e == NULL)
        return;
    for (watcher **xp = &e->ws; *xp != NULL; xp = &(*xp)->next) {
        watcher *x = *xp;
        if (x->conn != conn_id)
            continue;
        *xp = x->next;
        free(x->held);
        free(x);
        break;
    }
    if (e->ws == NULL) {
        *pp = e->next;
        free(e);
    }
}

static void watch_drop_locked(watch *w, uint64_t conn_id)
{
    wconn **cp = watch_conn_slot(w, conn_id), *c = *cp;
    if (c == NULL)
        return;
    for (size_t i = 0; i < c->n; i++) {
        watch_unlink(w, c->users[i], conn_id);
        free(c->users[i]);
    }
    *cp = c->next;
    free(c->users);
    free(c);
}

void watch_drop(watch *w, uint64_t conn_id)
{
    pthread_mutex_lock(&w->mu);
    watch_drop_locked(w, conn_id);
    pthread_mutex_unlock(&w->mu);
}

void watch_set(watch *w, uint64_t conn_id, const char *const *users, size_t n)
{
    pthread_mutex_lock(&w->mu);
    watch_drop_locked(w, conn_id);
    wconn *c = px_calloc(1, sizeof(*c));
    c->conn = conn_id;
    c->users = px_malloc((n > 0 ? n : 1) * sizeof(*c->users));
    for (size_t i = 0; i < n; i++) {
        if (watch_find(w, users[i], conn_id) != NULL)
            continue; /* named twice */
        watched **pp = watch_user_slot(w, users[i]);
        if (*pp == NULL) {
            size_t len = strlen(users[i]);
            *pp = px_calloc(1, sizeof(**pp) + len + 1);
            memcpy((*pp)->user, users[i], len + 1);
        }
        watcher *x = px_calloc(1, sizeof(*x));
        x->conn = conn_id;
        x->next = (*pp)->ws;
        (*pp)->ws = x;
        c->users[c->n++] = px_strdup(users[i]);
    }
    wconn **cp = watch_conn_slot(w, conn_id);
    c->next = *cp;
    *cp = c;
    pthread_mutex_unlock(&w->mu);
}

void watch_answer(watch *w, uint64_t conn_id, char *const *ok, size_t nok, char *const *no,
                  size_t nno, int64_t ts, watch_emit_cb emit, void *arg)
{
    pthread_mutex_lock(&w->mu);
    for (size_t i = 0; i < nno; i++)
        watch_unlink(w, no[i], conn_id);
    for (size_t i = 0; i < nok; i++) {
        watcher *x = watch_find(w, ok[i], conn_id);
        if (x == NULL || x->ready)
            continue; /* not asked for (any more), or an answer repeated */
        x->ready = 1;
        x->ts = ts;
        if (x->held != NULL && x->held_ts > ts) {
            emit(arg, conn_id, x->held, x->held_len);
            x->ts = x->held_ts;
        }
        free(x->held);
        x->held = NULL;
    }
    pthread_mutex_unlock(&w->mu);
}

void watch_change(watch *w, const char *user, int64_t ts, const char *json, size_t len,
                  watch_emit_cb emit, void *arg)
{
    pthread_mutex_lock(&w->mu);
    watched *e = *watch_user_slot(w, user);
    for (watcher *x = e != NULL ? e->ws : NULL; x != NULL; x = x->next) {
        if (x->ready && ts > x->ts) {
            emit(arg, x->conn, json, len);
            x->ts = ts;
        } else if (!x->ready && ts > x->held_ts) {
            free(x->held);
            x->held = px_malloc(len);
            memcpy(x->held, json, len);
            x->held_len = len;
            x->held_ts = ts;
        }
    }
    pthread_mutex_unlock(&w->mu);
}

void watch_free(watch *w)
{
    if (w == NULL)
        return;
    for (size_t i = 0; i < WATCH_BUCKETS; i++)
        while (w->conns[i] != NULL)
            watch_drop_locked(w, w->conns[i]->conn);
    pthread_mutex_destroy(&w->mu);
    free(w);
}
