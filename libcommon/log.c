/* Owns the process-wide log settings and the single stderr writer. */
#include "log.h"
#include "common.h"

#include <jansson.h>
#include <stdatomic.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/* The process-wide name, and a per-thread one: in parleyd each service's
 * main thread logs under its own name, the threads it starts under the
 * process name. */
static char log_service[64] = "parley";
static __thread char log_thread_service[64];
static _Atomic int log_service_set;
static enum log_level log_min = LOG_INFO;
static const char *const log_names[] = { "debug", "info", "warn", "error" };

void log_init(const char *service, const char *level)
{
    if (log_service_set)
        snprintf(log_thread_service, sizeof(log_thread_service), "%s", service);
    else
        snprintf(log_service, sizeof(log_service), "%s", service);
    log_service_set = 1;
    log_min = LOG_INFO;
    for (size_t i = 0; level != NULL && i < PX_ARRAY_LEN(log_names); i++)
        if (strcmp(level, log_names[i]) == 0)
            log_min = (enum log_level)i;
}

void log_write(enum log_level lv, const char *msg, const char *fields, ...)
{
    if (lv < log_min)
        return;
    json_t *o = NULL;
    if (fields != NULL) {
        json_error_t jerr;
        va_list ap;
        va_start(ap, fields);
        o = json_vpack_ex(&jerr, 0, fields, ap);
        va_end(ap);
        if (o == NULL)
            o = json_pack("{s:s}", "log_error", jerr.text);
    }
    if (o == NULL || !json_is_object(o)) {
        json_decref(o);
        o = json_object();
    }
    int64_t now = px_now_ms();
    json_object_set_new(o, "ts", json_integer(now));
    json_object_set_new(o, "level", json_string(log_names[lv]));
    json_object_set_new(o, "service", json_string(log_thread_service[0] != '\0' ? log_thread_service : log_service));
    json_object_set_new(o, "msg", json_string(msg));
    char *line = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    if (line == NULL)
        return;
    flockfile(stderr);
    fputs(line, stderr);
    fputc('\n', stderr);
    funlockfile(stderr);
    free(line);
}

void log_tally_add(log_tally *t, const char *detail)
{
    atomic_fetch_add(&t->count, 1);
    long long now = px_mono_ms(), last = atomic_load(&t->last_ms);
    if (last != 0 && now - last < LOG_TALLY_MS)
        return;
    if (!atomic_compare_exchange_strong(&t->last_ms, &last, now))
        return; /* another thread writes this interval's line */
    long long n = atomic_exchange(&t->count, 0);
    log_warn(t->msg, "{s:I, s:i, s:s}", "count", (json_int_t)n, "interval_s",
             LOG_TALLY_MS / 1000, "last", detail != NULL ? detail : "");
}
