/* config: defaults, parsing, range errors naming the variable. */
#include "check_main.h"
#include <stdio.h>
#include "common.h"
#include "config.h"

#include <string.h>
#include <unistd.h>

/* Each test starts with no PARLEY_* variable, also when check does not fork
 * (CK_FORK=no, as under valgrind). */
static void clear_env(void)
{
    for (;;) {
        char **e = environ;
        while (*e != NULL && strncmp(*e, "PARLEY_", 7) != 0)
            e++;
        if (*e == NULL)
            return;
        char name[128];
        size_t n = strcspn(*e, "=");
        snprintf(name, sizeof(name), "%.*s", (int)n, *e);
        unsetenv(name);
    }
}

START_TEST(defaults_apply)
{
    unsetenv("PARLEY_MAX_BODY_BYTES");
    unsetenv("PARLEY_LISTEN");
    config cfg;
    char err[PX_ERRLEN];
    ck_assert_int_eq(config_load(&cfg, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(cfg.max_body_bytes, 65536);
    ck_assert_int_eq(cfg.max_frame_bytes, 131072);
    ck_assert_int_eq(cfg.retention_days, 30);
    ck_assert_str_eq(cfg.listen, "0.0.0.0:8080");
    ck_assert_int_eq(cfg.dev, 0);
}
END_TEST

START_TEST(values_are_read)
{
    setenv("PARLEY_MAX_BODY_BYTES", "1000", 1);
    setenv("PARLEY_DEV", "true", 1);
    setenv("PARLEY_LISTEN", "127.0.0.1:9000", 1);
    config cfg;
    char err[PX_ERRLEN];
    ck_assert_int_eq(config_load(&cfg, err, sizeof(err)), PX_OK);
    ck_assert_int_eq(cfg.max_body_bytes, 1000);
    ck_assert_int_eq(cfg.dev, 1);
    ck_assert_str_eq(cfg.listen, "127.0.0.1:9000");
}
END_TEST

START_TEST(bad_number_names_variable)
{
    setenv("PARLEY_RETENTION_DAYS", "thirty", 1);
    config cfg;
    char err[PX_ERRLEN] = "";
    ck_assert_int_eq(config_load(&cfg, err, sizeof(err)), PX_ERROR);
    ck_assert_ptr_nonnull(strstr(err, "PARLEY_RETENTION_DAYS"));
    ck_assert_ptr_nonnull(strstr(err, "not an integer"));
}
END_TEST

START_TEST(out_of_range_is_error)
{
    setenv("PARLEY_RETENTION_DAYS", "0", 1);
    config cfg;
    char err[PX_ERRLEN] = "";
    ck_assert_int_eq(config_load(&cfg, err, sizeof(err)), PX_ERROR);
    ck_assert_ptr_nonnull(strstr(err, "out of range"));
    setenv("PARLEY_RETENTION_DAYS", "12x", 1);
    ck_assert_int_eq(config_load(&cfg, err, sizeof(err)), PX_ERROR);
}
END_TEST

START_TEST(bad_bool_and_gateway_id)
{
    config cfg;
    char err[PX_ERRLEN] = "";
    setenv("PARLEY_DEV", "maybe", 1);
    ck_assert_int_eq(config_load(&cfg, err, sizeof(err)), PX_ERROR);
    ck_assert_ptr_nonnull(strstr(err, "PARLEY_DEV"));
    unsetenv("PARLEY_DEV");
    setenv("PARLEY_GATEWAY_ID", "gw/0", 1);
    ck_assert_int_eq(config_load(&cfg, err, sizeof(err)), PX_ERROR);
    ck_assert_ptr_nonnull(strstr(err, "PARLEY_GATEWAY_ID"));
}
END_TEST

START_TEST(idle_must_exceed_ping)
{
    config cfg;
    char err[PX_ERRLEN] = "";
    setenv("PARLEY_PING_MS", "5000", 1);
    setenv("PARLEY_IDLE_MS", "4000", 1);
    ck_assert_int_eq(config_load(&cfg, err, sizeof(err)), PX_ERROR);
    ck_assert_ptr_nonnull(strstr(err, "PARLEY_IDLE_MS"));
}
END_TEST

static Suite *config_suite(void)
{
    Suite *s = suite_create("config");
    TCase *tc = tcase_create("load");
    tcase_add_checked_fixture(tc, clear_env, NULL);
    tcase_add_test(tc, defaults_apply);
    tcase_add_test(tc, values_are_read);
    tcase_add_test(tc, bad_number_names_variable);
    tcase_add_test(tc, out_of_range_is_error);
    tcase_add_test(tc, bad_bool_and_gateway_id);
    tcase_add_test(tc, idle_must_exceed_ping);
    suite_add_tcase(s, tc);
    return s;
}

PX_CHECK_MAIN(config_suite)
