/* parleyctl: the command-line tool for operators and scripts. Owns argument
 * parsing and the four commands: token (mint a JWT), send (one message,
 * text and/or media, wait for its `sent`), presence (print users' presence) and listen
 * (print and ack a user's events).
 * Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error. */
#include "auth.h"
#include "client.h"
#include "common.h"
#include "ids.h"

#include <errno.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CTL_OK    0
#define CTL_FAIL  1
#define CTL_USAGE 2

#define CTL_DEFAULT_URL   "ws://127.0.0.1:8080"
#define CTL_DEFAULT_TTL   3600L
#define CTL_MAX_TTL       (10L * 365 * 24 * 3600)
#define CTL_SESSION_TTL   86400L   /* tokens minted for send/listen */
#define CTL_SEND_WAIT_MS  10000
#define CTL_POLL_MS       500      /* listen's bounded wait: SIGINT is seen this fast */
#define CTL_ACK_BATCH     1000     /* PROTOCOL.md caps ids per ack */

static const char ctl_usage_text[] =
    "usage: parleyctl COMMAND [OPTIONS]\n"
    "\n"
    "commands:\n"
    "  token USER [--ttl SECONDS] [--device DEV]\n"
    "      print a token for USER (default ttl 3600 s)\n"
    "  send [--url URL] --as USER (--to USER | --group GROUP) [--timeout MS]\n"
    "       [--media ID | --forward ID] [BODY]\n"
    "      send BODY and/or media ID (uploaded with POST /v1/media; --forward marks\n"
    "      it forwarded), wait for the server's answer and print it as one JSON\n"
    "      line; exit 0 on `sent`, 1 on `error`\n"
    "  presence [--url URL] --as USER [--timeout MS] WHO [WHO...]\n"
    "      print the presence of each WHO (at most 8) as one JSON line:\n"
    "      online, last_seen (ms); only USER's contacts are told the truth,\n"
    "      anyone else reads as never seen (online false, last_seen 0)\n"
    "  listen [--url URL] --as USER\n"
    "      print every event as one JSON line and ack messages, receipts and\n"
    "      group events; runs until SIGINT/SIGTERM or the server closes\n"
    "\n"
    "options:\n"
    "  --url URL      ws://host[:port] (default $PARLEY_URL, else " CTL_DEFAULT_URL ")\n"
    "  --token TOKEN  connect with TOKEN instead of minting one for --as\n"
    "  --device DEV   mint tokens for USER's device DEV (the `dev` claim; default:\n"
    "                 none, the user's device `default`); each device keeps its\n"
    "                 own pending events (PROTOCOL.md, Devices)\n"
    "  -h, --help     this text\n"
    "\n"
    "environment:\n"
    "  PARLEY_JWT_SECRET  signs minted tokens (required unless --token is given)\n"
    "  PARLEY_URL         default server URL\n"
    "\n"
    "exit status: 0 success, 1 failure, 2 usage or configuration error\n";

typedef struct ctl_args {
    const char *cmd;
    const char *url, *as, *to, *group, *token, *media, *forward, *device;
    const char *ttl, *timeout;
    const char *pos[8];        /* positional arguments after the command */
    int npos;
} ctl_args;

static volatile sig_atomic_t ctl_stop;

static void ctl_on_signal(int sig)
{
    ctl_stop = 1;
}

static int ctl_usage_error(const char *fmt, const char *arg)
    __attribute__((format(printf, 1, 0)));

static int ctl_usage_error(const char *fmt, const char *arg)
{
    fprintf(stderr, "parleyctl: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\n(see parleyctl --help)\n");
    return CTL_USAGE;
}

/* ---- arguments ------------------------------------------------------------ */

/* Where the value of option name goes, or NULL if the option is unknown. */
static const char **ctl_option_slot(ctl_args *a, const char *name)
{
    static const char *names[] = { "url", "as", "to", "group", "token", "ttl", "timeout",
                                   "media", "forward", "device" };
    const char **slots[] = { &a->url, &a->as, &a->to, &a->group, &a->token, &a->ttl,
                             &a->timeout, &a->media, &a->forward, &a->device };
    for (size_t i = 0; i < PX_ARRAY_LEN(names); i++)
        if (strcmp(name, names[i]) == 0)
            return slots[i];
    return NULL;
}

/* Accepts "--opt VALUE" and "--opt=VALUE"; "--" ends the options so a BODY
 * may start with dashes. */
static int ctl_parse(int argc, char **argv, ctl_args *a)
{
    int opts_done = 0;
    memset(a, 0, sizeof(*a));
    for (int i = 1; i < argc; i++) {
        const char *s = argv[i];
        if (!opts_done && strcmp(s, "--") == 0) {
            opts_done = 1;
        } else if (!opts_done && strncmp(s, "--", 2) == 0) {
            char name[32];
            const char *eq = strchr(s + 2, '=');
            size_t nl = eq != NULL ? (size_t)(eq - s - 2) : strlen(s + 2);
            snprintf(name, sizeof(name), "%.*s", (int)PX_MIN(nl, sizeof(name) - 1), s + 2);
            const char **slot = ctl_option_slot(a, name);
            if (slot == NULL)
                return ctl_usage_error("unknown option %s", s);
            if (eq == NULL && i + 1 == argc)
                return ctl_usage_error("option %s needs a value", s);
            *slot = eq != NULL ? eq + 1 : argv[++i];
        } else if (a->cmd == NULL) {
            a->cmd = s;
        } else if (a->npos < (int)PX_ARRAY_LEN(a->pos)) {
            a->pos[a->npos++] = s;
        } else {
            return ctl_usage_error("unexpected argument %s", s);
        }
    }
    return CTL_OK;
}

static int ctl_parse_long(const char *s, long min, long max, long *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || v < min || v > max)
        return PX_ERROR;
    *out = v;
    return PX_OK;
}

/* ws://host[:port][/ or /v1/ws]; host may be a [bracketed] IPv6 literal. */
static int ctl_parse_url(const char *url, char *host, size_t hostlen, int *port)
{
    const char *p = url, *end;
    long v = 80;
    if (strncmp(p, "ws://", 5) != 0)
        return PX_ERROR;  /* TLS ends at the ingress; wss:// is not spoken here */
    p += 5;
    if (*p == '[') {
        end = strchr(++p, ']');
        if (end == NULL)
            return PX_ERROR;
    } else {
        end = p + strcspn(p, ":/");
    }
    if (end == p || (size_t)(end - p) >= hostlen)
        return PX_ERROR;
    snprintf(host, hostlen, "%.*s", (int)(end - p), p);
    p = end + (*end == ']');
    if (*p == ':') {
        char num[8];
        size_t nl = strcspn(++p, "/");
        if (nl == 0 || nl >= sizeof(num))
            return PX_ERROR;
        snprintf(num, sizeof(num), "%.*s", (int)nl, p);
        if (ctl_parse_long(num, 1, 65535, &v) != PX_OK)
            return PX_ERROR;
        p += nl;
    }
    if (*p != '\0' && strcmp(p, "/") != 0 && strcmp(p, "/v1/ws") != 0)
        return PX_ERROR;
    *port = (int)v;
    return PX_OK;
}

/* ---- tokens and connecting ------------------------------------------------ */

/* dev: the token's device claim, or NULL for none. */
static int ctl_mint(const char *user, const char *dev, long ttl, char *tok, size_t toklen)
{
    const char *secret = getenv("PARLEY_JWT_SECRET");
    if (secret == NULL || *secret == '\0') {
        fprintf(stderr, "parleyctl: PARLEY_JWT_SECRET is not set\n");
        return CTL_USAGE;
    }
    if (!id_valid_user(user))
        return ctl_usage_error("%s is not a valid user id (1-64 of [A-Za-z0-9._-])", user);
    if (dev != NULL && !id_valid_user(dev))
        return ctl_usage_error("%s is not a valid device id (1-64 of [A-Za-z0-9._-])", dev);
    int64_t now = px_now_ms() / 1000;
    if (auth_sign_device(secret, user, dev, now, now + ttl, tok, toklen) != PX_OK) {
        fprintf(stderr, "parleyctl: cannot sign a token for %s\n", user);
        return CTL_FAIL;
    }
    return CTL_OK;
}

/* Connects as a->as (or with a->token). On failure *cl is NULL and the
 * return value is the exit code. */
static int ctl_connect(const ctl_args *a, client **cl)
{
    char host[256], tok[AUTH_TOKEN_MAX], err[PX_ERRLEN];
    const char *url = a->url ? a->url : getenv("PARLEY_URL");
    int port = 0, status = 0, rc;
    *cl = NULL;
    if (url == NULL || *url == '\0')
        url = CTL_DEFAULT_URL;
    if (ctl_parse_url(url, host, sizeof(host), &port) != PX_OK)
        return ctl_usage_error("bad URL %s (want ws://host[:port])", url);
    if (a->as == NULL)
        return ctl_usage_error("%s needs --as USER", a->cmd);
    if (a->token != NULL) {
        snprintf(tok, sizeof(tok), "%s", a->token);
    } else {
        rc = ctl_mint(a->as, a->device, CTL_SESSION_TTL, tok, sizeof(tok));
        if (rc != CTL_OK)
            return rc;
    }
    *cl = client_connect(host, port, tok, NULL, 0, &status, err, sizeof(err));
    if (*cl != NULL)
        return CTL_OK;
    if (status != 0 && status != 101)
        fprintf(stderr, "parleyctl: %s refused the connection: HTTP %d\n", url, status);
    else
        fprintf(stderr, "parleyctl: cannot connect to %s: %s\n", url, err);
    return CTL_FAIL;
}

static void ctl_print(const json_t *msg)
{
    char *s = json_dumps(msg, JSON_COMPACT);
    if (s != NULL)
        printf("%s\n", s);
    free(s);
    fflush(stdout);  /* one line per event, visible at once to a pipe reader */
}

/* ---- commands ------------------------------------------------------------- */

static int ctl_cmd_token(const ctl_args *a)
{
    char tok[AUTH_TOKEN_MAX];
    long ttl = CTL_DEFAULT_TTL;
    if (a->npos != 1)
        return ctl_usage_error("%s", "token needs exactly one USER");
    if (a->ttl != NULL && ctl_parse_long(a->ttl, 1, CTL_MAX_TTL, &ttl) != PX_OK)
        return ctl_usage_error("--ttl %s is not a number of seconds in 1-315360000", a->ttl);
    int rc = ctl_mint(a->pos[0], a->device, ttl, tok, sizeof(tok));
    if (rc == CTL_OK)
        printf("%s\n", tok);
    return rc;
}

/* Reads until the answer to command id; other events are dropped unacked,
 * so the server keeps them for the user's real clients. */
static int ctl_await_answer(client *cl, const char *id, long wait_ms)
{
    int64_t deadline = px_mono_ms() + wait_ms;
    for (;;) {
        int left = (int)PX_MAX(deadline - px_mono_ms(), 0);
        json_t *msg = client_recv_json(cl, left);
        if (msg == NULL) {
            fprintf(stderr, "parleyctl: no answer: %s\n", client_errstr(cl));
            return CTL_FAIL;
        }
        const char *ref = json_string_value(json_object_get(msg, "ref"));
        if (ref != NULL && strcmp(ref, id) == 0) {
            const char *type = json_string_value(json_object_get(msg, "type"));
            int rc = type != NULL && strcmp(type, "sent") == 0 ? CTL_OK : CTL_FAIL;
            ctl_print(msg);
            json_decref(msg);
            return rc;
        }
        json_decref(msg);
    }
}

static int ctl_cmd_send(const ctl_args *a)
{
    char id[ID_BUF];
    long wait_ms = CTL_SEND_WAIT_MS;
    client *cl = NULL;
    json_t *cmd = NULL;
    int rc = CTL_USAGE;
    const char *media = a->media != NULL ? a->media : a->forward;
    if (a->media != NULL && a->forward != NULL) {
        ctl_usage_error("%s", "send takes --media or --forward, not both");
        goto out;
    }
    if (a->npos > 1 || (a->npos == 0 && media == NULL)) {
        ctl_usage_error("%s", "send needs one BODY, or a media id and at most one BODY");
        goto out;
    }
    if ((a->to == NULL) == (a->group == NULL)) {
        ctl_usage_error("%s", "send needs exactly one of --to USER or --group GROUP");
        goto out;
    }
    if (a->timeout != NULL && ctl_parse_long(a->timeout, 1, 3600000, &wait_ms) != PX_OK) {
        ctl_usage_error("--timeout %s is not a number of milliseconds", a->timeout);
        goto out;
    }
    id_new(id);
    cmd = json_pack("{s:s, s:s, s:s}", "type", "send", "id", id,
                    a->to != NULL ? "to" : "group", a->to != NULL ? a->to : a->group);
    int bad = cmd == NULL;
    if (!bad && a->npos == 1)
        bad = json_object_set_new(cmd, "body", json_string(a->pos[0])) != 0;
    if (!bad && media != NULL)
        bad = json_object_set_new(cmd, "media", json_string(media)) != 0;
    if (!bad && a->forward != NULL)
        bad = json_object_set_new(cmd, "forwarded", json_true()) != 0;
    if (bad) {
        ctl_usage_error("%s", "BODY, recipient and media id must be valid UTF-8");
        goto out;
    }
    rc = ctl_connect(a, &cl);
    if (rc != CTL_OK)
        goto out;
    if (client_send_json(cl, cmd) != PX_OK) {
        fprintf(stderr, "parleyctl: send failed: %s\n", client_errstr(cl));
        rc = CTL_FAIL;
        goto out;
    }
    rc = ctl_await_answer(cl, id, wait_ms);
out:
    json_decref(cmd);
    client_close(cl, 1000);
    return rc;
}

/* presence_sub for the positional users; prints one `presence` line per
 * user (or the error) as the answers come. */
static int ctl_cmd_presence(const ctl_args *a)
{
    char id[ID_BUF];
    long wait_ms = CTL_SEND_WAIT_MS;
    client *cl = NULL;
    if (a->npos == 0)
        return ctl_usage_error("%s", "presence needs one or more users to ask about");
    for (int i = 0; i < a->npos; i++)
        if (!id_valid_user(a->pos[i]))
            return ctl_usage_error("%s is not a valid user id", a->pos[i]);
    if (a->timeout != NULL && ctl_parse_long(a->timeout, 1, 3600000, &wait_ms) != PX_OK)
        return ctl_usage_error("--timeout %s is not a number of milliseconds", a->timeout);
    int rc = ctl_connect(a, &cl);
    if (rc != CTL_OK)
        return rc;
    id_new(id);
    json_t *users = json_array();
    for (int i = 0; i < a->npos; i++)
        json_array_append_new(users, json_string(a->pos[i]));
    json_t *cmd = json_pack("{s:s, s:s, s:o}", "type", "presence_sub", "id", id, "users", users);
    rc = client_send_json(cl, cmd) == PX_OK ? CTL_OK : CTL_FAIL;
    json_decref(cmd);
    int64_t deadline = px_mono_ms() + wait_ms;
    for (int got = 0; rc == CTL_OK && got < a->npos;) {
        json_t *msg = client_recv_json(cl, (int)PX_MAX(deadline - px_mono_ms(), 0));
        if (msg == NULL) {
            fprintf(stderr, "parleyctl: no answer: %s\n", client_errstr(cl));
            rc = CTL_FAIL;
            break;
        }
        const char *type = json_string_value(json_object_get(msg, "type"));
        const char *ref = json_string_value(json_object_get(msg, "ref"));
        if (type != NULL && strcmp(type, "presence") == 0) {
            ctl_print(msg);
            got++;
        } else if (ref != NULL && strcmp(ref, id) == 0) {
            ctl_print(msg); /* an error */
            rc = CTL_FAIL;
        }
        json_decref(msg);
    }
    client_close(cl, 1000);
    return rc;
}

/* Acks what was printed. Printing first means a crash in between costs a
 * duplicate (which clients dedupe by id), never a lost event. */
static int ctl_flush_acks(client *cl, json_t *ids)
{
    int rc = PX_OK;
    if (json_array_size(ids) == 0)
        return PX_OK;
    json_t *ack = json_pack("{s:s, s:O}", "type", "ack", "ids", ids);
    if (ack != NULL)
        rc = client_send_json(cl, ack);
    json_decref(ack);
    json_array_clear(ids);
    return rc;
}

static int ctl_needs_ack(const json_t *msg)
{
    const char *type = json_string_value(json_object_get(msg, "type"));
    return type != NULL && json_is_string(json_object_get(msg, "id")) &&
           (strcmp(type, "message") == 0 || strcmp(type, "receipt") == 0 ||
            strcmp(type, "group_event") == 0);
}

/* How a listen loop ended, as an exit code. */
static int ctl_listen_end(client *cl)
{
    int code = client_close_code(cl);
    if (ctl_stop)
        return CTL_OK;
    if (code != 0)
        fprintf(stderr, "parleyctl: server closed the connection (code %d)\n", code);
    else
        fprintf(stderr, "parleyctl: %s\n", client_errstr(cl));
    return code == 1000 || code == 1001 ? CTL_OK : CTL_FAIL;
}

static int ctl_listen_loop(client *cl)
{
    json_t *ids = json_array();
    int rc;
    while (!ctl_stop) {
        json_t *msg = NULL;
        /* Drain what is already here without waiting, then ack it in one go. */
        rc = client_next(cl, NULL, NULL, json_array_size(ids) > 0 ? 0 : CTL_POLL_MS, &msg);
        if (rc == PX_AGAIN) {
            if (ctl_flush_acks(cl, ids) != PX_OK)
                break;
            continue;
        }
        if (rc != PX_OK)
            break;
        ctl_print(msg);
        if (ctl_needs_ack(msg))
            json_array_append(ids, json_object_get(msg, "id"));
        json_decref(msg);
        if (json_array_size(ids) >= CTL_ACK_BATCH && ctl_flush_acks(cl, ids) != PX_OK)
            break;
    }
    (void)ctl_flush_acks(cl, ids);
    json_decref(ids);
    return ctl_listen_end(cl);
}

static int ctl_cmd_listen(const ctl_args *a)
{
    client *cl = NULL;
    struct sigaction sa = { .sa_handler = ctl_on_signal };
    if (a->npos != 0)
        return ctl_usage_error("unexpected argument %s", a->pos[0]);
    int rc = ctl_connect(a, &cl);
    if (rc != CTL_OK)
        return rc;
    /* No SA_RESTART: a signal cuts the current wait short. */
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    rc = ctl_listen_loop(cl);
    client_close(cl, 1000);
    return rc;
}

int main(int argc, char **argv)
{
    ctl_args a;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--") == 0)
            break;
        if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
            fputs(ctl_usage_text, stdout);
            return CTL_OK;
        }
    }
    if (ctl_parse(argc, argv, &a) != CTL_OK)
        return CTL_USAGE;
    if (a.cmd == NULL) {
        fputs(ctl_usage_text, stderr);
        return CTL_USAGE;
    }
    if (strcmp(a.cmd, "help") == 0) {
        fputs(ctl_usage_text, stdout);
        return CTL_OK;
    }
    if (strcmp(a.cmd, "token") == 0)
        return ctl_cmd_token(&a);
    if (strcmp(a.cmd, "send") == 0)
        return ctl_cmd_send(&a);
    if (strcmp(a.cmd, "listen") == 0)
        return ctl_cmd_listen(&a);
    if (strcmp(a.cmd, "presence") == 0)
        return ctl_cmd_presence(&a);
    return ctl_usage_error("unknown command %s", a.cmd);
}
