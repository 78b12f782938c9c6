/* parleyd's in-process bus (bus_sqlite.c): what it offers beyond bus.h. */
#ifndef PARLEY_BUS_SQLITE_H
#define PARLEY_BUS_SQLITE_H

#include <stddef.h>

/* Topics whose name starts with prefix become volatile: their records are
 * never written to the log, are reported PX_OK at once and handed to the
 * consumers from memory; commits on them are not written, and opening the
 * bus forgets what an older run logged for them. For hops that die with
 * the process anyway (parleyd's deliveries to its own gateway: a lost one
 * is served again by the inbox's sync, as when a gateway dies). Call
 * before the first bus_new of the process; PX_ERROR with err after. */
int bus_sqlite_volatile(const char *prefix, char *err, size_t errlen);

#endif
