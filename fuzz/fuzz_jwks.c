/* libFuzzer target: a JWKS document through jwks_parse (the file an
 * operator, or a job fetching an identity provider's jwks_uri, writes). */
#include "common.h"
#include "jwks.h"

#include <stdint.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n)
{
    jwks *ks = NULL;
    char err[PX_ERRLEN];
    if (jwks_parse((const char *)data, n, &ks, err, sizeof(err)) == PX_OK)
        jwks_unref(ks);
    return 0;
}
