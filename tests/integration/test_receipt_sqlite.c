/* Owns the run-for-real test of receipt's skipping of repeated facts
 * (services/receipt/apply.c): the service's unchanged main, linked in as
 * receipt_main as parleyd links it, on a thread of this process over the
 * SQLite bus and store in a data folder of its own. The test plays
 * message-store on parley.receipts and reads the receipts off parley.inbox
 * in a group of its own. One process per test (fork mode, forced below):
 * receipt_main keeps its state in statics. Time is never asserted: counts
 * are taken once a later fact's receipt was read (one partition each way,
 * receipts produced in record order). */
#include "bus.h"
#include "common.h"
#include "ids.h"
#include "lifecycle.h"
#include "metrics.h"
#include "store.h"
#include "parley.pb-c.h"

#include <check.h>
#include <errno.h>
#include <jansson.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int receipt_main(void);

/* The fact as message-store's ack.c packs it, written out rather than taken
 * from receipt.h (RECEIPT_RECORD_VERSION). */
#define TR_FACT_VERSION 1
#define TR_RECEIPTS "parley.receipts"
#define TR_INBOX "parley.inbox"
#define TR_READER "ann"
#define TR_SENDER "bob"
#define TR_WAIT_MS 30000
#define TR_SEEN_MAX 64
#define TR_USER_BUF 65         /* a user id: 1-64 characters */

#define TR_DELIVERED PARLEY__RECEIPT_FACT__STATUS__STATUS_DELIVERED
#define TR_READ PARLEY__RECEIPT_FACT__STATUS__STATUS_READ
#define TR_READ_CLAIM PARLEY__RECEIPT_FACT__STATUS__STATUS_READ_CLAIM

/* A receipt read off parley.inbox. */
typedef struct tr_receipt {
    char msg_id[64];
    char status[16];
} tr_receipt;

static char tr_dir[64];
static pthread_t tr_th;
static int tr_rc = -1;
static int tr_dr_failed;
static bus *tr_inbox;              /* the test's consumer of parley.inbox */
static tr_receipt tr_seen[TR_SEEN_MAX];
static size_t tr_nseen;

static void tr_on_dr(void *opaque, int status, const char *err, int32_t partition,
                     int64_t offset)
{
    if (status != PX_OK)
        tr_dr_failed++;
}

static void *tr_receipt_thread(void *arg)
{
    tr_rc = receipt_main();
    return NULL;
}

/* The process, the data folder, receipt's configuration and the test's
 * reader of parley.inbox; returns the producer the test speaks through.
 * Topics are made first with one partition: receipt reads the facts, and
 * the test the receipts, in produce order. */
static bus *tr_begin(store **st)
{
    char err[PX_ERRLEN] = "";
    /* First, before any thread: SIGTERM stops receipt through its own
     * signal path and must never reach this thread. */
    ck_assert_int_eq(lifecycle_init(NULL, NULL), PX_OK);
    snprintf(tr_dir, sizeof(tr_dir), "/tmp/parley-receipt-test.XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(tr_dir));
    setenv("PARLEY_DATA_DIR", tr_dir, 1);
    setenv("PARLEY_PARTITIONS", "1", 1);
    setenv("PARLEY_ADMIN_LISTEN", "off", 1);

    bus_conf pc = { .client_id = "test-message-store", .partitions = 1, .dr_cb = tr_on_dr };
    bus *b = bus_new(&pc, err, sizeof(err));
    ck_assert_msg(b != NULL, "bus_new: %s", err);
    const char *topics[] = { TR_RECEIPTS, TR_INBOX, "parley.dead" };
    ck_assert_msg(bus_ensure_topics(b, topics, 3, 5000, err, sizeof(err)) == PX_OK,
                  "ensure topics: %s", err);
    bus_conf cc = { .client_id = "test-inboxes", .group = "test-inboxes", .partitions = 1 };
    tr_inbox = bus_new(&cc, err, sizeof(err));
    ck_assert_msg(tr_inbox != NULL, "bus_new (reader): %s", err);
    ck_assert_msg(bus_subscribe(tr_inbox, &topics[1], 1, err, sizeof(err)) == PX_OK,
                  "subscribe: %s", err);
    *st = store_open("sqlite", "parley", err, sizeof(err));
    ck_assert_msg(*st != NULL, "store_open: %s", err);
    return b;
}

static void tr_start_receipt(void)
{
    ck_assert_int_eq(pthread_create(&tr_th, NULL, tr_receipt_thread, NULL), 0);
}

static void tr_end(bus *b, store *st)
{
    char cmd[128];
    kill(getpid(), SIGTERM);
    pthread_join(tr_th, NULL);
    ck_assert_int_eq(tr_rc, 0);
    ck_assert_int_eq(bus_flush(b, 10000), PX_OK);
    ck_assert_int_eq(tr_dr_failed, 0);
    bus_destroy(b);
    bus_destroy(tr_inbox);
    tr_inbox = NULL;
    store_close(st);
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tr_dir);
    ck_assert_int_eq(system(cmd), 0);
    ck_assert_msg(access(tr_dir, F_OK) != 0 && errno == ENOENT, "%s is still there", tr_dir);
}

/* What message-store produces (services/message-store/ack.c, ack_fact),
 * keyed by the reader; sender is NULL for a claim. Waits until it is
 * queued; bus_flush makes it durable. */
static void tr_fact(bus *b, Parley__ReceiptFact__Status status, const char *msg_id,
                    const char *sender)
{
    char err[PX_ERRLEN] = "";
    uint8_t buf[256];
    Parley__ReceiptFact f = PARLEY__RECEIPT_FACT__INIT;
    f.version = TR_FACT_VERSION;
    f.status = status;
    f.msg_id = (char *)msg_id;
    f.reader = (char *)TR_READER;
    f.sender = (char *)(sender != NULL ? sender : "");
    f.group = (char *)"";
    f.ts_ms = px_now_ms();
    size_t len = parley__receipt_fact__get_packed_size(&f);
    ck_assert_uint_le(len, sizeof(buf));
    parley__receipt_fact__pack(&f, buf);
    ck_assert_msg(bus_produce_wait(b, TR_RECEIPTS, TR_READER, strlen(TR_READER), buf, len, NULL,
                                   10000, err, sizeof(err)) == PX_OK, "produce: %s", err);
}

static void tr_flush(bus *b)
{
    ck_assert_msg(bus_flush(b, 10000) == PX_OK, "facts not durable within 10 s");
}

/* One record off parley.inbox: a receipt for TR_SENDER about TR_READER,
 * under the receipt id of its msg_id and status. */
static void tr_take(const bus_msg *m)
{
    char id[ID_BUF];
    ck_assert_str_eq(m->topic, TR_INBOX);
    ck_assert_msg(bus_key_is(m, TR_SENDER), "a receipt keyed by another than the sender");
    Parley__InboxRecord *x = parley__inbox_record__unpack(NULL, m->len, m->value);
    ck_assert_msg(x != NULL, "an InboxRecord that does not decode");
    ck_assert_int_eq(x->kind, PARLEY__EVENT_KIND__EVENT_KIND_RECEIPT);
    ck_assert_str_eq(x->user, TR_SENDER);
    json_t *ev = json_loadb((const char *)x->event_json.data, x->event_json.len, 0, NULL);
    ck_assert_msg(ev != NULL, "a receipt whose event is not JSON");
    const char *msg_id = json_string_value(json_object_get(ev, "msg_id"));
    const char *status = json_string_value(json_object_get(ev, "status"));
    const char *by = json_string_value(json_object_get(ev, "by"));
    ck_assert_msg(msg_id != NULL && status != NULL && by != NULL, "a receipt event without "
                  "msg_id, status or by");
    ck_assert_str_eq(by, TR_READER);
    id_for_receipt(msg_id, by, status, id);
    ck_assert_str_eq(x->id, id);
    ck_assert_uint_lt(tr_nseen, TR_SEEN_MAX);
    tr_receipt *r = &tr_seen[tr_nseen++];
    snprintf(r->msg_id, sizeof(r->msg_id), "%s", msg_id);
    snprintf(r->status, sizeof(r->status), "%s", status);
    json_decref(ev);
    parley__inbox_record__free_unpacked(x, NULL);
}

/* The receipts read so far for msg_id (NULL: any) in status (NULL: any). */
static size_t tr_count(const char *msg_id, const char *status)
{
    size_t n = 0;
    for (size_t i = 0; i < tr_nseen; i++)
        n += (msg_id == NULL || strcmp(tr_seen[i].msg_id, msg_id) == 0) &&
             (status == NULL || strcmp(tr_seen[i].status, status) == 0);
    return n;
}

/* Reads parley.inbox until a receipt for msg_id in status has come. */
static void tr_wait(const char *msg_id, const char *status)
{
    char err[PX_ERRLEN] = "";
    bus_msg m[64];
    int64_t end = px_mono_ms() + TR_WAIT_MS;
    while (tr_count(msg_id, status) == 0) {
        ck_assert_msg(px_mono_ms() < end, "no \"%s\" receipt for %s on %s within %d s",
                      status, msg_id, TR_INBOX, TR_WAIT_MS / 1000);
        int n = bus_consume(tr_inbox, m, PX_ARRAY_LEN(m), 100, err, sizeof(err));
        ck_assert_msg(n >= 0, "consume: %s", err);
        for (int i = 0; i < n; i++)
            tr_take(&m[i]);
        bus_release(tr_inbox, m, (size_t)n);
    }
}

/* A counter of the service once it reached want, or after TR_WAIT_MS.
 * Counters move when a batch is done, after all its effects: its
 * receipts can be read earlier (they go out before its tracking put). */
static int64_t tr_metric(const char *name, int64_t want)
{
    metric *mt = metrics_counter(name, "");
    int64_t end = px_mono_ms() + TR_WAIT_MS;
    while (metric_value(mt) < want && px_mono_ms() < end)
        usleep(10 * 1000);
    return metric_value(mt);
}

static int tr_on_track(void *arg, const store_track *t)
{
    snprintf(arg, TR_USER_BUF, "%s", t->sender);
    return PX_OK;
}

/* 1 if (TR_READER, msg_id) is tracked, with its sender in sender[TR_USER_BUF]. */
static int tr_tracked(store *st, const char *msg_id, char sender[TR_USER_BUF])
{
    char err[PX_ERRLEN] = "";
    store_track key = { .reader = TR_READER, .msg_id = msg_id };
    sender[0] = '\0';
    ck_assert_msg(store_track_get(st, &key, 1, tr_on_track, sender, err, sizeof(err)) == PX_OK,
                  "store_track_get: %s", err);
    return sender[0] != '\0';
}

/* One DELIVERED fact of msg_id, applied: its receipt was read, so its
 * batch is done and receipt consumes the next batch only then. */
static void tr_delivered_once(bus *b, const char *msg_id)
{
    tr_fact(b, TR_DELIVERED, msg_id, TR_SENDER);
    tr_flush(b);
    tr_wait(msg_id, "delivered");
}

/* A DELIVERED fact comes again after its batch was done (its receipt read,
 * and receipt consumes the next batch only then): skipped, one receipt. */
START_TEST(delivered_repeat_in_a_later_batch_skipped)
{
    char sender[TR_USER_BUF];
    store *st;
    bus *b = tr_begin(&st);
    tr_start_receipt();
    tr_delivered_once(b, "m-1");

    tr_fact(b, TR_DELIVERED, "m-1", TR_SENDER);
    tr_fact(b, TR_DELIVERED, "m-sentinel", TR_SENDER);
    tr_flush(b);
    tr_wait("m-sentinel", "delivered");
    ck_assert_msg(tr_count("m-1", NULL) == 1, "%zu receipts for m-1, delivered twice in two "
                  "batches: the repeat was not skipped", tr_count("m-1", NULL));
    ck_assert_uint_eq(tr_count(NULL, NULL), 2);
    ck_assert_msg(tr_tracked(st, "m-1", sender), "(ann, m-1) is not tracked");
    ck_assert_str_eq(sender, TR_SENDER);
    ck_assert_int_eq(tr_metric("parley_receipt_repeats_total", 1), 1);
    tr_end(b, st);
}
END_TEST

/* The same DELIVERED fact twice and another, all durable before receipt
 * reads its topic, so that its first consume takes them as one batch:
 * the second is skipped, two receipts, not three. */
START_TEST(delivered_repeat_in_the_same_batch_skipped)
{
    char sender[TR_USER_BUF];
    store *st;
    bus *b = tr_begin(&st);
    tr_fact(b, TR_DELIVERED, "m-2", TR_SENDER);
    tr_fact(b, TR_DELIVERED, "m-2", TR_SENDER);
    tr_fact(b, TR_DELIVERED, "m-3", TR_SENDER);
    tr_flush(b);
    tr_start_receipt();

    tr_wait("m-3", "delivered");
    ck_assert_msg(tr_count("m-2", NULL) == 1, "%zu receipts for m-2, delivered twice in one "
                  "batch: the repeat was not skipped", tr_count("m-2", NULL));
    ck_assert_uint_eq(tr_count(NULL, NULL), 2);
    /* The batch's receipts may be read before its tracking put: its
     * counters move only once all of it is done. */
    ck_assert_int_eq(tr_metric("parley_receipt_repeats_total", 1), 1);
    ck_assert_msg(tr_tracked(st, "m-2", sender), "(ann, m-2) is not tracked");
    ck_assert_str_eq(sender, TR_SENDER);
    ck_assert_msg(tr_tracked(st, "m-3", sender), "(ann, m-3) is not tracked");
    tr_end(b, st);
}
END_TEST

/* A READ_CLAIM after a DELIVERED and its skipped repeat: one "read"
 * receipt, and the tracking ends. The same claim again (after that batch
 * was done) is applied too, finds nothing and tells nothing. */
START_TEST(claims_never_skipped)
{
    char sender[TR_USER_BUF];
    store *st;
    bus *b = tr_begin(&st);
    tr_start_receipt();
    tr_delivered_once(b, "m-1");

    tr_fact(b, TR_DELIVERED, "m-1", TR_SENDER);
    tr_fact(b, TR_READ_CLAIM, "m-1", NULL);
    tr_flush(b);
    tr_wait("m-1", "read");

    tr_fact(b, TR_READ_CLAIM, "m-1", NULL);
    tr_fact(b, TR_DELIVERED, "m-sentinel", TR_SENDER);
    tr_flush(b);
    tr_wait("m-sentinel", "delivered");
    ck_assert_msg(tr_count("m-1", "read") == 1, "%zu \"read\" receipts for m-1, claimed twice: "
                  "want 1", tr_count("m-1", "read"));
    ck_assert_msg(!tr_tracked(st, "m-1", sender), "(ann, m-1) still tracked after its read");
    ck_assert_int_eq(tr_metric("parley_receipt_claims_untracked_total", 1), 1);
    ck_assert_int_eq(tr_metric("parley_receipt_facts_total{status=\"read_claim\"}", 2), 2);
    tr_end(b, st);
}
END_TEST

/* A READ (read before any ack: "delivered" and "read" at once), then the
 * DELIVERED of the same message in the same batch (the ack that came
 * before the read, consumed after it): the READ told "delivered" already,
 * so the DELIVERED is a repeat: one receipt of each, and no tracking of a
 * message that was read. */
START_TEST(delivered_after_its_read_skipped)
{
    char sender[TR_USER_BUF];
    store *st;
    bus *b = tr_begin(&st);
    tr_fact(b, TR_READ, "m-4", TR_SENDER);
    tr_fact(b, TR_DELIVERED, "m-4", TR_SENDER);
    tr_fact(b, TR_DELIVERED, "m-sentinel", TR_SENDER);
    tr_flush(b);
    tr_start_receipt();

    tr_wait("m-sentinel", "delivered");
    ck_assert_msg(tr_count("m-4", "delivered") == 1, "%zu \"delivered\" receipts for m-4: "
                  "want 1", tr_count("m-4", "delivered"));
    ck_assert_uint_eq(tr_count("m-4", "read"), 1);
    ck_assert_int_eq(tr_metric("parley_receipt_repeats_total", 1), 1);
    ck_assert_msg(!tr_tracked(st, "m-4", sender), "(ann, m-4) tracked after its read");
    tr_end(b, st);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("receipt_sqlite");
    TCase *tc = tcase_create("repeats");
    tcase_set_timeout(tc, 180);
    tcase_add_test(tc, delivered_repeat_in_a_later_batch_skipped);
    tcase_add_test(tc, delivered_repeat_in_the_same_batch_skipped);
    tcase_add_test(tc, claims_never_skipped);
    tcase_add_test(tc, delivered_after_its_read_skipped);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_set_fork_status(sr, CK_FORK); /* whatever CK_FORK says: receipt_main runs once */
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
