/* End-to-end harness: starts the real Parley services as child processes
 * (or, with PARLEY_E2E_MODE=parleyd, one parleyd standing for all of them)
 * against the real Kafka broker and MongoDB-wire server that tests/run.sh
 * started, each run on its own topic prefix and database so runs never see
 * each other's data; kills and restarts them for crash tests. */
#ifndef PARLEY_E2E_HARNESS_H
#define PARLEY_E2E_HARNESS_H

#include <stddef.h>
#include <sys/types.h>

enum e2e_svc { E2E_GW1, E2E_GW2, E2E_PRESENCE, E2E_STORE, E2E_RECEIPT, E2E_FANOUT, E2E_PUSH,
               E2E_NSVC };

/* Starts every service (two gateways, presence, message-store, receipt,
 * group-fanout, push) and waits until each answers /readyz. Returns 0, or -1 after printing what
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

/* A test's own extra gateway (parleyd mode: a parleyd, with a data folder
 * of its own unless data_dir names one) called id on 127.0.0.1:port, its
 * output in the run's log folder as <id>.log. shared sets
 * PARLEY_LISTEN_SHARED; env: NULL-ended name, value pairs set after the
 * run's; nofile > 0 sets RLIMIT_NOFILE (soft and hard) before exec. */
pid_t e2e_spawn_extra(const char *id, int port, int shared, const char *data_dir,
                      const char *const *env, long nofile);
/* Another replica of service s (presence, message-store, receipt or
 * group-fanout; stack mode): the same binary and configuration, so the same
 * consumer group, its admin port at port, its output in <id>.log. Stop it
 * with e2e_stop_extra. */
pid_t e2e_spawn_replica(enum e2e_svc s, const char *id, int port);
/* Waits up to 30 s for pid to exit: its wait status, or -1 if it still ran
 * (it is killed then). */
int e2e_extra_exit_status(pid_t pid);
/* How long extra process id took from its "stopping" log line to its
 * "stopped" one (ms), or -1. */
long long e2e_extra_stop_ms(const char *id);
/* 1 if extra process id's log holds every one of the NULL-ended needles
 * (else prints the log and returns 0). */
int e2e_extra_log_has(const char *id, const char *const *needles);
/* Lines of extra process id's log that contain needle. */
int e2e_extra_log_count(const char *id, const char *needle);
/* SIGTERM, then SIGKILL after 15 s; 0 if it exited cleanly with status 0. */
int e2e_stop_extra(pid_t pid);
/* Connects as user to 127.0.0.1:port, retrying for up to 10 s while nothing
 * answers (a process still starting); NULL with *status the HTTP status
 * when the server refused (0: no answer). */
struct client;
struct client *e2e_connect_port(int port, const char *user, int *status);

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
/* The value of a counter or gauge on s's /metrics, or -1; name is the
 * whole series name, labels included ("x_total{kind=\"ack\"}"). */
long long e2e_metric(enum e2e_svc s, const char *name);
/* The same from whatever serves /metrics on 127.0.0.1:port. */
long long e2e_metric_at(int port, const char *name);
/* GET path from 127.0.0.1:port into buf (headers and body, NUL-terminated,
 * cut at cap - 1 bytes), from source address src (NULL: any; e.g.
 * "127.0.0.2" to come from another address); the HTTP status or -1. */
int e2e_http_get_from(const char *src, int port, const char *path, char *buf, size_t cap);
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
