/* JSON-lines logging to stderr: {"ts","level","service","msg", ...fields}. */
#ifndef PARLEY_LOG_H
#define PARLEY_LOG_H

enum log_level { LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR };

/* service is copied; level is "debug"|"info"|"warn"|"error" (else info). */
void log_init(const char *service, const char *level);

/* fields is a jansson json_pack format describing an object ("{s:s, s:i}")
 * followed by its arguments, or NULL for no fields. Thread-safe; one line per
 * call. A bad format is reported in the line instead of aborting. */
void log_write(enum log_level lv, const char *msg, const char *fields, ...);

/* A counted summary for events an attacker can trigger at will (refused
 * commands, produce failures, accept errors): log_tally counts one and
 * writes one warn line {"count": since the previous line, "last": detail}
 * at most once per LOG_TALLY_MS, the first occurrence at once. Thread-safe;
 * a count is carried into the next line, never lost. */
#define LOG_TALLY_MS 10000
typedef struct log_tally {
    const char *msg;
    _Atomic long long count, last_ms;
} log_tally;
#define LOG_TALLY_INIT(msg) { (msg), 0, 0 }
void log_tally_add(log_tally *t, const char *detail);

#define log_debug(msg, ...) log_write(LOG_DEBUG, msg, __VA_ARGS__)
#define log_info(msg, ...)  log_write(LOG_INFO, msg, __VA_ARGS__)
#define log_warn(msg, ...)  log_write(LOG_WARN, msg, __VA_ARGS__)
#define log_error(msg, ...) log_write(LOG_ERROR, msg, __VA_ARGS__)

#endif
