/* store_sqlite (parleyd's store) against the store contract
 * (store_contract.c), in a data folder of its own, removed at the end. */
#include "common.h"
#include "store.h"
#include "store_contract.h"

#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

store *store_contract_open(char *err, size_t errlen)
{
    return store_open("sqlite", "parley", err, errlen);
}

int main(void)
{
    char dir[] = "/tmp/parley-store-test.XXXXXX";
    if (mkdtemp(dir) == NULL) {
        perror("mkdtemp");
        return EXIT_FAILURE;
    }
    setenv("PARLEY_DATA_DIR", dir, 1);
    SRunner *sr = srunner_create(store_contract_suite("store_sqlite"));
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", dir);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
