/* Owns the webhook calls: one POST of a small JSON payload per offline
 * device per burst to PARLEY_PUSH_URL, signed with
 * `X-Parley-Signature: sha256=<hex HMAC-SHA256 of the body under
 * PARLEY_PUSH_SECRET>` (OpenSSL), driven by libcurl's multi interface from
 * the consume loop's tick, at most PARLEY_PUSH_CONCURRENCY at once, each
 * bounded by PARLEY_PUSH_TIMEOUT_MS. The answer decides:
 *   2xx            sent;
 *   410 Gone       the device is gone (target.c, kept in its device
 *                  record): no retry, and no pushes to it until it
 *                  connects again;
 *   408, 429, 5xx, no answer
 *                  failed, retried with doubling backoff (0.5 s .. 60 s,
 *                  with jitter; a Retry-After in seconds, up to 60, is
 *                  waited out) until the burst is PARLEY_PUSH_RETRY_S
 *                  old, then dropped;
 *   any other      failed and dropped: a repeat of the same request cannot
 *                  fix a 400, 401, 403, 404 or 413 (a misconfiguration
 *                  shows in parley_push_dropped_total and the log).
 * The payload names the user, the device, the kind and the sender of the
 * burst's newest event, how many events the burst holds, and no message
 * text unless PARLEY_PUSH_PREVIEW=1 (then `preview`). */
#include "common.h"
#include "log.h"
#include "push.h"

#include <jansson.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <stdlib.h>
#include <string.h>

int call_init(push *p, char *err, size_t errlen)
{
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
        return px_err(err, errlen, "curl_global_init failed");
    p->multi = curl_multi_init();
    if (p->multi == NULL)
        return px_err(err, errlen, "curl_multi_init failed");
    curl_multi_setopt(p->multi, CURLMOPT_MAX_TOTAL_CONNECTIONS,
                      (long)p->svc.cfg.push_concurrency);
    return PX_OK;
}

void call_sign(const char *secret, const char *body, size_t len, char hex[65])
{
    unsigned char mac[EVP_MAX_MD_SIZE];
    unsigned int maclen = 0;
    HMAC(EVP_sha256(), secret, (int)strlen(secret), (const unsigned char *)body, len, mac,
         &maclen);
    for (unsigned int i = 0; i < maclen && i < 32; i++)
        snprintf(hex + 2 * i, 3, "%02x", mac[i]);
    hex[64] = '\0';
}

static const char *call_kind(int kind)
{
    return kind == PARLEY__EVENT_KIND__EVENT_KIND_GROUP_EVENT ? "group_event" : "message";
}

static char *call_payload(const push *p, const push_job *j, const char *dev)
{
    const Parley__PushRecord *r = j->last;
    json_t *o = json_pack("{s:s, s:s, s:s, s:s, s:s, s:I, s:I}", "user", r->user, "device", dev,
                          "kind", call_kind(r->kind), "sender", r->sender, "id", r->id, "count",
                          (json_int_t)j->count, "ts", (json_int_t)r->ts_ms);
    if (r->group[0] != '\0')
        json_object_set_new(o, "group", json_string(r->group));
    if (p->svc.cfg.push_preview && r->preview[0] != '\0')
        json_object_set_new(o, "preview", json_string(r->preview));
    char *body = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    return body;
}

static void call_wait(push *p, push_call *c)
{
    if (p->nwaiting == p->waiting_cap) {
        p->waiting_cap = p->waiting_cap ? 2 * p->waiting_cap : 64;
        p->waiting = px_realloc(p->waiting, p->waiting_cap * sizeof(*p->waiting));
    }
    p->waiting[p->nwaiting++] = c;
}

void call_start_job(push *p, push_job *j, char (*devs)[65], size_t n)
{
    j->calls = px_calloc(n, sizeof(*j->calls));
    j->ncalls = j->open = n;
    int64_t now = px_mono_ms();
    for (size_t i = 0; i < n; i++) {
        push_call *c = &j->calls[i];
        char sig[64 + 64], hex[65];
        c->job = j;
        snprintf(c->dev, sizeof(c->dev), "%s", devs[i]);
        c->body = call_payload(p, j, c->dev);
        call_sign(p->svc.cfg.push_secret, c->body, strlen(c->body), hex);
        snprintf(sig, sizeof(sig), "X-Parley-Signature: sha256=%s", hex);
        c->hdrs = curl_slist_append(NULL, "Content-Type: application/json");
        c->hdrs = curl_slist_append(c->hdrs, sig);
        c->hdrs = curl_slist_append(c->hdrs, "Expect:");
        c->next_ms = now;
        call_wait(p, c);
    }
}

static size_t call_discard(char *ptr, size_t size, size_t nmemb, void *arg)
{
    return size * nmemb;
}

static void call_begin(push *p, push_call *c)
{
    const config *cfg = &p->svc.cfg;
    CURL *h = curl_easy_init();
    curl_easy_setopt(h, CURLOPT_URL, cfg->push_url);
    curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(h, CURLOPT_POSTFIELDS, c->body);
    curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE, (long)strlen(c->body));
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, c->hdrs);
    curl_easy_setopt(h, CURLOPT_USERAGENT, "parley-push/1");
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, cfg->push_timeout_ms);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, call_discard);
    curl_easy_setopt(h, CURLOPT_PRIVATE, c);
    c->h = h;
    c->attempts++;
    c->t0_us = service_clock_us();
    curl_multi_add_handle(p->multi, h);
    p->inflight++;
}

static void call_finish(push *p, push_call *c)
{
    c->done = 1;
    push_job *j = c->job;
    if (--j->open == 0)
        queue_job_done(p, j);
}

/* After a failure: again later (not before retry_after_ms, the answer's
 * Retry-After), or dropped once the burst is too old. */
static void call_retry_or_drop(push *p, push_call *c, int retryable, int64_t retry_after_ms)
{
    int64_t age_ms = px_now_ms() - c->job->first_ts_ms;
    if (!retryable || age_ms >= p->svc.cfg.push_retry_s * 1000) {
        metric_add(p->m.dropped, 1);
        log_warn("push dropped", "{s:s, s:s, s:i, s:b}", "user", c->job->u->name, "device",
                 c->dev, "attempts", c->attempts, "retryable", retryable);
        call_finish(p, c);
        return;
    }
    int64_t backoff = PUSH_BACKOFF_MIN_MS;
    for (int i = 1; i < c->attempts && backoff < PUSH_BACKOFF_MAX_MS; i++)
        backoff *= 2;
    backoff = PX_MIN(backoff, PUSH_BACKOFF_MAX_MS);
    backoff += rand() % (backoff / 4 + 1); /* bursts that failed together spread out */
    backoff = PX_MAX(backoff, PX_MIN(retry_after_ms, PUSH_BACKOFF_MAX_MS));
    c->next_ms = px_mono_ms() + backoff;
    metric_add(p->m.retried, 1);
    call_wait(p, c);
}

static void call_ended(push *p, CURL *h, CURLcode res)
{
    push_call *c = NULL;
    long status = 0;
    curl_off_t retry_after_s = 0; /* the answer's Retry-After, as libcurl reads it */
    curl_easy_getinfo(h, CURLINFO_PRIVATE, (char **)&c);
    if (res == CURLE_OK) {
        curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
        curl_easy_getinfo(h, CURLINFO_RETRY_AFTER, &retry_after_s);
    }
    curl_multi_remove_handle(p->multi, h);
    curl_easy_cleanup(h);
    c->h = NULL;
    p->inflight--;
    service_observe(p->m.lat_call, c->t0_us);
    if (status >= 200 && status < 300) {
        metric_add(p->m.sent, 1);
        call_finish(p, c);
        return;
    }
    if (status == 410) {
        metric_add(p->m.gone, 1);
        target_gone(p, c->job->u->name, c->dev);
        call_finish(p, c);
        return;
    }
    metric_add(p->m.failed, 1);
    log_warn("push call failed", "{s:s, s:s, s:i, s:s}", "user", c->job->u->name, "device",
             c->dev, "status", (int)status, "error",
             res == CURLE_OK ? "" : curl_easy_strerror(res));
    call_retry_or_drop(p, c, status == 0 || status == 408 || status == 429 || status >= 500,
                       (int64_t)PX_MIN(retry_after_s, PUSH_BACKOFF_MAX_MS / 1000) * 1000);
}

void call_run(push *p)
{
    int64_t now = px_mono_ms();
    for (size_t i = 0; i < p->nwaiting && p->inflight < (size_t)p->svc.cfg.push_concurrency;) {
        push_call *c = p->waiting[i];
        if (c->next_ms > now) {
            i++;
            continue;
        }
        p->waiting[i] = p->waiting[--p->nwaiting];
        call_begin(p, c);
    }
    if (p->inflight == 0)
        return;
    int running = 0;
    curl_multi_perform(p->multi, &running);
    CURLMsg *msg;
    int left = 0;
    while ((msg = curl_multi_info_read(p->multi, &left)) != NULL)
        if (msg->msg == CURLMSG_DONE)
            call_ended(p, msg->easy_handle, msg->data.result);
}

void call_free(push *p)
{
    for (size_t k = 0; k < PUSH_USER_SLOTS; k++)
        for (push_user *u = p->users[k]; u != NULL; u = u->next)
            for (size_t i = 0; u->sending != NULL && i < u->sending->ncalls; i++) {
                push_call *c = &u->sending->calls[i];
                if (c->h == NULL)
                    continue;
                curl_multi_remove_handle(p->multi, c->h);
                curl_easy_cleanup(c->h);
                c->h = NULL;
            }
    p->inflight = 0;
    p->nwaiting = 0;
    if (p->multi != NULL)
        curl_multi_cleanup(p->multi);
    p->multi = NULL;
    curl_global_cleanup();
}
