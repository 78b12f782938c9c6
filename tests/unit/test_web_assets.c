/* web_assets: the embedded client is present, looked up by URL path, and
 * typed by extension. */
#include "check_main.h"
#include "web_assets.h"

#include <string.h>

START_TEST(root_is_index)
{
    const web_asset *a = web_assets_find("/");
    ck_assert_ptr_nonnull(a);
    ck_assert_str_eq(a->path, "/index.html");
    ck_assert_ptr_eq(a, web_assets_find("/index.html"));
    ck_assert_uint_gt(a->len, 0);
    ck_assert(memmem(a->data, a->len, "app.js", 6) != NULL);
    ck_assert_uint_eq(a->data[a->len], 0);
}
END_TEST

START_TEST(every_asset_is_found_and_typed)
{
    ck_assert_uint_gt(web_assets_count, 3);
    for (size_t i = 0; i < web_assets_count; i++) {
        const web_asset *a = &web_assets_table[i];
        ck_assert_ptr_eq(web_assets_find(a->path), a);
        ck_assert_str_ne(web_assets_type(a->path), "application/octet-stream");
        ck_assert_int_eq(a->etag[0], '"');
        ck_assert_int_eq(a->etag[strlen(a->etag) - 1], '"');
    }
    ck_assert_ptr_nonnull(web_assets_find("/app.js"));
}
END_TEST

START_TEST(unknown_paths_are_absent)
{
    ck_assert_ptr_null(web_assets_find(""));
    ck_assert_ptr_null(web_assets_find("/nope.js"));
    ck_assert_ptr_null(web_assets_find("app.js"));
    ck_assert_ptr_null(web_assets_find("/../app.js"));
    ck_assert_ptr_null(web_assets_find("/embed.sh"));
    ck_assert_ptr_null(web_assets_find("/v1/ws"));
}
END_TEST

START_TEST(types_by_extension)
{
    ck_assert_str_eq(web_assets_type("/index.html"), "text/html; charset=utf-8");
    ck_assert_str_eq(web_assets_type("/app.js"), "text/javascript; charset=utf-8");
    ck_assert_str_eq(web_assets_type("/style.css"), "text/css; charset=utf-8");
    ck_assert_str_eq(web_assets_type("/favicon.svg"), "image/svg+xml");
    ck_assert_str_eq(web_assets_type("/x.tar.gz"), "application/octet-stream");
    ck_assert_str_eq(web_assets_type("/noext"), "application/octet-stream");
}
END_TEST

static Suite *web_assets_suite(void)
{
    Suite *s = suite_create("web_assets");
    TCase *tc = tcase_create("web_assets");
    tcase_add_test(tc, root_is_index);
    tcase_add_test(tc, every_asset_is_found_and_typed);
    tcase_add_test(tc, unknown_paths_are_absent);
    tcase_add_test(tc, types_by_extension);
    suite_add_tcase(s, tc);
    return s;
}

PX_CHECK_MAIN(web_assets_suite)
