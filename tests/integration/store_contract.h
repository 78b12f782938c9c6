/* The store contract suite shared by the store implementations' tests. */
#ifndef PARLEY_STORE_CONTRACT_H
#define PARLEY_STORE_CONTRACT_H

#include "store.h"

#include <check.h>
#include <stddef.h>

/* Provided by each test program: opens the store under test. */
store *store_contract_open(char *err, size_t errlen);

/* Every contract test, in one TCase whose fixture opens and closes st. */
Suite *store_contract_suite(const char *name);

#endif
