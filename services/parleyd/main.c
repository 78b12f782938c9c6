/* parleyd: the all-in-one embedded Parley. Runs the gateway, presence,
 * message-store, receipt and group-fanout services in one process, each on
 * a thread of its own calling that service's unchanged main (renamed
 * <service>_main at link time), over the SQLite bus and store
 * (bus_sqlite.c, store_sqlite.c: one database file under PARLEY_DATA_DIR).
 * This file owns the process: the defaults that make the services share one
 * listener, the threads, and stopping all of them when one fails. */
#include "common.h"
#include "config.h"
#include "lifecycle.h"
#include "log.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int presence_main(void);
int message_store_main(void);
int receipt_main(void);
int group_fanout_main(void);
int gateway_main(void);

struct parleyd_svc {
    const char *name;
    int (*main)(void);
    pthread_t th;
    int started;
    int rc;
};

/* The gateway last: the others are already consuming when the first client
 * arrives (nothing would be lost otherwise, records wait in the bus). */
static struct parleyd_svc parleyd_svcs[] = {
    { "presence", presence_main, 0, 0, 0 },
    { "message-store", message_store_main, 0, 0, 0 },
    { "receipt", receipt_main, 0, 0, 0 },
    { "group-fanout", group_fanout_main, 0, 0, 0 },
    { "gateway", gateway_main, 0, 0, 0 },
};

/* A service that returns while no stop signal arrived has failed: stop the
 * others through the same path as Ctrl-C. */
static void *parleyd_thread(void *arg)
{
    struct parleyd_svc *s = arg;
    s->rc = s->main();
    if (!lifecycle_stopping()) {
        log_error("service ended, stopping parleyd", "{s:s, s:i}", "service", s->name,
                  "exit", s->rc);
        kill(getpid(), SIGTERM);
    }
    return NULL;
}

/* Every service reads the same environment: one admin listener would be
 * bound five times, so the services' admin servers are off and the
 * gateway's own /readyz and /metrics (one registry for the process) serve. */
static int parleyd_env(char *err, size_t errlen)
{
    setenv("PARLEY_ADMIN_LISTEN", "off", 1);
    const char *dir = config_str("PARLEY_DATA_DIR", "data");
    if (mkdir(dir, 0700) != 0 && errno != EEXIST)
        return px_err(err, errlen, "PARLEY_DATA_DIR=\"%s\": %s", dir, strerror(errno));
    return PX_OK;
}

int main(void)
{
    char err[PX_ERRLEN];
    if (lifecycle_init(NULL, NULL) != PX_OK)
        return 1;
    log_init("parleyd", config_str("PARLEY_LOG_LEVEL", "info"));
    if (parleyd_env(err, sizeof(err)) != PX_OK) {
        log_error("bad configuration", "{s:s}", "error", err);
        return 2;
    }
    log_info("starting", "{s:s, s:s}", "data_dir", config_str("PARLEY_DATA_DIR", "data"),
             "listen", config_str("PARLEY_LISTEN", "0.0.0.0:8080"));
    int rc = 0;
    for (size_t i = 0; i < PX_ARRAY_LEN(parleyd_svcs) && !lifecycle_stopping(); i++) {
        struct parleyd_svc *s = &parleyd_svcs[i];
        if (pthread_create(&s->th, NULL, parleyd_thread, s) != 0) {
            log_error("thread create failed", "{s:s}", "service", s->name);
            kill(getpid(), SIGTERM);
            rc = 1;
            break;
        }
        s->started = 1;
    }
    for (size_t i = PX_ARRAY_LEN(parleyd_svcs); i-- > 0;) {
        struct parleyd_svc *s = &parleyd_svcs[i];
        if (!s->started)
            continue;
        pthread_join(s->th, NULL);
        if (s->rc != 0)
            rc = s->rc;
    }
    log_info("stopped", "{s:i}", "exit", rc);
    return rc;
}
