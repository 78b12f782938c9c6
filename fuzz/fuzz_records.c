/* libFuzzer target: the bytes of a bus record through every record
 * decoder of proto/parley.proto (the services unpack whatever a topic
 * holds), and what decodes through the encoder, which must write exactly
 * the size it announced. Not checked: that the encoding decodes again.
 * protobuf-c keeps unknown fields verbatim, field number 0 included (which
 * protobuf forbids), and writes such a field back in a form it then
 * refuses (input 80 00 06); Parley never re-encodes a record it consumed,
 * it builds each record it produces, so that cannot reach a topic. */
#include "parley.pb-c.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static const ProtobufCMessageDescriptor *const fuzz_records[] = {
    &parley__inbox_record__descriptor,  &parley__ack_record__descriptor,
    &parley__sync_request__descriptor,  &parley__presence_record__descriptor,
    &parley__delivery__descriptor,      &parley__group_command__descriptor,
    &parley__receipt_fact__descriptor, &parley__push_record__descriptor,
};

static uint8_t *fuzz_pack(const ProtobufCMessage *m, size_t *n)
{
    *n = protobuf_c_message_get_packed_size(m);
    uint8_t *buf = malloc(*n + 1);
    if (protobuf_c_message_pack(m, buf) != *n)
        abort();
    return buf;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n)
{
    for (size_t i = 0; i < sizeof(fuzz_records) / sizeof(fuzz_records[0]); i++) {
        ProtobufCMessage *m = protobuf_c_message_unpack(fuzz_records[i], NULL, n, data);
        if (m == NULL)
            continue;
        size_t len;
        free(fuzz_pack(m, &len));
        protobuf_c_message_free_unpacked(m, NULL);
    }
    return 0;
}
