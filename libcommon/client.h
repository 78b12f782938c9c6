/* Blocking WebSocket client for Parley's /v1/ws (RFC 6455 client side), for
 * end-to-end tests, benchmarks and parleyctl. One handle is one connection;
 * it is not thread-safe. Handle name: cl.
 *
 * Layers, lowest first:
 *   frames    client_send_frame / client_recv: raw RFC 6455, any opcode, so
 *             tests can send what a bad client would (binary, bad UTF-8,
 *             oversized, fragmented).
 *   JSON      client_send_json / client_next and its shorthands: one JSON
 *             object per text message, with a FIFO backlog so waiting for one
 *             kind of event never loses the others.
 *
 * Timeouts are in milliseconds; 0 means "only what is already here or
 * readable now", a negative value means no limit. */
#ifndef PARLEY_CLIENT_H
#define PARLEY_CLIENT_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#define CLIENT_MAX_MSG      (16u << 20) /* default ceiling, one reassembled message */
#define CLIENT_BACKLOG_MAX  10000       /* queued JSON messages... */
#define CLIENT_BACKLOG_BYTES (64u << 20) /* ...and their total text size */
#define CLIENT_HEAD_MAX     8192        /* HTTP response head during the handshake */
#define CLIENT_IO_TIMEOUT_MS 10000      /* default connect / handshake / write stall */

/* Opcodes (RFC 6455 section 5.2). */
#define CLIENT_OP_CONT   0x0
#define CLIENT_OP_TEXT   0x1
#define CLIENT_OP_BINARY 0x2
#define CLIENT_OP_CLOSE  0x8
#define CLIENT_OP_PING   0x9
#define CLIENT_OP_PONG   0xA

typedef struct client client;

typedef struct client_opts {
    const char *host;          /* name or address; required */
    int port;                  /* required */
    const char *token;         /* NULL: send no credentials (to test 401) */
    int token_in_query;        /* 1: ?access_token=, as browsers do; else Bearer header */
    const char *bind_addr;     /* NULL, or local source address ("127.0.0.7") */
    int timeout_ms;            /* connect + handshake, and each later write stall;
                                  0 = CLIENT_IO_TIMEOUT_MS */
    size_t max_msg;            /* receive ceiling; 0 = CLIENT_MAX_MSG */
} client_opts;

typedef struct client_frame {
    int opcode;                /* CLIENT_OP_TEXT, _BINARY, _CLOSE or _PONG */
    const uint8_t *payload;    /* whole message; NUL-terminated (not counted in
                                  len). For CLOSE: the reason text only. */
    size_t len;
    int close_code;            /* CLOSE only: the code, 1005 if none was sent */
} client_frame;

/* Connects and performs the upgrade (GET /v1/ws), checking the 101 status,
 * Upgrade/Connection headers and Sec-WebSocket-Accept. Returns the handle,
 * or NULL with err set and *http_status (if non-NULL) set to:
 *   0     no HTTP answer (DNS, connect, timeout, garbage);
 *   N     the server's status when it was not 101 (e.g. 401);
 *   101   the server said 101 but the handshake was invalid (bad Accept).
 * Bytes the server sends right after the 101 are kept for client_recv. */
client *client_connect_ex(const client_opts *o, int *http_status, char *err, size_t errlen);

/* client_connect_ex with a Bearer token and default ceiling. */
client *client_connect(const char *host, int port, const char *token,
                       const char *bind_addr, int timeout_ms, int *http_status,
                       char *err, size_t errlen);

/* Sends one frame with a fresh random mask. Any opcode and fin are allowed,
 * on purpose: this is how tests send fragments, binary and malformed data;
 * opcode bits 0x70 go out as RSV1-3. Payloads of any size are masked in
 * chunks (no copy of the whole message).
 * PX_OK, or PX_ERROR (peer gone, write stalled for timeout_ms); after an
 * error further sends fail, but client_recv still reads what the server sent
 * (typically its close frame explaining why). */
int client_send_frame(client *cl, int opcode, const void *payload, size_t len, int fin);
int client_send_text(client *cl, const char *s, size_t len);
/* Sends msg as one compact text frame; msg stays the caller's. */
int client_send_json(client *cl, const json_t *msg);

/* Reads the next complete message from the wire (the backlog is not looked
 * at). Fragments are reassembled; pings are answered with a pong and only
 * counted (client_pings); pongs are returned. A close frame is returned as
 * CLIENT_OP_CLOSE and answered with a close echo; after it every call
 * returns PX_ERROR.
 * Returns PX_OK with *out filled, PX_AGAIN when timeout_ms passed without a
 * whole message (a partial one is kept for the next call), or PX_ERROR on
 * EOF, socket error, protocol violation by the server, or a message over
 * the ceiling (then a close 1009 is sent). client_errstr says which.
 * out->payload is owned by cl and valid until the next client_recv,
 * client_next (or its shorthands), client_close or client_free. */
int client_recv(client *cl, int timeout_ms, client_frame *out);

/* Chooses a JSON message; return non-zero to take it. */
typedef int (*client_pred)(const json_t *msg, void *arg);

/* The first JSON message satisfying pred (NULL: any), looking at the backlog
 * (oldest first) before the wire. Non-matching text messages read meanwhile
 * join the backlog in arrival order; pongs are skipped. PX_OK with *out set
 * (caller decrefs), PX_AGAIN on timeout, PX_ERROR on a close frame (see
 * client_close_code), a non-JSON or binary message, a full backlog, or any
 * client_recv error. */
int client_next(client *cl, client_pred pred, void *arg, int timeout_ms, json_t **out);

/* Shorthands for client_next; NULL on timeout or error (client_errstr).
 * recv_json: the next message whatever it is, backlog first.
 * wait_type: first with "type" equal to type.
 * wait_ref:  first with "ref" equal to ref (the sent or error for a command). */
json_t *client_recv_json(client *cl, int timeout_ms);
json_t *client_wait_type(client *cl, const char *type, int timeout_ms);
json_t *client_wait_ref(client *cl, const char *ref, int timeout_ms);

/* Reads until the server's close frame, backlogging JSON met on the way.
 * The close code (1005 when the frame had none), or -1 on timeout or error. */
int client_wait_close(client *cl, int timeout_ms);

/* Close code the server sent, or 0 if no close frame has been received. */
int client_close_code(const client *cl);
/* Number of JSON messages waiting in the backlog. */
size_t client_backlog_len(const client *cl);
/* Pings received (each was answered). */
uint64_t client_pings(const client *cl);
/* The socket, for epoll/poll users. Readable is only a hint: cl may already
 * hold whole messages, so call client_recv(cl, 0, ...) until PX_AGAIN before
 * waiting on the fd again. */
int client_fd(const client *cl);
/* Why the last call failed; never NULL. */
const char *client_errstr(const client *cl);

/* Sends a close frame (code 0: no code), waits up to 500 ms for the server
 * to finish the closing handshake, then frees. NULL is ignored. */
void client_close(client *cl, int code);
/* Drops the connection without a closing handshake (an abrupt disconnect,
 * like a phone losing coverage) and frees. NULL is ignored. */
void client_free(client *cl);

#endif
