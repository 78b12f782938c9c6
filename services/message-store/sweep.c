/* Owns retention: every cfg.sweep_ms, delete inbox events and dedupe keys
 * older than PARLEY_RETENTION_DAYS, and media nothing needs any more.
 *
 * The media rule: media is kept while it was uploaded, or granted to a
 * recipient by a send, within PARLEY_RETENTION_DAYS plus one day. Every
 * pending message is younger than the retention period and granted its
 * media when it was sent, so no pending message ever names swept media;
 * the extra day covers the few ms between a grant and its message's ts.
 * Media of acked messages stays downloadable for the rest of that time.
 * Uploads that never committed (cut off with the gateway killed before it
 * could clean up) are removed once older than twice the longest upload. Our own periodic sweep rather than a TTL
 * index (FerretDB has none, and a sweep is easier to reason about). It runs
 * on its own thread because one big delete can take seconds and must not
 * stall the consume loop; the store is thread-safe. Every instance sweeps
 * everything: the deletes are idempotent, so that is only redundant work. */
#include "common.h"
#include "log.h"
#include "msgstore.h"

#include <errno.h>
#include <jansson.h>
#include <string.h>
#include <time.h>

static void sweep_once(msgstore *ms)
{
    char err[PX_ERRLEN] = "";
    int64_t cutoff = px_now_ms() - ms->svc.cfg.retention_days * 86400000LL;
    int64_t inbox = 0, seen = 0;
    int64_t t0 = service_clock_us();
    int irc = store_inbox_sweep(ms->svc.st, cutoff, &inbox, err, sizeof(err));
    if (irc != PX_OK)
        log_warn("inbox sweep failed", "{s:s}", "error", err);
    int src = store_seen_sweep(ms->svc.st, cutoff, &seen, err, sizeof(err));
    if (src != PX_OK)
        log_warn("seen sweep failed", "{s:s}", "error", err);
    int64_t media = 0, orphans = 0;
    int mrc = store_media_sweep(ms->svc.st, cutoff - 86400000LL,
                                px_now_ms() - 2 * STORE_MEDIA_UPLOAD_MAX_MS, &media, &orphans,
                                err, sizeof(err));
    if (mrc != PX_OK)
        log_warn("media sweep failed", "{s:s}", "error", err);
    service_observe(ms->m.lat_sweep, t0);
    metric_add(ms->m.swept_media, media + orphans);
    metric_add(ms->m.swept_inbox, inbox);
    metric_add(ms->m.swept_seen, seen);
    log_info("retention sweep", "{s:I, s:I, s:I, s:I, s:I, s:b}", "cutoff_ms",
             (json_int_t)cutoff, "inbox_removed", (json_int_t)inbox, "seen_removed",
             (json_int_t)seen, "media_removed", (json_int_t)media, "uploads_orphaned",
             (json_int_t)orphans, "ok", irc == PX_OK && src == PX_OK && mrc == PX_OK);
}

static void *sweep_main(void *arg)
{
    msgstore *ms = arg;
    px_thread_name("ms-sweep");
    pthread_mutex_lock(&ms->sweep_mu);
    while (!ms->sweep_stop) {
        struct timespec until;
        px_mono_deadline(&until, ms->svc.cfg.sweep_ms);
        int rc = 0;
        while (!ms->sweep_stop && rc != ETIMEDOUT)
            rc = pthread_cond_timedwait(&ms->sweep_cv, &ms->sweep_mu, &until);
        if (ms->sweep_stop)
            break;
        pthread_mutex_unlock(&ms->sweep_mu);
        sweep_once(ms);
        pthread_mutex_lock(&ms->sweep_mu);
    }
    pthread_mutex_unlock(&ms->sweep_mu);
    return NULL;
}

int sweep_start(msgstore *ms, char *err, size_t errlen)
{
    px_cond_init_mono(&ms->sweep_cv);
    pthread_mutex_init(&ms->sweep_mu, NULL);
    ms->sweep_stop = 0;
    int rc = pthread_create(&ms->sweeper, NULL, sweep_main, ms);
    if (rc != 0)
        return px_err(err, errlen, "sweep thread: %s", strerror(rc));
    ms->sweep_started = 1;
    return PX_OK;
}

void sweep_stop(msgstore *ms)
{
    if (!ms->sweep_started)
        return;
    pthread_mutex_lock(&ms->sweep_mu);
    ms->sweep_stop = 1;
    pthread_cond_signal(&ms->sweep_cv);
    pthread_mutex_unlock(&ms->sweep_mu);
    /* A sweep in progress finishes first: its store call is bounded by the
     * driver's socket timeout. */
    pthread_join(ms->sweeper, NULL);
    ms->sweep_started = 0;
    pthread_cond_destroy(&ms->sweep_cv);
    pthread_mutex_destroy(&ms->sweep_mu);
}
