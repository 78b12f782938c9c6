/* Owns the signal thread, the stop flag and the wake-up calls. parleyd runs
 * several services' mains in one process, so the first lifecycle_init
 * installs the signal thread and every call adds its wake-up. */
#include "lifecycle.h"
#include "common.h"

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>

static _Atomic int lifecycle_sig;
#define LIFECYCLE_MAX_WAKES 16

static struct { lifecycle_wake_fn fn; void *arg; } lifecycle_wakes[LIFECYCLE_MAX_WAKES];
static size_t lifecycle_nwakes;
static int lifecycle_started;
static sigset_t lifecycle_set;
static pthread_mutex_t lifecycle_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t lifecycle_cv = PTHREAD_COND_INITIALIZER;

static void *lifecycle_main(void *unused)
{
    int sig = 0;
    while (sigwait(&lifecycle_set, &sig) != 0)
        ;
    pthread_mutex_lock(&lifecycle_mu);
    atomic_store(&lifecycle_sig, sig);
    pthread_cond_broadcast(&lifecycle_cv);
    size_t n = lifecycle_nwakes;
    pthread_mutex_unlock(&lifecycle_mu);
    for (size_t i = 0; i < n; i++)
        lifecycle_wakes[i].fn(lifecycle_wakes[i].arg);
    return NULL;
}

/* A wake-up added after the signal arrived runs at once: its service
 * started late and must still stop. */
static int lifecycle_add_wake(lifecycle_wake_fn wake, void *arg)
{
    if (wake == NULL)
        return PX_OK;
    pthread_mutex_lock(&lifecycle_mu);
    int full = lifecycle_nwakes == LIFECYCLE_MAX_WAKES;
    if (!full)
        lifecycle_wakes[lifecycle_nwakes++] = (typeof(lifecycle_wakes[0])){ wake, arg };
    int late = atomic_load(&lifecycle_sig) != 0;
    pthread_mutex_unlock(&lifecycle_mu);
    if (late && !full)
        wake(arg);
    return full ? PX_ERROR : PX_OK;
}

int lifecycle_init(lifecycle_wake_fn wake, void *arg)
{
    pthread_mutex_lock(&lifecycle_mu);
    int first = !lifecycle_started;
    lifecycle_started = 1;
    pthread_mutex_unlock(&lifecycle_mu);
    if (!first)
        return lifecycle_add_wake(wake, arg);
    if (lifecycle_add_wake(wake, arg) != PX_OK)
        return PX_ERROR;
    sigemptyset(&lifecycle_set);
    sigaddset(&lifecycle_set, SIGINT);
    sigaddset(&lifecycle_set, SIGTERM);
    if (pthread_sigmask(SIG_BLOCK, &lifecycle_set, NULL) != 0)
        return PX_ERROR;
    signal(SIGPIPE, SIG_IGN);
    pthread_t th;
    if (pthread_create(&th, NULL, lifecycle_main, NULL) != 0)
        return PX_ERROR;
    pthread_detach(th);
    return PX_OK;
}

int lifecycle_stopping(void)
{
    return atomic_load(&lifecycle_sig) != 0;
}

int lifecycle_wait(void)
{
    pthread_mutex_lock(&lifecycle_mu);
    while (atomic_load(&lifecycle_sig) == 0)
        pthread_cond_wait(&lifecycle_cv, &lifecycle_mu);
    pthread_mutex_unlock(&lifecycle_mu);
    return atomic_load(&lifecycle_sig);
}
