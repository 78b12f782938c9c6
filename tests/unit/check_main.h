/* Shared runner for the check suites: each test file defines its suite
 * factory and uses PX_CHECK_MAIN to get a main that exits non-zero on any
 * failure. Fork mode stays on (check's default) so one crash fails one test. */
#ifndef PARLEY_CHECK_MAIN_H
#define PARLEY_CHECK_MAIN_H

#include <check.h>
#include <stdlib.h>

#define PX_CHECK_MAIN(suite_fn)                                  \
    int main(void)                                               \
    {                                                            \
        SRunner *sr = srunner_create(suite_fn());                \
        srunner_run_all(sr, CK_NORMAL);                          \
        int failed = srunner_ntests_failed(sr);                  \
        srunner_free(sr);                                        \
        return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;        \
    }

#endif
