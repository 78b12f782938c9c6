/* parleyd: the all-in-one embedded Parley. Runs the gateway, presence,
 * message-store, receipt, group-fanout and push services in one process, each on
 * a thread of its own calling that service's unchanged main (renamed
 * <service>_main at link time), over the SQLite bus and store
 * (bus_sqlite.c, store_sqlite.c: one database file under PARLEY_DATA_DIR).
 * This file owns the process: the data folder's lock, the defaults that
 * make the services share one listener, the threads, and stopping all of
 * them when one fails. */
#include "bus_sqlite.h"
#include "common.h"
#include "config.h"
#include "lifecycle.h"
#include "log.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

int presence_main(void);
int message_store_main(void);
int receipt_main(void);
int group_fanout_main(void);
int push_main(void);
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
    { "push", push_main, 0, 0, 0 },
    { "gateway", gateway_main, 0, 0, 0 },
};

/* A service that returns while no stop signal arrived has failed: stop the
 * others through the same path as Ctrl-C. */
static void *parleyd_thread(void *arg)
{
    struct parleyd_svc *s = arg;
    px_thread_name("%s", s->name);
    s->rc = s->main();
    if (!lifecycle_stopping()) {
        log_error("service ended, stopping parleyd", "{s:s, s:i}", "service", s->name,
                  "exit", s->rc);
        kill(getpid(), SIGTERM);
    }
    return NULL;
}

/* The bus and the store assume they are the only process on the file (one
 * consumer per group, offsets, pushes): a second parleyd on the same folder
 * must not start. The lock is held by the open file for the life of the
 * process (kill -9 included, the kernel drops it), never closed here. The
 * file is emptied only once locked, so a refused start cannot erase the
 * holder's pid. */
static int parleyd_lock(const char *dir, char *err, size_t errlen)
{
    char path[PATH_MAX], pid[32] = "";
    snprintf(path, sizeof(path), "%s/parley.lock", dir);
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0)
        return px_err(err, errlen, "PARLEY_DATA_DIR=\"%s\": %s: %s", dir, path, strerror(errno));
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        int e = errno;
        ssize_t n = read(fd, pid, sizeof(pid) - 1);
        pid[n > 0 ? n : 0] = '\0';
        pid[strcspn(pid, "\n")] = '\0';
        close(fd);
        if (e == EWOULDBLOCK)
            return px_err(err, errlen, "PARLEY_DATA_DIR=\"%s\" is in use by another parleyd "
                          "(pid %s): stop it, or give this one another folder", dir,
                          pid[0] ? pid : "unknown");
        return px_err(err, errlen, "PARLEY_DATA_DIR=\"%s\": lock %s: %s", dir, path, strerror(e));
    }
    if (ftruncate(fd, 0) != 0 || dprintf(fd, "%d\n", (int)getpid()) < 0)
        log_warn("could not write the pid into the lock file", "{s:s}", "path", path);
    return PX_OK;
}

/* Every service reads the same environment: one admin listener would be
 * bound six times, so the services' admin servers are off and the
 * gateway's own /readyz and /metrics (one registry for the process) serve.
 * message-store's write-behind pipeline is deeper than the stack's by
 * default: parleyd's store keeps up with its 300 ms hold at 40,000 events
 * a second, the stack's FerretDB does not (a sync waits for the pipeline,
 * docs/benchmarks.md). */
static int parleyd_env(char *err, size_t errlen)
{
    setenv("PARLEY_ADMIN_LISTEN", "off", 1);
    setenv("PARLEY_MSGSTORE_PIPELINE", "65536", 0);
    const char *dir = config_str("PARLEY_DATA_DIR", "data");
    if (mkdir(dir, 0700) != 0 && errno != EEXIST)
        return px_err(err, errlen, "PARLEY_DATA_DIR=\"%s\": %s", dir, strerror(errno));
    return PX_OK;
}

/* Deliveries to the gateway topics (<prefix>gw.<id>) go from one thread of
 * this process to another and die with it anyway: they need no log (a lost
 * one is served again by the sync, as when a gateway dies). */
static int parleyd_bus(char *err, size_t errlen)
{
    config cfg;
    char prefix[128];
    if (config_load(&cfg, err, errlen) != PX_OK)
        return PX_ERROR;
    snprintf(prefix, sizeof(prefix), "%sgw.", cfg.topic_prefix);
    return bus_sqlite_volatile(prefix, err, errlen);
}

int main(void)
{
    char err[PX_ERRLEN];
    if (lifecycle_init(NULL, NULL) != PX_OK)
        return 1;
    log_init("parleyd", config_str("PARLEY_LOG_LEVEL", "info"));
    if (parleyd_env(err, sizeof(err)) != PX_OK || parleyd_bus(err, sizeof(err)) != PX_OK) {
        log_error("bad configuration", "{s:s}", "error", err);
        return 2;
    }
    if (parleyd_lock(config_str("PARLEY_DATA_DIR", "data"), err, sizeof(err)) != PX_OK) {
        log_error("start refused", "{s:s}", "error", err);
        return 1;
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
