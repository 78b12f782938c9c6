/* buslog: the record log of parleyd's in-process bus (buslog.c). Append-only
 * segment files in one folder, written by the bus's writer thread, with an
 * index in memory per partition for consumers behind the bus's rings.
 * Not thread-safe: bus_sqlite.c calls every function under its db lock. */
#ifndef PARLEY_BUSLOG_H
#define PARLEY_BUSLOG_H

#include <stddef.h>
#include <stdint.h>

typedef struct buslog buslog;

/* One record. On append the pointers are the caller's; handed to a visitor
 * they point into the log's buffer, valid only during the call. seg and end
 * (the segment and where the record's frame ends in it) are set for
 * visitors only. */
typedef struct buslog_rec {
    int topic;                /* buslog_topic's id (append); -1 to visitors of buslog_scan */
    int32_t part;
    int64_t off;
    int64_t ts_ms;
    const void *key;
    size_t key_len;
    const void *value;
    size_t len;
    uint32_t seg;
    uint64_t end;
} buslog_rec;

/* Returns 0 to go on, anything else to stop the walk. */
typedef int (*buslog_visit)(void *arg, const char *topic, const buslog_rec *r);

/* Opens (creating) the log in dir: reads every segment to index it, cutting
 * off a last frame that does not check out (a write cut short by kill -9).
 * A segment takes appends until it holds seg_bytes. */
int buslog_open(buslog **out, const char *dir, uint64_t seg_bytes, char *err, size_t errlen);
void buslog_close(buslog *lg);

/* The id of a topic (made on first use); -1 when the log has too many. */
int buslog_topic(buslog *lg, const char *name);

/* Appends n records (offsets growing per partition) in one write: all of
 * them or, on PX_ERROR with err, none. */
int buslog_append(buslog *lg, const buslog_rec *recs, size_t n, char *err, size_t errlen);

/* One past the last offset logged in the partition (0 when none). */
int64_t buslog_end(const buslog *lg, int topic, int32_t part);

/* Visits, in order, at most max records of the partition with offsets in
 * [from, to): the count visited, or PX_ERROR with err. */
int buslog_read(buslog *lg, int topic, int32_t part, int64_t from, int64_t to, size_t max,
                buslog_visit cb, void *arg, char *err, size_t errlen);

/* The partition's records below keep are no longer wanted. */
void buslog_trim(buslog *lg, int topic, int32_t part, int64_t keep);

/* None of the topic's records are wanted (a volatile topic's, logged by an
 * older process). */
void buslog_forget(buslog *lg, int topic);

/* Deletes the segments that hold only records no longer wanted (never the
 * one taking appends); the number deleted. */
int buslog_retain(buslog *lg);

/* The topics in the log and their highest logged partition + 1, for the
 * bus's startup: calls cb(arg, name, nparts) for each. */
void buslog_each_topic(const buslog *lg, void (*cb)(void *arg, const char *name, int nparts),
                       void *arg);

/* Reads every record of the log in dir without opening it for appends (no
 * cut, no index): for tests and tools. PX_OK, or PX_ERROR with err. */
int buslog_scan(const char *dir, buslog_visit cb, void *arg, char *err, size_t errlen);

/* dir/<seg>.seg into path. */
void buslog_seg_path(const char *dir, uint32_t seg, char *path, size_t len);

#endif
