/* Identifiers: time-ordered unique ids and deterministic message ids. */
#ifndef PARLEY_IDS_H
#define PARLEY_IDS_H

#include <stddef.h>

#define ID_LEN 26          /* characters, Crockford base32 */
#define ID_BUF (ID_LEN + 1)

/* A new id: 48 bits of milliseconds then 80 bits that are unique per process
 * (random seed) and increasing within it, so ids sort by creation time across
 * processes to the millisecond, and never repeat. Thread-safe. */
void id_new(char out[ID_BUF]);

/* The msg_id of a send: a function of (sender, client id) only, so a resend
 * of the same command by any gateway yields the same msg_id with no lookup. */
void id_for_send(const char *sender, const char *client_id, char out[ID_BUF]);

/* 1 if s is a valid user id: 1-64 characters of [A-Za-z0-9._-]. */
int id_valid_user(const char *s);

/* 1 if s is 1-64 printable ASCII characters (client-chosen command id). */
int id_valid_client(const char *s);

#endif
