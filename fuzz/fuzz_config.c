/* libFuzzer target: the environment a deployment sets, through config_load.
 * Input: lines "NAME=VALUE" (names get the PARLEY_ prefix unless they have
 * it), set after clearing the environment. */
#include "common.h"
#include "config.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n)
{
    char *text = px_strndup((const char *)data, n), *save = NULL, err[PX_ERRLEN];
    config cfg;
    clearenv();
    for (char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        char *eq = strchr(line, '=');
        if (eq == NULL || eq == line)
            continue;
        *eq = '\0';
        char name[128];
        snprintf(name, sizeof(name), "%s%s", strncmp(line, "PARLEY_", 7) ? "PARLEY_" : "", line);
        setenv(name, eq + 1, 1);
    }
    config_load(&cfg, err, sizeof(err)); /* cfg's strings point into the environment */
    clearenv();
    free(text);
    return 0;
}
