/* Owns the signal thread and the stop flag. */
#include "lifecycle.h"
#include "common.h"

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>

static _Atomic int lifecycle_sig;
static lifecycle_wake_fn lifecycle_wake;
static void *lifecycle_arg;
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
    pthread_mutex_unlock(&lifecycle_mu);
    if (lifecycle_wake != NULL)
        lifecycle_wake(lifecycle_arg);
    return NULL;
}

int lifecycle_init(lifecycle_wake_fn wake, void *arg)
{
    lifecycle_wake = wake;
    lifecycle_arg = arg;
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
