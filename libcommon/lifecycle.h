/* Process lifecycle: SIGINT/SIGTERM become a stop flag and a wake-up call,
 * taken on a thread of their own, so no signal ever lands inside a library
 * wait (librdkafka, epoll) on another thread. */
#ifndef PARLEY_LIFECYCLE_H
#define PARLEY_LIFECYCLE_H

typedef void (*lifecycle_wake_fn)(void *arg);

/* Call first in main, before any other thread exists: blocks SIGINT and
 * SIGTERM in every thread created later, ignores SIGPIPE, and starts the
 * signal thread. On a stop signal that thread sets the stop flag and calls
 * wake(arg) (may be NULL), once. Later calls (parleyd: one per service, on
 * threads that inherited the mask) only add their wake-up, up to 16; one
 * added after the signal is called at once. PX_OK or PX_ERROR. */
int lifecycle_init(lifecycle_wake_fn wake, void *arg);

/* 1 once a stop signal arrived. */
int lifecycle_stopping(void);

/* Blocks until a stop signal arrived; returns its number. */
int lifecycle_wait(void);

#endif
