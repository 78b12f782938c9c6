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

/* An id that cannot be guessed: 128 bits from getrandom(), no time, no
 * counter (media ids, which name what a user may fetch). Aborts if the
 * kernel has no randomness to give. Thread-safe. */
void id_secret(char out[ID_BUF]);

/* The msg_id of a send: a function of (sender, client id) only, so a resend
 * of the same command by any gateway yields the same msg_id with no lookup. */
void id_for_send(const char *sender, const char *client_id, char out[ID_BUF]);

/* The id of the receipt event telling a message's sender that reader
 * reached status ("delivered", "read") for msg_id: a function of the three
 * only, so a repeated ack or read yields the same id and the inbox's
 * (user, id) uniqueness and message-store's dedupe absorb it. Inputs are
 * bounded strings without NUL (msg_id <= 255, reader <= 64, status <= 16). */
void id_for_receipt(const char *msg_id, const char *reader, const char *status,
                    char out[ID_BUF]);

/* 1 if s is a valid user id: 1-64 characters of [A-Za-z0-9._-]. */
int id_valid_user(const char *s);

/* 1 if s is 1-64 printable ASCII characters (client-chosen command id). */
int id_valid_client(const char *s);

#endif
