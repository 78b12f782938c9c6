/* Helpers shared by the end-to-end suites: connecting as a user, sending
 * and collecting events, with timeouts that fail the test, never hang. */
#ifndef PARLEY_E2E_H
#define PARLEY_E2E_H

#include "auth.h"
#include "client.h"
#include "common.h"
#include "harness.h"

#include <check.h>
#include <jansson.h>
#include <stdio.h>
#include <string.h>

#define E2E_WAIT_MS 15000

static inline client *e2e_connect(const char *user, enum e2e_svc gw)
{
    char tok[2048], err[256];
    int status = 0;
    e2e_token(user, 3600, tok, sizeof(tok));
    client *cl = client_connect("127.0.0.1", e2e_port(gw), tok, NULL, 5000, &status, err,
                                sizeof(err));
    ck_assert_msg(cl != NULL, "connect %s: %s (HTTP %d)", user, err, status);
    return cl;
}

/* Connects as (user, dev) to gw (a token with a `dev` claim); NULL with
 * *status the HTTP status when the server refused. */
static inline client *e2e_try_device(const char *user, const char *dev, enum e2e_svc gw,
                                     int *status)
{
    char tok[AUTH_TOKEN_MAX], err[256];
    int64_t now = px_now_ms() / 1000;
    ck_assert_int_eq(auth_sign_device(e2e_secret(), user, dev, now - 10, now + 3600, tok,
                                      sizeof(tok)), PX_OK);
    *status = 0;
    return client_connect("127.0.0.1", e2e_port(gw), tok, NULL, 5000, status, err, sizeof(err));
}

static inline client *e2e_connect_device(const char *user, const char *dev, enum e2e_svc gw)
{
    int status;
    client *cl = e2e_try_device(user, dev, gw, &status);
    ck_assert_msg(cl != NULL, "connect %s/%s: HTTP %d", user, dev, status);
    return cl;
}

/* The ids of the events before `synced`, as a JSON array of strings. */
static inline json_t *e2e_backlog_ids(client *cl)
{
    json_t *ids = json_array();
    for (;;) {
        json_t *m = client_recv_json(cl, E2E_WAIT_MS);
        ck_assert_msg(m != NULL, "no synced: %s", client_errstr(cl));
        if (strcmp(json_string_value(json_object_get(m, "type")), "synced") == 0) {
            json_decref(m);
            return ids;
        }
        json_t *id = json_object_get(m, "id");
        json_array_append_new(ids, json_string(json_is_string(id) ? json_string_value(id) : ""));
        json_decref(m);
    }
}

/* 1 if the JSON array of strings ids holds id. */
static inline int e2e_has_id(const json_t *ids, const char *id)
{
    size_t i;
    json_t *v;
    json_array_foreach(ids, i, v)
        if (strcmp(json_string_value(v), id) == 0)
            return 1;
    return 0;
}

static inline void e2e_send_text(client *cl, const char *json)
{
    ck_assert_int_eq(client_send_text(cl, json, strlen(json)), 0);
}

/* Sends a 1:1 message without waiting for its answer. */
static inline void e2e_send_async(client *cl, const char *cid, const char *to, const char *body)
{
    json_t *o = json_pack("{s:s, s:s, s:s, s:s}", "type", "send", "id", cid, "to", to, "body", body);
    ck_assert_int_eq(client_send_json(cl, o), 0);
    json_decref(o);
}

/* n sends from cl to `to`, unanswered yet: client ids c0.., bodies "0"..,
 * so the receiver can check each sender's order. */
static inline void e2e_send_numbered(client *cl, const char *to, int n)
{
    char cid[32], body[32];
    for (int i = 0; i < n; i++) {
        snprintf(cid, sizeof(cid), "c%d", i);
        snprintf(body, sizeof(body), "%d", i);
        e2e_send_async(cl, cid, to, body);
    }
}

/* Sends and waits for `sent`; copies the msg_id out. */
static inline void e2e_send(client *cl, const char *cid, const char *to, const char *body,
                            char msg_id[64])
{
    e2e_send_async(cl, cid, to, body);
    json_t *r = client_wait_ref(cl, cid, E2E_WAIT_MS);
    ck_assert_msg(r != NULL, "no answer to %s: %s", cid, client_errstr(cl));
    ck_assert_msg(strcmp(json_string_value(json_object_get(r, "type")), "sent") == 0,
                  "send %s answered %s", cid, json_dumps(r, 0));
    snprintf(msg_id, 64, "%s", json_string_value(json_object_get(r, "msg_id")));
    json_decref(r);
}

/* Sends a command object (takes o) and returns its answer (by its id). */
static inline json_t *e2e_cmd(client *cl, json_t *o)
{
    char ref[65];
    snprintf(ref, sizeof(ref), "%s", json_string_value(json_object_get(o, "id")));
    ck_assert_int_eq(client_send_json(cl, o), 0);
    json_decref(o);
    json_t *a = client_wait_ref(cl, ref, E2E_WAIT_MS);
    ck_assert_msg(a != NULL, "no answer to %s: %s", ref, client_errstr(cl));
    return a;
}

/* cl's user accepts its invitation to group gid (a create or an add only
 * invites: issue 22) and is a member once this returns. */
static inline void e2e_join(client *cl, const char *gid)
{
    json_t *a = e2e_cmd(cl, json_pack("{s:s, s:s, s:s}", "type", "group_join", "id", "join",
                                      "group", gid));
    ck_assert_msg(strcmp(json_string_value(json_object_get(a, "type")), "group") == 0,
                  "join %s: %s", gid, json_dumps(a, 0));
    json_decref(a);
}

/* Reads until the server ends the connection (a close frame, or the
 * socket ends) or ms pass; 1 if it ended, with the close code (0: none). */
static inline int e2e_wait_end(client *cl, int64_t ms, int *code)
{
    client_frame f;
    int64_t end = px_mono_ms() + ms;
    *code = 0;
    while (px_mono_ms() < end) {
        int rc = client_recv(cl, 1000, &f);
        if (rc == PX_OK && f.opcode == CLIENT_OP_CLOSE) {
            *code = f.close_code;
            return 1;
        }
        if (rc == PX_ERROR)
            return 1;
    }
    return 0;
}

static inline json_t *e2e_wait_type(client *cl, const char *type)
{
    json_t *m = client_wait_type(cl, type, E2E_WAIT_MS);
    ck_assert_msg(m != NULL, "no %s within %d ms: %s", type, E2E_WAIT_MS, client_errstr(cl));
    return m;
}

/* Connects as user to gw and waits for its `synced`. */
static inline client *e2e_connect_synced(const char *user, enum e2e_svc gw)
{
    client *cl = e2e_connect(user, gw);
    json_decref(e2e_wait_type(cl, "synced"));
    return cl;
}

static inline void e2e_ack(client *cl, const char *id)
{
    json_t *o = json_pack("{s:s, s:[s]}", "type", "ack", "ids", id);
    ck_assert_int_eq(client_send_json(cl, o), 0);
    json_decref(o);
}

static inline const char *e2e_str(const json_t *o, const char *key)
{
    const char *s = json_string_value(json_object_get(o, key));
    return s ? s : "";
}

/* Checks an answer's type (and error code, if given) and frees it. */
static inline void e2e_expect_type(json_t *a, const char *type, const char *code)
{
    ck_assert_msg(strcmp(e2e_str(a, "type"), type) == 0 &&
                      (code == NULL || strcmp(e2e_str(a, "code"), code) == 0),
                  "wanted %s %s, got %s", type, code ? code : "", json_dumps(a, 0));
    json_decref(a);
}

#endif
