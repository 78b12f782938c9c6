/* libFuzzer target: one client text frame through proto_parse, as the
 * gateway hands it every WebSocket text message (PROTOCOL.md commands). */
#include "common.h"
#include "protocol.h"

#include <stdint.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n)
{
    proto_cmd cmd;
    enum proto_code code;
    char msg[PX_ERRLEN];
    proto_limits lim = { .max_body_bytes = 65536 };
    if (proto_parse((const char *)data, n, &lim, &cmd, &code, msg, sizeof(msg)) == PX_OK)
        proto_cmd_free(&cmd);
    return 0;
}
