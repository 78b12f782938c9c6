/* buslog: the record log of parleyd's in-process bus (buslog.h).
 *
 * Why a log of its own, not rows of bus.db: a row in a SQLite B-tree costs
 * whole 4 KiB pages in the WAL (the tail leaf of every partition a group
 * commit touched, written again on each commit, then copied back by the
 * checkpoint) plus a retention delete per record. At 16,000 messages/s that
 * was the bus writer's largest cost and ~40% of parleyd's bytes written;
 * here a record costs its own bytes once, in one write(2) per group commit,
 * and retention is an unlink per segment (docs/parleyd-bus.md has figures).
 *
 * A frame: u32 body length, u32 crc32 of the body, the body: u16 topic name
 * length, the name, i32 partition, i64 offset, i64 timestamp, u32 key
 * length, u32 value length, key, value; host byte order (the files never
 * leave the host). Frames of every topic share one stream of segments,
 * named by a sequence number. A segment is closed with fdatasync when it is
 * full, and deleted once no partition's index points into it. A frame that
 * does not check out ends its segment: a write cut short by kill -9 (opening
 * cuts it away; later segments, if any, are read on). Durability is that of the page cache, as with SQLite's WAL
 * at synchronous=NORMAL and Kafka's defaults: a write survives kill -9 of
 * the process, not an OS crash.
 *
 * The index: per partition, the offset, segment and position of every
 * record still wanted, 16 bytes each (a group that stops committing keeps
 * its topics' entries, as it keeps the records on disk). */
#include "buslog.h"
#include "common.h"
#include "log.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#define BUSLOG_MAX_TOPICS 64
#define BUSLOG_MAX_PARTS 1024
#define BUSLOG_MAX_NAME 255
#define BUSLOG_MAX_BODY (64u << 20)    /* a frame longer than this is damage */
#define BUSLOG_HEAD 8                  /* body length, crc */
#define BUSLOG_FIXED (2 + 4 + 8 + 8 + 4 + 4)
#define BUSLOG_KEEP_BUF (4u << 20)     /* a larger write or read buffer is freed after use */

typedef struct buslog_ent {
    int64_t off;
    uint32_t seg;
    uint32_t pos;                      /* where the frame starts */
} buslog_ent;

/* Entries e[head, head + n), offsets growing. */
typedef struct buslog_part {
    buslog_ent *e;
    size_t head, n, cap;
} buslog_part;

typedef struct buslog_tp {
    char *name;
    int nparts;                        /* highest partition seen + 1 */
    buslog_part *parts;                /* BUSLOG_MAX_PARTS, made on first use */
} buslog_tp;

struct buslog {
    char dir[PATH_MAX - 32];
    uint64_t seg_bytes;
    int fd;                            /* the segment taking appends */
    uint32_t seg, first_seg;           /* it, and the oldest not deleted */
    uint64_t size;                     /* its bytes */
    int rfd;                           /* the segment read last (-1 none) */
    uint32_t rseg;
    unsigned char *wbuf, *rbuf;
    size_t wcap, rcap;
    buslog_tp topics[BUSLOG_MAX_TOPICS];
    size_t ntopics;
};

void buslog_seg_path(const char *dir, uint32_t seg, char *path, size_t len)
{
    snprintf(path, len, "%s/%010u.seg", dir, seg);
}

static unsigned char *buslog_room(unsigned char **buf, size_t *cap, size_t want)
{
    if (want > *cap) {
        *cap = PX_MAX(want, *cap * 2);
        *buf = px_realloc(*buf, *cap);
    }
    return *buf;
}

/* A burst of large records (up to 64 MiB a group commit) does not keep its
 * buffer for the life of the process. */
static void buslog_shrink(unsigned char **buf, size_t *cap)
{
    if (*cap <= BUSLOG_KEEP_BUF)
        return;
    free(*buf);
    *buf = NULL;
    *cap = 0;
}

/* ---- frames ---- */

typedef struct buslog_frame {
    char name[BUSLOG_MAX_NAME + 1];
    buslog_rec r;
} buslog_frame;

/* Parses the frame at p (avail bytes there): its length, 0 when it does
 * not check out. */
static size_t buslog_parse(const unsigned char *p, size_t avail, buslog_frame *f)
{
    uint32_t blen, crc;
    uint16_t nlen;
    uint32_t klen, vlen;
    if (avail < BUSLOG_HEAD)
        return 0;
    memcpy(&blen, p, 4);
    memcpy(&crc, p + 4, 4);
    if (blen < BUSLOG_FIXED || blen > BUSLOG_MAX_BODY || avail - BUSLOG_HEAD < blen)
        return 0;
    const unsigned char *b = p + BUSLOG_HEAD;
    if ((uint32_t)crc32(0, b, blen) != crc)
        return 0;
    memcpy(&nlen, b, 2);
    if (nlen > BUSLOG_MAX_NAME || BUSLOG_FIXED + (size_t)nlen > blen)
        return 0;
    memcpy(f->name, b + 2, nlen);
    f->name[nlen] = '\0';
    b += 2 + nlen;
    memcpy(&f->r.part, b, 4);
    memcpy(&f->r.off, b + 4, 8);
    memcpy(&f->r.ts_ms, b + 12, 8);
    memcpy(&klen, b + 20, 4);
    memcpy(&vlen, b + 24, 4);
    if ((uint64_t)BUSLOG_FIXED + nlen + klen + vlen != blen || f->r.part < 0 ||
        f->r.part >= BUSLOG_MAX_PARTS || f->r.off < 0)
        return 0;
    f->r.key = b + 28;
    f->r.key_len = klen;
    f->r.value = b + 28 + klen;
    f->r.len = vlen;
    f->r.topic = -1;
    return BUSLOG_HEAD + blen;
}

static size_t buslog_frame_len(const buslog_tp *t, const buslog_rec *r)
{
    return BUSLOG_HEAD + BUSLOG_FIXED + strlen(t->name) + r->key_len + r->len;
}

static void buslog_put(unsigned char *p, const buslog_tp *t, const buslog_rec *r)
{
    uint16_t nlen = (uint16_t)strlen(t->name);
    uint32_t klen = (uint32_t)r->key_len, vlen = (uint32_t)r->len;
    uint32_t blen = (uint32_t)(BUSLOG_FIXED + nlen + klen + vlen);
    unsigned char *b = p + BUSLOG_HEAD;
    memcpy(b, &nlen, 2);
    memcpy(b + 2, t->name, nlen);
    unsigned char *q = b + 2 + nlen;
    memcpy(q, &r->part, 4);
    memcpy(q + 4, &r->off, 8);
    memcpy(q + 12, &r->ts_ms, 8);
    memcpy(q + 20, &klen, 4);
    memcpy(q + 24, &vlen, 4);
    if (klen > 0)
        memcpy(q + 28, r->key, klen);
    if (vlen > 0)
        memcpy(q + 28 + klen, r->value, vlen);
    uint32_t crc = (uint32_t)crc32(0, b, blen);
    memcpy(p, &blen, 4);
    memcpy(p + 4, &crc, 4);
}

/* ---- the index ---- */

int buslog_topic(buslog *lg, const char *name)
{
    for (size_t i = 0; i < lg->ntopics; i++)
        if (strcmp(lg->topics[i].name, name) == 0)
            return (int)i;
    if (lg->ntopics == BUSLOG_MAX_TOPICS || strlen(name) > BUSLOG_MAX_NAME)
        return -1;
    buslog_tp *t = &lg->topics[lg->ntopics];
    t->name = px_strdup(name);
    t->parts = px_calloc(BUSLOG_MAX_PARTS, sizeof(*t->parts));
    return (int)lg->ntopics++;
}

static buslog_part *buslog_part_of(const buslog *lg, int topic, int32_t part)
{
    if (topic < 0 || (size_t)topic >= lg->ntopics || part < 0 || part >= BUSLOG_MAX_PARTS)
        return NULL;
    return &lg->topics[topic].parts[part];
}

/* The first entry at or past off (n when none). */
static size_t buslog_find(const buslog_part *p, int64_t off)
{
    size_t lo = 0, hi = p->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (p->e[p->head + mid].off < off)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* An offset already indexed (a record logged again: only a legacy table
 * moved twice) replaces it and everything after it. */
static void buslog_index(buslog *lg, int topic, const buslog_rec *r, uint32_t seg, uint64_t pos)
{
    buslog_tp *t = &lg->topics[topic];
    buslog_part *p = &t->parts[r->part];
    if (p->n > 0 && p->e[p->head + p->n - 1].off >= r->off)
        p->n = buslog_find(p, r->off);
    if (p->head + p->n == p->cap) {
        if (p->head > p->n) {
            memmove(p->e, p->e + p->head, p->n * sizeof(*p->e));
            p->head = 0;
        } else {
            p->cap = PX_MAX(p->cap * 2, 64);
            p->e = px_realloc(p->e, p->cap * sizeof(*p->e));
        }
    }
    p->e[p->head + p->n++] = (buslog_ent){ r->off, seg, (uint32_t)pos };
    t->nparts = PX_MAX(t->nparts, r->part + 1);
}

int64_t buslog_end(const buslog *lg, int topic, int32_t part)
{
    const buslog_part *p = buslog_part_of(lg, topic, part);
    return p != NULL && p->n > 0 ? p->e[p->head + p->n - 1].off + 1 : 0;
}

void buslog_trim(buslog *lg, int topic, int32_t part, int64_t keep)
{
    buslog_part *p = buslog_part_of(lg, topic, part);
    if (p == NULL)
        return;
    size_t k = buslog_find(p, keep);
    p->head += k;
    p->n -= k;
    if (p->n == 0)
        p->head = 0;
}

void buslog_forget(buslog *lg, int topic)
{
    for (int32_t part = 0; topic >= 0 && (size_t)topic < lg->ntopics && part < BUSLOG_MAX_PARTS;
         part++)
        buslog_trim(lg, topic, part, INT64_MAX);
}

void buslog_each_topic(const buslog *lg, void (*cb)(void *arg, const char *name, int nparts),
                       void *arg)
{
    for (size_t i = 0; i < lg->ntopics; i++)
        if (lg->topics[i].nparts > 0)
            cb(arg, lg->topics[i].name, lg->topics[i].nparts);
}

/* ---- segments ---- */

static int buslog_cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* The segment numbers in dir, sorted (caller frees *out). */
static int buslog_list(const char *dir, uint32_t **out, size_t *n, char *err, size_t errlen)
{
    DIR *d = opendir(dir);
    if (d == NULL)
        return px_err(err, errlen, "bus log: %s: %s", dir, strerror(errno));
    size_t cap = 0;
    *out = NULL;
    *n = 0;
    for (struct dirent *e; (e = readdir(d)) != NULL;) {
        char *end;
        unsigned long v = strtoul(e->d_name, &end, 10);
        if (end == e->d_name || strcmp(end, ".seg") != 0 || v > UINT32_MAX)
            continue;
        if (*n == cap) {
            cap = PX_MAX(cap * 2, 16);
            *out = px_realloc(*out, cap * sizeof(**out));
        }
        (*out)[(*n)++] = (uint32_t)v;
    }
    closedir(d);
    if (*n > 0)
        qsort(*out, *n, sizeof(**out), buslog_cmp_u32);
    return PX_OK;
}

/* A segment opened with flags, and its size; -1 with err. */
static int buslog_open_file(const char *path, int flags, uint64_t *size, char *err,
                            size_t errlen)
{
    int fd = open(path, flags | O_CLOEXEC, 0644);
    struct stat st;
    if (fd >= 0 && fstat(fd, &st) == 0) {
        *size = (uint64_t)st.st_size;
        return fd;
    }
    int e = errno;
    if (fd >= 0)
        close(fd);
    px_err(err, errlen, "bus log: %s: %s", path, strerror(e));
    return -1;
}

/* Visits every frame of one segment; *good is where the last good frame
 * ends (the segment's length when it is whole). */
static int buslog_walk(const char *path, uint32_t seg, buslog_visit cb, void *arg,
                       uint64_t *good, char *err, size_t errlen)
{
    uint64_t fsize;
    *good = 0;
    int fd = buslog_open_file(path, O_RDONLY, &fsize, err, errlen);
    if (fd < 0)
        return PX_ERROR;
    size_t size = (size_t)fsize;
    void *map = size > 0 ? mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0) : NULL;
    close(fd);
    if (map == MAP_FAILED)
        return px_err(err, errlen, "bus log: mmap %s: %s", path, strerror(errno));
    buslog_frame f;
    int stop = 0;
    for (size_t pos = 0, len; !stop && pos < size &&
         (len = buslog_parse((const unsigned char *)map + pos, size - pos, &f)) > 0;) {
        pos += len;
        f.r.seg = seg;
        f.r.end = pos;
        *good = pos;
        stop = cb(arg, f.name, &f.r);
    }
    if (map != NULL)
        munmap(map, size);
    return PX_OK;
}

static int buslog_load_one(void *arg, const char *topic, const buslog_rec *r)
{
    buslog *lg = arg;
    int id = buslog_topic(lg, topic);
    if (id >= 0)
        buslog_index(lg, id, r, r->seg, r->end - buslog_frame_len(&lg->topics[id], r));
    else
        log_warn("bus log: too many topics, records skipped", "{s:s}", "topic", topic);
    return 0;
}

static int buslog_open_seg(buslog *lg, uint32_t seg, char *err, size_t errlen)
{
    char path[PATH_MAX];
    buslog_seg_path(lg->dir, seg, path, sizeof(path));
    uint64_t size;
    int fd = buslog_open_file(path, O_WRONLY | O_CREAT, &size, err, errlen);
    if (fd < 0)
        return PX_ERROR;
    if (lg->fd >= 0)
        close(lg->fd);
    lg->fd = fd;
    lg->seg = seg;
    lg->size = size;
    return PX_OK;
}

int buslog_open(buslog **out, const char *dir, uint64_t seg_bytes, char *err, size_t errlen)
{
    *out = NULL;
    if (mkdir(dir, 0755) != 0 && errno != EEXIST)
        return px_err(err, errlen, "bus log: mkdir %s: %s", dir, strerror(errno));
    buslog *lg = px_calloc(1, sizeof(*lg));
    snprintf(lg->dir, sizeof(lg->dir), "%s", dir);
    lg->seg_bytes = PX_MAX(seg_bytes, 4096);
    lg->fd = lg->rfd = -1;
    uint32_t *segs;
    size_t nsegs;
    if (buslog_list(dir, &segs, &nsegs, err, errlen) != PX_OK) {
        free(lg);
        return PX_ERROR;
    }
    int rc = PX_OK;
    for (size_t i = 0; i < nsegs && rc == PX_OK; i++) {
        char path[PATH_MAX];
        uint64_t good;
        struct stat st;
        buslog_seg_path(dir, segs[i], path, sizeof(path));
        rc = buslog_walk(path, segs[i], buslog_load_one, lg, &good, err, errlen);
        if (rc == PX_OK && stat(path, &st) == 0 && (uint64_t)st.st_size > good) {
            log_warn("bus log: cutting a damaged or unfinished end", "{s:s, s:I, s:I}", "segment",
                     path, "at", (json_int_t)good, "size", (json_int_t)st.st_size);
            if (truncate(path, (off_t)good) != 0)
                rc = px_err(err, errlen, "bus log: truncate %s: %s", path, strerror(errno));
        }
    }
    lg->first_seg = nsegs > 0 ? segs[0] : 1;
    uint32_t last = nsegs > 0 ? segs[nsegs - 1] : 1;
    free(segs);
    if (rc == PX_OK)
        rc = buslog_open_seg(lg, last, err, errlen);
    if (rc != PX_OK) {
        buslog_close(lg);
        return PX_ERROR;
    }
    *out = lg;
    return PX_OK;
}

void buslog_close(buslog *lg)
{
    if (lg == NULL)
        return;
    if (lg->fd >= 0)
        close(lg->fd);
    if (lg->rfd >= 0)
        close(lg->rfd);
    for (size_t i = 0; i < lg->ntopics; i++) {
        for (int p = 0; p < BUSLOG_MAX_PARTS; p++)
            free(lg->topics[i].parts[p].e);
        free(lg->topics[i].parts);
        free(lg->topics[i].name);
    }
    free(lg->wbuf);
    free(lg->rbuf);
    free(lg);
}

int buslog_scan(const char *dir, buslog_visit cb, void *arg, char *err, size_t errlen)
{
    uint32_t *segs;
    size_t nsegs;
    if (buslog_list(dir, &segs, &nsegs, err, errlen) != PX_OK)
        return PX_ERROR;
    int rc = PX_OK;
    for (size_t i = 0; i < nsegs && rc == PX_OK; i++) {
        char path[PATH_MAX];
        uint64_t good;
        buslog_seg_path(dir, segs[i], path, sizeof(path));
        rc = buslog_walk(path, segs[i], cb, arg, &good, err, errlen);
    }
    free(segs);
    return rc;
}

/* ---- appends ---- */

/* A full segment is flushed to disk and the next one takes appends; when
 * that fails the full one goes on growing (logged), losing nothing. */
static void buslog_roll(buslog *lg)
{
    char err[PX_ERRLEN];
    if (lg->size < lg->seg_bytes)
        return;
    if (fdatasync(lg->fd) != 0 || buslog_open_seg(lg, lg->seg + 1, err, sizeof(err)) != PX_OK)
        log_warn("bus log: cannot start the next segment", "{s:s}", "error",
                 errno != 0 ? strerror(errno) : err);
}

int buslog_append(buslog *lg, const buslog_rec *recs, size_t n, char *err, size_t errlen)
{
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        if (buslog_part_of(lg, recs[i].topic, recs[i].part) == NULL ||
            recs[i].len > BUSLOG_MAX_BODY / 2 || recs[i].key_len > BUSLOG_MAX_BODY / 2)
            return px_err(err, errlen, "bus log: bad record (topic %d, partition %d)",
                          recs[i].topic, recs[i].part);
        total += buslog_frame_len(&lg->topics[recs[i].topic], &recs[i]);
    }
    if (n == 0)
        return PX_OK;
    if (lg->size + total > UINT32_MAX) /* positions are 32 bits: only when rolling failed */
        return px_err(err, errlen, "bus log: segment %u is full", lg->seg);
    unsigned char *buf = buslog_room(&lg->wbuf, &lg->wcap, total);
    for (size_t i = 0, at = 0; i < n; i++) {
        buslog_put(buf + at, &lg->topics[recs[i].topic], &recs[i]);
        at += buslog_frame_len(&lg->topics[recs[i].topic], &recs[i]);
    }
    for (size_t done = 0; done < total;) {
        ssize_t w = pwrite(lg->fd, buf + done, total - done, (off_t)(lg->size + done));
        if (w > 0) {
            done += (size_t)w;
            continue;
        }
        if (w < 0 && errno == EINTR)
            continue;
        int e = w < 0 ? errno : ENOSPC;
        /* None of the batch counts: a part of it left behind would be read
         * back after a restart as records nobody was told were written. */
        if (ftruncate(lg->fd, (off_t)lg->size) != 0)
            log_error("bus log: cannot cut a failed write", "{s:s}", "error", strerror(errno));
        buslog_shrink(&lg->wbuf, &lg->wcap);
        return px_err(err, errlen, "bus log: write: %s", strerror(e));
    }
    buslog_shrink(&lg->wbuf, &lg->wcap);
    for (size_t i = 0; i < n; i++) {
        buslog_index(lg, recs[i].topic, &recs[i], lg->seg, lg->size);
        lg->size += buslog_frame_len(&lg->topics[recs[i].topic], &recs[i]);
    }
    buslog_roll(lg);
    return PX_OK;
}

/* ---- reads and retention ---- */

static int buslog_read_at(buslog *lg, const buslog_ent *e, buslog_frame *f, char *err,
                          size_t errlen)
{
    if (lg->rfd < 0 || lg->rseg != e->seg) {
        char path[PATH_MAX];
        if (lg->rfd >= 0)
            close(lg->rfd);
        buslog_seg_path(lg->dir, e->seg, path, sizeof(path));
        lg->rfd = open(path, O_RDONLY | O_CLOEXEC);
        lg->rseg = e->seg;
        if (lg->rfd < 0)
            return px_err(err, errlen, "bus log: %s: %s", path, strerror(errno));
    }
    uint32_t blen;
    unsigned char *b = buslog_room(&lg->rbuf, &lg->rcap, BUSLOG_HEAD);
    if (pread(lg->rfd, b, BUSLOG_HEAD, e->pos) != BUSLOG_HEAD)
        return px_err(err, errlen, "bus log: short read in segment %u", e->seg);
    memcpy(&blen, b, 4);
    if (blen > BUSLOG_MAX_BODY)
        return px_err(err, errlen, "bus log: damaged frame in segment %u", e->seg);
    b = buslog_room(&lg->rbuf, &lg->rcap, BUSLOG_HEAD + blen);
    if (pread(lg->rfd, b, BUSLOG_HEAD + blen, e->pos) != (ssize_t)(BUSLOG_HEAD + blen) ||
        buslog_parse(b, BUSLOG_HEAD + blen, f) == 0 || f->r.off != e->off)
        return px_err(err, errlen, "bus log: damaged frame in segment %u", e->seg);
    return PX_OK;
}

int buslog_read(buslog *lg, int topic, int32_t part, int64_t from, int64_t to, size_t max,
                buslog_visit cb, void *arg, char *err, size_t errlen)
{
    const buslog_part *p = buslog_part_of(lg, topic, part);
    if (p == NULL)
        return 0;
    buslog_frame f;
    int n = 0;
    for (size_t i = buslog_find(p, from); i < p->n && (size_t)n < max; i++) {
        const buslog_ent *e = &p->e[p->head + i];
        if (e->off >= to)
            break;
        if (buslog_read_at(lg, e, &f, err, errlen) != PX_OK) {
            n = PX_ERROR;
            break;
        }
        f.r.topic = topic;
        f.r.seg = e->seg;
        n++;
        if (cb(arg, f.name, &f.r) != 0)
            break;
    }
    buslog_shrink(&lg->rbuf, &lg->rcap);
    return n;
}

int buslog_retain(buslog *lg)
{
    uint32_t need = lg->seg;
    for (size_t i = 0; i < lg->ntopics; i++)
        for (int k = 0; k < lg->topics[i].nparts; k++) {
            const buslog_part *p = &lg->topics[i].parts[k];
            if (p->n > 0)
                need = PX_MIN(need, p->e[p->head].seg);
        }
    int deleted = 0;
    for (; lg->first_seg < need; lg->first_seg++) {
        char path[PATH_MAX];
        buslog_seg_path(lg->dir, lg->first_seg, path, sizeof(path));
        if (lg->rfd >= 0 && lg->rseg == lg->first_seg) {
            close(lg->rfd);
            lg->rfd = -1;
        }
        if (unlink(path) == 0)
            deleted++;
        else if (errno != ENOENT)
            log_warn("bus log: cannot delete a segment", "{s:s, s:s}", "segment", path, "error",
                     strerror(errno));
    }
    return deleted;
}
