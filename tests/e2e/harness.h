/* End-to-end harness: starts the real Parley services as child processes
 * (or, with PARLEY_E2E_MODE=parleyd, one parleyd standing for all of them)
 * against the real Kafka broker and MongoDB-wire server that tests/run.sh
 * started, each run on its own topic prefix and database so runs never see
 * each other's data; kills and restarts them for crash tests. */
#ifndef PARLEY_E2E_HARNESS_H
#define PARLEY_E2E_HARNESS_H

#include <stddef.h>
#include <sys/types.h>

enum e2e_svc { E2E_GW1, E2E_GW2, E2E_PRESENCE, E2E_STORE, E2E_RECEIPT, E2E_FANOUT, E2E_NSVC };

/* Starts every service (two gateways, presence, message-store, receipt) and
 * waits until each answers /readyz. Returns 0, or -1 after printing what
 * failed and where its log is. */
int e2e_start(void);
/* Stops every service (SIGTERM, then SIGKILL after 15 s). Returns how many
 * did not exit cleanly with status 0 (sanitizer reports count as unclean). */
int e2e_stop(void);
/* For a test's own extra gateway with identity id: writes the binary to
 * exec to bin (the gateway, or in parleyd mode a parleyd of its own, with a
 * data folder of its own: an independent Parley, enough for tests of one
 * gateway's limits). Call in the child before exec. */
void e2e_extra_gateway(const char *id, char *bin, size_t binlen);

/* kill -9 one service. Fails the test if it had already ended (its exit
 * status and the end of its log are printed). */
void e2e_kill9(enum e2e_svc s);
/* Starts one service again (same config and identity). */
int e2e_restart(enum e2e_svc s);

/* The running process of s (0 when stopped), e.g. to read its memory
 * from /proc/<pid>/status. */
pid_t e2e_pid(enum e2e_svc s);
/* Gateway port of E2E_GW1 or E2E_GW2; admin port of the others. */
int e2e_port(enum e2e_svc gw);
/* The value of a counter or gauge (no labels) on s's /metrics, or -1. */
long long e2e_metric(enum e2e_svc s, const char *name);
/* A fresh token for user, valid for an hour (or expired if ttl < 0). */
void e2e_token(const char *user, long ttl_s, char *out, size_t outlen);
/* A user id unique to this run: prefix + counter. */
void e2e_user(const char *prefix, char out[65]);
/* The JWT secret the services run with. */
const char *e2e_secret(void);

/* The whole main of an end-to-end program: starts the services, runs the
 * suite without forking (tests kill and restart services), stops them.
 * Exit status: failure if a test failed or a service did not exit cleanly. */
struct Suite;
int e2e_main(struct Suite *suite);

#endif
