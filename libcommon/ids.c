/* Owns id generation. The per-process part of an id is seeded from
 * getrandom() so two processes started in the same millisecond differ. */
#include "ids.h"
#include "common.h"

#include <errno.h>
#include <openssl/sha.h>
#include <stdio.h>
#include <stdlib.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

static const char id_alphabet[] = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";

static pthread_once_t id_once = PTHREAD_ONCE_INIT;
static uint32_t id_seed;
static _Atomic uint64_t id_counter;

static void id_init(void)
{
    uint64_t r[2] = { 0, 0 };
    if (getrandom(r, sizeof(r), 0) != (ssize_t)sizeof(r)) {
        r[0] = (uint64_t)px_now_ms() ^ ((uint64_t)getpid() << 32);
        r[1] = r[0] * 0x9E3779B97F4A7C15ULL;
    }
    id_seed = (uint32_t)r[0];
    atomic_store(&id_counter, r[1] & 0xFFFFFFFFFFULL); /* leave headroom */
}

/* Encodes 16 bytes (128 bits) as 26 base32 characters, most significant first. */
static void id_encode(const uint8_t b[16], char out[ID_BUF])
{
    for (int i = 0; i < ID_LEN; i++) {
        int bit = i * 5 - 2; /* 130 bits of room for 128: two leading zero bits */
        unsigned v = 0;
        for (int k = 0; k < 5; k++, bit++) {
            v <<= 1;
            if (bit >= 0)
                v |= (b[bit / 8] >> (7 - bit % 8)) & 1;
        }
        out[i] = id_alphabet[v];
    }
    out[ID_LEN] = '\0';
}

void id_new(char out[ID_BUF])
{
    pthread_once(&id_once, id_init);
    uint64_t ms = (uint64_t)px_now_ms();
    uint64_t ctr = atomic_fetch_add(&id_counter, 1) & 0xFFFFFFFFFFFFULL;
    uint8_t b[16];
    for (int i = 0; i < 6; i++)
        b[i] = (uint8_t)(ms >> (8 * (5 - i)));
    for (int i = 0; i < 4; i++)
        b[6 + i] = (uint8_t)(id_seed >> (8 * (3 - i)));
    for (int i = 0; i < 6; i++)
        b[10 + i] = (uint8_t)(ctr >> (8 * (5 - i)));
    id_encode(b, out);
}

void id_secret(char out[ID_BUF])
{
    uint8_t b[16];
    ssize_t n;
    while ((n = getrandom(b, sizeof(b), 0)) < 0 && errno == EINTR)
        ;
    if (n != (ssize_t)sizeof(b)) {
        fprintf(stderr, "id_secret: getrandom failed: %s\n", strerror(errno));
        abort();
    }
    id_encode(b, out);
}

void id_for_send(const char *sender, const char *client_id, char out[ID_BUF])
{
    /* Both inputs are validated to 64 characters before they get here; the
     * NUL after sender keeps ("ab","c") and ("a","bc") apart. */
    char buf[12 + 65 + 65];
    size_t ns = strnlen(sender, 64), nc = strnlen(client_id, 64);
    memcpy(buf, "parley-send", 12);
    memcpy(buf + 12, sender, ns);
    buf[12 + ns] = '\0';
    memcpy(buf + 13 + ns, client_id, nc);
    uint8_t md[SHA256_DIGEST_LENGTH];
    SHA256((const unsigned char *)buf, 13 + ns + nc, md);
    id_encode(md, out);
}

void id_for_receipt(const char *msg_id, const char *reader, const char *status,
                    char out[ID_BUF])
{
    /* NUL separators keep the three fields apart, as in id_for_send. */
    char buf[15 + 256 + 65 + 17];
    size_t nm = strnlen(msg_id, 255), nr = strnlen(reader, 64), ns = strnlen(status, 16);
    size_t n = 0;
    memcpy(buf, "parley-receipt", 15);
    n = 15;
    memcpy(buf + n, msg_id, nm);
    n += nm;
    buf[n++] = '\0';
    memcpy(buf + n, reader, nr);
    n += nr;
    buf[n++] = '\0';
    memcpy(buf + n, status, ns);
    n += ns;
    uint8_t md[SHA256_DIGEST_LENGTH];
    SHA256((const unsigned char *)buf, n, md);
    id_encode(md, out);
}

int id_valid_user(const char *s)
{
    size_t n = strlen(s);
    return n >= 1 && n <= 64 &&
           strspn(s, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-") == n;
}

int id_valid_client(const char *s)
{
    size_t n = strlen(s);
    if (n < 1 || n > 64)
        return 0;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] < 0x20 || (unsigned char)s[i] > 0x7e)
            return 0;
    return 1;
}
